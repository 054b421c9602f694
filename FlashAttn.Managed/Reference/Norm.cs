using TorchSharp;
using static TorchSharp.torch;

namespace FlashAttn;

/// <summary>What <see cref="Reference.dropout_add_norm"/> computes: the normalized outputs, the new
/// residual (the pre-norm sum x), the keep masks and the row statistics (float32, or float64 for float64 inputs).</summary>
public sealed record NormReferenceOutput(Tensor out0, Tensor? out1, Tensor residual, Tensor? dropout_mask0,
    Tensor? dropout_mask1, Tensor? mean, Tensor rstd);

/// <summary>The gradients <see cref="Reference.dropout_add_norm_backward"/> computes (null where there is no such input).</summary>
public sealed record NormReferenceGrads(Tensor dx0, Tensor? dx1, Tensor? dresidual, Tensor dweight0, Tensor? dbias0,
    Tensor? dweight1, Tensor? dbias1);

public static partial class Reference
{
    /// <summary>
    /// Dropout + residual add + LayerNorm (or RMSNorm) with <see cref="flash_attn.dropout_add_layer_norm"/>'s
    /// semantics, differentiable by TorchSharp's autograd: x = dropout(x0 * rowscale) + dropout(x1) + residual,
    /// out0 = norm(x) * w0 + b0 (out1 with w1/b1, sharing the statistics); w = weight + 1 when
    /// zero_centered_weight. The masks are taken from <paramref name="dropout_mask0"/>/<paramref name="dropout_mask1"/>
    /// when given (bool or uint8, x0's shape), else drawn from <paramref name="generator"/> (keep rate 1 - p).
    /// The residual is returned in <paramref name="residual_dtype"/> (default: residual's dtype, else x0's);
    /// statistics and outputs use the unrounded float32 sum. <paramref name="compute_dtype"/> overrides the
    /// arithmetic's dtype (tests use x0's own dtype to measure a low-precision computation's error).
    /// </summary>
    public static NormReferenceOutput dropout_add_norm(Tensor x0, Tensor? x1, Tensor? residual, Tensor weight0, Tensor? bias0,
        Tensor? weight1, Tensor? bias1, double dropout_p, double epsilon, Tensor? rowscale = null, bool is_rms_norm = false,
        bool zero_centered_weight = false, ScalarType? residual_dtype = null, Tensor? dropout_mask0 = null,
        Tensor? dropout_mask1 = null, Generator? generator = null, ScalarType? compute_dtype = null)
    {
        using var scope = NewDisposeScope();
        var ct = compute_dtype ?? ComputeType(x0.dtype);
        double scale = dropout_p > 0 ? 1.0 / (1.0 - dropout_p) : 1.0;
        Tensor? mask0 = null, mask1 = null;

        Tensor Drop(Tensor t, Tensor? given, out Tensor? mask)
        {
            mask = null;
            if (dropout_p <= 0 && given is null) return t;
            mask = given?.to(ScalarType.Bool) ?? KeepMask(t.shape, 1.0 - dropout_p, t.device, generator);
            return t * mask.to(t.dtype) * scale;
        }

        var x0c = x0.to(ct);
        if (rowscale is not null) x0c = x0c * rowscale.to(ct).reshape(x0.shape[..^1]).unsqueeze(-1);
        var x = Drop(x0c, dropout_mask0, out mask0);
        if (x1 is not null) x = x + Drop(x1.to(ct), dropout_mask1, out mask1);
        if (residual is not null) x = x + residual.to(ct);
        var resDtype = residual_dtype ?? residual?.dtype ?? x0.dtype;

        var statType = ComputeType(ct);
        var xs = x.to(statType);
        Tensor? mean = null;
        Tensor rstd;
        if (is_rms_norm)
        {
            rstd = (xs.square().mean(new long[] { -1 }, keepdim: true) + epsilon).rsqrt();
        }
        else
        {
            mean = xs.mean(new long[] { -1 }, keepdim: true);
            rstd = ((xs - mean).square().mean(new long[] { -1 }, keepdim: true) + epsilon).rsqrt();
        }
        var xhat = (is_rms_norm ? xs * rstd : (xs - mean!) * rstd).to(ct);

        Tensor Affine(Tensor w, Tensor? b)
        {
            var we = w.to(ct);
            if (zero_centered_weight) we = we + 1.0;
            var o = xhat * we;
            if (b is not null) o = o + b.to(ct);
            return o.to(x0.dtype);
        }

        var out0 = Affine(weight0, bias0);
        var out1 = weight1 is null ? null : Affine(weight1, bias1);
        var result = new NormReferenceOutput(out0, out1, x.to(resDtype), mask0, mask1,
            mean?.squeeze(-1).detach(), rstd.squeeze(-1).detach());
        foreach (var t in new[] { result.out0, result.out1, result.residual, result.dropout_mask0, result.dropout_mask1, result.mean, result.rstd })
            t?.MoveToOuterDisposeScope();
        return result;
    }

    /// <summary>LayerNorm over the last dimension, float32 statistics, output in x's dtype.</summary>
    public static Tensor layer_norm(Tensor x, Tensor weight, Tensor? bias, double epsilon = 1e-5, bool zero_centered_weight = false,
        ScalarType? compute_dtype = null) =>
        dropout_add_norm(x, null, null, weight, bias, null, null, 0, epsilon, zero_centered_weight: zero_centered_weight,
                         compute_dtype: compute_dtype).out0;

    /// <summary>RMSNorm over the last dimension, float32 statistics, output in x's dtype.</summary>
    public static Tensor rms_norm(Tensor x, Tensor weight, double epsilon = 1e-5, bool zero_centered_weight = false,
        ScalarType? compute_dtype = null) =>
        dropout_add_norm(x, null, null, weight, null, null, null, 0, epsilon, is_rms_norm: true,
                         zero_centered_weight: zero_centered_weight, compute_dtype: compute_dtype).out0;

    /// <summary>
    /// The backward of <see cref="dropout_add_norm"/> by its closed form (what the kernel computes), from the
    /// saved sum <paramref name="x"/>, the statistics and the masks: dx = rstd (w dz - (xhat mean(w dz xhat) + mean(w dz)))
    /// (+ the residual output's gradient), dx0 = dx * mask0 / (1 - p) * rowscale, dweight = sum over rows of dz xhat.
    /// All tensors are (rows, hidden) except the (hidden,) weights and the (rows,) statistics.
    /// </summary>
    public static NormReferenceGrads dropout_add_norm_backward(Tensor dz0, Tensor? dz1, Tensor? dresidual_out, Tensor x,
        Tensor weight0, Tensor? weight1, Tensor? mean, Tensor rstd, Tensor? rowscale, Tensor? dropout_mask0,
        Tensor? dropout_mask1, double dropout_p, bool is_rms_norm, bool zero_centered_weight, bool has_bias0, bool has_bias1,
        bool has_x1, bool has_residual, ScalarType x0_dtype, ScalarType residual_dtype, ScalarType? compute_dtype = null)
    {
        using var scope = NewDisposeScope();
        var ct = compute_dtype ?? ComputeType(x0_dtype == ScalarType.Float64 ? x0_dtype : x.dtype);
        var r = rstd.to(ct).unsqueeze(-1);
        var xc = x.to(ct);
        var xhat = is_rms_norm ? xc * r : (xc - mean!.to(ct).unsqueeze(-1)) * r;
        Tensor W(Tensor w) => zero_centered_weight ? w.to(ct) + 1.0 : w.to(ct);
        var g0 = dz0.to(ct);
        var wdy = g0 * W(weight0);
        Tensor? g1 = null;
        if (weight1 is not null)
        {
            g1 = dz1!.to(ct);
            wdy = wdy + g1 * W(weight1);
        }
        var c1 = (wdy * xhat).mean(new long[] { -1 }, keepdim: true);
        var dx = is_rms_norm ? r * (wdy - xhat * c1) : r * (wdy - (xhat * c1 + wdy.mean(new long[] { -1 }, keepdim: true)));
        if (dresidual_out is not null) dx = dx + dresidual_out.to(ct);
        double scale = dropout_p > 0 ? 1.0 / (1.0 - dropout_p) : 1.0;
        var dx0 = dropout_mask0 is null ? dx : dx * dropout_mask0.to(ct) * scale;
        if (rowscale is not null) dx0 = dx0 * rowscale.to(ct).reshape(dx0.shape[..^1]).unsqueeze(-1);
        Tensor? dx1 = null;
        if (has_x1) dx1 = (dropout_mask1 is null ? dx : dx * dropout_mask1.to(ct) * scale).to(x0_dtype);
        var grads = new NormReferenceGrads(
            dx0.to(x0_dtype), dx1, has_residual ? dx.to(residual_dtype) : null,
            (g0 * xhat).sum(dim: 0).to(weight0.dtype), has_bias0 ? g0.sum(dim: 0).to(weight0.dtype) : null,
            weight1 is null ? null : (g1! * xhat).sum(dim: 0).to(weight1.dtype),
            weight1 is not null && has_bias1 ? g1!.sum(dim: 0).to(weight1.dtype) : null);
        foreach (var t in new[] { grads.dx0, grads.dx1, grads.dresidual, grads.dweight0, grads.dbias0, grads.dweight1, grads.dbias1 })
            t?.MoveToOuterDisposeScope();
        return grads;
    }

    /// <summary>A bool keep mask with P(keep) = <paramref name="keep"/>.</summary>
    internal static Tensor KeepMask(long[] shape, double keep, Device device, Generator? generator)
    {
        // rand on the generator's device, moved to the data's (the CPU generator drives CPU tests).
        var genDevice = generator is null ? device : CPU;
        return rand(shape, dtype: ScalarType.Float32, device: genDevice, generator: generator).lt(keep).to(device);
    }
}
