using NUnit.Framework;
using TorchSharp;
using static TorchSharp.torch;
using F = TorchSharp.torch.nn.functional;

namespace FlashAttn.Tests;

/// <summary>
/// The public modules as the models use them, against references written here in float64 on the CPU: DropoutAddLayerNorm's
/// drop-path (rowscale), prenorm residual and plain path; Mlp beside FusedMLP; MHA's KV cache through
/// flash_attn_with_kvcache; the pre-norm Block over the residual stream.
/// </summary>
[TestFixture]
public sealed class BlockTests
{
    private const ScalarType F64 = ScalarType.Float64;

    [SetUp]
    public void Seed() => manual_seed(TestContext.CurrentContext.Random.Next());

    private static void Randomise(nn.Module m)
    {
        using var _ = no_grad();
        foreach (var p in m.parameters()) p.copy_(randn_like(p));
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
    [TestCase(false, false, true)]
    [TestCase(true, false, true)]
    [TestCase(true, true, true)]
    [TestCase(true, false, false)]
    [TestCase(false, true, false)]
    public void KvCache_GivesTheFullSequencesAttention(bool rotary, bool gqa, bool useFlashAttn)
    {
        const long B = 2, S = 11, E = 32, Hq = 4, D = 8;
        long hk = gqa ? 2 : Hq;
        using var mha = new MHA(E, Hq, num_heads_kv: gqa ? 2 : null, causal: true, rotary_emb_dim: rotary ? 6 : 0,
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
