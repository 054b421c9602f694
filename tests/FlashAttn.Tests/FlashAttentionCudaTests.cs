using NUnit.Framework;
using TorchSharp;
using static TorchSharp.torch;

namespace FlashAttn.Tests;

/// <summary>
/// The FlashAttention kernels against the float64 reference with the flash-attn rule (error of out,
/// LSE and every gradient at most twice that of the same reference computed in the inputs' low
/// precision), over the head dims and sequence lengths of flash-attn's own tests and every option.
/// </summary>
[Category(Gpu.Category)]
public sealed class FlashAttentionCudaTests
{
    [SetUp]
    public void Seed() => manual_seed(TestContext.CurrentContext.Random.Next());

    private static readonly int[] HeadDims = { 32, 40, 59, 64, 80, 96, 111, 128, 160, 192, 256 };
    private static readonly (int sq, int sk)[] Lengths = { (1, 1), (97, 97), (128, 128), (200, 200), (512, 512), (1025, 1025), (2048, 2048), (113, 203), (200, 128), (1, 239), (1025, 97) };

    private static IEnumerable<TestCaseData> Cases()
    {
        int i = 0;
        foreach (var d in HeadDims)
        foreach (var (sq, sk) in Lengths)
        {
            // Cycle the options over the grid so every head dim meets every option at some length.
            var dtype = i % 3 == 2 ? ScalarType.Float16 : ScalarType.BFloat16;
            bool causal = i % 2 == 1;
            string extra = (i % 5) switch { 0 => "plain", 1 => "gqa", 2 => "window", 3 => "softcap", _ => "alibi" };
            i++;
            if (d >= 192 && sq * (long)sk > 600_000) continue; // keeps the float64 reference's memory modest
            yield return new TestCaseData(dtype, d, sq, sk, causal, extra).SetName($"Attn_{dtype}_d{d}_q{sq}_k{sk}_{(causal ? "causal" : "full")}_{extra}");
        }
    }

    [TestCaseSource(nameof(Cases))]
    public void ForwardAndBackwardMatchReference(ScalarType dtype, int d, int sq, int sk, bool causal, string extra)
    {
        var dev = Gpu.Require();
        const int batch = 2;
        int h = 4, hk = extra == "gqa" ? 2 : 4;
        (long, long)? window = extra == "window" ? (37, 11) : null;
        double softcap = extra == "softcap" ? 2.5 : 0;
        var slopes = extra == "alibi" ? MHA.AlibiSlopes(h, dev) : null;
        var q = randn(batch, sq, h, d, dtype: dtype, device: dev).requires_grad_(true);
        var k = randn(batch, sk, hk, d, dtype: dtype, device: dev).requires_grad_(true);
        var v = randn(batch, sk, hk, d, dtype: dtype, device: dev).requires_grad_(true);
        var r = flash_attn.flash_attn_func_with_lse(q, k, v, causal: causal, window_size: window, softcap: softcap, alibi_slopes: slopes);
        var g = randn_like(r.output);
        r.output.backward(new[] { g });

        var (o64, lse64, grads64) = Ref(q, k, v, g, causal, window, softcap, slopes, ScalarType.Float64);
        var (oLow, lseLow, gradsLow) = Ref(q, k, v, g, causal, window, softcap, slopes, dtype);
        Tolerance.AssertClose(r.output, oLow, o64, "out");
        AssertLse(r.softmax_lse, lseLow, lse64);
        Tolerance.AssertClose(q.grad!, gradsLow[0], grads64[0], "dq", atol: AccumulationFloor(g, v, k, d));
        Tolerance.AssertClose(k.grad!, gradsLow[1], grads64[1], "dk", atol: AccumulationFloor(g, v, q, d));
        Tolerance.AssertClose(v.grad!, gradsLow[2], grads64[2], "dv");
    }

    /// <summary>
    /// dq = scale · P ∘ (dP − D) · K with dP = dO·Vᵀ and D = rowsum(dO ∘ O): where one key is visible, P = 1 and O = V, so
    /// dP − D is 0 in exact arithmetic and the low-precision reference, whose D and dP are the same rounded products, gets
    /// exactly 0 too; the kernel forms dP with tensor-core fp32 accumulation and D in another order, leaving a
    /// cancellation residue of about d float32 ulps of |dO|·|V|. This floor is that residue carried through scale · K
    /// (or Q for dk): about 2e-4 at d = 256 against gradients of order 1 (the q1_k1 fp16 cases needed it on the H100).
    /// </summary>
    internal static double AccumulationFloor(Tensor dO, Tensor v, Tensor other, int d)
    {
        double Max(Tensor t) => t.abs().max().to(ScalarType.Float64).item<double>();
        return d * Math.Pow(2, -23) * Max(dO) * Max(v) * Max(other) / Math.Sqrt(d);
    }

    internal static (Tensor o, Tensor lse, Tensor[] grads) Ref(Tensor q, Tensor k, Tensor v, Tensor g, bool causal, (long, long)? window,
        double softcap, Tensor? slopes, ScalarType compute, Tensor? mask = null, double p = 0, double? scale = null)
    {
        var ins = new[] { q, k, v }.Select(t => t.detach().to(compute == ScalarType.Float64 ? ScalarType.Float64 : t.dtype).requires_grad_(true)).ToArray();
        var (o, lse) = Reference.attention(ins[0], ins[1], ins[2], scale, causal, window, softcap, slopes, p, mask, compute_dtype: compute);
        o.backward(new[] { g.to(o.dtype) });
        return (o, lse, ins.Select(t => t.grad!).ToArray());
    }

    // LSE is float32 from both; +inf rows must agree exactly, finite rows follow the rule.
    private static void AssertLse(Tensor lse, Tensor low, Tensor exact)
    {
        var inf = exact.isposinf();
        Assert.That(lse.isposinf().eq(inf).all().item<bool>(), Is.True, "LSE: +inf exactly on the fully-masked rows");
        Tolerance.AssertClose(lse.masked_fill(inf, 0), low.masked_fill(inf, 0), exact.masked_fill(inf, 0), "lse");
    }

    [TestCase(ScalarType.BFloat16, 64, false), TestCase(ScalarType.Float16, 128, true), TestCase(ScalarType.BFloat16, 80, true)]
    public void DropoutMaskKeepRateAndGradients(ScalarType dtype, int d, bool causal)
    {
        var dev = Gpu.Require();
        const double p = 0.17;
        var q = randn(2, 257, 4, d, dtype: dtype, device: dev).requires_grad_(true);
        var k = randn(2, 300, 4, d, dtype: dtype, device: dev).requires_grad_(true);
        var v = randn(2, 300, 4, d, dtype: dtype, device: dev).requires_grad_(true);
        manual_seed(1234);
        var r = flash_attn.flash_attn_func_with_lse(q, k, v, dropout_p: p, causal: causal, return_dropout_mask: true);
        Assert.That(r.dropout_mask, Is.Not.Null);
        var mask = r.dropout_mask!;
        if (!causal)
        {
            // keep rate 1 - p within 5 binomial standard deviations
            double n = mask.numel(), kept = mask.to(ScalarType.Float64).sum().item<double>();
            double sigma = Math.Sqrt(n * p * (1 - p));
            Assert.That(Math.Abs(kept - n * (1 - p)), Is.LessThan(5 * sigma), $"kept {kept} of {n}");
        }
        var g = randn_like(r.output);
        r.output.backward(new[] { g });
        var (o64, _, g64) = Ref(q, k, v, g, causal, null, 0, null, ScalarType.Float64, mask, p);
        var (oLow, _, gLow) = Ref(q, k, v, g, causal, null, 0, null, dtype, mask, p);
        Tolerance.AssertClose(r.output, oLow, o64, "dropout out (replayed mask)");
        Tolerance.AssertClose(q.grad!, gLow[0], g64[0], "dropout dq");
        Tolerance.AssertClose(k.grad!, gLow[1], g64[1], "dropout dk");
        Tolerance.AssertClose(v.grad!, gLow[2], g64[2], "dropout dv");

        // the same seed gives the same mask
        manual_seed(1234);
        var again = flash_attn.flash_attn_func_with_lse(q.detach(), k.detach(), v.detach(), dropout_p: p, causal: causal, return_dropout_mask: true);
        Assert.That(Tolerance.MaxAbsDiff(again.output, r.output), Is.EqualTo(0.0), "reproducible from the seed");
    }

    // d64: 64-key blocks, d128: the dropout variant's 32-key blocks; the window cuts keys on both sides
    [TestCase(ScalarType.BFloat16, 64, true, -1, -1), TestCase(ScalarType.Float16, 128, false, 37, 11), TestCase(ScalarType.BFloat16, 80, false, -1, -1)]
    public void ReferencePathDropoutMaskEqualsTheKernels(ScalarType dtype, int d, bool causal, long left, long right)
    {
        var dev = Gpu.Require();
        const double p = 0.17;
        var q = randn(2, 257, 4, d, dtype: dtype, device: dev);
        var k = randn(2, 300, 4, d, dtype: dtype, device: dev);
        var v = randn(2, 300, 4, d, dtype: dtype, device: dev);
        (long, long) window = (left, right);
        manual_seed(99);
        var gpu = flash_attn.flash_attn_func_with_lse(q, k, v, dropout_p: p, causal: causal, window_size: window, return_dropout_mask: true);
        manual_seed(99);
        var cpu = flash_attn.flash_attn_func_with_lse(q.cpu().to(ScalarType.Float32), k.cpu().to(ScalarType.Float32), v.cpu().to(ScalarType.Float32),
                                                      dropout_p: p, causal: causal, window_size: window, return_dropout_mask: true);
        Assert.That(gpu.dropout_mask!.cpu().eq(cpu.dropout_mask!).all().item<bool>(), Is.True, "the same seed gives the same bytes on both paths");
        // the reference path on the GPU builds the mask there (int64 tensor Philox on the device): the same bytes again
        Backend.ForceReference = true;
        try
        {
            manual_seed(99);
            var refGpu = flash_attn.flash_attn_func_with_lse(q, k, v, dropout_p: p, causal: causal, window_size: window, return_dropout_mask: true);
            Assert.That(refGpu.dropout_mask!.device_type, Is.EqualTo(DeviceType.CUDA));
            Assert.That(refGpu.dropout_mask!.eq(gpu.dropout_mask!).all().item<bool>(), Is.True, "reference path on the GPU");
        }
        finally
        {
            Backend.ForceReference = false;
        }
        var none = flash_attn.flash_attn_func_with_lse(q, k, v, causal: causal, window_size: window, return_dropout_mask: true);
        var noneCpu = flash_attn.flash_attn_func_with_lse(q.cpu().to(ScalarType.Float32), k.cpu().to(ScalarType.Float32), v.cpu().to(ScalarType.Float32),
                                                          causal: causal, window_size: window, return_dropout_mask: true);
        Assert.That(none.dropout_mask!.cpu().eq(noneCpu.dropout_mask!).all().item<bool>(), Is.True, "without dropout: the visible elements");
    }

    // Causal reaches the kernels as window_right = 0 (flashattn.h has no other way to say it): causal and the window
    // (-1, 0) are the same call, bit for bit, forward and backward; causal with a window keeps its left side.
    [TestCase(ScalarType.BFloat16, 59, 113, 203, -1L), TestCase(ScalarType.Float16, 128, 200, 128, -1L), TestCase(ScalarType.BFloat16, 64, 97, 97, 23L)]
    public void CausalIsTheWindowWithRightZero(ScalarType dtype, int d, int sq, int sk, long left)
    {
        var dev = Gpu.Require();
        var q = randn(2, sq, 4, d, dtype: dtype, device: dev);
        var k = randn(2, sk, 2, d, dtype: dtype, device: dev);
        var v = randn(2, sk, 2, d, dtype: dtype, device: dev);
        var g = randn(2, sq, 4, d, dtype: dtype, device: dev);
        (Tensor o, Tensor lse, Tensor[] grads) Run(bool causal, (long, long)? window)
        {
            var ins = new[] { q, k, v }.Select(t => t.detach().clone().requires_grad_(true)).ToArray();
            var r = flash_attn.flash_attn_func_with_lse(ins[0], ins[1], ins[2], causal: causal, window_size: window, deterministic: true);
            r.output.backward(new[] { g });
            return (r.output, r.softmax_lse, ins.Select(t => t.grad!).ToArray());
        }
        var causal = Run(true, left < 0 ? null : (left, -1));
        var window = Run(false, (left, 0));
        Assert.That(causal.o.eq(window.o).all().item<bool>(), Is.True, "out");
        Assert.That(causal.lse.eq(window.lse).all().item<bool>(), Is.True, "lse (+inf where a row sees no key)");
        for (int i = 0; i < 3; i++)
            Assert.That(causal.grads[i].eq(window.grads[i]).all().item<bool>(), Is.True, $"grad {"qkv"[i]}");
        // and it is the causal reference
        var (o64, _, _) = Ref(q, k, v, g, true, left < 0 ? null : (left, -1), 0, null, ScalarType.Float64);
        var (oLow, _, _) = Ref(q, k, v, g, true, left < 0 ? null : (left, -1), 0, null, dtype);
        Tolerance.AssertClose(causal.o, oLow, o64, "out");
    }

    [Test]
    public void VarlenOffsetsAreCheckedOnTheDevice()
    {
        var dev = Gpu.Require();
        var q = randn(10, 2, 64, dtype: ScalarType.BFloat16, device: dev);
        var bad = tensor(new[] { 0, 6, 3, 10 }, dtype: ScalarType.Int32, device: dev);
        var e = Assert.Throws<ArgumentException>(() => flash_attn.flash_attn_varlen_func(q, q, q, bad, bad, 10, 10))!;
        Assert.That(e.ParamName, Is.EqualTo("cu_seqlens_q"));
        Assert.That(e.Message, Does.Contain("never decrease"));
        var (cos, sin) = RotaryTests.CosSin(16, 64, ScalarType.Float32, dev);
        e = Assert.Throws<ArgumentException>(() => flash_attn.apply_rotary_emb(q, cos, sin, cu_seqlens: bad, max_seqlen: 10))!;
        Assert.That(e.ParamName, Is.EqualTo("cu_seqlens"));
        var good = tensor(new[] { 0, 6, 10 }, dtype: ScalarType.Int32, device: dev);
        var o = flash_attn.flash_attn_varlen_func(q, q, q, good, good, 6, 6, causal: true);
        Assert.That(o.isfinite().all().item<bool>(), Is.True, "a correct call still works");
    }

    [TestCase(ScalarType.BFloat16, 64, true), TestCase(ScalarType.Float16, 111, false), TestCase(ScalarType.BFloat16, 128, true)]
    public void VarlenMatchesEachSequence(ScalarType dtype, int d, bool causal)
    {
        var dev = Gpu.Require();
        var lq = new[] { 1, 97, 300, 64 };
        var lk = new[] { 5, 97, 211, 128 };
        var cuQ = tensor(Prefix(lq), dtype: ScalarType.Int32, device: dev);
        var cuK = tensor(Prefix(lk), dtype: ScalarType.Int32, device: dev);
        var q = randn(lq.Sum(), 6, d, dtype: dtype, device: dev).requires_grad_(true);
        var k = randn(lk.Sum(), 2, d, dtype: dtype, device: dev).requires_grad_(true);
        var v = randn(lk.Sum(), 2, d, dtype: dtype, device: dev).requires_grad_(true);
        var r = flash_attn.flash_attn_varlen_func_with_lse(q, k, v, cuQ, cuK, lq.Max(), lk.Max(), causal: causal);
        var g = randn_like(r.output);
        r.output.backward(new[] { g });
        Tensor[] Grads(ScalarType compute, out Tensor o, out Tensor lse)
        {
            var ins = new[] { q, k, v }.Select(t => t.detach().to(compute == ScalarType.Float64 ? ScalarType.Float64 : t.dtype).requires_grad_(true)).ToArray();
            (o, lse) = Reference.attention_varlen(ins[0], ins[1], ins[2], cuQ, cuK, null, causal, compute_dtype: compute);
            o.backward(new[] { g.to(o.dtype) });
            return ins.Select(t => t.grad!).ToArray();
        }
        var g64 = Grads(ScalarType.Float64, out var o64, out var lse64);
        var gLow = Grads(dtype, out var oLow, out var lseLow);
        Tolerance.AssertClose(r.output, oLow, o64, "varlen out");
        AssertLse(r.softmax_lse, lseLow, lse64);
        Tolerance.AssertClose(q.grad!, gLow[0], g64[0], "varlen dq");
        Tolerance.AssertClose(k.grad!, gLow[1], g64[1], "varlen dk");
        Tolerance.AssertClose(v.grad!, gLow[2], g64[2], "varlen dv");
    }

    private static int[] Prefix(int[] lengths)
    {
        var cu = new int[lengths.Length + 1];
        for (int i = 0; i < lengths.Length; i++) cu[i + 1] = cu[i] + lengths[i];
        return cu;
    }

    [Test]
    public void BackwardFitsTheSharedMemoryOfA100AndH100()
    {
        var dev = Gpu.Require();
        int index = Math.Max(0, dev.index); // torch.CUDA is "cuda" (index -1): the current device, 0 here
        int cap = Backend.Capability(index);
        if (cap is not (80 or 90)) Assert.Ignore($"sm_{cap}: the backward's fit is only known for the A100 (163 KB per block) and H100 (227 KB)");
        foreach (var d in new[] { 8, 32, 40, 64, 96, 128, 160, 192, 224, 256 })
            Assert.That(flash_attn.BackwardFits(index, d), Is.True, $"head dim {d}");
        // so inputs that need gradients take the kernels, not the reference path
        var q = randn(1, 64, 2, 40, dtype: ScalarType.BFloat16, device: dev).requires_grad_(true);
        Assert.That(flash_attn.UsesAttentionKernels(q, q, q), Is.True);
    }

    [Test]
    public void DeterministicBackwardIsBitwiseRepeatable()
    {
        var dev = Gpu.Require();
        var q = randn(2, 1025, 4, 64, dtype: ScalarType.BFloat16, device: dev);
        var k = randn(2, 1025, 4, 64, dtype: ScalarType.BFloat16, device: dev);
        var v = randn(2, 1025, 4, 64, dtype: ScalarType.BFloat16, device: dev);
        var g = randn(2, 1025, 4, 64, dtype: ScalarType.BFloat16, device: dev);
        Tensor Dq()
        {
            var qq = q.clone().requires_grad_(true);
            flash_attn.flash_attn_func(qq, k, v, causal: true, deterministic: true).backward(new[] { g });
            return qq.grad!;
        }
        Assert.That(Dq().eq(Dq()).all().item<bool>(), Is.True);
    }

    [Test]
    public void PackedQkvViewsAndMhaRunOnTheKernels()
    {
        var dev = Gpu.Require();
        using var mha = new MHA(256, 4, num_heads_kv: 2, causal: true, rotary_emb_dim: 32, device: dev, dtype: ScalarType.BFloat16);
        using var plain = new MHA(256, 4, num_heads_kv: 2, causal: true, rotary_emb_dim: 32, use_flash_attn: false, device: dev, dtype: ScalarType.BFloat16);
        using var exact = new MHA(256, 4, num_heads_kv: 2, causal: true, rotary_emb_dim: 32, use_flash_attn: false, device: dev, dtype: ScalarType.Float64);
        CopyWeights(mha, plain);
        CopyWeights(mha, exact);
        var x = randn(2, 333, 256, dtype: ScalarType.BFloat16, device: dev);
        // the flash MHA against float64 with the rule, the bf16 materialised MHA as the low-precision baseline
        Tolerance.AssertClose(mha.forward(x), plain.forward(x), exact.forward(x.to(ScalarType.Float64)), "MHA");
    }

    private static IEnumerable<TestCaseData> PackedCases()
    {
        int i = 0;
        foreach (var d in new[] { 40, 59, 64, 80, 111, 128 })
        foreach (var s in new[] { 1, 97, 1025 })
        {
            var dtype = i % 3 == 2 ? ScalarType.Float16 : ScalarType.BFloat16;
            bool causal = i % 2 == 0;
            double? scale = i % 4 == 1 ? 1.0 / (3 * Math.Sqrt(d)) : null; // GPT-2's scale_attn_by_inverse_layer_idx at layer 3
            i++;
            yield return new TestCaseData(dtype, d, s, causal, scale)
                .SetName($"QkvPacked_{dtype}_d{d}_s{s}_{(causal ? "causal" : "full")}{(scale is null ? "" : "_scaled")}");
        }
    }

    /// <summary>flash_attn_qkvpacked_func hands the packed tensor to the kernels whole: its gradient is one contiguous
    /// tensor the backward wrote dq, dk and dv into (no stack of three), equal to the reference's per part.</summary>
    [TestCaseSource(nameof(PackedCases))]
    public void QkvPackedTakesOneGradientFromTheKernels(ScalarType dtype, int d, int s, bool causal, double? scale)
    {
        var dev = Gpu.Require();
        using var mode = new BackendOverride("flash");
        var qkv = randn(new long[] { 2, s, 3, 4, d }, dtype: dtype, device: dev).requires_grad_(true);
        var o = flash_attn.flash_attn_qkvpacked_func(qkv, softmax_scale: scale, causal: causal);
        Assert.That(flash_attn.last_attention_backend, Is.EqualTo(AttentionBackend.Flash));
        var g = randn_like(o);
        o.backward(new[] { g });
        Assert.That(qkv.grad!.shape, Is.EqualTo(qkv.shape));
        Assert.That(qkv.grad!.is_contiguous(), Is.True);

        var (q, k, v) = (qkv.select(2, 0), qkv.select(2, 1), qkv.select(2, 2));
        var (o64, _, grads64) = Ref(q, k, v, g, causal, null, 0, null, ScalarType.Float64, scale: scale);
        var (oLow, _, gradsLow) = Ref(q, k, v, g, causal, null, 0, null, dtype, scale: scale);
        Tolerance.AssertClose(o, oLow, o64, "out");
        Tolerance.AssertClose(qkv.grad!.select(2, 0), gradsLow[0], grads64[0], "dq", atol: AccumulationFloor(g, v, k, d));
        Tolerance.AssertClose(qkv.grad!.select(2, 1), gradsLow[1], grads64[1], "dk", atol: AccumulationFloor(g, v, q, d));
        Tolerance.AssertClose(qkv.grad!.select(2, 2), gradsLow[2], grads64[2], "dv");
    }

    /// <summary>GPT's attention (no GQA, no rotary) on the kernels: the packed projection whole, and a softmax scale other
    /// than 1/sqrt(head_dim) passed to the kernels rather than folded into Wqkv (the fold is for SDPA); output and the
    /// gradients of x and of every weight against the float64 module, the bf16 materialised module as the baseline.</summary>
    [TestCase(false), TestCase(true)]
    public void MhaWithoutGqaOrRotaryRunsThePackedKernels(bool scaled)
    {
        var dev = Gpu.Require();
        using var mode = new BackendOverride("flash");
        double? scale = scaled ? 1.0 / (3 * Math.Sqrt(64)) : null;
        MHA Make(bool flash, ScalarType dtype) => new(256, 4, causal: true, softmax_scale: scale, use_flash_attn: flash, device: dev, dtype: dtype);
        using var mha = Make(true, ScalarType.BFloat16);
        using var plain = Make(false, ScalarType.BFloat16);
        using var exact = Make(false, ScalarType.Float64);
        CopyWeights(mha, plain);
        CopyWeights(mha, exact);
        var x = randn(2, 333, 256, dtype: ScalarType.BFloat16, device: dev);
        var g = randn(2, 333, 256, dtype: ScalarType.BFloat16, device: dev);
        Tensor[] Run(MHA m, Tensor input)
        {
            var xi = input.detach().requires_grad_(true);
            var y = m.forward(xi);
            y.backward(new[] { g.to(y.dtype) });
            return new[] { y, xi.grad! }.Concat(m.parameters().Select(p => p.grad!)).ToArray();
        }
        var ours = Run(mha, x);
        Assert.That(flash_attn.last_attention_backend, Is.EqualTo(AttentionBackend.Flash));
        var low = Run(plain, x);
        var high = Run(exact, x.to(ScalarType.Float64));
        var names = new[] { "out", "dx" }.Concat(mha.named_parameters().Select(p => "d" + p.name)).ToArray();
        for (int i = 0; i < ours.Length; i++) Tolerance.AssertClose(ours[i], low[i], high[i], names[i]);
    }

    /// <summary>Causal cross-attention with more queries than keys: the first queries see no key (bottom-right), and the
    /// plain MHA (use_flash_attn: false) gives them 0 as our kernels do, never NaN, forward and backward.</summary>
    [Test]
    public void PlainMhaGivesZeroToCausalQueriesWithoutKeys()
    {
        var dev = Gpu.Require();
        MHA Make(bool flash) => new(128, 2, cross_attn: true, causal: true, use_flash_attn: flash, device: dev, dtype: ScalarType.BFloat16);
        using var plain = Make(false);
        using var flash = Make(true);
        CopyWeights(plain, flash);
        var x = randn(2, 97, 128, dtype: ScalarType.BFloat16, device: dev);
        var xKv = randn(2, 40, 128, dtype: ScalarType.BFloat16, device: dev).requires_grad_(true);
        var y = plain.forward(x, xKv);
        y.sum().backward();
        Assert.That(y.isfinite().all().item<bool>() && xKv.grad!.isfinite().all().item<bool>(), Is.True);
        using var _ = no_grad();
        // rows 0..56 see no key: attention gives 0, so the output is out_proj's bias alone, as on our kernels
        var expected = flash.forward(x, xKv.detach());
        Assert.That(y.detach().slice(1, 0, 57, 1).to(ScalarType.Float32).allclose(expected.slice(1, 0, 57, 1).to(ScalarType.Float32)), Is.True);
    }

    // Same values into another dtype (load_state_dict wants equal dtypes).
    internal static void CopyWeights(nn.Module from, nn.Module to)
    {
        var src = from.named_parameters().ToDictionary(p => p.name, p => p.parameter);
        using var _ = no_grad();
        foreach (var (name, p) in to.named_parameters()) p.copy_(src[name]);
    }

    [Test]
    public void BadInputOnGpuIsRejectedBeforeTheKernel()
    {
        var dev = Gpu.Require();
        var q = randn(1, 8, 2, 64, dtype: ScalarType.BFloat16, device: dev);
        var e = Assert.Throws<ArgumentException>(() => flash_attn.flash_attn_func(q, q.cpu(), q.cpu()))!;
        Assert.That(e.ParamName, Is.EqualTo("k"));
        e = Assert.Throws<ArgumentException>(() => flash_attn.flash_attn_func(q, q, q, alibi_slopes: ones(2, device: dev, dtype: ScalarType.BFloat16)))!;
        Assert.That(e.ParamName, Is.EqualTo("alibi_slopes"));
    }
}
