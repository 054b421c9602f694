using System.Text.Json.Nodes;
using FlashAttn.Models.Data;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace FlashAttn.Models.Training;

/// <summary>GPT language modelling on a token cache (<see cref="TokenCache"/>), prepared on first use
/// from datamodule.sources like the seed's datamodule.</summary>
public sealed class LanguageModelingTask : ITrainingTask
{
    readonly GPTLMHeadModel _model;
    InitialWeights? _initial;
    readonly TokenArray _train, _val;
    readonly LmBatchSampler _sampler;
    readonly Device _device;
    readonly int _seqlen;
    readonly TextWriter _log;
    bool _attentionLogged;

    public LanguageModelingTask(ExperimentConfig c, Device device, ScalarType dtype, TextWriter log)
    {
        (_device, _log) = (device, log);
        _seqlen = checked((int)c.Int("datamodule.max_length"));
        var tokenizer = TextTokenizer.Get(c.Str("datamodule.tokenizer"));
        var dataDir = c["datamodule.data_dir"] ?? TokenCache.DefaultDataDir;
        var name = c.Str("datamodule.dataset");
        var dir = TokenCache.PathFor(dataDir, name);
        var split = new PrepareOptions { Tokenizer = tokenizer.Name, ValRatio = c.Float("datamodule.val_ratio"), ValSplitSeed = c.Int("datamodule.val_split_seed") };
        if (!TokenCache.IsComplete(dir))
        {
            // a relative source that does not exist from the working directory is looked up under the data folder
            var sources = c.Str("datamodule.sources").Split(',', StringSplitOptions.TrimEntries | StringSplitOptions.RemoveEmptyEntries)
                .Select(s => s.StartsWith(CorpusReader.EmbeddedPrefix) || Path.IsPathRooted(s) || File.Exists(s) || Directory.Exists(s) ? s : Path.Combine(dataDir, s))
                .ToList();
            foreach (var s in sources)
                if (!s.StartsWith(CorpusReader.EmbeddedPrefix) && !File.Exists(s) && !Directory.Exists(s))
                    throw new FileNotFoundException($"token cache {dir} is missing and its source {s} (datamodule.sources) does not exist: put the corpus there (e.g. OpenWebText's parquet files from the Hub, the Pile's .jsonl.zst) or run `flashattn prepare {name} <inputs...> --val-ratio {split.ValRatio.ToString(System.Globalization.CultureInfo.InvariantCulture)}`, or set datamodule.sources");
            log.WriteLine($"token cache {dir} missing: preparing it from {string.Join(", ", sources)}");
            TokenCache.Prepare(dataDir, name, sources, split, log);
        }
        TokenCacheMeta meta;
        (_train, _val, meta) = TokenCache.Open(dir, tokenizer);
        // a warning, not an error: the cache's split is a sound one, only not the one asked for, and preparing again
        // (hours for OpenWebText) is the user's call
        if (TokenCache.SplitDifferences(meta, split) is { Count: > 0 } differences)
            log.WriteLine($"warning: token cache {dir} was prepared with another split, which this run uses as it is: " +
                $"{string.Join(", ", differences)} (in parentheses: this run's datamodule settings); delete {dir} to prepare it again with them");
        GptSource? init = null;
        if (c["model.init_from"] is { } from)
        {
            // fine-tuning: the architecture is the weights'; the run's keys set the switches (fusions, dropout)
            init = GptSource.Open(from);
            if (init.Tokenizer != tokenizer.Name || init.Config.vocab_size != meta.VocabSize)
                throw new ConfigException($"model.init_from={from}: its vocabulary ({init.Tokenizer}, {init.Config.vocab_size}) is not the token cache's " +
                    $"({tokenizer.Name}, {meta.VocabSize})");
            // the sizes are the weights' (as nanoGPT's init_from); an experiment's size keys (tiny sets them) give way
            if (WithSizeKeys(init.Config, c) != init.Config)
                log.WriteLine($"warning: model.init_from={from} fixes the model's sizes (n_layer {init.Config.n_layer}, n_embd {init.Config.n_embd}, " +
                    $"n_head {init.Config.n_head}, n_positions {init.Config.n_positions}, rotary_emb_fraction {init.Config.rotary_emb_fraction}); " +
                    "the model.config size keys that differ are ignored");
            Config = FusionsFor(WithSwitchKeys(init.Config, c), c, device, log);
        }
        else Config = ModelConfigFor(c, meta.VocabSize, device, log);
        if (Config.rotary_emb_fraction == 0 && Config.n_positions < _seqlen)
            throw new ConfigException($"datamodule.max_length={_seqlen} exceeds the model's n_positions={Config.n_positions}; set model.config.n_positions or a shorter datamodule.max_length");
        _sampler = new LmBatchSampler(_train, _seqlen, c.Int("seed"));
        if (_val.Length <= _seqlen)
            log.WriteLine($"warning: the validation split of {dir} has {_val.Length} tokens, not one sequence of {_seqlen + 1}: no validation. " +
                (meta.ValRatio == 0 ? "It was prepared with datamodule.val_ratio=0" : "Delete the cache and prepare it again with a larger datamodule.val_ratio"));
        _model = new GPTLMHeadModel(Config, device, dtype);
        if (init is not null && c["resume"] is not null)
            log.WriteLine($"model.init_from: the architecture of {init.Path}; the weights come from the resumed checkpoint");
        else if (init is not null)
        {
            var fp32 = new GPTLMHeadModel(init.Config.WithFusions(false), CPU, ScalarType.Float32);
            init.LoadInto(fp32);
            _initial = new InitialWeights(fp32, _model);
            log.WriteLine($"model.init_from: weights of {init.Name} from {init.Path}");
        }
        Parameters = _model.parameter_groups().ToList();
        FlopsPerSample = _model.flops_per_token(_seqlen) * _seqlen;
        Description = (init is null ? $"GPT {c.Str("model.name")}" : $"GPT from {init.Path}") + $" (n_layer {Config.n_layer}, n_embd {Config.n_embd}, n_head {Config.n_head}, " +
            $"{_model.num_parameters() / 1e6:F1}M parameters, {_model.num_parameters(true) / 1e6:F1}M without embeddings) on {name} " +
            $"({meta.TrainTokens:N0} train / {meta.ValTokens:N0} val tokens, {_sampler.NumSequences:N0} sequences of {_seqlen})";
    }

    static readonly string[] FusionKeys = ["model.config.use_flash_attn", "model.config.fused_bias_fc", "model.config.fused_mlp",
        "model.config.fused_dropout_add_ln", "model.config.fused_cross_entropy"];

    /// <summary><see cref="BuildModelConfig"/> for a model on <paramref name="device"/> (<see cref="FusionsFor"/>).</summary>
    public static GPTConfig ModelConfigFor(ExperimentConfig c, int vocabSize, Device device, TextWriter log) =>
        FusionsFor(BuildModelConfig(c, vocabSize), c, device, log);

    /// <summary>On a CPU the fusions are off unless a model.config key of <paramref name="c"/> sets them (the fused
    /// kernels are CUDA; their reference paths are slower there than the plain modules).</summary>
    public static GPTConfig FusionsFor(GPTConfig config, ExperimentConfig? c, Device device, TextWriter log)
    {
        if (device.type != DeviceType.CPU || c is not null && FusionKeys.Any(k => c[k] is not null)) return config;
        log.WriteLine("CPU: fused kernels off (set model.config.use_flash_attn etc. to force them)");
        return config.WithFusions(false);
    }

    /// <summary>GPTConfig.Named(model.name) with the model.config.* overrides and the cache's vocabulary.</summary>
    public static GPTConfig BuildModelConfig(ExperimentConfig c, int vocabSize) =>
        WithSwitchKeys(WithSizeKeys(GPTConfig.Named(c.Str("model.name")) with { vocab_size = vocabSize }, c), c);

    /// <summary>The model.config size keys (n_layer, n_embd, n_head, n_positions, rotary_emb_fraction) that are set.</summary>
    public static GPTConfig WithSizeKeys(GPTConfig g, ExperimentConfig c)
    {
        if (c.IntOrNull("model.config.n_layer") is { } l) g = g with { n_layer = l };
        if (c.IntOrNull("model.config.n_embd") is { } e) g = g with { n_embd = e };
        if (c.IntOrNull("model.config.n_head") is { } h) g = g with { n_head = h };
        if (c.IntOrNull("model.config.n_positions") is { } p) g = g with { n_positions = p };
        if (c.FloatOrNull("model.config.rotary_emb_fraction") is { } r) g = g with { rotary_emb_fraction = r };
        return g;
    }

    /// <summary>The model.config training switches (dropout, the fusions, residual_in_fp32, mlp_checkpoint_lvl) that are set.</summary>
    public static GPTConfig WithSwitchKeys(GPTConfig g, ExperimentConfig c)
    {
        if (c.FloatOrNull("model.config.dropout") is { } d) g = g with { resid_pdrop = d, embd_pdrop = d, attn_pdrop = d };
        if (c.BoolOrNull("model.config.use_flash_attn") is { } fa) g = g with { use_flash_attn = fa };
        if (c.BoolOrNull("model.config.fused_bias_fc") is { } fb) g = g with { fused_bias_fc = fb };
        if (c.BoolOrNull("model.config.fused_mlp") is { } fm) g = g with { fused_mlp = fm };
        if (c.BoolOrNull("model.config.fused_dropout_add_ln") is { } fl) g = g with { fused_dropout_add_ln = fl };
        if (c.BoolOrNull("model.config.fused_cross_entropy") is { } fc) g = g with { fused_cross_entropy = fc };
        if (c.BoolOrNull("model.config.residual_in_fp32") is { } rf) g = g with { residual_in_fp32 = rf };
        if (c.IntOrNull("model.config.mlp_checkpoint_lvl") is { } lvl) g = g with { mlp_checkpoint_lvl = (int)lvl };
        return g;
    }

    public GPTConfig Config { get; }
    public GPTLMHeadModel GPT => _model;
    public string Description { get; }
    public nn.Module Model => _model;
    public IReadOnlyList<(string name, Parameter parameter, bool weight_decay)> Parameters { get; }
    public string Unit => "tok";
    public long UnitsPerSample => _seqlen;
    public double FlopsPerSample { get; }

    public JsonNode SamplerState
    {
        get => new JsonObject { ["epoch"] = _sampler.State.Epoch, ["position"] = _sampler.State.Position };
        set => _sampler.State = new SamplerState(value["epoch"]!.GetValue<long>(), value["position"]!.GetValue<long>());
    }

    public Tensor TrainLoss(int batchSize)
    {
        var loss = Loss(_sampler.Next(batchSize), batchSize);
        if (!_attentionLogged && Config.use_flash_attn)
        {
            // the path flash_attn_func took (our kernels, libtorch's SDPA or the reference; FLASHATTN_ATTENTION_BACKEND)
            _log.WriteLine($"attention: {flash_attn.last_attention_backend}");
            _attentionLogged = true;
        }
        return loss;
    }

    // No dispose scope here: custom autograd functions keep C# handles of what they save for
    // backward; the trainer's per-step scope frees everything after backward.
    Tensor Loss(long[] rows, int batchSize)
    {
        var x = tensor(rows, [batchSize, _seqlen + 1], ScalarType.Int64);
        // A copy from pageable memory waits for the GPU's queue to drain, so each micro-batch would start on an idle
        // GPU while the CPU launches its forward; from pinned memory the copy queues behind the previous work.
        // (PyTorch's pinned-host allocator keeps the buffer until the copy has run, even once x is disposed.)
        if (_device.type == DeviceType.CUDA) x = x.pin_memory().to(_device, non_blocking: true);
        var input = x.narrow(1, 0, _seqlen).contiguous();
        var labels = x.narrow(1, 1, _seqlen).contiguous();
        return _model.loss(input, labels);
    }

    public IReadOnlyDictionary<string, double> Evaluate(int batchSize, int maxBatches)
    {
        if (_val.Length <= _seqlen) return new Dictionary<string, double>();
        _model.eval();
        try
        {
            using var _ = no_grad();
            double sum = 0; int n = 0;
            int bs = (int)Math.Max(1, Math.Min(batchSize, (_val.Length - 1) / _seqlen));
            foreach (var rows in LmBatchSampler.Sequential(_val, _seqlen, bs, maxBatches))
            {
                using var scope = NewDisposeScope();
                var loss = Loss(rows, bs);
                sum += loss.to(ScalarType.Float32).item<float>();
                n++;
            }
            double mean = sum / Math.Max(1, n);
            return new Dictionary<string, double> { ["val_loss"] = mean, ["val_ppl"] = Math.Exp(mean) };
        }
        finally { _model.train(); }
    }

    public void SaveWeights(string path) => _model.save_safetensors(path);

    public string? ModelConfigJson => System.Text.Json.JsonSerializer.Serialize(Config);

    public void InitializeOptimizer(FusedAdamW optimizer) => _initial?.HandTo(optimizer, Parameters);

    public void Dispose()
    {
        _initial?.Dispose();
        _model.Dispose();
        _train.Dispose();
        _val.Dispose();
    }
}
