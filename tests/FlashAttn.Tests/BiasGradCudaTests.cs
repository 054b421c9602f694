using NUnit.Framework;
using TorchSharp;
using static TorchSharp.torch;

namespace FlashAttn.Tests;

/// <summary>
/// Our bias-gradient kernel (FlashAttn_dense_bias_grad, through <see cref="DenseOps.ColumnSums"/>) against float64
/// column sums: rows 1 and 97 (one split: db written directly), 1025 (five row splits of 256, the last one row long,
/// added up by the last block of each column block) and 16384 (GPT-2's 16 x 1024 tokens); widths 8, 40, 768, 2304, 3072
/// (16-byte vectors), 1000 (a multiple of 8 but not of 64: a partial column block) and 3 (the scalar path); rows
/// farther apart than the width (the vector path with a stride) and at an odd offset (unaligned and an odd stride: the
/// scalar path); bf16, fp16 and fp32.
/// Tolerance: the flash-attn rule against the same sum computed in the low precision. For bf16/fp16 that is the float64
/// sum rounded once to the dtype: torch's own 16-bit sum accumulates in float32 and rounds the output only, so a
/// 16-bit reference with 16-bit accumulation would be a looser bar than any real one. For fp32 it is torch's float32
/// sum, whose error is its float32 accumulation, as ours.
/// </summary>
[Category(Gpu.Category)]
public sealed class BiasGradCudaTests
{
    [SetUp]
    public void Seed() => manual_seed(TestContext.CurrentContext.Random.Next());

    private static readonly ScalarType[] Types = { ScalarType.BFloat16, ScalarType.Float16, ScalarType.Float32 };

    private static IEnumerable<TestCaseData> Cases()
    {
        foreach (var dt in Types)
        foreach (var m in new[] { 1, 97, 1025, 16384 })
        {
            foreach (var n in new[] { 8, 40, 768, 2304, 3072, 1000, 3 })
                yield return new TestCaseData(dt, m, n, "contiguous").SetName($"BiasGrad_{dt}_m{m}_n{n}");
            if (m is 97 or 16384)
                foreach (var n in new[] { 768, 1000, 3 })
                foreach (var layout in new[] { "strided", "offset" })
                    yield return new TestCaseData(dt, m, n, layout).SetName($"BiasGrad_{dt}_m{m}_n{n}_{layout}");
        }
    }

    // dy (m, n) in dt: contiguous; "strided": rows n + 24 apart (a multiple of every vector width: still 16-byte rows);
    // "offset": rows n + 25 apart from element 1 of the storage (unaligned, odd stride: the scalar path).
    private static Tensor Dy(ScalarType dt, long m, long n, string layout, Device dev)
    {
        long pad = layout switch { "contiguous" => 0, "strided" => 24, _ => 25 };
        long offset = layout == "offset" ? 1 : 0;
        var storage = randn(new[] { m, n + pad }, dtype: ScalarType.Float64, device: dev).to(dt);
        var dy = storage.narrow(1, offset, n);
        if (m > 1) Assert.That(dy.stride(0), Is.EqualTo(n + pad), "row stride");
        return dy;
    }

    private static Tensor Poisoned(long n, ScalarType dt, Device dev) => full(n, double.NaN, dtype: dt, device: dev);

    [TestCaseSource(nameof(Cases))]
    public void ColumnSumsMatchFloat64(ScalarType dt, int m, int n, string layout)
    {
        var dev = Gpu.Require();
        var dy = Dy(dt, m, n, layout, dev);
        var db = Poisoned(n, dt, dev);
        DenseOps.ColumnSums(dy, db, backward: false);

        var exact = dy.to(ScalarType.Float64).sum(0L);
        var low = dt == ScalarType.Float32 ? dy.sum(0L) : exact.to(dt);
        Assert.That(db.dtype, Is.EqualTo(dt));
        Tolerance.AssertClose(db, low, exact, $"db {dt} m{m} n{n} {layout}");
    }

    [TestCase(ScalarType.BFloat16, 16384, 768, "contiguous")]
    [TestCase(ScalarType.Float16, 16384, 1000, "offset")]
    [TestCase(ScalarType.Float32, 1025, 2304, "strided")]
    public void ColumnSumsAreTheSameBitsEveryRun(ScalarType dt, int m, int n, string layout)
    {
        var dev = Gpu.Require();
        var dy = Dy(dt, m, n, layout, dev);
        var first = Poisoned(n, dt, dev);
        var second = Poisoned(n, dt, dev);
        DenseOps.ColumnSums(dy, first, backward: false);
        DenseOps.ColumnSums(dy, second, backward: false);
        Assert.That(first.isnan().any().item<bool>(), Is.False, "NaN in the output");
        Assert.That(FusedAdamWTests.Same(first, second), "the second run's db equals the first's");
    }

    // The workspace is zeroed once and each call leaves it zero, so calls of any size share it. The arrival counters
    // come first: a narrow call's many partial sums lie where a wider call's counters will be, so a call that left them
    // there would make the next one count from garbage (db left NaN where no block saw itself last).
    [Test]
    public void SuccessiveSizesShareOneWorkspace()
    {
        var dev = Gpu.Require();
        const ScalarType dt = ScalarType.BFloat16;
        foreach (var (m, n) in new[] { (16384, 8), (16384, 3072), (1025, 40), (16384, 768), (16384, 1000) })
        {
            var dy = Dy(dt, m, n, "contiguous", dev);
            var db = Poisoned(n, dt, dev);
            DenseOps.ColumnSums(dy, db, backward: false);
            var exact = dy.to(ScalarType.Float64).sum(0L);
            Tolerance.AssertClose(db, exact.to(dt), exact, $"db m{m} n{n} after the earlier sizes");
            var ws = DenseOps.BiasGradWorkspace(dev.index, 1);
            Assert.That(ws.ne(0).any().item<bool>(), Is.False, $"the workspace is all zero after m{m} n{n}");
        }
    }

    [Test]
    public void NoRowsGiveZeros()
    {
        var dev = Gpu.Require();
        var db = Poisoned(40, ScalarType.BFloat16, dev);
        DenseOps.ColumnSums(empty(0, 40, dtype: ScalarType.BFloat16, device: dev), db, backward: false);
        Assert.That(db.to(ScalarType.Float32).abs().max().item<float>(), Is.EqualTo(0f));
    }
}
