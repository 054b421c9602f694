using NUnit.Framework;
using TorchSharp;
using static TorchSharp.torch;
using F = TorchSharp.torch.nn.functional;

namespace FlashAttn.Tests;

/// <summary>
/// The public modules as the models use them, against references written here in float64 on the CPU: DropoutAddLayerNorm's
/// drop-path (rowscale), prenorm residual and plain path; Mlp beside FusedMLP; MHA's softmax_scale folded into its
/// projection; MHA's KV cache through flash_attn_with_kvcache; the pre-norm Block over the residual stream.
/// </summary>
[TestFixture]
public sealed class BlockTests
{
    private const ScalarType F64 = ScalarType.Float64;

    [SetUp]
    public void Seed() => manual_seed(TestContext.CurrentContext.Random.Next());

    private static void Randomise(nn.Module m, double std = 1.0)
    {
        using var _ = no_grad();
        foreach (var p in m.parameters()) p.copy_(randn_like(p) * std);
    }

    [TestCase(true)]
    [TestCase(false)]
    public void DropPath_DropsOrScalesWholeSamples(bool fused)
    {
        const long B = 8, S = 5, H = 16;
        const double p = 0.5;
        using var norm = new DropoutAddLayerNorm(H, prenorm: true, eps: 1e-5, dtype: F64, drop_path: p, fused_dropout_add_ln: fused);
        Randomise(norm);
        var x0 = randn(B, S, H, dtype: F64);
        var residual = randn(B, S, H, dtype: F64);
        manual_seed(7); // 8 fair draws: at least one sample kept and one dropped with this seed
        var (o, r) = norm.forward(x0, residual);
        int kept = 0, dropped = 0;
        for (int b = 0; b < B; b++)
        {
            var added = r![b] - residual[b];
            if (added.abs().max().item<double>() == 0) dropped++;
            else
            {
                Assert.That(Tolerance.MaxAbsDiff(added, x0[b] / (1 - p)), Is.LessThan(1e-12), $"sample {b} kept: x0 scaled by 1 / (1 - p)");
                kept++;
            }
        }
        Assert.That((kept, dropped), Is.Not.EqualTo((0, (int)B)).And.Not.EqualTo(((int)B, 0)), "some samples kept, some dropped");
        var expected = F.layer_norm(r!, new[] { H }, norm.Weight, norm.Bias, 1e-5);
        Assert.That(Tolerance.MaxAbsDiff(o, expected), Is.LessThan(1e-12), "LayerNorm of the new residual");

        norm.eval();
        var (oe, re) = norm.forward(x0, residual);
        Assert.That(Tolerance.MaxAbsDiff(re!, x0 + residual), Is.EqualTo(0), "no drop-path in eval mode");
        Assert.That(Tolerance.MaxAbsDiff(oe, F.layer_norm(x0 + residual, new[] { H }, norm.Weight, norm.Bias, 1e-5)), Is.LessThan(1e-12));
    }

    [Test]
    public void DropPath_FusedAndPlainDrawTheSameSamples()
    {
        using var fused = new DropoutAddLayerNorm(16, prenorm: true, dtype: F64, drop_path: 0.5);
        using var plain = new DropoutAddLayerNorm(16, prenorm: true, dtype: F64, drop_path: 0.5, fused_dropout_add_ln: false);
        var x0 = randn(6, 3, 16, dtype: F64);
        var residual = randn(6, 3, 16, dtype: F64);
        manual_seed(11);
        var (of, rf) = fused.forward(x0, residual);
        manual_seed(11);
        var (op, rp) = plain.forward(x0, residual);
        Assert.That(Tolerance.MaxAbsDiff(rf!, rp!), Is.LessThan(1e-12));
        Assert.That(Tolerance.MaxAbsDiff(of, op), Is.LessThan(1e-12));
    }

    [TestCase(true)]
    [TestCase(false)]
    public void Prenorm_ReturnsTheResidualInFloat32(bool fused)
    {
        using var norm = new DropoutAddLayerNorm(32, prenorm: true, residual_in_fp32: true, dtype: ScalarType.BFloat16,
                                                 fused_dropout_add_ln: fused);
        var x0 = randn(3, 7, 32).to(ScalarType.BFloat16);
        var (o, r) = norm.forward(x0, null);
        Assert.That((o.dtype, r!.dtype), Is.EqualTo((ScalarType.BFloat16, ScalarType.Float32)));
        Assert.That(Tolerance.MaxAbsDiff(r, x0.to(ScalarType.Float32)), Is.EqualTo(0), "the first residual is x0");
        var (o2, r2) = norm.forward(x0, r);
        Assert.That(r2!.dtype, Is.EqualTo(ScalarType.Float32));
        Assert.That(Tolerance.MaxAbsDiff(r2, 2 * x0.to(ScalarType.Float32)), Is.EqualTo(0), "x0 + the float32 residual");
        using var noPrenorm = new DropoutAddLayerNorm(32, dtype: ScalarType.BFloat16, fused_dropout_add_ln: fused);
        Assert.That(noPrenorm.forward(x0, null).residual, Is.Null);
    }

    [TestCase("gelu_approx")]
    [TestCase("relu")]
    public void Mlp_AgreesWithFusedMlpOnTheSameWeights(string activation)
    {
        using var fused = new FusedMLP(16, 40, activation: activation, dtype: F64, names: ("c_fc", "c_proj"));
        using var plain = new Mlp(16, 40, activation: activation, fused_bias_fc: true, dtype: F64, names: ("c_fc", "c_proj"));
        Assert.That(plain.state_dict().Keys, Is.EquivalentTo(new[] { "c_fc.weight", "c_fc.bias", "c_proj.weight", "c_proj.bias" }));
        Randomise(fused);
        plain.load_state_dict(fused.state_dict());
        var x = randn(3, 5, 16, dtype: F64);
        var yf = fused.forward(x);
        var yp = plain.forward(x);
        Assert.That(Tolerance.MaxAbsDiff(yf, yp), Is.LessThan(1e-12));
        yf.square().sum().backward();
        yp.square().sum().backward();
        var gp = plain.named_parameters().ToDictionary(np => np.name, np => np.parameter.grad!);
        foreach (var (name, p) in fused.named_parameters()) Assert.That(Tolerance.MaxAbsDiff(p.grad!, gp[name]), Is.LessThan(1e-10), name);
    }

    [TestCase(true)]
    [TestCase(false)]
    public void Mlp_ExactGelu(bool fusedBiasFc)
    {
        using var mlp = new Mlp(16, 24, 8, activation: "gelu", fused_bias_fc: fusedBiasFc, dtype: F64);
        var x = randn(2, 3, 16, dtype: F64);
        var w = mlp.named_parameters().ToDictionary(np => np.name, np => np.parameter);
        var expected = F.linear(F.gelu(F.linear(x, w["fc1.weight"], w["fc1.bias"])), w["fc2.weight"], w["fc2.bias"]);
        Assert.That(Tolerance.MaxAbsDiff(mlp.forward(x), expected), Is.LessThan(1e-12));
        Assert.Throws<ArgumentException>(() => new Mlp(16, activation: "swish"));
    }

    // Prefill, single tokens and a chunk, with the rest of the cache poisoned: positions past the cache's length hold the
    // keys and values of garbage tokens that were written but never advanced over, which attention must not read.
    // A softmax_scale other than 1/sqrt(head_dim) is folded into Wqkv's q rows: the cache must attend with that q at the
    // default scale, as the full forward does.
    [TestCase(false, false, true, null)]
    [TestCase(true, false, true, null)]
    [TestCase(true, true, true, null)]
    [TestCase(true, false, false, null)]
    [TestCase(false, true, false, null)]
    [TestCase(true, false, true, 0.23)]
    [TestCase(false, true, false, 0.23)]
    public void KvCache_GivesTheFullSequencesAttention(bool rotary, bool gqa, bool useFlashAttn, double? softmaxScale)
    {
        const long B = 2, S = 11, E = 32, Hq = 4, D = 8;
        long hk = gqa ? 2 : Hq;
        using var mha = new MHA(E, Hq, num_heads_kv: gqa ? 2 : null, softmax_scale: softmaxScale, causal: true, rotary_emb_dim: rotary ? 6 : 0,
                                use_flash_attn: useFlashAttn, dtype: F64, fused_bias_fc: true, layer_idx: 1,
                                names: ("c_attn", "c_proj"));
        Assert.That(mha.state_dict().Keys, Is.EquivalentTo(new[] { "c_attn.weight", "c_attn.bias", "c_proj.weight", "c_proj.bias" }));
        mha.eval();
        using var _ = no_grad();
        var x = randn(B, S, E, dtype: F64);
        var full = mha.forward(x);
        using var cache = new KVCache(2, B, 16, hk, D, F64, CPU);
        var parts = new List<Tensor>();
        foreach (var (a, b) in new[] { (0, 4), (4, 5), (5, 6), (6, 11) })
        {
            // garbage written at [length, 16) and left behind: the next call overwrites what it needs, the rest is never read
            mha.forward(randn(B, 16 - a, E, dtype: F64) * 100, cache);
            parts.Add(mha.forward(x[.., a..b], cache));
            cache.advance(b - a);
        }
        Assert.That(cache.length, Is.EqualTo(S));
        Assert.That(Tolerance.MaxAbsDiff(cat(parts, 1), full), Is.LessThan(1e-10));
    }

    /// <summary>
    /// MHA's attention written out unfolded from the module's own parameters: the projections, then flash_attn_func at
    /// softmax_scale (x_kv: cross-attention; the reference on the CPU and for float64), then out_proj.
    /// </summary>
    internal static Tensor UnfoldedAttention(MHA m, Tensor x, Tensor? xKv, double softmaxScale, bool causal, Tensor? alibiSlopes = null)
    {
        var p = m.named_parameters().ToDictionary(np => np.name, np => (Tensor)np.parameter);
        long B = x.size(0), S = x.size(1), H = m.num_heads, Hk = m.num_heads_kv, D = m.head_dim;
        Tensor q, k, v;
        if (xKv is null)
        {
            var qkv = F.linear(x, p["Wqkv.weight"], p.GetValueOrDefault("Wqkv.bias"));
            q = qkv[.., .., ..(int)(H * D)].view(B, S, H, D);
            k = qkv[.., .., (int)(H * D)..(int)((H + Hk) * D)].view(B, S, Hk, D);
            v = qkv[.., .., (int)((H + Hk) * D)..].view(B, S, Hk, D);
        }
        else
        {
            q = F.linear(x, p["Wq.weight"], p.GetValueOrDefault("Wq.bias")).view(B, S, H, D);
            var kv = F.linear(xKv, p["Wkv.weight"], p.GetValueOrDefault("Wkv.bias")).view(B, xKv.size(1), 2, Hk, D);
            (k, v) = (kv[.., .., 0], kv[.., .., 1]);
        }
        var o = flash_attn.flash_attn_func(q, k, v, 0.0, softmaxScale, causal, alibi_slopes: alibiSlopes);
        return F.linear(o.reshape(B, S, H * D), p["out_proj.weight"], p["out_proj.bias"]);
    }

    /// <summary>Gradients of y's product with g with respect to x, x_kv and every parameter of m, in that order.</summary>
    internal static Tensor[] Gradients(nn.Module m, Tensor y, Tensor g, params Tensor[] inputs) =>
        autograd.grad(new[] { y }, inputs.Concat(m.parameters()).ToList(), new[] { g }).ToArray();

    // A softmax_scale other than 1/sqrt(head_dim), folded into the q rows of the projection: forward and every gradient
    // (x, x_kv, weights, biases) equal the unfolded module's to float64 rounding. Self-attention, GQA, cross-attention,
    // ALiBi (added after the scale), projections without bias; the kernels' path (flash_attn_func) and the plain one
    // (SDPA, the reference for GQA).
    [TestCase(false, false, false, true, false, false)]
    [TestCase(true, false, false, true, true, false)]
    [TestCase(false, false, false, true, false)]
    [TestCase(false, false, false, false, true)]
    [TestCase(false, true, false, true, true)]
    [TestCase(false, true, true, false, false)]
    [TestCase(true, false, false, true, true)]
    [TestCase(true, true, false, false, false)]
    public void SoftmaxScale_FoldedIntoTheProjection_IsTheUnfoldedAttention(bool cross, bool gqa, bool alibi, bool useFlashAttn,
        bool fusedBiasFc, bool qkvBias = true)
    {
        const long B = 2, S = 7, Sk = 9, E = 40, H = 4;
        const double scale = 0.23; // f = 0.23 sqrt(10), no power of two
        bool causal = !cross;
        using var mha = new MHA(E, H, num_heads_kv: gqa ? 2 : null, cross_attn: cross, qkv_proj_bias: qkvBias, softmax_scale: scale, causal: causal,
                                use_alibi: alibi, use_flash_attn: useFlashAttn, dtype: F64, fused_bias_fc: fusedBiasFc);
        Randomise(mha, 0.3); // scores of order 1: a saturated softmax would hide the scale from the gradients
        var x = randn(B, S, E, dtype: F64).requires_grad_();
        var xKv = cross ? randn(B, Sk, E, dtype: F64).requires_grad_() : null;
        var g = randn(B, S, E, dtype: F64);
        Tensor[] inputs = xKv is null ? new[] { x } : new[] { x, xKv };
        var y = xKv is null ? mha.forward(x) : mha.forward(x, xKv);
        var expected = UnfoldedAttention(mha, x, xKv, scale, causal, alibi ? MHA.AlibiSlopes(H) : null);
        var names = (cross ? new[] { "x", "x_kv" } : new[] { "x" }).Concat(mha.named_parameters().Select(np => np.name)).ToArray();
        var pairs = new[] { ("output", y, expected) }
            .Concat(names.Zip(Gradients(mha, y, g, inputs).Zip(Gradients(mha, expected, g, inputs)), (n, t) => (n, t.First, t.Second)));
        foreach (var (name, actual, reference) in pairs)
        {
            double size = Math.Max(1.0, reference.abs().max().item<double>());
            Assert.That(Tolerance.MaxAbsDiff(actual, reference), Is.LessThan(1e-13 * size), name);
        }
    }

    // The same in float32 and bf16 by the flash-attn rule: against the unfolded computation in float64 (the exact module's
    // parameters hold the low-precision ones), the folded module's error at most twice that of the unfolded computation in
    // the same low precision; three times for the gradients, which pass through two roundings the unfolded computation
    // does not have (the folded q rows f W and f b in the forward, the factor f on their gradients in the backward), each
    // as large as one of its own (Wqkv.bias reached 2.4x its reference's error in one of 40 repeated runs).
    [TestCase(ScalarType.Float32, false)]
    [TestCase(ScalarType.BFloat16, false)]
    [TestCase(ScalarType.BFloat16, true)]
    public void SoftmaxScale_Folded_LowPrecisionMatchesFloat64WithTheRule(ScalarType dtype, bool gqa)
    {
        const long B = 2, S = 33, E = 48, H = 4;
        double scale = 1.0 / (Math.Sqrt(12) * 3); // GPT-2's third layer under scale_attn_by_inverse_layer_idx
        using var exact = new MHA(E, H, num_heads_kv: gqa ? 2 : null, softmax_scale: scale, causal: true, dtype: F64, fused_bias_fc: true);
        using var low = new MHA(E, H, num_heads_kv: gqa ? 2 : null, softmax_scale: scale, causal: true, dtype: dtype, fused_bias_fc: true);
        {
            using var _ = no_grad();
            foreach (var ((_, pe), (_, pl)) in exact.named_parameters().Zip(low.named_parameters()))
            {
                pl.copy_(randn_like(pe) * 0.3);
                pe.copy_(pl); // the exact module starts from the low-precision weights, rounding included
            }
        }
        var x = randn(B, S, E, dtype: dtype);
        var g = randn(B, S, E, dtype: dtype);
        var (x64, g64) = (x.to(F64).requires_grad_(), g.to(F64));
        var (xl, xr) = (x.detach().requires_grad_(), x.detach().requires_grad_());
        var y = low.forward(xl);
        var yRef = UnfoldedAttention(low, xr, null, scale, causal: true);
        var y64 = UnfoldedAttention(exact, x64, null, scale, causal: true);
        Tolerance.AssertClose(y, yRef, y64, "output");
        var names = exact.named_parameters().Select(np => np.name).Prepend("x");
        foreach (var (name, (actual, (reference, exact64))) in names.Zip(Gradients(low, y, g, xl).Zip(
                     Gradients(low, yRef, g, xr).Zip(Gradients(exact, y64, g64, x64)))))
            Tolerance.AssertClose(actual, reference, exact64, name, factor: 3.0);
    }

    [Test]
    public void KvCache_NeedsALayerIndexAndRoom()
    {
        using var mha = new MHA(32, 4, causal: true, dtype: F64, layer_idx: 0);
        using var cache = new KVCache(1, 2, 6, 4, 8, F64, CPU);
        var x = randn(2, 4, 32, dtype: F64);
        mha.forward(x, cache);
        cache.advance(4);
        Assert.That(Assert.Throws<ArgumentException>(() => mha.forward(x, cache))!.ParamName, Is.EqualTo("cache"), "4 + 4 > 6 positions");
        Assert.That(Assert.Throws<ArgumentException>(() => cache.advance(3))!.ParamName, Is.EqualTo("tokens"));
        using var noSlot = new MHA(32, 4, causal: true, dtype: F64);
        Assert.That(Assert.Throws<ArgumentException>(() => noSlot.forward(x[.., ..1], cache))!.ParamName, Is.EqualTo("cache"));
        using var deep = new MHA(32, 4, causal: true, dtype: F64, layer_idx: 1);
        Assert.That(Assert.Throws<ArgumentException>(() => deep.forward(x[.., ..1], cache))!.ParamName, Is.EqualTo("cache"), "one layer only");
    }

    [TestCase(true)]
    [TestCase(false)]
    public void Block_IsThePrenormResidualStream(bool fused)
    {
        const long E = 32;
        var norm = () => new DropoutAddLayerNorm(E, prenorm: true, dtype: F64, fused_dropout_add_ln: fused);
        using var block = new Block(new MHA(E, 4, causal: true, dtype: F64, fused_bias_fc: fused),
                                    new Mlp(E, 3 * E, activation: "gelu", fused_bias_fc: fused, dtype: F64), norm(), norm(),
                                    names: ("ln_1", "attn", "ln_2", "mlp"));
        Randomise(block);
        Assert.That(block.named_parameters().Select(np => np.name).Where(n => n.EndsWith(".weight")),
                    Is.EqualTo(new[] { "ln_1.weight", "attn.Wqkv.weight", "attn.out_proj.weight", "ln_2.weight", "mlp.fc1.weight", "mlp.fc2.weight" }));
        var hidden = randn(2, 6, E, dtype: F64);
        var residual = randn(2, 6, E, dtype: F64);
        var (h, r) = block.forward(hidden, residual);

        Tensor Ln(DropoutAddLayerNorm n, Tensor t) => F.layer_norm(t, new[] { E }, n.Weight, n.Bias, 1e-5);
        var r1 = hidden + residual;
        var r2 = block.mixer.forward(Ln(block.norm1, r1)) + r1;
        var expected = block.mlp.forward(Ln(block.norm2, r2));
        Assert.That(Tolerance.MaxAbsDiff(r, r2), Is.LessThan(1e-10), "the residual after the attention");
        Assert.That(Tolerance.MaxAbsDiff(h, expected), Is.LessThan(1e-10), "the MLP of the second norm");
    }
}
