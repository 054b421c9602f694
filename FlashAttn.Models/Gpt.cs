// GPT in the style of nanoGPT, readable top to bottom: the config, the building blocks (attention,
// MLP, the pre-norm block with its residual stream), the GPT-2 body, the LM head with the loss,
// initialisation, generation with a KV cache, and checkpoints in safetensors.
//
// Parameter names are Hugging Face GPT-2's (transformer.wte, transformer.h.{i}.attn.c_attn, ...), so
// HF checkpoints load through load_safetensors (their Conv1D weights are stored (in, out) and are
// transposed on the way in and out). Each fusion has a switch in GPTConfig and falls back to plain
// TorchSharp; the module tree and the parameters are the same whichever switches are on, so one
// state dict serves both and fused/plain comparisons share weights exactly.
using System.Text.Json;
using FlashAttn.Interop;
using System.Text.Json.Serialization;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;
using F = TorchSharp.torch.nn.functional;

namespace FlashAttn.Models;

/// <summary>
/// The GPT hyperparameters (field names as Hugging Face's GPT2Config and flash-attn's GPT). The defaults are GPT-2 small
/// with the seed's training switches; <see cref="Named"/> gives the sizes the seed trains.
/// </summary>
public sealed record GPTConfig
{
    private readonly long? _headDim, _nInner;

    /// <summary>50257: the GPT-2 BPE vocabulary.</summary>
    public long vocab_size { get; init; } = 50257;
    /// <summary>8: the embedding and LM-head matrices get a row count that is a multiple of 8, which keeps the
    /// vocabulary GEMM on tensor cores (the seed pads 50257 to 50264). 1 disables padding.</summary>
    public long pad_vocab_size_multiple { get; init; } = 8;
    /// <summary>1024: GPT-2's context; the size of the learned position table (unused with rotary).</summary>
    public long n_positions { get; init; } = 1024;
    /// <summary>768: model width (GPT-2 small).</summary>
    public long n_embd { get; init; } = 768;
    /// <summary>12: number of blocks.</summary>
    public long n_layer { get; init; } = 12;
    /// <summary>12: attention heads.</summary>
    public long n_head { get; init; } = 12;
    /// <summary>n_embd / n_head unless set: the attention width is n_head * head_dim.</summary>
    [JsonIgnore] public long head_dim { get => _headDim ?? n_embd / n_head; init => _headDim = value; }
    /// <summary>4 * n_embd unless set: the MLP's hidden width (GPT-2's ratio).</summary>
    [JsonIgnore] public long n_inner { get => _nInner ?? 4 * n_embd; init => _nInner = value; }
    // serialised as set (null when derived), so a config read back from a checkpoint equals the one written
    [JsonInclude, JsonPropertyName("head_dim")] private long? head_dim_explicit { get => _headDim; init => _headDim = value; }
    [JsonInclude, JsonPropertyName("n_inner")] private long? n_inner_explicit { get => _nInner; init => _nInner = value; }
    /// <summary>"gelu_new": GPT-2's tanh-approximated GELU; "gelu" (exact) and "relu" also work.</summary>
    public string activation_function { get; init; } = "gelu_new";
    /// <summary>0: learned absolute positions (GPT-2). &gt; 0: rotary on that fraction of each head and no position
    /// table (the seed's gpt3s-rotary uses 0.5).</summary>
    public double rotary_emb_fraction { get; init; } = 0.0;
    /// <summary>10000: the rotary frequency base of RoFormer / GPT-NeoX.</summary>
    public double rotary_emb_base { get; init; } = 10000.0;
    /// <summary>false: GPT-NeoX style rotary (rotate halves); true rotates interleaved pairs (GPT-J).</summary>
    public bool rotary_emb_interleaved { get; init; }
    /// <summary>0.1: dropout on the attention and MLP outputs (GPT2Config's default, used by the seed).</summary>
    public double resid_pdrop { get; init; } = 0.1;
    /// <summary>0.1: dropout on the embeddings.</summary>
    public double embd_pdrop { get; init; } = 0.1;
    /// <summary>0.1: dropout on the attention probabilities.</summary>
    public double attn_pdrop { get; init; } = 0.1;
    /// <summary>1e-5: LayerNorm epsilon (GPT-2).</summary>
    public double layer_norm_epsilon { get; init; } = 1e-5;
    /// <summary>0.02: std of the normal initialisation (GPT-2); residual projections get 1/sqrt(2 n_layer) of it.</summary>
    public double initializer_range { get; init; } = 0.02;
    /// <summary>true: scores are scaled by 1/sqrt(head_dim); false leaves them unscaled.</summary>
    public bool scale_attn_weights { get; init; } = true;
    /// <summary>false (HF GPT-2): when true, layer i also divides its scores by i + 1, which keeps fp16 training
    /// stable (the seed turns it on; <see cref="Named"/> does too). Load HF GPT-2 weights with it off.</summary>
    public bool scale_attn_by_inverse_layer_idx { get; init; }
    /// <summary>true: the LM head shares the token embedding (GPT-2).</summary>
    public bool tie_word_embeddings { get; init; } = true;

    // The fusion switches: all on in the seed's experiments. Each falls back to plain TorchSharp when off (and the
    // fused ops themselves take their reference path on CPU or without the CUDA library).
    /// <summary>true: attention through flash_attn_func; false: TorchSharp's scaled_dot_product_attention.</summary>
    public bool use_flash_attn { get; init; } = true;
    /// <summary>true: linear layers through flash_attn.fused_dense_func (FusedDense: GEMM with the bias in its epilogue).</summary>
    public bool fused_bias_fc { get; init; } = true;
    /// <summary>true: the MLP through flash_attn.fused_mlp_func (FusedMLP: GEMM + bias + tanh-GELU fused).</summary>
    public bool fused_mlp { get; init; } = true;
    /// <summary>true: dropout + residual add + LayerNorm in one kernel (flash_attn.dropout_add_layer_norm).</summary>
    public bool fused_dropout_add_ln { get; init; } = true;
    /// <summary>true: the loss through flash-attn's cross-entropy kernel with in-place backward (no second logits-sized buffer).</summary>
    public bool fused_cross_entropy { get; init; } = true;
    /// <summary>true: the residual stream is kept in float32 when the model runs in bf16/fp16 (the seed's setting).</summary>
    public bool residual_in_fp32 { get; init; } = true;
    /// <summary>0: the fused MLP keeps fc1's pre-activation and the activation for the backward; 1: the pre-activation only
    /// (the activation is recomputed); 2: neither (fc1 is recomputed). flash-attn's GPT knob (the seed's 2.7B sets 0);
    /// it trades memory for recomputation in the fused MLP only.</summary>
    public int mlp_checkpoint_lvl { get; init; }

    /// <summary>vocab_size rounded up to a multiple of pad_vocab_size_multiple: the rows of wte and the logits' width.</summary>
    public long padded_vocab_size =>
        pad_vocab_size_multiple <= 1 ? vocab_size : (vocab_size + pad_vocab_size_multiple - 1) / pad_vocab_size_multiple * pad_vocab_size_multiple;

    /// <summary>The rotated features per head: head_dim * rotary_emb_fraction (0 = learned positions).</summary>
    public long rotary_emb_dim => (long)(head_dim * rotary_emb_fraction);

    /// <summary>A copy with every fusion switch (use_flash_attn, fused_bias_fc, fused_mlp, fused_dropout_add_ln,
    /// fused_cross_entropy) set to <paramref name="on"/>; residual_in_fp32 is left as it is.</summary>
    public GPTConfig WithFusions(bool on) => this with
    {
        use_flash_attn = on, fused_bias_fc = on, fused_mlp = on, fused_dropout_add_ln = on, fused_cross_entropy = on,
    };

    /// <summary>The names <see cref="Named"/> knows.</summary>
    public static IReadOnlyList<string> Names { get; } = new[]
    {
        "gpt2s", "gpt2m", "gpt2l", "gpt2xl", "gpt3s", "gpt3m", "gpt3l", "gpt3xl", "gpt3-2.7B", "gpt3s-rotary", "tiny",
    };

    /// <summary>
    /// The sizes of the seed's experiments (shared/seed/experiments.md): GPT-2 124M/350M/774M/1558M at context 1024 and
    /// GPT-3 125M/350M/760M/1.3B/2.7B at 2048 (2.7B with head dim 128), all with scale_attn_by_inverse_layer_idx and every
    /// fusion on; "gpt3s-rotary" has rotary on half of each head and no position table; "tiny" (2 layers, width 64,
    /// 4 heads, vocabulary 256, context 64) is for tests.
    /// </summary>
    public static GPTConfig Named(string name)
    {
        var seed = new GPTConfig { scale_attn_by_inverse_layer_idx = true };
        GPTConfig gpt3(long L, long d, long h) => seed with { n_layer = L, n_embd = d, n_head = h, n_positions = 2048 };
        return name switch
        {
            "gpt2s" => seed,
            "gpt2m" => seed with { n_layer = 24, n_embd = 1024, n_head = 16 },
            "gpt2l" => seed with { n_layer = 36, n_embd = 1280, n_head = 20 },
            "gpt2xl" => seed with { n_layer = 48, n_embd = 1600, n_head = 25 },
            "gpt3s" => gpt3(12, 768, 12),
            "gpt3m" => gpt3(24, 1024, 16),
            "gpt3l" => gpt3(24, 1536, 16),
            "gpt3xl" => gpt3(24, 2048, 16),
            // head dim 128 (20 heads of 2560) as the seed's gpt3-2.7B-flash-hdim128; init std sqrt(2 / (5 d)) as there
            "gpt3-2.7B" => gpt3(32, 2560, 20) with { initializer_range = Math.Sqrt(2.0 / (5 * 2560)) },
            "gpt3s-rotary" => gpt3(12, 768, 12) with { rotary_emb_fraction = 0.5 },
            "tiny" => seed with { vocab_size = 256, n_positions = 64, n_embd = 64, n_layer = 2, n_head = 4 },
            _ => throw new ArgumentException($"unknown GPT config '{name}'; valid names: {string.Join(", ", Names)}", nameof(name)),
        };
    }

    /// <summary>The config stored in a checkpoint's metadata by <see cref="GPTLMHeadModel.save_safetensors"/>.</summary>
    /// <exception cref="InvalidDataException">The file has no flashattn.config metadata (e.g. a Hugging Face checkpoint).</exception>
    public static GPTConfig FromSafetensors(string path)
    {
        var (_, meta) = SafeTensors.ReadHeader(path);
        if (!meta.TryGetValue("flashattn.config", out var json))
            throw new InvalidDataException($"{path}: no flashattn.config metadata (not written by GPTLMHeadModel.save_safetensors)");
        if (meta.TryGetValue("flashattn.model", out var model) && model != "GPTLMHeadModel")
            throw new InvalidDataException($"{path} holds a {model}, not a GPTLMHeadModel");
        return JsonSerializer.Deserialize<GPTConfig>(json) ?? throw new InvalidDataException($"{path}: empty flashattn.config");
    }

    /// <summary>
    /// The config.json of a Hugging Face GPT-2 checkpoint folder (GPT2Config, model_type "gpt2": gpt2, gpt2-medium, ...,
    /// distilgpt2). Its keys are ours (n_inner null: 4 n_embd, as there; scale_attn_by_inverse_layer_idx false unless set);
    /// the fusions are on and the vocabulary is padded as ours (the checkpoint's unpadded wte loads into it).
    /// </summary>
    /// <exception cref="InvalidDataException">Not a GPT-2 config (another model_type, or sizes that do not make a model).</exception>
    public static GPTConfig FromHuggingFace(string configJsonPath)
    {
        var json = File.ReadAllText(configJsonPath);
        try
        {
            var modelType = System.Text.Json.Nodes.JsonNode.Parse(json)?["model_type"] is System.Text.Json.Nodes.JsonValue v && v.TryGetValue<string>(out var t) ? t : null;
            if (modelType != "gpt2")
                throw new InvalidDataException($"{configJsonPath}: model_type {modelType ?? "(none)"}; a Hugging Face GPT-2 config (model_type gpt2) expected");
            var config = JsonSerializer.Deserialize<GPTConfig>(json) ?? throw new InvalidDataException($"{configJsonPath}: empty");
            config.Validate();
            return config;
        }
        catch (Exception e) when (e is JsonException or ArgumentException) { throw new InvalidDataException($"{configJsonPath}: {e.Message}"); }
    }

    internal void Validate()
    {
        void Require(bool ok, string what) { if (!ok) throw new ArgumentException($"GPTConfig: {what}"); }
        Require(vocab_size > 0 && n_embd > 0 && n_layer > 0 && n_head > 0 && n_inner > 0 && head_dim > 0, "sizes must be positive");
        Require(_headDim is not null || n_embd % n_head == 0, $"n_embd ({n_embd}) must be divisible by n_head ({n_head}) unless head_dim is set");
        Require(rotary_emb_fraction >= 0 && rotary_emb_fraction <= 1, $"rotary_emb_fraction ({rotary_emb_fraction}) must be in [0, 1]");
        Require(rotary_emb_dim % 2 == 0, $"the rotary dimension (head_dim * rotary_emb_fraction = {rotary_emb_dim}) must be even");
        Require(rotary_emb_fraction > 0 || n_positions > 0, "learned positions need n_positions > 0");
        foreach (var (p, n) in new[] { (resid_pdrop, "resid_pdrop"), (embd_pdrop, "embd_pdrop"), (attn_pdrop, "attn_pdrop") })
            Require(p >= 0 && p < 1, $"{n} ({p}) must be in [0, 1)");
        Require(mlp_checkpoint_lvl is >= 0 and <= 2, $"mlp_checkpoint_lvl ({mlp_checkpoint_lvl}) must be 0, 1 or 2");
    }
}

/// <summary>The parameter names of a block's submodules: Hugging Face GPT-2's or timm's ViT's.</summary>
public sealed record BlockNames(string norm1, string norm2, string qkv, string proj, string fc1, string fc2)
{
    /// <summary>h.{i}.ln_1, attn.c_attn, attn.c_proj, ln_2, mlp.c_fc, mlp.c_proj.</summary>
    public static BlockNames Gpt2 { get; } = new("ln_1", "ln_2", "c_attn", "c_proj", "c_fc", "c_proj");
    /// <summary>blocks.{i}.norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2.</summary>
    public static BlockNames Timm { get; } = new("norm1", "norm2", "qkv", "proj", "fc1", "fc2");
}

/// <summary>What a <see cref="Block"/> computes, shared by GPT and ViT.</summary>
public sealed record BlockSettings(long d_model, long n_head, long head_dim, long d_inner, string activation, bool causal,
    double? softmax_scale, double attn_pdrop, long rotary_dim, double rotary_base, bool rotary_interleaved, double layer_norm_epsilon,
    bool use_flash_attn, bool fused_bias_fc, bool fused_mlp, bool fused_dropout_add_ln, bool residual_in_fp32, BlockNames names,
    int mlp_checkpoint_lvl = 0);

/// <summary>
/// The pre-allocated keys and values of every layer for incremental decoding: (batch, max_length, n_head, head_dim)
/// per layer, filled up to <see cref="length"/>.
/// </summary>
public sealed class KVCache : IDisposable
{
    private readonly Tensor[] _k, _v;

    /// <summary>Tokens already in the cache (the position of the next token).</summary>
    public long length { get; internal set; }
    public long max_length { get; }
    /// <summary>The sequences it holds.</summary>
    public long batch => _k[0].shape[0];
    /// <summary>The layers it holds.</summary>
    public int n_layer => _k.Length;

    public KVCache(int n_layer, long batch, long max_length, long n_head, long head_dim, ScalarType dtype, Device device)
    {
        this.max_length = max_length;
        _k = Enumerable.Range(0, n_layer).Select(_ => zeros(new[] { batch, max_length, n_head, head_dim }, dtype, device)).ToArray();
        _v = Enumerable.Range(0, n_layer).Select(_ => zeros(new[] { batch, max_length, n_head, head_dim }, dtype, device)).ToArray();
    }

    /// <summary>Writes k, v (batch, seqlen, n_head, head_dim) at positions [length, length + seqlen) of layer
    /// <paramref name="layer"/> and returns that layer's keys and values for positions [0, length + seqlen).</summary>
    internal (Tensor k, Tensor v) Append(int layer, Tensor k, Tensor v)
    {
        long s = k.shape[1]; // room checked by SelfAttention.forward
        _k[layer].narrow(1, length, s).copy_(k);
        _v[layer].narrow(1, length, s).copy_(v);
        return (_k[layer].narrow(1, 0, length + s), _v[layer].narrow(1, 0, length + s));
    }

    public void Dispose()
    {
        foreach (var t in _k.Concat(_v)) t.Dispose();
    }
}

/// <summary>Input checks the GPT and ViT modules share (ArgumentExceptions naming the argument, before any work).</summary>
internal static class Inputs
{
    /// <summary>Hidden states (batch, seqlen, width) in the dtype and on the device of the module's parameter.</summary>
    internal static void RequireHidden(Tensor x, string name, long width, Tensor parameter)
    {
        TensorArgs.RequireModuleInput(x, name, parameter);
        TensorArgs.Require(x.dim() == 3 && x.shape[2] == width, name, $"{name} must be (batch, seqlen, {width}), got {TensorArgs.Shape(x)}");
    }

    /// <summary>
    /// wte(input_ids) with token ids outside [0, vocab) caught: on the CPU an ArgumentException now; on a GPU, where a
    /// check would make every step wait for the device, their rows become NaN (the lookup reads row 0 instead, since an
    /// out-of-range lookup ends the CUDA context) and the error is raised by the next flash_attn call or check_errors.
    /// </summary>
    internal static Tensor Embed(Embedding wte, Tensor ids, long vocab)
    {
        using var scope = NewDisposeScope();
        var known = ids.ge(0).logical_and(ids.lt(vocab));
        flash_attn.assert_async(known, "input_ids", $"input_ids must be token ids in [0, vocab_size = {vocab}): the rows of others are NaN");
        if (ids.device_type == DeviceType.CPU) return wte.forward(ids).MoveToOuterDisposeScope();
        var unknown = known.logical_not();
        return wte.forward(ids.masked_fill(unknown, 0)).masked_fill(unknown.unsqueeze(-1), double.NaN).MoveToOuterDisposeScope();
    }
}

/// <summary>Dispatch of the fused kernels behind the switches (and the plain TorchSharp fallbacks).</summary>
internal static class Fused
{
    /// <summary>y = x W^T + b: flash_attn.fused_dense_func (FusedDense: one cuBLASLt GEMM with the bias epilogue, the bias
    /// gradient fused into the weight-gradient GEMM) when fused, else nn.Linear.</summary>
    internal static Tensor Linear(Linear layer, Tensor x, bool fused) =>
        fused ? flash_attn.fused_dense_func(x, layer.weight!, layer.bias) : layer.forward(x);

    /// <summary>fc2(act(fc1(x))): flash_attn.fused_mlp_func (FusedMLP: bias + activation in fc1's GEMM epilogue, their
    /// gradients in fc2's backward GEMM) when fused and the activation is tanh-GELU or ReLU; else two linears (each fused
    /// or not by fusedBiasFc) around TorchSharp's activation.</summary>
    internal static Tensor Mlp(Linear fc1, Linear fc2, string activation, Tensor x, bool fusedMlp, bool fusedBiasFc, bool training,
        int checkpointLvl = 0)
    {
        var fusedAct = activation switch
        {
            "gelu_new" or "gelu_pytorch_tanh" or "gelu_approx" => "gelu_approx",
            "relu" => "relu",
            _ => null, // exact GELU (ViT) has no fused epilogue
        };
        if (fusedMlp && fusedAct is not null)
            return flash_attn.fused_mlp_func(x, fc1.weight!, fc2.weight!, fc1.bias, fc2.bias, fusedAct, save_pre_act: training,
                checkpoint_lvl: checkpointLvl);
        return Linear(fc2, Activation(Linear(fc1, x, fusedBiasFc), activation), fusedBiasFc);
    }

    internal static Tensor Activation(Tensor x, string activation) => activation switch
    {
        "gelu_new" or "gelu_pytorch_tanh" or "gelu_approx" => F.gelu(x, GELU.Approximate.tanh),
        "gelu" => F.gelu(x),
        "relu" => F.relu(x),
        _ => throw new ArgumentException($"unknown activation '{activation}' (gelu_new, gelu, relu)"),
    };

    /// <summary>
    /// The residual stream's step before each norm: residual = drop_path(dropout(x0)) + residual (x0 alone when residual is
    /// null), then (LayerNorm(residual), residual), the residual in float32 when residualInFp32. Fused: one kernel
    /// (flash_attn.dropout_add_layer_norm, drop-path as its rowscale); plain: dropout, add, nn.LayerNorm.
    /// </summary>
    internal static (Tensor hidden, Tensor residual) DropoutAddNorm(Tensor x0, Tensor? residual, LayerNorm norm, double p,
        double dropPath, double eps, bool training, bool fused, bool residualInFp32)
    {
        if (!training) (p, dropPath) = (0, 0);
        Tensor? rowscale = null;
        if (dropPath > 0)
        {
            // stochastic depth: drop the whole branch of a sample with probability dropPath, rescale the kept ones
            var keep = empty(new[] { x0.shape[0] }, ScalarType.Float32, x0.device).bernoulli_(1 - dropPath).div_(1 - dropPath);
            long perSample = x0.shape[1..^1].Aggregate(1L, (a, b) => a * b); // the rows of one sample
            rowscale = keep.view(-1, 1).expand(x0.shape[0], perSample).reshape(-1).to(x0.dtype);
        }
        if (fused)
        {
            var (o, r, _) = flash_attn.dropout_add_layer_norm(x0, residual, norm.weight!, norm.bias, p, eps, rowscale: rowscale,
                                                              prenorm: true, residual_in_fp32: residualInFp32);
            return (o, r!);
        }
        var dropped = p > 0 ? F.dropout(x0, p, training: true) : x0;
        if (rowscale is not null) dropped = dropped * rowscale.view(x0.shape[..^1].Append(1L).ToArray());
        var res = residual is null ? dropped : dropped + residual;
        var hidden = norm.forward(res.to(norm.weight!.dtype));
        if (residualInFp32 && res.dtype != ScalarType.Float64) res = res.to(ScalarType.Float32);
        return (hidden, res);
    }
}

/// <summary>
/// Multi-head self-attention with a fused QKV projection: qkv (d_model -> 3 * n_head * head_dim), optional rotary on q and k,
/// causal or not, then the output projection. Attention runs through flash_attn_func (use_flash_attn) or TorchSharp's
/// scaled_dot_product_attention. With a <see cref="KVCache"/>, new keys/values are appended and the queries attend to the
/// whole cache: causal masking aligned bottom-right makes that exact for any number of new tokens.
/// </summary>
public sealed class SelfAttention : nn.Module
{
    private readonly BlockSettings _s;
    private readonly int _layer;
    private readonly Linear _qkv, _proj;
    private readonly RotaryEmbedding? _rotary;

    public SelfAttention(BlockSettings s, int layer_idx, Device? device = null, ScalarType? dtype = null) : base(nameof(SelfAttention))
    {
        (_s, _layer) = (s, layer_idx);
        long inner = s.n_head * s.head_dim;
        _qkv = nn.Linear(s.d_model, 3 * inner, hasBias: true, device: device, dtype: dtype);
        _proj = nn.Linear(inner, s.d_model, hasBias: true, device: device, dtype: dtype);
        register_module(s.names.qkv, _qkv);
        register_module(s.names.proj, _proj);
        if (s.rotary_dim > 0)
        {
            _rotary = new RotaryEmbedding(s.rotary_dim, s.rotary_base, s.rotary_interleaved);
            register_module("rotary_emb", _rotary); // no parameters: registered so its cos/sin tables go with the model
        }
    }

    public Linear qkv => _qkv;
    public Linear proj => _proj;

    public Tensor forward(Tensor x, KVCache? cache = null)
    {
        Inputs.RequireHidden(x, nameof(x), _s.d_model, _qkv.weight!);
        long B = x.shape[0], S = x.shape[1], H = _s.n_head, D = _s.head_dim;
        var qkv = Fused.Linear(_qkv, x, _s.fused_bias_fc).view(B, S, 3, H, D);
        long offset = cache?.length ?? 0;
        // unbind: its backward stacks the three gradients in one kernel; an index per part would zero-fill three
        // gradients of qkv's size and add them (about 0.75 GB of traffic per layer at GPT-2 124M, B 16, T 1024)
        var parts = qkv.unbind(2);
        Tensor q = parts[0], k = parts[1], v = parts[2];
        if (_rotary is not null)
        {
            // out of place: qkv may be a view of a custom autograd function's output (fused_dense_func), which autograd
            // forbids modifying in place
            var (cos, sin) = _rotary.Tables(offset + S, x.device);
            q = flash_attn.apply_rotary_emb(q, cos, sin, _s.rotary_interleaved, inplace: false, seqlen_offset: offset);
            k = flash_attn.apply_rotary_emb(k, cos, sin, _s.rotary_interleaved, inplace: false, seqlen_offset: offset);
        }
        if (cache is not null)
        {
            TensorArgs.Require(_layer < cache.n_layer && cache.batch == B && cache.length + S <= cache.max_length, nameof(cache),
                $"the cache ({cache.n_layer} layers of {cache.batch} sequences, {cache.length} of {cache.max_length} positions taken) has no room for layer {_layer}'s {B} x {S} tokens");
            (k, v) = cache.Append(_layer, k, v);
        }
        double p = training ? _s.attn_pdrop : 0.0;
        var o = _s.use_flash_attn
            ? flash_attn.flash_attn_func(q, k, v, p, _s.softmax_scale, _s.causal)
            : PlainAttention(q, k, v, p);
        return Fused.Linear(_proj, o.reshape(B, S, H * D), _s.fused_bias_fc);
    }

    // TorchSharp's SDPA takes (B, H, S, D) and always scales by 1/sqrt(D): another scale is folded into q. Its causal mask
    // is aligned top-left, so with a cache (seqlen_q < seqlen_k) the bottom-right mask is passed explicitly.
    private Tensor PlainAttention(Tensor q, Tensor k, Tensor v, double p)
    {
        long D = q.shape[^1], Sq = q.shape[1], Sk = k.shape[1];
        double scale = _s.softmax_scale ?? 1.0 / Math.Sqrt(D);
        var qt = q.transpose(1, 2);
        if (Math.Abs(scale * Math.Sqrt(D) - 1.0) > 1e-12) qt = qt * (scale * Math.Sqrt(D));
        Tensor? mask = null;
        bool isCausal = false;
        if (_s.causal && Sq == Sk) isCausal = true;
        else if (_s.causal && Sq > 1) mask = ones(new[] { Sq, Sk }, ScalarType.Bool, q.device).tril(Sk - Sq);
        return F.scaled_dot_product_attention(qt, k.transpose(1, 2), v.transpose(1, 2), mask, p, isCausal).transpose(1, 2);
    }
}

/// <summary>The position-wise MLP: fc1 (d_model -> d_inner), activation, fc2 (d_inner -> d_model).</summary>
public sealed class Mlp : nn.Module
{
    private readonly BlockSettings _s;
    private readonly Linear _fc1, _fc2;

    public Mlp(BlockSettings s, Device? device = null, ScalarType? dtype = null) : base(nameof(Mlp))
    {
        _s = s;
        _fc1 = nn.Linear(s.d_model, s.d_inner, hasBias: true, device: device, dtype: dtype);
        _fc2 = nn.Linear(s.d_inner, s.d_model, hasBias: true, device: device, dtype: dtype);
        register_module(s.names.fc1, _fc1);
        register_module(s.names.fc2, _fc2);
    }

    public Linear fc1 => _fc1;
    public Linear fc2 => _fc2;

    public Tensor forward(Tensor x)
    {
        TensorArgs.RequireModuleInput(x, nameof(x), _fc1.weight!);
        TensorArgs.Require(x.dim() >= 1 && x.shape[^1] == _s.d_model, nameof(x), $"x must be (..., {_s.d_model}), got {TensorArgs.Shape(x)}");
        return Fused.Mlp(_fc1, _fc2, _s.activation, x, _s.fused_mlp, _s.fused_bias_fc, training, _s.mlp_checkpoint_lvl);
    }
}

/// <summary>
/// A pre-norm transformer block written over the residual stream, as flash-attn's Block:
/// residual = dropout(hidden) + residual; hidden = attn(norm1(residual));
/// residual = dropout(hidden) + residual; hidden = mlp(norm2(residual)); returns (hidden, residual).
/// This is GPT-2's x = x + attn(ln_1(x)); x = x + mlp(ln_2(x)) with each dropout-add-norm one fused kernel; the dropout
/// before norm1 belongs to the previous block's MLP output (or to the embeddings, for the first block).
/// </summary>
public sealed class Block : nn.Module
{
    private readonly BlockSettings _s;
    private readonly LayerNorm _norm1, _norm2;
    private readonly SelfAttention _attn;
    private readonly Mlp _mlp;
    private readonly double _p1, _p2, _dropPath1, _dropPath2;

    /// <param name="s">What the block computes.</param>
    /// <param name="layer_idx">The block's index (KV-cache slot).</param>
    /// <param name="dropout1">Dropout on the incoming hidden states (the embeddings' or the previous MLP's).</param>
    /// <param name="dropout2">Dropout on the attention output.</param>
    /// <param name="drop_path1">Drop-path on the incoming hidden states (the previous block's rate).</param>
    /// <param name="drop_path2">Drop-path on the attention output (this block's rate).</param>
    /// <param name="device">Where the parameters are created.</param>
    /// <param name="dtype">The parameters' dtype.</param>
    public Block(BlockSettings s, int layer_idx, double dropout1, double dropout2, double drop_path1 = 0, double drop_path2 = 0,
        Device? device = null, ScalarType? dtype = null) : base(nameof(Block))
    {
        (_s, _p1, _p2, _dropPath1, _dropPath2) = (s, dropout1, dropout2, drop_path1, drop_path2);
        _norm1 = nn.LayerNorm(s.d_model, s.layer_norm_epsilon, device: device, dtype: dtype);
        _attn = new SelfAttention(s, layer_idx, device, dtype);
        _norm2 = nn.LayerNorm(s.d_model, s.layer_norm_epsilon, device: device, dtype: dtype);
        _mlp = new Mlp(s, device, dtype);
        register_module(s.names.norm1, _norm1);
        register_module("attn", _attn);
        register_module(s.names.norm2, _norm2);
        register_module("mlp", _mlp);
    }

    public LayerNorm norm1 => _norm1;
    public LayerNorm norm2 => _norm2;
    public SelfAttention attn => _attn;
    public Mlp mlp => _mlp;

    public (Tensor hidden, Tensor residual) forward(Tensor hidden, Tensor? residual, KVCache? cache = null)
    {
        Inputs.RequireHidden(hidden, nameof(hidden), _s.d_model, _norm1.weight!);
        if (residual is not null)
        {
            TensorArgs.Require(residual.shape.SequenceEqual(hidden.shape), nameof(residual),
                $"residual must have hidden's shape {TensorArgs.Shape(hidden)}, got {TensorArgs.Shape(residual)}");
            TensorArgs.Require(residual.dtype == hidden.dtype || residual.dtype == ScalarType.Float32, nameof(residual),
                $"residual must have hidden's dtype ({hidden.dtype}) or float32, got {residual.dtype}");
            TensorArgs.RequireSameDevice(residual, hidden, nameof(residual), nameof(hidden));
        }
        (hidden, residual) = Fused.DropoutAddNorm(hidden, residual, _norm1, _p1, _dropPath1, _s.layer_norm_epsilon, training,
                                                  _s.fused_dropout_add_ln, _s.residual_in_fp32);
        hidden = _attn.forward(hidden, cache);
        (hidden, residual) = Fused.DropoutAddNorm(hidden, residual, _norm2, _p2, _dropPath2, _s.layer_norm_epsilon, training,
                                                  _s.fused_dropout_add_ln, _s.residual_in_fp32);
        return (_mlp.forward(hidden), residual);
    }
}

/// <summary>The GPT-2 body ("transformer"): wte, wpe (learned positions only), the blocks h.{i}, ln_f.</summary>
public sealed class GPTModel : nn.Module<Tensor, Tensor>
{
    private readonly GPTConfig _c;
    private readonly Embedding _wte;
    private readonly Embedding? _wpe;
    private readonly ModuleList<Block> _h;
    private readonly LayerNorm _lnF;

    public GPTModel(GPTConfig config, Device? device = null, ScalarType? dtype = null) : base(nameof(GPTModel))
    {
        config.Validate();
        _c = config;
        long hd = config.head_dim;
        double? scale0 = config.scale_attn_weights ? null : 1.0;
        _wte = nn.Embedding(config.padded_vocab_size, config.n_embd, device: device, dtype: dtype);
        if (config.rotary_emb_fraction == 0) _wpe = nn.Embedding(config.n_positions, config.n_embd, device: device, dtype: dtype);
        _h = new ModuleList<Block>(Enumerable.Range(0, (int)config.n_layer).Select(i =>
        {
            double? scale = scale0;
            if (config.scale_attn_by_inverse_layer_idx) scale = (scale ?? 1.0 / Math.Sqrt(hd)) / (i + 1);
            var s = new BlockSettings(config.n_embd, config.n_head, hd, config.n_inner, config.activation_function, causal: true,
                scale, config.attn_pdrop, config.rotary_emb_dim, config.rotary_emb_base, config.rotary_emb_interleaved,
                config.layer_norm_epsilon, config.use_flash_attn, config.fused_bias_fc, config.fused_mlp,
                config.fused_dropout_add_ln, config.residual_in_fp32, BlockNames.Gpt2, config.mlp_checkpoint_lvl);
            return new Block(s, i, dropout1: i == 0 ? config.embd_pdrop : config.resid_pdrop, dropout2: config.resid_pdrop,
                             device: device, dtype: dtype);
        }).ToArray());
        _lnF = nn.LayerNorm(config.n_embd, config.layer_norm_epsilon, device: device, dtype: dtype);
        register_module("wte", _wte);
        if (_wpe is not null) register_module("wpe", _wpe);
        register_module("h", _h);
        register_module("ln_f", _lnF);
    }

    public Embedding wte => _wte;
    public Embedding? wpe => _wpe;
    public ModuleList<Block> h => _h;
    public LayerNorm ln_f => _lnF;

    /// <summary>input_ids (B, T) int64 -> the final hidden states (B, T, n_embd).</summary>
    public override Tensor forward(Tensor input_ids) => forward(input_ids, null);

    /// <summary>With a cache, input_ids are the next tokens at positions [cache.length, cache.length + T); the cache advances.</summary>
    public Tensor forward(Tensor input_ids, KVCache? cache)
    {
        if (input_ids.dim() != 2) throw new ArgumentException($"input_ids must be (batch, seqlen), got [{string.Join(", ", input_ids.shape)}]", nameof(input_ids));
        TensorArgs.Require(input_ids.dtype is ScalarType.Int64 or ScalarType.Int32, nameof(input_ids), $"input_ids must be int64 or int32, got {input_ids.dtype}");
        TensorArgs.RequireSameDevice(input_ids, _wte.weight!, nameof(input_ids), "the model's parameters");
        long T = input_ids.shape[1], offset = cache?.length ?? 0;
        if (_wpe is not null && offset + T > _c.n_positions)
            throw new ArgumentException($"sequence length {offset + T} exceeds n_positions ({_c.n_positions})", nameof(input_ids));
        if (cache is not null)
        {
            TensorArgs.Require(cache.n_layer == _h.Count && cache.batch == input_ids.shape[0], nameof(cache),
                $"the cache holds {cache.n_layer} layers of {cache.batch} sequences, the model {_h.Count} layers and input_ids {input_ids.shape[0]}");
            TensorArgs.Require(offset + T <= cache.max_length, nameof(cache),
                $"the cache holds {cache.max_length} positions, {offset} taken: no room for {T} more tokens");
        }
        var hidden = Inputs.Embed(_wte, input_ids, _c.vocab_size);
        if (_wpe is not null) hidden = hidden + _wpe.forward(arange(offset, offset + T, dtype: ScalarType.Int64, device: input_ids.device));
        Tensor? residual = null;
        foreach (var block in _h) (hidden, residual) = block.forward(hidden, residual, cache);
        if (cache is not null) cache.length += T;
        // the last MLP output's dropout, the last residual add and ln_f
        (hidden, _) = Fused.DropoutAddNorm(hidden, residual, _lnF, _c.resid_pdrop, 0, _c.layer_norm_epsilon, training,
                                           _c.fused_dropout_add_ln, _c.residual_in_fp32);
        return hidden;
    }
}

/// <summary>
/// GPT-2 with the language-model head (tied to wte unless tie_word_embeddings is false): input_ids (B, T) -> logits
/// (B, T, padded_vocab_size). Parameters are named as Hugging Face's GPT2LMHeadModel.
/// </summary>
public sealed class GPTLMHeadModel : nn.Module<Tensor, Tensor>
{
    private readonly GPTModel _transformer;
    private readonly Linear? _lmHead;

    /// <summary>Builds the model, initialised as GPT-2 (normal(0, initializer_range), residual projections scaled by
    /// 1/sqrt(2 n_layer), biases 0, norms 1), on <paramref name="device"/> in <paramref name="dtype"/>.</summary>
    public GPTLMHeadModel(GPTConfig config, Device? device = null, ScalarType? dtype = null) : base(nameof(GPTLMHeadModel))
    {
        this.config = config;
        _transformer = new GPTModel(config, device, dtype);
        register_module("transformer", _transformer);
        if (!config.tie_word_embeddings)
        {
            _lmHead = nn.Linear(config.n_embd, config.padded_vocab_size, hasBias: false, device: device, dtype: dtype);
            register_module("lm_head", _lmHead);
        }
        init_weights();
    }

    public GPTConfig config { get; }
    public GPTModel transformer => _transformer;

    /// <summary>The LM head's weight (padded_vocab_size, n_embd): wte's when tied.</summary>
    public Parameter lm_head_weight => _lmHead?.weight ?? _transformer.wte.weight!;

    /// <summary>GPT-2's initialisation (see the constructor); call again to re-draw.</summary>
    public void init_weights()
    {
        using var _ = no_grad();
        double std = config.initializer_range, residStd = std / Math.Sqrt(2.0 * config.n_layer);
        foreach (var (name, p) in named_parameters())
        {
            if (name.EndsWith(".bias")) nn.init.zeros_(p);
            else if (name.Contains(".ln_") || name.StartsWith("transformer.ln_f")) nn.init.ones_(p);
            else if (name.EndsWith("attn.c_proj.weight") || name.EndsWith("mlp.c_proj.weight")) nn.init.normal_(p, 0, residStd);
            else nn.init.normal_(p, 0, std);
        }
    }

    /// <summary>input_ids (B, T) int64 -> logits (B, T, padded_vocab_size).</summary>
    public override Tensor forward(Tensor input_ids) => forward(input_ids, null);

    /// <summary>Logits for the next tokens at the cache's positions (the cache advances by T).</summary>
    public Tensor forward(Tensor input_ids, KVCache? cache) => F.linear(_transformer.forward(input_ids, cache), lm_head_weight);

    /// <summary>
    /// Mean cross-entropy over the positions whose label is not -100. labels (B, T) are aligned with input_ids (already
    /// shifted: labels[t] is the token after input_ids[t], as the data loaders produce them). fused_cross_entropy uses
    /// flash-attn's kernel with in-place backward; otherwise TorchSharp's cross_entropy on float32 logits.
    /// </summary>
    public Tensor loss(Tensor input_ids, Tensor labels)
    {
        if (!labels.shape.SequenceEqual(input_ids.shape))
            throw new ArgumentException($"labels [{string.Join(", ", labels.shape)}] must have input_ids' shape [{string.Join(", ", input_ids.shape)}]", nameof(labels));
        TensorArgs.Require(labels.dtype == ScalarType.Int64, nameof(labels), $"labels must be int64, got {labels.dtype}");
        TensorArgs.RequireSameDevice(labels, input_ids, nameof(labels), nameof(input_ids));
        var logits = forward(input_ids);
        return LanguageModelLoss(logits.view(-1, logits.shape[^1]), labels.reshape(-1), config.fused_cross_entropy);
    }

    internal static Tensor LanguageModelLoss(Tensor logits, Tensor labels, bool fused)
    {
        var rows = TokenLosses(logits, labels, fused);
        return rows.sum() / labels.ne(-100).sum().clamp_min(1).to(rows.dtype);
    }

    /// <summary>Per-token losses (N,), zero where labels are -100: the fused kernel, or the reference in float32 for
    /// bf16/fp16 logits (as the PyTorch baselines) and float32/float64 as they are.</summary>
    internal static Tensor TokenLosses(Tensor logits, Tensor labels, bool fused)
    {
        if (fused) return flash_attn.cross_entropy_loss(logits, labels, ignore_index: -100, inplace_backward: true).loss;
        // The fused kernel's semantics for a label outside the vocabulary (TorchSharp's cross_entropy fails on it, on a GPU
        // with a device-side assert that ends the CUDA context): an ArgumentException on the CPU, on a GPU a NaN loss for
        // its row and an error raised by the next flash_attn call.
        TensorArgs.Require(labels.dtype == ScalarType.Int64, nameof(labels), $"labels must be int64, got {labels.dtype}");
        TensorArgs.RequireSameDevice(labels, logits, nameof(labels), "the logits");
        var outside = labels.ne(-100).logical_and(labels.lt(0).logical_or(labels.ge(logits.shape[^1])));
        flash_attn.assert_async(outside.logical_not(), nameof(labels), "labels must be in [0, vocabulary) or -100: the rows of others have a NaN loss");
        var x = logits.dtype is ScalarType.BFloat16 or ScalarType.Float16 ? logits.to(ScalarType.Float32) : logits;
        return F.cross_entropy(x, labels.masked_fill(outside, -100), ignore_index: -100, reduction: nn.Reduction.None)
            .masked_fill(outside, double.NaN);
    }

    /// <summary>Parameters counted once (tied weights once); exclude_embeddings leaves out wte and wpe (with a tied head,
    /// the head too).</summary>
    public long num_parameters(bool exclude_embeddings = false) =>
        named_parameters().Where(np => !exclude_embeddings || !IsEmbedding(np.name)).Sum(np => np.parameter.numel());

    /// <summary>Training FLOPs per token at context <paramref name="seqlen"/>: 6N (forward and backward of the weights)
    /// + 12 L d T (attention scores and values), N = num_parameters(), d = n_head * head_dim.</summary>
    public double flops_per_token(long seqlen) =>
        6.0 * num_parameters() + 12.0 * config.n_layer * config.n_head * config.head_dim * seqlen;

    /// <summary>Every parameter with whether it takes weight decay: no decay on biases, norms, embeddings and positions
    /// (the seed's AdamW groups); matrices of the linear layers (and an untied lm_head) decay.</summary>
    public IEnumerable<(string name, Parameter parameter, bool weight_decay)> parameter_groups() =>
        named_parameters().Select(np => (np.name, np.parameter, np.parameter.dim() >= 2 && !IsEmbedding(np.name)));

    private static bool IsEmbedding(string name) => name.StartsWith("transformer.wte.") || name.StartsWith("transformer.wpe.");

    /// <summary>
    /// Appends <paramref name="max_new_tokens"/> tokens to input_ids (B, T) and returns (B, T + max_new_tokens). Each step
    /// samples from the last position's logits over the real vocabulary (padding excluded): greedy when temperature is 0
    /// (or top_k is 1), else softmax(logits / temperature) restricted to the top_k tokens and to the smallest set whose
    /// probability reaches top_p. use_cache keeps each layer's keys and values (<see cref="KVCache"/>) so a step runs only
    /// the new token; without it every step recomputes the whole sequence (the two agree up to rounding). Runs in eval
    /// mode without autograd and restores the training mode. With learned positions the total length must fit n_positions.
    /// </summary>
    public Tensor generate(Tensor input_ids, int max_new_tokens, double temperature = 1.0, int? top_k = null, double? top_p = null,
        bool use_cache = true, Generator? generator = null)
    {
        if (input_ids.dim() != 2 || input_ids.shape[1] < 1)
            throw new ArgumentException($"input_ids must be (batch, seqlen >= 1), got [{string.Join(", ", input_ids.shape)}]", nameof(input_ids));
        if (max_new_tokens < 0) throw new ArgumentException("max_new_tokens must be >= 0", nameof(max_new_tokens));
        if (temperature < 0) throw new ArgumentException("temperature must be >= 0", nameof(temperature));
        if (top_k is < 1) throw new ArgumentException("top_k must be >= 1", nameof(top_k));
        if (top_p is <= 0 or > 1) throw new ArgumentException("top_p must be in (0, 1]", nameof(top_p));
        // generation reads its tokens back anyway: the prompt is checked on the host (a NaN row would reach multinomial,
        // whose device-side assert ends the CUDA context)
        TensorArgs.Require(input_ids.dtype is ScalarType.Int64 or ScalarType.Int32, nameof(input_ids), $"input_ids must be int64 or int32, got {input_ids.dtype}");
        TensorArgs.Require(input_ids.ge(0).logical_and(input_ids.lt(config.vocab_size)).all().item<bool>(), nameof(input_ids),
                           $"input_ids must be token ids in [0, vocab_size = {config.vocab_size})");
        long B = input_ids.shape[0], total = input_ids.shape[1] + max_new_tokens;
        if (config.rotary_emb_fraction == 0 && total > config.n_positions)
            throw new ArgumentException($"prompt + max_new_tokens = {total} exceeds n_positions ({config.n_positions})", nameof(max_new_tokens));
        bool wasTraining = training;
        eval();
        try
        {
            using var grad = no_grad();
            var weight = lm_head_weight;
            using var cache = use_cache
                ? new KVCache((int)config.n_layer, B, total, config.n_head, config.head_dim, weight.dtype, weight.device)
                : null;
            var tokens = input_ids.to(ScalarType.Int64).alias();
            for (int step = 0; step < max_new_tokens; step++)
            {
                using var scope = NewDisposeScope();
                var input = cache is null || cache.length == 0 ? tokens : tokens[.., (int)cache.length..];
                var logits = forward(input, cache)[.., -1, ..(int)config.vocab_size].to(ScalarType.Float32);
                var next = Sample(logits, temperature, top_k, top_p, generator);
                var grown = cat(new[] { tokens, next }, 1).MoveToOuterDisposeScope();
                tokens.Dispose();
                tokens = grown;
            }
            return tokens;
        }
        finally
        {
            train(wasTraining);
        }
    }

    /// <summary>One token per row of logits (B, V) float32: greedy, or sampled with temperature / top-k / top-p.</summary>
    internal static Tensor Sample(Tensor logits, double temperature, int? top_k, double? top_p, Generator? generator)
    {
        if (temperature == 0 || top_k == 1) return logits.argmax(-1, keepdim: true);
        logits = logits / temperature;
        if (top_k is int k && k < logits.shape[^1])
        {
            var kth = logits.topk(k, dim: -1).values[.., ^1..];
            logits = logits.masked_fill(logits.lt(kth), double.NegativeInfinity);
        }
        if (top_p is double p && p < 1)
        {
            var (sorted, idx) = logits.sort(-1, descending: true);
            var probs = F.softmax(sorted, -1);
            // drop a token when the tokens before it already reach p (the first token always stays)
            var remove = (probs.cumsum(-1) - probs).gt(p);
            logits = full_like(logits, double.NegativeInfinity).scatter(-1, idx, sorted.masked_fill(remove, double.NegativeInfinity));
        }
        return multinomial(F.softmax(logits, -1), 1, generator: generator);
    }

    // ---- checkpoints ----

    private static readonly string[] s_conv1d = { ".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight" };
    private static bool IsConv1D(string name) => s_conv1d.Any(name.EndsWith);

    /// <summary>
    /// Loads a Hugging Face GPT-2 checkpoint (model.safetensors of GPT2LMHeadModel or GPT2Model: with or without the
    /// "transformer." prefix, Conv1D weights (in, out), attention mask buffers, an unpadded vocabulary) or a file written by
    /// <see cref="save_safetensors"/>. Every parameter must be present with a compatible shape; values are converted to the
    /// model's dtype and device. wte may have fewer rows than padded_vocab_size (the padding rows keep their values).
    /// </summary>
    public void load_safetensors(string path) => SafeTensors.LoadInto(this, path, "GPT", (key, t) =>
    {
        if (key.EndsWith(".attn.bias") || key.EndsWith(".attn.masked_bias")) return null; // HF's causal-mask buffers
        var name = key.StartsWith("transformer.") || key.StartsWith("lm_head.") ? key : "transformer." + key;
        if (name == "lm_head.weight" && config.tie_word_embeddings) return null; // the tied copy
        return (name, IsConv1D(name) ? t.t() : t);
    }, name => name is "transformer.wte.weight" or "lm_head.weight");

    /// <summary>Writes the parameters in Hugging Face GPT-2 layout (names with "transformer.", Conv1D weights (in, out),
    /// no lm_head.weight when tied) in the model's dtype, the padded wte included, with the config as metadata.</summary>
    public void save_safetensors(string path)
    {
        using var scope = NewDisposeScope();
        var tensors = named_parameters().Select(np =>
            new KeyValuePair<string, Tensor>(np.name, (IsConv1D(np.name) ? np.parameter.detach().t() : np.parameter.detach()).contiguous().cpu()));
        var meta = new Dictionary<string, string>
        {
            ["format"] = "pt",
            ["flashattn.model"] = "GPTLMHeadModel",
            ["flashattn.config"] = JsonSerializer.Serialize(config),
        };
        SafeTensors.Save(path, tensors, meta);
    }

    /// <summary>
    /// Writes a Hugging Face GPT-2 folder, as transformers' save_pretrained: config.json (GPT2Config) and model.safetensors
    /// in float32 with the unpadded vocabulary (lm_head left to the tie when tied). GPT2LMHeadModel.from_pretrained(dir)
    /// and <see cref="GPTConfig.FromHuggingFace"/> read it. GPT-2 has no rotary embedding and no head_dim of its own:
    /// such models have no GPT-2 form.
    /// </summary>
    public void save_pretrained(string dir)
    {
        var c = config;
        if (c.rotary_emb_fraction > 0) throw new NotSupportedException("a rotary model has no Hugging Face GPT-2 form (GPT-2 has learned positions)");
        if (c.head_dim * c.n_head != c.n_embd)
            throw new NotSupportedException($"head_dim {c.head_dim} × n_head {c.n_head} != n_embd {c.n_embd}: GPT-2 derives the head size from n_embd");
        Directory.CreateDirectory(dir);
        using (var scope = NewDisposeScope())
        {
            var tensors = named_parameters().Select(np =>
            {
                var t = np.parameter.detach();
                if (np.name is "transformer.wte.weight" or "lm_head.weight") t = t.narrow(0, 0, c.vocab_size); // padding rows dropped
                if (IsConv1D(np.name)) t = t.t();
                return new KeyValuePair<string, Tensor>(np.name, t.to(ScalarType.Float32).contiguous().cpu());
            });
            SafeTensors.Save(Path.Combine(dir, "model.safetensors"), tensors, new Dictionary<string, string> { ["format"] = "pt" });
        }
        var json = new System.Text.Json.Nodes.JsonObject
        {
            ["architectures"] = new System.Text.Json.Nodes.JsonArray("GPT2LMHeadModel"), ["model_type"] = "gpt2",
            ["vocab_size"] = c.vocab_size, ["n_positions"] = c.n_positions, ["n_ctx"] = c.n_positions, ["n_embd"] = c.n_embd,
            ["n_layer"] = c.n_layer, ["n_head"] = c.n_head, ["n_inner"] = c.n_inner == 4 * c.n_embd ? null : c.n_inner,
            ["activation_function"] = c.activation_function, ["resid_pdrop"] = c.resid_pdrop, ["embd_pdrop"] = c.embd_pdrop,
            ["attn_pdrop"] = c.attn_pdrop, ["layer_norm_epsilon"] = c.layer_norm_epsilon, ["initializer_range"] = c.initializer_range,
            ["scale_attn_weights"] = c.scale_attn_weights, ["scale_attn_by_inverse_layer_idx"] = c.scale_attn_by_inverse_layer_idx,
            ["tie_word_embeddings"] = c.tie_word_embeddings, ["bos_token_id"] = c.vocab_size - 1, ["eos_token_id"] = c.vocab_size - 1,
            ["torch_dtype"] = "float32",
        };
        File.WriteAllText(Path.Combine(dir, "config.json"), json.ToJsonString(new JsonSerializerOptions { WriteIndented = true }));
    }
}
