using NUnit.Framework;

namespace FlashAttn.Tests;

/// <summary>Loads a CUDA libtorch from PyTorch when FLASHATTN_TORCH_LIB is set (the GPU host).</summary>
[SetUpFixture]
public sealed class Setup
{
    [OneTimeSetUp]
    public void LoadTorch()
    {
        Environment.SetEnvironmentVariable("TESTINGPLATFORM_TELEMETRY_OPTOUT", "1");
        if (LibTorchLoader.LoadFromEnvironment())
            TestContext.Progress.WriteLine($"libtorch from {LibTorchLoader.LoadedFrom}; {Backend.NativeBuildInfo}");
    }
}
