using FlashAttn.Interop;
using NUnit.Framework;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace FlashAttn.Tests;

/// <summary>
/// The multi-tensor AdamW kernels against torch.optim.AdamW on CUDA (float32) and the float64 trajectory (16-bit weights
/// with float32 masters), with the flash-attn rule; clipping, the non-finite skip, loss-scale unscaling, float32
/// micro-batch accumulation, the scalar path of unaligned tensors, several launches.
/// </summary>
[Category(Gpu.Category)]
public sealed class FusedAdamWCudaTests
{
    [SetUp]
    public void Seed() => manual_seed(TestContext.CurrentContext.Random.Next());

    // AdamWCase's odd sizes, one tensor of several 8192-element chunks with a tail (3 x 8193), one of 70001, and 90 small
    // ones: 98 tensors, so two launches of at most 80.
    private static long[][] ManyShapes() =>
        [.. AdamWCase.Shapes, [3, 8193], [70001], .. Enumerable.Range(0, 90).Select(i => new long[] { 1 + 37 * i % 300 })];

    // LifetimeTests' check on the kernels: the step, the micro-batch accumulation and the device table of per-group
    // hyperparameters (a Scalar per changed value, before: one per group at every step of a scheduler) leave nothing per
    // parameter to the finalizer.
    [Test]
    public void LeavesNothingPerParameterToTheFinalizer() => LifetimeTests.FusedAdamWLeavesNothingPerParameter(Gpu.Require());

    [TestCase(0.0)]
    [TestCase(1.0)]
    public void FollowsTorchAdamWOnFloat32(double maxNorm)
    {
        var dev = Gpu.Require();
        var c = new AdamWCase(5, dev, ManyShapes());
        var ps = c.Parameters(ScalarType.Float32);
        using var opt = new FusedAdamW(c.Groups(ps), max_norm: maxNorm);
        Assert.That(opt.uses_kernels, "CUDA float32 parameters run the kernels");
        c.Run(opt, ps);
        var exact = c.Torch(ScalarType.Float64, maxNorm);
        var low = c.Torch(ScalarType.Float32, maxNorm);
        for (int i = 0; i < ps.Length; i++)
            Tolerance.AssertClose(ps[i], low[i], exact[i], $"weight {i} [{string.Join(", ", ps[i].shape)}]");
        Assert.That(ps.Select(p => opt.state(p).step), Is.All.EqualTo(5), "every launch's step counts went up once per step");
        var lastNorm = Math.Sqrt(c.Grads[^1].Sum(g => g.square().sum().item<double>()));
        // float32 partial sums over 10^5 squares: a few float32 roundings
        Assert.That(opt.grad_norm.item<float>(), Is.EqualTo(lastNorm).Within(1e-3).Percent);
        Assert.That(opt.found_inf.item<float>(), Is.EqualTo(0));
    }

    [TestCase(ScalarType.BFloat16)]
    [TestCase(ScalarType.Float16)]
    public void MasterWeightsFollowTheFloat64Trajectory(ScalarType dtype)
    {
        var dev = Gpu.Require();
        var c = new AdamWCase(5, dev, ManyShapes(), gradValues: dtype);  // values exact in dtype, subnormals included
        var ps = c.Parameters(dtype);
        using var opt = new FusedAdamW(c.Groups(ps), master_weights: true, max_norm: 1.0);
        Assert.That(opt.uses_kernels);
        c.Run(opt, ps);
        var exact = c.Torch(ScalarType.Float64, 1.0);
        var low = c.Torch(ScalarType.Float32, 1.0);
        for (int i = 0; i < ps.Length; i++)
        {
            var master = opt.state(ps[i]).master!;
            Tolerance.AssertClose(master, low[i], exact[i], $"master {i} [{string.Join(", ", ps[i].shape)}]");
            Assert.That(FusedAdamWTests.Same(ps[i], master.to(dtype)), $"parameter {i} is its master rounded to {dtype}");
        }
    }

    [Test]
    public void Fp16LossScaledMicroBatchesAccumulateInFloat32()
    {
        // three fp16 micro-batches per step, scaled by 1024: the float32 sum is exact, so the trajectory is the float64
        // one of the summed gradients up to AdamW's own rounding
        var dev = Gpu.Require();
        const int steps = 4, micro = 3;
        const float scale = 1024;
        var c = new AdamWCase(steps, dev, ManyShapes(), gradValues: ScalarType.Float16);
        var parts = Enumerable.Range(0, steps).Select(_ => Enumerable.Range(0, micro).Select(_ =>
            ManyShapes().Select(s => randn(s, ScalarType.Float64, dev).to(ScalarType.Float16).to(ScalarType.Float64)).ToArray()).ToArray()).ToArray();
        for (int s = 0; s < steps; s++)
            for (int i = 0; i < c.Grads[s].Length; i++)
                c.Grads[s][i] = parts[s][0][i] + parts[s][1][i] + parts[s][2][i];
        var ps = c.Parameters(ScalarType.Float16);
        using var opt = new FusedAdamW(c.Groups(ps), master_weights: true, max_norm: 1.0) { grad_scale = tensor(scale, device: dev) };
        for (int s = 0; s < steps; s++)
        {
            for (int m = 0; m < micro; m++)
            {
                for (int i = 0; i < ps.Length; i++) ps[i].grad = (parts[s][m][i] * scale).to(ScalarType.Float16);
                if (m < micro - 1) opt.accumulate_grad();  // the last micro-batch's gradients are read with the sums
            }
            foreach (var g in opt.ParamGroups) g.LearningRate = c.Lrs[s];
            opt.step();
            opt.zero_grad();
        }
        var exact = c.Torch(ScalarType.Float64, 1.0);
        var low = c.Torch(ScalarType.Float32, 1.0);
        for (int i = 0; i < ps.Length; i++)
            Tolerance.AssertClose(opt.state(ps[i]).master!, low[i], exact[i], $"master {i}");
    }

    [Test]
    public void Bf16GradientsAccumulateInFloat32()
    {
        // 48 micro-batches of 1 + 2^-7 (exact in bf16): 48.375 in float32, 48.25 had they been added in bf16
        var dev = Gpu.Require();
        using var p = new Parameter(zeros(1031, dtype: ScalarType.BFloat16, device: dev));
        using var opt = new FusedAdamW([p], master_weights: true);
        var g = full(1031, 1 + 1.0 / 128, dtype: ScalarType.BFloat16, device: dev);
        for (int i = 0; i < 48; i++)
        {
            p.grad = g.clone();
            if (i < 47) opt.accumulate_grad();
        }
        opt.step();
        Assert.That(opt.grad_norm.item<float>(), Is.EqualTo(48.375 * Math.Sqrt(1031)).Within(1e-4).Percent);
        opt.zero_grad();
        p.grad = g.clone();
        opt.accumulate_grad();
        opt.step();
        Assert.That(opt.grad_norm.item<float>(), Is.EqualTo((1 + 1.0 / 128) * Math.Sqrt(1031)).Within(1e-4).Percent,
                    "a new step's first accumulation overwrites the sums");
    }

    [Test]
    public void ANonFiniteGradientChangesNothing()
    {
        var dev = Gpu.Require();
        var c = new AdamWCase(2, dev, ManyShapes());
        var ps = c.Parameters(ScalarType.BFloat16);
        using var opt = new FusedAdamW(c.Groups(ps), master_weights: true, max_norm: 1.0);
        c.Run(opt, ps);
        Tensor[] Snapshot() => ps.SelectMany(p => new[] { p.clone(), opt.state(p).exp_avg.clone(), opt.state(p).exp_avg_sq.clone(),
                                                          opt.state(p).master!.clone() }).ToArray();
        var before = Snapshot();
        foreach (var bad in new[] { double.NaN, double.PositiveInfinity, double.NegativeInfinity })
        {
            for (int i = 0; i < ps.Length; i++) ps[i].grad = c.Grads[0][i].to(ScalarType.BFloat16);
            ps[^1].grad![0].fill_(bad);  // in the second launch's last tensor
            opt.step();
            Assert.That(opt.found_inf.item<float>(), Is.EqualTo(1), $"{bad}");
            Assert.That(float.IsFinite(opt.grad_norm.item<float>()), Is.False, $"{bad}");
            var after = Snapshot();
            for (int i = 0; i < before.Length; i++) Assert.That(FusedAdamWTests.Same(after[i], before[i]), $"{bad}: tensor {i} changed");
            Assert.That(ps.Select(p => opt.state(p).step), Is.All.EqualTo(2), "the step counts stay");
            opt.zero_grad();
        }
        for (int i = 0; i < ps.Length; i++) ps[i].grad = c.Grads[0][i].to(ScalarType.BFloat16);
        opt.step();
        Assert.That(opt.found_inf.item<float>(), Is.EqualTo(0));
        Assert.That(ps.Select(p => opt.state(p).step), Is.All.EqualTo(3));
    }

    [TestCase(ScalarType.Float32)]
    [TestCase(ScalarType.BFloat16)]
    public void UnalignedGradientsGiveTheSameBits(ScalarType dtype)
    {
        // gradients that are views at an odd element offset take the element-by-element path: the same arithmetic, the
        // same result as the 16-byte accesses of aligned copies
        var dev = Gpu.Require();
        var c = new AdamWCase(3, dev, ManyShapes());
        var aligned = c.Parameters(dtype);
        var unaligned = c.Parameters(dtype);
        bool master = dtype != ScalarType.Float32;
        using var a = new FusedAdamW(c.Groups(aligned), master_weights: master, max_norm: 1.0);
        using var u = new FusedAdamW(c.Groups(unaligned), master_weights: master, max_norm: 1.0);
        c.Run(a, aligned);
        c.Run(u, unaligned, beforeStep: ps =>
        {
            foreach (var p in ps)
            {
                var storage = empty(p.numel() + 1, p.dtype, dev);
                var view = storage.narrow(0, 1, p.numel()).view(p.shape);
                view.copy_(p.grad!);
                p.grad = view;
                Assert.That((long)TensorArgs.Ptr(p.grad!) % 16, Is.Not.EqualTo(0), "the gradient is misaligned");
            }
        });
        for (int i = 0; i < aligned.Length; i++)
        {
            Assert.That(FusedAdamWTests.Same(unaligned[i], aligned[i]), $"weight {i}");
            Assert.That(FusedAdamWTests.Same(u.state(unaligned[i]).exp_avg_sq, a.state(aligned[i]).exp_avg_sq), $"exp_avg_sq {i}");
        }
    }
}
