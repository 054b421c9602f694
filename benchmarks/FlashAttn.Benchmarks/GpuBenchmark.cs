using System.Reflection;
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

    /// <summary>
    /// Frees every tensor field of the case. In process, one case's inputs otherwise live until a GC that the small
    /// managed heap never triggers: the suite filled the H100's 80 GB by the 24th case.
    /// </summary>
    [GlobalCleanup]
    public void Cleanup()
    {
        Report();
        Teardown();
        for (var t = GetType(); t != null; t = t.BaseType)
            foreach (var f in t.GetFields(BindingFlags.Instance | BindingFlags.Public | BindingFlags.NonPublic | BindingFlags.DeclaredOnly))
            {
                var value = f.GetValue(this);
                switch (value)
                {
                    case Tensor tensor: tensor.Dispose(); break;
                    case IEnumerable<Tensor> tensors: foreach (var x in tensors) x.Dispose(); break;
                    case nn.Module module: module.Dispose(); break;
                    default: continue;
                }
                if (!f.IsInitOnly) f.SetValue(this, null);
            }
        GC.Collect();
        GC.WaitForPendingFinalizers();
        cuda.synchronize();
    }

    /// <summary>Called once after the case's iterations, before its tensors are freed.</summary>
    protected virtual void Report() { }

    /// <summary>Called after <see cref="Report"/>: undoes what Setup changed outside the case (environment variables).</summary>
    protected virtual void Teardown() { }

    /// <summary>A note for the method's result lines (e.g. the path that ran), or null.</summary>
    public virtual string? Label(string method) => null;

    /// <summary>Bytes the method must move at least (inputs read once, outputs written once); 0 if not bandwidth-bound.</summary>
    public virtual long Bytes(string method) => 0;

    /// <summary>Floating-point operations of one call of the method; 0 if not compute-bound.</summary>
    public virtual double Flops(string method) => 0;
}
