using System.Text.Json.Nodes;
using FlashAttn.Models.Distributed;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace FlashAttn.Models.Training;

/// <summary>
/// One run as the trainer and its callbacks see it (Lightning's trainer state): what <see cref="Trainer"/> set up (the
/// task, the optimizer, fp16's loss scaler, the schedule), where the run is (steps, the values read back at the last
/// log step, throughput), and the run's folders. The step loop writes it; callbacks read it.
/// </summary>
public sealed class TrainingRun : IDisposable
{
    internal TrainingRun(RunConfig config, string configYaml, Device device, ITrainingTask task, FusedAdamW optimizer,
        DynamicLossScaler? scaler, TextWriter log)
    {
        Config = config; ConfigYaml = configYaml; Device = device; Task = task; Optimizer = optimizer; Scaler = scaler; Log = log;
        Schedule = LrSchedule.From(config);
        RunDir = config.RunDir;
        CheckpointsDir = Path.Combine(RunDir, RunFolder.CheckpointsDir);
        Print = log.WriteLine;
    }

    public RunConfig Config { get; }
    /// <summary>The resolved configuration (config.yaml; saved in every checkpoint).</summary>
    public string ConfigYaml { get; }
    public Device Device { get; }
    public ITrainingTask Task { get; }
    /// <summary>The gradient all-reduce of data parallel training; null on one device.</summary>
    public IGradientReducer? Reducer { get; init; }
    /// <summary>The parameters whose gradients <see cref="Reducer"/> averages, in the task's order.</summary>
    internal IReadOnlyList<Parameter> Gradients => _gradients ??= [.. Task.Parameters.Select(p => p.parameter)];
    IReadOnlyList<Parameter>? _gradients;
    public FusedAdamW Optimizer { get; }
    /// <summary>fp16's dynamic loss scaling; null in fp32 and bf16 runs.</summary>
    public DynamicLossScaler? Scaler { get; }
    public LrSchedule Schedule { get; }
    public TextWriter Log { get; }
    public string RunDir { get; }
    public string CheckpointsDir { get; }
    public long MaxSteps => Config.Trainer.MaxSteps;

    /// <summary>The step the run starts from: 0, or the resumed checkpoint's.</summary>
    public long StartStep { get; internal set; }
    /// <summary>Optimizer steps done.</summary>
    public long Step { get; internal set; }
    /// <summary>Tokens (images) trained on, resumed runs included.</summary>
    public double UnitsSeen { get; internal set; }
    /// <summary>The learning rate of the last step.</summary>
    public double Lr { get; internal set; }

    // Read from the device at log steps only, by rank 0 alone (Trainer.ReadPending): between them these hold the last values read.
    /// <summary>Every step's loss read so far, in order.</summary>
    public List<double> Losses { get; } = new();
    public double FirstLoss => Losses.Count > 0 ? Losses[0] : double.NaN;
    public double LastLoss => Losses.Count > 0 ? Losses[^1] : double.NaN;
    public double GradNorm { get; internal set; } = double.NaN;
    /// <summary>Whether the last step read skipped its update (a non-finite gradient).</summary>
    public bool Skipped { get; internal set; }
    /// <summary>fp16's loss scale after the last step read; null in fp32 and bf16 runs.</summary>
    public double? LossScale { get; internal set; }
    /// <summary>val_loss of the last evaluation.</summary>
    public double? ValLoss { get; internal set; }

    /// <summary>Throughput over the last 20 steps: tokens (images) per second.</summary>
    public double UnitsPerSecond { get; internal set; }
    /// <summary>Model FLOPs utilisation, where the peak is known.</summary>
    public double? Mfu { get; internal set; }
    public TimeSpan Eta { get; internal set; }
    public TimeSpan Elapsed { get; internal set; }
    /// <summary>Written by the plot callback.</summary>
    public string? PlotPath { get; internal set; }

    /// <summary>Prints a line that stays (the progress bar clears its live line first).</summary>
    public Action<string> Print { get; internal set; }

    /// <summary>Master weights and Adam moments by name (checkpoints' state.bin).</summary>
    public IReadOnlyDictionary<string, Tensor> StateTensors() => TrainingOptimizer.StateTensors(Optimizer, Task.Parameters);

    /// <summary>A checkpoint's trainer.json after <paramref name="stepsDone"/> steps. Waits for the GPU (Adam's step count,
    /// the loss scale): called at checkpoints only.</summary>
    public JsonObject State(long stepsDone)
    {
        var state = new JsonObject
        {
            ["step"] = stepsDone, ["adam_t"] = TrainingOptimizer.AdamT(Optimizer, Task.Parameters), ["sampler"] = Task.SamplerState.DeepClone(),
            ["units_seen"] = UnitsSeen, ["experiment"] = Config.Experiment, ["config"] = ConfigYaml,
        };
        if (Task.ModelConfigJson is { } model) state["model_config"] = model;
        if (Scaler != null) { state["loss_scale"] = Scaler.Scale.item<float>(); state["good_steps"] = (int)Scaler.GoodSteps.item<float>(); }
        return state;
    }

    public void Dispose()
    {
        Scaler?.Dispose();
        Optimizer.Dispose();
        Task.Dispose();
    }
}
