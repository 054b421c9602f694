using FlashAttn.Interop;
using TorchSharp;
using static FlashAttn.Interop.TensorArgs;
using static TorchSharp.torch;

namespace FlashAttn;

public static partial class flash_attn
{
    /// <summary>
    /// Incremental decoding against a KV cache, as flash_attn.flash_attn_with_kvcache (inference only,
    /// no gradients). q (batch, seqlen_q, nheads, headdim); k_cache/v_cache (batch, seqlen_cache,
    /// nheads_k, headdim) hold cache_seqlens[b] valid positions for sequence b. New keys/values k, v
    /// (batch, seqlen_new, nheads_k, headdim), when given, are first rotated (rotary_cos/rotary_sin
    /// at positions cache_seqlens[b] + t) and written into the caches in place at those positions.
    /// q is rotated at the same positions when causal or local, else at cache_seqlens[b] for every
    /// query (flash-attn's convention). Then q attends to the first cache_seqlens[b] + seqlen_new
    /// positions of each cache; causal is aligned bottom-right, so the last query sees every key.
    /// The caches must be large enough: cache_seqlens[b] + seqlen_new &lt;= seqlen_cache.
    /// </summary>
    /// <returns>(batch, seqlen_q, nheads, headdim), and the float32 LSE (batch, nheads, seqlen_q).</returns>
    public static FlashAttnResult flash_attn_with_kvcache(Tensor q, Tensor k_cache, Tensor v_cache, Tensor cache_seqlens,
        Tensor? k = null, Tensor? v = null, Tensor? rotary_cos = null, Tensor? rotary_sin = null, double? softmax_scale = null,
        bool causal = false, (long left, long right)? window_size = null, double softcap = 0.0, bool rotary_interleaved = true,
        Tensor? alibi_slopes = null) =>
        KvCacheAttention(q, k_cache, v_cache, cache_seqlens, null, k, v, rotary_cos, rotary_sin, softmax_scale, causal, window_size,
                         softcap, rotary_interleaved, alibi_slopes);

    /// <summary>flash_attn_with_kvcache, with cache_seqlens' values also on the host when the caller knows them
    /// (<paramref name="hostSeqlens"/>, as <see cref="KVCache"/> does): a decoding step then does not wait for the device
    /// once per layer to read them back.</summary>
    internal static FlashAttnResult KvCacheAttention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor cache_seqlens, long[]? hostSeqlens,
        Tensor? k, Tensor? v, Tensor? rotary_cos, Tensor? rotary_sin, double? softmax_scale, bool causal,
        (long left, long right)? window_size, double softcap, bool rotary_interleaved, Tensor? alibi_slopes)
    {
        DeviceErrors.Raise();
        ValidateKvCache(q, k_cache, v_cache, cache_seqlens, k, v, rotary_cos, rotary_sin);
        using var grad = no_grad();
        using var scope = NewDisposeScope();
        long batch = q.size(0), seqlenNew = k?.size(1) ?? 0, cacheLength = k_cache.size(1);
        var lens = hostSeqlens ?? cache_seqlens.to(ScalarType.Int64).cpu().data<long>().ToArray();
        for (int b = 0; b < batch; b++)
            Require(lens[b] >= 0 && lens[b] + seqlenNew <= cacheLength, "cache_seqlens",
                    $"cache_seqlens[{b}] ({lens[b]}) + seqlen_new ({seqlenNew}) must be within the cache's {cacheLength} positions");
        bool local = window_size is { } w && (w.left >= 0 || w.right >= 0);
        if (rotary_cos is not null)
        {
            // the last position rotated: k's at lens[b] + seqlen_new - 1, q's at lens[b] + seqlen_q - 1 (causal or local)
            // or lens[b]
            long span = Math.Max(seqlenNew, causal || local ? q.size(1) : 1);
            long need = batch == 0 || span == 0 ? 0 : lens.Max() + span;
            Require(need <= rotary_cos.size(0), "rotary_cos",
                    $"rotary_cos/rotary_sin hold {rotary_cos.size(0)} positions but the rotated tokens reach position {need - 1}");
        }
        var offsets = cache_seqlens.to(ScalarType.Int64);
        // one length for every sequence (the usual batched decode): rotated at that offset as a number, which, unlike a
        // tensor of offsets, the rotary op checks without reading it back from the device
        long? uniform = batch > 0 && lens.All(l => l == lens[0]) ? lens[0] : null;
        Tensor Rotate(Tensor x) => uniform is long u
            ? apply_rotary_emb(x, rotary_cos!, rotary_sin!, rotary_interleaved, seqlen_offset: u)
            : apply_rotary_emb(x, rotary_cos!, rotary_sin!, rotary_interleaved, seqlen_offsets: offsets);
        if (k is not null)
        {
            if (rotary_cos is not null) k = Rotate(k);
            // positions lens[b] + t of sequence b receive the new keys and values
            var index = (offsets.view(batch, 1) + arange(seqlenNew, dtype: ScalarType.Int64, device: q.device).view(1, seqlenNew))
                .view(batch, seqlenNew, 1, 1).expand(k.shape);
            k_cache.scatter_(1, index, k.to(k_cache.dtype));
            v_cache.scatter_(1, index, v!.to(v_cache.dtype));
        }
        if (rotary_cos is not null)
        {
            q = causal || local ? Rotate(q) : RotateAllAt(q, rotary_cos, rotary_sin!, rotary_interleaved, offsets);
        }
        // One call when every sequence has the same length (the usual batched decode); otherwise one
        // per sequence over its own prefix of the cache.
        FlashAttnResult result;
        if (batch == 0 || uniform is not null)
        {
            long t0 = uniform is long u ? u + seqlenNew : 0;
            result = flash_attn_func_with_lse(q, k_cache[.., ..(int)t0], v_cache[.., ..(int)t0], 0, softmax_scale, causal,
                                              window_size, softcap, alibi_slopes);
        }
        else
        {
            var parts = Enumerable.Range(0, (int)batch).Select(b =>
            {
                var slopes = alibi_slopes is not null && alibi_slopes.dim() == 2 ? alibi_slopes[b..(b + 1)] : alibi_slopes;
                long total = lens[b] + seqlenNew;
                return flash_attn_func_with_lse(q[b..(b + 1)], k_cache[b..(b + 1), ..(int)total], v_cache[b..(b + 1), ..(int)total],
                                                0, softmax_scale, causal, window_size, softcap, slopes);
            }).ToList();
            result = new FlashAttnResult(cat(parts.Select(p => p.output).ToList(), 0), cat(parts.Select(p => p.softmax_lse).ToList(), 0), null);
        }
        return new FlashAttnResult(result.output.MoveToOuterDisposeScope(), result.softmax_lse.MoveToOuterDisposeScope(), null);
    }

    // Non-causal decoding: every query of sequence b sits at position cache_seqlens[b].
    private static Tensor RotateAllAt(Tensor q, Tensor cos, Tensor sin, bool interleaved, Tensor offsets)
    {
        long batch = q.size(0), seqlen = q.size(1);
        var flat = q.reshape(batch * seqlen, 1, q.size(2), q.size(3));
        var rotated = apply_rotary_emb(flat, cos, sin, interleaved, seqlen_offsets: offsets.repeat_interleave(seqlen));
        return rotated.view(q.shape);
    }

    private static void ValidateKvCache(Tensor q, Tensor kCache, Tensor vCache, Tensor cacheSeqlens, Tensor? k, Tensor? v,
        Tensor? cos, Tensor? sin)
    {
        RequireFloat(q, "q");
        RequireDim(q, 4, "q", "(batch, seqlen_q, nheads, headdim)");
        RequireContiguousLastDim(q, "q");
        foreach (var (t, name) in new[] { (kCache, "k_cache"), (vCache, "v_cache") })
        {
            Require(t.dtype == q.dtype, name, $"{name} must have q's dtype ({q.dtype}), got {t.dtype}");
            RequireDim(t, 4, name, "(batch, seqlen_cache, nheads_k, headdim)");
            RequireContiguousLastDim(t, name);
            RequireSameDevice(t, q, name, "q");
        }
        Require(vCache.shape.SequenceEqual(kCache.shape), "v_cache", $"v_cache must have k_cache's shape {Shape(kCache)}, got {Shape(vCache)}");
        Require(kCache.size(0) == q.size(0), "k_cache", $"k_cache's batch ({kCache.size(0)}) must equal q's ({q.size(0)})");
        RequireDim(cacheSeqlens, 1, "cache_seqlens", "(batch,)");
        Require(cacheSeqlens.size(0) == q.size(0), "cache_seqlens", $"cache_seqlens must have batch ({q.size(0)}) entries, got {cacheSeqlens.size(0)}");
        Require(cacheSeqlens.dtype is ScalarType.Int32 or ScalarType.Int64, "cache_seqlens", $"cache_seqlens must be int32 or int64, got {cacheSeqlens.dtype}");
        RequireSameDevice(cacheSeqlens, q, "cache_seqlens", "q");
        Require((k is null) == (v is null), k is null ? "k" : "v", "k and v go together");
        if (k is not null)
        {
            foreach (var (t, name) in new[] { (k, "k"), (v!, "v") })
            {
                Require(t.dtype == q.dtype, name, $"{name} must have q's dtype ({q.dtype}), got {t.dtype}");
                RequireDim(t, 4, name, "(batch, seqlen_new, nheads_k, headdim)");
                RequireContiguousLastDim(t, name);
                RequireSameDevice(t, q, name, "q");
            }
            Require(v!.shape.SequenceEqual(k.shape), "v", $"v must have k's shape {Shape(k)}, got {Shape(v)}");
            Require(k.size(0) == q.size(0) && k.size(2) == kCache.size(2) && k.size(3) == kCache.size(3), "k",
                    $"k {Shape(k)} must match the cache's batch, heads and head dimension {Shape(kCache)}");
        }
        Require((cos is null) == (sin is null), cos is null ? "rotary_cos" : "rotary_sin", "rotary_cos and rotary_sin go together");
        // the tables' shape, dtype and device; the positions they must hold are checked once cache_seqlens is read
        if (cos is not null) RotaryFunction.Validate(q, cos, sin!, null, 0, null, null, "q", "rotary_cos", "rotary_sin");
    }
}
