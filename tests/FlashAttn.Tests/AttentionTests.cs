using NUnit.Framework;
using TorchSharp;
using static TorchSharp.torch;

namespace FlashAttn.Tests;

/// <summary>Attention on CPU: the reference against an element-by-element definition, the packed and
/// varlen entry points, the modules, and argument validation.</summary>
public sealed class AttentionTests
{
    [SetUp]
    public void Seed() => manual_seed(TestContext.CurrentContext.Random.Next());

    [Test]
    public void WindowsPastEveryKeyBecomeNoWindow()
    {
        // (sq 7, sk 5): left >= sk or right >= sq reaches every key from every row, so -1 means the same mask; the
        // kernels take int32 windows, where 2^32 used to wrap to 0 (a causal-like mask nobody asked for).
        var q = randn(1, 7, 2, 8);
        var o = flash_attn.Options(q, 7, 5, 0, null, false, (1L << 32, 1L << 32), 0, null, false, false);
        Assert.That((o.WindowLeft, o.WindowRight), Is.EqualTo((-1L, -1L)));
        o = flash_attn.Options(q, 7, 5, 0, null, false, (5, 7), 0, null, false, false);
        Assert.That((o.WindowLeft, o.WindowRight), Is.EqualTo((-1L, -1L)));
        o = flash_attn.Options(q, 7, 5, 0, null, false, (4, 6), 0, null, false, false);
        Assert.That((o.WindowLeft, o.WindowRight), Is.EqualTo((4L, 6L)), "windows that still cut keys are kept");
        o = flash_attn.Options(q, 7, 5, 0, null, true, (long.MaxValue, 3), 0, null, false, false);
        Assert.That((o.WindowLeft, o.WindowRight), Is.EqualTo((-1L, 0L)), "causal stays right = 0");
        // and the same output as no window at all
        var k = randn(1, 5, 2, 8);
        var full = flash_attn.flash_attn_func(q, k, k);
        var huge = flash_attn.flash_attn_func(q, k, k, window_size: (1L << 40, 1L << 40));
        Assert.That(huge.allclose(full), Is.True);
    }

    [TestCase(7, 11, -1L), TestCase(11, 7, -1L), TestCase(9, 9, 3L)]
    public void CausalIsTheWindowWithRightZero(int sq, int sk, long left)
    {
        var q = randn(2, sq, 2, 8, dtype: ScalarType.Float64);
        var k = randn(2, sk, 2, 8, dtype: ScalarType.Float64);
        var v = randn(2, sk, 2, 8, dtype: ScalarType.Float64);
        var causal = flash_attn.flash_attn_func_with_lse(q, k, v, causal: true, window_size: left < 0 ? null : (left, -1));
        var window = flash_attn.flash_attn_func_with_lse(q, k, v, window_size: (left, 0));
        Assert.That(causal.output.eq(window.output).all().item<bool>(), Is.True);
        Assert.That(causal.softmax_lse.eq(window.softmax_lse).all().item<bool>(), Is.True);
        var expected = tensor(Oracle(q, k, v, 1 / Math.Sqrt(8), left, 0, 0, null));
        Assert.That(Tolerance.MaxAbsDiff(causal.output, expected), Is.LessThan(1e-10));
    }

    // softmax(scale q.k [softcap] [alibi] [mask]) v for one (batch, head), one row at a time, float64.
    internal static double[,,,] Oracle(Tensor q, Tensor k, Tensor v, double scale, long left, long right, double softcap, double[]? slopes)
    {
        long B = q.shape[0], Sq = q.shape[1], H = q.shape[2], D = q.shape[3], Sk = k.shape[1], Hk = k.shape[2];
        var qa = q.to(ScalarType.Float64).data<double>().ToArray();
        var ka = k.to(ScalarType.Float64).data<double>().ToArray();
        var va = v.to(ScalarType.Float64).data<double>().ToArray();
        var o = new double[B, Sq, H, D];
        for (long b = 0; b < B; b++)
        for (long h = 0; h < H; h++)
        {
            long hk = h / (H / Hk);
            for (long i = 0; i < Sq; i++)
            {
                var s = new double[Sk];
                double max = double.NegativeInfinity;
                for (long j = 0; j < Sk; j++)
                {
                    long shifted = i + Sk - Sq;
                    bool masked = (left >= 0 && j < shifted - left) || (right >= 0 && j > shifted + right);
                    if (masked) { s[j] = double.NegativeInfinity; continue; }
                    double dot = 0;
                    for (long d = 0; d < D; d++) dot += qa[((b * Sq + i) * H + h) * D + d] * ka[((b * Sk + j) * Hk + hk) * D + d];
                    dot *= scale;
                    if (softcap > 0) dot = softcap * Math.Tanh(dot / softcap);
                    if (slopes is not null) dot -= slopes[h] * Math.Abs(shifted - j);
                    s[j] = dot;
                    max = Math.Max(max, dot);
                }
                if (double.IsNegativeInfinity(max)) continue; // fully masked: 0
                double sum = s.Sum(x => Math.Exp(x - max));
                for (long d = 0; d < D; d++)
                {
                    double acc = 0;
                    for (long j = 0; j < Sk; j++) acc += Math.Exp(s[j] - max) / sum * va[((b * Sk + j) * Hk + hk) * D + d];
                    o[b, i, h, d] = acc;
                }
            }
        }
        return o;
    }

    [TestCase(5, 5, false, -1, -1, 0.0, false, 4, 4)]
    [TestCase(3, 7, true, -1, -1, 0.0, false, 4, 2)]   // causal bottom-right, sq < sk, GQA
    [TestCase(7, 3, true, -1, -1, 0.0, false, 2, 1)]   // causal with sq > sk: the first rows see nothing
    [TestCase(9, 9, false, 2, 1, 0.0, false, 2, 2)]    // sliding window
    [TestCase(6, 8, false, -1, -1, 0.5, true, 4, 4)]   // softcap + ALiBi
    public void ReferenceMatchesElementwiseDefinition(int sq, int sk, bool causal, int left, int right, double softcap, bool alibi, int h, int hk)
    {
        var q = randn(2, sq, h, 8, dtype: ScalarType.Float64);
        var k = randn(2, sk, hk, 8, dtype: ScalarType.Float64);
        var v = randn(2, sk, hk, 8, dtype: ScalarType.Float64);
        var slopes = alibi ? MHA.AlibiSlopes(h) : null;
        var (o, lse) = Reference.attention(q, k, v, 0.3, causal, (left, right), softcap, slopes);
        var expected = tensor(Oracle(q, k, v, 0.3, left, causal ? 0 : right, softcap, slopes?.to(ScalarType.Float64).data<double>().ToArray()));
        Assert.That(Tolerance.MaxAbsDiff(o, expected), Is.LessThan(1e-10));
        if (causal && sq > sk)
        {
            Assert.That(lse[.., .., 0].isposinf().all().item<bool>(), Is.True, "fully-masked rows have LSE +inf");
            Assert.That(o[.., 0].abs().max().item<double>(), Is.EqualTo(0.0), "and output 0");
        }
    }

    [Test]
    public void PackedAndVarlenEntryPointsAgreeWithTheDenseOne()
    {
        var qkv = randn(new long[] { 3, 6, 3, 2, 16 }, dtype: ScalarType.Float64);
        var dense = flash_attn.flash_attn_func(qkv[.., .., 0], qkv[.., .., 1], qkv[.., .., 2], causal: true);
        Assert.That(Tolerance.MaxAbsDiff(flash_attn.flash_attn_qkvpacked_func(qkv, causal: true), dense), Is.LessThan(1e-12));
        Assert.That(Tolerance.MaxAbsDiff(flash_attn.flash_attn_kvpacked_func(qkv[.., .., 0], qkv[.., .., 1..], causal: true), dense), Is.LessThan(1e-12));

        // Three sequences of lengths 2, 6, 4 packed: each equals the dense call on that sequence alone.
        var lengths = new[] { 2, 6, 4 };
        var parts = lengths.Select(l => randn(new long[] { l, 3, 2, 16 }, dtype: ScalarType.Float64)).ToArray();
        var packed = cat(parts, 0);
        var cu = tensor(new[] { 0, 2, 8, 12 }, dtype: ScalarType.Int32);
        var varlen = flash_attn.flash_attn_varlen_qkvpacked_func(packed, cu, 6, causal: true);
        for (int i = 0; i < 3; i++)
        {
            var p = parts[i].unsqueeze(0);
            var one = flash_attn.flash_attn_qkvpacked_func(p, causal: true)[0];
            var slice = varlen[TensorIndex.Slice(new[] { 0, 2, 8 }[i], new[] { 2, 8, 12 }[i])];
            Assert.That(Tolerance.MaxAbsDiff(slice, one), Is.LessThan(1e-12), $"sequence {i}");
        }
    }

    [Test]
    public void VarlenOffsetsAreChecked()
    {
        var q = randn(10, 2, 16);
        var k = randn(12, 2, 16);
        void Expect(string param, string fragment, int[] cuQ, int[] cuK, long maxQ = 10, long maxK = 12)
        {
            var e = Assert.Throws<ArgumentException>(() => flash_attn.flash_attn_varlen_func(
                q, k, k, tensor(cuQ, dtype: ScalarType.Int32), tensor(cuK, dtype: ScalarType.Int32), maxQ, maxK))!;
            Assert.That(e.ParamName, Is.EqualTo(param), e.Message);
            Assert.That(e.Message, Does.Contain(fragment));
        }
        // issue 15: decreasing offsets used to return an output as if nothing were wrong
        Expect("cu_seqlens_q", "never decrease", new[] { 0, 6, 3, 10 }, new[] { 0, 6, 3, 12 });
        Expect("cu_seqlens_k", "never decrease", new[] { 0, 3, 6, 10 }, new[] { 0, 6, 3, 12 });
        Expect("cu_seqlens_q", "start at 0", new[] { 1, 6, 10 }, new[] { 0, 6, 12 });
        Expect("cu_seqlens_q", "end at the packed length", new[] { 0, 6, 9 }, new[] { 0, 6, 12 });
        Expect("cu_seqlens_k", "end at the packed length", new[] { 0, 6, 10 }, new[] { 0, 6, 13 });
        Expect("max_seqlen_q", "more than max_seqlen_q", new[] { 0, 6, 10 }, new[] { 0, 6, 12 }, maxQ: 5);
        Expect("max_seqlen_k", "more than max_seqlen_k", new[] { 0, 6, 10 }, new[] { 0, 6, 12 }, maxK: 5);
        Expect("cu_seqlens_k", "same length", new[] { 0, 6, 10 }, new[] { 0, 2, 6, 12 });
        var ok = flash_attn.flash_attn_varlen_func(q, k, k, tensor(new[] { 0, 6, 10 }, dtype: ScalarType.Int32),
                                                   tensor(new[] { 0, 6, 12 }, dtype: ScalarType.Int32), 6, 6);
        Assert.That(ok.isfinite().all().item<bool>(), Is.True);
    }

    [TestCase(false, -1, -1), TestCase(true, -1, -1), TestCase(false, 3, 1)]
    public void ReferencePathReturnsTheDropoutMaskItApplied(bool causal, long left, long right)
    {
        // issue 15: on CPU tensors return_dropout_mask returned no mask, while the kernels return one
        const double p = 0.3;
        long B = 2, Sq = 9, Sk = 13, H = 3, D = 16;
        var q = randn(B, Sq, H, D, dtype: ScalarType.Float64);
        var k = randn(B, Sk, H, D, dtype: ScalarType.Float64);
        var v = randn(B, Sk, H, D, dtype: ScalarType.Float64);
        manual_seed(7);
        var r = flash_attn.flash_attn_func_with_lse(q, k, v, dropout_p: p, causal: causal, window_size: (left, right), return_dropout_mask: true);
        Assert.That(r.dropout_mask, Is.Not.Null);
        var mask = r.dropout_mask!;
        Assert.That(mask.dtype, Is.EqualTo(ScalarType.Byte));
        Assert.That(mask.shape, Is.EqualTo(new[] { B, H, Sq, Sk }));

        // visible: j in [i + Sk - Sq - left, i + Sk - Sq + right] (causal: right = 0), bounds of -1 unlimited
        if (causal) right = 0;
        var i = arange(Sq).view(Sq, 1) + (Sk - Sq);
        var j = arange(Sk).view(1, Sk);
        var visible = ones(Sq, Sk, dtype: ScalarType.Bool);
        if (left >= 0) visible = visible.logical_and(j.ge(i - left));
        if (right >= 0) visible = visible.logical_and(j.le(i + right));
        Assert.That(mask.to(ScalarType.Bool).logical_and(visible.logical_not()).any().item<bool>(), Is.False, "0 where masked out");
        double n = visible.sum().item<long>() * B * H, kept = mask.to(ScalarType.Float64).sum().item<double>();
        Assert.That(Math.Abs(kept - n * (1 - p)), Is.LessThan(5 * Math.Sqrt(n * p * (1 - p))), $"kept {kept} of {n} visible");

        // the output is attention with exactly that mask applied, scaled by 1 / (1 - p), in float64
        var scores = einsum("bihd,bjhd->bhij", q, k) / Math.Sqrt(D);
        var probs = scores.masked_fill(visible.logical_not(), double.NegativeInfinity).softmax(-1);
        var expected = einsum("bhij,bjhd->bihd", probs * mask.to(ScalarType.Float64) / (1 - p), v);
        Assert.That(Tolerance.MaxAbsDiff(r.output, expected), Is.LessThan(1e-12));

        manual_seed(7);
        var again = flash_attn.flash_attn_func_with_lse(q, k, v, dropout_p: p, causal: causal, window_size: (left, right), return_dropout_mask: true);
        Assert.That(again.dropout_mask!.eq(mask).all().item<bool>(), Is.True, "the same seed, the same mask");
        var none = flash_attn.flash_attn_func_with_lse(q, k, v, causal: causal, window_size: (left, right), return_dropout_mask: true);
        Assert.That(none.dropout_mask!.to(ScalarType.Bool).eq(visible.expand(B, H, Sq, Sk)).all().item<bool>(), Is.True, "without dropout every visible element is kept");
    }

    [Test]
    public void VarlenDropoutDrawsEachSequencesKernelStream()
    {
        // the kernels key sequence b's dropout by b: the first sequence of a pack drops what the dense call drops
        var q = randn(11, 2, 8, dtype: ScalarType.Float64);
        var cu = tensor(new[] { 0, 5, 11 }, dtype: ScalarType.Int32);
        manual_seed(3);
        var packed = flash_attn.flash_attn_varlen_func(q, q, q, cu, cu, 6, 6, dropout_p: 0.4, causal: true);
        manual_seed(3);
        var first = flash_attn.flash_attn_func(q[..5].unsqueeze(0), q[..5].unsqueeze(0), q[..5].unsqueeze(0), dropout_p: 0.4, causal: true);
        Assert.That(Tolerance.MaxAbsDiff(packed[..5], first[0]), Is.LessThan(1e-12));
        Assert.That(Tolerance.MaxAbsDiff(packed[..5], flash_attn.flash_attn_func(q[..5].unsqueeze(0), q[..5].unsqueeze(0), q[..5].unsqueeze(0), causal: true)[0]),
                    Is.GreaterThan(1e-3), "dropout applied");
    }

    [Test]
    public void MhaMatchesAHandWrittenAttention()
    {
        using var mha = new MHA(32, 4, num_heads_kv: 2, causal: true, dtype: ScalarType.Float64);
        var x = randn(2, 5, 32, dtype: ScalarType.Float64, requires_grad: true);
        var y = mha.forward(x);
        var p = mha.named_parameters().ToDictionary(t => t.name, t => t.parameter);
        Assert.That(p.Keys, Is.EquivalentTo(new[] { "Wqkv.weight", "Wqkv.bias", "out_proj.weight", "out_proj.bias" }));
        var qkv = nn.functional.linear(x, p["Wqkv.weight"], p["Wqkv.bias"]);
        var q = qkv[.., .., ..32].view(2, 5, 4, 8).permute(0, 2, 1, 3);
        var k = qkv[.., .., 32..48].view(2, 5, 2, 8).permute(0, 2, 1, 3).repeat_interleave(2, dim: 1);
        var v = qkv[.., .., 48..].view(2, 5, 2, 8).permute(0, 2, 1, 3).repeat_interleave(2, dim: 1);
        var scores = q.matmul(k.transpose(-1, -2)) / Math.Sqrt(8);
        scores = scores.masked_fill(ones(5, 5, dtype: ScalarType.Bool).triu(1), double.NegativeInfinity);
        var o = scores.softmax(-1).matmul(v).permute(0, 2, 1, 3).reshape(2, 5, 32);
        var expected = nn.functional.linear(o, p["out_proj.weight"], p["out_proj.bias"]);
        Assert.That(Tolerance.MaxAbsDiff(y, expected), Is.LessThan(1e-12));
        y.sum().backward();
        Assert.That(x.grad, Is.Not.Null);

        using var plain = new MHA(32, 4, num_heads_kv: 2, causal: true, use_flash_attn: false, dtype: ScalarType.Float64);
        plain.load_state_dict(mha.state_dict());
        Assert.That(Tolerance.MaxAbsDiff(plain.forward(x), y), Is.LessThan(1e-12), "use_flash_attn off and on agree");
    }

    [Test]
    public void MhaWithRotaryRotatesQAndK()
    {
        using var mha = new MHA(32, 4, rotary_emb_dim: 8, dtype: ScalarType.Float64);
        var x = randn(1, 6, 32, dtype: ScalarType.Float64);
        var y = mha.forward(x);
        var p = mha.named_parameters().ToDictionary(t => t.name, t => t.parameter);
        var qkv = nn.functional.linear(x, p["Wqkv.weight"], p["Wqkv.bias"]).view(1, 6, 3, 4, 8);
        var freqs = outer(arange(6, dtype: ScalarType.Float64), 1.0 / pow(10000.0, arange(0, 8, 2, dtype: ScalarType.Float64) / 8));
        var q = Reference.rotary(qkv[.., .., 0], freqs.cos(), freqs.sin());
        var k = Reference.rotary(qkv[.., .., 1], freqs.cos(), freqs.sin());
        var (o, _) = Reference.attention(q, k, qkv[.., .., 2]);
        var expected = nn.functional.linear(o.reshape(1, 6, 32), p["out_proj.weight"], p["out_proj.bias"]);
        Assert.That(Tolerance.MaxAbsDiff(y, expected), Is.LessThan(1e-6));
    }

    [Test]
    public void AlibiSlopesFollowThePaper()
    {
        var s8 = MHA.AlibiSlopes(8).data<float>().ToArray();
        Assert.That(s8, Is.EqualTo(Enumerable.Range(1, 8).Select(i => (float)Math.Pow(2, -i)).ToArray()).Within(1e-7));
        var s6 = MHA.AlibiSlopes(6).data<float>().ToArray();
        Assert.That(s6.Length, Is.EqualTo(6));
        Assert.That(s6[..4], Is.EqualTo(MHA.AlibiSlopes(4).data<float>().ToArray()));
    }

    [Test]
    public void BadArgumentsNameTheArgument()
    {
        var q = randn(2, 4, 4, 16);
        var k = randn(2, 6, 2, 16);
        void Expect(string param, string fragment, TestDelegate call)
        {
            var e = Assert.Throws<ArgumentException>(call)!;
            Assert.That(e.ParamName, Is.EqualTo(param), e.Message);
            Assert.That(e.Message, Does.Contain(fragment));
        }
        Expect("q", "float16, bfloat16, float32 or float64", () => flash_attn.flash_attn_func(q.to(ScalarType.Int64), k, k));
        Expect("k", "q's dtype", () => flash_attn.flash_attn_func(q, k.to(ScalarType.Float64), k.to(ScalarType.Float64)));
        Expect("q", "4-D", () => flash_attn.flash_attn_func(q[0], k, k));
        Expect("k", "multiple of k/v's heads", () => flash_attn.flash_attn_func(q, randn(2, 6, 3, 16), randn(2, 6, 3, 16)));
        Expect("k", "head dimension", () => flash_attn.flash_attn_func(q, randn(2, 6, 2, 8), randn(2, 6, 2, 8)));
        Expect("q", "between 1 and 256", () => flash_attn.flash_attn_func(randn(1, 2, 1, 264), randn(1, 2, 1, 264), randn(1, 2, 1, 264)));
        Expect("v", "k's shape", () => flash_attn.flash_attn_func(q, k, randn(2, 5, 2, 16)));
        Expect("k", "batch", () => flash_attn.flash_attn_func(q, randn(1, 6, 2, 16), randn(1, 6, 2, 16)));
        Expect("q", "contiguous last dimension", () => flash_attn.flash_attn_func(randn(2, 4, 16, 4).transpose(2, 3), k, k));
        Expect("dropout_p", "[0, 1)", () => flash_attn.flash_attn_func(q, k, k, dropout_p: 1.0));
        Expect("softcap", ">= 0", () => flash_attn.flash_attn_func(q, k, k, softcap: -1));
        Expect("window_size", ">= -1", () => flash_attn.flash_attn_func(q, k, k, window_size: (-2, 0)));
        Expect("alibi_slopes", "float32", () => flash_attn.flash_attn_func(q, k, k, alibi_slopes: ones(4, dtype: ScalarType.Float64)));
        Expect("alibi_slopes", "(nheads = 4)", () => flash_attn.flash_attn_func(q, k, k, alibi_slopes: ones(3)));
        Expect("qkv", "(batch, seqlen, 3, nheads, headdim)", () => flash_attn.flash_attn_qkvpacked_func(randn(new long[] { 2, 4, 2, 4, 16 })));
        Expect("cu_seqlens_q", "int32", () => flash_attn.flash_attn_varlen_func(q[0], k[0], k[0], tensor(new[] { 0L, 4L }), tensor(new[] { 0, 6 }), 4, 6));
        Expect("max_seqlen_q", "> 0", () => flash_attn.flash_attn_varlen_func(q[0], k[0], k[0], tensor(new[] { 0, 4 }), tensor(new[] { 0, 6 }), 0, 6));
        Expect("num_heads_kv", "multiple", () => new MHA(32, 4, num_heads_kv: 3));
    }
}
