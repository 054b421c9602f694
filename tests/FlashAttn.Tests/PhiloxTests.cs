using System.Security.Cryptography;
using NUnit.Framework;
using TorchSharp;
using static TorchSharp.torch;

namespace FlashAttn.Tests;

/// <summary>The reference path's Philox-4x32-10 and attention dropout mask: the published known-answer vectors, and the
/// kernels' stream byte for byte (digests of the masks the host implementation produced before the mask moved to tensor
/// ops on the tensor's device).</summary>
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
        }
    }

    // Digests of the masks the host implementation (one Philox call per quad in a loop) produced before this one.
    [TestCase(2, 3, 37, 45, 0.3, -1L, -1L, 0L, "6498A9B799A10E6CF8BF63394A80519F6B3C46E0E8129BF5DF71BA418BA2FEA0")]
    [TestCase(1, 2, 19, 70, 0.17, 7L, 3L, 5L, "AB4CC230E8232C1AF6239DAE2DFB9470D45733F7F7678F38F3A3F531FA91F86A")]
    [TestCase(3, 1, 64, 33, 0.5, -1L, 0L, 0L, "AE0FA110BE5CF2F234B62FDE2A02C3417E5317102C43450EA511246E9AFFB2D8")]
    public void AttentionDropoutMaskIsTheKernelsStream(int batch, int heads, int sq, int sk, double p, long left, long right,
        long firstBatch, string sha256)
    {
        var mask = Reference.DropoutMask(batch, heads, sq, sk, p, 0x0123456789ABCDEFUL, left, right, CPU, firstBatch);
        Assert.That(mask.dtype, Is.EqualTo(ScalarType.Byte));
        Assert.That(mask.shape, Is.EqualTo(new long[] { batch, heads, sq, sk }));
        var digest = Convert.ToHexString(SHA256.HashData(mask.data<byte>().ToArray()));
        Assert.That(digest, Is.EqualTo(sha256));
    }
}
