using System.Text.Json.Nodes;
using FlashAttn.Models.Training;
using NUnit.Framework;
using static TorchSharp.torch;

namespace FlashAttn.Tests;

/// <summary>Best-k checkpoints by validation loss (the seed keeps the best 3 plus the last).</summary>
public sealed class CheckpointTests
{
    [Test]
    public void KeepsTheKLowestValidationLosses()
    {
        var dir = Directory.CreateTempSubdirectory("flashattn-ckpt-").FullName;
        try
        {
            var tensors = new Dictionary<string, Tensor> { ["w"] = ones(3) };
            var state = new JsonObject { ["step"] = 0 };
            double[] losses = { 5.0, 4.0, 4.5, 6.0, 3.0, 4.2 };
            var saved = losses.Select((l, i) => Checkpoint.SaveIfBest(dir, (i + 1) * 10, l, 3, tensors, state)).ToList();
            // 6.0 never ranks once three better ones exist; the others are written when they rank
            Assert.That(saved.Select(s => s is not null), Is.EqualTo(new[] { true, true, true, false, true, true }));
            var best = Checkpoint.Best(dir);
            Assert.That(best.Select(b => b.valLoss), Is.EqualTo(new[] { 3.0, 4.0, 4.2 }));
            Assert.That(best.Select(b => Path.GetFileName(b.dir)), Is.EqualTo(new[] { "best-step-0000050", "best-step-0000020", "best-step-0000060" }));
            var (loaded, loadedState) = Checkpoint.Load(best[0].dir);
            Assert.That(loadedState["val_loss"]!.GetValue<double>(), Is.EqualTo(3.0));
            Assert.That(loaded["w"].sum().item<float>(), Is.EqualTo(3f));
            Assert.That(Checkpoint.SaveIfBest(dir, 70, double.NaN, 3, tensors, state), Is.Null, "NaN never ranks");
            Assert.That(Checkpoint.SaveIfBest(dir, 80, 1.0, 0, tensors, state), Is.Null, "top_k 0 keeps none");
        }
        finally
        {
            Directory.Delete(dir, recursive: true);
        }
    }
}
