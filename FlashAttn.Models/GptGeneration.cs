// Generation for GPTLMHeadModel: the sampling loop over a KVCache (each MHA appends to it through
// flash_attn_with_kvcache) and the sampling rule (greedy, temperature, top-k, top-p).
using FlashAttn.Interop;
using TorchSharp;
using static TorchSharp.torch;
using F = TorchSharp.torch.nn.functional;

namespace FlashAttn.Models;

public sealed partial class GPTLMHeadModel
{
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
        TensorArgs.Require(!TensorArgs.IdsOutside(input_ids, config.vocab_size).any().item<bool>(), nameof(input_ids),
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
}
