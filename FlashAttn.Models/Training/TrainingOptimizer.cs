using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace FlashAttn.Models.Training;

/// <summary>The trainer's <see cref="FusedAdamW"/>: two groups (weight decay only on the parameters the model marks: not
/// biases, norms, embeddings), fp32 master weights in bf16/fp16 runs, the gradient norm clipped on the device; and its
/// state by parameter name for checkpoints (master.&lt;name&gt;, adam.m.&lt;name&gt;, adam.v.&lt;name&gt;, the step
/// count as adam_t).</summary>
public static class TrainingOptimizer
{
    /// <summary>The parameters the optimizer takes: those that require gradients, each once.</summary>
    public static List<(string name, Parameter parameter, bool weight_decay)> Optimized(
        IEnumerable<(string name, Parameter parameter, bool weight_decay)> parameters)
    {
        var seen = new HashSet<IntPtr>();
        return parameters.Where(np => np.parameter.requires_grad && seen.Add(np.parameter.Handle)).ToList();
    }

    public static FusedAdamW Create(IEnumerable<(string name, Parameter parameter, bool weight_decay)> parameters, Precision precision,
        double beta1 = 0.9, double beta2 = 0.999, double eps = 1e-8, double weightDecay = 0.1, double maxNorm = 0)
    {
        var optimized = Optimized(parameters);
        var groups = new[] { true, false }
            .Select(decay => optimized.Where(np => np.weight_decay == decay).Select(np => np.parameter).ToList())
            .Zip(new[] { weightDecay, 0.0 })
            .Where(g => g.First.Count > 0)
            .Select(g => new AdamW.ParamGroup(g.First, beta1: beta1, beta2: beta2, eps: eps, weight_decay: g.Second));
        return new FusedAdamW(groups, beta1: beta1, beta2: beta2, eps: eps, master_weights: precision != Precision.Fp32, max_norm: maxNorm);
    }

    /// <summary>Master weights (the parameter itself in fp32 runs) and Adam moments by name.</summary>
    public static Dictionary<string, Tensor> StateTensors(FusedAdamW optimizer, IEnumerable<(string name, Parameter parameter, bool weight_decay)> parameters)
    {
        var d = new Dictionary<string, Tensor>();
        foreach (var (name, p, _) in Optimized(parameters))
        {
            var s = optimizer.state(p);
            d["master." + name] = s.master ?? p;
            d["adam.m." + name] = s.exp_avg;
            d["adam.v." + name] = s.exp_avg_sq;
        }
        return d;
    }

    /// <summary>Adam's step count (every parameter steps together in the trainer). Reading it waits for the GPU.</summary>
    public static long AdamT(FusedAdamW optimizer, IEnumerable<(string name, Parameter parameter, bool weight_decay)> parameters) =>
        Optimized(parameters) is [var first, ..] ? optimizer.state(first.parameter).step : 0;

    /// <summary>Restores <see cref="StateTensors"/> and the step count <paramref name="adamT"/>; the 16-bit parameters
    /// take their masters' values.</summary>
    public static void LoadStateTensors(FusedAdamW optimizer, IEnumerable<(string name, Parameter parameter, bool weight_decay)> parameters,
        IReadOnlyDictionary<string, Tensor> state, long adamT)
    {
        using var _ = no_grad();
        foreach (var (name, p, _) in Optimized(parameters))
        {
            Tensor Get(string k) => state.TryGetValue(k, out var t) ? t : throw new InvalidDataException($"checkpoint has no {k}");
            var s = optimizer.state(p);
            optimizer.set_master_weight(p, Get("master." + name));
            s.exp_avg.copy_(Get("adam.m." + name));
            s.exp_avg_sq.copy_(Get("adam.v." + name));
            s.step = adamT;
        }
    }
}
