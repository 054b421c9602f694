using System.Security.Cryptography;
using System.Text;
using Microsoft.ML.Tokenizers;

namespace FlashAttn.Models.Data;

/// <summary>The GPT-2 byte-level BPE (Microsoft.ML.Tokenizers' Tiktoken "gpt2" data package),
/// with the end-of-text token that separates documents. Thread-safe.</summary>
public sealed class TextTokenizer
{
    public const string EndOfText = "<|endoftext|>";
    static readonly Lazy<TextTokenizer> s_gpt2 = new(() => new TextTokenizer("gpt2", TiktokenTokenizer.CreateForModel("gpt2")));

    readonly Tokenizer _tok;

    TextTokenizer(string name, Tokenizer tok)
    {
        Name = name;
        _tok = tok;
        var eot = tok.EncodeToIds(EndOfText);
        if (eot.Count != 1) throw new InvalidOperationException($"tokenizer {name}: {EndOfText} is not a single token");
        EndOfTextId = eot[0];
        VocabSize = EndOfTextId + 1; // GPT-2: 50257 (the end-of-text token is the last id)
        Hash = ComputeHash();
    }

    public static TextTokenizer Gpt2 => s_gpt2.Value;

    /// <summary>Only "gpt2" exists today; the name goes into every cache so that caches of different
    /// tokenizers are never mixed.</summary>
    public static TextTokenizer Get(string name) => name switch
    {
        "gpt2" => Gpt2,
        _ => throw new ArgumentException($"unknown tokenizer '{name}'; valid: gpt2"),
    };

    public string Name { get; }
    public int EndOfTextId { get; }
    public int VocabSize { get; }
    /// <summary>SHA-256 over the ids of a fixed probe text and the vocabulary size: two tokenizers
    /// with the same name but different merges get different hashes.</summary>
    public string Hash { get; }

    public IReadOnlyList<int> Encode(string text) => _tok.EncodeToIds(text, considerPreTokenization: true, considerNormalization: true);
    public string Decode(IEnumerable<int> ids) => _tok.Decode(ids) ?? "";

    string ComputeHash()
    {
        const string probe = "The quick brown fox jumps over the lazy dog. 0123456789 !?\u00e9\u4e2d\n\t  ending";
        var sb = new StringBuilder().Append(Name).Append('|').Append(VocabSize).Append('|');
        foreach (var id in Encode(probe)) sb.Append(id).Append(',');
        return Convert.ToHexString(SHA256.HashData(Encoding.UTF8.GetBytes(sb.ToString()))).ToLowerInvariant()[..16];
    }
}
