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
    /// <param name="seqlen_offsets">Position of each sequence's first token: a (batch,) int32/int64 tensor, or use <paramref name="seqlen_offset"/>.</param>
    /// <param name="seqlen_offset">The same offset for every sequence (when seqlen_offsets is null), e.g. the KV-cache length.</param>
    /// <param name="cu_seqlens">(batch + 1,) int32 cumulative sequence lengths for packed (varlen) x.</param>
    /// <param name="max_seqlen">Longest sequence in the pack; required with cu_seqlens.</param>
    /// <returns>x rotated on its first rotary_dim features; the rest passes through.</returns>
    public static Tensor apply_rotary_emb(Tensor x, Tensor cos, Tensor sin, bool interleaved = false, bool inplace = false,
        Tensor? seqlen_offsets = null, long seqlen_offset = 0, Tensor? cu_seqlens = null, long? max_seqlen = null)
    {
        RotaryFunction.Validate(x, cos, sin, seqlen_offsets, seqlen_offset, cu_seqlens, max_seqlen);
        return RotaryFunction.apply(x, cos, sin, interleaved, inplace, seqlen_offsets, seqlen_offset, cu_seqlens, max_seqlen);
    }
}

/// <summary>Autograd function of <see cref="flash_attn.apply_rotary_emb"/>: the backward is the rotation by -theta.</summary>
public sealed class RotaryFunction : autograd.SingleTensorFunction<RotaryFunction>
{
    public override string Name => "RotaryFunction";

    public override Tensor forward(autograd.AutogradContext ctx, params object?[] vars)
    {
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

    public override List<Tensor> backward(autograd.AutogradContext ctx, Tensor grad)
    {
        var saved = ctx.get_saved_variables();
        var cos = saved[0];
        var sin = saved[1];
        int next = 2;
        var offsets = (bool)ctx.get_data("has_offsets") ? saved[next++] : null;
        var cuSeqlens = (bool)ctx.get_data("has_cu_seqlens") ? saved[next++] : null;
        long? maxSeqlen = cuSeqlens is null ? null : (long)ctx.get_data("max_seqlen");
        var g = grad.shape[^1] <= 1 || grad.stride(-1) == 1 ? grad : grad.contiguous();
        var dx = Apply(g, cos, sin, (bool)ctx.get_data("interleaved"), inplace: false, conjugate: true,
                       offsets, (long)ctx.get_data("offset"), cuSeqlens, maxSeqlen);
        // One entry per argument given to apply (null for the non-tensors and for cos/sin).
        return new List<Tensor> { dx, null!, null!, null!, null!, null!, null!, null!, null! };
    }

    internal static void Validate(Tensor x, Tensor cos, Tensor sin, Tensor? offsets, long offset, Tensor? cuSeqlens, long? maxSeqlen)
    {
        RequireFloat(x, "x");
        if (cuSeqlens is null) RequireDim(x, 4, "x", "(batch, seqlen, nheads, headdim)");
        else RequireDim(x, 3, "x", "(total_seqlen, nheads, headdim) when cu_seqlens is given");
        RequireContiguousLastDim(x, "x");
        RequireDim(cos, 2, "cos", "(seqlen_ro, rotary_dim / 2)");
        Require(sin.shape.SequenceEqual(cos.shape), "sin", $"sin must have cos's shape {Shape(cos)}, got {Shape(sin)}");
        foreach (var (t, name) in new[] { (cos, "cos"), (sin, "sin") })
        {
            Require(t.dtype == x.dtype || t.dtype == ScalarType.Float32, name,
                    $"{name} must be x's dtype ({x.dtype}) or float32, got {t.dtype}");
            RequireSameDevice(t, x, name, "x");
            RequireContiguousLastDim(t, name);
        }
        Require(sin.dtype == cos.dtype, "sin", $"sin must have cos's dtype ({cos.dtype}), got {sin.dtype}");
        long headdim = x.shape[^1], rotaryDim = cos.shape[1] * 2, seqlenRo = cos.shape[0];
        Require(rotaryDim >= 2 && rotaryDim <= headdim, "cos",
                $"rotary_dim (2 * cos.shape[1] = {rotaryDim}) must be between 2 and headdim ({headdim})");
        long batch, seqlen;
        if (cuSeqlens is null)
        {
            (batch, seqlen) = (x.shape[0], x.shape[1]);
        }
        else
        {
            RequireDim(cuSeqlens, 1, "cu_seqlens", "(batch + 1,)");
            Require(cuSeqlens.dtype == ScalarType.Int32, "cu_seqlens", $"cu_seqlens must be int32, got {cuSeqlens.dtype}");
            RequireSameDevice(cuSeqlens, x, "cu_seqlens", "x");
            Require(cuSeqlens.shape[0] >= 2, "cu_seqlens", "cu_seqlens must hold at least 2 entries (batch + 1)");
            Require(maxSeqlen is > 0, "max_seqlen", "max_seqlen must be given (> 0) with cu_seqlens");
            (batch, seqlen) = (cuSeqlens.shape[0] - 1, maxSeqlen!.Value);
        }
        if (offsets is null)
        {
            Require(offset >= 0, "seqlen_offset", $"seqlen_offset ({offset}) must be >= 0");
            Require(seqlen + offset <= seqlenRo, "cos",
                    $"cos/sin hold {seqlenRo} positions but seqlen ({seqlen}) + seqlen_offset ({offset}) need {seqlen + offset}");
        }
        else
        {
            RequireDim(offsets, 1, "seqlen_offsets", "(batch,)");
            Require(offsets.shape[0] == batch, "seqlen_offsets", $"seqlen_offsets must have batch ({batch}) entries, got {offsets.shape[0]}");
            Require(offsets.dtype is ScalarType.Int32 or ScalarType.Int64, "seqlen_offsets", $"seqlen_offsets must be int32 or int64, got {offsets.dtype}");
            RequireSameDevice(offsets, x, "seqlen_offsets", "x");
            Require(seqlen <= seqlenRo, "cos", $"cos/sin hold {seqlenRo} positions, fewer than seqlen ({seqlen})");
        }
    }

    /// <summary>Runs the kernel or the reference; arguments already validated.</summary>
    internal static Tensor Apply(Tensor x, Tensor cos, Tensor sin, bool interleaved, bool inplace, bool conjugate,
        Tensor? offsets, long offset, Tensor? cuSeqlens, long? maxSeqlen)
    {
        if (!Backend.UsesKernels(x) || (cos.dtype != x.dtype && cos.dtype != ScalarType.Float32))
            return Reference.rotary(x, cos, sin, interleaved, inplace, conjugate, offsets, offset, cuSeqlens, maxSeqlen);

        using var scope = NewDisposeScope();
        var out_ = inplace ? x : empty_like(x);
        var offsets32 = offsets?.to_type(ScalarType.Int32).contiguous();
        var varlen = cuSeqlens is not null;
        long batch = varlen ? cuSeqlens!.shape[0] - 1 : x.shape[0];
        long seqlen = varlen ? maxSeqlen!.Value : x.shape[1];
        int s = varlen ? 0 : 1; // index of the sequence dimension
        var cuSeqlensC = cuSeqlens?.contiguous();
        NativeMethods.Check(NativeMethods.FlashAttn_rotary_apply(
            Ptr(out_), Ptr(x), DType(x.dtype), Ptr(cos), Ptr(sin), DType(cos.dtype),
            PtrOrNull(cuSeqlensC), PtrOrNull(offsets32), offset,
            batch, seqlen, x.shape[^2], x.shape[^1], cos.shape[1] * 2, cos.shape[0], cos.stride(0),
            varlen ? 0 : x.stride(0), x.stride(s), x.stride(s + 1),
            varlen ? 0 : out_.stride(0), out_.stride(s), out_.stride(s + 1),
            interleaved ? 1 : 0, conjugate ? 1 : 0, IntPtr.Zero));
        return inplace ? x : out_.MoveToOuterDisposeScope();
    }
}
