using NUnit.Framework;
using TorchSharp;
using static TorchSharp.torch;

namespace FlashAttn.Tests;

/// <summary>
/// The module features the models use, on the GPU in bf16 against the plain path in bf16 (the low-precision reference)
/// and in float64 (the exact one), by the flash-attn rule: MHA's KV cache through flash_attn_with_kvcache, MHA's
/// softmax_scale folded into its projection, and DropoutAddLayerNorm's drop-path as the kernel's rowscale.
/// </summary>
[TestFixture]
[Category(Gpu.Category)]
public sealed class BlockCudaTests
{
    private static void CopyWeights(nn.Module from, nn.Module to)
    {
        using var _ = no_grad();
        var src = from.named_parameters().ToDictionary(np => np.name, np => np.parameter);
        foreach (var (name, p) in to.named_parameters()) p.copy_(src[name]);
    }

    // A prefill of 30 tokens, five single tokens, a chunk of 5: the cached attention equals the full forward (head dims
    // 64 and 128, rotary on half of each head, GQA in the second case).
    [TestCase(64, false)]
    [TestCase(128, true)]
    public void MhaKvCache_Bf16_MatchesTheFullForward(long headDim, bool gqa)
    {
        var dev = Gpu.Require();
        long E = 4 * headDim, hk = gqa ? 2 : 4;
        MHA Make(bool fused, ScalarType dtype) => new(E, 4, num_heads_kv: gqa ? 2 : null, causal: true, rotary_emb_dim: headDim / 2,
            use_flash_attn: fused, device: dev, dtype: dtype, fused_bias_fc: fused, layer_idx: 0);
        manual_seed(0);
        using var fused = Make(true, ScalarType.BFloat16);
        using var exact = Make(false, ScalarType.Float64);
        CopyWeights(fused, exact);
        fused.eval(); exact.eval();
        using var _ = no_grad();
        var x = randn(new long[] { 2, 40, E }, device: dev);
        var xb = x.to(ScalarType.BFloat16);
        var full = fused.forward(xb);
        using var cache = new KVCache(1, 2, 48, hk, headDim, ScalarType.BFloat16, dev);
        var parts = new List<Tensor>();
        foreach (var (a, b) in new[] { (0, 30), (30, 31), (31, 32), (32, 33), (33, 34), (34, 35), (35, 40) })
        {
            parts.Add(fused.forward(xb[.., a..b], cache));
            cache.advance(b - a);
        }
        Tolerance.AssertClose(cat(parts, 1), full, exact.forward(x.to(ScalarType.Float64)), "cached attention", factor: 3);
    }

    // GPT-2's third layer (softmax_scale 1/(3 sqrt(D)) under scale_attn_by_inverse_layer_idx) folded into Wqkv's q rows, in
    // bf16 through SDPA (cuDNN on Hopper) and through our kernels: output and gradients (x, every parameter) against the
    // unfolded computation in float64, at most twice the error of the unfolded one in bf16 (flash_attn_func at
    // softmax_scale: SDPA with q scaled, or our kernels' own scale).
    [TestCase(64, "sdpa")]
    [TestCase(64, "flash")]
    [TestCase(128, "flash")]
    public void MhaSoftmaxScale_Bf16_FoldedMatchesFloat64(long headDim, string backend)
    {
        var dev = Gpu.Require();
        const long B = 2, S = 257, H = 4;
        long E = H * headDim;
        double scale = 1.0 / (3 * Math.Sqrt(headDim));
        using var mode = new BackendOverride(backend);
        MHA Make(ScalarType dtype) => new(E, H, softmax_scale: scale, causal: true, device: dev, dtype: dtype, fused_bias_fc: true);
        manual_seed(0);
        using var low = Make(ScalarType.BFloat16);
        using var exact = Make(ScalarType.Float64);
        using (no_grad()) foreach (var p in low.parameters()) p.copy_(randn_like(p) * (2.0 / Math.Sqrt(E))); // scores of order 1
        CopyWeights(low, exact);
        var x = randn(new long[] { B, S, E }, device: dev, dtype: ScalarType.BFloat16);
        var g = randn(new long[] { B, S, E }, device: dev, dtype: ScalarType.BFloat16);
        var (xl, xr, x64) = (x.detach().requires_grad_(), x.detach().requires_grad_(), x.to(ScalarType.Float64).requires_grad_());
        var y = low.forward(xl);
        var yRef = BlockTests.UnfoldedAttention(low, xr, null, scale, causal: true);
        var y64 = BlockTests.UnfoldedAttention(exact, x64, null, scale, causal: true);
        Tolerance.AssertClose(y, yRef, y64, "output");
        var names = low.named_parameters().Select(np => np.name).Prepend("x");
        foreach (var (name, (actual, (reference, exact64))) in names.Zip(BlockTests.Gradients(low, y, g, xl).Zip(
                     BlockTests.Gradients(low, yRef, g, xr).Zip(BlockTests.Gradients(exact, y64, g.to(ScalarType.Float64), x64)))))
            Tolerance.AssertClose(actual, reference, exact64, name);
    }

    // dropout off, drop-path 0.5 over 16 samples: the three draw the same samples from the same seed (one float32 Bernoulli
    // draw on the device, before anything else), and the residual stream is float32 as in the models
    [Test]
    public void DropPath_Bf16_FusedMatchesPlain()
    {
        var dev = Gpu.Require();
        DropoutAddLayerNorm Make(bool fused, ScalarType dtype) => new(256, prenorm: true, residual_in_fp32: true, device: dev,
            dtype: dtype, drop_path: 0.5, fused_dropout_add_ln: fused);
        using var fused = Make(true, ScalarType.BFloat16);
        using var plain = Make(false, ScalarType.BFloat16);
        using var exact = Make(false, ScalarType.Float64);
        using (no_grad()) foreach (var p in fused.parameters()) p.copy_(randn_like(p));
        CopyWeights(fused, plain);
        CopyWeights(fused, exact);
        var x0 = randn(new long[] { 16, 33, 256 }, device: dev);
        var residual = randn(new long[] { 16, 33, 256 }, device: dev);
        (Tensor o, Tensor r) Run(DropoutAddLayerNorm m, ScalarType dtype)
        {
            manual_seed(3);
            cuda.manual_seed(3);
            var (o, r) = m.forward(x0.to(dtype), dtype == ScalarType.Float64 ? residual.to(dtype) : residual);
            return (o, r!);
        }
        var (of, rf) = Run(fused, ScalarType.BFloat16);
        var (op, rp) = Run(plain, ScalarType.BFloat16);
        var (oe, re) = Run(exact, ScalarType.Float64);
        var droppedF = (rf - residual).abs().amax(new long[] { 1, 2 }).eq(0);
        var droppedE = (re - residual.to(ScalarType.Float64)).abs().amax(new long[] { 1, 2 }).eq(0);
        Assert.That(droppedF.eq(droppedE).all().item<bool>(), Is.True, "the same samples dropped");
        Assert.That(droppedF.any().item<bool>() && !droppedF.all().item<bool>(), Is.True, "some samples dropped, some kept");
        Assert.That(rf.dtype, Is.EqualTo(ScalarType.Float32));
        Tolerance.AssertClose(rf, rp, re, "residual");
        Tolerance.AssertClose(of, op, oe, "output");
    }
}
