using FlashAttn.Interop;
using NUnit.Framework;
using TorchSharp;
using static TorchSharp.torch;

namespace FlashAttn.Tests;

/// <summary>Backward failures go through BackwardGuard alone: a native call failing inside a backward makes that
/// function's gradients NaN and is kept in LastBackwardError; an exception leaves them undefined; neither aborts.</summary>
public sealed class BackwardGuardTests
{
    // y = 2 x, whose backward makes a native call that fails (an argument the library rejects) or, for float64, throws.
    private sealed class Failing : autograd.SingleTensorFunction<Failing>
    {
        public override string Name => "FailingFunction";

        public override Tensor forward(autograd.AutogradContext ctx, params object[] vars)
        {
            var x = (Tensor)vars[0];
            ctx.save_data("throw", x.dtype == ScalarType.Float64);
            return x * 2;
        }

        public override List<Tensor> backward(autograd.AutogradContext ctx, Tensor grad) =>
            BackwardGuard.Run(Name, 1, new[] { grad }, () =>
            {
                if ((bool)ctx.get_data("throw")) throw new InvalidOperationException("thrown in backward");
                var dx = empty_like(grad);
                unsafe
                {
                    int capability;
                    BackwardGuard.Check(NativeMethods.FlashAttn_core_device_capability(-1, (IntPtr)(&capability)), dx);
                }
                return new List<Tensor> { dx };
            });
    }

    [Test]
    public void NativeFailureMakesGradientsNaNAndIsRecorded()
    {
        BackwardGuard.ClearLastBackwardError();
        var x = randn(3, 5).requires_grad_(true);
        Failing.apply(x).sum().backward();
        Assert.That(x.grad, Is.Not.Null);
        Assert.That(x.grad!.isnan().all().item<bool>(), Is.True);
        Assert.That(BackwardGuard.LastBackwardError, Does.StartWith("FailingFunction.backward: InvalidArgument"));
        Assert.That(BackwardGuard.LastBackwardError, Does.Contain("device (-1) must be >= 0"));
    }

    [Test]
    public void ExceptionLeavesGradientsUndefinedAndIsRecorded()
    {
        BackwardGuard.ClearLastBackwardError();
        var x = randn(3, 5, dtype: ScalarType.Float64).requires_grad_(true);
        Failing.apply(x).sum().backward();
        Assert.That(x.grad, Is.Null);
        Assert.That(BackwardGuard.LastBackwardError, Is.EqualTo("FailingFunction.backward: InvalidOperationException: thrown in backward"));
    }

    // The four kernel backwards (attention, norm, cross-entropy, dense) used to print and NaN-fill on their own without
    // setting LastBackwardError: the library writes to stderr in BackwardGuard alone.
    [Test]
    public void OnlyBackwardGuardReportsFailures()
    {
        var root = RepoPaths.TryRoot();
        if (root is null) Assert.Ignore("no repository checkout beside the tests");
        var writers = Directory.EnumerateFiles(Path.Combine(root!, "FlashAttn.Managed"), "*.cs", SearchOption.AllDirectories)
            .Where(f => !f.Contains($"{Path.DirectorySeparatorChar}obj{Path.DirectorySeparatorChar}") &&
                        File.ReadAllText(f).Contains("Console.Error"))
            .Select(Path.GetFileName);
        Assert.That(writers, Is.EquivalentTo(new[] { "BackwardGuard.cs" }));
    }
}
