using TorchSharp;
using static TorchSharp.torch;

namespace FlashAttn.Models.Training;

public enum Precision { Fp32, Bf16, Fp16 }

/// <summary>fp16's dynamic loss scaling (torch.cuda.amp.GradScaler), kept on the device as torch's _amp_update_scale_
/// does, so that the step loop never waits for the GPU: start at 2^16, halve on a non-finite gradient (the optimizer
/// skipped the step), double after 2000 finite steps in a row. <see cref="Scale"/> is what the loss is multiplied by and
/// what the optimizer divides the gradients by.</summary>
public sealed class DynamicLossScaler : IDisposable
{
    readonly int _growthInterval;

    public DynamicLossScaler(Device device, double initScale = 65536.0, int growthInterval = 2000)
    {
        _growthInterval = growthInterval;
        Scale = full(Array.Empty<long>(), initScale, ScalarType.Float32, device).DetachFromDisposeScope();
        GoodSteps = zeros(Array.Empty<long>(), ScalarType.Float32, device).DetachFromDisposeScope();
    }

    /// <summary>0-d float32 on the device.</summary>
    public Tensor Scale { get; }
    /// <summary>0-d float32 on the device: finite steps since the scale last changed.</summary>
    public Tensor GoodSteps { get; }

    /// <summary>After the optimizer's step, from its found_inf (0-d float32, 1 when the step was skipped). About a dozen
    /// small launches, no host round trip.</summary>
    public void Update(Tensor foundInf)
    {
        using var scope = NewDisposeScope();
        using var _ = no_grad();
        var good = (GoodSteps + 1) * (1 - foundInf);  // 0 after a non-finite step
        var grow = good.ge(_growthInterval);
        var scale = where(foundInf.gt(0), (Scale * 0.5).clamp_min(1.0 / 65536), where(grow, Scale * 2, Scale));
        Scale.copy_(scale);
        GoodSteps.copy_(good.masked_fill(grow, 0));
    }

    /// <summary>Restores a checkpoint's values.</summary>
    public void Load(double scale, int goodSteps)
    {
        Scale.fill_(scale);
        GoodSteps.fill_(goodSteps);
    }

    public void Dispose()
    {
        Scale.Dispose();
        GoodSteps.Dispose();
    }
}
