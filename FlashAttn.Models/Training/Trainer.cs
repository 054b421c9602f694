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
        using var opt = new MixedPrecisionAdamW(task.Parameters, precision, _c.Float("train.optimizer.beta1"), _c.Float("train.optimizer.beta2"),
            _c.Float("train.optimizer.eps"), _c.Float("train.optimizer.weight_decay"));
        task.InitializeOptimizer(opt);
        var scaler = precision == Precision.Fp16 ? new DynamicLossScaler() : null;
        var schedule = LrSchedule.From(_c);
        double clip = _c.Float("trainer.gradient_clip_val");

        long startStep = 0;
        double unitsSeen = 0;
        // names this run's checkpoints (kept on resume): rotation and the best-k choice consider no other run's
        var runId = Guid.NewGuid().ToString("N");
        if (_c["resume"] is { } resumeSpec)
        {
            var dir = Checkpoint.Resolve(resumeSpec, ckptDir);
            var (tensors, state) = Checkpoint.Load(dir);
            opt.LoadStateTensors(tensors);
            foreach (var t in tensors.Values) t.Dispose();
            startStep = state["step"]!.GetValue<long>();
            opt.T = state["adam_t"]!.GetValue<long>();
            task.SamplerState = state["sampler"]!;
            unitsSeen = state["units_seen"]?.GetValue<double>() ?? 0;
            runId = state["run_id"]?.GetValue<string>() ?? runId;
            if (scaler != null && state["loss_scale"] is JsonValue ls) { scaler.Scale = ls.GetValue<double>(); scaler.GoodSteps = state["good_steps"]!.GetValue<int>(); }
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
        _log.WriteLine($"AdamW: {opt.DecayedParameters:N0} parameters with weight decay {opt.WeightDecay}, {opt.UndecayedParameters:N0} without");

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
                ["step"] = stepsDone, ["adam_t"] = opt.T, ["sampler"] = task.SamplerState.DeepClone(), ["units_seen"] = unitsSeen,
                ["experiment"] = _c.Str("experiment"), ["config"] = _c.Dump(), ["run_id"] = runId,
            };
            if (task.ModelConfigJson is { } model) state["model_config"] = model;
            if (scaler != null) { state["loss_scale"] = scaler.Scale; state["good_steps"] = scaler.GoodSteps; }
            return state;
        }

        void SaveCheckpoint(long stepsDone)
        {
            var path = Checkpoint.Save(ckptDir, stepsDone, opt.StateTensors(), TrainerState(stepsDone));
            bar.Message($"checkpoint {path}");
        }

        void Evaluate(long stepsDone)
        {
            var m = task.Evaluate(evalBatch, limitVal);
            if (m.Count == 0) return;
            metrics.Write(stepsDone, m);
            lastVal = m.TryGetValue("val_loss", out var vl) ? vl : null;
            bar.Message($"step {stepsDone}: " + string.Join(", ", m.Select(kv => $"{kv.Key} {kv.Value:F4}")));
            if (lastVal is { } val && Checkpoint.SaveIfBest(ckptDir, stepsDone, val, saveTopK, opt.StateTensors(), TrainerState(stepsDone)) is { } best)
                bar.Message($"best checkpoint {best} (val_loss {val:F4})");
        }

        for (long step = startStep; step < maxSteps; step++)
        {
            using var scope = NewDisposeScope();
            double lr = schedule.At(step);
            torch.manual_seed(seed * 1_000_003 + step + 1); // dropout: a pure function of the step, so resume reproduces it
            if (device.type == DeviceType.CUDA) torch.cuda.manual_seed_all(seed * 1_000_003 + step + 1);
            double scale = scaler?.Scale ?? 1.0;
            Tensor? lossSum = null;
            for (int a = 0; a < accum; a++)
            {
                var loss = task.TrainLoss((int)micro);
                var scaled = loss * (scale / accum);
                scaled.backward();
                if (accum > 1) opt.AccumulateGradients();
                var d = loss.detach().to(ScalarType.Float32);
                lossSum = lossSum is null ? d : lossSum + d;
                scope.DisposeEverythingBut(lossSum);
            }
            double lossValue = lossSum!.item<float>() / accum;
            var (gradNorm, stepped) = opt.Step(lr, clip, scale);
            scaler?.Update(stepped);
            opt.ZeroGrad();
            unitsSeen += unitsPerStep;
            long done = step + 1;
            losses.Add(lossValue);
            if (double.IsNaN(firstLoss)) firstLoss = lossValue;
            lastLoss = lossValue;

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

            if (done % logEvery == 0 || done == maxSteps)
            {
                var rec = new Dictionary<string, double>
                {
                    ["loss"] = lossValue, ["lr"] = lr, ["grad_norm"] = gradNorm, [task.Unit + "_per_s"] = tokPerS,
                    [task.Unit == "tok" ? "tokens" : "images"] = unitsSeen, ["elapsed_s"] = now,
                };
                if (mfu is { } mf) rec["mfu"] = mf;
                if (scaler != null) rec["loss_scale"] = scaler.Scale;
                if (!stepped) rec["skipped"] = 1;
                metrics.Write(done, rec);
            }
            bar.Update(done, $"step {done}/{maxSteps} | loss {lossValue:F4} | lr {lr:0.00e+0} | {FormatRate(tokPerS)} {task.Unit}/s" +
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
