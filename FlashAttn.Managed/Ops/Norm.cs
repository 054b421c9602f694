using FlashAttn.Interop;
using TorchSharp;
using static FlashAttn.Interop.TensorArgs;
using static TorchSharp.torch;

namespace FlashAttn;

public static partial class flash_attn
{
    /// <summary>
    /// Fused dropout + residual add + LayerNorm, as flash_attn.ops.layer_norm.dropout_add_layer_norm:
    /// x = dropout(x0 * rowscale * layerscale) + residual; output = LayerNorm(x) * weight + bias.
    /// </summary>
    /// <param name="x0">(..., hidden), float16/bfloat16/float32 (float64 runs the reference).</param>
    /// <param name="residual">Same shape as x0, x0's dtype or float32; null for none.</param>
    /// <param name="weight">(hidden,), x0's dtype or float32.</param>
    /// <param name="bias">(hidden,) like weight, or null.</param>
    /// <param name="dropout_p">Drop probability in [0, 1) (pass 0 in eval mode).</param>
    /// <param name="epsilon">Added to the variance.</param>
    /// <param name="rowscale">(rows,) per-row scale of x0 (rows = x0.numel() / hidden), e.g. stochastic depth; a constant.</param>
    /// <param name="layerscale">(hidden,) per-column scale of x0; applied by a TorchSharp multiply before the fused op.</param>
    /// <param name="prenorm">Also return the new residual x.</param>
    /// <param name="residual_in_fp32">Keep the new residual in float32 (when no residual is given; else it has residual's dtype).</param>
    /// <param name="return_dropout_mask">Also return the bool keep mask (x0's shape).</param>
    /// <param name="zero_centered_weight">weight stores w - 1: the effective weight is weight + 1.</param>
    /// <param name="generator">Draws the dropout seed (default: TorchSharp's default generator, so manual_seed reproduces masks).</param>
    /// <returns>output (x0's dtype and shape), residual (prenorm only) and dropout_mask (when asked).</returns>
    public static (Tensor output, Tensor? residual, Tensor? dropout_mask) dropout_add_layer_norm(Tensor x0, Tensor? residual,
        Tensor weight, Tensor? bias, double dropout_p, double epsilon, Tensor? rowscale = null, Tensor? layerscale = null,
        bool prenorm = false, bool residual_in_fp32 = false, bool return_dropout_mask = false, bool zero_centered_weight = false,
        Generator? generator = null) =>
        NormFunction.Single(x0, residual, weight, bias, dropout_p, epsilon, rowscale, layerscale, prenorm, residual_in_fp32,
                            return_dropout_mask, zero_centered_weight, isRms: false, generator);

    /// <summary>Fused dropout + residual add + RMSNorm, as flash_attn.ops.rms_norm.dropout_add_rms_norm
    /// (the same options as <see cref="dropout_add_layer_norm"/>; bias is optional).</summary>
    public static (Tensor output, Tensor? residual, Tensor? dropout_mask) dropout_add_rms_norm(Tensor x0, Tensor? residual,
        Tensor weight, Tensor? bias, double dropout_p, double epsilon, Tensor? rowscale = null, Tensor? layerscale = null,
        bool prenorm = false, bool residual_in_fp32 = false, bool return_dropout_mask = false, bool zero_centered_weight = false,
        Generator? generator = null) =>
        NormFunction.Single(x0, residual, weight, bias, dropout_p, epsilon, rowscale, layerscale, prenorm, residual_in_fp32,
                            return_dropout_mask, zero_centered_weight, isRms: true, generator);

    /// <summary>
    /// Parallel residual (GPT-J / GPT-NeoX blocks), as dropout_add_layer_norm_parallel_residual:
    /// x = dropout(x0) + dropout(x1) + residual; out0 = LayerNorm(x) * weight0 + bias0 and, when weight1 is
    /// given, out1 = LayerNorm(x) * weight1 + bias1 (same statistics).
    /// </summary>
    /// <returns>out0, out1 (null without weight1), residual (prenorm only), the keep masks of x0 and x1 (when asked).</returns>
    public static (Tensor out0, Tensor? out1, Tensor? residual, Tensor? dropout_mask0, Tensor? dropout_mask1)
        dropout_add_layer_norm_parallel_residual(Tensor x0, Tensor? x1, Tensor? residual, Tensor weight0, Tensor? bias0,
            Tensor? weight1, Tensor? bias1, double dropout_p, double epsilon, bool prenorm = false, bool residual_in_fp32 = false,
            bool return_dropout_mask = false, bool zero_centered_weight = false, Generator? generator = null) =>
        NormFunction.Parallel(x0, x1, residual, weight0, bias0, weight1, bias1, dropout_p, epsilon, prenorm, residual_in_fp32,
                              return_dropout_mask, zero_centered_weight, isRms: false, generator);

    /// <summary>The RMSNorm flavour of <see cref="dropout_add_layer_norm_parallel_residual"/>.</summary>
    public static (Tensor out0, Tensor? out1, Tensor? residual, Tensor? dropout_mask0, Tensor? dropout_mask1)
        dropout_add_rms_norm_parallel_residual(Tensor x0, Tensor? x1, Tensor? residual, Tensor weight0, Tensor? bias0,
            Tensor? weight1, Tensor? bias1, double dropout_p, double epsilon, bool prenorm = false, bool residual_in_fp32 = false,
            bool return_dropout_mask = false, bool zero_centered_weight = false, Generator? generator = null) =>
        NormFunction.Parallel(x0, x1, residual, weight0, bias0, weight1, bias1, dropout_p, epsilon, prenorm, residual_in_fp32,
                              return_dropout_mask, zero_centered_weight, isRms: true, generator);

    /// <summary>LayerNorm over the last dimension (fused kernel on CUDA): weight (hidden,), bias (hidden,) or null.</summary>
    public static Tensor layer_norm(Tensor x, Tensor weight, Tensor? bias, double epsilon = 1e-5, bool zero_centered_weight = false) =>
        NormFunction.Single(x, null, weight, bias, 0.0, epsilon, null, null, false, false, false, zero_centered_weight, isRms: false,
                            null, "x").Item1;

    /// <summary>RMSNorm over the last dimension (fused kernel on CUDA): x * rsqrt(mean(x^2) + eps) * weight.</summary>
    public static Tensor rms_norm(Tensor x, Tensor weight, double epsilon = 1e-5, bool zero_centered_weight = false) =>
        NormFunction.Single(x, null, weight, null, 0.0, epsilon, null, null, false, false, false, zero_centered_weight, isRms: true,
                            null, "x").Item1;
}

/// <summary>Options of one <see cref="NormFunction"/> call.</summary>
internal sealed record NormOptions(double DropoutP, double Epsilon, bool IsRms, bool ZeroCentered, bool Prenorm,
    ScalarType ResidualOutDtype, bool ReturnMask, ulong Seed);

/// <summary>
/// Autograd function of the fused norms: apply(x0, x1, residual, weight0, bias0, weight1, bias1, rowscale, options)
/// returns [out0, out1 (with weight1), residual (prenorm), mask0, mask1 (return_dropout_mask; mask1 with x1)].
/// The CUDA path regenerates the dropout mask from the seed in the backward; the reference path saves it.
/// </summary>
public sealed class NormFunction : autograd.MultiTensorFunction<NormFunction>
{
    public override string Name => "NormFunction";

    private sealed class Saved
    {
        public bool Kernel, HasX1, HasResidual, HasBias0, HasBias1, HasWeight1;
        public long[] Shape = Array.Empty<long>();
        public ScalarType X0Dtype, ResidualDtype;
        public int X = -1, W0 = -1, W1 = -1, Mean = -1, Rstd = -1, Rowscale = -1, Mask0 = -1, Mask1 = -1;
        public NormOptions Options = null!;
    }

    internal static (Tensor, Tensor?, Tensor?) Single(Tensor x0, Tensor? residual, Tensor weight, Tensor? bias, double p,
        double eps, Tensor? rowscale, Tensor? layerscale, bool prenorm, bool residualInFp32, bool returnMask, bool zeroCentered,
        bool isRms, Generator? generator, string x0Name = "x0")
    {
        DeviceErrors.Raise();
        Validate(x0, null, residual, weight, bias, null, null, rowscale, p, eps, "weight", "bias", x0Name);
        if (layerscale is not null)
        {
            RequireDim(layerscale, 1, "layerscale", "(hidden,)");
            Require(layerscale.size(0) == x0.size(-1), "layerscale", $"layerscale must have hidden ({x0.size(-1)}) elements, got {layerscale.size(0)}");
            RequireSameDevice(layerscale, x0, "layerscale", x0Name);
            x0 = x0 * layerscale.to(x0.dtype);
        }
        var opts = Options(x0, residual, p, eps, isRms, zeroCentered, prenorm, residualInFp32, returnMask, generator);
        var outs = OutputCache.Slim(apply(x0, null, residual, BackwardGuard.Parameter(weight), BackwardGuard.Parameter(bias), null, null, rowscale, opts));
        int k = 1;
        var res = prenorm ? outs[k++] : null;
        var mask = returnMask ? outs[k++] : null;
        return (outs[0], res, mask);
    }

    internal static (Tensor, Tensor?, Tensor?, Tensor?, Tensor?) Parallel(Tensor x0, Tensor? x1, Tensor? residual, Tensor weight0,
        Tensor? bias0, Tensor? weight1, Tensor? bias1, double p, double eps, bool prenorm, bool residualInFp32, bool returnMask,
        bool zeroCentered, bool isRms, Generator? generator)
    {
        DeviceErrors.Raise();
        Validate(x0, x1, residual, weight0, bias0, weight1, bias1, null, p, eps, "weight0", "bias0");
        var opts = Options(x0, residual, p, eps, isRms, zeroCentered, prenorm, residualInFp32, returnMask, generator);
        var outs = OutputCache.Slim(apply(x0, x1, residual, BackwardGuard.Parameter(weight0), BackwardGuard.Parameter(bias0), BackwardGuard.Parameter(weight1),
            BackwardGuard.Parameter(bias1), null, opts));
        int k = 1;
        var out1 = weight1 is not null ? outs[k++] : null;
        var res = prenorm ? outs[k++] : null;
        var m0 = returnMask ? outs[k++] : null;
        var m1 = returnMask && x1 is not null ? outs[k++] : null;
        return (outs[0], out1, res, m0, m1);
    }

    private static NormOptions Options(Tensor x0, Tensor? residual, double p, double eps, bool isRms, bool zeroCentered,
        bool prenorm, bool residualInFp32, bool returnMask, Generator? generator)
    {
        var resDtype = residual?.dtype ?? (residualInFp32 && x0.dtype != ScalarType.Float64 ? ScalarType.Float32 : x0.dtype);
        return new NormOptions(p, eps, isRms, zeroCentered, prenorm, resDtype, returnMask, p > 0 ? DropoutSeed.Draw(generator) : 0);
    }

    internal static void Validate(Tensor x0, Tensor? x1, Tensor? residual, Tensor weight0, Tensor? bias0, Tensor? weight1,
        Tensor? bias1, Tensor? rowscale, double p, double eps, string weightName, string biasName, string x0Name = "x0")
    {
        RequireFloat(x0, x0Name);
        Require(x0.dim() >= 1, x0Name, $"{x0Name} must have at least one dimension (..., hidden)");
        long hidden = x0.size(-1);
        Require(hidden >= 1, x0Name, $"{x0Name}'s last dimension (hidden) must not be empty");
        Require(p >= 0 && p < 1, "dropout_p", $"dropout_p ({p}) must be in [0, 1)");
        Require(eps >= 0 && double.IsFinite(eps), "epsilon", $"epsilon ({eps}) must be finite and >= 0");
        if (x1 is not null)
        {
            Require(x1.dtype == x0.dtype, "x1", $"x1 must have {x0Name}'s dtype ({x0.dtype}), got {x1.dtype}");
            Require(SameShape(x1, x0), "x1", $"x1 must have {x0Name}'s shape {Shape(x0)}, got {Shape(x1)}");
            RequireSameDevice(x1, x0, "x1", x0Name);
        }
        if (residual is not null)
        {
            Require(residual.dtype == x0.dtype || residual.dtype == ScalarType.Float32, "residual",
                    $"residual must be {x0Name}'s dtype ({x0.dtype}) or float32, got {residual.dtype}");
            Require(SameShape(residual, x0), "residual", $"residual must have {x0Name}'s shape {Shape(x0)}, got {Shape(residual)}");
            RequireSameDevice(residual, x0, "residual", x0Name);
        }
        void Param(Tensor? t, string name, Tensor? like, string likeName)
        {
            if (t is null) return;
            RequireDim(t, 1, name, "(hidden,)");
            Require(t.size(0) == hidden, name, $"{name} must have hidden ({hidden}) elements ({x0Name}'s last dimension), got {t.size(0)}");
            Require(t.dtype == x0.dtype || t.dtype == ScalarType.Float32, name,
                    $"{name} must be {x0Name}'s dtype ({x0.dtype}) or float32, got {t.dtype}");
            if (like is not null)
                Require(t.dtype == like.dtype, name, $"{name} must have {likeName}'s dtype ({like.dtype}), got {t.dtype}");
            RequireSameDevice(t, x0, name, x0Name);
        }
        Param(weight0, weightName, null, "");
        Param(bias0, biasName, weight0, weightName);
        Param(weight1, "weight1", weight0, weightName);
        Param(bias1, "bias1", weight0, weightName);
        Require(bias1 is null || weight1 is not null, "bias1", "bias1 needs weight1");
        if (rowscale is not null)
        {
            long rows = x0.numel() / hidden;
            RequireFloat(rowscale, "rowscale");
            Require(rowscale.numel() == rows && rowscale.dim() <= 1 || rowscale.shape.SequenceEqual(x0.shape[..^1]), "rowscale",
                    $"rowscale must have one value per row ({rows} = {x0Name}.numel() / hidden), got shape {Shape(rowscale)}");
            RequireSameDevice(rowscale, x0, "rowscale", x0Name);
        }
    }

    private static bool KernelPath(Tensor x0, Tensor weight0) =>
        Backend.UsesKernels(x0) && x0.size(-1) <= 16384 && x0.numel() > 0 &&
        (weight0.dtype == x0.dtype || weight0.dtype == ScalarType.Float32);

    private static Tensor Rows(Tensor t, long rows, long hidden)
    {
        var r = t.reshape(rows, hidden);
        // the kernels take a row stride >= hidden and a unit column stride (expanded or odd views are copied)
        bool ok = (hidden <= 1 || r.stride(1) == 1) && (rows <= 1 || r.stride(0) >= hidden);
        return ok ? r : r.contiguous();
    }

    /// <summary>The row stride the ABI gets for a (rows, hidden) view (any value is valid for a single row).</summary>
    private static long RowStride(Tensor t) => t.size(0) <= 1 ? t.size(1) : t.stride(0);

    public override List<Tensor> forward(autograd.AutogradContext ctx, params object?[] vars)
    {
        OutputCache.Track(ctx);
        var x0 = (Tensor)vars[0]!;
        var (x1, residual) = ((Tensor?)vars[1], (Tensor?)vars[2]);
        var (w0, b0, w1, b1) = ((Tensor)vars[3]!, (Tensor?)vars[4], (Tensor?)vars[5], (Tensor?)vars[6]);
        var rowscale = (Tensor?)vars[7];
        var o = (NormOptions)vars[8]!;
        // validated again here: apply() may be called directly, and backward must never throw
        Validate(x0, x1, residual, w0, b0, w1, b1, rowscale, o.DropoutP, o.Epsilon, "weight0", "bias0");
        long hidden = x0.size(-1), rows = x0.numel() / hidden;
        var shape = Sizes(x0);
        var s = new Saved
        {
            Options = o, Shape = shape, HasX1 = x1 is not null, HasResidual = residual is not null, HasBias0 = b0 is not null,
            HasBias1 = b1 is not null, HasWeight1 = w1 is not null, X0Dtype = x0.dtype,
            ResidualDtype = residual?.dtype ?? x0.dtype, Kernel = KernelPath(x0, w0),
        };
        var saved = new List<Tensor>();
        int Save(Tensor? t)
        {
            if (t is null) return -1;
            saved.Add(t);
            return saved.Count - 1;
        }
        Tensor z0;
        Tensor? z1, resOut, m0, m1;
        var rs = rowscale?.reshape(rows);
        if (s.Kernel)
        {
            using var scope = NewDisposeScope();
            var x0r = Rows(x0, rows, hidden);
            var x1r = x1 is null ? null : Rows(x1, rows, hidden);
            var rr = residual is null ? null : Rows(residual, rows, hidden);
            var (w0c, b0c, w1c, b1c) = (w0.contiguous(), b0?.contiguous(), w1?.contiguous(), b1?.contiguous());
            var rs32 = rs?.to(ScalarType.Float32).contiguous();
            var dev = x0.device;
            // outputs allocated in x0's shape (the kernel sees them as contiguous (rows, hidden)): a view made
            // here would forbid in-place ops on the outputs downstream
            z0 = empty(shape, dtype: x0.dtype, device: dev);
            z1 = w1 is null ? null : empty(shape, dtype: x0.dtype, device: dev);
            bool needX = o.Prenorm || x1 is not null || residual is not null || o.DropoutP > 0 || rowscale is not null ||
                         o.ResidualOutDtype != x0.dtype;
            resOut = needX ? empty(shape, dtype: o.ResidualOutDtype, device: dev) : null;
            var mean = o.IsRms ? null : empty(rows, dtype: ScalarType.Float32, device: dev);
            var rstd = empty(rows, dtype: ScalarType.Float32, device: dev);
            bool masks = o.ReturnMask && o.DropoutP > 0;
            var m0u = masks ? empty(shape, dtype: ScalarType.Byte, device: dev) : null;
            var m1u = masks && x1 is not null ? empty(shape, dtype: ScalarType.Byte, device: dev) : null;
            NativeMethods.Check(NativeMethods.FlashAttn_norm_fwd(
                Ptr(x0r), PtrOrNull(x1r), PtrOrNull(rr), DType(x0.dtype), DType(residual?.dtype ?? x0.dtype),
                Ptr(w0c), PtrOrNull(b0c), PtrOrNull(w1c), PtrOrNull(b1c), DType(w0.dtype), PtrOrNull(rs32),
                Ptr(z0), PtrOrNull(z1), PtrOrNull(resOut), DType(o.ResidualOutDtype), PtrOrNull(mean), Ptr(rstd),
                PtrOrNull(m0u), PtrOrNull(m1u), rows, hidden, RowStride(x0r), x1r is null ? hidden : RowStride(x1r), rr is null ? hidden : RowStride(rr),
                hidden, hidden, (float)o.Epsilon, (float)o.DropoutP, o.Seed, 0, o.IsRms ? 1 : 0, o.ZeroCentered ? 1 : 0, IntPtr.Zero));
            m0 = masks ? m0u!.to(ScalarType.Bool) : o.ReturnMask ? ones(shape, dtype: ScalarType.Bool, device: dev) : null;
            m1 = masks && x1 is not null ? m1u!.to(ScalarType.Bool)
                : o.ReturnMask && x1 is not null ? ones(shape, dtype: ScalarType.Bool, device: dev) : null;
            s.X = Save(resOut ?? x0r);
            s.Mean = Save(mean);
            s.Rstd = Save(rstd);
            s.Rowscale = Save(rs32);
            MoveOutOnce(saved.Concat(new[] { z0, z1, resOut, m0, m1 }));
        }
        else
        {
            using var scope = NewDisposeScope();
            // CPU: a generator seeded with the call's seed (the same seed, the same mask); elsewhere (ForceReference
            // on a GPU, hidden > 16384) TorchSharp's default generator of the device
            using var gen = x0.device_type == DeviceType.CPU ? new Generator(o.Seed, CPU) : null;
            var r = Reference.dropout_add_norm(x0, x1, residual, w0, b0, w1, b1, o.DropoutP, o.Epsilon, rs,
                o.IsRms, o.ZeroCentered, o.ResidualOutDtype, generator: gen);
            // The reference's results come back as views inside libtorch (and the new residual may alias x0 when
            // nothing is added); outputs of a custom function that are views cannot be modified in place
            // downstream, so the CPU path returns copies of its own.
            (z0, z1, resOut) = (r.out0.clone(), r.out1?.clone(), o.Prenorm ? r.residual.clone() : r.residual);
            m0 = o.ReturnMask ? (r.dropout_mask0?.clone() ?? ones(shape, dtype: ScalarType.Bool, device: x0.device)) : null;
            m1 = o.ReturnMask && x1 is not null ? (r.dropout_mask1?.clone() ?? ones(shape, dtype: ScalarType.Bool, device: x0.device)) : null;
            s.X = Save(r.residual);
            s.Mean = Save(r.mean);
            s.Rstd = Save(r.rstd);
            s.Rowscale = Save(rs);
            s.Mask0 = Save(r.dropout_mask0);
            s.Mask1 = Save(r.dropout_mask1);
            MoveOutOnce(saved.Concat(new[] { z0, z1, resOut, m0, m1 }));
        }
        s.W0 = Save(w0);
        s.W1 = Save(w1);
        ctx.save_for_backward(saved);
        ctx.save_data("saved", s);

        var outputs = new List<Tensor> { z0 };
        if (z1 is not null) outputs.Add(z1);
        if (o.Prenorm) outputs.Add(resOut!);
        var nonDiff = new List<Tensor>();
        if (m0 is not null) { var m = m0; outputs.Add(m); nonDiff.Add(m); }
        if (m1 is not null) { var m = m1; outputs.Add(m); nonDiff.Add(m); }
        if (nonDiff.Count > 0) ctx.mark_non_differentiable(nonDiff);
        return outputs;
    }

    public override List<Tensor> backward(autograd.AutogradContext ctx, List<Tensor> grads) =>
        BackwardGuard.Run(Name, 9, grads, () => Backward(ctx, grads));

    // Each tensor moved to the caller's scope once: the new residual is both an output and saved, and moving it
    // twice lifted it past the caller's scope, to live until a GC (128 MiB a step at 16384 x 2048, which ran the
    // H100 out of memory in the norm benchmarks; LifetimeTests).
    private static void MoveOutOnce(IEnumerable<Tensor?> tensors)
    {
        var moved = new List<Tensor>();
        foreach (var t in tensors)
        {
            if (t is null || BackwardGuard.Holds(moved, t)) continue;
            t.MoveToOuterDisposeScope();
            moved.Add(t);
        }
    }

    private List<Tensor> Backward(autograd.AutogradContext ctx, List<Tensor> grads)
    {
        var s = (Saved)ctx.get_data("saved");
        var o = s.Options;
        var saved = ctx.get_saved_variables();
        Tensor? Get(int i) => i < 0 ? null : saved[i];
        long hidden = s.Shape[^1], rows = s.Shape.Aggregate(1L, (a, b) => a * b) / hidden;
        // the reference path saved tensors in x0's shape, the kernel path (rows, hidden) views
        var x = Rows(Get(s.X)!, rows, hidden);
        var (w0, w1, rs) = (Get(s.W0)!, Get(s.W1), Get(s.Rowscale)?.reshape(rows));
        var (mean, rstd) = (Get(s.Mean)?.reshape(rows), Get(s.Rstd)!.reshape(rows));
        var (mask0, mask1) = (Get(s.Mask0)?.reshape(rows, hidden), Get(s.Mask1)?.reshape(rows, hidden));
        int k = 0;
        var dz0 = Rows(grads[k++], rows, hidden).to(s.X0Dtype);
        var dz1 = s.HasWeight1 ? Rows(grads[k++], rows, hidden).to(s.X0Dtype) : null;
        var dres = o.Prenorm ? Rows(grads[k++], rows, hidden).to(x.dtype) : null;
        NormReferenceGrads g;
        if (s.Kernel)
        {
            var dev = x.device;
            var dx0 = empty(rows, hidden, dtype: s.X0Dtype, device: dev);
            var dx1 = s.HasX1 ? empty(rows, hidden, dtype: s.X0Dtype, device: dev) : null;
            var dresidual = s.HasResidual ? empty(rows, hidden, dtype: s.ResidualDtype, device: dev) : null;
            var dw0 = empty_like(w0);
            var db0 = s.HasBias0 ? empty_like(w0) : null;
            var dw1 = w1 is null ? null : empty_like(w1);
            var db1 = w1 is not null && s.HasBias1 ? empty_like(w1) : null;
            using (var scope = NewDisposeScope())
            {
                var wsBytes = NativeMethods.FlashAttn_norm_bwd_workspace_size(rows, hidden, s.HasBias0 ? 1 : 0, w1 is null ? 0 : 1, s.HasBias1 ? 1 : 0);
                var ws = wsBytes > 0 ? empty(wsBytes, dtype: ScalarType.Byte, device: dev) : null;
                var (w0c, w1c) = (w0.contiguous(), w1?.contiguous());
                BackwardGuard.Check(NativeMethods.FlashAttn_norm_bwd(
                    Ptr(dz0), PtrOrNull(dz1), PtrOrNull(dres), Ptr(x), DType(x.dtype), Ptr(w0c), PtrOrNull(w1c), DType(w0.dtype),
                    PtrOrNull(mean), Ptr(rstd), PtrOrNull(rs), Ptr(dx0), PtrOrNull(dx1), PtrOrNull(dresidual), DType(s.ResidualDtype),
                    Ptr(dw0), PtrOrNull(db0), PtrOrNull(dw1), PtrOrNull(db1), DType(s.X0Dtype), rows, hidden,
                    RowStride(dz0), dres is null ? hidden : RowStride(dres), RowStride(x), hidden, hidden,
                    (float)o.DropoutP, o.Seed, 0, o.IsRms ? 1 : 0, o.ZeroCentered ? 1 : 0, PtrOrNull(ws), wsBytes, IntPtr.Zero),
                    dx0, dx1, dresidual, dw0, db0, dw1, db1);
            }
            g = new NormReferenceGrads(dx0, dx1, dresidual, dw0, db0, dw1, db1);
        }
        else
        {
            g = Reference.dropout_add_norm_backward(dz0, dz1, dres, x, w0, w1, mean, rstd, rs, mask0, mask1,
                o.DropoutP, o.IsRms, o.ZeroCentered, s.HasBias0, s.HasBias1, s.HasX1, s.HasResidual, s.X0Dtype, s.ResidualDtype);
        }
        // one entry per apply() argument: x0, x1, residual, weight0, bias0, weight1, bias1, rowscale, options
        return new List<Tensor>
        {
            g.dx0.reshape(s.Shape), g.dx1?.reshape(s.Shape)!, g.dresidual?.reshape(s.Shape)!, g.dweight0, g.dbias0!, g.dweight1!,
            g.dbias1!, null!, null!,
        };
    }
}
