using BenchmarkDotNet.Attributes;
using TorchSharp;
using static TorchSharp.torch;
using F = TorchSharp.torch.nn.functional;

namespace FlashAttn.Benchmarks;

/// <summary>
/// Attention forward and forward+backward at flash-attn's benchmark shapes: bf16, 16k tokens per
/// batch, hidden 2048 (nheads = 2048 / headdim), seqlen 512 to 16384. Ours (flash_attn_func,
/// (B, S, H, D)) against TorchSharp's scaled_dot_product_attention ((B, H, S, D); libtorch picks
/// cuDNN or its flash backend on the H100). FLOPs: forward 4·B·H·S²·D (half with causal),
/// backward 2.5× forward.
/// </summary>
public class AttentionBenchmarks : GpuBenchmark
{
    // 512 left out of the device runs for time (2026-11-25: 30 min of GPU a session); the bar is s >= 2048.
    [Params(2048, 8192, 16384)]
    public int SeqLen;

    [Params(64, 128)]
    public int HeadDim;

    [Params(false, true)]
    public bool Causal;

    private Tensor _q = null!, _k = null!, _v = null!, _g = null!, _qs = null!, _ks = null!, _vs = null!, _gs = null!;

    private int Batch => 16384 / SeqLen;
    private int Heads => 2048 / HeadDim;

    public override double Flops(string method)
    {
        double fwd = 4.0 * Batch * Heads * SeqLen * (double)SeqLen * HeadDim / (Causal ? 2 : 1);
        return method.EndsWith("FwdBwd") ? 3.5 * fwd : fwd;
    }

    protected override void Setup()
    {
        _q = randn(Batch, SeqLen, Heads, HeadDim, dtype: ScalarType.BFloat16, device: Dev).requires_grad_(true);
        _k = randn(Batch, SeqLen, Heads, HeadDim, dtype: ScalarType.BFloat16, device: Dev).requires_grad_(true);
        _v = randn(Batch, SeqLen, Heads, HeadDim, dtype: ScalarType.BFloat16, device: Dev).requires_grad_(true);
        _g = randn(Batch, SeqLen, Heads, HeadDim, dtype: ScalarType.BFloat16, device: Dev);
        _qs = _q.detach().transpose(1, 2).contiguous().requires_grad_(true);
        _ks = _k.detach().transpose(1, 2).contiguous().requires_grad_(true);
        _vs = _v.detach().transpose(1, 2).contiguous().requires_grad_(true);
        _gs = _g.transpose(1, 2).contiguous();
    }

    [Benchmark(OperationsPerInvoke = Launches)]
    public void FlashFwd()
    {
        using var _ = no_grad();
        for (int i = 0; i < Launches; i++) { using var s = NewDisposeScope(); flash_attn.flash_attn_func(_q, _k, _v, causal: Causal); }
        Sync();
    }

    [Benchmark(OperationsPerInvoke = Launches)]
    public void FlashFwdBwd()
    {
        for (int i = 0; i < Launches; i++)
        {
            using var s = NewDisposeScope();
            var o = flash_attn.flash_attn_func(_q, _k, _v, causal: Causal);
            autograd.grad(new[] { o }, new[] { _q, _k, _v }, new[] { _g });
        }
        Sync();
    }

    [Benchmark(OperationsPerInvoke = Launches)]
    public void SdpaFwd()
    {
        using var _ = no_grad();
        for (int i = 0; i < Launches; i++) { using var s = NewDisposeScope(); F.scaled_dot_product_attention(_qs, _ks, _vs, is_casual: Causal); }
        Sync();
    }

    [Benchmark(OperationsPerInvoke = Launches)]
    public void SdpaFwdBwd()
    {
        for (int i = 0; i < Launches; i++)
        {
            using var s = NewDisposeScope();
            var o = F.scaled_dot_product_attention(_qs, _ks, _vs, is_casual: Causal);
            autograd.grad(new[] { o }, new[] { _qs, _ks, _vs }, new[] { _gs });
        }
        Sync();
    }
}

/// <summary>
/// The cost of checking varlen offsets: flash_attn_varlen_func copies cu_seqlens_q/k (batch + 1 integers each) to the
/// host and checks them before launching, a synchronisation per call. At GPT-2's shape (16 sequences of 1024 tokens,
/// 12 heads of 64, bf16, causal) packed as varlen, beside the same forward on the dense (B, S, H, D) layout.
/// </summary>
public class AttentionVarlenBenchmarks : GpuBenchmark
{
    private const int Batch = 16, SeqLen = 1024, Heads = 12, HeadDim = 64;

    private Tensor _q = null!, _k = null!, _v = null!, _cu = null!;

    public override double Flops(string method) => 4.0 * Batch * Heads * SeqLen * (double)SeqLen * HeadDim / 2;

    protected override void Setup()
    {
        _q = randn(Batch, SeqLen, Heads, HeadDim, dtype: ScalarType.BFloat16, device: Dev);
        _k = randn(Batch, SeqLen, Heads, HeadDim, dtype: ScalarType.BFloat16, device: Dev);
        _v = randn(Batch, SeqLen, Heads, HeadDim, dtype: ScalarType.BFloat16, device: Dev);
        _cu = arange(0, (Batch + 1) * SeqLen, SeqLen, dtype: ScalarType.Int32, device: Dev);
    }

    [Benchmark(OperationsPerInvoke = Launches)]
    public void DenseFwd()
    {
        using var _ = no_grad();
        for (int i = 0; i < Launches; i++) { using var s = NewDisposeScope(); flash_attn.flash_attn_func(_q, _k, _v, causal: true); }
        Sync();
    }

    [Benchmark(OperationsPerInvoke = Launches)]
    public void VarlenFwd()
    {
        using var _ = no_grad();
        for (int i = 0; i < Launches; i++)
        {
            using var s = NewDisposeScope();
            flash_attn.flash_attn_varlen_func(_q.view(-1, Heads, HeadDim), _k.view(-1, Heads, HeadDim), _v.view(-1, Heads, HeadDim),
                                              _cu, _cu, SeqLen, SeqLen, causal: true);
        }
        Sync();
    }
}
