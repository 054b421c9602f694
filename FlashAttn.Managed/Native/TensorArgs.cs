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

    internal static void RequireDim(Tensor t, int dim, string name, string shape) =>
        Require(t.dim() == dim, name, $"{name} must be {dim}-D {shape}, got shape [{string.Join(", ", t.shape)}]");

    internal static void RequireFloat(Tensor t, string name) =>
        Require(t.dtype is ScalarType.Float32 or ScalarType.Float16 or ScalarType.BFloat16 or ScalarType.Float64,
                name, $"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}");

    internal static void RequireSameDevice(Tensor t, Tensor reference, string name, string referenceName) =>
        Require(t.device_type == reference.device_type && t.device_index == reference.device_index, name,
                $"{name} must be on the same device as {referenceName} ({reference.device}), got {t.device}");

    internal static void RequireContiguousLastDim(Tensor t, string name) =>
        Require(t.shape[^1] <= 1 || t.stride(-1) == 1, name,
                $"{name} must have a contiguous last dimension (stride 1), got strides [{string.Join(", ", t.stride())}]");

    internal static string Shape(Tensor t) => $"[{string.Join(", ", t.shape)}]";
}
