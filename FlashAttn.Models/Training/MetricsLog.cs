using System.Globalization;
using System.Text.Json.Nodes;
using TorchSharp;

namespace FlashAttn.Models.Training;

/// <summary>metrics.jsonl (one JSON object per logged step or evaluation) and TensorBoard event files
/// (TorchSharp's SummaryWriter) under the run folder.</summary>
public sealed class MetricsLog : IDisposable
{
    readonly StreamWriter _jsonl;
    readonly TorchSharp.Modules.SummaryWriter? _tb;
    public string JsonlPath { get; }

    /// <summary>Opens the log; on resume keeps only the records up to <paramref name="keepUpToStep"/>.</summary>
    public MetricsLog(string runDir, bool tensorboard, long keepUpToStep = -1)
    {
        JsonlPath = Path.Combine(runDir, RunFolder.MetricsFile);
        var keep = new List<string>();
        if (keepUpToStep >= 0 && File.Exists(JsonlPath))
            keep = File.ReadAllLines(JsonlPath).Where(l => l.Length > 0 && JsonNode.Parse(l)?["step"]?.GetValue<long>() <= keepUpToStep).ToList();
        _jsonl = new StreamWriter(JsonlPath, append: false) { AutoFlush = true };
        foreach (var l in keep) _jsonl.WriteLine(l);
        if (tensorboard)
        {
            try { _tb = torch.utils.tensorboard.SummaryWriter(Path.Combine(runDir, RunFolder.TensorBoardDir)); }
            catch (Exception e) { Console.Error.WriteLine($"warning: TensorBoard writer unavailable ({e.Message})"); }
        }
    }

    public void Write(long step, IReadOnlyDictionary<string, double> values)
    {
        var o = new JsonObject { ["step"] = step };
        foreach (var (k, v) in values) o[k] = double.IsFinite(v) ? v : null;
        _jsonl.WriteLine(o.ToJsonString());
        if (_tb != null)
            foreach (var (k, v) in values)
                if (double.IsFinite(v) && k != "epoch") _tb.add_scalar(k.StartsWith("val_") ? "val/" + k[4..] : "train/" + k, (float)v, checked((int)step));
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
        _jsonl.Dispose();
    }
}

/// <summary>A one-line live progress bar on a terminal; periodic plain lines when redirected.</summary>
public sealed class ProgressBar(TextWriter output, bool enabled, long totalSteps)
{
    readonly bool _interactive = enabled && !Console.IsErrorRedirected && ReferenceEquals(output, Console.Error);
    DateTime _lastPrint = DateTime.MinValue;
    int _lastLength;

    public void Update(long step, string line, bool force = false)
    {
        if (!enabled) return;
        if (_interactive)
        {
            if (!force && (DateTime.UtcNow - _lastPrint).TotalMilliseconds < 100) return;
            var bar = Bar(step, 20);
            var s = $"\r{bar} {line}";
            output.Write(s.PadRight(_lastLength));
            _lastLength = s.Length;
        }
        else
        {
            long every = Math.Max(1, totalSteps / 20);
            if (!force && step % every != 0 && step != totalSteps && (DateTime.UtcNow - _lastPrint).TotalSeconds < 30) return;
            output.WriteLine(line);
        }
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
