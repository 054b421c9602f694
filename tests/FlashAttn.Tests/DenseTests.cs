using FlashAttn.Interop;
using NUnit.Framework;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace FlashAttn.Tests;

/// <summary>Fused dense / MLP on CPU: values and every gradient against TorchSharp's own composite
/// (linear, gelu tanh, linear), checkpoint levels, module parity with torch.nn.Linear and a hand-written
/// MLP, argument validation before any native call, and the native ABI's own checks.</summary>
public sealed class DenseTests
{
    [SetUp]
    public void Seed() => manual_seed(TestContext.CurrentContext.Random.Next());

    private static readonly GELU.Approximate Tanh = GELU.Approximate.tanh;

    // The hand-written MLP every user would write: nn.functional ops, autograd through them.
    internal static Tensor Composite(Tensor x, Tensor w1, Tensor w2, Tensor? b1, Tensor? b2, string activation)
    {
        var pre = nn.functional.linear(x, w1, b1);
        var h = activation == "relu" ? nn.functional.relu(pre) : nn.functional.gelu(pre, Tanh);
        return nn.functional.linear(h, w2, b2);
    }

    private static Tensor[] Leaves(ScalarType dt, params long[][] shapes) =>
        shapes.Select(s => randn(s, dtype: dt).requires_grad_(true)).ToArray();

    private static Tensor[] Grads(Tensor y, Tensor g, params Tensor?[] ts)
    {
        var inputs = ts.Where(t => t is not null).Select(t => t!).ToArray();
        return autograd.grad(new[] { y }, inputs, new[] { g }).ToArray();
    }

    [TestCase(1, 8, 16, true), TestCase(7, 16, 24, false), TestCase(1000, 13, 8, true), TestCase(7, 8, 5, true), TestCase(3, 5, 11, false)]
    public void FusedDenseMatchesLinearWithGradients(int m, int k, int n, bool withBias)
    {
        var x = randn(new long[] { m, k }, dtype: ScalarType.Float64).requires_grad_(true);
        var w = randn(new long[] { n, k }, dtype: ScalarType.Float64).requires_grad_(true);
        var b = withBias ? randn(new long[] { n }, dtype: ScalarType.Float64).requires_grad_(true) : null;
        var y = flash_attn.fused_dense_func(x, w, b);
        var yr = nn.functional.linear(x, w, b);
        Assert.That(Tolerance.MaxAbsDiff(y, yr), Is.LessThan(1e-10));
        var g = randn_like(yr);
        var got = Grads(y, g, x, w, b);
        var want = Grads(yr, g, x, w, b);
        for (int i = 0; i < got.Length; i++) Assert.That(Tolerance.MaxAbsDiff(got[i], want[i]), Is.LessThan(1e-10), $"gradient {i}");
    }

    [Test]
    public void FusedDenseKeepsLeadingDimensionsAndOnlyComputesAskedGradients()
    {
        var x = randn(2, 3, 16, dtype: ScalarType.Float64);
        var w = randn(new long[] { 24, 16 }, dtype: ScalarType.Float64).requires_grad_(true);
        var y = flash_attn.fused_dense_func(x, w);
        Assert.That(y.shape, Is.EqualTo(new long[] { 2, 3, 24 }));
        y.sum().backward();
        Assert.That(x.grad, Is.Null);
        var expected = x.reshape(-1, 16).sum(0L).unsqueeze(0).expand(24, 16);
        Assert.That(Tolerance.MaxAbsDiff(w.grad!, expected), Is.LessThan(1e-10));
    }

    private static IEnumerable<TestCaseData> MlpCases()
    {
        foreach (var act in new[] { "gelu_approx", "relu" })
        foreach (var (m, k, h, n) in new[] { (1, 8, 32, 8), (7, 16, 128, 24), (1000, 24, 40, 16), (7, 13, 20, 9) })
        foreach (var bias in new[] { true, false })
            yield return new TestCaseData(act, m, k, h, n, bias).SetName($"Mlp_{act}_m{m}_k{k}_h{h}_n{n}_{(bias ? "bias" : "nobias")}");
    }

    [TestCaseSource(nameof(MlpCases))]
    public void FusedMlpMatchesHandWrittenMlpWithGradients(string act, int m, int k, int h, int n, bool withBias)
    {
        var dt = ScalarType.Float64;
        var (x, w1, w2) = (randn(new long[] { m, k }, dtype: dt).requires_grad_(true), (randn(new long[] { h, k }, dtype: dt) * 0.3).requires_grad_(true),
                           (randn(new long[] { n, h }, dtype: dt) * 0.3).requires_grad_(true));
        var b1 = withBias ? randn(new long[] { h }, dtype: dt).requires_grad_(true) : null;
        var b2 = withBias ? randn(new long[] { n }, dtype: dt).requires_grad_(true) : null;
        foreach (var lvl in new[] { 0, 1, 2 })
        {
            var y = flash_attn.fused_mlp_func(x, w1, w2, b1, b2, act, checkpoint_lvl: lvl);
            var yr = Composite(x, w1, w2, b1, b2, act);
            Assert.That(Tolerance.MaxAbsDiff(y, yr), Is.LessThan(1e-10), $"lvl {lvl} output");
            var g = randn_like(yr);
            var got = Grads(y, g, x, w1, b1, w2, b2);
            var want = Grads(yr, g, x, w1, b1, w2, b2);
            for (int i = 0; i < got.Length; i++)
                Assert.That(Tolerance.MaxAbsDiff(got[i], want[i]), Is.LessThan(1e-9), $"lvl {lvl} gradient {i}");
        }
    }

    [TestCase("gelu_approx"), TestCase("relu")]
    public void CheckpointLevelsGiveIdenticalGradients(string act)
    {
        var (x, w1, b1, w2, b2) = (randn(7, 3, 16).requires_grad_(true), randn(64, 16).requires_grad_(true), randn(64).requires_grad_(true),
                                   randn(24, 64).requires_grad_(true), randn(24).requires_grad_(true));
        var g = randn(7, 3, 24);
        Tensor[]? first = null;
        Tensor? firstY = null;
        foreach (var (lvl, save) in new[] { (0, true), (1, true), (2, true), (0, false) })
        {
            var y = flash_attn.fused_mlp_func(x, w1, w2, b1, b2, act, save_pre_act: save, checkpoint_lvl: lvl);
            var grads = Grads(y, g, x, w1, b1, w2, b2);
            if (first is null) { (first, firstY) = (grads, y); continue; }
            Assert.That(Tolerance.MaxAbsDiff(y, firstY!), Is.EqualTo(0.0), $"lvl {lvl} output");
            for (int i = 0; i < grads.Length; i++)
                Assert.That(Tolerance.MaxAbsDiff(grads[i], first[i]), Is.EqualTo(0.0), $"lvl {lvl} save_pre_act {save} gradient {i}");
        }
    }

    [Test]
    public void NoGradForwardEqualsAutogradForward()
    {
        var x = randn(5, 16);
        var (w1, b1, w2, b2) = (randn(32, 16).requires_grad_(true), randn(32), randn(8, 32), randn(8));
        var y = flash_attn.fused_mlp_func(x, w1, w2, b1, b2);
        Tensor y0;
        using (no_grad()) y0 = flash_attn.fused_mlp_func(x, w1, w2, b1, b2);
        Assert.That(y.requires_grad, Is.True);
        Assert.That(y0.requires_grad, Is.False);
        Assert.That(Tolerance.MaxAbsDiff(y, y0), Is.EqualTo(0.0));
    }

    [TestCase(ScalarType.BFloat16), TestCase(ScalarType.Float16)]
    public void LowPrecisionOnCpuTakesTheReferencePathWithinTolerance(ScalarType dt)
    {
        var x64 = randn(7, 24, dtype: ScalarType.Float64);
        var (w1, b1, w2, b2) = (randn(64, 24, dtype: ScalarType.Float64) * 0.2, randn(64, dtype: ScalarType.Float64) * 0.2,
                                randn(16, 64, dtype: ScalarType.Float64) * 0.2, randn(16, dtype: ScalarType.Float64) * 0.2);
        var x = x64.to(dt).requires_grad_(true);
        var p = new[] { w1, b1, w2, b2 }.Select(t => t.to(dt).requires_grad_(true)).ToArray();
        var y = flash_attn.fused_mlp_func(x, p[0], p[2], p[1], p[3]);
        var g = randn_like(y);
        var got = Grads(y, g, x, p[0], p[1], p[2], p[3]);
        var xe = x.detach().to(ScalarType.Float64).requires_grad_(true);
        var pe = p.Select(t => t.detach().to(ScalarType.Float64).requires_grad_(true)).ToArray();
        var ye = Composite(xe, pe[0], pe[2], pe[1], pe[3], "gelu_approx");
        var want = Grads(ye, g.to(ScalarType.Float64), xe, pe[0], pe[1], pe[2], pe[3]);
        Assert.That(y.dtype, Is.EqualTo(dt));
        double tol = dt == ScalarType.BFloat16 ? 0.05 : 0.01;
        Assert.That(Tolerance.MaxAbsDiff(y, ye), Is.LessThan(tol * Math.Max(1, ye.abs().max().item<double>())));
        for (int i = 0; i < got.Length; i++)
        {
            Assert.That(got[i].dtype, Is.EqualTo(dt));
            Assert.That(Tolerance.MaxAbsDiff(got[i], want[i]), Is.LessThan(tol * Math.Max(1, want[i].abs().max().item<double>())), $"gradient {i}");
        }
    }

    [Test]
    public void FusedDenseModuleIsADropInForLinear()
    {
        var linear = nn.Linear(24, 40);
        var fused = new FusedDense(24, 40);
        var sd = fused.state_dict();
        Assert.That(sd.Keys, Is.EquivalentTo(new[] { "weight", "bias" }));
        Assert.That(sd["weight"].shape, Is.EqualTo(new long[] { 40, 24 }));
        // torch.nn.Linear's init bound, 1 / sqrt(in_features)
        Assert.That(sd["weight"].abs().max().item<float>(), Is.LessThanOrEqualTo(1 / Math.Sqrt(24) + 1e-6));
        fused.load_state_dict(linear.state_dict());
        var x = randn(3, 5, 24);
        Assert.That(Tolerance.MaxAbsDiff(fused.forward(x), linear.forward(x)), Is.LessThan(1e-5));
        var noBias = layers.FusedDense(24, 40, bias: false);
        Assert.That(noBias.state_dict().Keys, Is.EquivalentTo(new[] { "weight" }));
        var (o, r) = layers.FusedDense(24, 8, return_residual: true).forward_residual(x);
        Assert.That(o.shape, Is.EqualTo(new long[] { 3, 5, 8 }));
        Assert.That(r.Handle == x.Handle || Tolerance.MaxAbsDiff(r, x) == 0, Is.True);
    }

    [TestCase("gelu_approx", 0), TestCase("gelu_approx", 1), TestCase("relu", 2)]
    public void FusedMlpModuleMatchesHandWrittenMlp(string act, int lvl)
    {
        var mlp = layers.FusedMLP(16, 64, activation: act, checkpoint_lvl: lvl, dtype: ScalarType.Float64);
        var sd = mlp.state_dict();
        Assert.That(sd.Keys, Is.EquivalentTo(new[] { "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias" }));
        Assert.That(mlp.hidden_features, Is.EqualTo(64));
        Assert.That(mlp.out_features, Is.EqualTo(16));
        var x = randn(new long[] { 2, 7, 16 }, dtype: ScalarType.Float64).requires_grad_(true);
        var y = mlp.forward(x);
        var yr = Composite(x, sd["fc1.weight"], sd["fc2.weight"], sd["fc1.bias"], sd["fc2.bias"], act);
        Assert.That(Tolerance.MaxAbsDiff(y, yr), Is.LessThan(1e-10));
        y.sum().backward();
        Assert.That(mlp.parameters().All(p => p.grad is not null), Is.True, "every parameter gets a gradient");
        mlp.eval();
        using (no_grad()) Assert.That(Tolerance.MaxAbsDiff(mlp.forward(x), yr), Is.LessThan(1e-10), "eval mode");
        // eval mode with gradients: the pre-activation is not kept, fc1 is recomputed in the backward
        var ye = mlp.forward(x);
        var gx = autograd.grad(new[] { ye }, new[] { x }, new[] { ones_like(ye) })[0];
        var gxr = autograd.grad(new[] { yr }, new[] { x }, new[] { ones_like(yr) })[0];
        Assert.That(Tolerance.MaxAbsDiff(gx, gxr), Is.LessThan(1e-10));
    }

    [Test]
    public void ReturnResidualGradientsAccumulate()
    {
        var mlp = layers.FusedMLP(8, 32, return_residual: true, dtype: ScalarType.Float64);
        var x = randn(new long[] { 4, 8 }, dtype: ScalarType.Float64).requires_grad_(true);
        var (y, r) = mlp.forward_residual(x);
        (y + r * 3).sum().backward();
        var x2 = x.detach().clone().requires_grad_(true);
        var sd = mlp.state_dict();
        (Composite(x2, sd["fc1.weight"], sd["fc2.weight"], sd["fc1.bias"], sd["fc2.bias"], "gelu_approx") + x2 * 3).sum().backward();
        Assert.That(Tolerance.MaxAbsDiff(x.grad!, x2.grad!), Is.LessThan(1e-10));
    }

    [TestCase("sigmoid"), TestCase("silu")]
    public void GatedMlpMatchesGluAndSwiGlu(string act)
    {
        var mlp = layers.GatedMlp(12, 20, activation: act, multiple_of: 16, dtype: ScalarType.Float64);
        Assert.That(mlp.hidden_features, Is.EqualTo(32));
        var sd = mlp.state_dict();
        Assert.That(sd["fc1.weight"].shape, Is.EqualTo(new long[] { 64, 12 }));
        var x = randn(new long[] { 3, 12 }, dtype: ScalarType.Float64).requires_grad_(true);
        var y = mlp.forward(x);
        var x2 = x.detach().clone().requires_grad_(true);
        var fc1 = nn.functional.linear(x2, sd["fc1.weight"], sd["fc1.bias"]);
        // flash-attn: sigmoid is F.glu (first half * sigmoid(second half)); silu is swiglu(gate, y) = y * silu(gate)
        var hidden = act == "sigmoid" ? nn.functional.glu(fc1, -1) : fc1.chunk(2, -1)[0] * nn.functional.silu(fc1.chunk(2, -1)[1]);
        var yr = nn.functional.linear(hidden, sd["fc2.weight"], sd["fc2.bias"]);
        Assert.That(Tolerance.MaxAbsDiff(y, yr), Is.LessThan(1e-10));
        Assert.That(Tolerance.MaxAbsDiff(Reference.gated_mlp(x, sd["fc1.weight"], sd["fc2.weight"], sd["fc1.bias"], sd["fc2.bias"], act), yr),
                    Is.LessThan(1e-10));
        y.sum().backward();
        yr.sum().backward();
        Assert.That(Tolerance.MaxAbsDiff(x.grad!, x2.grad!), Is.LessThan(1e-10));
    }

    [Test]
    public void GeluTanhDerivativeMatchesAutograd()
    {
        var t = linspace(-6, 6, 1001, dtype: ScalarType.Float64).requires_grad_(true);
        var y = nn.functional.gelu(t, Tanh);
        var g = autograd.grad(new[] { y }, new[] { t }, new[] { ones_like(y) })[0];
        Assert.That(Tolerance.MaxAbsDiff(DenseActivations.Derivative(DenseActivation.GeluApprox, t.detach()), g), Is.LessThan(1e-12));
    }

    [Test]
    public void BadArgumentsNameTheArgument()
    {
        var x = randn(4, 16);
        var (w1, b1, w2, b2) = (randn(32, 16), randn(32), randn(8, 32), randn(8));
        void Expect(string param, string fragment, TestDelegate call)
        {
            var e = Assert.Throws<ArgumentException>(call)!;
            Assert.That(e.ParamName, Is.EqualTo(param), e.Message);
            Assert.That(e.Message, Does.Contain(fragment));
        }
        Expect("x", "float16, bfloat16, float32 or float64", () => flash_attn.fused_dense_func(x.to(ScalarType.Int32), w1));
        Expect("weight", "in_features = 16", () => flash_attn.fused_dense_func(x, randn(32, 15)));
        Expect("weight", "2-D", () => flash_attn.fused_dense_func(x, randn(32)));
        Expect("weight", "x's dtype", () => flash_attn.fused_dense_func(x, w1.to(ScalarType.Float64)));
        Expect("bias", "out_features (32)", () => flash_attn.fused_dense_func(x, w1, randn(31)));
        Expect("bias", "x's dtype", () => flash_attn.fused_dense_func(x, w1, b1.to(ScalarType.BFloat16)));
        Expect("weight1", "in_features = 16", () => flash_attn.fused_mlp_func(x, randn(32, 8), w2));
        Expect("weight2", "hidden_features = weight1's rows = 32", () => flash_attn.fused_mlp_func(x, w1, randn(8, 31)));
        Expect("bias1", "out_features (32)", () => flash_attn.fused_mlp_func(x, w1, w2, randn(8), b2));
        Expect("bias2", "out_features (8)", () => flash_attn.fused_mlp_func(x, w1, w2, b1, randn(32)));
        Expect("weight2", "x's dtype", () => flash_attn.fused_mlp_func(x, w1, w2.to(ScalarType.Float64)));
        Expect("checkpoint_lvl", "0, 1 or 2", () => flash_attn.fused_mlp_func(x, w1, w2, checkpoint_lvl: 3));
        Expect("activation", "gelu_approx", () => flash_attn.fused_mlp_func(x, w1, w2, activation: "swish"));
        Expect("weight1", "even number of rows", () => flash_attn.gated_mlp_func(x, randn(33, 16), randn(8, 16)));
        Expect("weight2", "weight1's rows / 2 = 16", () => flash_attn.gated_mlp_func(x, w1, w2));
        Expect("activation", "sigmoid", () => flash_attn.gated_mlp_func(x, w1, randn(8, 16), activation: "tanh"));
        Expect("checkpoint_lvl", "0, 1 or 2", () => new FusedMLP(16, checkpoint_lvl: -1));
        Expect("activation", "gelu_approx", () => new FusedMLP(16, activation: "gelu"));
    }

    // An InvalidArgument status whose last error starts with the function's name and says `fragment`.
    private static void ExpectInvalid(FlashAttnStatus status, string function, string fragment)
    {
        Assert.That(status, Is.EqualTo(FlashAttnStatus.InvalidArgument));
        var message = System.Runtime.InteropServices.Marshal.PtrToStringUTF8(NativeMethods.FlashAttn_core_last_error())!;
        Assert.That(message, Does.StartWith(function + ": "));
        Assert.That(message, Does.Contain(fragment));
    }

    [Test]
    public void NativeGemmValidatesItsArguments()
    {
        // Checked before any CUDA work, in both flavours of libflashattn.
        var p = (IntPtr)4096;
        FlashAttnStatus Call(FlashAttnDType dt = FlashAttnDType.Bfloat16, long m = 4, long n = 8, long k = 8, int ta = 0, int tb = 1,
            long lda = 8, long ldb = 8, long ldo = 8, FlashAttnDenseEpilogue ep = FlashAttnDenseEpilogue.Bias, IntPtr? aux = null,
            long ldaux = 0, IntPtr? a = null) =>
            NativeMethods.FlashAttn_dense_gemm(a ?? p, p, p, dt, m, n, k, ta, tb, lda, ldb, ldo, ep, p, aux ?? IntPtr.Zero, ldaux, 0, p,
                                               1 << 20, IntPtr.Zero);
        void Expect(FlashAttnStatus status, string fragment) => ExpectInvalid(status, "FlashAttn_dense_gemm", fragment);
        Expect(Call(dt: FlashAttnDType.Float32), "dtype (float32)");
        Expect(Call(k: 0), "k (0)");
        Expect(Call(lda: 7), "lda (7)");
        Expect(Call(tb: 0, ldb: 7, n: 8), "ldb (7)");
        Expect(Call(ldo: 4), "ldo (4)");
        Expect(Call(ta: 2), "trans_a (2)");
        Expect(Call(ep: (FlashAttnDenseEpilogue)42), "epilogue (42)");
        Expect(Call(ep: FlashAttnDenseEpilogue.GeluAuxBias), "aux must not be NULL");
        Expect(Call(ep: FlashAttnDenseEpilogue.GeluAuxBias, aux: p, ldaux: 12), "ldaux (12)");
        Expect(Call(ep: FlashAttnDenseEpilogue.ReluAuxBias, aux: p, ldaux: 64), "multiple of 128");
        Expect(Call(aux: p, ldaux: 8), "aux must be NULL");
        Expect(Call(a: (IntPtr)4097), "aligned");
        Assert.That(NativeMethods.FlashAttn_dense_workspace_size(), Is.EqualTo(32L << 20));
        var previous = flash_attn.set_dense_algo_candidates(100);
        Assert.That(flash_attn.set_dense_algo_candidates(0), Is.EqualTo(32), "clamped to 32");
        Assert.That(flash_attn.set_dense_algo_candidates(previous), Is.EqualTo(1), "clamped to 1");
        Assert.That(Call(m: 0), Is.EqualTo(FlashAttnStatus.Ok), "an empty output is a no-op");
        if (!Backend.NativeHasCuda) Assert.That(Call(), Is.EqualTo(FlashAttnStatus.NoCuda));
    }

    [Test]
    public void NativeBiasGradValidatesItsArguments()
    {
        // Checked before any CUDA work, in both flavours of libflashattn.
        var p = (IntPtr)4096;
        FlashAttnStatus Call(FlashAttnDType dt = FlashAttnDType.Bfloat16, long rows = 300, long cols = 8, long rowStride = 8,
            IntPtr? dy = null, IntPtr? db = null, IntPtr? ws = null, long wsBytes = 1 << 20) =>
            NativeMethods.FlashAttn_dense_bias_grad(dy ?? p, db ?? p, dt, rows, cols, rowStride, ws ?? p, wsBytes, IntPtr.Zero);
        void Expect(FlashAttnStatus status, string fragment) => ExpectInvalid(status, "FlashAttn_dense_bias_grad", fragment);
        Expect(Call(dt: FlashAttnDType.Int32), "dtype (int32)");
        Expect(Call(rows: -1), "rows (-1)");
        Expect(Call(cols: -2), "cols (-2)");
        Expect(Call(wsBytes: -1), "workspace_bytes (-1)");
        Expect(Call(rowStride: 7), "row_stride (7) must be >= cols (8)");
        Expect(Call(dy: IntPtr.Zero), "dy must not be NULL");
        Expect(Call(db: IntPtr.Zero), "db must not be NULL");
        Expect(Call(dy: (IntPtr)4097), "aligned");
        Expect(Call(ws: IntPtr.Zero), "workspace must not be NULL (68 bytes needed)");
        Expect(Call(wsBytes: 67), "workspace_bytes (67) must be >= 68 (FlashAttn_dense_bias_grad_workspace_size)");
        Expect(Call(ws: (IntPtr)4098), "workspace must be 4-byte aligned");
        // a uint32 counter per 64 columns, then float32 partials of at most ceil(rows / 256) splits (at most 256); none
        // for one split
        Assert.That(NativeMethods.FlashAttn_dense_bias_grad_workspace_size(256, 768), Is.EqualTo(0));
        Assert.That(NativeMethods.FlashAttn_dense_bias_grad_workspace_size(257, 768), Is.EqualTo(12 * 4 + 2 * 768 * 4));
        Assert.That(NativeMethods.FlashAttn_dense_bias_grad_workspace_size(16384, 3), Is.EqualTo(1 * 4 + 64 * 3 * 4));
        Assert.That(NativeMethods.FlashAttn_dense_bias_grad_workspace_size(16384, 3072), Is.EqualTo(48 * 4 + 64 * 3072 * 4));
        Assert.That(NativeMethods.FlashAttn_dense_bias_grad_workspace_size(1L << 30, 65), Is.EqualTo(2 * 4 + 256 * 65 * 4));
        Assert.That(NativeMethods.FlashAttn_dense_bias_grad_workspace_size(1000, 0), Is.EqualTo(0));
        Assert.That(Call(cols: 0), Is.EqualTo(FlashAttnStatus.Ok), "an empty bias is a no-op");
        if (!Backend.NativeHasCuda)
        {
            Assert.That(Call(), Is.EqualTo(FlashAttnStatus.NoCuda));
            Assert.That(Call(rows: 256, ws: IntPtr.Zero, wsBytes: 0), Is.EqualTo(FlashAttnStatus.NoCuda), "one split: no workspace");
            Assert.That(Call(rows: 0, dy: IntPtr.Zero, ws: IntPtr.Zero, wsBytes: 0), Is.EqualTo(FlashAttnStatus.NoCuda),
                "no rows: zeros, dy unread");
        }
    }

    [Test]
    public void BiasGradPathComesFromTheEnvironmentValue()
    {
        Assert.That(DenseOps.ParseBiasGrad(null), Is.EqualTo(BiasGradPath.Ours), "ours by default: faster than BGRADB on the H200");
        Assert.That(DenseOps.ParseBiasGrad(""), Is.EqualTo(BiasGradPath.Ours));
        Assert.That(DenseOps.ParseBiasGrad(" CuBLASLt "), Is.EqualTo(BiasGradPath.CublasLt));
        Assert.That(DenseOps.ParseBiasGrad("ours"), Is.EqualTo(BiasGradPath.Ours));
        var e = Assert.Throws<InvalidOperationException>(() => DenseOps.ParseBiasGrad("bgradb"))!;
        Assert.That(e.Message, Does.Contain("FLASHATTN_BIAS_GRAD=bgradb"));
    }
}
