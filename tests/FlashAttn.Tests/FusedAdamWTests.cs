using System.Runtime.InteropServices;
using FlashAttn.Interop;
using NUnit.Framework;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace FlashAttn.Tests;

/// <summary>
/// A few AdamW steps over two parameter groups of odd sizes, run by an optimizer built by the caller, with gradients
/// and learning rates given per step: the shared setup of the FusedAdamW tests (CPU here, the kernels in
/// FusedAdamWCudaTests), compared against torch.optim.AdamW in float32 and float64.
/// </summary>
internal sealed class AdamWCase
{
    // 1, 97 and 1025 elements (odd, below and above one 8-element access), in both groups; the first group decays.
    internal static readonly long[][] Shapes = [[1], [97], [5, 205], [3, 1, 7], [41], [1025]];
    internal readonly Tensor[] Init;       // float64
    internal readonly Tensor[][] Grads;    // [step][tensor], float64 values exact in every dtype under test
    internal readonly double[] Lrs;
    private readonly int _firstGroup;      // tensors [0, _firstGroup) form the first group

    internal AdamWCase(int steps, Device device, long[][]? shapes = null, ScalarType gradValues = ScalarType.BFloat16)
    {
        shapes ??= Shapes;
        _firstGroup = shapes.Length / 2;
        Init = shapes.Select(s => randn(s, ScalarType.Float64, device).to(gradValues).to(ScalarType.Float64)).ToArray();
        Grads = Enumerable.Range(0, steps).Select(_ =>
            shapes.Select(s => randn(s, ScalarType.Float64, device).to(gradValues).to(ScalarType.Float64)).ToArray()).ToArray();
        // a schedule: the learning rate changes at every step, as the trainer's does
        Lrs = Enumerable.Range(0, steps).Select(i => 2e-2 * (1 + i) / steps).ToArray();
    }

    internal AdamW.ParamGroup[] Groups(IList<Parameter> ps) =>
    [
        new(ps.Take(_firstGroup), lr: 1e-2, beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1),
        new(ps.Skip(_firstGroup), lr: 1e-2, beta1: 0.8, beta2: 0.99, eps: 1e-6, weight_decay: 0),
    ];

    internal Parameter[] Parameters(ScalarType dtype) =>
        Init.Select(t => new Parameter(t.to(dtype).clone(), requires_grad: true)).ToArray();

    /// <summary>Runs every step: gradients set (in the parameters' dtype, times <paramref name="gradScale"/>), the
    /// learning rate set through ParamGroups (as a scheduler does), <paramref name="beforeStep"/>, step, zero_grad.</summary>
    internal void Run(optim.Optimizer opt, Parameter[] ps, double gradScale = 1, Action<Parameter[]>? beforeStep = null)
    {
        for (int s = 0; s < Grads.Length; s++)
        {
            for (int i = 0; i < ps.Length; i++) ps[i].grad = (Grads[s][i] * gradScale).to(ps[i].dtype);
            foreach (var g in opt.ParamGroups) g.LearningRate = Lrs[s];
            beforeStep?.Invoke(ps);
            opt.step();
            opt.zero_grad();
        }
    }

    /// <summary>torch.optim.AdamW (TorchSharp's) over the same groups, in <paramref name="dtype"/>, with torch's
    /// clip_grad_norm_ before each step when <paramref name="maxNorm"/> > 0.</summary>
    internal Parameter[] Torch(ScalarType dtype, double maxNorm = 0)
    {
        var ps = Parameters(dtype);
        using var opt = optim.AdamW(Groups(ps));
        Run(opt, ps, beforeStep: maxNorm > 0 ? p => nn.utils.clip_grad_norm_(p, maxNorm) : null);
        return ps;
    }
}

/// <summary>FusedAdamW on the CPU (the reference path): torch.optim.AdamW's trajectory, clipping, the non-finite skip,
/// fp32 master weights and accumulation, state save/load, set-to-none gradients, bad input.</summary>
public sealed class FusedAdamWTests
{
    [SetUp]
    public void Seed() => manual_seed(TestContext.CurrentContext.Random.Next());

    internal static bool Same(Tensor a, Tensor b) => a.shape.SequenceEqual(b.shape) && a.dtype == b.dtype && a.eq(b).all().item<bool>();

    [TestCase(0.0)]
    [TestCase(1.0)]
    public void FollowsTorchAdamWOnFloat32(double maxNorm)
    {
        var c = new AdamWCase(5, CPU);
        var ps = c.Parameters(ScalarType.Float32);
        using var opt = new FusedAdamW(c.Groups(ps), max_norm: maxNorm);
        Assert.That(opt.uses_kernels, Is.False);
        c.Run(opt, ps);
        var exact = c.Torch(ScalarType.Float64, maxNorm);
        var low = c.Torch(ScalarType.Float32, maxNorm);
        for (int i = 0; i < ps.Length; i++)
            Tolerance.AssertClose(ps[i], low[i], exact[i], $"weight {i} [{string.Join(", ", ps[i].shape)}]");
        Assert.That(opt.state(ps[0]).step, Is.EqualTo(5));
        // the norm of the last step's gradients, before clipping
        var lastNorm = Math.Sqrt(c.Grads[^1].Sum(g => g.square().sum().item<double>()));
        Assert.That(opt.grad_norm.item<float>(), Is.EqualTo(lastNorm).Within(1e-4).Percent);
        Assert.That(opt.found_inf.item<float>(), Is.EqualTo(0));
    }

    [Test]
    public void ANonFiniteGradientChangesNothing()
    {
        var c = new AdamWCase(2, CPU);
        var ps = c.Parameters(ScalarType.BFloat16);
        using var opt = new FusedAdamW(c.Groups(ps), master_weights: true, max_norm: 1.0);
        c.Run(opt, ps);
        Tensor[] Snapshot() => ps.SelectMany(p => new[] { p.clone(), opt.state(p).exp_avg.clone(), opt.state(p).exp_avg_sq.clone(),
                                                          opt.state(p).master!.clone() }).ToArray();
        var before = Snapshot();
        foreach (var bad in new[] { double.NaN, double.PositiveInfinity })
        {
            for (int i = 0; i < ps.Length; i++) ps[i].grad = c.Grads[0][i].to(ScalarType.BFloat16);
            ps[4].grad![3].fill_(bad);
            opt.step();
            Assert.That(opt.found_inf.item<float>(), Is.EqualTo(1), $"{bad}");
            Assert.That(float.IsFinite(opt.grad_norm.item<float>()), Is.False);
            var after = Snapshot();
            for (int i = 0; i < before.Length; i++) Assert.That(Same(after[i], before[i]), $"{bad}: tensor {i} changed");
            Assert.That(ps.Select(p => opt.state(p).step), Is.All.EqualTo(2), "the step counts stay");
            opt.zero_grad();
        }
        // and the next finite step goes ahead
        for (int i = 0; i < ps.Length; i++) ps[i].grad = c.Grads[0][i].to(ScalarType.BFloat16);
        opt.step();
        Assert.That(opt.found_inf.item<float>(), Is.EqualTo(0));
        Assert.That(opt.state(ps[0]).step, Is.EqualTo(3));
    }

    [Test]
    public void Bf16MasterWeightsFollowTheFloat64Trajectory()
    {
        var c = new AdamWCase(5, CPU);
        var ps = c.Parameters(ScalarType.BFloat16);
        using var opt = new FusedAdamW(c.Groups(ps), master_weights: true);
        c.Run(opt, ps);
        var exact = c.Torch(ScalarType.Float64);
        var low = c.Torch(ScalarType.Float32);
        for (int i = 0; i < ps.Length; i++)
        {
            var master = opt.state(ps[i]).master!;
            Assert.That(master.dtype, Is.EqualTo(ScalarType.Float32));
            Tolerance.AssertClose(master, low[i], exact[i], $"master {i}");
            Assert.That(Same(ps[i], master.to(ScalarType.BFloat16)), $"parameter {i} is its master rounded to bf16");
        }
    }

    [Test]
    public void AStepBelowBf16ResolutionLivesInTheMaster()
    {
        using var p = new Parameter(ones(8, dtype: ScalarType.BFloat16));
        using var opt = new FusedAdamW([p], lr: 1e-4, master_weights: true, max_norm: 1.0);
        (p.to(ScalarType.Float32) * 1000).sum().backward();
        opt.step();
        Assert.That(opt.grad_norm.item<float>(), Is.EqualTo(1000 * Math.Sqrt(8)).Within(1e-5).Percent, "the norm before clipping");
        Assert.That(opt.state(p).master![0].item<float>(), Is.EqualTo(1 - 1e-4).Within(1e-6), "the fp32 master moved");
        Assert.That(p[0].to(ScalarType.Float32).item<float>(), Is.EqualTo(1), "a step smaller than bf16's resolution leaves the 16-bit copy");
    }

    [Test]
    public void Bf16GradientsAccumulateInFloat32()
    {
        // 48 micro-batches whose gradient is 1 + 2^-7 (exact in bf16): the sum is 48.375. Added up in bf16,
        // each addition above 16 rounds to a spacing of 0.125 or 0.25 and the 2^-7 parts are lost (48.25).
        using var p = new Parameter(zeros(8, dtype: ScalarType.BFloat16));
        using var opt = new FusedAdamW([p], master_weights: true);
        var c = full(8, 1 + 1.0 / 128, dtype: ScalarType.BFloat16);
        for (int i = 0; i < 48; i++)
        {
            (p * c).sum().backward();
            if (i < 47)
            {
                opt.accumulate_grad();
                Assert.That(p.grad, Is.Null, "the 16-bit gradient is dropped once added to the sum");
            }
        }
        opt.step();
        Assert.That(opt.grad_norm.item<float>(), Is.EqualTo(48.375 * Math.Sqrt(8)).Within(1e-5).Percent, "the accumulated gradient's norm");
        opt.zero_grad();
        // the next step starts afresh: one micro-batch gives its own gradient alone
        (p * c).sum().backward();
        opt.accumulate_grad();
        opt.step();
        Assert.That(opt.grad_norm.item<float>(), Is.EqualTo((1 + 1.0 / 128) * Math.Sqrt(8)).Within(1e-5).Percent);
    }

    [Test]
    public void GradScaleIsDividedOut()
    {
        var c = new AdamWCase(3, CPU);
        var ps = c.Parameters(ScalarType.Float32);
        using var opt = new FusedAdamW(c.Groups(ps), max_norm: 1.0) { grad_scale = tensor(1024f) };
        c.Run(opt, ps, gradScale: 1024);
        var plain = c.Parameters(ScalarType.Float32);
        using var opt2 = new FusedAdamW(c.Groups(plain), max_norm: 1.0);
        c.Run(opt2, plain);
        for (int i = 0; i < ps.Length; i++) Assert.That(Same(ps[i], plain[i]), $"weight {i}: a power-of-two scale is exact");
    }

    [Test]
    public void ZeroGradSetsGradientsToNone()
    {
        using var p = new Parameter(randn(3, 4));
        using var opt = new FusedAdamW([p]);
        p.square().sum().backward();
        opt.zero_grad();
        Assert.That(p.grad, Is.Null);
        p.square().sum().backward();
        opt.zero_grad(set_to_none: false);
        Assert.That(p.grad!.count_nonzero().item<long>(), Is.EqualTo(0));
        // a parameter without gradient is skipped, as torch.optim.AdamW does
        using var q = new Parameter(randn(5));
        using var opt2 = new FusedAdamW([p, q]);
        p.square().sum().backward();
        opt2.step();
        Assert.That(opt2.state(p).step, Is.EqualTo(1));
        Assert.That(opt2.state(q).step, Is.EqualTo(0));
    }

    [Test]
    public void StateSavesAndLoads()
    {
        var c = new AdamWCase(3, CPU);
        var ps = c.Parameters(ScalarType.BFloat16);
        using var opt = new FusedAdamW(c.Groups(ps), master_weights: true);
        c.Run(opt, ps);
        using var stream = new MemoryStream();
        opt.save_state_dict(new BinaryWriter(stream));

        // a fresh optimizer over copies of the weights, loaded from the stream, continues exactly as the original
        var copies = ps.Select(p => new Parameter(p.detach().clone())).ToArray();
        using var restored = new FusedAdamW(c.Groups(copies), master_weights: true);
        foreach (var g in restored.ParamGroups) g.LearningRate = 0.5;  // the saved options replace these
        stream.Position = 0;
        restored.load_state_dict(new BinaryReader(stream));
        var more = new AdamWCase(2, CPU);
        more.Run(opt, ps);
        more.Run(restored, copies);
        for (int i = 0; i < ps.Length; i++)
        {
            Assert.That(Same(copies[i], ps[i]), $"weight {i}");
            Assert.That(Same(restored.state(copies[i]).master!, opt.state(ps[i]).master!), $"master {i}");
            Assert.That(restored.state(copies[i]).step, Is.EqualTo(5));
        }
    }

    [Test]
    public void TakesOverTheStateOfTorchAdamW()
    {
        var c = new AdamWCase(3, CPU);
        var ps = c.Parameters(ScalarType.Float32);
        using var theirs = optim.AdamW(c.Groups(ps));
        c.Run(theirs, ps);
        var copies = ps.Select(p => new Parameter(p.detach().clone())).ToArray();
        using var ours = new FusedAdamW(c.Groups(copies));
        ours.load_state_dict(theirs.state_dict());
        Assert.That(ours.state(copies[0]).step, Is.EqualTo(3));
        var more = new AdamWCase(2, CPU);
        more.Run(theirs, ps);
        more.Run(ours, copies);
        for (int i = 0; i < ps.Length; i++)
            Assert.That(copies[i].allclose(ps[i], rtol: 1e-6, atol: 1e-7), $"weight {i}: {(copies[i] - ps[i]).abs().max().item<float>()}");
    }

    [Test]
    public void BadInputIsAnArgumentExceptionNamingTheArgument()
    {
        using var p = new Parameter(randn(3));
        using var q = new Parameter(randn(3));
        void Names(string argument, TestDelegate call) => Assert.That(Assert.Throws<ArgumentException>(call)!.ParamName, Is.EqualTo(argument));
        Names("lr", () => new FusedAdamW([p], lr: -1));
        Names("beta1", () => new FusedAdamW([p], beta1: 1));
        Names("beta2", () => new FusedAdamW([p], beta2: -0.1));
        Names("eps", () => new FusedAdamW([p], eps: -1e-8));
        Names("weight_decay", () => new FusedAdamW([p], weight_decay: -0.1));
        Names("amsgrad", () => new FusedAdamW([p], amsgrad: true));
        Names("maximize", () => new FusedAdamW([p], maximize: true));
        Names("max_norm", () => new FusedAdamW([p], max_norm: double.NaN));
        Names("parameters", () => new FusedAdamW([new AdamW.ParamGroup([p], amsgrad: true)]));
        Names("parameters", () => new FusedAdamW([p, p]));
        Names("parameters", () => new FusedAdamW([new Parameter(zeros(3, ScalarType.Int32), requires_grad: false)]));
        using var opt = new FusedAdamW([p]);
        Names("param_group", () => opt.add_param_group(new AdamW.ParamGroup([p])));
        Names("grad_scale", () => opt.grad_scale = tensor(2.0));
        Names("parameter", () => opt.state(q));
        Names("value", () => opt.set_master_weight(p, zeros(4)));
        Names("max_norm", () => opt.max_norm = double.NaN);
    }

    [Test]
    public unsafe void NativeValidationNamesFunctionAndArgument()
    {
        // two tensors: float32 (10 elements at offset 0) and bf16 with a master (20 at offset 16) of 64-element flat state
        var (w0, g0, w1, g1) = (zeros(10), zeros(10), zeros(20, ScalarType.BFloat16), zeros(20, ScalarType.BFloat16));
        var (master, m, v, steps, hp) = (zeros(64), zeros(64), zeros(64), zeros(2), zeros(1, 5, ScalarType.Float64));
        var (norm, inf) = (zeros(1), zeros(1));
        var ws = empty(NativeMethods.FlashAttn_optim_adamw_workspace_size(2), dtype: ScalarType.Byte);
        var dtypes = new[] { (int)FlashAttnDType.Float32, (int)FlashAttnDType.Bfloat16 };
        var groups = new[] { 0, 0 };
        FlashAttnStatus Step(long[]? numels = null, long[]? offsets = null, int[]? flags = null, int[]? stepIndices = null,
            long? wsBytes = null, bool noGrad = false)
        {
            var ps = new[] { TensorArgs.Ptr(w0), TensorArgs.Ptr(w1) };
            var gs = new[] { TensorArgs.Ptr(g0), noGrad ? IntPtr.Zero : TensorArgs.Ptr(g1) };
            numels ??= [10, 20];
            offsets ??= [0, 16];
            flags ??= [0, (int)FlashAttnOptimTensorFlag.Master];
            stepIndices ??= [0, 1];
            fixed (IntPtr* pp = ps, gp = gs)
            fixed (int* dp = dtypes, fp = flags, sp = stepIndices, grp = groups)
            fixed (long* np = numels, op = offsets)
                return NativeMethods.FlashAttn_optim_adamw_step(2, (IntPtr)pp, (IntPtr)gp, (IntPtr)dp, (IntPtr)np, (IntPtr)op,
                    (IntPtr)fp, (IntPtr)sp, (IntPtr)grp, TensorArgs.Ptr(master), TensorArgs.Ptr(m), TensorArgs.Ptr(v), IntPtr.Zero, 64,
                    TensorArgs.Ptr(steps), 2, TensorArgs.Ptr(hp), 1, IntPtr.Zero, 1f, TensorArgs.Ptr(norm), TensorArgs.Ptr(inf),
                    TensorArgs.Ptr(ws), wsBytes ?? ws.numel(), IntPtr.Zero);
        }
        string Last() => Marshal.PtrToStringUTF8(NativeMethods.FlashAttn_core_last_error()) ?? "";
        void Expect(FlashAttnStatus status, string message)
        {
            Assert.That(status, Is.EqualTo(FlashAttnStatus.InvalidArgument), message);
            Assert.That(Last(), Does.StartWith("FlashAttn_optim_adamw_step: ").And.Contain(message));
        }
        Expect(Step(numels: [10, -1]), "numels[1] (-1) must be >= 0");
        Expect(Step(offsets: [2, 16]), "offsets[0] (2) must be >= 0 and a multiple of 4");
        Expect(Step(offsets: [0, 48]), "offsets[1] (48) + numels[1] (20) exceed state_numel (64)");
        Expect(Step(flags: [(int)FlashAttnOptimTensorFlag.Master, 0]), "flags[0] has MASTER but dtypes[0] is float32");
        Expect(Step(noGrad: true), "grads[1] must not be NULL unless flags[1] has GRAD_SUM");
        Expect(Step(flags: [0, (int)FlashAttnOptimTensorFlag.GradSum]), "grad_sum must be a 16-byte aligned device pointer (flags[1] has GRAD_SUM)");
        Expect(Step(stepIndices: [0, 2]), "step_indices[1] (2) must be in [0, 2)");
        Expect(Step(stepIndices: [1, 1]), "step_indices[1] (1) is another tensor's");
        Expect(Step(wsBytes: 1), "workspace_bytes (1) must be >=");
        if (!Backend.NativeHasCuda)
        {
            Assert.That(Step(), Is.EqualTo(FlashAttnStatus.NoCuda));
            Assert.That(Last(), Does.Contain("built without CUDA support"));
        }
        var nullGrads = new[] { TensorArgs.Ptr(g0), IntPtr.Zero };
        fixed (IntPtr* gp = nullGrads)
        fixed (int* dp = dtypes, fp = new[] { 0, 0 })
        fixed (long* np = new long[] { 10, 20 }, op = new long[] { 0, 16 })
            Assert.That(NativeMethods.FlashAttn_optim_grad_accumulate(2, (IntPtr)gp, (IntPtr)dp, (IntPtr)np, (IntPtr)op, (IntPtr)fp,
                TensorArgs.Ptr(m), 64, IntPtr.Zero), Is.EqualTo(FlashAttnStatus.InvalidArgument));
        Assert.That(Last(), Is.EqualTo("FlashAttn_optim_grad_accumulate: grads[1] must not be NULL"));
    }
}
