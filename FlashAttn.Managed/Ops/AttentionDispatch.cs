using TorchSharp;
using static TorchSharp.torch;
using F = TorchSharp.torch.nn.functional;

namespace FlashAttn;

/// <summary>The implementation that computed an attention call.</summary>
public enum AttentionBackend
{
    /// <summary>No attention call yet.</summary>
    None,
    /// <summary>The pure-TorchSharp reference (CPU, float32/float64, GPUs the kernels do not run on).</summary>
    Reference,
    /// <summary>Our FlashAttention kernels.</summary>
    Flash,
    /// <summary>libtorch's scaled_dot_product_attention (TorchSharp's; cuDNN's kernels on Hopper).</summary>
    Sdpa,
}

/// <summary>FLASHATTN_ATTENTION_BACKEND: auto (the measured rule), flash (our kernels always), sdpa (SDPA wherever it
/// computes the case). Read once per process; <see cref="AttentionDispatch.Override"/> switches it in process.</summary>
internal enum AttentionMode { Auto, Flash, Sdpa }

/// <summary>
/// A flash_attn_func call as the dispatch rule sees it. Capability: major * 10 + minor; the window as
/// <see cref="flash_attn.Window"/> resolves it (-1 unlimited, causal = (-1, 0)).
/// </summary>
internal readonly record struct AttentionCase(int Capability, ScalarType DType, long SeqlenQ, long SeqlenK, long Heads,
    long HeadsK, long HeadDim, double DropoutP, long WindowLeft, long WindowRight, double Softcap, bool Alibi,
    bool Deterministic);

/// <summary>
/// Where flash_attn_func runs: our kernels, or libtorch's scaled_dot_product_attention in the cases it computes the same
/// thing and was measured faster on the GPU at hand. The *_with_lse, varlen and KV-cache entry points never come here:
/// SDPA returns no LSE or dropout mask and takes no cu_seqlens.
///
/// H200, bf16, one device call (benchmarks/RESULTS.md, Hopper attention against cuDNN): TFLOP/s at 16k tokens and
/// hidden 2048, S 2048 / 8192 / 16384, ours (flash_selftest --bench-peer) and PyTorch's cuDNN backend
/// (pytorch_baselines.py attn):
/// | case        | fwd ours        | fwd cuDNN       | bwd ours        | bwd cuDNN       |
/// | d64 full    | 491 / 555 / 571 | 438 / 455 / 449 | 422 / 467 / 475 | 381 / 434 / 439 |
/// | d64 causal  | 360 / 436 / 437 | 324 / 444 / 444 | 339 / 455 / 473 | 273 / 395 / 418 |
/// | d128 full   | 629 / 686 / 699 | 581 / 645 / 607 | 503 / 532 / 544 | 471 / 523 / 526 |
/// | d128 causal | 519 / 473 / 663 | 471 / 583 / 601 | 406 / 384 / 521 | 335 / 487 / 507 |
/// GPT-2 124M's shape (B 16, S 1024, 12 heads of 64, causal): 0.099 + 0.277 ms ours, 0.085 + 0.276 ms cuDNN's (its
/// kernels in the training step of the same session). Forward and backward together ours are faster in every row but
/// d128 causal at S 8192, and even at GPT-2's shape, where our packed-qkv backward also saves unbind's copy: SDPA is
/// chosen for no case any more (FLASHATTN_ATTENTION_BACKEND=sdpa still forces it). Other GPUs, fp16 and short
/// sequences are unmeasured and stay on our kernels until AttentionDispatchBenchmarks says otherwise.
/// </summary>
internal static class AttentionDispatch
{
    internal const string EnvironmentVariable = "FLASHATTN_ATTENTION_BACKEND";

    /// <summary>Head dims where SDPA was measured faster on sm_9x (the table above): none since the Hopper kernels.</summary>
    internal static readonly long[] SdpaFasterHeadDims = [];

    /// <summary>Whether SDPA with dropout was measured faster (AttentionDispatchBenchmarks' sdpa rows with Dropout 0.1
    /// against the flash ones): not yet.</summary>
    internal static readonly bool SdpaFasterWithDropout = false;

    /// <summary>The path the last attention call took (any thread).</summary>
    internal static volatile AttentionBackend Last;

    // FLASHATTN_ATTENTION_BACKEND, read once, at the first call that needs it (a bad value is an error from then on).
    private static readonly Lazy<AttentionMode> s_environment = new(() => ParseMode(Environment.GetEnvironmentVariable(EnvironmentVariable)));

    /// <summary>The mode set in process, which wins over the environment's (benchmarks and tests switch paths with it);
    /// null: FLASHATTN_ATTENTION_BACKEND's.</summary>
    internal static AttentionMode? Override { get; set; }

    /// <summary>The mode flash_attn_func dispatches under: <see cref="Override"/>, else FLASHATTN_ATTENTION_BACKEND.</summary>
    internal static AttentionMode Mode => Override ?? s_environment.Value;

    internal static AttentionMode ParseMode(string? value) => value?.Trim().ToLowerInvariant() switch
    {
        null or "" or "auto" => AttentionMode.Auto,
        "flash" => AttentionMode.Flash,
        "sdpa" => AttentionMode.Sdpa,
        _ => throw new InvalidOperationException($"{EnvironmentVariable}={value}: expected auto, flash or sdpa"),
    };

    /// <summary>Flash or Sdpa for a call on a GPU our kernels run on (bf16/fp16 on sm_80+).</summary>
    internal static AttentionBackend Choose(in AttentionCase c, AttentionMode mode) =>
        Choose(c, mode, SdpaFasterHeadDims, SdpaFasterWithDropout);

    /// <summary><see cref="Choose(in AttentionCase, AttentionMode)"/> with the measured head dims and the dropout switch
    /// given (the tests' way to exercise the rule whatever the measurements say).</summary>
    internal static AttentionBackend Choose(in AttentionCase c, AttentionMode mode, IReadOnlyCollection<long> sdpaFasterHeadDims,
        bool sdpaFasterWithDropout)
    {
        if (mode == AttentionMode.Flash || !SdpaComputes(c)) return AttentionBackend.Flash;
        if (mode == AttentionMode.Sdpa) return AttentionBackend.Sdpa;
        bool faster = c.Capability / 10 == 9 && sdpaFasterHeadDims.Contains(c.HeadDim) &&
                      (c.DropoutP == 0 || sdpaFasterWithDropout);
        return faster ? AttentionBackend.Sdpa : AttentionBackend.Flash;
    }

    /// <summary>
    /// Whether SDPA computes flash_attn_func's result: bf16/fp16, head dims a multiple of 8 (others are padded for our
    /// kernels), as many k/v heads as q heads (TorchSharp 0.107 has no enable_gqa, and expanding K/V would copy them), no
    /// softcap or ALiBi, no window but causal, and causal only where its top-left alignment is our bottom-right one
    /// (seqlen_q == seqlen_k); not deterministic (SDPA's backward gives no such promise). Any softmax scale: see
    /// <see cref="Sdpa"/>.
    /// </summary>
    internal static bool SdpaComputes(in AttentionCase c) =>
        (c.DType is ScalarType.BFloat16 or ScalarType.Float16) && c.HeadDim % 8 == 0 && c.SeqlenQ > 0 && c.SeqlenK > 0 &&
        c.Heads == c.HeadsK && c.Softcap == 0 && !c.Alibi && !c.Deterministic && c.WindowLeft < 0 &&
        (c.WindowRight < 0 || (c.WindowRight == 0 && c.SeqlenQ == c.SeqlenK));

    /// <summary>
    /// q (B, Sq, H, D), k/v (B, Sk, H, D) -> (B, Sq, H, D) through scaled_dot_product_attention, whose (B, H, S, D) inputs
    /// are transposed views (no copies); gradients flow through libtorch's autograd. Dropout draws from torch's CUDA
    /// generator (torch.manual_seed reproduces it). TorchSharp 0.107's SDPA always scales by 1/sqrt(headdim): another
    /// softmax_scale is folded into q here, one elementwise kernel each way and one more rounding of q (exact for powers of
    /// two), which the tolerance rule of AttentionDispatchCudaTests covers. MHA never comes here with one: it folds the
    /// scale into its projection's weight (GPT-2's scale_attn_by_inverse_layer_idx), a pass over far fewer bytes.
    /// </summary>
    internal static Tensor Sdpa(Tensor q, Tensor k, Tensor v, double dropoutP, double? softmaxScale, bool causal)
    {
        using var scope = NewDisposeScope();
        double fold = softmaxScale is { } s ? s * Math.Sqrt(q.size(3)) : 1.0;
        var qs = Math.Abs(fold - 1.0) < 1e-12 ? q : q * fold; // the default scale passed explicitly: 1 up to rounding
        var o = F.scaled_dot_product_attention(qs.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), p: dropoutP,
                                               is_casual: causal);
        Last = AttentionBackend.Sdpa;
        return o.transpose(1, 2).MoveToOuterDisposeScope();
    }
}

public static partial class flash_attn
{
    /// <summary>The path the last attention call of the process took (Reference, Flash or Sdpa): for benchmarks and
    /// logs. FLASHATTN_ATTENTION_BACKEND=auto|flash|sdpa chooses it for flash_attn_func (auto: the measured rule).</summary>
    public static AttentionBackend last_attention_backend => AttentionDispatch.Last;
}
