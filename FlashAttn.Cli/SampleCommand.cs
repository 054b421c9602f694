using System.Diagnostics;
using System.Globalization;
using FlashAttn.Models;
using FlashAttn.Models.Data;
using FlashAttn.Models.Training;
using TorchSharp;
using static TorchSharp.torch;

namespace FlashAttn.Cli;

/// <summary>
/// `flashattn sample [MODEL] [options]`: text from a GPT, as nanoGPT's sample.py. MODEL is a run folder (config.yaml
/// and model.safetensors, what `flashattn train` writes; default runs/tiny, the main job's), one of its checkpoint
/// folders (checkpoints/step-NNNNNNN, best-step-NNNNNNN or the pointer checkpoints/last: the fp32 master weights, so that
/// a long run can be sampled before it ends), a Hugging Face GPT-2 folder (nanoGPT's init_from=gpt2, downloaded: config.json
/// and model.safetensors) or a .safetensors file of GPTLMHeadModel. Samples go to stdout separated by a dashed line; what
/// was loaded and the speed go to stderr.
/// </summary>
public static class SampleCommand
{
    public const string Usage = "usage: flashattn sample [RUN | CHECKPOINT | HF_GPT2_FOLDER | FILE.safetensors] [--prompt TEXT | --prompt-file FILE] [--num-samples N] " +
        "[--max-new-tokens N] [--temperature T] [--top-k K] [--top-p P] [--seed S] [--device auto|cpu|cuda] [--no-cache]";

    public const string Separator = "---------------";

    sealed record Options
    {
        public string Path { get; init; } = System.IO.Path.Combine("runs", "tiny");
        public string Prompt { get; init; } = TextTokenizer.EndOfText;
        public int NumSamples { get; init; } = 3;
        public int MaxNewTokens { get; init; } = 200;
        public double Temperature { get; init; } = 0.8;
        public int? TopK { get; init; } = 200;
        public double? TopP { get; init; }
        public ulong Seed { get; init; } = 1337;
        public Accelerator Device { get; init; } = Accelerator.Auto;
        public bool UseCache { get; init; } = true;
    }

    public static int Run(string[] args, TextWriter stdout, TextWriter stderr)
    {
        var o = Parse(args);
        var device = DevicePolicy.Resolve(o.Device, "--device");
        var source = GptSource.Open(o.Path);
        var tokenizer = TextTokenizer.Get(source.Tokenizer);
        if (source.Config.vocab_size != tokenizer.VocabSize)
            throw new InvalidDataException($"{o.Path}: the model's vocab_size is {source.Config.vocab_size}; the {tokenizer.Name} tokenizer has {tokenizer.VocabSize}");
        var dtype = DevicePolicy.InferenceDtype(device, source.Precision);
        using var model = new GPTLMHeadModel(source.ForDevice(device, stderr), device, dtype);
        source.LoadInto(model);
        var prompt = tokenizer.Encode(o.Prompt).Select(i => (long)i).ToArray();
        if (prompt.Length == 0) throw new ArgumentException("--prompt encodes to no tokens");
        stderr.WriteLine($"{o.Path}: {source.Name} ({model.num_parameters() / 1e6:F1}M parameters) on {device.type} in {dtype}; " +
            $"{o.NumSamples} sample(s) of {o.MaxNewTokens} tokens after a {prompt.Length}-token prompt");

        var generator = new Generator(o.Seed, device);
        using var scope = NewDisposeScope();
        var ids = tensor(prompt, [1, prompt.Length], ScalarType.Int64).to(device).expand(o.NumSamples, prompt.Length).contiguous();
        var sw = Stopwatch.StartNew();
        var rows = GenerateLong(model, ids, o.MaxNewTokens, o.Temperature, o.TopK, o.TopP, o.UseCache, generator).cpu();
        var elapsed = sw.Elapsed.TotalSeconds; // after the copy: the GPU's queued work counted
        for (int s = 0; s < o.NumSamples; s++)
        {
            stdout.WriteLine(tokenizer.Decode(rows[s].data<long>().Select(t => (int)t)));
            stdout.WriteLine(Separator);
        }
        stderr.WriteLine($"{o.NumSamples * o.MaxNewTokens:N0} tokens in {elapsed:F2} s ({o.NumSamples * o.MaxNewTokens / Math.Max(elapsed, 1e-9):F1} tokens/s)");
        return 0;
    }

    /// <summary>
    /// GPTLMHeadModel.generate past a model's learned positions, as nanoGPT crops its context: with the KV cache while
    /// prompt and output fit n_positions, then in chunks of n_positions / 8 new tokens, each chunk conditioned on the
    /// n_positions − chunk tokens before it (every token sees at least 7/8 of the context; one prefill per chunk
    /// instead of one per token); a prompt of n_positions tokens or more starts with the chunks. Rotary models have no
    /// position table: one call. Returns (B, prompt + maxNewTokens).
    /// </summary>
    public static Tensor GenerateLong(GPTLMHeadModel model, Tensor ids, int maxNewTokens, double temperature = 1.0, int? topK = null,
        double? topP = null, bool useCache = true, Generator? generator = null)
    {
        if (ids.dim() != 2 || ids.shape[1] < 1 || ids.dtype != ScalarType.Int64)
            throw new ArgumentException($"ids must be int64 (batch, seqlen >= 1), got {ids.dtype} [{string.Join(", ", ids.shape)}]", nameof(ids));
        if (maxNewTokens < 0) throw new ArgumentException("maxNewTokens must be >= 0", nameof(maxNewTokens));
        var c = model.config;
        long window = c.rotary_emb_fraction > 0 ? long.MaxValue : c.n_positions;
        int first = (int)Math.Clamp(window - ids.shape[1], 0, maxNewTokens);
        var tokens = first > 0 ? model.generate(ids, first, temperature, topK, topP, useCache, generator) : ids.alias();
        int chunk = (int)Math.Max(1, window / 8);
        for (int left = maxNewTokens - first; left > 0;)
        {
            int n = Math.Min(chunk, left);
            using var scope = NewDisposeScope();
            var context = tokens[.., (int)(tokens.shape[1] - (window - n))..];
            var next = model.generate(context, n, temperature, topK, topP, useCache, generator);
            var grown = cat(new[] { tokens, next[.., (int)context.shape[1]..] }, 1).MoveToOuterDisposeScope();
            tokens.Dispose();
            tokens = grown;
            left -= n;
        }
        return tokens;
    }

    static Options Parse(string[] args)
    {
        var o = new Options();
        bool pathSet = false;
        for (int i = 0; i < args.Length; i++)
        {
            string Value() => i + 1 < args.Length ? args[++i] : throw new ArgumentException($"{args[i]} needs a value; {Usage}");
            int Int(string name, int min)
            {
                var v = Value();
                return int.TryParse(v, NumberStyles.Integer, CultureInfo.InvariantCulture, out var n) && n >= min
                    ? n : throw new ArgumentException($"{name} {v}: an integer >= {min} expected");
            }
            double Float(string name, double min, double max)
            {
                var v = Value();
                return double.TryParse(v, NumberStyles.Float, CultureInfo.InvariantCulture, out var x) && x >= min && x <= max
                    ? x : throw new ArgumentException($"{name} {v}: a number in [{min}, {max}] expected");
            }
            switch (args[i])
            {
                case "--prompt": o = o with { Prompt = Value() }; break;
                case "--prompt-file": o = o with { Prompt = File.ReadAllText(Value()) }; break;
                case "--num-samples": o = o with { NumSamples = Int("--num-samples", 1) }; break;
                case "--max-new-tokens": o = o with { MaxNewTokens = Int("--max-new-tokens", 0) }; break;
                case "--temperature": o = o with { Temperature = Float("--temperature", 0, 100) }; break;
                case "--top-k": { int k = Int("--top-k", 0); o = o with { TopK = k == 0 ? null : k }; break; } // 0: off
                case "--top-p": { double p = Float("--top-p", 0, 1); o = o with { TopP = p is 0 or 1 ? null : p }; break; }
                case "--seed":
                    var seed = Value();
                    o = ulong.TryParse(seed, NumberStyles.Integer, CultureInfo.InvariantCulture, out var sd) ? o with { Seed = sd }
                        : throw new ArgumentException($"--seed {seed}: a non-negative integer expected");
                    break;
                case "--device":
                    var d = Value();
                    o = ConfigNames.Accelerators.Contains(d) ? o with { Device = ConfigNames.ParseAccelerator(d) }
                        : throw new ArgumentException($"--device {d}; valid: {string.Join(", ", ConfigNames.Accelerators)}");
                    break;
                case "--no-cache": o = o with { UseCache = false }; break;
                case var a when a.StartsWith("--"):
                    throw new ArgumentException($"unknown option {a}; valid: --prompt, --prompt-file, --num-samples, --max-new-tokens, " +
                        "--temperature, --top-k, --top-p, --seed, --device, --no-cache");
                default:
                    if (pathSet) throw new ArgumentException($"one run or checkpoint folder expected, got '{o.Path}' and '{args[i]}'; {Usage}");
                    o = o with { Path = args[i] };
                    pathSet = true;
                    break;
            }
        }
        return o;
    }
}
