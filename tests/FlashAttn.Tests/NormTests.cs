using System.Runtime.InteropServices;
using FlashAttn.Interop;
using NUnit.Framework;
using TorchSharp;
using static TorchSharp.torch;

namespace FlashAttn.Tests;

/// <summary>The fused norms on CPU (reference path): the reference against a float64 element-by-element
/// definition, the autograd function's closed-form backward against TorchSharp autograd of the reference,
/// modules against torch.nn.LayerNorm, prenorm / residual_in_fp32 outputs, dropout, argument validation.</summary>
public sealed class NormTests
{
    [SetUp]
    public void Seed() => manual_seed(TestContext.CurrentContext.Random.Next());

    /// <summary>The definition, one row at a time in float64: x = x0 * rowscale * mask0 / (1 - p) + x1 * mask1 / (1 - p)
    /// + residual, z = (x - mean) / sqrt(var + eps) * w + b (mean 0, var = mean(x^2) for RMSNorm).</summary>
    internal static (double[,] z0, double[,]? z1, double[,] x) Oracle(Tensor x0, Tensor? x1, Tensor? residual, Tensor w0, Tensor? b0,
        Tensor? w1, Tensor? b1, double eps, bool rms, Tensor? rowscale, Tensor? mask0, Tensor? mask1, double p, bool zeroCentered = false)
    {
        double[] D(Tensor? t) => t is null ? Array.Empty<double>() : t.to(ScalarType.Float64).contiguous().data<double>().ToArray();
        long H = x0.shape[^1], R = x0.numel() / H;
        var (a0, a1, res, rs, m0, m1) = (D(x0), D(x1), D(residual), D(rowscale), D(mask0?.to(ScalarType.Float64)), D(mask1?.to(ScalarType.Float64)));
        var (ww0, bb0, ww1, bb1) = (D(w0), D(b0), D(w1), D(b1));
        double scale = p > 0 ? 1 / (1 - p) : 1;
        var z0 = new double[R, H];
        var z1 = w1 is null ? null : new double[R, H];
        var xs = new double[R, H];
        for (long r = 0; r < R; r++)
        {
            var x = new double[H];
            for (long c = 0; c < H; c++)
            {
                long i = r * H + c;
                double v = a0[i] * (rs.Length > 0 ? rs[r] : 1);
                if (m0.Length > 0) v *= m0[i] * scale;
                if (a1.Length > 0) v += a1[i] * (m1.Length > 0 ? m1[i] * scale : 1);
                if (res.Length > 0) v += res[i];
                x[c] = v;
                xs[r, c] = v;
            }
            double mean = rms ? 0 : x.Average();
            double var_ = x.Select(v => (v - mean) * (v - mean)).Average();
            double rstd = 1 / Math.Sqrt(var_ + eps);
            double add = zeroCentered ? 1 : 0;
            for (long c = 0; c < H; c++)
            {
                double xh = (x[c] - mean) * rstd;
                z0[r, c] = xh * (ww0[c] + add) + (bb0.Length > 0 ? bb0[c] : 0);
                if (z1 is not null) z1[r, c] = xh * (ww1[c] + add) + (bb1.Length > 0 ? bb1[c] : 0);
            }
        }
        return (z0, z1, xs);
    }

    private static Tensor T(double[,] a, long[] shape) => tensor(a).view(shape);

    [TestCase(false, false), TestCase(true, false), TestCase(false, true), TestCase(true, true)]
    public void ReferenceMatchesElementwiseDefinition(bool rms, bool zeroCentered)
    {
        var x0 = randn(3, 5, 37, dtype: ScalarType.Float64);
        var res = randn(3, 5, 37, dtype: ScalarType.Float64);
        var w = randn(37, dtype: ScalarType.Float64);
        var b = randn(37, dtype: ScalarType.Float64);
        var rowscale = rand(15, dtype: ScalarType.Float64);
        var mask = rand(3, 5, 37).lt(0.7);
        var r = Reference.dropout_add_norm(x0, null, res, w, b, null, null, 0.3, 1e-5, rowscale, rms, zeroCentered,
                                           dropout_mask0: mask);
        var (z0, _, x) = Oracle(x0, null, res, w, b, null, null, 1e-5, rms, rowscale, mask, null, 0.3, zeroCentered);
        Assert.That(Tolerance.MaxAbsDiff(r.out0, T(z0, x0.shape)), Is.LessThan(1e-10));
        Assert.That(Tolerance.MaxAbsDiff(r.residual, T(x, x0.shape)), Is.LessThan(1e-12));
    }

    [TestCase(false), TestCase(true)]
    public void ParallelReferenceMatchesElementwiseDefinition(bool rms)
    {
        var x0 = randn(9, 24, dtype: ScalarType.Float64);
        var x1 = randn(9, 24, dtype: ScalarType.Float64);
        var res = randn(9, 24, dtype: ScalarType.Float64);
        var (w0, b0, w1, b1) = (randn(24, dtype: ScalarType.Float64), randn(24, dtype: ScalarType.Float64),
                                randn(24, dtype: ScalarType.Float64), randn(24, dtype: ScalarType.Float64));
        var (m0, m1) = (rand(9, 24).lt(0.8), rand(9, 24).lt(0.8));
        var r = Reference.dropout_add_norm(x0, x1, res, w0, b0, w1, b1, 0.2, 1e-6, null, rms, dropout_mask0: m0, dropout_mask1: m1);
        var (z0, z1, x) = Oracle(x0, x1, res, w0, b0, w1, b1, 1e-6, rms, null, m0, m1, 0.2);
        Assert.That(Tolerance.MaxAbsDiff(r.out0, tensor(z0)), Is.LessThan(1e-10));
        Assert.That(Tolerance.MaxAbsDiff(r.out1!, tensor(z1!)), Is.LessThan(1e-10));
        Assert.That(Tolerance.MaxAbsDiff(r.residual, tensor(x)), Is.LessThan(1e-12));
    }

    [TestCase(false, false, 0.0), TestCase(true, false, 0.0), TestCase(false, true, 0.25), TestCase(true, true, 0.25)]
    public void AutogradFunctionBackwardMatchesAutogradOfReference(bool rms, bool prenorm, double p)
    {
        var x0 = randn(4, 6, 48, dtype: ScalarType.Float64, requires_grad: true);
        var res = randn(4, 6, 48, dtype: ScalarType.Float64, requires_grad: true);
        var w = (randn(48, dtype: ScalarType.Float64) * 0.5 + 1).requires_grad_(true);
        var b = randn(48, dtype: ScalarType.Float64, requires_grad: true);
        var rowscale = rand(4, 6, dtype: ScalarType.Float64) + 0.5;
        var f = rms ? (Func<(Tensor, Tensor?, Tensor?)>)(() => flash_attn.dropout_add_rms_norm(x0, res, w, b, p, 1e-5, rowscale,
                          prenorm: prenorm, return_dropout_mask: true))
                    : () => flash_attn.dropout_add_layer_norm(x0, res, w, b, p, 1e-5, rowscale, prenorm: prenorm, return_dropout_mask: true);
        var (z, newRes, mask) = f();
        Assert.That(newRes is null, Is.EqualTo(!prenorm));
        Assert.That(mask, Is.Not.Null);
        var gz = randn_like(z);
        var gr = randn_like(z);
        var outs = new List<Tensor> { z };
        var gs = new List<Tensor> { gz };
        if (prenorm) { outs.Add(newRes!); gs.Add(gr); }
        autograd.backward(outs, gs);

        var (x0r, resr, wr, br) = (x0.detach().clone().requires_grad_(true), res.detach().clone().requires_grad_(true),
                                   w.detach().clone().requires_grad_(true), b.detach().clone().requires_grad_(true));
        var r = Reference.dropout_add_norm(x0r, null, resr, wr, br, null, null, p, 1e-5, rowscale.reshape(-1), rms,
                                           dropout_mask0: mask);
        var routs = new List<Tensor> { r.out0 };
        if (prenorm) routs.Add(r.residual);
        autograd.backward(routs, gs);
        Assert.That(Tolerance.MaxAbsDiff(z, r.out0), Is.LessThan(1e-12));
        if (prenorm) Assert.That(Tolerance.MaxAbsDiff(newRes!, r.residual), Is.LessThan(1e-12));
        Assert.That(Tolerance.MaxAbsDiff(x0.grad!, x0r.grad!), Is.LessThan(1e-10), "dx0");
        Assert.That(Tolerance.MaxAbsDiff(res.grad!, resr.grad!), Is.LessThan(1e-10), "dresidual");
        Assert.That(Tolerance.MaxAbsDiff(w.grad!, wr.grad!), Is.LessThan(1e-10), "dweight");
        Assert.That(Tolerance.MaxAbsDiff(b.grad!, br.grad!), Is.LessThan(1e-10), "dbias");
    }

    [TestCase(false), TestCase(true)]
    public void ParallelResidualBackwardMatchesAutogradOfReference(bool rms)
    {
        var x0 = randn(10, 32, dtype: ScalarType.Float64, requires_grad: true);
        var x1 = randn(10, 32, dtype: ScalarType.Float64, requires_grad: true);
        var res = randn(10, 32, dtype: ScalarType.Float64, requires_grad: true);
        var ps = Enumerable.Range(0, 4).Select(_ => randn(32, dtype: ScalarType.Float64, requires_grad: true)).ToArray();
        var f = rms ? flash_attn.dropout_add_rms_norm_parallel_residual(x0, x1, res, ps[0], ps[1], ps[2], ps[3], 0.1, 1e-5,
                          prenorm: true, return_dropout_mask: true, zero_centered_weight: true)
                    : flash_attn.dropout_add_layer_norm_parallel_residual(x0, x1, res, ps[0], ps[1], ps[2], ps[3], 0.1, 1e-5,
                          prenorm: true, return_dropout_mask: true, zero_centered_weight: true);
        var gs = new List<Tensor> { randn(10, 32, dtype: ScalarType.Float64), randn(10, 32, dtype: ScalarType.Float64), randn(10, 32, dtype: ScalarType.Float64) };
        autograd.backward(new List<Tensor> { f.out0, f.out1!, f.residual! }, gs);

        var leaves = new[] { x0, x1, res }.Concat(ps).Select(t => t.detach().clone().requires_grad_(true)).ToArray();
        var r = Reference.dropout_add_norm(leaves[0], leaves[1], leaves[2], leaves[3], leaves[4], leaves[5], leaves[6], 0.1, 1e-5,
                                           null, rms, zero_centered_weight: true, dropout_mask0: f.dropout_mask0, dropout_mask1: f.dropout_mask1);
        autograd.backward(new List<Tensor> { r.out0, r.out1!, r.residual }, gs);
        Assert.That(Tolerance.MaxAbsDiff(f.out1!, r.out1!), Is.LessThan(1e-12));
        var ours = new[] { x0, x1, res }.Concat(ps).ToArray();
        var names = new[] { "dx0", "dx1", "dresidual", "dweight0", "dbias0", "dweight1", "dbias1" };
        for (int i = 0; i < ours.Length; i++)
            Assert.That(Tolerance.MaxAbsDiff(ours[i].grad!, leaves[i].grad!), Is.LessThan(1e-10), names[i]);
    }

    [Test]
    public void FusedLayerNormMatchesTorchLayerNorm()
    {
        var ln = nn.LayerNorm(64);
        var ours = layers.FusedLayerNorm(64);
        using (no_grad())
        {
            ln.weight!.copy_(randn(64));
            ln.bias!.copy_(randn(64));
        }
        ours.load_state_dict(ln.state_dict());
        Assert.That(ours.state_dict().Keys, Is.EquivalentTo(new[] { "weight", "bias" }));
        var x = randn(3, 7, 64, requires_grad: true);
        var x2 = x.detach().clone().requires_grad_(true);
        var y = ours.call(x);
        var y2 = ln.call(x2);
        Assert.That(Tolerance.MaxAbsDiff(y, y2), Is.LessThan(1e-5));
        var g = randn_like(y);
        y.backward(new[] { g });
        y2.backward(new[] { g });
        Assert.That(Tolerance.MaxAbsDiff(x.grad!, x2.grad!), Is.LessThan(1e-4));
        Assert.That(Tolerance.MaxAbsDiff(ours.Weight!.grad!, ln.weight!.grad!), Is.LessThan(1e-4));
        Assert.That(Tolerance.MaxAbsDiff(ours.Bias!.grad!, ln.bias!.grad!), Is.LessThan(1e-4));
    }

    [Test]
    public void FusedLayerNormOverSeveralDimensionsAndWithoutAffine()
    {
        var x = randn(2, 3, 4, 5);
        var ours = layers.FusedLayerNorm(new long[] { 4, 5 }, elementwise_affine: false);
        Assert.That(ours.parameters().Count(), Is.EqualTo(0));
        var expected = nn.functional.layer_norm(x, new long[] { 4, 5 });
        Assert.That(Tolerance.MaxAbsDiff(ours.call(x), expected), Is.LessThan(1e-5));
    }

    [Test]
    public void RmsNormModuleMatchesDefinition()
    {
        var m = layers.RMSNorm(40, eps: 1e-6);
        using (no_grad()) m.Weight.copy_(randn(40));
        var x = randn(5, 40);
        var expected = x * (x.square().mean(new long[] { -1 }, keepdim: true) + 1e-6).rsqrt() * m.Weight;
        Assert.That(Tolerance.MaxAbsDiff(m.call(x), expected), Is.LessThan(1e-5));
        var zc = layers.RMSNorm(40, eps: 1e-6, zero_centered_weight: true);
        using (no_grad()) zc.Weight.copy_(m.Weight - 1);
        Assert.That(Tolerance.MaxAbsDiff(zc.call(x), expected), Is.LessThan(1e-5));
    }

    [Test]
    public void PrenormAndResidualInFp32Outputs()
    {
        var x0 = randn(6, 16).to(ScalarType.BFloat16);
        var w = ones(16);
        var (z, r, m) = flash_attn.dropout_add_layer_norm(x0, null, w, null, 0.0, 1e-5, prenorm: true, residual_in_fp32: true);
        Assert.That(z.dtype, Is.EqualTo(ScalarType.BFloat16));
        Assert.That(r!.dtype, Is.EqualTo(ScalarType.Float32));
        Assert.That(m, Is.Null);
        Assert.That(Tolerance.MaxAbsDiff(r, x0), Is.EqualTo(0.0), "the residual is x0 itself when nothing is added");
        // with a bf16 residual, the new residual keeps the residual's dtype
        var res = randn(6, 16).to(ScalarType.BFloat16);
        var (_, r2, _) = flash_attn.dropout_add_layer_norm(x0, res, w, null, 0.0, 1e-5, prenorm: true, residual_in_fp32: true);
        Assert.That(r2!.dtype, Is.EqualTo(ScalarType.BFloat16));
        // a float32 residual chain with bf16 activations
        var resF = randn(6, 16);
        var (z3, r3, _) = flash_attn.dropout_add_rms_norm(x0, resF, w.to(ScalarType.BFloat16), null, 0.0, 1e-5, prenorm: true);
        Assert.That(r3!.dtype, Is.EqualTo(ScalarType.Float32));
        Assert.That(Tolerance.MaxAbsDiff(r3, x0.to(ScalarType.Float32) + resF), Is.LessThan(1e-6));
        Assert.That(z3.dtype, Is.EqualTo(ScalarType.BFloat16));
    }

    [Test]
    public void DropoutKeepsOneMinusPAndIsReproducibleFromTheSeed()
    {
        const double p = 0.3;
        var x0 = ones(64, 512);
        var w = ones(512);
        manual_seed(1234);
        var (_, _, mask) = flash_attn.dropout_add_layer_norm(x0, null, w, null, p, 1e-5, return_dropout_mask: true);
        manual_seed(1234);
        var (_, _, again) = flash_attn.dropout_add_layer_norm(x0, null, w, null, p, 1e-5, return_dropout_mask: true);
        var (_, _, other) = flash_attn.dropout_add_layer_norm(x0, null, w, null, p, 1e-5, return_dropout_mask: true);
        Assert.That(mask!.dtype, Is.EqualTo(ScalarType.Bool));
        Assert.That(Tolerance.MaxAbsDiff(mask, again!), Is.EqualTo(0.0), "same seed, same mask");
        Assert.That(Tolerance.MaxAbsDiff(mask, other!), Is.EqualTo(1.0), "next draw, another mask");
        AssertKeepRate(mask, p);
        // prenorm residual = x0 * mask / (1 - p)
        var (_, res, m2) = flash_attn.dropout_add_layer_norm(x0, null, w, null, p, 1e-5, prenorm: true, return_dropout_mask: true);
        Assert.That(Tolerance.MaxAbsDiff(res!, m2!.to(ScalarType.Float32) / (1 - p)), Is.LessThan(1e-6));
    }

    /// <summary>The kept fraction within 5 standard deviations of the binomial (n, 1 - p).</summary>
    internal static void AssertKeepRate(Tensor mask, double p)
    {
        long n = mask.numel();
        double kept = mask.to(ScalarType.Float64).sum().item<double>();
        double mu = n * (1 - p), sigma = Math.Sqrt(n * p * (1 - p));
        Assert.That(Math.Abs(kept - mu), Is.LessThanOrEqualTo(5 * sigma), $"kept {kept} of {n}, expected {mu} ± {5 * sigma:F1}");
    }

    [Test]
    public void DropoutAddModulesApplyDropoutOnlyInTraining()
    {
        var m = layers.DropoutAddLayerNorm(32, prenorm: true, p: 0.5);
        var x0 = randn(8, 32);
        var res = randn(8, 32);
        m.eval();
        var (z, r) = m.call(x0, res);
        var expected = Reference.dropout_add_norm(x0, null, res, m.Weight, m.Bias, null, null, 0, 1e-5);
        Assert.That(Tolerance.MaxAbsDiff(z, expected.out0), Is.LessThan(1e-5));
        Assert.That(Tolerance.MaxAbsDiff(r!, x0 + res), Is.LessThan(1e-6));
        m.train();
        var (_, rTrain) = m.call(x0, res);
        Assert.That(Tolerance.MaxAbsDiff(rTrain!, x0 + res), Is.GreaterThan(1e-3), "dropout in training");
        var rms = layers.DropoutAddRMSNorm(32);
        rms.eval();
        var (zr, rr) = rms.call(x0, null);
        Assert.That(rr, Is.Null);
        Assert.That(Tolerance.MaxAbsDiff(zr, Reference.rms_norm(x0, rms.Weight)), Is.LessThan(1e-5));
        Assert.That(rms.state_dict().Keys, Is.EquivalentTo(new[] { "weight" }));
    }

    [Test]
    public void LayerscaleScalesX0PerColumn()
    {
        var x0 = randn(5, 12, dtype: ScalarType.Float64);
        var ls = rand(12, dtype: ScalarType.Float64);
        var w = randn(12, dtype: ScalarType.Float64);
        var (z, _, _) = flash_attn.dropout_add_layer_norm(x0, null, w, null, 0, 1e-5, layerscale: ls);
        Assert.That(Tolerance.MaxAbsDiff(z, Reference.layer_norm(x0 * ls, w, null)), Is.LessThan(1e-12));
    }

    [Test]
    public void BadArgumentsNameTheArgument()
    {
        var x0 = randn(4, 16);
        var w = ones(16);
        void Expect(string param, string fragment, TestDelegate call)
        {
            var e = Assert.Throws<ArgumentException>(call)!;
            Assert.That(e.ParamName, Is.EqualTo(param));
            Assert.That(e.Message, Does.Contain(fragment));
        }
        Expect("x", "float16, bfloat16, float32 or float64", () => flash_attn.layer_norm(x0.to(ScalarType.Int32), w, null));
        Expect("weight", "hidden (16)", () => flash_attn.layer_norm(x0, ones(15), null));
        Expect("weight", "1-D", () => flash_attn.layer_norm(x0, ones(1, 16), null));
        Expect("weight", "x's dtype", () => flash_attn.layer_norm(x0.to(ScalarType.BFloat16), ones(16, dtype: ScalarType.Float16), null));
        Expect("bias", "weight's dtype", () => flash_attn.layer_norm(x0.to(ScalarType.BFloat16), ones(16), zeros(16, dtype: ScalarType.BFloat16)));
        Expect("bias", "hidden (16)", () => flash_attn.layer_norm(x0, w, zeros(8)));
        Expect("residual", "x0's shape", () => flash_attn.dropout_add_layer_norm(x0, randn(4, 8), w, null, 0, 1e-5));
        Expect("residual", "x0's dtype", () => flash_attn.dropout_add_layer_norm(x0.to(ScalarType.BFloat16), randn(4, 16).to(ScalarType.Float16), w, null, 0, 1e-5));
        Expect("dropout_p", "[0, 1)", () => flash_attn.dropout_add_layer_norm(x0, null, w, null, 1.0, 1e-5));
        Expect("epsilon", ">= 0", () => flash_attn.dropout_add_rms_norm(x0, null, w, null, 0, -1));
        Expect("rowscale", "one value per row (4", () => flash_attn.dropout_add_layer_norm(x0, null, w, null, 0, 1e-5, rowscale: ones(3)));
        Expect("x1", "x0's shape", () => flash_attn.dropout_add_layer_norm_parallel_residual(x0, randn(4, 15), null, w, null, null, null, 0, 1e-5));
        Expect("weight1", "weight0's dtype", () => flash_attn.dropout_add_layer_norm_parallel_residual(x0.to(ScalarType.BFloat16), null, null, w, null, ones(16, dtype: ScalarType.BFloat16), null, 0, 1e-5));
        Expect("bias1", "needs weight1", () => flash_attn.dropout_add_layer_norm_parallel_residual(x0, null, null, w, null, null, zeros(16), 0, 1e-5));
        Expect("layerscale", "hidden (16)", () => flash_attn.dropout_add_layer_norm(x0, null, w, null, 0, 1e-5, layerscale: ones(4)));
    }

    private static FlashAttnStatus NormFwd(Tensor x, Tensor w, Tensor z, Tensor rstd, long hidden, float p = 0, long rowStride = -1) =>
        NativeMethods.FlashAttn_norm_fwd(
            Interop.TensorArgs.Ptr(x), IntPtr.Zero, IntPtr.Zero, FlashAttnDType.Float32, FlashAttnDType.Float32,
            Interop.TensorArgs.Ptr(w), IntPtr.Zero, IntPtr.Zero, IntPtr.Zero, FlashAttnDType.Float32, IntPtr.Zero,
            Interop.TensorArgs.Ptr(z), IntPtr.Zero, IntPtr.Zero, FlashAttnDType.Float32, IntPtr.Zero, Interop.TensorArgs.Ptr(rstd),
            IntPtr.Zero, IntPtr.Zero, x.shape[0], hidden, rowStride < 0 ? hidden : rowStride, hidden, hidden, hidden, hidden,
            1e-5f, p, 1, 0, 1, 0, IntPtr.Zero);

    [Test]
    public void NativeValidationNamesFunctionAndArgument()
    {
        var (x, w, z, rstd) = (randn(4, 16), ones(16), empty(4, 16), empty(4));
        Assert.That(NormFwd(x, w, z, rstd, 16385), Is.EqualTo(FlashAttnStatus.InvalidArgument));
        Assert.That(Marshal.PtrToStringUTF8(NativeMethods.FlashAttn_core_last_error()),
                    Does.StartWith("FlashAttn_norm_fwd: hidden (16385) must be between 1 and 16384"));
        Assert.That(NormFwd(x, w, z, rstd, 16, p: 1f), Is.EqualTo(FlashAttnStatus.InvalidArgument));
        Assert.That(Marshal.PtrToStringUTF8(NativeMethods.FlashAttn_core_last_error()), Does.Contain("dropout_p (1) must be in [0, 1)"));
        Assert.That(NormFwd(x, w, z, rstd, 16, rowStride: 8), Is.EqualTo(FlashAttnStatus.InvalidArgument));
        Assert.That(Marshal.PtrToStringUTF8(NativeMethods.FlashAttn_core_last_error()), Does.Contain("x0_row_stride (8)"));
        Assert.That(NativeMethods.FlashAttn_norm_bwd_workspace_size(4, 16, 1, 0, 0), Is.GreaterThanOrEqualTo(2 * 4 * 16 * 4));
        if (!Backend.NativeHasCuda)
        {
            Assert.That(NormFwd(x, w, z, rstd, 16), Is.EqualTo(FlashAttnStatus.NoCuda));
            Assert.That(Marshal.PtrToStringUTF8(NativeMethods.FlashAttn_core_last_error()), Does.Contain("built without CUDA support"));
        }
    }

    [Test]
    public void OutputsAreNotViewsSoInPlaceOpsDownstreamWork()
    {
        var x0 = randn(2, 3, 8, requires_grad: true);
        var res = randn(2, 3, 8, requires_grad: true);
        var (z, r, _) = flash_attn.dropout_add_layer_norm(x0, res, ones(8), null, 0, 1e-5, prenorm: true);
        z.mul_(2);
        r!.add_(1);
        (z.sum() + r.sum()).backward();
        Assert.That(x0.grad, Is.Not.Null);
        Assert.That(z.shape, Is.EqualTo(new long[] { 2, 3, 8 }));
    }
}
