using System.Collections.Concurrent;
using FlashAttn.Interop;
using TorchSharp;
using static FlashAttn.Interop.TensorArgs;
using static TorchSharp.torch;

namespace FlashAttn;

/// <summary>
/// Errors found on the GPU. A kernel that meets invalid input there (a cross-entropy label outside the vocabulary, a
/// failed <see cref="flash_attn.assert_async"/>) cannot throw without the host waiting for the device: it makes that
/// input's results NaN and records the error in libflashattn's device-error record (pinned host memory, see
/// flashattn.h), which every flash_attn function reads at entry without synchronising (<see cref="Raise"/>) and
/// <see cref="flash_attn.check_errors"/> reads after synchronising. A raised error is cleared.
/// </summary>
internal static class DeviceErrors
{
    // Set when a checking kernel is first launched: until then nothing can be recorded, and no op calls the library.
    private static volatile bool s_armed;
    private static readonly ConcurrentDictionary<(string argument, string message), int> s_codes = new();
    private static readonly ConcurrentDictionary<int, (string argument, string message)> s_checks = new();
    private static int s_lastCode = (int)FlashAttnDeviceCheck.Caller - 1;

    internal static bool Armed => s_armed;

    /// <summary>Called before launching a kernel that may record an error.</summary>
    internal static void Arm() => s_armed = true;

    /// <summary>Throws (and clears) the error recorded on the device, if any: one read of host memory, no wait.</summary>
    internal static unsafe void Raise()
    {
        if (!s_armed) return;
        int check = 0;
        long index = 0, value = 0;
        NativeMethods.Check(NativeMethods.FlashAttn_core_device_error(1, (IntPtr)(&check), (IntPtr)(&index), (IntPtr)(&value)));
        if (check == (int)FlashAttnDeviceCheck.None) return;
        if (check == (int)FlashAttnDeviceCheck.CrossEntropyLabel)
        {
            throw new ArgumentException(
                $"an earlier call of cross_entropy_loss on the GPU met label {value} in row {index}, outside [0, vocab) and not " +
                "ignore_index: that row's loss and gradient are NaN", "labels");
        }
        var (argument, message) = s_checks.TryGetValue(check, out var c) ? c : ("?", $"device check {check}");
        throw new ArgumentException($"an earlier call on the GPU failed at element {index}: {message}", argument);
    }

    /// <summary><see cref="flash_attn.assert_async"/> without reading the record first (for use inside an op).</summary>
    internal static void Check(Tensor condition, string argument, string message)
    {
        Require(condition.dtype == ScalarType.Bool, "condition", $"condition must be bool, got {condition.dtype}");
        // the check kernel is built for the kernels' GPUs alone: elsewhere one synchronising read
        if (condition.device_type != DeviceType.CUDA || !Backend.NativeHasCuda ||
            Backend.Capability(condition.device_index) < Backend.MinimumCapability)
        {
            using var all = condition.all();
            if (!Item<bool>(all)) throw new ArgumentException(message, argument);
            return;
        }
        using var c = condition.contiguous();
        Arm();
        NativeMethods.Check(NativeMethods.FlashAttn_core_device_check(Ptr(c), c.numel(), Code(argument, message), IntPtr.Zero));
    }

    /// <summary>The record's code of a caller's check (one per distinct argument and message).</summary>
    internal static int Code(string argument, string message) => s_codes.GetOrAdd((argument, message), key =>
    {
        int code = Interlocked.Increment(ref s_lastCode);
        s_checks[code] = key;
        return code;
    });
}

public static partial class flash_attn
{
    /// <summary>
    /// Waits for the current CUDA device, then raises the first error a device-side check recorded (an ArgumentException
    /// naming the argument: a cross-entropy label outside the vocabulary, a failed <see cref="assert_async"/>) and clears
    /// it. Every flash_attn function raises such an error at its next call without waiting; this is the definitive check,
    /// e.g. at the end of a training step. Returns at once when no checking kernel has run.
    /// </summary>
    public static void check_errors()
    {
        if (!DeviceErrors.Armed) return;
        cuda.synchronize();
        DeviceErrors.Raise();
    }

    /// <summary>
    /// Requires every element of <paramref name="condition"/> (bool) to be true, else an ArgumentException with
    /// <paramref name="message"/> naming <paramref name="argument"/>. On the CPU it throws now. On a GPU it does not wait
    /// for the device: a kernel records the failure, raised by the next flash_attn call or by <see cref="check_errors"/>,
    /// and the caller makes the affected results NaN meanwhile (as cross_entropy_loss does for its labels). The message
    /// should not vary between calls: each distinct (argument, message) pair keeps a code for the life of the process.
    /// </summary>
    public static void assert_async(Tensor condition, string argument, string message)
    {
        DeviceErrors.Raise();
        DeviceErrors.Check(condition, argument, message);
    }
}
