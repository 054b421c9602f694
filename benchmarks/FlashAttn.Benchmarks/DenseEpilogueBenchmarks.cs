using BenchmarkDotNet.Attributes;
using TorchSharp;
using static TorchSharp.torch;

namespace FlashAttn.Benchmarks;

/// <summary>
/// The four backward GEMMs of the GPT-2 MLP one at a time (bf16, 16384 tokens, width 768 and 1600, hidden 4×),
/// each through our cuBLASLt call with and without its fused epilogue, and through torch.mm (cuBLAS): which
/// epilogue costs what on this GPU. dW2 = gᵀ·h (+ db2 by BGRADB); dh = (g·W2) ∘ gelu'(pre) (DGELU) or plain;
/// dx = dh·W1; dW1 = dhᵀ·x (+ db1 by BGRADB). DGELU_BGRAD measured 3.6× the plain GEMM (benchmarks/RESULTS.md),
/// which moved db1 into dW1's GEMM; the column sums measure the bias gradients as a separate reduction (torch's sum and
/// ours, FlashAttn_dense_bias_grad), and Dw*Ours the weight gradient with ours in place of BGRADB.
/// </summary>
public class DenseEpilogueBenchmarks : GpuBenchmark
{
    [Params(768, 1600)]
    public int Width;

    private long Hidden => 4 * Width;

    private Tensor _x = null!, _w1 = null!, _w2 = null!, _g = null!, _h = null!, _pre = null!, _dh = null!;

    public override double Flops(string method) => method.EndsWith("ColumnSum") ? 0 : 2.0 * DenseBenchmarks.Tokens * Width * Hidden;

    // The bias gradients on their own (a column sum: one read of the gradient), against what BGRADB adds to its GEMM.
    public override long Bytes(string method) => method switch
    {
        nameof(Db2ColumnSum) or nameof(Db2OursColumnSum) => DenseBenchmarks.Tokens * Width * 2,
        nameof(Db1ColumnSum) or nameof(Db1OursColumnSum) => DenseBenchmarks.Tokens * Hidden * 2,
        _ => 0,
    };

    protected override void Setup()
    {
        var dt = ScalarType.BFloat16;
        long t = DenseBenchmarks.Tokens;
        _x = randn(new long[] { t, Width }, dtype: dt, device: Dev);
        _w1 = randn(new long[] { Hidden, Width }, dtype: dt, device: Dev);
        _w2 = randn(new long[] { Width, Hidden }, dtype: dt, device: Dev);
        _g = randn(new long[] { t, Width }, dtype: dt, device: Dev);
        _h = randn(new long[] { t, Hidden }, dtype: dt, device: Dev);
        _pre = randn(new long[] { t, Hidden }, dtype: dt, device: Dev);
        _dh = randn(new long[] { t, Hidden }, dtype: dt, device: Dev);
    }

    private static void Loop(Action op)
    {
        for (int i = 0; i < Launches; i++)
        {
            using var s = NewDisposeScope();
            op();
        }
        Sync();
    }

    [Benchmark(OperationsPerInvoke = Launches)]
    public void Dw2Bgradb() => Loop(() => DenseOps.Wgrad(_g, _h, needBias: true, kernel: true, BiasGradPath.CublasLt));

    [Benchmark(OperationsPerInvoke = Launches)]
    public void Dw2Plain() => Loop(() => DenseOps.Wgrad(_g, _h, needBias: false, kernel: true, BiasGradPath.CublasLt));

    [Benchmark(OperationsPerInvoke = Launches)]
    public void Dw2Ours() => Loop(() => DenseOps.Wgrad(_g, _h, needBias: true, kernel: true, BiasGradPath.Ours));

    [Benchmark(OperationsPerInvoke = Launches)]
    public void Dw2TorchMm() => Loop(() => _g.t().mm(_h));

    [Benchmark(OperationsPerInvoke = Launches)]
    public void DhDgelu() => Loop(() => DenseOps.ActDgrad(_g, _w2, _pre, DenseActivation.GeluApprox, kernel: true));

    [Benchmark(OperationsPerInvoke = Launches)]
    public void DhPlain() => Loop(() => DenseOps.Dgrad(_g, _w2, kernel: true));

    [Benchmark(OperationsPerInvoke = Launches)]
    public void DhTorchMm() => Loop(() => _g.mm(_w2));

    [Benchmark(OperationsPerInvoke = Launches)]
    public void DxPlain() => Loop(() => DenseOps.Dgrad(_dh, _w1, kernel: true));

    [Benchmark(OperationsPerInvoke = Launches)]
    public void DxTorchMm() => Loop(() => _dh.mm(_w1));

    [Benchmark(OperationsPerInvoke = Launches)]
    public void Dw1Bgradb() => Loop(() => DenseOps.Wgrad(_dh, _x, needBias: true, kernel: true, BiasGradPath.CublasLt));

    [Benchmark(OperationsPerInvoke = Launches)]
    public void Dw1Plain() => Loop(() => DenseOps.Wgrad(_dh, _x, needBias: false, kernel: true, BiasGradPath.CublasLt));

    [Benchmark(OperationsPerInvoke = Launches)]
    public void Dw1Ours() => Loop(() => DenseOps.Wgrad(_dh, _x, needBias: true, kernel: true, BiasGradPath.Ours));

    [Benchmark(OperationsPerInvoke = Launches)]
    public void Dw1TorchMm() => Loop(() => _dh.t().mm(_x));

    [Benchmark(OperationsPerInvoke = Launches)]
    public void Db2ColumnSum() => Loop(() => _g.sum(0L));

    [Benchmark(OperationsPerInvoke = Launches)]
    public void Db1ColumnSum() => Loop(() => _dh.sum(0L));

    [Benchmark(OperationsPerInvoke = Launches)]
    public void Db2OursColumnSum() => Loop(() => DenseOps.ColumnSums(_g, empty(Width, dtype: _g.dtype, device: Dev), backward: false));

    [Benchmark(OperationsPerInvoke = Launches)]
    public void Db1OursColumnSum() => Loop(() => DenseOps.ColumnSums(_dh, empty(Hidden, dtype: _dh.dtype, device: Dev), backward: false));
}
