using NUnit.Framework;
using TorchSharp;
using static TorchSharp.torch;

namespace FlashAttn.Tests;

/// <summary>The spacing Tolerance.Ulp gives is the distance to the next representable value of the dtype.</summary>
public sealed class ToleranceTests
{
    [TestCase(ScalarType.Float16, 40.0, 1.0 / 32)]
    [TestCase(ScalarType.Float16, 1.0, 1.0 / 1024)]
    [TestCase(ScalarType.BFloat16, 40.0, 0.25)]
    [TestCase(ScalarType.Float32, 3.0, 1.0 / 4194304)]
    public void UlpIsTheStepToTheNextValue(ScalarType dtype, double magnitude, double expected)
    {
        Assert.That(Tolerance.Ulp(dtype, magnitude), Is.EqualTo(expected));
        // the value just above `magnitude`'s binade floor, rounded in the dtype, moves by exactly one ulp
        double floor = Math.Pow(2, Math.Floor(Math.Log2(magnitude)));
        using var t = tensor(new[] { floor, floor + expected }, dtype: ScalarType.Float64).to(dtype).to(ScalarType.Float64);
        Assert.That(t[1].item<double>() - t[0].item<double>(), Is.EqualTo(expected));
    }
}
