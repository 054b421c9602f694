using System.Diagnostics;
using System.Text;
using System.Text.Json.Nodes;
using FlashAttn.Cli;
using FlashAttn.Models.Data;
using FlashAttn.Models.Training;
using NUnit.Framework;

namespace FlashAttn.Tests;

/// <summary>A run folder belongs to one run (a finished one, one being written by a live process, one killed), and what
/// killed writers leave (kill -9 of a real `flashattn` process) is removed by the next run or prepare.</summary>
[NonParallelizable]
public class RunFolderTests
{
    string _root = "";
    string Runs => Path.Combine(_root, "runs");
    string Data => Path.Combine(_root, "data");

    [SetUp]
    public void SetUp() => _root = Directory.CreateTempSubdirectory("flashattn-runfolder-").FullName;

    [TearDown]
    public void TearDown() { try { Directory.Delete(_root, true); } catch { } }

    string Corpus()
    {
        var path = Path.Combine(_root, "small.jsonl");
        if (!File.Exists(path))
            File.WriteAllLines(path, CorpusReader.ReadDocuments(["embedded:kjv"]).Take(40).Select(t => new JsonObject { ["text"] = t }.ToJsonString()));
        return path;
    }

    /// <summary>A GPT of one layer, three steps on the CPU, evaluated at the end only.</summary>
    string[] Run(string name, params string[] extra) =>
    [
        "experiment=tiny", $"name={name}", $"trainer.default_root_dir={Runs}", $"datamodule.data_dir={Data}", "datamodule.dataset=small",
        $"datamodule.sources={Corpus()}", "datamodule.val_ratio=0.1", "model.config.n_layer=1", "model.config.n_embd=32", "model.config.n_head=2",
        "datamodule.max_length=16", "datamodule.batch_size=2", "train.global_batch_size=2", "train.scheduler.warmup_steps=1", "trainer.max_steps=3",
        "trainer.val_check_interval=0", "trainer.limit_val_batches=1", "trainer.progress_bar=false", "trainer.tensorboard=false", "trainer.plot=false",
        "trainer.accelerator=cpu", .. extra,
    ];

    static TrainResult Train(string[] args, TextWriter? log = null) => new Trainer(ExperimentConfig.Parse(args), log ?? TextWriter.Null).Run();

    [Test]
    public void AFinishedRunIsContinuedReplacedOrLeftAlone()
    {
        var first = Train(Run("rt", "trainer.max_steps=6", "trainer.checkpoint_every_n_steps=3", "trainer.tensorboard=true"));
        var dir = first.RunDir;
        var ckpts = Path.Combine(dir, "checkpoints");
        var before = Snapshot(dir);
        var oldEvents = Directory.GetFiles(Path.Combine(dir, "tensorboard"), "*", SearchOption.AllDirectories);

        // the same name again, through the command line: an error with the three ways out, and the folder as it was
        var (rc, _, err) = Cli(["train", .. Run("rt")]);
        Assert.That(rc, Is.EqualTo(2), err);
        Assert.That(err, Does.StartWith($"error: {dir} holds a finished run").And.Contain("resume=last").And.Contain("name=rt-2")
            .And.Contain("trainer.overwrite=true"));
        Assert.That(Snapshot(dir), Is.EqualTo(before));

        // a start that fails before its first step (a missing data source) writes nothing, even one that would replace the run
        Assert.Throws<FileNotFoundException>(() => Train(Run("rt", "trainer.overwrite=true", "datamodule.dataset=nope",
            $"datamodule.sources={Path.Combine(_root, "missing.txt")}")));
        Assert.That(Snapshot(dir), Is.EqualTo(before), "config.yaml and every other file unchanged");
        Assert.Throws<FileNotFoundException>(() => Train(Run("fresh", "datamodule.dataset=nope", $"datamodule.sources={Path.Combine(_root, "missing.txt")}")));
        Assert.That(Directory.Exists(Path.Combine(Runs, "fresh")), Is.False, "no folder holding only a config");

        // replaced: the old run's files go first
        var log = new StringWriter();
        Train(Run("rt", "trainer.overwrite=true", "trainer.tensorboard=true"), log);
        Assert.That(log.ToString(), Does.Contain($"trainer.overwrite=true: removed checkpoints, metrics.jsonl, tensorboard, model.safetensors, config.yaml of the previous run in {dir}"));
        Assert.That(Directory.GetDirectories(ckpts).Select(Path.GetFileName), Is.EquivalentTo(new[] { "step-0000003", "best-step-0000003" }));
        Assert.That(File.ReadAllText(Path.Combine(ckpts, "last")).Trim(), Is.EqualTo("step-0000003"));
        var steps = File.ReadLines(Path.Combine(dir, "metrics.jsonl")).Select(l => JsonNode.Parse(l)!["step"]!.GetValue<long>()).ToList();
        Assert.That(steps, Is.EqualTo(new long[] { 1, 2, 3, 3 }), "three steps and one evaluation: nothing of the old run");
        var events = Directory.GetFiles(Path.Combine(dir, "tensorboard"), "*", SearchOption.AllDirectories);
        Assert.That(events, Has.Length.EqualTo(1).And.None.AnyOf(oldEvents), "the new run's TensorBoard events alone");
        Assert.That(File.ReadAllText(Path.Combine(dir, "config.yaml")), Does.Contain("trainer.max_steps: 3"));

        // continued: resume=last, and text from its last checkpoint
        Assert.That(Train(Run("rt", "resume=last", "trainer.max_steps=4")).Steps, Is.EqualTo(1));
        (rc, var o, err) = Cli("sample", Path.Combine(ckpts, "last"), "--prompt", "In the", "--num-samples", "1", "--max-new-tokens", "3", "--device", "cpu");
        Assert.That(rc, Is.EqualTo(0), err);
        Assert.That(o, Does.StartWith("In the"));
        Assert.That(Assert.Throws<ConfigException>(() => Train(Run("rt", "resume=last", "trainer.overwrite=true")))!.Message,
            Does.Contain("trainer.overwrite=true would remove first"));
    }

    [Test]
    public void ARunBeingWrittenIsRefusedUntilItsProcessIsKilled()
    {
        var cli = CliExecutable();
        TokenCache.Prepare(Data, "small", [Corpus()], new PrepareOptions { ValRatio = 0.1, Progress = false }, TextWriter.Null);
        var dir = Path.Combine(Runs, "live");
        var ckpts = Path.Combine(dir, "checkpoints");
        var last = Path.Combine(ckpts, "last");
        using var child = StartChild(cli, ["train", .. Run("live", "trainer.max_steps=1000000", "trainer.checkpoint_every_n_steps=50", "trainer.num_threads=1")],
            out var output);
        using var sleeper = Process.Start("sleep", "600");
        try
        {
            WaitFor(() => File.Exists(last), child, output);
            // while it trains, nothing may start there: not a new run, not a replacement, not a second resume
            foreach (var extra in new[] { Array.Empty<string>(), ["trainer.overwrite=true"], ["resume=last"] })
                Assert.That(Assert.Throws<ConfigException>(() => Train(Run("live", extra)))!.Message,
                    Does.StartWith($"{dir} is being written by another process").And.Contain("name=live-2"), string.Join(" ", extra));

            child.Kill(); // SIGKILL: no clean-up runs in the child
            child.WaitForExit();
            Assert.That(File.ReadAllText(Path.Combine(dir, "run.lock")), Does.Contain($"process {child.Id} on "), "the lock names its holder");
            // what a kill during a checkpoint write leaves (named by the dead process), and a temporary folder of a live one
            var dead = Path.Combine(ckpts, $".step-0999999.tmp-{child.Id}-{Guid.NewGuid():N}");
            Directory.CreateDirectory(dead);
            File.WriteAllBytes(Path.Combine(dead, "state.bin"), new byte[16]);
            var live = Path.Combine(ckpts, $".step-0999998.tmp-{sleeper.Id}-{Guid.NewGuid():N}");
            Directory.CreateDirectory(live);

            // killed, it is an unfinished run: resumed, not started over
            Assert.That(Assert.Throws<ConfigException>(() => Train(Run("live")))!.Message,
                Does.StartWith($"{dir} holds an unfinished run (last checkpoint step-").And.Contain("resume=last"));
            Assert.That(Directory.Exists(dead), "a refused start removes nothing");
            long lastStep = long.Parse(File.ReadAllText(last).Trim()["step-".Length..]);
            var log = new StringWriter();
            var resumed = Train(Run("live", "resume=last", $"trainer.max_steps={lastStep + 1}", "trainer.checkpoint_every_n_steps=50"), log);
            Assert.That(resumed.Steps, Is.EqualTo(1), log.ToString());
            Assert.That(log.ToString(), Does.Contain($"the run of process {child.Id} on ").And.Contain("stopped without releasing it")
                .And.Contain($"removed {dead}, left by a process that has ended"));
            Assert.That(Directory.Exists(dead), Is.False);
            Assert.That(Directory.Exists(live), "never a running process's");
            Assert.That(File.ReadAllText(last).Trim(), Is.EqualTo($"step-{lastStep + 1:D7}"));
            // released at the end: the next start sees a finished run, not one being written
            Assert.That(Assert.Throws<ConfigException>(() => Train(Run("live")))!.Message, Does.StartWith($"{dir} holds a finished run"));
        }
        finally
        {
            if (!child.HasExited) child.Kill();
            sleeper?.Kill();
        }
    }

    [Test]
    public void AKilledPrepareLeavesAFolderThatTheNextPrepareRemoves()
    {
        var cli = CliExecutable();
        using var child = StartChild(cli, ["prepare", "kjv", "embedded:kjv", "--data-dir", Data, "--no-progress", "--threads", "1"], out var output);
        using var sleeper = Process.Start("sleep", "600");
        try
        {
            string? tmp = null;
            WaitFor(() => (tmp = Directory.Exists(Data) ? Directory.GetDirectories(Data, $".kjv.tmp-{child.Id}-*").FirstOrDefault() : null) is not null,
                child, output);
            child.Kill();
            child.WaitForExit();
            Assert.That(Directory.Exists(tmp) && !TokenCache.IsComplete(Path.Combine(Data, "kjv")), "killed while writing: " + output);
            var live = Path.Combine(Data, $".kjv.tmp-{sleeper.Id}-{Guid.NewGuid():N}");
            var otherCache = Path.Combine(Data, $".other.tmp-{child.Id}-{Guid.NewGuid():N}");
            Directory.CreateDirectory(live);
            Directory.CreateDirectory(otherCache);

            var log = new StringWriter();
            TokenCache.Prepare(Data, "kjv", [Corpus()], new PrepareOptions { ValRatio = 0.1, Progress = false }, log);
            Assert.That(log.ToString(), Does.Contain($"removed {tmp}, left by a prepare that was killed"));
            Assert.That(Directory.Exists(tmp), Is.False);
            Assert.That(Directory.Exists(live), "never a running process's");
            Assert.That(Directory.Exists(otherCache), "another cache's is left to its own prepare (a data folder may be shared by hosts)");
            Assert.That(TokenCache.IsComplete(Path.Combine(Data, "kjv")));
        }
        finally
        {
            if (!child.HasExited) child.Kill();
            sleeper?.Kill();
        }
    }

    /// <summary>Every file under <paramref name="dir"/> with its size and last write time.</summary>
    static List<string> Snapshot(string dir) =>
        Directory.GetFiles(dir, "*", SearchOption.AllDirectories).Order(StringComparer.Ordinal)
            .Select(f => $"{Path.GetRelativePath(dir, f)} {new FileInfo(f).Length} {File.GetLastWriteTimeUtc(f):O}").ToList();

    static (int rc, string stdout, string stderr) Cli(params string[] args)
    {
        var o = new StringWriter(); var e = new StringWriter();
        return (CliApp.Run(args, o, e), o.ToString(), e.ToString());
    }

    /// <summary>The `flashattn` executable published beside the tests (the build copies it here; the device's published
    /// folder holds it too).</summary>
    static string CliExecutable()
    {
        if (!OperatingSystem.IsLinux()) Assert.Ignore("kills a child process with SIGKILL and names temporary folders by Linux pids");
        var path = Path.Combine(AppContext.BaseDirectory, "flashattn");
        if (!File.Exists(path)) Assert.Ignore($"no flashattn executable beside the tests ({path})");
        return path;
    }

    static Process StartChild(string exe, IEnumerable<string> args, out StringBuilder output)
    {
        var psi = new ProcessStartInfo(exe) { RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false };
        foreach (var a in args) psi.ArgumentList.Add(a);
        var p = Process.Start(psi)!;
        var text = output = new StringBuilder();
        p.OutputDataReceived += (_, e) => { lock (text) text.AppendLine(e.Data); };
        p.ErrorDataReceived += (_, e) => { lock (text) text.AppendLine(e.Data); };
        p.BeginOutputReadLine();
        p.BeginErrorReadLine();
        return p;
    }

    static void WaitFor(Func<bool> condition, Process child, StringBuilder output)
    {
        var sw = Stopwatch.StartNew();
        while (!condition())
        {
            if (child.HasExited) Assert.Fail($"the child exited ({child.ExitCode}) first:\n{output}");
            if (sw.Elapsed > TimeSpan.FromMinutes(3)) Assert.Fail($"timed out:\n{output}");
            Thread.Sleep(5);
        }
    }
}
