using FlashAttn.Interop;
using TorchSharp;
using static FlashAttn.Interop.TensorArgs;
using static TorchSharp.torch;

namespace FlashAttn;

public static partial class flash_attn
{
    /// <summary>
    /// Softmax cross-entropy per row, as flash_attn.losses.cross_entropy.cross_entropy_loss: one pass over the
    /// logits forward, one backward, with any vocabulary size.
    /// </summary>
    /// <param name="logits">(N, V), float16/bfloat16/float32 (float64 runs the reference); the row stride may exceed V.</param>
    /// <param name="labels">(N,) int64 in [0, V); rows equal to <paramref name="ignore_index"/> give loss 0 and no gradient.
    /// Another label outside [0, V) never gives a finite loss: on the CPU it is an ArgumentException before anything runs;
    /// on a GPU that row's loss, z_loss and gradient are NaN and the error is raised, naming labels, by the next
    /// flash_attn call or by <see cref="check_errors"/> (checking it here would make every step wait for the device).</param>
    /// <param name="label_smoothing">Weight of the uniform distribution mixed into the target, in [0, 1].</param>
    /// <param name="logit_scale">Logits are multiplied by this before the softmax.</param>
    /// <param name="lse_square_scale">z-loss: adds lse_square_scale * logsumexp^2 to each row's loss.</param>
    /// <param name="ignore_index">Label value of ignored rows.</param>
    /// <param name="inplace_backward">The backward writes the gradient into logits' storage (no N x V allocation);
    /// logits must then not be needed afterwards.</param>
    /// <returns>loss (N,) float32 (z-loss included) and z_loss (N,) float32 (not differentiable).</returns>
    public static (Tensor loss, Tensor z_loss) cross_entropy_loss(Tensor logits, Tensor labels, double label_smoothing = 0.0,
        double logit_scale = 1.0, double lse_square_scale = 0.0, long ignore_index = -100, bool inplace_backward = false)
    {
        DeviceErrors.Raise();
        return CrossEntropy(logits, labels, new CrossEntropyOptions(label_smoothing, logit_scale, lse_square_scale, ignore_index,
                                                                    inplace_backward), "logits", "labels");
    }

    // cross_entropy_loss, validated under the caller's argument names (CrossEntropyLoss's input and target).
    internal static (Tensor loss, Tensor z_loss) CrossEntropy(Tensor logits, Tensor labels, CrossEntropyOptions opts, string logitsName,
        string labelsName)
    {
        CrossEntropyFunction.Validate(logits, labels, opts, logitsName, labelsName);
        var outs = CrossEntropyFunction.apply(logits, labels, opts);
        return (outs[0], outs[1]);
    }
}

internal sealed record CrossEntropyOptions(double LabelSmoothing, double LogitScale, double LseSquareScale, long IgnoreIndex,
    bool InplaceBackward);

/// <summary>Autograd function of <see cref="flash_attn.cross_entropy_loss"/>: apply(logits, labels, options) returns
/// [loss, z_loss]; the backward writes into logits' storage when inplace_backward.</summary>
public sealed class CrossEntropyFunction : autograd.MultiTensorFunction<CrossEntropyFunction>
{
    public override string Name => "CrossEntropyFunction";

    internal static void Validate(Tensor logits, Tensor labels, CrossEntropyOptions o, string logitsName = "logits", string labelsName = "labels")
    {
        RequireFloat(logits, logitsName);
        RequireDim(logits, 2, logitsName, "(N, V)");
        Require(logits.size(1) >= 1, logitsName, $"{logitsName} must have at least one class");
        RequireContiguousLastDim(logits, logitsName);
        Require(labels.dtype == ScalarType.Int64, labelsName, $"{labelsName} must be int64, got {labels.dtype}");
        RequireDim(labels, 1, labelsName, "(N,)");
        Require(labels.size(0) == logits.size(0), labelsName, $"{labelsName} must have N ({logits.size(0)}) entries, got {labels.size(0)}");
        RequireSameDevice(labels, logits, labelsName, logitsName);
        Require(o.LabelSmoothing >= 0 && o.LabelSmoothing <= 1, "label_smoothing", $"label_smoothing ({o.LabelSmoothing}) must be in [0, 1]");
        Require(double.IsFinite(o.LogitScale), "logit_scale", $"logit_scale ({o.LogitScale}) must be finite");
        Require(o.LseSquareScale >= 0 && double.IsFinite(o.LseSquareScale), "lse_square_scale",
                $"lse_square_scale ({o.LseSquareScale}) must be finite and >= 0");
        if (labels.device_type == DeviceType.CPU)
        {
            using var scope = NewDisposeScope();
            var bad = IdsOutside(labels, logits.size(1), o.IgnoreIndex).nonzero();
            if (bad.size(0) > 0)
            {
                long row = bad[0, 0].item<long>();
                throw new ArgumentException($"{labelsName} must be in [0, {logits.size(1)}) (the vocabulary) or ignore_index ({o.IgnoreIndex}), " +
                                            $"got {labels[row].item<long>()} in row {row}", labelsName);
            }
        }
    }

    private static bool KernelPath(Tensor logits) =>
        Backend.UsesKernels(logits) && logits.numel() > 0 && logits.size(0) * ((logits.size(1) + 16383) / 16384) <= int.MaxValue;

    public override List<Tensor> forward(autograd.AutogradContext ctx, params object?[] vars)
    {
        var (logits, labels) = ((Tensor)vars[0]!, (Tensor)vars[1]!);
        var o = (CrossEntropyOptions)vars[2]!;
        Validate(logits, labels, o);
        bool kernel = KernelPath(logits);
        Tensor loss, zLoss, lse;
        if (kernel && logits.size(0) > 1 && logits.stride(0) < logits.size(1))
            logits = logits.contiguous(); // expanded rows: the kernels need row stride >= V
        if (kernel)
        {
            long n = logits.size(0), v = logits.size(1);
            var dev = logits.device;
            DeviceErrors.Arm(); // the kernel records labels outside the vocabulary
            loss = empty(n, dtype: ScalarType.Float32, device: dev);
            zLoss = empty(n, dtype: ScalarType.Float32, device: dev);
            lse = empty(n, dtype: ScalarType.Float32, device: dev);
            using var scope = NewDisposeScope();
            var lab = labels.contiguous();
            var wsBytes = NativeMethods.FlashAttn_cross_entropy_fwd_workspace_size(n, v);
            var ws = empty(Math.Max(wsBytes, 1), dtype: ScalarType.Byte, device: dev);
            NativeMethods.Check(NativeMethods.FlashAttn_cross_entropy_fwd(
                Ptr(logits), DType(logits.dtype), Ptr(lab), Ptr(loss), Ptr(zLoss), Ptr(lse), n, v, n <= 1 ? v : logits.stride(0),
                (float)o.LabelSmoothing, (float)o.LogitScale, (float)o.LseSquareScale, o.IgnoreIndex, Ptr(ws), wsBytes, IntPtr.Zero));
        }
        else
        {
            // on a GPU (the reference computes NaN for such rows, as the kernel); on the CPU Validate has thrown
            if (labels.device_type != DeviceType.CPU)
            {
                using var outside = IdsOutside(labels, logits.size(1), o.IgnoreIndex);
                using var ok = outside.logical_not();
                DeviceErrors.Check(ok, "labels", "a label of cross_entropy_loss is outside [0, vocab) and not ignore_index: that row's loss and gradient are NaN");
            }
            (loss, zLoss, lse) = Reference.cross_entropy(logits, labels, o.LabelSmoothing, o.LogitScale, o.LseSquareScale, o.IgnoreIndex);
        }
        ctx.save_for_backward(new List<Tensor> { logits, labels, lse });
        ctx.save_data("options", o);
        ctx.save_data("kernel", kernel);
        ctx.mark_non_differentiable(new List<Tensor> { zLoss });
        return new List<Tensor> { loss, zLoss };
    }

    public override List<Tensor> backward(autograd.AutogradContext ctx, List<Tensor> grads) =>
        BackwardGuard.Run(Name, 3, grads, () => Backward(ctx, grads));

    private List<Tensor> Backward(autograd.AutogradContext ctx, List<Tensor> grads)
    {
        var saved = ctx.get_saved_variables();
        var (logits, labels, lse) = (saved[0], saved[1], saved[2]);
        var o = (CrossEntropyOptions)ctx.get_data("options");
        Tensor dlogits;
        if ((bool)ctx.get_data("kernel"))
        {
            long n = logits.size(0), v = logits.size(1);
            dlogits = o.InplaceBackward ? logits : empty_like(logits);
            using var scope = NewDisposeScope();
            var dloss = grads[0].to(ScalarType.Float32);
            if (dloss.dim() == 0 || dloss.size(0) != n) dloss = dloss.expand(n);
            long dlossStride = dloss.stride(0);
            if (dlossStride != 0 && dlossStride != 1) { dloss = dloss.contiguous(); dlossStride = 1; }
            var lab = labels.contiguous();
            BackwardGuard.Check(NativeMethods.FlashAttn_cross_entropy_bwd(
                Ptr(dloss), dlossStride, Ptr(logits), Ptr(lab), Ptr(lse), Ptr(dlogits), DType(logits.dtype), n, v,
                n <= 1 ? v : logits.stride(0), n <= 1 ? v : dlogits.stride(0), (float)o.LabelSmoothing, (float)o.LogitScale, (float)o.LseSquareScale,
                o.IgnoreIndex, IntPtr.Zero), dlogits);
        }
        else
        {
            var d = Reference.cross_entropy_backward(grads[0], logits, labels, lse, o.LabelSmoothing, o.LogitScale,
                                                     o.LseSquareScale, o.IgnoreIndex);
            if (o.InplaceBackward)
            {
                using (no_grad()) logits.copy_(d);
                dlogits = logits;
            }
            else
            {
                dlogits = d;
            }
        }
        return new List<Tensor> { dlogits, null!, null! };
    }
}
