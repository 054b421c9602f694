using System.Reflection;
using NUnit.Framework;
using TorchSharp;
using static TorchSharp.torch;

namespace FlashAttn.Tests;

/// <summary>
/// TorchSharp's node of a custom function keeps an <c>empty_like</c> of every output until the graph is freed;
/// <see cref="OutputCache"/> replaces them with one-element views right after apply(). These tests look into the nodes
/// each op leaves in the graph (TorchSharp's private fields, the same reflection as the fix) and check that the undefined
/// gradient of an output nobody used still reaches the backward as zeros.
/// </summary>
public sealed class OutputCacheTests
{
    private const BindingFlags Private = BindingFlags.NonPublic | BindingFlags.Instance;
    private static readonly Type NodeBase = typeof(autograd.AutogradContext).Assembly.GetType("TorchSharp.torch+autograd+Node")!;

    [Test]
    public void TorchSharpHasTheFieldsTheFixWorksThrough() =>
        Assert.That(OutputCache.Supported, Is.True,
            "TorchSharp's AutogradContext._node or Node<T>._outputCache is gone: every output is held twice again");

    private static readonly string[] CpuOps =
    {
        "dropout_add_layer_norm_prenorm", "dropout_add_layer_norm_parallel", "rms_norm", "fused_dense", "fused_mlp",
        "cross_entropy", "rotary", "rotary_qkv", "mha_folded_scale",
    };

    private static IEnumerable<TestCaseData> Ops() =>
        CpuOps.Select(op => new TestCaseData(op).SetName($"NodesKeepNoCopyOfTheirOutputs_{op}"));

    // the attention function runs on the kernels only (the CPU takes the reference composite, no node of ours)
    private static IEnumerable<TestCaseData> CudaOps() =>
        CpuOps.Append("flash_attn").Append("flash_attn_qkvpacked")
              .Select(op => new TestCaseData(op).SetName($"NodesKeepNoCopyOfTheirOutputsOnTheGpu_{op}"));

    [TestCaseSource(nameof(Ops))]
    public void NodesKeepNoCopyOfTheirOutputs(string op) => CheckNodes(op, CPU, ScalarType.Float32);

    [TestCaseSource(nameof(CudaOps))]
    [Category(Gpu.Category)]
    public void NodesKeepNoCopyOfTheirOutputsOnTheGpu(string op) => CheckNodes(op, Gpu.Require(), ScalarType.BFloat16);

    private static void CheckNodes(string op, Device dev, ScalarType dtype)
    {
        manual_seed(1);
        using var scope = NewDisposeScope();
        var before = AliveNodes();
        var outputs = Run(op, dev, dtype);
        var ours = OurNodes(before);
        Assert.That(ours, Is.Not.Empty, $"{op} made no node of ours");
        Assert.That(ours.Sum(n => Cache(n).Count(t => t is not null)), Is.GreaterThan(0), $"{op}: no output recorded (the graph was not built)");
        foreach (var node in ours)
            Assert.That(Copies(node), Is.EqualTo(0), $"{op}: {node.GetType().GetGenericArguments()[0].Name} keeps full-size copies of its outputs");
        GC.KeepAlive(outputs);
    }

    /// <summary>apply() is public: called directly, without OutputCache.Slim around it, its node keeps the copy until this
    /// thread's next forward of ours.</summary>
    [Test]
    public void ADirectApplyIsSlimmedByTheNextForward()
    {
        manual_seed(3);
        using var scope = NewDisposeScope();
        var x = randn(8, 16).requires_grad_(true);
        var w = randn(32, 16).requires_grad_(true);
        var before = AliveNodes();
        var y = FusedDenseFunction.apply(x, w, null);
        var direct = OurNodes(before).Single();
        Assert.That(Copies(direct), Is.EqualTo(1), "the direct apply's node before the next forward");
        flash_attn.rms_norm(y, ones(32), 1e-5);
        Assert.That(Copies(direct), Is.EqualTo(0), "the direct apply's node after the next forward");
    }

    /// <summary>
    /// The prenorm residual and the attention's LSE left unused: their gradients are undefined, and TorchSharp materializes
    /// them from the (now one-element) cache entries. The gradients equal those of a loss that uses the outputs times zero.
    /// </summary>
    [Test]
    public void UnusedOutputsStillGiveZeroGradients() => UnusedOutputs(false, CPU, ScalarType.Float64);

    [TestCase(false)]
    [TestCase(true)]
    [Category(Gpu.Category)]
    public void UnusedOutputsStillGiveZeroGradientsOnTheGpu(bool attention) => UnusedOutputs(attention, Gpu.Require(), ScalarType.BFloat16);

    private static void UnusedOutputs(bool attention, Device dev, ScalarType dtype)
    {
        manual_seed(2);
        var x = randn(24, 40, dtype: dtype, device: dev).requires_grad_(true);
        var res = randn(24, 40, dtype: dtype, device: dev).requires_grad_(true);
        var w = (1 + 0.1 * randn(40, dtype: dtype, device: dev)).requires_grad_(true);
        var q = randn(2, 9, 2, 16, dtype: dtype, device: dev).requires_grad_(true);
        Tensor[] Grads(bool touchAll)
        {
            using var scope = NewDisposeScope();
            Tensor loss;
            Tensor[] leaves;
            if (attention)
            {
                var (o, lse, _) = flash_attn.flash_attn_func_with_lse(q, q, q, causal: true, deterministic: true);
                loss = (o * o).sum() + (touchAll ? 0 * lse.sum() : zeros(1, dtype: lse.dtype, device: dev).sum());
                leaves = new[] { q };
            }
            else
            {
                var (o, r, _) = flash_attn.dropout_add_layer_norm(x, res, w, null, 0.0, 1e-5, prenorm: true);
                loss = (o * o).sum() + (touchAll ? 0 * r!.sum() : zeros(1, dtype: r!.dtype, device: dev).sum());
                leaves = new[] { x, res, w };
            }
            return autograd.grad(new[] { loss }, leaves).Select(g => g.detach().clone().MoveToOuterDisposeScope()).ToArray();
        }
        BackwardGuard.ClearLastBackwardError();
        var unused = Grads(false);
        var used = Grads(true);
        Assert.That(BackwardGuard.LastBackwardError, Is.Null);
        for (int i = 0; i < used.Length; i++)
            Assert.That(unused[i].eq(used[i]).all().item<bool>(), Is.True, $"gradient {i} differs with the output unused");
    }

    private static object Run(string op, Device dev, ScalarType dtype)
    {
        const long rows = 16, width = 32;
        Tensor Leaf(params long[] shape) => randn(shape, dtype, dev).requires_grad_(true);
        var (x, x1, res) = (Leaf(rows, width), Leaf(rows, width), Leaf(rows, width));
        var w = ones(width, dtype, dev).requires_grad_(true);
        var (w1, w2) = (Leaf(4 * width, width), Leaf(width, 4 * width));
        var q = Leaf(2, 16, 2, 8);
        var (cos, sin) = (randn(16, 4, dtype: dtype, device: dev), randn(16, 4, dtype: dtype, device: dev));
        return op switch
        {
            "dropout_add_layer_norm_prenorm" => flash_attn.dropout_add_layer_norm(x, res, w, null, 0.1, 1e-5, prenorm: true),
            "dropout_add_layer_norm_parallel" =>
                flash_attn.dropout_add_layer_norm_parallel_residual(x, x1, res, w, null, w, null, 0.0, 1e-5, prenorm: true),
            "rms_norm" => flash_attn.rms_norm(x, w, 1e-5),
            "fused_dense" => flash_attn.fused_dense_func(x, w1, null),
            "fused_mlp" => flash_attn.fused_mlp_func(x, w1, w2),
            "cross_entropy" => flash_attn.cross_entropy_loss(x, randint(0, width, new long[] { rows }, device: dev)),
            "flash_attn" => flash_attn.flash_attn_func(q, q, q, causal: true),
            "flash_attn_qkvpacked" => flash_attn.flash_attn_qkvpacked_func(stack(new[] { q, q, q }, 2)),
            "rotary" => flash_attn.apply_rotary_emb(q, cos, sin),
            "rotary_qkv" => flash_attn.apply_rotary_emb_qkv_(stack(new[] { q, q, q }, 2).clone(), cos, sin),
            _ => MhaWithFoldedScale(q, dev, dtype),
        };
    }

    private static Tensor MhaWithFoldedScale(Tensor q, Device dev, ScalarType dtype)
    {
        // a softmax scale other than 1/sqrt(head_dim) on the SDPA path folds into Wqkv through RowScaleFunction
        var mha = new MHA(16, 2, softmax_scale: 0.3, causal: true, use_flash_attn: false, device: dev, dtype: dtype);
        return mha.forward(q.reshape(2, 16, 16));
    }

    private static List<object> OurNodes(List<object> before) =>
        AliveNodes().Except(before).Where(n => n.GetType().GetGenericArguments()[0].Assembly == typeof(OutputCache).Assembly).ToList();

    private static List<Tensor?> Cache(object node) => (List<Tensor?>)node.GetType().GetField("_outputCache", Private)!.GetValue(node)!;

    // entries that own storage of their own size (the views have every stride 0)
    private static int Copies(object node) => Cache(node).Count(t => t is not null && t.stride().Any(s => s != 0));

    private static List<object> AliveNodes()
    {
        var field = NodeBase.GetField("AliveNodes", BindingFlags.NonPublic | BindingFlags.Static)!;
        var list = (System.Collections.IList)field.GetValue(null)!;
        lock (list) return list.Cast<object>().ToList();
    }
}
