using FlashAttn.Interop;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;
using F = TorchSharp.torch.nn.functional;

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
        TensorArgs.RequireLastDim(input, hidden_size, nameof(input), "hidden_size");
        return NormFunction.Single(input, null, weight, null, 0.0, eps, null, null, false, false, false, zero_centered_weight,
                                   isRms: true, null, nameof(input)).Item1;
    }
}

/// <summary>
/// flash-attn's DropoutAddLayerNorm: forward(x0, residual) = LayerNorm(drop_path(dropout(x0)) + residual), the new
/// residual also returned when prenorm (float32 under bf16/fp16 with residual_in_fp32): the step of a pre-norm
/// transformer's residual stream. Dropout and drop-path apply in training mode only; drop_path is stochastic depth (each
/// sample's x0 dropped whole with that probability, the kept ones scaled by 1 / (1 - drop_path)), passed to the kernel as
/// its rowscale. fused_dropout_add_ln = false computes the same with TorchSharp's dropout, add and layer_norm (the plain
/// path a model is compared with). Parameters <c>weight</c>, <c>bias</c>, as torch.nn.LayerNorm.
/// </summary>
public sealed class DropoutAddLayerNorm : nn.Module<Tensor, Tensor?, (Tensor output, Tensor? residual)>
{
    public readonly long hidden_size;
    public readonly bool prenorm, residual_in_fp32, fused_dropout_add_ln;
    public readonly double p, eps, drop_path;
#pragma warning disable IDE0044
    private Parameter weight;
    private Parameter bias;
#pragma warning restore IDE0044

    public DropoutAddLayerNorm(long hidden_size, bool prenorm = false, double p = 0.0, double eps = 1e-5,
        bool residual_in_fp32 = false, Device? device = null, ScalarType? dtype = null, double drop_path = 0.0,
        bool fused_dropout_add_ln = true) : base(nameof(DropoutAddLayerNorm))
    {
        if (!(drop_path >= 0 && drop_path < 1)) throw new ArgumentException($"drop_path ({drop_path}) must be in [0, 1)", nameof(drop_path));
        (this.hidden_size, this.prenorm, this.p, this.eps, this.residual_in_fp32) = (hidden_size, prenorm, p, eps, residual_in_fp32);
        (this.drop_path, this.fused_dropout_add_ln) = (drop_path, fused_dropout_add_ln);
        weight = new Parameter(ones(hidden_size, dtype: dtype, device: device));
        bias = new Parameter(zeros(hidden_size, dtype: dtype, device: device));
        _normalizedShape = [hidden_size];
        RegisterComponents();
    }

    private readonly long[] _normalizedShape; // layer_norm's, for the plain path

    public Parameter Weight => weight;
    public Parameter Bias => bias;

    public override (Tensor output, Tensor? residual) forward(Tensor x0, Tensor? residual)
    {
        TensorArgs.RequireModuleInput(x0, nameof(x0), weight, sameDtype: false);
        TensorArgs.RequireLastDim(x0, hidden_size, nameof(x0), "hidden_size");
        double pDrop = training ? p : 0.0, pPath = training ? drop_path : 0.0;
        var rowscale = pPath > 0 ? DropPathRowscale(x0, pPath) : null;
        if (fused_dropout_add_ln)
        {
            var (o, r, _) = flash_attn.dropout_add_layer_norm(x0, residual, weight, bias, pDrop, eps, rowscale: rowscale,
                                                              prenorm: prenorm, residual_in_fp32: residual_in_fp32);
            return (o, r);
        }
        // the checks the fused op makes (residual's shape, dtype and device, p, eps), so both paths refuse the same input
        NormFunction.Validate(x0, null, residual, weight, bias, null, null, rowscale, pDrop, eps, "weight", "bias");
        var dropped = pDrop > 0 ? F.dropout(x0, pDrop, training: true) : x0;
        if (rowscale is not null) dropped = dropped * rowscale.view(x0.shape[..^1].Append(1L).ToArray());
        var res = residual is null ? dropped : dropped.add(residual, Scalars.One);
        var output = F.layer_norm(res.to(weight.dtype), _normalizedShape, weight, bias, eps);
        if (residual_in_fp32 && res.dtype != ScalarType.Float64) res = res.to(ScalarType.Float32);
        return (output, prenorm ? res : null);
    }

    // stochastic depth: one keep draw per sample, scaled by 1 / (1 - p), repeated over the sample's rows: (rows,) in x0's dtype
    private static Tensor DropPathRowscale(Tensor x0, double p)
    {
        var keep = empty(new[] { x0.size(0) }, ScalarType.Float32, x0.device).bernoulli_(1 - p).div_(1 - p);
        long perSample = x0.shape[1..^1].Aggregate(1L, (a, b) => a * b);
        return keep.view(-1, 1).expand(x0.size(0), perSample).reshape(-1).to(x0.dtype);
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
        TensorArgs.RequireLastDim(x0, hidden_size, nameof(x0), "hidden_size");
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
        bool residual_in_fp32 = false, Device? device = null, ScalarType? dtype = null, double drop_path = 0.0,
        bool fused_dropout_add_ln = true) =>
        new(hidden_size, prenorm, p, eps, residual_in_fp32, device, dtype, drop_path, fused_dropout_add_ln);

    /// <summary>A <see cref="FlashAttn.DropoutAddRMSNorm"/>.</summary>
    public static DropoutAddRMSNorm DropoutAddRMSNorm(long hidden_size, bool prenorm = false, double p = 0.0, double eps = 1e-5,
        bool residual_in_fp32 = false, Device? device = null, ScalarType? dtype = null) =>
        new(hidden_size, prenorm, p, eps, residual_in_fp32, device, dtype);
}
