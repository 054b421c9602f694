using FlashAttn.Models;
using NUnit.Framework;
using TorchSharp;
using static TorchSharp.torch;

namespace FlashAttn.Tests;

/// <summary>GPT on CPU: configs, parameter counts, fused vs plain, overfitting, generation, checkpoints.</summary>
[TestFixture]
public sealed class GptTests
{
    // Tiny models gain nothing from intra-op threads, and on a loaded 2-core runner libtorch's thread pool makes each of
    // the ~1000 small ops per step wait for a descheduled worker (600 ms per tiny-GPT step instead of 15): one thread.
    private int _threads;

    [OneTimeSetUp]
    public void OneThread() { _threads = get_num_threads(); set_num_threads(1); }

    [OneTimeTearDown]
    public void RestoreThreads() => set_num_threads(_threads);

    private static GPTConfig Tiny(bool fused = true, double dropout = 0.0) =>
        GPTConfig.Named("tiny").WithFusions(fused) with { resid_pdrop = dropout, embd_pdrop = dropout, attn_pdrop = dropout };

    private static GPTLMHeadModel Build(GPTConfig c, long seed = 0, ScalarType? dtype = null)
    {
        manual_seed(seed);
        return new GPTLMHeadModel(c, dtype: dtype);
    }

    internal static bool Same(Tensor a, Tensor b) => a.shape.SequenceEqual(b.shape) && a.dtype == b.dtype && a.eq(b).all().item<bool>();

    private static void CopyWeights(nn.Module from, nn.Module to)
    {
        using var _ = no_grad();
        var src = from.named_parameters().ToDictionary(np => np.name, np => np.parameter);
        foreach (var (name, p) in to.named_parameters()) p.copy_(src[name]);
    }

    [Test]
    public void NamedConfigs_HaveTheSeedSizes()
    {
        foreach (var n in GPTConfig.Names) Assert.That(GPTConfig.Named(n), Is.Not.Null, n);
        var s = GPTConfig.Named("gpt2s");
        Assert.That(s.padded_vocab_size, Is.EqualTo(50264));
        Assert.That((s.n_layer, s.n_embd, s.n_head, s.head_dim, s.n_positions), Is.EqualTo((12L, 768L, 12L, 64L, 1024L)));
        Assert.That(s.scale_attn_by_inverse_layer_idx && s.use_flash_attn && s.fused_bias_fc && s.fused_mlp &&
                    s.fused_dropout_add_ln && s.fused_cross_entropy && s.residual_in_fp32, Is.True);
        Assert.That(GPTConfig.Named("gpt3l").head_dim, Is.EqualTo(96));
        var xl = GPTConfig.Named("gpt3-2.7B");
        Assert.That((xl.n_layer, xl.n_embd, xl.head_dim, xl.n_positions), Is.EqualTo((32L, 2560L, 128L, 2048L)));
        Assert.That(xl.initializer_range, Is.EqualTo(Math.Sqrt(2.0 / (5 * 2560))).Within(1e-12));
        var rot = GPTConfig.Named("gpt3s-rotary");
        Assert.That(rot.rotary_emb_dim, Is.EqualTo(32));
        Assert.That(new GPTConfig { pad_vocab_size_multiple = 64 }.padded_vocab_size, Is.EqualTo(50304));
        var ex = Assert.Throws<ArgumentException>(() => GPTConfig.Named("gpt5"))!;
        Assert.That(ex.Message, Does.Contain("gpt2s").And.Contain("gpt3-2.7B").And.Contain("tiny"));
    }

    [Test]
    public void ParameterCount_Gpt2Small_IsPublished()
    {
        // the published count is for the unpadded vocabulary, tied head
        using var m = Build(GPTConfig.Named("gpt2s") with { pad_vocab_size_multiple = 1 });
        Assert.That(m.num_parameters(), Is.EqualTo(124_439_808L));
        Assert.That(m.num_parameters(exclude_embeddings: true), Is.EqualTo(124_439_808L - 50257L * 768 - 1024L * 768));
        // flash-attention's experiments pad to 50264: 7 more rows
        Assert.That(GPTConfig.Named("gpt2s").padded_vocab_size - 50257, Is.EqualTo(7));
        double fpt = m.flops_per_token(1024);
        Assert.That(fpt, Is.EqualTo(6.0 * 124_439_808 + 12.0 * 12 * 768 * 1024));
    }

    // the other published GPT-2 sizes (HF gpt2-medium/-large/-xl), and the GPT-3 paper's nominal sizes, on the meta device
    [TestCase("gpt2m", 354_823_168L, 0.0)]
    [TestCase("gpt2l", 774_030_080L, 0.0)]
    [TestCase("gpt2xl", 1_557_611_200L, 0.0)]
    [TestCase("gpt3s", 125e6, 0.01)]
    [TestCase("gpt3m", 350e6, 0.02)]
    [TestCase("gpt3l", 760e6, 0.02)]
    [TestCase("gpt3xl", 1.3e9, 0.02)]
    [TestCase("gpt3-2.7B", 2.7e9, 0.03)]
    public void ParameterCounts_OfTheSeedSizes(string name, double expected, double relTol)
    {
        using var m = new GPTLMHeadModel(GPTConfig.Named(name) with { pad_vocab_size_multiple = 1 }, new Device(DeviceType.META));
        if (relTol == 0) Assert.That(m.num_parameters(), Is.EqualTo((long)expected));
        else Assert.That(m.num_parameters(), Is.EqualTo(expected).Within(relTol * expected));
    }

    [Test]
    public void ParameterNames_AreHuggingFaceGpt2()
    {
        using var m = Build(Tiny());
        var names = m.named_parameters().Select(np => np.name).ToList();
        Assert.That(names, Does.Contain("transformer.wte.weight"));
        Assert.That(names, Does.Contain("transformer.wpe.weight"));
        foreach (var s in new[] { "ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight",
                     "attn.c_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias" })
            Assert.That(names, Does.Contain("transformer.h.1." + s));
        Assert.That(names, Does.Contain("transformer.ln_f.weight"));
        Assert.That(names.Any(n => n.StartsWith("lm_head")), Is.False, "tied head has no own parameter");
        Assert.That(names, Has.Count.EqualTo(2 + 2 * 12 + 2));
        using var untied = Build(Tiny() with { tie_word_embeddings = false });
        Assert.That(untied.named_parameters().Select(np => np.name), Does.Contain("lm_head.weight"));
        using var rotary = Build(Tiny() with { rotary_emb_fraction = 0.5 });
        Assert.That(rotary.named_parameters().Select(np => np.name), Does.Not.Contain("transformer.wpe.weight"));
    }

    [Test]
    public void Init_IsGpt2WithScaledResidualProjections()
    {
        var c = GPTConfig.Named("tiny") with { n_embd = 256, n_layer = 8, n_head = 4 };
        using var m = Build(c);
        var p = m.named_parameters().ToDictionary(np => np.name, np => np.parameter);
        double Std(string n) => p[n].std().item<float>();
        Assert.That(Std("transformer.h.0.attn.c_attn.weight"), Is.EqualTo(0.02).Within(0.001));
        Assert.That(Std("transformer.h.0.mlp.c_fc.weight"), Is.EqualTo(0.02).Within(0.001));
        Assert.That(Std("transformer.wte.weight"), Is.EqualTo(0.02).Within(0.002));
        Assert.That(Std("transformer.h.3.attn.c_proj.weight"), Is.EqualTo(0.02 / 4).Within(0.0005));
        Assert.That(Std("transformer.h.3.mlp.c_proj.weight"), Is.EqualTo(0.02 / 4).Within(0.0005));
        Assert.That(p["transformer.h.0.attn.c_attn.bias"].abs().max().item<float>(), Is.EqualTo(0));
        Assert.That(p["transformer.h.0.ln_1.weight"].eq(1).all().item<bool>(), Is.True);
        Assert.That(p["transformer.ln_f.bias"].eq(0).all().item<bool>(), Is.True);
    }

    [Test]
    public void ParameterGroups_NoDecayOnBiasesNormsEmbeddings()
    {
        using var m = Build(Tiny());
        var g = m.parameter_groups().ToList();
        Assert.That(g, Has.Count.EqualTo(m.parameters().Count()));
        foreach (var (name, p, decay) in g)
        {
            bool expect = name.EndsWith("weight") && (name.Contains("c_attn") || name.Contains("c_proj") || name.Contains("c_fc"));
            Assert.That(decay, Is.EqualTo(expect), name);
        }
    }

    [TestCase(false, false)]
    [TestCase(true, false)]
    [TestCase(true, true)]
    public void FusedAndPlain_AgreeInLogitsAndGradients(bool rotary, bool float64)
    {
        var fusedCfg = Tiny(fused: true) with { rotary_emb_fraction = rotary ? 0.5 : 0.0 };
        var dtype = float64 ? ScalarType.Float64 : ScalarType.Float32;
        using var fused = Build(fusedCfg, seed: 1, dtype: dtype);
        using var plain = Build(fusedCfg.WithFusions(false), seed: 2, dtype: dtype);
        CopyWeights(fused, plain);
        manual_seed(3);
        var ids = randint(0, 256, new long[] { 2, 24 });
        var labels = randint(0, 256, new long[] { 2, 24 });
        labels[0, 5] = tensor(-100L);
        var lf = fused.forward(ids);
        var lp = plain.forward(ids);
        Assert.That(Tolerance.MaxAbsDiff(lf, lp), Is.LessThan(1e-5));
        var lossF = fused.loss(ids, labels);
        var lossP = plain.loss(ids, labels);
        Assert.That(lossF.to(ScalarType.Float64).item<double>(), Is.EqualTo(lossP.to(ScalarType.Float64).item<double>()).Within(1e-5));
        Assert.That(lossF.to(ScalarType.Float64).item<double>(), Is.EqualTo(Math.Log(256)).Within(0.1), "near-uniform at init");
        lossF.backward();
        lossP.backward();
        var gp = plain.named_parameters().ToDictionary(np => np.name, np => np.parameter.grad!);
        foreach (var (name, p) in fused.named_parameters())
        {
            Assert.That(p.grad, Is.Not.Null, name);
            var scale = Math.Max(gp[name].abs().max().to(ScalarType.Float64).item<double>(), 1e-3);
            Assert.That(Tolerance.MaxAbsDiff(p.grad!, gp[name]) / scale, Is.LessThan(1e-4), name);
        }
    }

    // The trainer's path: loss(ids, labels, loss_grad) computes the cross-entropy's gradient in the forward; with the
    // gradient it expects (upstream = loss_grad) every parameter's gradient is the one of loss() to the bit, and with
    // another (fp16's scale changed between forward and backward) the gradients are those of the other within rounding.
    [TestCase(false), TestCase(true)]
    public void LossWithItsGradient_GivesTheGradientsOfThePlainLoss(bool otherUpstream)
    {
        using var a = Build(Tiny(fused: true), seed: 1);
        using var b = Build(Tiny(fused: true), seed: 1);
        manual_seed(3);
        var ids = randint(0, 256, new long[] { 2, 24 });
        var labels = randint(0, 256, new long[] { 2, 24 });
        labels[1, 7] = tensor(-100L);
        var lossGrad = full(Array.Empty<long>(), 1.0 / 3, ScalarType.Float32);
        var upstream = otherUpstream ? full(Array.Empty<long>(), 0.37, ScalarType.Float32) : lossGrad;
        var la = a.loss(ids, labels, loss_grad: lossGrad);
        var lb = b.loss(ids, labels);
        Assert.That(Same(la, lb), Is.True, "the same loss");
        (la * upstream).backward();
        (lb * upstream).backward();
        var gb = b.named_parameters().ToDictionary(np => np.name, np => np.parameter.grad!);
        foreach (var (name, p) in a.named_parameters())
        {
            if (!otherUpstream) Assert.That(Same(p.grad!, gb[name]), Is.True, name);
            else Assert.That(Tolerance.MaxAbsDiff(p.grad!, gb[name]), Is.LessThanOrEqualTo(1e-6 * gb[name].abs().max().item<float>()), name);
        }
    }

    // A loss_grad the loss cannot use is an ArgumentException naming it, before the forward: a vector, an integer tensor.
    [Test]
    public void LossWithItsGradient_RejectsABadLossGrad()
    {
        using var m = Build(Tiny(fused: true), seed: 1);
        var ids = randint(0, 256, new long[] { 2, 8 });
        var labels = randint(0, 256, new long[] { 2, 8 });
        foreach (var bad in new[] { full(new long[] { 2 }, 0.5f), tensor(1L) })
            Assert.That(() => m.loss(ids, labels, loss_grad: bad), Throws.ArgumentException.With.Property("ParamName").EqualTo("loss_grad"));
    }

    [Test]
    public void ResidualInFp32_KeepsTheStreamInFloat32()
    {
        foreach (bool fused in new[] { true, false })
        {
            using var m = Build(Tiny(fused), dtype: ScalarType.BFloat16);
            var ids = randint(0, 256, new long[] { 1, 8 });
            var logits = m.forward(ids);
            Assert.That(logits.dtype, Is.EqualTo(ScalarType.BFloat16));
            Assert.That(logits.shape, Is.EqualTo(new long[] { 1, 8, 256 }));
            Assert.That(logits.isfinite().all().item<bool>(), Is.True);
        }
    }

    [Test]
    public void TinyGpt_OverfitsOneBatch()
    {
        using var m = Build(Tiny(), seed: 0);
        manual_seed(1);
        var data = randint(0, 256, new long[] { 4, 33 });
        var x = data[.., ..32];
        var y = data[.., 1..];
        using var opt = optim.AdamW(m.parameters(), lr: 3e-3, weight_decay: 0.0);
        m.train();
        double last = double.NaN;
        for (int step = 0; step < 150; step++)
        {
            using var scope = NewDisposeScope();
            opt.zero_grad();
            var loss = m.loss(x, y);
            loss.backward();
            opt.step();
            last = loss.item<float>();
            if (last < 0.05) break;
        }
        Assert.That(last, Is.LessThan(0.1));
    }

    [TestCase(false, 0.0, null, null)]
    [TestCase(false, 1.0, null, null)]
    [TestCase(false, 0.8, 10, null)]
    [TestCase(false, 1.0, null, 0.9)]
    [TestCase(true, 0.0, null, null)]
    [TestCase(true, 1.0, 20, 0.95)]
    public void Generate_WithCacheEqualsWithout(bool rotary, double temperature, int? topK, double? topP)
    {
        using var m = Build(Tiny() with { rotary_emb_fraction = rotary ? 0.5 : 0.0, resid_pdrop = 0.1 }, seed: 4);
        m.train(); // generate must switch to eval (dropout off) and back
        manual_seed(5);
        var prompt = randint(0, 256, new long[] { 2, 5 });
        var g1 = new Generator(42);
        var g2 = new Generator(42);
        var a = m.generate(prompt, 20, temperature, topK, topP, use_cache: true, generator: g1);
        var b = m.generate(prompt, 20, temperature, topK, topP, use_cache: false, generator: g2);
        Assert.That(a.shape, Is.EqualTo(new long[] { 2, 25 }));
        Assert.That(Same(a[.., ..5], prompt), Is.True);
        Assert.That(Same(a, b), Is.True, $"cache {string.Join(",", a.data<long>().ToArray())} vs none {string.Join(",", b.data<long>().ToArray())}");
        Assert.That(a.max().item<long>(), Is.LessThan(256));
        Assert.That(m.training, Is.True);
    }

    [Test]
    public void Generate_Greedy_IsTheArgmaxOfTheFullForward()
    {
        using var m = Build(Tiny(), seed: 6);
        var prompt = randint(0, 256, new long[] { 1, 4 });
        var outIds = m.generate(prompt, 6, temperature: 0);
        m.eval();
        using var _ = no_grad();
        for (int t = 4; t < 10; t++)
        {
            var logits = m.forward(outIds[.., ..t]);
            Assert.That(outIds[0, t].item<long>(), Is.EqualTo(logits[0, -1].argmax().item<long>()), $"token {t}");
        }
    }

    [Test]
    public void Generate_CacheStepLogitsMatchFullForward()
    {
        using var m = Build(Tiny(fused: false) with { rotary_emb_fraction = 0.25 }, seed: 7);
        m.eval();
        using var _ = no_grad();
        var ids = randint(0, 256, new long[] { 2, 12 });
        var full = m.forward(ids);
        using var cache = new KVCache(2, 2, 12, 4, 16, ScalarType.Float32, CPU);
        var first = m.forward(ids[.., ..7], cache);
        var rest = m.forward(ids[.., 7..], cache); // 5 new tokens at once: bottom-right causal over the cache
        Assert.That(cache.length, Is.EqualTo(12));
        Assert.That(Tolerance.MaxAbsDiff(cat(new[] { first, rest }, 1), full), Is.LessThan(1e-5));
    }

    [Test]
    public void Generate_RejectsBadArguments()
    {
        using var m = Build(Tiny());
        var p = zeros(new long[] { 1, 3 }, ScalarType.Int64);
        Assert.Throws<ArgumentException>(() => m.generate(p, 70));
        Assert.Throws<ArgumentException>(() => m.generate(p, 2, top_p: 0));
        Assert.Throws<ArgumentException>(() => m.generate(p, 2, top_k: 0));
        Assert.Throws<ArgumentException>(() => m.generate(p, 2, temperature: -1));
    }

    [Test]
    public void SaveLoad_RoundTrips()
    {
        var path = Path.Combine(Path.GetTempPath(), $"gpt-{Guid.NewGuid():N}.safetensors");
        try
        {
            foreach (var dtype in new[] { ScalarType.Float32, ScalarType.BFloat16 })
            {
                using var a = Build(Tiny(), seed: 8, dtype: dtype);
                a.save_safetensors(path);
                using var b = Build(Tiny(), seed: 9, dtype: dtype);
                b.load_safetensors(path);
                var pb = b.named_parameters().ToDictionary(np => np.name, np => np.parameter);
                foreach (var (name, p) in a.named_parameters()) Assert.That(Same(p, pb[name]), Is.True, $"{dtype} {name}");
                var ids = randint(0, 256, new long[] { 1, 10 });
                a.eval(); b.eval();
                Assert.That(Same(a.forward(ids), b.forward(ids)), Is.True);
            }
            // the file is in Hugging Face layout: Conv1D (in, out), metadata with the config
            var (infos, meta) = SafeTensors.ReadHeader(path);
            Assert.That(infos["transformer.h.0.attn.c_attn.weight"].shape, Is.EqualTo(new long[] { 64, 192 }));
            Assert.That(infos["transformer.h.0.mlp.c_fc.weight"].shape, Is.EqualTo(new long[] { 64, 256 }));
            Assert.That(infos.ContainsKey("lm_head.weight"), Is.False);
            Assert.That(meta["flashattn.config"], Does.Contain("\"n_embd\":64"));
            Assert.That(GPTConfig.FromSafetensors(path), Is.EqualTo(Tiny()));
            var rot = Tiny() with { rotary_emb_fraction = 0.5, head_dim = 32, n_inner = 100 };
            using (var r = Build(rot)) r.save_safetensors(path);
            Assert.That(GPTConfig.FromSafetensors(path), Is.EqualTo(rot));
        }
        finally { File.Delete(path); }
    }

    [Test]
    public void MlpCheckpointLevels_GiveTheSameGradients()
    {
        // the fused MLP's autograd function (its reference pieces here) saves less and recomputes more at levels 1 and 2
        var ids = randint(0, 256, new long[] { 2, 16 });
        Dictionary<string, Tensor> Grads(int lvl)
        {
            using var m = Build(Tiny() with { mlp_checkpoint_lvl = lvl }, seed: 7);
            m.loss(ids, ids).backward();
            return m.named_parameters().ToDictionary(np => np.name, np => np.parameter.grad!.clone());
        }
        var g0 = Grads(0);
        foreach (var lvl in new[] { 1, 2 })
            foreach (var (name, g) in Grads(lvl))
                Assert.That(Same(g, g0[name]), Is.True, $"level {lvl}: {name}");
        Assert.That(Assert.Throws<ArgumentException>(() => Build(Tiny() with { mlp_checkpoint_lvl = 3 }))!.Message, Does.Contain("mlp_checkpoint_lvl"));
        var c = FlashAttn.Models.Training.ExperimentConfig.Parse(["model.config.mlp_checkpoint_lvl=2"]);
        Assert.That(c.Bind().Model.Gpt(50257).mlp_checkpoint_lvl, Is.EqualTo(2));
    }

    [Test]
    public void FromHuggingFace_ReadsGpt2ConfigJson()
    {
        var path = Path.Combine(Path.GetTempPath(), $"hf-config-{Guid.NewGuid():N}.json");
        try
        {
            // gpt2-medium's config.json, abridged (the keys a model needs, and some it does not)
            File.WriteAllText(path, """
                {"activation_function": "gelu_new", "architectures": ["GPT2LMHeadModel"], "attn_pdrop": 0.1, "embd_pdrop": 0.1,
                 "layer_norm_epsilon": 1e-05, "model_type": "gpt2", "n_ctx": 1024, "n_embd": 1024, "n_head": 16, "n_layer": 24,
                 "n_positions": 1024, "n_special": 0, "predict_special_tokens": true, "resid_pdrop": 0.1, "vocab_size": 50257}
                """);
            var c = GPTConfig.FromHuggingFace(path);
            Assert.That((c.n_layer, c.n_embd, c.n_head, c.head_dim, c.n_inner, c.n_positions), Is.EqualTo((24L, 1024L, 16L, 64L, 4096L, 1024L)));
            Assert.That(c.scale_attn_by_inverse_layer_idx, Is.False, "HF GPT-2 does not scale by the layer index");
            Assert.That((c.vocab_size, c.padded_vocab_size, c.tie_word_embeddings, c.use_flash_attn), Is.EqualTo((50257L, 50264L, true, true)));
            File.WriteAllText(path, """{"model_type": "gpt2", "n_embd": 30, "n_head": 4}""");
            Assert.That(Assert.Throws<InvalidDataException>(() => GPTConfig.FromHuggingFace(path))!.Message, Does.Contain("divisible by n_head"));
        }
        finally { File.Delete(path); }
    }

    [Test]
    public void LoadSafetensors_ReadsAHuggingFaceGpt2Layout()
    {
        // as GPT2Model saves it: no "transformer." prefix, Conv1D weights (in, out), the causal-mask buffers,
        // the unpadded vocabulary (250 rows for a model padded to 256)
        var cfg = Tiny() with { vocab_size = 250 };
        Assert.That(cfg.padded_vocab_size, Is.EqualTo(256));
        using var src = Build(cfg, seed: 10);
        var path = Path.Combine(Path.GetTempPath(), $"hf-{Guid.NewGuid():N}.safetensors");
        try
        {
            var hf = new List<KeyValuePair<string, Tensor>>();
            foreach (var (name, p) in src.named_parameters())
            {
                var key = name["transformer.".Length..];
                var t = p.detach();
                if (key == "wte.weight") t = t[..250];
                if (key.EndsWith("c_attn.weight") || key.EndsWith("c_proj.weight") || key.EndsWith("c_fc.weight")) t = t.t();
                hf.Add(new(key, t.contiguous()));
            }
            hf.Add(new("h.0.attn.bias", ones(1, 1, 64, 64).tril()));
            hf.Add(new("lm_head.weight", src.transformer.wte.weight!.detach()[..250].contiguous()));
            SafeTensors.Save(path, hf, new Dictionary<string, string> { ["format"] = "pt" });
            using var dst = Build(cfg, seed: 11);
            dst.load_safetensors(path);
            var pd = dst.named_parameters().ToDictionary(np => np.name, np => np.parameter);
            foreach (var (name, p) in src.named_parameters())
            {
                if (name == "transformer.wte.weight")
                    Assert.That(Same(p[..250], pd[name][..250]), Is.True);
                else
                    Assert.That(Same(p, pd[name]), Is.True, name);
            }
            // a file from another size fails with the names involved
            using var other = Build(Tiny() with { n_embd = 32 });
            var ex = Assert.Throws<InvalidDataException>(() => other.load_safetensors(path))!;
            Assert.That(ex.Message, Does.Contain("shape"));
        }
        finally { File.Delete(path); }
    }
}
