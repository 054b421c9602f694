using System.Diagnostics;
using System.Net;
using System.Net.Sockets;
using FlashAttn.Models.Data;
using FlashAttn.Models.Distributed;
using NUnit.Framework;
using static TorchSharp.torch;

namespace FlashAttn.Tests;

/// <summary>Data parallel training's CPU-testable parts: the distributed sampler's
/// partition, the gradient bucket plan, the launcher (with shell workers), the NCCL id rendezvous
/// (file and loopback TCP) and the NCCL library lookup. Nothing here needs a GPU or libnccl.</summary>
public class DistributedTests
{
    string _dir = "";

    [SetUp]
    public void SetUp() => Directory.CreateDirectory(_dir = Path.Combine(Path.GetTempPath(), "flashattn-dist-" + Guid.NewGuid().ToString("N")));

    [TearDown]
    public void TearDown() { try { Directory.Delete(_dir, true); } catch { } }

    const int SeqLen = 4;

    /// <summary>Token i = i, so a sample's sequence index is row[0] / SeqLen.</summary>
    TokenArray Tokens(int sequences)
    {
        var path = Path.Combine(_dir, $"tokens{sequences}.bin");
        var tokens = Enumerable.Range(0, sequences * SeqLen + 1).Select(i => (ushort)i).ToArray();
        File.WriteAllBytes(path, tokens.SelectMany(BitConverter.GetBytes).ToArray());
        return new TokenArray(path);
    }

    // ---- sampler ----

    [Test]
    public void SamplerPartitionIsDisjointCoveringAndEqual([Values(1, 2, 3, 4, 5)] int world)
    {
        using var tokens = Tokens(23);
        var single = new LmBatchSampler(tokens, SeqLen, seed: 11);
        var ranks = Enumerable.Range(0, world).Select(r => new DistributedSampler(tokens, SeqLen, 11, r, world)).ToList();
        foreach (long epoch in new long[] { 0, 1, 7 })
        {
            var order = (long[])single.Order(epoch).Clone();
            var shares = ranks.Select(s => s.Indices(epoch)).ToList();
            long per = 23 / world;
            Assert.That(shares.Select(s => s.LongLength), Is.All.EqualTo(per), "equal counts");
            Assert.That(ranks[0].DroppedPerEpoch, Is.EqualTo(23 % world));
            var all = shares.SelectMany(s => s).ToList();
            Assert.That(all, Is.Unique, "disjoint");
            Assert.That(all, Is.EquivalentTo(order.Take((int)(per * world))), "union = the single-process order minus the dropped tail");
            for (int r = 0; r < world; r++)
                for (int i = 0; i < per; i++)
                    Assert.That(shares[r][i], Is.EqualTo(order[i * world + r]), "strided: rank r takes r, r+W, …");
        }
        Assert.That(ranks[0].Indices(0), Is.Not.EqualTo(ranks[0].Indices(1)), "reshuffled each epoch");
    }

    [Test]
    public void SamplerOfOneRankIsTheSingleProcessOrder()
    {
        using var tokens = Tokens(7);
        var single = new LmBatchSampler(tokens, SeqLen, seed: 5);
        var one = new DistributedSampler(tokens, SeqLen, 5, rank: 0, worldSize: 1);
        for (int i = 0; i < 6; i++) // 18 samples: across two epoch ends
            Assert.That(one.Next(3), Is.EqualTo(single.Next(3)), $"batch {i}");
        Assert.That(one.State, Is.EqualTo(single.State));
    }

    [Test]
    public void SamplerBatchesFollowTheShareAcrossEpochs()
    {
        using var tokens = Tokens(23);
        var s = new DistributedSampler(tokens, SeqLen, 5, rank: 1, worldSize: 3);
        Assert.That(s.NumSequences, Is.EqualTo(7));
        var expected = s.Indices(0).Concat(s.Indices(1)).Concat(s.Indices(2)).ToList();
        var got = new List<long>();
        for (int b = 0; b < 6; b++)
        {
            var batch = s.Next(3);
            Assert.That(batch, Has.Length.EqualTo(3 * (SeqLen + 1)));
            for (int i = 0; i < 3; i++)
            {
                long first = batch[i * (SeqLen + 1)];
                Assert.That(first % SeqLen, Is.Zero);
                Assert.That(batch.Skip(i * (SeqLen + 1)).Take(SeqLen + 1), Is.EqualTo(Enumerable.Range(0, SeqLen + 1).Select(k => first + k)), "a window of seqlen+1 tokens");
                got.Add(first / SeqLen);
            }
        }
        Assert.That(got, Is.EqualTo(expected.Take(18)));
        Assert.That(s.State, Is.EqualTo(new SamplerState(2, 4)));
    }

    [Test]
    public void SamplerResumesAtEveryPosition()
    {
        using var tokens = Tokens(17);
        const int world = 2, rank = 1;
        var reference = new DistributedSampler(tokens, SeqLen, 3, rank, world);
        int total = (int)(reference.NumSequences * 3 + 2); // three epochs and a bit
        var samples = Enumerable.Range(0, total).Select(_ => reference.Next(1)).ToList();
        var run = new DistributedSampler(tokens, SeqLen, 3, rank, world);
        for (int p = 0; p < total - 1; p++)
        {
            var resumed = new DistributedSampler(tokens, SeqLen, 3, rank, world) { State = run.State };
            Assert.That(resumed.Next(1), Is.EqualTo(samples[p]), $"position {p} ({run.State})");
            Assert.That(resumed.Next(1), Is.EqualTo(samples[p + 1]), $"position {p + 1} after resume");
            run.Next(1);
        }
    }

    [Test]
    public void SamplerRejectsBadRanksAndTooFewSequences()
    {
        using var tokens = Tokens(3);
        Assert.Throws<ArgumentOutOfRangeException>(() => new DistributedSampler(tokens, SeqLen, 0, 2, 2));
        Assert.Throws<ArgumentOutOfRangeException>(() => new DistributedSampler(tokens, SeqLen, 0, 0, 0));
        Assert.Throws<InvalidDataException>(() => new DistributedSampler(tokens, SeqLen, 0, 0, 4));
        Assert.That(new DistributedSampler(tokens, SeqLen, 0, 2, 3).NumSequences, Is.EqualTo(1));
    }

    // ---- bucket plan ----

    static ParameterSpec P(string name, ScalarType dtype, params long[] shape) => new(name, shape, dtype);
    const long MB = BucketPlan.MB;

    static void CheckPlanInvariants(IReadOnlyList<ParameterSpec> ps, IReadOnlyList<Bucket> plan)
    {
        Assert.That(plan.SelectMany(b => b.Parameters), Is.EquivalentTo(Enumerable.Range(0, ps.Count)), "every parameter exactly once");
        foreach (var b in plan)
        {
            Assert.That(b.Parameters.Select(i => ps[i].DType), Is.All.EqualTo(b.DType), "dtype-homogeneous");
            Assert.That(b.Parameters, Is.Ordered.Descending, "back to front within a bucket");
            long off = 0;
            for (int k = 0; k < b.Parameters.Length; k++) { Assert.That(b.Offsets[k], Is.EqualTo(off), "contiguous offsets"); off += ps[b.Parameters[k]].Numel; }
            Assert.That(b.Elements, Is.EqualTo(off));
            Assert.That(b.Bytes, Is.EqualTo(off * BucketPlan.ElementSize(b.DType)));
        }
        Assert.That(plan.Select(b => b.Parameters[0]), Is.Ordered.Descending, "buckets in the order gradients fill them");
    }

    [Test]
    public void BucketPlanGoesBackToFrontUnderTheCap()
    {
        // ten 1 MB fp32 parameters (262144 elements), cap 2.5 MB: buckets of two, last parameters first
        var ps = Enumerable.Range(0, 10).Select(i => P($"p{i}", ScalarType.Float32, 512, 512)).ToList();
        var plan = BucketPlan.Plan(ps, capBytes: 5 * MB / 2);
        CheckPlanInvariants(ps, plan);
        Assert.That(plan.Select(b => b.Parameters), Is.EqualTo(new[] { new[] { 9, 8 }, [7, 6], [5, 4], [3, 2], [1, 0] }));
        Assert.That(plan.Select(b => b.Bytes), Is.All.EqualTo(2 * MB));
        Assert.That(BucketPlan.Plan(ps, capBytes: 5 * MB / 2).Select(b => b.Parameters), Is.EqualTo(plan.Select(b => b.Parameters)), "pure");
        // a large cap: one bucket with everything, reversed
        var one = BucketPlan.Plan(ps);
        Assert.That(one, Has.Count.EqualTo(1));
        Assert.That(one[0].Parameters, Is.EqualTo(Enumerable.Range(0, 10).Reverse()));
        // exactly at the cap closes the bucket
        Assert.That(BucketPlan.Plan(ps, capBytes: 2 * MB).Select(b => b.Parameters.Length), Is.All.EqualTo(2));
    }

    [Test]
    public void BucketPlanGivesABigParameterItsOwnBucket()
    {
        var ps = new List<ParameterSpec>
        {
            P("wte", ScalarType.Float32, 50304, 768),   // ~147 MB
            P("ln.weight", ScalarType.Float32, 768),
            P("fc", ScalarType.Float32, 768, 3072),     // 9 MB
            P("fc2", ScalarType.Float32, 3072, 768),    // 9 MB
            P("head", ScalarType.Float32, 768, 12000),  // ~35 MB
            P("bias", ScalarType.Float32, 10),
        };
        var plan = BucketPlan.Plan(ps);
        CheckPlanInvariants(ps, plan);
        Assert.That(plan.Select(b => b.Parameters), Is.EqualTo(new[] { new[] { 5 }, [4], [3, 2, 1], [0] }));
        Assert.That(plan.Where(b => b.Parameters.Length > 1).Select(b => b.Bytes), Is.All.LessThanOrEqualTo(BucketPlan.DefaultCapBytes));
        // DDP's small first bucket
        var first = BucketPlan.Plan(ps, firstBucketBytes: BucketPlan.DefaultFirstBucketBytes);
        CheckPlanInvariants(ps, first);
        Assert.That(first[0].Parameters, Is.EqualTo(new[] { 5 }));
        Assert.That(first[0].Bytes, Is.LessThanOrEqualTo(BucketPlan.DefaultFirstBucketBytes));
    }

    [Test]
    public void BucketPlanSplitsByDtype()
    {
        var ps = Enumerable.Range(0, 8).Select(i => P($"p{i}", i % 2 == 0 ? ScalarType.Float32 : ScalarType.BFloat16, 256, 1024)).ToList(); // 1 MB / 0.5 MB
        var plan = BucketPlan.Plan(ps, capBytes: 2 * MB);
        CheckPlanInvariants(ps, plan);
        Assert.That(plan.Where(b => b.DType == ScalarType.Float32).Select(b => b.Parameters), Is.EqualTo(new[] { new[] { 6, 4 }, [2, 0] }));
        Assert.That(plan.Where(b => b.DType == ScalarType.BFloat16).Select(b => b.Parameters), Is.EqualTo(new[] { new[] { 7, 5, 3, 1 } }));
        Assert.That(plan.Select(b => b.Bytes), Is.All.LessThanOrEqualTo(2 * MB));
    }

    // ---- launcher ----

    static Launcher Shell(LaunchOptions o, string script) => new(o, "/bin/sh", ["-c", script]);

    [Test]
    public void LauncherGivesEachRankItsEnvironment()
    {
        var o = new LaunchOptions { ProcessesPerNode = 4, MasterPort = 29555 };
        var output = new StringWriter();
        int code = Shell(o, "echo \"$RANK $LOCAL_RANK $WORLD_SIZE $LOCAL_WORLD_SIZE $MASTER_ADDR:$MASTER_PORT $NCCL_NVLS_ENABLE $TORCH_SYMM_MEM_DISABLE_MULTICAST $NVSHMEM_DISABLE_NVLS $FLASHATTN_DISTRIBUTED_WORKER\"; echo second line")
            .Run(output, TextWriter.Null);
        Assert.That(code, Is.Zero);
        var lines = output.ToString().Split('\n', StringSplitOptions.RemoveEmptyEntries).Select(l => l.TrimEnd('\r')).ToList();
        Assert.That(lines, Has.Count.EqualTo(8));
        for (int r = 0; r < 4; r++)
        {
            Assert.That(lines, Has.One.EqualTo($"[rank {r}] {r} {r} 4 4 127.0.0.1:29555 0 1 1 1"));
            Assert.That(lines, Has.One.EqualTo($"[rank {r}] second line"));
        }
    }

    [Test]
    public void LauncherNumbersRanksAcrossNodesAndUsesTheRendezvousFile()
    {
        var l = new Launcher(new LaunchOptions { ProcessesPerNode = 2, Nodes = 2, NodeRank = 1, MasterAddr = "10.0.0.1", RendezvousFile = "/tmp/x.id" }, "/bin/true", []);
        Assert.That(l.WorldSize, Is.EqualTo(4));
        var env = l.WorkerEnvironmentFor(1);
        Assert.That(env["RANK"], Is.EqualTo("3"));
        Assert.That(env["LOCAL_RANK"], Is.EqualTo("1"));
        Assert.That(env["WORLD_SIZE"], Is.EqualTo("4"));
        Assert.That(env["FLASHATTN_RENDEZVOUS_FILE"], Is.EqualTo("/tmp/x.id"));
        Assert.That(env.ContainsKey("CUDA_VISIBLE_DEVICES"), Is.False, "left alone");
        var w = WorkerEnvironment.FromEnvironment(k => env.GetValueOrDefault(k))!;
        Assert.That(w, Is.EqualTo(new WorkerEnvironment(3, 1, 4, 2, "10.0.0.1", 29500, "/tmp/x.id")));
        Assert.That(WorkerEnvironment.FromEnvironment(_ => null), Is.Null);
        Assert.Throws<ArgumentOutOfRangeException>(() => new Launcher(new LaunchOptions { ProcessesPerNode = 2, Nodes = 2, NodeRank = 2 }, "/bin/true", []));
    }

    [Test]
    public void LauncherStopsEveryRankWhenOneFails()
    {
        var output = new StringWriter();
        var error = new StringWriter();
        var clock = Stopwatch.StartNew();
        int code = Shell(new LaunchOptions { ProcessesPerNode = 3 },
            "echo pid $$; if [ \"$RANK\" = 1 ]; then sleep 0.5; echo failing >&2; exit 7; fi; exec sleep 60").Run(output, error);
        Assert.That(code, Is.EqualTo(7));
        Assert.That(clock.Elapsed, Is.LessThan(TimeSpan.FromSeconds(15)));
        Assert.That(error.ToString(), Does.Contain("[rank 1] failing").And.Contain("rank 1 exited with code 7"));
        var pids = output.ToString().Split('\n').Where(l => l.Contains("pid ")).Select(l => int.Parse(l.Trim().Split(' ').Last())).ToList();
        Assert.That(pids, Has.Count.EqualTo(3));
        foreach (var pid in pids)
        {
            var wait = Stopwatch.StartNew();
            while (Alive(pid) && wait.Elapsed < TimeSpan.FromSeconds(5)) Thread.Sleep(20);
            Assert.That(Alive(pid), Is.False, $"pid {pid} was killed");
        }
    }

    static bool Alive(int pid)
    {
        var stat = $"/proc/{pid}/stat";
        try { return File.Exists(stat) && !File.ReadAllText(stat).Split(") ").Last().StartsWith('Z'); }
        catch (IOException) { return false; }
    }

    [Test]
    public void LauncherCancelKillsTheWorkers()
    {
        using var cts = new CancellationTokenSource(TimeSpan.FromMilliseconds(300));
        var clock = Stopwatch.StartNew();
        int code = Shell(new LaunchOptions { ProcessesPerNode = 2 }, "exec sleep 60").Run(TextWriter.Null, TextWriter.Null, cts.Token);
        Assert.That(code, Is.EqualTo(Launcher.CancelledExitCode));
        Assert.That(clock.Elapsed, Is.LessThan(TimeSpan.FromSeconds(15)));
    }

    // ---- rendezvous ----

    static byte[] NewId(int seed) => Enumerable.Range(0, Rendezvous.UniqueIdBytes).Select(i => (byte)(i * 7 + seed)).ToArray();

    static int FreePort()
    {
        var l = new TcpListener(IPAddress.Loopback, 0);
        l.Start();
        int port = ((IPEndPoint)l.LocalEndpoint).Port;
        l.Stop();
        return port;
    }

    static byte[][] FourRanks(string? file, int port)
    {
        var id = NewId(3);
        var tasks = Enumerable.Range(0, 4).Select(rank => Task.Run(() =>
        {
            if (rank == 0) Thread.Sleep(300); // the others wait for rank 0
            return Rendezvous.Exchange(rank, 4, () => id, file, "127.0.0.1", port, TimeSpan.FromSeconds(20));
        })).ToArray();
        Assert.That(Task.WaitAll(tasks, TimeSpan.FromSeconds(30)), Is.True);
        Assert.That(tasks.Select(t => t.Result), Is.All.EqualTo(id));
        return tasks.Select(t => t.Result).ToArray();
    }

    [Test]
    public void RendezvousThroughAFile()
    {
        var file = Path.Combine(_dir, "run", "nccl.id");
        FourRanks(file, 0);
        Assert.That(Directory.GetFiles(Path.Combine(_dir, "run")), Is.EqualTo(new[] { file }), "no temporary file left");
        Assert.That(File.ReadAllBytes(file), Is.EqualTo(NewId(3)));
    }

    [Test]
    public void RendezvousOverLoopbackTcp() => FourRanks(null, FreePort());

    [Test]
    public void RendezvousTimeoutsNameTheAddress()
    {
        int port = FreePort();
        var e = Assert.Throws<TimeoutException>(() => Rendezvous.Fetch("127.0.0.1", port, TimeSpan.FromMilliseconds(300)))!;
        Assert.That(e.Message, Does.Contain($"127.0.0.1:{port}"));
        var missing = Path.Combine(_dir, "never.id");
        var f = Assert.Throws<TimeoutException>(() => Rendezvous.ReadFile(missing, TimeSpan.FromMilliseconds(200)))!;
        Assert.That(f.Message, Does.Contain(missing));
        var s = Assert.Throws<TimeoutException>(() => Rendezvous.Serve("127.0.0.1", FreePort(), NewId(1), 2, TimeSpan.FromMilliseconds(300)))!;
        Assert.That(s.Message, Does.Contain("0 of 2 ranks"));
        Assert.Throws<ArgumentException>(() => Rendezvous.WriteFile(missing, new byte[5]));
    }

    // ---- NCCL library lookup (no libnccl needed) ----

    [Test]
    public void NcclLibraryCandidates()
    {
        Assert.That(NcclNative.Candidates(null, null), Is.EqualTo(new[] { "libnccl.so.2" }));
        Assert.That(NcclNative.Candidates("/opt/nccl/lib/libnccl.so.2.27", "/py/site-packages/torch/lib"), Is.EqualTo(new[] { "/opt/nccl/lib/libnccl.so.2.27" }), "explicit wins alone");
        Assert.That(NcclNative.Candidates(_dir, null), Is.EqualTo(new[] { Path.Combine(_dir, "libnccl.so.2") }), "a folder");
        var fromTorch = NcclNative.Candidates(null, "/py/site-packages/torch/lib").ToList();
        Assert.That(fromTorch[0], Is.EqualTo("/py/site-packages/nvidia/nccl/lib/libnccl.so.2"));
        Assert.That(fromTorch[^1], Is.EqualTo("libnccl.so.2"));
    }

    [Test]
    public unsafe void NcclTypesMatchTheHeader()
    {
        Assert.That(sizeof(NcclUniqueId), Is.EqualTo(128));
        var bytes = NewId(9);
        Assert.That(NcclUniqueId.From(bytes).ToArray(), Is.EqualTo(bytes));
        Assert.That((int)NcclNative.DataType(ScalarType.BFloat16), Is.EqualTo(9));
        Assert.That((int)NcclNative.DataType(ScalarType.Float32), Is.EqualTo(7));
        Assert.That((int)NcclNative.DataType(ScalarType.Float16), Is.EqualTo(6));
        Assert.Throws<NotSupportedException>(() => NcclNative.DataType(ScalarType.ComplexFloat32));
    }
}
