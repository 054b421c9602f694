using System.Reflection;
using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;

namespace FlashAttn.Interop;

/// <summary>
/// The hand-written part of the imports: the library name, how libflashattn.so is found, the ABI
/// check, and the one LibTorchSharp export we need. The FlashAttn_* imports themselves are
/// generated from flashattn.h into NativeMethods.*.g.cs.
/// </summary>
internal static partial class NativeMethods
{
    internal const string LibraryName = "flashattn";
    internal const string LibraryFile = "libflashattn.so";

    /// <summary>Overrides where libflashattn.so is loaded from: the file itself or its folder.</summary>
    internal const string NativePathVariable = "FLASHATTN_NATIVE_PATH";

    // TorchSharp has no public data_ptr; LibTorchSharp exports THSTensor_data (void* of element 0,
    // storage offset included).
    [LibraryImport("LibTorchSharp")]
    internal static partial IntPtr THSTensor_data(IntPtr tensor);

    private static IntPtr s_handle;
    private static readonly object s_lock = new();

#pragma warning disable CA2255 // a module initializer is the one place that runs before any import
    [ModuleInitializer]
    internal static void RegisterResolver() =>
        NativeLibrary.SetDllImportResolver(typeof(NativeMethods).Assembly, Resolve);
#pragma warning restore CA2255

    private static IntPtr Resolve(string name, Assembly assembly, DllImportSearchPath? searchPath)
    {
        if (name != LibraryName) return IntPtr.Zero; // LibTorchSharp and others: default probing
        lock (s_lock)
        {
            if (s_handle == IntPtr.Zero) s_handle = Load(assembly);
            return s_handle;
        }
    }

    /// <summary>The candidate paths, in the order they are tried.</summary>
    internal static IEnumerable<string> Candidates(Assembly assembly)
    {
        var env = Environment.GetEnvironmentVariable(NativePathVariable);
        if (!string.IsNullOrEmpty(env))
        {
            yield return Directory.Exists(env) ? Path.Combine(env, LibraryFile) : env;
            yield break; // an explicit path is never silently replaced by another library
        }
        var dirs = new[] { AppContext.BaseDirectory, Path.GetDirectoryName(assembly.Location) ?? "" }
            .Where(d => d.Length > 0).Distinct();
        foreach (var dir in dirs)
        {
            yield return Path.Combine(dir, "runtimes", "linux-x64", "native", LibraryFile);
            yield return Path.Combine(dir, LibraryFile);
        }
    }

    private static IntPtr Load(Assembly assembly)
    {
        var tried = new List<string>();
        foreach (var path in Candidates(assembly))
        {
            tried.Add(path);
            if (!File.Exists(path)) continue;
            var handle = NativeLibrary.Load(path);
            CheckAbi(handle, path);
            return handle;
        }
        throw new DllNotFoundException(
            $"FlashAttn.TorchSharp could not find {LibraryFile}. Tried: {string.Join(", ", tried)}. " +
            $"Set {NativePathVariable} to the library (or its folder), or build it with build/native.sh.");
    }

    private static unsafe void CheckAbi(IntPtr handle, string path)
    {
        var version = ((delegate* unmanaged<int>)NativeLibrary.GetExport(handle, "FlashAttn_core_abi_version"))();
        if (version != AbiVersion)
        {
            throw new FlashAttnException(FlashAttnStatus.Internal,
                $"{path} has ABI version {version}, but this FlashAttn.TorchSharp was built for ABI version " +
                $"{AbiVersion}: use the libflashattn.so of the same release.");
        }
    }

    /// <summary>Throws the .NET exception for a failed call, with the native message.</summary>
    internal static void Check(FlashAttnStatus status)
    {
        if (status == FlashAttnStatus.Ok) return;
        var message = Marshal.PtrToStringUTF8(FlashAttn_core_last_error()) ?? "";
        throw status switch
        {
            FlashAttnStatus.InvalidArgument => new ArgumentException(message),
            FlashAttnStatus.NoCuda => new FlashAttnException(status, message),
            _ => new FlashAttnException(status, message),
        };
    }
}
