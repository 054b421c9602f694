using TorchSharp;

namespace FlashAttn.Models.Distributed;

/// <summary>A parameter as the bucket plan sees it.</summary>
public sealed record ParameterSpec(string Name, long[] Shape, torch.ScalarType DType)
{
    public long Numel => Shape.Aggregate(1L, (a, b) => a * b);
}

/// <summary>One all-reduce bucket: parameters (indices into the registration order, in the order
/// their gradients are expected to become ready), each at an element offset of a flat buffer of
/// <see cref="DType"/>; offsets are contiguous (offset[k+1] = offset[k] + numel[k]).</summary>
public sealed record Bucket(torch.ScalarType DType, int[] Parameters, long[] Offsets, long Elements, long Bytes);

/// <summary>
/// Groups parameters into gradient all-reduce buckets the way PyTorch DDP does
/// (compute_bucket_assignment_by_size): parameters are taken in reverse registration order, since
/// gradients become ready roughly back to front during backward; one bucket is open per dtype (so
/// buckets are dtype-homogeneous); a parameter never straddles buckets; a bucket is closed before a
/// parameter that would take it past the cap, and a parameter at least as large as the cap gets a
/// bucket of its own. The first bucket may have a smaller cap (DDP's 1 MB first bucket, so that the
/// first all-reduce starts early). Buckets are returned in the order they fill (by their first
/// parameter in reverse registration order). Pure function of its inputs.
/// </summary>
public static class BucketPlan
{
    public const long MB = 1024 * 1024;
    public const long DefaultCapBytes = 25 * MB;
    public const long DefaultFirstBucketBytes = 1 * MB;

    public static IReadOnlyList<Bucket> Plan(IReadOnlyList<ParameterSpec> parameters, long capBytes = DefaultCapBytes, long? firstBucketBytes = null)
    {
        if (capBytes <= 0) throw new ArgumentOutOfRangeException(nameof(capBytes), "bucket cap must be positive");
        long firstCap = firstBucketBytes ?? capBytes;
        if (firstCap <= 0) throw new ArgumentOutOfRangeException(nameof(firstBucketBytes), "first bucket cap must be positive");
        var open = new Dictionary<torch.ScalarType, List<int>>();
        var openBytes = new Dictionary<torch.ScalarType, long>();
        var closed = new List<(torch.ScalarType dtype, List<int> ids)>();
        long Cap() => closed.Count == 0 ? firstCap : capBytes;
        void Close(torch.ScalarType dt)
        {
            closed.Add((dt, open[dt]));
            open.Remove(dt);
            openBytes.Remove(dt);
        }

        for (int i = parameters.Count - 1; i >= 0; i--)
        {
            var p = parameters[i];
            long bytes = p.Numel * ElementSize(p.DType);
            if (open.ContainsKey(p.DType) && openBytes[p.DType] + bytes > Cap()) Close(p.DType);
            if (!open.TryGetValue(p.DType, out var ids)) { open[p.DType] = ids = []; openBytes[p.DType] = 0; }
            ids.Add(i);
            openBytes[p.DType] += bytes;
            if (openBytes[p.DType] >= Cap()) Close(p.DType);
        }
        foreach (var dt in open.Keys.ToList()) Close(dt);

        // the order gradients fill them: by first parameter, back to front
        return closed.OrderByDescending(b => b.ids[0]).Select(b =>
        {
            var offsets = new long[b.ids.Count];
            long elements = 0;
            for (int k = 0; k < b.ids.Count; k++) { offsets[k] = elements; elements += parameters[b.ids[k]].Numel; }
            return new Bucket(b.dtype, [.. b.ids], offsets, elements, elements * ElementSize(b.dtype));
        }).ToList();
    }

    /// <summary>Bytes per element of a floating or integer dtype.</summary>
    public static int ElementSize(torch.ScalarType dtype) => dtype switch
    {
        torch.ScalarType.Float64 or torch.ScalarType.Int64 or torch.ScalarType.ComplexFloat32 => 8,
        torch.ScalarType.Float32 or torch.ScalarType.Int32 => 4,
        torch.ScalarType.Float16 or torch.ScalarType.BFloat16 or torch.ScalarType.Int16 => 2,
        torch.ScalarType.Int8 or torch.ScalarType.Byte or torch.ScalarType.Bool => 1,
        torch.ScalarType.ComplexFloat64 => 16,
        _ => throw new NotSupportedException($"dtype {dtype} has no bucket element size"),
    };
}
