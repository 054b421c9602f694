using System.Text.Json.Nodes;
using FlashAttn.Models.Training;
using NUnit.Framework;
using static TorchSharp.torch;

namespace FlashAttn.Tests;

/// <summary>Best-k checkpoints by validation loss (flash-attention's experiments keep the best 3 plus the last); the rotation of progress
/// checkpoints.</summary>
public sealed class CheckpointTests
{
    [Test]
    public void RotationAndBestKTakeEveryCheckpointOfTheFolderAndNeverWhatLastNames()
    {
        var dir = Directory.CreateTempSubdirectory("flashattn-ckpt-").FullName;
        try
        {
            var tensors = new Dictionary<string, Tensor> { ["w"] = ones(3) };
            JsonObject State(long step) => new() { ["step"] = step };
            string Last() => File.ReadAllText(Path.Combine(dir, "last")).Trim();
            string[] Steps() => Directory.GetDirectories(dir, "step-*").Select(d => Path.GetFileName(d)!).Order(StringComparer.Ordinal).ToArray();
            // a run folder holds one run (RunFolder): every checkpoint in it is the run's, those that name a run_id (written
            // before the folder rule) and those that do not alike
            Checkpoint.Save(dir, 240, tensors, new JsonObject { ["step"] = 240, ["run_id"] = "earlier" });
            Checkpoint.Save(dir, 250, tensors, State(250));
            Assert.That(Checkpoint.SaveIfBest(dir, 250, 1.0, 1, tensors, new JsonObject { ["step"] = 250, ["run_id"] = "earlier" }), Is.Not.Null);
            // resumed from an earlier checkpoint: the step just written is what last names, kept beside the highest other
            Checkpoint.Save(dir, 3, tensors, State(3));
            Assert.That(Last(), Is.EqualTo("step-0000003"));
            Assert.That(Steps(), Is.EqualTo(new[] { "step-0000003", "step-0000250" }));
            Assert.That(Checkpoint.Load(Checkpoint.Resolve("last", dir)).state["step"]!.GetValue<long>(), Is.EqualTo(3));
            // best-k ranks against the folder's best: a worse loss does not rank, a better one replaces it
            Assert.That(Checkpoint.SaveIfBest(dir, 3, 5.0, 1, tensors, State(3)), Is.Null);
            Assert.That(Checkpoint.SaveIfBest(dir, 4, 0.5, 1, tensors, State(4)), Is.Not.Null);
            Assert.That(Checkpoint.Best(dir).Select(b => (Path.GetFileName(b.dir), b.valLoss)), Is.EqualTo(new[] { ("best-step-0000004", 0.5) }));
            // keep 2: the one written and the highest other
            Checkpoint.Save(dir, 4, tensors, State(4));
            Checkpoint.Save(dir, 5, tensors, State(5));
            Assert.That(Steps(), Is.EqualTo(new[] { "step-0000005", "step-0000250" }));
            Directory.Delete(Path.Combine(dir, "step-0000250"), true);
            Checkpoint.Save(dir, 6, tensors, State(6));
            Assert.That(Steps(), Is.EqualTo(new[] { "step-0000005", "step-0000006" }));
            Checkpoint.Save(dir, 2, tensors, State(2));
            Assert.That(Last(), Is.EqualTo("step-0000002"));
            Assert.That(Steps(), Is.EqualTo(new[] { "step-0000002", "step-0000006" }));
            Assert.That(Directory.GetFileSystemEntries(dir, ".*"), Is.Empty, "no temporary folder or pointer is left");
            // last naming a checkpoint that is gone: an error that says so
            Directory.Delete(Path.Combine(dir, "step-0000002"), true);
            Assert.That(Assert.Throws<FileNotFoundException>(() => Checkpoint.Resolve("last", dir))!.Message,
                Does.Contain("names step-0000002, which is not a complete checkpoint"));
        }
        finally
        {
            Directory.Delete(dir, recursive: true);
        }
    }

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
