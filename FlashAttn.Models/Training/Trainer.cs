using System.Diagnostics;
using System.Globalization;
using System.Text.Json.Nodes;
using TorchSharp;
using static TorchSharp.torch;

namespace FlashAttn.Models.Training;

/// <summary>What a finished run reports.</summary>
public sealed record TrainResult(string RunDir, long Steps, double FirstLoss, double LastLoss, double? ValLoss, double TokensPerSecond,
    double? Mfu, TimeSpan Elapsed, IReadOnlyList<double> Losses, string? PlotPath);

/// <summary>The model- and task-agnostic training loop: gradient accumulation to the configured
/// global batch, fp32 / bf16 / fp16 (fp32 master weights; fp16 with dynamic loss scaling), AdamW with
/// the model's decay groups, warmup + cosine/linear schedule, gradient clipping, periodic
/// evaluation, atomic checkpoints with exact resume (data order, schedule, optimizer, dropout RNG),
/// a live progress bar, metrics.jsonl, TensorBoard events and a PNG plot.</summary>
public sealed class Trainer
{
    readonly ExperimentConfig _c;
    readonly TextWriter _log;

    public Trainer(ExperimentConfig config, TextWriter? log = null)
    {
        _c = config;
        _log = log ?? Console.Error;
    }

    /// <summary>Builds the task the config names (lm or image_classification).</summary>
    public static Func<ExperimentConfig, Device, ScalarType, TextWriter, ITrainingTask> TaskFactory { get; set; } = DefaultTaskFactory;

    static ITrainingTask DefaultTaskFactory(ExperimentConfig c, Device device, ScalarType dtype, TextWriter log) => c.Str("task") switch
    {
        "lm" => new LanguageModelingTask(c, device, dtype, log),
        "image_classification" => new ImageClassificationTask(c, device, dtype, log),
        var t => throw new ConfigException($"task={t} is not valid; valid values: lm, image_classification"),
    };

    public static Precision ParsePrecision(string p) => p switch { "32" => Precision.Fp32, "bf16" => Precision.Bf16, "16" => Precision.Fp16, _ => throw new ConfigException($"trainer.precision={p}; valid values: 32, bf16, 16") };

    /// <summary>The type the model computes in: bf16, fp16, or float32.</summary>
    public static ScalarType ComputeDtype(Precision precision) =>
        precision switch { Precision.Bf16 => ScalarType.BFloat16, Precision.Fp16 => ScalarType.Float16, _ => ScalarType.Float32 };

    public static Device ResolveDevice(ExperimentConfig c) => ResolveDevice(c.Str("trainer.accelerator"));

    /// <summary>auto: CUDA when a device is available, else the CPU. <paramref name="setting"/> names the option in errors.</summary>
    public static Device ResolveDevice(string acc, string setting = "trainer.accelerator")
    {
        bool cuda = acc == "cuda" || acc == "auto" && torch.cuda.is_available();
        if (acc == "cuda" && !torch.cuda.is_available()) throw new ConfigException($"{setting}=cuda but no CUDA device is available; valid values: auto, cpu, cuda");
        return cuda ? torch.CUDA : torch.CPU;
    }

    public TrainResult Run()
    {
        var devices = _c.Int("trainer.devices");
        int accum = _c.Accumulation; // computed with the device count, as specified
        if (devices != 1)
            throw new ConfigException($"trainer.devices={devices} needs the multi-GPU launcher (issue 10); use 1 (accumulation would be {accum} at datamodule.batch_size={_c.Int("datamodule.batch_size")})");
        long global = _c.Int("train.global_batch_size"), micro = _c.Int("datamodule.batch_size");
        if (accum * devices * micro != global)
            _log.WriteLine($"warning: train.global_batch_size={global} is not a multiple of trainer.devices × datamodule.batch_size = {devices * micro}; each step uses {accum * devices * micro}");
        var precision = ParsePrecision(_c.Str("trainer.precision"));
        var device = ResolveDevice(_c);
        int threads = (int)_c.Int("trainer.num_threads");
        if (device.type == DeviceType.CPU && threads > 0) torch.set_num_threads(threads);
        var computeDtype = ComputeDtype(precision);
        long seed = _c.Int("seed");
        long maxSteps = _c.Int("trainer.max_steps");

        var runDir = Path.Combine(_c.Str("trainer.default_root_dir"), _c.RunName);
        var ckptDir = Path.Combine(runDir, RunFolder.CheckpointsDir);
        if (_c["model.init_from"] is { } from)
        {
            // pinned (an absolute path; checkpoints/last replaced by the folder it names now), and when training never inside
            // this run's folder, which the run rewrites (a fine-tuning run of the main job's runs/tiny defaults to that folder)
            var pinned = Checkpoint.Pin(from);
            if (maxSteps > 0 && RunFolder.Contains(runDir, pinned))
                throw new ConfigException($"model.init_from={from} lies in this run's folder {runDir}, which the run rewrites; " +
                    $"name the run otherwise (name={_c.RunName}-ft) or set trainer.default_root_dir");
            _c.Set("model.init_from", pinned);
        }
        // the folder belongs to one run: refused here, before the data and the model are prepared; taken (RunFolder.Start)
        // once the run is ready for its first step, and nothing is written into it before
        bool overwrite = _c.Bool("trainer.overwrite");
        bool resumesHere = _c["resume"] is { } resuming && (resuming == "last" || RunFolder.Contains(runDir, Checkpoint.Pin(resuming)));
        if (maxSteps > 0) RunFolder.Check(runDir, _c.RunName, resumesHere, overwrite);

        torch.manual_seed(seed);
        if (device.type == DeviceType.CUDA) torch.cuda.manual_seed_all(seed);
        using var task = TaskFactory(_c, device, computeDtype, _log);
        task.Model.train();
        double weightDecay = _c.Float("train.optimizer.weight_decay");
        using var opt = TrainingOptimizer.Create(task.Parameters, precision, _c.Float("train.optimizer.beta1"), _c.Float("train.optimizer.beta2"),
            _c.Float("train.optimizer.eps"), weightDecay, maxNorm: _c.Float("trainer.gradient_clip_val"));
        task.InitializeOptimizer(opt);
        using var scaler = precision == Precision.Fp16 ? new DynamicLossScaler(device) : null;
        opt.grad_scale = scaler?.Scale;
        var schedule = LrSchedule.From(_c);

        long startStep = 0;
        double unitsSeen = 0;
        // names this run's checkpoints (kept on resume): rotation and the best-k choice consider no other run's
        var runId = Guid.NewGuid().ToString("N");
        if (_c["resume"] is { } resumeSpec)
        {
            var dir = Checkpoint.Resolve(resumeSpec, ckptDir);
            var (tensors, state) = Checkpoint.Load(dir);
            TrainingOptimizer.LoadStateTensors(opt, task.Parameters, tensors, state["adam_t"]!.GetValue<long>());
            foreach (var t in tensors.Values) t.Dispose();
            startStep = state["step"]!.GetValue<long>();
            task.SamplerState = state["sampler"]!;
            unitsSeen = state["units_seen"]?.GetValue<double>() ?? 0;
            runId = state["run_id"]?.GetValue<string>() ?? runId;
            if (scaler != null && state["loss_scale"] is JsonValue ls) scaler.Load(ls.GetValue<double>(), state["good_steps"]!.GetValue<int>());
            _log.WriteLine($"resumed from {dir} at step {startStep}");
            if (state["config"]?.GetValue<string>() is { } saved)
            {
                static Dictionary<string, string> Lines(string d) => d.Split('\n', StringSplitOptions.RemoveEmptyEntries)
                    .Select(l => l.Split(": ", 2)).Where(a => a.Length == 2).ToDictionary(a => a[0], a => a[1].Trim());
                var before = Lines(saved); var now = Lines(_c.Dump());
                var changed = now.Where(kv => kv.Key is not ("resume" or "trainer.max_steps" or "trainer.overwrite") && before.TryGetValue(kv.Key, out var b) && b != kv.Value)
                    .Select(kv => $"{kv.Key} ({before[kv.Key]} -> {kv.Value})").ToList();
                if (changed.Count > 0) _log.WriteLine($"warning: resuming with changed settings: {string.Join(", ", changed)}");
            }
        }

        double? peak = _c.FloatOrNull("trainer.peak_tflops") is { } pt ? pt * 1e12 : device.type == DeviceType.CUDA ? PeakFlops.ForCurrentGpu(precision) : null;
        _log.WriteLine($"experiment {_c.Str("experiment")}: {task.Description}");
        _log.WriteLine($"device {device.type} ×{devices}, precision {_c.Str("trainer.precision")}, global batch {global} = {devices} device(s) × {micro} × {accum} accumulation, " +
            $"{maxSteps} steps, lr {schedule.Lr:G3} ({schedule.Name}, warmup {schedule.WarmupSteps}), run folder {runDir}");
        var optimized = TrainingOptimizer.Optimized(task.Parameters);
        _log.WriteLine($"AdamW: {optimized.Where(np => np.weight_decay).Sum(np => np.parameter.numel()):N0} parameters with weight decay {weightDecay}, " +
            $"{optimized.Where(np => !np.weight_decay).Sum(np => np.parameter.numel()):N0} without" + (opt.uses_kernels ? " (fused kernels)" : ""));

        int limitVal = (int)_c.Int("trainer.limit_val_batches");
        int evalBatch = (int)(_c.IntOrNull("datamodule.batch_size_eval") ?? micro);
        if (maxSteps == 0)
        {
            // evaluation only (nanoGPT's eval_only): the validation metrics of the weights as they are (model.init_from,
            // resume), over trainer.limit_val_batches batches (0: the whole split); nothing is written
            var sw0 = Stopwatch.StartNew();
            var m = task.Evaluate(evalBatch, limitVal);
            if (m.Count == 0) throw new ConfigException("trainer.max_steps=0 evaluates only, but the data has no validation split");
            _log.WriteLine("evaluation only (trainer.max_steps=0): " + string.Join(", ", m.Select(kv => $"{kv.Key} {kv.Value:F4}")) +
                $" in {sw0.Elapsed.TotalSeconds:F1} s");
            return new TrainResult(runDir, 0, double.NaN, double.NaN, m["val_loss"], 0, null, sw0.Elapsed, [], null);
        }

        using var runFolder = RunFolder.Start(runDir, _c.RunName, resumesHere, overwrite, _c.Dump(), _log);
        using var metrics = new MetricsLog(runDir, _c.Bool("trainer.tensorboard"), keepUpToStep: startStep);
        var bar = new ProgressBar(_log, _c.Bool("trainer.progress_bar"), maxSteps);
        long valEvery = _c.Int("trainer.val_check_interval"), logEvery = Math.Max(1, _c.Int("trainer.log_every_n_steps"));
        long ckptEvery = _c.Int("trainer.checkpoint_every_n_steps");
        int saveTopK = (int)_c.Int("trainer.save_top_k");
        var losses = new List<double>();
        double? lastVal = null;
        double firstLoss = double.NaN, lastLoss = double.NaN;
        double unitsPerStep = (double)accum * micro * task.UnitsPerSample;
        var sw = Stopwatch.StartNew();
        var window = new Queue<(long step, double t)>();
        double tokPerS = 0; double? mfu = null;

        JsonObject TrainerState(long stepsDone)
        {
            var state = new JsonObject
            {
                ["step"] = stepsDone, ["adam_t"] = TrainingOptimizer.AdamT(opt, task.Parameters), ["sampler"] = task.SamplerState.DeepClone(), ["units_seen"] = unitsSeen,
                ["experiment"] = _c.Str("experiment"), ["config"] = _c.Dump(), ["run_id"] = runId,
            };
            if (task.ModelConfigJson is { } model) state["model_config"] = model;
            if (scaler != null) { state["loss_scale"] = scaler.Scale.item<float>(); state["good_steps"] = (int)scaler.GoodSteps.item<float>(); }
            return state;
        }

        void SaveCheckpoint(long stepsDone)
        {
            var path = Checkpoint.Save(ckptDir, stepsDone, TrainingOptimizer.StateTensors(opt, task.Parameters), TrainerState(stepsDone));
            bar.Message($"checkpoint {path}");
        }

        void Evaluate(long stepsDone)
        {
            var m = task.Evaluate(evalBatch, limitVal);
            if (m.Count == 0) return;
            metrics.Write(stepsDone, m);
            lastVal = m.TryGetValue("val_loss", out var vl) ? vl : null;
            bar.Message($"step {stepsDone}: " + string.Join(", ", m.Select(kv => $"{kv.Key} {kv.Value:F4}")));
            if (lastVal is { } val && Checkpoint.SaveIfBest(ckptDir, stepsDone, val, saveTopK, TrainingOptimizer.StateTensors(opt, task.Parameters), TrainerState(stepsDone)) is { } best)
                bar.Message($"best checkpoint {best} (val_loss {val:F4})");
        }

        // Nothing in a step waits for the GPU: each step's loss stays on the device (summed over its micro-batches) and is
        // read, with the grad norm and the skip flag, at log steps and at the end; the learning rate reaches the optimizer
        // through ParamGroups (written to its device table with fill_), fp16's loss scale lives on the device.
        var pending = new List<Tensor>();
        double gradNorm = double.NaN;
        bool skipped = false;
        void ReadPending()
        {
            using var _ = NewDisposeScope();
            var read = stack([.. pending, opt.grad_norm, opt.found_inf]).cpu().data<float>().ToArray();
            for (int i = 0; i < pending.Count; i++)
            {
                double l = read[i] / accum;
                losses.Add(l);
                if (losses.Count == 1) firstLoss = l;
                lastLoss = l;
            }
            (gradNorm, skipped) = (read[^2], read[^1] != 0);
            foreach (var t in pending) t.Dispose();
            pending.Clear();
        }

        for (long step = startStep; step < maxSteps; step++)
        {
            using var scope = NewDisposeScope();
            double lr = schedule.At(step);
            foreach (var group in opt.ParamGroups) group.LearningRate = lr;
            torch.manual_seed(seed * 1_000_003 + step + 1); // dropout: a pure function of the step, so resume reproduces it
            if (device.type == DeviceType.CUDA) torch.cuda.manual_seed_all(seed * 1_000_003 + step + 1);
            var lossScale = scaler is null ? null : scaler.Scale / accum;
            Tensor? lossSum = null;
            for (int a = 0; a < accum; a++)
            {
                var loss = task.TrainLoss((int)micro);
                var scaled = lossScale is null ? loss * (1.0 / accum) : loss * lossScale;
                scaled.backward();
                // the last micro-batch's 16-bit gradients are read by the optimizer together with the fp32 sums
                if (a < accum - 1) opt.accumulate_grad();
                var d = loss.detach().to(ScalarType.Float32);
                lossSum = lossSum is null ? d : lossSum + d;
                scope.DisposeEverythingBut(lossScale is null ? [lossSum] : [lossSum, lossScale]);
            }
            opt.step();
            scaler?.Update(opt.found_inf);
            opt.zero_grad();
            pending.Add(lossSum!.DetachFromDisposeScope());
            unitsSeen += unitsPerStep;
            long done = step + 1;
            bool log = done % logEvery == 0 || done == maxSteps;
            if (log) ReadPending();

            double now = sw.Elapsed.TotalSeconds;
            window.Enqueue((done, now));
            while (window.Count > 20) window.Dequeue();
            if (window.Count >= 2)
            {
                var (s0, t0) = window.Peek();
                tokPerS = (done - s0) * unitsPerStep / Math.Max(1e-9, now - t0);
            }
            else tokPerS = unitsPerStep / Math.Max(1e-9, now);
            mfu = peak is { } p ? tokPerS / task.UnitsPerSample * task.FlopsPerSample / (p * devices) : null;
            double secPerStep = window.Count >= 2 ? (now - window.Peek().t) / (done - window.Peek().step) : now / Math.Max(1, done - startStep);
            var eta = TimeSpan.FromSeconds(secPerStep * (maxSteps - done));

            if (log)
            {
                var rec = new Dictionary<string, double>
                {
                    ["loss"] = lastLoss, ["lr"] = lr, ["grad_norm"] = gradNorm, [task.Unit + "_per_s"] = tokPerS,
                    [task.Unit == "tok" ? "tokens" : "images"] = unitsSeen, ["elapsed_s"] = now,
                };
                if (mfu is { } mf) rec["mfu"] = mf;
                if (scaler != null) rec["loss_scale"] = scaler.Scale.item<float>();
                if (skipped) rec["skipped"] = 1;
                metrics.Write(done, rec);
            }
            // the loss shown is the last one read (at the last log step): none before the first
            string shown = losses.Count == 0 ? "-" : lastLoss.ToString("F4", CultureInfo.InvariantCulture);
            bar.Update(done, $"step {done}/{maxSteps} | loss {shown} | lr {lr:0.00e+0} | {FormatRate(tokPerS)} {task.Unit}/s" +
                (mfu is { } m2 ? $" | MFU {m2 * 100:F1}%" : "") + $" | ETA {ProgressBar.Eta(eta)}", force: done == maxSteps);

            if (valEvery > 0 && done % valEvery == 0 && done != maxSteps) Evaluate(done);
            if (ckptEvery > 0 && done % ckptEvery == 0 && done != maxSteps) SaveCheckpoint(done);
        }
        bar.Finish();
        if (maxSteps > startStep || lastVal is null) Evaluate(maxSteps);
        if (maxSteps > startStep) SaveCheckpoint(maxSteps);
        try { task.SaveWeights(Path.Combine(runDir, RunFolder.ModelFile)); }
        catch (Exception e) { _log.WriteLine($"warning: could not write model.safetensors ({e.Message})"); }

        string? plotPath = null;
        if (_c.Bool("trainer.plot"))
        {
            plotPath = Path.Combine(runDir, RunFolder.PlotFile);
            var (tr, va, lrs) = MetricsLog.ReadSeries(metrics.JsonlPath);
            try { LossPlot.Write(plotPath, Shorten($"{_c.Str("experiment")}: {task.Description}", 96), tr, va, lrs); }
            catch (Exception e) { _log.WriteLine($"warning: could not write the plot ({e.Message})"); plotPath = null; }
        }
        var elapsed = sw.Elapsed;
        _log.WriteLine($"done: {maxSteps - startStep} steps in {elapsed:hh\\:mm\\:ss}, loss {firstLoss:F4} -> {lastLoss:F4}" +
            (lastVal is { } v ? $", val_loss {v:F4} (ppl {Math.Exp(v):F1})" : "") + $", {FormatRate(tokPerS)} {task.Unit}/s" +
            (mfu is { } m3 ? $", MFU {m3 * 100:F1}%" : "") + $"; metrics {metrics.JsonlPath}" + (plotPath != null ? $", plot {plotPath}" : ""));
        return new TrainResult(runDir, maxSteps - startStep, firstLoss, lastLoss, lastVal, tokPerS, mfu, elapsed, losses, plotPath);
    }

    static string Shorten(string s, int n) => s.Length <= n ? s : s[..(n - 1)] + "…";

    static string FormatRate(double r) => r >= 1e6 ? (r / 1e6).ToString("F2", CultureInfo.InvariantCulture) + "M" : r >= 1e3 ? (r / 1e3).ToString("F1", CultureInfo.InvariantCulture) + "k" : r.ToString("F1", CultureInfo.InvariantCulture);
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
