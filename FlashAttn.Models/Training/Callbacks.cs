using System.Globalization;
using System.Text.Json.Nodes;
using TorchSharp;

namespace FlashAttn.Models.Training;

/// <summary>
/// What runs around the step loop (PyTorch Lightning's Callback): the trainer calls each hook on every callback in order.
/// None of them reads from the device: the values of <see cref="OnLog"/> were read once at the log step.
/// </summary>
public interface ITrainerCallback
{
    /// <summary>Once the run folder is taken, before the first step (after a resume: the resumed step).</summary>
    void OnTrainStart(TrainingRun run) { }
    /// <summary>At log steps (trainer.log_every_n_steps and the last), before <see cref="OnTrainBatchEnd"/>: the metrics
    /// read back (loss, lr, grad_norm, throughput, ...).</summary>
    void OnLog(TrainingRun run, IReadOnlyDictionary<string, double> metrics) { }
    /// <summary>After every optimizer step (<see cref="TrainingRun.Step"/> steps done).</summary>
    void OnTrainBatchEnd(TrainingRun run) { }
    /// <summary>After each evaluation (trainer.val_check_interval and the end): val_loss first.</summary>
    void OnValidationEnd(TrainingRun run, IReadOnlyDictionary<string, double> metrics) { }
    /// <summary>Once, after the last step and its evaluation.</summary>
    void OnTrainEnd(TrainingRun run) { }
}

/// <summary>metrics.jsonl: one JSON object per logged step or evaluation. On resume the records after the resumed step
/// (written by the interrupted run past its checkpoint) are dropped.</summary>
public sealed class MetricsLogger : ITrainerCallback, IDisposable
{
    StreamWriter? _jsonl;

    public static string PathIn(string runDir) => Path.Combine(runDir, RunFolder.MetricsFile);

    public void OnTrainStart(TrainingRun run)
    {
        var path = PathIn(run.RunDir);
        var keep = File.Exists(path)
            ? File.ReadAllLines(path).Where(l => l.Length > 0 && JsonNode.Parse(l)?["step"]?.GetValue<long>() <= run.StartStep).ToList()
            : [];
        _jsonl = new StreamWriter(path, append: false) { AutoFlush = true };
        foreach (var l in keep) _jsonl.WriteLine(l);
    }

    public void OnLog(TrainingRun run, IReadOnlyDictionary<string, double> metrics) => Write(run.Step, metrics);

    public void OnValidationEnd(TrainingRun run, IReadOnlyDictionary<string, double> metrics) => Write(run.Step, metrics);

    public void OnTrainEnd(TrainingRun run) => Dispose();

    void Write(long step, IReadOnlyDictionary<string, double> values)
    {
        var o = new JsonObject { ["step"] = step };
        foreach (var (k, v) in values) o[k] = double.IsFinite(v) ? v : null;
        _jsonl!.WriteLine(o.ToJsonString());
    }

    /// <summary>Reads the series back (for the plot): train loss, val loss, lr by step.</summary>
    public static (List<(long, double)> train, List<(long, double)> val, List<(long, double)> lr) ReadSeries(string path)
    {
        var train = new List<(long, double)>(); var val = new List<(long, double)>(); var lr = new List<(long, double)>();
        foreach (var line in File.ReadLines(path))
        {
            if (line.Length == 0) continue;
            var o = JsonNode.Parse(line)!.AsObject();
            long step = o["step"]!.GetValue<long>();
            if (o["loss"] is JsonValue l) train.Add((step, l.GetValue<double>()));
            if (o["val_loss"] is JsonValue v) val.Add((step, v.GetValue<double>()));
            if (o["lr"] is JsonValue r) lr.Add((step, r.GetValue<double>()));
        }
        return (train, val, lr);
    }

    public void Dispose()
    {
        _jsonl?.Dispose();
        _jsonl = null;
    }
}

/// <summary>TensorBoard event files (TorchSharp's SummaryWriter) under the run's tensorboard/: train/* at log steps,
/// val/* at evaluations.</summary>
public sealed class TensorBoardLogger : ITrainerCallback
{
    TorchSharp.Modules.SummaryWriter? _writer;

    public void OnTrainStart(TrainingRun run)
    {
        try { _writer = torch.utils.tensorboard.SummaryWriter(Path.Combine(run.RunDir, RunFolder.TensorBoardDir)); }
        catch (Exception e) { run.Print($"warning: TensorBoard writer unavailable ({e.Message})"); }
    }

    public void OnLog(TrainingRun run, IReadOnlyDictionary<string, double> metrics) => Write(run.Step, metrics);

    public void OnValidationEnd(TrainingRun run, IReadOnlyDictionary<string, double> metrics) => Write(run.Step, metrics);

    void Write(long step, IReadOnlyDictionary<string, double> values)
    {
        if (_writer is null) return;
        foreach (var (k, v) in values)
            if (double.IsFinite(v)) _writer.add_scalar(k.StartsWith("val_") ? "val/" + k[4..] : "train/" + k, (float)v, checked((int)step));
    }
}

/// <summary>The live progress line (step, loss, lr, throughput, MFU, ETA) and the evaluation results. The loss shown is the
/// last one read (at the last log step): none before the first.</summary>
public sealed class ProgressBarCallback(ProgressBar bar) : ITrainerCallback
{
    public void OnTrainBatchEnd(TrainingRun run)
    {
        bool last = run.Step == run.MaxSteps;
        // the line is built only when it is printed: the bar is throttled, and this runs after every step
        if (bar.Due(run.Step, force: last)) bar.Update(run.Step, Line(run));
        if (last) bar.Finish();
    }

    static string Line(TrainingRun run)
    {
        string shown = run.Losses.Count == 0 ? "-" : run.LastLoss.ToString("F4", CultureInfo.InvariantCulture);
        return $"step {run.Step}/{run.MaxSteps} | loss {shown} | lr {run.Lr:0.00e+0} | {Format.Rate(run.UnitsPerSecond)} {run.Task.Unit}/s" +
            (run.Mfu is { } mfu ? $" | MFU {mfu * 100:F1}%" : "") + $" | ETA {ProgressBar.Eta(run.Eta)}";
    }

    public void OnValidationEnd(TrainingRun run, IReadOnlyDictionary<string, double> metrics) =>
        run.Print($"step {run.Step}: " + string.Join(", ", metrics.Select(kv => $"{kv.Key} {kv.Value:F4}")));
}

/// <summary>
/// Checkpoints (Lightning's ModelCheckpoint): a progress checkpoint every trainer.checkpoint_every_n_steps and at the end
/// (the two newest kept, checkpoints/last naming the newest), the trainer.save_top_k best by val_loss
/// (checkpoints/best-step-*), and the model's weights (model.safetensors) when the run ends.
/// </summary>
public sealed class CheckpointCallback : ITrainerCallback
{
    public void OnTrainBatchEnd(TrainingRun run)
    {
        long every = run.Config.Trainer.CheckpointEveryNSteps;
        if (every > 0 && run.Step % every == 0 && run.Step != run.MaxSteps) Save(run);
    }

    public void OnValidationEnd(TrainingRun run, IReadOnlyDictionary<string, double> metrics)
    {
        if (run.ValLoss is { } val &&
            Checkpoint.SaveIfBest(run.CheckpointsDir, run.Step, val, run.Config.Trainer.SaveTopK, run.StateTensors(), run.State(run.Step)) is { } best)
            run.Print($"best checkpoint {best} (val_loss {val:F4})");
    }

    public void OnTrainEnd(TrainingRun run)
    {
        if (run.MaxSteps > run.StartStep) Save(run);
        try { run.Task.SaveWeights(Path.Combine(run.RunDir, RunFolder.ModelFile)); }
        catch (Exception e) { run.Print($"warning: could not write model.safetensors ({e.Message})"); }
    }

    static void Save(TrainingRun run) =>
        run.Print($"checkpoint {Checkpoint.Save(run.CheckpointsDir, run.Step, run.StateTensors(), run.State(run.Step))}");
}

/// <summary>loss_lr.png at the end: the training and validation loss and the learning rate of metrics.jsonl.</summary>
public sealed class PlotCallback : ITrainerCallback
{
    public void OnTrainEnd(TrainingRun run)
    {
        var path = Path.Combine(run.RunDir, RunFolder.PlotFile);
        var (train, val, lr) = MetricsLogger.ReadSeries(MetricsLogger.PathIn(run.RunDir));
        try
        {
            LossPlot.Write(path, Format.Shorten($"{run.Config.Experiment}: {run.Task.Description}", 96), train, val, lr);
            run.PlotPath = path;
        }
        catch (Exception e) { run.Print($"warning: could not write the plot ({e.Message})"); }
    }
}

/// <summary>A one-line live progress bar on a terminal; periodic plain lines when redirected.</summary>
public sealed class ProgressBar(TextWriter output, bool enabled, long totalSteps)
{
    readonly bool _interactive = enabled && !Console.IsErrorRedirected && ReferenceEquals(output, Console.Error);
    DateTime _lastPrint = DateTime.MinValue;
    int _lastLength;

    /// <summary>Whether the bar prints at <paramref name="step"/> now (<paramref name="force"/>: always when enabled): on a
    /// terminal at most every 100 ms; redirected every twentieth of the run, at the end, and at least every 30 s.</summary>
    public bool Due(long step, bool force = false) =>
        enabled && (force || (_interactive
            ? (DateTime.UtcNow - _lastPrint).TotalMilliseconds >= 100
            : step % Math.Max(1, totalSteps / 20) == 0 || step == totalSteps || (DateTime.UtcNow - _lastPrint).TotalSeconds >= 30));

    /// <summary>Prints <paramref name="line"/> at <paramref name="step"/>; call it when <see cref="Due"/>.</summary>
    public void Update(long step, string line)
    {
        if (_interactive)
        {
            var bar = Bar(step, 20);
            var s = $"\r{bar} {line}";
            output.Write(s.PadRight(_lastLength));
            _lastLength = s.Length;
        }
        else output.WriteLine(line);
        _lastPrint = DateTime.UtcNow;
    }

    /// <summary>A line that stays (evaluation results, checkpoints).</summary>
    public void Message(string line)
    {
        if (_interactive && _lastLength > 0) { output.Write("\r" + new string(' ', _lastLength) + "\r"); _lastLength = 0; }
        output.WriteLine(line);
    }

    public void Finish() { if (_interactive && _lastLength > 0) output.WriteLine(); _lastLength = 0; }

    string Bar(long step, int width)
    {
        int filled = (int)(width * Math.Min(1.0, (double)step / Math.Max(1, totalSteps)));
        return "[" + new string('#', filled) + new string('.', width - filled) + "]";
    }

    public static string Eta(TimeSpan t) => t.TotalHours >= 1 ? $"{(int)t.TotalHours}:{t:mm\\:ss}" : t.ToString(@"mm\:ss", CultureInfo.InvariantCulture);
}

static class Format
{
    public static string Shorten(string s, int n) => s.Length <= n ? s : s[..(n - 1)] + "…";

    public static string Rate(double r) => r >= 1e6 ? (r / 1e6).ToString("F2", CultureInfo.InvariantCulture) + "M"
        : r >= 1e3 ? (r / 1e3).ToString("F1", CultureInfo.InvariantCulture) + "k" : r.ToString("F1", CultureInfo.InvariantCulture);
}
