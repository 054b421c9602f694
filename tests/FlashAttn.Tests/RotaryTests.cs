using NUnit.Framework;
using TorchSharp;
using static TorchSharp.torch;

namespace FlashAttn.Tests;

/// <summary>Rotary embedding on CPU: the reference against an element-by-element oracle, autograd,
/// in-place, varlen, and argument validation.</summary>
public sealed class RotaryTests
{
    [SetUp]
    public void Seed() => manual_seed(TestContext.CurrentContext.Random.Next());

    // The definition, one element at a time, in float64: independent of Reference.rotary's tensor code.
    internal static double[,,,] Oracle(Tensor x, Tensor cos, Tensor sin, bool interleaved, long[] offsets, bool conjugate = false)
    {
        long B = x.shape[0], S = x.shape[1], H = x.shape[2], D = x.shape[3], half = cos.shape[1];
        var xs = x.to(ScalarType.Float64).data<double>().ToArray();
        var cs = cos.to(ScalarType.Float64).data<double>().ToArray();
        var sn = sin.to(ScalarType.Float64).data<double>().ToArray();
        var o = new double[B, S, H, D];
        for (long b = 0; b < B; b++)
        for (long s = 0; s < S; s++)
        for (long h = 0; h < H; h++)
        {
            long baseIdx = ((b * S + s) * H + h) * D, pos = s + offsets[b];
            for (long d = 0; d < D; d++) o[b, s, h, d] = xs[baseIdx + d];
            for (long i = 0; i < half; i++)
            {
                bool inRange = pos >= 0 && pos < cos.shape[0];
                double c = inRange ? cs[pos * half + i] : 1, si = inRange ? sn[pos * half + i] : 0;
                if (conjugate) si = -si;
                long i1 = interleaved ? 2 * i : i, i2 = interleaved ? 2 * i + 1 : i + half;
                double a = xs[baseIdx + i1], bb = xs[baseIdx + i2];
                o[b, s, h, i1] = a * c - bb * si;
                o[b, s, h, i2] = a * si + bb * c;
            }
        }
        return o;
    }

    internal static (Tensor cos, Tensor sin) CosSin(long seqlenRo, long rotaryDim, ScalarType dtype = ScalarType.Float32, Device? device = null)
    {
        var inv = 1.0 / pow(10000.0, arange(0, rotaryDim, 2, dtype: ScalarType.Float64) / rotaryDim);
        var freqs = outer(arange(seqlenRo, dtype: ScalarType.Float64), inv);
        return (freqs.cos().to(dtype, device ?? CPU), freqs.sin().to(dtype, device ?? CPU));
    }

    [TestCase(false, 8, 8), TestCase(true, 8, 8), TestCase(false, 10, 6), TestCase(true, 11, 4)]
    public void ReferenceMatchesElementwiseDefinition(bool interleaved, int headdim, int rotaryDim)
    {
        var x = randn(2, 5, 3, headdim, dtype: ScalarType.Float64);
        var (cos, sin) = CosSin(9, rotaryDim, ScalarType.Float64);
        var offsets = new long[] { 0, 3 };
        var got = Reference.rotary(x, cos, sin, interleaved, seqlen_offsets: tensor(offsets));
        var expected = tensor(Oracle(x, cos, sin, interleaved, offsets));
        Assert.That(Tolerance.MaxAbsDiff(got, expected), Is.LessThan(1e-12));
        // conjugate rotates back: the backward of an orthogonal map is its transpose
        var back = Reference.rotary(got, cos, sin, interleaved, conjugate: true, seqlen_offsets: tensor(offsets));
        Assert.That(Tolerance.MaxAbsDiff(back, x), Is.LessThan(1e-12));
    }

    [Test]
    public void PositionsOutsideTheTableAreNotRotated()
    {
        var x = randn(1, 4, 2, 8, dtype: ScalarType.Float64);
        var (cos, sin) = CosSin(4, 8, ScalarType.Float64);
        var got = Reference.rotary(x, cos, sin, seqlen_offsets: tensor(new long[] { 2 }));
        var expected = tensor(Oracle(x, cos, sin, false, new long[] { 2 }));
        Assert.That(Tolerance.MaxAbsDiff(got, expected), Is.LessThan(1e-12));
        Assert.That(Tolerance.MaxAbsDiff(got[0, 2..], x[0, 2..]), Is.EqualTo(0.0), "positions 4 and 5 pass through");
    }

    [Test]
    public void ApplyRotaryEmbOnCpuUsesTheReferenceWithGradients()
    {
        var x = randn(2, 7, 3, 16, dtype: ScalarType.Float64, requires_grad: true);
        var (cos, sin) = CosSin(12, 12, ScalarType.Float64);
        var y = flash_attn.apply_rotary_emb(x, cos, sin, seqlen_offset: 5);
        var g = randn_like(y);
        y.backward(new[] { g });
        var xr = x.detach().clone().requires_grad_(true);
        var yr = Reference.rotary(xr, cos, sin, seqlen_offset: 5);
        yr.backward(new[] { g });
        Assert.That(Tolerance.MaxAbsDiff(y, yr), Is.LessThan(1e-12));
        Assert.That(Tolerance.MaxAbsDiff(x.grad!, xr.grad!), Is.LessThan(1e-12));
    }

    [Test]
    public void InplaceWritesIntoXAndReturnsIt()
    {
        var x = randn(2, 3, 2, 8);
        var expected = Reference.rotary(x, CosSin(3, 8).cos, CosSin(3, 8).sin);
        var (cos, sin) = CosSin(3, 8);
        var y = flash_attn.apply_rotary_emb(x, cos, sin, inplace: true);
        Assert.That(y.Handle == x.Handle || Tolerance.MaxAbsDiff(y, x) == 0, Is.True);
        Assert.That(Tolerance.MaxAbsDiff(x, expected), Is.LessThan(1e-6));
    }

    [Test]
    public void VarlenEqualsEachSequenceOnItsOwn()
    {
        var lengths = new[] { 3, 1, 6 };
        var (cos, sin) = CosSin(10, 8);
        var seqs = lengths.Select(l => randn(1, l, 2, 12)).ToArray();
        var packed = cat(seqs.Select(s => s[0]).ToArray(), 0);
        var cu = tensor(new[] { 0, 3, 4, 10 }, dtype: ScalarType.Int32);
        var offsets = tensor(new long[] { 2, 0, 4 });
        var got = flash_attn.apply_rotary_emb(packed, cos, sin, interleaved: true, seqlen_offsets: offsets, cu_seqlens: cu, max_seqlen: 6);
        var expected = cat(seqs.Select((s, i) => Reference.rotary(s, cos, sin, true, seqlen_offset: offsets[i].item<long>())[0]).ToArray(), 0);
        Assert.That(Tolerance.MaxAbsDiff(got, expected), Is.LessThan(1e-6));
    }

    [Test]
    public void VarlenOffsetsAndSeqlenOffsetsAreChecked()
    {
        var x = randn(10, 2, 8);
        var (cos, sin) = CosSin(12, 8);
        void Expect(string param, string fragment, int[] cu, long maxSeqlen = 10, long[]? offsets = null)
        {
            var e = Assert.Throws<ArgumentException>(() => flash_attn.apply_rotary_emb(
                x, cos, sin, seqlen_offsets: offsets is null ? null : tensor(offsets), cu_seqlens: tensor(cu, dtype: ScalarType.Int32),
                max_seqlen: maxSeqlen))!;
            Assert.That(e.ParamName, Is.EqualTo(param), e.Message);
            Assert.That(e.Message, Does.Contain(fragment));
        }
        Expect("cu_seqlens", "never decrease", new[] { 0, 6, 3, 10 });
        Expect("cu_seqlens", "start at 0", new[] { 2, 6, 10 });
        Expect("cu_seqlens", "end at the packed length", new[] { 0, 6, 8 });
        Expect("max_seqlen", "more than max_seqlen", new[] { 0, 6, 10 }, maxSeqlen: 4);
        // positions past the cos/sin table: sequence 1 (4 tokens) from position 9 needs 13 positions of 12
        Expect("seqlen_offsets", "seqlen_offsets[1] (9)", new[] { 0, 6, 10 }, offsets: new long[] { 0, 9 });
        Expect("seqlen_offsets", "seqlen_offsets[0] (-1)", new[] { 0, 6, 10 }, offsets: new long[] { -1, 0 });
        var dense = Assert.Throws<ArgumentException>(() => flash_attn.apply_rotary_emb(randn(2, 4, 2, 8), cos, sin, seqlen_offsets: tensor(new[] { 8, 9 })))!;
        Assert.That(dense.ParamName, Is.EqualTo("seqlen_offsets"));
        Assert.That(dense.Message, Does.Contain("seqlen_offsets[1] (9)"));
        var ok = flash_attn.apply_rotary_emb(x, cos, sin, seqlen_offsets: tensor(new long[] { 6, 8 }), cu_seqlens: tensor(new[] { 0, 6, 10 }, dtype: ScalarType.Int32), max_seqlen: 6);
        Assert.That(ok.isfinite().all().item<bool>(), Is.True);
    }

    [Test]
    public void BadArgumentsNameTheArgument()
    {
        var x = randn(2, 4, 3, 16);
        var (cos, sin) = CosSin(8, 8);
        void Expect(string param, string fragment, TestDelegate call)
        {
            var e = Assert.Throws<ArgumentException>(call)!;
            Assert.That(e.ParamName, Is.EqualTo(param));
            Assert.That(e.Message, Does.Contain(fragment));
        }
        Expect("x", "float16, bfloat16, float32 or float64", () => flash_attn.apply_rotary_emb(x.to(ScalarType.Int32), cos, sin));
        Expect("x", "4-D", () => flash_attn.apply_rotary_emb(x[0], cos, sin));
        Expect("x", "contiguous last dimension", () => flash_attn.apply_rotary_emb(randn(2, 4, 16, 3).transpose(2, 3), cos, sin));
        Expect("cos", "rotary_dim", () => flash_attn.apply_rotary_emb(x, CosSin(8, 40).cos, CosSin(8, 40).sin));
        Expect("sin", "cos's shape", () => flash_attn.apply_rotary_emb(x, cos, sin[..4]));
        Expect("cos", "x's dtype", () => flash_attn.apply_rotary_emb(x.to(ScalarType.BFloat16), cos.to(ScalarType.Float16), sin.to(ScalarType.Float16)));
        Expect("cos", "seqlen_offset", () => flash_attn.apply_rotary_emb(x, cos, sin, seqlen_offset: 5));
        Expect("seqlen_offset", ">= 0", () => flash_attn.apply_rotary_emb(x, cos, sin, seqlen_offset: -1));
        Expect("seqlen_offsets", "batch (2) entries", () => flash_attn.apply_rotary_emb(x, cos, sin, seqlen_offsets: tensor(new[] { 1L })));
        Expect("cu_seqlens", "int32", () => flash_attn.apply_rotary_emb(x[0], cos, sin, cu_seqlens: tensor(new[] { 0L, 4L }), max_seqlen: 4));
        Expect("max_seqlen", "max_seqlen", () => flash_attn.apply_rotary_emb(x[0], cos, sin, cu_seqlens: tensor(new[] { 0, 4 })));
    }
}
