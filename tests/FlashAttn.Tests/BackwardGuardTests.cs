using FlashAttn.Interop;
using NUnit.Framework;
using TorchSharp;
using static TorchSharp.torch;

namespace FlashAttn.Tests;

/// <summary>Backward failures go through BackwardGuard alone: a native call failing inside a backward makes that
/// function's gradients NaN and is kept in LastBackwardError; an exception leaves them undefined; neither aborts.
/// A parameter passed through BackwardGuard.Parameter gets the gradient its function's backward returned as .grad,
/// where libtorch would otherwise copy it.</summary>
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

    // y = x * w for a (features,) weight w, whose backward returns a dw of its own and notes where it lies (a plain
    // static: on CUDA the backward runs on libtorch's device thread).
    private sealed class Scale : autograd.SingleTensorFunction<Scale>
    {
        internal static IntPtr LastDw;

        public override string Name => "ScaleFunction";

        public override Tensor forward(autograd.AutogradContext ctx, params object[] vars)
        {
            var (x, w) = ((Tensor)vars[0], (Tensor)vars[1]);
            ctx.save_for_backward(new List<Tensor> { x });
            return x * w;
        }

        public override List<Tensor> backward(autograd.AutogradContext ctx, Tensor grad) =>
            BackwardGuard.Run(Name, 2, new[] { grad }, () =>
            {
                var dw = (grad * ctx.get_saved_variables()[0]).sum(0L);
                LastDw = TensorArgs.Ptr(dw);
                return new List<Tensor> { null!, dw };
            });
    }

    // Whether w's .grad is the dw Scale's backward returned (taken) rather than a copy of it.
    private static bool GradientTaken(Device device, bool throughParameter)
    {
        var x = randn(new long[] { 5, 24 }, dtype: ScalarType.BFloat16, device: device);
        var w = randn(new long[] { 24 }, dtype: ScalarType.BFloat16, device: device).requires_grad_(true);
        Scale.apply(x, throughParameter ? BackwardGuard.Parameter(w)! : w).sum().backward();
        return TensorArgs.Ptr(w.grad!) == Scale.LastDw;
    }

    // TorchSharp copies a returned gradient's at::Tensor out of its managed wrapper, which BackwardGuard releases at the
    // thread's next backward; the leaf's AccumulateGrad runs before that, sees two references and copies the gradient.
    // Should this start failing, TorchSharp hands gradients over by itself and BackwardGuard.Parameter can go.
    [Test]
    public void WithoutParameterLibtorchCopiesTheGradient() => Assert.That(GradientTaken(CPU, throughParameter: false), Is.False);

    [Test]
    public void ThroughParameterTheGradientIsTaken()
    {
        Assert.That(GradientTaken(CPU, throughParameter: true), Is.True);
        var leaf = randn(3).requires_grad_(true);
        using var nonLeaf = leaf * 2;
        Assert.That(BackwardGuard.Parameter(nonLeaf), Is.SameAs(nonLeaf), "a non-leaf feeds no AccumulateGrad");
        using (no_grad()) Assert.That(BackwardGuard.Parameter(leaf), Is.SameAs(leaf), "nothing is recorded under no_grad");
    }

    // On CUDA the backward and the AccumulateGrad run on libtorch's device thread, in the same order.
    [Test, Category(Gpu.Category)]
    public void ThroughParameterTheGradientIsTakenOnCuda()
    {
        var dev = Gpu.Require();
        Assert.That(GradientTaken(dev, throughParameter: false), Is.False);
        Assert.That(GradientTaken(dev, throughParameter: true), Is.True);
    }

    private static IEnumerable<TestCaseData> ParameterOps() =>
        new[] { "fused_dense", "fused_mlp", "layer_norm", "rms_norm", "parallel_residual", "mha_q_fold" }
            .Select(op => new TestCaseData(op).SetName($"ParameterGradientsAreTakenAsGrad_{op}"));

    // Each op's parameters take the gradients its backward returned. The op's function is the only custom one of the
    // loss, so its backward is the thread's last (on the CPU the calling thread's), whose gradients BackwardGuard keeps.
    // A second backward adds into the taken .grad in place: disposing the kept wrappers there leaves .grad as it was.
    [TestCaseSource(nameof(ParameterOps))]
    public void ParameterGradientsAreTakenAsGrad(string op)
    {
        manual_seed(0);
        const long rows = 6, width = 16;
        var x = randn(rows, width);
        Tensor P(params long[] shape) => randn(shape).requires_grad_(true);
        using var mha = op == "mha_q_fold" ? new MHA(width, 2, softmax_scale: 0.3, causal: true, use_flash_attn: false) : null;
        Tensor[] ps = op switch
        {
            "fused_dense" => new[] { P(8, width), P(8) },
            "fused_mlp" => new[] { P(32, width), P(32), P(8, 32), P(8) },
            "layer_norm" => new[] { P(width), P(width) },
            "rms_norm" => new[] { P(width) },
            "parallel_residual" => new[] { P(width), P(width), P(width), P(width) },
            _ => mha!.named_parameters().Where(np => np.name.StartsWith("Wqkv.")).Select(np => np.parameter).ToArray<Tensor>(),
        };
        Tensor Loss() => (op switch
        {
            "fused_dense" => flash_attn.fused_dense_func(x, ps[0], ps[1]),
            "fused_mlp" => flash_attn.fused_mlp_func(x, ps[0], ps[2], ps[1], ps[3]),
            "layer_norm" => flash_attn.layer_norm(x, ps[0], ps[1]),
            "rms_norm" => flash_attn.rms_norm(x, ps[0]),
            "parallel_residual" => flash_attn.dropout_add_layer_norm_parallel_residual(x, x.flip(0), null, ps[0], ps[1], ps[2],
                                       ps[3], 0.0, 1e-5) is var o ? o.out0 + 2 * o.out1! : null!,
            _ => mha!.forward(x.view(2, 3, width)),
        }).square().sum();
        Assert.That(ps, Is.Not.Empty);
        Loss().backward();
        var returned = BackwardGuard.t_returned!.Select(TensorArgs.Ptr).ToList();
        var grads = ps.Select(p => TensorArgs.Ptr(p.grad!)).ToList();
        Assert.That(returned, Is.SupersetOf(grads), $"{op}: a parameter's .grad is a copy of what the backward returned");
        Assert.That(grads, Is.Unique, $"{op}: two parameters' .grad share memory");
        var first = ps.Select(p => p.grad!.clone()).ToList();
        Loss().backward();
        for (int i = 0; i < ps.Length; i++)
            Assert.That(ps[i].grad!.equal(2 * first[i]).all().item<bool>(), Is.True, $"{op}: parameter {i}'s second gradient was not added to its first");
    }
}
