using NUnit.Framework;
using TorchSharp;
using static TorchSharp.torch;

namespace FlashAttn.Tests;

/// <summary>
/// The flash-attn test rule: a kernel's error against the float64 reference may be at most
/// `factor` times the error of the same reference computed in the inputs' low precision, plus a
/// floor of a few float32 ulps for cases where the low-precision reference happens to be exact.
/// </summary>
internal static class Tolerance
{
    /// <summary>The spacing of <paramref name="dtype"/>'s values at <paramref name="magnitude"/> (10 stored mantissa bits
    /// for float16, 7 for bfloat16, 23 for float32).</summary>
    internal static double Ulp(ScalarType dtype, double magnitude)
    {
        int mantissa = dtype switch
        {
            ScalarType.Float16 => 10,
            ScalarType.BFloat16 => 7,
            ScalarType.Float32 => 23,
            _ => throw new ArgumentException($"no ulp for {dtype}", nameof(dtype)),
        };
        return magnitude <= 0 ? 0 : Math.Pow(2, Math.Floor(Math.Log2(magnitude)) - mantissa);
    }

    /// <summary>Half an ulp of <paramref name="dtype"/> at the largest |<paramref name="exact"/>|: the rounding of a result to
    /// its dtype, which a kernel pays however exactly it computed the value. The low-precision reference rounds its result
    /// too, but where only a few values are that large (a bias gradient, the weight gradient's column of a constant input)
    /// its roundings there may all land near the exact values, while a kernel whose sum lies a hair past a rounding
    /// midpoint is most of an ulp off: the atol for results of that kind.</summary>
    internal static double OutputRounding(ScalarType dtype, Tensor exact) =>
        Ulp(dtype, exact.abs().max().to(ScalarType.Float64).item<double>()) / 2;

    internal static double MaxAbsDiff(Tensor a, Tensor b)
    {
        using var scope = NewDisposeScope();
        return (a.to(ScalarType.Float64) - b.to(ScalarType.Float64)).abs().max().item<double>();
    }

    /// <param name="atol">an extra absolute floor for errors the low-precision reference cannot show: pass one only with
    /// the derivation of the kernel's own rounding (see FlashAttentionCudaTests.AccumulationFloor).</param>
    internal static void AssertClose(Tensor actual, Tensor lowPrecisionReference, Tensor exactReference, string what, double factor = 2.0,
        double atol = 0.0)
    {
        Assert.That(actual.isnan().any().item<bool>(), Is.False, $"{what}: NaN in the output");
        Assert.That(actual.shape, Is.EqualTo(exactReference.shape), $"{what}: shape");
        var err = MaxAbsDiff(actual, exactReference);
        var refErr = MaxAbsDiff(lowPrecisionReference, exactReference);
        var scale = exactReference.abs().max().to(ScalarType.Float64).item<double>();
        var floor = 1e-6 * Math.Max(scale, 1.0) + atol;
        Assert.That(err, Is.LessThanOrEqualTo(factor * refErr + floor),
            $"{what}: max error {err:G3} vs the low-precision reference's {refErr:G3} (factor {factor})");
    }
}
