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
    internal Scalar Of(double value)
    {
        var s = value.ToScalar();
        _scalars.Add(s);
        return s;
    }

    public void Dispose()
    {
        foreach (var s in _scalars) s.Dispose();
        _scalars.Clear();
    }
}
