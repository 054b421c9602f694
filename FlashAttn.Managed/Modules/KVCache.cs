using FlashAttn.Interop;
using TorchSharp;
using static TorchSharp.torch;

namespace FlashAttn;

/// <summary>
/// The pre-allocated keys and values of every layer for incremental decoding (flash-attn's InferenceParams):
/// (batch, max_length, n_head, head_dim) per layer, filled up to <see cref="length"/>. Each <see cref="MHA"/> with a
/// layer_idx writes its new keys and values into its layer and attends to the cache through flash_attn_with_kvcache;
/// the model then calls <see cref="advance"/> once for the tokens every layer has seen.
/// </summary>
public sealed class KVCache : IDisposable
{
    private readonly Tensor[] _k, _v;
    private readonly Tensor _seqlens; // (batch,) int32 on the cache's device: length for every sequence
    private readonly long[] _hostSeqlens; // the same on the host, so that attending does not read them back

    /// <summary>Tokens already in the cache (the position of the next token).</summary>
    public long length { get; private set; }
    public long max_length { get; }
    /// <summary>The sequences it holds.</summary>
    public long batch => _k[0].size(0);
    /// <summary>The layers it holds.</summary>
    public int n_layer => _k.Length;

    public KVCache(int n_layer, long batch, long max_length, long n_head, long head_dim, ScalarType dtype, Device device)
    {
        TensorArgs.Require(n_layer >= 1, nameof(n_layer), $"n_layer ({n_layer}) must be at least 1");
        TensorArgs.Require(batch >= 0, nameof(batch), $"batch ({batch}) must not be negative");
        TensorArgs.Require(max_length >= 1, nameof(max_length), $"max_length ({max_length}) must be at least 1");
        TensorArgs.Require(n_head >= 1, nameof(n_head), $"n_head ({n_head}) must be at least 1");
        TensorArgs.Require(head_dim >= 1, nameof(head_dim), $"head_dim ({head_dim}) must be at least 1");
        TensorArgs.Require(TensorArgs.IsLowOrSingleFloat(dtype) || dtype == ScalarType.Float64, nameof(dtype),
            $"dtype must be float16, bfloat16, float32 or float64, got {dtype}");
        this.max_length = max_length;
        _k = Enumerable.Range(0, n_layer).Select(_ => zeros(new[] { batch, max_length, n_head, head_dim }, dtype, device)).ToArray();
        _v = Enumerable.Range(0, n_layer).Select(_ => zeros(new[] { batch, max_length, n_head, head_dim }, dtype, device)).ToArray();
        _seqlens = zeros(new[] { batch }, ScalarType.Int32, device);
        _hostSeqlens = new long[batch];
    }

    /// <summary>Marks <paramref name="tokens"/> more positions as filled (after every layer has appended them).</summary>
    public void advance(long tokens)
    {
        TensorArgs.Require(tokens >= 0 && length + tokens <= max_length, nameof(tokens),
            $"the cache holds {max_length} positions, {length} taken: it cannot advance by {tokens}");
        length += tokens;
        _seqlens.fill_(length);
        Array.Fill(_hostSeqlens, length);
    }

    /// <summary>
    /// Writes k, v (batch, seqlen, n_head, head_dim) at positions [length, length + seqlen) of layer
    /// <paramref name="layer"/> and returns q's attention (batch, seqlen, n_head, head_dim) over that layer's positions
    /// [0, length + seqlen): one flash_attn_with_kvcache call, which first rotates k and q at their positions when the
    /// rotary tables are given.
    /// </summary>
    internal Tensor Append(int layer, Tensor q, Tensor k, Tensor v, double? softmax_scale, bool causal,
        (long left, long right)? window_size, Tensor? alibi_slopes, Tensor? rotary_cos, Tensor? rotary_sin, bool rotary_interleaved)
    {
        long s = k.size(1);
        var cache = _k[0];
        TensorArgs.Require(layer < n_layer && batch == q.size(0) && length + s <= max_length, "cache",
            $"the cache ({n_layer} layers of {batch} sequences, {length} of {max_length} positions taken) has no room for layer {layer}'s {q.size(0)} x {s} tokens");
        TensorArgs.Require(k.size(2) == cache.size(2) && k.size(3) == cache.size(3) && k.dtype == cache.dtype, "cache",
            $"the cache holds {cache.size(2)} heads of {cache.size(3)} in {cache.dtype}, the layer {k.size(2)} of {k.size(3)} in {k.dtype}");
        TensorArgs.RequireSameDevice(cache, k, "cache", "the layer's keys");
        return flash_attn.KvCacheAttention(q, _k[layer], _v[layer], _seqlens, _hostSeqlens, k, v, rotary_cos, rotary_sin, softmax_scale,
                                           causal, window_size, 0.0, rotary_interleaved, alibi_slopes).output;
    }

    public void Dispose()
    {
        foreach (var t in _k.Concat(_v).Append(_seqlens)) t.Dispose();
    }
}
