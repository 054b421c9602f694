using System.Runtime.InteropServices;
using FlashAttn.Interop;
using TorchSharp;
using static TorchSharp.torch;

namespace FlashAttn;

/// <summary>
/// Every custom backward runs inside <see cref="Run"/>, which does two jobs.
/// <para>Failures: an exception escaping a backward aborts the whole process (TorchSharp calls it from native
/// code), so every failure is written to stderr and kept in <see cref="LastBackwardError"/> here, and the training
/// loop or test surfaces it instead of dying. An exception (a saved tensor modified in place by the caller, ...)
/// leaves the gradients of that function undefined (no gradient flows: they may not exist yet); a native call that
/// fails after its gradients were allocated (<see cref="Check"/>) makes them NaN, which a training loop's
/// non-finite check catches.</para>
/// <para>Memory: on CUDA, libtorch runs backward on its own device thread, where no dispose scope of the caller
/// is active, so every tensor made there (the incoming gradients' wrappers, the unpacked saved tensors,
/// temporaries, the returned gradients) kept its storage until a garbage collection, which a small managed heap
/// rarely triggers: the norm backward benchmark filled the H100's 80 GB that way.
/// Run disposes all of them when the backward returns, except the gradients it returns: TorchSharp copies their
/// native handles after Run returns, so they are released at the same thread's next backward.</para>
/// <para>Parameters' gradients: that kept reference is still there when libtorch hands a returned gradient to the
/// parameter's AccumulateGrad, which runs before any other node (its sequence number is the largest), and a gradient
/// referenced twice is copied into .grad instead of taken (a device-to-device copy and an allocation per parameter and
/// step when the optimizer sets gradients to none). <see cref="Parameter"/> avoids it.</para>
/// </summary>
public static class BackwardGuard
{
    private static string? s_lastError;

    // The gradients this thread's last backward returned, disposed at its next. One may be a parameter's .grad itself
    // (taken through Parameter's view): they are only disposed, never read or written (the tests compare them with .grad).
    [ThreadStatic] internal static List<Tensor>? t_returned;
    // the function whose backward runs on this thread, for Check's message
    [ThreadStatic] private static string? t_function;

    /// <summary>The last backward failure ("Function: message"), or null; see <see cref="ClearLastBackwardError"/>.</summary>
    public static string? LastBackwardError => Volatile.Read(ref s_lastError);

    public static void ClearLastBackwardError() => Volatile.Write(ref s_lastError, null);

    /// <param name="function">the autograd function's name, for messages.</param>
    /// <param name="arguments">how many gradients to return (one per apply() argument).</param>
    /// <param name="incoming">the gradient wrappers TorchSharp passed to backward: released with the temporaries.</param>
    /// <param name="backward">the backward proper.</param>
    internal static List<Tensor> Run(string function, int arguments, IEnumerable<Tensor?> incoming, Func<List<Tensor>> backward)
    {
        // the previous backward on this thread has returned to libtorch, which holds its own references by now
        if (t_returned is { Count: > 0 } previous)
        {
            foreach (var t in previous) t.Dispose();
            previous.Clear();
        }
        using var scope = NewDisposeScope();
        foreach (var t in incoming)
            if (t is not null && !scope.Contains(t)) scope.Attach(t);
        List<Tensor> grads;
        t_function = function;
        try
        {
            grads = backward();
        }
        catch (Exception e)
        {
            Record(function, $"{e.GetType().Name}: {e.Message.Split('\n')[0]}", "gradients of this function are undefined");
            return Enumerable.Repeat<Tensor>(null!, arguments).ToList();
        }
        finally
        {
            t_function = null;
        }
        var keep = t_returned ??= new List<Tensor>();
        foreach (var g in grads)
        {
            if (g is null || Holds(keep, g)) continue;
            if (scope.Contains(g)) scope.Detach(g);
            keep.Add(g);
        }
        return grads;
    }

    /// <summary>Whether <paramref name="list"/> holds this very wrapper: a loop, where Any's lambda would allocate a closure
    /// per call in every backward of a step.</summary>
    internal static bool Holds(List<Tensor> list, Tensor t)
    {
        foreach (var k in list)
            if (ReferenceEquals(k, t)) return true;
        return false;
    }

    /// <summary>
    /// A parameter (weight or bias) as a custom function's apply() argument: while gradients are recorded, a leaf that
    /// requires grad goes in behind a view of itself, so that the gradient the backward returns for it becomes its .grad
    /// without a copy; anything else goes in as it is.
    /// <para>Why the view: TorchSharp's CSharpNode::apply copies the at::Tensor of each returned gradient out of its
    /// managed wrapper, which keeps its reference until Run disposes it at the thread's next backward; the parameter's
    /// AccumulateGrad runs before that, counts two references, and clones (libtorch's accumulateGrad steals a gradient
    /// only when use_count() is 1). Behind the view, AccumulateGrad receives ViewBackward0's reshape of the gradient: a
    /// new tensor over the same memory, referenced once, which it takes as .grad. No wrapper is disposed earlier than
    /// before: the kept one only shares its memory with .grad.</para>
    /// <para>Only for arguments whose backward computes the gradient into memory of its own (a weight's or a bias's
    /// reduction): the reference count is how libtorch knows that no other tensor sees that memory, and the view hides
    /// it, so a returned gradient sharing memory with another one or with the incoming gradient (the norm reference's
    /// dx0 and dresidual are one tensor when nothing scales x0) would become .grad of two leaves at once.</para>
    /// <para>FLASHATTN_GRAD_VIEW=0 (read once) passes parameters as they are: libtorch's copies back, for measuring
    /// what the views cost and save in a training step.</para>
    /// </summary>
    internal static Tensor? Parameter(Tensor? t) =>
        s_viewParameters && t is not null && t.requires_grad && t.is_leaf && is_grad_enabled() ? t.view(TensorArgs.Sizes(t)) : t;

    private static readonly bool s_viewParameters = Environment.GetEnvironmentVariable("FLASHATTN_GRAD_VIEW") != "0";

    /// <summary>
    /// Inside a backward run by <see cref="Run"/>: a native call that returned <paramref name="status"/> other than Ok
    /// is recorded with the library's message, and <paramref name="gradients"/> (allocated, their contents
    /// unwritten) are filled with NaN.
    /// </summary>
    internal static void Check(FlashAttnStatus status, params Tensor?[] gradients)
    {
        if (status == FlashAttnStatus.Ok) return;
        Record(t_function ?? "(outside BackwardGuard.Run)", $"{status}: {Marshal.PtrToStringUTF8(NativeMethods.FlashAttn_core_last_error())}",
               "gradients of this function are NaN");
        foreach (var g in gradients) g?.fill_(double.NaN);
    }

    private static void Record(string function, string failure, string consequence)
    {
        var message = $"{function}.backward: {failure}";
        Volatile.Write(ref s_lastError, message);
        Console.Error.WriteLine($"FlashAttn: {message} ({consequence})");
    }
}
