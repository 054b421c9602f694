using NUnit.Framework;
using TorchSharp;
using static TorchSharp.torch;

namespace FlashAttn.Tests;

/// <summary>flash_attn_with_kvcache on CPU: new keys land in the cache in place at cache_seqlens,
/// rotary at the right positions, attention over each sequence's own prefix.</summary>
public sealed class KvCacheTests
{
    [SetUp]
    public void Seed() => manual_seed(TestContext.CurrentContext.Random.Next());

    // sameLength: every sequence at one length, the batched decode (rotated at a scalar offset), else lengths 3 and 6
    [TestCase(true, true, false), TestCase(false, true, false), TestCase(true, false, false), TestCase(true, true, true),
     TestCase(false, true, true)]
    public void AppendsThenAttendsLikeTheConcatenatedSequence(bool causal, bool rotary, bool sameLength)
    {
        long[] lens = sameLength ? new long[] { 5, 5 } : new long[] { 3, 6 };
        var kCache = randn(2, 12, 2, 16, dtype: ScalarType.Float64);
        var vCache = randn(2, 12, 2, 16, dtype: ScalarType.Float64);
        var (k0, v0) = (kCache.clone(), vCache.clone());
        var q = randn(2, 2, 4, 16, dtype: ScalarType.Float64);
        var k = randn(2, 2, 2, 16, dtype: ScalarType.Float64);
        var v = randn(2, 2, 2, 16, dtype: ScalarType.Float64);
        var (cos, sin) = RotaryTests.CosSin(12, 8, ScalarType.Float64);
        var r = flash_attn.flash_attn_with_kvcache(q, kCache, vCache, tensor(lens), k, v,
            rotary ? cos : null, rotary ? sin : null, causal: causal, rotary_interleaved: false);

        for (int b = 0; b < 2; b++)
        {
            long n = lens[b];
            var kb = rotary ? Reference.rotary(k[b..(b + 1)], cos, sin, seqlen_offset: n) : k[b..(b + 1)];
            var qb = rotary
                ? (causal ? Reference.rotary(q[b..(b + 1)], cos, sin, seqlen_offset: n)
                          : Reference.rotary(q[b..(b + 1)].transpose(0, 1), cos, sin, seqlen_offset: n).transpose(0, 1))
                : q[b..(b + 1)];
            var keys = cat(new[] { k0[b..(b + 1), ..(int)n], kb }, 1);
            var values = cat(new[] { v0[b..(b + 1), ..(int)n], v[b..(b + 1)] }, 1);
            var (expected, _) = Reference.attention(qb, keys, values, causal: causal);
            Assert.That(Tolerance.MaxAbsDiff(r.output[b..(b + 1)], expected), Is.LessThan(1e-10), $"sequence {b}");
            Assert.That(Tolerance.MaxAbsDiff(kCache[b, (int)n..(int)(n + 2)], kb[0]), Is.EqualTo(0.0), "new keys written in place");
            Assert.That(Tolerance.MaxAbsDiff(vCache[b, (int)n..(int)(n + 2)], v[b]), Is.EqualTo(0.0), "new values written in place");
            Assert.That(Tolerance.MaxAbsDiff(kCache[b, ..(int)n], k0[b, ..(int)n]), Is.EqualTo(0.0), "earlier positions untouched");
            Assert.That(Tolerance.MaxAbsDiff(kCache[b, (int)(n + 2)..], k0[b, (int)(n + 2)..]), Is.EqualTo(0.0), "later positions untouched");
        }
    }

    [Test]
    public void BadArgumentsNameTheArgument()
    {
        var q = randn(2, 1, 4, 16);
        var cache = randn(2, 8, 2, 16);
        void Expect(string param, TestDelegate call) => Assert.That(Assert.Throws<ArgumentException>(call)!.ParamName, Is.EqualTo(param));
        Expect("cache_seqlens", () => flash_attn.flash_attn_with_kvcache(q, cache, cache.clone(), tensor(new[] { 1.0f, 2.0f })));
        Expect("cache_seqlens", () => flash_attn.flash_attn_with_kvcache(q, cache, cache.clone(), tensor(new[] { 7L, 8L }), randn(2, 2, 2, 16), randn(2, 2, 2, 16)));
        Expect("v_cache", () => flash_attn.flash_attn_with_kvcache(q, cache, randn(2, 7, 2, 16), tensor(new[] { 1L, 1L })));
        Expect("v", () => flash_attn.flash_attn_with_kvcache(q, cache, cache.clone(), tensor(new[] { 1L, 1L }), randn(2, 1, 2, 16)));
        Expect("k", () => flash_attn.flash_attn_with_kvcache(q, cache, cache.clone(), tensor(new[] { 1L, 1L }), randn(2, 1, 3, 16), randn(2, 1, 3, 16)));
    }

    [Test, Category(Gpu.Category)]
    public void CudaMatchesFloat64WithTheRule()
    {
        var dev = Gpu.Require();
        var lens = tensor(new[] { 100, 517 }, dtype: ScalarType.Int32, device: dev);
        var kc = randn(2, 600, 2, 128, dtype: ScalarType.BFloat16, device: dev);
        var vc = randn(2, 600, 2, 128, dtype: ScalarType.BFloat16, device: dev);
        var q = randn(2, 3, 8, 128, dtype: ScalarType.BFloat16, device: dev);
        var k = randn(2, 3, 2, 128, dtype: ScalarType.BFloat16, device: dev);
        var v = randn(2, 3, 2, 128, dtype: ScalarType.BFloat16, device: dev);
        var (cos, sin) = RotaryTests.CosSin(600, 64, ScalarType.Float32, dev);
        FlashAttnResult Run(ScalarType t, bool reference)
        {
            Backend.ForceReference = reference;
            try
            {
                return flash_attn.flash_attn_with_kvcache(q.to(t), kc.to(t), vc.to(t), lens, k.to(t), v.to(t), cos.to(t == ScalarType.Float64 ? t : ScalarType.Float32),
                    sin.to(t == ScalarType.Float64 ? t : ScalarType.Float32), causal: true);
            }
            finally { Backend.ForceReference = false; }
        }
        var got = Run(ScalarType.BFloat16, false);
        var exact = Run(ScalarType.Float64, true);
        var low = Run(ScalarType.BFloat16, true);
        Tolerance.AssertClose(got.output, low.output, exact.output, "kvcache out");
    }
}
