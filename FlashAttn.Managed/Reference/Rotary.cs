using TorchSharp;
using static TorchSharp.torch;

namespace FlashAttn;

public static partial class Reference
{
    /// <summary>
    /// Rotary embedding with <see cref="flash_attn.apply_rotary_emb"/>'s semantics; conjugate rotates by
    /// -theta (the backward). Positions outside cos/sin rotate by 0, as in the kernel.
    /// <paramref name="compute_dtype"/> overrides the arithmetic's dtype (tests use x's own dtype
    /// to measure the error of a low-precision computation).
    /// </summary>
    public static Tensor rotary(Tensor x, Tensor cos, Tensor sin, bool interleaved = false, bool inplace = false,
        bool conjugate = false, Tensor? seqlen_offsets = null, long seqlen_offset = 0, Tensor? cu_seqlens = null,
        long? max_seqlen = null, ScalarType? compute_dtype = null)
    {
        using var scope = NewDisposeScope();
        var ct = compute_dtype ?? ComputeType(x.dtype);
        long half = cos.shape[1], rotaryDim = 2 * half, seqlenRo = cos.shape[0];
        var device = x.device;
        // positions: (B, S) without cu_seqlens, (total,) with them.
        Tensor positions;
        if (cu_seqlens is null)
        {
            long batch = x.shape[0], seqlen = x.shape[1];
            var offsets = seqlen_offsets?.to(ScalarType.Int64).view(batch, 1) ?? tensor(seqlen_offset, device: device).view(1, 1);
            positions = arange(seqlen, dtype: ScalarType.Int64, device: device).view(1, seqlen) + offsets;
            positions = positions.expand(batch, seqlen);
        }
        else
        {
            var cu = cu_seqlens.to(ScalarType.Int64).cpu();
            long batch = cu.shape[0] - 1, total = x.shape[0];
            var starts = cu[..^1];
            var lengths = cu[1..] - starts;
            // Sequence index of every packed token; tokens past cu_seqlens[-1] belong to none.
            var seqIds = repeat_interleave(arange(batch, dtype: ScalarType.Int64), lengths, output_size: cu[^1].item<long>());
            var tokenIndex = arange(seqIds.shape[0], dtype: ScalarType.Int64);
            var offsets = seqlen_offsets?.to(ScalarType.Int64).cpu() ?? full(batch, seqlen_offset, dtype: ScalarType.Int64);
            var pos = tokenIndex - starts.index_select(0, seqIds) + offsets.index_select(0, seqIds);
            positions = full(total, -1L, dtype: ScalarType.Int64);
            positions[TensorIndex.Slice(0, pos.shape[0])] = pos;
            positions = positions.to(device);
        }
        var valid = positions.ge(0).logical_and(positions.lt(seqlenRo)).unsqueeze(-1);
        var idx = positions.clamp(0, seqlenRo - 1);
        var c = where(valid, cos.to(ct).index_select(0, idx.flatten()).view(idx.shape.Append(half).ToArray()), 1.0);
        var s = where(valid, sin.to(ct).index_select(0, idx.flatten()).view(idx.shape.Append(half).ToArray()), 0.0);
        if (conjugate) s = -s;
        c = c.unsqueeze(-2); // broadcast over heads
        s = s.unsqueeze(-2);

        var xf = x.to(ct);
        var rot = xf[TensorIndex.Ellipsis, TensorIndex.Slice(0, rotaryDim)];
        Tensor rotated;
        if (!interleaved)
        {
            var x1 = rot[TensorIndex.Ellipsis, TensorIndex.Slice(0, half)];
            var x2 = rot[TensorIndex.Ellipsis, TensorIndex.Slice(half, rotaryDim)];
            rotated = cat(new[] { x1 * c - x2 * s, x1 * s + x2 * c }, -1);
        }
        else
        {
            var x1 = rot[TensorIndex.Ellipsis, TensorIndex.Slice(0, rotaryDim, 2)];
            var x2 = rot[TensorIndex.Ellipsis, TensorIndex.Slice(1, rotaryDim, 2)];
            rotated = stack(new[] { x1 * c - x2 * s, x1 * s + x2 * c }, -1).flatten(-2);
        }
        var result = rotaryDim == x.shape[^1]
            ? rotated
            : cat(new[] { rotated, xf[TensorIndex.Ellipsis, TensorIndex.Slice(rotaryDim, null)] }, -1);
        if (inplace)
        {
            using (no_grad()) x.copy_(result);
            return x;
        }
        return result.to(x.dtype).MoveToOuterDisposeScope();
    }
}
