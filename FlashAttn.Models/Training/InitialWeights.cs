using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace FlashAttn.Models.Training;

/// <summary>
/// model.init_from's weights, loaded in float32 on the CPU into a model of the same sizes: copied into the training
/// model at once, and kept until the optimizer takes them as its fp32 master weights (<see cref="HandTo"/>), so that a
/// bf16/fp16 run starts from the float32 values rather than from their 16-bit roundings.
/// </summary>
internal sealed class InitialWeights : IDisposable
{
    nn.Module? _fp32;

    public InitialWeights(nn.Module fp32, nn.Module model)
    {
        _fp32 = fp32;
        using var _ = no_grad();
        var source = fp32.named_parameters().ToDictionary(np => np.name, np => np.parameter);
        foreach (var (name, p) in model.named_parameters()) p.copy_(source[name]);
    }

    /// <summary>Sets the optimizer's masters of <paramref name="parameters"/> (the training model's, by name) and
    /// releases the float32 copy.</summary>
    public void HandTo(FusedAdamW optimizer, IEnumerable<(string name, Parameter parameter, bool weight_decay)> parameters)
    {
        if (_fp32 is null) return;
        var source = _fp32.named_parameters().ToDictionary(np => np.name, np => (Tensor)np.parameter);
        foreach (var (name, p, _) in TrainingOptimizer.Optimized(parameters)) optimizer.set_master_weight(p, source[name]);
        Dispose();
    }

    public void Dispose()
    {
        _fp32?.Dispose();
        _fp32 = null;
    }
}
