using FlashAttn.Models.Data;

namespace FlashAttn.Models.Distributed;

/// <summary>
/// One rank's share of the <see cref="LmBatchSampler"/> order. Each epoch's permutation
/// (a pure function of (seed, epoch), identical on every rank) is cut to a multiple of
/// <c>worldSize</c> (the tail is dropped so every rank runs the same number of steps, which data
/// parallel training requires) and rank r takes positions r, r + W, r + 2W, …
/// <para>Strided rather than contiguous shards: after k samples per rank, the ranks together have
/// consumed exactly the first k·W samples of the single-process order, so a W-GPU run sees the data
/// in the same order as a 1-GPU run with a W-times larger batch (as PyTorch's DistributedSampler).</para>
/// <para>State = (epoch, position within this rank's share), with the semantics of LmBatchSampler's:
/// position counts this rank's samples consumed in the epoch, and resume continues from it.</para>
/// </summary>
public sealed class DistributedSampler
{
    readonly TokenArray _tokens;
    readonly LmBatchSampler _order;
    readonly int _seqlen;
    readonly ushort[] _buffer;

    public DistributedSampler(TokenArray tokens, int seqlen, long seed, int rank, int worldSize, bool shuffle = true)
    {
        if (worldSize < 1) throw new ArgumentOutOfRangeException(nameof(worldSize), $"world size {worldSize} must be >= 1");
        if (rank < 0 || rank >= worldSize) throw new ArgumentOutOfRangeException(nameof(rank), $"rank {rank} outside [0, {worldSize})");
        _tokens = tokens;
        _seqlen = seqlen;
        _order = new LmBatchSampler(tokens, seqlen, seed, shuffle);
        _buffer = new ushort[seqlen + 1];
        Rank = rank;
        WorldSize = worldSize;
        TotalSequences = _order.NumSequences;
        NumSequences = PerRank(TotalSequences, worldSize);
        if (NumSequences == 0)
            throw new InvalidDataException($"{tokens.Path_}: {TotalSequences} sequences of {seqlen}+1 tokens cannot give each of {worldSize} ranks one");
    }

    public int Rank { get; }
    public int WorldSize { get; }
    public int SeqLen => _seqlen;
    /// <summary>Sequences in the whole (single-process) epoch.</summary>
    public long TotalSequences { get; }
    /// <summary>Sequences this rank visits per epoch (the same on every rank).</summary>
    public long NumSequences { get; }
    /// <summary>Sequences dropped from the end of each epoch's order: TotalSequences mod WorldSize.</summary>
    public long DroppedPerEpoch => TotalSequences - NumSequences * WorldSize;
    public SamplerState State { get; set; } = new(0, 0);

    /// <summary>Samples per rank per epoch for <paramref name="total"/> sequences over <paramref name="worldSize"/> ranks.</summary>
    public static long PerRank(long total, int worldSize) => total / worldSize;

    /// <summary>The sequence index this rank visits at <paramref name="position"/> of <paramref name="epoch"/>.</summary>
    public long SequenceAt(long epoch, long position)
    {
        if (position < 0 || position >= NumSequences) throw new ArgumentOutOfRangeException(nameof(position), $"{position} outside [0, {NumSequences})");
        return _order.Order(epoch)[position * WorldSize + Rank];
    }

    /// <summary>This rank's sequence indices for a whole epoch, in visiting order.</summary>
    public long[] Indices(long epoch)
    {
        var order = _order.Order(epoch);
        var result = new long[NumSequences];
        for (long i = 0; i < NumSequences; i++) result[i] = order[i * WorldSize + Rank];
        return result;
    }

    /// <summary>The next <paramref name="batchSize"/> samples of this rank as a row-major
    /// (batchSize, seqlen + 1) array of token ids; crosses into the next epoch when one ends.</summary>
    public long[] Next(int batchSize)
    {
        var result = new long[batchSize * (long)(_seqlen + 1)];
        var (epoch, pos) = State;
        for (int b = 0; b < batchSize; b++)
        {
            if (pos == NumSequences) { epoch++; pos = 0; }
            long seq = SequenceAt(epoch, pos++);
            _tokens.Read(seq * _seqlen, _buffer, _seqlen + 1);
            var row = result.AsSpan(b * (_seqlen + 1), _seqlen + 1);
            for (int i = 0; i <= _seqlen; i++) row[i] = _buffer[i];
        }
        State = new(epoch, pos);
        return result;
    }
}
