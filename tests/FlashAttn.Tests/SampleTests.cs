using System.Text.Json.Nodes;
using FlashAttn.Cli;
using FlashAttn.Models;
using FlashAttn.Models.Data;
using FlashAttn.Models.Training;
using NUnit.Framework;
using TorchSharp;
using static TorchSharp.torch;

namespace FlashAttn.Tests;

/// <summary>`flashattn sample`: the weights it loads from a run folder, a checkpoint, a Hugging Face GPT-2 folder and a
/// safetensors file, generation past the learned positions (nanoGPT's cropped context), seeds, and its errors.</summary>
public class SampleTests
{
    string _root = "";

    [SetUp]
    public void SetUp() => Directory.CreateDirectory(_root = Path.Combine(Path.GetTempPath(), "flashattn-sample-" + Guid.NewGuid().ToString("N")));

    [TearDown]
    public void TearDown() { try { Directory.Delete(_root, true); } catch { } }

    static ExperimentConfig SmallConfig(params string[] extra) => ExperimentConfig.Parse(
        ["model.config.n_layer=1", "model.config.n_embd=32", "model.config.n_head=2", "model.config.n_positions=16", .. extra]);

    static GPTLMHeadModel NewModel(ExperimentConfig c, long seed)
    {
        manual_seed(seed);
        var model = c.Bind().Model;
        return new GPTLMHeadModel(DevicePolicy.Fusions(model.Gpt(TextTokenizer.Gpt2.VocabSize), model.Overrides, CPU, TextWriter.Null));
    }

    [Test]
    public void GenerationPastThePositionTableConditionsEachChunkOnTheTokensBeforeIt()
    {
        var c = SmallConfig();
        using var model = NewModel(c, 5);
        // At GPT-2's init the next token hardly depends on anything but the last one; weights 10x larger make it depend
        // on the positions and the context, so that a chunk conditioned on the wrong tokens shows.
        using (no_grad())
            foreach (var p in model.parameters()) if (p.dim() >= 2) p.mul_(10);
        var prompt = tensor(new long[] { 464, 3290, 318, 257, 1332 }, [1, 5], ScalarType.Int64);
        var tokens = SampleCommand.GenerateLong(model, prompt, 40, temperature: 0);
        Assert.That(tokens.shape, Is.EqualTo(new long[] { 1, 45 }));
        // while prompt and output fit the 16 positions: one generate call
        Assert.That(Same(tokens[.., ..16], model.generate(prompt, 11, temperature: 0)), Is.True);
        // then chunks of 16 / 8 = 2 tokens, each greedy on the 14 tokens before it
        for (int start = 16; start < 45; start += 2)
        {
            int n = Math.Min(2, 45 - start);
            var context = tokens[.., (start - (16 - n))..start];
            var expected = model.generate(context, n, temperature: 0)[.., (int)context.shape[1]..];
            Assert.That(Same(tokens[.., start..(start + n)], expected), Is.True, $"chunk at {start}");
        }
        // a prompt longer than the context starts with the chunks: each on the 14 tokens before it
        var longPrompt = tokens[.., ..20];
        var fromLong = SampleCommand.GenerateLong(model, longPrompt, 6, temperature: 0);
        Assert.That(Same(fromLong[.., ..20], longPrompt), Is.True);
        for (int start = 20; start < 26; start += 2)
        {
            var context = fromLong[.., (start - 14)..start];
            Assert.That(Same(fromLong[.., start..(start + 2)], model.generate(context, 2, temperature: 0)[.., 14..]), Is.True, $"chunk at {start}");
        }
        Assert.That(Same(SampleCommand.GenerateLong(model, longPrompt, 0), longPrompt), Is.True);
    }

    [Test]
    public void SamplesARunFolderAndACheckpointWithTheirOwnWeights()
    {
        var c = SmallConfig();
        var run = Path.Combine(_root, "run");
        Directory.CreateDirectory(run);
        File.WriteAllText(Path.Combine(run, "config.yaml"), c.Dump());
        using var final = NewModel(c, 1);
        final.save_safetensors(Path.Combine(run, "model.safetensors"));
        // a checkpoint of other weights, as the trainer writes it (fp32 masters and Adam moments)
        using var mid = NewModel(c, 2);
        var state = mid.named_parameters().ToDictionary(np => "master." + np.name, np => (Tensor)np.parameter);
        foreach (var (name, p) in mid.named_parameters()) state["adam.m." + name] = zeros_like(p);
        var ckpt = Checkpoint.Save(Path.Combine(run, "checkpoints"), 7, state, new JsonObject { ["step"] = 7, ["config"] = c.Dump() });

        const string prompt = "In the beginning";
        string Expected(GPTLMHeadModel m)
        {
            var ids = TextTokenizer.Gpt2.Encode(prompt).Select(i => (long)i).ToArray();
            var t = SampleCommand.GenerateLong(m, tensor(ids, [1, ids.Length], ScalarType.Int64), 30, temperature: 0);
            return TextTokenizer.Gpt2.Decode(t[0].data<long>().Select(x => (int)x));
        }
        string[] Greedy(string path)
        {
            var (rc, o, err) = Cli("sample", "--device", "cpu", path, "--prompt", prompt, "--temperature", "0", "--max-new-tokens", "30", "--num-samples", "2");
            Assert.That(rc, Is.EqualTo(0), err);
            Assert.That(err, Does.Contain("60 tokens in").And.Contain("tokens/s"));
            var samples = o.Split(SampleCommand.Separator + Environment.NewLine, StringSplitOptions.RemoveEmptyEntries)
                .Select(s => s.TrimEnd('\r', '\n')).ToArray();
            Assert.That(samples, Has.Length.EqualTo(2), o);
            return samples;
        }
        Assert.That(Greedy(run), Is.All.EqualTo(Expected(final)));
        Assert.That(Greedy(ckpt), Is.All.EqualTo(Expected(mid)));
        Assert.That(Greedy(Path.Combine(run, "checkpoints", "last")), Is.All.EqualTo(Expected(mid)));
        Assert.That(Expected(mid), Is.Not.EqualTo(Expected(final)), "the two models must differ for the test to tell them apart");

        // sampling: the seed decides the text
        string[] Sampled(string seed) => Cli("sample", "--device", "cpu", run, "--seed", seed, "--temperature", "1", "--top-k", "0", "--max-new-tokens", "12", "--num-samples", "1").stdout
            .Split(Environment.NewLine);
        Assert.That(Sampled("3"), Is.EqualTo(Sampled("3")));
        Assert.That(Sampled("3"), Is.Not.EqualTo(Sampled("4")));
    }

    [Test]
    public void SamplesAHuggingFaceGpt2FolderAndASafetensorsFile()
    {
        // GPT-2's layout at a small size: what `huggingface-cli download gpt2 config.json model.safetensors` gives
        var cfg = new GPTConfig { n_layer = 1, n_embd = 32, n_head = 2, n_positions = 32 };
        manual_seed(3);
        using var src = new GPTLMHeadModel(cfg.WithFusions(false));
        var hf = Path.Combine(_root, "gpt2");
        Directory.CreateDirectory(hf);
        File.WriteAllText(Path.Combine(hf, "config.json"), """
            {"activation_function": "gelu_new", "architectures": ["GPT2LMHeadModel"], "attn_pdrop": 0.1, "bos_token_id": 50256,
             "embd_pdrop": 0.1, "eos_token_id": 50256, "initializer_range": 0.02, "layer_norm_epsilon": 1e-05, "model_type": "gpt2",
             "n_ctx": 32, "n_embd": 32, "n_head": 2, "n_inner": null, "n_layer": 1, "n_positions": 32, "resid_pdrop": 0.1,
             "scale_attn_weights": true, "summary_activation": null, "summary_type": "cls_index", "summary_use_proj": true,
             "task_specific_params": {"text-generation": {"do_sample": true, "max_length": 50}}, "use_cache": true, "vocab_size": 50257}
            """);
        var tensors = new List<KeyValuePair<string, Tensor>>();
        foreach (var (name, p) in src.named_parameters())
        {
            var key = name["transformer.".Length..];
            var t = p.detach();
            if (key == "wte.weight") t = t[..50257]; // the Hub's file holds the unpadded vocabulary
            if (key.EndsWith("c_attn.weight") || key.EndsWith("c_proj.weight") || key.EndsWith("c_fc.weight")) t = t.t(); // Conv1D
            tensors.Add(new(key, t.contiguous()));
        }
        tensors.Add(new("h.0.attn.bias", ones(1, 1, 32, 32).tril()));
        SafeTensors.Save(Path.Combine(hf, "model.safetensors"), tensors, new Dictionary<string, string> { ["format"] = "pt" });
        var file = Path.Combine(_root, "ours.safetensors");
        src.save_safetensors(file);

        var ids = TextTokenizer.Gpt2.Encode("Hello, my dog").Select(i => (long)i).ToArray();
        var expected = TextTokenizer.Gpt2.Decode(SampleCommand.GenerateLong(src, tensor(ids, [1, ids.Length], ScalarType.Int64), 40, temperature: 0)[0]
            .data<long>().Select(x => (int)x));
        foreach (var model in new[] { hf, file })
        {
            var (rc, o, err) = Cli("sample", "--device", "cpu", model, "--prompt", "Hello, my dog", "--temperature", "0", "--max-new-tokens", "40", "--num-samples", "1");
            Assert.That(rc, Is.EqualTo(0), err);
            Assert.That(o, Is.EqualTo(expected + Environment.NewLine + SampleCommand.Separator + Environment.NewLine), model);
        }

        // another architecture's folder, and a model whose vocabulary is not the tokenizer's
        File.WriteAllText(Path.Combine(hf, "config.json"), """{"model_type": "llama", "hidden_size": 32}""");
        var (rc2, _, err2) = Cli("sample", "--device", "cpu", hf);
        Assert.That(rc2, Is.EqualTo(1));
        Assert.That(err2, Does.Contain("model_type llama").And.Contain("GPT-2"));
        using var small = new GPTLMHeadModel(GPTConfig.Named("tiny"));
        small.save_safetensors(file);
        (rc2, _, err2) = Cli("sample", "--device", "cpu", file);
        Assert.That(rc2, Is.EqualTo(1));
        Assert.That(err2, Does.Contain("vocab_size is 256").And.Contain("50257"));
    }

    [Test]
    public void ExportWritesAHuggingFaceGpt2FolderThatLoadsBack()
    {
        // flash-attention's layer-index scaling and a non-default MLP width travel in config.json
        var cfg = new GPTConfig { n_layer = 2, n_embd = 32, n_head = 2, n_positions = 32, n_inner = 96, scale_attn_by_inverse_layer_idx = true };
        manual_seed(5);
        using var src = new GPTLMHeadModel(cfg.WithFusions(false));
        var file = Path.Combine(_root, "ours.safetensors");
        src.save_safetensors(file);
        var hf = Path.Combine(_root, "hf");
        var (rc, o, err) = Cli("export", file, hf);
        Assert.That(rc, Is.EqualTo(0), err);
        Assert.That(o, Does.Contain("config.json and model.safetensors"));

        var json = System.Text.Json.Nodes.JsonNode.Parse(File.ReadAllText(Path.Combine(hf, "config.json")))!;
        Assert.That((json["model_type"]!.GetValue<string>(), json["n_inner"]!.GetValue<long>(), json["scale_attn_by_inverse_layer_idx"]!.GetValue<bool>(),
            json["vocab_size"]!.GetValue<long>()), Is.EqualTo(("gpt2", 96L, true, 50257L)));
        var (infos, _) = SafeTensors.ReadHeader(Path.Combine(hf, "model.safetensors"));
        Assert.That(infos["transformer.wte.weight"].shape, Is.EqualTo(new long[] { 50257, 32 }), "the vocabulary without padding rows");
        Assert.That(infos["transformer.h.0.attn.c_attn.weight"].shape, Is.EqualTo(new long[] { 32, 96 }), "Conv1D layout (in, out)");
        Assert.That(infos["transformer.h.1.mlp.c_fc.weight"].dtype, Is.EqualTo("F32"));
        Assert.That(infos.Keys, Has.None.EqualTo("lm_head.weight"), "tied: left to the tie, as transformers saves it");

        // read back as a Hugging Face folder: the same model, the same greedy text
        var ids = tensor(new long[] { 464, 3290, 318 }, [1, 3], ScalarType.Int64);
        var source = GptSource.Open(hf);
        using var back = new GPTLMHeadModel(source.Config.WithFusions(false));
        source.LoadInto(back);
        Assert.That(Same(SampleCommand.GenerateLong(back, ids, 20, temperature: 0), SampleCommand.GenerateLong(src, ids, 20, temperature: 0)), Is.True);

        using var rotary = new GPTLMHeadModel((cfg with { rotary_emb_fraction = 0.5 }).WithFusions(false));
        rotary.save_safetensors(file);
        (rc, _, err) = Cli("export", file, Path.Combine(_root, "hf-rotary"));
        Assert.That(rc, Is.EqualTo(1));
        Assert.That(err, Does.Contain("rotary model has no Hugging Face GPT-2 form"));
    }

    [Test]
    public void BadTensorsAreArgumentExceptionsNamingTheArgument()
    {
        using var model = NewModel(SmallConfig(), 1);
        void Names(string argument, TestDelegate call) => Assert.That(Assert.Throws<ArgumentException>(call)!.ParamName, Is.EqualTo(argument));
        Names("ids", () => SampleCommand.GenerateLong(model, zeros([4], ScalarType.Int64), 2));
        Names("ids", () => SampleCommand.GenerateLong(model, zeros([1, 3], ScalarType.Float32), 2));
        Names("maxNewTokens", () => SampleCommand.GenerateLong(model, zeros([1, 3], ScalarType.Int64), -1));
        Names("posEmbed", () => VisionTransformer.ResamplePositions(zeros(1, 16, 8), 4)); // no class-token row: 15 is not a square
        Names("posEmbed", () => VisionTransformer.ResamplePositions(zeros(17, 8), 4));
        Names("grid", () => VisionTransformer.ResamplePositions(zeros(1, 17, 8), 0));
        using var opt = TrainingOptimizer.Create(model.parameter_groups(), Precision.Bf16);
        Names("value", () => opt.set_master_weight(model.named_parameters().First().parameter, zeros(3, 3)));
    }

    [Test]
    public void WrongFoldersAndOptionsAreErrorsThatSayWhatToDo()
    {
        var (rc, _, err) = Cli("sample", "--device", "cpu", Path.Combine(_root, "missing"));
        Assert.That(rc, Is.EqualTo(1));
        Assert.That(err, Does.Contain("is not a run folder").And.Contain("flashattn train").And.Contain("Hugging Face GPT-2 folder"));
        var vit = Path.Combine(_root, "vit");
        Directory.CreateDirectory(vit);
        File.WriteAllText(Path.Combine(vit, "config.yaml"), ExperimentConfig.Parse(["experiment=imagefolder/vit-ti16"]).Dump());
        File.WriteAllText(Path.Combine(vit, "model.safetensors"), "");
        (rc, _, err) = Cli("sample", "--device", "cpu", vit);
        Assert.That(rc, Is.EqualTo(1));
        Assert.That(err, Does.Contain("task=image_classification").And.Contain("task=lm"));
        (rc, _, err) = Cli("sample", "--device", "cpu", "--top-p", "1.5");
        Assert.That(err, Does.Contain("--top-p 1.5"));
        (rc, _, err) = Cli("sample", "--device", "cpu", "--temprature", "1");
        Assert.That(rc, Is.EqualTo(1));
        Assert.That(err, Does.Contain("--temprature").And.Contain("--temperature"));
        (rc, _, err) = Cli("sample", "--device", "cpu", "--device", "tpu");
        Assert.That(err, Does.Contain("valid: auto, cpu, cuda"));
        (rc, var o, _) = Cli("sample", "--device", "cpu", "--help");
        Assert.That(rc, Is.EqualTo(0));
        Assert.That(o, Does.Contain("--max-new-tokens"));
    }

    static bool Same(Tensor a, Tensor b) => a.shape.SequenceEqual(b.shape) && a.eq(b).all().item<bool>();

    static (int rc, string stdout, string stderr) Cli(params string[] args)
    {
        var o = new StringWriter(); var e = new StringWriter();
        return (CliApp.Run(args, o, e), o.ToString(), e.ToString());
    }
}
