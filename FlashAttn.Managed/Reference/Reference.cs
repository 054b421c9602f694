using TorchSharp;
using static TorchSharp.torch;

namespace FlashAttn;

/// <summary>
/// Pure-TorchSharp implementations with the kernels' semantics: the CPU fallback and the test
/// oracle. They compute in float32 (float64 for float64 inputs) and round once at the end, as the
/// kernels do. One partial file per op.
/// </summary>
public static partial class Reference
{
    /// <summary>The dtype a reference computes in: float64 stays, everything else is float32.</summary>
    internal static ScalarType ComputeType(ScalarType t) => t == ScalarType.Float64 ? ScalarType.Float64 : ScalarType.Float32;
}
