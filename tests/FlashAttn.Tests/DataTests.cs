using System.Text;
using System.Text.Json;
using FlashAttn.Models.Data;
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
        TokenCache.Prepare(data, "mini", [corpus], new PrepareOptions { Progress = false }, TextWriter.Null);
        Assert.That(TokenCache.IsComplete(Path.Combine(data, "mini")), Is.True);
    }

    [Test]
    public void CachesOfDifferentTokenizersAreNotMixed()
    {
        var corpus = WriteCorpus();
        var data = Path.Combine(_dir, "data");
        TokenCache.Prepare(data, "mini", [corpus], new PrepareOptions { Progress = false }, TextWriter.Null);
        var metaPath = Path.Combine(data, "mini", TokenCache.MetaFile);
        var meta = JsonSerializer.Deserialize<TokenCacheMeta>(File.ReadAllText(metaPath))!;
        File.WriteAllText(metaPath, JsonSerializer.Serialize(meta with { Tokenizer = "other-bpe", TokenizerHash = "0123" }));
        var e = Assert.Throws<InvalidDataException>(() => TokenCache.Open(Path.Combine(data, "mini"), TextTokenizer.Gpt2))!;
        Assert.That(e.Message, Does.Contain("other-bpe").And.Contain("gpt2"));
        Assert.Throws<InvalidDataException>(() => TokenCache.Prepare(data, "mini", [corpus], new PrepareOptions { Progress = false }, TextWriter.Null));
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
