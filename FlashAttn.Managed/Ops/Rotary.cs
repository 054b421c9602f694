using FlashAttn.Interop;
using TorchSharp;
using static FlashAttn.Interop.TensorArgs;
using static TorchSharp.torch;

namespace FlashAttn;

public static partial class flash_attn
{
    /// <summary>
    /// Rotary position embedding, as flash_attn.layers.rotary.apply_rotary_emb.
    /// </summary>
    /// <param name="x">(batch, seqlen, nheads, headdim), or (total_seqlen, nheads, headdim) with cu_seqlens.</param>
    /// <param name="cos">(seqlen_ro, rotary_dim / 2), x's dtype or float32.</param>
    /// <param name="sin">(seqlen_ro, rotary_dim / 2), like cos.</param>
    /// <param name="interleaved">Rotate pairs (2i, 2i+1) (GPT-J) instead of (i, i + rotary_dim/2) (GPT-NeoX).</param>
    /// <param name="inplace">Write the result into x and return x.</param>
    /// <param name="seqlen_offsets">Position of each sequence's first token: a (batch,) int32/int64 tensor, or use <paramref name="seqlen_offset"/>.
    /// Every sequence's positions must lie in cos/sin; the values are checked on the host (for CUDA tensors, a copy and a
    /// synchronisation per call).</param>
    /// <param name="seqlen_offset">The same offset for every sequence (when seqlen_offsets is null), e.g. the KV-cache length.</param>
    /// <param name="cu_seqlens">(batch + 1,) int32 cumulative sequence lengths for packed (varlen) x: from 0, never
    /// decreasing, ending at x's rows, no sequence longer than max_seqlen; checked on the host as seqlen_offsets is.</param>
    /// <param name="max_seqlen">Longest sequence in the pack; required with cu_seqlens.</param>
    /// <returns>x rotated on its first rotary_dim features; the rest passes through.</returns>
    public static Tensor apply_rotary_emb(Tensor x, Tensor cos, Tensor sin, bool interleaved = false, bool inplace = false,
        Tensor? seqlen_offsets = null, long seqlen_offset = 0, Tensor? cu_seqlens = null, long? max_seqlen = null)
    {
        DeviceErrors.Raise();
        RotaryFunction.Validate(x, cos, sin, seqlen_offsets, seqlen_offset, cu_seqlens, max_seqlen);
        return OutputCache.Slim(RotaryFunction.apply(x, cos, sin, interleaved, inplace, seqlen_offsets, seqlen_offset, cu_seqlens, max_seqlen));
    }
}

/// <summary>Autograd function of <see cref="flash_attn.apply_rotary_emb"/>: the backward is the rotation by -theta.</summary>
public sealed class RotaryFunction : autograd.SingleTensorFunction<RotaryFunction>
{
    public override string Name => "RotaryFunction";

    public override Tensor forward(autograd.AutogradContext ctx, params object?[] vars)
    {
        OutputCache.Track(ctx);
        var x = (Tensor)vars[0]!;
        var cos = (Tensor)vars[1]!;
        var sin = (Tensor)vars[2]!;
        bool interleaved = (bool)vars[3]!, inplace = (bool)vars[4]!;
        var offsets = (Tensor?)vars[5];
        var offset = (long)vars[6]!;
        var cuSeqlens = (Tensor?)vars[7];
        var maxSeqlen = (long?)vars[8];
        // Validated again here: apply() may be called directly, and backward must never throw.
        Validate(x, cos, sin, offsets, offset, cuSeqlens, maxSeqlen);

        var saved = new List<Tensor> { cos, sin };
        if (offsets is not null) saved.Add(offsets);
        if (cuSeqlens is not null) saved.Add(cuSeqlens);
        ctx.save_for_backward(saved);
        ctx.save_data("interleaved", interleaved);
        ctx.save_data("offset", offset);
        ctx.save_data("has_offsets", offsets is not null);
        ctx.save_data("has_cu_seqlens", cuSeqlens is not null);
        ctx.save_data("max_seqlen", maxSeqlen ?? 0L);

        var result = Apply(x, cos, sin, interleaved, inplace, conjugate: false, offsets, offset, cuSeqlens, maxSeqlen);
        if (inplace) ctx.mark_dirty(new List<Tensor> { x });
        return result;
    }

    public override List<Tensor> backward(autograd.AutogradContext ctx, Tensor grad) =>
        BackwardGuard.Run(Name, 9, new[] { grad }, () => Backward(ctx, grad));

    private List<Tensor> Backward(autograd.AutogradContext ctx, Tensor grad)
    {
        var saved = ctx.get_saved_variables();
        var cos = saved[0];
        var sin = saved[1];
        int next = 2;
        var offsets = (bool)ctx.get_data("has_offsets") ? saved[next++] : null;
        var cuSeqlens = (bool)ctx.get_data("has_cu_seqlens") ? saved[next++] : null;
        long? maxSeqlen = cuSeqlens is null ? null : (long)ctx.get_data("max_seqlen");
        var g = grad.size(-1) <= 1 || grad.stride(-1) == 1 ? grad : grad.contiguous();
        var dx = Apply(g, cos, sin, (bool)ctx.get_data("interleaved"), inplace: false, conjugate: true,
                       offsets, (long)ctx.get_data("offset"), cuSeqlens, maxSeqlen);
        // One entry per argument given to apply (null for the non-tensors and for cos/sin).
        return new List<Tensor> { dx, null!, null!, null!, null!, null!, null!, null!, null! };
    }

    // xName, cosName, sinName: the caller's argument names (apply_rotary_emb_qkv_ validates views of its qkv, whose rank
    // it has checked).
    internal static void Validate(Tensor x, Tensor cos, Tensor sin, Tensor? offsets, long offset, Tensor? cuSeqlens, long? maxSeqlen,
        string xName = "x", string cosName = "cos", string sinName = "sin")
    {
        RequireFloat(x, xName);
        if (xName == "x")
            RequireDim(x, cuSeqlens is null ? 4 : 3, "x",
                       cuSeqlens is null ? "(batch, seqlen, nheads, headdim)" : "(total_seqlen, nheads, headdim) when cu_seqlens is given");
        RequireContiguousLastDim(x, xName);
        RequireDim(cos, 2, cosName, "(seqlen_ro, rotary_dim / 2)");
        Require(SameShape(sin, cos), sinName, $"{sinName} must have {cosName}'s shape {Shape(cos)}, got {Shape(sin)}");
        foreach (var (t, name) in new[] { (cos, cosName), (sin, sinName) })
        {
            Require(t.dtype == x.dtype || t.dtype == ScalarType.Float32, name,
                    $"{name} must be {xName}'s dtype ({x.dtype}) or float32, got {t.dtype}");
            RequireSameDevice(t, x, name, xName);
            RequireContiguousLastDim(t, name);
        }
        Require(sin.dtype == cos.dtype, sinName, $"{sinName} must have {cosName}'s dtype ({cos.dtype}), got {sin.dtype}");
        long headdim = x.size(-1), rotaryDim = cos.size(1) * 2, seqlenRo = cos.size(0);
        Require(rotaryDim >= 2 && rotaryDim <= headdim, cosName,
                $"rotary_dim (2 * cos.size(1) = {rotaryDim}) must be between 2 and headdim ({headdim})");
        long batch, seqlen;
        long[]? cu = null;
        if (cuSeqlens is null)
        {
            (batch, seqlen) = (x.size(0), x.size(1));
        }
        else
        {
            Require(maxSeqlen is not null, "max_seqlen", "max_seqlen must be given (> 0) with cu_seqlens");
            cu = RequireOffsets(cuSeqlens, "cu_seqlens", x, xName, maxSeqlen!.Value, "max_seqlen");
            (batch, seqlen) = (cuSeqlens.size(0) - 1, maxSeqlen!.Value);
        }
        if (offsets is null)
        {
            Require(offset >= 0, "seqlen_offset", $"seqlen_offset ({offset}) must be >= 0");
            Require(seqlen + offset <= seqlenRo, cosName,
                    $"{cosName}/{sinName} hold {seqlenRo} positions but seqlen ({seqlen}) + seqlen_offset ({offset}) need {seqlen + offset}");
        }
        else
        {
            RequireDim(offsets, 1, "seqlen_offsets", "(batch,)");
            Require(offsets.size(0) == batch, "seqlen_offsets", $"seqlen_offsets must have batch ({batch}) entries, got {offsets.size(0)}");
            Require(offsets.dtype is ScalarType.Int32 or ScalarType.Int64, "seqlen_offsets", $"seqlen_offsets must be int32 or int64, got {offsets.dtype}");
            RequireSameDevice(offsets, x, "seqlen_offsets", xName);
            // Each sequence's positions must lie in the table, as an int seqlen_offset's must: read on the host (for CUDA
            // tensors a copy of batch integers and a synchronisation; decoding copies cache_seqlens there anyway).
            long[] values;
            using (var host = offsets.to(ScalarType.Int64, CPU)) values = host.data<long>().ToArray();
            for (int b = 0; b < batch; b++)
            {
                long length = cu is null ? seqlen : cu[b + 1] - cu[b];
                Require(values[b] >= 0 && values[b] + length <= seqlenRo, "seqlen_offsets",
                        $"seqlen_offsets[{b}] ({values[b]}) + the sequence's {length} tokens must lie within the {seqlenRo} positions of {cosName}/{sinName}");
            }
        }
    }

    /// <summary>Runs the kernel or the reference; arguments already validated.</summary>
    internal static Tensor Apply(Tensor x, Tensor cos, Tensor sin, bool interleaved, bool inplace, bool conjugate,
        Tensor? offsets, long offset, Tensor? cuSeqlens, long? maxSeqlen)
    {
        if (!Backend.UsesKernels(x) || x.numel() == 0 || (cos.dtype != x.dtype && cos.dtype != ScalarType.Float32))
            return Reference.rotary(x, cos, sin, interleaved, inplace, conjugate, offsets, offset, cuSeqlens, maxSeqlen);

        using var scope = NewDisposeScope();
        var out_ = inplace ? x : empty_like(x);
        var offsets32 = offsets?.to_type(ScalarType.Int32).contiguous();
        var varlen = cuSeqlens is not null;
        long batch = varlen ? cuSeqlens!.size(0) - 1 : x.size(0);
        long seqlen = varlen ? maxSeqlen!.Value : x.size(1);
        int s = varlen ? 0 : 1; // index of the sequence dimension
        var cuSeqlensC = cuSeqlens?.contiguous();
        NativeMethods.Check(NativeMethods.FlashAttn_rotary_apply(
            Ptr(out_), Ptr(x), DType(x.dtype), Ptr(cos), Ptr(sin), DType(cos.dtype),
            PtrOrNull(cuSeqlensC), PtrOrNull(offsets32), offset,
            batch, seqlen, x.size(-2), x.size(-1), cos.size(1) * 2, cos.size(0), cos.stride(0),
            varlen ? 0 : x.stride(0), x.stride(s), x.stride(s + 1),
            varlen ? 0 : out_.stride(0), out_.stride(s), out_.stride(s + 1),
            interleaved ? 1 : 0, conjugate ? 1 : 0, IntPtr.Zero));
        return inplace ? x : out_.MoveToOuterDisposeScope();
    }
}

public static partial class flash_attn
{
    /// <summary>
    /// Rotary embedding of q and k inside a packed qkv, in place (flash-attn's apply_rotary_emb_qkv_).
    /// qkv: (batch, seqlen, 3, nheads, headdim), or (batch, seqlen, nheads_q + 2 * nheads_k, headdim)
    /// with <paramref name="num_heads_q"/> (GQA). cos_k/sin_k: separate tables for k (XPos); null to
    /// use cos/sin. v is untouched. Returns qkv.
    /// </summary>
    public static Tensor apply_rotary_emb_qkv_(Tensor qkv, Tensor cos, Tensor sin, Tensor? cos_k = null, Tensor? sin_k = null,
        bool interleaved = false, Tensor? seqlen_offsets = null, long seqlen_offset = 0, int? num_heads_q = null)
    {
        DeviceErrors.Raise();
        RotaryQkvFunction.Validate(qkv, cos, sin, cos_k, sin_k, seqlen_offsets, seqlen_offset, num_heads_q);
        return OutputCache.Slim(RotaryQkvFunction.apply(qkv, cos, sin, cos_k, sin_k, interleaved, seqlen_offsets, seqlen_offset, num_heads_q));
    }
}

/// <summary>Autograd function of <see cref="flash_attn.apply_rotary_emb_qkv_"/>: rotates q and k of a packed qkv in place.</summary>
public sealed class RotaryQkvFunction : autograd.SingleTensorFunction<RotaryQkvFunction>
{
    public override string Name => "RotaryQkvFunction";

    public override Tensor forward(autograd.AutogradContext ctx, params object?[] vars)
    {
        OutputCache.Track(ctx);
        var qkv = (Tensor)vars[0]!;
        var (cos, sin, cosK, sinK) = ((Tensor)vars[1]!, (Tensor)vars[2]!, (Tensor?)vars[3], (Tensor?)vars[4]);
        var interleaved = (bool)vars[5]!;
        var offsets = (Tensor?)vars[6];
        var offset = (long)vars[7]!;
        var numHeadsQ = (int?)vars[8];
        Validate(qkv, cos, sin, cosK, sinK, offsets, offset, numHeadsQ);
        var saved = new List<Tensor> { cos, sin, cosK ?? cos, sinK ?? sin };
        if (offsets is not null) saved.Add(offsets);
        ctx.save_for_backward(saved);
        ctx.save_data("interleaved", interleaved);
        ctx.save_data("offset", offset);
        ctx.save_data("num_heads_q", numHeadsQ ?? 0);
        ctx.save_data("xpos", cosK is not null);
        Rotate(qkv, cos, sin, cosK, sinK, interleaved, conjugate: false, offsets, offset, numHeadsQ);
        ctx.mark_dirty(new List<Tensor> { qkv });
        return qkv;
    }

    public override List<Tensor> backward(autograd.AutogradContext ctx, Tensor grad) =>
        BackwardGuard.Run(Name, 9, new[] { grad }, () => Backward(ctx, grad));

    private List<Tensor> Backward(autograd.AutogradContext ctx, Tensor grad)
    {
        var saved = ctx.get_saved_variables();
        var offsets = saved.Count > 4 ? saved[4] : null;
        var numHeadsQ = (int)ctx.get_data("num_heads_q");
        var xpos = (bool)ctx.get_data("xpos");
        var dqkv = grad.clone(); // the incoming gradient may be shared: rotate a copy
        Rotate(dqkv, saved[0], saved[1], xpos ? saved[2] : null, xpos ? saved[3] : null, (bool)ctx.get_data("interleaved"), conjugate: true,
               offsets, (long)ctx.get_data("offset"), numHeadsQ == 0 ? null : numHeadsQ);
        return new List<Tensor> { dqkv, null!, null!, null!, null!, null!, null!, null!, null! };
    }

    internal static void Validate(Tensor qkv, Tensor cos, Tensor sin, Tensor? cosK, Tensor? sinK, Tensor? offsets, long offset, int? numHeadsQ)
    {
        if (numHeadsQ is null)
        {
            TensorArgs.Require(qkv.dim() == 5 && qkv.size(2) == 3, "qkv",
                $"qkv must be (batch, seqlen, 3, nheads, headdim), or 4-D with num_heads_q; got {TensorArgs.Shape(qkv)}");
        }
        else
        {
            TensorArgs.Require(qkv.dim() == 4, "qkv", $"qkv must be (batch, seqlen, nheads_q + 2 * nheads_k, headdim) with num_heads_q; got {TensorArgs.Shape(qkv)}");
            var kvHeads = qkv.size(2) - numHeadsQ.Value;
            TensorArgs.Require(numHeadsQ > 0 && kvHeads > 0 && kvHeads % 2 == 0, "num_heads_q",
                $"num_heads_q ({numHeadsQ}) must leave an even, positive number of k/v heads out of {qkv.size(2)}");
        }
        TensorArgs.Require((cosK is null) == (sinK is null), "cos_k", "cos_k and sin_k must be given together");
        var (q, k) = QK(qkv, numHeadsQ, separate: true);
        RotaryFunction.Validate(q, cos, sin, offsets, offset, null, null, "qkv");
        if (cosK is null) return; // k has q's tables and positions
        RotaryFunction.Validate(k, cosK, sinK!, offsets, offset, null, null, "qkv", "cos_k", "sin_k");
    }

    // Views of q and k inside qkv; with shared tables both rotate in one launch over (B, S, Hq + Hk, D).
    private static (Tensor q, Tensor k) QK(Tensor qkv, int? numHeadsQ, bool separate)
    {
        if (numHeadsQ is null)
        {
            if (!separate) { var qk = qkv[.., .., ..2]; return (qk.reshape(qk.size(0), qk.size(1), 2 * qk.size(3), qk.size(4)), null!); }
            return (qkv[.., .., 0], qkv[.., .., 1]);
        }
        long hq = numHeadsQ.Value, hk = (qkv.size(2) - hq) / 2;
        if (!separate) return (qkv[.., .., ..(int)(hq + hk)], null!);
        return (qkv[.., .., ..(int)hq], qkv[.., .., (int)hq..(int)(hq + hk)]);
    }

    private static void Rotate(Tensor qkv, Tensor cos, Tensor sin, Tensor? cosK, Tensor? sinK, bool interleaved, bool conjugate,
        Tensor? offsets, long offset, int? numHeadsQ)
    {
        using var scope = NewDisposeScope();
        if (cosK is null)
        {
            var (qk, _) = QK(qkv, numHeadsQ, separate: false);
            RotaryFunction.Apply(qk, cos, sin, interleaved, inplace: true, conjugate, offsets, offset, null, null);
            return;
        }
        var (q, k) = QK(qkv, numHeadsQ, separate: true);
        RotaryFunction.Apply(q, cos, sin, interleaved, inplace: true, conjugate, offsets, offset, null, null);
        RotaryFunction.Apply(k, cosK!, sinK!, interleaved, inplace: true, conjugate, offsets, offset, null, null);
    }
}
