using NUnit.Framework;
using TorchSharp;
using static TorchSharp.torch;

namespace FlashAttn.Tests;

/// <summary>
/// The fused norm kernels against the float64 reference with the flash-attn rule (error at most twice the
/// low-precision reference's), forward and backward, at hidden sizes 40 to 16384, every dtype, LayerNorm and
/// RMSNorm, prenorm and postnorm; dropout reproducible from the seed at the binomial keep rate, its backward
/// consistent with the returned mask; the parallel-residual variant; strided and odd sizes. The launchers pick
/// a kernel family per size (rows: a warp group per row over a persistent grid; block: the scalar path and
/// float32 data past 8192 columns); WidthsAndRowCountsOfEveryKernelPath covers each family's edges.
/// </summary>
[Category(Gpu.Category)]
public sealed class NormCudaTests
{
    [SetUp]
    public void Seed() => manual_seed(TestContext.CurrentContext.Random.Next());

    private static IEnumerable<TestCaseData> Cases()
    {
        var dtypes = new[] { ScalarType.BFloat16, ScalarType.Float16, ScalarType.Float32 };
        var hiddens = new[] { 40, 1000, 2048, 5120, 12288, 16384 };
        int i = 0;
        foreach (var dt in dtypes)
        foreach (var h in hiddens)
        {
            bool rms = (i & 1) == 1, prenorm = (i & 2) == 0, weightF32 = (i & 4) == 4 && dt != ScalarType.Float32;
            bool residualInFp32 = (i % 3) == 0 && dt != ScalarType.Float32, rowscale = (i % 5) == 2;
            i++;
            yield return new TestCaseData(dt, h, rms, prenorm, weightF32, residualInFp32, rowscale)
                .SetName($"Norm_{dt}_h{h}_{(rms ? "rms" : "ln")}_{(prenorm ? "prenorm" : "postnorm")}{(weightF32 ? "_wf32" : "")}{(residualInFp32 ? "_resf32" : "")}{(rowscale ? "_rowscale" : "")}");
        }
    }

    // Gradients: the backward reads the saved residual rounded to its dtype (as flash-attn's kernel does), so
    // its error is of the low-precision reference's order rather than below it; flash-attn's
    // tests/ops/test_dropout_layer_norm.py allows 4x the PyTorch error for the gradients, as here.
    private const double GradFactor = 4.0;

    private static List<Tensor> Leaves(params Tensor?[] ts) => ts.Where(t => t is not null).Select(t => t!).ToList();

    [TestCaseSource(nameof(Cases))]
    public void ForwardAndBackwardMatchReference(ScalarType dtype, int hidden, bool rms, bool prenorm, bool weightF32,
        bool residualInFp32, bool withRowscale) =>
        CheckAgainstReference(dtype, hidden, hidden >= 12288 ? 300 : 3001, rms, prenorm, weightF32, residualInFp32, withRowscale);

    // The edges of each kernel path (norm.cu's launchers): one row and row counts that leave a persistent grid's
    // last rows or a block's row groups partly empty (768 columns: four row groups a block); 1000 columns (125
    // 16-byte vectors: threads past the row); 4100 (not a multiple of 8: the scalar block kernels); 8192 (16 warps
    // a row); 12288 and 16384 with a float32 residual (the forward's block kernels, the backward's rows kernels
    // reading float32 x); float32 at 8192 (rows) and 12288 (block); zero-centred weights; 20011 rows at 768: each row
    // group of the persistent grid takes a dozen rows or more in turn (rowsca's ring of stages wraps around).
    [TestCase(ScalarType.BFloat16, 768, 1, false, true, false, false, false)]
    [TestCase(ScalarType.BFloat16, 768, 20011, false, true, false, false, false)]
    [TestCase(ScalarType.BFloat16, 768, 37, true, true, true, false, true)]
    [TestCase(ScalarType.Float16, 1000, 5, false, false, false, false, false)]
    [TestCase(ScalarType.BFloat16, 4100, 65, false, true, true, false, false)]
    [TestCase(ScalarType.Float16, 4096, 513, true, true, false, true, false)]
    [TestCase(ScalarType.BFloat16, 8192, 129, false, true, true, false, true)]
    [TestCase(ScalarType.BFloat16, 12288, 33, false, true, true, true, false)]
    [TestCase(ScalarType.BFloat16, 16384, 33, true, true, false, true, true)]
    [TestCase(ScalarType.Float32, 8192, 70, false, true, false, false, false)]
    [TestCase(ScalarType.Float32, 12288, 21, true, false, false, false, true)]
    public void WidthsAndRowCountsOfEveryKernelPath(ScalarType dtype, int hidden, long rows, bool rms, bool prenorm,
        bool weightF32, bool residualInFp32, bool zeroCentered) =>
        CheckAgainstReference(dtype, hidden, rows, rms, prenorm, weightF32, residualInFp32, withRowscale: rows % 2 == 1,
                              zeroCentered: zeroCentered);

    private static void CheckAgainstReference(ScalarType dtype, int hidden, long rows, bool rms, bool prenorm, bool weightF32,
        bool residualInFp32, bool withRowscale, bool zeroCentered = false)
    {
        var dev = Gpu.Require();
        var wt = weightF32 ? ScalarType.Float32 : dtype;
        var resT = residualInFp32 ? ScalarType.Float32 : dtype;
        var x0 = randn(rows, hidden, device: dev).to(dtype).requires_grad_(true);
        var res = randn(rows, hidden, device: dev).to(resT).requires_grad_(true);
        var w = (randn(hidden, device: dev) * 0.3 + 1).to(wt).requires_grad_(true);
        var b = rms ? null : (randn(hidden, device: dev) * 0.3).to(wt).requires_grad_(true);
        var rowscale = withRowscale ? rand(rows, device: dev) + 0.5 : null;

        var (z, r, _) = rms
            ? flash_attn.dropout_add_rms_norm(x0, res, w, b, 0.0, 1e-5, rowscale, prenorm: prenorm, zero_centered_weight: zeroCentered)
            : flash_attn.dropout_add_layer_norm(x0, res, w, b, 0.0, 1e-5, rowscale, prenorm: prenorm, zero_centered_weight: zeroCentered);
        Assert.That(z.dtype, Is.EqualTo(dtype));
        Assert.That(r is null, Is.EqualTo(!prenorm));
        if (prenorm) Assert.That(r!.dtype, Is.EqualTo(resT));
        var gz = randn_like(z);
        var gr = prenorm ? randn_like(r!) : null;
        autograd.backward(Leaves(z, r), Leaves(gz, gr));

        // exact: float64 on the inputs as the kernel saw them
        var e = Leaves(x0, res, w, b).Select(t => t.detach().to(ScalarType.Float64).requires_grad_(true)).ToArray();
        var re = Reference.dropout_add_norm(e[0], null, e[1], e[2], rms ? null : e[3], null, null, 0, 1e-5, rowscale, rms,
                                            zeroCentered, residual_dtype: ScalarType.Float64);
        autograd.backward(Leaves(re.out0, prenorm ? re.residual : null), Leaves(gz.to(ScalarType.Float64), gr?.to(ScalarType.Float64)));
        // low precision: the same reference computed in x0's dtype
        var l = Leaves(x0, res, w, b).Select(t => t.detach().clone().requires_grad_(true)).ToArray();
        var rl = Reference.dropout_add_norm(l[0], null, l[1], l[2], rms ? null : l[3], null, null, 0, 1e-5, rowscale, rms,
                                            zeroCentered, residual_dtype: resT, compute_dtype: dtype);
        autograd.backward(Leaves(rl.out0, prenorm ? rl.residual : null), Leaves(gz, gr));

        Tolerance.AssertClose(z, rl.out0, re.out0, "out");
        if (prenorm) Tolerance.AssertClose(r!, rl.residual, re.residual, "residual");
        Tolerance.AssertClose(x0.grad!, l[0].grad!, e[0].grad!, "dx0", factor: GradFactor);
        Tolerance.AssertClose(res.grad!, l[1].grad!, e[1].grad!, "dresidual", factor: GradFactor);
        Tolerance.AssertClose(w.grad!, l[2].grad!, e[2].grad!, "dweight", factor: GradFactor);
        if (!rms) Tolerance.AssertClose(b!.grad!, l[3].grad!, e[3].grad!, "dbias", factor: GradFactor);
    }

    // hidden 104: vectors of 8 (one Philox call each); float32 at 52: vectors of 4 (half a call); 37: the scalar path
    [TestCase(ScalarType.BFloat16, 104), TestCase(ScalarType.Float32, 52), TestCase(ScalarType.Float16, 37)]
    public void DropoutMasksAreTheDocumentedStream(ScalarType dtype, int hidden)
    {
        var dev = Gpu.Require();
        const long rows = 7;
        const double p = 0.3;
        var x0 = randn(rows, hidden, device: dev).to(dtype);
        var x1 = randn(rows, hidden, device: dev).to(dtype);
        var res = randn(rows, hidden, device: dev).to(dtype);
        var w = ones(hidden, device: dev).to(dtype);
        var f = flash_attn.dropout_add_layer_norm_parallel_residual(x0, x1, res, w, null, null, null, p, 1e-5, prenorm: true,
                                                                   return_dropout_mask: true, generator: new Generator(2024));
        ulong seed = DropoutSeed.Draw(new Generator(2024)); // the op's own draw from the same generator state
        // flashattn.h, FlashAttn_norm_fwd: element e of x0 (e + rows * hidden of x1) is kept when 16-bit half e % 2 of word
        // (e / 2) % 4 of Philox(seed, counter (e / 8, offset 0)) < floor((1 - p) 2^16)
        uint threshold = (uint)Math.Min((1.0 - (float)p) * 65536.0, 65536.0);
        int wrong = 0;
        foreach (var (mask, first) in new[] { (f.dropout_mask0!, 0L), (f.dropout_mask1!, rows * hidden) })
        {
            var got = mask.to(ScalarType.Byte).cpu().data<byte>().ToArray();
            for (long i = 0; i < rows * hidden; i++)
            {
                long e = first + i;
                var words = PhiloxTests.Philox(unchecked((uint)seed), (uint)(seed >> 32), (uint)(e / 8), (uint)(e / 8 >> 32), 0, 0);
                uint half = (words[e / 2 % 4] >> (int)(16 * (e % 2))) & 0xFFFF;
                if (got[i] != (half < threshold ? 1 : 0)) wrong++;
            }
        }
        Assert.That(wrong, Is.EqualTo(0), "mask elements that differ from the stream's definition");
        NormTests.AssertKeepRate(f.dropout_mask0!, p);
    }

    // 12288 columns: 32 columns a thread (the rows forward and the recomputing rows backward)
    [TestCase(ScalarType.BFloat16, 1000, 0.1, 2048), TestCase(ScalarType.Float16, 4096, 0.37, 2048),
     TestCase(ScalarType.Float32, 768, 0.5, 2048), TestCase(ScalarType.BFloat16, 12288, 0.2, 301)]
    public void DropoutIsReproducibleAtTheKeepRateAndItsBackwardUsesTheMask(ScalarType dtype, int hidden, double p, long rows)
    {
        var dev = Gpu.Require();
        var x0 = randn(rows, hidden, device: dev).to(dtype).requires_grad_(true);
        var res = randn(rows, hidden, device: dev).to(dtype).requires_grad_(true);
        var w = (randn(hidden, device: dev) * 0.3 + 1).to(dtype).requires_grad_(true);
        var b = (randn(hidden, device: dev) * 0.3).to(dtype).requires_grad_(true);

        manual_seed(77);
        var (z, r, mask) = flash_attn.dropout_add_layer_norm(x0, res, w, b, p, 1e-5, prenorm: true, return_dropout_mask: true);
        manual_seed(77);
        var (z2, r2, _) = flash_attn.dropout_add_layer_norm(x0, res, w, b, p, 1e-5, prenorm: true);
        var (_, _, mask3) = flash_attn.dropout_add_layer_norm(x0, res, w, b, p, 1e-5, prenorm: true, return_dropout_mask: true);
        Assert.That(Tolerance.MaxAbsDiff(z, z2), Is.EqualTo(0.0), "same seed, same output (mask regenerated, not stored)");
        Assert.That(Tolerance.MaxAbsDiff(r!, r2!), Is.EqualTo(0.0));
        Assert.That(Tolerance.MaxAbsDiff(mask!, mask3!), Is.EqualTo(1.0), "the next call draws a new seed");
        NormTests.AssertKeepRate(mask!, p);
        // the keep rate also holds per column and per row block (no striping in the generator)
        NormTests.AssertKeepRate(mask![.., ..64], p);
        NormTests.AssertKeepRate(mask[..16], p);

        var gz = randn_like(z);
        var gr = randn_like(r!);
        autograd.backward(new List<Tensor> { z, r! }, new List<Tensor> { gz, gr });
        var e = new[] { x0, res, w, b }.Select(t => t.detach().to(ScalarType.Float64).requires_grad_(true)).ToArray();
        var re = Reference.dropout_add_norm(e[0], null, e[1], e[2], e[3], null, null, p, 1e-5, residual_dtype: ScalarType.Float64,
                                            dropout_mask0: mask);
        autograd.backward(new List<Tensor> { re.out0, re.residual }, new List<Tensor> { gz.to(ScalarType.Float64), gr.to(ScalarType.Float64) });
        var l = new[] { x0, res, w, b }.Select(t => t.detach().clone().requires_grad_(true)).ToArray();
        var rl = Reference.dropout_add_norm(l[0], null, l[1], l[2], l[3], null, null, p, 1e-5, dropout_mask0: mask, compute_dtype: dtype);
        autograd.backward(new List<Tensor> { rl.out0, rl.residual }, new List<Tensor> { gz, gr });
        Tolerance.AssertClose(z, rl.out0, re.out0, "out with the returned mask");
        Tolerance.AssertClose(r!, rl.residual, re.residual, "residual with the returned mask");
        Tolerance.AssertClose(x0.grad!, l[0].grad!, e[0].grad!, "dx0 with the returned mask", factor: GradFactor);
        Assert.That(x0.grad!.masked_select(mask.logical_not()).abs().max().to(ScalarType.Float32).item<float>(), Is.EqualTo(0f), "dropped elements get no gradient");
        Tolerance.AssertClose(res.grad!, l[1].grad!, e[1].grad!, "dresidual", factor: GradFactor);
        Tolerance.AssertClose(w.grad!, l[2].grad!, e[2].grad!, "dweight", factor: GradFactor);
        Tolerance.AssertClose(b.grad!, l[3].grad!, e[3].grad!, "dbias", factor: GradFactor);
    }

    // 8192 columns: the rows backward's four partial slots in shared memory; 16384: too large for it (block
    // kernels); float32: the block backward at every size.
    [TestCase(ScalarType.BFloat16, false, 2048, 1500), TestCase(ScalarType.Float16, true, 2048, 1500),
     TestCase(ScalarType.Float32, false, 2048, 1500), TestCase(ScalarType.BFloat16, false, 8192, 257),
     TestCase(ScalarType.Float16, true, 16384, 97)]
    public void ParallelResidualMatchesReference(ScalarType dtype, bool rms, long hidden, long rows)
    {
        var dev = Gpu.Require();
        const double p = 0.2;
        var ins = new[] { randn(rows, hidden, device: dev), randn(rows, hidden, device: dev), randn(rows, hidden, device: dev) }
            .Select(t => t.to(dtype).requires_grad_(true)).ToArray();
        var ps = Enumerable.Range(0, 4).Select(i => ((i % 2 == 0 ? 1.0 : 0.0) + randn(hidden, device: dev) * 0.3).to(ScalarType.Float32).requires_grad_(true)).ToArray();
        var f = rms
            ? flash_attn.dropout_add_rms_norm_parallel_residual(ins[0], ins[1], ins[2], ps[0], ps[1], ps[2], ps[3], p, 1e-5, prenorm: true, return_dropout_mask: true)
            : flash_attn.dropout_add_layer_norm_parallel_residual(ins[0], ins[1], ins[2], ps[0], ps[1], ps[2], ps[3], p, 1e-5, prenorm: true, return_dropout_mask: true);
        Assert.That(Tolerance.MaxAbsDiff(f.dropout_mask0!, f.dropout_mask1!), Is.EqualTo(1.0), "x0 and x1 get independent masks");
        NormTests.AssertKeepRate(f.dropout_mask1!, p);
        var gs = new List<Tensor> { randn_like(f.out0), randn_like(f.out0), randn_like(f.residual!) };
        autograd.backward(new List<Tensor> { f.out0, f.out1!, f.residual! }, gs);

        var all = ins.Concat(ps).ToArray();
        var e = all.Select(t => t.detach().to(ScalarType.Float64).requires_grad_(true)).ToArray();
        var re = Reference.dropout_add_norm(e[0], e[1], e[2], e[3], e[4], e[5], e[6], p, 1e-5, null, rms, residual_dtype: ScalarType.Float64,
                                            dropout_mask0: f.dropout_mask0, dropout_mask1: f.dropout_mask1);
        autograd.backward(new List<Tensor> { re.out0, re.out1!, re.residual }, gs.Select(g => g.to(ScalarType.Float64)).ToList());
        var l = all.Select(t => t.detach().clone().requires_grad_(true)).ToArray();
        var rl = Reference.dropout_add_norm(l[0], l[1], l[2], l[3], l[4], l[5], l[6], p, 1e-5, null, rms,
                                            dropout_mask0: f.dropout_mask0, dropout_mask1: f.dropout_mask1, compute_dtype: dtype);
        autograd.backward(new List<Tensor> { rl.out0, rl.out1!, rl.residual }, gs);
        Tolerance.AssertClose(f.out0, rl.out0, re.out0, "out0");
        Tolerance.AssertClose(f.out1!, rl.out1!, re.out1!, "out1");
        Tolerance.AssertClose(f.residual!, rl.residual, re.residual, "residual");
        var names = new[] { "dx0", "dx1", "dresidual", "dweight0", "dbias0", "dweight1", "dbias1" };
        for (int i = 0; i < all.Length; i++) Tolerance.AssertClose(all[i].grad!, l[i].grad!, e[i].grad!, names[i], factor: GradFactor);
    }

    // odd widths or offsets: the scalar block kernels; 1024 columns 8 apart in rows of 1032: 16-byte vectors with
    // a row stride that is not the hidden size (the rows kernels)
    [TestCase(ScalarType.BFloat16, 1001, 5, 3), TestCase(ScalarType.Float16, 77, 5, 3), TestCase(ScalarType.Float32, 4099, 5, 3),
     TestCase(ScalarType.BFloat16, 1024, 8, 8), TestCase(ScalarType.Float32, 1024, 8, 4)]
    public void StridedRowsAndOddHiddenMatchReference(ScalarType dtype, int hidden, int pad, int offset)
    {
        var dev = Gpu.Require();
        // x0 viewed out of a wider buffer: the row stride is not the hidden size
        var buf = randn(513, hidden + pad, device: dev).to(dtype);
        var x0 = buf[.., offset..(hidden + offset)].requires_grad_(false).detach().requires_grad_(true);
        var w = (randn(hidden, device: dev) * 0.3 + 1).to(dtype).requires_grad_(true);
        var z = flash_attn.layer_norm(x0, w, null, 1e-6, zero_centered_weight: true);
        var g = randn_like(z);
        z.backward(new[] { g });
        var xe = x0.detach().to(ScalarType.Float64).requires_grad_(true);
        var we = w.detach().to(ScalarType.Float64).requires_grad_(true);
        var ze = Reference.layer_norm(xe, we, null, 1e-6, zero_centered_weight: true);
        ze.backward(new[] { g.to(ScalarType.Float64) });
        var xl = x0.detach().clone().requires_grad_(true);
        var wl = w.detach().clone().requires_grad_(true);
        var zl = Reference.layer_norm(xl, wl, null, 1e-6, zero_centered_weight: true, compute_dtype: dtype);
        zl.backward(new[] { g });
        Tolerance.AssertClose(z, zl, ze, "out");
        Tolerance.AssertClose(x0.grad!, xl.grad!, xe.grad!, "dx", factor: GradFactor);
        Tolerance.AssertClose(w.grad!, wl.grad!, we.grad!, "dweight", factor: GradFactor);
    }

    [Test]
    public void ModulesRunTheKernelAndMatchTorchLayerNorm()
    {
        var dev = Gpu.Require();
        var ln = nn.LayerNorm(2048, device: dev);
        var ours = layers.FusedLayerNorm(2048, device: dev);
        using (no_grad()) { ln.weight!.copy_(randn(2048, device: dev)); ln.bias!.copy_(randn(2048, device: dev)); }
        ours.load_state_dict(ln.state_dict());
        var x = randn(4, 256, 2048, device: dev);
        Assert.That(Tolerance.MaxAbsDiff(ours.call(x), ln.call(x)), Is.LessThan(1e-4));
        var rmsNorm = layers.RMSNorm(2048, device: dev, dtype: ScalarType.BFloat16);
        var xb = x.to(ScalarType.BFloat16);
        var exact = Reference.rms_norm(xb.to(ScalarType.Float64), rmsNorm.Weight.to(ScalarType.Float64));
        Tolerance.AssertClose(rmsNorm.call(xb), Reference.rms_norm(xb, rmsNorm.Weight, compute_dtype: ScalarType.BFloat16), exact, "RMSNorm");
    }

    [Test]
    public void ValidationHappensBeforeTheKernelOnGpu()
    {
        var dev = Gpu.Require();
        var x = randn(4, 64, device: dev);
        var e = Assert.Throws<ArgumentException>(() => flash_attn.layer_norm(x, ones(64), null))!;
        Assert.That(e.ParamName, Is.EqualTo("weight"));
        Assert.That(e.Message, Does.Contain("same device"));
    }

    [Test]
    public void KernelOutputsCanBeModifiedInPlaceDownstream()
    {
        var dev = Gpu.Require();
        var x0 = randn(2, 64, 256, device: dev).to(ScalarType.BFloat16).requires_grad_(true);
        var res = randn(2, 64, 256, device: dev).to(ScalarType.BFloat16);
        var (z, r, m) = flash_attn.dropout_add_layer_norm(x0, res, ones(256, device: dev), null, 0.1, 1e-5, prenorm: true,
                                                          return_dropout_mask: true);
        Assert.That(z.shape, Is.EqualTo(new long[] { 2, 64, 256 }));
        Assert.That(m!.shape, Is.EqualTo(new long[] { 2, 64, 256 }));
        z.mul_(2); // out0 is not saved for backward: changing it in place is fine
        (z.to(ScalarType.Float32).sum() + r!.to(ScalarType.Float32).sum()).backward(retain_graph: true);
        Assert.That(x0.grad!.isfinite().all().item<bool>(), Is.True);
        // The residual output is saved for backward (as in flash-attn): changing it in place makes
        // backward fail; BackwardGuard reports that instead of aborting the process.
        BackwardGuard.ClearLastBackwardError();
        r.add_(1);
        (z.to(ScalarType.Float32).sum() + r.to(ScalarType.Float32).sum()).backward();
        Assert.That(BackwardGuard.LastBackwardError, Does.Contain("modified by an inplace operation"));
        Assert.That(x0.grad!.isfinite().all().item<bool>(), Is.True);
    }
}
