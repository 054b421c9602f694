using FlashAttn.Cli;
using FlashAttn.Models.Training;
using NUnit.Framework;

namespace FlashAttn.Tests;

/// <summary>The `flashattn` command line: dotted overrides as flash-attention's Hydra, errors that name the
/// wrong key or value and list the valid ones, the experiment files' numbers, batch arithmetic.</summary>
public class CliTests
{
    [Test]
    public void HydraStyleOverridesApply()
    {
        var c = ExperimentConfig.Parse(["experiment=owt/gpt2m-flash", "trainer.precision=bf16", "datamodule.batch_size=8", "trainer.devices=1"]).Bind();
        Assert.That(c.Experiment, Is.EqualTo("owt/gpt2m-flash"));
        Assert.That(c.Model.Name, Is.EqualTo("gpt2m"));
        Assert.That(c.Trainer.Precision, Is.EqualTo(Precision.Bf16));
        Assert.That(c.Data.BatchSize, Is.EqualTo(8));
        Assert.That(c.Trainer.Devices, Is.EqualTo(1));
        Assert.That(c.GlobalBatchSize, Is.EqualTo(512), "the global batch is fixed by the experiment");
        Assert.That(c.Accumulation, Is.EqualTo(64));
        Assert.That(c.Optimizer.Lr, Is.EqualTo(1.5e-4));
        // precision aliases, order independence, Hydra's '+' prefix
        var d = ExperimentConfig.Parse(["trainer.precision=16-mixed", "+trainer.max_steps=7", "experiment=tiny"]).Bind();
        Assert.That(d.Trainer.Precision, Is.EqualTo(Precision.Fp16));
        Assert.That(d.Trainer.MaxSteps, Is.EqualTo(7));
        Assert.That(ExperimentConfig.Parse([]).Bind().Experiment, Is.EqualTo("tiny"));
    }

    [Test]
    public void WrongKeyOrValueNamesItAndListsValidOnes()
    {
        var e = Assert.Throws<ConfigException>(() => ExperimentConfig.Parse(["trainer.precison=bf16"]))!;
        Assert.That(e.Message, Does.Contain("trainer.precison").And.Contain("did you mean").And.Contain("trainer.precision").And.Contain("datamodule.batch_size"));
        e = Assert.Throws<ConfigException>(() => ExperimentConfig.Parse(["trainer.precision=fp8"]))!;
        Assert.That(e.Message, Does.Contain("trainer.precision=fp8").And.Contain("32, bf16, 16"));
        e = Assert.Throws<ConfigException>(() => ExperimentConfig.Parse(["datamodule.batch_size=eight"]))!;
        Assert.That(e.Message, Does.Contain("datamodule.batch_size=eight").And.Contain("not an integer"));
        e = Assert.Throws<ConfigException>(() => ExperimentConfig.Parse(["experiment=owt/gpt2q-flash"]))!;
        Assert.That(e.Message, Does.Contain("owt/gpt2q-flash").And.Contain("owt/gpt2s-flash").And.Contain("pile/gpt3xl-flash"));
        e = Assert.Throws<ConfigException>(() => ExperimentConfig.Parse(["trainer.devices"]))!;
        Assert.That(e.Message, Does.Contain("key=value"));
        e = Assert.Throws<ConfigException>(() => ExperimentConfig.Parse(["model.name=gpt5"]))!;
        Assert.That(e.Message, Does.Contain("gpt2s").And.Contain("tiny"));
    }

    /// <summary>Every key reaches the typed configuration: a value other than the default changes what Bind returns.</summary>
    [Test]
    public void EveryKeyHasATypedHome()
    {
        var defaults = ExperimentConfig.Parse([]);
        var bound = defaults.Bind();
        Assert.Multiple(() =>
        {
            foreach (var key in ExperimentConfig.Schema)
            {
                if (key.Choices is [_]) continue; // a choice of one (datamodule.tokenizer) has no other value
                string? now = defaults[key.Name];
                string other = key.Name switch
                {
                    "experiment" => "owt/gpt2s-flash",
                    "model.name" => "gpt2s",
                    "task" => "image_classification",
                    _ => key.Type switch
                    {
                        ConfigType.Int => now is null ? "3" : (long.Parse(now) + 1).ToString(),
                        ConfigType.Float => now is null ? "0.25" : (double.Parse(now, System.Globalization.CultureInfo.InvariantCulture) * 0.5 + 0.125)
                            .ToString("R", System.Globalization.CultureInfo.InvariantCulture),
                        ConfigType.Bool => now == "true" ? "false" : "true",
                        ConfigType.Choice => key.Choices!.First(c => c != now),
                        _ => "other",
                    },
                };
                // another task needs one of its models; its Model is then set back, so that only Task can differ
                var changed = key.Name == "task"
                    ? ExperimentConfig.Parse(["task=image_classification", "model.name=vit-ti16"]).Bind() with { Model = bound.Model }
                    : ExperimentConfig.Parse([$"{key.Name}={other}"]).Bind();
                Assert.That(changed, Is.Not.EqualTo(bound), $"{key.Name}={other} changes nothing in RunConfig");
            }
        });
    }

    [Test]
    public void BindingErrorsNameTheKeyAndTheValidValues()
    {
        var e = Assert.Throws<ConfigException>(() => ExperimentConfig.Parse(["model.name=vit-ti16"]).Bind())!;
        Assert.That(e.Message, Does.Contain("model.name=vit-ti16").And.Contain("task=lm").And.Contain("gpt2s").And.Not.Contain("vit-s16"));
        e = Assert.Throws<ConfigException>(() => ExperimentConfig.Parse(["task=image_classification"]).Bind())!;
        Assert.That(e.Message, Does.Contain("model.name=tiny").And.Contain("vit-ti16"));
        e = Assert.Throws<ConfigException>(() => ExperimentConfig.Parse(["datamodule.batch_size=1e12"]).Bind())!;
        Assert.That(e.Message, Does.Contain("datamodule.batch_size=1000000000000 is out of range"));
        e = Assert.Throws<ConfigException>(() => ExperimentConfig.Parse(["trainer.accelerator=tpu"]))!;
        Assert.That(e.Message, Does.Contain("trainer.accelerator=tpu").And.Contain("auto, cpu, cuda"));
        e = Assert.Throws<ConfigException>(() => ExperimentConfig.Parse(["train.scheduler.name=step"]))!;
        Assert.That(e.Message, Does.Contain("train.scheduler.name=step").And.Contain("linear, cosine, constant"));
        e = Assert.Throws<ConfigException>(() => ExperimentConfig.Parse(["trainer.max_step=5"]))!;
        Assert.That(e.Message, Does.Contain("unknown key 'trainer.max_step'").And.Contain("trainer.max_steps"));
    }

    /// <summary>`--help` of every command works; the keys show the chosen experiment's values (the default experiment's
    /// when none is chosen), with the overrides given.</summary>
    [Test]
    public void HelpShowsTheChosenExperimentsValues()
    {
        string Value(string help, string key) => help.Split('\n').Single(l => l.TrimStart().StartsWith(key + " ")).Trim().Split(' ', StringSplitOptions.RemoveEmptyEntries)[1];
        var (rc, o, _) = Cli("--help");
        Assert.That(rc, Is.EqualTo(0));
        Assert.That(Value(o, "trainer.max_steps"), Is.EqualTo("250"), "tiny, the default experiment, runs 250 steps");
        (rc, o, _) = Cli("train", "--help");
        Assert.That((rc, Value(o, "trainer.max_steps"), Value(o, "datamodule.max_length")), Is.EqualTo((0, "250", "64")));
        (rc, o, _) = Cli("train", "experiment=owt/gpt2s-flash", "--help", "trainer.max_steps=7");
        Assert.That((rc, Value(o, "trainer.max_steps"), Value(o, "datamodule.max_length"), Value(o, "model.name")), Is.EqualTo((0, "7", "1024", "gpt2s")));
        Assert.That(o, Does.Contain("experiment owt/gpt2s-flash"));
        (rc, o, _) = Cli("show", "--help", "experiment=pile/gpt3s-flash");
        Assert.That((rc, Value(o, "trainer.precision")), Is.EqualTo((0, "bf16")));
        Assert.That(o, Does.StartWith("usage: flashattn show"));
        (rc, o, _) = Cli("prepare", "--help");
        Assert.That(rc, Is.EqualTo(0));
        Assert.That(o, Does.StartWith("usage: flashattn prepare").And.Contain("--val-ratio"));
        (rc, o, _) = Cli("sample", "--help");
        Assert.That((rc, o.StartsWith("usage: flashattn sample")), Is.EqualTo((0, true)));
        (rc, o, _) = Cli("export", "-h");
        Assert.That((rc, o.StartsWith("usage: flashattn export")), Is.EqualTo((0, true)));
    }

    /// <summary>The command a finished run suggests is one the user has: `dotnet run --project ...` from a build of the
    /// project (README's way), `flashattn` from the installed tool.</summary>
    [Test]
    public void SuggestedCommandIsTheOneTheUserRan()
    {
        var root = Directory.CreateTempSubdirectory("flashattn-self-").FullName;
        try
        {
            var project = Path.Combine(root, "repo", "FlashAttn.Cli");
            var output = Path.Combine(project, "bin", "Release", "net10.0");
            Directory.CreateDirectory(output);
            File.WriteAllText(Path.Combine(project, "FlashAttn.Cli.csproj"), "<Project />");
            Assert.That(CliApp.SelfCommand(output + "/", Path.Combine(root, "repo")), Is.EqualTo("dotnet run --project FlashAttn.Cli -c Release --"));
            Assert.That(CliApp.SelfCommand(output, project), Is.EqualTo("dotnet run --project . -c Release --"));
            var tool = Path.Combine(root, "tools", ".store", "flashattn.cli", "0.1.0", "flashattn.cli", "0.1.0", "tools", "net10.0", "any");
            Directory.CreateDirectory(tool);
            Assert.That(CliApp.SelfCommand(tool, root), Is.EqualTo("flashattn"));
        }
        finally { Directory.Delete(root, true); }
    }

    [Test]
    public void CommandLineExitCodesAndMessages()
    {
        var (rc, o, err) = Cli("train", "trainer.precision=fp8");
        Assert.That(rc, Is.EqualTo(2));
        Assert.That(err, Does.Contain("valid values: 32, bf16, 16"));
        (rc, o, _) = Cli("--help");
        Assert.That(rc, Is.EqualTo(0));
        Assert.That(o, Does.Contain("flashattn train").And.Contain("trainer.precision").And.Contain("owt/gpt2s-flash"));
        (rc, _, err) = Cli("train", "experiment=owt/gpt2s-flash", "trainer.devices=8");
        Assert.That(rc, Is.EqualTo(2));
        Assert.That(err, Does.Contain("trainer.devices=8 trains on 8 GPUs").And.Contain("use trainer.devices=1").And.Not.Match("issue [0-9]"));
        (rc, _, err) = Cli("frobnicate");
        Assert.That(rc, Is.EqualTo(2));
        Assert.That(err, Does.Contain("train, prepare"));
        (rc, _, _) = Cli("prepare", "onlyname");
        Assert.That(rc, Is.EqualTo(2));
        (rc, o, _) = Cli("show", "experiment=pile/gpt3xl-flash", "datamodule.batch_size=8", "trainer.devices=8");
        Assert.That(rc, Is.EqualTo(0));
        Assert.That(o, Does.Contain("# gradient accumulation: 8"));
    }

    [Test]
    public void PrepareThenTrainThroughTheCommandLine()
    {
        var root = Path.Combine(Path.GetTempPath(), "flashattn-cli-" + Guid.NewGuid().ToString("N"));
        try
        {
            Directory.CreateDirectory(Path.Combine(root, "in"));
            File.WriteAllLines(Path.Combine(root, "in", "docs.jsonl"), Enumerable.Range(0, 60).Select(i =>
                System.Text.Json.JsonSerializer.Serialize(new { text = $"Document {i}. The quick brown fox jumps over the lazy dog {i % 7} times." })));
            var data = Path.Combine(root, "data");
            var (rc, o, err) = Cli("prepare", "docs", Path.Combine(root, "in"), "--data-dir", data, "--val-ratio", "0.2", "--no-progress");
            Assert.That(rc, Is.EqualTo(0), err);
            Assert.That(o, Does.Contain("60 documents"));
            (rc, o, err) = Cli("train", $"datamodule.data_dir={data}", "datamodule.dataset=docs", "model.config.n_layer=1", "model.config.n_embd=32",
                "model.config.n_head=2", "datamodule.max_length=16", "datamodule.batch_size=4", "train.global_batch_size=4", "trainer.max_steps=3",
                "trainer.limit_val_batches=1", $"trainer.default_root_dir={Path.Combine(root, "runs")}", "trainer.plot=false", "trainer.tensorboard=false");
            Assert.That(rc, Is.EqualTo(0), err);
            Assert.That(o, Does.StartWith("run ").And.Contain("loss"));
            Assert.That(err, Does.Contain("step 3/3").And.Contain("tok/s").And.Contain("ETA"));
            // a missing cache with a missing source is an error that says what to do
            (rc, _, err) = Cli("train", $"datamodule.data_dir={data}", "datamodule.dataset=nothing", "datamodule.sources=raw-nothing");
            Assert.That(rc, Is.EqualTo(1));
            Assert.That(err, Does.Contain("flashattn prepare nothing"));
        }
        finally { try { Directory.Delete(root, true); } catch { } }
    }

    static (int rc, string stdout, string stderr) Cli(params string[] args)
    {
        var o = new StringWriter(); var e = new StringWriter();
        return (CliApp.Run(args, o, e), o.ToString(), e.ToString());
    }

    [TestCase(512, 8, 64, 1)] // gpt2s/m at 80 GB
    [TestCase(512, 8, 32, 2)] // gpt2l
    [TestCase(512, 8, 16, 4)] // gpt2xl
    [TestCase(256, 8, 32, 1)] // gpt3s/m
    [TestCase(256, 8, 16, 2)] // gpt3l
    [TestCase(512, 8, 8, 8)]  // gpt3xl
    [TestCase(512, 8, 4, 16)] // gpt3-2.7B
    [TestCase(512, 1, 64, 8)]
    [TestCase(512, 1, 8, 64)]
    [TestCase(10, 1, 3, 4)]   // rounded up
    [TestCase(8, 4, 16, 1)]
    public void GradientAccumulation(long global, long devices, long batch, int expected) =>
        Assert.That(ExperimentConfig.GradientAccumulation(global, devices, batch), Is.EqualTo(expected));

    /// <summary>The experiment files carry the numbers of flash-attention's training experiments (configs/README.md).</summary>
    [TestCase("owt/gpt2s-flash", "gpt2s", 512, 64, 6e-4, 4000, "linear", 400000, 400000, "16", 1024, 1000)]
    [TestCase("owt/gpt2m-flash", "gpt2m", 512, 64, 1.5e-4, 4000, "linear", 400000, 400000, "16", 1024, 1000)]
    [TestCase("owt/gpt2l-flash", "gpt2l", 512, 32, 1.5e-4, 4000, "linear", 400000, 400000, "16", 1024, 1000)]
    [TestCase("owt/gpt2xl-flash", "gpt2xl", 512, 16, 1.5e-4, 4000, "linear", 400000, 400000, "16", 1024, 1000)]
    [TestCase("pile/gpt3s-flash", "gpt3s", 256, 32, 6e-4, 8000, "cosine", 600000, 800000, "bf16", 2048, 2000)]
    [TestCase("pile/gpt3m-flash", "gpt3m", 256, 32, 3e-4, 8000, "cosine", 600000, 800000, "bf16", 2048, 2000)]
    [TestCase("pile/gpt3l-flash", "gpt3l", 256, 16, 2.5e-4, 8000, "cosine", 600000, 800000, "bf16", 2048, 2000)]
    [TestCase("pile/gpt3xl-flash", "gpt3xl", 512, 8, 2e-4, 4000, "cosine", 300000, 400000, "bf16", 2048, 1000)]
    [TestCase("pile/gpt3-2.7B-flash-hdim128", "gpt3-2.7B", 512, 4, 1.6e-4, 4000, "cosine", 300000, 400000, "bf16", 2048, 1000)]
    [TestCase("pile/gpt3s-flash-rotary", "gpt3s-rotary", 256, 32, 6e-4, 8000, "cosine", 600000, 800000, "bf16", 2048, 2000)]
    public void ExperimentFilesCarryTheExperimentsNumbers(string experiment, string model, long global, long batch, double lr, long warmup,
        string schedule, long horizon, long maxSteps, string precision, long seqlen, long valEvery)
    {
        var c = ExperimentConfig.Parse(["experiment=" + experiment]).Bind();
        Assert.Multiple(() =>
        {
            Assert.That(c.Model.Name, Is.EqualTo(model));
            Assert.That(c.GlobalBatchSize, Is.EqualTo(global));
            Assert.That(c.Data.BatchSize, Is.EqualTo(batch));
            Assert.That(c.Optimizer.Lr, Is.EqualTo(lr));
            Assert.That(c.Optimizer.WeightDecay, Is.EqualTo(0.1));
            Assert.That(c.Scheduler.WarmupSteps, Is.EqualTo(warmup));
            Assert.That(c.Scheduler.Name.ToString().ToLowerInvariant(), Is.EqualTo(schedule));
            Assert.That(c.Scheduler.NumTrainingSteps, Is.EqualTo(horizon));
            Assert.That(c.Trainer.MaxSteps, Is.EqualTo(maxSteps));
            Assert.That(ConfigNames.Name(c.Trainer.Precision), Is.EqualTo(precision));
            Assert.That(c.Data.MaxLength, Is.EqualTo(seqlen));
            Assert.That(c.Trainer.ValCheckInterval, Is.EqualTo(valEvery));
            Assert.That(c.Trainer.GradientClipVal, Is.EqualTo(1.0));
            Assert.That(c.Seed, Is.EqualTo(1111));
            Assert.That(c.Trainer.Devices, Is.EqualTo(1), "devices come from the command line, as flash-attention's trainer.devices=8");
            Assert.That(ExperimentConfig.GradientAccumulation(global, 8, batch), Is.EqualTo(global / (8 * batch)));
            if (schedule == "cosine")
            {
                Assert.That(c.Scheduler.WarmupLrInit, Is.EqualTo(1e-6));
                Assert.That(c.Scheduler.LrMinRatio, Is.EqualTo(0.1));
            }
        });
    }

    [Test]
    public void YamlSubsetNestsByIndentationAndStripsComments()
    {
        var kv = ExperimentConfig.ParseYaml("a: 1 # c\nb:\n  c: 'x # y'\n  d:\n    e: 2\nf: 3\n").ToList();
        Assert.That(kv, Is.EqualTo(new (string, string?)[] { ("a", "1"), ("b.c", "'x # y'"), ("b.d.e", "2"), ("f", "3") }));
    }

    [TestCase("/data: two #1")]
    [TestCase("it's \"quoted\"")]
    [TestCase("'both ends'")]
    [TestCase("null")]
    [TestCase("ends:")]
    [TestCase(" padded ")]
    [TestCase("#first")]
    [TestCase("embedded:kjv")]
    public void DumpReadsBackAsItself(string value)
    {
        // set as a YAML single-quoted scalar (the one spelling that holds any of these), read back from the dump
        var c = ExperimentConfig.Parse([]);
        c.Set("datamodule.data_dir", "'" + value.Replace("'", "''") + "'");
        Assert.That(c["datamodule.data_dir"], Is.EqualTo(value));
        var back = ExperimentConfig.FromDump(c.Dump(), "dump");
        foreach (var k in ExperimentConfig.Schema) Assert.That(back[k.Name], Is.EqualTo(c[k.Name]), k.Name);
    }
}
