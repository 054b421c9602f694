using System.Text.Json.Nodes;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace FlashAttn.Models.Training;

/// <summary>What the trainer needs from a task (model + data + loss); the trainer itself knows no
/// model or data format.</summary>
public interface ITrainingTask : IDisposable
{
    string Description { get; }
    nn.Module Model { get; }
    /// <summary>Every trainable parameter, with whether it takes weight decay.</summary>
    IReadOnlyList<(string name, Parameter parameter, bool weight_decay)> Parameters { get; }
    /// <summary>Throughput unit: "tok" (tokens) or "img".</summary>
    string Unit { get; }
    /// <summary>Units per sample: the sequence length, or 1 image.</summary>
    long UnitsPerSample { get; }
    /// <summary>Training FLOPs (forward + backward) per sample, for MFU.</summary>
    double FlopsPerSample { get; }
    /// <summary>Mean loss of the next micro-batch of <paramref name="batchSize"/> training samples, whose backward will
    /// receive <paramref name="lossGrad"/> (0-d float32 on the device: the trainer's 1 / accumulation steps, times fp16's
    /// loss scale); a task may compute gradients for it in the forward.</summary>
    Tensor TrainLoss(int batchSize, Tensor lossGrad);
    /// <summary>Validation metrics (val_loss first) over at most maxBatches batches (0: all).</summary>
    IReadOnlyDictionary<string, double> Evaluate(int batchSize, int maxBatches);
    /// <summary>The training data order's position (saved in checkpoints; restored on resume).</summary>
    JsonNode SamplerState { get; set; }
    void SaveWeights(string path);
    /// <summary>Called once the optimizer exists, before a resume loads its state: a task whose weights came from
    /// elsewhere sets the fp32 master weights here (<see cref="FusedAdamW.set_master_weight"/>).</summary>
    void InitializeOptimizer(FusedAdamW optimizer) { }
    /// <summary>The model's config as JSON, saved in every checkpoint's trainer.json (model_config), or null.</summary>
    string? ModelConfigJson => null;
}
