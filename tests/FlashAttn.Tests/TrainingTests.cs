using System.Text.Json.Nodes;
using FlashAttn.Models.Data;
using FlashAttn.Models.Distributed;
using FlashAttn.Models.Training;
using NUnit.Framework;
using TorchSharp;
using static TorchSharp.torch;

namespace FlashAttn.Tests;

/// <summary>The trainer on CPU with small GPTs: exact resume, falling loss of the tiny experiment
/// on the embedded corpus, outputs (metrics.jsonl, TensorBoard events, PNG). The optimizer itself: FusedAdamWTests.</summary>
[NonParallelizable]
public class TrainingTests
{
    static string _root = "";
    static string DataDir => Path.Combine(_root, "data");

    [OneTimeSetUp]
    public void OneTimeSetUp() => Directory.CreateDirectory(_root = Path.Combine(Path.GetTempPath(), "flashattn-train-" + Guid.NewGuid().ToString("N")));

    [OneTimeTearDown]
    public void OneTimeTearDown() { try { Directory.Delete(_root, true); } catch { } }

    static string SmallCorpus()
    {
        var path = Path.Combine(_root, "small.jsonl");
        if (!File.Exists(path))
            File.WriteAllLines(path, CorpusReader.ReadDocuments(["embedded:kjv"]).Take(40).Select(t => new JsonObject { ["text"] = t }.ToJsonString()));
        return path;
    }

    static string[] SmallRun(string name, params string[] extra) =>
    [
        "experiment=tiny", $"name={name}", $"trainer.default_root_dir={Path.Combine(_root, "runs")}", $"datamodule.data_dir={DataDir}",
        "datamodule.dataset=small", $"datamodule.sources={SmallCorpus()}", "datamodule.val_ratio=0.1",
        "model.config.n_layer=1", "model.config.n_embd=32", "model.config.n_head=2", "model.config.dropout=0.1",
        "datamodule.max_length=16", "datamodule.batch_size=2", "train.global_batch_size=4", "train.scheduler.warmup_steps=2",
        "trainer.max_steps=6", "trainer.val_check_interval=3", "trainer.limit_val_batches=2", "trainer.progress_bar=false",
        "trainer.tensorboard=false", "trainer.plot=false", .. extra,
    ];

    [Test]
    public void ResumeReproducesTheLossesOfAnUninterruptedRun()
    {
        var full = new Trainer(ExperimentConfig.Parse(SmallRun("full")), TextWriter.Null).Run();
        Assert.That(full.Losses, Has.Count.EqualTo(6));
        Assert.That(ExperimentConfig.Parse(SmallRun("x")).Bind().Accumulation, Is.EqualTo(2));
        // the same run stopped after 3 steps (checkpoint), then resumed to 6
        var first = new Trainer(ExperimentConfig.Parse(SmallRun("split", "trainer.max_steps=3", "train.scheduler.num_training_steps=6")), TextWriter.Null).Run();
        Assert.That(first.Losses, Is.EqualTo(full.Losses.Take(3)).Within(1e-6));
        var rest = new Trainer(ExperimentConfig.Parse(SmallRun("split", "resume=last")), TextWriter.Null).Run();
        Assert.That(rest.Steps, Is.EqualTo(3));
        Assert.That(rest.Losses, Is.EqualTo(full.Losses.Skip(3)).Within(1e-5), "resume continues data order, schedule, optimizer and dropout");
        // metrics.jsonl of the resumed run holds every step once
        var steps = File.ReadAllLines(Path.Combine(rest.RunDir, "metrics.jsonl")).Select(l => JsonNode.Parse(l)!).Where(n => n["loss"] != null)
            .Select(n => n["step"]!.GetValue<long>()).ToList();
        Assert.That(steps, Is.EqualTo(new long[] { 1, 2, 3, 4, 5, 6 }));
        // checkpoints are complete folders behind an atomically replaced pointer
        var ckpts = Path.Combine(rest.RunDir, "checkpoints");
        Assert.That(File.ReadAllText(Path.Combine(ckpts, "last")).Trim(), Is.EqualTo("step-0000006"));
        Assert.That(Directory.GetDirectories(ckpts).Select(Path.GetFileName), Has.None.StartsWith("."));
    }

    [Test]
    public void ResumeReadsTheSavedSettingsBackAsTheyWereSet()
    {
        // a value with a colon, quotes and a comment mark, saved in config.yaml and the checkpoint, compared at resume
        var dataDir = Path.Combine(_root, "data: 'q' \"d\" #1");
        string[] run = [$"datamodule.data_dir={dataDir}", "trainer.max_steps=2", "train.scheduler.num_training_steps=6"];
        var first = new Trainer(ExperimentConfig.Parse(SmallRun("quoted", run)), TextWriter.Null).Run();
        var saved = ExperimentConfig.FromDump(File.ReadAllText(Path.Combine(first.RunDir, RunFolder.ConfigFile)), RunFolder.ConfigFile);
        Assert.That(saved["datamodule.data_dir"], Is.EqualTo(dataDir));
        var log = new StringWriter();
        new Trainer(ExperimentConfig.Parse(SmallRun("quoted", [.. run, "resume=last", "trainer.max_steps=3"])), log).Run();
        Assert.That(log.ToString(), Does.Contain("resumed from").And.Not.Contain("changed settings"));
        // a setting that did change is named with both values
        log = new StringWriter();
        new Trainer(ExperimentConfig.Parse(SmallRun("quoted", [.. run, "resume=last", "trainer.max_steps=4", "trainer.gradient_clip_val=0.5"])), log).Run();
        Assert.That(log.ToString(), Does.Contain("warning: resuming with changed settings: trainer.gradient_clip_val (1 -> 0.5)"));
    }

    [Test]
    public void FineTuningStartsFromTheGivenWeights()
    {
        // on the CPU wherever the tests run: the checks below compare values bit for bit across runs
        var src = new Trainer(ExperimentConfig.Parse(SmallRun("ft-source", "trainer.accelerator=cpu")), TextWriter.Null).Run();
        using var source = LoadCpu(src.RunDir);
        // lr 0 throughout: the weights a fine-tuning run ends with are the ones it started from (a random init is not)
        string[] frozen = ["train.optimizer.lr=0", "train.scheduler.warmup_lr_init=0", "trainer.max_steps=2", "model.config.dropout=0",
            "trainer.accelerator=cpu"];
        var log = new StringWriter();
        var ft = new Trainer(ExperimentConfig.Parse(SmallRun("ft", [$"model.init_from={src.RunDir}", .. frozen])), log).Run();
        Assert.That(log.ToString(), Does.Contain("model.init_from: weights of GPT tiny"));
        using (var tuned = LoadCpu(ft.RunDir))
            foreach (var ((name, a), (_, b)) in source.named_parameters().Zip(tuned.named_parameters()))
                Assert.That(Same(a, b), Is.True, name);
        // its checkpoints carry the model's config (no need of the weights it was fine-tuned from)
        var last = Path.Combine(ft.RunDir, "checkpoints", "last");
        Assert.That(GptSource.Open(last).Name, Does.Contain("fine-tuned from"));
        Assert.That(Checkpoint.Load(Checkpoint.Pin(last)).state["model_config"]?.GetValue<string>(), Does.Contain("\"n_embd\":32"));
        using (var fromCheckpoint = LoadCpu(last))
            foreach (var ((name, a), (_, b)) in source.named_parameters().Zip(fromCheckpoint.named_parameters()))
                Assert.That(Same(a, b), Is.True, name);
        Assert.That(ft.Losses[1], Is.EqualTo(ft.Losses[0]).Within(0.5), "same weights, another batch");
        Assert.That(ft.FirstLoss, Is.LessThan(src.FirstLoss), "starts below a random init's loss");

        // trainer.max_steps=0 evaluates the weights only: the source run's last validation loss again, no files but the metrics
        log = new StringWriter();
        var eval = new Trainer(ExperimentConfig.Parse(SmallRun("ft-source", $"model.init_from={src.RunDir}", "trainer.max_steps=0",
            "trainer.accelerator=cpu")), log).Run();
        Assert.That(eval.Steps, Is.EqualTo(0));
        Assert.That(eval.ValLoss, Is.EqualTo(src.ValLoss).Within(1e-5), "the same validation batches through the same weights");
        Assert.That(log.ToString(), Does.Contain("evaluation only (trainer.max_steps=0): val_loss"));
        Assert.That(File.ReadLines(Path.Combine(src.RunDir, "metrics.jsonl")).Count(), Is.GreaterThan(6), "the run evaluated in place keeps its files");
        // training into the folder of the weights it starts from would overwrite them
        Assert.That(Assert.Throws<ConfigException>(() => new Trainer(ExperimentConfig.Parse(SmallRun("ft-source", [$"model.init_from={src.RunDir}", .. frozen])),
            TextWriter.Null).Run())!.Message, Does.Contain("lies in this run's folder").And.Contain("name=ft-source-ft"));

        // bf16: the optimizer's fp32 masters start from the source's float32 values, not from their bf16 roundings
        var bf = new Trainer(ExperimentConfig.Parse(SmallRun("ft-bf16", [$"model.init_from={src.RunDir}", "trainer.precision=bf16", .. frozen])),
            TextWriter.Null).Run();
        var (state, _) = Checkpoint.Load(Path.Combine(bf.RunDir, "checkpoints", "step-0000002"));
        foreach (var (name, p) in source.named_parameters())
            Assert.That(Same(state["master." + name], p), Is.True, name);
        // and a bf16 run folder hands on those float32 masters (its model.safetensors holds bf16)
        using (var fromBf16Run = LoadCpu(bf.RunDir))
            foreach (var ((name, a), (_, b)) in source.named_parameters().Zip(fromBf16Run.named_parameters()))
                Assert.That(Same(a, b), Is.True, name);
        Assert.That(source.named_parameters().Any(np => !Same(np.parameter.to(ScalarType.BFloat16).to(ScalarType.Float32), np.parameter)),
            "some source weight must not be a bf16 value, or the check above proves nothing");
        foreach (var t in state.Values) t.Dispose();

        // the sizes are the weights': a model.config size that differs gives way, with a warning
        log = new StringWriter();
        var resized = new Trainer(ExperimentConfig.Parse(SmallRun("ft-sizes", [$"model.init_from={src.RunDir}", .. frozen, "model.config.n_layer=2"])), log).Run();
        Assert.That(log.ToString(), Does.Contain("fixes the model's sizes (n_layer 1"));
        using (var kept = LoadCpu(resized.RunDir)) Assert.That(kept.config.n_layer, Is.EqualTo(1));
        Assert.That(Assert.Throws<InvalidDataException>(() => FlashAttn.Models.ViTConfig.FromWeights(Path.Combine(src.RunDir, "model.safetensors")))!.Message,
            Does.Contain("holds a GPTLMHeadModel, not a VisionTransformer"));
        Assert.Throws<FileNotFoundException>(() => new Trainer(ExperimentConfig.Parse(SmallRun("ft-missing",
            $"model.init_from={Path.Combine(_root, "nothing")}")), TextWriter.Null).Run());
    }

    [Test]
    public void AOneRankReducerTrainsAsThePlainTrainer()
    {
        var plain = new Trainer(ExperimentConfig.Parse(SmallRun("dp-plain")), TextWriter.Null).Run();
        var one = new FakeCollective();
        using var reducer = new BucketedGradientReducer(one, capBytes: 4096);
        var reduced = new Trainer(ExperimentConfig.Parse(SmallRun("dp-one")), TextWriter.Null) { Reducer = reducer }.Run();
        Assert.That(reduced.Losses, Is.EqualTo(plain.Losses), "the same numbers: one rank's all-reduce is the identity");
        Assert.That(reduced.ValLoss, Is.EqualTo(plain.ValLoss));
        int parameters = reducer.Plan!.Sum(b => b.Parameters.Length);
        Assert.That(one.Broadcasts, Is.EqualTo(parameters), "each parameter from rank 0, once");
        Assert.That(reducer.Plan!.Count, Is.GreaterThan(1), "several buckets under the 4 KB cap");
        Assert.That(one.AllReduces, Is.EqualTo(6 * 2 * reducer.Plan.Count), "every bucket after each of the two micro-batches of six steps");
    }

    [Test]
    public void OnlyRankZeroLogsAndWritesTheRunFolder()
    {
        // two ranks whose other one has the same gradients (the mean is this rank's); each micro-batch its own: no accumulation
        string[] dp = ["trainer.devices=2", "trainer.checkpoint_every_n_steps=2"];
        var log0 = new StringWriter();
        using (var reducer = new BucketedGradientReducer(new FakeCollective(0, 2, t => t.clone())))
        {
            var r0 = new Trainer(ExperimentConfig.Parse(SmallRun("dp-rank0", dp)), log0) { Reducer = reducer }.Run();
            Assert.That(File.Exists(MetricsLogger.PathIn(r0.RunDir)), "rank 0 writes the metrics");
            Assert.That(Directory.Exists(Path.Combine(r0.RunDir, RunFolder.CheckpointsDir)), "and the checkpoints");
            Assert.That(r0.ValLoss, Is.Not.Null);
        }
        Assert.That(log0.ToString(), Does.Contain("rank 0's share of 2").And.Contain("2 device(s) × 2 × 1 accumulation"));
        var log1 = new StringWriter();
        var rank1 = new FakeCollective(1, 2, t => t.clone());
        using (var reducer = new BucketedGradientReducer(rank1))
        {
            var r1 = new Trainer(ExperimentConfig.Parse(SmallRun("dp-rank1", dp)), log1) { Reducer = reducer }.Run();
            Assert.That(rank1.AllReduces, Is.EqualTo(6 * reducer.Plan!.Count), "it trains: each of the six steps' gradients averaged");
            Assert.That(r1.Losses, Is.Empty, "without reading a loss back: rank 0 logs them");
            Assert.That(Directory.Exists(r1.RunDir), Is.False, "and writes nothing");
            Assert.That(r1.ValLoss, Is.Null, "rank 0 evaluates");
        }
        Assert.That(log1.ToString(), Is.Empty);
    }

    // what set_dense_algo_candidates held at each step (it returns the previous setting; set back at once)
    private sealed class GemmCandidatesSeen : ITrainerCallback
    {
        public readonly List<int> Seen = new();
        public void OnTrainBatchEnd(TrainingRun run)
        {
            int current = flash_attn.set_dense_algo_candidates(1);
            flash_attn.set_dense_algo_candidates(current);
            Seen.Add(current);
        }
    }

    /// <summary>trainer.benchmark times the GEMMs' algorithms for the run on CUDA (the library's setting, process-wide,
    /// as it was once the run ends); on the CPU, which has no cuBLASLt, it changes nothing.</summary>
    [Test]
    public void BenchmarkTimesTheGemmsOnlyOnCuda() => BenchmarkRun("bench-cpu", ["trainer.accelerator=cpu"], expected: 1);

    [Test, Category(Gpu.Category)]
    public void BenchmarkTimesTheGemmsForTheRunOnCuda()
    {
        Gpu.Require();
        BenchmarkRun("bench-cuda", ["trainer.accelerator=cuda", "trainer.precision=bf16"], expected: Trainer.BenchmarkCandidates);
    }

    // each its own run folder: the two share the fixture's root, and a folder holds one run
    private static void BenchmarkRun(string name, string[] device, int expected)
    {
        Assert.That(ExperimentConfig.Parse(SmallRun("bench-off")).Bind().Trainer.Benchmark, Is.False, "off by default");
        int before = flash_attn.set_dense_algo_candidates(1);
        try
        {
            var seen = new GemmCandidatesSeen();
            var trainer = new Trainer(ExperimentConfig.Parse(SmallRun(name, [.. device, "trainer.benchmark=true", "trainer.max_steps=2"])),
                TextWriter.Null);
            trainer.Callbacks.Add(seen);
            trainer.Run();
            Assert.That(seen.Seen, Is.EqualTo(new[] { expected, expected }), "the setting at each step");
            Assert.That(flash_attn.set_dense_algo_candidates(1), Is.EqualTo(1), "the setting after the run");
        }
        finally
        {
            flash_attn.set_dense_algo_candidates(before);
        }
    }

    [Test, Category(Gpu.Category)]
    public void ANcclRankOfOneTrainsAsThePlainTrainer()
    {
        Gpu.Require();
        string[] cuda = ["trainer.accelerator=cuda"];
        var plain = new Trainer(ExperimentConfig.Parse(SmallRun("nccl-plain", cuda)), TextWriter.Null).Run();
        var again = new Trainer(ExperimentConfig.Parse(SmallRun("nccl-again", cuda)), TextWriter.Null).Run();
        var file = Path.Combine(_root, $"rendezvous-{Guid.NewGuid():N}.id");
        TrainResult nccl;
        using (var reducer = DataParallel.Join(new WorkerEnvironment(0, 0, 1, 1, null, null, file)))
            nccl = new Trainer(ExperimentConfig.Parse(SmallRun("nccl-one", cuda)), TextWriter.Null) { Reducer = reducer }.Run();
        // equal when the plain run repeats itself exactly; a kernel with atomics (the attention backward's dq) may not,
        // and then the NCCL run may differ from it by twice what a repetition does
        double spread = plain.Losses.Zip(again.Losses, (a, b) => Math.Abs(a - b)).Max();
        Assert.That(nccl.Losses, Has.Count.EqualTo(plain.Losses.Count));
        for (int i = 0; i < plain.Losses.Count; i++)
            Assert.That(Math.Abs(nccl.Losses[i] - plain.Losses[i]), Is.LessThanOrEqualTo(2 * spread), $"step {i + 1} (repetition spread {spread})");
        Assert.That(Math.Abs(nccl.ValLoss!.Value - plain.ValLoss!.Value), Is.LessThanOrEqualTo(2 * Math.Abs(again.ValLoss!.Value - plain.ValLoss.Value) + 2 * spread));
    }

    static bool Same(Tensor a, Tensor b) => a.shape.SequenceEqual(b.shape) && a.dtype == b.dtype && a.eq(b).all().item<bool>();

    static FlashAttn.Models.GPTLMHeadModel LoadCpu(string path)
    {
        var s = GptSource.Open(path);
        var m = new FlashAttn.Models.GPTLMHeadModel(s.Config.WithFusions(false));
        s.LoadInto(m);
        return m;
    }

    sealed class Recorder : ITrainerCallback
    {
        public readonly List<string> Calls = new();
        public void OnTrainStart(TrainingRun run) => Calls.Add($"start {run.Step}");
        public void OnLog(TrainingRun run, IReadOnlyDictionary<string, double> metrics) =>
            Calls.Add($"log {run.Step} losses {run.Losses.Count} {string.Join(",", metrics.Keys.Order(StringComparer.Ordinal))}");
        public void OnTrainBatchEnd(TrainingRun run) => Calls.Add($"batch {run.Step}");
        public void OnValidationEnd(TrainingRun run, IReadOnlyDictionary<string, double> metrics) => Calls.Add($"val {run.Step} {metrics.Keys.First()}");
        public void OnTrainEnd(TrainingRun run) => Calls.Add($"end {run.Step}");
    }

    /// <summary>The trainer's hooks come in Lightning's order; losses are read at log steps only (each log step reads every
    /// step since the last); the built-in callbacks write what their keys ask for.</summary>
    [Test]
    public void CallbacksSeeTheLoopAsLightningsDo()
    {
        var recorder = new Recorder();
        var trainer = new Trainer(ExperimentConfig.Parse(SmallRun("hooks", "trainer.max_steps=5", "trainer.log_every_n_steps=2",
            "trainer.checkpoint_every_n_steps=2", "trainer.save_top_k=1", "trainer.plot=true")), TextWriter.Null);
        trainer.Callbacks.Add(recorder);
        var r = trainer.Run();
        // mfu only where the device's peak is known (a GPU), loss_scale only in fp16
        string keys = string.Join(",", new[] { "alloc_mb", "elapsed_s", "gc_collections", "gc_pause_ms", "grad_norm", "loss", "lr", "tok_per_s", "tokens" }
            .Concat(r.Mfu is null ? [] : ["mfu"]).Order(StringComparer.Ordinal));
        Assert.That(recorder.Calls, Is.EqualTo(new[]
        {
            "start 0", "batch 1", $"log 2 losses 2 {keys}", "batch 2", "batch 3", "val 3 val_loss", $"log 4 losses 4 {keys}", "batch 4",
            $"log 5 losses 5 {keys}", "batch 5", "val 5 val_loss", "end 5",
        }));
        var metrics = File.ReadAllLines(Path.Combine(r.RunDir, "metrics.jsonl")).Select(l => JsonNode.Parse(l)!).ToList();
        Assert.That(metrics.Select(n => (n["step"]!.GetValue<long>(), n["loss"] != null)),
            Is.EqualTo(new[] { (2L, true), (3L, false), (4L, true), (5L, true), (5L, false) }));
        var ckpts = Path.Combine(r.RunDir, "checkpoints");
        Assert.That(Directory.GetDirectories(ckpts).Select(d => Path.GetFileName(d)).Order(StringComparer.Ordinal),
            Is.EqualTo(new[] { "best-step-0000005", "step-0000004", "step-0000005" }).Or.EqualTo(new[] { "best-step-0000003", "step-0000004", "step-0000005" }));
        Assert.That(File.Exists(Path.Combine(r.RunDir, "model.safetensors")) && File.Exists(r.PlotPath), Is.True);
        Assert.That(Directory.Exists(Path.Combine(r.RunDir, "tensorboard")), Is.False, "trainer.tensorboard=false");
    }

    /// <summary>
    /// A training step leaves (almost) nothing to the .NET finalizer: a garbage collection stops every managed thread, on
    /// a GPU the one that launches the step's kernels and libtorch's autograd thread when it calls a custom function's
    /// backward, and each finalizable object dropped survives its first collection. TorchSharp makes one where no dispose
    /// scope reaches: a Scalar for each number argument (and add's alpha), a pinned array for each <c>shape</c>,
    /// <c>stride()</c>, <c>item()</c> and tensor-list result, disposed or not. Through the trainer's own step
    /// (<see cref="Trainer.TrainStep"/>: forward and loss, backward, the optimizer), two micro-batches a step, two layers,
    /// the CPU's plain modules. What is left is TorchSharp's own: per micro-batch each layer's unbind of q, k, v, and the
    /// 7 pinned arrays of each custom autograd function TorchSharp's Function.apply makes (RowScaleFunction folds the
    /// second layer's softmax scale into its projection for SDPA); per step the reference optimizer's stack of the squared
    /// norms: 2 × (2 + 7) + 1 = 19 (98 before the hot paths read sizes one dimension at a time and kept their Scalars).
    /// </summary>
    [Test]
    public void TrainStepLeavesLittleToTheFinalizer()
    {
        var (left, kib) = TrainStepLeftovers(CPU, "trainer.accelerator=cpu");
        Assert.That(left, Is.LessThanOrEqualTo(19 + 4), $"{left} objects left to the finalizer per step ({kib:F1} KiB allocated)");
    }

    /// <summary>
    /// <see cref="TrainStepLeavesLittleToTheFinalizer"/> on the GPU: bf16, every fusion, our kernels. TorchSharp's own
    /// per micro-batch: the 7 pinned arrays of each custom autograd function (per layer ln_1, the qkv projection, the
    /// attention, the output projection, ln_2 and the MLP, then ln_f and the cross-entropy: 7 × (6 × 2 + 2)) and each
    /// layer's unbind of the packed qkv (flash_attn_qkvpacked_func): 2 × (98 + 2) = 200 per step. The H200 counted 252:
    /// 52 more than this account names (the optimizer's kernel path and the device-error checks are candidates, not yet
    /// counted one by one); the bound is that count and a few. The sizes and Scalars of our validation, dropout seeds,
    /// ids checks and loss added about 130 more before.
    /// </summary>
    [Test, Category(Gpu.Category)]
    public void TrainStepLeavesLittleToTheFinalizerOnTheGpu()
    {
        var (left, kib) = TrainStepLeftovers(Gpu.Require(), "trainer.accelerator=cuda", "trainer.precision=bf16", "model.config.n_embd=64");
        Assert.That(left, Is.LessThanOrEqualTo(252 + 8), $"{left} objects left to the finalizer per step ({kib:F1} KiB allocated)");
    }

    // Objects left to the finalizer and KiB of managed memory allocated per step, over 4 steps of two micro-batches after 2.
    static (double left, double kib) TrainStepLeftovers(Device device, params string[] settings)
    {
        var trainer = new Trainer(ExperimentConfig.Parse(SmallRun($"gc-{device.type}", ["model.config.n_layer=2", .. settings])), TextWriter.Null);
        using var run = trainer.Setup(device, null);
        const int steps = 4;
        for (long step = 0; step < 2; step++) Trainer.TrainStep(run, step, keepLoss: true)!.Dispose(); // lazily created state
        long bytes = 0;
        long waiting = LifetimeTests.LeftToTheFinalizer(() =>
        {
            long before = GC.GetTotalAllocatedBytes(precise: true);
            for (long step = 2; step < 2 + steps; step++) Trainer.TrainStep(run, step, keepLoss: true)!.Dispose();
            bytes = GC.GetTotalAllocatedBytes(precise: true) - before;
        });
        var (left, kib) = (waiting / (double)steps, bytes / steps / 1024.0);
        TestContext.Out.WriteLine($"{device.type}: {left:F1} objects left to the finalizer and {kib:F1} KiB of managed memory allocated per step");
        return (left, kib);
    }

    [Test]
    public void TinyExperimentLossFallsOnCpu()
    {
        var sw = System.Diagnostics.Stopwatch.StartNew();
        var log = new StringWriter();
        // the default experiment on the embedded corpus, shortened for CI (the full one: README's main job)
        var r = new Trainer(ExperimentConfig.Parse([
            $"trainer.default_root_dir={Path.Combine(_root, "runs")}", $"datamodule.data_dir={DataDir}",
            "trainer.max_steps=30", "datamodule.batch_size=4", "train.global_batch_size=4", "datamodule.max_length=64",
            "train.scheduler.warmup_steps=5", "trainer.val_check_interval=15", "trainer.limit_val_batches=4", "trainer.checkpoint_every_n_steps=0",
        ]), log).Run();
        TestContext.Progress.WriteLine($"tiny (shortened): {sw.Elapsed.TotalSeconds:F1} s, loss {r.FirstLoss:F3} -> {r.LastLoss:F3}, val {r.ValLoss:F3}");
        Assert.That(r.FirstLoss, Is.EqualTo(Math.Log(50257)).Within(0.3), "starts near uniform over the vocabulary");
        Assert.That(r.Losses.TakeLast(5).Average(), Is.LessThan(r.FirstLoss - 1.5), log.ToString());
        Assert.That(r.ValLoss, Is.LessThan(r.FirstLoss - 1.0));
        Assert.That(File.Exists(r.PlotPath), "PNG plot");
        var png = File.ReadAllBytes(r.PlotPath!);
        Assert.That(png.Take(4), Is.EqualTo(new byte[] { 0x89, (byte)'P', (byte)'N', (byte)'G' }));
        Assert.That(File.ReadLines(Path.Combine(r.RunDir, "metrics.jsonl")).Count(), Is.GreaterThanOrEqualTo(30));
        Assert.That(Directory.EnumerateFiles(Path.Combine(r.RunDir, "tensorboard"), "*tfevents*", SearchOption.AllDirectories), Is.Not.Empty, "TensorBoard event file");
        Assert.That(File.Exists(Path.Combine(r.RunDir, "config.yaml")));
        Assert.That(TokenCache.IsComplete(Path.Combine(DataDir, "kjv")), "the run prepared the embedded corpus's cache");
    }
}
