using NUnit.Framework;
using TorchSharp;

namespace FlashAttn.Tests;

/// <summary>Guards for tests in category Cuda: skipped (with the reason) where no GPU exists.</summary>
internal static class Gpu
{
    internal const string Category = "Cuda";

    /// <summary>Ignores the test without a CUDA device; fails it when a GPU exists but the loaded
    /// libflashattn has no kernels (a wrong FLASHATTN_NATIVE_PATH must not pass as a skip).</summary>
    internal static torch.Device Require()
    {
        if (!torch.cuda.is_available())
            Assert.Ignore("no CUDA device (TorchSharp reports none): this Cuda test runs on the GPU host, see CONTRIBUTING.md");
        Assert.That(Backend.NativeHasCuda, Is.True,
            $"a CUDA device exists but libflashattn is the CPU-only build ({Backend.NativeBuildInfo}); set FLASHATTN_NATIVE_PATH");
        Assert.That(Backend.Capability(0), Is.GreaterThanOrEqualTo(Backend.MinimumCapability), "GPU older than sm_80");
        return torch.CUDA;
    }
}
