using FlashAttn.Interop;
using TorchSharp;
using static TorchSharp.torch;

namespace FlashAttn;

public static partial class Reference
{
    /// <summary>One tensor of <see cref="adamw_step"/>: its weight, gradient (null: only the sum), float32 (or float64)
    /// gradient sum, master weight and moments (the state dtype), 0-d float32 step count (written) and its value
    /// before this step as the host keeps it (read: no device round trip per tensor), and its group's
    /// hyperparameters.</summary>
    internal readonly record struct AdamWTensor(Tensor Param, Tensor? Grad, Tensor? GradSum, Tensor? Master, Tensor ExpAvg,
        Tensor ExpAvgSq, Tensor Step, long Steps, double Lr, double Beta1, double Beta2, double Eps, double WeightDecay);

    /// <summary>
    /// One step of <see cref="FusedAdamW"/> with FlashAttn_optim_adamw_step's semantics, in the state's dtype (float32,
    /// or float64 for float64 state) and torch.optim.AdamW's operation order: the global norm of the unscaled gradients
    /// into <paramref name="gradNorm"/>; when it is not finite only <paramref name="foundInf"/> = 1; else the gradients
    /// clipped to <paramref name="maxNorm"/> (when > 0), each step count incremented and the AdamW update of the master
    /// (else the parameter itself), the parameter taking its rounded value. Returns whether the step was taken.
    /// </summary>
    internal static bool adamw_step(IReadOnlyList<AdamWTensor> tensors, Tensor? gradScale, double maxNorm, Tensor gradNorm,
        Tensor foundInf)
    {
        using var scope = NewDisposeScope();
        using var _ = no_grad();
        using var scalars = new ScalarScope();  // every double argument below, freed now rather than by the finalizer
        Scalar S(double value) => scalars.Of(value);
        var one = S(1);  // add's alpha, which TorchSharp would otherwise make (and leave to the finalizer) at each call
        var grads = new Tensor[tensors.Count];
        var squares = new List<Tensor>();
        for (int i = 0; i < tensors.Count; i++)
        {
            var t = tensors[i];
            var ct = t.ExpAvg.dtype;
            var g = t.Grad?.to(ct) ?? zeros_like(t.ExpAvg);
            if (t.GradSum is not null) g = g.add(t.GradSum, one);
            if (gradScale is not null) g = g * gradScale.to(ct).reciprocal();
            grads[i] = g;
            squares.Add(g.pow(S(2)).sum().to(ScalarType.Float64));  // square() is pow(2) with a Scalar of its own
        }
        var total = squares.Count == 0 ? tensor(0.0, ScalarType.Float64, gradNorm.device) : stack(squares).sum();
        var norm = total.sqrt();
        gradNorm.copy_(norm);
        // finite as the kernel decides it: the float32 norm
        var finite = TensorArgs.Item<bool>(gradNorm.isfinite());
        foundInf.fill_(S(finite ? 0 : 1));
        if (!finite) return false;
        for (int i = 0; i < tensors.Count; i++)
        {
            var t = tensors[i];
            var ct = t.ExpAvg.dtype;
            var g = grads[i];
            if (maxNorm > 0)
            {
                // torch's clip_grad_norm_: min(1, max_norm / (norm + 1e-6)), in the state's dtype
                var n = ct == ScalarType.Float64 ? norm : gradNorm;
                g = g * (full_like(n, S(maxNorm)) / n.add(S(1e-6), one)).clamp_max(S(1.0));
            }
            double step = t.Steps + 1;
            var w = t.Master ?? (t.Param.dtype == ct ? t.Param : t.Param.to(ct));
            w.mul_(S(1 - t.Lr * t.WeightDecay));
            t.ExpAvg.mul_(S(t.Beta1)).add_(g, alpha: S(1 - t.Beta1));
            t.ExpAvgSq.mul_(S(t.Beta2)).addcmul_(g, g, value: S(1 - t.Beta2));
            var denom = (t.ExpAvgSq.sqrt() / S(Math.Sqrt(1 - Math.Pow(t.Beta2, step)))).add_(S(t.Eps), one);
            w.addcdiv_(t.ExpAvg, denom, value: S(-t.Lr / (1 - Math.Pow(t.Beta1, step))));
            if (!ReferenceEquals(w, t.Param)) t.Param.copy_(w);
            t.Step.add_(one, one);
        }
        return true;
    }
}
