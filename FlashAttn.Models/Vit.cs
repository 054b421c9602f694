// Vision Transformer (ViT, Dosovitskiy et al.) on the same public modules as GPT (Block of MHA, Mlp and
// DropoutAddLayerNorm; non-causal attention, drop-path as the norms' rowscale), with timm's parameter names (patch_embed.proj, cls_token, pos_embed, blocks.{i}.norm1 / attn.qkv / attn.proj / norm2 /
// mlp.fc1 / mlp.fc2, norm, head) so timm checkpoints load through load_safetensors. Images (B, 3, H, W) -> logits.
using System.Text.Json;
using FlashAttn.Interop;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;
using F = TorchSharp.torch.nn.functional;

namespace FlashAttn.Models;

/// <summary>ViT hyperparameters (timm's names); the defaults are ViT-B/16 at 224 for ImageNet-1k.</summary>
public sealed record ViTConfig
{
    /// <summary>224: the training resolution of the ViT/DeiT recipes; the position table is sized for it.</summary>
    public long img_size { get; init; } = 224;
    /// <summary>16: the patch side (a 14 x 14 grid at 224).</summary>
    public long patch_size { get; init; } = 16;
    /// <summary>3: RGB.</summary>
    public long in_chans { get; init; } = 3;
    /// <summary>1000: ImageNet-1k.</summary>
    public long num_classes { get; init; } = 1000;
    /// <summary>768: width (ViT-B).</summary>
    public long embed_dim { get; init; } = 768;
    /// <summary>12: blocks.</summary>
    public long depth { get; init; } = 12;
    /// <summary>12: heads (head dim 64 at every standard size).</summary>
    public long num_heads { get; init; } = 12;
    /// <summary>4: the MLP's hidden width over embed_dim.</summary>
    public double mlp_ratio { get; init; } = 4.0;
    /// <summary>0: dropout on the embeddings and on the attention / MLP outputs (DeiT uses none).</summary>
    public double drop_rate { get; init; }
    /// <summary>0: dropout on the attention probabilities.</summary>
    public double attn_drop_rate { get; init; }
    /// <summary>0.1: stochastic depth, rising linearly from 0 at the first block to this at the last (DeiT-B's 0.1).</summary>
    public double drop_path_rate { get; init; } = 0.1;
    /// <summary>1e-6: timm's LayerNorm epsilon for ViT.</summary>
    public double layer_norm_epsilon { get; init; } = 1e-6;
    /// <summary>"gelu": ViT's exact GELU.</summary>
    public string activation_function { get; init; } = "gelu";

    /// <summary>true: attention through flash_attn_func (non-causal); false: TorchSharp SDPA.</summary>
    public bool use_flash_attn { get; init; } = true;
    /// <summary>true: linear layers through flash_attn.fused_dense_func (FusedDense).</summary>
    public bool fused_bias_fc { get; init; } = true;
    /// <summary>true: the MLP through FusedMLP when the activation has a fused epilogue (tanh-GELU, ReLU); ViT's exact GELU
    /// runs two fused_bias_fc linears around TorchSharp's GELU.</summary>
    public bool fused_mlp { get; init; } = true;
    /// <summary>true: dropout + drop-path + residual add + LayerNorm in one kernel (drop-path as its rowscale).</summary>
    public bool fused_dropout_add_ln { get; init; } = true;
    /// <summary>true: the classification loss through the fused cross-entropy kernel.</summary>
    public bool fused_cross_entropy { get; init; } = true;
    /// <summary>true: the residual stream in float32 under bf16/fp16.</summary>
    public bool residual_in_fp32 { get; init; } = true;

    /// <summary>The config stored in a checkpoint's metadata by <see cref="VisionTransformer.save_safetensors"/>.</summary>
    public static ViTConfig FromSafetensors(string path)
    {
        var (_, meta) = SafeTensors.ReadHeader(path);
        if (!meta.TryGetValue("flashattn.config", out var json))
            throw new InvalidDataException($"{path}: no flashattn.config metadata (not written by VisionTransformer.save_safetensors)");
        if (meta.TryGetValue("flashattn.model", out var model) && model != "VisionTransformer")
            throw new InvalidDataException($"{path} holds a {model}, not a VisionTransformer");
        return JsonSerializer.Deserialize<ViTConfig>(json) ?? throw new InvalidDataException($"{path}: empty flashattn.config");
    }

    /// <summary>
    /// The architecture of a ViT weights file: the config a <see cref="VisionTransformer.save_safetensors"/> file carries,
    /// else (timm's model.safetensors) what the shapes say: embed_dim, in_chans and patch_size from patch_embed.proj,
    /// img_size from pos_embed's grid, depth from the blocks, mlp_ratio from fc1, num_classes from head (0 without one), and
    /// the head count of timm's ViT-Ti/S/B/L at that width (3, 6, 12, 16 heads of 64): shapes cannot tell heads apart, so
    /// another width needs <paramref name="num_heads"/> (ViT-H/14: 16; used only for timm's files).
    /// </summary>
    public static ViTConfig FromWeights(string path, long? num_heads = null)
    {
        var (infos, meta) = SafeTensors.ReadHeader(path);
        if (meta.ContainsKey("flashattn.config")) return FromSafetensors(path);
        long[] Shape(string name) => infos.TryGetValue(name, out var i) ? i.shape
            : throw new InvalidDataException($"{path}: no tensor '{name}' (not a timm VisionTransformer with a class token)");
        var proj = Shape("patch_embed.proj.weight");   // (D, C, P, P)
        var pos = Shape("pos_embed");                  // (1, 1 + g*g, D)
        long grid = (long)Math.Round(Math.Sqrt(pos[1] - 1));
        if (grid * grid != pos[1] - 1) throw new InvalidDataException($"{path}: pos_embed holds {pos[1]} positions, not 1 + a square grid");
        long depth = infos.Keys.Where(k => k.StartsWith("blocks.")).Select(k => long.Parse(k.Split('.')[1])).DefaultIfEmpty(-1).Max() + 1;
        long heads = num_heads ?? proj[0] switch
        {
            192 or 384 or 768 or 1024 => proj[0] / 64,
            _ => throw new InvalidDataException($"{path}: width {proj[0]} is not one of timm's ViT-Ti/S/B/L (192, 384, 768, 1024); " +
                "the tensors cannot tell the head count: give it (model.config.n_head)"),
        };
        return new ViTConfig
        {
            embed_dim = proj[0], in_chans = proj[1], patch_size = proj[2], img_size = grid * proj[2], depth = depth,
            num_heads = heads, mlp_ratio = (double)Shape("blocks.0.mlp.fc1.weight")[0] / proj[0],
            num_classes = infos.TryGetValue("head.weight", out var head) ? head.shape[0] : 0,
        };
    }

    /// <summary>(img_size / patch_size)^2 patches.</summary>
    public long num_patches => (img_size / patch_size) * (img_size / patch_size);

    /// <summary>A copy with every fusion switch set to <paramref name="on"/>.</summary>
    public ViTConfig WithFusions(bool on) => this with
    {
        use_flash_attn = on, fused_bias_fc = on, fused_mlp = on, fused_dropout_add_ln = on, fused_cross_entropy = on,
    };

    /// <summary>The names <see cref="Named"/> knows.</summary>
    public static IReadOnlyList<string> Names { get; } = new[] { "vit-ti16", "vit-s16", "vit-b16", "vit-l16", "vit-tiny-test" };

    /// <summary>ViT-Ti/S/B/L at patch 16 and 224 (DeiT/timm sizes: widths 192/384/768/1024, depths 12/12/12/24, heads
    /// 3/6/12/16); "vit-tiny-test" (32 x 32 images, patch 8, width 64, 2 blocks, 10 classes) is for tests.</summary>
    public static ViTConfig Named(string name) => name switch
    {
        "vit-ti16" => new ViTConfig { embed_dim = 192, depth = 12, num_heads = 3 },
        "vit-s16" => new ViTConfig { embed_dim = 384, depth = 12, num_heads = 6 },
        "vit-b16" => new ViTConfig(),
        "vit-l16" => new ViTConfig { embed_dim = 1024, depth = 24, num_heads = 16 },
        "vit-tiny-test" => new ViTConfig { img_size = 32, patch_size = 8, embed_dim = 64, depth = 2, num_heads = 4, num_classes = 10 },
        _ => throw new ArgumentException($"unknown ViT config '{name}'; valid names: {string.Join(", ", Names)}", nameof(name)),
    };
}

/// <summary>The patch embedding: a Conv2d with kernel and stride patch_size (timm's patch_embed.proj), flattened to tokens.</summary>
public sealed class PatchEmbed : nn.Module<Tensor, Tensor>
{
    private readonly Conv2d proj;

    public PatchEmbed(long in_chans, long embed_dim, long patch_size, Device? device = null, ScalarType? dtype = null)
        : base(nameof(PatchEmbed))
    {
        proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride: patch_size, device: device, dtype: dtype);
        RegisterComponents();
    }

    /// <summary>images (B, C, H, W) -> tokens (B, H/p * W/p, embed_dim).</summary>
    public override Tensor forward(Tensor x)
    {
        TensorArgs.RequireModuleInput(x, nameof(x), proj.weight!);
        TensorArgs.Require(x.dim() == 4 && x.shape[1] == proj.weight!.shape[1], nameof(x),
            $"x must be (batch, {proj.weight!.shape[1]}, height, width), got {TensorArgs.Shape(x)}");
        return proj.forward(x).flatten(2).transpose(1, 2);
    }
}

/// <summary>
/// ViT with a class token and learned positions: patch_embed, cat(cls_token, patches) + pos_embed, the pre-norm blocks
/// (non-causal, stochastic depth), norm, and the head on the class token. Parameter names are timm's VisionTransformer.
/// </summary>
public sealed class VisionTransformer : nn.Module<Tensor, Tensor>
{
    private readonly PatchEmbed _patchEmbed;
    private readonly Parameter _clsToken, _posEmbed;
    private readonly ModuleList<Block> _blocks;
    private readonly DropoutAddLayerNorm _norm;
    private readonly Linear _head;

    public VisionTransformer(ViTConfig config, Device? device = null, ScalarType? dtype = null) : base(nameof(VisionTransformer))
    {
        this.config = config;
        var c = config;
        if (c.embed_dim % c.num_heads != 0) throw new ArgumentException($"embed_dim ({c.embed_dim}) must be divisible by num_heads ({c.num_heads})");
        if (c.img_size % c.patch_size != 0) throw new ArgumentException($"img_size ({c.img_size}) must be a multiple of patch_size ({c.patch_size})");
        _patchEmbed = new PatchEmbed(c.in_chans, c.embed_dim, c.patch_size, device, dtype);
        _clsToken = new Parameter(zeros(new[] { 1L, 1, c.embed_dim }, dtype, device));
        _posEmbed = new Parameter(zeros(new[] { 1L, c.num_patches + 1, c.embed_dim }, dtype, device));
        // stochastic depth rising linearly over the blocks; block i's first drop-path is the previous block's MLP branch
        var dpr = Enumerable.Range(0, (int)c.depth).Select(i => c.depth == 1 ? c.drop_path_rate : c.drop_path_rate * i / (c.depth - 1)).ToArray();
        _blocks = new ModuleList<Block>(Enumerable.Range(0, (int)c.depth).Select(i => NewBlock(c, i == 0 ? 0 : dpr[i - 1], dpr[i], device, dtype)).ToArray());
        // the last MLP output's dropout and drop-path, the last residual add and the final norm
        _norm = Norm(c, dpr[^1], device, dtype);
        _head = nn.Linear(c.embed_dim, c.num_classes, hasBias: true, device: device, dtype: dtype);
        register_module("patch_embed", _patchEmbed);
        register_parameter("cls_token", _clsToken);
        register_parameter("pos_embed", _posEmbed);
        register_module("blocks", _blocks);
        register_module("norm", _norm);
        register_module("head", _head);
        init_weights();
    }

    // Dropout + drop-path + residual add + LayerNorm, the residual returned (prenorm).
    private static DropoutAddLayerNorm Norm(ViTConfig c, double dropPath, Device? device, ScalarType? dtype) =>
        new(c.embed_dim, prenorm: true, p: c.drop_rate, eps: c.layer_norm_epsilon, residual_in_fp32: c.residual_in_fp32,
            device: device, dtype: dtype, drop_path: dropPath, fused_dropout_add_ln: c.fused_dropout_add_ln);

    // A block: norm1, attn (qkv / proj), norm2, mlp (fc1 / fc2), created in that order (the order of their random draws).
    // ViT's exact GELU has no fused epilogue: its MLP is two linears (fused_bias_fc) around TorchSharp's GELU.
    private static Block NewBlock(ViTConfig c, double dropPath1, double dropPath2, Device? device, ScalarType? dtype)
    {
        var norm1 = Norm(c, dropPath1, device, dtype);
        var attn = new MHA(c.embed_dim, c.num_heads, dropout: c.attn_drop_rate, causal: false, use_flash_attn: c.use_flash_attn,
                           device: device, dtype: dtype, fused_bias_fc: c.fused_bias_fc, names: ("qkv", "proj"));
        var norm2 = Norm(c, dropPath2, device, dtype);
        var mlp = MlpModules.Create(c.embed_dim, (long)(c.embed_dim * c.mlp_ratio), c.activation_function, c.fused_mlp,
                                    c.fused_bias_fc, 0, ("fc1", "fc2"), device, dtype);
        return new Block(attn, mlp, norm1, norm2, names: ("norm1", "attn", "norm2", "mlp"));
    }

    public ViTConfig config { get; }
    public ModuleList<Block> blocks => _blocks;

    /// <summary>timm's initialisation: pos_embed and linear weights normal(0.02) (timm truncates at +-2, i.e. 100 std), cls_token normal(1e-6), biases 0,
    /// norms 1; the patch convolution keeps TorchSharp's default.</summary>
    public void init_weights()
    {
        using var _ = no_grad();
        foreach (var (name, p) in named_parameters())
        {
            if (name.StartsWith("patch_embed.")) continue;
            if (name == "cls_token") nn.init.normal_(p, 0, 1e-6);
            else if (name.EndsWith(".bias")) nn.init.zeros_(p);
            else if (p.dim() == 1) nn.init.ones_(p); // norms
            else nn.init.normal_(p, 0, 0.02); // timm's trunc_normal_(std=.02) truncates at +-2 absolute: a plain normal
        }
    }

    /// <summary>images (B, in_chans, img_size, img_size) -> logits (B, num_classes).</summary>
    public override Tensor forward(Tensor images) => _head.forward(forward_features(images)[.., 0]);

    /// <summary>images -> the normalised tokens (B, 1 + num_patches, embed_dim), the class token first.</summary>
    public Tensor forward_features(Tensor images)
    {
        var c = config;
        if (images.dim() != 4 || images.shape[1] != c.in_chans || images.shape[2] != c.img_size || images.shape[3] != c.img_size)
            throw new ArgumentException($"images must be (batch, {c.in_chans}, {c.img_size}, {c.img_size}), got [{string.Join(", ", images.shape)}]", nameof(images));
        TensorArgs.RequireModuleInput(images, nameof(images), _posEmbed);
        var x = _patchEmbed.forward(images);
        x = cat(new[] { _clsToken.expand(x.shape[0], -1, -1).to(x.dtype), x }, 1) + _posEmbed.to(x.dtype);
        Tensor? residual = null;
        foreach (var block in _blocks) (x, residual) = block.forward(x, residual);
        return _norm.forward(x, residual).output;
    }

    /// <summary>Mean cross-entropy of the logits (B, num_classes) against labels (B,) int64 (-100 ignored); fused_cross_entropy
    /// uses the kernel.</summary>
    public Tensor loss(Tensor images, Tensor labels) => ModelLoss.Mean(forward(images), labels, config.fused_cross_entropy);

    public long num_parameters() => parameters().Sum(p => p.numel());

    /// <summary>Every parameter with whether it takes weight decay: none on biases, norms, cls_token and pos_embed (timm's
    /// no_weight_decay and 1-D rule).</summary>
    public IEnumerable<(string name, Parameter parameter, bool weight_decay)> parameter_groups() =>
        named_parameters().Select(np => (np.name, np.parameter, np.parameter.dim() >= 2 && np.name is not ("cls_token" or "pos_embed")));

    /// <summary>
    /// Loads timm weights (model.safetensors of a timm VisionTransformer with a class token and this config) or a file written
    /// by <see cref="save_safetensors"/>: every parameter must be present with its shape (a head of another class count must be
    /// dropped from the file first); values are converted to the model's dtype and device.
    /// </summary>
    public void load_safetensors(string path) => SafeTensors.LoadInto(this, path, "ViT");

    /// <summary>
    /// Loads pretrained weights into a model of another class count or resolution, as timm's pretrained loading does: a
    /// head whose shape differs, or none in the file, keeps this model's initialisation, and pos_embed's grid is resampled
    /// (bicubic, antialiased) to this model's. Every other tensor must match (<see cref="ViTConfig.FromWeights"/> gives the sizes). What was adapted
    /// goes to <paramref name="log"/>.
    /// </summary>
    public void load_pretrained(string path, TextWriter? log = null)
    {
        var tensors = SafeTensors.Load(path);
        try
        {
            var own = named_parameters().ToDictionary(np => np.name, np => np.parameter);
            foreach (var key in tensors.Keys.Where(k => !own.ContainsKey(k)))
                throw new InvalidDataException($"{path}: tensor '{key}' matches no parameter of this ViT");
            using var _ = no_grad();
            foreach (var (name, p) in own)
            {
                if (!tensors.TryGetValue(name, out var t))
                {
                    if (!name.StartsWith("head.")) throw new InvalidDataException($"{path}: no '{name}'");
                    log?.WriteLine($"{name}: not in the weights (a headless file): initialised afresh");
                }
                else if (t.shape.SequenceEqual(p.shape)) p.copy_(t);
                else if (name.StartsWith("head."))
                    log?.WriteLine($"{name}: [{string.Join(", ", t.shape)}] in the weights, [{string.Join(", ", p.shape)}] here: initialised afresh");
                else if (name == "pos_embed" && t.dim() == 3 && t.shape[2] == p.shape[2])
                {
                    p.copy_(ResamplePositions(t, (long)Math.Round(Math.Sqrt(p.shape[1] - 1))));
                    log?.WriteLine($"pos_embed: {t.shape[1] - 1} positions in the weights resampled to {p.shape[1] - 1}");
                }
                else throw new InvalidDataException($"{path}: '{name}' has shape [{string.Join(", ", t.shape)}], the model's is [{string.Join(", ", p.shape)}]");
            }
        }
        finally { foreach (var t in tensors.Values) t.Dispose(); }
    }

    /// <summary>pos_embed (1, 1 + g*g, D) -> (1, 1 + grid*grid, D): the class token's row kept, the g x g grid resized as an
    /// image (bicubic, antialiased when it shrinks; timm's resample_abs_pos_embed).</summary>
    public static Tensor ResamplePositions(Tensor posEmbed, long grid)
    {
        long g = posEmbed.dim() == 3 ? (long)Math.Round(Math.Sqrt(posEmbed.shape[1] - 1)) : 0, d = posEmbed.dim() == 3 ? posEmbed.shape[2] : 0;
        if (posEmbed.dim() != 3 || posEmbed.shape[0] != 1 || g < 1 || g * g != posEmbed.shape[1] - 1 || !posEmbed.is_floating_point())
            throw new ArgumentException($"posEmbed must be floating (1, 1 + g*g, D), got {posEmbed.dtype} [{string.Join(", ", posEmbed.shape)}]", nameof(posEmbed));
        if (grid < 1) throw new ArgumentException($"grid ({grid}) must be >= 1", nameof(grid));
        using var scope = NewDisposeScope();
        var image = posEmbed[.., 1..].to(ScalarType.Float32).reshape(1, g, g, d).permute(0, 3, 1, 2);
        var resized = F.interpolate(image, new[] { grid, grid }, mode: InterpolationMode.Bicubic, align_corners: false, antialias: grid < g);
        var rows = resized.permute(0, 2, 3, 1).reshape(1, grid * grid, d).to(posEmbed.dtype);
        return cat(new[] { posEmbed[.., ..1], rows }, 1).MoveToOuterDisposeScope();
    }

    /// <summary>Writes the parameters with timm's names in the model's dtype, the config as metadata.</summary>
    public void save_safetensors(string path)
    {
        using var scope = NewDisposeScope();
        var tensors = named_parameters().Select(np => new KeyValuePair<string, Tensor>(np.name, np.parameter.detach().contiguous().cpu()));
        SafeTensors.Save(path, tensors, new Dictionary<string, string>
        {
            ["format"] = "pt",
            ["flashattn.model"] = "VisionTransformer",
            ["flashattn.config"] = JsonSerializer.Serialize(config),
        });
    }
}
