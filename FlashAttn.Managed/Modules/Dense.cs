using FlashAttn.Interop;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;
using F = TorchSharp.torch.nn.functional;

namespace FlashAttn;

/// <summary>
/// Drop-in for torch.nn.Linear on cuBLASLt (flash-attn's FusedDense): parameters <c>weight</c>
/// (out_features, in_features) and <c>bias</c> (out_features,) with torch.nn.Linear's names and
/// initialisation, so state dicts load unchanged. bf16/fp16 CUDA inputs run one GEMM with the bias
/// epilogue forward and the bias gradient fused into the weight-gradient GEMM backward; anything else
/// takes the TorchSharp reference path. With return_residual, <see cref="forward_residual"/> returns (y, x).
/// </summary>
public sealed class FusedDense : nn.Module<Tensor, Tensor>
{
    public readonly long in_features, out_features;
    public readonly bool return_residual;
#pragma warning disable IDE0044 // registered by name: weight / bias, as torch.nn.Linear
    private Parameter weight;
    private Parameter? bias;
#pragma warning restore IDE0044

    public FusedDense(long in_features, long out_features, bool bias = true, bool return_residual = false,
        Device? device = null, ScalarType? dtype = null) : base(nameof(FusedDense))
    {
        if (in_features < 0 || out_features < 0)
            throw new ArgumentException($"in_features ({in_features}) and out_features ({out_features}) must be >= 0", nameof(in_features));
        (this.in_features, this.out_features, this.return_residual) = (in_features, out_features, return_residual);
        (weight, this.bias) = DenseInit.LinearParameters(in_features, out_features, bias, device, dtype);
        RegisterComponents();
    }

    public Parameter Weight => weight;
    public Parameter? Bias => bias;

    /// <summary>x (..., in_features) -> (..., out_features).</summary>
    public override Tensor forward(Tensor x)
    {
        TensorArgs.RequireModuleInput(x, nameof(x), weight);
        TensorArgs.RequireLastDim(x, in_features, nameof(x), "in_features");
        return flash_attn.fused_dense_func(x, weight, bias);
    }

    /// <summary>(y, x): the output and the input as the residual (flash-attn's return_residual).</summary>
    public (Tensor output, Tensor residual) forward_residual(Tensor x) => (forward(x), x);
}

/// <summary>
/// flash-attn's FusedMLP: fc2(act(fc1(x))) with children <c>fc1</c> (hidden, in) and <c>fc2</c> (out, hidden)
/// (torch.nn.Linear, HF/flash-attn names), activation "gelu_approx" (tanh GELU, GPT-2) or "relu". hidden_features
/// defaults to 4 * in_features, out_features to in_features. checkpoint_lvl 0/1/2 trades memory for recomputation
/// (see <see cref="flash_attn.fused_mlp_func"/>); in eval mode the pre-activation is not kept.
/// With return_residual, <see cref="forward_residual"/> returns (y, x).
/// </summary>
public sealed class FusedMLP : nn.Module<Tensor, Tensor>
{
    public readonly long in_features, hidden_features, out_features;
    public readonly string activation;
    public readonly int checkpoint_lvl;
    public readonly bool return_residual;
    private readonly Linear fc1, fc2; // registered as fc1 / fc2 unless renamed

    public FusedMLP(long in_features, long? hidden_features = null, long? out_features = null, bool bias1 = true, bool bias2 = true,
        string activation = "gelu_approx", bool return_residual = false, int checkpoint_lvl = 0,
        Device? device = null, ScalarType? dtype = null, (string fc1, string fc2)? names = null) : base(nameof(FusedMLP))
    {
        DenseActivations.Parse(activation, nameof(activation));
        if (checkpoint_lvl is < 0 or > 2)
            throw new ArgumentException($"checkpoint_lvl ({checkpoint_lvl}) must be 0, 1 or 2", nameof(checkpoint_lvl));
        this.in_features = in_features;
        (this.activation, this.checkpoint_lvl, this.return_residual) = (activation, checkpoint_lvl, return_residual);
        (this.hidden_features, this.out_features, fc1, fc2) = MlpModules.Linears(this, in_features, hidden_features, out_features, bias1, bias2,
            device, dtype, names);
    }

    public Linear Fc1 => fc1;
    public Linear Fc2 => fc2;

    public override Tensor forward(Tensor x)
    {
        TensorArgs.RequireModuleInput(x, nameof(x), fc1.weight!);
        TensorArgs.RequireLastDim(x, in_features, nameof(x), "in_features");
        return flash_attn.fused_mlp_func(x, fc1.weight!, fc2.weight!, fc1.bias, fc2.bias, activation, save_pre_act: training,
                                         checkpoint_lvl: checkpoint_lvl);
    }

    /// <summary>(y, x): the output and the input as the residual (flash-attn's return_residual).</summary>
    public (Tensor output, Tensor residual) forward_residual(Tensor x) => (forward(x), x);
}

/// <summary>
/// flash-attn's Mlp: fc2(act(fc1(x))) with the activation in TorchSharp between two linears (through fused_dense_func
/// when fused_bias_fc): for activations <see cref="FusedMLP"/> has no epilogue for (exact GELU, ViT's) and as the plain
/// path FusedMLP is compared with; the same children <c>fc1</c>, <c>fc2</c> (or names), so one state dict serves both.
/// activation "gelu_approx" (tanh GELU; also Hugging Face's gelu_new, gelu_pytorch_tanh), "gelu" (exact) or "relu".
/// </summary>
public sealed class Mlp : nn.Module<Tensor, Tensor>
{
    public readonly long in_features, hidden_features, out_features;
    public readonly string activation;
    public readonly bool fused_bias_fc;
    private readonly Linear fc1, fc2;
    private readonly DenseActivation? _fusedActivation; // null: exact GELU

    public Mlp(long in_features, long? hidden_features = null, long? out_features = null, bool bias1 = true, bool bias2 = true,
        string activation = "gelu_approx", bool fused_bias_fc = false, Device? device = null, ScalarType? dtype = null,
        (string fc1, string fc2)? names = null) : base(nameof(Mlp))
    {
        _fusedActivation = DenseActivations.TryParse(activation);
        if (activation != "gelu" && _fusedActivation is null)
            throw new ArgumentException($"activation must be \"gelu_approx\" (or gelu_new, gelu_tanh, gelu_pytorch_tanh), \"gelu\" or \"relu\", got \"{activation}\"", nameof(activation));
        this.in_features = in_features;
        (this.activation, this.fused_bias_fc) = (activation, fused_bias_fc);
        (this.hidden_features, this.out_features, fc1, fc2) = MlpModules.Linears(this, in_features, hidden_features, out_features, bias1, bias2,
            device, dtype, names);
    }

    public Linear Fc1 => fc1;
    public Linear Fc2 => fc2;

    public override Tensor forward(Tensor x)
    {
        TensorArgs.RequireModuleInput(x, nameof(x), fc1.weight!);
        TensorArgs.RequireLastDim(x, in_features, nameof(x), "in_features");
        var h = Linear(fc1, x);
        h = _fusedActivation is DenseActivation a ? DenseActivations.Apply(a, h) : F.gelu(h);
        return Linear(fc2, h);
    }

    private Tensor Linear(Linear layer, Tensor x) => fused_bias_fc ? flash_attn.fused_dense_func(x, layer.weight!, layer.bias) : layer.forward(x);
}

/// <summary>
/// flash-attn's GatedMlp (GLU / SwiGLU): fc1 (2 * hidden, in) gives (y, gate), fc2(y * act(gate)) with act "sigmoid"
/// (GLU, the default, as flash-attn's F.sigmoid) or "silu" (SwiGLU, LLaMA), also "gelu_approx" or "relu".
/// hidden_features defaults to 8 * in_features / 3 and is rounded up to a multiple of multiple_of.
/// Children <c>fc1</c>, <c>fc2</c> (torch.nn.Linear). With return_residual, <see cref="forward_residual"/> returns (y, x).
/// </summary>
public sealed class GatedMlp : nn.Module<Tensor, Tensor>
{
    public readonly long in_features, hidden_features, out_features;
    public readonly string activation;
    public readonly bool return_residual;
#pragma warning disable IDE0044
    private Linear fc1;
    private Linear fc2;
#pragma warning restore IDE0044

    public GatedMlp(long in_features, long? hidden_features = null, long? out_features = null, string activation = "sigmoid",
        bool bias1 = true, bool bias2 = true, long multiple_of = 128, bool return_residual = false,
        Device? device = null, ScalarType? dtype = null) : base(nameof(GatedMlp))
    {
        DenseActivations.ValidateGate(activation, nameof(activation));
        if (multiple_of < 1) throw new ArgumentException($"multiple_of ({multiple_of}) must be >= 1", nameof(multiple_of));
        this.in_features = in_features;
        this.out_features = out_features ?? in_features;
        long hidden = hidden_features ?? 8 * in_features / 3;
        this.hidden_features = (hidden + multiple_of - 1) / multiple_of * multiple_of;
        (this.activation, this.return_residual) = (activation, return_residual);
        fc1 = nn.Linear(in_features, 2 * this.hidden_features, bias1, device, dtype);
        fc2 = nn.Linear(this.hidden_features, this.out_features, bias2, device, dtype);
        RegisterComponents();
    }

    public Linear Fc1 => fc1;
    public Linear Fc2 => fc2;

    public override Tensor forward(Tensor x)
    {
        TensorArgs.RequireModuleInput(x, nameof(x), fc1.weight!);
        TensorArgs.RequireLastDim(x, in_features, nameof(x), "in_features");
        return flash_attn.gated_mlp_func(x, fc1.weight!, fc2.weight!, fc1.bias, fc2.bias, activation);
    }

    /// <summary>(y, x): the output and the input as the residual (flash-attn's return_residual).</summary>
    public (Tensor output, Tensor residual) forward_residual(Tensor x) => (forward(x), x);
}

internal static class DenseInit
{
    /// <summary>torch.nn.Linear's initialisation: weight kaiming_uniform(a = sqrt(5)), i.e. U(-1/sqrt(in), 1/sqrt(in)),
    /// bias U(-1/sqrt(in), 1/sqrt(in)); drawn in float32 on the CPU from TorchSharp's default generator.</summary>
    internal static (Parameter weight, Parameter? bias) LinearParameters(long inFeatures, long outFeatures, bool bias, Device? device, ScalarType? dtype)
    {
        double bound = inFeatures > 0 ? 1.0 / Math.Sqrt(inFeatures) : 0.0;
        var w = (rand(outFeatures, inFeatures) * (2 * bound) - bound).to(dtype ?? get_default_dtype(), device ?? CPU);
        var b = bias ? (rand(outFeatures) * (2 * bound) - bound).to(dtype ?? get_default_dtype(), device ?? CPU) : null;
        var wp = new Parameter(w);
        var bp = b is null ? null : new Parameter(b);
        return (wp, bp);
    }
}

/// <summary>What the MLP modules share, and the choice a model makes between them.</summary>
internal static class MlpModules
{
    /// <summary>fc1 (hidden, in) and fc2 (out, hidden) of <see cref="FusedMLP"/> and <see cref="Mlp"/> with flash-attn's
    /// feature defaults (hidden 4 * in, out = in), created in that order (the order of their random draws) and registered
    /// on <paramref name="module"/> as fc1 / fc2 or <paramref name="names"/>.</summary>
    internal static (long hidden, long outFeatures, Linear fc1, Linear fc2) Linears(nn.Module module, long inFeatures, long? hidden,
        long? outFeatures, bool bias1, bool bias2, Device? device, ScalarType? dtype, (string fc1, string fc2)? names)
    {
        long h = hidden ?? 4 * inFeatures, o = outFeatures ?? inFeatures;
        var (fc1, fc2) = (nn.Linear(inFeatures, h, bias1, device, dtype), nn.Linear(h, o, bias2, device, dtype));
        var (n1, n2) = names ?? ("fc1", "fc2");
        module.register_module(n1, fc1);
        module.register_module(n2, fc2);
        return (h, o, fc1, fc2);
    }

    /// <summary>A model's MLP (flash-attn's GPT's choice): <see cref="FusedMLP"/> when fused_mlp and the activation has a
    /// fused epilogue (tanh-GELU, ReLU), else <see cref="Mlp"/> (exact GELU, or fusions off); the same parameters either way.</summary>
    internal static nn.Module<Tensor, Tensor> Create(long inFeatures, long hidden, string activation, bool fusedMlp, bool fusedBiasFc,
        int checkpointLvl, (string fc1, string fc2) names, Device? device, ScalarType? dtype) =>
        fusedMlp && DenseActivations.TryParse(activation) is not null
            ? new FusedMLP(inFeatures, hidden, activation: activation, checkpoint_lvl: checkpointLvl, device: device, dtype: dtype, names: names)
            : new Mlp(inFeatures, hidden, activation: activation, fused_bias_fc: fusedBiasFc, device: device, dtype: dtype, names: names);
}

public static partial class layers
{
    public static FusedDense FusedDense(long in_features, long out_features, bool bias = true, bool return_residual = false,
        Device? device = null, ScalarType? dtype = null) => new(in_features, out_features, bias, return_residual, device, dtype);

    public static FusedMLP FusedMLP(long in_features, long? hidden_features = null, long? out_features = null, bool bias1 = true,
        bool bias2 = true, string activation = "gelu_approx", bool return_residual = false, int checkpoint_lvl = 0,
        Device? device = null, ScalarType? dtype = null) =>
        new(in_features, hidden_features, out_features, bias1, bias2, activation, return_residual, checkpoint_lvl, device, dtype);

    public static Mlp Mlp(long in_features, long? hidden_features = null, long? out_features = null, bool bias1 = true,
        bool bias2 = true, string activation = "gelu_approx", bool fused_bias_fc = false, Device? device = null, ScalarType? dtype = null) =>
        new(in_features, hidden_features, out_features, bias1, bias2, activation, fused_bias_fc, device, dtype);

    public static GatedMlp GatedMlp(long in_features, long? hidden_features = null, long? out_features = null, string activation = "sigmoid",
        bool bias1 = true, bool bias2 = true, long multiple_of = 128, bool return_residual = false, Device? device = null,
        ScalarType? dtype = null) =>
        new(in_features, hidden_features, out_features, activation, bias1, bias2, multiple_of, return_residual, device, dtype);
}
