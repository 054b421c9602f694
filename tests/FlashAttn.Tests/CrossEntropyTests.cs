using System.Runtime.InteropServices;
using FlashAttn.Interop;
using NUnit.Framework;
using TorchSharp;
using static TorchSharp.torch;

namespace FlashAttn.Tests;

/// <summary>Cross-entropy on CPU (reference path): the reference against a float64 per-row definition and
/// torch's cross_entropy, the autograd function's closed-form backward against autograd of the reference,
/// in-place backward, the module's reductions and argument validation.</summary>
public sealed class CrossEntropyTests
{
    [SetUp]
    public void Seed() => manual_seed(TestContext.CurrentContext.Random.Next());

    /// <summary>loss = lse - (1 - s) z[y] - s mean(z) + c lse^2 with z = scale * logits, in float64, row by row.</summary>
    internal static (double[] loss, double[] zLoss) Oracle(Tensor logits, long[] labels, double smoothing, double scale, double lseSq, long ignore)
    {
        long n = logits.shape[0], v = logits.shape[1];
        var x = logits.to(ScalarType.Float64).contiguous().data<double>().ToArray();
        var loss = new double[n];
        var zl = new double[n];
        for (long r = 0; r < n; r++)
        {
            if (labels[r] == ignore) continue;
            var z = Enumerable.Range(0, (int)v).Select(c => x[r * v + c] * scale).ToArray();
            double m = z.Max();
            double lse = m + Math.Log(z.Sum(t => Math.Exp(t - m)));
            zl[r] = lseSq * lse * lse;
            loss[r] = lse - (1 - smoothing) * z[labels[r]] - smoothing * z.Average() + zl[r];
        }
        return (loss, zl);
    }

    [TestCase(0.0, 1.0, 0.0), TestCase(0.1, 1.0, 0.0), TestCase(0.0, 0.5, 1e-4), TestCase(0.2, 2.0, 1e-2)]
    public void ReferenceMatchesDefinition(double smoothing, double scale, double lseSq)
    {
        var logits = randn(9, 37, dtype: ScalarType.Float64) * 3;
        var labels = new long[] { 0, 5, -100, 36, 7, 7, -100, 1, 20 };
        var (loss, zl, _) = Reference.cross_entropy(logits, tensor(labels), smoothing, scale, lseSq);
        var (eLoss, eZ) = Oracle(logits, labels, smoothing, scale, lseSq, -100);
        Assert.That(Tolerance.MaxAbsDiff(loss, tensor(eLoss)), Is.LessThan(1e-10));
        Assert.That(Tolerance.MaxAbsDiff(zl, tensor(eZ)), Is.LessThan(1e-10));
    }

    [TestCase(0.0), TestCase(0.15)]
    public void MatchesTorchCrossEntropyWithIgnoreIndexAndSmoothing(double smoothing)
    {
        var logits = randn(16, 50);
        var labels = randint(0, 50, new long[] { 16 });
        labels[3] = tensor(-100L);
        labels[11] = tensor(-100L);
        var (loss, _) = flash_attn.cross_entropy_loss(logits, labels, label_smoothing: smoothing);
        var expected = nn.functional.cross_entropy(logits, labels, ignore_index: -100, reduction: nn.Reduction.None,
                                                   label_smoothing: smoothing);
        Assert.That(Tolerance.MaxAbsDiff(loss, expected), Is.LessThan(1e-5));
        var module = layers.CrossEntropyLoss(label_smoothing: smoothing);
        var mean = nn.functional.cross_entropy(logits, labels, ignore_index: -100, label_smoothing: smoothing);
        Assert.That(Tolerance.MaxAbsDiff(module.call(logits, labels), mean), Is.LessThan(1e-5));
        var sum = layers.CrossEntropyLoss(reduction: LossReduction.Sum, label_smoothing: smoothing);
        var eSum = nn.functional.cross_entropy(logits, labels, ignore_index: -100, reduction: nn.Reduction.Sum, label_smoothing: smoothing);
        Assert.That(Tolerance.MaxAbsDiff(sum.call(logits, labels), eSum), Is.LessThan(1e-4));
    }

    [TestCase(0.0, 1.0, 0.0, false), TestCase(0.1, 0.7, 1e-3, false), TestCase(0.1, 1.3, 1e-3, true)]
    public void AutogradBackwardMatchesAutogradOfReference(double smoothing, double scale, double lseSq, bool inplace)
    {
        var leaf = randn(12, 33, dtype: ScalarType.Float64, requires_grad: true);
        var labels = randint(0, 33, new long[] { 12 });
        labels[5] = tensor(-7L);
        var logits = leaf * 1.0; // not a leaf, so an in-place backward may overwrite it
        var (loss, zl) = flash_attn.cross_entropy_loss(logits, labels, smoothing, scale, lseSq, ignore_index: -7, inplace_backward: inplace);
        Assert.That(zl.requires_grad, Is.False, "z_loss is not differentiable");
        var g = randn(12, dtype: ScalarType.Float64);
        loss.backward(new[] { g });

        var leaf2 = leaf.detach().clone().requires_grad_(true);
        var (rl, _, _) = Reference.cross_entropy(leaf2, labels, smoothing, scale, lseSq, -7);
        rl.backward(new[] { g });
        Assert.That(Tolerance.MaxAbsDiff(loss, rl), Is.LessThan(1e-12));
        Assert.That(Tolerance.MaxAbsDiff(leaf.grad!, leaf2.grad!), Is.LessThan(1e-12));
        Assert.That(leaf.grad![5].abs().max().item<double>(), Is.EqualTo(0.0), "ignored row: no gradient");
        if (inplace) Assert.That(Tolerance.MaxAbsDiff(logits, leaf.grad!), Is.EqualTo(0.0), "the gradient overwrote the logits");
    }

    // The gradient computed in the forward for expected_grad, then the backward given the expected gradient (nothing to do),
    // another one (scaled per row) or a per-row one: always the backward of the plain path for the gradient received.
    [TestCase(0.0, 1.0, 0.0, false, "expected"), TestCase(0.1, 0.7, 1e-3, true, "expected"), TestCase(0.0, 1.0, 0.0, true, "0.37"),
     TestCase(0.1, 1.3, 1e-3, false, "0.37"), TestCase(0.2, -0.6, 1e-2, true, "rows"), TestCase(0.0, 1.0, 0.0, false, "rows")]
    public void GradientInTheForwardIsTheBackwardsForAnyUpstreamGradient(double smoothing, double scale, double lseSq, bool inplace,
        string upstream)
    {
        var leaf = randn(12, 33, dtype: ScalarType.Float64, requires_grad: true);
        var labels = randint(0, 33, new long[] { 12 });
        labels[5] = tensor(-7L);
        var expected = tensor(0.25, dtype: ScalarType.Float64);
        var g = upstream switch
        {
            "expected" => expected.expand(12),
            "0.37" => full(12, 0.37, dtype: ScalarType.Float64),
            _ => randn(12, dtype: ScalarType.Float64),
        };
        var logits = leaf * 1.0;
        var (loss, zl) = flash_attn.cross_entropy_loss(logits, labels, smoothing, scale, lseSq, -7, inplace, expected_grad: expected);
        Assert.That(zl.requires_grad, Is.False, "z_loss is not differentiable");
        var leaf2 = leaf.detach().clone().requires_grad_(true);
        var (rl, _, lse) = Reference.cross_entropy(leaf2, labels, smoothing, scale, lseSq, -7);
        if (inplace)
        {
            var d = Reference.cross_entropy_backward(expected, leaf2.detach(), labels, lse, smoothing, scale, lseSq, -7);
            Assert.That(Tolerance.MaxAbsDiff(logits, d), Is.EqualTo(0.0), "the forward overwrote the logits with their gradient");
        }
        loss.backward(new[] { g });
        rl.backward(new[] { g });
        Assert.That(Tolerance.MaxAbsDiff(loss, rl), Is.LessThan(1e-12));
        Assert.That(Tolerance.MaxAbsDiff(leaf.grad!, leaf2.grad!), Is.LessThan(1e-12));
        Assert.That(leaf.grad![5].abs().max().item<double>(), Is.EqualTo(0.0), "ignored row: no gradient");
    }

    // A loss used twice in the graph (one backward with the summed gradient) and a second backward through the same graph
    // (retain_graph: the dlogits scaled from the first's gradient, not the forward's).
    [TestCase(true), TestCase(false)]
    public void GradientInTheForwardWithASecondUseAndASecondBackward(bool inplace)
    {
        var leaf = randn(10, 21, requires_grad: true);
        var labels = randint(0, 21, new long[] { 10 });
        var (loss, _) = flash_attn.cross_entropy_loss(leaf * 1.0, labels, 0.1, inplace_backward: inplace, expected_grad: tensor(1f));
        var total = loss.sum() + 0.5f * loss.sum();
        total.backward(retain_graph: true);
        var first = leaf.grad!.clone();
        (loss.sum() * 2f).backward();

        var leaf2 = leaf.detach().clone().requires_grad_(true);
        var (rl, _, _) = Reference.cross_entropy(leaf2, labels, 0.1);
        (rl.sum() * 1.5f).backward();
        Assert.That(Tolerance.MaxAbsDiff(first, leaf2.grad!), Is.LessThan(1e-6), "1.5 x the gradient");
        Assert.That(Tolerance.MaxAbsDiff(leaf.grad!, leaf2.grad! * (3.5f / 1.5f)), Is.LessThan(1e-6), "then 2 x more");
    }

    // The fused path relies on the gradient a mean's backward gives each row being, to the bit, the expected one computed
    // as the trainer's and the module's: lossGrad / count by the same division.
    [TestCase(1, 16383L), TestCase(3, 1000L), TestCase(32, 7L), TestCase(32, 16384L)]
    public void TheMeansBackwardGivesTheExpectedGradientToTheBit(int accum, long count)
    {
        var rows = randn(count, requires_grad: true);
        var lossGrad = full(Array.Empty<long>(), 1.0 / accum, ScalarType.Float32);
        var n = tensor(count).to(ScalarType.Float32);
        ((rows.sum() / n) * lossGrad).backward();
        var expected = (lossGrad / n).item<float>();
        Assert.That(rows.grad!.data<float>().ToArray().All(v => BitConverter.SingleToInt32Bits(v) == BitConverter.SingleToInt32Bits(expected)),
            Is.True, $"each row's gradient is {expected:R}");
    }

    [TestCase(LossReduction.Mean), TestCase(LossReduction.Sum), TestCase(LossReduction.None)]
    public void ModuleWithExpectedGradGivesThePlainModulesLossAndGradient(LossReduction reduction)
    {
        var leaf = randn(9, 40, requires_grad: true);
        var labels = tensor(new long[] { 1, -100, 3, 39, 0, -100, 7, 7, 20 });
        var plain = layers.CrossEntropyLoss(reduction: reduction, label_smoothing: 0.1);
        var fused = layers.CrossEntropyLoss(reduction: reduction, label_smoothing: 0.1, inplace_backward: true, expected_grad: 0.5);
        var leaf2 = leaf.detach().clone().requires_grad_(true);
        var a = fused.call(leaf * 1f, labels);
        var b = plain.call(leaf2 * 1f, labels);
        Assert.That(Tolerance.MaxAbsDiff(a, b), Is.EqualTo(0.0));
        var g = reduction == LossReduction.None ? full(9, 0.5f) : tensor(0.5f);
        a.backward(new[] { g });
        b.backward(new[] { g });
        Assert.That(Tolerance.MaxAbsDiff(leaf.grad!, leaf2.grad!), Is.EqualTo(0.0), "the expected gradient: the same numbers");
    }

    [Test]
    public void ExpectedGradWithoutAGradientToComputeLeavesTheLogitsAlone()
    {
        var logits = randn(5, 12);
        var before = logits.clone();
        var labels = tensor(new long[] { 1, 2, 3, 4, 5 });
        var (loss, _) = flash_attn.cross_entropy_loss(logits, labels, inplace_backward: true, expected_grad: tensor(1f));
        Assert.That(Tolerance.MaxAbsDiff(logits, before), Is.EqualTo(0.0), "logits not requiring grad");
        var x = randn(5, 12, requires_grad: true);
        using (no_grad())
        {
            var y = x * 1f;
            flash_attn.cross_entropy_loss(y, labels, inplace_backward: true, expected_grad: tensor(1f));
            Assert.That(Tolerance.MaxAbsDiff(y, x), Is.EqualTo(0.0), "under no_grad");
        }
        Assert.That(Tolerance.MaxAbsDiff(loss, Reference.cross_entropy(before, labels).loss), Is.LessThan(1e-6));
    }

    [Test]
    public void ModuleReturnsZLossAndMeanOverNonIgnoredRows()
    {
        var logits = randn(6, 10);
        var labels = tensor(new long[] { 1, -100, 3, 4, -100, 9 });
        var m = layers.CrossEntropyLoss(lse_square_scale: 1e-2, return_z_loss: true);
        var (loss, z) = m.forward_with_z_loss(logits, labels);
        var (rows, zRows, _) = Reference.cross_entropy(logits, labels, lse_square_scale: 1e-2);
        Assert.That(Tolerance.MaxAbsDiff(loss, rows.sum() / 4), Is.LessThan(1e-6));
        Assert.That(Tolerance.MaxAbsDiff(z, zRows.sum() / 4), Is.LessThan(1e-6));
        var none = layers.CrossEntropyLoss(reduction: LossReduction.None).call(logits, labels);
        Assert.That(none.shape, Is.EqualTo(new long[] { 6 }));
    }

    [Test]
    public void BadArgumentsNameTheArgument()
    {
        var logits = randn(4, 16);
        var labels = tensor(new long[] { 1, 2, 3, 4 });
        void Expect(string param, string fragment, TestDelegate call)
        {
            var e = Assert.Throws<ArgumentException>(call)!;
            Assert.That(e.ParamName, Is.EqualTo(param));
            Assert.That(e.Message, Does.Contain(fragment));
        }
        Expect("logits", "float16, bfloat16, float32 or float64", () => flash_attn.cross_entropy_loss(logits.to(ScalarType.Int32), labels));
        Expect("logits", "2-D", () => flash_attn.cross_entropy_loss(logits.view(2, 2, 16), labels));
        Expect("logits", "contiguous last dimension", () => flash_attn.cross_entropy_loss(randn(16, 4).t(), labels));
        Expect("labels", "int64", () => flash_attn.cross_entropy_loss(logits, labels.to(ScalarType.Int32)));
        Expect("labels", "N (4)", () => flash_attn.cross_entropy_loss(logits, labels[..3]));
        Expect("labels", "1-D", () => flash_attn.cross_entropy_loss(logits, labels.view(2, 2)));
        Expect("label_smoothing", "[0, 1]", () => flash_attn.cross_entropy_loss(logits, labels, label_smoothing: 1.5));
        Expect("lse_square_scale", ">= 0", () => flash_attn.cross_entropy_loss(logits, labels, lse_square_scale: -1));
        Expect("logit_scale", "finite", () => flash_attn.cross_entropy_loss(logits, labels, logit_scale: double.NaN));
        Expect("expected_grad", "() or (N,) with N = 4", () => flash_attn.cross_entropy_loss(logits, labels, expected_grad: ones(3)));
        Expect("expected_grad", "() or (N,) with N = 4", () => flash_attn.cross_entropy_loss(logits, labels, expected_grad: ones(4, 1)));
        Expect("expected_grad", "float16, bfloat16, float32 or float64",
               () => flash_attn.cross_entropy_loss(logits, labels, expected_grad: ones(4, dtype: ScalarType.Int64)));
        Expect("expected_grad", "finite and not 0", () => layers.CrossEntropyLoss(expected_grad: 0.0));
        Expect("expected_grad", "finite and not 0", () => layers.CrossEntropyLoss(expected_grad: double.PositiveInfinity));
    }

    [Test]
    public void LabelOutsideTheVocabularyIsAnArgumentExceptionOnCpu()
    {
        // issue 15: TorchSharp's ExternalException ("index 100 is out of bounds") instead of an ArgumentException
        var logits = randn(4, 100, requires_grad: true);
        foreach (var bad in new[] { 100L, -1L, -101L })
        {
            var e = Assert.Throws<ArgumentException>(() => flash_attn.cross_entropy_loss(logits, tensor(new[] { 1L, 2L, bad, 3L })))!;
            Assert.That(e.ParamName, Is.EqualTo("labels"));
            Assert.That(e.Message, Does.Contain($"got {bad} in row 2"));
        }
        var e2 = Assert.Throws<ArgumentException>(() => layers.CrossEntropyLoss(ignore_index: 0).call(logits, tensor(new[] { 1L, 2L, -100L, 3L })))!;
        Assert.That(e2.ParamName, Is.EqualTo("target"), "-100 is only ignored when it is ignore_index (the module's argument is target)");
        var (loss, _) = flash_attn.cross_entropy_loss(logits, tensor(new[] { 1L, 2L, -100L, 99L }));
        Assert.That(loss.isfinite().all().item<bool>(), Is.True, "a correct call still works");
    }

    [Test]
    public void ReferenceGivesNaNForALabelOutsideTheVocabularyAsTheKernel()
    {
        // the semantics of the GPU paths, where the error is raised later: that row's loss, z-loss and gradient are NaN
        var logits = randn(4, 10, dtype: ScalarType.Float64, requires_grad: true);
        var labels = tensor(new[] { 1L, 10L, -100L, 3L });
        var (loss, zl, lse) = Reference.cross_entropy(logits, labels, lse_square_scale: 1e-2);
        Assert.That(loss.isnan().data<bool>().ToArray(), Is.EqualTo(new[] { false, true, false, false }));
        Assert.That(zl.isnan().data<bool>().ToArray(), Is.EqualTo(new[] { false, true, false, false }));
        Assert.That(loss[2].item<double>(), Is.EqualTo(0.0), "ignored row");
        var d = Reference.cross_entropy_backward(ones(4, dtype: ScalarType.Float64), logits, labels, lse, lse_square_scale: 1e-2);
        Assert.That(d.isnan().all(1).data<bool>().ToArray(), Is.EqualTo(new[] { false, true, false, false }));
        Assert.That(d[2].abs().max().item<double>(), Is.EqualTo(0.0));
        Assert.That(d.isfinite().logical_or(d.isnan().all(1, keepdim: true)).all().item<bool>(), Is.True);
    }

    [Test]
    public void AssertAsyncThrowsAtOnceOnCpu()
    {
        var e = Assert.Throws<ArgumentException>(() => flash_attn.assert_async(tensor(new[] { true, false }), "input_ids", "ids out of range"))!;
        Assert.That(e.ParamName, Is.EqualTo("input_ids"));
        Assert.That(e.Message, Does.Contain("ids out of range"));
        Assert.DoesNotThrow(() => flash_attn.assert_async(tensor(new[] { true, true }), "input_ids", "ids out of range"));
        Assert.DoesNotThrow(flash_attn.check_errors);
    }

    [Test]
    public void NativeValidationNamesFunctionAndArgument()
    {
        var (logits, labels, loss, lse) = (randn(4, 16), tensor(new long[] { 1, 2, 3, 4 }), empty(4), empty(4));
        var ws = empty(NativeMethods.FlashAttn_cross_entropy_fwd_workspace_size(4, 16), dtype: ScalarType.Byte);
        FlashAttnStatus Fwd(float smoothing, long rowStride, long wsBytes) => NativeMethods.FlashAttn_cross_entropy_fwd(
            TensorArgs.Ptr(logits), FlashAttnDType.Float32, TensorArgs.Ptr(labels), TensorArgs.Ptr(loss), IntPtr.Zero,
            TensorArgs.Ptr(lse), 4, 16, rowStride, smoothing, 1f, 0f, -100, TensorArgs.Ptr(ws), wsBytes, IntPtr.Zero);
        string Last() => Marshal.PtrToStringUTF8(NativeMethods.FlashAttn_core_last_error()) ?? "";
        Assert.That(Fwd(2f, 16, ws.numel()), Is.EqualTo(FlashAttnStatus.InvalidArgument));
        Assert.That(Last(), Does.StartWith("FlashAttn_cross_entropy_fwd: label_smoothing (2) must be in [0, 1]"));
        Assert.That(Fwd(0f, 15, ws.numel()), Is.EqualTo(FlashAttnStatus.InvalidArgument));
        Assert.That(Last(), Does.Contain("row_stride (15) must be >= vocab (16)"));
        Assert.That(Fwd(0f, 16, 1), Is.EqualTo(FlashAttnStatus.InvalidArgument));
        Assert.That(Last(), Does.Contain("workspace_bytes (1)"));
        if (!Backend.NativeHasCuda)
        {
            Assert.That(Fwd(0f, 16, ws.numel()), Is.EqualTo(FlashAttnStatus.NoCuda));
            Assert.That(Last(), Does.Contain("built without CUDA support"));
        }

        var (applied, dloss) = (empty(4), ones(4));
        var ws2 = empty(NativeMethods.FlashAttn_cross_entropy_fwd_bwd_workspace_size(4, 16), dtype: ScalarType.Byte);
        FlashAttnStatus FwdBwd(long dlossStride, long dlogitsStride, IntPtr dlogits, long wsBytes) => NativeMethods.FlashAttn_cross_entropy_fwd_bwd(
            TensorArgs.Ptr(logits), dlogits, FlashAttnDType.Float32, TensorArgs.Ptr(labels), TensorArgs.Ptr(dloss), dlossStride,
            TensorArgs.Ptr(loss), IntPtr.Zero, TensorArgs.Ptr(applied), 4, 16, 16, dlogitsStride, 0f, 1f, 0f, -100, TensorArgs.Ptr(ws2),
            wsBytes, IntPtr.Zero);
        Assert.That(FwdBwd(-1, 16, TensorArgs.Ptr(logits), ws2.numel()), Is.EqualTo(FlashAttnStatus.InvalidArgument));
        Assert.That(Last(), Does.StartWith("FlashAttn_cross_entropy_fwd_bwd: dloss_stride (-1) must be >= 0"));
        Assert.That(FwdBwd(1, 17, TensorArgs.Ptr(logits), ws2.numel()), Is.EqualTo(FlashAttnStatus.InvalidArgument));
        Assert.That(Last(), Does.Contain("dlogits aliases logits"));
        Assert.That(FwdBwd(1, 16, IntPtr.Zero, ws2.numel()), Is.EqualTo(FlashAttnStatus.InvalidArgument));
        Assert.That(Last(), Does.Contain("dlogits must not be NULL"));
        Assert.That(FwdBwd(1, 16, TensorArgs.Ptr(logits), ws.numel()), Is.EqualTo(FlashAttnStatus.InvalidArgument));
        Assert.That(Last(), Does.Contain("FlashAttn_cross_entropy_fwd_bwd_workspace_size"));
        Assert.That(NativeMethods.FlashAttn_cross_entropy_bwd_rescale(TensorArgs.Ptr(logits), FlashAttnDType.Float32, TensorArgs.Ptr(labels),
            TensorArgs.Ptr(dloss), 1, IntPtr.Zero, 4, 16, 16, -100, IntPtr.Zero), Is.EqualTo(FlashAttnStatus.InvalidArgument));
        Assert.That(Last(), Does.StartWith("FlashAttn_cross_entropy_bwd_rescale: dloss_applied must not be NULL"));
        if (!Backend.NativeHasCuda)
        {
            Assert.That(FwdBwd(1, 16, TensorArgs.Ptr(logits), ws2.numel()), Is.EqualTo(FlashAttnStatus.NoCuda));
            Assert.That(NativeMethods.FlashAttn_cross_entropy_bwd_rescale(TensorArgs.Ptr(logits), FlashAttnDType.Float32, TensorArgs.Ptr(labels),
                TensorArgs.Ptr(dloss), 1, TensorArgs.Ptr(applied), 4, 16, 16, -100, IntPtr.Zero), Is.EqualTo(FlashAttnStatus.NoCuda));
        }
    }
}
