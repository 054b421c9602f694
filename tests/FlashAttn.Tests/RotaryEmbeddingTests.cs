using NUnit.Framework;
using TorchSharp;
using static TorchSharp.torch;

namespace FlashAttn.Tests;

/// <summary>RotaryEmbedding and apply_rotary_emb_qkv_: in place on packed qkv, gradients through it, XPos, GQA.</summary>
public sealed class RotaryEmbeddingTests
{
    [SetUp]
    public void Seed() => manual_seed(TestContext.CurrentContext.Random.Next());

    // Out-of-place composition of the op under test: rotate q and k with Reference.rotary, keep v.
    internal static Tensor Expected(Tensor qkv, Tensor cos, Tensor sin, Tensor cosK, Tensor sinK, long offset, bool interleaved, int? numHeadsQ)
    {
        if (numHeadsQ is null)
        {
            var q = Reference.rotary(qkv[.., .., 0], cos, sin, interleaved, seqlen_offset: offset);
            var k = Reference.rotary(qkv[.., .., 1], cosK, sinK, interleaved, seqlen_offset: offset);
            return stack(new[] { q, k, qkv[.., .., 2] }, 2);
        }
        long hq = numHeadsQ.Value, hk = (qkv.shape[2] - hq) / 2;
        var qg = Reference.rotary(qkv[.., .., ..(int)hq], cos, sin, interleaved, seqlen_offset: offset);
        var kg = Reference.rotary(qkv[.., .., (int)hq..(int)(hq + hk)], cosK, sinK, interleaved, seqlen_offset: offset);
        return cat(new[] { qg, kg, qkv[.., .., (int)(hq + hk)..] }, 2);
    }

    [TestCase(false, null, null), TestCase(true, null, null), TestCase(false, 512.0, null), TestCase(false, null, 4)]
    public void InplaceOnPackedQkvMatchesOutOfPlaceWithGradients(bool interleaved, double? scaleBase, int? numHeadsQ)
    {
        using var rope = layers.RotaryEmbedding(16, interleaved: interleaved, scale_base: scaleBase);
        long heads = numHeadsQ is null ? 3 * 2 : 4 + 2 * 2, d = 24;
        var x = randn(2, 9, 32, dtype: ScalarType.Float64, requires_grad: true);
        var w = randn(32, heads * d, dtype: ScalarType.Float64) / 6;
        Tensor Pack(Tensor h) => numHeadsQ is null ? h.view(2, 9, 3, 2, d) : h.view(2, 9, heads, d);

        var qkv = Pack(x.matmul(w));
        var rotated = rope.forward(qkv, seqlen_offset: 3, num_heads_q: numHeadsQ);
        var g = randn_like(rotated);
        (rotated * g).sum().backward();

        var x2 = x.detach().clone().requires_grad_(true);
        var qkv2 = Pack(x2.matmul(w));
        var (cos, sin) = rope.Tables(12, CPU);
        Tensor cosK = cos, sinK = sin;
        if (scaleBase is not null)
        {
            // XPos: q scaled by s^p, k by s^-p, s = (2i + 0.4 dim) / (1.4 dim), p = (pos - L/2) / scale_base
            var s = (arange(0, 16, 2, dtype: ScalarType.Float64) + 0.4 * 16) / (1.4 * 16);
            var p = (arange(12, dtype: ScalarType.Float64) - 6) / scaleBase.Value;
            var scale = pow(s.unsqueeze(0), p.unsqueeze(1));
            var freqs = outer(arange(12, dtype: ScalarType.Float64), 1.0 / pow(10000.0, arange(0, 16, 2, dtype: ScalarType.Float64) / 16));
            (cos, sin, cosK, sinK) = (freqs.cos() * scale, freqs.sin() * scale, freqs.cos() / scale, freqs.sin() / scale);
        }
        var expected = Expected(qkv2, cos.to(ScalarType.Float64), sin.to(ScalarType.Float64), cosK.to(ScalarType.Float64), sinK.to(ScalarType.Float64), 3, interleaved, numHeadsQ);
        (expected * g).sum().backward();

        Assert.That(Tolerance.MaxAbsDiff(rotated, expected), Is.LessThan(1e-5), "values (float32 tables)");
        Assert.That(Tolerance.MaxAbsDiff(x.grad!, x2.grad!), Is.LessThan(1e-5), "gradient through the in-place rotation");
    }

    [Test]
    public void TablesGrowAndKeepEarlierPositions()
    {
        using var rope = layers.RotaryEmbedding(8);
        var (c1, _) = rope.Tables(5, CPU);
        var first = c1.clone();
        var (c2, _) = rope.Tables(40, CPU);
        Assert.That(c2.shape[0], Is.GreaterThanOrEqualTo(40));
        Assert.That(c2.dtype, Is.EqualTo(ScalarType.Float32));
        Assert.That(Tolerance.MaxAbsDiff(c2[..5], first), Is.EqualTo(0.0));
    }

    [Test]
    public void BadPackingIsRejected()
    {
        using var rope = layers.RotaryEmbedding(8);
        var e = Assert.Throws<ArgumentException>(() => rope.forward(randn(new long[] { 1, 4, 2, 3, 8 })))!;
        Assert.That(e.ParamName, Is.EqualTo("qkv"));
        e = Assert.Throws<ArgumentException>(() => rope.forward(randn(1, 4, 7, 8), num_heads_q: 4))!;
        Assert.That(e.ParamName, Is.EqualTo("num_heads_q"));
        Assert.Throws<ArgumentException>(() => layers.RotaryEmbedding(7));
    }

    [Test, Category(Gpu.Category)]
    public void CudaModuleMatchesFloat64Reference()
    {
        var dev = Gpu.Require();
        using var rope = layers.RotaryEmbedding(64, interleaved: false);
        var qkv64 = randn(new long[] { 2, 300, 3, 4, 128 }, dtype: ScalarType.Float64, device: dev);
        var qkv = qkv64.to(ScalarType.BFloat16).requires_grad_(true);
        var work = qkv * 1; // a non-leaf: the module rotates it in place
        var y = rope.forward(work, seqlen_offset: 5);
        var g = randn_like(y);
        y.backward(new[] { g });
        var (cos, sin) = rope.Tables(305, dev);
        var xe = qkv.detach().to(ScalarType.Float64).requires_grad_(true);
        var ye = Expected(xe, cos.to(ScalarType.Float64), sin.to(ScalarType.Float64), cos.to(ScalarType.Float64), sin.to(ScalarType.Float64), 5, false, null);
        ye.backward(new[] { g.to(ScalarType.Float64) });
        var xl = qkv.detach().clone().requires_grad_(true);
        var yl = stack(new[] {
            Reference.rotary(xl[.., .., 0], cos.to(ScalarType.BFloat16), sin.to(ScalarType.BFloat16), seqlen_offset: 5, compute_dtype: ScalarType.BFloat16),
            Reference.rotary(xl[.., .., 1], cos.to(ScalarType.BFloat16), sin.to(ScalarType.BFloat16), seqlen_offset: 5, compute_dtype: ScalarType.BFloat16),
            xl[.., .., 2] }, 2);
        yl.backward(new[] { g });
        Tolerance.AssertClose(y, yl, ye, "module out");
        Tolerance.AssertClose(qkv.grad!, xl.grad!, xe.grad!, "module dqkv");
    }
}
