using BenchmarkDotNet.Attributes;
using TorchSharp;
using static TorchSharp.torch;

namespace FlashAttn.Benchmarks;

/// <summary>
/// Cross-entropy forward + backward over 16384 rows × a GPT-2 (50257) or Llama-3 (128256 at 4096 rows)
/// vocabulary, bf16 logits. Ours runs the in-place backward (the gradient overwrites the logits: read once
/// forward, read once and written once backward = 3 logits-sized transfers); the composite is TorchSharp's
/// functional.cross_entropy on float32-upcast logits; the floor copies the same 3 × N × V bf16 bytes.
/// </summary>
public class CrossEntropyBenchmarks : GpuBenchmark
{
    [Params(50257, 128256)]
    public int Vocab;

    private long Rows => Vocab > 100000 ? 4096 : 16384;

    private Tensor _logits = null!, _labels = null!, _dloss = null!, _copySrc = null!, _copyDst = null!;

    // logits read forward, read and written backward (bf16); also what CopyFloor moves. The forward alone reads once.
    public override long Bytes(string method) => (method == nameof(OursForward) ? 1 : 3) * Rows * Vocab * 2;

    protected override void Setup()
    {
        _logits = randn(Rows, Vocab, dtype: ScalarType.BFloat16, device: Dev).requires_grad_(true);
        _labels = randint(0, Vocab, new long[] { Rows }, device: Dev);
        _dloss = full(Rows, 1.0f / Rows, device: Dev);
        _copySrc = empty(3 * Rows * Vocab / 2, dtype: ScalarType.BFloat16, device: Dev);
        _copyDst = empty_like(_copySrc);
    }

    [Benchmark(OperationsPerInvoke = Launches)]
    public void Ours()
    {
        for (int i = 0; i < Launches; i++)
        {
            using var scope = NewDisposeScope();
            var (loss, _) = flash_attn.cross_entropy_loss(_logits, _labels, inplace_backward: true);
            // the gradient lands in _logits' storage; autograd.grad keeps it out of .grad
            autograd.grad(new List<Tensor> { loss }, new List<Tensor> { _logits }, new List<Tensor> { _dloss });
        }
        Sync();
    }

    [Benchmark(OperationsPerInvoke = Launches)]
    public void OursForward()
    {
        using var _ = no_grad();
        for (int i = 0; i < Launches; i++)
        {
            using var scope = NewDisposeScope();
            flash_attn.cross_entropy_loss(_logits, _labels);
        }
        Sync();
    }

    [Benchmark(OperationsPerInvoke = Launches)]
    public void TorchSharpComposite()
    {
        for (int i = 0; i < Launches; i++)
        {
            using var scope = NewDisposeScope();
            var loss = nn.functional.cross_entropy(_logits.to(ScalarType.Float32), _labels);
            autograd.grad(new List<Tensor> { loss }, new List<Tensor> { _logits });
        }
        Sync();
    }

    [Benchmark(Baseline = true, OperationsPerInvoke = Launches)]
    public void CopyFloor()
    {
        for (int i = 0; i < Launches; i++) _copyDst.copy_(_copySrc);
        Sync();
    }
}
