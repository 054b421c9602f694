using System.Diagnostics;
using System.Globalization;
using System.Text.Json.Nodes;
using FlashAttn.Interop;
using FlashAttn.Models.Distributed;
using TorchSharp;
using static TorchSharp.torch;

namespace FlashAttn.Models.Training;

/// <summary>What a finished run reports: rank 0's; a rank other than 0 reads nothing back (no losses, no throughput).</summary>
public sealed record TrainResult(string RunDir, long Steps, double FirstLoss, double LastLoss, double? ValLoss, double TokensPerSecond,
    double? Mfu, TimeSpan Elapsed, IReadOnlyList<double> Losses, string? PlotPath);

/// <summary>The model- and task-agnostic training loop: gradient accumulation to the configured
/// global batch, fp32 / bf16 / fp16 (fp32 master weights; fp16 with dynamic loss scaling), AdamW with
/// the model's decay groups, warmup + cosine/linear schedule, gradient clipping, periodic
/// evaluation, atomic checkpoints with exact resume (data order, schedule, optimizer, dropout RNG).
/// In pieces as PyTorch Lightning's: <see cref="Setup"/>, <see cref="Resume"/>, <see cref="TrainStep"/>, <see cref="Validate"/>,
/// and callbacks around them (<see cref="ITrainerCallback"/>: metrics.jsonl, TensorBoard, the progress bar, checkpoints,
/// the plot; <see cref="Callbacks"/> adds more).</summary>
public sealed class Trainer
{
    readonly ExperimentConfig _config;
    RunConfig _c;
    readonly TextWriter _console;
    readonly WorkerEnvironment? _worker;

    /// <param name="config">The experiment's keys (bound here once).</param>
    /// <param name="log">Rank 0's log; default stderr.</param>
    /// <param name="worker">This process's rank when <see cref="Launcher"/> started it (trainer.devices > 1), else null: the
    /// environment's by default (<see cref="WorkerEnvironment.FromLauncher"/>). Ranks other than 0 write no log.</param>
    public Trainer(ExperimentConfig config, TextWriter? log = null, WorkerEnvironment? worker = null)
    {
        _config = config;
        _c = config.Bind();
        _worker = worker ?? WorkerEnvironment.FromLauncher();
        _console = log ?? Console.Error;
    }

    /// <summary>The gradient all-reduce; null: a rank's NCCL reducer (<see cref="DataParallel.Join"/>) under the launcher, none
    /// otherwise. Owned by the caller when set.</summary>
    public IGradientReducer? Reducer { get; init; }

    /// <summary>The data shard of this process: its rank and the world size (0 of 1 outside the launcher).</summary>
    DataShard Shard => _worker is { } w ? new(w.Rank, w.WorldSize) : Reducer is { } r ? new(r.Rank, r.WorldSize) : DataShard.Single;

    /// <summary>Whether this process logs, writes the run folder and checkpoints (Lightning's rank_zero_only).</summary>
    bool IsRankZero => Shard.Rank == 0;

    TextWriter Log => IsRankZero ? _console : TextWriter.Null;

    /// <summary>Callbacks called after the built-in ones (Lightning's Trainer(callbacks=[...])).</summary>
    public List<ITrainerCallback> Callbacks { get; } = new();

    /// <summary>Builds the task the config names (lm or image_classification).</summary>
    public static Func<RunConfig, Device, ScalarType, DataShard, TextWriter, ITrainingTask> TaskFactory { get; set; } = DefaultTaskFactory;

    static ITrainingTask DefaultTaskFactory(RunConfig c, Device device, ScalarType dtype, DataShard shard, TextWriter log) => c.Task switch
    {
        TaskKind.LanguageModeling => new LanguageModelingTask(c, device, dtype, log, shard),
        _ => new ImageClassificationTask(c, device, dtype, log),
    };

    public TrainResult Run()
    {
        var t = _c.Trainer;
        int accum = _c.Accumulation; // computed with the device count, as specified
        if (_worker is not null) DataParallel.CheckRank(_c, _worker);
        else if (t.Devices != Shard.WorldSize)
            throw new ConfigException($"trainer.devices={t.Devices}: each of the {t.Devices} ranks is a process the launcher starts (flashattn train does); " +
                $"a Trainer in this process trains with trainer.devices={Shard.WorldSize}");
        if (accum * t.Devices * _c.Data.BatchSize != _c.GlobalBatchSize)
            Log.WriteLine($"warning: train.global_batch_size={_c.GlobalBatchSize} is not a multiple of trainer.devices × datamodule.batch_size = {t.Devices * _c.Data.BatchSize}; " +
                $"each step uses {accum * t.Devices * _c.Data.BatchSize}");
        var device = _worker is { } w ? DataParallel.DeviceOf(w) : DevicePolicy.Resolve(t.Accelerator);
        if (device.type == DeviceType.CPU && t.NumThreads > 0) torch.set_num_threads(t.NumThreads);
        using var timedGemms = device.type == DeviceType.CUDA && t.Benchmark ? new TimedGemms(BenchmarkCandidates) : null;

        var runDir = _c.RunDir;
        if (_c.Model.InitFrom is { } from)
        {
            // pinned (an absolute path; checkpoints/last replaced by the folder it names now), and when training never inside
            // this run's folder, which the run rewrites (a fine-tuning run of the main job's runs/tiny defaults to that folder)
            var pinned = Checkpoint.Pin(from);
            if (t.MaxSteps > 0 && RunFolder.Contains(runDir, pinned))
                throw new ConfigException($"model.init_from={from} lies in this run's folder {runDir}, which the run rewrites; " +
                    $"name the run otherwise (name={_c.RunName}-ft) or set trainer.default_root_dir");
            _config.Set("model.init_from", pinned);
            _c = _config.Bind();
        }
        // the folder belongs to one run: refused here, before the data and the model are prepared; taken (RunFolder.Start)
        // once the run is ready for its first step, and nothing is written into it before
        bool resumesHere = _c.Resume is { } resuming && (resuming == "last" || RunFolder.Contains(runDir, Checkpoint.Pin(resuming)));
        if (t.MaxSteps > 0 && IsRankZero) RunFolder.Check(runDir, _c.RunName, resumesHere, t.Overwrite);

        using var joined = Reducer is null && _worker is { } rank ? DataParallel.Join(rank) : null;
        using var run = Setup(device, Reducer ?? joined);
        if (_c.Resume is { } spec) Resume(run, spec);
        Describe(run);
        if (t.MaxSteps == 0) return EvaluateOnly(run);
        // rank 0 alone writes the run folder, the metrics and the checkpoints (the others' weights are the same)
        if (!IsRankZero) return Fit(run, []);
        using var folder = RunFolder.Start(runDir, _c.RunName, resumesHere, t.Overwrite, run.ConfigYaml, Log);
        var bar = new ProgressBar(Log, t.ProgressBar, t.MaxSteps);
        run.Print = bar.Message;
        using var metrics = new MetricsLogger();
        var callbacks = new List<ITrainerCallback> { metrics };
        if (t.TensorBoard) callbacks.Add(new TensorBoardLogger());
        callbacks.Add(new ProgressBarCallback(bar));
        callbacks.Add(new CheckpointCallback());
        if (t.Plot) callbacks.Add(new PlotCallback());
        return Fit(run, [.. callbacks, .. Callbacks]);
    }

    /// <summary>trainer.benchmark: the GEMM algorithms cuBLASLt ranks first, timed on first use of each shape.</summary>
    internal const int BenchmarkCandidates = 8;

    // trainer.benchmark for the run: the library's setting (process-wide) as it was once the run ends
    private sealed class TimedGemms : IDisposable
    {
        private readonly int _previous;
        internal TimedGemms(int candidates) => _previous = flash_attn.set_dense_algo_candidates(candidates);
        public void Dispose() => flash_attn.set_dense_algo_candidates(_previous);
    }

    /// <summary>The task (model and data; with data parallelism rank 0's weights on every rank), the optimizer over its
    /// parameters, fp16's loss scaler; seeded.</summary>
    internal TrainingRun Setup(Device device, IGradientReducer? reducer)
    {
        var t = _c.Trainer;
        torch.manual_seed(_c.Seed).Dispose();
        if (device.type == DeviceType.CUDA) torch.cuda.manual_seed_all(_c.Seed);
        var task = TaskFactory(_c, device, DevicePolicy.ComputeDtype(t.Precision), Shard, Log);
        try
        {
            task.Model.train();
            reducer?.Broadcast([.. task.Parameters.Select(p => p.parameter)]);
            var o = _c.Optimizer;
            var opt = TrainingOptimizer.Create(task.Parameters, t.Precision, o.Beta1, o.Beta2, o.Eps, o.WeightDecay, maxNorm: t.GradientClipVal);
            task.InitializeOptimizer(opt);
            var scaler = t.Precision == Precision.Fp16 ? new DynamicLossScaler(device) : null;
            opt.grad_scale = scaler?.Scale;
            return new TrainingRun(_c, _config.Dump(), device, task, opt, scaler, Log) { Reducer = reducer };
        }
        catch
        {
            task.Dispose();
            throw;
        }
    }

    /// <summary>Restores a checkpoint (resume=last or a folder): the optimizer's state and masters, the data order, the step,
    /// fp16's loss scale; warns about settings that differ from the checkpoint's.</summary>
    void Resume(TrainingRun run, string spec)
    {
        var dir = Checkpoint.Resolve(spec, run.CheckpointsDir);
        var (tensors, state) = Checkpoint.Load(dir);
        TrainingOptimizer.LoadStateTensors(run.Optimizer, run.Task.Parameters, tensors, state["adam_t"]!.GetValue<long>());
        foreach (var t in tensors.Values) t.Dispose();
        run.StartStep = run.Step = state["step"]!.GetValue<long>();
        run.Task.SamplerState = state["sampler"]!;
        run.UnitsSeen = state["units_seen"]?.GetValue<double>() ?? 0;
        if (run.Scaler != null && state["loss_scale"] is JsonValue ls) run.Scaler.Load(ls.GetValue<double>(), state["good_steps"]!.GetValue<int>());
        Log.WriteLine($"resumed from {dir} at step {run.StartStep}");
        if (state["config"]?.GetValue<string>() is { } saved) WarnOfChanges(saved, dir);
    }

    /// <summary>Names the settings of this run that differ from the checkpoint's (but those a resume changes by design).</summary>
    void WarnOfChanges(string saved, string checkpoint)
    {
        ExperimentConfig before;
        try { before = ExperimentConfig.FromDump(saved, Path.Combine(checkpoint, "trainer.json")); }
        catch (ConfigException e)
        {
            // another version's keys or values: the run goes on with this one's settings
            Log.WriteLine($"warning: the checkpoint's settings are not this version's, so changes cannot be listed: {e.Message}");
            return;
        }
        var changed = ExperimentConfig.Schema.Select(k => k.Name)
            .Where(k => k is not ("resume" or "trainer.max_steps" or "trainer.overwrite") && before[k] != _config[k])
            .Select(k => $"{k} ({before[k] ?? "null"} -> {_config[k] ?? "null"})").ToList();
        if (changed.Count > 0) Log.WriteLine($"warning: resuming with changed settings: {string.Join(", ", changed)}");
    }

    void Describe(TrainingRun run)
    {
        var t = _c.Trainer;
        Log.WriteLine($"experiment {_c.Experiment}: {run.Task.Description}");
        Log.WriteLine($"device {run.Device.type} ×{t.Devices}, precision {ConfigNames.Name(t.Precision)}, global batch {_c.GlobalBatchSize} = {t.Devices} device(s) × " +
            $"{_c.Data.BatchSize} × {_c.Accumulation} accumulation, {t.MaxSteps} steps, lr {run.Schedule.Lr:G3} ({run.Schedule.Kind.ToString().ToLowerInvariant()}, " +
            $"warmup {run.Schedule.WarmupSteps}), run folder {run.RunDir}");
        var optimized = TrainingOptimizer.Optimized(run.Task.Parameters);
        Log.WriteLine($"AdamW: {optimized.Where(np => np.weight_decay).Sum(np => np.parameter.numel()):N0} parameters with weight decay {_c.Optimizer.WeightDecay}, " +
            $"{optimized.Where(np => !np.weight_decay).Sum(np => np.parameter.numel()):N0} without" + (run.Optimizer.uses_kernels ? " (fused kernels)" : ""));
    }

    /// <summary>trainer.max_steps=0 (nanoGPT's eval_only): the validation metrics of the weights as they are (model.init_from,
    /// resume), over trainer.limit_val_batches batches (0: the whole split); nothing is written.</summary>
    TrainResult EvaluateOnly(TrainingRun run)
    {
        var sw = Stopwatch.StartNew();
        var m = run.Task.Evaluate(_c.Data.BatchSizeEval, _c.Trainer.LimitValBatches);
        if (m.Count == 0) throw new ConfigException("trainer.max_steps=0 evaluates only, but the data has no validation split");
        Log.WriteLine("evaluation only (trainer.max_steps=0): " + string.Join(", ", m.Select(kv => $"{kv.Key} {kv.Value:F4}")) +
            $" in {sw.Elapsed.TotalSeconds:F1} s");
        return new TrainResult(run.RunDir, 0, double.NaN, double.NaN, m["val_loss"], 0, null, sw.Elapsed, [], null);
    }

    TrainResult Fit(TrainingRun run, IReadOnlyList<ITrainerCallback> callbacks)
    {
        var t = _c.Trainer;
        var task = run.Task;
        foreach (var cb in callbacks) cb.OnTrainStart(run);
        double unitsPerStep = (double)_c.Accumulation * _c.Data.BatchSize * task.UnitsPerSample;
        double? peak = t.PeakTflops is { } pt ? pt * 1e12 : run.Device.type == DeviceType.CUDA ? PeakFlops.ForCurrentGpu(t.Precision) : null;
        var sw = Stopwatch.StartNew();
        var window = new Queue<(long step, double t)>();
        // each step's loss stays on the device until a log step reads it (ReadPending)
        var pending = new List<Tensor>();
        for (long step = run.StartStep; step < t.MaxSteps; step++)
        {
            run.Lr = run.Schedule.At(step);
            var loss = TrainStep(run, step, keepLoss: IsRankZero);
            run.UnitsSeen += unitsPerStep;
            long done = run.Step = step + 1;
            // what follows reads the step back for the log, the callbacks and validation: rank 0's. The other ranks never
            // wait for their GPU: what keeps them in step with rank 0 (the learning rate, a function of the step; the
            // non-finite skip and fp16's loss scale, decided on the device from the same averaged gradients) needs no read.
            if (loss is null) continue;
            pending.Add(loss);
            bool log = done % t.LogEveryNSteps == 0 || done == t.MaxSteps;
            if (log) ReadPending(run, pending);

            double now = sw.Elapsed.TotalSeconds;
            window.Enqueue((done, now));
            while (window.Count > 20) window.Dequeue();
            var (s0, t0) = window.Peek();
            run.UnitsPerSecond = window.Count >= 2 ? (done - s0) * unitsPerStep / Math.Max(1e-9, now - t0) : unitsPerStep / Math.Max(1e-9, now);
            run.Mfu = peak is { } p ? run.UnitsPerSecond / task.UnitsPerSample * task.FlopsPerSample / (p * t.Devices) : null;
            double secPerStep = window.Count >= 2 ? (now - t0) / (done - s0) : now / Math.Max(1, done - run.StartStep);
            run.Eta = TimeSpan.FromSeconds(secPerStep * (t.MaxSteps - done));
            run.Elapsed = sw.Elapsed;

            if (log)
            {
                var rec = new Dictionary<string, double>
                {
                    ["loss"] = run.LastLoss, ["lr"] = run.Lr, ["grad_norm"] = run.GradNorm, [task.Unit + "_per_s"] = run.UnitsPerSecond,
                    [task.Unit == "tok" ? "tokens" : "images"] = run.UnitsSeen, ["elapsed_s"] = now,
                };
                if (run.Mfu is { } mfu) rec["mfu"] = mfu;
                // the .NET runtime's share of a step (cumulative since start): a collection pauses every managed
                // thread, the autograd thread too when it calls back into a custom function's backward
                rec["gc_collections"] = GC.CollectionCount(0);
                rec["gc_pause_ms"] = GC.GetTotalPauseDuration().TotalMilliseconds;
                rec["alloc_mb"] = GC.GetTotalAllocatedBytes() / 1e6;
                if (run.LossScale is { } scale) rec["loss_scale"] = scale;
                if (run.Skipped) rec["skipped"] = 1;
                foreach (var cb in callbacks) cb.OnLog(run, rec);
            }
            foreach (var cb in callbacks) cb.OnTrainBatchEnd(run);
            if (t.ValCheckInterval > 0 && done % t.ValCheckInterval == 0 && done != t.MaxSteps) Validate(run, callbacks);
        }
        if ((t.MaxSteps > run.StartStep || run.ValLoss is null) && IsRankZero) Validate(run, callbacks);
        foreach (var cb in callbacks) cb.OnTrainEnd(run);
        run.Elapsed = sw.Elapsed;
        var plot = run.PlotPath;
        Log.WriteLine($"done: {t.MaxSteps - run.StartStep} steps in {run.Elapsed:hh\\:mm\\:ss}, loss {run.FirstLoss:F4} -> {run.LastLoss:F4}" +
            (run.ValLoss is { } v ? $", val_loss {v:F4} (ppl {Math.Exp(v):F1})" : "") + $", {Format.Rate(run.UnitsPerSecond)} {task.Unit}/s" +
            (run.Mfu is { } m3 ? $", MFU {m3 * 100:F1}%" : "") + $"; metrics {MetricsLogger.PathIn(run.RunDir)}" + (plot != null ? $", plot {plot}" : ""));
        return new TrainResult(run.RunDir, t.MaxSteps - run.StartStep, run.FirstLoss, run.LastLoss, run.ValLoss, run.UnitsPerSecond, run.Mfu,
            run.Elapsed, run.Losses, plot);
    }

    /// <summary>
    /// One optimizer step over the accumulated micro-batches; returns the summed loss, still on the device (null unless
    /// <paramref name="keepLoss"/>: a rank other than 0 does not log it). Nothing here waits for the GPU: the learning rate
    /// reaches the optimizer through ParamGroups (written to its device table with fill_), the gradient norm, clipping and
    /// the non-finite skip happen on the device, fp16's loss scale lives there, and gradients are set to none.
    /// </summary>
    internal static Tensor? TrainStep(TrainingRun run, long step, bool keepLoss)
    {
        using var scope = NewDisposeScope();
        var (opt, scaler, accum, seed) = (run.Optimizer, run.Scaler, run.Config.Accumulation, run.Config.Seed);
        foreach (var group in opt.ParamGroups) group.LearningRate = run.Lr;
        // dropout: a pure function of the step, so resume reproduces it. manual_seed returns a wrapper of the default
        // generator, a native handle: disposed here rather than left to the finalizer thread, once a step
        torch.manual_seed(seed * 1_000_003 + step + 1).Dispose();
        if (run.Device.type == DeviceType.CUDA) torch.cuda.manual_seed_all(seed * 1_000_003 + step + 1);
        // the gradient each micro-batch's loss receives, a device scalar the task may compute gradients for in its forward
        using var scalars = new ScalarScope(); // number arguments, as Scalars freed here rather than by the finalizer
        var lossGrad = scaler is null ? full(Array.Empty<long>(), scalars.Of(1.0 / accum), ScalarType.Float32, run.Device)
                                      : scaler.Scale / scalars.OfInt64(accum);
        Tensor? lossSum = null;
        for (int a = 0; a < accum; a++)
        {
            var loss = run.Task.TrainLoss(run.Config.Data.BatchSize, lossGrad);
            (loss * lossGrad).backward();
            // every micro-batch's gradients, before accumulate_grad takes 16-bit ones into its float32 sums: the sums and
            // the last micro-batch's gradients the optimizer reads are then the ranks' means
            run.Reducer?.AllReduce(run.Gradients);
            // the last micro-batch's 16-bit gradients are read by the optimizer together with the fp32 sums
            if (a < accum - 1) opt.accumulate_grad();
            if (keepLoss)
            {
                var d = loss.detach().to(ScalarType.Float32);
                lossSum = lossSum is null ? d : lossSum.add(d, Scalars.One);
            }
            scope.DisposeEverythingBut(new[] { lossSum, lossGrad }.OfType<Tensor>()); // what lives across the micro-batches
        }
        opt.step();
        scaler?.Update(opt.found_inf);
        opt.zero_grad();
        return lossSum?.DetachFromDisposeScope();
    }

    /// <summary>Reads the pending steps' losses with the last grad norm, skip flag and fp16's loss scale in one copy (a log
    /// step's only wait).</summary>
    static void ReadPending(TrainingRun run, List<Tensor> pending)
    {
        using var _ = NewDisposeScope();
        var opt = run.Optimizer;
        Tensor[] last = run.Scaler is { } scaler ? [opt.grad_norm, opt.found_inf, scaler.Scale] : [opt.grad_norm, opt.found_inf];
        var read = stack([.. pending, .. last]).cpu().data<float>().ToArray();
        int n = pending.Count;
        for (int i = 0; i < n; i++) run.Losses.Add(read[i] / run.Config.Accumulation);
        (run.GradNorm, run.Skipped) = (read[n], read[n + 1] != 0);
        if (run.Scaler is not null) run.LossScale = read[n + 2];
        foreach (var t in pending) t.Dispose();
        pending.Clear();
    }

    /// <summary>An evaluation (trainer.limit_val_batches batches of datamodule.batch_size_eval); its metrics go to the callbacks.</summary>
    void Validate(TrainingRun run, IReadOnlyList<ITrainerCallback> callbacks)
    {
        var m = run.Task.Evaluate(_c.Data.BatchSizeEval, _c.Trainer.LimitValBatches);
        if (m.Count == 0) return;
        run.ValLoss = m.TryGetValue("val_loss", out var vl) ? vl : null;
        foreach (var cb in callbacks) cb.OnValidationEnd(run, m);
    }
}

/// <summary>Dense peak FLOP/s of one GPU for MFU (16-bit tensor cores; TF32 for fp32), by the name nvidia-smi reports.</summary>
public static class PeakFlops
{
    public static double? ForCurrentGpu(Precision precision)
    {
        string? name = null;
        try
        {
            var psi = new ProcessStartInfo("nvidia-smi", "--query-gpu=name --format=csv,noheader") { RedirectStandardOutput = true, RedirectStandardError = true };
            using var p = Process.Start(psi);
            name = p?.StandardOutput.ReadLine();
            p?.WaitForExit(5000);
        }
        catch { }
        return name is null ? null : ForName(name, precision);
    }

    public static double? ForName(string name, Precision precision)
    {
        double? half = name switch
        {
            _ when name.Contains("H200") => 989e12,
            _ when name.Contains("H100") && name.Contains("PCIe") => 756e12,
            _ when name.Contains("H100") => 989e12,
            _ when name.Contains("A100") => 312e12,
            _ when name.Contains("L40S") => 362e12,
            _ when name.Contains("A10") => 125e12,
            _ => null,
        };
        return half is null ? null : precision == Precision.Fp32 ? half / 2 : half;
    }
}
