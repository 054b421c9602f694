using NUnit.Framework;
using TorchSharp;
using static TorchSharp.torch;

namespace FlashAttn.Tests;

/// <summary>The reference path's Philox-4x32-10 and attention dropout mask: the published known-answer vectors, and the
/// kernels' stream as flashattn.h defines it, element by element with a scalar Philox of the test's own.</summary>
public sealed class PhiloxTests
{
    [Test]
    public void PhiloxMatchesTheKnownAnswers()
    {
        // Random123's kat_vectors for philox4x32_10 (the generator of the kernels' dropout, common/philox.cuh); the
        // counters of the three vectors side by side, so the tensor rounds are checked elementwise too
        uint[] Words(Tensor t) => t.data<long>().ToArray().Select(w => (uint)w).ToArray();
        Tensor C(params uint[] c) => tensor(c.Select(x => (long)x).ToArray());
        foreach (var (key0, key1, expected) in new[]
                 {
                     (0u, 0u, new[] { 0x6627e8d5u, 0xe169c58du, 0xbc57ac4cu, 0x9b00dbd8u }),
                     (0xffffffffu, 0xffffffffu, new[] { 0x408f276du, 0x41c83b0eu, 0xa20bc7c6u, 0x6d5451fdu }),
                     (0xa4093822u, 0x299f31d0u, new[] { 0xd16cfe09u, 0x94fdccebu, 0x5001e420u, 0x24126ea1u }),
                 })
        {
            var (w0, w1, w2, w3) = Reference.Philox(key0, key1, C(0, 0xffffffffu, 0x243f6a88u), C(0, 0xffffffffu, 0x85a308d3u),
                                                    C(0, 0xffffffffu, 0x13198a2eu), C(0, 0xffffffffu, 0x03707344u));
            int at = key0 == 0 ? 0 : key0 == 0xffffffffu ? 1 : 2;
            Assert.That(new[] { Words(w0)[at], Words(w1)[at], Words(w2)[at], Words(w3)[at] }, Is.EqualTo(expected));
            uint[][] counters = { new[] { 0u, 0u, 0u, 0u }, new[] { 0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu },
                                  new[] { 0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u } };
            var c = counters[at];
            Assert.That(Philox(key0, key1, c[0], c[1], c[2], c[3]), Is.EqualTo(expected), "the test's scalar Philox");
        }
    }

    // Scalar Philox-4x32-10 (the same published algorithm, written independently of Reference.Philox's tensor rounds);
    // NormCudaTests checks the norms' stream with it too.
    internal static uint[] Philox(uint k0, uint k1, uint c0, uint c1, uint c2, uint c3)
    {
        for (int round = 0; round < 10; round++)
        {
            ulong p0 = 0xD2511F53UL * c0, p1 = 0xCD9E8D57UL * c2;
            (c0, c1, c2, c3) = ((uint)(p1 >> 32) ^ c1 ^ k0, (uint)p1, (uint)(p0 >> 32) ^ c3 ^ k1, (uint)p0);
            k0 += 0x9E3779B9u;
            k1 += 0xBB67AE85u;
        }
        return new[] { c0, c1, c2, c3 };
    }

    [TestCase(2, 3, 37, 45, 0.3, -1L, -1L, 0L)]
    [TestCase(1, 2, 19, 70, 0.17, 7L, 3L, 5L)]
    [TestCase(3, 1, 64, 33, 0.5, -1L, 0L, 0L)]
    [TestCase(1, 1, 1, 40, 0.5, -1L, -1L, 0L)]
    public void AttentionDropoutMaskIsTheKernelsStream(int batch, int heads, int sq, int sk, double p, long left, long right,
        long firstBatch)
    {
        const ulong seed = 0x0123456789ABCDEFUL;
        var mask = Reference.DropoutMask(batch, heads, sq, sk, p, seed, left, right, CPU, firstBatch);
        Assert.That(mask.dtype, Is.EqualTo(ScalarType.Byte));
        Assert.That(mask.shape, Is.EqualTo(new long[] { batch, heads, sq, sk }));
        var got = mask.data<byte>().ToArray();
        // flashattn.h, FlashAttn_flash_fwd: element (b, h, i, j) takes 16-bit half j % 2 of word 2 ((i / 8) % 2) + (j / 8) % 2
        // of philox(seed, {4 (j / 16) + (j % 8) / 2, 8 (i / 16) + i % 8, b * nheads + h, 0}), kept below floor((1 - p) 2^16)
        uint threshold = (uint)Math.Min((1.0 - (float)p) * 65536.0, 65536.0);
        int kept = 0, wrong = 0;
        for (int b = 0; b < batch; b++)
            for (int h = 0; h < heads; h++)
                for (int i = 0; i < sq; i++)
                    for (int j = 0; j < sk; j++)
                    {
                        long diag = i + sk - sq;
                        bool visible = (left < 0 || j >= diag - left) && (right < 0 || j <= diag + right);
                        var w = Philox(unchecked((uint)seed), (uint)(seed >> 32), (uint)(4 * (j / 16) + j % 8 / 2), (uint)(8 * (i / 16) + i % 8),
                                       (uint)((firstBatch + b) * heads + h), 0);
                        uint half = (w[2 * (i / 8 % 2) + j / 8 % 2] >> (16 * (j % 2))) & 0xFFFF;
                        byte want = (byte)(visible && half < threshold ? 1 : 0);
                        if (got[((b * heads + h) * sq + i) * sk + j] != want) wrong++;
                        kept += want;
                    }
        Assert.That(wrong, Is.EqualTo(0), $"elements that differ from the stream's definition ({kept} kept)");
        // the stream keeps about 1 - p of the visible elements (a check that it is not all 0 or all 1)
        Assert.That(kept, Is.GreaterThan(0));
    }
}
