// GPT in the style of nanoGPT's model.py, readable top to bottom: the config, the GPT-2 body built from the public
// modules of FlashAttn.Managed (MHA, FusedMLP / Mlp, DropoutAddLayerNorm, Block: what users of the library adopt is what
// this model runs), and the LM head with initialisation and loss. Hugging Face I/O is in GptHuggingFace.cs, generation
// and sampling in GptGeneration.cs.
//
// Parameter names are Hugging Face GPT-2's (transformer.wte, transformer.h.{i}.attn.c_attn, ...), so HF checkpoints load
// through load_safetensors (their Conv1D weights are stored (in, out) and are transposed on the way in and out). Each
// fusion has a switch in GPTConfig and falls back to plain TorchSharp; the parameters and their names are the same
// whichever switches are on, so one state dict serves both and fused/plain comparisons share weights exactly.
using System.Text.Json.Serialization;
using FlashAttn.Interop;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;
using F = TorchSharp.torch.nn.functional;

namespace FlashAttn.Models;

/// <summary>
/// The GPT hyperparameters (field names as Hugging Face's GPT2Config and flash-attn's GPT). The defaults are GPT-2 small
/// with the training switches of flash-attention's GPT experiments; <see cref="Named"/> gives the sizes they train.
/// </summary>
public sealed partial record GPTConfig
{
    private readonly long? _headDim, _nInner;

    /// <summary>50257: the GPT-2 BPE vocabulary.</summary>
    public long vocab_size { get; init; } = 50257;
    /// <summary>8: the embedding and LM-head matrices get a row count that is a multiple of 8, which keeps the
    /// vocabulary GEMM on tensor cores (flash-attention's experiments pad 50257 to 50264). 1 disables padding.</summary>
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
    /// table (flash-attention's gpt3s-rotary experiment uses 0.5).</summary>
    public double rotary_emb_fraction { get; init; } = 0.0;
    /// <summary>10000: the rotary frequency base of RoFormer / GPT-NeoX.</summary>
    public double rotary_emb_base { get; init; } = 10000.0;
    /// <summary>false: GPT-NeoX style rotary (rotate halves); true rotates interleaved pairs (GPT-J).</summary>
    public bool rotary_emb_interleaved { get; init; }
    /// <summary>0.1: dropout on the attention and MLP outputs (GPT2Config's default, used by flash-attention's experiments).</summary>
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
    /// stable (flash-attention's experiments turn it on; <see cref="Named"/> does too). Load HF GPT-2 weights with it off.</summary>
    public bool scale_attn_by_inverse_layer_idx { get; init; }
    /// <summary>true: the LM head shares the token embedding (GPT-2).</summary>
    public bool tie_word_embeddings { get; init; } = true;

    // The fusion switches: all on in flash-attention's training experiments. Each falls back to plain TorchSharp when off (and the
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
    /// <summary>true: the residual stream is kept in float32 when the model runs in bf16/fp16 (flash-attention's experiments' setting).</summary>
    public bool residual_in_fp32 { get; init; } = true;
    /// <summary>0: the fused MLP keeps fc1's pre-activation and the activation for the backward; 1: the pre-activation only
    /// (the activation is recomputed); 2: neither (fc1 is recomputed). flash-attn's GPT knob (its 2.7B experiment sets 0);
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
    /// The sizes of flash-attention's GPT training experiments (its configs/experiment/owt and pile): GPT-2 124M/350M/774M/1558M at context 1024 and
    /// GPT-3 125M/350M/760M/1.3B/2.7B at 2048 (2.7B with head dim 128), all with scale_attn_by_inverse_layer_idx and every
    /// fusion on; "gpt3s-rotary" has rotary on half of each head and no position table; "tiny" (2 layers, width 64,
    /// 4 heads, vocabulary 256, context 64) is for tests.
    /// </summary>
    public static GPTConfig Named(string name)
    {
        var flash = new GPTConfig { scale_attn_by_inverse_layer_idx = true };
        GPTConfig gpt3(long L, long d, long h) => flash with { n_layer = L, n_embd = d, n_head = h, n_positions = 2048 };
        return name switch
        {
            "gpt2s" => flash,
            "gpt2m" => flash with { n_layer = 24, n_embd = 1024, n_head = 16 },
            "gpt2l" => flash with { n_layer = 36, n_embd = 1280, n_head = 20 },
            "gpt2xl" => flash with { n_layer = 48, n_embd = 1600, n_head = 25 },
            "gpt3s" => gpt3(12, 768, 12),
            "gpt3m" => gpt3(24, 1024, 16),
            "gpt3l" => gpt3(24, 1536, 16),
            "gpt3xl" => gpt3(24, 2048, 16),
            // head dim 128 (20 heads of 2560) as flash-attention's gpt3-2.7B-flash-hdim128; init std sqrt(2 / (5 d)) as there
            "gpt3-2.7B" => gpt3(32, 2560, 20) with { initializer_range = Math.Sqrt(2.0 / (5 * 2560)) },
            "gpt3s-rotary" => gpt3(12, 768, 12) with { rotary_emb_fraction = 0.5 },
            "tiny" => flash with { vocab_size = 256, n_positions = 64, n_embd = 64, n_layer = 2, n_head = 4 },
            _ => throw new ArgumentException($"unknown GPT config '{name}'; valid names: {string.Join(", ", Names)}", nameof(name)),
        };
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

/// <summary>
/// The GPT-2 body ("transformer"): wte, wpe (learned positions only), the blocks h.{i} (ln_1, attn = MHA with c_attn /
/// c_proj, ln_2, mlp = FusedMLP or Mlp with c_fc / c_proj), ln_f. x (B, T) -> wte + wpe -> blocks -> ln_f -> (B, T, n_embd).
/// </summary>
public sealed class GPTModel : nn.Module<Tensor, Tensor>
{
    private readonly GPTConfig _c;
    private readonly Embedding _wte;
    private readonly Embedding? _wpe;
    private readonly ModuleList<Block> _h;
    private readonly DropoutAddLayerNorm _lnF;
    private string? _unknownIdMessage; // assert_async's message, formatted once

    public GPTModel(GPTConfig config, Device? device = null, ScalarType? dtype = null) : base(nameof(GPTModel))
    {
        config.Validate();
        _c = config;
        _wte = nn.Embedding(config.padded_vocab_size, config.n_embd, device: device, dtype: dtype);
        if (config.rotary_emb_fraction == 0) _wpe = nn.Embedding(config.n_positions, config.n_embd, device: device, dtype: dtype);
        _h = new ModuleList<Block>(Enumerable.Range(0, (int)config.n_layer).Select(i => NewBlock(config, i, device, dtype)).ToArray());
        // the last MLP output's dropout, the last residual add and ln_f
        _lnF = Norm(config, config.resid_pdrop, device, dtype);
        register_module("wte", _wte);
        if (_wpe is not null) register_module("wpe", _wpe);
        register_module("h", _h);
        register_module("ln_f", _lnF);
    }

    // Dropout + residual add + LayerNorm, the residual returned (prenorm).
    private static DropoutAddLayerNorm Norm(GPTConfig c, double p, Device? device, ScalarType? dtype) =>
        new(c.n_embd, prenorm: true, p: p, eps: c.layer_norm_epsilon, residual_in_fp32: c.residual_in_fp32, device: device,
            dtype: dtype, fused_dropout_add_ln: c.fused_dropout_add_ln);

    // Block i: the dropout before ln_1 is the embeddings' for the first block, the previous MLP output's after it. With
    // scale_attn_by_inverse_layer_idx the scores are also divided by i + 1. The modules are created in the order ln_1,
    // attn, ln_2, mlp (the order of their random draws).
    private static Block NewBlock(GPTConfig c, int i, Device? device, ScalarType? dtype)
    {
        double? scale = c.scale_attn_weights ? null : 1.0;
        if (c.scale_attn_by_inverse_layer_idx) scale = (scale ?? 1.0 / Math.Sqrt(c.head_dim)) / (i + 1);
        var ln1 = Norm(c, i == 0 ? c.embd_pdrop : c.resid_pdrop, device, dtype);
        var attn = new MHA(c.n_embd, c.n_head, dropout: c.attn_pdrop, softmax_scale: scale, causal: true,
            rotary_emb_dim: c.rotary_emb_dim, rotary_emb_base: c.rotary_emb_base, rotary_emb_interleaved: c.rotary_emb_interleaved,
            use_flash_attn: c.use_flash_attn, device: device, dtype: dtype, fused_bias_fc: c.fused_bias_fc, head_dim: c.head_dim,
            layer_idx: i, names: ("c_attn", "c_proj"));
        var ln2 = Norm(c, c.resid_pdrop, device, dtype);
        var mlp = MlpModules.Create(c.n_embd, c.n_inner, c.activation_function, c.fused_mlp, c.fused_bias_fc, c.mlp_checkpoint_lvl,
                                    ("c_fc", "c_proj"), device, dtype);
        return new Block(attn, mlp, ln1, ln2, names: ("ln_1", "attn", "ln_2", "mlp"));
    }

    public Embedding wte => _wte;
    public Embedding? wpe => _wpe;
    public ModuleList<Block> h => _h;
    public DropoutAddLayerNorm ln_f => _lnF;

    /// <summary>input_ids (B, T) int64 -> the final hidden states (B, T, n_embd).</summary>
    public override Tensor forward(Tensor input_ids) => forward(input_ids, null);

    /// <summary>With a cache, input_ids are the next tokens at positions [cache.length, cache.length + T); every layer
    /// appends their keys and values, then the cache advances by T.</summary>
    public Tensor forward(Tensor input_ids, KVCache? cache)
    {
        if (input_ids.dim() != 2) throw new ArgumentException($"input_ids must be (batch, seqlen), got [{string.Join(", ", input_ids.shape)}]", nameof(input_ids));
        TensorArgs.Require(input_ids.dtype is ScalarType.Int64 or ScalarType.Int32, nameof(input_ids), $"input_ids must be int64 or int32, got {input_ids.dtype}");
        TensorArgs.RequireSameDevice(input_ids, _wte.weight!, nameof(input_ids), "the model's parameters");
        long T = input_ids.size(1), offset = cache?.length ?? 0;
        if (_wpe is not null && offset + T > _c.n_positions)
            throw new ArgumentException($"sequence length {offset + T} exceeds n_positions ({_c.n_positions})", nameof(input_ids));
        var hidden = Embed(input_ids);
        if (_wpe is not null)
        {
            using var scalars = new ScalarScope();
            var positions = arange(scalars.OfInt64(offset), scalars.OfInt64(offset + T), Scalars.One, ScalarType.Int64, input_ids.device);
            hidden = hidden.add(_wpe.forward(positions), Scalars.One);
        }
        Tensor? residual = null;
        foreach (var block in _h) (hidden, residual) = block.forward(hidden, residual, cache);
        cache?.advance(T);
        return _lnF.forward(hidden, residual).output;
    }

    /// <summary>
    /// wte(input_ids) with token ids outside [0, vocab_size) caught: on the CPU an ArgumentException now; on a GPU, where a
    /// check would make every step wait for the device, their rows become NaN (the lookup reads row 0 instead, since an
    /// out-of-range lookup ends the CUDA context) and the error is raised by the next flash_attn call or check_errors.
    /// </summary>
    private Tensor Embed(Tensor ids)
    {
        using var scope = NewDisposeScope();
        var unknown = TensorArgs.IdsOutside(ids, _c.vocab_size);
        flash_attn.assert_async(unknown.logical_not(), "input_ids", _unknownIdMessage ??=
            $"input_ids must be token ids in [0, vocab_size = {_c.vocab_size}): the rows of others are NaN");
        if (ids.device_type == DeviceType.CPU) return _wte.forward(ids).MoveToOuterDisposeScope();
        return _wte.forward(ids.masked_fill(unknown, Scalars.Zero)).masked_fill(unknown.unsqueeze(-1), Scalars.NaN).MoveToOuterDisposeScope();
    }
}

/// <summary>
/// GPT-2 with the language-model head (tied to wte unless tie_word_embeddings is false): input_ids (B, T) -> logits
/// (B, T, padded_vocab_size). Parameters are named as Hugging Face's GPT2LMHeadModel.
/// </summary>
public sealed partial class GPTLMHeadModel : nn.Module<Tensor, Tensor>
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
    /// loss_grad (0-d float32 on the model's device, as a trainer's 1 / accumulation steps): the gradient the returned loss's
    /// backward will receive; with fused_cross_entropy the kernel then computes the logits' gradient in the forward (one
    /// pass over the logits instead of two) and the backward only checks on the device that the gradient is that one.
    /// </summary>
    public Tensor loss(Tensor input_ids, Tensor labels, Tensor? loss_grad = null)
    {
        if (!TensorArgs.SameShape(labels, input_ids))
            throw new ArgumentException($"labels [{string.Join(", ", labels.shape)}] must have input_ids' shape [{string.Join(", ", input_ids.shape)}]", nameof(labels));
        TensorArgs.Require(labels.dtype == ScalarType.Int64, nameof(labels), $"labels must be int64, got {labels.dtype}");
        TensorArgs.RequireSameDevice(labels, input_ids, nameof(labels), nameof(input_ids));
        if (loss_grad is not null)
        {
            TensorArgs.RequireFloat(loss_grad, nameof(loss_grad));
            TensorArgs.Require(loss_grad.dim() == 0, nameof(loss_grad), $"loss_grad must be a 0-d tensor, got [{string.Join(", ", loss_grad.shape)}]");
            TensorArgs.RequireSameDevice(loss_grad, input_ids, nameof(loss_grad), nameof(input_ids));
        }
        var logits = forward(input_ids);
        return ModelLoss.Mean(logits.view(-1, logits.size(-1)), labels.reshape(-1), config.fused_cross_entropy, loss_grad);
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
    /// (flash-attention's AdamW groups); matrices of the linear layers (and an untied lm_head) decay.</summary>
    public IEnumerable<(string name, Parameter parameter, bool weight_decay)> parameter_groups() =>
        named_parameters().Select(np => (np.name, np.parameter, np.parameter.dim() >= 2 && !IsEmbedding(np.name)));

    private static bool IsEmbedding(string name) => name.StartsWith("transformer.wte.") || name.StartsWith("transformer.wpe.");
}
