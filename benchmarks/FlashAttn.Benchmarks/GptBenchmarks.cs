using System.Diagnostics;
using BenchmarkDotNet.Attributes;
using FlashAttn.Models;
using FlashAttn.Models.Training;
using TorchSharp;
using static TorchSharp.torch;

namespace FlashAttn.Benchmarks;

/// <summary>
/// GPT-2 124M (gpt2s) and 350M (gpt2m) training in bf16 at B16 T1024, every fusion on (flash attention, fused
/// dropout-add-LayerNorm with the residual in fp32, fused cross-entropy, fused dense/MLP where wired) and every fusion off
/// (TorchSharp SDPA, nn.LayerNorm, cross_entropy on float32 logits; residual_in_fp32 also off, as the peers). The shape
/// matches shared/peers/pytorch_baselines.py gpt and the plain-TorchSharp peer: vocabulary padded to 50304, no dropout.
/// FwdBwd is loss + backward; TrainStep adds the optimizer step at lr 6e-4: with the fusions on, `flashattn train`'s
/// (<see cref="TrainingOptimizer"/>: FusedAdamW with fp32 master weights, weight decay 0.1 on the matrices, the gradient
/// norm clipped to 1 on the device, gradients set to none), with them off TorchSharp's AdamW (the plain peer's).
/// Flops: model FLOPs (6N + 12 L d T per token).
/// Besides the BenchmarkDotNet lines, each case prints "gpt" TSV lines at cleanup: tokens/s and model TFLOP/s from the
/// median invocation. FLASHATTN_GPT_BENCH=gpt2s:on (model:on|off, comma-separated) picks the cases. Peak memory of a
/// training step is measured apart, without the caching allocator: see <see cref="Memory"/>.
/// </summary>
public class GptBenchmarks : GpuBenchmark
{
    private const int Batch = 16, SeqLen = 1024, Steps = 3;

    public static IEnumerable<string> Cases =>
        Environment.GetEnvironmentVariable("FLASHATTN_GPT_BENCH")?.Split(',', StringSplitOptions.RemoveEmptyEntries)
        ?? new[] { "gpt2s:on", "gpt2s:off", "gpt2m:on", "gpt2m:off" };

    /// <summary>"model:on" or "model:off" (all fusions).</summary>
    [ParamsSource(nameof(Cases))]
    public string Case = "gpt2s:on";

    private GPTLMHeadModel _model = null!;
    private optim.Optimizer _opt = null!;
    private Tensor _ids = null!, _labels = null!, _lossGrad = null!;
    private readonly List<double> _seconds = new();

    private string ModelName => Case.Split(':')[0];
    private bool Fused => Case.EndsWith(":on");

    private GPTConfig Config() => Config(ModelName, Fused);

    internal static GPTConfig Config(string model, bool fused)
    {
        var c = GPTConfig.Named(model).WithFusions(fused) with
        {
            pad_vocab_size_multiple = 64, resid_pdrop = 0, embd_pdrop = 0, attn_pdrop = 0,
        };
        return c with { residual_in_fp32 = fused };
    }

    public override double Flops(string method)
    {
        // 6N + 12 L d T per token, N from the config (no model needed)
        var c = Config();
        long d = c.n_embd, L = c.n_layer, V = c.padded_vocab_size, inner = c.n_inner;
        long perLayer = 4 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * inner + inner) + (inner * d + d);
        long n = V * d + c.n_positions * d + L * perLayer + 2 * d;
        return (6.0 * n + 12.0 * L * d * SeqLen) * Batch * SeqLen;
    }

    protected override void Setup()
    {
        manual_seed(0);
        _model = new GPTLMHeadModel(Config(), Dev, ScalarType.BFloat16);
        _model.train();
        _opt = Optimizer(_model, Fused);
        _ids = randint(0, 50257, new long[] { Batch, SeqLen }, device: Dev);
        _labels = randint(0, 50257, new long[] { Batch, SeqLen }, device: Dev);
        _lossGrad = ones(Array.Empty<long>(), ScalarType.Float32, Dev);
    }

    /// <summary>The optimizer of a training step: the trainer's with the fusions on (its defaults: betas 0.9, 0.999, eps
    /// 1e-8, weight decay 0.1, clip 1.0; the experiments' peak lr 6e-4), TorchSharp's AdamW with them off.</summary>
    internal static optim.Optimizer Optimizer(GPTLMHeadModel model, bool fused)
    {
        const double lr = 6e-4;
        if (!fused) return optim.AdamW(model.parameters(), lr: lr);
        var opt = TrainingOptimizer.Create(model.parameter_groups(), Precision.Bf16, weightDecay: 0.1, maxNorm: 1.0);
        foreach (var group in opt.ParamGroups) group.LearningRate = lr;
        return opt;
    }

    private void Step(bool optimizerStep)
    {
        using var scope = NewDisposeScope();
        // the gradient loss.backward() gives: the cross-entropy computes it in the forward (the trainer's path)
        var loss = _model.loss(_ids, _labels, _lossGrad);
        loss.backward();
        if (optimizerStep) _opt.step();
        _opt.zero_grad();
    }

    private void Run(bool optimizerStep)
    {
        var sw = Stopwatch.StartNew();
        for (int i = 0; i < Steps; i++) Step(optimizerStep);
        Sync();
        _seconds.Add(sw.Elapsed.TotalSeconds / Steps);
    }

    [Benchmark(OperationsPerInvoke = Steps)]
    public void FwdBwd() => Run(false);

    [Benchmark(OperationsPerInvoke = Steps)]
    public void TrainStep() => Run(true);

    protected override void Report()
    {
        if (_model is null) return;
        Sync();
        if (_seconds.Count > 0)
        {
            var sorted = _seconds.OrderBy(s => s).ToArray();
            double t = sorted[sorted.Length / 2], tok = Batch * SeqLen / t;
            double fpt = _model.flops_per_token(SeqLen);
            string name = $"{ModelName} flashattn-{(Fused ? "fused" : "plain")} bf16 B{Batch} T{SeqLen}";
            Console.WriteLine($"gpt\t{name} tokens/s (median invocation)\t{tok:G4}\ttokens/s");
            Console.WriteLine($"gpt\t{name} model TFLOP/s\t{tok * fpt / 1e12:G4}\tTFLOP/s");
            Console.WriteLine($"gpt\t{name} parameters\t{_model.num_parameters()}\tcount");
        }
        _seconds.Clear();
        _opt.Dispose();
    }
}
