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
    /// <param name="expected_grad">The gradient the backward is expected to receive for loss: () or (N,), float, on logits'
    /// device (a mean's scale / number of counted rows, computed on the device). When given, and a gradient is wanted
    /// (grad mode on, logits requiring it), the forward computes the gradient for it in the same pass over the logits
    /// (with inplace_backward into logits' storage, so that the logits are overwritten by the forward: nothing else may
    /// read them afterwards), and the backward only compares, on the device, the gradient it receives with this one:
    /// rows where they differ are scaled by their ratio (one more pass, one more rounding; on the GPU a second backward
    /// through the graph scales the first one's result, a rounding more again). Any gradient gives the right result; the
    /// expected one makes the backward free. It must not be 0 where the real one is not (nothing to scale: the gradient is
    /// then NaN).</param>
    /// <returns>loss (N,) float32 (z-loss included) and z_loss (N,) float32 (not differentiable).</returns>
    public static (Tensor loss, Tensor z_loss) cross_entropy_loss(Tensor logits, Tensor labels, double label_smoothing = 0.0,
        double logit_scale = 1.0, double lse_square_scale = 0.0, long ignore_index = -100, bool inplace_backward = false,
        Tensor? expected_grad = null)
    {
        DeviceErrors.Raise();
        return CrossEntropy(logits, labels, new CrossEntropyOptions(label_smoothing, logit_scale, lse_square_scale, ignore_index,
                                                                    inplace_backward, expected_grad), "logits", "labels");
    }

    // cross_entropy_loss, validated under the caller's argument names (CrossEntropyLoss's input and target).
    internal static (Tensor loss, Tensor z_loss) CrossEntropy(Tensor logits, Tensor labels, CrossEntropyOptions opts, string logitsName,
        string labelsName)
    {
        CrossEntropyFunction.Validate(logits, labels, opts, logitsName, labelsName);
        // the gradient in the forward only where a backward will want it
        if (opts.ExpectedGrad is not null && !(is_grad_enabled() && logits.requires_grad)) opts = opts with { ExpectedGrad = null };
        var outs = OutputCache.Slim(CrossEntropyFunction.apply(logits, labels, opts));
        return (outs[0], outs[1]);
    }
}

// ExpectedGrad: the forward computes the gradient for it (FlashAttn_cross_entropy_fwd_bwd); null: the backward does.
internal sealed record CrossEntropyOptions(double LabelSmoothing, double LogitScale, double LseSquareScale, long IgnoreIndex,
    bool InplaceBackward, Tensor? ExpectedGrad = null);

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
        if (o.ExpectedGrad is { } e)
        {
            RequireFloat(e, "expected_grad");
            Require(e.numel() == 1 && e.dim() <= 1 || e.dim() == 1 && e.size(0) == logits.size(0), "expected_grad",
                    $"expected_grad must be () or (N,) with N = {logits.size(0)}, got [{string.Join(", ", e.shape)}]");
            RequireSameDevice(e, logits, "expected_grad", logitsName);
        }
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
        OutputCache.Track(ctx);
        var (logits, labels) = ((Tensor)vars[0]!, (Tensor)vars[1]!);
        var o = (CrossEntropyOptions)vars[2]!;
        Validate(logits, labels, o);
        bool kernel = KernelPath(logits);
        Tensor loss, zLoss, lse;
        if (kernel && logits.size(0) > 1 && logits.stride(0) < logits.size(1))
            logits = logits.contiguous(); // expanded rows: the kernels need row stride >= V
        if (o.ExpectedGrad is not null) return ForwardWithGradient(ctx, logits, labels, o, kernel);
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
        ctx.save_data("fused", false);
        ctx.mark_non_differentiable(new List<Tensor> { zLoss });
        return new List<Tensor> { loss, zLoss };
    }

    // Loss and z-loss, and dlogits for o.ExpectedGrad (into logits' storage with InplaceBackward); saves dlogits and the
    // gradient each row's dlogits hold (dloss_applied) for the backward's comparison.
    private static List<Tensor> ForwardWithGradient(autograd.AutogradContext ctx, Tensor logits, Tensor labels, CrossEntropyOptions o,
        bool kernel)
    {
        long n = logits.size(0), v = logits.size(1);
        var dev = logits.device;
        Tensor loss, zLoss, dlogits, applied;
        if (kernel)
        {
            DeviceErrors.Arm(); // the kernel records labels outside the vocabulary
            dlogits = o.InplaceBackward ? logits : empty_like(logits);
            loss = empty(n, dtype: ScalarType.Float32, device: dev);
            zLoss = empty(n, dtype: ScalarType.Float32, device: dev);
            applied = empty(n, dtype: ScalarType.Float32, device: dev);
            using var scope = NewDisposeScope();
            var (expected, expectedStride) = RowGradient(o.ExpectedGrad!, n);
            var lab = labels.contiguous();
            var wsBytes = NativeMethods.FlashAttn_cross_entropy_fwd_bwd_workspace_size(n, v);
            var ws = empty(Math.Max(wsBytes, 1), dtype: ScalarType.Byte, device: dev);
            NativeMethods.Check(NativeMethods.FlashAttn_cross_entropy_fwd_bwd(
                Ptr(logits), Ptr(dlogits), DType(logits.dtype), Ptr(lab), Ptr(expected), expectedStride, Ptr(loss), Ptr(zLoss),
                Ptr(applied), n, v, n <= 1 ? v : logits.stride(0), n <= 1 ? v : dlogits.stride(0), (float)o.LabelSmoothing,
                (float)o.LogitScale, (float)o.LseSquareScale, o.IgnoreIndex, Ptr(ws), wsBytes, IntPtr.Zero));
        }
        else
        {
            if (labels.device_type != DeviceType.CPU)
            {
                using var outside = IdsOutside(labels, v, o.IgnoreIndex);
                using var ok = outside.logical_not();
                DeviceErrors.Check(ok, "labels", "a label of cross_entropy_loss is outside [0, vocab) and not ignore_index: that row's loss and gradient are NaN");
            }
            Tensor lse;
            (loss, zLoss, lse) = Reference.cross_entropy(logits, labels, o.LabelSmoothing, o.LogitScale, o.LseSquareScale, o.IgnoreIndex);
            using var scope = NewDisposeScope();
            var d = Reference.cross_entropy_backward(o.ExpectedGrad!, logits, labels, lse, o.LabelSmoothing, o.LogitScale,
                                                     o.LseSquareScale, o.IgnoreIndex);
            if (o.InplaceBackward)
            {
                using (no_grad()) logits.copy_(d);
                dlogits = logits;
            }
            else dlogits = d.MoveToOuterDisposeScope();
            applied = o.ExpectedGrad!.to(lse.dtype).expand(n).clone().MoveToOuterDisposeScope();
        }
        ctx.save_for_backward(new List<Tensor> { dlogits, labels, applied });
        ctx.save_data("options", o with { ExpectedGrad = null }); // the backward reads the real one
        ctx.save_data("kernel", kernel);
        ctx.save_data("fused", true);
        ctx.mark_non_differentiable(new List<Tensor> { zLoss });
        return new List<Tensor> { loss, zLoss };
    }

    // A per-row gradient as the kernels read it: float32, element r at [r * stride] (stride 0: one value for every row).
    private static (Tensor grad, long stride) RowGradient(Tensor g, long n)
    {
        var f = g.to(ScalarType.Float32);
        if (f.dim() == 0 || f.size(0) != n) f = f.reshape(1).expand(n);
        long stride = f.stride(0);
        if (stride != 0 && stride != 1) { f = f.contiguous(); stride = 1; }
        return (f, stride);
    }

    public override List<Tensor> backward(autograd.AutogradContext ctx, List<Tensor> grads) =>
        BackwardGuard.Run(Name, 3, grads, () => Backward(ctx, grads));

    private List<Tensor> Backward(autograd.AutogradContext ctx, List<Tensor> grads)
    {
        var saved = ctx.get_saved_variables();
        if (ctx.get_data("fused") is true) return BackwardOfGradient(ctx, grads, saved);
        var (logits, labels, lse) = (saved[0], saved[1], saved[2]);
        var o = (CrossEntropyOptions)ctx.get_data("options");
        Tensor dlogits;
        if ((bool)ctx.get_data("kernel"))
        {
            long n = logits.size(0), v = logits.size(1);
            dlogits = o.InplaceBackward ? logits : empty_like(logits);
            using var scope = NewDisposeScope();
            var (dloss, dlossStride) = RowGradient(grads[0], n);
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

    // The backward of ForwardWithGradient: the saved dlogits, scaled on the device where the real gradient differs from
    // the one they were computed for.
    private static List<Tensor> BackwardOfGradient(autograd.AutogradContext ctx, List<Tensor> grads, IList<Tensor> saved)
    {
        var (dlogits, labels, applied) = (saved[0], saved[1], saved[2]);
        var o = (CrossEntropyOptions)ctx.get_data("options");
        if (!(bool)ctx.get_data("kernel"))
            return new List<Tensor> { Reference.cross_entropy_rescale(dlogits, grads[0], applied, labels, o.IgnoreIndex), null!, null! };
        long n = dlogits.size(0), v = dlogits.size(1);
        using var scope = NewDisposeScope();
        var (dloss, dlossStride) = RowGradient(grads[0], n);
        var lab = labels.contiguous();
        BackwardGuard.Check(NativeMethods.FlashAttn_cross_entropy_bwd_rescale(
            Ptr(dlogits), DType(dlogits.dtype), Ptr(lab), Ptr(dloss), dlossStride, Ptr(applied), n, v,
            n <= 1 ? v : dlogits.stride(0), o.IgnoreIndex, IntPtr.Zero), dlogits);
        return new List<Tensor> { dlogits, null!, null! };
    }
}
