using SixLabors.ImageSharp;
using SixLabors.ImageSharp.PixelFormats;
using SixLabors.ImageSharp.Processing;

namespace FlashAttn.Models.Data;

/// <summary>An image-classification folder (torchvision's ImageFolder layout): <c>root/&lt;class&gt;/*.jpg|png|...</c>,
/// or <c>root/train/&lt;class&gt;/...</c> and <c>root/val/&lt;class&gt;/...</c>. Classes are the sorted folder names.</summary>
public sealed class ImageFolder
{
    public static readonly string[] Extensions = [".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tga", ".tif", ".tiff"];

    public ImageFolder(string root, IReadOnlyList<string>? classes = null)
    {
        if (!Directory.Exists(root)) throw new DirectoryNotFoundException($"image folder {root} not found");
        Root = root;
        Classes = classes ?? Directory.GetDirectories(root).Select(Path.GetFileName).Order(StringComparer.Ordinal).ToList()!;
        if (Classes.Count == 0) throw new InvalidDataException($"{root}: no class folders");
        var items = new List<(string, int)>();
        for (int c = 0; c < Classes.Count; c++)
        {
            var dir = Path.Combine(root, Classes[c]);
            if (!Directory.Exists(dir)) continue;
            items.AddRange(Directory.EnumerateFiles(dir, "*", SearchOption.AllDirectories)
                .Where(f => Extensions.Contains(Path.GetExtension(f).ToLowerInvariant())).Order(StringComparer.Ordinal).Select(f => (f, c)));
        }
        if (items.Count == 0) throw new InvalidDataException($"{root}: no images ({string.Join(" ", Extensions)})");
        Items = items;
    }

    public string Root { get; }
    public IReadOnlyList<string> Classes { get; }
    public IReadOnlyList<(string path, int label)> Items { get; }

    /// <summary>(train, val): root/train and root/val when both exist; else one folder split by a seeded per-image hash.</summary>
    public static (ImageFolder train, IReadOnlyList<(string path, int label)> val, IReadOnlyList<string> classes) Open(string root, double valRatio, long seed)
    {
        var t = Path.Combine(root, "train"); var v = Path.Combine(root, "val");
        if (Directory.Exists(t) && Directory.Exists(v))
        {
            var train = new ImageFolder(t);
            return (train, new ImageFolder(v, train.Classes).Items, train.Classes);
        }
        var all = new ImageFolder(root);
        var trainItems = all.Items.Where((_, i) => !TokenCache.IsVal(i, valRatio, seed)).ToList();
        var valItems = all.Items.Where((_, i) => TokenCache.IsVal(i, valRatio, seed)).ToList();
        return (new ImageFolder(all, trainItems), valItems, all.Classes);
    }

    ImageFolder(ImageFolder parent, IReadOnlyList<(string, int)> items) { Root = parent.Root; Classes = parent.Classes; Items = items; }

    static readonly float[] Mean = [0.485f, 0.456f, 0.406f], Std = [0.229f, 0.224f, 0.225f];

    /// <summary>Decodes one image (ImageSharp) into CHW float32 normalised with ImageNet's mean/std. train: random-resized
    /// crop (scale 0.08–1, ratio 3/4–4/3) and horizontal flip (the standard augmentations), drawn from <paramref name="rng"/>;
    /// eval: resize the short side to size/0.875 and center-crop.</summary>
    public static void Load(string path, int size, bool train, ref SplitMix64 rng, float[] dest, int offset)
    {
        using var img = Image.Load<Rgb24>(path);
        if (train)
        {
            int w = img.Width, h = img.Height;
            Rectangle crop = new(0, 0, w, h);
            for (int attempt = 0; attempt < 10; attempt++)
            {
                double area = w * h * (0.08 + 0.92 * Uniform(ref rng));
                double logRatio = Math.Log(3.0 / 4) + (Math.Log(4.0 / 3) - Math.Log(3.0 / 4)) * Uniform(ref rng);
                double ratio = Math.Exp(logRatio);
                int cw = (int)Math.Round(Math.Sqrt(area * ratio)), ch = (int)Math.Round(Math.Sqrt(area / ratio));
                if (cw > 0 && ch > 0 && cw <= w && ch <= h)
                {
                    crop = new Rectangle((int)(Uniform(ref rng) * (w - cw + 1)), (int)(Uniform(ref rng) * (h - ch + 1)), cw, ch);
                    break;
                }
            }
            bool flip = Uniform(ref rng) < 0.5;
            img.Mutate(x =>
            {
                x.Crop(crop).Resize(size, size);
                if (flip) x.Flip(FlipMode.Horizontal);
            });
        }
        else
        {
            int shortSide = (int)Math.Round(size / 0.875);
            double s = (double)shortSide / Math.Min(img.Width, img.Height);
            int nw = Math.Max(size, (int)Math.Round(img.Width * s)), nh = Math.Max(size, (int)Math.Round(img.Height * s));
            img.Mutate(x => x.Resize(nw, nh).Crop(new Rectangle((nw - size) / 2, (nh - size) / 2, size, size)));
        }
        int plane = size * size;
        img.ProcessPixelRows(acc =>
        {
            for (int y = 0; y < size; y++)
            {
                var row = acc.GetRowSpan(y);
                for (int x = 0; x < size; x++)
                {
                    var p = row[x];
                    dest[offset + y * size + x] = (p.R / 255f - Mean[0]) / Std[0];
                    dest[offset + plane + y * size + x] = (p.G / 255f - Mean[1]) / Std[1];
                    dest[offset + 2 * plane + y * size + x] = (p.B / 255f - Mean[2]) / Std[2];
                }
            }
        });
    }

    static double Uniform(ref SplitMix64 rng) => (rng.Next() >> 11) * (1.0 / (1UL << 53));
}

/// <summary>A shuffled order over n items per epoch, a pure function of (seed, epoch): resume continues it.</summary>
public sealed class IndexSampler(long count, long seed)
{
    long[]? _order;
    long _epoch = -1;
    public long Count => count;
    public SamplerState State { get; set; } = new(0, 0);

    /// <summary>The next n indices (crossing epochs), with the (epoch, position) each was drawn at.</summary>
    public (long index, long epoch, long position)[] Next(int n)
    {
        var r = new (long, long, long)[n];
        var (epoch, pos) = State;
        for (int i = 0; i < n; i++)
        {
            if (pos == count) { epoch++; pos = 0; }
            r[i] = (Order(epoch)[pos], epoch, pos);
            pos++;
        }
        State = new(epoch, pos);
        return r;
    }

    long[] Order(long epoch)
    {
        if (_order != null && _epoch == epoch) return _order;
        _order ??= new long[count];
        for (long i = 0; i < count; i++) _order[i] = i;
        var rng = new SplitMix64((ulong)seed * 0x9E3779B97F4A7C15UL ^ (ulong)(epoch + 1) * 0xD1B54A32D192ED03UL);
        for (long i = count - 1; i > 0; i--) { long j = (long)(rng.Next() % (ulong)(i + 1)); (_order[i], _order[j]) = (_order[j], _order[i]); }
        _epoch = epoch;
        return _order;
    }
}
