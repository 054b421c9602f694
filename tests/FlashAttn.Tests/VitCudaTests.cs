using FlashAttn.Models;
using NUnit.Framework;
using TorchSharp;
using static TorchSharp.torch;

namespace FlashAttn.Tests;

/// <summary>ViT on the GPU: every fusion on in bf16 against the plain model in bf16 and in float64 (the reference rule).</summary>
[TestFixture]
[Category(Gpu.Category)]
public sealed class VitCudaTests
{
    [Test]
    public void FusedBf16_MatchesPlainWithinTheReferenceRule()
    {
        var dev = Gpu.Require();
        var c = new ViTConfig { img_size = 64, patch_size = 16, embed_dim = 256, depth = 2, num_heads = 4, num_classes = 100, drop_path_rate = 0 };
        manual_seed(0);
        using var master = new VisionTransformer(c);
        VisionTransformer Like(ViTConfig cfg, ScalarType dtype)
        {
            var m = new VisionTransformer(cfg, dev, dtype);
            using var _ = no_grad();
            var src = master.named_parameters().ToDictionary(np => np.name, np => np.parameter);
            foreach (var (name, p) in m.named_parameters()) p.copy_(src[name]);
            return m;
        }
        using var fused = Like(c.WithFusions(true), ScalarType.BFloat16);
        using var plain = Like(c.WithFusions(false), ScalarType.BFloat16);
        using var exact = Like(c.WithFusions(false), ScalarType.Float64);
        manual_seed(1);
        var x = randn(4, 3, 64, 64).to(dev);
        var y = randint(0, 100, new long[] { 4 }).to(dev);
        Tolerance.AssertClose(fused.forward(x.to(ScalarType.BFloat16)), plain.forward(x.to(ScalarType.BFloat16)),
                              exact.forward(x.to(ScalarType.Float64)), "logits", factor: 3);
        fused.loss(x.to(ScalarType.BFloat16), y).backward();
        plain.loss(x.to(ScalarType.BFloat16), y).backward();
        exact.loss(x.to(ScalarType.Float64), y).backward();
        var gp = plain.named_parameters().ToDictionary(np => np.name, np => np.parameter.grad!);
        var ge = exact.named_parameters().ToDictionary(np => np.name, np => np.parameter.grad!);
        foreach (var (name, p) in fused.named_parameters())
            Tolerance.AssertClose(p.grad!, gp[name], ge[name], $"grad {name}", factor: 4);
    }
}
