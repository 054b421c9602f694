using FlashAttn.Interop;
using TorchSharp;
using static TorchSharp.torch;

namespace FlashAttn;

/// <summary>
/// The one way the ops draw a dropout seed: 63 random bits from a CPU generator (TorchSharp's default unless the caller
/// passes one), so torch.manual_seed reproduces every mask. The kernels key their Philox-4x32-10 stream by it and the
/// reference path either reproduces that stream (attention) or seeds a generator with it (the norms on the CPU).
/// </summary>
internal static class DropoutSeed
{
    internal static ulong Draw(Generator? generator = null)
    {
        using var seed = randint(0, long.MaxValue, new long[] { 1 }, dtype: ScalarType.Int64, generator: generator);
        return (ulong)TensorArgs.Item<long>(seed);
    }
}
