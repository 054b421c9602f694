using NUnit.Framework;
using TorchSharp;
using static TorchSharp.torch;

namespace FlashAttn.Tests;

/// <summary>
/// The attention dispatch rule (AttentionDispatch.Choose) as a pure function of (capability, dtype, shapes, options):
/// every case it sends to SDPA and every exclusion, under each FLASHATTN_ATTENTION_BACKEND mode; the override's parsing.
/// The GPU side (outputs, gradients, the path that ran) is AttentionDispatchCudaTests.
/// </summary>
[NonParallelizable] // sets FLASHATTN_ATTENTION_BACKEND
public sealed class AttentionDispatchTests
{
    // GPT-2 124M's attention on an H200: B 16, T 1024, 12 heads of 64, causal, default scale, bf16.
    private static readonly AttentionCase Gpt2 = new(Capability: 90, DType: ScalarType.BFloat16, SeqlenQ: 1024, SeqlenK: 1024,
        Heads: 12, HeadsK: 12, HeadDim: 64, DropoutP: 0, WindowLeft: -1, WindowRight: 0, Softcap: 0,
        Alibi: false, Deterministic: false);

    private static readonly AttentionBackend Sdpa = AttentionBackend.Sdpa, Flash = AttentionBackend.Flash;

    // The rule's mechanics under head dims measured faster on SDPA (d64 and d128 on sm_9x, as the H200 measured before our
    // Hopper kernels): the shipped list is empty since (ShippedRuleKeepsEveryCaseOnOurKernels).
    private static readonly long[] Measured = [64, 128];

    // (name, case, auto's choice under Measured, sdpa's choice): sdpa differs from auto where SDPA computes the case but was
    // not measured faster; flash is Flash everywhere.
    private static IEnumerable<TestCaseData> Cases()
    {
        TestCaseData Case(string name, AttentionCase c, AttentionBackend auto, AttentionBackend sdpa) =>
            new TestCaseData(c, auto, sdpa).SetName($"Rule_{name}");
        yield return Case("Gpt2CausalD64Bf16_Sdpa", Gpt2, Sdpa, Sdpa);
        yield return Case("NonCausal_Sdpa", Gpt2 with { WindowRight = -1 }, Sdpa, Sdpa);
        yield return Case("D128Fp16_Sdpa", Gpt2 with { HeadDim = 128, DType = ScalarType.Float16 }, Sdpa, Sdpa);
        yield return Case("CrossAttentionSqNotSkNonCausal_Sdpa", Gpt2 with { WindowRight = -1, SeqlenQ = 97, SeqlenK = 1025 }, Sdpa, Sdpa);
        yield return Case("CausalOneByOne_Sdpa", Gpt2 with { SeqlenQ = 1, SeqlenK = 1 }, Sdpa, Sdpa);
        yield return Case("Sm90WithMinor_Sdpa", Gpt2 with { Capability = 91 }, Sdpa, Sdpa);
        // supported by SDPA, not measured faster: our kernels unless forced
        yield return Case("A100_Flash", Gpt2 with { Capability = 80 }, Flash, Sdpa);
        yield return Case("Sm89_Flash", Gpt2 with { Capability = 89 }, Flash, Sdpa);
        yield return Case("Blackwell_Flash", Gpt2 with { Capability = 100 }, Flash, Sdpa);
        yield return Case("D96Unmeasured_Flash", Gpt2 with { HeadDim = 96 }, Flash, Sdpa);
        yield return Case("D256Unmeasured_Flash", Gpt2 with { HeadDim = 256 }, Flash, Sdpa);
        yield return Case("D32Unmeasured_Flash", Gpt2 with { HeadDim = 32 }, Flash, Sdpa);
        yield return Case("DropoutUnmeasured_Flash", Gpt2 with { DropoutP = 0.1 }, Flash, Sdpa);
        // not what SDPA computes (or not without copies): our kernels in every mode
        yield return Case("Float32_Flash", Gpt2 with { DType = ScalarType.Float32 }, Flash, Flash);
        yield return Case("HeadDimNotMultipleOf8_Flash", Gpt2 with { HeadDim = 59 }, Flash, Flash);
        yield return Case("Gqa_Flash", Gpt2 with { HeadsK = 4 }, Flash, Flash);
        yield return Case("Mqa_Flash", Gpt2 with { HeadsK = 1 }, Flash, Flash);
        yield return Case("Softcap_Flash", Gpt2 with { Softcap = 30 }, Flash, Flash);
        yield return Case("Alibi_Flash", Gpt2 with { Alibi = true }, Flash, Flash);
        yield return Case("SlidingWindowCausal_Flash", Gpt2 with { WindowLeft = 256 }, Flash, Flash);
        yield return Case("SlidingWindowNonCausal_Flash", Gpt2 with { WindowLeft = 256, WindowRight = 256 }, Flash, Flash);
        yield return Case("WindowRightOnly_Flash", Gpt2 with { WindowRight = 7 }, Flash, Flash);
        yield return Case("CausalSqLessThanSk_Flash", Gpt2 with { SeqlenQ = 97, SeqlenK = 1025 }, Flash, Flash);
        yield return Case("CausalDecodeOneQuery_Flash", Gpt2 with { SeqlenQ = 1, SeqlenK = 1025 }, Flash, Flash);
        yield return Case("CausalSqMoreThanSk_Flash", Gpt2 with { SeqlenQ = 1025, SeqlenK = 97 }, Flash, Flash);
        yield return Case("Deterministic_Flash", Gpt2 with { Deterministic = true }, Flash, Flash);
        yield return Case("EmptySequence_Flash", Gpt2 with { SeqlenQ = 0, SeqlenK = 0 }, Flash, Flash);
    }

    [TestCaseSource(nameof(Cases))]
    public void RuleChoosesThePath(object attentionCase, AttentionBackend auto, AttentionBackend sdpa)
    {
        var c = (AttentionCase)attentionCase;
        Assert.That(AttentionDispatch.Choose(c, AttentionMode.Auto, Measured, false), Is.EqualTo(auto), "auto");
        Assert.That(AttentionDispatch.Choose(c, AttentionMode.Sdpa), Is.EqualTo(sdpa), "sdpa");
        Assert.That(AttentionDispatch.Choose(c, AttentionMode.Flash), Is.EqualTo(Flash), "flash");
    }

    /// <summary>Our Hopper kernels were measured at least as fast as cuDNN's forward and backward together at d64 and
    /// d128 (AttentionDispatch's table): auto keeps every case on them, and only the sdpa mode reaches SDPA.</summary>
    [TestCaseSource(nameof(Cases))]
    public void ShippedRuleKeepsEveryCaseOnOurKernels(object attentionCase, AttentionBackend auto, AttentionBackend sdpa)
    {
        var c = (AttentionCase)attentionCase;
        Assert.That(AttentionDispatch.SdpaFasterHeadDims, Is.Empty);
        Assert.That(AttentionDispatch.Choose(c, AttentionMode.Auto), Is.EqualTo(Flash));
    }

    [Test]
    public void DropoutGoesToSdpaOnlyOnceMeasuredFaster()
    {
        var drop = Gpt2 with { DropoutP = 0.1 };
        Assert.That(AttentionDispatch.SdpaFasterWithDropout, Is.False, "unmeasured: off");
        Assert.That(AttentionDispatch.Choose(drop, AttentionMode.Auto, Measured, sdpaFasterWithDropout: false), Is.EqualTo(Flash));
        Assert.That(AttentionDispatch.Choose(drop, AttentionMode.Auto, Measured, sdpaFasterWithDropout: true), Is.EqualTo(Sdpa));
        // the switch covers dropout alone: the other conditions still hold
        Assert.That(AttentionDispatch.Choose(drop with { Capability = 80 }, AttentionMode.Auto, Measured, sdpaFasterWithDropout: true), Is.EqualTo(Flash));
        Assert.That(AttentionDispatch.Choose(drop with { HeadsK = 4 }, AttentionMode.Auto, Measured, sdpaFasterWithDropout: true), Is.EqualTo(Flash));
    }

    [TestCase(null, "Auto"), TestCase("", "Auto"), TestCase("auto", "Auto"), TestCase("flash", "Flash"), TestCase("FLASH", "Flash"),
     TestCase(" sdpa ", "Sdpa")]
    public void OverrideParses(string? value, string expected) =>
        Assert.That(AttentionDispatch.ParseMode(value).ToString(), Is.EqualTo(expected));

    [Test]
    public void UnknownOverrideIsAnErrorNamingTheVariable()
    {
        var e = Assert.Throws<InvalidOperationException>(() => AttentionDispatch.ParseMode("cudnn"))!;
        Assert.That(e.Message, Does.Contain("FLASHATTN_ATTENTION_BACKEND=cudnn").And.Contain("auto, flash or sdpa"));
    }

    [Test]
    public void EnvironmentIsReadOnceAndTheOverrideWins()
    {
        var first = AttentionDispatch.Mode;
        var previous = Environment.GetEnvironmentVariable(AttentionDispatch.EnvironmentVariable);
        try
        {
            Environment.SetEnvironmentVariable(AttentionDispatch.EnvironmentVariable, first == AttentionMode.Sdpa ? "flash" : "sdpa");
            Assert.That(AttentionDispatch.Mode, Is.EqualTo(first), "the variable is not read again");
            using (new BackendOverride("flash")) Assert.That(AttentionDispatch.Mode, Is.EqualTo(AttentionMode.Flash));
            using (new BackendOverride("sdpa")) Assert.That(AttentionDispatch.Mode, Is.EqualTo(AttentionMode.Sdpa));
            Assert.That(AttentionDispatch.Mode, Is.EqualTo(first), "restored");
        }
        finally
        {
            Environment.SetEnvironmentVariable(AttentionDispatch.EnvironmentVariable, previous);
        }
    }

    [Test]
    public void CpuCallsTakeTheReferenceWhateverTheOverride()
    {
        var q = randn(2, 9, 2, 16);
        foreach (var mode in new[] { "auto", "sdpa", "flash" })
        {
            using var _ = new BackendOverride(mode);
            flash_attn.flash_attn_func(q, q, q, causal: true);
            Assert.That(flash_attn.last_attention_backend, Is.EqualTo(AttentionBackend.Reference), mode);
        }
    }
}

/// <summary>The in-process mode (spelled as FLASHATTN_ATTENTION_BACKEND; null: the variable's) until disposed, then the
/// previous one.</summary>
internal sealed class BackendOverride : IDisposable
{
    private readonly AttentionMode? _previous = AttentionDispatch.Override;

    public BackendOverride(string? mode) => AttentionDispatch.Override = mode is null ? null : AttentionDispatch.ParseMode(mode);

    public void Dispose() => AttentionDispatch.Override = _previous;
}
