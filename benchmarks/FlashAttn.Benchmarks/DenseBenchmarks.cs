using BenchmarkDotNet.Attributes;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;
using F = TorchSharp.torch.nn.functional;

namespace FlashAttn.Benchmarks;

/// <summary>
/// The GPT-2 MLP, bf16, 16384 tokens: width 768 (GPT-2 small, hidden 3072) and 1600 (GPT-2 XL, hidden 6400).
/// Ours (flash_attn.fused_mlp_func: cuBLASLt with GELU_AUX_BIAS forward, DGELU_BGRAD and BGRADB backward) at
/// checkpoint_lvl 0 and 1 (and level 0 with timed algorithm selection, FusedMlpTuned), against the TorchSharp composite (linear, gelu tanh, linear through autograd) and
/// the plain cuBLAS GEMMs of the same FLOPs without any epilogue or element-wise op (torch.mm, the floor):
/// forward x·W1ᵀ, h·W2ᵀ; backward gᵀ·h, g·W2, dhᵀ·x, dh·W1. FLOPs: forward 2 GEMMs of 2·T·W·H, forward +
/// backward 3× that, for every method. Memory: see <see cref="Memory"/>.
/// </summary>
public class DenseBenchmarks : GpuBenchmark
{
    public const int Tokens = 16384;

    [Params(768, 1600)]
    public int Width;

    private int Hidden => 4 * Width;

    private Tensor _x = null!, _w1 = null!, _b1 = null!, _w2 = null!, _b2 = null!, _g = null!;
    private Tensor _h = null!, _dh = null!;

    public override double Flops(string method)
    {
        double fwd = 2 * 2.0 * Tokens * Width * Hidden;
        return method.EndsWith("FwdBwd") ? 3 * fwd : fwd;
    }

    protected override void Setup()
    {
        var dt = ScalarType.BFloat16;
        _x = randn(new long[] { Tokens, Width }, dtype: dt, device: Dev).requires_grad_(true);
        _w1 = (randn(new long[] { Hidden, Width }, dtype: dt, device: Dev) / Math.Sqrt(Width)).requires_grad_(true);
        _b1 = zeros(new long[] { Hidden }, dtype: dt, device: Dev).requires_grad_(true);
        _w2 = (randn(new long[] { Width, Hidden }, dtype: dt, device: Dev) / Math.Sqrt(Hidden)).requires_grad_(true);
        _b2 = zeros(new long[] { Width }, dtype: dt, device: Dev).requires_grad_(true);
        _g = randn(new long[] { Tokens, Width }, dtype: dt, device: Dev);
        _h = randn(new long[] { Tokens, Hidden }, dtype: dt, device: Dev);
        _dh = randn(new long[] { Tokens, Hidden }, dtype: dt, device: Dev);
    }

    private Tensor[] Params => new[] { _x, _w1, _b1, _w2, _b2 };

    internal static Tensor Composite(Tensor x, Tensor w1, Tensor b1, Tensor w2, Tensor b2) =>
        F.linear(F.gelu(F.linear(x, w1, b1), GELU.Approximate.tanh), w2, b2);

    [Benchmark(OperationsPerInvoke = Launches)]
    public void FusedMlpFwd()
    {
        using var _ = no_grad();
        for (int i = 0; i < Launches; i++) { using var s = NewDisposeScope(); flash_attn.fused_mlp_func(_x, _w1, _w2, _b1, _b2); }
        Sync();
    }

    [Benchmark(OperationsPerInvoke = Launches)]
    public void CompositeFwd()
    {
        using var _ = no_grad();
        for (int i = 0; i < Launches; i++) { using var s = NewDisposeScope(); Composite(_x, _w1, _b1, _w2, _b2); }
        Sync();
    }

    [Benchmark(OperationsPerInvoke = Launches)]
    public void GemmFwd()
    {
        using var _ = no_grad();
        for (int i = 0; i < Launches; i++)
        {
            using var s = NewDisposeScope();
            _x.mm(_w1.t());
            _h.mm(_w2.t());
        }
        Sync();
    }

    [Benchmark(OperationsPerInvoke = Launches)]
    public void FusedMlpFwdBwd() => FusedFwdBwd(0);

    [Benchmark(OperationsPerInvoke = Launches)]
    public void FusedMlpLvl1FwdBwd() => FusedFwdBwd(1);

    /// <summary>Level 0 with the 8 fastest of cuBLASLt's heuristic candidates timed on first use (set_dense_algo_candidates).</summary>
    [Benchmark(OperationsPerInvoke = Launches)]
    public void FusedMlpTunedFwdBwd()
    {
        var previous = flash_attn.set_dense_algo_candidates(8);
        try { FusedFwdBwd(0); }
        finally { flash_attn.set_dense_algo_candidates(previous); }
    }

    private void FusedFwdBwd(int lvl)
    {
        for (int i = 0; i < Launches; i++)
        {
            using var s = NewDisposeScope();
            var y = flash_attn.fused_mlp_func(_x, _w1, _w2, _b1, _b2, checkpoint_lvl: lvl);
            autograd.grad(new[] { y }, Params, new[] { _g });
        }
        Sync();
    }

    [Benchmark(OperationsPerInvoke = Launches)]
    public void CompositeFwdBwd()
    {
        for (int i = 0; i < Launches; i++)
        {
            using var s = NewDisposeScope();
            var y = Composite(_x, _w1, _b1, _w2, _b2);
            autograd.grad(new[] { y }, Params, new[] { _g });
        }
        Sync();
    }

    [Benchmark(OperationsPerInvoke = Launches)]
    public void GemmFwdBwd()
    {
        using var _ = no_grad();
        for (int i = 0; i < Launches; i++)
        {
            using var s = NewDisposeScope();
            _x.mm(_w1.t());          // h = x W1^T
            _h.mm(_w2.t());          // y = h W2^T
            _g.t().mm(_h);           // dW2 = g^T h
            _g.mm(_w2);              // dh = g W2
            _dh.t().mm(_x);          // dW1 = dh^T x
            _dh.mm(_w1);             // dx = dh W1
        }
        Sync();
    }
}
