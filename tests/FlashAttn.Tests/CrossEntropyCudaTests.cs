using NUnit.Framework;
using TorchSharp;
using static TorchSharp.torch;

namespace FlashAttn.Tests;

/// <summary>
/// The cross-entropy kernels against the float64 reference with the flash-attn rule, losses and gradients,
/// at vocabularies 1000 to 256000, every dtype, with ignore_index, label smoothing, logit scale (negative too)
/// and z-loss; the in-place backward writes the same gradient into the logits buffer; strided rows. The gradient
/// computed in the forward (expected_grad) for every kind of upstream gradient, a second use and a second backward.
/// </summary>
[Category(Gpu.Category)]
public sealed class CrossEntropyCudaTests
{
    [SetUp]
    public void Seed() => manual_seed(TestContext.CurrentContext.Random.Next());

    private static IEnumerable<TestCaseData> Cases()
    {
        var dtypes = new[] { ScalarType.BFloat16, ScalarType.Float16, ScalarType.Float32 };
        // 16385: a last chunk of one column, or none in rows that start unaligned; 256000: more chunks than a warp
        // has lanes in the combine kernel
        var vocabs = new[] { 1000, 16385, 32003, 50257, 128256, 256000 };
        int i = 0;
        foreach (var dt in dtypes)
        foreach (var v in vocabs)
        {
            double smoothing = (i & 1) == 1 ? 0.1 : 0.0, scale = (i & 2) == 2 ? 0.7 : 1.0, lseSq = (i % 3) == 0 ? 1e-4 : 0.0;
            i++;
            yield return new TestCaseData(dt, v, smoothing, scale, lseSq).SetName($"CrossEntropy_{dt}_v{v}_ls{smoothing}_s{scale}_z{lseSq}");
        }
    }

    private static Tensor Labels(long n, long v, Device dev)
    {
        var labels = randint(0, v, new long[] { n }, device: dev);
        labels[1] = tensor(-100L, device: dev);
        if (n > 5) labels[5] = tensor(v - 1, device: dev);
        return labels;
    }

    [TestCaseSource(nameof(Cases))]
    public void LossAndGradientMatchReference(ScalarType dtype, int vocab, double smoothing, double scale, double lseSq)
    {
        var dev = Gpu.Require();
        long n = vocab >= 100000 ? 8 : 64;
        var logits = (randn(n, vocab, device: dev) * 3).to(dtype).requires_grad_(true);
        var labels = Labels(n, vocab, dev);
        var (loss, z) = flash_attn.cross_entropy_loss(logits, labels, smoothing, scale, lseSq);
        Assert.That(loss.dtype, Is.EqualTo(ScalarType.Float32));
        var g = rand(n, device: dev);
        loss.backward(new[] { g });

        var le = logits.detach().to(ScalarType.Float64).requires_grad_(true);
        var (lossE, zE, _) = Reference.cross_entropy(le, labels, smoothing, scale, lseSq);
        lossE.backward(new[] { g.to(ScalarType.Float64) });
        var ll = logits.detach().clone().requires_grad_(true);
        var (lossL, zL, _) = Reference.cross_entropy(ll, labels, smoothing, scale, lseSq, compute_dtype: dtype);
        lossL.backward(new[] { g.to(dtype) });

        Tolerance.AssertClose(loss, lossL, lossE, "loss");
        Tolerance.AssertClose(z, zL, zE, "z_loss");
        Tolerance.AssertClose(logits.grad!, ll.grad!, le.grad!, "dlogits");
        Assert.That(loss[1].to(ScalarType.Float32).item<float>(), Is.EqualTo(0f), "ignored row");
        Assert.That(logits.grad![1].abs().max().to(ScalarType.Float32).item<float>(), Is.EqualTo(0f), "ignored row: no gradient");
    }

    // A negative logit scale (the largest scaled logit is the smallest logit) and row counts that leave the
    // kernels' last warps without a row or a chunk.
    [TestCase(ScalarType.BFloat16, 50257, 13), TestCase(ScalarType.Float16, 4097, 3), TestCase(ScalarType.Float32, 32003, 7)]
    public void NegativeLogitScaleAndOddRowCountsMatchReference(ScalarType dtype, int vocab, long n)
    {
        var dev = Gpu.Require();
        var logits = (randn(n, vocab, device: dev) * 3).to(dtype).requires_grad_(true);
        var labels = Labels(n, vocab, dev);
        var (loss, z) = flash_attn.cross_entropy_loss(logits, labels, 0.1, -0.6, 1e-4);
        var g = rand(n, device: dev);
        loss.backward(new[] { g });
        var le = logits.detach().to(ScalarType.Float64).requires_grad_(true);
        var (lossE, zE, _) = Reference.cross_entropy(le, labels, 0.1, -0.6, 1e-4);
        lossE.backward(new[] { g.to(ScalarType.Float64) });
        var ll = logits.detach().clone().requires_grad_(true);
        var (lossL, zL, _) = Reference.cross_entropy(ll, labels, 0.1, -0.6, 1e-4, compute_dtype: dtype);
        lossL.backward(new[] { g.to(dtype) });
        Tolerance.AssertClose(loss, lossL, lossE, "loss");
        Tolerance.AssertClose(z, zL, zE, "z_loss");
        Tolerance.AssertClose(logits.grad!, ll.grad!, le.grad!, "dlogits");
    }

    [TestCase(ScalarType.BFloat16, 50257), TestCase(ScalarType.Float16, 32003), TestCase(ScalarType.Float32, 128256)]
    public void InplaceBackwardWritesTheSameGradientIntoTheLogits(ScalarType dtype, int vocab)
    {
        var dev = Gpu.Require();
        long n = vocab >= 100000 ? 8 : 64;
        var leaf = (randn(n, vocab, device: dev) * 2).to(dtype).requires_grad_(true);
        var labels = Labels(n, vocab, dev);
        var g = rand(n, device: dev);
        var (loss, _) = flash_attn.cross_entropy_loss(leaf * 1.0, labels, 0.1, lse_square_scale: 1e-4);
        loss.backward(new[] { g });

        var leaf2 = leaf.detach().clone().requires_grad_(true);
        var logits2 = leaf2 * 1.0;
        var before = logits2.detach().clone();
        var (loss2, _) = flash_attn.cross_entropy_loss(logits2, labels, 0.1, lse_square_scale: 1e-4, inplace_backward: true);
        Assert.That(Tolerance.MaxAbsDiff(loss2, loss), Is.EqualTo(0.0));
        Assert.That(Tolerance.MaxAbsDiff(logits2, before), Is.EqualTo(0.0), "the forward leaves the logits alone");
        loss2.backward(new[] { g });
        Assert.That(Tolerance.MaxAbsDiff(leaf2.grad!, leaf.grad!), Is.EqualTo(0.0), "in place equals out of place");
        Assert.That(Tolerance.MaxAbsDiff(logits2, leaf.grad!), Is.EqualTo(0.0), "the gradient now lives in the logits buffer");
    }

    [TestCase(ScalarType.BFloat16), TestCase(ScalarType.Float32)]
    public void StridedRowsAndMeanReductionMatchTorch(ScalarType dtype)
    {
        var dev = Gpu.Require();
        const long n = 96, v = 50257;
        var buf = (randn(n, v + 11, device: dev) * 2).to(dtype);
        var logits = buf[.., 3..(int)(v + 3)].detach().requires_grad_(true);
        var labels = Labels(n, v, dev);
        var loss = layers.CrossEntropyLoss().call(logits, labels);
        loss.backward();
        var lf = logits.detach().to(ScalarType.Float32).requires_grad_(true);
        var expected = nn.functional.cross_entropy(lf, labels);
        expected.backward();
        Assert.That(Math.Abs(loss.to(ScalarType.Float32).item<float>() - expected.to(ScalarType.Float32).item<float>()), Is.LessThan(1e-4));
        var le = logits.detach().to(ScalarType.Float64).requires_grad_(true);
        var e64 = nn.functional.cross_entropy(le, labels);
        e64.backward();
        Tolerance.AssertClose(logits.grad!, lf.grad!.to(dtype), le.grad!, "dlogits vs torch");
    }

    // issue 15: on CUDA a label equal to the vocabulary size gave no error and a finite loss
    [TestCase(ScalarType.BFloat16, false), TestCase(ScalarType.Float32, false), TestCase(ScalarType.Float32, true)]
    public void LabelOutsideTheVocabularyGivesNaNAndIsRaisedByCheckErrors(ScalarType dtype, bool reference)
    {
        var dev = Gpu.Require();
        flash_attn.check_errors(); // nothing left over from another test
        var logits = (randn(4, 100, device: dev) * 2).to(dtype).requires_grad_(true);
        var labels = tensor(new[] { 1L, 2L, 100L, 3L }, device: dev);
        Backend.ForceReference = reference; // the reference path on the GPU records the error the same way
        Tensor loss;
        try
        {
            (loss, _) = flash_attn.cross_entropy_loss(logits, labels); // does not wait for the device, so does not throw
        }
        finally
        {
            Backend.ForceReference = false;
        }
        loss.backward(new[] { ones_like(loss) });
        var rows = new long[] { 0, 1, 3 };
        Assert.That(loss.isnan().cpu().data<bool>().ToArray(), Is.EqualTo(new[] { false, false, true, false }), "row 2: NaN loss");
        var grad = logits.grad!.to(ScalarType.Float32).cpu();
        Assert.That(grad[2].isnan().all().item<bool>(), Is.True, "row 2: NaN gradient");

        // the other rows equal the reference on those rows alone
        var idx = tensor(rows, device: dev);
        var good = labels.index_select(0, idx);
        var le = logits.detach().index_select(0, idx).to(ScalarType.Float64).requires_grad_(true);
        var (lossE, _, _) = Reference.cross_entropy(le, good);
        lossE.sum().backward();
        var ll = logits.detach().index_select(0, idx).requires_grad_(true);
        var (lossL, _, _) = Reference.cross_entropy(ll, good, compute_dtype: dtype);
        lossL.sum().backward();
        Tolerance.AssertClose(loss.index_select(0, idx), lossL, lossE, "loss of the other rows");
        Tolerance.AssertClose(logits.grad!.index_select(0, idx), ll.grad!, le.grad!, "dlogits of the other rows");

        var e = Assert.Throws<ArgumentException>(flash_attn.check_errors)!;
        Assert.That(e.ParamName, Is.EqualTo("labels"));
        Assert.That(e.Message, Does.Contain("cross_entropy_loss"));
        if (!reference) Assert.That(e.Message, Does.Contain("label 100 in row 2"));
        Assert.DoesNotThrow(flash_attn.check_errors, "raised once, then cleared");

        var (ok, _) = flash_attn.cross_entropy_loss(logits.detach(), tensor(new[] { 1L, 2L, 99L, -100L }, device: dev));
        Assert.That(ok.isfinite().all().item<bool>(), Is.True, "a correct call afterwards works");
        Assert.DoesNotThrow(flash_attn.check_errors, "and records nothing");
    }

    [Test]
    public void ARecordedErrorIsRaisedByTheNextCallWithoutWaiting()
    {
        var dev = Gpu.Require();
        flash_attn.check_errors();
        var logits = randn(4, 1000, device: dev).to(ScalarType.BFloat16);
        flash_attn.cross_entropy_loss(logits, tensor(new[] { 1L, -5L, 2L, 3L }, device: dev));
        cuda.synchronize(); // the kernel has finished: its record is in host memory
        var w = ones(64, device: dev, dtype: ScalarType.BFloat16);
        var e = Assert.Throws<ArgumentException>(() => flash_attn.layer_norm(randn(2, 64, device: dev, dtype: ScalarType.BFloat16), w, null))!;
        Assert.That(e.ParamName, Is.EqualTo("labels"));
        Assert.That(e.Message, Does.Contain("label -5 in row 1"));
        Assert.That(flash_attn.layer_norm(randn(2, 64, device: dev, dtype: ScalarType.BFloat16), w, null).isfinite().all().item<bool>(), Is.True);

        // a caller's own device-side check (GPTModel checks its token ids so)
        flash_attn.assert_async(tensor(new[] { true, true, false }, device: dev), "input_ids", "token ids must be in [0, vocab_size)");
        var e2 = Assert.Throws<ArgumentException>(flash_attn.check_errors)!;
        Assert.That(e2.ParamName, Is.EqualTo("input_ids"));
        Assert.That(e2.Message, Does.Contain("element 2").And.Contain("token ids must be in [0, vocab_size)"));
        flash_attn.assert_async(tensor(new[] { true, true }, device: dev), "input_ids", "token ids must be in [0, vocab_size)");
        Assert.DoesNotThrow(flash_attn.check_errors);
    }

    [Test]
    public void AllRowsIgnoredGiveZeroLossAndGradient()
    {
        var dev = Gpu.Require();
        var logits = randn(4, 1000, device: dev).to(ScalarType.BFloat16).requires_grad_(true);
        var labels = full(4, -100L, device: dev);
        var (loss, _) = flash_attn.cross_entropy_loss(logits, labels);
        loss.sum().backward();
        Assert.That(loss.abs().max().to(ScalarType.Float32).item<float>(), Is.EqualTo(0f));
        Assert.That(logits.grad!.abs().max().to(ScalarType.Float32).item<float>(), Is.EqualTo(0f));
    }

    // expected_grad: FlashAttn_cross_entropy_fwd_bwd (a row per block in shared memory at 97 and 50257; the two-kernel path
    // where a row does not fit: 128256 in every dtype, float32 50257 on sm_80) and the backward's comparison, for an
    // upstream gradient equal to the expected one (nothing to do), 1/n (equal too), 0.37 against an expected 1 and a
    // per-row one (both rescaled), in place or not, against the float64 reference for the gradient received.
    private static IEnumerable<TestCaseData> FusedCases()
    {
        var dtypes = new[] { ScalarType.BFloat16, ScalarType.Float16, ScalarType.Float32 };
        var kinds = new[] { "expected", "1/n", "0.37", "rows" };
        int i = 0;
        foreach (var dt in dtypes)
        foreach (var v in new[] { 97, 50257, 128256 })
        foreach (var n in new[] { 1, 97, 1025 })
        {
            double smoothing = (i & 1) == 1 ? 0.1 : 0.0, lseSq = i % 3 == 0 ? 1e-4 : 0.0, scale = i % 5 == 2 ? -0.7 : 1.0;
            bool inplace = (i & 2) == 2;
            var kind = kinds[i % 4];
            i++;
            yield return new TestCaseData(dt, v, n, smoothing, scale, lseSq, inplace, kind)
                .SetName($"CrossEntropyFused_{dt}_v{v}_n{n}_ls{smoothing}_s{scale}_z{lseSq}_{(inplace ? "inplace" : "out")}_{kind.Replace('/', '_')}");
        }
    }

    private static Tensor FusedLabels(long n, long v, Device dev)
    {
        var labels = randint(0, v, new long[] { n }, device: dev);
        if (n > 1) labels[1] = tensor(-100L, device: dev);
        if (n > 5) labels[5] = tensor(v - 1, device: dev);
        return labels;
    }

    // float64 and low-precision references of loss (and its gradient into leaf copies) for an upstream gradient g
    private static (Tensor lossE, Tensor zE, Tensor gradE, Tensor lossL, Tensor zL, Tensor gradL) References(Tensor leaf, Tensor labels,
        double smoothing, double scale, double lseSq, params Tensor[] upstream)
    {
        var le = leaf.detach().to(ScalarType.Float64).requires_grad_(true);
        var (lossE, zE, _) = Reference.cross_entropy(le, labels, smoothing, scale, lseSq);
        var ll = leaf.detach().clone().requires_grad_(true);
        var (lossL, zL, _) = Reference.cross_entropy(ll, labels, smoothing, scale, lseSq, compute_dtype: leaf.dtype);
        for (int k = 0; k < upstream.Length; k++)
        {
            lossE.backward(new[] { upstream[k].to(ScalarType.Float64) }, retain_graph: k < upstream.Length - 1);
            lossL.backward(new[] { upstream[k].to(leaf.dtype) }, retain_graph: k < upstream.Length - 1);
        }
        return (lossE, zE, le.grad!, lossL, zL, ll.grad!);
    }

    [TestCaseSource(nameof(FusedCases))]
    public void GradientInTheForwardMatchesReference(ScalarType dtype, int vocab, int n, double smoothing, double scale, double lseSq,
        bool inplace, string kind)
    {
        var dev = Gpu.Require();
        var leaf = (randn(n, vocab, device: dev) * 3).to(dtype).requires_grad_(true);
        var labels = FusedLabels(n, vocab, dev);
        var expected = full(Array.Empty<long>(), kind switch { "expected" => 0.5, "1/n" => 1.0 / n, _ => 1.0 }, ScalarType.Float32, dev);
        var g = kind switch
        {
            "expected" => full(n, 0.5f, device: dev),
            "1/n" => full(n, 1.0 / n, ScalarType.Float32, dev),
            "0.37" => full(n, 0.37f, device: dev),
            _ => rand(n, device: dev) + 0.1,
        };
        var logits = leaf * 1.0;
        // poison: a NaN block of dlogits' size back in the caching allocator, for the out-of-place dlogits to land on
        if (!inplace) full(n, vocab, double.NaN, dtype, dev).Dispose();
        var (loss, z) = flash_attn.cross_entropy_loss(logits, labels, smoothing, scale, lseSq, inplace_backward: inplace, expected_grad: expected);
        loss.backward(new[] { g });
        var (lossE, zE, gradE, lossL, zL, gradL) = References(leaf, labels, smoothing, scale, lseSq, g);
        Tolerance.AssertClose(loss, lossL, lossE, "loss");
        Tolerance.AssertClose(z, zL, zE, "z_loss");
        Tolerance.AssertClose(leaf.grad!, gradL, gradE, "dlogits");
        if (n > 1)
        {
            Assert.That(loss[1].item<float>(), Is.EqualTo(0f), "ignored row");
            Assert.That(leaf.grad![1].abs().max().to(ScalarType.Float32).item<float>(), Is.EqualTo(0f), "ignored row: no gradient");
        }
    }

    // The loss used twice in the graph (the backward receives 1.5 against an expected 1), then a second backward through the
    // same graph receiving 2: the kernel scales from the first backward's 1.5 (dloss_applied updated on the device). The
    // low-precision reference rounds where the op does: dlogits for the expected 1 in the low precision, scaled by 1.5, then
    // that by 2 / 1.5 (cross_entropy_rescale: the kernel's float32 ratio and one rounding each), the two summed in the leaf's
    // dtype. Two backwards computed afresh round each gradient once, and were no measure of this chain, which rounds the
    // label's column four times, all the same way in bf16: -0.9 -> -0.8984, x1.5 -> -1.3438, x4/3 -> -1.7891, their sum
    // -3.125 against -3.15, an error of 0.025 in every row where two fresh backwards showed under 0.01.
    [TestCase(ScalarType.BFloat16, 50257, true), TestCase(ScalarType.Float16, 97, false), TestCase(ScalarType.Float32, 128256, true)]
    public void GradientInTheForwardWithASecondUseAndASecondBackward(ScalarType dtype, int vocab, bool inplace)
    {
        var dev = Gpu.Require();
        const long n = 33;
        var leaf = (randn(n, vocab, device: dev) * 2).to(dtype).requires_grad_(true);
        var labels = FusedLabels(n, vocab, dev);
        var (loss, _) = flash_attn.cross_entropy_loss(leaf * 1.0, labels, 0.1, lse_square_scale: 1e-4, inplace_backward: inplace,
                                                      expected_grad: ones(Array.Empty<long>(), device: dev));
        (loss.sum() + 0.5f * loss.sum()).backward(retain_graph: true);
        (loss.sum() * 2f).backward();
        var (first, second) = (full(n, 1.5f, device: dev), full(n, 2f, device: dev));
        var (_, _, gradE, _, _, _) = References(leaf, labels, 0.1, 1.0, 1e-4, first, second);
        var one = ones(n, device: dev);
        var (_, _, lseL) = Reference.cross_entropy(leaf.detach(), labels, 0.1, 1.0, 1e-4, compute_dtype: dtype);
        var forward = Reference.cross_entropy_backward(one, leaf.detach(), labels, lseL, 0.1, 1.0, 1e-4, compute_dtype: dtype);
        var scaledOnce = Reference.cross_entropy_rescale(forward, first, one, labels);
        var scaledTwice = Reference.cross_entropy_rescale(scaledOnce, second, first, labels);
        Tolerance.AssertClose(leaf.grad!, scaledOnce + scaledTwice, gradE, "dlogits after both backwards");
    }

    // The module's mean with expected_grad on rows 16 bytes apart in a wider buffer (row stride V + 11, first column at 3),
    // overwritten in place, against torch's cross_entropy in float64; upstream 1 (the expectation) and 0.37.
    [TestCase(ScalarType.BFloat16, 1.0), TestCase(ScalarType.Float32, 0.37)]
    public void ModuleMeanWithExpectedGradOnStridedRowsMatchesTorch(ScalarType dtype, double upstream)
    {
        var dev = Gpu.Require();
        const long n = 96, v = 50257;
        var leaf = (randn(n, v + 11, device: dev) * 2).to(dtype).requires_grad_(true);
        var logits = (leaf * 1.0)[.., 3..(int)(v + 3)];
        var labels = FusedLabels(n, v, dev);
        var loss = layers.CrossEntropyLoss(inplace_backward: true, expected_grad: 1.0).call(logits, labels);
        loss.backward(new[] { full(Array.Empty<long>(), upstream, ScalarType.Float32, dev) });
        var lf = leaf.detach()[.., 3..(int)(v + 3)].to(ScalarType.Float32).requires_grad_(true);
        var expected = nn.functional.cross_entropy(lf, labels);
        (expected * upstream).backward();
        Assert.That(Math.Abs(loss.item<float>() - expected.item<float>()), Is.LessThan(1e-4));
        var le = leaf.detach()[.., 3..(int)(v + 3)].to(ScalarType.Float64).requires_grad_(true);
        (nn.functional.cross_entropy(le, labels) * upstream).backward();
        Tolerance.AssertClose(leaf.grad![.., 3..(int)(v + 3)], lf.grad!.to(dtype), le.grad!, "dlogits vs torch");
        Assert.That(leaf.grad![.., ..3].abs().max().to(ScalarType.Float32).item<float>(), Is.EqualTo(0f), "columns outside the logits");
    }

    // What makes the trainer's backward free: on the device too, the gradient a mean's backward gives each row is, to the
    // bit, lossGrad / count by the same division (the expected gradient GPT's loss hands the kernel).
    [TestCase(1, 16384L), TestCase(32, 16383L), TestCase(3, 97L)]
    public void TheMeansBackwardGivesTheExpectedGradientToTheBit(int accum, long count)
    {
        var dev = Gpu.Require();
        var rows = randn(count, device: dev).requires_grad_(true);
        var lossGrad = full(Array.Empty<long>(), 1.0 / accum, ScalarType.Float32, dev);
        var n = tensor(count, device: dev).to(ScalarType.Float32);
        ((rows.sum() / n) * lossGrad).backward();
        var expected = lossGrad / n;
        Assert.That(rows.grad!.eq(expected).all().item<bool>(), Is.True, $"each row's gradient is {expected.item<float>():R}");
    }
}
