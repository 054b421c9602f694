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
        var pointerTmp = TempPaths.For(checkpointsDir, "last");
        File.WriteAllText(pointerTmp, name + "\n");
        File.Move(pointerTmp, Path.Combine(checkpointsDir, "last"), overwrite: true);
        // keep the newest `keep` progress checkpoints: the one just written (which last names) and the highest steps of the
        // others. Every checkpoint in the folder is this run's (a run folder belongs to one run: RunFolder), those written
        // before checkpoints named their run included
        if (keep > 0)
            foreach (var old in Directory.GetDirectories(checkpointsDir, "step-*").Where(d => d != final).Order(StringComparer.Ordinal).SkipLast(keep - 1))
                Discard(old);
        return final;
    }

    /// <summary>
    /// Keeps the <paramref name="topK"/> checkpoints of the folder (of its one run) with the lowest validation loss as
    /// <c>checkpoints/best-step-NNNNNNN/</c> (val_loss in trainer.json): writes this one only when it ranks among them, then
    /// removes the ones that fell out. Returns the folder, or null when it did not rank.
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
            Discard(dir);
        return final;
    }

    /// <summary>The best-* checkpoints, lowest val_loss first; one whose trainer.json cannot be read is never counted nor
    /// removed.</summary>
    public static List<(string dir, double valLoss)> Best(string checkpointsDir) =>
        !Directory.Exists(checkpointsDir) ? new() :
        Directory.GetDirectories(checkpointsDir, "best-step-*")
            .Select(d => (dir: d, state: TryReadState(d)))
            .Where(x => x.state is not null && x.state["val_loss"] is JsonValue)
            .Select(x => (x.dir, valLoss: x.state!["val_loss"]!.GetValue<double>()))
            .OrderBy(x => x.valLoss).ThenBy(x => x.dir, StringComparer.Ordinal).ToList();

    static JsonObject? TryReadState(string dir)
    {
        try { return JsonNode.Parse(File.ReadAllText(Path.Combine(dir, "trainer.json")))?.AsObject(); }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException or JsonException or InvalidOperationException) { return null; }
    }

    // Written into a temporary folder and renamed: a killed save never leaves a complete-looking folder.
    private static string WriteFolder(string checkpointsDir, string name, IReadOnlyDictionary<string, Tensor> tensors, JsonObject trainerState)
    {
        Directory.CreateDirectory(checkpointsDir);
        var final = Path.Combine(checkpointsDir, name);
        var tmp = TempPaths.For(checkpointsDir, name);
        Directory.CreateDirectory(tmp);
        try
        {
            WriteTensors(Path.Combine(tmp, "state.bin"), tensors);
            File.WriteAllText(Path.Combine(tmp, "trainer.json"), trainerState.ToJsonString(new JsonSerializerOptions { WriteIndented = true }));
            // a checkpoint of the same step (a run resumed from an earlier one): set aside, replaced, then removed
            string? replaced = null;
            if (Directory.Exists(final)) Directory.Move(final, replaced = TempPaths.For(checkpointsDir, name));
            Directory.Move(tmp, final);
            if (replaced is not null) try { Directory.Delete(replaced, recursive: true); } catch { /* a temporary name: a later run removes it */ }
        }
        catch
        {
            try { Directory.Delete(tmp, true); } catch { }
            throw;
        }
        return final;
    }

    // Renamed to a temporary name of this process before it is deleted: a kill in the middle leaves a folder the next run
    // removes (RunFolder.Start), never a half-deleted one under a checkpoint's name.
    static void Discard(string dir)
    {
        try
        {
            var doomed = TempPaths.For(Path.GetDirectoryName(dir)!, Path.GetFileName(dir));
            Directory.Move(dir, doomed);
            Directory.Delete(doomed, recursive: true);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException) { /* left for a later run */ }
    }

    /// <summary>Resolves "last" (the pointer in checkpointsDir) or a folder path.</summary>
    public static string Resolve(string spec, string checkpointsDir)
    {
        if (spec == "last")
        {
            var pointer = Path.Combine(checkpointsDir, "last");
            if (!File.Exists(pointer)) throw new FileNotFoundException($"resume=last: no checkpoint in {checkpointsDir}");
            var name = File.ReadAllText(pointer).Trim();
            var dir = Path.Combine(checkpointsDir, name);
            if (!File.Exists(Path.Combine(dir, "trainer.json")))
                throw new FileNotFoundException($"{pointer} names {name}, which is not a complete checkpoint (no {dir}/trainer.json)");
            return dir;
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
            using var scope = NewDisposeScope();  // detach's tensor too (and cpu's copy of a device tensor), not only the last
            var c = t.detach().cpu().contiguous();
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
