using NUnit.Framework;
using TorchSharp;
using static TorchSharp.torch;

namespace FlashAttn.Tests;

/// <summary>
/// The CUDA rotary kernel against the float64 reference, with the flash-attn rule (error at most
/// twice the low-precision reference's), forward and backward, over odd sizes and every option.
/// </summary>
[Category(Gpu.Category)]
public sealed class RotaryCudaTests
{
    [SetUp]
    public void Seed() => manual_seed(TestContext.CurrentContext.Random.Next());

    private static IEnumerable<TestCaseData> Cases()
    {
        var dtypes = new[] { ScalarType.BFloat16, ScalarType.Float16, ScalarType.Float32 };
        // (headdim, rotary_dim): full, half, odd head dims with a shorter rotary part.
        var dims = new[] { (64, 64), (128, 64), (40, 40), (59, 32), (80, 48), (111, 110) };
        var seqlens = new[] { 1, 97, 1025 };
        int i = 0;
        foreach (var dt in dtypes)
        foreach (var (d, r) in dims)
        foreach (var s in seqlens)
        {
            bool interleaved = (i & 1) == 1, csFloat = (i & 2) == 2, tensorOffsets = (i & 4) == 4;
            i++;
            yield return new TestCaseData(dt, d, r, s, interleaved, csFloat, tensorOffsets)
                .SetName($"Rotary_{dt}_d{d}_r{r}_s{s}_{(interleaved ? "interleaved" : "halves")}_{(csFloat ? "csf32" : "csx")}_{(tensorOffsets ? "offT" : "offI")}");
        }
    }

    [TestCaseSource(nameof(Cases))]
    public void ForwardAndBackwardMatchReference(ScalarType dtype, int headdim, int rotaryDim, int seqlen,
        bool interleaved, bool csFloat, bool tensorOffsets)
    {
        var dev = Gpu.Require();
        const int batch = 2, heads = 3;
        var x64 = randn(batch, seqlen, heads, headdim, dtype: ScalarType.Float64, device: dev);
        var x = x64.to(dtype).requires_grad_(true);
        var (cos64, sin64) = RotaryTests.CosSin(seqlen + 7, rotaryDim, ScalarType.Float64, dev);
        var cs = csFloat ? ScalarType.Float32 : dtype;
        var (cos, sin) = (cos64.to(cs), sin64.to(cs));
        Tensor? offsets = tensorOffsets ? tensor(new long[] { 0, 7 }, device: dev) : null;
        long offset = tensorOffsets ? 0 : 3;

        var y = flash_attn.apply_rotary_emb(x, cos, sin, interleaved, seqlen_offsets: offsets, seqlen_offset: offset);
        var g = randn_like(y);
        y.backward(new[] { g });

        // exact: float64 on the inputs as the kernel saw them (rounded x, rounded cos/sin)
        var xe = x.detach().to(ScalarType.Float64).requires_grad_(true);
        var ye = Reference.rotary(xe, cos.to(ScalarType.Float64), sin.to(ScalarType.Float64), interleaved,
                                  seqlen_offsets: offsets, seqlen_offset: offset);
        ye.backward(new[] { g.to(ScalarType.Float64) });
        // low precision: the same reference computed in the inputs' dtype
        var xl = x.detach().clone().requires_grad_(true);
        var yl = Reference.rotary(xl, cos.to(dtype), sin.to(dtype), interleaved, seqlen_offsets: offsets,
                                  seqlen_offset: offset, compute_dtype: dtype);
        yl.backward(new[] { g });

        Tolerance.AssertClose(y, yl, ye, "out");
        Tolerance.AssertClose(x.grad!, xl.grad!, xe.grad!, "dx");
    }

    [TestCase(ScalarType.BFloat16, false), TestCase(ScalarType.Float16, true), TestCase(ScalarType.Float32, false)]
    public void StridedInputFromPackedQkvAndInplace(ScalarType dtype, bool interleaved)
    {
        var dev = Gpu.Require();
        // q viewed out of a (B, S, 3, H, D) qkv: batch, sequence and head strides are not x's shape's.
        var qkv = randn(new long[] { 3, 200, 3, 4, 96 }, dtype: dtype, device: dev);
        var q = qkv[.., .., 0];
        var (cos, sin) = RotaryTests.CosSin(200, 64, dtype, dev);
        var expected = Reference.rotary(q, cos, sin, interleaved);
        var kBefore = qkv[.., .., 1].clone();
        var y = flash_attn.apply_rotary_emb(q, cos, sin, interleaved);
        var low = Reference.rotary(q, cos, sin, interleaved, compute_dtype: dtype);
        var exact = Reference.rotary(q.to(ScalarType.Float64), cos.to(ScalarType.Float64), sin.to(ScalarType.Float64), interleaved);
        Tolerance.AssertClose(y, low, exact, "strided out");
        flash_attn.apply_rotary_emb(q, cos, sin, interleaved, inplace: true);
        Assert.That(Tolerance.MaxAbsDiff(qkv[.., .., 0], y), Is.EqualTo(0.0), "in place equals out of place");
        Assert.That(Tolerance.MaxAbsDiff(qkv[.., .., 1], kBefore), Is.EqualTo(0.0), "k untouched");
        _ = expected;
    }

    [TestCase(ScalarType.BFloat16), TestCase(ScalarType.Float32)]
    public void VarlenMatchesReference(ScalarType dtype)
    {
        var dev = Gpu.Require();
        var cuHost = new[] { 0, 1, 98, 1123, 1200 };
        var cu = tensor(cuHost, dtype: ScalarType.Int32, device: dev);
        var x = randn(1200, 5, 80, dtype: dtype, device: dev).requires_grad_(true);
        var (cos, sin) = RotaryTests.CosSin(1100, 80, ScalarType.Float32, dev);
        var offsets = tensor(new[] { 3, 0, 50, 7 }, dtype: ScalarType.Int32, device: dev);
        var y = flash_attn.apply_rotary_emb(x, cos, sin, seqlen_offsets: offsets, cu_seqlens: cu, max_seqlen: 1025);
        var g = randn_like(y);
        y.backward(new[] { g });
        var xe = x.detach().to(ScalarType.Float64).requires_grad_(true);
        var ye = Reference.rotary(xe, cos.to(ScalarType.Float64), sin.to(ScalarType.Float64), seqlen_offsets: offsets, cu_seqlens: cu, max_seqlen: 1025);
        ye.backward(new[] { g.to(ScalarType.Float64) });
        var xl = x.detach().clone().requires_grad_(true);
        var yl = Reference.rotary(xl, cos.to(dtype), sin.to(dtype), seqlen_offsets: offsets, cu_seqlens: cu, max_seqlen: 1025, compute_dtype: dtype);
        yl.backward(new[] { g });
        Tolerance.AssertClose(y, yl, ye, "varlen out");
        Tolerance.AssertClose(x.grad!, xl.grad!, xe.grad!, "varlen dx");
    }

    [Test]
    public void ValidationHappensBeforeTheKernelOnGpu()
    {
        var dev = Gpu.Require();
        var x = randn(2, 4, 3, 16, device: dev);
        var (cos, sin) = RotaryTests.CosSin(8, 8);
        var e = Assert.Throws<ArgumentException>(() => flash_attn.apply_rotary_emb(x, cos, sin))!;
        Assert.That(e.ParamName, Is.EqualTo("cos"));
        Assert.That(e.Message, Does.Contain("same device"));
    }
}
