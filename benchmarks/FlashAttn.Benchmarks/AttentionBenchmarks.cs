using BenchmarkDotNet.Attributes;
using TorchSharp;
using static TorchSharp.torch;
using F = TorchSharp.torch.nn.functional;

namespace FlashAttn.Benchmarks;

/// <summary>
/// Attention forward and forward+backward at flash-attn's benchmark shapes: bf16, 16k tokens per
/// batch, hidden 2048 (nheads = 2048 / headdim), seqlen 512 to 16384. Our kernels (flash_attn_func_with_lse,
/// which never dispatches to SDPA, (B, S, H, D)) against TorchSharp's scaled_dot_product_attention ((B, H, S, D);
/// libtorch picks cuDNN or its flash backend on the H100). FLOPs: forward 4·B·H·S²·D (half with causal),
/// backward 2.5× forward. <see cref="AttentionDispatchBenchmarks"/> measures flash_attn_func's dispatch.
/// </summary>
public class AttentionBenchmarks : GpuBenchmark
{
    // 512 left out for time (a device session has 30 minutes of GPU); the bar is s >= 2048.
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
        for (int i = 0; i < Launches; i++) { using var s = NewDisposeScope(); flash_attn.flash_attn_func_with_lse(_q, _k, _v, causal: Causal); }
        Sync();
    }

    [Benchmark(OperationsPerInvoke = Launches)]
    public void FlashFwdBwd()
    {
        for (int i = 0; i < Launches; i++)
        {
            using var s = NewDisposeScope();
            var o = flash_attn.flash_attn_func_with_lse(_q, _k, _v, causal: Causal).output;
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
/// flash_attn_func's dispatch (AttentionDispatch) at the shapes of the rule's table: bf16, B 4, S 4096, hidden 2048 (d64
/// and d128, causal or not) and GPT-2 124M's attention (B 16, S 1024, 12 heads of 64, causal); forward and
/// forward+backward, without and with dropout 0.1. Path sets the mode in process (AttentionDispatch.Override, spelled as
/// FLASHATTN_ATTENTION_BACKEND): auto (the rule), flash (our kernels forced), sdpa (libtorch's
/// scaled_dot_product_attention forced, on (B, H, S, D) views of the (B, S, H, D) inputs); each result line carries the path that ran. The sdpa rows with dropout decide the rule's dropout switch.
/// FLOPs as <see cref="AttentionBenchmarks"/> (dropout's work not counted).
/// </summary>
public class AttentionDispatchBenchmarks : GpuBenchmark
{
    public static IEnumerable<string> Cases => new[]
    {
        "b4-s4096-h32-d64", "b4-s4096-h32-d64-causal", "b4-s4096-h16-d128", "b4-s4096-h16-d128-causal", "b16-s1024-h12-d64-causal",
    };

    [ParamsSource(nameof(Cases))]
    public string Shape = "b16-s1024-h12-d64-causal";

    [Params(0.0, 0.1)]
    public double Dropout;

    [Params("auto", "flash", "sdpa")]
    public string Path = "auto";

    // the path each (case, method) took, read by Label on the fresh instance Program.cs makes
    private static readonly System.Collections.Concurrent.ConcurrentDictionary<string, AttentionBackend> s_ran = new();

    private Tensor _q = null!, _k = null!, _v = null!, _g = null!;
    private AttentionMode? _previousPath;

    private long Dim(char key) => long.Parse(Shape.Split('-').First(p => p[0] == key)[1..]);
    private bool Causal => Shape.EndsWith("-causal");
    private string Key(string method) => $"{Shape}|{Dropout}|{Path}|{method}";

    public override double Flops(string method)
    {
        double fwd = 4.0 * Dim('b') * Dim('h') * Dim('s') * (double)Dim('s') * Dim('d') / (Causal ? 2 : 1);
        return method.EndsWith("FwdBwd") ? 3.5 * fwd : fwd;
    }

    public override string? Label(string method) => s_ran.TryGetValue(Key(method), out var b) ? $"ran {b}" : null;

    protected override void Setup()
    {
        _previousPath = AttentionDispatch.Override;
        AttentionDispatch.Override = AttentionDispatch.ParseMode(Path);
        long[] shape = { Dim('b'), Dim('s'), Dim('h'), Dim('d') };
        _q = randn(shape, dtype: ScalarType.BFloat16, device: Dev).requires_grad_(true);
        _k = randn(shape, dtype: ScalarType.BFloat16, device: Dev).requires_grad_(true);
        _v = randn(shape, dtype: ScalarType.BFloat16, device: Dev).requires_grad_(true);
        _g = randn(shape, dtype: ScalarType.BFloat16, device: Dev);
    }

    protected override void Teardown() => AttentionDispatch.Override = _previousPath;

    [Benchmark(OperationsPerInvoke = Launches)]
    public void Fwd()
    {
        using var _ = no_grad();
        for (int i = 0; i < Launches; i++)
        {
            using var s = NewDisposeScope();
            flash_attn.flash_attn_func(_q, _k, _v, Dropout, causal: Causal);
        }
        Sync();
        s_ran[Key(nameof(Fwd))] = flash_attn.last_attention_backend;
    }

    [Benchmark(OperationsPerInvoke = Launches)]
    public void FwdBwd()
    {
        for (int i = 0; i < Launches; i++)
        {
            using var s = NewDisposeScope();
            var o = flash_attn.flash_attn_func(_q, _k, _v, Dropout, causal: Causal);
            autograd.grad(new[] { o }, new[] { _q, _k, _v }, new[] { _g });
        }
        Sync();
        s_ran[Key(nameof(FwdBwd))] = flash_attn.last_attention_backend;
    }
}

/// <summary>
/// The cost of checking varlen offsets: flash_attn_varlen_func copies cu_seqlens_q/k (batch + 1 integers each) to the
/// host and checks them before launching, a synchronisation per call. At GPT-2's shape (16 sequences of 1024 tokens,
/// 12 heads of 64, bf16, causal) packed as varlen, beside the same forward of our kernels on the dense (B, S, H, D)
/// layout (flash_attn_func_with_lse: never SDPA).
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
        for (int i = 0; i < Launches; i++) { using var s = NewDisposeScope(); flash_attn.flash_attn_func_with_lse(_q, _k, _v, causal: true); }
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
