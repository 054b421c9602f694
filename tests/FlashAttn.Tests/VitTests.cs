using FlashAttn.Models;
using NUnit.Framework;
using TorchSharp;
using static TorchSharp.torch;

namespace FlashAttn.Tests;

/// <summary>ViT on CPU: sizes, timm names, fused vs plain, drop-path, checkpoints.</summary>
[TestFixture]
public sealed class VitTests
{
    // Tiny models gain nothing from intra-op threads, and on a loaded 2-core runner libtorch's thread pool makes each of
    // the ~1000 small ops per step wait for a descheduled worker (600 ms per tiny-GPT step instead of 15): one thread.
    private int _threads;

    [OneTimeSetUp]
    public void OneThread() { _threads = get_num_threads(); set_num_threads(1); }

    [OneTimeTearDown]
    public void RestoreThreads() => set_num_threads(_threads);

    private static ViTConfig TinyVit(bool fused = true) => ViTConfig.Named("vit-tiny-test").WithFusions(fused) with { drop_path_rate = 0.0 };

    [TestCase("vit-ti16", 5_717_416L)]
    [TestCase("vit-s16", 22_050_664L)]
    [TestCase("vit-b16", 86_567_656L)]
    public void ParameterCounts_AreTimms(string name, long expected)
    {
        using var m = new VisionTransformer(ViTConfig.Named(name));
        Assert.That(m.num_parameters(), Is.EqualTo(expected));
    }

    [Test]
    public void ViTL16_ParameterCount_OnTheMetaDevice()
    {
        using var m = new VisionTransformer(ViTConfig.Named("vit-l16"), new Device(DeviceType.META));
        Assert.That(m.num_parameters(), Is.EqualTo(304_326_632L));
    }

    [Test]
    public void Names_AreTimms()
    {
        Assert.Throws<ArgumentException>(() => ViTConfig.Named("vit-h14"));
        using var m = new VisionTransformer(TinyVit());
        var names = m.named_parameters().Select(np => np.name).ToList();
        foreach (var n in new[] { "cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "blocks.1.norm1.weight",
                     "blocks.1.attn.qkv.weight", "blocks.1.attn.qkv.bias", "blocks.1.attn.proj.weight", "blocks.1.norm2.bias",
                     "blocks.1.mlp.fc1.weight", "blocks.1.mlp.fc2.bias", "norm.weight", "norm.bias", "head.weight", "head.bias" })
            Assert.That(names, Does.Contain(n));
        Assert.That(m.parameter_groups().Where(g => g.weight_decay).Select(g => g.name),
            Is.EquivalentTo(new[] { "patch_embed.proj.weight", "head.weight" }.Concat(Enumerable.Range(0, 2).SelectMany(i =>
                new[] { "qkv", "proj" }.Select(l => $"blocks.{i}.attn.{l}.weight").Concat(new[] { "fc1", "fc2" }.Select(l => $"blocks.{i}.mlp.{l}.weight"))))));
    }

    [Test]
    public void FusedAndPlain_AgreeInLogitsAndGradients()
    {
        manual_seed(0);
        using var fused = new VisionTransformer(TinyVit(true));
        using var plain = new VisionTransformer(TinyVit(false));
        using (no_grad())
        {
            var src = fused.named_parameters().ToDictionary(np => np.name, np => np.parameter);
            foreach (var (n, p) in plain.named_parameters()) p.copy_(src[n]);
        }
        var x = randn(3, 3, 32, 32);
        var y = tensor(new long[] { 1, 7, 3 });
        var lf = fused.forward(x);
        Assert.That(lf.shape, Is.EqualTo(new long[] { 3, 10 }));
        Assert.That(Tolerance.MaxAbsDiff(lf, plain.forward(x)), Is.LessThan(1e-5));
        fused.loss(x, y).backward();
        plain.loss(x, y).backward();
        var gp = plain.named_parameters().ToDictionary(np => np.name, np => np.parameter.grad!);
        foreach (var (n, p) in fused.named_parameters())
        {
            var scale = Math.Max(gp[n].abs().max().item<float>(), 1e-3);
            Assert.That(Tolerance.MaxAbsDiff(p.grad!, gp[n]) / scale, Is.LessThan(1e-4), n);
        }
    }

    [Test]
    public void DropPath_DropsWholeSamplesInTrainingOnly()
    {
        foreach (bool fused in new[] { true, false })
        {
            manual_seed(1);
            using var m = new VisionTransformer(TinyVit(fused) with { drop_path_rate = 0.5 });
            var x = randn(8, 3, 32, 32);
            m.eval();
            var a = m.forward(x);
            Assert.That(Tolerance.MaxAbsDiff(a, m.forward(x)), Is.EqualTo(0), "eval is deterministic");
            m.train();
            var b = m.forward(x);
            Assert.That(b.isfinite().all().item<bool>(), Is.True);
            Assert.That(Tolerance.MaxAbsDiff(a, b), Is.GreaterThan(0), "training drops paths");
            m.loss(x, tensor(new long[] { 0, 1, 2, 3, 4, 5, 6, 7 })).backward();
        }
    }

    [Test]
    public void TinyVit_OverfitsOneBatch()
    {
        manual_seed(2);
        using var m = new VisionTransformer(TinyVit());
        var x = randn(8, 3, 32, 32);
        var y = tensor(new long[] { 0, 1, 2, 3, 4, 5, 6, 7 });
        using var opt = optim.AdamW(m.parameters(), lr: 2e-3, weight_decay: 0);
        double last = double.NaN;
        for (int i = 0; i < 100 && !(last < 0.05); i++)
        {
            using var scope = NewDisposeScope();
            opt.zero_grad();
            var loss = m.loss(x, y);
            loss.backward();
            opt.step();
            last = loss.item<float>();
        }
        Assert.That(last, Is.LessThan(0.1));
    }

    [Test]
    public void SaveLoad_RoundTrips()
    {
        var path = Path.Combine(Path.GetTempPath(), $"vit-{Guid.NewGuid():N}.safetensors");
        try
        {
            manual_seed(3);
            using var a = new VisionTransformer(TinyVit());
            a.save_safetensors(path);
            manual_seed(4);
            using var b = new VisionTransformer(TinyVit());
            b.load_safetensors(path);
            var pb = b.named_parameters().ToDictionary(np => np.name, np => np.parameter);
            foreach (var (n, p) in a.named_parameters()) Assert.That(GptTests.Same(p, pb[n]), Is.True, n);
            Assert.That(ViTConfig.FromSafetensors(path), Is.EqualTo(TinyVit()));
            using var other = new VisionTransformer(TinyVit() with { num_classes = 5 });
            Assert.That(Assert.Throws<InvalidDataException>(() => other.load_safetensors(path))!.Message, Does.Contain("head"));
        }
        finally { File.Delete(path); }
    }
}
