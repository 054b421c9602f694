using System.Runtime.CompilerServices;
using FlashAttn.Models;
using NUnit.Framework;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace FlashAttn.Tests;

/// <summary>
/// The bad-input catalogue: every public function and module of FlashAttn.TorchSharp and the models of
/// FlashAttn.Models, each with wrong dtypes, wrong ranks and shapes, a non-contiguous last dimension, empty tensors
/// (batch 0, sequence 0), NaN and Inf values, out-of-range indices, labels, offsets and positions, and on the GPU
/// arguments on two devices. A case expects an ArgumentException naming the argument or the documented behaviour (NaN
/// and Inf propagate to the outputs; empty inputs give empty outputs; a value only the GPU sees gives NaN rows and an
/// error raised by check_errors), and then a correct call of the same API must still work. The CPU runs every case but
/// the two-device ones (<see cref="BadInputCatalogueTests"/>); <see cref="BadInputCatalogueCudaTests"/> runs them all on
/// the GPU.
/// </summary>
internal static class BadInputCatalogue
{
    internal abstract record Outcome;
    /// <summary>An ArgumentException whose ParamName is Param.</summary>
    internal sealed record Throws(string Param) : Outcome;
    /// <summary>Returns, with a NaN or infinite value among the outputs.</summary>
    internal sealed record NonFinite : Outcome;
    /// <summary>Returns a first output of this shape.</summary>
    internal sealed record Empty(long[] Shape) : Outcome;
    /// <summary>Returns finite outputs (an input the op takes, e.g. strides it copies).</summary>
    internal sealed record Works : Outcome;
    /// <summary>A value only the device reads: on the CPU an ArgumentException naming CpuParam at once; on the GPU NaN
    /// among the outputs and an ArgumentException naming GpuParam from check_errors (or from a later op of the same
    /// call, when the record is already written by then).</summary>
    internal sealed record Deferred(string CpuParam, string GpuParam) : Outcome;

    internal sealed record Case(string Kind, Func<Device, object?> Call, Outcome Outcome, bool GpuOnly = false);
    internal sealed record Api(string Name, Func<Device, object?> Good, Case[] Cases);

    private static readonly Outcome Nan = new NonFinite(), Fine = new Works();
    private static Outcome T(string param) => new Throws(param);
    private static Outcome E(params long[] shape) => new Empty(shape);
    private static Outcome D(string param, string? gpuParam = null) => new Deferred(param, gpuParam ?? param);

    // ---- inputs: the kernels' bf16 on the GPU, float32 on the CPU ----

    private static ScalarType Fp(Device d) => d.type == DeviceType.CUDA ? ScalarType.BFloat16 : ScalarType.Float32;
    private static Tensor R(Device d, params long[] shape) => randn(shape, dtype: Fp(d), device: d);
    private static Tensor I32(Tensor t) => t.to(ScalarType.Int32);
    private static Tensor F64(Tensor t) => t.to(ScalarType.Float64);
    /// <summary>shape with a last-dimension stride of 2.</summary>
    private static Tensor Strided(Device d, params long[] shape) =>
        R(d, shape[..^1].Append(2 * shape[^1]).ToArray())[TensorIndex.Ellipsis, TensorIndex.Slice(null, null, 2)];
    /// <summary>A copy of t with value at index (default: the first element).</summary>
    private static Tensor Poison(Tensor t, double value, params long[] index)
    {
        var c = t.clone();
        var at = index.Length == 0 ? new long[t.dim()] : index;
        c[at.Select(i => TensorIndex.Single(i)).ToArray()].fill_(value);
        return c;
    }
    private static Tensor Cu(Device d, params int[] v) => tensor(v, dtype: ScalarType.Int32, device: d);
    private static Tensor Ids(Device d, params long[] shape) => randint(0, 256, shape, device: d);
    private const double Inf = double.PositiveInfinity;

    // ---- the catalogue ----

    internal static readonly Api[] Apis = Build().ToArray();

    private static IEnumerable<Api> Build()
    {
        // attention: q (2, 5, 2, 16), k/v (2, 7, 2, 16)
        Tensor Q(Device d, long b = 2, long s = 5) => R(d, b, s, 2, 16);
        Tensor K(Device d, long b = 2, long s = 7) => R(d, b, s, 2, 16);
        Case[] Attention(Func<Tensor, Tensor, Tensor, Tensor?, object> f) => new[]
        {
            new Case("dtype", d => f(I32(Q(d)), K(d), K(d), null), T("q")),
            new Case("dtype_k", d => f(Q(d), F64(K(d)), F64(K(d)), null), T("k")),
            new Case("rank", d => f(R(d, 5, 2, 16), K(d), K(d), null), T("q")),
            new Case("shape", d => f(Q(d), K(d), R(d, 2, 6, 2, 16), null), T("v")),
            new Case("heads", d => f(Q(d), R(d, 2, 7, 3, 16), R(d, 2, 7, 3, 16), null), T("k")),
            new Case("noncontiguous", d => f(Strided(d, 2, 5, 2, 16), K(d), K(d), null), T("q")),
            new Case("batch0", d => f(Q(d, 0), K(d, 0), K(d, 0), null), E(0, 5, 2, 16)),
            new Case("seq0", d => f(Q(d, 2, 0), K(d, 2, 0), K(d, 2, 0), null), E(2, 0, 2, 16)),
            new Case("nan", d => f(Poison(Q(d), double.NaN), K(d), K(d), null), Nan),
            new Case("inf", d => f(Q(d), K(d), Poison(K(d), Inf), null), Nan),
            new Case("alibi", d => f(Q(d), K(d), K(d), ones(3, device: d)), T("alibi_slopes")),
            new Case("device", d => f(Q(d), K(d).cpu(), K(d).cpu(), null), T("k"), GpuOnly: true),
            new Case("device_alibi", d => f(Q(d), K(d), K(d), ones(2)), T("alibi_slopes"), GpuOnly: true),
        };
        yield return new Api("flash_attn_func", d => flash_attn.flash_attn_func(Q(d), K(d), K(d), causal: true),
            Attention((q, k, v, a) => flash_attn.flash_attn_func(q, k, v, alibi_slopes: a)));
        yield return new Api("flash_attn_func_with_lse", d => flash_attn.flash_attn_func_with_lse(Q(d), K(d), K(d), causal: true),
            Attention((q, k, v, a) => flash_attn.flash_attn_func_with_lse(q, k, v, alibi_slopes: a)));

        Tensor Qkv(Device d, long b = 2, long s = 5) => R(d, b, s, 3, 2, 16);
        Case[] QkvPacked(Func<Tensor, Tensor?, object> f) => new[]
        {
            new Case("dtype", d => f(I32(Qkv(d)), null), T("qkv")),
            new Case("rank", d => f(R(d, 2, 5, 3, 32), null), T("qkv")),
            new Case("noncontiguous", d => f(Strided(d, 2, 5, 3, 2, 16), null), T("qkv")),
            new Case("batch0", d => f(Qkv(d, 0), null), E(0, 5, 2, 16)),
            new Case("seq0", d => f(Qkv(d, 2, 0), null), E(2, 0, 2, 16)),
            new Case("nan", d => f(Poison(Qkv(d), double.NaN), null), Nan),
            new Case("inf", d => f(Poison(Qkv(d), Inf, 0, 0, 2, 0, 0), null), Nan),
            new Case("alibi", d => f(Qkv(d), ones(3, device: d)), T("alibi_slopes")),
            new Case("device_alibi", d => f(Qkv(d), ones(2)), T("alibi_slopes"), GpuOnly: true),
        };
        yield return new Api("flash_attn_qkvpacked_func", d => flash_attn.flash_attn_qkvpacked_func(Qkv(d), causal: true),
            QkvPacked((qkv, a) => flash_attn.flash_attn_qkvpacked_func(qkv, alibi_slopes: a)));

        Tensor Kv(Device d, long b = 2, long s = 7) => R(d, b, s, 2, 2, 16);
        Case[] KvPacked(Func<Tensor, Tensor, object> f) => new[]
        {
            new Case("dtype", d => f(Q(d), F64(Kv(d))), T("kv")),
            new Case("rank", d => f(Q(d), R(d, 2, 7, 2, 32)), T("kv")),
            new Case("heads", d => f(Q(d), R(d, 2, 7, 2, 3, 16)), T("kv")),
            new Case("noncontiguous", d => f(Q(d), Strided(d, 2, 7, 2, 2, 16)), T("kv")),
            new Case("batch0", d => f(Q(d, 0), Kv(d, 0)), E(0, 5, 2, 16)),
            new Case("seq0", d => f(Q(d, 2, 0), Kv(d, 2, 0)), E(2, 0, 2, 16)),
            new Case("nan", d => f(Q(d), Poison(Kv(d), double.NaN)), Nan),
            new Case("inf", d => f(Q(d), Poison(Kv(d), Inf, 0, 0, 1, 0, 0)), Nan),
            new Case("device", d => f(Q(d), Kv(d).cpu()), T("kv"), GpuOnly: true),
        };
        yield return new Api("flash_attn_kvpacked_func", d => flash_attn.flash_attn_kvpacked_func(Q(d), Kv(d), causal: true),
            KvPacked((q, kv) => flash_attn.flash_attn_kvpacked_func(q, kv)));

        // varlen: q (10, 2, 16) in sequences of 4 and 6, k/v (12, 2, 16) in 5 and 7
        Tensor Vq(Device d, long n = 10) => R(d, n, 2, 16);
        Tensor Vk(Device d, long n = 12) => R(d, n, 2, 16);
        Case[] Varlen(Func<Tensor, Tensor, Tensor, Tensor, Tensor, long, long, object> f) => new[]
        {
            new Case("dtype", d => f(I32(Vq(d)), Vk(d), Vk(d), Cu(d, 0, 4, 10), Cu(d, 0, 5, 12), 6, 7), T("q")),
            new Case("rank", d => f(R(d, 1, 10, 2, 16), Vk(d), Vk(d), Cu(d, 0, 4, 10), Cu(d, 0, 5, 12), 6, 7), T("q")),
            new Case("noncontiguous", d => f(Strided(d, 10, 2, 16), Vk(d), Vk(d), Cu(d, 0, 4, 10), Cu(d, 0, 5, 12), 6, 7), T("q")),
            new Case("batch0", d => f(Vq(d, 0), Vk(d, 0), Vk(d, 0), Cu(d, 0), Cu(d, 0), 1, 1), E(0, 2, 16)),
            new Case("seq0", d => f(Vq(d, 0), Vk(d, 0), Vk(d, 0), Cu(d, 0, 0, 0), Cu(d, 0, 0, 0), 1, 1), E(0, 2, 16)),
            new Case("nan", d => f(Poison(Vq(d), double.NaN), Vk(d), Vk(d), Cu(d, 0, 4, 10), Cu(d, 0, 5, 12), 6, 7), Nan),
            new Case("inf", d => f(Vq(d), Vk(d), Poison(Vk(d), Inf), Cu(d, 0, 4, 10), Cu(d, 0, 5, 12), 6, 7), Nan),
            new Case("offsets", d => f(Vq(d), Vk(d), Vk(d), Cu(d, 0, 6, 3, 10), Cu(d, 0, 5, 3, 12), 7, 7), T("cu_seqlens_q")),
            new Case("offsets_end", d => f(Vq(d), Vk(d), Vk(d), Cu(d, 0, 4, 10), Cu(d, 0, 5, 11), 6, 7), T("cu_seqlens_k")),
            new Case("max_seqlen", d => f(Vq(d), Vk(d), Vk(d), Cu(d, 0, 4, 10), Cu(d, 0, 5, 12), 3, 7), T("max_seqlen_q")),
            new Case("device", d => f(Vq(d), Vk(d), Vk(d), Cu(d, 0, 4, 10), Cu(CPU, 0, 5, 12), 6, 7), T("cu_seqlens_k"), GpuOnly: true),
        };
        yield return new Api("flash_attn_varlen_func",
            d => flash_attn.flash_attn_varlen_func(Vq(d), Vk(d), Vk(d), Cu(d, 0, 4, 10), Cu(d, 0, 5, 12), 6, 7, causal: true),
            Varlen((q, k, v, cq, ck, mq, mk) => flash_attn.flash_attn_varlen_func(q, k, v, cq, ck, mq, mk)));
        yield return new Api("flash_attn_varlen_func_with_lse",
            d => flash_attn.flash_attn_varlen_func_with_lse(Vq(d), Vk(d), Vk(d), Cu(d, 0, 4, 10), Cu(d, 0, 5, 12), 6, 7, causal: true),
            Varlen((q, k, v, cq, ck, mq, mk) => flash_attn.flash_attn_varlen_func_with_lse(q, k, v, cq, ck, mq, mk)));

        Tensor Vqkv(Device d, long n = 10) => R(d, n, 3, 2, 16);
        Case[] VarlenQkv(Func<Tensor, Tensor, long, object> f) => new[]
        {
            new Case("dtype", d => f(I32(Vqkv(d)), Cu(d, 0, 4, 10), 6), T("qkv")),
            new Case("rank", d => f(R(d, 10, 3, 32), Cu(d, 0, 4, 10), 6), T("qkv")),
            new Case("noncontiguous", d => f(Strided(d, 10, 3, 2, 16), Cu(d, 0, 4, 10), 6), T("qkv")),
            new Case("batch0", d => f(Vqkv(d, 0), Cu(d, 0), 1), E(0, 2, 16)),
            new Case("seq0", d => f(Vqkv(d, 0), Cu(d, 0, 0, 0), 1), E(0, 2, 16)),
            new Case("nan", d => f(Poison(Vqkv(d), double.NaN), Cu(d, 0, 4, 10), 6), Nan),
            new Case("inf", d => f(Poison(Vqkv(d), Inf, 0, 2, 0, 0), Cu(d, 0, 4, 10), 6), Nan),
            new Case("offsets", d => f(Vqkv(d), Cu(d, 0, 6, 3, 10), 7), T("cu_seqlens")),
            new Case("max_seqlen", d => f(Vqkv(d), Cu(d, 0, 4, 10), 5), T("max_seqlen")),
            new Case("device", d => f(Vqkv(d), Cu(CPU, 0, 4, 10), 6), T("cu_seqlens"), GpuOnly: true),
        };
        yield return new Api("flash_attn_varlen_qkvpacked_func",
            d => flash_attn.flash_attn_varlen_qkvpacked_func(Vqkv(d), Cu(d, 0, 4, 10), 6, causal: true),
            VarlenQkv((qkv, cu, m) => flash_attn.flash_attn_varlen_qkvpacked_func(qkv, cu, m)));

        Tensor Vkv(Device d, long n = 12) => R(d, n, 2, 2, 16);
        yield return new Api("flash_attn_varlen_kvpacked_func",
            d => flash_attn.flash_attn_varlen_kvpacked_func(Vq(d), Vkv(d), Cu(d, 0, 4, 10), Cu(d, 0, 5, 12), 6, 7, causal: true),
            new[]
            {
                new Case("dtype", d => flash_attn.flash_attn_varlen_kvpacked_func(Vq(d), F64(Vkv(d)), Cu(d, 0, 4, 10), Cu(d, 0, 5, 12), 6, 7), T("kv")),
                new Case("rank", d => flash_attn.flash_attn_varlen_kvpacked_func(Vq(d), R(d, 12, 2, 32), Cu(d, 0, 4, 10), Cu(d, 0, 5, 12), 6, 7), T("kv")),
                new Case("noncontiguous", d => flash_attn.flash_attn_varlen_kvpacked_func(Vq(d), Strided(d, 12, 2, 2, 16), Cu(d, 0, 4, 10), Cu(d, 0, 5, 12), 6, 7), T("kv")),
                new Case("batch0", d => flash_attn.flash_attn_varlen_kvpacked_func(Vq(d, 0), Vkv(d, 0), Cu(d, 0), Cu(d, 0), 1, 1), E(0, 2, 16)),
                new Case("seq0", d => flash_attn.flash_attn_varlen_kvpacked_func(Vq(d, 0), Vkv(d, 0), Cu(d, 0, 0), Cu(d, 0, 0), 1, 1), E(0, 2, 16)),
                new Case("nan", d => flash_attn.flash_attn_varlen_kvpacked_func(Vq(d), Poison(Vkv(d), double.NaN), Cu(d, 0, 4, 10), Cu(d, 0, 5, 12), 6, 7), Nan),
                new Case("inf", d => flash_attn.flash_attn_varlen_kvpacked_func(Vq(d), Poison(Vkv(d), Inf, 0, 1, 0, 0), Cu(d, 0, 4, 10), Cu(d, 0, 5, 12), 6, 7), Nan),
                new Case("offsets", d => flash_attn.flash_attn_varlen_kvpacked_func(Vq(d), Vkv(d), Cu(d, 1, 4, 10), Cu(d, 0, 5, 12), 6, 7), T("cu_seqlens_q")),
                new Case("device", d => flash_attn.flash_attn_varlen_kvpacked_func(Vq(d), Vkv(d).cpu(), Cu(d, 0, 4, 10), Cu(d, 0, 5, 12), 6, 7), T("kv"), GpuOnly: true),
            });

        // decoding: q (2, 1, 2, 16) against caches (2, 8, 2, 16) holding 3 and 4 positions, one new k/v, rotary tables of 8
        Tensor Lens(Device d, params int[] v) => tensor(v, dtype: ScalarType.Int32, device: d);
        (Tensor cos, Tensor sin) Tables(Device d, long n = 8) => RotaryTests.CosSin(n, 8, ScalarType.Float32, d);
        object KvCache(Device d, Tensor? q = null, Tensor? kCache = null, Tensor? lens = null, Tensor? k = null, Tensor? v = null,
            long tables = 8, Tensor? cos = null)
        {
            var (c, s) = Tables(d, tables);
            return flash_attn.flash_attn_with_kvcache(q ?? R(d, 2, 1, 2, 16), kCache ?? R(d, 2, 8, 2, 16), R(d, 2, 8, 2, 16),
                lens ?? Lens(d, 3, 4), k ?? R(d, 2, 1, 2, 16), v ?? R(d, 2, 1, 2, 16), cos ?? c, s, causal: true);
        }
        yield return new Api("flash_attn_with_kvcache", d => KvCache(d), new[]
        {
            new Case("dtype", d => KvCache(d, q: I32(R(d, 2, 1, 2, 16))), T("q")),
            new Case("dtype_cache", d => KvCache(d, kCache: F64(R(d, 2, 8, 2, 16))), T("k_cache")),
            new Case("rank", d => KvCache(d, kCache: R(d, 2, 8, 32)), T("k_cache")),
            new Case("noncontiguous", d => KvCache(d, q: Strided(d, 2, 1, 2, 16)), T("q")),
            new Case("noncontiguous_cache", d => KvCache(d, kCache: Strided(d, 2, 8, 2, 16)), T("k_cache")),
            new Case("batch0", d => flash_attn.flash_attn_with_kvcache(R(d, 0, 1, 2, 16), R(d, 0, 8, 2, 16), R(d, 0, 8, 2, 16), Lens(d)), E(0, 1, 2, 16)),
            new Case("seq0", d => flash_attn.flash_attn_with_kvcache(R(d, 2, 0, 2, 16), R(d, 2, 8, 2, 16), R(d, 2, 8, 2, 16), Lens(d, 3, 4)), E(2, 0, 2, 16)),
            new Case("nan", d => KvCache(d, q: Poison(R(d, 2, 1, 2, 16), double.NaN)), Nan),
            new Case("inf", d => KvCache(d, v: Poison(R(d, 2, 1, 2, 16), Inf)), Nan),
            new Case("positions", d => KvCache(d, lens: Lens(d, 8, 4)), T("cache_seqlens")),
            new Case("positions_negative", d => KvCache(d, lens: Lens(d, -1, 4)), T("cache_seqlens")),
            new Case("rotary_positions", d => KvCache(d, tables: 4), T("rotary_cos")),
            new Case("rotary_dtype", d => KvCache(d, cos: Tables(d).cos.to(ScalarType.Float16)), T("rotary_cos")),
            new Case("device", d => KvCache(d, lens: Lens(CPU, 3, 4)), T("cache_seqlens"), GpuOnly: true),
            new Case("device_k", d => KvCache(d, k: R(CPU, 2, 1, 2, 16).to(Fp(d))), T("k"), GpuOnly: true),
        });

        // rotary: x (2, 5, 2, 16), tables (8, 4) (rotary_dim 8)
        Tensor X(Device d, long b = 2, long s = 5) => R(d, b, s, 2, 16);
        Tensor Offsets(Device d, params long[] v) => tensor(v, device: d);
        yield return new Api("apply_rotary_emb", d => flash_attn.apply_rotary_emb(X(d), Tables(d).cos, Tables(d).sin, seqlen_offset: 3), new[]
        {
            new Case("dtype", d => flash_attn.apply_rotary_emb(I32(X(d)), Tables(d).cos, Tables(d).sin), T("x")),
            new Case("dtype_cos", d => flash_attn.apply_rotary_emb(X(d), Tables(d).cos.to(ScalarType.Float16), Tables(d).sin.to(ScalarType.Float16)), T("cos")),
            new Case("rank", d => flash_attn.apply_rotary_emb(R(d, 5, 2, 16), Tables(d).cos, Tables(d).sin), T("x")),
            new Case("shape_sin", d => flash_attn.apply_rotary_emb(X(d), Tables(d).cos, Tables(d, 7).sin), T("sin")),
            new Case("noncontiguous", d => flash_attn.apply_rotary_emb(Strided(d, 2, 5, 2, 16), Tables(d).cos, Tables(d).sin), T("x")),
            new Case("batch0", d => flash_attn.apply_rotary_emb(X(d, 0), Tables(d).cos, Tables(d).sin), E(0, 5, 2, 16)),
            new Case("seq0", d => flash_attn.apply_rotary_emb(X(d, 2, 0), Tables(d).cos, Tables(d).sin), E(2, 0, 2, 16)),
            new Case("nan", d => flash_attn.apply_rotary_emb(Poison(X(d), double.NaN), Tables(d).cos, Tables(d).sin), Nan),
            new Case("inf", d => flash_attn.apply_rotary_emb(Poison(X(d), Inf), Tables(d).cos, Tables(d).sin), Nan),
            new Case("offset", d => flash_attn.apply_rotary_emb(X(d), Tables(d).cos, Tables(d).sin, seqlen_offset: 4), T("cos")),
            new Case("offsets", d => flash_attn.apply_rotary_emb(X(d), Tables(d).cos, Tables(d).sin, seqlen_offsets: Offsets(d, 0, 4)), T("seqlen_offsets")),
            new Case("cu_seqlens", d => flash_attn.apply_rotary_emb(R(d, 10, 2, 16), Tables(d).cos, Tables(d).sin, cu_seqlens: Cu(d, 0, 6, 3, 10), max_seqlen: 7), T("cu_seqlens")),
            new Case("device", d => flash_attn.apply_rotary_emb(X(d), Tables(CPU).cos, Tables(CPU).sin), T("cos"), GpuOnly: true),
            new Case("device_offsets", d => flash_attn.apply_rotary_emb(X(d), Tables(d).cos, Tables(d).sin, seqlen_offsets: Offsets(CPU, 0, 1)), T("seqlen_offsets"), GpuOnly: true),
        });
        yield return new Api("apply_rotary_emb_qkv_", d => flash_attn.apply_rotary_emb_qkv_(Qkv(d), Tables(d).cos, Tables(d).sin), new[]
        {
            new Case("dtype", d => flash_attn.apply_rotary_emb_qkv_(I32(Qkv(d)), Tables(d).cos, Tables(d).sin), T("qkv")),
            new Case("rank", d => flash_attn.apply_rotary_emb_qkv_(R(d, 2, 5, 6, 16), Tables(d).cos, Tables(d).sin), T("qkv")),
            new Case("heads", d => flash_attn.apply_rotary_emb_qkv_(R(d, 2, 5, 6, 16), Tables(d).cos, Tables(d).sin, num_heads_q: 3), T("num_heads_q")),
            new Case("noncontiguous", d => flash_attn.apply_rotary_emb_qkv_(Strided(d, 2, 5, 3, 2, 16), Tables(d).cos, Tables(d).sin), T("qkv")),
            new Case("batch0", d => flash_attn.apply_rotary_emb_qkv_(Qkv(d, 0), Tables(d).cos, Tables(d).sin), E(0, 5, 3, 2, 16)),
            new Case("seq0", d => flash_attn.apply_rotary_emb_qkv_(Qkv(d, 2, 0), Tables(d).cos, Tables(d).sin), E(2, 0, 3, 2, 16)),
            new Case("nan", d => flash_attn.apply_rotary_emb_qkv_(Poison(Qkv(d), double.NaN), Tables(d).cos, Tables(d).sin), Nan),
            new Case("inf", d => flash_attn.apply_rotary_emb_qkv_(Poison(Qkv(d), Inf), Tables(d).cos, Tables(d).sin), Nan),
            new Case("offsets", d => flash_attn.apply_rotary_emb_qkv_(Qkv(d), Tables(d).cos, Tables(d).sin, seqlen_offsets: Offsets(d, 0, 4)), T("seqlen_offsets")),
            new Case("cos_k", d => flash_attn.apply_rotary_emb_qkv_(Qkv(d), Tables(d).cos, Tables(d).sin, Tables(d, 4).cos, Tables(d, 4).sin), T("cos_k")),
            new Case("device", d => flash_attn.apply_rotary_emb_qkv_(Qkv(d), Tables(CPU).cos, Tables(CPU).sin), T("cos"), GpuOnly: true),
        });

        // norms: x0 (3, 4, 16), weight/bias (16)
        Tensor X0(Device d, long b = 3, long s = 4) => R(d, b, s, 16);
        Tensor W(Device d, long n = 16) => ones(n, dtype: Fp(d), device: d);
        Tensor B(Device d, long n = 16) => zeros(n, dtype: Fp(d), device: d);
        Case[] Norm(Func<Tensor, Tensor?, Tensor, double, object> f, string x = "x0") => new[]
        {
            new Case("dtype", d => f(I32(X0(d)), null, W(d), 0), T(x)),
            new Case("dtype_weight", d => f(X0(d), null, W(d).to(ScalarType.Float16), 0), T("weight")),
            new Case("shape_weight", d => f(X0(d), null, W(d, 8), 0), T("weight")),
            new Case("noncontiguous", d => f(Strided(d, 3, 4, 16), null, W(d), 0), Fine),
            new Case("batch0", d => f(X0(d, 0), null, W(d), 0), E(0, 4, 16)),
            new Case("seq0", d => f(X0(d, 3, 0), null, W(d), 0), E(3, 0, 16)),
            new Case("nan", d => f(Poison(X0(d), double.NaN), null, W(d), 0), Nan),
            new Case("inf", d => f(Poison(X0(d), Inf), null, W(d), 0), Nan),
            new Case("device", d => f(X0(d), null, W(CPU).to(Fp(d)), 0), T("weight"), GpuOnly: true),
        };
        Case[] Residual(Func<Tensor, Tensor?, Tensor, double, object> f) => Norm(f).Concat(new[]
        {
            new Case("dtype_residual", d => f(X0(d), I32(X0(d)), W(d), 0), T("residual")),
            new Case("shape_residual", d => f(X0(d), R(d, 3, 4, 8), W(d), 0), T("residual")),
            new Case("dropout_p", d => f(X0(d), X0(d), W(d), 1.0), T("dropout_p")),
            new Case("device_residual", d => f(X0(d), X0(CPU).to(Fp(d)), W(d), 0), T("residual"), GpuOnly: true),
        }).ToArray();
        yield return new Api("dropout_add_layer_norm", d => flash_attn.dropout_add_layer_norm(X0(d), X0(d), W(d), B(d), 0.1, 1e-5, prenorm: true),
            Residual((x, r, w, p) => flash_attn.dropout_add_layer_norm(x, r, w, null, p, 1e-5)));
        yield return new Api("dropout_add_rms_norm", d => flash_attn.dropout_add_rms_norm(X0(d), X0(d), W(d), null, 0.1, 1e-5, prenorm: true),
            Residual((x, r, w, p) => flash_attn.dropout_add_rms_norm(x, r, w, null, p, 1e-5)));
        Case[] Parallel(Func<Tensor, Tensor?, Tensor?, Tensor, Tensor?, double, object> f) =>
            Residual((x, r, w, p) => f(x, null, r, w, null, p)).Concat(new[]
            {
                new Case("dtype_x1", d => f(X0(d), F64(X0(d)), null, W(d), null, 0), T("x1")),
                new Case("shape_x1", d => f(X0(d), R(d, 3, 4, 8), null, W(d), null, 0), T("x1")),
                new Case("shape_weight1", d => f(X0(d), X0(d), null, W(d), W(d, 8), 0), T("weight1")),
                new Case("device_x1", d => f(X0(d), X0(CPU).to(Fp(d)), null, W(d), null, 0), T("x1"), GpuOnly: true),
            }).Select(c => c with { Outcome = c.Outcome is Throws { Param: "weight" } ? T("weight0") : c.Outcome }).ToArray();
        yield return new Api("dropout_add_layer_norm_parallel_residual",
            d => flash_attn.dropout_add_layer_norm_parallel_residual(X0(d), X0(d), X0(d), W(d), B(d), W(d), B(d), 0.1, 1e-5, prenorm: true),
            Parallel((x, x1, r, w, w1, p) => flash_attn.dropout_add_layer_norm_parallel_residual(x, x1, r, w, null, w1, null, p, 1e-5)));
        yield return new Api("dropout_add_rms_norm_parallel_residual",
            d => flash_attn.dropout_add_rms_norm_parallel_residual(X0(d), X0(d), X0(d), W(d), null, W(d), null, 0.1, 1e-5, prenorm: true),
            Parallel((x, x1, r, w, w1, p) => flash_attn.dropout_add_rms_norm_parallel_residual(x, x1, r, w, null, w1, null, p, 1e-5)));
        yield return new Api("layer_norm", d => flash_attn.layer_norm(X0(d), W(d), B(d)),
            Norm((x, _, w, _) => flash_attn.layer_norm(x, w, null), "x"));
        yield return new Api("rms_norm", d => flash_attn.rms_norm(X0(d), W(d)),
            Norm((x, _, w, _) => flash_attn.rms_norm(x, w), "x"));

        // cross-entropy: logits (4, 10), labels in [0, 10)
        Tensor Logits(Device d, long n = 4) => R(d, n, 10);
        Tensor Labels(Device d, params long[] v) => tensor(v.Length == 0 ? new long[] { 1, 2, 3, 4 } : v, device: d);
        Case[] CrossEntropy(Func<Tensor, Tensor, object> f, string logits, string labels, Outcome empty, string gpuLabels) => new[]
        {
            new Case("dtype", d => f(I32(Logits(d)), Labels(d)), T(logits)),
            new Case("dtype_labels", d => f(Logits(d), I32(Labels(d))), T(labels)),
            new Case("rank", d => f(R(d, 2, 2, 10), Labels(d)), T(logits)),
            new Case("shape_labels", d => f(Logits(d), Labels(d, 1, 2, 3)), T(labels)),
            new Case("noncontiguous", d => f(Strided(d, 4, 10), Labels(d)), T(logits)),
            new Case("batch0", d => f(Logits(d, 0), Labels(d).narrow(0, 0, 0)), empty),
            new Case("vocab0", d => f(R(d, 4, 0), Labels(d, -100, -100, -100, -100)), T(logits)),
            new Case("nan", d => f(Poison(Logits(d), double.NaN), Labels(d)), Nan),
            new Case("inf", d => f(Poison(Logits(d), Inf), Labels(d)), Nan),
            new Case("labels", d => f(Logits(d), Labels(d, 1, 2, 10, 3)), D(labels, gpuLabels)),
            new Case("labels_negative", d => f(Logits(d), Labels(d, 1, -1, 2, 3)), D(labels, gpuLabels)),
            new Case("device", d => f(Logits(d), Labels(CPU)), T(labels), GpuOnly: true),
        };
        yield return new Api("cross_entropy_loss", d => flash_attn.cross_entropy_loss(Logits(d), Labels(d, 1, -100, 9, 0)),
            CrossEntropy((x, y) => flash_attn.cross_entropy_loss(x, y), "logits", "labels", E(0), "labels"));

        // dense: x (3, 16), weight (8, 16), mlp hidden 32, gated fc1 (64, 16)
        Tensor Xd(Device d, params long[] lead) => R(d, (lead.Length == 0 ? new long[] { 3 } : lead).Append(16).ToArray());
        yield return new Api("fused_dense_func", d => flash_attn.fused_dense_func(Xd(d), R(d, 8, 16), R(d, 8)), new[]
        {
            new Case("dtype", d => flash_attn.fused_dense_func(I32(Xd(d)), R(d, 8, 16)), T("x")),
            new Case("dtype_weight", d => flash_attn.fused_dense_func(Xd(d), F64(R(d, 8, 16))), T("weight")),
            new Case("rank", d => flash_attn.fused_dense_func(Xd(d), R(d, 16)), T("weight")),
            new Case("shape", d => flash_attn.fused_dense_func(Xd(d), R(d, 8, 15)), T("weight")),
            new Case("shape_bias", d => flash_attn.fused_dense_func(Xd(d), R(d, 8, 16), R(d, 7)), T("bias")),
            new Case("noncontiguous", d => flash_attn.fused_dense_func(Strided(d, 3, 16), R(d, 8, 16)), Fine),
            new Case("batch0", d => flash_attn.fused_dense_func(Xd(d, 0), R(d, 8, 16)), E(0, 8)),
            new Case("seq0", d => flash_attn.fused_dense_func(Xd(d, 2, 0), R(d, 8, 16)), E(2, 0, 8)),
            new Case("nan", d => flash_attn.fused_dense_func(Poison(Xd(d), double.NaN), R(d, 8, 16)), Nan),
            new Case("inf", d => flash_attn.fused_dense_func(Poison(Xd(d), Inf), R(d, 8, 16)), Nan),
            new Case("device", d => flash_attn.fused_dense_func(Xd(d), R(CPU, 8, 16).to(Fp(d))), T("weight"), GpuOnly: true),
        });
        yield return new Api("fused_mlp_func", d => flash_attn.fused_mlp_func(Xd(d), R(d, 32, 16), R(d, 8, 32), R(d, 32), R(d, 8)), new[]
        {
            new Case("dtype", d => flash_attn.fused_mlp_func(I32(Xd(d)), R(d, 32, 16), R(d, 8, 32)), T("x")),
            new Case("dtype_weight", d => flash_attn.fused_mlp_func(Xd(d), R(d, 32, 16), F64(R(d, 8, 32))), T("weight2")),
            new Case("shape", d => flash_attn.fused_mlp_func(Xd(d), R(d, 32, 16), R(d, 8, 31)), T("weight2")),
            new Case("activation", d => flash_attn.fused_mlp_func(Xd(d), R(d, 32, 16), R(d, 8, 32), activation: "tanh"), T("activation")),
            new Case("checkpoint_lvl", d => flash_attn.fused_mlp_func(Xd(d), R(d, 32, 16), R(d, 8, 32), checkpoint_lvl: 3), T("checkpoint_lvl")),
            new Case("noncontiguous", d => flash_attn.fused_mlp_func(Strided(d, 3, 16), R(d, 32, 16), R(d, 8, 32)), Fine),
            new Case("batch0", d => flash_attn.fused_mlp_func(Xd(d, 0), R(d, 32, 16), R(d, 8, 32)), E(0, 8)),
            new Case("seq0", d => flash_attn.fused_mlp_func(Xd(d, 2, 0), R(d, 32, 16), R(d, 8, 32)), E(2, 0, 8)),
            new Case("nan", d => flash_attn.fused_mlp_func(Poison(Xd(d), double.NaN), R(d, 32, 16), R(d, 8, 32)), Nan),
            new Case("inf", d => flash_attn.fused_mlp_func(Poison(Xd(d), Inf), R(d, 32, 16), R(d, 8, 32)), Nan),
            new Case("device", d => flash_attn.fused_mlp_func(Xd(d), R(d, 32, 16), R(CPU, 8, 32).to(Fp(d))), T("weight2"), GpuOnly: true),
        });
        yield return new Api("gated_mlp_func", d => flash_attn.gated_mlp_func(Xd(d), R(d, 64, 16), R(d, 8, 32), activation: "silu"), new[]
        {
            new Case("dtype", d => flash_attn.gated_mlp_func(I32(Xd(d)), R(d, 64, 16), R(d, 8, 32)), T("x")),
            new Case("shape", d => flash_attn.gated_mlp_func(Xd(d), R(d, 63, 16), R(d, 8, 32)), T("weight1")),
            new Case("shape_weight2", d => flash_attn.gated_mlp_func(Xd(d), R(d, 64, 16), R(d, 8, 31)), T("weight2")),
            new Case("activation", d => flash_attn.gated_mlp_func(Xd(d), R(d, 64, 16), R(d, 8, 32), activation: "tanh"), T("activation")),
            new Case("noncontiguous", d => flash_attn.gated_mlp_func(Strided(d, 3, 16), R(d, 64, 16), R(d, 8, 32)), Fine),
            new Case("batch0", d => flash_attn.gated_mlp_func(Xd(d, 0), R(d, 64, 16), R(d, 8, 32)), E(0, 8)),
            new Case("seq0", d => flash_attn.gated_mlp_func(Xd(d, 2, 0), R(d, 64, 16), R(d, 8, 32)), E(2, 0, 8)),
            new Case("nan", d => flash_attn.gated_mlp_func(Poison(Xd(d), double.NaN), R(d, 64, 16), R(d, 8, 32)), Nan),
            new Case("inf", d => flash_attn.gated_mlp_func(Poison(Xd(d), Inf), R(d, 64, 16), R(d, 8, 32)), Nan),
            new Case("device", d => flash_attn.gated_mlp_func(Xd(d), R(CPU, 64, 16).to(Fp(d)), R(d, 8, 32)), T("weight1"), GpuOnly: true),
        });

        yield return new Api("assert_async", d => { flash_attn.assert_async(ones(3, dtype: ScalarType.Bool, device: d), "ids", "ids in range"); return null; }, new[]
        {
            new Case("dtype", d => { flash_attn.assert_async(ones(3, device: d), "ids", "ids in range"); return null; }, T("condition")),
            new Case("batch0", d => { flash_attn.assert_async(ones(0, dtype: ScalarType.Bool, device: d), "ids", "ids in range"); return null; }, Fine),
            new Case("false", d => { flash_attn.assert_async(tensor(new[] { true, false }, device: d), "ids", "ids in range"); return zeros(1, device: d).fill_(double.NaN); }, D("ids")),
        });

        // ---- modules ----
        yield return new Api("FlashSelfAttention", d => new FlashSelfAttention(causal: true).forward(Qkv(d)),
            QkvPacked((qkv, a) => new FlashSelfAttention(alibi_slopes: a).forward(qkv)).Concat(new[]
            {
                new Case("offsets", d => new FlashSelfAttention().forward(Vqkv(d), Cu(d, 0, 6, 3, 10), 7), T("cu_seqlens")),
            }).ToArray());
        yield return new Api("FlashCrossAttention", d => new FlashCrossAttention(causal: true).forward(Q(d), Kv(d)),
            KvPacked((q, kv) => new FlashCrossAttention().forward(q, kv)));

        Tensor Xm(Device d, long b = 2, long s = 5, long w = 32) => R(d, b, s, w);
        // mixedDtypes: the norms take float32 parameters with any input dtype
        Case[] ModuleCases(Func<Device, Tensor, object> f, string x, Func<Device, long, long, Tensor> make, long width, Func<long, long, long[]> shape,
            bool mixedDtypes = false) => new[]
        {
            new Case("dtype", d => f(d, I32(make(d, 2, 5))), T(x)),
            new Case("dtype_float64", d => f(d, F64(make(d, 2, 5))), mixedDtypes ? Fine : T(x)),
            new Case("shape", d => f(d, R(d, 2, 5, width - 1)), T(x)),
            new Case("noncontiguous", d => f(d, Strided(d, 2, 5, width)), Fine),
            new Case("batch0", d => f(d, make(d, 0, 5)), E(shape(0, 5))),
            new Case("seq0", d => f(d, make(d, 2, 0)), E(shape(2, 0))),
            new Case("nan", d => f(d, Poison(make(d, 2, 5), double.NaN)), Nan),
            new Case("inf", d => f(d, Poison(make(d, 2, 5), Inf)), Nan),
            new Case("device", d => f(d, make(CPU, 2, 5).to(Fp(d))), T(x), GpuOnly: true),
        };
        MHA Mha(Device d) => new(32, 2, causal: true, rotary_emb_dim: 8, device: d, dtype: Fp(d));
        yield return new Api("MHA", d => Mha(d).forward(Xm(d)),
            ModuleCases((d, x) => Mha(d).forward(x), "x", (d, b, s) => Xm(d, b, s), 32, (b, s) => new[] { b, s, 32L }));

        yield return new Api("RotaryEmbedding", d => new RotaryEmbedding(8).forward(Qkv(d), seqlen_offset: 2), new[]
        {
            new Case("dtype", d => new RotaryEmbedding(8).forward(I32(Qkv(d))), T("qkv")),
            new Case("rank", d => new RotaryEmbedding(8).forward(R(d, 2, 5, 32)), T("qkv")),
            new Case("noncontiguous", d => new RotaryEmbedding(8).forward(Strided(d, 2, 5, 3, 2, 16)), T("qkv")),
            new Case("batch0", d => new RotaryEmbedding(8).forward(Qkv(d, 0)), E(0, 5, 3, 2, 16)),
            new Case("seq0", d => new RotaryEmbedding(8).forward(Qkv(d, 2, 0)), E(2, 0, 3, 2, 16)),
            new Case("nan", d => new RotaryEmbedding(8).forward(Poison(Qkv(d), double.NaN)), Nan),
            new Case("inf", d => new RotaryEmbedding(8).forward(Poison(Qkv(d), Inf)), Nan),
            new Case("offsets", d => new RotaryEmbedding(8).forward(Qkv(d), seqlen_offsets: Offsets(d, 0, 4), max_seqlen: 8), T("seqlen_offsets")),
            new Case("max_seqlen", d => new RotaryEmbedding(8).forward(Qkv(d), seqlen_offsets: Offsets(d, 0, 1)), T("max_seqlen")),
            new Case("device", d => new RotaryEmbedding(8).forward(Qkv(d), seqlen_offsets: Offsets(CPU, 0, 1), max_seqlen: 8), T("seqlen_offsets"), GpuOnly: true),
        });

        // mean over no rows is NaN, as torch's (documented by LossReduction.Mean)
        yield return new Api("CrossEntropyLoss", d => new CrossEntropyLoss().forward(Logits(d), Labels(d, 1, -100, 9, 0)),
            CrossEntropy((x, y) => new CrossEntropyLoss().forward(x, y), "input", "target", Nan, "labels"));

        yield return new Api("FusedDense", d => new FusedDense(16, 8, device: d, dtype: Fp(d)).forward(Xd(d)),
            ModuleCases((d, x) => new FusedDense(16, 8, device: d, dtype: Fp(d)).forward(x), "x", (d, b, s) => Xd(d, b, s), 16, (b, s) => new[] { b, s, 8L }));
        yield return new Api("FusedMLP", d => new FusedMLP(16, 32, 8, device: d, dtype: Fp(d)).forward(Xd(d)),
            ModuleCases((d, x) => new FusedMLP(16, 32, 8, device: d, dtype: Fp(d)).forward(x), "x", (d, b, s) => Xd(d, b, s), 16, (b, s) => new[] { b, s, 8L }));
        yield return new Api("GatedMlp", d => new GatedMlp(16, 32, 8, multiple_of: 8, device: d, dtype: Fp(d)).forward(Xd(d)),
            ModuleCases((d, x) => new GatedMlp(16, 32, 8, multiple_of: 8, device: d, dtype: Fp(d)).forward(x), "x", (d, b, s) => Xd(d, b, s), 16, (b, s) => new[] { b, s, 8L }));
        yield return new Api("FusedLayerNorm", d => layers.FusedLayerNorm(16, device: d, dtype: Fp(d)).forward(X0(d)),
            ModuleCases((d, x) => layers.FusedLayerNorm(16, device: d, dtype: ScalarType.Float32).forward(x), "input", (d, b, s) => X0(d, b, s), 16, (b, s) => new[] { b, s, 16L }, mixedDtypes: true));
        yield return new Api("RMSNorm", d => new RMSNorm(16, device: d, dtype: Fp(d)).forward(X0(d)),
            ModuleCases((d, x) => new RMSNorm(16, device: d, dtype: ScalarType.Float32).forward(x), "input", (d, b, s) => X0(d, b, s), 16, (b, s) => new[] { b, s, 16L }, mixedDtypes: true));
        Case[] DropoutAddNorm(Func<Device, Tensor, Tensor?, object> f) =>
            ModuleCases((d, x) => f(d, x, null), "x0", (d, b, s) => X0(d, b, s), 16, (b, s) => new[] { b, s, 16L }, mixedDtypes: true).Concat(new[]
            {
                new Case("shape_residual", d => f(d, X0(d), R(d, 3, 4, 8)), T("residual")),
                new Case("device_residual", d => f(d, X0(d), X0(CPU).to(Fp(d))), T("residual"), GpuOnly: true),
            }).ToArray();
        yield return new Api("DropoutAddLayerNorm", d => new DropoutAddLayerNorm(16, prenorm: true, device: d, dtype: Fp(d)).forward(X0(d), X0(d)),
            DropoutAddNorm((d, x, r) => new DropoutAddLayerNorm(16, device: d, dtype: ScalarType.Float32).forward(x, r)).Concat(
                // the unfused path (fused_dropout_add_ln false) refuses what the fused one does
                DropoutAddNorm((d, x, r) => new DropoutAddLayerNorm(16, device: d, dtype: ScalarType.Float32, fused_dropout_add_ln: false)
                    .forward(x, r)).Select(c => c with { Kind = "plain_" + c.Kind })).ToArray());
        yield return new Api("DropoutAddRMSNorm", d => new DropoutAddRMSNorm(16, prenorm: true, device: d, dtype: Fp(d)).forward(X0(d), X0(d)),
            DropoutAddNorm((d, x, r) => new DropoutAddRMSNorm(16, device: d, dtype: ScalarType.Float32).forward(x, r)));

        // ---- FlashAttn.Models: the tiny GPT (vocabulary 256, 64 positions, width 64, 4 heads of 16) and a small ViT ----
        var tiny = GPTConfig.Named("tiny");
        GPTLMHeadModel Gpt(Device d) => new(tiny, d, Fp(d));
        Case[] Tokens(Func<Device, Tensor, object> f, Func<long, long, long[]> shape) => new[]
        {
            new Case("dtype", d => f(d, Ids(d, 2, 5).to(ScalarType.Float32)), T("input_ids")),
            new Case("rank", d => f(d, Ids(d, 10)), T("input_ids")),
            new Case("noncontiguous", d => f(d, Ids(d, 2, 10)[.., TensorIndex.Slice(null, null, 2)]), Fine),
            new Case("batch0", d => f(d, Ids(d, 0, 5)), E(shape(0, 5))),
            new Case("seq0", d => f(d, Ids(d, 2, 0)), E(shape(2, 0))),
            new Case("token_ids", d => f(d, Poison(Ids(d, 2, 5), 256, 1, 3)), D("input_ids")),
            new Case("token_ids_negative", d => f(d, Poison(Ids(d, 2, 5), -1)), D("input_ids")),
            new Case("positions", d => f(d, Ids(d, 1, 65)), T("input_ids")),
            new Case("device", d => f(d, Ids(CPU, 2, 5)), T("input_ids"), GpuOnly: true),
        };
        yield return new Api("GPTLMHeadModel.forward", d => Gpt(d).forward(Ids(d, 2, 5)),
            Tokens((d, ids) => Gpt(d).forward(ids), (b, s) => new[] { b, s, 256L }));
        yield return new Api("GPTModel.forward", d => Gpt(d).transformer.forward(Ids(d, 2, 5)),
            Tokens((d, ids) => Gpt(d).transformer.forward(ids), (b, s) => new[] { b, s, 64L }).Concat(new[]
            {
                new Case("cache", d =>
                {
                    using var cache = new KVCache(2, 2, 4, 4, 16, Fp(d), d);
                    return Gpt(d).transformer.forward(Ids(d, 2, 5), cache);
                }, T("cache")),
                new Case("cache_batch", d =>
                {
                    using var cache = new KVCache(2, 3, 8, 4, 16, Fp(d), d);
                    return Gpt(d).transformer.forward(Ids(d, 2, 5), cache);
                }, T("cache")),
            }).ToArray());
        yield return new Api("GPTLMHeadModel.loss", d => Gpt(d).loss(Ids(d, 2, 5), Ids(d, 2, 5)), new[]
        {
            new Case("dtype", d => Gpt(d).loss(Ids(d, 2, 5), I32(Ids(d, 2, 5))), T("labels")),
            new Case("shape", d => Gpt(d).loss(Ids(d, 2, 5), Ids(d, 2, 4)), T("labels")),
            new Case("batch0", d => Gpt(d).loss(Ids(d, 0, 5), Ids(d, 0, 5)), Fine),
            new Case("labels", d => Gpt(d).loss(Ids(d, 2, 5), Poison(Ids(d, 2, 5), 300, 1, 1)), D("labels")),
            new Case("token_ids", d => Gpt(d).loss(Poison(Ids(d, 2, 5), 256), Ids(d, 2, 5)), D("input_ids")),
            new Case("device", d => Gpt(d).loss(Ids(d, 2, 5), Ids(CPU, 2, 5)), T("labels"), GpuOnly: true),
        });
        yield return new Api("GPTLMHeadModel.generate", d => Gpt(d).generate(Ids(d, 2, 5), 3), new[]
        {
            new Case("dtype", d => Gpt(d).generate(Ids(d, 2, 5).to(ScalarType.Float32), 3), T("input_ids")),
            new Case("rank", d => Gpt(d).generate(Ids(d, 5), 3), T("input_ids")),
            new Case("seq0", d => Gpt(d).generate(Ids(d, 2, 0), 3), T("input_ids")),
            new Case("token_ids", d => Gpt(d).generate(Poison(Ids(d, 2, 5), 256), 3), T("input_ids")),
            new Case("positions", d => Gpt(d).generate(Ids(d, 2, 62), 3), T("max_new_tokens")),
            new Case("device", d => Gpt(d).generate(Ids(CPU, 2, 5), 3), T("input_ids"), GpuOnly: true),
        });

        // FusedAdamW: one step over a parameter with the given gradient; returns the parameter (a non-finite gradient
        // norm skips the step: the weights stay finite and unchanged, as documented)
        Parameter P(Device d, long n = 37) => new Parameter(R(d, n));
        object Step(Parameter p, Tensor? grad, FusedAdamW opt)
        {
            p.grad = grad;
            opt.step();
            return p.detach();
        }
        object Adam(Device d, Tensor? grad = null, long n = 37, double lr = 1e-3)
        {
            var p = P(d, n);
            return Step(p, grad ?? R(d, n), new FusedAdamW(new[] { p }, lr: lr, weight_decay: 0.1));
        }
        yield return new Api("FusedAdamW", d => Adam(d), new[]
        {
            new Case("lr", d => Adam(d, lr: -1), T("lr")),
            new Case("beta1", d => new FusedAdamW(new[] { P(d) }, beta1: 1.0), T("beta1")),
            new Case("eps", d => new FusedAdamW(new[] { P(d) }, eps: -1), T("eps")),
            new Case("weight_decay", d => new FusedAdamW(new[] { P(d) }, weight_decay: double.NaN), T("weight_decay")),
            new Case("amsgrad", d => new FusedAdamW(new[] { P(d) }, amsgrad: true), T("amsgrad")),
            new Case("max_norm", d => new FusedAdamW(new[] { P(d) }, max_norm: double.NaN), T("max_norm")),
            new Case("duplicate", d => { var p = P(d); return new FusedAdamW(new[] { p, p }); }, T("parameters")),
            new Case("grad_shape", d => Adam(d, R(d, 5)), T("parameters")),
            new Case("grad_dtype", d => Adam(d, R(d, 37).to(ScalarType.Float64)), T("parameters")),
            new Case("empty", d => Adam(d, R(d, 0), n: 0), E(0)),
            new Case("nan", d => Adam(d, Poison(R(d, 37), double.NaN)), Fine),
            new Case("inf", d => Adam(d, Poison(R(d, 37), Inf)), Fine),
            new Case("device", d => new FusedAdamW(new[] { P(d), P(CPU) }), T("parameters"), GpuOnly: true),
        });

        // a GPT block of the public modules: MHA (causal, 4 heads of 16, KV-cache slot 0), FusedMLP, two prenorm norms
        MHA Attn(Device d) => new(64, 4, causal: true, device: d, dtype: Fp(d), fused_bias_fc: true, layer_idx: 0);
        DropoutAddLayerNorm Ln(Device d, double p) => new(64, prenorm: true, p: p, residual_in_fp32: true, device: d, dtype: Fp(d));
        Block Blk(Device d, double p = 0.1) => new(Attn(d), new FusedMLP(64, 256, device: d, dtype: Fp(d)), Ln(d, p), Ln(d, p));
        Tensor H(Device d, long b = 2, long s = 5) => R(d, b, s, 64);
        Func<long, long, long[]> hidden = (b, s) => new[] { b, s, 64L };
        yield return new Api("Block", d => Blk(d).forward(H(d), null),
            // Without dropout here: the fused kernels write 0 for a dropped element, so a poisoned element that dropout
            // drops (one time in ten) never reaches the outputs and the nan / inf cases could not say whether it propagates.
            ModuleCases((d, x) => Blk(d, 0).forward(x, null), "hidden", (d, b, s) => H(d, b, s), 64, hidden)
                .Concat(new[]
                {
                    new Case("shape_residual", d => Blk(d, 0).forward(H(d), H(d, 2, 4)), T("residual")),
                    new Case("device_residual", d => Blk(d, 0).forward(H(d), H(CPU).to(Fp(d))), T("residual"), GpuOnly: true),
                    new Case("prenorm", d => new Block(Attn(d), new FusedMLP(64, device: d, dtype: Fp(d)),
                                                       new DropoutAddLayerNorm(64, device: d, dtype: Fp(d)), Ln(d, 0)), T("norm1")),
                }).ToArray());
        yield return new Api("MHA.cache", d =>
            {
                using var cache = new KVCache(1, 2, 8, 4, 16, Fp(d), d);
                return Attn(d).forward(H(d), cache);
            }, new[]
            {
                new Case("room", d =>
                {
                    using var cache = new KVCache(1, 2, 4, 4, 16, Fp(d), d);
                    return Attn(d).forward(H(d), cache);
                }, T("cache")),
                new Case("batch", d =>
                {
                    using var cache = new KVCache(1, 3, 8, 4, 16, Fp(d), d);
                    return Attn(d).forward(H(d), cache);
                }, T("cache")),
                new Case("heads", d =>
                {
                    using var cache = new KVCache(1, 2, 8, 2, 32, Fp(d), d);
                    return Attn(d).forward(H(d), cache);
                }, T("cache")),
                new Case("layer_idx", d =>
                {
                    using var cache = new KVCache(1, 2, 8, 4, 16, Fp(d), d);
                    return new MHA(64, 4, causal: true, device: d, dtype: Fp(d)).forward(H(d), cache);
                }, T("cache")),
                new Case("device", d =>
                {
                    using var cache = new KVCache(1, 2, 8, 4, 16, Fp(d), CPU);
                    return Attn(d).forward(H(d), cache);
                }, T("cache"), GpuOnly: true),
            });
        yield return new Api("KVCache", d => { using var c = new KVCache(1, 2, 8, 4, 16, Fp(d), d); c.advance(3); return Attn(d).forward(H(d), c); }, new[]
        {
            new Case("advance", d => { using var c = new KVCache(1, 2, 8, 4, 16, Fp(d), d); c.advance(9); return c.length; }, T("tokens")),
            new Case("advance_negative", d => { using var c = new KVCache(1, 2, 8, 4, 16, Fp(d), d); c.advance(-1); return c.length; }, T("tokens")),
            new Case("n_layer", d => new KVCache(0, 2, 8, 4, 16, Fp(d), d), T("n_layer")),
            new Case("batch", d => new KVCache(1, -1, 8, 4, 16, Fp(d), d), T("batch")),
            new Case("max_length", d => new KVCache(1, 2, 0, 4, 16, Fp(d), d), T("max_length")),
            new Case("n_head", d => new KVCache(1, 2, 8, 0, 16, Fp(d), d), T("n_head")),
            new Case("head_dim", d => new KVCache(1, 2, 8, 4, 0, Fp(d), d), T("head_dim")),
            new Case("dtype", d => new KVCache(1, 2, 8, 4, 16, ScalarType.Int32, d), T("dtype")),
        });
        yield return new Api("Mlp", d => new Mlp(64, 256, activation: "gelu", device: d, dtype: Fp(d)).forward(H(d)),
            ModuleCases((d, x) => new Mlp(64, 256, activation: "gelu", fused_bias_fc: true, device: d, dtype: Fp(d)).forward(x), "x",
                        (d, b, s) => H(d, b, s), 64, hidden));

        var vitConfig = new ViTConfig { img_size = 16, patch_size = 8, embed_dim = 32, depth = 1, num_heads = 2, num_classes = 3 };
        VisionTransformer Vit(Device d) => new(vitConfig, d, Fp(d));
        Tensor Images(Device d, long b = 2) => R(d, b, 3, 16, 16);
        Case[] ImageCases(Func<Device, Tensor, object> f, long[] emptyShape) => new[]
        {
            new Case("dtype", d => f(d, I32(Images(d))), T("images")),
            new Case("dtype_float64", d => f(d, F64(Images(d))), T("images")),
            new Case("shape", d => f(d, R(d, 2, 3, 16, 15)), T("images")),
            new Case("noncontiguous", d => f(d, Strided(d, 2, 3, 16, 16)), Fine),
            new Case("batch0", d => f(d, Images(d, 0)), E(emptyShape)),
            new Case("nan", d => f(d, Poison(Images(d), double.NaN)), Nan),
            new Case("inf", d => f(d, Poison(Images(d), Inf)), Nan),
            new Case("device", d => f(d, Images(CPU).to(Fp(d))), T("images"), GpuOnly: true),
        };
        yield return new Api("VisionTransformer.forward", d => Vit(d).forward(Images(d)), ImageCases((d, x) => Vit(d).forward(x), new[] { 0L, 3 }));
        yield return new Api("VisionTransformer.forward_features", d => Vit(d).forward_features(Images(d)),
            ImageCases((d, x) => Vit(d).forward_features(x), new[] { 0L, 5, 32 }));
        yield return new Api("VisionTransformer.loss", d => Vit(d).loss(Images(d), tensor(new long[] { 0, 2 }, device: d)), new[]
        {
            new Case("dtype", d => Vit(d).loss(Images(d), tensor(new[] { 0, 2 }, device: d)), T("labels")),
            new Case("shape", d => Vit(d).loss(Images(d), tensor(new long[] { 0, 2, 1 }, device: d)), T("labels")),
            new Case("labels", d => Vit(d).loss(Images(d), tensor(new long[] { 0, 3 }, device: d)), D("labels")),
            new Case("device", d => Vit(d).loss(Images(d), tensor(new long[] { 0, 2 })), T("labels"), GpuOnly: true),
        });
        yield return new Api("VisionTransformer.ResamplePositions", d => VisionTransformer.ResamplePositions(R(d, 1, 5, 32), 3), new[]
        {
            new Case("dtype", d => VisionTransformer.ResamplePositions(I32(R(d, 1, 5, 32)), 3), T("posEmbed")),
            new Case("shape", d => VisionTransformer.ResamplePositions(R(d, 1, 6, 32), 3), T("posEmbed")),
            new Case("grid", d => VisionTransformer.ResamplePositions(R(d, 1, 5, 32), 0), T("grid")),
            new Case("nan", d => VisionTransformer.ResamplePositions(Poison(R(d, 1, 5, 32), double.NaN, 0, 1, 0), 3), Nan),
        });
        yield return new Api("PatchEmbed", d => new PatchEmbed(3, 32, 8, d, Fp(d)).forward(Images(d)), new[]
        {
            new Case("dtype", d => new PatchEmbed(3, 32, 8, d, Fp(d)).forward(I32(Images(d))), T("x")),
            new Case("rank", d => new PatchEmbed(3, 32, 8, d, Fp(d)).forward(R(d, 3, 16, 16)), T("x")),
            new Case("shape", d => new PatchEmbed(3, 32, 8, d, Fp(d)).forward(R(d, 2, 4, 16, 16)), T("x")),
            new Case("batch0", d => new PatchEmbed(3, 32, 8, d, Fp(d)).forward(Images(d, 0)), E(0, 4, 32)),
            new Case("nan", d => new PatchEmbed(3, 32, 8, d, Fp(d)).forward(Poison(Images(d), double.NaN)), Nan),
            new Case("device", d => new PatchEmbed(3, 32, 8, d, Fp(d)).forward(Images(CPU).to(Fp(d))), T("x"), GpuOnly: true),
        });
    }

    // ---- running a case ----

    internal static IEnumerable<TestCaseData> Cases(bool gpu) =>
        Apis.SelectMany(a => a.Cases.Where(c => gpu || !c.GpuOnly).Select(c => new TestCaseData(a.Name, c.Kind).SetName($"{a.Name}_{c.Kind}")));

    internal static void Run(string api, string kind, Device device)
    {
        var a = Apis.Single(x => x.Name == api);
        var c = a.Cases.Single(x => x.Kind == kind);
        Assert.DoesNotThrow(flash_attn.check_errors, "no error pending before the case");
        using (NewDisposeScope())
        {
            bool gpu = device.type == DeviceType.CUDA;
            switch (c.Outcome)
            {
                case Throws t:
                    ExpectThrows(() => c.Call(device), t.Param);
                    break;
                case Deferred def when !gpu:
                    ExpectThrows(() => c.Call(device), def.CpuParam);
                    break;
                case Deferred def:
                    // raised by check_errors, or already by a later op of the same call that found the record written
                    object? result = null;
                    var early = Catch(() => result = c.Call(device));
                    if (early is null)
                        Assert.That(Tensors(result).Any(NotFinite), Is.True, "the GPU makes the rows of the bad value NaN");
                    var raised = early ?? Catch(flash_attn.check_errors);
                    Assert.That(raised?.ParamName, Is.EqualTo(def.GpuParam), raised?.Message ?? "no error raised");
                    break;
                case NonFinite:
                    Assert.That(Tensors(c.Call(device)).Any(NotFinite), Is.True, "NaN / Inf propagate to the outputs");
                    break;
                case Empty e:
                    var first = Tensors(c.Call(device)).First();
                    Assert.That(first.shape, Is.EqualTo(e.Shape), "an empty input gives an empty output");
                    break;
                case Works:
                    Assert.That(Tensors(c.Call(device)).Any(NotFinite), Is.False, "a finite output");
                    break;
            }
            Assert.DoesNotThrow(flash_attn.check_errors, "nothing left recorded");
            var good = Tensors(a.Good(device)).ToList();
            Assert.That(good.Any(NotFinite), Is.False, "a correct call afterwards works");
            Assert.DoesNotThrow(flash_attn.check_errors, "and records nothing");
        }
    }

    private static void ExpectThrows(Action call, string param)
    {
        var e = Assert.Throws<ArgumentException>(() => call())!;
        Assert.That(e.ParamName, Is.EqualTo(param), e.Message);
    }

    private static ArgumentException? Catch(Action call)
    {
        try { call(); return null; }
        catch (ArgumentException e) { return e; }
    }

    private static bool NotFinite(Tensor t) => t.is_floating_point() && !t.isfinite().all().item<bool>();

    /// <summary>The tensors of an op's result (a tensor, a tuple of them, FlashAttnResult).</summary>
    private static IEnumerable<Tensor> Tensors(object? result) => result switch
    {
        null => Array.Empty<Tensor>(),
        Tensor t => new[] { t },
        FlashAttnResult r => new[] { r.output, r.softmax_lse },
        ITuple tuple => Enumerable.Range(0, tuple.Length).SelectMany(i => Tensors(tuple[i])),
        _ => throw new ArgumentException($"unexpected result {result.GetType().Name}"),
    };
}

/// <summary>The catalogue on CPU tensors (CI), and the guard that it covers the public API.</summary>
public sealed class BadInputCatalogueTests
{
    [SetUp]
    public void Seed() => manual_seed(TestContext.CurrentContext.Random.Next());

    private static IEnumerable<TestCaseData> Cases() => BadInputCatalogue.Cases(gpu: false);

    [TestCaseSource(nameof(Cases))]
    public void BadInputIsRejectedOrDocumented(string api, string kind) => BadInputCatalogue.Run(api, kind, CPU);

    // Public API without a catalogue entry, and why.
    private static readonly Dictionary<string, string> Exempt = new()
    {
        ["set_dense_algo_candidates"] = "an int setting, clamped to [1, 32] as documented",
        ["check_errors"] = "no argument: it raises what the catalogue's deferred cases record",
        ["layers"] = "factories of the modules the catalogue covers",
        ["Reference"] = "the test oracle: takes what the validated ops hand it",
        ["Backend"] = "device queries and the ForceReference switch; no tensor input to reject",
        ["BackwardGuard"] = "the backward failure record; no input",
        ["LibTorchLoader"] = "loads libtorch from a path; no tensor input",
        ["FlashAttnException"] = "an exception type",
        ["FlashAttnResult"] = "a result record",
        ["LossReduction"] = "an enum",
        ["NormReferenceOutput"] = "a result record of the reference",
        ["NormReferenceGrads"] = "a result record of the reference",
        ["FlashAttnFunction"] = "autograd function behind the attention functions, which validate its inputs",
        ["RotaryFunction"] = "autograd function behind apply_rotary_emb, which validates its inputs",
        ["RotaryQkvFunction"] = "autograd function behind apply_rotary_emb_qkv_, which validates its inputs",
        ["NormFunction"] = "autograd function behind the norms, which validate its inputs",
        ["CrossEntropyFunction"] = "autograd function behind cross_entropy_loss, which validates its inputs",
        ["FusedDenseFunction"] = "autograd function behind fused_dense_func, which validates its inputs",
        ["FusedMlpFunction"] = "autograd function behind fused_mlp_func, which validates its inputs",
        ["get_last_attention_backend"] = "a read-only report of the path the last attention call took; no input",
        ["AttentionBackend"] = "an enum",
        ["State"] = "FusedAdamW's per-parameter state record (state_dict), validated when loaded",
    };

    [Test]
    public void CoversEveryPublicFunctionAndModule()
    {
        var names = BadInputCatalogue.Apis.Select(a => a.Name).ToHashSet();
        bool Covered(string name) => names.Contains(name) || names.Any(n => n.StartsWith(name + ".")) || Exempt.ContainsKey(name);
        var missing = new List<string>();
        var library = typeof(flash_attn).Assembly;
        foreach (var m in typeof(flash_attn).GetMethods(System.Reflection.BindingFlags.Public | System.Reflection.BindingFlags.Static |
                                                        System.Reflection.BindingFlags.DeclaredOnly))
            if (!Covered(m.Name)) missing.Add($"flash_attn.{m.Name}");
        foreach (var t in library.GetExportedTypes())
            if (t != typeof(flash_attn) && !Covered(t.Name)) missing.Add(t.FullName!);
        foreach (var t in typeof(GPTLMHeadModel).Assembly.GetExportedTypes())
            if (t.Namespace == "FlashAttn.Models" && typeof(nn.Module).IsAssignableFrom(t) && !Covered(t.Name)) missing.Add(t.FullName!);
        Assert.That(missing, Is.Empty, "public API missing from the bad-input catalogue (add cases, or an exemption with its reason)");
        var unused = Exempt.Keys.Where(k => names.Contains(k)).ToList();
        Assert.That(unused, Is.Empty, "exempt and catalogued at once");
    }
}

/// <summary>The catalogue on the GPU, two-device cases included.</summary>
[Category(Gpu.Category)]
public sealed class BadInputCatalogueCudaTests
{
    [SetUp]
    public void Seed() => manual_seed(TestContext.CurrentContext.Random.Next());

    private static IEnumerable<TestCaseData> Cases() => BadInputCatalogue.Cases(gpu: true);

    [TestCaseSource(nameof(Cases))]
    public void BadInputIsRejectedOrDocumented(string api, string kind) => BadInputCatalogue.Run(api, kind, Gpu.Require());
}
