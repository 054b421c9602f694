// GPT-2 checkpoints in and out: Hugging Face GPT-2 folders (config.json, model.safetensors) and our own safetensors files,
// which keep Hugging Face's layout (Conv1D weights stored (in, out)) with the config as metadata.
using System.Text.Json;
using TorchSharp;
using static TorchSharp.torch;

namespace FlashAttn.Models;

public sealed partial record GPTConfig
{
    /// <summary>The config stored in a checkpoint's metadata by <see cref="GPTLMHeadModel.save_safetensors"/>.</summary>
    /// <exception cref="InvalidDataException">The file has no flashattn.config metadata (e.g. a Hugging Face checkpoint).</exception>
    public static GPTConfig FromSafetensors(string path)
    {
        var (_, meta) = SafeTensors.ReadHeader(path);
        if (!meta.TryGetValue("flashattn.config", out var json))
            throw new InvalidDataException($"{path}: no flashattn.config metadata (not written by GPTLMHeadModel.save_safetensors)");
        if (meta.TryGetValue("flashattn.model", out var model) && model != "GPTLMHeadModel")
            throw new InvalidDataException($"{path} holds a {model}, not a GPTLMHeadModel");
        return JsonSerializer.Deserialize<GPTConfig>(json) ?? throw new InvalidDataException($"{path}: empty flashattn.config");
    }

    /// <summary>
    /// The config.json of a Hugging Face GPT-2 checkpoint folder (GPT2Config, model_type "gpt2": gpt2, gpt2-medium, ...,
    /// distilgpt2). Its keys are ours (n_inner null: 4 n_embd, as there; scale_attn_by_inverse_layer_idx false unless set);
    /// the fusions are on and the vocabulary is padded as ours (the checkpoint's unpadded wte loads into it).
    /// </summary>
    /// <exception cref="InvalidDataException">Not a GPT-2 config (another model_type, or sizes that do not make a model).</exception>
    public static GPTConfig FromHuggingFace(string configJsonPath)
    {
        var json = File.ReadAllText(configJsonPath);
        try
        {
            var modelType = System.Text.Json.Nodes.JsonNode.Parse(json)?["model_type"] is System.Text.Json.Nodes.JsonValue v && v.TryGetValue<string>(out var t) ? t : null;
            if (modelType != "gpt2")
                throw new InvalidDataException($"{configJsonPath}: model_type {modelType ?? "(none)"}; a Hugging Face GPT-2 config (model_type gpt2) expected");
            var config = JsonSerializer.Deserialize<GPTConfig>(json) ?? throw new InvalidDataException($"{configJsonPath}: empty");
            config.Validate();
            return config;
        }
        catch (Exception e) when (e is JsonException or ArgumentException) { throw new InvalidDataException($"{configJsonPath}: {e.Message}"); }
    }

}

public sealed partial class GPTLMHeadModel
{

    private static readonly string[] s_conv1d = { ".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight" };
    private static bool IsConv1D(string name) => s_conv1d.Any(name.EndsWith);

    /// <summary>
    /// Loads a Hugging Face GPT-2 checkpoint (model.safetensors of GPT2LMHeadModel or GPT2Model: with or without the
    /// "transformer." prefix, Conv1D weights (in, out), attention mask buffers, an unpadded vocabulary) or a file written by
    /// <see cref="save_safetensors"/>. Every parameter must be present with a compatible shape; values are converted to the
    /// model's dtype and device. wte may have fewer rows than padded_vocab_size (the padding rows keep their values).
    /// </summary>
    public void load_safetensors(string path) => SafeTensors.LoadInto(this, path, "GPT", (key, t) =>
    {
        if (key.EndsWith(".attn.bias") || key.EndsWith(".attn.masked_bias")) return null; // HF's causal-mask buffers
        var name = key.StartsWith("transformer.") || key.StartsWith("lm_head.") ? key : "transformer." + key;
        if (name == "lm_head.weight" && config.tie_word_embeddings) return null; // the tied copy
        return (name, IsConv1D(name) ? t.t() : t);
    }, name => name is "transformer.wte.weight" or "lm_head.weight");

    /// <summary>Writes the parameters in Hugging Face GPT-2 layout (names with "transformer.", Conv1D weights (in, out),
    /// no lm_head.weight when tied) in the model's dtype, the padded wte included, with the config as metadata.</summary>
    public void save_safetensors(string path)
    {
        using var scope = NewDisposeScope();
        var tensors = named_parameters().Select(np =>
            new KeyValuePair<string, Tensor>(np.name, (IsConv1D(np.name) ? np.parameter.detach().t() : np.parameter.detach()).contiguous().cpu()));
        var meta = new Dictionary<string, string>
        {
            ["format"] = "pt",
            ["flashattn.model"] = "GPTLMHeadModel",
            ["flashattn.config"] = JsonSerializer.Serialize(config),
        };
        SafeTensors.Save(path, tensors, meta);
    }

    /// <summary>
    /// Writes a Hugging Face GPT-2 folder, as transformers' save_pretrained: config.json (GPT2Config) and model.safetensors
    /// in float32 with the unpadded vocabulary (lm_head left to the tie when tied). GPT2LMHeadModel.from_pretrained(dir)
    /// and <see cref="GPTConfig.FromHuggingFace"/> read it. GPT-2 has no rotary embedding and no head_dim of its own:
    /// such models have no GPT-2 form.
    /// </summary>
    public void save_pretrained(string dir)
    {
        var c = config;
        if (c.rotary_emb_fraction > 0) throw new NotSupportedException("a rotary model has no Hugging Face GPT-2 form (GPT-2 has learned positions)");
        if (c.head_dim * c.n_head != c.n_embd)
            throw new NotSupportedException($"head_dim {c.head_dim} × n_head {c.n_head} != n_embd {c.n_embd}: GPT-2 derives the head size from n_embd");
        Directory.CreateDirectory(dir);
        using (var scope = NewDisposeScope())
        {
            var tensors = named_parameters().Select(np =>
            {
                var t = np.parameter.detach();
                if (np.name is "transformer.wte.weight" or "lm_head.weight") t = t.narrow(0, 0, c.vocab_size); // padding rows dropped
                if (IsConv1D(np.name)) t = t.t();
                return new KeyValuePair<string, Tensor>(np.name, t.to(ScalarType.Float32).contiguous().cpu());
            });
            SafeTensors.Save(Path.Combine(dir, "model.safetensors"), tensors, new Dictionary<string, string> { ["format"] = "pt" });
        }
        var json = new System.Text.Json.Nodes.JsonObject
        {
            ["architectures"] = new System.Text.Json.Nodes.JsonArray("GPT2LMHeadModel"), ["model_type"] = "gpt2",
            ["vocab_size"] = c.vocab_size, ["n_positions"] = c.n_positions, ["n_ctx"] = c.n_positions, ["n_embd"] = c.n_embd,
            ["n_layer"] = c.n_layer, ["n_head"] = c.n_head, ["n_inner"] = c.n_inner == 4 * c.n_embd ? null : c.n_inner,
            ["activation_function"] = c.activation_function, ["resid_pdrop"] = c.resid_pdrop, ["embd_pdrop"] = c.embd_pdrop,
            ["attn_pdrop"] = c.attn_pdrop, ["layer_norm_epsilon"] = c.layer_norm_epsilon, ["initializer_range"] = c.initializer_range,
            ["scale_attn_weights"] = c.scale_attn_weights, ["scale_attn_by_inverse_layer_idx"] = c.scale_attn_by_inverse_layer_idx,
            ["tie_word_embeddings"] = c.tie_word_embeddings, ["bos_token_id"] = c.vocab_size - 1, ["eos_token_id"] = c.vocab_size - 1,
            ["torch_dtype"] = "float32",
        };
        File.WriteAllText(Path.Combine(dir, "config.json"), json.ToJsonString(new JsonSerializerOptions { WriteIndented = true }));
    }
}
