using System.Text.Json.Nodes;
using FlashAttn.Models.Data;
using TorchSharp;
using static TorchSharp.torch;

namespace FlashAttn.Models.Training;

/// <summary>
/// A GPT's weights on disk, in each form this project reads: a run folder (config.yaml + model.safetensors, what
/// `flashattn train` writes when it ends), a checkpoint folder (trainer.json + state.bin: the fp32 master weights) or a
/// run's checkpoints/last pointer, a Hugging Face GPT-2 folder (config.json + model.safetensors: a download of gpt2,
/// gpt2-medium, ..., distilgpt2), or one .safetensors file written by GPTLMHeadModel.save_safetensors.
/// `flashattn sample` generates from one, `flashattn export` converts one to a Hugging Face folder, and model.init_from
/// starts a training run from one (fine-tuning).
/// </summary>
public sealed class GptSource
{
    readonly Action<GPTLMHeadModel> _load;

    GptSource(string path, string name, GPTConfig config, string tokenizer, Precision precision, RunConfig? run, Action<GPTLMHeadModel> load)
    {
        Path = path; Name = name; Config = config; Tokenizer = tokenizer; Precision = precision; Run = run; _load = load;
    }

    public string Path { get; }
    /// <summary>What it is, for logs: "GPT tiny", "Hugging Face GPT-2 (n_layer 12, n_embd 768)".</summary>
    public string Name { get; }
    /// <summary>The architecture, with the run's switches (fusions, dropout) where it is a run of ours.</summary>
    public GPTConfig Config { get; }
    /// <summary>The tokenizer its vocabulary belongs to (<see cref="TextTokenizer.Get"/>).</summary>
    public string Tokenizer { get; }
    /// <summary>The precision it trained in: a run's trainer.precision; bf16 for the others (the kernels' type).</summary>
    public Precision Precision { get; }
    /// <summary>The run's configuration, for a run or checkpoint folder.</summary>
    public RunConfig? Run { get; }

    /// <summary>Copies the weights into <paramref name="model"/> (any dtype and device; the sizes must be <see cref="Config"/>'s).</summary>
    public void LoadInto(GPTLMHeadModel model) => _load(model);

    /// <summary><see cref="Config"/> for a model on <paramref name="device"/>: a CPU turns the fusions off unless the run set them.</summary>
    public GPTConfig ForDevice(Device device, TextWriter log) => DevicePolicy.Fusions(Config, Run?.Model.Overrides, device, log);

    public static GptSource Open(string path) => Open(path, 0);

    static GptSource Open(string path, int depth)
    {
        path = Checkpoint.Pin(path); // checkpoints/last: the folder the pointer names now
        string In(string name) => System.IO.Path.Combine(path, name);
        if (File.Exists(In("trainer.json")))
        {
            var state = ReadJson(In("trainer.json"));
            var dump = state["config"] is JsonValue d && d.TryGetValue<string>(out var text) ? text
                : throw new InvalidDataException($"{path}/trainer.json holds no configuration");
            var run = LmRun(dump, path);
            // the model's config as the run built it; checkpoints written before it was saved there: the run's keys again
            var config = state["model_config"] is JsonValue mc && mc.TryGetValue<string>(out var json)
                ? Deserialize(json, In("trainer.json")) : ArchitectureOf(run, path, depth);
            return FromRun(path, run, config, model => LoadMasters(model, path));
        }
        if (File.Exists(In("config.yaml")) && File.Exists(In("model.safetensors")))
        {
            // the weights file holds the exact config the run trained; a 16-bit run's final checkpoint holds its weights in
            // float32 (the masters), its model.safetensors in 16 bits
            var run = LmRun(File.ReadAllText(In("config.yaml")), path);
            var config = GPTConfig.FromSafetensors(In("model.safetensors"));
            var final = System.IO.Path.Combine(path, RunFolder.CheckpointsDir, $"step-{run.Trainer.MaxSteps:D7}");
            Action<GPTLMHeadModel> load = run.Trainer.Precision != Precision.Fp32 && File.Exists(System.IO.Path.Combine(final, "state.bin"))
                ? model => LoadMasters(model, final) : model => model.load_safetensors(In("model.safetensors"));
            return FromRun(path, run, config, load);
        }
        if (File.Exists(In("config.json")) && File.Exists(In("model.safetensors")))
        {
            var hf = GPTConfig.FromHuggingFace(In("config.json"));
            return new GptSource(path, $"Hugging Face GPT-2 (n_layer {hf.n_layer}, n_embd {hf.n_embd})", hf, "gpt2", Precision.Bf16, null,
                model => model.load_safetensors(In("model.safetensors")));
        }
        if (File.Exists(path) && path.EndsWith(".safetensors", StringComparison.Ordinal))
        {
            var saved = GPTConfig.FromSafetensors(path).WithFusions(true); // the device decides them (ForDevice)
            return new GptSource(path, $"GPT (n_layer {saved.n_layer}, n_embd {saved.n_embd})", saved, "gpt2", Precision.Bf16, null,
                model => model.load_safetensors(path));
        }
        throw new FileNotFoundException($"{path} is not a run folder (config.yaml and model.safetensors, written when `flashattn train` " +
            "ends), a checkpoint folder (trainer.json: checkpoints/step-NNNNNNN, or checkpoints/last), a Hugging Face GPT-2 folder " +
            "(config.json and model.safetensors) or a .safetensors file of GPTLMHeadModel");
    }

    // The switches are the run's keys over all-on (a run on a CPU saved its fusions off; on a GPU they belong on).
    static GptSource FromRun(string path, RunConfig c, GPTConfig config, Action<GPTLMHeadModel> load) =>
        new(path, c.Model.InitFrom is { } from ? $"GPT fine-tuned from {from}" : $"GPT {c.Model.Name}",
            c.Model.Overrides.ApplySwitches(config.WithFusions(true)), c.Data.Tokenizer, c.Trainer.Precision, c, load);

    // The run's keys build the model again, from the weights it was fine-tuned from if so.
    static GPTConfig ArchitectureOf(RunConfig c, string path, int depth)
    {
        if (c.Model.InitFrom is not { } from) return c.Model.Gpt(TextTokenizer.Get(c.Data.Tokenizer).VocabSize);
        if (depth >= 8) throw new InvalidDataException($"{path}: model.init_from leads through more than 8 runs (a loop?)");
        try { return Open(from, depth + 1).Config; }
        catch (FileNotFoundException e) { throw new FileNotFoundException($"{path}: its run was fine-tuned from {from}, which holds its architecture: {e.Message}"); }
    }

    static JsonObject ReadJson(string file)
    {
        try { return JsonNode.Parse(File.ReadAllText(file)) as JsonObject ?? throw new InvalidDataException($"{file}: not a JSON object"); }
        catch (System.Text.Json.JsonException e) { throw new InvalidDataException($"{file}: {e.Message}"); }
    }

    static GPTConfig Deserialize(string json, string file)
    {
        try { return System.Text.Json.JsonSerializer.Deserialize<GPTConfig>(json) ?? throw new InvalidDataException($"{file}: empty model_config"); }
        catch (System.Text.Json.JsonException e) { throw new InvalidDataException($"{file}: model_config: {e.Message}"); }
    }

    // A run's saved configuration (config.yaml, or a checkpoint's copy of it), which must be a GPT language-model run's.
    static RunConfig LmRun(string dump, string path)
    {
        var config = ExperimentConfig.FromDump(dump, path);
        if (config["task"] != "lm")
            throw new InvalidDataException($"{path}: task={config["task"]}; a GPT language-model run (task=lm) expected");
        return config.Bind();
    }

    static void LoadMasters(GPTLMHeadModel model, string dir)
    {
        var tensors = Checkpoint.ReadTensors(System.IO.Path.Combine(dir, "state.bin"), name => name.StartsWith("master.", StringComparison.Ordinal));
        try
        {
            using var _ = no_grad();
            foreach (var (name, p) in model.named_parameters())
            {
                if (!tensors.TryGetValue("master." + name, out var t)) throw new InvalidDataException($"{dir}: the checkpoint has no master.{name}");
                if (!t.shape.SequenceEqual(p.shape))
                    throw new InvalidDataException($"{dir}: master.{name} is [{string.Join(", ", t.shape)}], the model's {name} [{string.Join(", ", p.shape)}]");
                p.copy_(t);
            }
        }
        finally { foreach (var t in tensors.Values) t.Dispose(); }
    }
}
