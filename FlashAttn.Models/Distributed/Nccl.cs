using System.Reflection;
using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;
using TorchSharp;

namespace FlashAttn.Models.Distributed;

/// <summary>ncclUniqueId: 128 opaque bytes, passed by value to ncclCommInitRank.</summary>
[StructLayout(LayoutKind.Sequential, Size = Rendezvous.UniqueIdBytes)]
internal unsafe struct NcclUniqueId
{
    public fixed byte Internal[Rendezvous.UniqueIdBytes];

    public static NcclUniqueId From(byte[] bytes)
    {
        if (bytes.Length != Rendezvous.UniqueIdBytes) throw new ArgumentException($"NCCL id must be {Rendezvous.UniqueIdBytes} bytes", nameof(bytes));
        var id = new NcclUniqueId();
        for (int i = 0; i < bytes.Length; i++) id.Internal[i] = bytes[i];
        return id;
    }

    public readonly byte[] ToArray()
    {
        var a = new byte[Rendezvous.UniqueIdBytes];
        for (int i = 0; i < a.Length; i++) a[i] = Internal[i];
        return a;
    }
}

/// <summary>ncclDataType_t (nccl.h, NCCL 2.x).</summary>
internal enum NcclDataType
{
    Int8 = 0, Uint8 = 1, Int32 = 2, Uint32 = 3, Int64 = 4, Uint64 = 5, Float16 = 6, Float32 = 7, Float64 = 8, Bfloat16 = 9,
}

/// <summary>ncclRedOp_t.</summary>
internal enum NcclRedOp { Sum = 0, Prod = 1, Max = 2, Min = 3, Avg = 4 }

/// <summary>
/// The NCCL imports. libnccl.so.2 is not shipped here: it comes with the GPU host's
/// PyTorch (site-packages/nvidia/nccl/lib), found next to FLASHATTN_TORCH_LIB (torch/lib) as
/// <c>../../nvidia/nccl/lib/libnccl.so.2</c>, or named by NCCL_LIBRARY (the file or its folder;
/// when set, nothing else is tried), else left to the system loader (<c>libnccl.so.2</c>).
/// </summary>
internal static unsafe partial class NcclNative
{
    internal const string LibraryName = "nccl";
    internal const string LibraryFile = "libnccl.so.2";
    internal const string LibraryVariable = "NCCL_LIBRARY";

    static IntPtr s_handle;
    static readonly object s_lock = new();

    static NcclNative()
    {
        // one resolver per assembly: FlashAttn.Models has no other; if one is added it must route "nccl" here
        try { NativeLibrary.SetDllImportResolver(typeof(NcclNative).Assembly, Resolve); }
        catch (InvalidOperationException) { }
    }

    /// <summary>Runs the static constructor (registers the resolver) before the first import.</summary>
    internal static void EnsureResolver() => RuntimeHelpers.RunClassConstructor(typeof(NcclNative).TypeHandle);

    static IntPtr Resolve(string name, Assembly assembly, DllImportSearchPath? searchPath)
    {
        if (name != LibraryName) return IntPtr.Zero;
        lock (s_lock)
        {
            if (s_handle != IntPtr.Zero) return s_handle;
            var tried = new List<string>();
            foreach (var c in Candidates(Environment.GetEnvironmentVariable(LibraryVariable), Environment.GetEnvironmentVariable(FlashAttn.LibTorchLoader.TorchLibVariable)))
            {
                tried.Add(c);
                if (NativeLibrary.TryLoad(c, out s_handle)) return s_handle;
            }
            throw new DllNotFoundException($"libnccl.so.2 not found (tried {string.Join(", ", tried)}); set {LibraryVariable} or {FlashAttn.LibTorchLoader.TorchLibVariable}");
        }
    }

    /// <summary>The paths tried, in order, for the given NCCL_LIBRARY and FLASHATTN_TORCH_LIB values.</summary>
    internal static IEnumerable<string> Candidates(string? ncclLibrary, string? torchLib)
    {
        if (!string.IsNullOrEmpty(ncclLibrary))
        {
            yield return Directory.Exists(ncclLibrary) ? Path.Combine(ncclLibrary, LibraryFile) : ncclLibrary;
            yield break; // an explicit library is never silently replaced by another
        }
        if (!string.IsNullOrEmpty(torchLib))
        {
            var dir = File.Exists(torchLib) ? Path.GetDirectoryName(torchLib)! : torchLib;
            yield return Path.GetFullPath(Path.Combine(dir, "..", "..", "nvidia", "nccl", "lib", LibraryFile));
            yield return Path.Combine(dir, LibraryFile);
        }
        yield return LibraryFile; // system loader: LD_LIBRARY_PATH, ld.so.cache
    }

    [LibraryImport(LibraryName)] internal static partial int ncclGetUniqueId(NcclUniqueId* uniqueId);
    [LibraryImport(LibraryName)] internal static partial int ncclCommInitRank(IntPtr* comm, int nranks, NcclUniqueId commId, int rank);
    [LibraryImport(LibraryName)] internal static partial int ncclAllReduce(IntPtr sendbuff, IntPtr recvbuff, nuint count, NcclDataType datatype, NcclRedOp op, IntPtr comm, IntPtr stream);
    [LibraryImport(LibraryName)] internal static partial int ncclBroadcast(IntPtr sendbuff, IntPtr recvbuff, nuint count, NcclDataType datatype, int root, IntPtr comm, IntPtr stream);
    [LibraryImport(LibraryName)] internal static partial int ncclCommDestroy(IntPtr comm);
    [LibraryImport(LibraryName)] internal static partial int ncclCommAbort(IntPtr comm);
    [LibraryImport(LibraryName)] internal static partial IntPtr ncclGetErrorString(int result);

    // TorchSharp has no public data_ptr (FlashAttn.Managed's import is internal to it).
    [LibraryImport("LibTorchSharp")] internal static partial IntPtr THSTensor_data(IntPtr tensor);

    internal static void Check(int result, string call)
    {
        if (result == 0) return;
        string text;
        try { text = Marshal.PtrToStringUTF8(ncclGetErrorString(result)) ?? "?"; } catch { text = "?"; }
        throw new NcclException($"{call} failed: NCCL error {result} ({text})", result);
    }

    /// <summary>The NCCL type of a TorchSharp dtype.</summary>
    internal static NcclDataType DataType(torch.ScalarType dtype) => dtype switch
    {
        torch.ScalarType.Float32 => NcclDataType.Float32,
        torch.ScalarType.BFloat16 => NcclDataType.Bfloat16,
        torch.ScalarType.Float16 => NcclDataType.Float16,
        torch.ScalarType.Float64 => NcclDataType.Float64,
        torch.ScalarType.Int64 => NcclDataType.Int64,
        torch.ScalarType.Int32 => NcclDataType.Int32,
        torch.ScalarType.Int8 => NcclDataType.Int8,
        torch.ScalarType.Byte or torch.ScalarType.Bool => NcclDataType.Uint8,
        _ => throw new NotSupportedException($"NCCL has no type for {dtype}"),
    };
}

/// <summary>
/// Makes a CUDA device current on this thread, as cudaSetDevice does: its primary context through the driver (libcuda.so.1,
/// installed with the driver), which the runtime then uses. NCCL's communicator and its stream-0 collectives belong to the
/// device current when ncclCommInitRank runs, and TorchSharp has no torch.cuda.set_device.
/// </summary>
internal static unsafe partial class CudaDriver
{
    const string LibraryName = "libcuda.so.1";

    [LibraryImport(LibraryName)] private static partial int cuInit(uint flags);
    [LibraryImport(LibraryName)] private static partial int cuDeviceGet(int* device, int ordinal);
    [LibraryImport(LibraryName)] private static partial int cuDevicePrimaryCtxRetain(IntPtr* context, int device);
    [LibraryImport(LibraryName)] private static partial int cuCtxSetCurrent(IntPtr context);

    internal static void SetCurrentDevice(int ordinal)
    {
        static void Check(int result, string call)
        {
            if (result != 0) throw new InvalidOperationException($"{call} failed: CUDA driver error {result}");
        }
        int device;
        IntPtr context;
        Check(cuInit(0), "cuInit");
        Check(cuDeviceGet(&device, ordinal), $"cuDeviceGet({ordinal})");
        Check(cuDevicePrimaryCtxRetain(&context, device), $"cuDevicePrimaryCtxRetain({ordinal})"); // held for the process's life
        Check(cuCtxSetCurrent(context), $"cuCtxSetCurrent({ordinal})");
    }
}

public sealed class NcclException(string message, int result) : Exception(message)
{
    public int Result { get; } = result;
}

/// <summary>
/// One rank's NCCL communicator: collectives on CUDA tensors, enqueued on the legacy default stream
/// (stream 0, which TorchSharp's kernels use), so they are ordered after the kernels that produced
/// the data. Untested here (no GPU, no libnccl); the GPU host runs it.
/// </summary>
public sealed unsafe class NcclCommunicator : ICollective, IDisposable
{
    IntPtr _comm;

    NcclCommunicator(IntPtr comm, int rank, int worldSize) { _comm = comm; Rank = rank; WorldSize = worldSize; }

    public int Rank { get; }
    public int WorldSize { get; }

    /// <summary>A new 128-byte unique id (rank 0 calls it, then hands it out through <see cref="Rendezvous"/>).</summary>
    public static byte[] CreateUniqueId()
    {
        NcclNative.EnsureResolver();
        NcclUniqueId id;
        NcclNative.Check(NcclNative.ncclGetUniqueId(&id), "ncclGetUniqueId");
        return id.ToArray();
    }

    /// <summary>Joins the communicator (blocks until all ranks have) on CUDA device <paramref name="device"/> (this rank's
    /// LOCAL_RANK), which becomes the calling thread's current device: the collectives must be called from it.</summary>
    public static NcclCommunicator InitRank(byte[] uniqueId, int rank, int worldSize, int device)
    {
        NcclNative.EnsureResolver();
        CudaDriver.SetCurrentDevice(device);
        IntPtr comm;
        NcclNative.Check(NcclNative.ncclCommInitRank(&comm, worldSize, NcclUniqueId.From(uniqueId), rank), $"ncclCommInitRank(rank {rank} of {worldSize})");
        return new NcclCommunicator(comm, rank, worldSize);
    }

    /// <summary>In-place all-reduce of a contiguous CUDA tensor.</summary>
    public void AllReduce(torch.Tensor tensor, NcclReduction op = NcclReduction.Sum)
    {
        var ptr = DataPointer(tensor);
        NcclNative.Check(NcclNative.ncclAllReduce(ptr, ptr, (nuint)tensor.numel(), NcclNative.DataType(tensor.dtype), (NcclRedOp)op, Handle, IntPtr.Zero), "ncclAllReduce");
    }

    /// <summary>In-place broadcast of a contiguous CUDA tensor from <paramref name="root"/>.</summary>
    public void Broadcast(torch.Tensor tensor, int root = 0)
    {
        var ptr = DataPointer(tensor);
        NcclNative.Check(NcclNative.ncclBroadcast(ptr, ptr, (nuint)tensor.numel(), NcclNative.DataType(tensor.dtype), root, Handle, IntPtr.Zero), "ncclBroadcast");
    }

    /// <summary>Tears the communicator down without waiting for peers (a rank failed).</summary>
    public void Abort()
    {
        if (_comm == IntPtr.Zero) return;
        var c = _comm; _comm = IntPtr.Zero;
        NcclNative.ncclCommAbort(c);
    }

    public void Dispose()
    {
        if (_comm == IntPtr.Zero) return;
        var c = _comm; _comm = IntPtr.Zero;
        NcclNative.Check(NcclNative.ncclCommDestroy(c), "ncclCommDestroy");
    }

    IntPtr Handle => _comm != IntPtr.Zero ? _comm : throw new ObjectDisposedException(nameof(NcclCommunicator));

    static IntPtr DataPointer(torch.Tensor t)
    {
        if (t.device_type != DeviceType.CUDA) throw new ArgumentException($"NCCL needs a CUDA tensor, got {t.device}");
        if (!t.is_contiguous()) throw new ArgumentException("NCCL needs a contiguous tensor");
        return NcclNative.THSTensor_data(t.Handle);
    }
}

/// <summary>Reductions of <see cref="NcclCommunicator.AllReduce"/>.</summary>
public enum NcclReduction { Sum = 0, Prod = 1, Max = 2, Min = 3, Avg = 4 }
