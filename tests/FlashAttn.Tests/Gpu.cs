using NUnit.Framework;
using NUnit.Framework.Interfaces;
using NUnit.Framework.Internal;
using TorchSharp;

[assembly: FlashAttn.Tests.CudaTestsNeedAGpu]

namespace FlashAttn.Tests;

/// <summary>Guards for tests in category Cuda: skipped (with the reason) where no GPU exists.</summary>
internal static class Gpu
{
    internal const string Category = "Cuda";

    /// <summary>Whether TorchSharp sees a CUDA device (libtorch from PyTorch first where FLASHATTN_TORCH_LIB says so, as
    /// <see cref="Setup"/> loads it).</summary>
    internal static bool Available
    {
        get
        {
            LibTorchLoader.LoadFromEnvironment();
            return torch.cuda.is_available();
        }
    }

    /// <summary>The tests of category Cuda that <see cref="CudaTestsNeedAGpuAttribute"/> left out of this run.</summary>
    internal static int LeftOut { get; set; }

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

/// <summary>
/// Without a CUDA device the tests of category Cuda are left out of the run, and <see cref="CudaTestsRunOnTheGpuHost"/>
/// reports them as one skipped test: skipped one by one, dotnet test printed six lines for each (2,200 lines saying one
/// thing). NUnit applies an assembly's attributes once its tree of fixtures is built; with a GPU nothing changes.
/// </summary>
[AttributeUsage(AttributeTargets.Assembly)]
internal sealed class CudaTestsNeedAGpuAttribute : NUnitAttribute, IApplyToTest
{
    public void ApplyToTest(Test test)
    {
        if (!Gpu.Available) Gpu.LeftOut = LeaveOut(test);
    }

    static int LeaveOut(ITest suite)
    {
        int count = 0;
        foreach (var child in suite.Tests.ToList())
        {
            if (child.TypeInfo?.Type == typeof(CudaTestsRunOnTheGpuHost)) continue;
            if (child.Properties[PropertyNames.Category].Contains(Gpu.Category))
            {
                count += child.TestCaseCount;
                suite.Tests.Remove(child);
            }
            else count += LeaveOut(child);
        }
        return count;
    }
}

/// <summary>The one test that stands for the tests of category Cuda where there is no GPU (see
/// <see cref="CudaTestsNeedAGpuAttribute"/>); on the GPU host it checks that the library has its kernels.</summary>
[Category(Gpu.Category)]
public sealed class CudaTestsRunOnTheGpuHost
{
    [Test]
    public void CudaTestsNeedAGpu()
    {
        if (Gpu.LeftOut > 0)
            Assert.Ignore($"no CUDA device (TorchSharp reports none): {Gpu.LeftOut} tests of category Cuda are left out of this run; " +
                "they run on the GPU host, see CONTRIBUTING.md");
        Gpu.Require();
    }
}
