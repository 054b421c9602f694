using TorchSharp;
using static TorchSharp.torch;

namespace FlashAttn;

/// <summary>
/// Every custom backward runs inside <see cref="Run"/>, which does two jobs.
/// <para>Failures: an exception escaping a backward aborts the whole process (TorchSharp calls it from native
/// code). A failure (a CUDA error, a saved tensor modified in place by the caller, ...) is written to stderr and
/// kept in <see cref="LastBackwardError"/>, and the gradients of that function are left undefined (no gradient
/// flows), so the training loop or test can surface it instead of dying.</para>
/// <para>Memory: on CUDA, libtorch runs backward on its own device thread, where no dispose scope of the caller
/// is active, so every tensor made there (the incoming gradients' wrappers, the unpacked saved tensors,
/// temporaries, the returned gradients) kept its storage until a garbage collection, which a small managed heap
/// rarely triggers: the norm backward benchmark filled the H100's 80 GB that way (device run 17, 2026-11-25).
/// Run disposes all of them when the backward returns, except the gradients it returns: TorchSharp copies their
/// native handles after Run returns, so they are released at the same thread's next backward.</para>
/// </summary>
public static class BackwardGuard
{
    private static string? s_lastError;

    [ThreadStatic] private static List<Tensor>? t_returned;

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
        try
        {
            grads = backward();
        }
        catch (Exception e)
        {
            var message = $"{function}.backward: {e.GetType().Name}: {e.Message.Split('\n')[0]}";
            Volatile.Write(ref s_lastError, message);
            Console.Error.WriteLine($"FlashAttn: {message} (gradients of this function are undefined)");
            return Enumerable.Repeat<Tensor>(null!, arguments).ToList();
        }
        var keep = t_returned ??= new List<Tensor>();
        foreach (var g in grads)
        {
            if (g is null || keep.Any(k => ReferenceEquals(k, g))) continue;
            if (scope.Contains(g)) scope.Detach(g);
            keep.Add(g);
        }
        return grads;
    }
}
