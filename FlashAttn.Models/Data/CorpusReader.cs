using System.IO.Compression;
using System.Reflection;
using System.Text.Json;

namespace FlashAttn.Models.Data;

/// <summary>Streams documents from corpus inputs: files or folders (recursively) of .txt (its
/// paragraphs, <see cref="SplitText"/>), .jsonl / .jsonl.gz / .jsonl.zst (one document per line, "text" field: the
/// Pile's format) and .parquet (a "text" column: OpenWebText's layout on the Hub); and the corpus
/// embedded in this assembly, named "embedded:kjv".</summary>
public static class CorpusReader
{
    public const string EmbeddedPrefix = "embedded:";
    public static readonly string[] Extensions = [".txt", ".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet"];

    /// <summary>The corpora embedded in FlashAttn.Models (gzip-compressed JSONL resources).</summary>
    public static IReadOnlyList<string> EmbeddedCorpora =>
        typeof(CorpusReader).Assembly.GetManifestResourceNames()
            .Where(n => n.StartsWith(ResourcePrefix) && n.EndsWith(".jsonl.gz"))
            .Select(n => n[ResourcePrefix.Length..^".jsonl.gz".Length]).Order().ToList();

    const string ResourcePrefix = "FlashAttn.Models.Data.Corpus.";

    /// <summary>The longest document <see cref="SplitText"/> makes: about 500 GPT-2 tokens of English.</summary>
    public const int TextChunkChars = 2000;

    /// <summary>How <see cref="SplitText"/> cuts a .txt file, as a token cache records it.</summary>
    public static string TextDocuments => $"blank-line paragraphs of at most {TextChunkChars} characters";

    /// <summary>The files an input names, in a stable order (ordinal sort within each folder).</summary>
    public static IReadOnlyList<string> ExpandInputs(IEnumerable<string> inputs)
    {
        var files = new List<string>();
        foreach (var input in inputs)
        {
            if (input.StartsWith(EmbeddedPrefix, StringComparison.Ordinal))
            {
                var name = input[EmbeddedPrefix.Length..];
                if (!EmbeddedCorpora.Contains(name))
                    throw new ArgumentException($"no embedded corpus '{name}'; embedded: {string.Join(", ", EmbeddedCorpora.Select(c => EmbeddedPrefix + c))}");
                files.Add(input);
            }
            else if (Directory.Exists(input))
            {
                var found = Directory.EnumerateFiles(input, "*", SearchOption.AllDirectories)
                    .Where(IsSupported).Order(StringComparer.Ordinal).ToList();
                if (found.Count == 0) throw new ArgumentException($"no corpus files ({string.Join(", ", Extensions)}) under {input}");
                files.AddRange(found);
            }
            else if (File.Exists(input))
            {
                if (!IsSupported(input)) throw new ArgumentException($"unsupported corpus file {input}; supported: {string.Join(", ", Extensions)}");
                files.Add(input);
            }
            else throw new FileNotFoundException($"corpus input not found: {input}");
        }
        return files;
    }

    public static bool IsSupported(string path) => Extensions.Any(e => path.EndsWith(e, StringComparison.OrdinalIgnoreCase));

    /// <summary>All documents of the inputs, in order.</summary>
    public static IEnumerable<string> ReadDocuments(IEnumerable<string> inputs)
    {
        foreach (var file in ExpandInputs(inputs))
            foreach (var doc in ReadFile(file))
                yield return doc;
    }

    public static IEnumerable<string> ReadFile(string file)
    {
        if (file.StartsWith(EmbeddedPrefix, StringComparison.Ordinal))
        {
            var res = ResourcePrefix + file[EmbeddedPrefix.Length..] + ".jsonl.gz";
            return ReadJsonl(() => new GZipStream(typeof(CorpusReader).Assembly.GetManifestResourceStream(res)
                ?? throw new FileNotFoundException(res), CompressionMode.Decompress), file);
        }
        var lower = file.ToLowerInvariant();
        if (lower.EndsWith(".txt")) return SplitText(File.ReadAllText(file));
        if (lower.EndsWith(".jsonl")) return ReadJsonl(() => File.OpenRead(file), file);
        if (lower.EndsWith(".jsonl.gz")) return ReadJsonl(() => new GZipStream(File.OpenRead(file), CompressionMode.Decompress), file);
        if (lower.EndsWith(".jsonl.zst")) return ReadJsonl(() => new ZstdSharp.DecompressionStream(File.OpenRead(file)), file);
        if (lower.EndsWith(".parquet")) return ReadParquet(file);
        throw new ArgumentException($"unsupported corpus file {file}");
    }

    /// <summary>The documents of a plain text: its paragraphs (separated by blank lines), each longer than
    /// <see cref="TextChunkChars"/> cut at its last line break (else space) before that length. The validation split takes
    /// whole documents: a book read as one document would land in one split and leave the other empty.</summary>
    public static IEnumerable<string> SplitText(string text)
    {
        var paragraph = new System.Text.StringBuilder();
        foreach (var line in text.ReplaceLineEndings("\n").Split('\n'))
        {
            if (!string.IsNullOrWhiteSpace(line)) { paragraph.Append(line).Append('\n'); continue; }
            foreach (var piece in Chunks(paragraph.ToString())) yield return piece;
            paragraph.Clear();
        }
        foreach (var piece in Chunks(paragraph.ToString())) yield return piece;
    }

    static List<string> Chunks(string paragraph)
    {
        var pieces = new List<string>();
        var rest = paragraph.AsSpan().TrimEnd('\n');
        while (rest.Length > TextChunkChars)
        {
            var head = rest[..TextChunkChars];
            int cut = head.LastIndexOf('\n');
            if (cut <= 0) cut = head.LastIndexOf(' ');
            if (cut > 0)
            {
                pieces.Add(head[..cut].ToString());
                rest = rest[(cut + 1)..]; // the line break or space between two pieces belongs to neither
                continue;
            }
            cut = char.IsHighSurrogate(head[^1]) ? TextChunkChars - 1 : TextChunkChars; // a word longer than a piece
            pieces.Add(head[..cut].ToString());
            rest = rest[cut..];
        }
        if (!rest.IsWhiteSpace()) pieces.Add(rest.ToString());
        return pieces;
    }

    static IEnumerable<string> ReadJsonl(Func<Stream> open, string name)
    {
        using var stream = open();
        using var reader = new StreamReader(stream, System.Text.Encoding.UTF8, detectEncodingFromByteOrderMarks: true, bufferSize: 1 << 20);
        string? line;
        long lineNo = 0;
        while ((line = reader.ReadLine()) != null)
        {
            lineNo++;
            if (string.IsNullOrWhiteSpace(line)) continue;
            string? text;
            try
            {
                using var doc = JsonDocument.Parse(line);
                text = doc.RootElement.TryGetProperty("text", out var t) && t.ValueKind == JsonValueKind.String ? t.GetString() : null;
            }
            catch (JsonException e) { throw new InvalidDataException($"{name}:{lineNo}: not JSON ({e.Message})"); }
            if (text is null) throw new InvalidDataException($"{name}:{lineNo}: no string field \"text\"");
            yield return text;
        }
    }

    static IEnumerable<string> ReadParquet(string file)
    {
        using var stream = File.OpenRead(file);
        var reader = Parquet.ParquetReader.CreateAsync(stream).GetAwaiter().GetResult();
        try
        {
            var field = reader.Schema.GetDataFields().FirstOrDefault(f => f.Name == "text")
                ?? throw new InvalidDataException($"{file}: no \"text\" column (columns: {string.Join(", ", reader.Schema.GetDataFields().Select(f => f.Name))})");
            for (int g = 0; g < reader.RowGroupCount; g++)
            {
                string?[] texts;
                using (var group = reader.OpenRowGroupReader(g))
                {
                    texts = new string?[group.RowCount];
                    group.ReadAsync(field, texts.AsMemory(), null, default).AsTask().GetAwaiter().GetResult();
                }
                foreach (var s in texts)
                    if (s is not null) yield return s;
            }
        }
        finally { reader.DisposeAsync().AsTask().GetAwaiter().GetResult(); }
    }
}
