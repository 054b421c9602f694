using System.Runtime.InteropServices;
using NUnit.Framework;
using TorchSharp;
using static TorchSharp.torch;

namespace FlashAttn.Tests;

/// <summary>
/// Backward on CUDA runs on libtorch's device thread, outside the caller's dispose scope: tensors made there
/// must not wait for a garbage collection (BackwardGuard). Each op runs forward + backward many times under a
/// dispose scope per step, with the GC kept out of it, and the device memory in use (cudaMemGetInfo, so the
/// caching allocator's growth counts) may not grow by more than a few steps' worth.
/// </summary>
[Category(Gpu.Category)]
public sealed class BackwardMemoryCudaTests
{
    private delegate int MemGetInfo(out ulong free, out ulong total);

    private static long UsedBytes()
    {
        foreach (var lib in new[] { "libcudart.so.13", "libcudart.so.12", "libcudart.so" })
        {
            if (NativeLibrary.TryLoad(lib, out var h) && NativeLibrary.TryGetExport(h, "cudaMemGetInfo", out var f))
            {
                var get = Marshal.GetDelegateForFunctionPointer<MemGetInfo>(f);
                Assert.That(get(out var free, out var total), Is.EqualTo(0), "cudaMemGetInfo");
                return (long)(total - free);
            }
        }
        Assert.Ignore("no CUDA runtime library (libcudart) to read the device memory from");
        return 0;
    }

    private static IEnumerable<TestCaseData> Ops()
    {
        yield return new TestCaseData("dropout_add_layer_norm").SetName("NoGrowth_DropoutAddLayerNorm");
        yield return new TestCaseData("fused_mlp").SetName("NoGrowth_FusedMlp");
        yield return new TestCaseData("cross_entropy").SetName("NoGrowth_CrossEntropy");
        yield return new TestCaseData("flash_attn").SetName("NoGrowth_FlashAttn");
        yield return new TestCaseData("rotary").SetName("NoGrowth_Rotary");
    }

    [TestCaseSource(nameof(Ops))]
    public void RepeatedBackwardsDoNotAccumulateDeviceMemory(string op)
    {
        var dev = Gpu.Require();
        var bf = ScalarType.BFloat16;
        const long rows = 4096, width = 2048; // 16 MiB per (rows, width) bf16 tensor
        var x = randn(new long[] { rows, width }, dtype: bf, device: dev).requires_grad_(true);
        var res = randn(new long[] { rows, width }, dtype: bf, device: dev).requires_grad_(true);
        var w = ones(width, device: dev).requires_grad_(true);
        var b = zeros(width, device: dev).requires_grad_(true);
        var w1 = (randn(new long[] { 4 * width, width }, dtype: bf, device: dev) / 45).requires_grad_(true);
        var w2 = (randn(new long[] { width, 4 * width }, dtype: bf, device: dev) / 90).requires_grad_(true);
        var labels = randint(0, width, new long[] { rows }, device: dev);
        var qkv = randn(new long[] { 4, 1024, 16, 128 }, dtype: bf, device: dev).requires_grad_(true);
        var (cos, sin) = (randn(1024, 64, device: dev), randn(1024, 64, device: dev));
        var inputs = new[] { x, res, w, b, w1, w2, qkv };
        void Step()
        {
            using var scope = NewDisposeScope();
            Tensor loss = op switch
            {
                "dropout_add_layer_norm" => flash_attn.dropout_add_layer_norm(x, res, w, b, 0.1, 1e-5, prenorm: true).Item1.sum(),
                "fused_mlp" => flash_attn.fused_mlp_func(x, w1, w2).sum(),
                "cross_entropy" => flash_attn.cross_entropy_loss(x, labels).loss.sum(),
                // with_lse: our kernels' autograd function (flash_attn_func may take SDPA on this shape)
                "flash_attn" => flash_attn.flash_attn_func_with_lse(qkv, qkv * 0.5, qkv * 0.25, causal: true).output.sum(),
                _ => flash_attn.apply_rotary_emb(qkv, cos.to(bf), sin.to(bf)).sum(),
            };
            loss.backward();
            foreach (var t in inputs) t.grad?.zero_();
        }
        for (int i = 0; i < 5; i++) Step(); // caching allocator, cuBLASLt workspace, first-use state
        cuda.synchronize();
        long before = UsedBytes();
        bool noGc = GC.TryStartNoGCRegion(16 << 20);
        try
        {
            for (int i = 0; i < 60; i++) Step();
            cuda.synchronize();
        }
        finally
        {
            if (noGc && System.Runtime.GCSettings.LatencyMode == System.Runtime.GCLatencyMode.NoGCRegion) GC.EndNoGCRegion();
        }
        long grown = UsedBytes() - before;
        // a leak of one (rows, width) gradient per step would be 60 x 16 MiB; a few steps' worth of slack
        Assert.That(grown, Is.LessThan(128L << 20), $"{op}: device memory grew by {grown / 1048576.0:F0} MiB over 60 steps");
    }
}
