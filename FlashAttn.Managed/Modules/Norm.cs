using FlashAttn.Interop;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace FlashAttn;

/// <summary>
/// Drop-in for torch.nn.LayerNorm on the fused kernel: the same parameter names (<c>weight</c>, <c>bias</c>),
/// normalized_shape, eps and elementwise_affine, so state dicts load unchanged. The normalized
/// dimensions are flattened into one hidden size (at most 16384 for the kernel; larger sizes take the reference path).
/// </summary>
public sealed class FusedLayerNorm : nn.Module<Tensor, Tensor>
{
    public readonly long[] normalized_shape;
    public readonly double eps;
    public readonly bool elementwise_affine;
    private readonly long _hidden;
#pragma warning disable IDE0044 // registered by name: weight / bias, as torch.nn.LayerNorm
    private Parameter? weight;
    private Parameter? bias;
#pragma warning restore IDE0044

    public FusedLayerNorm(long[] normalized_shape, double eps = 1e-5, bool elementwise_affine = true, bool bias = true,
        Device? device = null, ScalarType? dtype = null) : base(nameof(FusedLayerNorm))
    {
        this.normalized_shape = normalized_shape.ToArray();
        this.eps = eps;
        this.elementwise_affine = elementwise_affine;
        _hidden = normalized_shape.Aggregate(1L, (a, b) => a * b);
        if (elementwise_affine)
        {
            weight = new Parameter(ones(normalized_shape, dtype: dtype, device: device));
            this.bias = bias ? new Parameter(zeros(normalized_shape, dtype: dtype, device: device)) : null;
        }
        RegisterComponents();
    }

    public Parameter? Weight => weight;
    public Parameter? Bias => bias;

    public override Tensor forward(Tensor input)
    {
        int nd = normalized_shape.Length;
        if (input.dim() < nd || !input.shape[^nd..].SequenceEqual(normalized_shape))
            throw new ArgumentException($"input's trailing dimensions must be normalized_shape [{string.Join(", ", normalized_shape)}], got [{string.Join(", ", input.shape)}]", nameof(input));
        if (weight is not null) TensorArgs.RequireModuleInput(input, nameof(input), weight, sameDtype: false);
        using var scope = NewDisposeScope();
        var x = nd == 1 ? input : input.reshape(input.shape[..^nd].Append(_hidden).ToArray());
        var w = weight is not null ? weight.reshape(_hidden) : ones(_hidden, dtype: input.dtype, device: input.device);
        var y = NormFunction.Single(x, null, w, bias?.reshape(_hidden), 0.0, eps, null, null, false, false, false, false, isRms: false,
                                    null, nameof(input)).Item1;
        return (nd == 1 ? y : y.reshape(input.shape)).MoveToOuterDisposeScope();
    }
}

/// <summary>RMSNorm (x * rsqrt(mean(x^2) + eps) * weight) on the fused kernel, as flash_attn.ops.rms_norm.RMSNorm;
/// parameter <c>weight</c> (hidden,). zero_centered_weight stores weight - 1 (initialised to 0).</summary>
public sealed class RMSNorm : nn.Module<Tensor, Tensor>
{
    public readonly long hidden_size;
    public readonly double eps;
    public readonly bool zero_centered_weight;
#pragma warning disable IDE0044
    private Parameter weight;
#pragma warning restore IDE0044

    public RMSNorm(long hidden_size, double eps = 1e-5, bool zero_centered_weight = false, Device? device = null,
        ScalarType? dtype = null) : base(nameof(RMSNorm))
    {
        (this.hidden_size, this.eps, this.zero_centered_weight) = (hidden_size, eps, zero_centered_weight);
        weight = new Parameter(zero_centered_weight ? zeros(hidden_size, dtype: dtype, device: device)
                                                    : ones(hidden_size, dtype: dtype, device: device));
        RegisterComponents();
    }

    public Parameter Weight => weight;

    public override Tensor forward(Tensor input)
    {
        TensorArgs.RequireModuleInput(input, nameof(input), weight, sameDtype: false);
        NormModules.RequireHidden(input, nameof(input), hidden_size);
        return NormFunction.Single(input, null, weight, null, 0.0, eps, null, null, false, false, false, zero_centered_weight,
                                   isRms: true, null, nameof(input)).Item1;
    }
}

/// <summary>
/// flash-attn's DropoutAddLayerNorm: forward(x0, residual) = LayerNorm(dropout(x0) + residual), the new residual
/// also returned when prenorm. Dropout applies in training mode only. Parameters <c>weight</c>, <c>bias</c>.
/// </summary>
public sealed class DropoutAddLayerNorm : nn.Module<Tensor, Tensor?, (Tensor output, Tensor? residual)>
{
    public readonly long hidden_size;
    public readonly bool prenorm, residual_in_fp32;
    public readonly double p, eps;
#pragma warning disable IDE0044
    private Parameter weight;
    private Parameter bias;
#pragma warning restore IDE0044

    public DropoutAddLayerNorm(long hidden_size, bool prenorm = false, double p = 0.0, double eps = 1e-5,
        bool residual_in_fp32 = false, Device? device = null, ScalarType? dtype = null) : base(nameof(DropoutAddLayerNorm))
    {
        (this.hidden_size, this.prenorm, this.p, this.eps, this.residual_in_fp32) = (hidden_size, prenorm, p, eps, residual_in_fp32);
        weight = new Parameter(ones(hidden_size, dtype: dtype, device: device));
        bias = new Parameter(zeros(hidden_size, dtype: dtype, device: device));
        RegisterComponents();
    }

    public Parameter Weight => weight;
    public Parameter Bias => bias;

    public override (Tensor output, Tensor? residual) forward(Tensor x0, Tensor? residual)
    {
        TensorArgs.RequireModuleInput(x0, nameof(x0), weight, sameDtype: false);
        NormModules.RequireHidden(x0, nameof(x0), hidden_size);
        var (o, r, _) = flash_attn.dropout_add_layer_norm(x0, residual, weight, bias, training ? p : 0.0, eps,
                                                          prenorm: prenorm, residual_in_fp32: residual_in_fp32);
        return (o, r);
    }
}

/// <summary>flash-attn's DropoutAddRMSNorm: RMSNorm(dropout(x0) + residual), the new residual also returned when
/// prenorm. Dropout applies in training mode only. Parameter <c>weight</c>.</summary>
public sealed class DropoutAddRMSNorm : nn.Module<Tensor, Tensor?, (Tensor output, Tensor? residual)>
{
    public readonly long hidden_size;
    public readonly bool prenorm, residual_in_fp32;
    public readonly double p, eps;
#pragma warning disable IDE0044
    private Parameter weight;
#pragma warning restore IDE0044

    public DropoutAddRMSNorm(long hidden_size, bool prenorm = false, double p = 0.0, double eps = 1e-5,
        bool residual_in_fp32 = false, Device? device = null, ScalarType? dtype = null) : base(nameof(DropoutAddRMSNorm))
    {
        (this.hidden_size, this.prenorm, this.p, this.eps, this.residual_in_fp32) = (hidden_size, prenorm, p, eps, residual_in_fp32);
        weight = new Parameter(ones(hidden_size, dtype: dtype, device: device));
        RegisterComponents();
    }

    public Parameter Weight => weight;

    public override (Tensor output, Tensor? residual) forward(Tensor x0, Tensor? residual)
    {
        TensorArgs.RequireModuleInput(x0, nameof(x0), weight, sameDtype: false);
        NormModules.RequireHidden(x0, nameof(x0), hidden_size);
        var (o, r, _) = flash_attn.dropout_add_rms_norm(x0, residual, weight, null, training ? p : 0.0, eps,
                                                        prenorm: prenorm, residual_in_fp32: residual_in_fp32);
        return (o, r);
    }
}

public static partial class layers
{
    /// <summary>A <see cref="FlashAttn.FusedLayerNorm"/> over the last dimension (drop-in for nn.LayerNorm(hidden)).</summary>
    public static FusedLayerNorm FusedLayerNorm(long normalized_shape, double eps = 1e-5, bool elementwise_affine = true,
        bool bias = true, Device? device = null, ScalarType? dtype = null) =>
        new(new[] { normalized_shape }, eps, elementwise_affine, bias, device, dtype);

    /// <summary>A <see cref="FlashAttn.FusedLayerNorm"/> over the trailing <paramref name="normalized_shape"/> dimensions.</summary>
    public static FusedLayerNorm FusedLayerNorm(long[] normalized_shape, double eps = 1e-5, bool elementwise_affine = true,
        bool bias = true, Device? device = null, ScalarType? dtype = null) =>
        new(normalized_shape, eps, elementwise_affine, bias, device, dtype);

    /// <summary>An <see cref="FlashAttn.RMSNorm"/> of <paramref name="hidden_size"/> features.</summary>
    public static RMSNorm RMSNorm(long hidden_size, double eps = 1e-5, bool zero_centered_weight = false, Device? device = null,
        ScalarType? dtype = null) => new(hidden_size, eps, zero_centered_weight, device, dtype);

    /// <summary>A <see cref="FlashAttn.DropoutAddLayerNorm"/>.</summary>
    public static DropoutAddLayerNorm DropoutAddLayerNorm(long hidden_size, bool prenorm = false, double p = 0.0, double eps = 1e-5,
        bool residual_in_fp32 = false, Device? device = null, ScalarType? dtype = null) =>
        new(hidden_size, prenorm, p, eps, residual_in_fp32, device, dtype);

    /// <summary>A <see cref="FlashAttn.DropoutAddRMSNorm"/>.</summary>
    public static DropoutAddRMSNorm DropoutAddRMSNorm(long hidden_size, bool prenorm = false, double p = 0.0, double eps = 1e-5,
        bool residual_in_fp32 = false, Device? device = null, ScalarType? dtype = null) =>
        new(hidden_size, prenorm, p, eps, residual_in_fp32, device, dtype);
}

internal static class NormModules
{
    /// <summary>A norm module's input (..., hidden_size).</summary>
    internal static void RequireHidden(Tensor input, string name, long hidden) =>
        TensorArgs.Require(input.dim() >= 1 && input.size(-1) == hidden, name,
                           $"{name} must be (..., hidden_size = {hidden}), got {TensorArgs.Shape(input)}");
}
