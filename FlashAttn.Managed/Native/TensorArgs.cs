using System.Runtime.CompilerServices;
using TorchSharp;
using static TorchSharp.torch;

namespace FlashAttn.Interop;

/// <summary>
/// Argument checks shared by every op (each throws an ArgumentException naming the argument, before
/// any native call) and the tensor-to-ABI conversions.
/// </summary>
internal static class TensorArgs
{
    internal static IntPtr Ptr(Tensor t) => NativeMethods.THSTensor_data(t.Handle);

    internal static IntPtr PtrOrNull(Tensor? t) => t is null ? IntPtr.Zero : Ptr(t);

    internal static FlashAttnDType DType(ScalarType t) => t switch
    {
        ScalarType.Float32 => FlashAttnDType.Float32,
        ScalarType.Float16 => FlashAttnDType.Float16,
        ScalarType.BFloat16 => FlashAttnDType.Bfloat16,
        ScalarType.Int32 => FlashAttnDType.Int32,
        ScalarType.Int64 => FlashAttnDType.Int64,
        _ => throw new ArgumentException($"dtype {t} has no FlashAttn equivalent"),
    };

    internal static bool IsLowOrSingleFloat(ScalarType t) =>
        t is ScalarType.Float32 or ScalarType.Float16 or ScalarType.BFloat16;

    internal static void Require(bool condition, string paramName, string message)
    {
        if (!condition) throw new ArgumentException(message, paramName);
    }

    /// <summary>The same check with an interpolated message, formatted only when the check fails: the checks run at every
    /// call of every op, on the training step's critical path, and formatting their messages there (devices, shapes)
    /// cost more host time than the launches they guard.</summary>
    internal static void Require(bool condition, string paramName,
                                 [InterpolatedStringHandlerArgument(nameof(condition))] ref RequireMessage message)
    {
        if (!condition) throw new ArgumentException(message.ToStringAndClear(), paramName);
    }

    internal static void RequireDim(Tensor t, int dim, string name, string shape) =>
        Require(t.dim() == dim, name, $"{name} must be {dim}-D {shape}, got shape [{string.Join(", ", t.shape)}]");

    internal static void RequireFloat(Tensor t, string name) =>
        Require(t.dtype is ScalarType.Float32 or ScalarType.Float16 or ScalarType.BFloat16 or ScalarType.Float64,
                name, $"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}");

    internal static void RequireSameDevice(Tensor t, Tensor reference, string name, string referenceName) =>
        Require(t.device_type == reference.device_type && t.device_index == reference.device_index, name,
                $"{name} must be on the same device as {referenceName} ({reference.device}), got {t.device}");

    internal static void RequireContiguousLastDim(Tensor t, string name) =>
        Require(t.size(-1) <= 1 || t.stride(-1) == 1, name,
                $"{name} must have a contiguous last dimension (stride 1), got strides [{string.Join(", ", t.stride())}]");

    internal static string Shape(Tensor t) => $"[{string.Join(", ", t.shape)}]";

    // TorchSharp reads shape (size()), stride() and item()'s shape check through a pinned array that goes to the finalizer
    // even when disposed: a training step's hot paths read one dimension at a time (size(i), stride(i)) instead.

    /// <summary>t.shape, one dimension at a time: no finalizable object.</summary>
    internal static long[] Sizes(Tensor t)
    {
        var sizes = new long[t.dim()];
        for (int i = 0; i < sizes.Length; i++) sizes[i] = t.size(i);
        return sizes;
    }

    /// <summary>t.item&lt;T&gt;() of a one-element tensor of T's dtype, read in place on the CPU (item() reads the shape,
    /// see <see cref="Sizes"/>).</summary>
    internal static unsafe T Item<T>(Tensor t) where T : unmanaged => t.device_type == DeviceType.CPU ? *(T*)Ptr(t) : t.item<T>();

    /// <summary>Whether a and b have the same shape, compared without a finalizable object (see <see cref="Sizes"/>).</summary>
    internal static bool SameShape(Tensor a, Tensor b)
    {
        long n = a.dim();
        if (n != b.dim()) return false;
        for (int i = 0; i < n; i++)
            if (a.size(i) != b.size(i)) return false;
        return true;
    }

    /// <summary>t (..., size): at least one dimension, the last of <paramref name="size"/> (what = how the message
    /// names it, e.g. "hidden_size").</summary>
    internal static void RequireLastDim(Tensor t, long size, string name, string what) =>
        Require(t.dim() >= 1 && t.size(-1) == size, name, $"{name} must be (..., {what} = {size}), got {Shape(t)}");

    /// <summary>Where ids (token ids, labels) fall outside [0, count), ignore_index excepted: a bool mask of ids' shape
    /// computed on ids' device (no host sync), for the loss and embedding paths that make those rows NaN.</summary>
    internal static Tensor IdsOutside(Tensor ids, long count, long? ignore_index = null)
    {
        using var scalars = new ScalarScope();
        var outside = ids.lt(Scalars.Zero).logical_or(ids.ge(scalars.OfInt64(count)));
        return ignore_index is long ignore ? ids.ne(scalars.OfInt64(ignore)).logical_and(outside) : outside;
    }

    /// <summary>A module's input: floating, on the device of the module's <paramref name="parameter"/> and, when
    /// <paramref name="sameDtype"/>, of its dtype (else of its dtype or under a float32 parameter, as the norms take).</summary>
    internal static void RequireModuleInput(Tensor input, string name, Tensor parameter, bool sameDtype = true)
    {
        RequireFloat(input, name);
        RequireSameDevice(input, parameter, name, "the module's parameters");
        Require(input.dtype == parameter.dtype || (!sameDtype && parameter.dtype == ScalarType.Float32), name,
                $"{name} must have the module's dtype ({parameter.dtype}), got {input.dtype}");
    }

    /// <summary>
    /// Checks the offsets of packed sequences (varlen attention's cu_seqlens_q/k, rotary's cu_seqlens): (batch + 1,)
    /// int32 on <paramref name="reference"/>'s device, starting at 0, never decreasing, ending at the packed length
    /// (the rows of <paramref name="reference"/>), no sequence longer than
    /// <paramref name="maxSeqlen"/>: the kernels size their grid by max_seqlen and index rows by the offsets, so any of
    /// these would leave rows unwritten or read past the tensors. The values are checked on the host: for CUDA tensors
    /// that is one copy of batch + 1 integers and a synchronisation per call (its cost beside the dense forward is in
    /// benchmarks/RESULTS.md; no training path of this library packs sequences). Returns the offsets.
    /// </summary>
    internal static long[] RequireOffsets(Tensor cu, string name, Tensor reference, string referenceName, long maxSeqlen,
        string maxName)
    {
        RequireDim(cu, 1, name, "(batch + 1,)");
        Require(cu.dtype == ScalarType.Int32, name, $"{name} must be int32, got {cu.dtype}");
        RequireSameDevice(cu, reference, name, referenceName);
        Require(cu.size(0) >= 1, name, $"{name} must hold batch + 1 >= 1 entries, got none");
        Require(maxSeqlen > 0, maxName, $"{maxName} ({maxSeqlen}) must be > 0");
        long[] offsets;
        using (var host = cu.to(ScalarType.Int64, CPU)) offsets = host.data<long>().ToArray();
        long packed = reference.size(0);
        Require(offsets[0] == 0, name, $"{name} must start at 0, got {offsets[0]}");
        for (int b = 0; b + 1 < offsets.Length; b++)
        {
            long length = offsets[b + 1] - offsets[b];
            Require(length >= 0, name, $"{name} must never decrease, got {offsets[b]} then {offsets[b + 1]} at entries {b} and {b + 1}");
            Require(length <= maxSeqlen, maxName,
                    $"sequence {b} of {name} holds {length} rows, more than {maxName} ({maxSeqlen})");
        }
        Require(offsets[^1] == packed, name,
                $"{name} must end at the packed length ({referenceName} has {packed} rows), got {offsets[^1]}");
        return offsets;
    }
}

/// <summary>Builds <see cref="TensorArgs.Require(bool, string, ref RequireMessage)"/>'s message only when its condition is
/// false (the compiler skips every hole's expression otherwise).</summary>
[InterpolatedStringHandler]
internal ref struct RequireMessage
{
    private DefaultInterpolatedStringHandler _inner;

    public RequireMessage(int literalLength, int formattedCount, bool condition, out bool shouldAppend)
    {
        shouldAppend = !condition;
        _inner = shouldAppend ? new DefaultInterpolatedStringHandler(literalLength, formattedCount) : default;
    }

    public void AppendLiteral(string value) => _inner.AppendLiteral(value);
    public void AppendFormatted<T>(T value, int alignment = 0, string? format = null) => _inner.AppendFormatted(value, alignment, format);
    public string ToStringAndClear() => _inner.ToStringAndClear();
}
