using FlashAttn.Models;
using NUnit.Framework;
using TorchSharp;
using static TorchSharp.torch;

namespace FlashAttn.Tests;

/// <summary>
/// A guard on the models' numerics: for a fixed seed, the loss, the gradient norm and a logits checksum of a tiny GPT and
/// a tiny ViT in training mode (dropout and drop-path on, so the random draws count too), fused and plain, in float32 and
/// float64 on the CPU. The expected values were computed by this test on the model code before GPT and ViT were assembled
/// from the public modules (commit 6ceb04d; the fused cases again at 5381581, the same model code once the fused norms'
/// dropout drew its seed as attention's does, which moved their training-mode loss and gradients, not their logits; the
/// fused cases' loss and gradient norm again when the attention dropout stream moved to 16-bit halves, ABI 11: their
/// logits, without dropout, kept every bit): a change in the initialisation order, the random draws or the ops shows
/// here.
/// </summary>
[TestFixture]
public sealed class ModelNumericsTests
{
    private int _threads;

    [OneTimeSetUp]
    public void OneThread() { _threads = get_num_threads(); set_num_threads(1); }

    [OneTimeTearDown]
    public void RestoreThreads() => set_num_threads(_threads);

    private static (double loss, double gradNorm, double logits, double logitsScale) Gpt(bool fused, bool rotary, ScalarType dtype)
    {
        manual_seed(1234);
        var c = GPTConfig.Named("tiny").WithFusions(fused) with { rotary_emb_fraction = rotary ? 0.5 : 0.0 };
        using var m = new GPTLMHeadModel(c, dtype: dtype);
        m.train();
        manual_seed(5);
        var ids = randint(0, 256, new long[] { 2, 17 });
        var labels = randint(0, 256, new long[] { 2, 17 });
        var loss = m.loss(ids, labels);
        loss.backward();
        double norm = Math.Sqrt(m.parameters().Sum(p => p.grad!.to(ScalarType.Float64).square().sum().item<double>()));
        m.eval();
        using var _ = no_grad();
        var logits = m.forward(ids).to(ScalarType.Float64);
        return Measure(loss, norm, logits);
    }

    private static (double loss, double gradNorm, double logits, double logitsScale) Vit(bool fused, ScalarType dtype)
    {
        manual_seed(4321);
        var c = ViTConfig.Named("vit-tiny-test").WithFusions(fused) with { drop_rate = 0.1, attn_drop_rate = 0.1, drop_path_rate = 0.2 };
        using var m = new VisionTransformer(c, dtype: dtype);
        m.train();
        manual_seed(6);
        var images = randn(new long[] { 3, 3, 32, 32 }, dtype: dtype);
        var labels = tensor(new long[] { 1, 7, 3 });
        var loss = m.loss(images, labels);
        loss.backward();
        double norm = Math.Sqrt(m.parameters().Sum(p => p.grad!.to(ScalarType.Float64).square().sum().item<double>()));
        m.eval();
        using var _ = no_grad();
        var logits = m.forward(images).to(ScalarType.Float64);
        return Measure(loss, norm, logits);
    }

    /// <summary>The loss, the gradient norm, a checksum of the logits (weighted by sin(column) so that a permutation shows)
    /// and the sum of the checksum's magnitudes, the scale its rounding error is relative to.</summary>
    private static (double, double, double, double) Measure(Tensor loss, double gradNorm, Tensor logits)
    {
        var terms = logits * arange(logits.shape[^1], dtype: ScalarType.Float64).sin();
        return (loss.to(ScalarType.Float64).item<double>(), gradNorm, terms.sum().item<double>(), terms.abs().sum().item<double>());
    }

    private static void AssertClose((double, double, double, double) actual, (double, double, double) expected, ScalarType dtype)
    {
        // The same ops in the same order give the same bits; the tolerance only absorbs another summation order of another
        // libtorch build (PyTorch's CPU kernels on the GPU host differ from TorchSharp-cpu's in the last bits): 64 units in the
        // last place of the dtype, relative to the value, and for the checksum (a sum with cancellation) relative to the
        // sum of its terms' magnitudes. A change of the model's numerics moves these by orders of magnitude more.
        double ulps = 64 * (dtype == ScalarType.Float64 ? Math.Pow(2, -52) : Math.Pow(2, -23));
        TestContext.Out.WriteLine($"({actual.Item1:R}, {actual.Item2:R}, {actual.Item3:R})");
        Assert.That(actual.Item1, Is.EqualTo(expected.Item1).Within(ulps * Math.Abs(expected.Item1)), "loss");
        Assert.That(actual.Item2, Is.EqualTo(expected.Item2).Within(ulps * expected.Item2), "gradient norm");
        Assert.That(actual.Item3, Is.EqualTo(expected.Item3).Within(ulps * actual.Item4), "logits checksum");
    }

    [TestCase(true, false, ScalarType.Float32, 5.547887325286865, 3.292880920483691, 7.070970924616286)]
    [TestCase(false, false, ScalarType.Float32, 5.558669090270996, 3.3600413614984053, 7.070970915367851)]
    [TestCase(true, true, ScalarType.Float32, 5.503134250640869, 3.8842546313613227, -51.64280372375978)]
    [TestCase(false, true, ScalarType.Float32, 5.511183261871338, 3.897450191719739, -51.64280267101145)]
    [TestCase(true, true, ScalarType.Float64, 5.532019362446289, 4.17310021789573, -15.86733651193474)]
    [TestCase(false, true, ScalarType.Float64, 5.512780665725983, 4.163265147979839, -15.867336511934734)]
    public void Gpt_GivesTheNumbersOfBefore(bool fused, bool rotary, ScalarType dtype, double loss, double gradNorm, double logits) =>
        AssertClose(Gpt(fused, rotary, dtype), (loss, gradNorm, logits), dtype);

    [TestCase(true, ScalarType.Float32, 2.2216851711273193, 13.502665338146375, 1.0267033920138258)]
    [TestCase(false, ScalarType.Float32, 2.232762575149536, 12.539725091742065, 1.026703154076903)]
    [TestCase(true, ScalarType.Float64, 2.1878215118061894, 12.0038002305052, 0.4699571901429632)]
    [TestCase(false, ScalarType.Float64, 2.145958780304229, 13.676366852470782, 0.46995719014296305)]
    public void Vit_GivesTheNumbersOfBefore(bool fused, ScalarType dtype, double loss, double gradNorm, double logits) =>
        AssertClose(Vit(fused, dtype), (loss, gradNorm, logits), dtype);
}
