using FlashAttn.Interop;
using TorchSharp;
using static TorchSharp.torch;

namespace FlashAttn;

public static partial class Reference
{
    /// <summary>
    /// Per-row softmax cross-entropy with <see cref="flash_attn.cross_entropy_loss"/>'s semantics, differentiable
    /// by TorchSharp's autograd. With z = logit_scale * logits and lse = logsumexp(z):
    /// loss = lse - (1 - label_smoothing) z[label] - label_smoothing mean(z) + lse_square_scale lse^2,
    /// z_loss = lse_square_scale lse^2; rows whose label is ignore_index give 0 for both, rows whose label is otherwise
    /// outside [0, V) NaN for both (as the kernel).
    /// Computes in float32 (float64 for float64 logits) unless <paramref name="compute_dtype"/> says otherwise.
    /// </summary>
    /// <returns>loss, z_loss and lse, (N,) each, in the compute dtype.</returns>
    public static (Tensor loss, Tensor z_loss, Tensor lse) cross_entropy(Tensor logits, Tensor labels, double label_smoothing = 0.0,
        double logit_scale = 1.0, double lse_square_scale = 0.0, long ignore_index = -100, ScalarType? compute_dtype = null)
    {
        using var scope = NewDisposeScope();
        var ct = compute_dtype ?? ComputeType(logits.dtype);
        var z = logits.to(ct) * logit_scale;
        var lse = z.logsumexp(-1);
        var (valid, outside, safe) = Labels(labels, logits.shape[^1], ignore_index);
        var zLabel = z.gather(-1, safe).squeeze(-1);
        var zl = lse.square() * lse_square_scale;
        var loss = lse - zLabel * (1.0 - label_smoothing) + zl;
        if (label_smoothing > 0) loss = loss - z.sum(-1) * (label_smoothing / logits.shape[^1]);
        var zero = zeros_like(loss);
        loss = where(valid, loss, zero).masked_fill(outside, double.NaN);
        zl = where(valid, zl, zero).masked_fill(outside, double.NaN);
        return (loss.MoveToOuterDisposeScope(), zl.MoveToOuterDisposeScope(), lse.detach().MoveToOuterDisposeScope());
    }

    /// <summary>
    /// The backward of <see cref="cross_entropy"/> by its closed form (what the kernel computes):
    /// dlogits = dloss * logit_scale * (softmax(z) (1 + 2 lse_square_scale lse) - (1 - label_smoothing) onehot(label)
    /// - label_smoothing / V), zero for ignored rows, NaN for rows whose label is otherwise outside [0, V); in logits' dtype.
    /// </summary>
    public static Tensor cross_entropy_backward(Tensor dloss, Tensor logits, Tensor labels, Tensor lse, double label_smoothing = 0.0,
        double logit_scale = 1.0, double lse_square_scale = 0.0, long ignore_index = -100, ScalarType? compute_dtype = null)
    {
        using var scope = NewDisposeScope();
        var ct = compute_dtype ?? ComputeType(logits.dtype);
        var l = lse.to(ct).unsqueeze(-1);
        var probs = (logits.to(ct) * logit_scale - l).exp() * (l * (2.0 * lse_square_scale) + 1.0);
        var (valid, outside, safe) = Labels(labels, logits.shape[^1], ignore_index);
        var g = probs - label_smoothing / logits.shape[^1];
        g = g.scatter_add(-1, safe, full_like(safe, -(1.0 - label_smoothing), dtype: ct));
        var d = (dloss.to(ct).expand(labels.shape) * logit_scale * valid.to(ct)).masked_fill(outside, double.NaN).unsqueeze(-1);
        return (g * d).to(logits.dtype).MoveToOuterDisposeScope();
    }

    /// <summary>
    /// The backward of a forward that computed dlogits for the gradient dloss_applied ((N,), the compute dtype): dlogits
    /// times dloss / dloss_applied (in the compute dtype) on the rows where they differ and the label is not ignore_index,
    /// dlogits' values elsewhere. Out of place, what FlashAttn_cross_entropy_bwd_rescale computes in place (the kernel's
    /// writes, unlike an in-place op here, leave the saved tensors' versions alone; a second backward through the graph
    /// then starts again from the forward's dlogits and dloss_applied, the kernel's from its first).
    /// </summary>
    public static Tensor cross_entropy_rescale(Tensor dlogits, Tensor dloss, Tensor dloss_applied, Tensor labels, long ignore_index = -100)
    {
        using var scope = NewDisposeScope();
        var d = dloss.to(dloss_applied.dtype).expand(labels.shape);
        var differs = d.ne(dloss_applied).logical_and(labels.ne(ignore_index)).unsqueeze(-1);
        var scaled = (dlogits.to(dloss_applied.dtype) * (d / dloss_applied).unsqueeze(-1)).to(dlogits.dtype);
        return where(differs, scaled, dlogits).MoveToOuterDisposeScope();
    }

    // Rows that count (label != ignore_index), rows whose label is outside [0, V) and not ignored, and labels safe to
    // gather with ((N, 1), 0 where not valid or outside).
    private static (Tensor valid, Tensor outside, Tensor safe) Labels(Tensor labels, long vocab, long ignore_index)
    {
        var valid = labels.ne(ignore_index);
        var outside = valid.logical_and(TensorArgs.IdsOutside(labels, vocab));
        var safe = labels.masked_fill(valid.logical_not().logical_or(outside), 0).unsqueeze(-1);
        return (valid, outside, safe);
    }
}
