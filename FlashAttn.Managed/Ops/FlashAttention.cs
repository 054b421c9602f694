using System.Collections.Concurrent;
using FlashAttn.Interop;
using TorchSharp;
using static FlashAttn.Interop.TensorArgs;
using static TorchSharp.torch;

namespace FlashAttn;

/// <summary>out (like q), the float32 log-sum-exp of each query row, and the dropout mask when asked for.</summary>
public sealed record FlashAttnResult(Tensor output, Tensor softmax_lse, Tensor? dropout_mask);

/// <summary>The options every attention entry point shares, resolved once.</summary>
internal sealed record AttentionOptions(double DropoutP, double Scale, long WindowLeft, long WindowRight, double Softcap,
    Tensor? AlibiSlopes, bool Deterministic, bool ReturnDropoutMask, ulong Seed);

/// <summary>
/// The functions of FlashAttn.TorchSharp, named and shaped as flash-attn's. Bad input, the same on every device:
/// an argument of the wrong dtype, rank, shape or device, a non-contiguous last dimension where the kernels need one
/// (attention, rotary, cross-entropy's logits; the norms and dense ops copy other strides), an out-of-range offset,
/// position or option is an ArgumentException naming the argument, thrown before any work. Values are not scanned:
/// NaN and Inf propagate to the outputs, as in PyTorch. Empty inputs (batch 0, sequence 0) give empty outputs. A value
/// that only the GPU reads without making the host wait (a cross-entropy label outside the vocabulary, a failed
/// <see cref="assert_async"/>) makes the results it touches NaN and is raised, naming the argument, by the next call
/// of any of these functions or by <see cref="check_errors"/>; on the CPU it is an ArgumentException at once.
/// </summary>
public static partial class flash_attn
{
    /// <summary>The largest head dimension the kernels take (flash-attn's limit).</summary>
    public const int MaxHeadDim = 256;

    /// <summary>
    /// Exact attention without the (seqlen_q, seqlen_k) matrix, as flash_attn.flash_attn_func.
    /// q (batch, seqlen_q, nheads, headdim); k, v (batch, seqlen_k, nheads_k, headdim), nheads a
    /// multiple of nheads_k (MQA/GQA). causal is aligned bottom-right; window_size (left, right),
    /// -1 for unlimited; softcap > 0 caps scores with tanh; alibi_slopes (nheads) or (batch, nheads)
    /// float32. Returns (batch, seqlen_q, nheads, headdim). The cases libtorch's scaled_dot_product_attention computes
    /// faster on the GPU at hand go there (<see cref="AttentionDispatch"/>; FLASHATTN_ATTENTION_BACKEND overrides the
    /// choice, <see cref="last_attention_backend"/> says which path ran).
    /// </summary>
    public static Tensor flash_attn_func(Tensor q, Tensor k, Tensor v, double dropout_p = 0.0, double? softmax_scale = null,
        bool causal = false, (long left, long right)? window_size = null, double softcap = 0.0, Tensor? alibi_slopes = null,
        bool deterministic = false)
    {
        DeviceErrors.Raise();
        return DenseOutput(q, k, v, AttentionNames.Dense, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                           deterministic);
    }

    // flash_attn_func and its packed forms, validated under the caller's argument names: SDPA where the rule sends the
    // case, else our kernels or the reference.
    // packed: the (batch, seqlen, 3, nheads, headdim) tensor q, k and v are views of (flash_attn_qkvpacked_func), which
    // the kernels then take whole: their backward writes dq, dk and dv into one gradient of its shape, where unbind's
    // backward would stack three (a copy of the whole gradient, 0.44 ms a step at GPT-2 124M, B 16, T 1024).
    private static Tensor DenseOutput(Tensor q, Tensor k, Tensor v, AttentionNames names, double dropout_p, double? softmax_scale,
        bool causal, (long left, long right)? window_size, double softcap, Tensor? alibi_slopes, bool deterministic,
        Tensor? packed = null)
    {
        ValidateAttention(q, k, v, null, null, null, null, dropout_p, window_size, softcap, alibi_slopes, names);
        if (GoesToSdpa(q, q.size(0), q.size(1), k.size(1), q.size(2), k.size(2), q.size(3), dropout_p, causal, window_size, softcap,
                       alibi_slopes, deterministic))
            return AttentionDispatch.Sdpa(q, k, v, dropout_p, softmax_scale, causal: Window(q.size(1), k.size(1), causal, window_size).right == 0);
        return Attention(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic, false, packed).output;
    }

    /// <summary>Whether a validated flash_attn_func call with these sizes, on like's device and dtype, runs through SDPA
    /// (<see cref="AttentionDispatch"/>): MHA asks before its projection, to fold a softmax scale into it only then.</summary>
    internal static bool GoesToSdpa(Tensor like, long batch, long seqlenQ, long seqlenK, long heads, long headsK, long headDim,
        double dropoutP, bool causal, (long left, long right)? window, double softcap, Tensor? alibi, bool deterministic)
    {
        if (!OnAttentionGpu(like) || batch * seqlenQ * heads * headDim == 0 || batch * seqlenK * headsK * headDim == 0) return false;
        var (left, right) = Window(seqlenQ, seqlenK, causal, window);
        var c = new AttentionCase(Backend.Capability(like.device_index), like.dtype, seqlenQ, seqlenK, heads, headsK, headDim,
                                  dropoutP, left, right, softcap, alibi is not null, deterministic);
        return AttentionDispatch.Choose(c, AttentionDispatch.Mode) == AttentionBackend.Sdpa;
    }

    /// <summary>
    /// <see cref="flash_attn_func"/> that also returns the log-sum-exp (batch, nheads, seqlen_q) and, for tests, the
    /// dropout mask: uint8 (batch, nheads, seqlen_q, seqlen_k), 1 where query i sees key j (causal / window) and the
    /// element is kept, 0 elsewhere; with dropout_p 0 every visible element is kept. Dropout draws its Philox-4x32-10
    /// stream from a seed taken from TorchSharp's default generator, on the kernels and on the reference path alike:
    /// after the same manual_seed both give the same mask. Always our kernels (SDPA returns neither).
    /// </summary>
    public static FlashAttnResult flash_attn_func_with_lse(Tensor q, Tensor k, Tensor v, double dropout_p = 0.0,
        double? softmax_scale = null, bool causal = false, (long left, long right)? window_size = null, double softcap = 0.0,
        Tensor? alibi_slopes = null, bool deterministic = false, bool return_dropout_mask = false)
    {
        DeviceErrors.Raise();
        ValidateAttention(q, k, v, null, null, null, null, dropout_p, window_size, softcap, alibi_slopes, AttentionNames.Dense);
        return Attention(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                         return_dropout_mask);
    }

    // Validated dense attention: the kernels, or the reference where they do not run.
    private static FlashAttnResult Attention(Tensor q, Tensor k, Tensor v, double dropout_p, double? softmax_scale, bool causal,
        (long left, long right)? window_size, double softcap, Tensor? alibi_slopes, bool deterministic, bool return_dropout_mask,
        Tensor? packed = null)
    {
        var opts = Options(q, q.size(1), k.size(1), dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                           deterministic, return_dropout_mask);
        if (!UsesAttentionKernels(q, k, v))
        {
            var mask = dropout_p > 0 || return_dropout_mask ? VisibleKeptMask(q, k, opts) : null;
            var (o, l) = Reference.attention(q, k, v, opts.Scale, false, (opts.WindowLeft, opts.WindowRight), softcap,
                                             alibi_slopes, dropout_p, dropout_p > 0 ? mask : null);
            AttentionDispatch.Last = AttentionBackend.Reference;
            return new FlashAttnResult(o, l, return_dropout_mask ? mask : null);
        }
        return RunKernel(q, k, v, null, null, q.size(1), k.size(1), opts, packed);
    }

    // The dropout mask of flash_attn_func_with_lse, as the kernels write it, for q/k (B, S, H, D).
    private static Tensor VisibleKeptMask(Tensor q, Tensor k, AttentionOptions o) =>
        Reference.DropoutMask(q.size(0), q.size(2), q.size(1), k.size(1), o.DropoutP, o.Seed, o.WindowLeft, o.WindowRight, q.device);

    /// <summary>qkv (batch, seqlen, 3, nheads, headdim): self-attention on a packed projection.</summary>
    public static Tensor flash_attn_qkvpacked_func(Tensor qkv, double dropout_p = 0.0, double? softmax_scale = null,
        bool causal = false, (long left, long right)? window_size = null, double softcap = 0.0, Tensor? alibi_slopes = null,
        bool deterministic = false)
    {
        DeviceErrors.Raise();
        Require(qkv.dim() == 5 && qkv.size(2) == 3, "qkv", $"qkv must be (batch, seqlen, 3, nheads, headdim), got {Shape(qkv)}");
        // One unbind, not an index per part: unbind's backward stacks the three gradients in one kernel, where each index's
        // backward zero-fills a gradient of qkv's size (copying its part in) and autograd adds the three.
        var qkvs = qkv.unbind(2);
        return DenseOutput(qkvs[0], qkvs[1], qkvs[2], AttentionNames.QkvPacked, dropout_p, softmax_scale, causal, window_size,
                           softcap, alibi_slopes, deterministic, packed: qkv);
    }

    /// <summary>q (batch, seqlen_q, nheads, headdim), kv (batch, seqlen_k, 2, nheads_k, headdim).</summary>
    public static Tensor flash_attn_kvpacked_func(Tensor q, Tensor kv, double dropout_p = 0.0, double? softmax_scale = null,
        bool causal = false, (long left, long right)? window_size = null, double softcap = 0.0, Tensor? alibi_slopes = null,
        bool deterministic = false)
    {
        DeviceErrors.Raise();
        Require(kv.dim() == 5 && kv.size(2) == 2, "kv", $"kv must be (batch, seqlen_k, 2, nheads_k, headdim), got {Shape(kv)}");
        var kvs = kv.unbind(2);
        return DenseOutput(q, kvs[0], kvs[1], AttentionNames.KvPacked, dropout_p, softmax_scale, causal, window_size, softcap,
                           alibi_slopes, deterministic);
    }

    /// <summary>
    /// Packed sequences without padding: q (total_q, nheads, headdim), k/v (total_k, nheads_k, headdim),
    /// cu_seqlens_q/k (batch + 1,) int32 cumulative lengths, max_seqlen_q/k bounds on the sequence lengths.
    /// The offsets must start at 0, never decrease and end at total_q / total_k, with no sequence longer than
    /// max_seqlen_q / max_seqlen_k (else an ArgumentException naming the argument). They are checked on the host: for
    /// CUDA tensors each call copies the 2 (batch + 1) integers to the host and waits for the device (measured beside
    /// the dense forward in benchmarks/RESULTS.md).
    /// </summary>
    public static Tensor flash_attn_varlen_func(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k,
        long max_seqlen_q, long max_seqlen_k, double dropout_p = 0.0, double? softmax_scale = null, bool causal = false,
        (long left, long right)? window_size = null, double softcap = 0.0, Tensor? alibi_slopes = null, bool deterministic = false) =>
        flash_attn_varlen_func_with_lse(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                                        softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic).output;

    /// <summary><see cref="flash_attn_varlen_func"/> that also returns the log-sum-exp (nheads, total_q).</summary>
    public static FlashAttnResult flash_attn_varlen_func_with_lse(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q,
        Tensor cu_seqlens_k, long max_seqlen_q, long max_seqlen_k, double dropout_p = 0.0, double? softmax_scale = null,
        bool causal = false, (long left, long right)? window_size = null, double softcap = 0.0, Tensor? alibi_slopes = null,
        bool deterministic = false)
    {
        DeviceErrors.Raise();
        return Varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, AttentionNames.Varlen, dropout_p,
                      softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic);
    }

    // flash_attn_varlen_func_with_lse, validated under the caller's argument names.
    private static FlashAttnResult Varlen(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, long max_seqlen_q,
        long max_seqlen_k, AttentionNames names, double dropout_p, double? softmax_scale, bool causal,
        (long left, long right)? window_size, double softcap, Tensor? alibi_slopes, bool deterministic)
    {
        ValidateAttention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, window_size, softcap,
                          alibi_slopes, names);
        var opts = Options(q, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                           deterministic, false);
        if (!UsesAttentionKernels(q, k, v))
        {
            var (o, l) = Reference.attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, opts.Scale, false,
                                                    (opts.WindowLeft, opts.WindowRight), softcap, alibi_slopes, dropout_p,
                                                    dropout_seed: opts.Seed);
            AttentionDispatch.Last = AttentionBackend.Reference;
            return new FlashAttnResult(o, l, null);
        }
        return RunKernel(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, opts);
    }

    /// <summary>qkv (total, 3, nheads, headdim) packed by cu_seqlens.</summary>
    public static Tensor flash_attn_varlen_qkvpacked_func(Tensor qkv, Tensor cu_seqlens, long max_seqlen, double dropout_p = 0.0,
        double? softmax_scale = null, bool causal = false, (long left, long right)? window_size = null, double softcap = 0.0,
        Tensor? alibi_slopes = null, bool deterministic = false)
    {
        DeviceErrors.Raise();
        Require(qkv.dim() == 4 && qkv.size(1) == 3, "qkv", $"qkv must be (total, 3, nheads, headdim), got {Shape(qkv)}");
        var qkvs = qkv.unbind(1);
        return Varlen(qkvs[0], qkvs[1], qkvs[2], cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, AttentionNames.VarlenQkvPacked,
                      dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic).output;
    }

    /// <summary>q (total_q, nheads, headdim), kv (total_k, 2, nheads_k, headdim).</summary>
    public static Tensor flash_attn_varlen_kvpacked_func(Tensor q, Tensor kv, Tensor cu_seqlens_q, Tensor cu_seqlens_k,
        long max_seqlen_q, long max_seqlen_k, double dropout_p = 0.0, double? softmax_scale = null, bool causal = false,
        (long left, long right)? window_size = null, double softcap = 0.0, Tensor? alibi_slopes = null, bool deterministic = false)
    {
        DeviceErrors.Raise();
        Require(kv.dim() == 4 && kv.size(1) == 2, "kv", $"kv must be (total_k, 2, nheads_k, headdim), got {Shape(kv)}");
        var kvs = kv.unbind(1);
        return Varlen(q, kvs[0], kvs[1], cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, AttentionNames.VarlenKvPacked,
                      dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic).output;
    }

    /// <summary>Kernels for bf16/fp16 CUDA tensors with queries and keys (empty ones take the reference, as in the other
    /// ops); when a gradient will be needed, only where the backward kernel fits the GPU's shared memory (not on the
    /// 99 KB-per-block sm_86 / sm_89 / sm_120): the choice is made here, in the forward, because a failure inside
    /// backward would abort the process.</summary>
    internal static bool UsesAttentionKernels(Tensor q, Tensor k, Tensor v) =>
        OnAttentionGpu(q) && q.numel() > 0 && k.numel() > 0 &&
        (!(is_grad_enabled() && (q.requires_grad || k.requires_grad || v.requires_grad)) ||
         BackwardFits(q.device_index, q.size(-1)));

    /// <summary>bf16/fp16 on a GPU the kernels run on: where the kernels, or SDPA in their place, compute attention.</summary>
    internal static bool OnAttentionGpu(Tensor q) =>
        Backend.UsesKernels(q) && (q.dtype is ScalarType.BFloat16 or ScalarType.Float16);

    private static readonly ConcurrentDictionary<(int device, long headdim), bool> s_backwardFits = new();

    internal static bool BackwardFits(int device, long headdim) => s_backwardFits.GetOrAdd((device, (headdim + 7) / 8 * 8), key =>
    {
        unsafe
        {
            int supported = 0;
            NativeMethods.Check(NativeMethods.FlashAttn_flash_bwd_supported(key.device, key.headdim, (IntPtr)(&supported)));
            return supported != 0;
        }
    });

    internal static AttentionOptions Options(Tensor q, long seqlenQ, long seqlenK, double dropoutP, double? scale, bool causal,
        (long left, long right)? window, double softcap, Tensor? alibi, bool deterministic, bool returnMask)
    {
        var (left, right) = Window(seqlenQ, seqlenK, causal, window);
        return new AttentionOptions(dropoutP, scale ?? 1.0 / Math.Sqrt(q.size(-1)), left, right, softcap, alibi,
                                    deterministic, returnMask, dropoutP > 0 ? DropoutSeed.Draw() : 0);
    }

    /// <summary>The (left, right) window of a call, -1 unlimited: causal is right = 0.</summary>
    internal static (long left, long right) Window(long seqlenQ, long seqlenK, bool causal, (long left, long right)? window)
    {
        var (left, right) = window ?? (-1, -1);
        if (causal) right = 0;
        // A window reaching past every key is no window (left >= seqlen_k or right >= seqlen_q: the same mask for
        // every row, bottom-right aligned); as -1 it also stays inside the kernels' int32 (2^32 used to wrap to 0).
        if (left >= seqlenK) left = -1;
        if (right >= seqlenQ) right = -1;
        return (left, right);
    }

    // Pads the head dimension to a multiple of 8 (the kernels' granularity) outside the autograd
    // function, so autograd slices the gradients back; softmax_scale was fixed from the true size.
    // packed (dense self-attention): the (batch, seqlen, 3, nheads, headdim) tensor q, k, v are views of, handed to the
    // autograd function whole.
    private static FlashAttnResult RunKernel(Tensor q, Tensor k, Tensor v, Tensor? cuQ, Tensor? cuK, long maxSq, long maxSk,
        AttentionOptions opts, Tensor? packed = null)
    {
        long d = q.size(-1), pad = (8 - d % 8) % 8;
        var p = new[] { 0L, pad };
        List<Tensor> r;
        if (packed is not null)
        {
            var qkv = KernelLayout(pad != 0 ? nn.functional.pad(packed, p) : packed);
            r = OutputCache.Slim(FlashAttnFunction.apply(qkv, null, null, cuQ, cuK, maxSq, maxSk, opts));
        }
        else
        {
            if (pad != 0) (q, k, v) = (nn.functional.pad(q, p), nn.functional.pad(k, p), nn.functional.pad(v, p));
            (q, k, v) = (KernelLayout(q), KernelLayout(k), KernelLayout(v));
            r = OutputCache.Slim(FlashAttnFunction.apply(q, k, v, cuQ, cuK, maxSq, maxSk, opts));
        }
        AttentionDispatch.Last = AttentionBackend.Flash;
        var output = pad != 0 ? r[0][TensorIndex.Ellipsis, TensorIndex.Slice(0, d)] : r[0];
        // without dropout the kernels write no mask: every visible element is kept
        var mask = !opts.ReturnDropoutMask ? null : opts.DropoutP > 0 ? r[2] : VisibleKeptMask(q, k, opts);
        return new FlashAttnResult(output, r[1], mask);
    }

    // The kernels load 16-byte vectors: base pointers 16-byte aligned and every stride a multiple of
    // 8 elements. Views that miss it (odd packing) are copied, as flash-attn's maybe_contiguous does.
    internal static Tensor KernelLayout(Tensor t)
    {
        bool aligned = (long)Ptr(t) % 16 == 0;
        for (int i = 0; aligned && i < t.dim() - 1; i++) aligned = t.stride(i) % 8 == 0; // stride(): see TensorArgs.Sizes
        return aligned ? t : t.contiguous();
    }

    internal static void ValidateAttention(Tensor q, Tensor k, Tensor v, Tensor? cuQ, Tensor? cuK, long? maxSq, long? maxSk,
        double dropoutP, (long left, long right)? window, double softcap, Tensor? alibi, AttentionNames? names = null)
    {
        bool varlen = cuQ is not null || cuK is not null;
        var n = names ?? (varlen ? AttentionNames.Varlen : AttentionNames.Dense);
        int dims = varlen ? 3 : 4;
        string layout = varlen ? "(total, nheads, headdim) with cu_seqlens" : "(batch, seqlen, nheads, headdim)";
        foreach (var (t, name, what) in new[] { (q, n.Q, "q"), (k, n.K, "k"), (v, n.V, "v") })
        {
            RequireFloat(t, name);
            if (name == what) RequireDim(t, dims, name, layout); // a packed tensor's rank was checked by its function
            RequireContiguousLastDim(t, name);
            Require(t.dtype == q.dtype, name, $"{name} must have {n.Q}'s dtype ({q.dtype}), got {t.dtype}");
            RequireSameDevice(t, q, name, n.Q);
        }
        long d = q.size(-1), h = q.size(-2), hk = k.size(-2);
        Require(SameShape(v, k), n.V, $"v must have k's shape {Shape(k)}, got {Shape(v)}");
        Require(k.size(-1) == d, n.K, $"k's head dimension ({k.size(-1)}) must equal q's ({d})");
        Require(d >= 1 && d <= MaxHeadDim, n.Q, $"head dimension ({d}) must be between 1 and {MaxHeadDim}");
        Require(hk >= 1 && h % hk == 0, n.K, $"q's heads ({h}) must be a multiple of k/v's heads ({hk})");
        if (!varlen) Require(k.size(0) == q.size(0), n.K, $"k's batch ({k.size(0)}) must equal q's ({q.size(0)})");
        else
        {
            Require(cuQ is not null && cuK is not null, cuQ is null ? n.CuQ : n.CuK, "cu_seqlens_q and cu_seqlens_k go together");
            RequireOffsets(cuQ!, n.CuQ, q, n.Q, maxSq!.Value, n.MaxQ);
            // packed qkv: the same offsets over the same rows, read once
            if (!ReferenceEquals(cuK, cuQ) || k.size(0) != q.size(0) || maxSk != maxSq)
                RequireOffsets(cuK!, n.CuK, k, n.K, maxSk!.Value, n.MaxK);
            Require(cuQ!.size(0) == cuK!.size(0), n.CuK,
                    $"{n.CuQ} ({cuQ.size(0)}) and {n.CuK} ({cuK.size(0)}) must have the same length (batch + 1)");
        }
        Require(dropoutP >= 0 && dropoutP < 1, "dropout_p", $"dropout_p ({dropoutP}) must be in [0, 1)");
        Require(softcap >= 0, "softcap", $"softcap ({softcap}) must be >= 0");
        if (window is { } w) Require(w.left >= -1 && w.right >= -1, "window_size", $"window_size ({w.left}, {w.right}) entries must be >= -1");
        if (alibi is not null)
        {
            Require(alibi.dtype == ScalarType.Float32, "alibi_slopes", $"alibi_slopes must be float32, got {alibi.dtype}");
            RequireSameDevice(alibi, q, "alibi_slopes", n.Q);
            long batch = varlen ? cuQ!.size(0) - 1 : q.size(0);
            Require((alibi.dim() == 1 && alibi.size(0) == h) || (alibi.dim() == 2 && alibi.size(0) == batch && alibi.size(1) == h),
                    "alibi_slopes", $"alibi_slopes must be (nheads = {h}) or (batch = {batch}, nheads), got {Shape(alibi)}");
        }
    }
}

/// <summary>The argument names an attention entry point reports its q, k, v, offsets and lengths under (packed
/// variants hand views of one tensor to the shared validation).</summary>
internal sealed record AttentionNames(string Q, string K, string V, string CuQ, string CuK, string MaxQ, string MaxK)
{
    public static readonly AttentionNames Dense = new("q", "k", "v", "", "", "", "");
    public static readonly AttentionNames QkvPacked = new("qkv", "qkv", "qkv", "", "", "", "");
    public static readonly AttentionNames KvPacked = new("q", "kv", "kv", "", "", "", "");
    public static readonly AttentionNames Varlen = new("q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k");
    public static readonly AttentionNames VarlenQkvPacked = new("qkv", "qkv", "qkv", "cu_seqlens", "cu_seqlens", "max_seqlen", "max_seqlen");
    public static readonly AttentionNames VarlenKvPacked = new("q", "kv", "kv", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k");
}

/// <summary>
/// The autograd function over the CUDA kernels (FlashAttn_flash_fwd / _bwd): outputs out, the LSE
/// (no gradient) and the dropout mask (when asked for). Inputs are validated and the head
/// dimension padded by the callers in <see cref="flash_attn"/>.
/// </summary>
public sealed class FlashAttnFunction : autograd.MultiTensorFunction<FlashAttnFunction>
{
    public override string Name => "FlashAttnFunction";

    public override List<Tensor> forward(autograd.AutogradContext ctx, params object?[] vars)
    {
        OutputCache.Track(ctx);
        // q, k, v, or a packed (batch, seqlen, 3, nheads, headdim) qkv with k and v null: the kernels read its views
        var qkv = vars[1] is null ? (Tensor)vars[0]! : null;
        var (q, k, v) = qkv is not null ? Unpack(qkv) : ((Tensor)vars[0]!, (Tensor)vars[1]!, (Tensor)vars[2]!);
        var (cuQ, cuK) = ((Tensor?)vars[3], (Tensor?)vars[4]);
        var (maxSq, maxSk) = ((long)vars[5]!, (long)vars[6]!);
        var opts = (AttentionOptions)vars[7]!;
        var g = new Geometry(q, k, cuQ, cuK, maxSq, maxSk);
        var output = empty_like(q);
        var lse = g.Varlen ? empty(g.H, q.size(0), dtype: ScalarType.Float32, device: q.device)
                           : empty(g.B, g.H, g.Sq, dtype: ScalarType.Float32, device: q.device);
        var mask = opts.ReturnDropoutMask && opts.DropoutP > 0 && !g.Varlen
            // zeros: the kernel skips key blocks that causal/window masking rules out entirely
            ? zeros(new[] { g.B, g.H, g.Sq, g.Sk }, dtype: ScalarType.Byte, device: q.device) : null;
        using (var scope = NewDisposeScope())
        {
            var wsBytes = NativeMethods.FlashAttn_flash_fwd_workspace_size(g.B, g.Sq, g.Sk, g.H, g.Hk, g.D);
            var ws = wsBytes > 0 ? empty(wsBytes, dtype: ScalarType.Byte, device: q.device) : null;
            NativeMethods.Check(NativeMethods.FlashAttn_flash_fwd(
                Ptr(q), Ptr(k), Ptr(v), Ptr(output), Ptr(lse), DType(q.dtype), PtrOrNull(g.CuQ), PtrOrNull(g.CuK),
                g.B, g.Sq, g.Sk, g.H, g.Hk, g.D,
                g.BatchStride(q), g.RowStride(q), g.HeadStride(q),
                g.BatchStride(k), g.RowStride(k), g.HeadStride(k),
                g.BatchStride(v), g.RowStride(v), g.HeadStride(v),
                g.BatchStride(output), g.RowStride(output), g.HeadStride(output),
                (float)opts.Scale, (int)opts.WindowLeft, (int)opts.WindowRight,
                (float)opts.Softcap, PtrOrNull(opts.AlibiSlopes), opts.AlibiSlopes is { } a && a.dim() == 2 ? a.stride(0) : 0,
                (float)opts.DropoutP, opts.Seed, 0, PtrOrNull(mask), PtrOrNull(ws), wsBytes, IntPtr.Zero));
        }
        ctx.save_for_backward(qkv is not null ? new List<Tensor> { qkv, output, lse } : new List<Tensor> { q, k, v, output, lse });
        ctx.save_data("geometry", g);
        ctx.save_data("options", opts);
        var outputs = new List<Tensor> { output, lse };
        if (mask is not null) outputs.Add(mask);
        ctx.mark_non_differentiable(outputs.Skip(1).ToList());
        return outputs;
    }

    public override List<Tensor> backward(autograd.AutogradContext ctx, List<Tensor> grads) =>
        BackwardGuard.Run(Name, 8, grads, () => Backward(ctx, grads));

    private List<Tensor> Backward(autograd.AutogradContext ctx, List<Tensor> grads)
    {
        var saved = ctx.get_saved_variables();
        var packed = saved.Count == 3;
        var (q, k, v) = packed ? Unpack(saved[0]) : (saved[0], saved[1], saved[2]);
        var (output, lse) = (saved[^2], saved[^1]);
        var g = (Geometry)ctx.get_data("geometry");
        var opts = (AttentionOptions)ctx.get_data("options");
        var dout = flash_attn.KernelLayout(grads[0].size(-1) <= 1 || grads[0].stride(-1) == 1 ? grads[0] : grads[0].contiguous());
        // packed: one contiguous gradient of qkv's shape, the kernels writing dq, dk, dv into its views
        var dqkv = packed ? empty(Sizes(saved[0]), saved[0].dtype, saved[0].device) : null;
        var (dq, dk, dv) = dqkv is not null ? Unpack(dqkv) : (empty_like(q), empty_like(k), empty_like(v));
        using (var scope = NewDisposeScope())
        {
            var wsBytes = NativeMethods.FlashAttn_flash_bwd_workspace_size(g.B, g.Sq, g.Sk, g.H, g.Hk, g.D, g.Varlen ? 1 : 0);
            var ws = wsBytes > 0 ? empty(wsBytes, dtype: ScalarType.Byte, device: q.device) : null;
            BackwardGuard.Check(NativeMethods.FlashAttn_flash_bwd(
                Ptr(dout), Ptr(q), Ptr(k), Ptr(v), Ptr(output), Ptr(lse), Ptr(dq), Ptr(dk), Ptr(dv), DType(q.dtype),
                PtrOrNull(g.CuQ), PtrOrNull(g.CuK), g.B, g.Sq, g.Sk, g.H, g.Hk, g.D,
                g.BatchStride(q), g.RowStride(q), g.HeadStride(q),
                g.BatchStride(k), g.RowStride(k), g.HeadStride(k),
                g.BatchStride(v), g.RowStride(v), g.HeadStride(v),
                g.BatchStride(output), g.RowStride(output), g.HeadStride(output),
                g.BatchStride(dout), g.RowStride(dout), g.HeadStride(dout),
                g.BatchStride(dq), g.RowStride(dq), g.HeadStride(dq),
                g.BatchStride(dk), g.RowStride(dk), g.HeadStride(dk),
                g.BatchStride(dv), g.RowStride(dv), g.HeadStride(dv),
                (float)opts.Scale, (int)opts.WindowLeft, (int)opts.WindowRight,
                (float)opts.Softcap, PtrOrNull(opts.AlibiSlopes), opts.AlibiSlopes is { } a && a.dim() == 2 ? a.stride(0) : 0,
                (float)opts.DropoutP, opts.Seed, 0, opts.Deterministic ? 1 : 0, PtrOrNull(ws), wsBytes, IntPtr.Zero), dq, dk, dv);
        }
        return dqkv is not null ? new List<Tensor> { dqkv, null!, null!, null!, null!, null!, null!, null! }
                                : new List<Tensor> { dq, dk, dv, null!, null!, null!, null!, null! };
    }

    // q, k, v as views of a packed (batch, seqlen, 3, nheads, headdim) tensor
    private static (Tensor q, Tensor k, Tensor v) Unpack(Tensor qkv) => (qkv.select(2, 0), qkv.select(2, 1), qkv.select(2, 2));

    /// <summary>Sizes and stride accessors for the dense (B, S, H, D) and varlen (total, H, D) layouts.</summary>
    internal sealed class Geometry
    {
        public readonly bool Varlen;
        public readonly long B, Sq, Sk, H, Hk, D;
        public readonly Tensor? CuQ, CuK;

        public Geometry(Tensor q, Tensor k, Tensor? cuQ, Tensor? cuK, long maxSq, long maxSk)
        {
            Varlen = cuQ is not null;
            (CuQ, CuK) = (cuQ?.contiguous(), cuK?.contiguous());
            B = Varlen ? cuQ!.size(0) - 1 : q.size(0);
            (Sq, Sk) = (maxSq, maxSk);
            (H, Hk, D) = (q.size(-2), k.size(-2), q.size(-1));
        }

        public long BatchStride(Tensor t) => Varlen ? 0 : t.stride(0);
        public long RowStride(Tensor t) => t.stride(Varlen ? 0 : 1);
        public long HeadStride(Tensor t) => t.stride(Varlen ? 1 : 2);
    }
}
