using System.Text;
using System.Text.Json;
using System.Text.Json.Nodes;
using TorchSharp;
using static TorchSharp.torch;

namespace FlashAttn.Models.Training;

/// <summary>Checkpoints: a folder <c>checkpoints/step-NNNNNNN/</c> with <c>state.bin</c> (named tensors:
/// fp32 master weights and Adam moments) and <c>trainer.json</c> (step, data sampler position, loss
/// scale, Adam's step count, the resolved config). Written into a temporary folder and renamed, then
/// <c>checkpoints/last</c> (a one-line pointer) is replaced atomically: a killed save never leaves a
/// checkpoint that looks complete.</summary>
public static class Checkpoint
{
    const string Magic = "FATCKPT1";

    public static string Save(string checkpointsDir, long step, IReadOnlyDictionary<string, Tensor> tensors, JsonObject trainerState, int keep = 2)
    {
        var name = $"step-{step:D7}";
        var final = WriteFolder(checkpointsDir, name, tensors, trainerState);
        var pointerTmp = Path.Combine(checkpointsDir, $".last.tmp-{Guid.NewGuid():N}");
        File.WriteAllText(pointerTmp, name + "\n");
        File.Move(pointerTmp, Path.Combine(checkpointsDir, "last"), overwrite: true);
        // keep the newest `keep` progress checkpoints
        if (keep > 0)
            foreach (var old in Directory.GetDirectories(checkpointsDir, "step-*").Order(StringComparer.Ordinal).SkipLast(keep))
                try { Directory.Delete(old, true); } catch { }
        return final;
    }

    /// <summary>
    /// Keeps the <paramref name="topK"/> checkpoints with the lowest validation loss as
    /// <c>checkpoints/best-step-NNNNNNN/</c> (val_loss in trainer.json): writes this one only when it
    /// ranks, then removes the ones that fell out. Returns the folder, or null when it did not rank.
    /// </summary>
    public static string? SaveIfBest(string checkpointsDir, long step, double valLoss, int topK,
        IReadOnlyDictionary<string, Tensor> tensors, JsonObject trainerState)
    {
        if (topK <= 0 || !double.IsFinite(valLoss)) return null;
        var ranked = Best(checkpointsDir);
        if (ranked.Count >= topK && valLoss >= ranked[topK - 1].valLoss) return null;
        var state = (JsonObject)trainerState.DeepClone();
        state["val_loss"] = valLoss;
        var final = WriteFolder(checkpointsDir, $"best-step-{step:D7}", tensors, state);
        foreach (var (dir, _) in Best(checkpointsDir).Skip(topK))
            try { Directory.Delete(dir, true); } catch { }
        return final;
    }

    /// <summary>The best-* checkpoints, lowest val_loss first.</summary>
    public static List<(string dir, double valLoss)> Best(string checkpointsDir) =>
        !Directory.Exists(checkpointsDir) ? new() :
        Directory.GetDirectories(checkpointsDir, "best-step-*")
            .Select(d => (dir: d, state: JsonNode.Parse(File.ReadAllText(Path.Combine(d, "trainer.json")))!.AsObject()))
            .Select(x => (x.dir, valLoss: x.state["val_loss"]!.GetValue<double>()))
            .OrderBy(x => x.valLoss).ThenBy(x => x.dir, StringComparer.Ordinal).ToList();

    // Written into a temporary folder and renamed: a killed save never leaves a complete-looking folder.
    private static string WriteFolder(string checkpointsDir, string name, IReadOnlyDictionary<string, Tensor> tensors, JsonObject trainerState)
    {
        Directory.CreateDirectory(checkpointsDir);
        var final = Path.Combine(checkpointsDir, name);
        var tmp = Path.Combine(checkpointsDir, $".{name}.tmp-{Guid.NewGuid():N}");
        Directory.CreateDirectory(tmp);
        try
        {
            WriteTensors(Path.Combine(tmp, "state.bin"), tensors);
            File.WriteAllText(Path.Combine(tmp, "trainer.json"), trainerState.ToJsonString(new JsonSerializerOptions { WriteIndented = true }));
            if (Directory.Exists(final)) Directory.Delete(final, recursive: true);
            Directory.Move(tmp, final);
        }
        catch
        {
            try { Directory.Delete(tmp, true); } catch { }
            throw;
        }
        return final;
    }

    /// <summary>Resolves "last" (the pointer in checkpointsDir) or a folder path.</summary>
    public static string Resolve(string spec, string checkpointsDir)
    {
        if (spec == "last")
        {
            var pointer = Path.Combine(checkpointsDir, "last");
            if (!File.Exists(pointer)) throw new FileNotFoundException($"resume=last: no checkpoint in {checkpointsDir}");
            return Path.Combine(checkpointsDir, File.ReadAllText(pointer).Trim());
        }
        if (!File.Exists(Path.Combine(spec, "trainer.json"))) throw new FileNotFoundException($"resume={spec}: not a checkpoint folder (no trainer.json)");
        return spec;
    }

    /// <summary>An absolute path to the same weights: a checkpoints/last pointer file becomes the checkpoint folder it
    /// names now (later saves of a run move the pointer).</summary>
    public static string Pin(string path) =>
        File.Exists(path) && Path.GetFileName(path) == "last"
            ? Path.GetFullPath(Resolve("last", Path.GetDirectoryName(Path.GetFullPath(path))!))
            : Path.GetFullPath(path).TrimEnd(Path.DirectorySeparatorChar);

    public static (Dictionary<string, Tensor> tensors, JsonObject state) Load(string dir)
    {
        var state = JsonNode.Parse(File.ReadAllText(Path.Combine(dir, "trainer.json")))!.AsObject();
        return (ReadTensors(Path.Combine(dir, "state.bin")), state);
    }

    public static void WriteTensors(string path, IReadOnlyDictionary<string, Tensor> tensors)
    {
        using var fs = new FileStream(path, FileMode.CreateNew, FileAccess.Write, FileShare.None, 1 << 20);
        using var w = new BinaryWriter(fs, Encoding.UTF8);
        w.Write(Magic);
        w.Write(tensors.Count);
        foreach (var (name, t) in tensors.OrderBy(kv => kv.Key, StringComparer.Ordinal))
        {
            using var c = t.detach().cpu().contiguous();
            w.Write(name);
            w.Write((int)c.dtype);
            w.Write((int)c.dim());
            foreach (var d in c.shape) w.Write(d);
            var bytes = c.bytes;
            w.Write((long)bytes.Length);
            w.Write(bytes);
        }
        w.Flush();
        fs.Flush(true);
    }

    /// <summary>The named tensors of a state.bin; <paramref name="keep"/> selects by name (the others are skipped unread:
    /// the masters alone are a third of a checkpoint).</summary>
    public static Dictionary<string, Tensor> ReadTensors(string path, Func<string, bool>? keep = null)
    {
        using var r = new BinaryReader(File.OpenRead(path), Encoding.UTF8);
        if (r.ReadString() != Magic) throw new InvalidDataException($"{path}: not a FlashAttn checkpoint");
        int n = r.ReadInt32();
        var result = new Dictionary<string, Tensor>();
        for (int i = 0; i < n; i++)
        {
            var name = r.ReadString();
            var dtype = (ScalarType)r.ReadInt32();
            var shape = new long[r.ReadInt32()];
            for (int d = 0; d < shape.Length; d++) shape[d] = r.ReadInt64();
            long len = r.ReadInt64();
            if (keep is not null && !keep(name))
            {
                r.BaseStream.Seek(len, SeekOrigin.Current);
                continue;
            }
            var t = empty(shape, dtype);
            var buf = r.ReadBytes(checked((int)len));
            t.bytes = buf;
            result[name] = t;
        }
        return result;
    }
}
