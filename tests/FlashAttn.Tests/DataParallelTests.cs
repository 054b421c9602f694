using FlashAttn.Models.Distributed;
using FlashAttn.Models.Training;
using NUnit.Framework;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace FlashAttn.Tests;

/// <summary>A collective of one rank (what NCCL does with one rank: nothing), or, with <c>otherRanks</c>, this rank among
/// ranks whose buffers hold the values <c>otherRanks</c> gives; it counts the calls.</summary>
sealed class FakeCollective(int rank = 0, int worldSize = 1, Func<Tensor, Tensor>? otherRanks = null) : ICollective
{
    public int Rank => rank;
    public int WorldSize => worldSize;
    public int AllReduces { get; private set; }
    public int Broadcasts { get; private set; }
    public long ReducedElements { get; private set; }

    public void AllReduce(Tensor tensor, NcclReduction op = NcclReduction.Sum)
    {
        Assert.That(op, Is.EqualTo(NcclReduction.Sum));
        Assert.That(tensor.is_contiguous(), "NCCL reads contiguous buffers");
        AllReduces++;
        ReducedElements += tensor.numel();
        if (otherRanks is not null) using (var others = otherRanks(tensor)) tensor.add_(others);
    }

    public void Broadcast(Tensor tensor, int root = 0)
    {
        Assert.That(root, Is.Zero);
        Assert.That(tensor.is_contiguous(), "NCCL reads contiguous buffers");
        Broadcasts++;
    }
}

/// <summary>trainer.devices=N on the CPU: the launch (the command's ranks, the refusals naming the key, every rank stopped
/// when one fails) and the bucketed gradient reducer. The trainer through a reducer: TrainingTests; through NCCL:
/// DataParallelCudaTests.</summary>
public class DataParallelTests
{
    static RunConfig Config(params string[] args) => ExperimentConfig.Parse(["experiment=tiny", .. args]).Bind();

    [Test]
    public void DevicesWithoutGpusIsAnErrorNamingTheKey()
    {
        var e = Assert.Throws<ConfigException>(() => DataParallel.LauncherFor(Config("trainer.devices=2"), null, cudaDevices: 0))!;
        Assert.That(e.Message, Does.StartWith("trainer.devices=2 ").And.Contain("no CUDA device is available").And.Contain("use trainer.devices=1"));
        e = Assert.Throws<ConfigException>(() => DataParallel.LauncherFor(Config("trainer.devices=2", "trainer.accelerator=cpu"), null, cudaDevices: 2))!;
        Assert.That(e.Message, Does.StartWith("trainer.devices=2 ").And.Contain("trainer.accelerator=cpu"));
        e = Assert.Throws<ConfigException>(() => DataParallel.LauncherFor(Config("trainer.devices=4"), null, cudaDevices: 2))!;
        Assert.That(e.Message, Does.StartWith("trainer.devices=4 ").And.Contain("2 CUDA devices are visible; use trainer.devices=2 or fewer"));
        Assert.That(DataParallel.LauncherFor(Config("trainer.devices=1"), null, cudaDevices: 0), Is.Null, "one device trains in this process");
    }

    [Test]
    public void ARankTrainsItselfAndChecksItsWorldSize()
    {
        var rank = new WorkerEnvironment(1, 1, 2, 2, null, null, "/tmp/x.id");
        Assert.That(DataParallel.LauncherFor(Config("trainer.devices=2"), rank, cudaDevices: 0), Is.Null, "a rank does not launch again");
        var e = Assert.Throws<ConfigException>(() => DataParallel.LauncherFor(Config("trainer.devices=4"), rank, cudaDevices: 4))!;
        Assert.That(e.Message, Does.StartWith("trainer.devices=4 ").And.Contain("WORLD_SIZE=2"));
        Assert.That((DataParallel.DeviceOf(rank).type, DataParallel.DeviceOf(rank).index), Is.EqualTo((DeviceType.CUDA, 1)));
        // a Trainer asked for several devices outside the launcher refuses (it would train alone)
        e = Assert.Throws<ConfigException>(() => new Trainer(ExperimentConfig.Parse(["experiment=tiny", "trainer.devices=2"]), TextWriter.Null).Run())!;
        Assert.That(e.Message, Does.StartWith("trainer.devices=2: "));
    }

    [Test]
    public void DevicesStartsOneRankEachAndStopsThemAllWhenOneFails()
    {
        var output = new StringWriter();
        var error = new StringWriter();
        var launcher = DataParallel.LauncherFor(Config("trainer.devices=3"), null, cudaDevices: 4, "/bin/sh",
            ["-c", "echo \"$RANK/$WORLD_SIZE $LOCAL_RANK $FLASHATTN_DISTRIBUTED_WORKER $FLASHATTN_RENDEZVOUS_FILE\"; " +
                   "if [ \"$RANK\" = 2 ]; then sleep 0.3; echo out of memory >&2; exit 3; fi; exec sleep 60"])!;
        var file = launcher.Options.RendezvousFile;
        Assert.That(file, Is.Not.Null.And.Not.Empty, "a fresh rendezvous file: no port to collide on one node");
        Assert.That(File.Exists(file), Is.False);
        var clock = System.Diagnostics.Stopwatch.StartNew();
        Assert.That(launcher.Run(output, error), Is.EqualTo(3), "the failing rank's exit code");
        Assert.That(clock.Elapsed, Is.LessThan(TimeSpan.FromSeconds(15)), "the other ranks were stopped, not waited for");
        var lines = output.ToString().Split('\n', StringSplitOptions.RemoveEmptyEntries).Select(l => l.TrimEnd('\r')).ToList();
        for (int r = 0; r < 3; r++) Assert.That(lines, Has.One.EqualTo($"[rank {r}] {r}/3 {r} 1 {file}"));
        Assert.That(error.ToString(), Does.Contain("[rank 2] out of memory").And.Contain("rank 2 exited with code 3"));
        Assert.That(DataParallel.LauncherFor(Config("trainer.devices=3"), null, 4, "/bin/true", [])!.Options.RendezvousFile, Is.Not.EqualTo(file));
    }

    /// <summary>The same shape, dtype and values.</summary>
    internal static bool Same(Tensor a, Tensor b) => a.shape.SequenceEqual(b.shape) && a.dtype == b.dtype && a.eq(b).all().item<bool>();

    static Parameter[] Parameters(params (long[] shape, ScalarType dtype)[] specs) =>
        [.. specs.Select(s => new Parameter(randn(s.shape).to(s.dtype)))];

    [Test]
    public void ReducerOfOneRankLeavesGradientsAsTheyAre()
    {
        var ps = Parameters(([7, 3], ScalarType.Float32), ([5], ScalarType.Float64), ([300], ScalarType.Float32), ([2, 2, 3], ScalarType.Float32));
        foreach (var p in ps.Take(3)) p.grad = randn_like(p);
        var before = ps.Take(3).Select(p => p.grad!.clone()).ToList();
        ps[3].grad = null; // a parameter the loss did not reach
        var one = new FakeCollective();
        using var reducer = new BucketedGradientReducer(one, capBytes: 256);
        reducer.AllReduce(ps);
        for (int i = 0; i < 3; i++) Assert.That(Same(ps[i].grad!, before[i]), $"parameter {i}");
        Assert.That(ps[3].grad!.eq(0).all().item<bool>(), "a missing gradient is zeros");
        Assert.That(reducer.Plan!.Count, Is.GreaterThan(2), "several buckets under the 256-byte cap");
        Assert.That(one.AllReduces, Is.EqualTo(reducer.Plan.Count));
        Assert.That(one.ReducedElements, Is.EqualTo(ps.Sum(p => p.numel())));
        reducer.AllReduce(ps);
        Assert.That(one.AllReduces, Is.EqualTo(2 * reducer.Plan.Count), "the plan and its buffers are kept");
        var parameters = ps.Select(p => p.clone()).ToList();
        reducer.Broadcast(ps);
        Assert.That(one.Broadcasts, Is.EqualTo(ps.Length));
        for (int i = 0; i < ps.Length; i++) Assert.That(Same(ps[i], parameters[i]), $"broadcast of one rank: parameter {i} unchanged");
    }

    [Test]
    public void ReducerAveragesEachGradientOverTheRanks()
    {
        // the other rank's buffer holds each element's index: bucket offsets and unpacking must give (g + index in its bucket) / 2
        var ps = Parameters(([3, 5], ScalarType.Float64), ([11], ScalarType.Float64), ([4, 1], ScalarType.Float64));
        foreach (var p in ps) p.grad = randn_like(p);
        var grads = ps.Select(p => p.grad!.clone()).ToList();
        using var reducer = new BucketedGradientReducer(new FakeCollective(0, 2, t => arange(t.numel(), dtype: t.dtype)), capBytes: 16 * 8);
        reducer.AllReduce(ps);
        foreach (var bucket in reducer.Plan!)
            for (int k = 0; k < bucket.Parameters.Length; k++)
            {
                int i = bucket.Parameters[k];
                var other = arange(bucket.Offsets[k], bucket.Offsets[k] + ps[i].numel(), dtype: ScalarType.Float64).view(ps[i].shape);
                Assert.That(ps[i].grad!.allclose((grads[i] + other) / 2, rtol: 0, atol: 1e-15), $"parameter {i}");
            }
        Assert.That(reducer.Plan.Select(b => b.Parameters.Length), Is.EqualTo(new[] { 2, 1 }), "two buckets: the 128-byte cap splits them");
    }
}
