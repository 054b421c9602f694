using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace FlashAttn.Models.Distributed;

/// <summary>The collectives data parallel training needs, in place on contiguous tensors of this rank's device
/// (<see cref="NcclCommunicator"/> on the GPU).</summary>
public interface ICollective
{
    int Rank { get; }
    int WorldSize { get; }
    void AllReduce(Tensor tensor, NcclReduction op = NcclReduction.Sum);
    void Broadcast(Tensor tensor, int root = 0);
}

/// <summary>What the trainer asks of data parallelism: the same weights on every rank at the start, the same
/// (averaged) gradients on every rank before each optimizer step.</summary>
public interface IGradientReducer : IDisposable
{
    int Rank { get; }
    int WorldSize { get; }
    /// <summary>Rank 0's values into every rank's parameters; once, before the optimizer copies them into its masters.</summary>
    void Broadcast(IReadOnlyList<Parameter> parameters);
    /// <summary>Each parameter's gradient replaced by its mean over the ranks (a missing gradient counts as zeros).</summary>
    void AllReduce(IReadOnlyList<Parameter> parameters);
}

/// <summary>
/// PyTorch DDP's reducer without the overlap: after backward the gradients are packed into the buckets of
/// <see cref="BucketPlan"/> (one flat buffer each, kept between steps), each bucket all-reduced (sum) and divided by the
/// world size, and unpacked. TorchSharp exposes no per-parameter gradient hook (PyTorch's
/// register_post_accumulate_grad_hook), so the all-reduce cannot start while backward still runs.
/// </summary>
public sealed class BucketedGradientReducer : IGradientReducer
{
    readonly ICollective _collective;
    readonly IDisposable? _owned;
    readonly long _capBytes;
    IReadOnlyList<Bucket>? _plan;
    Tensor[]? _buffers;
    Parameter[]? _planned;

    /// <param name="collective">This rank's communicator.</param>
    /// <param name="owned">Disposed with the reducer (the communicator it created), or null.</param>
    /// <param name="capBytes">Bucket size (DDP's bucket_cap_mb; the first bucket gets DDP's 1 MB when the cap is larger).</param>
    public BucketedGradientReducer(ICollective collective, IDisposable? owned = null, long capBytes = BucketPlan.DefaultCapBytes)
    {
        _collective = collective;
        _owned = owned;
        _capBytes = capBytes;
    }

    public int Rank => _collective.Rank;
    public int WorldSize => _collective.WorldSize;
    /// <summary>The buckets of the last <see cref="AllReduce"/>'s parameters (null before the first).</summary>
    public IReadOnlyList<Bucket>? Plan => _plan;

    public void Broadcast(IReadOnlyList<Parameter> parameters)
    {
        using var _ = no_grad();
        foreach (var p in parameters)
        {
            if (p.is_contiguous()) { _collective.Broadcast(p); continue; }
            using var c = p.contiguous();
            _collective.Broadcast(c);
            p.copy_(c);
        }
    }

    public void AllReduce(IReadOnlyList<Parameter> parameters)
    {
        using var scope = NewDisposeScope();
        using var _ = no_grad();
        var buffers = Buffers(parameters);
        for (int b = 0; b < _plan!.Count; b++)
        {
            var (bucket, flat) = (_plan[b], buffers[b]);
            // flat (Elements,) <- each gradient flattened at its offset
            for (int k = 0; k < bucket.Parameters.Length; k++)
            {
                var p = parameters[bucket.Parameters[k]];
                var slot = flat.narrow(0, bucket.Offsets[k], p.numel());
                if (p.grad is { } g) slot.copy_(g.reshape(-1));
                else slot.zero_();
            }
            _collective.AllReduce(flat);
            if (WorldSize > 1) flat.div_(WorldSize);
            for (int k = 0; k < bucket.Parameters.Length; k++)
            {
                var p = parameters[bucket.Parameters[k]];
                var slot = flat.narrow(0, bucket.Offsets[k], p.numel()).view(p.shape);
                if (p.grad is { } g) g.copy_(slot);
                else p.grad = slot.clone().DetachFromDisposeScope();
            }
        }
    }

    Tensor[] Buffers(IReadOnlyList<Parameter> parameters)
    {
        if (_planned is not null && _planned.SequenceEqual(parameters)) return _buffers!;
        foreach (var t in _buffers ?? []) t.Dispose();
        _planned = [.. parameters];
        _plan = BucketPlan.Plan([.. parameters.Select((p, i) => new ParameterSpec(i.ToString(), p.shape, p.dtype))], _capBytes, Math.Min(BucketPlan.DefaultFirstBucketBytes, _capBytes));
        var device = parameters.Count > 0 ? parameters[0].device : CPU;
        _buffers = [.. _plan.Select(b => empty(b.Elements, dtype: b.DType, device: device).DetachFromDisposeScope())];
        return _buffers;
    }

    public void Dispose()
    {
        foreach (var t in _buffers ?? []) t.Dispose();
        _buffers = null;
        _owned?.Dispose();
    }
}
