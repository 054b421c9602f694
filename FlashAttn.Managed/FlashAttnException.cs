using FlashAttn.Interop;

namespace FlashAttn;

/// <summary>
/// A failure inside libflashattn: a CUDA error (the message names the kernel), a library built
/// without CUDA asked for GPU work, or an ABI mismatch. Bad arguments are ArgumentExceptions instead,
/// raised before any native call.
/// </summary>
public sealed class FlashAttnException : Exception
{
    internal FlashAttnException(FlashAttnStatus status, string message) : base(message) => Status = status.ToString();

    /// <summary>The native status name: CudaError, NoCuda, NotSupported, Internal.</summary>
    public string Status { get; }
}
