using BenchmarkDotNet.Attributes;
using TorchSharp;
using static TorchSharp.torch;

namespace FlashAttn.Benchmarks;

/// <summary>Shared inputs of the norm benchmarks: 16384 rows × 2048 and × 8192 features, bf16, float32 weights.</summary>
public abstract class NormBenchmarkBase : GpuBenchmark
{
    [Params(2048, 8192)]
    public int Hidden;

    protected const long Rows = 16384;
    protected Tensor X0 = null!, Residual = null!, Weight = null!, Bias = null!, CopySrc = null!, CopyDst = null!;

    /// <summary>N × H bf16 elements moved (read + write) by the op, in units of one N × H tensor.</summary>
    protected abstract double Tensors { get; }

    // the op's minimum traffic (each N x H tensor read or written once); also what CopyFloor moves
    public override long Bytes(string method) => (long)(Tensors * Rows * Hidden * 2);

    protected override void Setup()
    {
        X0 = randn(Rows, Hidden, dtype: ScalarType.BFloat16, device: Dev);
        Residual = randn(Rows, Hidden, dtype: ScalarType.BFloat16, device: Dev);
        Weight = ones(Hidden, device: Dev);
        Bias = zeros(Hidden, device: Dev);
        // the floor: a copy reading and writing FloorBytes in total
        CopySrc = empty((long)(Tensors / 2 * Rows * Hidden), dtype: ScalarType.BFloat16, device: Dev);
        CopyDst = empty_like(CopySrc);
    }

    [Benchmark(Baseline = true, OperationsPerInvoke = Launches)]
    public void CopyFloor()
    {
        for (int i = 0; i < Launches; i++) CopyDst.copy_(CopySrc);
        Sync();
    }
}

/// <summary>
/// dropout_add_layer_norm forward, prenorm, p = 0.1: reads x0 and residual, writes out and the new residual
/// (4 N × H tensors). Ours against the TorchSharp composite (the reference path on the GPU) and the copy floor.
/// </summary>
public class NormBenchmarks : NormBenchmarkBase
{
    protected override double Tensors => 4;

    [Benchmark(OperationsPerInvoke = Launches)]
    public void Ours()
    {
        for (int i = 0; i < Launches; i++)
        {
            using var scope = NewDisposeScope();
            flash_attn.dropout_add_layer_norm(X0, Residual, Weight, Bias, 0.1, 1e-5, prenorm: true);
        }
        Sync();
    }

    [Benchmark(OperationsPerInvoke = Launches)]
    public void TorchSharpComposite()
    {
        for (int i = 0; i < Launches; i++)
        {
            using var scope = NewDisposeScope();
            Reference.dropout_add_norm(X0, null, Residual, Weight, Bias, null, null, 0.1, 1e-5);
        }
        Sync();
    }
}

/// <summary>
/// dropout_add_layer_norm forward + backward, prenorm, p = 0.1, gradients of x0, residual, weight and bias:
/// forward 4 N × H tensors, backward reads x, dz, dresidual_out and writes dx0, dresidual (9 in all).
/// </summary>
public class NormBackwardBenchmarks : NormBenchmarkBase
{
    protected override double Tensors => 9;

    private Tensor _x0 = null!, _res = null!, _w = null!, _b = null!, _gz = null!, _gr = null!;

    protected override void Setup()
    {
        base.Setup();
        _x0 = X0.requires_grad_(true);
        _res = Residual.requires_grad_(true);
        _w = Weight.requires_grad_(true);
        _b = Bias.requires_grad_(true);
        _gz = randn_like(X0);
        _gr = randn_like(X0);
    }

    private void Step(bool reference)
    {
        using var scope = NewDisposeScope();
        Tensor z, r;
        if (reference)
        {
            var o = Reference.dropout_add_norm(_x0, null, _res, _w, _b, null, null, 0.1, 1e-5);
            (z, r) = (o.out0, o.residual);
        }
        else
        {
            var (zz, rr, _) = flash_attn.dropout_add_layer_norm(_x0, _res, _w, _b, 0.1, 1e-5, prenorm: true);
            (z, r) = (zz, rr!);
        }
        // autograd.grad: no accumulation into .grad between iterations
        autograd.grad(new List<Tensor> { z, r }, new List<Tensor> { _x0, _res, _w, _b }, new List<Tensor> { _gz, _gr });
    }

    [Benchmark(OperationsPerInvoke = Launches)]
    public void Ours()
    {
        for (int i = 0; i < Launches; i++) Step(reference: false);
        Sync();
    }

    [Benchmark(OperationsPerInvoke = Launches)]
    public void TorchSharpComposite()
    {
        for (int i = 0; i < Launches; i++) Step(reference: true);
        Sync();
    }
}

/// <summary>rms_norm forward: reads x, writes out (2 N × H tensors).</summary>
public class RmsNormBenchmarks : NormBenchmarkBase
{
    protected override double Tensors => 2;

    [Benchmark(OperationsPerInvoke = Launches)]
    public void Ours()
    {
        for (int i = 0; i < Launches; i++)
        {
            using var scope = NewDisposeScope();
            flash_attn.rms_norm(X0, Weight, 1e-5);
        }
        Sync();
    }

    [Benchmark(OperationsPerInvoke = Launches)]
    public void TorchSharpComposite()
    {
        for (int i = 0; i < Launches; i++)
        {
            using var scope = NewDisposeScope();
            Reference.rms_norm(X0, Weight, 1e-5);
        }
        Sync();
    }
}
