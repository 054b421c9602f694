using System.Diagnostics;

namespace FlashAttn.Models.Distributed;

/// <summary>What a worker process learns from the launcher's environment variables.</summary>
public sealed record WorkerEnvironment(int Rank, int LocalRank, int WorldSize, int LocalWorldSize, string? MasterAddr, int? MasterPort, string? RendezvousFile)
{
    /// <summary>This process's rank when <see cref="Launcher"/> started it (FLASHATTN_DISTRIBUTED_WORKER=1: WORLD_SIZE alone may
    /// be another launcher's), else null.</summary>
    public static WorkerEnvironment? FromLauncher() =>
        Environment.GetEnvironmentVariable(Launcher.WorkerVariable) == "1" ? FromEnvironment() : null;

    /// <summary>Reads RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE and the rendezvous variables;
    /// null when this process was not started by the launcher (no WORLD_SIZE).</summary>
    public static WorkerEnvironment? FromEnvironment(Func<string, string?>? get = null)
    {
        get ??= Environment.GetEnvironmentVariable;
        var world = get(Launcher.WorldSizeVariable);
        if (string.IsNullOrEmpty(world)) return null;
        int Int(string name, string? fallback = null) =>
            int.TryParse(get(name) ?? fallback, out var v) ? v : throw new InvalidOperationException($"{name}='{get(name)}' is not an integer");
        var port = get(Launcher.MasterPortVariable);
        return new WorkerEnvironment(Int(Launcher.RankVariable), Int(Launcher.LocalRankVariable, get(Launcher.RankVariable)), Int(Launcher.WorldSizeVariable),
            Int(Launcher.LocalWorldSizeVariable, world), get(Launcher.MasterAddrVariable), string.IsNullOrEmpty(port) ? null : Int(Launcher.MasterPortVariable),
            get(Launcher.RendezvousFileVariable));
    }
}

/// <summary>How to start the workers of one node.</summary>
public sealed record LaunchOptions
{
    /// <summary>Worker processes on this node (one per GPU; rank k uses cuda:LOCAL_RANK).</summary>
    public required int ProcessesPerNode { get; init; }
    public int Nodes { get; init; } = 1;
    public int NodeRank { get; init; }
    /// <summary>Rank 0's address for the TCP rendezvous (several nodes: an address the others reach).</summary>
    public string MasterAddr { get; init; } = "127.0.0.1";
    public int MasterPort { get; init; } = 29500;
    /// <summary>When set, the NCCL id is exchanged through this file instead of TCP (one node, or a shared file system).</summary>
    public string? RendezvousFile { get; init; }
    /// <summary>After Ctrl+C, how long the workers (which got the SIGINT from the terminal too) have to exit before they are killed.</summary>
    public TimeSpan InterruptGrace { get; init; } = TimeSpan.FromSeconds(10);
}

/// <summary>
/// Starts one worker process per GPU: by default the current executable with the same
/// arguments; the environment carries RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR,
/// MASTER_PORT (or FLASHATTN_RENDEZVOUS_FILE), FLASHATTN_DISTRIBUTED_WORKER=1 (so a worker does not
/// launch again) and the three variables that keep NVLink multicast off; CUDA_VISIBLE_DEVICES is
/// inherited untouched. Each line a worker writes is prefixed with <c>[rank k]</c>. When a worker
/// exits non-zero the others are killed (process tree) and its exit code is returned; 0 when all
/// succeed. Ctrl+C: the workers share the terminal's process group and get the SIGINT themselves;
/// the launcher waits <see cref="LaunchOptions.InterruptGrace"/> and then kills what is left.
/// The command started is injectable (<c>fileName</c>, <c>arguments</c>) so tests can use a shell.
/// </summary>
public sealed class Launcher
{
    public const string RankVariable = "RANK";
    public const string LocalRankVariable = "LOCAL_RANK";
    public const string WorldSizeVariable = "WORLD_SIZE";
    public const string LocalWorldSizeVariable = "LOCAL_WORLD_SIZE";
    public const string MasterAddrVariable = "MASTER_ADDR";
    public const string MasterPortVariable = "MASTER_PORT";
    public const string RendezvousFileVariable = "FLASHATTN_RENDEZVOUS_FILE";
    public const string WorkerVariable = "FLASHATTN_DISTRIBUTED_WORKER";

    /// <summary>Set in every process started: NVLink SHARP / multicast stays off on these hosts.</summary>
    public static readonly IReadOnlyDictionary<string, string> MulticastOff = new Dictionary<string, string>
    {
        ["NCCL_NVLS_ENABLE"] = "0",
        ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] = "1",
        ["NVSHMEM_DISABLE_NVLS"] = "1",
    };

    /// <summary>Exit code returned when the launch was cancelled (Ctrl+C): 128 + SIGINT.</summary>
    public const int CancelledExitCode = 130;

    readonly LaunchOptions _options;
    readonly string _fileName;
    readonly IReadOnlyList<string> _arguments;

    /// <param name="options">Workers per node, nodes, this node's rank, the rendezvous.</param>
    /// <param name="fileName">The worker executable; default <see cref="Environment.ProcessPath"/>.</param>
    /// <param name="arguments">Its arguments; default this process's (without the executable / dll).</param>
    public Launcher(LaunchOptions options, string? fileName = null, IReadOnlyList<string>? arguments = null)
    {
        if (options.ProcessesPerNode < 1) throw new ArgumentOutOfRangeException(nameof(options), $"{options.ProcessesPerNode} processes per node");
        if (options.Nodes < 1 || options.NodeRank < 0 || options.NodeRank >= options.Nodes)
            throw new ArgumentOutOfRangeException(nameof(options), $"node rank {options.NodeRank} of {options.Nodes} nodes");
        _options = options;
        _fileName = fileName ?? Environment.ProcessPath ?? throw new InvalidOperationException("no process path to relaunch");
        _arguments = arguments ?? CurrentArguments();
    }

    public int WorldSize => _options.ProcessesPerNode * _options.Nodes;
    public LaunchOptions Options => _options;

    /// <summary>The environment worker <paramref name="localRank"/> is started with (besides the inherited one).</summary>
    public IReadOnlyDictionary<string, string> WorkerEnvironmentFor(int localRank)
    {
        var env = new Dictionary<string, string>(MulticastOff)
        {
            [RankVariable] = (_options.NodeRank * _options.ProcessesPerNode + localRank).ToString(),
            [LocalRankVariable] = localRank.ToString(),
            [WorldSizeVariable] = WorldSize.ToString(),
            [LocalWorldSizeVariable] = _options.ProcessesPerNode.ToString(),
            [MasterAddrVariable] = _options.MasterAddr,
            [MasterPortVariable] = _options.MasterPort.ToString(),
            [WorkerVariable] = "1",
        };
        if (_options.RendezvousFile != null) env[RendezvousFileVariable] = _options.RendezvousFile;
        return env;
    }

    /// <summary>Runs the workers to completion; returns 0 or the first failing worker's exit code.</summary>
    public int Run(TextWriter output, TextWriter error, CancellationToken cancel = default)
    {
        using var interrupted = new CancellationTokenSource();
        void OnCancelKey(object? sender, ConsoleCancelEventArgs e) { e.Cancel = true; interrupted.Cancel(); }
        Console.CancelKeyPress += OnCancelKey;
        var processes = new List<Process>();
        var writeLock = new object();
        try
        {
            for (int local = 0; local < _options.ProcessesPerNode; local++)
                processes.Add(Start(local, output, error, writeLock));
            var exits = processes.Select(p => p.WaitForExitAsync()).ToList();
            var remaining = exits.ToList();
            var cancelTask = Task.Delay(Timeout.Infinite, cancel);
            var interruptTask = Task.Delay(Timeout.Infinite, interrupted.Token);
            while (remaining.Count > 0)
            {
                var done = Task.WhenAny(remaining.Append(cancelTask).Append(interruptTask).ToArray()).GetAwaiter().GetResult();
                if (done == cancelTask) { KillAll(processes); return CancelledExitCode; }
                if (done == interruptTask)
                {
                    Task.WhenAll(remaining).Wait(_options.InterruptGrace);
                    KillAll(processes);
                    return CancelledExitCode;
                }
                remaining.Remove(done);
                var p = processes[exits.IndexOf(done)];
                if (p.ExitCode != 0)
                {
                    int rank = processes.IndexOf(p) + _options.NodeRank * _options.ProcessesPerNode;
                    KillAll(processes);
                    lock (writeLock) error.WriteLine($"[launcher] rank {rank} exited with code {p.ExitCode}; stopped the other ranks");
                    return p.ExitCode;
                }
            }
            return 0;
        }
        finally
        {
            Console.CancelKeyPress -= OnCancelKey;
            KillAll(processes);
            foreach (var p in processes) p.Dispose();
        }
    }

    Process Start(int localRank, TextWriter output, TextWriter error, object writeLock)
    {
        var psi = new ProcessStartInfo(_fileName)
        {
            UseShellExecute = false,
            RedirectStandardOutput = true,
            RedirectStandardError = true,
        };
        foreach (var a in _arguments) psi.ArgumentList.Add(a);
        foreach (var (k, v) in WorkerEnvironmentFor(localRank)) psi.Environment[k] = v;
        var rank = WorkerEnvironmentFor(localRank)[RankVariable];
        var prefix = $"[rank {rank}] ";
        var p = new Process { StartInfo = psi };
        p.OutputDataReceived += (_, e) => { if (e.Data != null) lock (writeLock) output.WriteLine(prefix + e.Data); };
        p.ErrorDataReceived += (_, e) => { if (e.Data != null) lock (writeLock) error.WriteLine(prefix + e.Data); };
        p.Start();
        p.BeginOutputReadLine();
        p.BeginErrorReadLine();
        return p;
    }

    static void KillAll(List<Process> processes)
    {
        foreach (var p in processes)
        {
            try { if (!p.HasExited) p.Kill(entireProcessTree: true); }
            catch (InvalidOperationException) { } // exited meanwhile
            catch (System.ComponentModel.Win32Exception) { }
        }
    }

    static string[] CurrentArguments()
    {
        var args = Environment.GetCommandLineArgs();
        // args[0] is the executable (apphost) or the entry dll; under `dotnet x.dll` ProcessPath is dotnet and the dll must stay
        var path = Environment.ProcessPath ?? "";
        bool viaDotnet = Path.GetFileNameWithoutExtension(path) == "dotnet";
        return viaDotnet ? args : args.Skip(1).ToArray();
    }
}
