using System.Text.Json.Nodes;
using FlashAttn.Models.Data;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace FlashAttn.Models.Training;

/// <summary>ViT classification on an image folder (<see cref="ImageFolder"/>): ImageSharp decoding,
/// random-resized crop + flip for training, resize + center crop for validation; loss and top-1 accuracy.</summary>
public sealed class ImageClassificationTask : ITrainingTask
{
    readonly VisionTransformer _model;
    readonly ImageFolder _train;
    readonly IReadOnlyList<(string path, int label)> _val;
    readonly IndexSampler _sampler;
    readonly Device _device;
    readonly ScalarType _dtype;
    readonly int _size;
    InitialWeights? _initial;
    readonly long _seed;

    public ImageClassificationTask(RunConfig c, Device device, ScalarType dtype, TextWriter log)
    {
        _device = device; _dtype = dtype; _seed = c.Seed;
        var root = c.Data.Dataset;
        if (!Path.IsPathRooted(root) && !Directory.Exists(root)) root = Path.Combine(c.Data.DataDir, root);
        IReadOnlyList<string> classes;
        (_train, _val, classes) = ImageFolder.Open(root, c.Data.ValRatio, c.Data.ValSplitSeed);
        _size = c.Data.ImageSize;
        var overrides = c.Model.Overrides;
        string? weights = null;
        ViTConfig v;
        if (c.Model.InitFrom is { } from)
        {
            // fine-tuning (timm's pretrained=True): the weights' architecture, this data's classes and resolution
            weights = Directory.Exists(from) ? Path.Combine(from, "model.safetensors") : from;
            if (!File.Exists(weights)) throw new FileNotFoundException($"model.init_from={from}: no {weights} (a ViT safetensors file, or a folder with model.safetensors)");
            // the fusions as for a fresh model (a run on a CPU saved them off); the keys below and the device decide
            var source = ViTConfig.FromWeights(weights, overrides.NHead).WithFusions(true);
            if (overrides.ChangesSizes(source))
                log.WriteLine($"warning: model.init_from={from} fixes the model's sizes (depth {source.depth}, embed_dim {source.embed_dim}, " +
                    $"num_heads {source.num_heads}); model.config.n_layer / n_embd / n_head that differ are ignored");
            v = source with { num_classes = classes.Count, img_size = _size, drop_path_rate = ViTConfig.Named(c.Model.Name).drop_path_rate };
        }
        else v = overrides.ApplySizes(ViTConfig.Named(c.Model.Name) with { num_classes = classes.Count, img_size = _size });
        v = DevicePolicy.Fusions(overrides.ApplySwitches(v), overrides, device, log);
        _model = new VisionTransformer(v, device, dtype);
        if (weights is not null && c.Resume is not null)
            log.WriteLine($"model.init_from: the architecture of {weights}; the weights come from the resumed checkpoint");
        else if (weights is not null)
        {
            var fp32 = new VisionTransformer(v.WithFusions(false), CPU, ScalarType.Float32);
            fp32.load_pretrained(weights, log);
            _initial = new InitialWeights(fp32, _model);
            log.WriteLine($"model.init_from: ViT weights from {weights}");
        }
        Parameters = _model.parameter_groups().ToList();
        long T = v.num_patches + 1;
        FlopsPerSample = 6.0 * _model.num_parameters() * T + 12.0 * v.depth * v.embed_dim * T * T;
        _sampler = new IndexSampler(_train.Items.Count, _seed);
        Description = (weights is null ? $"ViT {c.Model.Name}" : $"ViT from {weights}") + $" ({_model.num_parameters() / 1e6:F1}M parameters, {_size}px) on {root} " +
            $"({classes.Count} classes, {_train.Items.Count:N0} train / {_val.Count:N0} val images)";
    }

    public string Description { get; }
    public nn.Module Model => _model;
    public IReadOnlyList<(string name, Parameter parameter, bool weight_decay)> Parameters { get; }
    public string Unit => "img";
    public long UnitsPerSample => 1;
    public double FlopsPerSample { get; }

    public JsonNode SamplerState
    {
        get => new JsonObject { ["epoch"] = _sampler.State.Epoch, ["position"] = _sampler.State.Position };
        set => _sampler.State = new SamplerState(value["epoch"]!.GetValue<long>(), value["position"]!.GetValue<long>());
    }

    (Tensor images, Tensor labels) Batch(IReadOnlyList<(string path, int label)> items, bool train, (long epoch, long position)[]? at)
    {
        int n = items.Count, per = 3 * _size * _size;
        var pixels = new float[n * per];
        var labels = new long[n];
        Parallel.For(0, n, i =>
        {
            // augmentation randomness is a function of (seed, epoch, position): resume reproduces it
            var rng = new SplitMix64((ulong)_seed * 0x2545F4914F6CDD1DUL ^ (ulong)(at?[i].epoch ?? 0) * 0x9E3779B97F4A7C15UL ^ (ulong)(at?[i].position ?? i));
            ImageFolder.Load(items[i].path, _size, train, ref rng, pixels, i * per);
            labels[i] = items[i].label;
        });
        var x = tensor(pixels, [n, 3, _size, _size]).to(_dtype).to(_device);
        return (x, tensor(labels).to(_device));
    }

    // lossGrad unused: a classifier's logits (B, classes) are too small for the cross-entropy's passes to matter
    public Tensor TrainLoss(int batchSize, Tensor lossGrad)
    {
        var drawn = _sampler.Next(batchSize);
        var (x, y) = Batch(drawn.Select(d => _train.Items[(int)d.index]).ToList(), true, drawn.Select(d => (d.epoch, d.position)).ToArray());
        return _model.loss(x, y);
    }

    public IReadOnlyDictionary<string, double> Evaluate(int batchSize, int maxBatches)
    {
        if (_val.Count == 0) return new Dictionary<string, double>();
        _model.eval();
        try
        {
            using var _ = no_grad();
            double lossSum = 0; long correct = 0, total = 0; int batches = 0;
            for (int start = 0; start < _val.Count && (maxBatches <= 0 || batches < maxBatches); start += batchSize, batches++)
            {
                using var scope = NewDisposeScope();
                var items = _val.Skip(start).Take(batchSize).ToList();
                var (x, y) = Batch(items, false, null);
                var logits = _model.forward(x).to(ScalarType.Float32);
                lossSum += nn.functional.cross_entropy(logits, y).item<float>() * items.Count;
                correct += logits.argmax(1).eq(y).sum().item<long>();
                total += items.Count;
            }
            return new Dictionary<string, double> { ["val_loss"] = lossSum / total, ["val_acc"] = (double)correct / total };
        }
        finally { _model.train(); }
    }

    public void SaveWeights(string path) => _model.save_safetensors(path);

    public void InitializeOptimizer(FusedAdamW optimizer) => _initial?.HandTo(optimizer, Parameters);

    public void Dispose()
    {
        _initial?.Dispose();
        _model.Dispose();
    }
}
