using FlashAttn.Interop;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;
using F = TorchSharp.torch.nn.functional;

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
/// sliding window, ALiBi, and out_proj. use_flash_attn = false computes attention with TorchSharp's
/// scaled_dot_product_attention where it can express the call (no GQA, window or ALiBi) and the materialised
/// reference otherwise (for comparisons); both paths share the parameters and their names. fused_bias_fc runs the
/// projections through flash_attn.fused_dense_func (FusedDense's GEMM with the bias epilogue). head_dim, when set,
/// makes the attention width num_heads * head_dim instead of embed_dim. names renames the projections (GPT-2's
/// c_attn / c_proj, timm's qkv / proj) so checkpoints of those models load one to one. With a <see cref="KVCache"/>
/// (self-attention, layer_idx set), forward(x, cache) appends the new keys and values to the layer's cache and attends
/// to all of it through flash_attn_with_kvcache. A softmax_scale other than 1/sqrt(head_dim) (GPT-2's
/// scale_attn_by_inverse_layer_idx) goes to our kernels as it is; where attention runs through TorchSharp's
/// scaled_dot_product_attention, which scales by 1/sqrt(head_dim) alone, it is folded into the q rows of the
/// projection's weight and bias instead: see <see cref="QFold"/>. Self-attention without GQA or rotary hands the
/// packed projection to flash_attn_qkvpacked_func whole, whose backward writes one gradient for it.
/// </summary>
public sealed class MHA : nn.Module<Tensor, Tensor>
{
    public readonly long embed_dim, num_heads, num_heads_kv, head_dim;
    public readonly int? layer_idx;
    private readonly bool _cross, _causal, _useFlash, _deterministic, _fusedBiasFc, _rotaryInterleaved;
    private readonly double _dropoutP;
    // _qFold: softmax_scale * sqrt(head_dim) when it is not 1 (null: nothing to fold for SDPA)
    private readonly double? _softmaxScale, _qFold;
    private Tensor? _qRows; // (rows of Wqkv, 1): 1 on the q rows, 0 on the k/v rows, in the weight's dtype and device
    private readonly (long, long)? _window;
    private readonly Tensor? _alibiSlopes;

    // Parameter names default to flash-attn's MHA (Wqkv, Wq, Wkv, out_proj) so checkpoints map one to one.
    private readonly Linear? Wqkv, Wq, Wkv;
    private readonly Linear out_proj;
    private readonly RotaryEmbedding? rotary_emb;

    public MHA(long embed_dim, long num_heads, long? num_heads_kv = null, bool cross_attn = false, bool qkv_proj_bias = true,
        bool out_proj_bias = true, double dropout = 0.0, double? softmax_scale = null, bool causal = false,
        long rotary_emb_dim = 0, double rotary_emb_base = 10000.0, double? rotary_emb_scale_base = null,
        bool rotary_emb_interleaved = false, bool use_alibi = false, (long left, long right)? window_size = null,
        bool use_flash_attn = true, bool deterministic = false, Device? device = null, ScalarType? dtype = null,
        bool fused_bias_fc = false, long? head_dim = null, int? layer_idx = null, (string qkv, string out_proj)? names = null)
        : base(nameof(MHA))
    {
        if (num_heads <= 0 || (head_dim is null && embed_dim % num_heads != 0))
            throw new ArgumentException($"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})", nameof(num_heads));
        if (head_dim is <= 0) throw new ArgumentException($"head_dim ({head_dim}) must be positive", nameof(head_dim));
        long hk = num_heads_kv ?? num_heads;
        if (hk <= 0 || num_heads % hk != 0)
            throw new ArgumentException($"num_heads ({num_heads}) must be a multiple of num_heads_kv ({hk})", nameof(num_heads_kv));
        (this.embed_dim, this.num_heads, this.num_heads_kv, this.head_dim) = (embed_dim, num_heads, hk, head_dim ?? embed_dim / num_heads);
        if (rotary_emb_dim < 0 || rotary_emb_dim > this.head_dim)
            throw new ArgumentException($"rotary_emb_dim ({rotary_emb_dim}) must be between 0 and head_dim ({this.head_dim})", nameof(rotary_emb_dim));
        if (use_alibi && rotary_emb_dim > 0)
            throw new ArgumentException("use_alibi and rotary_emb_dim exclude each other", nameof(use_alibi));
        if (layer_idx is < 0) throw new ArgumentException($"layer_idx ({layer_idx}) must be >= 0", nameof(layer_idx));
        (_cross, _causal, _useFlash, _deterministic, _dropoutP, _window) =
            (cross_attn, causal, use_flash_attn, deterministic, dropout, window_size);
        double fold = softmax_scale is { } s ? s * Math.Sqrt(this.head_dim) : 1.0;
        // 1 up to rounding: the default scale passed explicitly
        (_softmaxScale, _qFold) = (softmax_scale, Math.Abs(fold - 1.0) > 1e-12 ? fold : null);
        (_fusedBiasFc, _rotaryInterleaved, this.layer_idx) = (fused_bias_fc, rotary_emb_interleaved, layer_idx);
        if (use_alibi) _alibiSlopes = AlibiSlopes(num_heads, device);
        long inner = num_heads * this.head_dim, kvDim = 2 * hk * this.head_dim;
        var (qkvName, outName) = names ?? ("Wqkv", "out_proj");
        if (cross_attn)
        {
            Wq = nn.Linear(embed_dim, inner, qkv_proj_bias, device, dtype);
            Wkv = nn.Linear(embed_dim, kvDim, qkv_proj_bias, device, dtype);
            register_module("Wq", Wq);
            register_module("Wkv", Wkv);
        }
        else
        {
            Wqkv = nn.Linear(embed_dim, inner + kvDim, qkv_proj_bias, device, dtype);
            register_module(qkvName, Wqkv);
        }
        out_proj = nn.Linear(inner, embed_dim, out_proj_bias, device, dtype);
        register_module(outName, out_proj);
        if (rotary_emb_dim > 0)
        {
            rotary_emb = new RotaryEmbedding(rotary_emb_dim, rotary_emb_base, rotary_emb_interleaved, rotary_emb_scale_base);
            register_module("rotary_emb", rotary_emb); // no parameters: registered so its cos/sin tables go with the module
        }
        if (_alibiSlopes is not null) register_buffer("_alibiSlopes", _alibiSlopes);
    }

    /// <summary>The QKV projection (null for cross-attention) and the output projection.</summary>
    public Linear? qkv_proj => Wqkv;
    public Linear output_proj => out_proj;

    /// <summary>Self-attention over x (batch, seqlen, embed_dim).</summary>
    public override Tensor forward(Tensor x)
    {
        if (_cross) throw new ArgumentException("a cross-attention MHA needs x_kv: call forward(x, x_kv)", nameof(x));
        return Attend(x, null, null);
    }

    /// <summary>Cross-attention of x (batch, seqlen_q, embed_dim) over x_kv (batch, seqlen_k, embed_dim).</summary>
    public Tensor forward(Tensor x, Tensor x_kv)
    {
        if (!_cross) throw new ArgumentException("x_kv is for cross-attention (cross_attn: true)", nameof(x_kv));
        return Attend(x, x_kv, null);
    }

    /// <summary>
    /// Incremental self-attention: x (batch, seqlen, embed_dim) are the tokens at positions [cache.length,
    /// cache.length + seqlen); their keys and values go into layer layer_idx of the cache and the queries attend to every
    /// position cached so far (causal aligned bottom-right). The cache advances only by <see cref="KVCache.advance"/>,
    /// once every layer has seen the tokens. Inference only (no gradients).
    /// </summary>
    public Tensor forward(Tensor x, KVCache cache)
    {
        TensorArgs.Require(!_cross, nameof(cache), "the KV cache is for self-attention (cross_attn: false)");
        TensorArgs.Require(layer_idx is not null, nameof(cache), "an MHA without layer_idx has no slot in a KV cache");
        TensorArgs.Require(rotary_emb?.scale_base is null, nameof(cache), "XPos (rotary_emb_scale_base) has no KV-cache path");
        return Attend(x, null, cache);
    }

    private Tensor Linear(Linear layer, Tensor x) => Linear(x, layer.weight!, layer.bias);

    private Tensor Linear(Tensor x, Tensor weight, Tensor? bias) =>
        _fusedBiasFc ? flash_attn.fused_dense_func(x, weight, bias) : F.linear(x, weight, bias);

    /// <summary>
    /// The projection that makes q (Wqkv, or Wq for cross-attention) with softmax_scale * sqrt(head_dim) folded into its q
    /// rows, for attention through SDPA: q = (f Wq) x + f bq, so that SDPA's 1/sqrt(head_dim) computes softmax_scale q.k.
    /// Scaling the weight (3 embed x embed elements at GPT-2) instead of q (batch x seqlen x embed) saves the two
    /// elementwise passes over the activations that SDPA's fold of q costs, forward and backward; ALiBi's bias, added
    /// after the scale, and rotary, linear in q, are unchanged by it. Autograd gives the weight's gradient, f on the q rows.
    /// </summary>
    private Tensor QFold(Linear layer, Tensor x)
    {
        if (_qFold is not { } f) return Linear(layer, x);
        var w = layer.weight!;
        if (_cross) return Linear(x, w * f, layer.bias is { } b ? b * f : null); // every row of Wq is a q row
        long rows = w.size(0);
        if (_qRows is null || _qRows.dtype != w.dtype || _qRows.device_type != w.device_type || _qRows.device_index != w.device_index)
        {
            _qRows?.Dispose();
            using var index = arange(rows, device: w.device);
            using var isQ = index < num_heads * head_dim;
            _qRows = isQ.to(w.dtype).view(rows, 1).DetachFromDisposeScope(); // kept across the steps' dispose scopes
        }
        var folded = OutputCache.Slim(RowScaleFunction.apply(BackwardGuard.Parameter(w), BackwardGuard.Parameter(layer.bias), _qRows, f));
        return Linear(x, folded[0], layer.bias is null ? null : folded[1]);
    }

    private Tensor Attend(Tensor x, Tensor? xKv, KVCache? cache)
    {
        TensorArgs.RequireModuleInput(x, "x", out_proj.weight!);
        TensorArgs.Require(x.dim() == 3, "x", $"x must be (batch, seqlen, {embed_dim}), got {TensorArgs.Shape(x)}");
        TensorArgs.RequireLastDim(x, embed_dim, "x", "embed_dim");
        long B = x.size(0), S = x.size(1), H = num_heads, Hk = num_heads_kv, D = head_dim;
        if (_cross)
        {
            TensorArgs.RequireModuleInput(xKv!, "x_kv", out_proj.weight!);
            TensorArgs.Require(xKv!.dim() == 3 && xKv.size(0) == B && xKv.size(2) == embed_dim, "x_kv",
                $"x_kv must be ({B}, seqlen_k, {embed_dim}), got {TensorArgs.Shape(xKv)}");
        }
        long Sk = _cross ? xKv!.size(1) : S;
        double p = cache is null && training ? _dropoutP : 0;
        // SDPA (the dispatch's, or PlainAttention's) takes no scale: fold it into the projection for that path only
        bool viaSdpa = cache is null && (_useFlash
            ? flash_attn.GoesToSdpa(x, B, S, Sk, H, Hk, D, p, _causal, _window, 0, _alibiSlopes, _deterministic)
            : PlainUsesSdpa(S, Sk));
        double? scale = viaSdpa && _qFold is not null ? null : _softmaxScale;
        Tensor ProjectQ(Linear layer) => viaSdpa ? QFold(layer, x) : Linear(layer, x);

        Tensor o;
        if (!_cross && H == Hk && rotary_emb is null && cache is null && _useFlash)
        {
            // the packed projection whole: one gradient for it, where unbind's backward would stack three
            var qkv = ProjectQ(Wqkv!).view(B, S, 3, H, D);
            o = flash_attn.flash_attn_qkvpacked_func(qkv, p, scale, _causal, _window, 0, _alibiSlopes, _deterministic);
            return Linear(out_proj, o.reshape(B, S, H * D));
        }
        Tensor q, k, v;
        if (!_cross)
        {
            // unbind (split with GQA): views whose backward is one stack (cat), where an index per part would zero-fill
            // three gradients of qkv's size and add them (about 0.75 GB of traffic per layer at GPT-2 124M, B 16, T 1024)
            var parts = H == Hk ? ProjectQ(Wqkv!).view(B, S, 3, H, D).unbind(2)
                                : ProjectQ(Wqkv!).view(B, S, H + 2 * Hk, D).split(new[] { H, Hk, Hk }, 2);
            (q, k, v) = (parts[0], parts[1], parts[2]);
        }
        else
        {
            q = ProjectQ(Wq!).view(B, S, H, D);
            var kvs = Linear(Wkv!, xKv!).view(B, Sk, 2, Hk, D).unbind(2);
            (k, v) = (kvs[0], kvs[1]);
        }
        if (cache is not null)
        {
            // the cache rotates k and q at their positions itself
            var tables = rotary_emb?.Tables(cache.length + S, x.device);
            o = cache.Append(layer_idx!.Value, q, k, v, scale, _causal, _window, _alibiSlopes, tables?.cos, tables?.sin,
                             _rotaryInterleaved);
        }
        else
        {
            if (rotary_emb is not null) (q, k) = rotary_emb.forward_qk(q, k);
            o = _useFlash
                ? flash_attn.flash_attn_func(q, k, v, p, scale, _causal, _window, 0, _alibiSlopes, _deterministic)
                : PlainAttention(q, k, v, p, scale);
        }
        return Linear(out_proj, o.reshape(B, S, H * D));
    }

    // PlainAttention's SDPA cases: no GQA, window or ALiBi, and no causal query that sees no key (seqlen_q > seqlen_k:
    // a row SDPA's explicit mask leaves empty, whose output libtorch's CUDA backends need not make the 0 of ours); the
    // reference computes those
    private bool PlainUsesSdpa(long seqlenQ, long seqlenK) =>
        num_heads == num_heads_kv && _alibiSlopes is null && !(_window is { } w && (w.Item1 >= 0 || w.Item2 >= 0)) &&
        !(_causal && seqlenQ > seqlenK);

    // TorchSharp's SDPA takes (B, H, S, D) and always scales by 1/sqrt(D), the scale q comes with (QFold). Its causal mask
    // is aligned top-left, so with seqlen_q < seqlen_k the bottom-right mask is passed explicitly. GQA, a window, ALiBi
    // and causal rows without keys take the reference, at the given scale.
    private Tensor PlainAttention(Tensor q, Tensor k, Tensor v, double p, double? scale)
    {
        long Sq = q.size(1), Sk = k.size(1);
        if (!PlainUsesSdpa(Sq, Sk)) return Reference.attention(q, k, v, scale, _causal, _window, 0, _alibiSlopes, p).output;
        Tensor? mask = null;
        bool isCausal = false;
        if (_causal && Sq == Sk) isCausal = true;
        else if (_causal && Sq > 1) mask = ones(new[] { Sq, Sk }, ScalarType.Bool, q.device).tril(Sk - Sq);
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask, p, isCausal).transpose(1, 2);
    }

    protected override void Dispose(bool disposing)
    {
        if (disposing) _qRows?.Dispose();
        base.Dispose(disposing);
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

/// <summary>
/// A weight (rows, in) and its bias (rows,) or null with the rows that <c>rows</c> (a (rows, 1) column of 0 and 1)
/// marks scaled by f and the others passed through exactly: w + (f - 1) rows w, one addcmul per tensor each way (the map
/// is its own adjoint), both in one autograd node. addcmul computes in float32 for 16-bit weights with f as given, where
/// a rowscale tensor in the weight's dtype would round f itself (bf16: by up to 2^-9, a bias on every score and gradient
/// of the layer, where this rounds each weight once).
/// </summary>
internal sealed class RowScaleFunction : autograd.MultiTensorFunction<RowScaleFunction>
{
    public override string Name => nameof(RowScaleFunction);

    public override List<Tensor> forward(autograd.AutogradContext ctx, params object?[] vars)
    {
        OutputCache.Track(ctx);
        var w = (Tensor)vars[0]!;
        var b = (Tensor?)vars[1];
        var rows = (Tensor)vars[2]!;
        var f = (double)vars[3]!;
        ctx.save_for_backward(new List<Tensor> { rows });
        ctx.save_data("f", f);
        using var scalars = new ScalarScope();
        var fm1 = scalars.Of(f - 1);
        var folded = new List<Tensor> { w.addcmul(w, rows, fm1) };
        if (b is not null) folded.Add(b.addcmul(b, rows.view(-1), fm1));
        return folded;
    }

    public override List<Tensor> backward(autograd.AutogradContext ctx, List<Tensor> grads) =>
        BackwardGuard.Run(Name, 4, grads, () =>
        {
            var rows = ctx.get_saved_variables()[0];
            using var scalars = new ScalarScope();
            var fm1 = scalars.Of((double)ctx.get_data("f") - 1);
            var db = grads.Count > 1 && grads[1] is { } gb ? gb.addcmul(gb, rows.view(-1), fm1) : null;
            return new List<Tensor> { grads[0].addcmul(grads[0], rows, fm1), db!, null!, null! };
        });
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
        bool use_flash_attn = true, Device? device = null, ScalarType? dtype = null, bool fused_bias_fc = false, int? layer_idx = null) =>
        new(embed_dim, num_heads, num_heads_kv, cross_attn, dropout: dropout, causal: causal, rotary_emb_dim: rotary_emb_dim,
            use_alibi: use_alibi, window_size: window_size, use_flash_attn: use_flash_attn, device: device, dtype: dtype,
            fused_bias_fc: fused_bias_fc, layer_idx: layer_idx);
}
