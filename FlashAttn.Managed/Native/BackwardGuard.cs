using TorchSharp;
using static TorchSharp.torch;

namespace FlashAttn;

/// <summary>
/// An exception escaping a custom autograd function's backward aborts the whole process (TorchSharp
/// calls it from native code). Every backward runs inside <see cref="Run"/>: a failure (a CUDA
/// error, a saved tensor modified in place by the caller, ...) is written to stderr and kept in
/// <see cref="LastBackwardError"/>, and the gradients of that function are left undefined (no
/// gradient flows), so the training loop or test can surface it instead of dying.
/// </summary>
public static class BackwardGuard
{
    private static string? s_lastError;

    /// <summary>The last backward failure ("Function: message"), or null; see <see cref="ClearLastBackwardError"/>.</summary>
    public static string? LastBackwardError => Volatile.Read(ref s_lastError);

    public static void ClearLastBackwardError() => Volatile.Write(ref s_lastError, null);

    internal static List<Tensor> Run(string function, int arguments, Func<List<Tensor>> backward)
    {
        try
        {
            return backward();
        }
        catch (Exception e)
        {
            var message = $"{function}.backward: {e.GetType().Name}: {e.Message.Split('\n')[0]}";
            Volatile.Write(ref s_lastError, message);
            Console.Error.WriteLine($"FlashAttn: {message} (gradients of this function are undefined)");
            return Enumerable.Repeat<Tensor>(null!, arguments).ToList();
        }
    }
}
