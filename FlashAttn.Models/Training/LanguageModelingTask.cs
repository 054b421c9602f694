using System.Text.Json.Nodes;
using FlashAttn.Models.Data;
using FlashAttn.Models.Distributed;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace FlashAttn.Models.Training;

/// <summary>GPT language modelling on a token cache (<see cref="TokenCache"/>), prepared on first use
/// from datamodule.sources like flash-attention's datamodule.</summary>
public sealed class LanguageModelingTask : ITrainingTask
{
    readonly GPTLMHeadModel _model;
    InitialWeights? _initial;
    readonly TokenArray _train, _val;
    readonly DistributedSampler _sampler;
    readonly Device _device;
    readonly int _seqlen;
    readonly TextWriter _log;
    bool _attentionLogged;

    public LanguageModelingTask(RunConfig c, Device device, ScalarType dtype, TextWriter log, DataShard? shard = null)
    {
        (_device, _log) = (device, log);
        var data = c.Data;
        _seqlen = data.MaxLength;
        var tokenizer = TextTokenizer.Get(data.Tokenizer);
        var dir = TokenCache.PathFor(data.DataDir, data.Dataset);
        var split = data.Split;
        if (!TokenCache.IsComplete(dir))
        {
            // a relative source that does not exist from the working directory is looked up under the data folder
            var sources = data.SourceList
                .Select(s => s.StartsWith(CorpusReader.EmbeddedPrefix) || Path.IsPathRooted(s) || File.Exists(s) || Directory.Exists(s) ? s : Path.Combine(data.DataDir, s))
                .ToList();
            foreach (var s in sources)
                if (!s.StartsWith(CorpusReader.EmbeddedPrefix) && !File.Exists(s) && !Directory.Exists(s))
                    throw new FileNotFoundException($"token cache {dir} is missing and its source {s} (datamodule.sources) does not exist: put the corpus there (e.g. OpenWebText's parquet files from the Hub, the Pile's .jsonl.zst) or run `flashattn prepare {data.Dataset} <inputs...> --val-ratio {split.ValRatio.ToString(System.Globalization.CultureInfo.InvariantCulture)}`, or set datamodule.sources");
            log.WriteLine($"token cache {dir} missing: preparing it from {string.Join(", ", sources)}");
            TokenCache.Prepare(data.DataDir, data.Dataset, sources, split, log);
        }
        TokenCacheMeta meta;
        (_train, _val, meta) = TokenCache.Open(dir, tokenizer);
        // a warning, not an error: the cache's split is a sound one, only not the one asked for, and preparing again
        // (hours for OpenWebText) is the user's call
        if (TokenCache.SplitDifferences(meta, split) is { Count: > 0 } differences)
            log.WriteLine($"warning: token cache {dir} was prepared with another split, which this run uses as it is: " +
                $"{string.Join(", ", differences)} (in parentheses: this run's datamodule settings); delete {dir} to prepare it again with them");
        var overrides = c.Model.Overrides;
        GptSource? init = null;
        if (c.Model.InitFrom is { } from)
        {
            // fine-tuning: the architecture is the weights'; the run's keys set the switches (fusions, dropout)
            init = GptSource.Open(from);
            if (init.Tokenizer != tokenizer.Name || init.Config.vocab_size != meta.VocabSize)
                throw new ConfigException($"model.init_from={from}: its vocabulary ({init.Tokenizer}, {init.Config.vocab_size}) is not the token cache's " +
                    $"({tokenizer.Name}, {meta.VocabSize})");
            // the sizes are the weights' (as nanoGPT's init_from); an experiment's size keys (tiny sets them) give way
            if (overrides.ChangesSizes(init.Config))
                log.WriteLine($"warning: model.init_from={from} fixes the model's sizes (n_layer {init.Config.n_layer}, n_embd {init.Config.n_embd}, " +
                    $"n_head {init.Config.n_head}, n_positions {init.Config.n_positions}, rotary_emb_fraction {init.Config.rotary_emb_fraction}); " +
                    "the model.config size keys that differ are ignored");
            Config = DevicePolicy.Fusions(overrides.ApplySwitches(init.Config), overrides, device, log);
        }
        else Config = DevicePolicy.Fusions(c.Model.Gpt(meta.VocabSize), overrides, device, log);
        if (Config.rotary_emb_fraction == 0 && Config.n_positions < _seqlen)
            throw new ConfigException($"datamodule.max_length={_seqlen} exceeds the model's n_positions={Config.n_positions}; set model.config.n_positions or a shorter datamodule.max_length");
        // one rank: LmBatchSampler's order itself; several: each rank its strided share of every global batch
        shard ??= DataShard.Single;
        _sampler = new DistributedSampler(_train, _seqlen, c.Seed, shard.Rank, shard.WorldSize);
        if (_val.Length <= _seqlen)
            log.WriteLine($"warning: the validation split of {dir} has {_val.Length} tokens, not one sequence of {_seqlen + 1}: no validation. " +
                (meta.ValRatio == 0 ? "It was prepared with datamodule.val_ratio=0" : "Delete the cache and prepare it again with a larger datamodule.val_ratio"));
        _model = new GPTLMHeadModel(Config, device, dtype);
        if (init is not null && c.Resume is not null)
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
        Description = (init is null ? $"GPT {c.Model.Name}" : $"GPT from {init.Path}") + $" (n_layer {Config.n_layer}, n_embd {Config.n_embd}, n_head {Config.n_head}, " +
            $"{_model.num_parameters() / 1e6:F1}M parameters, {_model.num_parameters(true) / 1e6:F1}M without embeddings) on {data.Dataset} " +
            $"({meta.TrainTokens:N0} train / {meta.ValTokens:N0} val tokens, {_sampler.TotalSequences:N0} sequences of {_seqlen})" +
            (shard.WorldSize > 1 ? $", rank {shard.Rank}'s share of {shard.WorldSize}" : "");
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

    public Tensor TrainLoss(int batchSize, Tensor lossGrad)
    {
        var loss = Loss(_sampler.Next(batchSize), batchSize, lossGrad);
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
    Tensor Loss(long[] rows, int batchSize, Tensor? lossGrad = null)
    {
        var x = tensor(rows, [batchSize, _seqlen + 1], ScalarType.Int64);
        // A copy from pageable memory waits for the GPU's queue to drain, so each micro-batch would start on an idle
        // GPU while the CPU launches its forward; from pinned memory the copy queues behind the previous work.
        // (PyTorch's pinned-host allocator keeps the buffer until the copy has run, even once x is disposed.)
        if (_device.type == DeviceType.CUDA) x = x.pin_memory().to(_device, non_blocking: true);
        var input = x.narrow(1, 0, _seqlen).contiguous();
        var labels = x.narrow(1, 1, _seqlen).contiguous();
        return _model.loss(input, labels, lossGrad);
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
