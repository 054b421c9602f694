using FlashAttn.Models.Distributed;
using NUnit.Framework;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace FlashAttn.Tests;

/// <summary>
/// NCCL on the one GPU of the device host: a communicator of one rank, joined through a rendezvous file as a rank of
/// trainer.devices=N joins, whose collectives run on every dtype the reducer meets (with one rank they leave the values
/// as they are), and the bucketed reducer over it. The trainer through it: TrainingTests.ANcclRankOfOneTrainsAsThePlainTrainer.
/// </summary>
[Category(Gpu.Category)]
public sealed class DataParallelCudaTests
{
    [Test]
    public void OneRankCommunicatorBroadcastsAndAllReduces()
    {
        var dev = Gpu.Require();
        var file = Path.Combine(Path.GetTempPath(), $"flashattn-nccl-{Guid.NewGuid():N}.id");
        try
        {
            var id = Rendezvous.Exchange(0, 1, NcclCommunicator.CreateUniqueId, file, "127.0.0.1", 0);
            Assert.That(File.ReadAllBytes(file), Is.EqualTo(id), "rank 0 published the id");
            using var comm = NcclCommunicator.InitRank(id, 0, 1, device: 0);
            Assert.That((comm.Rank, comm.WorldSize), Is.EqualTo((0, 1)));
            foreach (var dtype in new[] { ScalarType.Float32, ScalarType.BFloat16, ScalarType.Float16, ScalarType.Float64, ScalarType.Int64 })
            {
                using var x = dtype == ScalarType.Int64 ? randint(-1000, 1000, [1001], dtype: dtype, device: dev) : randn(1001, device: dev).to(dtype);
                using var before = x.clone();
                comm.AllReduce(x);
                comm.Broadcast(x);
                comm.AllReduce(x, NcclReduction.Avg);
                cuda.synchronize();
                Assert.That(DataParallelTests.Same(x, before), $"{dtype}: one rank's collectives leave the values");
            }
            var e = Assert.Throws<ArgumentException>(() => comm.AllReduce(zeros(3)))!;
            Assert.That(e.Message, Does.Contain("CUDA tensor"));

            var ps = new[] { new Parameter(randn([37, 5], device: dev)), new Parameter(randn([300001], device: dev).to(ScalarType.BFloat16)) };
            foreach (var p in ps) p.grad = randn_like(p);
            var grads = ps.Select(p => p.grad!.clone()).ToList();
            var weights = ps.Select(p => p.detach().clone()).ToList();
            using var reducer = new BucketedGradientReducer(comm, capBytes: 64 * 1024);
            reducer.Broadcast(ps);
            reducer.AllReduce(ps);
            cuda.synchronize();
            Assert.That(reducer.Plan!.Count, Is.EqualTo(2), "a float32 and a bfloat16 bucket");
            for (int i = 0; i < ps.Length; i++)
            {
                Assert.That(DataParallelTests.Same(ps[i], weights[i]), $"parameter {i} after the broadcast");
                Assert.That(DataParallelTests.Same(ps[i].grad!, grads[i]), $"gradient {i} after the all-reduce");
            }
        }
        finally { File.Delete(file); }
    }
}
