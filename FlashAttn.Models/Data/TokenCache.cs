using System.Diagnostics;
using System.Globalization;
using System.IO.MemoryMappedFiles;
using System.Runtime.InteropServices;
using System.Text.Json;
using System.Text.Json.Serialization;

namespace FlashAttn.Models.Data;

/// <summary>meta.json of a token cache. Written last, inside a temporary folder that is renamed to
/// the final name only when complete: a folder with a meta.json is a complete cache.</summary>
public sealed record TokenCacheMeta
{
    public const string CurrentFormat = "flashattn-token-cache/1";
    [JsonPropertyName("format")] public string Format { get; init; } = CurrentFormat;
    [JsonPropertyName("tokenizer")] public string Tokenizer { get; init; } = "";
    [JsonPropertyName("tokenizer_hash")] public string TokenizerHash { get; init; } = "";
    [JsonPropertyName("vocab_size")] public int VocabSize { get; init; }
    [JsonPropertyName("eot_token")] public int EotToken { get; init; }
    [JsonPropertyName("dtype")] public string Dtype { get; init; } = "uint16";
    [JsonPropertyName("documents")] public long Documents { get; init; }
    [JsonPropertyName("train_documents")] public long TrainDocuments { get; init; }
    [JsonPropertyName("val_documents")] public long ValDocuments { get; init; }
    [JsonPropertyName("train_tokens")] public long TrainTokens { get; init; }
    [JsonPropertyName("val_tokens")] public long ValTokens { get; init; }
    [JsonPropertyName("val_ratio")] public double ValRatio { get; init; }
    [JsonPropertyName("val_split_seed")] public long ValSplitSeed { get; init; }
    /// <summary>How .txt files became documents (<see cref="CorpusReader.TextDocuments"/>); null in caches prepared when a
    /// .txt file was one document.</summary>
    [JsonPropertyName("text_documents")] public string? TextDocuments { get; init; }
    [JsonPropertyName("sources")] public string[] Sources { get; init; } = [];
    [JsonPropertyName("created_utc")] public string CreatedUtc { get; init; } = "";
}

public sealed record PrepareOptions
{
    /// <summary>The validation share of <c>flashattn prepare</c> and of datamodule.val_ratio, so that a cache prepared by
    /// hand and one a run prepares have the same split. 2% gives corpora of a few hundred documents (a book's paragraphs,
    /// the embedded corpus's 1,189 chapters) a validation split; flash-attention's 0.0005 would give them none. The OpenWebText
    /// and Pile experiments keep its 0.0005 in their files: 0.05% of millions of documents is plenty.</summary>
    public const double DefaultValRatio = 0.02;

    public string Tokenizer { get; init; } = "gpt2";
    /// <summary>Fraction of documents that go to the validation split: 0 for none, else both splits must get tokens.</summary>
    public double ValRatio { get; init; } = DefaultValRatio;
    public long ValSplitSeed { get; init; } = 2357;
    /// <summary>0: all cores.</summary>
    public int Threads { get; init; } = 0;
    public bool Progress { get; init; } = true;
    /// <summary>Test hook: throw after this many documents (simulates a killed run).</summary>
    public long FailAfterDocuments { get; init; } = -1;
}

/// <summary>Token caches: <c>${DATA_DIR}/&lt;name&gt;/{train.bin,val.bin,meta.json}</c>, uint16
/// little-endian token ids, documents joined with the end-of-text token after each one (as the
/// seed appends EOS to each document).</summary>
public static class TokenCache
{
    public const string MetaFile = "meta.json";
    static readonly JsonSerializerOptions s_json = new() { WriteIndented = true };

    /// <summary><c>$DATA_DIR</c>, or <c>./data</c> when unset.</summary>
    public static string DefaultDataDir =>
        Environment.GetEnvironmentVariable("DATA_DIR") is { Length: > 0 } d ? d : Path.Combine(Directory.GetCurrentDirectory(), "data");

    public static string PathFor(string dataDir, string name) => Path.Combine(dataDir, name);

    public static bool IsComplete(string dir) => File.Exists(Path.Combine(dir, MetaFile));

    public static TokenCacheMeta ReadMeta(string dir)
    {
        var path = Path.Combine(dir, MetaFile);
        if (!File.Exists(path)) throw new InvalidDataException($"{dir} is not a complete token cache (no {MetaFile})");
        var meta = JsonSerializer.Deserialize<TokenCacheMeta>(File.ReadAllText(path)) ?? throw new InvalidDataException(path);
        if (meta.Format != TokenCacheMeta.CurrentFormat) throw new InvalidDataException($"{path}: format {meta.Format}, expected {TokenCacheMeta.CurrentFormat}");
        return meta;
    }

    /// <summary>Opens a complete cache, refusing one made by a different tokenizer than <paramref name="tokenizer"/>.</summary>
    public static (TokenArray train, TokenArray val, TokenCacheMeta meta) Open(string dir, TextTokenizer? tokenizer = null)
    {
        var meta = ReadMeta(dir);
        if (tokenizer != null) CheckTokenizer(dir, meta, tokenizer);
        var train = new TokenArray(Path.Combine(dir, "train.bin"));
        var val = new TokenArray(Path.Combine(dir, "val.bin"));
        if (train.Length != meta.TrainTokens || val.Length != meta.ValTokens)
            throw new InvalidDataException($"{dir}: token files do not match {MetaFile} (train {train.Length} vs {meta.TrainTokens}, val {val.Length} vs {meta.ValTokens})");
        return (train, val, meta);
    }

    static void CheckTokenizer(string dir, TokenCacheMeta meta, TextTokenizer tokenizer)
    {
        if (meta.Tokenizer != tokenizer.Name || meta.TokenizerHash != tokenizer.Hash)
            throw new InvalidDataException($"{dir} was made by tokenizer {meta.Tokenizer} (hash {meta.TokenizerHash}), not {tokenizer.Name} (hash {tokenizer.Hash}); caches of different tokenizers are never mixed: use another name or delete it");
    }

    /// <summary>Tokenizes <paramref name="inputs"/> into the cache <c>dataDir/name</c>, in parallel over
    /// all cores. Writes into a temporary folder renamed at the end. If a complete cache of the
    /// same tokenizer exists it is returned as is; of another tokenizer, it is an error.</summary>
    public static TokenCacheMeta Prepare(string dataDir, string name, IReadOnlyList<string> inputs, PrepareOptions? options = null, TextWriter? log = null)
    {
        options ??= new PrepareOptions();
        log ??= Console.Error;
        var tokenizer = TextTokenizer.Get(options.Tokenizer);
        if (tokenizer.VocabSize > ushort.MaxValue + 1) throw new InvalidOperationException($"vocabulary of {tokenizer.VocabSize} does not fit uint16");
        if (!(options.ValRatio >= 0 && options.ValRatio < 1))
            throw new ArgumentException($"the validation ratio (datamodule.val_ratio, prepare --val-ratio) is {Invariant(options.ValRatio)}; it must be in [0, 1)", nameof(options));
        var final = PathFor(dataDir, name);
        foreach (var stale in TempPaths.RemoveStale(dataDir, name))
            log.WriteLine($"removed {stale}, left by a prepare that was killed");
        if (IsComplete(final))
        {
            var existing = ReadMeta(final);
            CheckTokenizer(final, existing, tokenizer);
            log.WriteLine($"token cache {final} exists ({existing.TrainTokens:N0} train + {existing.ValTokens:N0} val tokens); delete it to rebuild");
            if (SplitDifferences(existing, options) is { Count: > 0 } differences)
                log.WriteLine($"warning: its split is not the one asked for: {string.Join(", ", differences)}; delete it to prepare it with these settings");
            return existing;
        }
        if (Directory.Exists(final))
            throw new IOException($"{final} exists but is not a complete token cache (no {MetaFile}); delete it first");
        var files = CorpusReader.ExpandInputs(inputs);
        Directory.CreateDirectory(dataDir);
        var tmp = TempPaths.For(dataDir, name);
        Directory.CreateDirectory(tmp);
        try
        {
            var meta = Write(tmp, files, tokenizer, options, log);
            if (options.ValRatio > 0 && (meta.ValTokens == 0 || meta.TrainTokens == 0))
            {
                // found here, not by the first evaluation of a run: no ratio a run can set helps a cache that exists
                var advice = meta.Documents < 2 ? "fewer than two documents cannot be split: add text"
                    : meta.ValTokens == 0 ? $"raise it (about {Math.Min(0.5, 3.0 / meta.Documents):G2} holds out some three documents)"
                    : "lower it";
                throw new InvalidDataException($"prepare {name}: the {(meta.ValTokens == 0 ? "validation" : "training")} split got none of the " +
                    $"corpus's {meta.Documents:N0} documents ({meta.TrainTokens + meta.ValTokens:N0} tokens) at datamodule.val_ratio={Invariant(options.ValRatio)} " +
                    $"(prepare --val-ratio): {advice}, or set it to 0 for no validation split");
            }
            File.WriteAllText(Path.Combine(tmp, MetaFile), JsonSerializer.Serialize(meta, s_json));
            Directory.Move(tmp, final);
            log.WriteLine($"token cache {final}: {meta.Documents:N0} documents, {meta.TrainTokens:N0} train + {meta.ValTokens:N0} val tokens");
            return meta;
        }
        catch
        {
            try { Directory.Delete(tmp, recursive: true); } catch { /* best effort; the name marks it temporary */ }
            throw;
        }
    }

    /// <summary>How the split of <paramref name="meta"/>'s cache differs from the one <paramref name="options"/> would make
    /// (validation ratio, split seed, and for .txt sources how they became documents): one "setting cache's-value
    /// (options'-value)" entry each; none when they agree.</summary>
    public static IReadOnlyList<string> SplitDifferences(TokenCacheMeta meta, PrepareOptions options)
    {
        var d = new List<string>();
        if (meta.ValRatio != options.ValRatio) d.Add($"val_ratio {Invariant(meta.ValRatio)} ({Invariant(options.ValRatio)})");
        if (meta.ValSplitSeed != options.ValSplitSeed) d.Add($"val_split_seed {meta.ValSplitSeed} ({options.ValSplitSeed})");
        if (meta.TextDocuments != CorpusReader.TextDocuments && meta.Sources.Any(f => f.EndsWith(".txt", StringComparison.OrdinalIgnoreCase)))
            d.Add($".txt documents: {meta.TextDocuments ?? "one per file"} ({CorpusReader.TextDocuments})");
        return d;
    }

    static string Invariant(double x) => x.ToString(CultureInfo.InvariantCulture);

    /// <summary>Deterministic per-document split: document i goes to val when a hash of (seed, i)
    /// falls under the ratio.</summary>
    public static bool IsVal(long docIndex, double valRatio, long seed)
    {
        if (valRatio <= 0) return false;
        ulong z = (ulong)seed * 0x9E3779B97F4A7C15UL + (ulong)docIndex + 1;
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9UL;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBUL;
        z ^= z >> 31;
        return (z >> 11) * (1.0 / (1UL << 53)) < valRatio;
    }

    static TokenCacheMeta Write(string dir, IReadOnlyList<string> files, TextTokenizer tokenizer, PrepareOptions options, TextWriter log)
    {
        int threads = options.Threads > 0 ? options.Threads : Environment.ProcessorCount;
        using var train = new FileStream(Path.Combine(dir, "train.bin"), FileMode.CreateNew, FileAccess.Write, FileShare.None, 1 << 20);
        using var val = new FileStream(Path.Combine(dir, "val.bin"), FileMode.CreateNew, FileAccess.Write, FileShare.None, 1 << 20);
        long docs = 0, trainDocs = 0, valDocs = 0, trainTokens = 0, valTokens = 0;
        var sw = Stopwatch.StartNew();
        var lastReport = TimeSpan.Zero;
        bool interactive = options.Progress && !Console.IsErrorRedirected;
        void Report(bool final)
        {
            if (!options.Progress) return;
            var t = sw.Elapsed;
            if (!final && t - lastReport < TimeSpan.FromSeconds(interactive ? 0.25 : 10)) return;
            lastReport = t;
            var line = $"prepare: {docs:N0} docs ({docs / Math.Max(t.TotalSeconds, 1e-9):N0} docs/s), {trainTokens + valTokens:N0} tokens ({(trainTokens + valTokens) / Math.Max(t.TotalSeconds, 1e-9) / 1e6:N2} M tok/s), {t:hh\\:mm\\:ss}";
            if (interactive) { log.Write("\r" + line.PadRight(100)); if (final) log.WriteLine(); }
            else log.WriteLine(line);
        }
        // Documents are read in order and tokenized in blocks, in parallel; blocks are written in order.
        const int blockDocs = 2048;
        var block = new List<string>(blockDocs);
        var buffer = new ushort[1 << 16];
        void Flush()
        {
            var ids = new IReadOnlyList<int>[block.Count];
            Parallel.For(0, block.Count, new ParallelOptions { MaxDegreeOfParallelism = threads }, i => ids[i] = tokenizer.Encode(block[i]));
            for (int i = 0; i < block.Count; i++)
            {
                if (options.FailAfterDocuments >= 0 && docs >= options.FailAfterDocuments)
                    throw new OperationCanceledException($"prepare: interrupted after {docs} documents (test hook)");
                bool isVal = IsVal(docs, options.ValRatio, options.ValSplitSeed);
                var stream = isVal ? val : train;
                long n = WriteTokens(stream, ids[i], tokenizer.EndOfTextId, ref buffer);
                if (isVal) { valTokens += n; valDocs++; } else { trainTokens += n; trainDocs++; }
                docs++;
            }
            block.Clear();
            Report(false);
        }
        foreach (var file in files)
            foreach (var doc in CorpusReader.ReadFile(file))
            {
                block.Add(doc);
                if (block.Count == blockDocs) Flush();
            }
        Flush();
        Report(true);
        train.Flush(true);
        val.Flush(true);
        return new TokenCacheMeta
        {
            Tokenizer = tokenizer.Name, TokenizerHash = tokenizer.Hash, VocabSize = tokenizer.VocabSize, EotToken = tokenizer.EndOfTextId,
            Documents = docs, TrainDocuments = trainDocs, ValDocuments = valDocs, TrainTokens = trainTokens, ValTokens = valTokens,
            ValRatio = options.ValRatio, ValSplitSeed = options.ValSplitSeed, TextDocuments = CorpusReader.TextDocuments,
            Sources = files.Select(f => f.StartsWith(CorpusReader.EmbeddedPrefix) ? f : Path.GetFullPath(f)).ToArray(),
            CreatedUtc = DateTime.UtcNow.ToString("O"),
        };
    }

    static long WriteTokens(Stream s, IReadOnlyList<int> ids, int eot, ref ushort[] buffer)
    {
        int n = ids.Count + 1;
        if (buffer.Length < n) buffer = new ushort[Math.Max(n, buffer.Length * 2)];
        for (int i = 0; i < ids.Count; i++) buffer[i] = checked((ushort)ids[i]);
        buffer[ids.Count] = (ushort)eot;
        s.Write(MemoryMarshal.AsBytes(buffer.AsSpan(0, n)));
        return n;
    }
}

/// <summary>A read-only memory-mapped array of uint16 tokens.</summary>
public sealed class TokenArray : IDisposable
{
    readonly MemoryMappedFile? _file;
    readonly MemoryMappedViewAccessor? _view;

    public TokenArray(string path)
    {
        Path_ = path;
        long bytes = new FileInfo(path).Length;
        if (bytes % 2 != 0) throw new InvalidDataException($"{path}: odd byte count {bytes}");
        Length = bytes / 2;
        if (Length == 0) return;
        _file = MemoryMappedFile.CreateFromFile(path, FileMode.Open, null, 0, MemoryMappedFileAccess.Read);
        _view = _file.CreateViewAccessor(0, bytes, MemoryMappedFileAccess.Read);
    }

    public string Path_ { get; }
    public long Length { get; }

    /// <summary>Copies tokens [start, start + dest.Length) into dest.</summary>
    public void Read(long start, ushort[] dest, int count)
    {
        if (start < 0 || count < 0 || count > dest.Length || start + count > Length) throw new ArgumentOutOfRangeException(nameof(start), $"[{start}, {start + count}) outside [0, {Length})");
        if (count > 0) _view!.ReadArray(start * 2, dest, 0, count);
    }

    public ushort[] Slice(long start, int count)
    {
        var a = new ushort[count];
        Read(start, a, count);
        return a;
    }

    public void Dispose()
    {
        _view?.Dispose();
        _file?.Dispose();
    }
}
