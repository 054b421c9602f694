using FlashAttn.Models.Data;

namespace FlashAttn.Models.Training;

/// <summary>trainer.accelerator and `sample --device`: where the model runs.</summary>
public enum Accelerator { Auto, Cpu, Cuda }

/// <summary>task: what is trained.</summary>
public enum TaskKind { LanguageModeling, ImageClassification }

/// <summary>train.scheduler.name (<see cref="LrSchedule"/>).</summary>
public enum ScheduleKind { Linear, Cosine, Constant }

/// <summary>
/// An experiment's configuration, typed: <see cref="ExperimentConfig"/>'s keys bound once (<see cref="ExperimentConfig.Bind"/>),
/// as Hydra's structured configs bind a DictConfig to dataclasses. Every key has one home here
/// (CliTests.EveryKeyHasATypedHome checks it); nothing after the binding reads a key by name. <see cref="RunName"/>: name, or
/// the experiment's name with '/' as '_'; <see cref="Resume"/>: a checkpoint folder, "last", or null;
/// <see cref="GlobalBatchSize"/>: train.global_batch_size, sequences (images) per optimizer step over all devices.
/// </summary>
public sealed record RunConfig(string Experiment, string RunName, TaskKind Task, long Seed, string? Resume, ModelSettings Model, DataSettings Data,
    long GlobalBatchSize, OptimizerSettings Optimizer, SchedulerSettings Scheduler, TrainerSettings Trainer)
{
    /// <summary>Gradient accumulation steps: global ÷ (devices × per-device batch), rounded up (flash-attention's rule).</summary>
    public int Accumulation => ExperimentConfig.GradientAccumulation(GlobalBatchSize, Trainer.Devices, Data.BatchSize);

    /// <summary>The run folder: &lt;trainer.default_root_dir&gt;/&lt;name&gt;.</summary>
    public string RunDir => Path.Combine(Trainer.DefaultRootDir, RunName);
}

/// <summary>model.*: a named configuration, the weights to start from, the model.config.* overrides.</summary>
public sealed record ModelSettings(string Name, string? InitFrom, ModelOverrides Overrides)
{
    /// <summary>GPTConfig.Named(model.name) with <paramref name="vocabSize"/> and the model.config.* overrides.</summary>
    public GPTConfig Gpt(long vocabSize) => Overrides.ApplySwitches(Overrides.ApplySizes(GPTConfig.Named(Name) with { vocab_size = vocabSize }));
}

/// <summary>
/// model.config.*: each set key replaces the named model's value (null: not set). GPT and ViT take them through one
/// rule each for sizes and switches; ViT has no position table, rotary or fused-MLP recomputation (n_positions,
/// rotary_emb_fraction, mlp_checkpoint_lvl do not apply to it).
/// </summary>
public sealed record ModelOverrides(
    long? NLayer = null, long? NEmbd = null, long? NHead = null, long? NPositions = null, double? RotaryEmbFraction = null,
    double? Dropout = null, bool? UseFlashAttn = null, bool? FusedBiasFc = null, bool? FusedMlp = null, bool? FusedDropoutAddLn = null,
    bool? FusedCrossEntropy = null, bool? ResidualInFp32 = null, int? MlpCheckpointLvl = null)
{
    /// <summary>Whether a key sets one of the fusion switches: then the device does not turn them off
    /// (<see cref="DevicePolicy.Fusions(GPTConfig, ModelOverrides?, TorchSharp.torch.Device, TextWriter)"/>).</summary>
    public bool SetsFusions => UseFlashAttn is not null || FusedBiasFc is not null || FusedMlp is not null || FusedDropoutAddLn is not null
        || FusedCrossEntropy is not null;

    /// <summary>Whether a size key differs from <paramref name="g"/>'s (the weights of model.init_from fix the sizes).</summary>
    public bool ChangesSizes(GPTConfig g) => ApplySizes(g) != g;

    /// <summary>The size keys that are set: n_layer, n_embd, n_head, n_positions, rotary_emb_fraction.</summary>
    public GPTConfig ApplySizes(GPTConfig g) => g with
    {
        n_layer = NLayer ?? g.n_layer, n_embd = NEmbd ?? g.n_embd, n_head = NHead ?? g.n_head, n_positions = NPositions ?? g.n_positions,
        rotary_emb_fraction = RotaryEmbFraction ?? g.rotary_emb_fraction,
    };

    /// <summary>The training switches that are set: dropout, the fusions, residual_in_fp32, mlp_checkpoint_lvl.</summary>
    public GPTConfig ApplySwitches(GPTConfig g) => g with
    {
        resid_pdrop = Dropout ?? g.resid_pdrop, embd_pdrop = Dropout ?? g.embd_pdrop, attn_pdrop = Dropout ?? g.attn_pdrop,
        use_flash_attn = UseFlashAttn ?? g.use_flash_attn, fused_bias_fc = FusedBiasFc ?? g.fused_bias_fc, fused_mlp = FusedMlp ?? g.fused_mlp,
        fused_dropout_add_ln = FusedDropoutAddLn ?? g.fused_dropout_add_ln, fused_cross_entropy = FusedCrossEntropy ?? g.fused_cross_entropy,
        residual_in_fp32 = ResidualInFp32 ?? g.residual_in_fp32, mlp_checkpoint_lvl = MlpCheckpointLvl ?? g.mlp_checkpoint_lvl,
    };

    /// <summary>Whether a size key differs from <paramref name="v"/>'s.</summary>
    public bool ChangesSizes(ViTConfig v) => ApplySizes(v) != v;

    /// <summary>The size keys: n_layer as depth, n_embd as embed_dim, n_head as num_heads.</summary>
    public ViTConfig ApplySizes(ViTConfig v) => v with { depth = NLayer ?? v.depth, embed_dim = NEmbd ?? v.embed_dim, num_heads = NHead ?? v.num_heads };

    /// <summary>The switches: dropout as drop_rate, the fusions, residual_in_fp32.</summary>
    public ViTConfig ApplySwitches(ViTConfig v) => v with
    {
        drop_rate = Dropout ?? v.drop_rate, use_flash_attn = UseFlashAttn ?? v.use_flash_attn, fused_bias_fc = FusedBiasFc ?? v.fused_bias_fc,
        fused_mlp = FusedMlp ?? v.fused_mlp, fused_dropout_add_ln = FusedDropoutAddLn ?? v.fused_dropout_add_ln,
        fused_cross_entropy = FusedCrossEntropy ?? v.fused_cross_entropy, residual_in_fp32 = ResidualInFp32 ?? v.residual_in_fp32,
    };
}

/// <summary>datamodule.*: where the data is and how it is batched. <see cref="DataDir"/>: datamodule.data_dir, else $DATA_DIR,
/// else ./data; <see cref="Sources"/>: what a missing token cache is prepared from (comma-separated); <see cref="BatchSize"/>:
/// the per-device micro-batch; <see cref="BatchSizeEval"/>: datamodule.batch_size_eval, else the micro-batch.</summary>
public sealed record DataSettings(string Dataset, string DataDir, string Sources, string Tokenizer, int MaxLength, int BatchSize, int BatchSizeEval,
    double ValRatio, long ValSplitSeed, int ImageSize)
{
    /// <summary>The split a token cache is prepared with.</summary>
    public PrepareOptions Split => new() { Tokenizer = Tokenizer, ValRatio = ValRatio, ValSplitSeed = ValSplitSeed };

    public IReadOnlyList<string> SourceList => Sources.Split(',', StringSplitOptions.TrimEntries | StringSplitOptions.RemoveEmptyEntries);
}

/// <summary>train.optimizer.*: AdamW (<see cref="TrainingOptimizer"/>).</summary>
public sealed record OptimizerSettings(double Lr, double WeightDecay, double Beta1, double Beta2, double Eps);

/// <summary>train.scheduler.*: the learning-rate schedule (<see cref="LrSchedule"/>).</summary>
public sealed record SchedulerSettings(ScheduleKind Name, long WarmupSteps, long? NumTrainingSteps, double LrMinRatio, double WarmupLrInit);

/// <summary>trainer.*: the loop, its devices and precision, its outputs.</summary>
public sealed record TrainerSettings(
    int Devices,
    Accelerator Accelerator,
    Precision Precision,
    long MaxSteps,
    double GradientClipVal,
    long ValCheckInterval,
    int LimitValBatches,
    long LogEveryNSteps,
    long CheckpointEveryNSteps,
    int SaveTopK,
    string DefaultRootDir,
    bool Overwrite,
    bool ProgressBar,
    bool TensorBoard,
    bool Plot,
    double? PeakTflops,
    int NumThreads,
    bool Benchmark);

/// <summary>The names of the choice keys' values, each in one place: what the keys accept and what they bind to.</summary>
public static class ConfigNames
{
    /// <summary>trainer.precision: the canonical names, then the aliases of Lightning and PyTorch.</summary>
    static readonly (Precision value, string name, string[] aliases)[] s_precisions =
    [
        (Precision.Fp32, "32", ["fp32", "32-true", "float32"]),
        (Precision.Bf16, "bf16", ["bf16-mixed", "bfloat16"]),
        (Precision.Fp16, "16", ["fp16", "16-mixed", "float16"]),
    ];

    public static readonly string[] Precisions = [.. s_precisions.Select(p => p.name)];

    /// <summary>The canonical name of a precision or of one of its aliases; null when none.</summary>
    public static string? PrecisionName(string value) =>
        s_precisions.FirstOrDefault(p => p.name == value.ToLowerInvariant() || p.aliases.Contains(value.ToLowerInvariant())).name;

    public static Precision ParsePrecision(string name) => s_precisions.First(p => p.name == name).value;

    public static string Name(Precision precision) => s_precisions.First(p => p.value == precision).name;

    public static readonly string[] Accelerators = ["auto", "cpu", "cuda"];

    public static Accelerator ParseAccelerator(string name) => name switch
    {
        "auto" => Accelerator.Auto, "cpu" => Accelerator.Cpu, "cuda" => Accelerator.Cuda,
        _ => throw new ArgumentOutOfRangeException(nameof(name), name, null),
    };

    public static readonly string[] Tasks = ["lm", "image_classification"];

    public static TaskKind ParseTask(string name) => name == "lm" ? TaskKind.LanguageModeling : TaskKind.ImageClassification;

    public static readonly string[] Schedules = ["linear", "cosine", "constant"];

    public static ScheduleKind ParseSchedule(string name) => name switch
    {
        "linear" => ScheduleKind.Linear, "cosine" => ScheduleKind.Cosine, _ => ScheduleKind.Constant,
    };

    /// <summary>model.name: the GPT names for task=lm, the ViT names for image_classification.</summary>
    public static IReadOnlyList<string> Models => [.. GPTConfig.Names, .. ViTConfig.Names];

    public static IReadOnlyList<string> ModelsFor(TaskKind task) => task == TaskKind.LanguageModeling ? GPTConfig.Names : ViTConfig.Names;
}
