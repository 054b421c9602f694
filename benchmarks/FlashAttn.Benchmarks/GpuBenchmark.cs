using BenchmarkDotNet.Attributes;
using TorchSharp;
using static TorchSharp.torch;

namespace FlashAttn.Benchmarks;

/// <summary>
/// Base of the GPU benchmarks: each benchmark method launches its op <see cref="Launches"/> times
/// and synchronizes once, so launch latency and the sync are amortised (OperationsPerInvoke).
/// Every class also times a device-to-device copy of the same bytes: the bandwidth floor measured
/// in the same run.
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

    /// <summary>Bytes the op must move at least (each input read once, each output written once).</summary>
    public abstract long FloorBytes { get; }
}
