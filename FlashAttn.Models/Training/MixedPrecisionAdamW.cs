using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace FlashAttn.Models.Training;

public enum Precision { Fp32, Bf16, Fp16 }

/// <summary>AdamW over fp32 master weights. With bf16/fp16 the model computes in 16 bits and this
/// keeps an fp32 copy of every parameter: gradients are cast up (and unscaled), the global norm is
/// clipped, Adam updates the masters, and the masters are copied back into the model. Over several
/// micro-batches (<see cref="AccumulateGradients"/>) the gradients add up in fp32 as well: in 16 bits
/// each addition rounds to 8 (bf16) or 11 (fp16) bits, and gpt2s at device batch 16 adds 32. Weight decay
/// only on the parameters the model marks (not biases, norms, embeddings). A non-finite gradient
/// norm skips the step (fp16 overflow; the loss scaler then backs off).</summary>
public sealed class MixedPrecisionAdamW : IDisposable
{
    sealed class Slot
    {
        public required string Name;
        public required Parameter Param;
        public required Tensor Master;
        public required Tensor M;
        public required Tensor V;
        public required bool Decay;
        public Tensor? GradSum;  // fp32 sum of the micro-batches' gradients (16-bit weights only)
        public bool HasSum;      // GradSum holds this step's gradients; after a step the next micro-batch overwrites it
    }

    readonly List<Slot> _slots = new();
    readonly bool _separateMaster;
    public double Beta1 { get; }
    public double Beta2 { get; }
    public double Eps { get; }
    public double WeightDecay { get; }
    /// <summary>Adam's step count (bias correction); skipped steps don't count.</summary>
    public long T { get; set; }

    public MixedPrecisionAdamW(IEnumerable<(string name, Parameter parameter, bool weight_decay)> parameters, Precision precision,
        double beta1 = 0.9, double beta2 = 0.999, double eps = 1e-8, double weightDecay = 0.1)
    {
        _separateMaster = precision != Precision.Fp32;
        Beta1 = beta1; Beta2 = beta2; Eps = eps; WeightDecay = weightDecay;
        using var _ = no_grad();
        var seen = new HashSet<IntPtr>();
        foreach (var (name, p, decay) in parameters)
        {
            if (!p.requires_grad || !seen.Add(p.Handle)) continue;
            var master = _separateMaster ? p.detach().to(ScalarType.Float32).clone() : p;
            _slots.Add(new Slot
            {
                Name = name, Param = p, Master = master, Decay = decay,
                M = zeros(p.shape, ScalarType.Float32, p.device), V = zeros(p.shape, ScalarType.Float32, p.device),
            });
        }
    }

    public int Count => _slots.Count;
    public long DecayedParameters => _slots.Where(s => s.Decay).Sum(s => s.Param.numel());
    public long UndecayedParameters => _slots.Where(s => !s.Decay).Sum(s => s.Param.numel());

    /// <summary>After each micro-batch's backward when accumulating: with 16-bit weights, adds the parameters'
    /// gradients into fp32 sums and clears them, so the next backward starts a fresh 16-bit gradient; with fp32
    /// weights autograd already accumulates in fp32 and this does nothing.</summary>
    public void AccumulateGradients()
    {
        if (!_separateMaster) return;
        using var scope = NewDisposeScope();
        using var _ = no_grad();
        foreach (var s in _slots)
        {
            var g = s.Param.grad;
            if (g is null) continue;
            s.GradSum ??= zeros(s.Param.shape, ScalarType.Float32, s.Param.device).DetachFromDisposeScope();
            if (s.HasSum) s.GradSum.add_(g);
            else s.GradSum.copy_(g);
            s.HasSum = true;
            s.Param.grad = null;
        }
    }

    /// <summary>One optimizer step from the gradients in the model's parameters (and the fp32 sums of
    /// <see cref="AccumulateGradients"/>, to which any gradient still in the parameters is added). Returns the global
    /// gradient norm (after unscaling, before clipping) and whether the step was taken.</summary>
    public (double gradNorm, bool stepped) Step(double lr, double clipNorm, double lossScale = 1.0)
    {
        using var scope = NewDisposeScope();
        using var _ = no_grad();
        var grads = new Tensor[_slots.Count];
        Tensor? sq = null;
        for (int i = 0; i < _slots.Count; i++)
        {
            var slot = _slots[i];
            var g = slot.Param.grad;
            if (slot.HasSum) g = g is null ? slot.GradSum : slot.GradSum! + g;
            if (g is null) { grads[i] = zeros_like(slot.Master); continue; }
            g = g.to(ScalarType.Float32);
            if (lossScale != 1.0) g = g * (1.0 / lossScale);
            grads[i] = g;
            var s = g.square().sum();
            sq = sq is null ? s : sq + s;
        }
        double norm = sq is null ? 0 : Math.Sqrt(sq.item<float>());
        foreach (var slot in _slots) slot.HasSum = false;
        if (!double.IsFinite(norm)) return (norm, false);
        double coef = clipNorm > 0 && norm > clipNorm ? clipNorm / (norm + 1e-6) : 1.0;
        T++;
        double bc1 = 1 - Math.Pow(Beta1, T), bc2 = 1 - Math.Pow(Beta2, T);
        double stepSize = lr / bc1, sqrtBc2 = Math.Sqrt(bc2);
        for (int i = 0; i < _slots.Count; i++)
        {
            var s = _slots[i];
            var g = coef != 1.0 ? grads[i] * coef : grads[i];
            s.M.mul_(Beta1).add_(g, alpha: 1 - Beta1);
            s.V.mul_(Beta2).addcmul_(g, g, value: 1 - Beta2);
            var denom = (s.V.sqrt() / sqrtBc2).add_(Eps);
            if (s.Decay && WeightDecay != 0) s.Master.mul_(1 - lr * WeightDecay);
            s.Master.addcdiv_(s.M, denom, value: -stepSize);
            if (_separateMaster) s.Param.copy_(s.Master);
        }
        return (norm, true);
    }

    public void ZeroGrad()
    {
        foreach (var s in _slots) { s.Param.grad?.zero_(); s.HasSum = false; }
    }

    /// <summary>Sets every master weight from <paramref name="weights"/> (by parameter name, any dtype and device; float32
    /// keeps them exact) and the model's parameters from the masters.</summary>
    public void SetMasters(IReadOnlyDictionary<string, Tensor> weights)
    {
        using var _ = no_grad();
        foreach (var s in _slots)
        {
            if (!weights.TryGetValue(s.Name, out var w)) throw new ArgumentException($"weights holds no {s.Name}", nameof(weights));
            if (!w.shape.SequenceEqual(s.Master.shape) || !w.is_floating_point())
                throw new ArgumentException($"weights[{s.Name}] is {w.dtype} [{string.Join(", ", w.shape)}]; the parameter is [{string.Join(", ", s.Master.shape)}]", nameof(weights));
            s.Master.copy_(w);
            if (_separateMaster) s.Param.copy_(s.Master);
        }
    }

    /// <summary>Master weights and Adam moments by name, for checkpoints.</summary>
    public Dictionary<string, Tensor> StateTensors()
    {
        var d = new Dictionary<string, Tensor>();
        foreach (var s in _slots)
        {
            d["master." + s.Name] = s.Master;
            d["adam.m." + s.Name] = s.M;
            d["adam.v." + s.Name] = s.V;
        }
        return d;
    }

    public void LoadStateTensors(IReadOnlyDictionary<string, Tensor> state)
    {
        using var _ = no_grad();
        foreach (var s in _slots)
        {
            Tensor Get(string k) => state.TryGetValue(k, out var t) ? t : throw new InvalidDataException($"checkpoint has no {k}");
            s.Master.copy_(Get("master." + s.Name));
            s.M.copy_(Get("adam.m." + s.Name));
            s.V.copy_(Get("adam.v." + s.Name));
            if (_separateMaster) s.Param.copy_(s.Master);
        }
    }

    public void Dispose()
    {
        foreach (var s in _slots)
        {
            if (_separateMaster) s.Master.Dispose();
            s.M.Dispose(); s.V.Dispose(); s.GradSum?.Dispose();
        }
    }
}

/// <summary>fp16's dynamic loss scaling (as torch.cuda.amp.GradScaler): start at 2^16, halve on a
/// non-finite gradient (the step is skipped), double after 2000 finite steps in a row.</summary>
public sealed class DynamicLossScaler(double initScale = 65536.0, int growthInterval = 2000)
{
    public double Scale { get; set; } = initScale;
    public int GoodSteps { get; set; }

    public void Update(bool finite)
    {
        if (!finite) { Scale = Math.Max(Scale / 2, 1.0 / 65536); GoodSteps = 0; return; }
        if (++GoodSteps >= growthInterval) { Scale *= 2; GoodSteps = 0; }
    }
}
