using BenchmarkDotNet.Attributes;
using TorchSharp;
using static TorchSharp.torch;

namespace FlashAttn.Benchmarks;

/// <summary>
/// Base of the GPU benchmarks: each benchmark method launches its op <see cref="Launches"/> times
/// and synchronizes once, so launch latency and the sync are amortised (OperationsPerInvoke).
/// Program.cs turns each median into bandwidth or TFLOP/s from <see cref="Bytes"/> and
/// <see cref="Flops"/>, which depend only on the [Params] (it sets them on a fresh instance).
/// </summary>
public abstract class GpuBenchmark
{
    public const int Launches = 20;

    protected static Device Dev => CUDA;

    protected static void Sync() => cuda.synchronize();

    [GlobalSetup]
    public void CheckGpu()
    {
        if (!cuda.is_available()) throw new InvalidOperationException("GPU benchmarks need a CUDA device (FLASHATTN_TORCH_LIB)");
        if (!Backend.NativeHasCuda) throw new InvalidOperationException($"libflashattn has no CUDA kernels: {Backend.NativeBuildInfo}");
        Setup();
    }

    protected abstract void Setup();

    /// <summary>Bytes the method must move at least (inputs read once, outputs written once); 0 if not bandwidth-bound.</summary>
    public virtual long Bytes(string method) => 0;

    /// <summary>Floating-point operations of one call of the method; 0 if not compute-bound.</summary>
    public virtual double Flops(string method) => 0;
}
