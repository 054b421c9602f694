using NUnit.Framework;
using TorchSharp;
using static TorchSharp.torch;

namespace FlashAttn.Tests;

/// <summary>
/// flash_attn_func on the GPU where the dispatch rule sends it to libtorch's scaled_dot_product_attention: outputs and
/// gradients against the float64 reference with the flash-attn rule, through flash_attn_func and the packed modules, and
/// the path that ran; FLASHATTN_ATTENTION_BACKEND; SDPA's dropout following torch's CUDA seed.
/// </summary>
[Category(Gpu.Category)]
[NonParallelizable] // sets FLASHATTN_ATTENTION_BACKEND
public sealed class AttentionDispatchCudaTests
{
    [SetUp]
    public void Seed() => manual_seed(TestContext.CurrentContext.Random.Next());

    // whether the shipped rule sends d64/d128 to SDPA on this GPU (sm_90 and a head dim measured faster there)
    private static bool RuleTakesSdpa => Backend.Capability(0) / 10 == 9 && AttentionDispatch.SdpaFasterHeadDims.Contains(64);

    private static IEnumerable<TestCaseData> SdpaCases()
    {
        int i = 0;
        foreach (var dtype in new[] { ScalarType.BFloat16, ScalarType.Float16 })
        foreach (var d in new[] { 64, 128 })
        foreach (var s in new[] { 97, 1025 })
        foreach (var causal in new[] { false, true })
        {
            // cycle the entry points over the grid: each meets both dtypes, head dims and masks
            var entry = (i++ % 3) switch { 0 => "func", 1 => "FlashSelfAttention", _ => "FlashCrossAttention" };
            yield return new TestCaseData(dtype, d, s, causal, entry, null)
                .SetName($"Sdpa_{dtype}_d{d}_s{s}_{(causal ? "causal" : "full")}_{entry}");
        }
        // another softmax_scale, folded into q: GPT-2's scale_attn_by_inverse_layer_idx at layers 3 (1/3: q rounded once
        // more) and 4 (1/4: exact), and a scale above the default
        foreach (var dtype in new[] { ScalarType.BFloat16, ScalarType.Float16 })
        foreach (var (d, fold) in new[] { (64, 1.0 / 3), (128, 0.25), (64, 1.7) })
            yield return new TestCaseData(dtype, d, 1025, true, "func", fold / Math.Sqrt(d))
                .SetName($"Sdpa_{dtype}_d{d}_s1025_causal_scale{fold:F3}");
    }

    [TestCaseSource(nameof(SdpaCases))]
    public void SdpaCasesMatchReference(ScalarType dtype, int d, int s, bool causal, string entry, double? scale)
    {
        var dev = Gpu.Require();
        // the rule sends these to SDPA on sm_90; on other GPUs the override does, so the numerics are checked there too
        using var mode = new BackendOverride(RuleTakesSdpa ? null : "sdpa");
        const int batch = 2, h = 4;
        var q = randn(batch, s, h, d, dtype: dtype, device: dev).requires_grad_(true);
        var k = randn(batch, s, h, d, dtype: dtype, device: dev).requires_grad_(true);
        var v = randn(batch, s, h, d, dtype: dtype, device: dev).requires_grad_(true);
        Tensor o;
        switch (entry)
        {
            case "func":
                o = flash_attn.flash_attn_func(q, k, v, softmax_scale: scale, causal: causal);
                break;
            case "FlashSelfAttention":
            {
                // q, k, v as unbind views of a packed (batch, seqlen, 3, nheads, headdim), as GPT's projection gives them
                using var m = new FlashSelfAttention(causal);
                o = m.forward(stack(new[] { q, k, v }, 2));
                break;
            }
            default:
            {
                using var m = new FlashCrossAttention(causal);
                o = m.forward(q, stack(new[] { k, v }, 2));
                break;
            }
        }
        Assert.That(flash_attn.last_attention_backend, Is.EqualTo(AttentionBackend.Sdpa));
        var g = randn_like(o);
        o.backward(new[] { g });

        var (o64, _, g64) = FlashAttentionCudaTests.Ref(q, k, v, g, causal, null, 0, null, ScalarType.Float64, scale: scale);
        var (oLow, _, gLow) = FlashAttentionCudaTests.Ref(q, k, v, g, causal, null, 0, null, dtype, scale: scale);
        Tolerance.AssertClose(o, oLow, o64, "out");
        // causal row 0 sees one key: the cancellation floor of the kernels' rule applies to any fp32-accumulating backward
        Tolerance.AssertClose(q.grad!, gLow[0], g64[0], "dq", atol: FlashAttentionCudaTests.AccumulationFloor(g, v, k, d));
        Tolerance.AssertClose(k.grad!, gLow[1], g64[1], "dk", atol: FlashAttentionCudaTests.AccumulationFloor(g, v, q, d));
        Tolerance.AssertClose(v.grad!, gLow[2], g64[2], "dv");
    }

    [Test]
    public void OverrideChoosesThePathWhereSdpaComputesTheCase()
    {
        var dev = Gpu.Require();
        Tensor R(int d, int heads = 4) => randn(2, 97, heads, d, dtype: ScalarType.BFloat16, device: dev);
        var (q, k, v) = (R(64), R(64), R(64));
        AttentionBackend Ran(string? mode, Func<Tensor> call)
        {
            using var _ = new BackendOverride(mode);
            call();
            return flash_attn.last_attention_backend;
        }
        var plain = () => flash_attn.flash_attn_func(q, k, v, causal: true);
        Assert.That(Ran(null, plain), Is.EqualTo(RuleTakesSdpa ? AttentionBackend.Sdpa : AttentionBackend.Flash), "auto");
        Assert.That(Ran("auto", plain), Is.EqualTo(RuleTakesSdpa ? AttentionBackend.Sdpa : AttentionBackend.Flash), "auto");
        Assert.That(Ran("flash", plain), Is.EqualTo(AttentionBackend.Flash), "flash");
        Assert.That(Ran("sdpa", plain), Is.EqualTo(AttentionBackend.Sdpa), "sdpa");

        // SDPA computes these, the rule keeps them on our kernels until measured: sdpa forces them
        var (q96, k96, v96) = (R(96), R(96), R(96));
        var d96 = () => flash_attn.flash_attn_func(q96, k96, v96);
        Assert.That(Ran(null, d96), Is.EqualTo(AttentionBackend.Flash), "d96 auto");
        Assert.That(Ran("sdpa", d96), Is.EqualTo(AttentionBackend.Sdpa), "d96 sdpa");
        var dropout = () => flash_attn.flash_attn_func(q, k, v, dropout_p: 0.1);
        Assert.That(Ran(null, dropout), Is.EqualTo(AttentionBackend.Flash), "dropout auto");
        Assert.That(Ran("sdpa", dropout), Is.EqualTo(AttentionBackend.Sdpa), "dropout sdpa");

        // what SDPA does not compute stays on our kernels even when forced
        var (k2, v2) = (R(64, heads: 2), R(64, heads: 2));
        Assert.That(Ran("sdpa", () => flash_attn.flash_attn_func(q, k2, v2, causal: true)), Is.EqualTo(AttentionBackend.Flash), "gqa");
        Assert.That(Ran("sdpa", () => flash_attn.flash_attn_func(q, k, v, softcap: 5)), Is.EqualTo(AttentionBackend.Flash), "softcap");
        Assert.That(Ran("sdpa", () => flash_attn.flash_attn_func(q, k, v, deterministic: true)), Is.EqualTo(AttentionBackend.Flash), "deterministic");
        Assert.That(Ran("sdpa", () => flash_attn.flash_attn_func(q[.., ..1], k, v, causal: true)), Is.EqualTo(AttentionBackend.Flash), "decode");
        Assert.That(Ran("sdpa", () => flash_attn.flash_attn_func_with_lse(q, k, v, causal: true).output), Is.EqualTo(AttentionBackend.Flash), "with_lse");
        // any softmax scale (folded into q)
        Assert.That(Ran("sdpa", () => flash_attn.flash_attn_func(q, k, v, softmax_scale: 0.3)), Is.EqualTo(AttentionBackend.Sdpa), "scale");

        var e = Assert.Throws<InvalidOperationException>(() => Ran("cudnn", plain))!;
        Assert.That(e.Message, Does.Contain(AttentionDispatch.EnvironmentVariable));
    }

    [Test]
    public void SdpaDropoutFollowsTheCudaSeed()
    {
        var dev = Gpu.Require();
        using var _ = new BackendOverride("sdpa");
        var q = randn(2, 257, 4, 64, dtype: ScalarType.BFloat16, device: dev);
        var k = randn(2, 257, 4, 64, dtype: ScalarType.BFloat16, device: dev);
        var v = randn(2, 257, 4, 64, dtype: ScalarType.BFloat16, device: dev);
        Tensor Run(long seed)
        {
            cuda.manual_seed(seed);
            return flash_attn.flash_attn_func(q, k, v, dropout_p: 0.1, causal: true);
        }
        var a = Run(7);
        Assert.That(flash_attn.last_attention_backend, Is.EqualTo(AttentionBackend.Sdpa));
        Assert.That(Tolerance.MaxAbsDiff(Run(7), a), Is.EqualTo(0.0), "the same CUDA seed, the same output");
        Assert.That(Tolerance.MaxAbsDiff(Run(8), a), Is.GreaterThan(0.0), "another seed, other dropout decisions");
        Assert.That(Tolerance.MaxAbsDiff(flash_attn.flash_attn_func(q, k, v, causal: true), a), Is.GreaterThan(0.0), "dropout applied");
    }
}
