using FlashAttn.Models;
using FlashAttn.Models.Data;
using FlashAttn.Models.Training;
using NUnit.Framework;
using SixLabors.ImageSharp;
using SixLabors.ImageSharp.PixelFormats;
using TorchSharp;
using static TorchSharp.torch;

namespace FlashAttn.Tests;

/// <summary>ViT classification on an image folder through the same trainer (CPU, tiny model, few steps).</summary>
[NonParallelizable]
public class TrainingVitTests
{
    [Test]
    public void VitTrainsOnAnImageFolderAndLossFalls()
    {
        var root = Path.Combine(Path.GetTempPath(), "flashattn-vit-" + Guid.NewGuid().ToString("N"));
        try
        {
            MakeColourFolder(root);
            var (train, val, classes) = ImageFolder.Open(root, 0.1, 1);
            Assert.That(classes, Is.EqualTo(new[] { "blue", "red" }));
            Assert.That(train.Items, Has.Count.EqualTo(24));
            Assert.That(val, Has.Count.EqualTo(8));
            var r = new Trainer(ExperimentConfig.Parse([
                "experiment=imagefolder/vit-ti16", "model.name=vit-tiny-test", $"datamodule.dataset={root}", "datamodule.image_size=32",
                "datamodule.batch_size=8", "train.global_batch_size=8", "trainer.precision=32", "trainer.max_steps=12",
                "train.scheduler.warmup_steps=2", "trainer.val_check_interval=0", "trainer.checkpoint_every_n_steps=0",
                $"trainer.default_root_dir={Path.Combine(root, "runs")}", "trainer.progress_bar=false", "trainer.tensorboard=false", "trainer.plot=false",
            ]), TextWriter.Null).Run();
            Assert.That(r.Losses.TakeLast(3).Average(), Is.LessThan(r.Losses.Take(3).Average()));
            Assert.That(r.ValLoss, Is.Not.Null);
        }
        finally { try { Directory.Delete(root, true); } catch { } }
    }

    [Test]
    public void VitFineTunesFromTimmWeightsOfAnotherHeadAndResolution()
    {
        var root = Path.Combine(Path.GetTempPath(), "flashattn-vitft-" + Guid.NewGuid().ToString("N"));
        try
        {
            MakeColourFolder(root);
            // timm's layout (no metadata): 5 classes at 32 px (a 4 x 4 grid), width 128 (two heads of 64), 2 blocks
            var cfg = new ViTConfig { img_size = 32, patch_size = 8, embed_dim = 128, depth = 2, num_heads = 2, num_classes = 5 };
            manual_seed(4);
            using var src = new VisionTransformer(cfg.WithFusions(false));
            var file = Path.Combine(root, "timm.safetensors");
            SafeTensors.Save(file, src.named_parameters().Select(np => new KeyValuePair<string, Tensor>(np.name, np.parameter.detach().contiguous())),
                new Dictionary<string, string> { ["format"] = "pt" });
            // width 128 is none of timm's standard ones: the head count must be given
            Assert.That(Assert.Throws<InvalidDataException>(() => ViTConfig.FromWeights(file))!.Message, Does.Contain("model.config.n_head"));
            var read = ViTConfig.FromWeights(file, num_heads: 2);
            Assert.That((read.embed_dim, read.num_heads, read.depth, read.patch_size, read.img_size, read.num_classes, read.mlp_ratio),
                Is.EqualTo((128L, 2L, 2L, 8L, 32L, 5L, 4.0)));

            // fine-tuned at 48 px (a 6 x 6 grid) on 2 classes with lr 0: it ends with the source's weights, adapted
            var log = new StringWriter();
            var r = new Trainer(ExperimentConfig.Parse([
                "experiment=imagefolder/vit-ti16", $"model.init_from={file}", "model.config.n_head=2", "trainer.accelerator=cpu",
                $"datamodule.dataset={root}", "datamodule.image_size=48",
                "datamodule.batch_size=8", "train.global_batch_size=8", "trainer.precision=32", "trainer.max_steps=1", "train.optimizer.lr=0",
                "train.scheduler.warmup_lr_init=0", "trainer.val_check_interval=0", "trainer.checkpoint_every_n_steps=0",
                $"trainer.default_root_dir={Path.Combine(root, "runs")}", "trainer.progress_bar=false", "trainer.tensorboard=false", "trainer.plot=false",
            ]), log).Run();
            Assert.That(log.ToString(), Does.Contain("head.weight: [5, 128] in the weights, [2, 128] here").And.Contain("resampled to 36"));
            var saved = Path.Combine(r.RunDir, "model.safetensors");
            using var tuned = new VisionTransformer(ViTConfig.FromSafetensors(saved).WithFusions(false));
            tuned.load_safetensors(saved);
            var own = tuned.named_parameters().ToDictionary(np => np.name, np => np.parameter);
            foreach (var (name, p) in src.named_parameters().Where(np => !np.name.StartsWith("head.") && np.name != "pos_embed"))
                Assert.That(Same(own[name], p), Is.True, name);
            Assert.That(own["head.weight"].shape, Is.EqualTo(new long[] { 2, 128 }));
            Assert.That(Same(own["pos_embed"], VisionTransformer.ResamplePositions(src.named_parameters().First(np => np.name == "pos_embed").parameter.detach(), 6)));

            // a file without a head (timm's num_classes=0) loads into a model with one, which keeps its initialisation
            var headless = Path.Combine(root, "headless.safetensors");
            SafeTensors.Save(headless, src.named_parameters().Where(np => !np.name.StartsWith("head."))
                .Select(np => new KeyValuePair<string, Tensor>(np.name, np.parameter.detach().contiguous())), new Dictionary<string, string> { ["format"] = "pt" });
            Assert.That(ViTConfig.FromWeights(headless, num_heads: 2).num_classes, Is.EqualTo(0));
            using var withHead = new VisionTransformer((cfg with { num_classes = 3 }).WithFusions(false));
            var headLog = new StringWriter();
            withHead.load_pretrained(headless, headLog);
            Assert.That(headLog.ToString(), Does.Contain("head.weight: not in the weights"));

            // the resampling: the class token's row kept, the identity at the same grid, a field constant over the grid stays so
            var pos = randn(1, 17, 8);
            Assert.That(Same(VisionTransformer.ResamplePositions(pos, 4), pos), Is.True);
            var constant = ones(1, 17, 8) * arange(8, dtype: ScalarType.Float32);
            var grown = VisionTransformer.ResamplePositions(constant, 7);
            Assert.That(grown.shape, Is.EqualTo(new long[] { 1, 50, 8 }));
            Assert.That((grown - ones(1, 50, 8) * arange(8, dtype: ScalarType.Float32)).abs().max().item<float>(), Is.LessThan(1e-5f));
        }
        finally { try { Directory.Delete(root, true); } catch { } }
    }

    static bool Same(Tensor a, Tensor b) => a.shape.SequenceEqual(b.shape) && a.eq(b).all().item<bool>();

    /// <summary>Two classes that differ in colour (train 12 + val 4 images each, red-ish and blue-ish, of various sizes).</summary>
    static void MakeColourFolder(string root)
    {
        var rnd = new Random(1);
        foreach (var split in new[] { "train", "val" })
            foreach (var (cls, color) in new[] { ("blue", new Rgb24(20, 40, 220)), ("red", new Rgb24(220, 30, 20)) })
            {
                var dir = Path.Combine(root, split, cls);
                Directory.CreateDirectory(dir);
                for (int i = 0; i < (split == "train" ? 12 : 4); i++)
                {
                    using var img = new Image<Rgb24>(30 + rnd.Next(20), 30 + rnd.Next(20));
                    for (int y = 0; y < img.Height; y++)
                        for (int x = 0; x < img.Width; x++)
                            img[x, y] = new Rgb24((byte)Math.Clamp(color.R + rnd.Next(-20, 20), 0, 255), (byte)Math.Clamp(color.G + rnd.Next(-20, 20), 0, 255), (byte)Math.Clamp(color.B + rnd.Next(-20, 20), 0, 255));
                    img.Save(Path.Combine(dir, $"{i}.{(i % 2 == 0 ? "png" : "jpg")}"));
                }
            }
    }
}
