using FlashAttn.Interop;
using TorchSharp;
using static TorchSharp.torch;
using F = TorchSharp.torch.nn.functional;

namespace FlashAttn.Models;

/// <summary>The cross-entropy GPT's next-token loss and ViT's classification loss are made of (labels of -100 ignored).</summary>
internal static class ModelLoss
{
    /// <summary>Mean of <see cref="Rows"/> over the rows whose label is not -100. lossGrad (0-d float32 on the logits' device,
    /// or null): the gradient the mean's backward will receive; with fused, the kernel then computes the logits' gradient in
    /// the forward, into the logits' storage (the logits are the loss's alone), and the backward only checks it on the device.</summary>
    internal static Tensor Mean(Tensor logits, Tensor labels, bool fused, Tensor? lossGrad = null)
    {
        var count = labels.ne(Scalars.IgnoreIndex).sum().clamp_min(Scalars.One);
        if (fused && lossGrad is not null)
        {
            // expected per row: lossGrad / count by the division the mean's backward does, so that the two are equal to the bit
            var n = count.to(ScalarType.Float32);
            var rows = flash_attn.cross_entropy_loss(logits, labels, ignore_index: -100, inplace_backward: true,
                                                     expected_grad: lossGrad.to(ScalarType.Float32) / n).loss;
            return rows.sum() / n.to(rows.dtype);
        }
        var r = Rows(logits, labels, fused);
        return r.sum() / count.to(r.dtype);
    }

    /// <summary>Per-row losses (N,) of logits (N, V) against labels (N,), zero where labels are -100: the fused kernel (in-place
    /// backward: no second logits-sized buffer), or TorchSharp's cross_entropy in float32 for bf16/fp16 logits (as the
    /// PyTorch baselines) and float32/float64 as they are.</summary>
    internal static Tensor Rows(Tensor logits, Tensor labels, bool fused)
    {
        if (fused) return flash_attn.cross_entropy_loss(logits, labels, ignore_index: -100, inplace_backward: true).loss;
        // The fused kernel's semantics for a label outside the vocabulary (TorchSharp's cross_entropy fails on it, on a GPU
        // with a device-side assert that ends the CUDA context): an ArgumentException on the CPU, on a GPU a NaN loss for
        // its row and an error raised by the next flash_attn call.
        TensorArgs.Require(labels.dtype == ScalarType.Int64, nameof(labels), $"labels must be int64, got {labels.dtype}");
        TensorArgs.RequireSameDevice(labels, logits, nameof(labels), "the logits");
        var outside = TensorArgs.IdsOutside(labels, logits.size(-1), ignore_index: -100);
        flash_attn.assert_async(outside.logical_not(), nameof(labels), "labels must be in [0, vocabulary) or -100: the rows of others have a NaN loss");
        var x = logits.dtype is ScalarType.BFloat16 or ScalarType.Float16 ? logits.to(ScalarType.Float32) : logits;
        return F.cross_entropy(x, labels.masked_fill(outside, Scalars.IgnoreIndex), ignore_index: -100, reduction: nn.Reduction.None)
            .masked_fill(outside, Scalars.NaN);
    }
}
