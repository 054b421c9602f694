using TorchSharp;

namespace FlashAttn.Interop;

/// <summary>
/// Scalars made from doubles, disposed together. TorchSharp converts a double argument (<c>t.mul_(0.9)</c>) into a
/// Scalar, a native object that no dispose scope takes (DisposeScope manages tensors only). Left to the finalizer, the
/// hundreds a training step makes lie scattered through glibc's heap between the step's large tensors, which then
/// cannot reuse the space they freed: the main job grew about 20 MB a step until a garbage collection ran.
/// </summary>
internal sealed class ScalarScope : IDisposable
{
    private readonly List<Scalar> _scalars = new();

    /// <summary>A Scalar of <paramref name="value"/>, disposed with this scope.</summary>
    internal Scalar Of(double value) => Add(value.ToScalar());

    /// <summary>An integer Scalar of <paramref name="value"/> (a count, an index), disposed with this scope.</summary>
    internal Scalar OfInt64(long value) => Add(value.ToScalar());

    private Scalar Add(Scalar s)
    {
        _scalars.Add(s);
        return s;
    }

    public void Dispose()
    {
        foreach (var s in _scalars) s.Dispose();
        _scalars.Clear();
    }
}

/// <summary>
/// The constant Scalars a training step passes at every call, made once: TorchSharp makes a Scalar, which goes to the
/// finalizer, for each number argument and for the defaults it passes itself (<c>a + b</c> is <c>add(b, alpha: 1)</c>).
/// </summary>
internal static class Scalars
{
    /// <summary>1 (an integer, valid for every dtype): add's alpha, as <c>a.add(b, Scalars.One)</c> for <c>a + b</c>.</summary>
    internal static readonly Scalar One = 1.ToScalar();
    internal static readonly Scalar Zero = 0.ToScalar();
    internal static readonly Scalar NaN = double.NaN.ToScalar();
    /// <summary>-100: the ignored label of the models' losses.</summary>
    internal static readonly Scalar IgnoreIndex = (-100).ToScalar();
}
