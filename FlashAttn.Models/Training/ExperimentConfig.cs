using System.Globalization;
using System.Reflection;
using System.Text;
using FlashAttn.Models.Data;

namespace FlashAttn.Models.Training;

public enum ConfigType { String, Int, Float, Bool, Choice }

/// <summary>One dotted key of the configuration: its type, default, valid values and meaning.</summary>
public sealed record ConfigKey(string Name, ConfigType Type, string? Default, string Help, string[]? Choices = null, bool Nullable = false);

/// <summary>Thrown for a wrong key or value; the message names it and lists the valid ones.</summary>
public sealed class ConfigException(string message) : Exception(message);

/// <summary>An experiment's configuration: a flat map of dotted keys (flash-attention's Hydra names where
/// they fit: <c>trainer.precision</c>, <c>datamodule.batch_size</c>, <c>train.optimizer.lr</c>, ...),
/// filled from the schema's defaults, then the experiment file
/// (<c>configs/experiment/&lt;name&gt;.yaml</c>), then <c>key=value</c> overrides, each value validated as it is set.
/// <see cref="Bind"/> turns it into the typed <see cref="RunConfig"/> the trainer, the tasks and the commands read.</summary>
public sealed class ExperimentConfig
{
    public const string DefaultExperiment = "tiny";

    public static readonly IReadOnlyList<ConfigKey> Schema =
    [
        new("experiment", ConfigType.String, DefaultExperiment, "experiment file under configs/experiment (without .yaml), or a path to a .yaml"),
        new("name", ConfigType.String, null, "run name: outputs go to <trainer.default_root_dir>/<name> (default: the experiment name)", Nullable: true),
        new("task", ConfigType.Choice, "lm", "lm: GPT language modelling on a token cache; image_classification: ViT on an image folder", ConfigNames.Tasks),
        new("seed", ConfigType.Int, "1111", "seed for initialisation, data order and dropout"),
        new("resume", ConfigType.String, null, "a checkpoint folder to resume from, or 'last' for the run's latest checkpoint", Nullable: true),

        new("model.name", ConfigType.Choice, "tiny", "named model configuration (GPTConfig.Named for task=lm, ViTConfig.Named for image_classification)", [.. ConfigNames.Models]),
        new("model.init_from", ConfigType.String, null, "start from these weights (fine-tuning; the sizes are theirs). task=lm (nanoGPT's init_from): a run " +
            "or checkpoint folder, a Hugging Face GPT-2 folder (config.json + model.safetensors) or a GPTLMHeadModel .safetensors file. " +
            "task=image_classification (timm's pretrained): a ViT .safetensors file or a folder with model.safetensors, timm's or ours; " +
            "a head of another class count starts afresh and the position grid is resampled to datamodule.image_size", Nullable: true),
        new("model.config.n_layer", ConfigType.Int, null, "override the named model's layer count", Nullable: true),
        new("model.config.n_embd", ConfigType.Int, null, "override the model width", Nullable: true),
        new("model.config.n_head", ConfigType.Int, null, "override the head count", Nullable: true),
        new("model.config.n_positions", ConfigType.Int, null, "override the maximum sequence length of the position embedding", Nullable: true),
        new("model.config.rotary_emb_fraction", ConfigType.Float, null, "fraction of the head dim that gets rotary embeddings (0: learned absolute positions)", Nullable: true),
        new("model.config.dropout", ConfigType.Float, null, "resid_pdrop, embd_pdrop and attn_pdrop at once (flash-attention's experiments: 0.1)", Nullable: true),
        new("model.config.use_flash_attn", ConfigType.Bool, null, "FlashAttention kernels (CUDA; the reference path elsewhere)", Nullable: true),
        new("model.config.fused_bias_fc", ConfigType.Bool, null, "fused matmul + bias", Nullable: true),
        new("model.config.fused_mlp", ConfigType.Bool, null, "fused matmul + bias + gelu MLP", Nullable: true),
        new("model.config.fused_dropout_add_ln", ConfigType.Bool, null, "fused dropout + residual + LayerNorm", Nullable: true),
        new("model.config.fused_cross_entropy", ConfigType.Bool, null, "fused cross-entropy loss", Nullable: true),
        new("model.config.residual_in_fp32", ConfigType.Bool, null, "keep the residual stream in fp32", Nullable: true),
        new("model.config.mlp_checkpoint_lvl", ConfigType.Int, null, "fused MLP recomputation (GPT): 0 keeps fc1's pre-activation and output, 1 the pre-activation, 2 neither", Nullable: true),

        new("datamodule.dataset", ConfigType.String, "kjv", "token cache name under datamodule.data_dir (lm) or image folder (image_classification)"),
        new("datamodule.data_dir", ConfigType.String, null, "where token caches live (default: $DATA_DIR, else ./data)", Nullable: true),
        new("datamodule.sources", ConfigType.String, "embedded:kjv", "what a missing cache is prepared from: embedded:kjv, or comma-separated files/folders (.txt .jsonl .jsonl.zst .parquet)"),
        new("datamodule.tokenizer", ConfigType.Choice, "gpt2", "tokenizer of the cache", ["gpt2"]),
        new("datamodule.max_length", ConfigType.Int, "1024", "sequence length (tokens per sample)"),
        new("datamodule.batch_size", ConfigType.Int, "8", "per-device micro-batch; gradient accumulation fills train.global_batch_size"),
        new("datamodule.batch_size_eval", ConfigType.Int, null, "evaluation batch (default: datamodule.batch_size)", Nullable: true),
        new("datamodule.val_ratio", ConfigType.Float, PrepareOptions.DefaultValRatio.ToString("R", CultureInfo.InvariantCulture),
            "fraction of documents in the validation split when preparing (flashattn prepare --val-ratio has the same default); " +
            "a cache keeps the split it was prepared with, and train warns when it differs from this"),
        new("datamodule.val_split_seed", ConfigType.Int, "2357", "seed of the train/val split when preparing"),
        new("datamodule.image_size", ConfigType.Int, "224", "image side for image_classification"),

        new("train.global_batch_size", ConfigType.Int, "8", "sequences (images) per optimizer step over all devices; fixed by the experiment"),
        new("train.optimizer.lr", ConfigType.Float, "6e-4", "peak learning rate"),
        new("train.optimizer.weight_decay", ConfigType.Float, "0.1", "AdamW weight decay (not on biases, norms, embeddings)"),
        new("train.optimizer.beta1", ConfigType.Float, "0.9", "AdamW beta1"),
        new("train.optimizer.beta2", ConfigType.Float, "0.999", "AdamW beta2"),
        new("train.optimizer.eps", ConfigType.Float, "1e-8", "AdamW epsilon"),
        new("train.scheduler.name", ConfigType.Choice, "cosine", "linear: warmup then linear decay to 0 at num_training_steps (transformers' get_linear_schedule_with_warmup); cosine: timm's CosineLRScheduler (warmup from warmup_lr_init, cosine to lr_min over t_initial); constant: warmup then flat", ConfigNames.Schedules),
        new("train.scheduler.warmup_steps", ConfigType.Int, "0", "warmup steps"),
        new("train.scheduler.num_training_steps", ConfigType.Int, null, "decay horizon in steps (linear: reaches 0; cosine: t_initial); default trainer.max_steps", Nullable: true),
        new("train.scheduler.lr_min_ratio", ConfigType.Float, "0.1", "cosine: final lr as a fraction of the peak"),
        new("train.scheduler.warmup_lr_init", ConfigType.Float, "0", "cosine: lr at step 0 of the warmup"),

        new("trainer.devices", ConfigType.Int, "1", "number of GPUs (data parallel)"),
        new("trainer.accelerator", ConfigType.Choice, "auto", "auto: CUDA when available, else CPU", ConfigNames.Accelerators),
        new("trainer.precision", ConfigType.Choice, "32", "32: fp32; bf16: bf16 compute with fp32 master weights; 16: fp16 compute, fp32 master weights, dynamic loss scaling", ConfigNames.Precisions),
        new("trainer.max_steps", ConfigType.Int, "100", "optimizer steps; 0 evaluates the weights only (with model.init_from or resume; nanoGPT's eval_only)"),
        new("trainer.gradient_clip_val", ConfigType.Float, "1.0", "clip the global gradient norm to this (0: off)"),
        new("trainer.val_check_interval", ConfigType.Int, "50", "evaluate every N steps (and at the end)"),
        new("trainer.limit_val_batches", ConfigType.Int, "20", "validation batches per evaluation (0: the whole split)"),
        new("trainer.log_every_n_steps", ConfigType.Int, "1", "metrics log interval"),
        new("trainer.checkpoint_every_n_steps", ConfigType.Int, "0", "progress checkpoint interval (0: only at the end)"),
        new("trainer.save_top_k", ConfigType.Int, "3", "keep the K checkpoints with the lowest val_loss (checkpoints/best-*), as flash-attention's experiments do (0: none)"),
        new("trainer.default_root_dir", ConfigType.String, "runs", "root of run outputs"),
        new("trainer.overwrite", ConfigType.Bool, "false", "start in a run folder that holds another run, removing that run's checkpoints, " +
            "metrics, TensorBoard events, plot, model and config first (without it such a start is an error; resume=last continues that run instead)"),
        new("trainer.progress_bar", ConfigType.Bool, "true", "live progress bar"),
        new("trainer.tensorboard", ConfigType.Bool, "true", "write TensorBoard event files"),
        new("trainer.plot", ConfigType.Bool, "true", "write loss_lr.png at the end"),
        new("trainer.peak_tflops", ConfigType.Float, null, "peak TFLOP/s of one device for MFU (default: known GPUs by name; none on CPU)", Nullable: true),
        new("trainer.num_threads", ConfigType.Int, "0", "CPU threads for torch (0: all cores)"),
        new("trainer.benchmark", ConfigType.Bool, "false", "on CUDA, time cuBLASLt's 8 best-ranked algorithms for each GEMM shape at its first " +
            "use and keep the fastest, as cudnn.benchmark does for convolutions (GPT-2 124M on the H200: +1.0-1.1% tokens/s); the choice, and " +
            "with it the GEMMs' rounding, may differ from run to run"),
    ];

    static readonly Dictionary<string, ConfigKey> s_byName = Schema.ToDictionary(k => k.Name);

    readonly Dictionary<string, string?> _values = new();

    // the defaults validated as any value (one spelling each: a saved configuration compares equal to the one it came from)
    ExperimentConfig() { foreach (var k in Schema) _values[k.Name] = Validate(k, k.Default, "the schema's defaults"); }

    /// <summary>Builds a configuration from command-line arguments <c>key=value ...</c>: schema
    /// defaults, then the experiment file (from <c>experiment=</c>, default "tiny"), then the others.</summary>
    public static ExperimentConfig Parse(IEnumerable<string> args)
    {
        var overrides = new List<(string key, string value)>();
        foreach (var arg in args)
        {
            int eq = arg.IndexOf('=');
            if (eq <= 0) throw new ConfigException($"'{arg}' is not key=value; valid keys: {string.Join(", ", Schema.Select(k => k.Name))}");
            var key = arg[..eq].Trim();
            if (key.StartsWith("++") || key.StartsWith('+')) key = key.TrimStart('+'); // Hydra's force-add syntax
            overrides.Add((key, arg[(eq + 1)..].Trim()));
        }
        var config = new ExperimentConfig();
        var experiment = overrides.LastOrDefault(o => o.key == "experiment").value ?? DefaultExperiment;
        config.Set("experiment", experiment);
        foreach (var (k, v) in LoadExperimentFile(experiment)) config.Set(k, v, $"experiment file {experiment}");
        foreach (var (k, v) in overrides) if (k != "experiment") config.Set(k, v);
        return config;
    }

    public void Set(string key, string? value, string? where = null)
    {
        if (!s_byName.TryGetValue(key, out var spec))
        {
            var near = Schema.Where(k => Distance(k.Name, key) <= 3 || k.Name.Split('.')[^1] == key.Split('.')[^1]).Select(k => k.Name).ToList();
            throw new ConfigException($"unknown key '{key}'{(where != null ? " in " + where : "")}" +
                (near.Count > 0 ? $"; did you mean one of: {string.Join(", ", near)}" : "") +
                $"; valid keys: {string.Join(", ", Schema.Select(k => k.Name))}");
        }
        _values[key] = Validate(spec, value, where);
    }

    static int Distance(string a, string b)
    {
        var d = new int[a.Length + 1, b.Length + 1];
        for (int i = 0; i <= a.Length; i++) d[i, 0] = i;
        for (int j = 0; j <= b.Length; j++) d[0, j] = j;
        for (int i = 1; i <= a.Length; i++)
            for (int j = 1; j <= b.Length; j++)
                d[i, j] = Math.Min(Math.Min(d[i - 1, j] + 1, d[i, j - 1] + 1), d[i - 1, j - 1] + (a[i - 1] == b[j - 1] ? 0 : 1));
        return d[a.Length, b.Length];
    }

    static string? Validate(ConfigKey spec, string? value, string? where)
    {
        string At() => where != null ? $" (in {where})" : "";
        if (value is null || value is "null" or "~" or "None" or "")
        {
            if (spec.Nullable) return null;
            throw new ConfigException($"{spec.Name} cannot be null{At()}: {Describe(spec)}");
        }
        value = Unquote(value);
        switch (spec.Type)
        {
            case ConfigType.Int:
                if (double.TryParse(value, NumberStyles.Float, CultureInfo.InvariantCulture, out var d) && d == Math.Floor(d) && Math.Abs(d) < 9e18)
                    return ((long)d).ToString(CultureInfo.InvariantCulture);
                throw new ConfigException($"{spec.Name}={value} is not an integer{At()}: {Describe(spec)}");
            case ConfigType.Float:
                if (double.TryParse(value, NumberStyles.Float, CultureInfo.InvariantCulture, out var f)) return f.ToString("R", CultureInfo.InvariantCulture);
                throw new ConfigException($"{spec.Name}={value} is not a number{At()}: {Describe(spec)}");
            case ConfigType.Bool:
                return value.ToLowerInvariant() switch
                {
                    "true" or "1" or "yes" or "on" => "true",
                    "false" or "0" or "no" or "off" => "false",
                    _ => throw new ConfigException($"{spec.Name}={value} is not a boolean{At()}: valid values: true, false"),
                };
            case ConfigType.Choice:
                var v = spec.Name == "trainer.precision" ? ConfigNames.PrecisionName(value) ?? value : value;
                if (spec.Choices!.Contains(v)) return v;
                throw new ConfigException($"{spec.Name}={value} is not valid{At()}; valid values: {string.Join(", ", spec.Choices!)}");
            default:
                return value;
        }
    }

    static string Describe(ConfigKey k) => k.Type switch
    {
        ConfigType.Choice => $"valid values: {string.Join(", ", k.Choices!)}",
        _ => $"{k.Type.ToString().ToLowerInvariant()}{(k.Nullable ? " or null" : "")} — {k.Help}",
    };

    // YAML's quoted scalars: "..." as written, '...' with '' for a quote (what Dump writes)
    static string Unquote(string v) =>
        v.Length >= 2 && v[0] == '"' && v[^1] == '"' ? v[1..^1] : v.Length >= 2 && v[0] == '\'' && v[^1] == '\'' ? v[1..^1].Replace("''", "'") : v;

    /// <summary>The value of <paramref name="key"/> as validated (null: not set).</summary>
    public string? this[string key] => s_byName.ContainsKey(key) ? _values[key] : throw new ConfigException($"unknown key '{key}'");

    /// <summary>The typed configuration (Hydra's structured config): every key read once, here. A model.name of the other
    /// task is an error naming the key and the task's models.</summary>
    public RunConfig Bind()
    {
        string Str(string key) => this[key] ?? throw new ConfigException($"{key} is not set");
        long Int(string key) => long.Parse(Str(key), CultureInfo.InvariantCulture);
        int Int32(string key) => Int(key) is var v && v is >= int.MinValue and <= int.MaxValue ? (int)v
            : throw new ConfigException($"{key}={v} is out of range: {Describe(s_byName[key])}");
        long? IntOrNull(string key) => this[key] is { } s ? long.Parse(s, CultureInfo.InvariantCulture) : null;
        double Float(string key) => double.Parse(Str(key), CultureInfo.InvariantCulture);
        double? FloatOrNull(string key) => this[key] is { } s ? double.Parse(s, CultureInfo.InvariantCulture) : null;
        bool Bool(string key) => Str(key) == "true";
        bool? BoolOrNull(string key) => this[key] is { } s ? s == "true" : null;

        var task = ConfigNames.ParseTask(Str("task"));
        var model = Str("model.name");
        if (!ConfigNames.ModelsFor(task).Contains(model))
            throw new ConfigException($"model.name={model} is not a model of task={Str("task")}; valid values: {string.Join(", ", ConfigNames.ModelsFor(task))}");
        int batch = Int32("datamodule.batch_size");
        return new RunConfig(
            Experiment: Str("experiment"),
            RunName: this["name"] ?? Str("experiment").Replace('/', '_').Replace(".yaml", ""),
            Task: task,
            Seed: Int("seed"),
            Resume: this["resume"],
            Model: new ModelSettings(model, this["model.init_from"], new ModelOverrides(
                NLayer: IntOrNull("model.config.n_layer"), NEmbd: IntOrNull("model.config.n_embd"), NHead: IntOrNull("model.config.n_head"),
                NPositions: IntOrNull("model.config.n_positions"), RotaryEmbFraction: FloatOrNull("model.config.rotary_emb_fraction"),
                Dropout: FloatOrNull("model.config.dropout"), UseFlashAttn: BoolOrNull("model.config.use_flash_attn"),
                FusedBiasFc: BoolOrNull("model.config.fused_bias_fc"), FusedMlp: BoolOrNull("model.config.fused_mlp"),
                FusedDropoutAddLn: BoolOrNull("model.config.fused_dropout_add_ln"), FusedCrossEntropy: BoolOrNull("model.config.fused_cross_entropy"),
                ResidualInFp32: BoolOrNull("model.config.residual_in_fp32"),
                MlpCheckpointLvl: this["model.config.mlp_checkpoint_lvl"] is null ? null : Int32("model.config.mlp_checkpoint_lvl"))),
            Data: new DataSettings(
                Dataset: Str("datamodule.dataset"), DataDir: this["datamodule.data_dir"] ?? TokenCache.DefaultDataDir, Sources: Str("datamodule.sources"),
                Tokenizer: Str("datamodule.tokenizer"), MaxLength: Int32("datamodule.max_length"), BatchSize: batch,
                BatchSizeEval: this["datamodule.batch_size_eval"] is null ? batch : Int32("datamodule.batch_size_eval"),
                ValRatio: Float("datamodule.val_ratio"), ValSplitSeed: Int("datamodule.val_split_seed"), ImageSize: Int32("datamodule.image_size")),
            GlobalBatchSize: Int("train.global_batch_size"),
            Optimizer: new OptimizerSettings(Lr: Float("train.optimizer.lr"), WeightDecay: Float("train.optimizer.weight_decay"),
                Beta1: Float("train.optimizer.beta1"), Beta2: Float("train.optimizer.beta2"), Eps: Float("train.optimizer.eps")),
            Scheduler: new SchedulerSettings(Name: ConfigNames.ParseSchedule(Str("train.scheduler.name")), WarmupSteps: Int("train.scheduler.warmup_steps"),
                NumTrainingSteps: IntOrNull("train.scheduler.num_training_steps"), LrMinRatio: Float("train.scheduler.lr_min_ratio"),
                WarmupLrInit: Float("train.scheduler.warmup_lr_init")),
            Trainer: new TrainerSettings(
                Devices: Int32("trainer.devices"), Accelerator: ConfigNames.ParseAccelerator(Str("trainer.accelerator")),
                Precision: ConfigNames.ParsePrecision(Str("trainer.precision")), MaxSteps: Int("trainer.max_steps"),
                GradientClipVal: Float("trainer.gradient_clip_val"), ValCheckInterval: Int("trainer.val_check_interval"),
                LimitValBatches: Int32("trainer.limit_val_batches"), LogEveryNSteps: Math.Max(1, Int("trainer.log_every_n_steps")),
                CheckpointEveryNSteps: Int("trainer.checkpoint_every_n_steps"), SaveTopK: Int32("trainer.save_top_k"),
                DefaultRootDir: Str("trainer.default_root_dir"), Overwrite: Bool("trainer.overwrite"), ProgressBar: Bool("trainer.progress_bar"),
                TensorBoard: Bool("trainer.tensorboard"), Plot: Bool("trainer.plot"), PeakTflops: FloatOrNull("trainer.peak_tflops"),
                NumThreads: Int32("trainer.num_threads"), Benchmark: Bool("trainer.benchmark")));
    }

    /// <summary>The resolved configuration as YAML "key: value" lines (saved with every run as config.yaml and in every
    /// checkpoint); <see cref="FromDump"/> reads it back.</summary>
    public string Dump()
    {
        var sb = new StringBuilder();
        foreach (var k in Schema) sb.Append(k.Name).Append(": ").AppendLine(_values[k.Name] is { } v ? Scalar(v) : "null");
        return sb.ToString();
    }

    /// <summary>A configuration <see cref="Dump"/> wrote (a run's config.yaml, a checkpoint's copy), read by the one
    /// parser and validated key by key; <paramref name="source"/> names it in errors.</summary>
    public static ExperimentConfig FromDump(string yaml, string source)
    {
        var config = new ExperimentConfig();
        foreach (var (key, value) in ParseYaml(yaml, source)) config.Set(key, value, source);
        return config;
    }

    // A value that would not read back as itself plain (a comment mark, a quote, surrounding blanks, a null spelling, a
    // colon that reads as a mapping) is written single-quoted.
    static string Scalar(string v) =>
        v.Length == 0 || v != v.Trim() || v is "null" or "~" or "None" || v.IndexOfAny(['#', '\'', '"']) >= 0 || v.Contains(": ") || v.EndsWith(':')
            ? "'" + v.Replace("'", "''") + "'" : v;

    // ---- batch arithmetic ----
    /// <summary>Gradient accumulation steps: global ÷ (devices × per-device batch), rounded up (flash-attention's rule).</summary>
    public static int GradientAccumulation(long globalBatch, long devices, long deviceBatch)
    {
        if (globalBatch <= 0 || devices <= 0 || deviceBatch <= 0) throw new ConfigException($"train.global_batch_size ({globalBatch}), trainer.devices ({devices}) and datamodule.batch_size ({deviceBatch}) must be positive");
        return (int)((globalBatch + devices * deviceBatch - 1) / (devices * deviceBatch));
    }

    // ---- experiment files ----
    const string ResourcePrefix = "FlashAttn.Models.configs.experiment.";

    /// <summary>Experiments shipped in the assembly (configs/experiment/**.yaml), plus those in
    /// ./configs/experiment of the working directory.</summary>
    public static IReadOnlyList<string> AvailableExperiments()
    {
        var names = new SortedSet<string>(StringComparer.Ordinal);
        foreach (var r in typeof(ExperimentConfig).Assembly.GetManifestResourceNames())
            if (r.StartsWith(ResourcePrefix) && r.EndsWith(".yaml")) names.Add(r[ResourcePrefix.Length..^5]);
        var local = Path.Combine(Directory.GetCurrentDirectory(), "configs", "experiment");
        if (Directory.Exists(local))
            foreach (var f in Directory.EnumerateFiles(local, "*.yaml", SearchOption.AllDirectories))
                names.Add(Path.GetRelativePath(local, f)[..^5].Replace(Path.DirectorySeparatorChar, '/'));
        return names.ToList();
    }

    public static string ReadExperimentText(string experiment)
    {
        if (experiment.EndsWith(".yaml") && File.Exists(experiment)) return File.ReadAllText(experiment);
        var local = Path.Combine(Directory.GetCurrentDirectory(), "configs", "experiment", experiment + ".yaml");
        if (File.Exists(local)) return File.ReadAllText(local);
        using var s = typeof(ExperimentConfig).Assembly.GetManifestResourceStream(ResourcePrefix + experiment + ".yaml");
        if (s is null) throw new ConfigException($"experiment={experiment} not found; valid experiments: {string.Join(", ", AvailableExperiments())}");
        return new StreamReader(s).ReadToEnd();
    }

    static IEnumerable<(string key, string? value)> LoadExperimentFile(string experiment) => ParseYaml(ReadExperimentText(experiment), experiment);

    /// <summary>The YAML subset experiment files use: nested mappings by indentation, scalar values,
    /// '#' comments. Yields dotted keys.</summary>
    public static IEnumerable<(string key, string? value)> ParseYaml(string text, string source = "yaml")
    {
        var stack = new List<(int indent, string key)>();
        int lineNo = 0;
        foreach (var raw in text.Split('\n'))
        {
            lineNo++;
            var line = StripComment(raw).TrimEnd();
            if (line.Trim().Length == 0 || line.Trim() == "---") continue;
            int indent = line.Length - line.TrimStart().Length;
            var body = line.Trim();
            int colon = body.IndexOf(':');
            if (colon <= 0) throw new ConfigException($"{source}:{lineNo}: expected 'key: value', got '{body}'");
            var key = body[..colon].Trim();
            var value = body[(colon + 1)..].Trim();
            while (stack.Count > 0 && stack[^1].indent >= indent) stack.RemoveAt(stack.Count - 1);
            var full = string.Join('.', stack.Select(s => s.key).Append(key));
            if (value.Length == 0) stack.Add((indent, key));
            else yield return (full, value);
        }
    }

    static string StripComment(string line)
    {
        bool sq = false, dq = false;
        for (int i = 0; i < line.Length; i++)
        {
            char c = line[i];
            if (c == '\'' && !dq) sq = !sq;
            else if (c == '"' && !sq) dq = !dq;
            else if (c == '#' && !sq && !dq && (i == 0 || char.IsWhiteSpace(line[i - 1]))) return line[..i];
        }
        return line;
    }

    /// <summary>Help text: every key with its value in this configuration (the experiment's, with the overrides) and meaning.</summary>
    public string HelpText()
    {
        var sb = new StringBuilder();
        foreach (var k in Schema)
            sb.Append("  ").Append(k.Name.PadRight(38)).Append(' ').Append((_values[k.Name] ?? "null").PadRight(14)).Append(' ')
              .AppendLine(k.Choices != null ? $"{{{string.Join("|", k.Choices)}}} {k.Help}" : k.Help);
        return sb.ToString();
    }
}
