using System.Collections.Concurrent;
using System.Reflection;
using TorchSharp;
using static TorchSharp.torch;

namespace FlashAttn;

/// <summary>
/// TorchSharp's custom-function node (0.107, <c>Node&lt;T&gt;.SaveOutputsInfo</c>) keeps <c>torch.empty_like</c> of every
/// output until the graph is freed, only to give an undefined incoming gradient as <c>zeros_like</c> of it. For a
/// training step that is a second, never-read copy of every output of our functions held from the forward to the end of
/// the backward: at GPT-2 124M (B 16, T 1024) the norms' outputs, qkv, attention and MLP outputs of 12 layers, 3.5 GiB
/// of the step's peak memory (11.35 -> 7.89 GiB on the H200); 9.1 GiB at 350M.
/// <para>Every forward of ours calls <see cref="Track"/> first, every apply() is wrapped in <see cref="Slim{T}"/>, which
/// replaces the node's copies with expanded views of one element (0-dim) of the same dtype and device: <c>zeros_like</c>
/// of a view gives the same zeros of the same shape, and the copies' memory goes back to the caching allocator before
/// the next op runs. The node owns the views (no dispose scope takes them) and disposes them with itself.</para>
/// <para>The fields are TorchSharp's private ones, read by reflection; a TorchSharp that renames them leaves the copies
/// in place (the memory as before, nothing wrong) and fails <c>OutputCacheTests</c>.</para>
/// </summary>
internal static class OutputCache
{
    private const BindingFlags Private = BindingFlags.NonPublic | BindingFlags.Instance;
    private static readonly FieldInfo? s_node = typeof(autograd.AutogradContext).GetField("_node", Private);
    private static readonly ConcurrentDictionary<Type, FieldInfo?> s_cacheField = new();
    // one element per (dtype, device), never freed: the views' storage
    private static readonly ConcurrentDictionary<(ScalarType, DeviceType, int), Tensor> s_element = new();

    // the context of the forward this thread ran last, until the apply() around it has returned
    [ThreadStatic] private static autograd.AutogradContext? t_last;

    /// <summary>Whether this TorchSharp has the fields <see cref="Slim"/> works through.</summary>
    internal static bool Supported =>
        s_node is not null && typeof(autograd.AutogradContext).Assembly.GetType("TorchSharp.torch+autograd+Node`1") is { } node &&
        CacheField(node.MakeGenericType(typeof(RotaryFunction))) is not null;

    /// <summary>The first call of a custom function's forward: its node fills the cache after forward returns. The node
    /// still pending on this thread, if any (an apply() called directly, without <see cref="Slim{T}"/>), is slimmed first:
    /// forwards do not nest, so its apply() has returned.</summary>
    internal static void Track(autograd.AutogradContext ctx)
    {
        Slim();
        t_last = ctx;
    }

    /// <summary>Around apply(): <c>OutputCache.Slim(F.apply(...))</c>; the node of the forward this thread ran last keeps
    /// views instead of copies.</summary>
    internal static T Slim<T>(T outputs)
    {
        Slim();
        return outputs;
    }

    private static void Slim()
    {
        var ctx = t_last;
        t_last = null;
        if (ctx is null || s_node?.GetValue(ctx) is not { } node) return;
        if (CacheField(node.GetType())?.GetValue(node) is not List<Tensor?> cache) return; // a node already gone
        for (int i = 0; i < cache.Count; ++i)
        {
            var t = cache[i];
            if (t is null || t.IsInvalid) continue;
            var view = ViewOf(t);
            cache[i] = view;
            t.Dispose();
        }
    }

    // Node<T> of the function at hand (the context's field is typed as the non-generic base)
    private static FieldInfo? CacheField(Type nodeType) => s_cacheField.GetOrAdd(nodeType, static t =>
        t.GetField("_outputCache", Private) is { } f && f.FieldType == typeof(List<Tensor>) ? f : null);

    // detached from the caller's dispose scope: the node disposes the view, and the element is never freed
    private static Tensor ViewOf(Tensor t)
    {
        var device = t.device;
        var one = s_element.GetOrAdd((t.dtype, device.type, device.index),
            // 0-dim: it expands to any shape, [] included
            static (k, dev) => zeros(Array.Empty<long>(), k.Item1, dev).DetachFromDisposeScope(), device);
        return one.expand(t.shape).DetachFromDisposeScope();
    }
}
