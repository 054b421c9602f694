using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace FlashAttn;

public static partial class Reference
{
    /// <summary>
    /// y = x @ weight^T + bias, computed in float32 (float64 for float64) and rounded once to x's dtype:
    /// the semantics of <see cref="flash_attn.fused_dense_func"/>. <paramref name="compute_dtype"/>
    /// overrides the arithmetic's dtype (tests use x's own dtype to measure a low-precision computation).
    /// </summary>
    public static Tensor fused_dense(Tensor x, Tensor weight, Tensor? bias = null, ScalarType? compute_dtype = null)
    {
        using var scope = NewDisposeScope();
        var ct = compute_dtype ?? ComputeType(x.dtype);
        var y = nn.functional.linear(x.to(ct), weight.to(ct), bias?.to(ct));
        return y.to(x.dtype).MoveToOuterDisposeScope();
    }

    /// <summary>
    /// The MLP of <see cref="flash_attn.fused_mlp_func"/>: fc2(act(fc1(x))), act the tanh-approximated
    /// GELU ("gelu_approx", GPT-2's gelu_new) or "relu". Each product is computed in float32 and the
    /// hidden activation is rounded to x's dtype, as the fused kernels materialise it.
    /// </summary>
    public static Tensor fused_mlp(Tensor x, Tensor weight1, Tensor weight2, Tensor? bias1 = null, Tensor? bias2 = null,
        string activation = "gelu_approx", ScalarType? compute_dtype = null)
    {
        using var scope = NewDisposeScope();
        var ct = compute_dtype ?? ComputeType(x.dtype);
        var act = DenseActivations.Parse(activation, "activation");
        var pre = nn.functional.linear(x.to(ct), weight1.to(ct), bias1?.to(ct));
        var h = DenseActivations.Apply(act, pre).to(x.dtype);
        var y = nn.functional.linear(h.to(ct), weight2.to(ct), bias2?.to(ct));
        return y.to(x.dtype).MoveToOuterDisposeScope();
    }

    /// <summary>
    /// The gated MLP of <see cref="GatedMlp"/>: fc1 gives (y, gate) halves of 2 * hidden features,
    /// fc2(y * act(gate)) with act sigmoid (GLU), silu (SwiGLU), gelu_approx or relu.
    /// </summary>
    public static Tensor gated_mlp(Tensor x, Tensor weight1, Tensor weight2, Tensor? bias1 = null, Tensor? bias2 = null,
        string activation = "sigmoid", ScalarType? compute_dtype = null)
    {
        using var scope = NewDisposeScope();
        var ct = compute_dtype ?? ComputeType(x.dtype);
        var y = nn.functional.linear(x.to(ct), weight1.to(ct), bias1?.to(ct)).to(x.dtype).to(ct);
        var halves = y.chunk(2, -1);
        var h = (halves[0] * DenseActivations.Gate(activation, halves[1])).to(x.dtype);
        var o = nn.functional.linear(h.to(ct), weight2.to(ct), bias2?.to(ct));
        return o.to(x.dtype).MoveToOuterDisposeScope();
    }
}

/// <summary>The MLP activations (flash-attn's names) and their derivatives.</summary>
internal enum DenseActivation { GeluApprox, Relu }

internal static class DenseActivations
{
    /// <summary>The fused epilogue of an activation name (Hugging Face's tanh-GELU names included), null for others.</summary>
    internal static DenseActivation? TryParse(string activation) => activation switch
    {
        "gelu_approx" or "gelu_new" or "gelu_tanh" or "gelu_pytorch_tanh" => DenseActivation.GeluApprox,
        "relu" => DenseActivation.Relu,
        _ => null,
    };

    internal static DenseActivation Parse(string activation, string paramName) =>
        TryParse(activation) ?? throw new ArgumentException($"activation must be \"gelu_approx\" or \"relu\", got \"{activation}\"", paramName);

    internal static string Name(DenseActivation a) => a == DenseActivation.GeluApprox ? "gelu_approx" : "relu";

    /// <summary>GELU with the tanh approximation (PyTorch's gelu(approximate="tanh")), or ReLU.</summary>
    internal static Tensor Apply(DenseActivation a, Tensor t) =>
        a == DenseActivation.GeluApprox ? nn.functional.gelu(t, GELU.Approximate.tanh) : nn.functional.relu(t);

    /// <summary>d act / d t at t (same dtype as t).</summary>
    internal static Tensor Derivative(DenseActivation a, Tensor t)
    {
        if (a == DenseActivation.Relu) return t.gt(0).to(t.dtype);
        const double c = 0.7978845608028654; // sqrt(2 / pi)
        const double k = 0.044715;
        var t2 = t * t;
        var th = (c * t * (1.0 + k * t2)).tanh();
        return 0.5 * (1.0 + th) + 0.5 * t * (1.0 - th * th) * (c * (1.0 + 3.0 * k * t2));
    }

    internal static readonly string[] GateNames = { "sigmoid", "silu", "gelu_approx", "relu" };

    internal static void ValidateGate(string activation, string paramName)
    {
        if (!GateNames.Contains(activation))
            throw new ArgumentException($"activation must be one of {string.Join(", ", GateNames)}, got \"{activation}\"", paramName);
    }

    internal static Tensor Gate(string activation, Tensor gate) => activation switch
    {
        "sigmoid" => gate.sigmoid(),
        "silu" => nn.functional.silu(gate),
        "gelu_approx" => nn.functional.gelu(gate, GELU.Approximate.tanh),
        "relu" => nn.functional.relu(gate),
        _ => throw new ArgumentException($"activation must be one of {string.Join(", ", GateNames)}, got \"{activation}\"", nameof(activation)),
    };
}
