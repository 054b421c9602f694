namespace FlashAttn.Models.Data;

/// <summary>Where a sampler stands: resume continues from here (epoch, sequences consumed in it).</summary>
public sealed record SamplerState(long Epoch, long Position);

/// <summary>Language-modelling samples from a token array: non-overlapping windows of
/// <c>seqlen + 1</c> tokens starting at multiples of seqlen (flash-attention's LMDataset, drop_last),
/// visited in a shuffled order that is a pure function of (seed, epoch), so that a resumed run
/// continues the exact data order.</summary>
public sealed class LmBatchSampler
{
    readonly TokenArray _tokens;
    readonly int _seqlen;
    readonly ulong _seed;
    readonly bool _shuffle;
    readonly ushort[] _buffer;
    long[]? _order;
    long _orderEpoch = -1;

    public LmBatchSampler(TokenArray tokens, int seqlen, long seed, bool shuffle = true)
    {
        _tokens = tokens;
        _seqlen = seqlen;
        _seed = (ulong)seed;
        _shuffle = shuffle;
        _buffer = new ushort[seqlen + 1];
        NumSequences = tokens.Length > seqlen ? (tokens.Length - 1) / seqlen : 0;
        if (NumSequences == 0) throw new InvalidDataException($"{tokens.Path_}: {tokens.Length} tokens is too few for one sequence of {seqlen}+1");
    }

    public long NumSequences { get; }
    public int SeqLen => _seqlen;
    public SamplerState State { get; set; } = new(0, 0);

    /// <summary>The next <paramref name="batchSize"/> samples as a row-major (batchSize, seqlen + 1)
    /// array of token ids; crosses into the next epoch (reshuffled) when one ends.</summary>
    public long[] Next(int batchSize)
    {
        var result = new long[batchSize * (long)(_seqlen + 1)];
        var (epoch, pos) = State;
        for (int b = 0; b < batchSize; b++)
        {
            if (pos == NumSequences) { epoch++; pos = 0; }
            long seq = Order(epoch)[pos++];
            _tokens.Read(seq * _seqlen, _buffer, _seqlen + 1);
            var row = result.AsSpan(b * (_seqlen + 1), _seqlen + 1);
            for (int i = 0; i <= _seqlen; i++) row[i] = _buffer[i];
        }
        State = new(epoch, pos);
        return result;
    }

    /// <summary>The permutation of sequence indices visited in <paramref name="epoch"/> (a shared buffer:
    /// valid until the next call with another epoch). The distributed sampler partitions it.</summary>
    internal long[] Order(long epoch)
    {
        if (_order != null && _orderEpoch == epoch) return _order;
        _order ??= new long[NumSequences];
        for (long i = 0; i < NumSequences; i++) _order[i] = i;
        if (_shuffle)
        {
            var rng = new SplitMix64(_seed * 0x9E3779B97F4A7C15UL ^ (ulong)(epoch + 1) * 0xD1B54A32D192ED03UL);
            for (long i = NumSequences - 1; i > 0; i--)
            {
                long j = (long)(rng.Next() % (ulong)(i + 1));
                (_order[i], _order[j]) = (_order[j], _order[i]);
            }
        }
        _orderEpoch = epoch;
        return _order;
    }

    /// <summary>Validation windows in order (no shuffling): batch k holds sequences [k·B, (k+1)·B).</summary>
    public static IEnumerable<long[]> Sequential(TokenArray tokens, int seqlen, int batchSize, int maxBatches)
    {
        long n = tokens.Length > seqlen ? (tokens.Length - 1) / seqlen : 0;
        int batches = 0;
        for (long start = 0; start + batchSize <= n && (maxBatches <= 0 || batches < maxBatches); start += batchSize, batches++)
        {
            var result = new long[batchSize * (long)(seqlen + 1)];
            for (int b = 0; b < batchSize; b++)
            {
                var span = tokens.Slice((start + b) * seqlen, seqlen + 1);
                for (int i = 0; i < span.Length; i++) result[b * (seqlen + 1) + i] = span[i];
            }
            yield return result;
        }
    }
}

/// <summary>A small, fixed, portable PRNG (the order must not depend on the runtime's Random).</summary>
public struct SplitMix64(ulong seed)
{
    ulong _s = seed;
    public ulong Next()
    {
        ulong z = _s += 0x9E3779B97F4A7C15UL;
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9UL;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBUL;
        return z ^ (z >> 31);
    }
}
