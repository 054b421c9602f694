using FlashAttn.Interop;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace FlashAttn;

/// <summary>The options FlashSelfAttention and FlashCrossAttention hold (flash-attn's constructor arguments).</summary>
internal sealed record InnerAttentionOptions(bool Causal, double? SoftmaxScale, double DropoutP, (long, long) Window,
    Tensor? AlibiSlopes, bool Deterministic)
{
    /// <summary>Dropout applies in training mode only.</summary>
    public double Dropout(bool training) => training ? DropoutP : 0;
}

/// <summary>
/// Scaled dot-product self-attention on a packed qkv through the FlashAttention kernels (the
/// reference path on CPU): qkv (batch, seqlen, 3, nheads, headdim) -> (batch, seqlen, nheads, headdim),
/// or with cu_seqlens (total, 3, nheads, headdim).
/// </summary>
public sealed class FlashSelfAttention : nn.Module<Tensor, Tensor>
{
    private readonly InnerAttentionOptions o;

    public FlashSelfAttention(bool causal = false, double? softmax_scale = null, double attention_dropout = 0.0,
        (long left, long right)? window_size = null, Tensor? alibi_slopes = null, bool deterministic = false)
        : base(nameof(FlashSelfAttention)) =>
        o = new(causal, softmax_scale, attention_dropout, window_size ?? (-1, -1), alibi_slopes, deterministic);

    public override Tensor forward(Tensor qkv) =>
        flash_attn.flash_attn_qkvpacked_func(qkv, o.Dropout(training), o.SoftmaxScale, o.Causal, o.Window, 0, o.AlibiSlopes, o.Deterministic);

    /// <summary>Varlen: qkv (total, 3, nheads, headdim) packed by cu_seqlens (batch + 1,) int32.</summary>
    public Tensor forward(Tensor qkv, Tensor cu_seqlens, long max_seqlen) =>
        flash_attn.flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, o.Dropout(training), o.SoftmaxScale, o.Causal,
                                                    o.Window, 0, o.AlibiSlopes, o.Deterministic);
}

/// <summary>Cross-attention through the kernels: q (batch, seqlen_q, nheads, headdim), kv (batch, seqlen_k, 2, nheads_k, headdim).</summary>
public sealed class FlashCrossAttention : nn.Module<Tensor, Tensor, Tensor>
{
    private readonly InnerAttentionOptions o;

    public FlashCrossAttention(bool causal = false, double? softmax_scale = null, double attention_dropout = 0.0,
        (long left, long right)? window_size = null, Tensor? alibi_slopes = null, bool deterministic = false)
        : base(nameof(FlashCrossAttention)) =>
        o = new(causal, softmax_scale, attention_dropout, window_size ?? (-1, -1), alibi_slopes, deterministic);

    public override Tensor forward(Tensor q, Tensor kv) =>
        flash_attn.flash_attn_kvpacked_func(q, kv, o.Dropout(training), o.SoftmaxScale, o.Causal, o.Window, 0, o.AlibiSlopes, o.Deterministic);
}

/// <summary>
/// Multi-head attention as flash-attn's MHA: fused QKV projection (Wqkv; Wq and Wkv for
/// cross-attention), optional rotary embedding on q and k, GQA/MQA with num_heads_kv, causal,
/// sliding window, ALiBi, and out_proj. use_flash_attn = false computes attention with the
/// materialised reference (for comparisons); both paths share the parameters and their names.
/// </summary>
public sealed class MHA : nn.Module<Tensor, Tensor>
{
    public readonly long embed_dim, num_heads, num_heads_kv, head_dim;
    private readonly bool _cross, _causal, _useFlash, _deterministic;
    private readonly double _dropoutP;
    private readonly double? _softmaxScale;
    private readonly (long, long) _window;
    private readonly Tensor? _alibiSlopes;

    // Parameter names match flash-attn's MHA (Wqkv, Wq, Wkv, out_proj) so checkpoints map one to one.
    private readonly Linear? Wqkv, Wq, Wkv;
    private readonly Linear out_proj;
    private readonly RotaryEmbedding? rotary_emb;

    public MHA(long embed_dim, long num_heads, long? num_heads_kv = null, bool cross_attn = false, bool qkv_proj_bias = true,
        bool out_proj_bias = true, double dropout = 0.0, double? softmax_scale = null, bool causal = false,
        long rotary_emb_dim = 0, double rotary_emb_base = 10000.0, double? rotary_emb_scale_base = null,
        bool rotary_emb_interleaved = false, bool use_alibi = false, (long left, long right)? window_size = null,
        bool use_flash_attn = true, bool deterministic = false, Device? device = null, ScalarType? dtype = null)
        : base(nameof(MHA))
    {
        if (num_heads <= 0 || embed_dim % num_heads != 0)
            throw new ArgumentException($"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})", nameof(num_heads));
        long hk = num_heads_kv ?? num_heads;
        if (hk <= 0 || num_heads % hk != 0)
            throw new ArgumentException($"num_heads ({num_heads}) must be a multiple of num_heads_kv ({hk})", nameof(num_heads_kv));
        (this.embed_dim, this.num_heads, this.num_heads_kv, head_dim) = (embed_dim, num_heads, hk, embed_dim / num_heads);
        if (rotary_emb_dim < 0 || rotary_emb_dim > head_dim)
            throw new ArgumentException($"rotary_emb_dim ({rotary_emb_dim}) must be between 0 and head_dim ({head_dim})", nameof(rotary_emb_dim));
        if (use_alibi && rotary_emb_dim > 0)
            throw new ArgumentException("use_alibi and rotary_emb_dim exclude each other", nameof(use_alibi));
        (_cross, _causal, _useFlash, _deterministic, _dropoutP, _softmaxScale, _window) =
            (cross_attn, causal, use_flash_attn, deterministic, dropout, softmax_scale, window_size ?? (-1, -1));
        if (use_alibi) _alibiSlopes = AlibiSlopes(num_heads, device);
        long kvDim = 2 * hk * head_dim;
        if (cross_attn)
        {
            Wq = nn.Linear(embed_dim, embed_dim, qkv_proj_bias, device, dtype);
            Wkv = nn.Linear(embed_dim, kvDim, qkv_proj_bias, device, dtype);
        }
        else
        {
            Wqkv = nn.Linear(embed_dim, embed_dim + kvDim, qkv_proj_bias, device, dtype);
        }
        out_proj = nn.Linear(embed_dim, embed_dim, out_proj_bias, device, dtype);
        if (rotary_emb_dim > 0) rotary_emb = new RotaryEmbedding(rotary_emb_dim, rotary_emb_base, rotary_emb_interleaved, rotary_emb_scale_base);
        RegisterComponents();
    }

    /// <summary>Self-attention over x (batch, seqlen, embed_dim).</summary>
    public override Tensor forward(Tensor x)
    {
        if (_cross) throw new ArgumentException("a cross-attention MHA needs x_kv: call forward(x, x_kv)", nameof(x));
        return Attend(x, null, seqlen_offset: 0);
    }

    /// <summary>Cross-attention of x (batch, seqlen_q, embed_dim) over x_kv (batch, seqlen_k, embed_dim).</summary>
    public Tensor forward(Tensor x, Tensor x_kv)
    {
        if (!_cross) throw new ArgumentException("x_kv is for cross-attention (cross_attn: true)", nameof(x_kv));
        return Attend(x, x_kv, seqlen_offset: 0);
    }

    private Tensor Attend(Tensor x, Tensor? xKv, long seqlen_offset)
    {
        TensorArgs.RequireModuleInput(x, "x", out_proj.weight!);
        TensorArgs.Require(x.dim() == 3 && x.size(2) == embed_dim, "x", $"x must be (batch, seqlen, {embed_dim}), got {TensorArgs.Shape(x)}");
        long B = x.size(0), S = x.size(1), H = num_heads, Hk = num_heads_kv, D = head_dim;
        Tensor q, k, v;
        if (!_cross)
        {
            var qkv = Wqkv!.forward(x).view(B, S, H + 2 * Hk, D);
            rotary_emb?.forward(qkv, seqlen_offset: seqlen_offset, num_heads_q: (int)H);
            // split, not slices: its backward is one cat, where each slice's zero-fills a gradient of qkv's size
            var parts = qkv.split(new[] { H, Hk, Hk }, 2);
            (q, k, v) = (parts[0], parts[1], parts[2]);
        }
        else
        {
            TensorArgs.RequireModuleInput(xKv!, "x_kv", out_proj.weight!);
            TensorArgs.Require(xKv!.dim() == 3 && xKv.size(0) == B && xKv.size(2) == embed_dim, "x_kv",
                $"x_kv must be ({B}, seqlen_k, {embed_dim}), got {TensorArgs.Shape(xKv)}");
            q = Wq!.forward(x).view(B, S, H, D);
            var kv = Wkv!.forward(xKv).view(B, xKv.size(1), 2, Hk, D);
            if (rotary_emb is not null) rotary_emb.forward(q, kv, seqlen_offset);
            var kvs = kv.unbind(2);
            (k, v) = (kvs[0], kvs[1]);
        }
        double p = training ? _dropoutP : 0;
        var o = _useFlash
            ? flash_attn.flash_attn_func(q, k, v, p, _softmaxScale, _causal, _window, 0, _alibiSlopes, _deterministic)
            : Reference.attention(q, k, v, _softmaxScale, _causal, _window, 0, _alibiSlopes, p).output;
        return out_proj.forward(o.reshape(B, S, embed_dim));
    }

    /// <summary>ALiBi slopes for n heads (the geometric sequence of the ALiBi paper, interleaved for non-powers of two).</summary>
    public static Tensor AlibiSlopes(long nheads, Device? device = null)
    {
        static double[] PowerOf2(long n)
        {
            double start = Math.Pow(2, -Math.Pow(2, -(Math.Log2(n) - 3)));
            return Enumerable.Range(0, (int)n).Select(i => start * Math.Pow(start, i)).ToArray();
        }
        double[] slopes;
        if (Math.Log2(nheads) % 1 == 0) slopes = PowerOf2(nheads);
        else
        {
            long closest = 1L << (int)Math.Floor(Math.Log2(nheads));
            slopes = PowerOf2(closest).Concat(PowerOf2(2 * closest).Where((_, i) => i % 2 == 0).Take((int)(nheads - closest))).ToArray();
        }
        return tensor(slopes.Select(s => (float)s).ToArray(), device: device);
    }
}

public static partial class layers
{
    public static FlashSelfAttention FlashSelfAttention(bool causal = false, double? softmax_scale = null, double attention_dropout = 0.0,
        (long left, long right)? window_size = null, Tensor? alibi_slopes = null, bool deterministic = false) =>
        new(causal, softmax_scale, attention_dropout, window_size, alibi_slopes, deterministic);

    public static FlashCrossAttention FlashCrossAttention(bool causal = false, double? softmax_scale = null, double attention_dropout = 0.0,
        (long left, long right)? window_size = null, Tensor? alibi_slopes = null, bool deterministic = false) =>
        new(causal, softmax_scale, attention_dropout, window_size, alibi_slopes, deterministic);

    public static MHA MHA(long embed_dim, long num_heads, long? num_heads_kv = null, bool cross_attn = false, bool causal = false,
        long rotary_emb_dim = 0, double dropout = 0.0, bool use_alibi = false, (long left, long right)? window_size = null,
        bool use_flash_attn = true, Device? device = null, ScalarType? dtype = null) =>
        new(embed_dim, num_heads, num_heads_kv, cross_attn, dropout: dropout, causal: causal, rotary_emb_dim: rotary_emb_dim,
            use_alibi: use_alibi, window_size: window_size, use_flash_attn: use_flash_attn, device: device, dtype: dtype);
}
