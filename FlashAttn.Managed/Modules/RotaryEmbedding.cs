using FlashAttn.Interop;
using TorchSharp;
using static TorchSharp.torch;

namespace FlashAttn;

/// <summary>
/// Rotary position embedding as flash-attn's RotaryEmbedding: rotates q and k of a packed qkv in
/// place. The cos/sin tables are computed in float32 and kept in float32 (the kernels read float32
/// tables for bf16/fp16 inputs: one rounding at the output instead of two), grown on demand.
/// XPos (scale_base) scales q by scale^p and k by scale^-p, p = (pos - seqlen/2) / scale_base.
/// </summary>
public sealed class RotaryEmbedding : nn.Module<Tensor, Tensor>
{
    private readonly long _dim;
    private readonly double _base;
    private readonly bool _interleaved;
    private readonly double? _scaleBase;
    private long _cachedLength;
    private Tensor? _cos, _sin, _cosK, _sinK;

    public RotaryEmbedding(long dim, double @base = 10000.0, bool interleaved = false, double? scale_base = null)
        : base(nameof(RotaryEmbedding))
    {
        if (dim <= 0 || dim % 2 != 0) throw new ArgumentException($"dim ({dim}) must be even and positive", nameof(dim));
        if (@base <= 0) throw new ArgumentException($"base ({@base}) must be positive", nameof(@base));
        if (scale_base is <= 0) throw new ArgumentException($"scale_base ({scale_base}) must be positive", nameof(scale_base));
        (_dim, _base, _interleaved, _scaleBase) = (dim, @base, interleaved, scale_base);
    }

    /// <summary>The rotary dimension (rotated features per head).</summary>
    public long dim => _dim;

    /// <summary>Rotates q and k of qkv (batch, seqlen, 3, nheads, headdim) in place; returns qkv.</summary>
    public override Tensor forward(Tensor qkv) => forward(qkv, seqlen_offset: 0);

    /// <summary>
    /// qkv (batch, seqlen, 3, nheads, headdim), or (batch, seqlen, nheads_q + 2 * nheads_k, headdim)
    /// with num_heads_q. seqlen_offset: position of the first token (KV-cache length), or
    /// seqlen_offsets per sequence with max_seqlen bounding the positions.
    /// </summary>
    public Tensor forward(Tensor qkv, long seqlen_offset = 0, Tensor? seqlen_offsets = null, long? max_seqlen = null,
        int? num_heads_q = null)
    {
        if (qkv.dim() < 4) throw new ArgumentException($"qkv must be 4-D or 5-D, got {TensorArgs.Shape(qkv)}", nameof(qkv));
        long seqlen = qkv.size(1);
        if (seqlen_offsets is not null && max_seqlen is null)
            throw new ArgumentException("max_seqlen must be given with seqlen_offsets (it sizes the cos/sin tables)", nameof(max_seqlen));
        Update(max_seqlen ?? seqlen + seqlen_offset, qkv.device);
        return flash_attn.apply_rotary_emb_qkv_(qkv, _cos!, _sin!, _cosK, _sinK, _interleaved, seqlen_offsets, seqlen_offset, num_heads_q);
    }

    /// <summary>Rotates q (batch, seqlen, nheads, headdim) and the k of kv (batch, seqlen, 2, nheads_k, headdim), in place.</summary>
    public (Tensor q, Tensor kv) forward(Tensor q, Tensor kv, long seqlen_offset = 0, Tensor? seqlen_offsets = null, long? max_seqlen = null)
    {
        Update(max_seqlen ?? q.size(1) + seqlen_offset, q.device);
        var qr = flash_attn.apply_rotary_emb(q, _cos!, _sin!, _interleaved, inplace: true, seqlen_offsets, seqlen_offset);
        var k = kv[.., .., 0];
        flash_attn.apply_rotary_emb(k, _cosK ?? _cos!, _sinK ?? _sin!, _interleaved, inplace: true, seqlen_offsets, seqlen_offset);
        return (qr, kv);
    }

    /// <summary>
    /// Rotates q (batch, seqlen_q, nheads, headdim) and k (batch, seqlen_k, nheads_k, headdim) out of place, both from
    /// position seqlen_offset: for q and k that are views of a custom autograd function's output (an MHA projection
    /// through fused_dense_func), which autograd forbids modifying in place.
    /// </summary>
    public (Tensor q, Tensor k) forward_qk(Tensor q, Tensor k, long seqlen_offset = 0)
    {
        Update(Math.Max(q.size(1), k.size(1)) + seqlen_offset, q.device);
        return (flash_attn.apply_rotary_emb(q, _cos!, _sin!, _interleaved, inplace: false, seqlen_offset: seqlen_offset),
                flash_attn.apply_rotary_emb(k, _cosK ?? _cos!, _sinK ?? _sin!, _interleaved, inplace: false, seqlen_offset: seqlen_offset));
    }

    /// <summary>XPos's scale base (null: plain rotary).</summary>
    public double? scale_base => _scaleBase;

    /// <summary>The float32 tables for positions [0, length) on <paramref name="device"/>: (length, dim / 2).</summary>
    public (Tensor cos, Tensor sin) Tables(long length, Device device)
    {
        Update(length, device);
        return (_cos!, _sin!);
    }

    private void Update(long length, Device device)
    {
        if (length <= _cachedLength && _cos is not null && _cos.device_type == device.type && _cos.device_index == device.index) return;
        // Grow geometrically so a decoding loop does not rebuild the tables at every step. XPos
        // scales depend on the table length (p is centred on length / 2, as in flash-attn), so
        // with scale_base the table is rebuilt for exactly the length asked.
        long newLength = _scaleBase is null ? Math.Max(length, 2 * _cachedLength) : length;
        using var scope = NewDisposeScope();
        var invFreq = 1.0 / pow(_base, arange(0, _dim, 2, dtype: ScalarType.Float32, device: device) / (double)_dim);
        var t = arange(newLength, dtype: ScalarType.Float32, device: device);
        var freqs = outer(t, invFreq);
        Tensor cos = freqs.cos(), sin = freqs.sin();
        foreach (var old in new[] { _cos, _sin, _cosK, _sinK }) old?.Dispose();
        // The tables outlive the call: detached from every dispose scope (a caller's scope, e.g. a training or decoding
        // step, must not free them), disposed with the module.
        if (_scaleBase is null)
        {
            (_cos, _sin, _cosK, _sinK) = (cos.DetachFromDisposeScope(), sin.DetachFromDisposeScope(), null, null);
        }
        else
        {
            var scaleVec = (arange(0, _dim, 2, dtype: ScalarType.Float32, device: device) + 0.4 * _dim) / (1.4 * _dim);
            var power = (t - newLength / 2) / _scaleBase.Value;
            var scale = pow(scaleVec.unsqueeze(0), power.unsqueeze(1));
            _cos = (cos * scale).DetachFromDisposeScope();
            _sin = (sin * scale).DetachFromDisposeScope();
            _cosK = (cos / scale).DetachFromDisposeScope();
            _sinK = (sin / scale).DetachFromDisposeScope();
        }
        _cachedLength = newLength;
    }

    protected override void Dispose(bool disposing)
    {
        if (disposing) foreach (var t in new[] { _cos, _sin, _cosK, _sinK }) t?.Dispose();
        base.Dispose(disposing);
    }
}

/// <summary>Factories for the drop-in modules, TorchSharp style (<c>layers.RotaryEmbedding(64)</c>).</summary>
public static partial class layers
{
    /// <summary>A <see cref="FlashAttn.RotaryEmbedding"/> over the first <paramref name="dim"/> features of each head.</summary>
    public static RotaryEmbedding RotaryEmbedding(long dim, double @base = 10000.0, bool interleaved = false, double? scale_base = null) =>
        new(dim, @base, interleaved, scale_base);
}
