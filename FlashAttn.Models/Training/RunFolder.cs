namespace FlashAttn.Models.Training;

/// <summary>
/// A run's folder, <c>&lt;trainer.default_root_dir&gt;/&lt;name&gt;</c>, belongs to one run. <see cref="Check"/> refuses a start
/// where another run finished or is being written, unless the start resumes that run or trainer.overwrite=true replaces
/// it; it runs before the data and the model are prepared, so that a refused start costs nothing. <see cref="Start"/>
/// runs once the run is ready for its first step: it takes the folder's lock, checks again, removes what
/// trainer.overwrite=true replaces and what killed writers left, and writes config.yaml. Until then nothing is written
/// there: a run that fails while preparing leaves an existing folder as it was and creates none.
/// </summary>
public sealed class RunFolder : IDisposable
{
    public const string ConfigFile = "config.yaml";
    public const string MetricsFile = "metrics.jsonl";
    public const string TensorBoardDir = "tensorboard";
    public const string PlotFile = "loss_lr.png";
    public const string ModelFile = "model.safetensors";
    public const string CheckpointsDir = "checkpoints";

    /// <summary>Held open exclusively by the process writing the run: the operating system releases it when that process
    /// ends, however it ends (kill -9 included), so a lock left by a dead process is free again and a pid that a new
    /// process reuses never passes for the old writer. It names its holder (pid, host, start), for a person (`cat`) and
    /// for the next run once free: while held, .NET cannot read it.</summary>
    public const string LockFile = "run.lock";

    /// <summary>What a run writes, in the order trainer.overwrite=true lists what it removes.</summary>
    static readonly string[] s_outputs = [CheckpointsDir, MetricsFile, TensorBoardDir, PlotFile, ModelFile, ConfigFile];

    readonly FileStream _lock;

    RunFolder(FileStream held) => _lock = held;

    /// <summary>Whether <paramref name="path"/> (absolute) is <paramref name="runDir"/> or lies inside it.</summary>
    public static bool Contains(string runDir, string path)
    {
        var own = Path.GetFullPath(runDir).TrimEnd(Path.DirectorySeparatorChar);
        return path == own || path.StartsWith(own + Path.DirectorySeparatorChar, StringComparison.Ordinal);
    }

    /// <summary>Throws a <see cref="ConfigException"/> unless a run named <paramref name="runName"/> may start in
    /// <paramref name="runDir"/>: the folder is absent or holds no run, or the run continues the one there
    /// (<paramref name="resumesHere"/>), or <paramref name="overwrite"/> replaces it; and no process is writing it.</summary>
    public static void Check(string runDir, string runName, bool resumesHere, bool overwrite)
    {
        if (resumesHere && overwrite)
            throw new ConfigException($"resume continues the run in {runDir}, which trainer.overwrite=true would remove first; use one of them");
        if (!Directory.Exists(runDir)) return;
        var lockPath = Path.Combine(runDir, LockFile);
        if (File.Exists(lockPath))
        {
            try { using var probe = new FileStream(lockPath, FileMode.Open, FileAccess.ReadWrite, FileShare.None); }
            catch (IOException e) when (HeldElsewhere(e)) { throw Busy(runDir, runName); }
        }
        CheckHeld(runDir, runName, resumesHere, overwrite);
    }

    /// <summary>Takes <paramref name="runDir"/> for this process (created when missing), checks it as <see cref="Check"/> does,
    /// removes the previous run's outputs when <paramref name="overwrite"/>, and the temporary checkpoint folders of
    /// processes that have ended, then writes config.yaml. Disposing releases the folder.</summary>
    public static RunFolder Start(string runDir, string runName, bool resumesHere, bool overwrite, string configYaml, TextWriter log)
    {
        bool created = !Directory.Exists(runDir);
        Directory.CreateDirectory(runDir);
        var lockPath = Path.Combine(runDir, LockFile);
        FileStream held;
        try { held = new FileStream(lockPath, FileMode.OpenOrCreate, FileAccess.ReadWrite, FileShare.None); }
        catch (IOException e) when (HeldElsewhere(e)) { throw Busy(runDir, runName); }
        try
        {
            CheckHeld(runDir, runName, resumesHere, overwrite);
            var previous = new StreamReader(held, leaveOpen: true).ReadToEnd().Trim();
            if (previous.Length > 0) log.WriteLine($"{runDir}: the run of {previous} stopped without releasing it (killed?)");
            if (overwrite)
            {
                var removed = s_outputs.Where(o => Remove(Path.Combine(runDir, o))).ToList();
                if (removed.Count > 0) log.WriteLine($"trainer.overwrite=true: removed {string.Join(", ", removed)} of the previous run in {runDir}");
            }
            foreach (var stale in TempPaths.RemoveStale(Path.Combine(runDir, CheckpointsDir)))
                log.WriteLine($"removed {stale}, left by a process that has ended");
            held.SetLength(0);
            held.Position = 0;
            using (var w = new StreamWriter(held, leaveOpen: true))
                w.WriteLine($"process {Environment.ProcessId} on {Environment.MachineName}, started {DateTime.UtcNow:yyyy-MM-dd HH:mm:ss} UTC");
            held.Flush(flushToDisk: true);
            File.WriteAllText(Path.Combine(runDir, ConfigFile), configYaml);
            return new RunFolder(held);
        }
        catch
        {
            held.Dispose();
            if (created)
            {
                // the folder was this start's alone: leave no trace
                try { Directory.Delete(runDir, recursive: true); } catch (IOException) { }
            }
            throw;
        }
    }

    /// <summary>Releases the folder: a finished run's lock names no holder, so that the next start does not report it as
    /// interrupted. The file stays: removing it while another process opens it could leave two holders of two files.</summary>
    public void Dispose()
    {
        try { _lock.SetLength(0); }
        catch (IOException) { /* the next start then reports this run as stopped: still released */ }
        _lock.Dispose();
    }

    static void CheckHeld(string runDir, string runName, bool resumesHere, bool overwrite)
    {
        if (resumesHere || overwrite) return;
        var present = s_outputs.Where(o => Exists(Path.Combine(runDir, o))).ToList();
        if (present.Count == 0) return;
        var last = Path.Combine(runDir, CheckpointsDir, "last");
        bool finished = File.Exists(Path.Combine(runDir, ModelFile));
        var what = finished ? "a finished run"
            : File.Exists(last) ? $"an unfinished run (last checkpoint {File.ReadAllText(last).Trim()})"
            : "an unfinished run without a checkpoint to resume";
        throw new ConfigException($"{runDir} holds {what} ({string.Join(", ", present)}); a run folder belongs to one run. " +
            $"Continue that run with resume=last{(finished ? " and a larger trainer.max_steps" : "")}, start this one under another name " +
            $"(name={FreeName(runDir, runName)}), or replace it with trainer.overwrite=true, which first removes its checkpoints, metrics, " +
            "TensorBoard events, plot, model and config");
    }

    // The lock is taken: flock's EWOULDBLOCK (Linux 11, macOS 35) or Windows' sharing violation.
    static bool HeldElsewhere(IOException e) => e.HResult is 11 or 35 || e.HResult == unchecked((int)0x80070020);

    static ConfigException Busy(string runDir, string runName) =>
        new($"{runDir} is being written by another process, which holds its lock {Path.Combine(runDir, LockFile)} (the file names it); " +
            $"a run folder belongs to one run. Start this one under another name (name={FreeName(runDir, runName)}), or stop that " +
            "process or let it finish, then continue its run with resume=last or replace it with trainer.overwrite=true");

    // <name>-2, -3, ...: the first that is not a folder yet
    static string FreeName(string runDir, string runName)
    {
        var parent = Path.GetDirectoryName(Path.GetFullPath(runDir))!;
        for (int i = 2; ; i++)
            if (!Exists(Path.Combine(parent, $"{runName}-{i}"))) return $"{runName}-{i}";
    }

    static bool Exists(string path) => File.Exists(path) || Directory.Exists(path);

    static bool Remove(string path)
    {
        if (Directory.Exists(path)) { Directory.Delete(path, recursive: true); return true; }
        if (File.Exists(path)) { File.Delete(path); return true; }
        return false;
    }
}
