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
    public void RotationNeverRemovesWhatLastNamesNorAnotherRunsCheckpoints()
    {
        var dir = Directory.CreateTempSubdirectory("flashattn-ckpt-").FullName;
        try
        {
            var tensors = new Dictionary<string, Tensor> { ["w"] = ones(3) };
            JsonObject State(string run, long step) => new() { ["step"] = step, ["run_id"] = run };
            string Last() => File.ReadAllText(Path.Combine(dir, "last")).Trim();
            string[] Steps() => Directory.GetDirectories(dir, "step-*").Select(d => Path.GetFileName(d)!).Order(StringComparer.Ordinal).ToArray();
            // a finished run's checkpoints at high steps, and its best one
            Checkpoint.Save(dir, 240, tensors, State("old", 240));
            Checkpoint.Save(dir, 250, tensors, State("old", 250));
            Assert.That(Checkpoint.SaveIfBest(dir, 250, 1.0, 1, tensors, State("old", 250)), Is.Not.Null);
            // a new run's step 3 in the same folder: kept (last names it), the other run's left alone
            Checkpoint.Save(dir, 3, tensors, State("new", 3));
            Assert.That(Last(), Is.EqualTo("step-0000003"));
            Assert.That(Steps(), Is.EqualTo(new[] { "step-0000003", "step-0000240", "step-0000250" }));
            Assert.That(Checkpoint.Load(Checkpoint.Resolve("last", dir)).state["step"]!.GetValue<long>(), Is.EqualTo(3));
            // its best-k choice sees its own checkpoints only: a worse loss than the other run's best still ranks
            Assert.That(Checkpoint.SaveIfBest(dir, 3, 5.0, 1, tensors, State("new", 3)), Is.Not.Null);
            Assert.That(Checkpoint.Best(dir, "new").Select(b => b.valLoss), Is.EqualTo(new[] { 5.0 }));
            Assert.That(Checkpoint.Best(dir, "old").Select(b => b.valLoss), Is.EqualTo(new[] { 1.0 }), "the other run's best stays");
            // keep 2: the newest two of the run
            Checkpoint.Save(dir, 4, tensors, State("new", 4));
            Checkpoint.Save(dir, 5, tensors, State("new", 5));
            Assert.That(Steps(), Is.EqualTo(new[] { "step-0000004", "step-0000005", "step-0000240", "step-0000250" }));
            // resumed from an earlier checkpoint: the step just written is what last names, kept beside the run's highest other
            Checkpoint.Save(dir, 2, tensors, State("new", 2));
            Assert.That(Last(), Is.EqualTo("step-0000002"));
            Assert.That(Steps(), Is.EqualTo(new[] { "step-0000002", "step-0000005", "step-0000240", "step-0000250" }));
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
