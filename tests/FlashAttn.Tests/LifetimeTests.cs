using NUnit.Framework;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace FlashAttn.Tests;

/// <summary>
/// Every tensor an op makes in forward or backward belongs to the caller's dispose scope (or is released by
/// BackwardGuard): after a training step under NewDisposeScope, no tensor wrapper may stay alive. One that escapes
/// holds its storage until a garbage collection: the norm's new residual, moved out of the scope twice, held
/// 128 MiB a step on the H100 until the benchmarks ran out of memory. Counted with TorchSharp's
/// per-thread statistics on CPU (backward runs on the calling thread there); BackwardMemoryCudaTests covers the GPU.
/// </summary>
public sealed class LifetimeTests
{
    private static IEnumerable<TestCaseData> Ops() => new[]
    {
        "dropout_add_layer_norm", "dropout_add_layer_norm_prenorm", "dropout_add_rms_norm", "fused_dense", "fused_mlp",
        "fused_mlp_lvl1", "cross_entropy", "flash_attn", "rotary",
    }.Select(op => new TestCaseData(op).SetName($"NoTensorOutlivesTheStep_{op}"));

    [TestCaseSource(nameof(Ops))]
    public void NoTensorOutlivesTheStep(string op)
    {
        manual_seed(0);
        const long rows = 64, width = 32;
        var x = randn(rows, width).requires_grad_(true);
        var res = randn(rows, width).requires_grad_(true);
        var w = ones(width).requires_grad_(true);
        var b = zeros(width).requires_grad_(true);
        var w1 = randn(4 * width, width).requires_grad_(true);
        var w2 = randn(width, 4 * width).requires_grad_(true);
        var labels = randint(0, width, new long[] { rows });
        var q = randn(2, 16, 2, 8).requires_grad_(true);
        var k = randn(2, 16, 2, 8).requires_grad_(true);
        var (cos, sin) = (randn(16, 4), randn(16, 4));
        void Step(bool onlyX)
        {
            using var scope = NewDisposeScope();
            Tensor loss = op switch
            {
                "dropout_add_layer_norm" => flash_attn.dropout_add_layer_norm(x, res, w, b, 0.1, 1e-5).Item1.sum(),
                "dropout_add_layer_norm_prenorm" =>
                    flash_attn.dropout_add_layer_norm(x, res, w, b, 0.1, 1e-5, prenorm: true) is var o ? o.Item1.sum() + o.Item2!.sum() : null!,
                "dropout_add_rms_norm" => flash_attn.dropout_add_rms_norm(x, res, w, null, 0.0, 1e-5).Item1.sum(),
                "fused_dense" => flash_attn.fused_dense_func(x, w1, null).sum(),
                "fused_mlp" => flash_attn.fused_mlp_func(x, w1, w2).sum(),
                "fused_mlp_lvl1" => flash_attn.fused_mlp_func(x, w1, w2, checkpoint_lvl: 1).sum(),
                "cross_entropy" => flash_attn.cross_entropy_loss(x, labels).loss.sum(),
                "flash_attn" => flash_attn.flash_attn_func(q, k, k, causal: true).sum(),
                _ => flash_attn.apply_rotary_emb(q, cos, sin).sum(),
            };
            // both ways a trainer asks for gradients: every leaf (backward), or a subset (autograd.grad)
            if (onlyX) autograd.grad(new[] { loss }, new[] { op is "flash_attn" or "rotary" ? q : x });
            else loss.backward();
        }
        foreach (var onlyX in new[] { false, true })
        {
            Step(onlyX); // first use: lazily created state (generators, caches)
            var stats = DisposeScopeManager.Statistics;
            long live = stats.ThreadTotalLiveCount;
            for (int i = 0; i < 3; i++) Step(onlyX);
            Assert.That(stats.ThreadTotalLiveCount - live, Is.EqualTo(0),
                $"{op} ({(onlyX ? "autograd.grad" : "backward")}): tensors alive after 3 steps beyond the first: {stats}");
        }
    }

    /// <summary>
    /// FusedAdamW leaves nothing per parameter to the finalizer: its step, its micro-batch accumulation, and per-group
    /// hyperparameters that change at every step (a scheduler's lr). TorchSharp turns each double argument (and the defaults
    /// it passes itself: add's alpha, square's exponent) into a Scalar that no dispose scope frees; the reference step
    /// left a dozen per parameter, which kept the main job's heap from reusing its freed tensors until a garbage
    /// collection ran (about 20 MB a step). What is left, TorchSharp's pinned argument arrays of the reference step's
    /// stack, does not grow with the parameters. FusedAdamWCudaTests runs the same on the kernels.
    /// </summary>
    [Test]
    public void FusedAdamWLeavesNothingPerParameterToTheFinalizer() => FusedAdamWLeavesNothingPerParameter(CPU);

    // 32 bf16 parameters with float32 masters, each its own group whose lr changes at every step; each step accumulates two
    // micro-batches (the second adds into the sums) before the step's own gradients.
    internal static void FusedAdamWLeavesNothingPerParameter(Device dev)
    {
        manual_seed(0);
        const int parameters = 32, steps = 4;
        var ps = Enumerable.Range(0, parameters).Select(i => new Parameter(randn(3 + i, dtype: ScalarType.BFloat16, device: dev))).ToArray();
        using var opt = new FusedAdamW(ps.Select(p => new AdamW.ParamGroup { Parameters = [p] }), weight_decay: 0.1,
                                       master_weights: true, max_norm: 1.0);
        Assert.That(opt.uses_kernels, Is.EqualTo(dev.type == DeviceType.CUDA), "the kernels exactly on the GPU");
        void Step(int step)
        {
            for (int micro = 0; micro < 3; micro++)
            {
                using (NewDisposeScope())
                    foreach (var p in ps) p.grad = randn_like(p);
                if (micro < 2) opt.accumulate_grad();
            }
            foreach (var group in opt.ParamGroups) group.LearningRate = 1e-3 / step;
            opt.step();
        }
        Step(1); // first use: lazily created state
        long waiting = LeftToTheFinalizer(() =>
        {
            for (int i = 2; i < 2 + steps; i++) Step(i);
        });
        TestContext.Out.WriteLine($"{waiting} objects left to the finalizer by {steps} steps over {parameters} parameters on {dev}");
        Assert.That(waiting, Is.LessThan(steps * parameters),
            $"{waiting} objects waiting for finalization after {steps} steps over {parameters} parameters");
    }

    /// <summary>
    /// The finalizable objects <paramref name="work"/> allocates and drops undisposed. Counted by a collection of the
    /// youngest generation after the work ran inside a no-GC region (its objects all still in generation 0): a full
    /// collection also counts what other threads drop meanwhile, old objects of earlier tests (undisposed tensors,
    /// pinned arrays) that the test framework releases as it goes, a hundred or more at any moment of a full run.
    /// The work runs twice and the smaller count is returned: what the work leaves shows in both, while another
    /// thread's objects dropped during one run (seen about once in eight full test runs) do not; a run during which a
    /// collection happened anyway (the no-GC region ended early) is not counted and runs again, four runs at most.
    /// </summary>
    internal static long LeftToTheFinalizer(Action work)
    {
        long least = long.MaxValue;
        int counted = 0;
        for (int run = 0; run < 4 && counted < 2; run++)
        {
            GC.Collect();
            GC.WaitForPendingFinalizers();
            GC.Collect();
            GC.Collect(); // what lives now is in generation 2
            Assert.That(GC.TryStartNoGCRegion(NoGcRegionBytes), Is.True, "no-GC region");
            bool undisturbed = true;
            try
            {
                work();
            }
            finally
            {
                try
                {
                    GC.EndNoGCRegion();
                }
                catch (InvalidOperationException)
                {
                    undisturbed = false; // a collection ran during the work: it would have hidden what it found
                }
            }
            GC.Collect(0, GCCollectionMode.Forced, blocking: true);
            long waiting = GC.GetGCMemoryInfo().FinalizationPendingCount;
            GC.WaitForPendingFinalizers();
            if (!undisturbed) continue;
            least = Math.Min(least, waiting);
            counted++;
        }
        Assert.That(counted, Is.GreaterThan(0), "a collection ran during every run of the work");
        return least;
    }

    private const long NoGcRegionBytes = 64L << 20;

    /// <summary>
    /// Writing a checkpoint or a safetensors file leaves no tensor wrapper alive: detach()'s tensor (and, for a device
    /// tensor, cpu()'s host copy of it) were left to the finalizer, a few hundred wrappers per checkpoint of the main job
    /// and on a GPU a host copy of the whole state.
    /// </summary>
    [Test]
    public void SavingLeavesNoTensorAlive()
    {
        manual_seed(0);
        var tensors = new Dictionary<string, Tensor>
        {
            ["a"] = randn(3, 5), ["b"] = randn(7).requires_grad_(true), ["c"] = randn(4, 6).t(),
        };
        var dir = Directory.CreateTempSubdirectory("flashattn-lifetime-").FullName;
        try
        {
            var stats = DisposeScopeManager.Statistics;
            long live = stats.ThreadTotalLiveCount;
            FlashAttn.Models.Training.Checkpoint.WriteTensors(Path.Combine(dir, "state.bin"), tensors);
            FlashAttn.Models.SafeTensors.Save(Path.Combine(dir, "model.safetensors"), tensors);
            Assert.That(stats.ThreadTotalLiveCount - live, Is.EqualTo(0), $"tensors alive after saving: {stats}");
        }
        finally { Directory.Delete(dir, recursive: true); }
    }
}
