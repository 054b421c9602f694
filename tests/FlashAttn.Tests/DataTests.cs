using System.Text;
using System.Text.Json;
using FlashAttn.Models.Data;
using FlashAttn.Models.Training;
using NUnit.Framework;

namespace FlashAttn.Tests;

/// <summary>The data pipeline: corpus readers (.txt, .jsonl, .jsonl.zst, .parquet, embedded), the
/// uint16 token cache (round trip, atomicity, tokenizer check) and the resumable batch sampler.</summary>
public class DataTests
{
    string _dir = "";

    [SetUp]
    public void SetUp() => Directory.CreateDirectory(_dir = Path.Combine(Path.GetTempPath(), "flashattn-data-" + Guid.NewGuid().ToString("N")));

    [TearDown]
    public void TearDown() { try { Directory.Delete(_dir, true); } catch { } }

    public sealed class Row { public string text { get; set; } = ""; }

    static readonly string[] Docs =
    [
        "In the beginning God created the heaven and the earth.",
        "Hello, world! Ünïcödé and emoji 🚀 survive the round trip.\nSecond line\ttab.",
        "{\"json\": \"inside text\"} and <html> tags",
        "The quick brown fox jumps over the lazy dog. 1234567890",
        "Short.",
        "A longer document. " + string.Concat(Enumerable.Repeat("Lorem ipsum dolor sit amet, consectetur adipiscing elit. ", 20)),
    ];

    string WriteCorpus()
    {
        var corpus = Path.Combine(_dir, "corpus");
        Directory.CreateDirectory(Path.Combine(corpus, "sub"));
        File.WriteAllText(Path.Combine(corpus, "a.txt"), Docs[0]);
        File.WriteAllLines(Path.Combine(corpus, "b.jsonl"), [JsonSerializer.Serialize(new { text = Docs[1], meta = 1 }), "", JsonSerializer.Serialize(new { text = Docs[2] })]);
        using (var fs = File.Create(Path.Combine(corpus, "c.jsonl.zst")))
        using (var z = new ZstdSharp.CompressionStream(fs))
        {
            var bytes = Encoding.UTF8.GetBytes(JsonSerializer.Serialize(new { text = Docs[3], meta = new { pile_set_name = "x" } }) + "\n");
            z.Write(bytes);
        }
        using (var fs = File.Create(Path.Combine(corpus, "sub", "d.parquet")))
            Parquet.Serialization.ParquetSerializer.SerializeAsync(new[] { new Row { text = Docs[4] }, new Row { text = Docs[5] } }, fs).GetAwaiter().GetResult();
        File.WriteAllText(Path.Combine(corpus, "ignored.md"), "not a corpus file");
        return corpus;
    }

    [Test]
    public void ReadersYieldEveryDocumentInOrder()
    {
        var corpus = WriteCorpus();
        Assert.That(CorpusReader.ReadDocuments([corpus]).ToList(), Is.EqualTo(Docs));
        Assert.That(CorpusReader.EmbeddedCorpora, Does.Contain("kjv"));
        var first = CorpusReader.ReadDocuments(["embedded:kjv"]).First();
        Assert.That(first, Does.StartWith("Ge 1\n\n1 In the beginning God created the heaven and the earth."));
        Assert.Throws<ArgumentException>(() => CorpusReader.ExpandInputs(["embedded:nope"]));
        Assert.Throws<FileNotFoundException>(() => CorpusReader.ExpandInputs([Path.Combine(_dir, "missing")]));
    }

    [Test]
    public void TokenizeCacheBatchesDecodeBackToTheText()
    {
        var corpus = WriteCorpus();
        var data = Path.Combine(_dir, "data");
        var meta = TokenCache.Prepare(data, "mini", [corpus], new PrepareOptions { ValRatio = 0, Progress = false }, TextWriter.Null);
        var tok = TextTokenizer.Gpt2;
        Assert.That(meta.Tokenizer, Is.EqualTo("gpt2"));
        Assert.That(meta.VocabSize, Is.EqualTo(50257));
        Assert.That(meta.EotToken, Is.EqualTo(50256));
        Assert.That(meta.Documents, Is.EqualTo(Docs.Length));
        var expected = string.Concat(Docs.Select(d => d + TextTokenizer.EndOfText));
        var (train, val, _) = TokenCache.Open(Path.Combine(data, "mini"), tok);
        using (train) using (val)
        {
            Assert.That(val.Length, Is.EqualTo(0));
            Assert.That(tok.Decode(train.Slice(0, (int)train.Length).Select(t => (int)t)), Is.EqualTo(expected));
            // the end-of-text token sits after each document
            Assert.That(train.Slice(0, (int)train.Length).Count(t => t == tok.EndOfTextId), Is.EqualTo(Docs.Length));
            // sampler batches: (B, T+1) windows at multiples of T; shuffled order; each decodes to a piece of the text
            const int T = 16;
            var sampler = new LmBatchSampler(train, T, seed: 7);
            var drawn = new List<string>();
            for (int i = 0; i < sampler.NumSequences; i++)
            {
                var row = sampler.Next(1);
                Assert.That(row.Length, Is.EqualTo(T + 1));
                drawn.Add(string.Join(",", row));
            }
            var windows = Enumerable.Range(0, (int)sampler.NumSequences).Select(s => string.Join(",", train.Slice(s * T, T + 1))).ToList();
            Assert.That(drawn, Is.EquivalentTo(windows), "one epoch visits every window once");
            Assert.That(drawn, Is.Not.EqualTo(windows), "in a shuffled order");
            Assert.That(sampler.State, Is.EqualTo(new SamplerState(0, sampler.NumSequences)));
            // all sequential windows concatenated (without their overlap token) decode to the start of the text
            var seqTokens = LmBatchSampler.Sequential(train, T, 1, 0).SelectMany(r => r.Take(T)).Select(t => (int)t).ToList();
            Assert.That(expected, Does.StartWith(tok.Decode(seqTokens).TrimEnd('\uFFFD')));
        }
    }

    [Test]
    public void SamplerOrderIsReproducibleAndResumable()
    {
        var data = Path.Combine(_dir, "data");
        File.WriteAllText(Path.Combine(_dir, "x.txt"), string.Concat(Enumerable.Range(0, 400).Select(i => $"word{i} ")));
        TokenCache.Prepare(data, "x", [Path.Combine(_dir, "x.txt")], new PrepareOptions { ValRatio = 0, Progress = false }, TextWriter.Null);
        var (train, val, _) = TokenCache.Open(Path.Combine(data, "x"));
        using (train) using (val)
        {
            var a = new LmBatchSampler(train, 8, seed: 3);
            var full = Enumerable.Range(0, 30).Select(_ => a.Next(4)).ToList(); // crosses epochs
            var b = new LmBatchSampler(train, 8, seed: 3);
            for (int i = 0; i < 11; i++) b.Next(4);
            var state = b.State;
            var c = new LmBatchSampler(train, 8, seed: 3) { State = state };
            for (int i = 11; i < 30; i++) Assert.That(c.Next(4), Is.EqualTo(full[i]), $"batch {i} after resume");
            Assert.That(new LmBatchSampler(train, 8, seed: 4).Next(4), Is.Not.EqualTo(full[0]), "another seed, another order");
        }
    }

    [Test]
    public void InterruptedPrepareLeavesNoCompleteLookingCache()
    {
        var corpus = WriteCorpus();
        var data = Path.Combine(_dir, "data");
        Assert.Throws<OperationCanceledException>(() =>
            TokenCache.Prepare(data, "mini", [corpus], new PrepareOptions { FailAfterDocuments = 3, Progress = false }, TextWriter.Null));
        Assert.That(Directory.Exists(Path.Combine(data, "mini")), Is.False);
        Assert.That(TokenCache.IsComplete(Path.Combine(data, "mini")), Is.False);
        Assert.That(Directory.GetFileSystemEntries(data), Is.Empty, "the temporary folder is removed");
        // a killed run (no cleanup): only a hidden temporary folder remains, never the cache's name
        var killed = Path.Combine(data, ".mini.tmp-123-abc");
        Directory.CreateDirectory(killed);
        File.WriteAllBytes(Path.Combine(killed, "train.bin"), new byte[10]);
        Assert.That(TokenCache.IsComplete(Path.Combine(data, "mini")), Is.False);
        Assert.Throws<InvalidDataException>(() => TokenCache.Open(Path.Combine(data, "mini")));
        // a folder with the name but no meta.json is refused, not reused
        Directory.CreateDirectory(Path.Combine(data, "half"));
        Assert.Throws<IOException>(() => TokenCache.Prepare(data, "half", [corpus], new PrepareOptions { Progress = false }, TextWriter.Null));
        // a complete prepare after the interruption works
        TokenCache.Prepare(data, "mini", [corpus], new PrepareOptions { ValRatio = 0, Progress = false }, TextWriter.Null);
        Assert.That(TokenCache.IsComplete(Path.Combine(data, "mini")), Is.True);
    }

    [Test]
    public void CachesOfDifferentTokenizersAreNotMixed()
    {
        var corpus = WriteCorpus();
        var data = Path.Combine(_dir, "data");
        TokenCache.Prepare(data, "mini", [corpus], new PrepareOptions { ValRatio = 0, Progress = false }, TextWriter.Null);
        var metaPath = Path.Combine(data, "mini", TokenCache.MetaFile);
        var meta = JsonSerializer.Deserialize<TokenCacheMeta>(File.ReadAllText(metaPath))!;
        File.WriteAllText(metaPath, JsonSerializer.Serialize(meta with { Tokenizer = "other-bpe", TokenizerHash = "0123" }));
        var e = Assert.Throws<InvalidDataException>(() => TokenCache.Open(Path.Combine(data, "mini"), TextTokenizer.Gpt2))!;
        Assert.That(e.Message, Does.Contain("other-bpe").And.Contain("gpt2"));
        Assert.Throws<InvalidDataException>(() => TokenCache.Prepare(data, "mini", [corpus], new PrepareOptions { Progress = false }, TextWriter.Null));
    }

    [Test]
    public void PlainTextIsSplitIntoParagraphsAndChunks()
    {
        var lines = Enumerable.Range(0, 150).Select(i => $"line {i} of a long paragraph without a blank line").ToList();
        var text = "Title\r\n\r\nFirst paragraph,\r\ntwo lines.\n \n\t\n\nSecond.\n\n" + string.Join("\n", lines) + "\n\n" +
                   string.Concat(Enumerable.Repeat("word ", 900)) + "\n";
        var docs = CorpusReader.SplitText(text).ToList();
        Assert.That(docs.Take(3), Is.EqualTo(new[] { "Title", "First paragraph,\ntwo lines.", "Second." }), "blank lines (white space only) separate documents");
        Assert.That(docs, Has.All.Length.InRange(1, CorpusReader.TextChunkChars));
        // the long paragraph: pieces cut at line breaks, nothing lost
        var linePieces = docs.Skip(3).TakeWhile(d => d.StartsWith("line ")).ToList();
        Assert.That(linePieces, Has.Count.GreaterThan(1));
        Assert.That(string.Join("\n", linePieces), Is.EqualTo(string.Join("\n", lines)));
        // a line longer than a piece: cut at spaces
        var wordPieces = docs.Skip(3 + linePieces.Count).ToList();
        Assert.That(wordPieces, Has.Count.EqualTo(3));
        Assert.That(string.Join(" ", wordPieces), Is.EqualTo(string.Concat(Enumerable.Repeat("word ", 900))));
        // without any space: fixed-length pieces
        Assert.That(CorpusReader.SplitText(new string('x', 4500)).Select(d => d.Length), Is.EqualTo(new[] { 2000, 2000, 500 }));
    }

    [Test]
    public void OneTextFileGetsAValidationSplit()
    {
        // a book as one .txt file: 400 paragraphs; at the default ratio both splits get documents
        var book = Path.Combine(_dir, "book.txt");
        File.WriteAllText(book, string.Join("\n\n", Enumerable.Range(0, 400).Select(i => $"Paragraph {i}: the quick brown fox jumps over the lazy dog.")));
        var meta = TokenCache.Prepare(Path.Combine(_dir, "data"), "book", [book], new PrepareOptions { Progress = false }, TextWriter.Null);
        Assert.That(meta.Documents, Is.EqualTo(400));
        Assert.That(meta.ValTokens, Is.GreaterThan(0));
        Assert.That(meta.TrainTokens, Is.GreaterThan(meta.ValTokens));
        Assert.That((meta.ValRatio, meta.ValSplitSeed, meta.TextDocuments), Is.EqualTo((PrepareOptions.DefaultValRatio, 2357L, CorpusReader.TextDocuments)),
            "the cache records how it was split");
    }

    [Test]
    public void AnEmptySplitIsAnErrorOfPrepare()
    {
        var small = Path.Combine(_dir, "small.txt");
        File.WriteAllText(small, "One paragraph.\n\nAnother one.\n\nA third.");
        var data = Path.Combine(_dir, "data");
        var e = Assert.Throws<InvalidDataException>(() => TokenCache.Prepare(data, "small", [small], new PrepareOptions { Progress = false }, TextWriter.Null))!;
        Assert.That(e.Message, Does.Contain("validation split got none").And.Contain("3 documents").And.Contain("datamodule.val_ratio=0.02").And.Contain("raise it"));
        Assert.That(Directory.GetFileSystemEntries(data), Is.Empty, "no cache, no temporary folder");
        e = Assert.Throws<InvalidDataException>(() => TokenCache.Prepare(data, "small", [small], new PrepareOptions { ValRatio = 0.99, Progress = false }, TextWriter.Null))!;
        Assert.That(e.Message, Does.Contain("training split got none").And.Contain("lower it"));
        Assert.That(Assert.Throws<ArgumentException>(() => TokenCache.Prepare(data, "small", [small], new PrepareOptions { ValRatio = 1 }, TextWriter.Null))!.Message,
            Does.Contain("must be in [0, 1)"));
        // 0 asks for no validation split
        Assert.That(TokenCache.Prepare(data, "small", [small], new PrepareOptions { ValRatio = 0, Progress = false }, TextWriter.Null).Documents, Is.EqualTo(3));
    }

    [Test]
    public void PrepareAndTrainShareTheValidationRatioAndTrainSaysWhenACacheDiffers()
    {
        Assert.That(new PrepareOptions().ValRatio, Is.EqualTo(ExperimentConfig.Parse([]).Bind().Data.ValRatio),
            "`flashattn prepare` and the main job's automatic prepare split the same corpus alike");
        var corpus = Path.Combine(_dir, "docs.jsonl");
        File.WriteAllLines(corpus, Enumerable.Range(0, 60).Select(i => JsonSerializer.Serialize(new { text = $"Document {i}: the quick brown fox jumps over the lazy dog." })));
        var data = Path.Combine(_dir, "data");
        TokenCache.Prepare(data, "docs", [corpus], new PrepareOptions { ValRatio = 0.1, Progress = false }, TextWriter.Null);
        string TaskLog(params string[] keys)
        {
            var log = new StringWriter();
            using var task = new LanguageModelingTask(ExperimentConfig.Parse([$"datamodule.data_dir={data}", "datamodule.dataset=docs", "datamodule.max_length=8",
                "model.config.n_layer=1", "model.config.n_embd=32", "model.config.n_head=2", .. keys]).Bind(), TorchSharp.torch.CPU, TorchSharp.torch.ScalarType.Float32, log);
            return log.ToString();
        }
        Assert.That(TaskLog("datamodule.val_ratio=0.1"), Does.Not.Contain("warning"));
        Assert.That(TaskLog(), Does.Contain($"warning: token cache {Path.Combine(data, "docs")} was prepared with another split")
            .And.Contain("val_ratio 0.1 (0.02)").And.Contain("delete"));
        Assert.That(TaskLog("datamodule.val_ratio=0.1", "datamodule.val_split_seed=7"), Does.Contain("val_split_seed 2357 (7)").And.Not.Contain("val_ratio 0.1"));
    }

    [Test]
    public void ValidationSplitIsPerDocumentAndSeeded()
    {
        int n = 20000, val = Enumerable.Range(0, n).Count(i => TokenCache.IsVal(i, 0.05, 2357));
        Assert.That(val, Is.InRange(800, 1200));
        Assert.That(Enumerable.Range(0, 100).Select(i => TokenCache.IsVal(i, 0.5, 1)), Is.Not.EqualTo(Enumerable.Range(0, 100).Select(i => TokenCache.IsVal(i, 0.5, 2))));
        Assert.That(Enumerable.Range(0, 1000).Any(i => TokenCache.IsVal(i, 0, 1)), Is.False);
    }
}
