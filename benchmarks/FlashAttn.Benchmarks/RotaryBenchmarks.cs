using BenchmarkDotNet.Attributes;
using TorchSharp;
using static TorchSharp.torch;

namespace FlashAttn.Benchmarks;

/// <summary>
/// Rotary embedding, forward, bf16, full rotary dim, at the sizes: 16384 tokens × 2048 and
/// × 8192 features (B 8, S 2048, H 16/64, D 128). Ours against the TorchSharp composite (the
/// reference path run on the GPU) and a copy of x (the floor: x read once, out written once).
/// </summary>
public class RotaryBenchmarks : GpuBenchmark
{
    [Params(16, 64)]
    public int Heads;

    private Tensor _x = null!, _out = null!, _cos = null!, _sin = null!;

    // x read and out written (bf16), cos/sin read once (bf16, 2048 x 64 each).
    public override long Bytes(string method) => 2L * 8 * 2048 * Heads * 128 * 2 + 2L * 2048 * 64 * 2;

    protected override void Setup()
    {
        _x = randn(8, 2048, Heads, 128, dtype: ScalarType.BFloat16, device: Dev);
        _out = empty_like(_x);
        var inv = 1.0 / pow(10000.0, arange(0, 128, 2, dtype: ScalarType.Float32, device: Dev) / 128.0);
        var freqs = outer(arange(2048, dtype: ScalarType.Float32, device: Dev), inv);
        _cos = freqs.cos().to(ScalarType.BFloat16);
        _sin = freqs.sin().to(ScalarType.BFloat16);
    }

    [Benchmark(OperationsPerInvoke = Launches)]
    public void Ours()
    {
        for (int i = 0; i < Launches; i++)
        {
            using var scope = NewDisposeScope();
            flash_attn.apply_rotary_emb(_x, _cos, _sin);
        }
        Sync();
    }

    [Benchmark(OperationsPerInvoke = Launches)]
    public void TorchSharpComposite()
    {
        for (int i = 0; i < Launches; i++)
        {
            using var scope = NewDisposeScope();
            Reference.rotary(_x, _cos, _sin);
        }
        Sync();
    }

    [Benchmark(Baseline = true, OperationsPerInvoke = Launches)]
    public void CopyFloor()
    {
        for (int i = 0; i < Launches; i++) _out.copy_(_x);
        Sync();
    }
}
