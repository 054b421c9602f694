using System.Runtime.InteropServices;
using TorchSharp;
using static TorchSharp.torch;

namespace FlashAttn.Benchmarks;

/// <summary>
/// Peak memory of forward + backward (not a timing): `FlashAttn.Benchmarks --memory`, run with
/// PYTORCH_NO_CUDA_MEMORY_CACHING=1 so that every tensor is its own cudaMalloc and the device's used memory
/// (NVML, sampled by a second thread) follows the live tensors. Each variant prints the memory still held
/// after the forward (what the backward keeps) and the peak over forward + backward, both above the memory
/// before the forward (inputs and the incoming gradient already allocated).
/// MLP: the composite and ours at checkpoint levels 0, 1, 2, at the DenseBenchmarks shapes.
/// Cross-entropy: 16384 × 50257 bf16 logits, ours (in-place backward) against TorchSharp's cross_entropy on
/// float32-upcast logits (what PyTorch's baseline measures: 10.7 GiB extra on the H100).
/// GPT: one bf16 training step (forward, backward, optimizer) of GPT-2 124M and 350M at B16 T1024, fusions on and
/// off, as the GptBenchmarks configure them (with the fusions on, the trainer's FusedAdamW and its fp32 master weights); the peak above the memory before the model was built, so weights,
/// gradients and optimizer state count (what PyTorch's max_memory_allocated reports in the peer script).
/// </summary>
public static class Memory
{
    [StructLayout(LayoutKind.Sequential)]
    private struct NvmlMemory { public ulong Total, Free, Used; }

    private const string Nvml = "libnvidia-ml.so.1";
    [DllImport(Nvml, EntryPoint = "nvmlInit_v2")] private static extern int NvmlInit();
    [DllImport(Nvml, EntryPoint = "nvmlDeviceGetHandleByIndex_v2")] private static extern int NvmlDevice(uint index, out IntPtr device);
    [DllImport(Nvml, EntryPoint = "nvmlDeviceGetMemoryInfo")] private static extern int NvmlMemoryInfo(IntPtr device, out NvmlMemory memory);

    private static IntPtr _device;

    private static ulong Used() => NvmlMemoryInfo(_device, out var m) == 0 ? m.Used : 0;

    public static int Run()
    {
        if (Environment.GetEnvironmentVariable("PYTORCH_NO_CUDA_MEMORY_CACHING") != "1")
        {
            Console.Error.WriteLine("--memory needs PYTORCH_NO_CUDA_MEMORY_CACHING=1 (else the caching allocator hides frees)");
            return 2;
        }
        if (NvmlInit() != 0 || NvmlDevice(0, out _device) != 0) { Console.Error.WriteLine("NVML unavailable"); return 2; }
        Mlp();
        CrossEntropy();
        Gpt();
        return 0;
    }

    /// <summary>Runs forward then backward once (after one warm-up of each variant) and prints held and peak memory.</summary>
    private static void Measure(string section, (string name, Func<Tensor> forward, Action<Tensor> backward)[] variants)
    {
        foreach (var (_, forward, backward) in variants) // warm-up: handles, workspaces, heuristics
        {
            using var s = NewDisposeScope();
            backward(forward());
        }
        cuda.synchronize();
        foreach (var (name, forward, backward) in variants)
        {
            ulong before = Used(), peak = before, held;
            bool sampling = true;
            var sampler = new Thread(() => { while (Volatile.Read(ref sampling)) { var u = Used(); if (u > peak) peak = u; } });
            sampler.Start();
            using (var s = NewDisposeScope())
            {
                var y = forward();
                cuda.synchronize();
                held = Used() - before;
                backward(y);
                cuda.synchronize();
            }
            Volatile.Write(ref sampling, false);
            sampler.Join();
            Console.WriteLine($"bench\t{section} {name} held after forward\t{held / 1048576.0:F1}\tMiB");
            Console.WriteLine($"bench\t{section} {name} peak forward+backward\t{(peak - before) / 1048576.0:F1}\tMiB");
        }
    }

    private static void Mlp()
    {
        foreach (var width in new[] { 768, 1600 })
        {
            long tokens = DenseBenchmarks.Tokens, hidden = 4 * width;
            var dt = ScalarType.BFloat16;
            var x = randn(new long[] { tokens, width }, dtype: dt, device: CUDA).requires_grad_(true);
            var w1 = (randn(new long[] { hidden, width }, dtype: dt, device: CUDA) / Math.Sqrt(width)).requires_grad_(true);
            var b1 = zeros(new long[] { hidden }, dtype: dt, device: CUDA).requires_grad_(true);
            var w2 = (randn(new long[] { width, hidden }, dtype: dt, device: CUDA) / Math.Sqrt(hidden)).requires_grad_(true);
            var b2 = zeros(new long[] { width }, dtype: dt, device: CUDA).requires_grad_(true);
            var g = randn(new long[] { tokens, width }, dtype: dt, device: CUDA);
            var inputs = new[] { x, w1, b1, w2, b2 };
            Action<Tensor> backward = y => autograd.grad(new[] { y }, inputs, new[] { g });
            Measure($"Memory MLP Width={width}", new (string, Func<Tensor>, Action<Tensor>)[]
            {
                ("composite", () => DenseBenchmarks.Composite(x, w1, b1, w2, b2), backward),
                ("ours lvl0", () => flash_attn.fused_mlp_func(x, w1, w2, b1, b2, checkpoint_lvl: 0), backward),
                ("ours lvl1", () => flash_attn.fused_mlp_func(x, w1, w2, b1, b2, checkpoint_lvl: 1), backward),
                ("ours lvl2", () => flash_attn.fused_mlp_func(x, w1, w2, b1, b2, checkpoint_lvl: 2), backward),
            });
            foreach (var t in inputs.Append(g)) t.Dispose();
        }
    }

    private static void Gpt()
    {
        // the fused MLP's checkpoint level 1 (its GELU output recomputed in the backward) where the step's peak was above
        // torch.compile's
        var cases = new[] { ("gpt2s", true, 0), ("gpt2s", false, 0), ("gpt2m", true, 0), ("gpt2m", true, 1), ("gpt2m", false, 0) };
        foreach (var (model, fused, lvl) in cases)
        {
            cuda.synchronize();
            ulong before = Used(), peak = before;
            using (var scope = NewDisposeScope())
            {
                manual_seed(0);
                var config = GptBenchmarks.Config(model, fused) with { mlp_checkpoint_lvl = lvl };
                using var m = new FlashAttn.Models.GPTLMHeadModel(config, CUDA, ScalarType.BFloat16);
                using var opt = GptBenchmarks.Optimizer(m, fused);
                var ids = randint(0, 50257, new long[] { 16, 1024 }, device: CUDA);
                void Step()
                {
                    using var s = NewDisposeScope();
                    m.loss(ids, ids).backward();
                    opt.step();
                    opt.zero_grad();
                }
                Step(); // optimizer state allocated
                cuda.synchronize();
                bool sampling = true;
                var sampler = new Thread(() => { while (Volatile.Read(ref sampling)) { var u = Used(); if (u > peak) peak = u; } });
                sampler.Start();
                Step();
                cuda.synchronize();
                Volatile.Write(ref sampling, false);
                sampler.Join();
            }
            var name = (fused ? "fused" : "plain") + (lvl > 0 ? $" mlp_checkpoint_lvl {lvl}" : "");
            Console.WriteLine($"bench\tMemory GPT {model} {name} bf16 B16 T1024 train step peak\t{(peak - before) / 1073741824.0:F2}\tGiB");
        }
    }

    private static void CrossEntropy()
    {
        const long rows = 16384, vocab = 50257;
        var logits = randn(new long[] { rows, vocab }, dtype: ScalarType.BFloat16, device: CUDA).requires_grad_(true);
        var labels = randint(0, vocab, new long[] { rows }, device: CUDA);
        Console.WriteLine($"bench\tMemory CrossEntropy {rows}x{vocab} logits size\t{rows * vocab * 2 / 1048576.0:F1}\tMiB");
        // both reduce to the mean; the gradient of ours lands in the logits' storage (autograd.grad keeps it
        // out of .grad), the composite's is a new bf16 tensor plus its float32 intermediates
        Measure($"Memory CrossEntropy {rows}x{vocab}", new (string, Func<Tensor>, Action<Tensor>)[]
        {
            ("composite fp32-upcast", () => nn.functional.cross_entropy(logits.to(ScalarType.Float32), labels),
                y => autograd.grad(new[] { y }, new[] { logits })),
            ("ours inplace_backward", () => flash_attn.cross_entropy_loss(logits, labels, inplace_backward: true).loss.mean(),
                y => autograd.grad(new[] { y }, new[] { logits })),
        });
        logits.Dispose();
        labels.Dispose();
    }
}
