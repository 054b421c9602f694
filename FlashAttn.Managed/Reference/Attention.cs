using TorchSharp;
using static TorchSharp.torch;

namespace FlashAttn;

public static partial class Reference
{
    /// <summary>
    /// Attention with <see cref="flash_attn.flash_attn_func"/>'s semantics, materialising the
    /// (seqlen_q, seqlen_k) matrix: q (B, Sq, H, D), k/v (B, Sk, Hk, D) with H a multiple of Hk.
    /// Scores s = scale q·k, then softcap·tanh(s / softcap), then the ALiBi bias
    /// -slope·|i + Sk - Sq - j|, then the causal/window mask aligned bottom-right. Fully-masked rows
    /// give 0 and LSE +inf. dropout_mask (B, H, Sq, Sk), 1 = kept, replays a kernel's mask; else dropout_seed draws
    /// the kernels' own mask (the Philox stream of flash_attn_func with that seed); else dropout draws from
    /// TorchSharp's default generator. Returns out (q's dtype) and the float32 LSE (B, H, Sq).
    /// </summary>
    public static (Tensor output, Tensor softmax_lse) attention(Tensor q, Tensor k, Tensor v, double? softmax_scale = null,
        bool causal = false, (long left, long right)? window_size = null, double softcap = 0.0, Tensor? alibi_slopes = null,
        double dropout_p = 0.0, Tensor? dropout_mask = null, ScalarType? compute_dtype = null, ulong? dropout_seed = null)
    {
        using var scope = NewDisposeScope();
        var ct = compute_dtype ?? ComputeType(q.dtype);
        long B = q.shape[0], Sq = q.shape[1], H = q.shape[2], D = q.shape[3], Sk = k.shape[1], Hk = k.shape[2];
        double scale = softmax_scale ?? 1.0 / Math.Sqrt(D);
        var qc = q.to(ct);
        var kc = k.to(ct);
        var vc = v.to(ct);
        if (Hk != H)
        {
            kc = kc.repeat_interleave(H / Hk, dim: 2);
            vc = vc.repeat_interleave(H / Hk, dim: 2);
        }
        var s = einsum("bthd,bshd->bhts", qc * scale, kc); // (B, H, Sq, Sk)
        if (softcap > 0) s = (s / softcap).tanh() * softcap;
        var rowPos = arange(Sq, dtype: ScalarType.Int64, device: q.device).view(Sq, 1) + (Sk - Sq); // i + Sk - Sq
        var colPos = arange(Sk, dtype: ScalarType.Int64, device: q.device).view(1, Sk);
        if (alibi_slopes is not null)
        {
            var slopes = (alibi_slopes.dim() == 1 ? alibi_slopes.view(1, H) : alibi_slopes).to(ct).view(-1, H, 1, 1);
            s = s - slopes * (rowPos - colPos).abs().to(ct).view(1, 1, Sq, Sk);
        }
        var (left, right) = window_size ?? (-1, -1);
        if (causal) right = 0;
        var masked = Masked(Sq, Sk, left, right, q.device);
        if (masked is not null) s = s.masked_fill(masked.view(1, 1, Sq, Sk), double.NegativeInfinity);
        var lse = s.logsumexp(-1); // -inf on fully-masked rows
        var empty = lse.isneginf();
        var p = (s - lse.masked_fill(empty, 0).unsqueeze(-1)).exp().masked_fill(empty.unsqueeze(-1), 0);
        if (dropout_mask is null && dropout_seed is { } seed && dropout_p > 0)
            dropout_mask = DropoutMask(B, H, Sq, Sk, dropout_p, seed, left, right, q.device);
        if (dropout_mask is not null) p = p * dropout_mask.to(ct) / (1 - dropout_p);
        else if (dropout_p > 0) p = nn.functional.dropout(p, dropout_p, training: true);
        var output = einsum("bhts,bshd->bthd", p, vc).to(q.dtype);
        lse = lse.masked_fill(empty, double.PositiveInfinity).to(ScalarType.Float32);
        return (output.MoveToOuterDisposeScope(), lse.MoveToOuterDisposeScope());
    }

    /// <summary>
    /// Varlen attention: q (total_q, H, D), k/v (total_k, Hk, D) packed by cu_seqlens_q/k; each
    /// sequence attends only within itself. Returns out (total_q, H, D) and LSE (H, total_q).
    /// </summary>
    public static (Tensor output, Tensor softmax_lse) attention_varlen(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q,
        Tensor cu_seqlens_k, double? softmax_scale = null, bool causal = false, (long left, long right)? window_size = null,
        double softcap = 0.0, Tensor? alibi_slopes = null, double dropout_p = 0.0, ScalarType? compute_dtype = null,
        ulong? dropout_seed = null)
    {
        using var scope = NewDisposeScope();
        var cq = cu_seqlens_q.to(ScalarType.Int64).cpu().data<long>().ToArray();
        var ck = cu_seqlens_k.to(ScalarType.Int64).cpu().data<long>().ToArray();
        var outs = new List<Tensor>();
        var lses = new List<Tensor>();
        for (int b = 0; b < cq.Length - 1; b++)
        {
            var qb = q[TensorIndex.Slice(cq[b], cq[b + 1])].unsqueeze(0);
            var kb = k[TensorIndex.Slice(ck[b], ck[b + 1])].unsqueeze(0);
            var vb = v[TensorIndex.Slice(ck[b], ck[b + 1])].unsqueeze(0);
            var slopes = alibi_slopes is not null && alibi_slopes.dim() == 2 ? alibi_slopes[b] : alibi_slopes;
            var (left, right) = window_size ?? (-1, -1);
            // the kernels key sequence b's stream by its index b
            var mask = dropout_seed is { } seed && dropout_p > 0
                ? DropoutMask(1, q.shape[1], qb.shape[1], kb.shape[1], dropout_p, seed, left, causal ? 0 : right, q.device, firstBatch: b)
                : null;
            var (o, l) = attention(qb, kb, vb, softmax_scale ?? 1.0 / Math.Sqrt(q.shape[^1]), causal, window_size, softcap,
                                   slopes, dropout_p, mask, compute_dtype: compute_dtype);
            outs.Add(o[0]);
            lses.Add(l[0]);
        }
        // no sequence (batch 0): empty results
        var output = outs.Count > 0 ? cat(outs, 0) : zeros(0, q.shape[1], q.shape[2], dtype: q.dtype, device: q.device);
        var lse = lses.Count > 0 ? cat(lses, 1) : zeros(q.shape[1], 0, dtype: ScalarType.Float32, device: q.device);
        // Rows past cu_seqlens_q[-1] belong to no sequence: zero, LSE +inf.
        if (output.shape[0] < q.shape[0])
        {
            output = cat(new[] { output, zeros(q.shape[0] - output.shape[0], q.shape[1], q.shape[2], dtype: output.dtype, device: q.device) }, 0);
            lse = cat(new[] { lse, full(q.shape[1], q.shape[0] - lse.shape[1], double.PositiveInfinity, dtype: ScalarType.Float32, device: q.device) }, 1);
        }
        return (output.MoveToOuterDisposeScope(), lse.MoveToOuterDisposeScope());
    }
    /// <summary>Where query i cannot see key j: (Sq, Sk) bool, true outside the causal/window band aligned bottom-right
    /// (key j visible to query i iff i + Sk - Sq - left &lt;= j &lt;= i + Sk - Sq + right, -1 unlimited); null without a band.</summary>
    internal static Tensor? Masked(long Sq, long Sk, long left, long right, Device device)
    {
        if (left < 0 && right < 0) return null;
        var rowPos = arange(Sq, dtype: ScalarType.Int64, device: device).view(Sq, 1) + (Sk - Sq); // i + Sk - Sq
        var colPos = arange(Sk, dtype: ScalarType.Int64, device: device).view(1, Sk);
        Tensor? masked = null;
        if (left >= 0) masked = colPos.lt(rowPos - left);
        if (right >= 0) masked = masked is null ? colPos.gt(rowPos + right) : masked.logical_or(colPos.gt(rowPos + right));
        return masked;
    }

    /// <summary>
    /// The attention kernels' dropout mask: uint8 (batch, nheads, Sq, Sk), 1 where query i sees key j (see
    /// <see cref="Masked"/>) and the kernels' Philox-4x32-10 stream keeps the element, 0 elsewhere (flashattn.h,
    /// FlashAttn_flash_fwd: 16-bit half j % 2 of word 2 ((i / 8) % 2) + (j / 8) % 2 of philox(seed, {4 (j / 16) +
    /// (j % 8) / 2, 8 (i / 16) + i % 8, b * nheads + h, 0}) below floor((1 - p) 2^16)), so a seed gives the same mask
    /// on every device. Computed with
    /// tensor ops on <paramref name="device"/> (no host work or copy on a GPU). dropout_p 0 keeps every visible element.
    /// <paramref name="firstBatch"/> is the index of the first sequence (varlen sequences are masked one at a time).
    /// </summary>
    internal static Tensor DropoutMask(long batch, long nheads, long Sq, long Sk, double dropout_p, ulong seed, long left, long right,
        Device device, long firstBatch = 0)
    {
        using var scope = NewDisposeScope();
        var mask = dropout_p > 0 && batch * nheads * Sq * Sk > 0
            ? cat(Chunks(batch * nheads, Sq, Sk).Select(c => KeptWords(c.start, c.count, firstBatch * nheads, Sq, Sk, dropout_p, seed, device))
                      .ToList(), 0).view(batch, nheads, Sq, Sk)
            : ones(new[] { batch, nheads, Sq, Sk }, dtype: ScalarType.Byte, device: device);
        var masked = Masked(Sq, Sk, left, right, device);
        if (masked is not null) mask = mask.masked_fill(masked.view(1, 1, Sq, Sk), 0);
        return mask.MoveToOuterDisposeScope();
    }

    // (batch * nheads) split so that each part's Philox state (int64 words, four per call of eight elements) stays near
    // 2^21 words.
    private static IEnumerable<(long start, long count)> Chunks(long bh, long Sq, long Sk)
    {
        long per = Math.Max(1, (1L << 22) / Math.Max(1, (Sq + 15) / 16 * 16 * ((Sk + 15) / 16 * 16)));
        for (long start = 0; start < bh; start += per) yield return (start, Math.Min(per, bh - start));
    }

    // uint8 (count, Sq, Sk): the kept elements of (b * nheads + h) = word2Base + start ... + count - 1.
    private static Tensor KeptWords(long start, long count, long word2Base, long Sq, long Sk, double dropout_p, ulong seed, Device device)
    {
        using var scope = NewDisposeScope();
        // the kernels compare against the float32 dropout_p they receive
        long threshold = (long)Math.Min((1.0 - (float)dropout_p) * 65536.0, 65536.0);
        // One call per {i, i + 8} x {j, j + 1, j + 8, j + 9} (i % 16 < 8; j even, j % 16 < 8): counters
        // c0 = 4 (j / 16) + (j % 8) / 2 over the key groups, c1 = 8 (i / 16) + i % 8 over the query pairs, c2 = the
        // (batch, head) index.
        long bi = (Sq + 15) / 16, bj = (Sk + 15) / 16;
        var c0 = arange(4 * bj, dtype: ScalarType.Int64, device: device).view(1, 1, -1);
        var c1 = arange(8 * bi, dtype: ScalarType.Int64, device: device).view(1, -1, 1);
        var c2 = arange(word2Base + start, word2Base + start + count, dtype: ScalarType.Int64, device: device).view(-1, 1, 1);
        var (w0, w1, w2, w3) = Philox((uint)seed, (uint)(seed >> 32), c0, c1, c2, zeros(1, 1, 1, dtype: ScalarType.Int64, device: device));
        // (count, i / 16, i % 8, j / 16, (j % 8) / 2, di, dj, j % 2): half j % 2 of word 2 di + dj decides
        // (i + 8 di, j + 8 dj)
        var words = stack(new[] { w0, w1, w2, w3 }, -1);
        var halves = stack(new[] { words.bitwise_and(0xFFFF), words.bitwise_right_shift(16) }, -1);
        var keep = halves.lt(threshold).view(count, bi, 8, bj, 4, 2, 2, 2)
            .permute(0, 1, 5, 2, 3, 6, 4, 7).reshape(count, 16 * bi, 16 * bj);
        return keep[.., ..(int)Sq, ..(int)Sk].to(ScalarType.Byte).MoveToOuterDisposeScope();
    }

    /// <summary>Philox-4x32-10 (Salmon et al., SC'11), as the kernels' philox4x32_10 (common/philox.cuh), elementwise
    /// over int64 tensors holding 32-bit counters (broadcast together): the four 32-bit words, as int64.</summary>
    internal static (Tensor, Tensor, Tensor, Tensor) Philox(uint key0, uint key1, Tensor c0, Tensor c1, Tensor c2, Tensor c3)
    {
        for (int round = 0; round < 10; round++)
        {
            // each round's temporaries freed with it, the previous round's state once replaced (not the caller's)
            using var scope = NewDisposeScope();
            var (hi0, lo0) = MulHiLo(0xD2511F53L, c0);
            var (hi1, lo1) = MulHiLo(0xCD9E8D57L, c2);
            var next = new[] { hi1.bitwise_xor(c1).bitwise_xor_((long)key0), lo1, hi0.bitwise_xor(c3).bitwise_xor_((long)key1), lo0 };
            foreach (var t in next) t.MoveToOuterDisposeScope();
            if (round > 0)
                foreach (var t in new[] { c0, c1, c2, c3 }) t.Dispose();
            (c0, c1, c2, c3) = (next[0], next[1], next[2], next[3]);
            key0 += 0x9E3779B9u;
            key1 += 0xBB67AE85u;
        }
        return (c0, c1, c2, c3);
    }

    // The high and low 32 bits of m * c (m, c below 2^32) in int64 without overflow: c split into 16-bit halves,
    // m * c = (m * c_hi) 2^16 + m * c_lo with both products below 2^48.
    private static (Tensor hi, Tensor lo) MulHiLo(long m, Tensor c)
    {
        var a = c.bitwise_right_shift(16).mul_(m);
        var b = c.bitwise_and(0xFFFF).mul_(m);
        var hi = b.bitwise_right_shift(16).add_(a).bitwise_right_shift_(16);
        var lo = a.bitwise_and_(0xFFFF).bitwise_left_shift_(16).add_(b).bitwise_and_(0xFFFFFFFFL);
        return (hi, lo);
    }
}
