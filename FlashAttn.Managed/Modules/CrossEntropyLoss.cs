using TorchSharp;
using static TorchSharp.torch;

namespace FlashAttn;

/// <summary>The reductions of <see cref="CrossEntropyLoss"/>.</summary>
public enum LossReduction
{
    /// <summary>Per-row losses (N,).</summary>
    None,
    /// <summary>Sum over the rows divided by the number of rows whose label is not ignore_index (NaN when all are, as torch).</summary>
    Mean,
    /// <summary>Sum over the rows.</summary>
    Sum,
}

/// <summary>
/// flash-attn's CrossEntropyLoss on the fused kernel: logits (N, V), labels (N,) int64 -> the reduced loss
/// (z-loss included). <see cref="forward_with_z_loss"/> also returns the z-loss, reduced the same way
/// (return_z_loss = true makes that the documented use; forward always returns the loss alone).
/// </summary>
public sealed class CrossEntropyLoss : nn.Module<Tensor, Tensor, Tensor>
{
    public readonly long ignore_index;
    public readonly LossReduction reduction;
    public readonly double label_smoothing, logit_scale, lse_square_scale;
    public readonly bool inplace_backward, return_z_loss;

    public CrossEntropyLoss(long ignore_index = -100, LossReduction reduction = LossReduction.Mean, double label_smoothing = 0.0,
        double logit_scale = 1.0, double lse_square_scale = 0.0, bool inplace_backward = false, bool return_z_loss = false)
        : base(nameof(CrossEntropyLoss))
    {
        (this.ignore_index, this.reduction, this.label_smoothing, this.logit_scale, this.lse_square_scale, this.inplace_backward,
         this.return_z_loss) = (ignore_index, reduction, label_smoothing, logit_scale, lse_square_scale, inplace_backward, return_z_loss);
    }

    public override Tensor forward(Tensor input, Tensor target) => forward_with_z_loss(input, target).loss;

    /// <summary>The reduced loss and the reduced z-loss (lse_square_scale * lse^2, not differentiable).</summary>
    public (Tensor loss, Tensor z_loss) forward_with_z_loss(Tensor input, Tensor target)
    {
        DeviceErrors.Raise();
        var (loss, z) = flash_attn.CrossEntropy(input, target, new CrossEntropyOptions(label_smoothing, logit_scale, lse_square_scale,
                                                ignore_index, inplace_backward), nameof(input), nameof(target));
        switch (reduction)
        {
            case LossReduction.Mean:
                var count = target.ne(ignore_index).sum().to(loss.dtype);
                return (loss.sum() / count, z.sum() / count);
            case LossReduction.Sum:
                return (loss.sum(), z.sum());
            default:
                return (loss, z);
        }
    }
}

public static partial class layers
{
    /// <summary>A <see cref="FlashAttn.CrossEntropyLoss"/>.</summary>
    public static CrossEntropyLoss CrossEntropyLoss(long ignore_index = -100, LossReduction reduction = LossReduction.Mean,
        double label_smoothing = 0.0, double logit_scale = 1.0, double lse_square_scale = 0.0, bool inplace_backward = false,
        bool return_z_loss = false) =>
        new(ignore_index, reduction, label_smoothing, logit_scale, lse_square_scale, inplace_backward, return_z_loss);
}
