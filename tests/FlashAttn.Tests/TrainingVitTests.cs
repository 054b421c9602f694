using FlashAttn.Models.Data;
using FlashAttn.Models.Training;
using NUnit.Framework;
using SixLabors.ImageSharp;
using SixLabors.ImageSharp.PixelFormats;

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
            // two classes that differ in colour: red-ish and blue-ish images of various sizes
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
}
