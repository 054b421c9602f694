using System.Runtime.InteropServices;
using FlashAttn.Interop;
using NUnit.Framework;

namespace FlashAttn.Tests;

/// <summary>The real libflashattn (CPU flavour in CI): loading, ABI version, status codes, messages.</summary>
public sealed class InteropTests
{
    [Test]
    public void LibraryLoadsWithMatchingAbiVersion()
    {
        Assert.That(NativeMethods.FlashAttn_core_abi_version(), Is.EqualTo(NativeMethods.AbiVersion));
        Assert.That(Backend.NativeBuildInfo, Does.StartWith("FlashAttn.Native"));
    }

    [Test]
    public void BuildFlavourMatchesBuildInfo()
    {
        var info = Backend.NativeBuildInfo;
        if (Backend.NativeHasCuda) Assert.That(info, Does.Contain("cuda").And.Contain("archs"));
        else Assert.That(info, Does.Contain("cpu-only"));
    }

    [Test]
    public void InvalidArgumentNamesFunctionAndArgument()
    {
        // rotary_dim 7 is odd: rejected by the native validation before any CUDA work.
        var status = Rotary(rotaryDim: 7);
        Assert.That(status, Is.EqualTo(FlashAttnStatus.InvalidArgument));
        var message = LastError();
        Assert.That(message, Does.StartWith("FlashAttn_rotary_apply: rotary_dim (7) must be even"));
    }

    [Test]
    public void CheckTurnsInvalidArgumentIntoArgumentException()
    {
        var e = Assert.Throws<ArgumentException>(() => NativeMethods.Check(Rotary(rotaryDim: 7)));
        Assert.That(e!.Message, Does.Contain("rotary_dim"));
    }

    [Test]
    public void CpuFlavourAnswersNoCudaForValidCalls()
    {
        if (Backend.NativeHasCuda) Assert.Ignore("libflashattn is the CUDA flavour here; this checks the CPU-only one");
        var status = Rotary(rotaryDim: 8);
        Assert.That(status, Is.EqualTo(FlashAttnStatus.NoCuda));
        Assert.That(LastError(), Does.Contain("built without CUDA support"));
        var e = Assert.Throws<FlashAttnException>(() => NativeMethods.Check(status));
        Assert.That(e!.Status, Is.EqualTo("NoCuda"));
    }

    [Test]
    public void LastErrorIsPerThreadAndClearedBySuccess()
    {
        Assert.That(Rotary(rotaryDim: 7), Is.EqualTo(FlashAttnStatus.InvalidArgument));
        string? other = null;
        var thread = new Thread(() => other = LastError());
        thread.Start();
        thread.Join();
        Assert.That(other, Is.Empty, "another thread must not see this thread's error");
        Assert.That(LastError(), Is.Not.Empty);
        // batch 0 is a valid no-op: success clears the error.
        Assert.That(Rotary(rotaryDim: 8, batch: 0), Is.EqualTo(FlashAttnStatus.Ok));
        Assert.That(LastError(), Is.Empty);
    }

    [Test]
    public void DeviceCapabilityRejectsNullOutput()
    {
        Assert.That(NativeMethods.FlashAttn_core_device_capability(0, IntPtr.Zero), Is.EqualTo(FlashAttnStatus.InvalidArgument));
        Assert.That(LastError(), Does.Contain("capability must not be NULL"));
    }

    [Test]
    public unsafe void BackwardSupportQueryValidatesItsArguments()
    {
        int supported = -1;
        Assert.That(NativeMethods.FlashAttn_flash_bwd_supported(0, 128, IntPtr.Zero), Is.EqualTo(FlashAttnStatus.InvalidArgument));
        Assert.That(LastError(), Does.Contain("supported must not be NULL"));
        Assert.That(NativeMethods.FlashAttn_flash_bwd_supported(0, 264, (IntPtr)(&supported)), Is.EqualTo(FlashAttnStatus.InvalidArgument));
        Assert.That(LastError(), Does.Contain("headdim (264) must be in [1, 256]"));
        Assert.That(supported, Is.EqualTo(-1), "nothing written on a rejected call");
        if (!Backend.NativeHasCuda)
            Assert.That(NativeMethods.FlashAttn_flash_bwd_supported(0, 128, (IntPtr)(&supported)), Is.EqualTo(FlashAttnStatus.NoCuda));
    }

    [Test]
    public void ResolverHonoursNativePathVariable()
    {
        var saved = Environment.GetEnvironmentVariable(NativeMethods.NativePathVariable);
        try
        {
            Environment.SetEnvironmentVariable(NativeMethods.NativePathVariable, "/opt/somewhere");
            var candidates = NativeMethods.Candidates(typeof(NativeMethods).Assembly).ToList();
            Assert.That(candidates, Is.EqualTo(new[] { "/opt/somewhere" }));
        }
        finally
        {
            Environment.SetEnvironmentVariable(NativeMethods.NativePathVariable, saved);
        }
    }

    private static string LastError() => Marshal.PtrToStringUTF8(NativeMethods.FlashAttn_core_last_error()) ?? "";

    // Host memory is enough: validation and the CPU flavour never dereference the pointers.
    private static unsafe FlashAttnStatus Rotary(int rotaryDim, long batch = 1)
    {
        var buffer = stackalloc float[64];
        var p = (IntPtr)buffer;
        return NativeMethods.FlashAttn_rotary_apply(p, p, FlashAttnDType.Float32, p, p, FlashAttnDType.Float32,
            IntPtr.Zero, IntPtr.Zero, 0, batch, 2, 1, 8, rotaryDim, 2, rotaryDim / 2,
            16, 8, 8, 16, 8, 8, 0, 0, IntPtr.Zero);
    }
}
