using System.Diagnostics;
using System.Runtime.InteropServices;
using TorchSharp;

namespace FlashAttn;

/// <summary>
/// Loads a CUDA libtorch from a PyTorch installation, for hosts where no TorchSharp-cuda package is
/// available: call <see cref="LoadFromPyTorch"/> once, before the first TorchSharp call.
/// Verified on an H100 with PyTorch 2.11 (TorchSharp 0.107 is built against libtorch 2.10; matmul, SDPA,
/// autograd and custom autograd functions worked).
/// </summary>
public static class LibTorchLoader
{
    /// <summary>Environment variable naming PyTorch's <c>torch/lib</c> folder.</summary>
    public const string TorchLibVariable = "FLASHATTN_TORCH_LIB";

    // Load order matters: each library's dependencies first, so dlopen finds them by soname.
    private static readonly string[] s_libraries =
        { "libc10.so", "libtorch_cpu.so", "libc10_cuda.so", "libtorch_cuda.so", "libtorch.so" };

    private static string? s_loadedFrom;

    /// <summary>The torch/lib folder loaded, or null when libtorch came from a NuGet package.</summary>
    public static string? LoadedFrom => s_loadedFrom;

    /// <summary>
    /// Loads libtorch from <paramref name="torchLib"/>, else from FLASHATTN_TORCH_LIB, else from the
    /// <c>torch/lib</c> folder of the <c>python3</c> on PATH; then TorchSharp's LibTorchSharp from the
    /// application folder, and initialises CUDA. Returns the folder used. Idempotent.
    /// </summary>
    public static string LoadFromPyTorch(string? torchLib = null)
    {
        if (s_loadedFrom != null) return s_loadedFrom;
        torchLib ??= Environment.GetEnvironmentVariable(TorchLibVariable);
        if (string.IsNullOrEmpty(torchLib)) torchLib = FindWithPython();
        if (!Directory.Exists(torchLib))
            throw new DirectoryNotFoundException($"{TorchLibVariable}: '{torchLib}' is not a folder (PyTorch's torch/lib).");
        foreach (var lib in s_libraries)
        {
            var path = Path.Combine(torchLib, lib);
            if (!File.Exists(path))
                throw new FileNotFoundException($"{path} is missing: '{torchLib}' is not a CUDA build of PyTorch's torch/lib.", path);
            NativeLibrary.Load(path);
        }
        NativeLibrary.Load(FindLibTorchSharp());
        torch.InitializeDeviceType(DeviceType.CUDA);
        s_loadedFrom = torchLib;
        return torchLib;
    }

    /// <summary>Loads from PyTorch only when FLASHATTN_TORCH_LIB is set; returns whether it did.</summary>
    public static bool LoadFromEnvironment()
    {
        if (string.IsNullOrEmpty(Environment.GetEnvironmentVariable(TorchLibVariable))) return false;
        LoadFromPyTorch();
        return true;
    }

    private static string FindLibTorchSharp()
    {
        var dir = AppContext.BaseDirectory;
        foreach (var path in new[] { Path.Combine(dir, "libLibTorchSharp.so"),
                                     Path.Combine(dir, "runtimes", "linux-x64", "native", "libLibTorchSharp.so") })
            if (File.Exists(path)) return path;
        throw new FileNotFoundException($"libLibTorchSharp.so is not in {dir}: reference the TorchSharp package.");
    }

    private static string FindWithPython()
    {
        var psi = new ProcessStartInfo("python3", "-c \"import os, torch; print(os.path.join(os.path.dirname(torch.__file__), 'lib'))\"")
        {
            RedirectStandardOutput = true,
            RedirectStandardError = true,
        };
        try
        {
            using var p = Process.Start(psi)!;
            var output = p.StandardOutput.ReadToEnd().Trim();
            var error = p.StandardError.ReadToEnd();
            p.WaitForExit();
            if (p.ExitCode != 0 || output.Length == 0)
                throw new InvalidOperationException($"python3 could not import torch: {error.Trim()}");
            return output;
        }
        catch (System.ComponentModel.Win32Exception e)
        {
            throw new InvalidOperationException($"Set {TorchLibVariable} to PyTorch's torch/lib folder (python3 not found: {e.Message}).", e);
        }
    }
}
