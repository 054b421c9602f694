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
/// expected_grad: the gradient the reduced loss's backward will receive (1 for a plain loss.backward(), a trainer's
/// 1 / accumulation steps); when set, the forward computes the logits' gradient in the same pass
/// (<see cref="flash_attn.cross_entropy_loss"/>'s expected_grad, per row: it over the number of counted rows for Mean,
/// itself for Sum and None), and with inplace_backward the input is overwritten by it in the forward.
/// </summary>
public sealed class CrossEntropyLoss : nn.Module<Tensor, Tensor, Tensor>
{
    public readonly long ignore_index;
    public readonly LossReduction reduction;
    public readonly double label_smoothing, logit_scale, lse_square_scale;
    public readonly bool inplace_backward, return_z_loss;
    public readonly double? expected_grad;

    public CrossEntropyLoss(long ignore_index = -100, LossReduction reduction = LossReduction.Mean, double label_smoothing = 0.0,
        double logit_scale = 1.0, double lse_square_scale = 0.0, bool inplace_backward = false, bool return_z_loss = false,
        double? expected_grad = null)
        : base(nameof(CrossEntropyLoss))
    {
        if (expected_grad is { } g && (!double.IsFinite(g) || g == 0))
            throw new ArgumentException($"expected_grad ({g}) must be finite and not 0", nameof(expected_grad));
        (this.ignore_index, this.reduction, this.label_smoothing, this.logit_scale, this.lse_square_scale, this.inplace_backward,
         this.return_z_loss, this.expected_grad) =
            (ignore_index, reduction, label_smoothing, logit_scale, lse_square_scale, inplace_backward, return_z_loss, expected_grad);
    }

    public override Tensor forward(Tensor input, Tensor target) => forward_with_z_loss(input, target).loss;

    /// <summary>The reduced loss and the reduced z-loss (lse_square_scale * lse^2, not differentiable).</summary>
    public (Tensor loss, Tensor z_loss) forward_with_z_loss(Tensor input, Tensor target)
    {
        DeviceErrors.Raise();
        // the loss's dtype: the per-row gradient expected for a Mean is the reduced one over the same count, by the same
        // division as the backward's, so that the two are equal to the bit
        var count = reduction == LossReduction.Mean
            ? target.ne(ignore_index).sum().to(input.dtype == ScalarType.Float64 ? ScalarType.Float64 : ScalarType.Float32)
            : null;
        Tensor? expected = null;
        if (expected_grad is { } g)
        {
            expected = full(Array.Empty<long>(), g, count?.dtype ?? ScalarType.Float32, device: input.device);
            if (count is not null) expected = expected / count;
        }
        var (loss, z) = flash_attn.CrossEntropy(input, target, new CrossEntropyOptions(label_smoothing, logit_scale, lse_square_scale,
                                                ignore_index, inplace_backward, expected), nameof(input), nameof(target));
        switch (reduction)
        {
            case LossReduction.Mean:
                return (loss.sum() / count!, z.sum() / count!);
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
        bool return_z_loss = false, double? expected_grad = null) =>
        new(ignore_index, reduction, label_smoothing, logit_scale, lse_square_scale, inplace_backward, return_z_loss, expected_grad);
}
