using System.Buffers.Binary;
using System.Text;
using System.Text.Json;
using System.Text.Json.Nodes;
using TorchSharp;
using static TorchSharp.torch;

namespace FlashAttn.Models;

/// <summary>One tensor's entry in a safetensors header: dtype ("F32", "BF16", ...), shape, and [begin, end) byte offsets
/// relative to the start of the data section.</summary>
public sealed record SafeTensorInfo(string dtype, long[] shape, long begin, long end);

/// <summary>
/// The safetensors format (huggingface/safetensors), read and written without a package: an 8-byte little-endian header
/// length N, N bytes of JSON {"name": {"dtype", "shape", "data_offsets": [begin, end]}, ..., "__metadata__": {string: string}}
/// (padded with spaces to a multiple of 8), then the little-endian, row-major tensor bytes.
/// Types: F64, F32, F16, BF16, I64, I32, I16, I8, U8, BOOL.
/// </summary>
public static class SafeTensors
{
    private const string MetadataKey = "__metadata__";
    private const long MaxHeaderBytes = 100_000_000;

    private static readonly Dictionary<string, ScalarType> s_types = new()
    {
        ["F64"] = ScalarType.Float64, ["F32"] = ScalarType.Float32, ["F16"] = ScalarType.Float16, ["BF16"] = ScalarType.BFloat16,
        ["I64"] = ScalarType.Int64, ["I32"] = ScalarType.Int32, ["I16"] = ScalarType.Int16, ["I8"] = ScalarType.Int8,
        ["U8"] = ScalarType.Byte, ["BOOL"] = ScalarType.Bool,
    };

    /// <summary>The safetensors name of a TorchSharp dtype.</summary>
    public static string DtypeName(ScalarType dtype) =>
        s_types.FirstOrDefault(kv => kv.Value == dtype).Key ?? throw new ArgumentException($"safetensors has no type for {dtype}");

    private static long ElementSize(ScalarType t) => t switch
    {
        ScalarType.Float64 or ScalarType.Int64 => 8,
        ScalarType.Float32 or ScalarType.Int32 => 4,
        ScalarType.Float16 or ScalarType.BFloat16 or ScalarType.Int16 => 2,
        _ => 1,
    };

    /// <summary>Reads the header: the tensors' entries (in file order) and the metadata.</summary>
    public static (IReadOnlyDictionary<string, SafeTensorInfo> tensors, IReadOnlyDictionary<string, string> metadata) ReadHeader(string path)
    {
        using var fs = File.OpenRead(path);
        var (infos, meta, _) = ReadHeader(fs, path);
        return (infos, meta);
    }

    private static (Dictionary<string, SafeTensorInfo>, Dictionary<string, string>, long dataStart) ReadHeader(FileStream fs, string path)
    {
        Span<byte> lenBytes = stackalloc byte[8];
        if (fs.Read(lenBytes) != 8) throw new InvalidDataException($"{path}: too short for a safetensors file (no header length)");
        long n = BinaryPrimitives.ReadInt64LittleEndian(lenBytes);
        if (n < 2 || n > MaxHeaderBytes || 8 + n > fs.Length)
            throw new InvalidDataException($"{path}: header length {n} is invalid for a file of {fs.Length} bytes");
        var header = new byte[n];
        fs.ReadExactly(header);
        JsonObject root;
        try { root = JsonNode.Parse(header)?.AsObject() ?? throw new InvalidDataException($"{path}: empty header"); }
        catch (JsonException e) { throw new InvalidDataException($"{path}: header is not JSON: {e.Message}", e); }
        long dataStart = 8 + n, dataLen = fs.Length - dataStart;
        var infos = new Dictionary<string, SafeTensorInfo>();
        var meta = new Dictionary<string, string>();
        foreach (var (name, node) in root)
        {
            if (name == MetadataKey)
            {
                if (node is JsonObject m) foreach (var (k, v) in m) meta[k] = v?.GetValue<string>() ?? "";
                continue;
            }
            var o = node as JsonObject ?? throw new InvalidDataException($"{path}: entry '{name}' is not an object");
            string dtype = o["dtype"]?.GetValue<string>() ?? throw new InvalidDataException($"{path}: '{name}' has no dtype");
            if (!s_types.TryGetValue(dtype, out var st)) throw new InvalidDataException($"{path}: '{name}' has unsupported dtype {dtype}");
            var shape = (o["shape"] as JsonArray ?? throw new InvalidDataException($"{path}: '{name}' has no shape"))
                .Select(x => x!.GetValue<long>()).ToArray();
            var offs = o["data_offsets"] as JsonArray;
            if (offs is null || offs.Count != 2) throw new InvalidDataException($"{path}: '{name}' needs data_offsets [begin, end]");
            long begin = offs[0]!.GetValue<long>(), end = offs[1]!.GetValue<long>();
            long bytes = shape.Aggregate(1L, (a, b) => a * b) * ElementSize(st);
            if (shape.Any(d => d < 0) || begin < 0 || end < begin || end > dataLen || end - begin != bytes)
                throw new InvalidDataException($"{path}: '{name}' ({dtype} [{string.Join(", ", shape)}]) has data_offsets [{begin}, {end}] inconsistent with its size ({bytes} bytes) or the data section ({dataLen} bytes)");
            infos[name] = new SafeTensorInfo(dtype, shape, begin, end);
        }
        return (infos, meta, dataStart);
    }

    /// <summary>Reads every tensor (CPU, the file's dtypes), in file order.</summary>
    public static Dictionary<string, Tensor> Load(string path) => LoadWithMetadata(path).tensors;

    /// <summary>
    /// Copies the tensors of <paramref name="path"/> into <paramref name="module"/>'s parameters.
    /// <paramref name="map"/> turns a stored name and tensor into the parameter's name and value, or
    /// null to skip it (identity when null). A parameter for which <paramref name="allowPrefix"/> holds
    /// may be larger in its first dimension than the stored tensor (a padded vocabulary): the first
    /// rows are filled. Every parameter must be loaded; a stored tensor matching none is an error.
    /// </summary>
    public static void LoadInto(nn.Module module, string path, string modelName,
        Func<string, Tensor, (string name, Tensor value)?>? map = null, Func<string, bool>? allowPrefix = null)
    {
        var tensors = Load(path);
        try
        {
            var own = module.named_parameters().ToDictionary(np => np.name, np => np.parameter);
            var loaded = new HashSet<string>();
            using var _ = no_grad();
            foreach (var (key, stored) in tensors)
            {
                if ((map is null ? (key, stored) : map(key, stored)) is not var (name, value)) continue;
                if (!own.TryGetValue(name, out var p))
                    throw new InvalidDataException($"{path}: tensor '{key}' matches no parameter of this {modelName} (config mismatch?)");
                if (allowPrefix?.Invoke(name) == true && value.dim() == 2 && value.shape[0] <= p.shape[0] && value.shape[1] == p.shape[1])
                    p.narrow(0, 0, value.shape[0]).copy_(value);
                else if (value.shape.SequenceEqual(p.shape))
                    p.copy_(value);
                else
                    throw new InvalidDataException($"{path}: '{key}' has shape [{string.Join(", ", stored.shape)}], the model's '{name}' is [{string.Join(", ", p.shape)}]");
                loaded.Add(name);
            }
            var missing = own.Keys.Where(n => !loaded.Contains(n)).ToList();
            if (missing.Count > 0) throw new InvalidDataException($"{path}: missing parameters: {string.Join(", ", missing)}");
        }
        finally
        {
            foreach (var t in tensors.Values) t.Dispose();
        }
    }

    /// <summary>Reads every tensor (CPU, the file's dtypes) and the metadata.</summary>
    public static (Dictionary<string, Tensor> tensors, IReadOnlyDictionary<string, string> metadata) LoadWithMetadata(string path)
    {
        using var fs = File.OpenRead(path);
        var (infos, meta, dataStart) = ReadHeader(fs, path);
        var result = new Dictionary<string, Tensor>();
        try
        {
            foreach (var (name, info) in infos.OrderBy(kv => kv.Value.begin))
            {
                var t = empty(info.shape, s_types[info.dtype]);
                long len = info.end - info.begin;
                if (len > int.MaxValue) throw new InvalidDataException($"{path}: '{name}' is larger than 2 GiB (not supported)");
                var buf = new byte[len];
                fs.Seek(dataStart + info.begin, SeekOrigin.Begin);
                fs.ReadExactly(buf);
                if (len > 0) t.bytes = buf;
                result[name] = t;
            }
        }
        catch
        {
            foreach (var t in result.Values) t.Dispose();
            throw;
        }
        return (result, meta);
    }

    /// <summary>Writes the tensors (any device; copied to CPU) in the given order, with optional string metadata.</summary>
    public static void Save(string path, IEnumerable<KeyValuePair<string, Tensor>> tensors, IDictionary<string, string>? metadata = null)
    {
        var list = tensors.ToList();
        var root = new JsonObject();
        if (metadata is { Count: > 0 })
        {
            var m = new JsonObject();
            foreach (var (k, v) in metadata) m[k] = v;
            root[MetadataKey] = m;
        }
        long offset = 0;
        var seen = new HashSet<string>();
        foreach (var (name, t) in list)
        {
            if (name == MetadataKey || !seen.Add(name)) throw new ArgumentException($"tensor name '{name}' is reserved or repeated");
            long bytes = t.numel() * ElementSize(t.dtype);
            root[name] = new JsonObject
            {
                ["dtype"] = DtypeName(t.dtype),
                ["shape"] = new JsonArray(t.shape.Select(d => (JsonNode)JsonValue.Create(d)).ToArray()),
                ["data_offsets"] = new JsonArray(JsonValue.Create(offset), JsonValue.Create(offset + bytes)),
            };
            offset += bytes;
        }
        var json = Encoding.UTF8.GetBytes(root.ToJsonString());
        int pad = (int)((8 - json.Length % 8) % 8);
        var header = new byte[json.Length + pad];
        json.CopyTo(header, 0);
        header.AsSpan(json.Length).Fill((byte)' ');
        var tmp = path + ".tmp";
        using (var fs = File.Create(tmp))
        {
            Span<byte> len = stackalloc byte[8];
            BinaryPrimitives.WriteInt64LittleEndian(len, header.Length);
            fs.Write(len);
            fs.Write(header);
            foreach (var (_, t) in list)
            {
                if (t.numel() == 0) continue;
                using var scope = NewDisposeScope();  // detach's tensor too (and cpu's copy of a device tensor), not only the last
                var c = t.detach().cpu().contiguous();
                fs.Write(c.bytes);
            }
        }
        File.Move(tmp, path, overwrite: true);
    }
}
