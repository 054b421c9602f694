using BenchmarkDotNet.Attributes;
using FlashAttn.Models.Training;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace FlashAttn.Benchmarks;

/// <summary>
/// One optimizer step over the parameters of GPT-2 124M (gpt2s) and 350M (gpt2m), in the trainer's two groups (weight
/// decay on the matrices), gradients in place:
/// <list type="bullet">
/// <item>Fused: FusedAdamW, the trainer's optimizer (bf16 weights, float32 master weights, clipping to 1.0): the norm and the
/// update in a few launches;</item>
/// <item>TorchSharpAdamW: torch.optim.AdamW over float32 copies of the weights (a handful of launches per tensor);</item>
/// <item>Accumulate: FusedAdamW.accumulate_grad, a micro-batch's bf16 gradients added into the float32 sums;</item>
/// <item>CopyFloor: a copy moving FusedAdamW's bytes (FusedAdamW is held to within 1.3x of it).</item>
/// </list>
/// Bytes per parameter element, each tensor read or written once:
/// Fused: read grad 2 (norm) + grad 2 + master 4 + exp_avg 4 + exp_avg_sq 4, write master 4 + exp_avg 4 + exp_avg_sq 4
/// + param 2 = 30; TorchSharpAdamW (float32): read param 4 + grad 4 + exp_avg 4 + exp_avg_sq 4, write param 4 + exp_avg 4
/// + exp_avg_sq 4 = 28; Accumulate: read grad 2 + sum 4, write sum 4 = 10.
/// </summary>
public class OptimBenchmarks : GpuBenchmark
{
    [Params("gpt2s", "gpt2m")]
    public string Model = "gpt2s";

    private const long FusedBytesPerElement = 30, TorchBytesPerElement = 28, AccumulateBytesPerElement = 10;

    private FusedAdamW _fused = null!;
    private optim.Optimizer _torch = null!;
    private List<Parameter> _params = null!, _fp32 = null!;
    private List<Tensor> _grads = null!;
    private Tensor _copySrc = null!, _copyDst = null!;

    /// <summary>Parameter elements of the model, from its config (as GptBenchmarks counts them).</summary>
    private long Elements()
    {
        var c = GptBenchmarks.Config(Model, fused: true);
        long d = c.n_embd, L = c.n_layer, V = c.padded_vocab_size, inner = c.n_inner;
        long perLayer = 4 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * inner + inner) + (inner * d + d);
        return V * d + c.n_positions * d + L * perLayer + 2 * d;
    }

    public override long Bytes(string method) => method switch
    {
        nameof(Fused) or nameof(CopyFloor) => FusedBytesPerElement * Elements(),
        nameof(TorchSharpAdamW) => TorchBytesPerElement * Elements(),
        nameof(Accumulate) => AccumulateBytesPerElement * Elements(),
        _ => 0,
    };

    protected override void Setup()
    {
        manual_seed(0);
        using var model = new Models.GPTLMHeadModel(GptBenchmarks.Config(Model, fused: true), Dev, ScalarType.BFloat16);
        var named = TrainingOptimizer.Optimized(model.parameter_groups());
        if (named.Sum(np => np.parameter.numel()) != Elements())
            throw new InvalidOperationException($"{Model}: the model has {named.Sum(np => np.parameter.numel())} parameters, Elements() says {Elements()}");
        // the parameters outlive the model: detached copies, in the model's order and groups
        var copies = named.Select(np => (np.name, parameter: new Parameter(np.parameter.detach().clone()), np.weight_decay)).ToList();
        _params = copies.Select(np => np.parameter).ToList();
        _fused = TrainingOptimizer.Create(copies, Precision.Bf16, 0.9, 0.95, 1e-8, 0.1, maxNorm: 1.0);
        if (!_fused.uses_kernels) throw new InvalidOperationException("FusedAdamW took the reference path");
        _grads = _params.Select(p => (randn_like(p) * 1e-3).DetachFromDisposeScope()).ToList();

        _fp32 = _params.Select(p => new Parameter(p.detach().to(ScalarType.Float32))).ToList();
        var decay = copies.Select((np, i) => (np.weight_decay, p: _fp32[i])).ToList();
        _torch = optim.AdamW([
            new AdamW.ParamGroup(decay.Where(x => x.weight_decay).Select(x => x.p), lr: 6e-4, beta1: 0.9, beta2: 0.95, weight_decay: 0.1),
            new AdamW.ParamGroup(decay.Where(x => !x.weight_decay).Select(x => x.p), lr: 6e-4, beta1: 0.9, beta2: 0.95, weight_decay: 0),
        ]);
        for (int i = 0; i < _fp32.Count; i++) _fp32[i].grad = _grads[i].to(ScalarType.Float32);
        foreach (var g in _fused.ParamGroups) g.LearningRate = 6e-4;

        _copySrc = empty(FusedBytesPerElement / 2 * Elements(), ScalarType.Byte, Dev);
        _copyDst = empty_like(_copySrc);
    }

    private void SetGrads()
    {
        for (int i = 0; i < _params.Count; i++) _params[i].grad = _grads[i];
    }

    [Benchmark(OperationsPerInvoke = Launches)]
    public void Fused()
    {
        SetGrads();
        for (int i = 0; i < Launches; i++) _fused.step();
        Sync();
    }

    [Benchmark(OperationsPerInvoke = Launches)]
    public void TorchSharpAdamW()
    {
        for (int i = 0; i < Launches; i++) _torch.step();
        Sync();
    }

    [Benchmark(OperationsPerInvoke = Launches)]
    public void Accumulate()
    {
        for (int i = 0; i < Launches; i++)
        {
            SetGrads();
            _fused.accumulate_grad();
        }
        Sync();
    }

    [Benchmark(Baseline = true, OperationsPerInvoke = Launches)]
    public void CopyFloor()
    {
        for (int i = 0; i < Launches; i++) _copyDst.copy_(_copySrc);
        Sync();
    }

    // The optimizers hold most of the case's memory and are no tensor fields: freed here, before the next case (the
    // tensor fields are freed by GpuBenchmark.Cleanup).
    protected override void Report()
    {
        _fused.Dispose();
        _torch.Dispose();
    }
}
