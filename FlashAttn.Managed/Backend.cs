using System.Collections.Concurrent;
using System.Runtime.InteropServices;
using FlashAttn.Interop;
using TorchSharp;
using static TorchSharp.torch;

namespace FlashAttn;

/// <summary>
/// Where an op runs: the CUDA kernels for CUDA tensors on sm_80 or newer when libflashattn has CUDA,
/// the pure-TorchSharp reference otherwise (CPU tensors, older GPUs, the CPU-only library, platforms other than
/// linux-x64).
/// </summary>
public static class Backend
{
    private static readonly ConcurrentDictionary<int, int> s_capability = new();
    // The package's native library is linux-x64's: on other platforms nothing is loaded and every op takes the
    // reference path (on Linux a missing library stays an error: it means a broken install).
    private static readonly Lazy<bool> s_nativeHasCuda = new(() =>
        NativePlatform && NativeMethods.FlashAttn_core_has_cuda() != 0);

    /// <summary>Whether libflashattn exists for this platform (linux-x64).</summary>
    public static bool NativePlatform => OperatingSystem.IsLinux() && RuntimeInformation.ProcessArchitecture == Architecture.X64;

    /// <summary>The oldest GPU the kernels are compiled for (mma.sync, bf16): Ampere, sm_80.</summary>
    public const int MinimumCapability = 80;

    /// <summary>Whether the loaded libflashattn was built with CUDA kernels.</summary>
    public static bool NativeHasCuda => s_nativeHasCuda.Value;

    /// <summary>One line naming the native build (flavour, CUDA version, architectures).</summary>
    public static string NativeBuildInfo => Marshal.PtrToStringUTF8(NativeMethods.FlashAttn_core_build_info()) ?? "";

    /// <summary>When true, every op takes the reference path (for comparisons and debugging).</summary>
    public static bool ForceReference { get; set; }

    /// <summary>Compute capability (major * 10 + minor) of CUDA device <paramref name="index"/>.</summary>
    public static int Capability(int index) => s_capability.GetOrAdd(index, QueryCapability);

    private static unsafe int QueryCapability(int index)
    {
        int capability = 0;
        NativeMethods.Check(NativeMethods.FlashAttn_core_device_capability(index, (IntPtr)(&capability)));
        return capability;
    }

    /// <summary>Whether an op on <paramref name="t"/> runs the native kernels.</summary>
    public static bool UsesKernels(Tensor t) =>
        !ForceReference && t.device_type == DeviceType.CUDA && TensorArgs.IsLowOrSingleFloat(t.dtype) &&
        NativeHasCuda && Capability(t.device_index) >= MinimumCapability;
}
