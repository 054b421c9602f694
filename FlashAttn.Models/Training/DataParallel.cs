using FlashAttn.Models.Distributed;
using TorchSharp;
using static TorchSharp.torch;

namespace FlashAttn.Models.Training;

/// <summary>Which rank of how many trains here: the shard of every global batch this process takes.</summary>
public sealed record DataShard(int Rank, int WorldSize)
{
    public static readonly DataShard Single = new(0, 1);
}

/// <summary>
/// trainer.devices=N as torchrun and Lightning's DDP strategy do it: the command started once starts N copies of itself
/// through <see cref="Launcher"/> (<see cref="LauncherFor"/>), each a rank with RANK, WORLD_SIZE, LOCAL_RANK and a fresh
/// rendezvous file in its environment; a rank trains on cuda:LOCAL_RANK with its shard of the data and a
/// <see cref="BucketedGradientReducer"/> over NCCL (<see cref="Join"/>).
/// </summary>
public static class DataParallel
{
    /// <summary>The launcher this process must run instead of training, or null when it trains itself (trainer.devices=1,
    /// or it is a rank). <paramref name="cudaDevices"/>: the GPUs this process sees; <paramref name="fileName"/> and
    /// <paramref name="arguments"/>: the command each rank runs (default: this one).</summary>
    public static Launcher? LauncherFor(RunConfig c, WorkerEnvironment? worker, int cudaDevices, string? fileName = null, IReadOnlyList<string>? arguments = null)
    {
        int n = c.Trainer.Devices;
        if (worker is not null) { CheckRank(c, worker); return null; }
        if (n == 1) return null;
        if (c.Trainer.Accelerator == Accelerator.Cpu || cudaDevices == 0)
            throw new ConfigException($"trainer.devices={n} trains on {n} GPUs (one process each, NCCL between them), but " +
                (c.Trainer.Accelerator == Accelerator.Cpu ? "trainer.accelerator=cpu" : "no CUDA device is available") + "; use trainer.devices=1");
        if (cudaDevices < n)
            throw new ConfigException($"trainer.devices={n} trains on {n} GPUs (one process each, NCCL between them), but " +
                $"{cudaDevices} CUDA device{(cudaDevices == 1 ? " is" : "s are")} visible; use trainer.devices=" +
                (cudaDevices == 1 ? "1" : $"{cudaDevices} or fewer"));
        if (c.Task != TaskKind.LanguageModeling)
            throw new ConfigException($"trainer.devices={n}: data parallel training shards the token stream of task=lm; task=image_classification trains on one device");
        var rendezvous = Path.Combine(Path.GetTempPath(), $"flashattn-rendezvous-{Environment.ProcessId}-{Guid.NewGuid():N}.id");
        return new Launcher(new LaunchOptions { ProcessesPerNode = n, RendezvousFile = rendezvous }, fileName, arguments);
    }

    /// <summary>A rank belongs to a launch of trainer.devices ranks.</summary>
    public static void CheckRank(RunConfig c, WorkerEnvironment worker)
    {
        if (worker.WorldSize != c.Trainer.Devices)
            throw new ConfigException($"trainer.devices={c.Trainer.Devices} but this rank was started with {Launcher.WorldSizeVariable}={worker.WorldSize}");
    }

    /// <summary>This rank's device: cuda:LOCAL_RANK.</summary>
    public static Device DeviceOf(WorkerEnvironment worker) => new(DeviceType.CUDA, worker.LocalRank);

    /// <summary>Joins the ranks' NCCL communicator (the id from rank 0 through the rendezvous of the environment) and returns
    /// the reducer over it, which owns it.</summary>
    public static IGradientReducer Join(WorkerEnvironment worker)
    {
        var id = Rendezvous.Exchange(worker.Rank, worker.WorldSize, NcclCommunicator.CreateUniqueId, worker.RendezvousFile,
            worker.MasterAddr ?? "127.0.0.1", worker.MasterPort ?? 29500);
        var comm = NcclCommunicator.InitRank(id, worker.Rank, worker.WorldSize, worker.LocalRank);
        return new BucketedGradientReducer(comm, comm);
    }
}
