using FlashAttn.Interop;
using TorchSharp;
using static TorchSharp.torch;

namespace FlashAttn;

/// <summary>
/// A pre-norm transformer block over the residual stream, as flash-attn's Block (modules/block.py, prenorm):
/// (hidden, residual) = norm1(hidden, residual); hidden = mixer(hidden);
/// (hidden, residual) = norm2(hidden, residual); returns (mlp(hidden), residual).
/// norm1 and norm2 are <see cref="DropoutAddLayerNorm"/>s with prenorm: each is dropout (and drop-path) + residual add +
/// LayerNorm in one kernel, so this is GPT-2's x = x + attn(ln_1(x)); x = x + mlp(ln_2(x)) with the dropout before norm1
/// belonging to the previous block's MLP output (or the embeddings, for the first block). The model ends with one more
/// DropoutAddLayerNorm for the last MLP output. names renames the children (GPT-2's ln_1 / attn / ln_2 / mlp, timm's
/// norm1 / attn / norm2 / mlp); they are registered in the order norm1, mixer, norm2, mlp.
/// </summary>
public sealed class Block : nn.Module<Tensor, Tensor?, (Tensor hidden, Tensor residual)>
{
    private readonly DropoutAddLayerNorm _norm1, _norm2;
    private readonly MHA _mixer;
    private readonly nn.Module<Tensor, Tensor> _mlp;

    /// <param name="mixer">The self-attention.</param>
    /// <param name="mlp">The MLP (<see cref="FusedMLP"/>, <see cref="Mlp"/>, <see cref="GatedMlp"/>).</param>
    /// <param name="norm1">Dropout, drop-path, add and norm of the incoming hidden states (prenorm).</param>
    /// <param name="norm2">The same for the attention output (prenorm).</param>
    /// <param name="names">The children's names (default norm1, mixer, norm2, mlp, as flash-attn's).</param>
    public Block(MHA mixer, nn.Module<Tensor, Tensor> mlp, DropoutAddLayerNorm norm1, DropoutAddLayerNorm norm2,
        (string norm1, string mixer, string norm2, string mlp)? names = null) : base(nameof(Block))
    {
        if (!norm1.prenorm) throw new ArgumentException("norm1 must return the residual (prenorm: true)", nameof(norm1));
        if (!norm2.prenorm) throw new ArgumentException("norm2 must return the residual (prenorm: true)", nameof(norm2));
        if (norm1.hidden_size != mixer.embed_dim || norm2.hidden_size != mixer.embed_dim)
            throw new ArgumentException($"norm1 and norm2 must have the mixer's width ({mixer.embed_dim})", nameof(norm2));
        (_mixer, _mlp, _norm1, _norm2) = (mixer, mlp, norm1, norm2);
        var (n1, nm, n2, nmlp) = names ?? ("norm1", "mixer", "norm2", "mlp");
        register_module(n1, norm1);
        register_module(nm, mixer);
        register_module(n2, norm2);
        register_module(nmlp, mlp);
    }

    public DropoutAddLayerNorm norm1 => _norm1;
    public DropoutAddLayerNorm norm2 => _norm2;
    public MHA mixer => _mixer;
    public nn.Module<Tensor, Tensor> mlp => _mlp;

    /// <summary>hidden (batch, seqlen, width), residual (the same shape, hidden's dtype or float32) or null before the first
    /// block -> (hidden, residual).</summary>
    public override (Tensor hidden, Tensor residual) forward(Tensor hidden, Tensor? residual) => forward(hidden, residual, null);

    /// <summary>With a cache, the mixer appends the tokens' keys and values to it (<see cref="MHA.forward(Tensor, KVCache)"/>).</summary>
    public (Tensor hidden, Tensor residual) forward(Tensor hidden, Tensor? residual, KVCache? cache)
    {
        TensorArgs.RequireModuleInput(hidden, nameof(hidden), _norm1.Weight);
        TensorArgs.Require(hidden.dim() == 3, nameof(hidden), $"hidden must be (batch, seqlen, {_mixer.embed_dim}), got {TensorArgs.Shape(hidden)}");
        TensorArgs.RequireLastDim(hidden, _mixer.embed_dim, nameof(hidden), "width");
        if (residual is not null)
        {
            TensorArgs.Require(TensorArgs.SameShape(residual, hidden), nameof(residual),
                $"residual must have hidden's shape {TensorArgs.Shape(hidden)}, got {TensorArgs.Shape(residual)}");
            TensorArgs.Require(residual.dtype == hidden.dtype || residual.dtype == ScalarType.Float32, nameof(residual),
                $"residual must have hidden's dtype ({hidden.dtype}) or float32, got {residual.dtype}");
            TensorArgs.RequireSameDevice(residual, hidden, nameof(residual), nameof(hidden));
        }
        (hidden, residual) = _norm1.forward(hidden, residual);
        hidden = cache is null ? _mixer.forward(hidden) : _mixer.forward(hidden, cache);
        (hidden, residual) = _norm2.forward(hidden, residual);
        return (_mlp.forward(hidden), residual!);
    }
}

public static partial class layers
{
    /// <summary>A <see cref="FlashAttn.Block"/>.</summary>
    public static Block Block(MHA mixer, nn.Module<Tensor, Tensor> mlp, DropoutAddLayerNorm norm1, DropoutAddLayerNorm norm2) =>
        new(mixer, mlp, norm1, norm2);
}
