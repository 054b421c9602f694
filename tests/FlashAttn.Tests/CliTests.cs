using FlashAttn.Cli;
using FlashAttn.Models.Training;
using NUnit.Framework;

namespace FlashAttn.Tests;

/// <summary>The `flashattn` command line: dotted overrides as flash-attention's Hydra, errors that name the
/// wrong key or value and list the valid ones, the experiment files' numbers, batch arithmetic.</summary>
public class CliTests
{
    [Test]
    public void SeedStyleOverridesApply()
    {
        var c = ExperimentConfig.Parse(["experiment=owt/gpt2m-flash", "trainer.precision=bf16", "datamodule.batch_size=8", "trainer.devices=1"]);
        Assert.That(c.Str("experiment"), Is.EqualTo("owt/gpt2m-flash"));
        Assert.That(c.Str("model.name"), Is.EqualTo("gpt2m"));
        Assert.That(c.Str("trainer.precision"), Is.EqualTo("bf16"));
        Assert.That(c.Int("datamodule.batch_size"), Is.EqualTo(8));
        Assert.That(c.Int("trainer.devices"), Is.EqualTo(1));
        Assert.That(c.Int("train.global_batch_size"), Is.EqualTo(512), "the global batch is fixed by the experiment");
        Assert.That(c.Accumulation, Is.EqualTo(64));
        Assert.That(c.Float("train.optimizer.lr"), Is.EqualTo(1.5e-4));
        // precision aliases, order independence, Hydra's '+' prefix
        var d = ExperimentConfig.Parse(["trainer.precision=16-mixed", "+trainer.max_steps=7", "experiment=tiny"]);
        Assert.That(d.Str("trainer.precision"), Is.EqualTo("16"));
        Assert.That(d.Int("trainer.max_steps"), Is.EqualTo(7));
        Assert.That(ExperimentConfig.Parse([]).Str("experiment"), Is.EqualTo("tiny"));
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
        Assert.That(err, Does.Contain("trainer.devices=8 needs the multi-GPU launcher (issue 10); use 1"));
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
    public void ExperimentFilesCarryTheSeedsNumbers(string experiment, string model, long global, long batch, double lr, long warmup,
        string schedule, long horizon, long maxSteps, string precision, long seqlen, long valEvery)
    {
        var c = ExperimentConfig.Parse(["experiment=" + experiment]);
        Assert.Multiple(() =>
        {
            Assert.That(c.Str("model.name"), Is.EqualTo(model));
            Assert.That(c.Int("train.global_batch_size"), Is.EqualTo(global));
            Assert.That(c.Int("datamodule.batch_size"), Is.EqualTo(batch));
            Assert.That(c.Float("train.optimizer.lr"), Is.EqualTo(lr));
            Assert.That(c.Float("train.optimizer.weight_decay"), Is.EqualTo(0.1));
            Assert.That(c.Int("train.scheduler.warmup_steps"), Is.EqualTo(warmup));
            Assert.That(c.Str("train.scheduler.name"), Is.EqualTo(schedule));
            Assert.That(c.Int("train.scheduler.num_training_steps"), Is.EqualTo(horizon));
            Assert.That(c.Int("trainer.max_steps"), Is.EqualTo(maxSteps));
            Assert.That(c.Str("trainer.precision"), Is.EqualTo(precision));
            Assert.That(c.Int("datamodule.max_length"), Is.EqualTo(seqlen));
            Assert.That(c.Int("trainer.val_check_interval"), Is.EqualTo(valEvery));
            Assert.That(c.Float("trainer.gradient_clip_val"), Is.EqualTo(1.0));
            Assert.That(c.Int("seed"), Is.EqualTo(1111));
            Assert.That(c.Int("trainer.devices"), Is.EqualTo(1), "devices come from the command line, as flash-attention's trainer.devices=8");
            Assert.That(ExperimentConfig.GradientAccumulation(global, 8, batch), Is.EqualTo(global / (8 * batch)));
            if (schedule == "cosine")
            {
                Assert.That(c.Float("train.scheduler.warmup_lr_init"), Is.EqualTo(1e-6));
                Assert.That(c.Float("train.scheduler.lr_min_ratio"), Is.EqualTo(0.1));
            }
        });
    }

    [Test]
    public void YamlSubsetNestsByIndentationAndStripsComments()
    {
        var kv = ExperimentConfig.ParseYaml("a: 1 # c\nb:\n  c: 'x # y'\n  d:\n    e: 2\nf: 3\n").ToList();
        Assert.That(kv, Is.EqualTo(new (string, string?)[] { ("a", "1"), ("b.c", "'x # y'"), ("b.d.e", "2"), ("f", "3") }));
    }
}
