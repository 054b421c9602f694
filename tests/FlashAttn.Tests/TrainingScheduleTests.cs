using FlashAttn.Models.Training;
using NUnit.Framework;
using static TorchSharp.torch;

namespace FlashAttn.Tests;

/// <summary>Learning-rate schedules: transformers' linear-with-warmup and timm's cosine as flash-attention's training experiments configure them.</summary>
public class TrainingScheduleTests
{
    [Test]
    public void LinearWarmupThenDecayToZero()
    {
        var s = new LrSchedule(ScheduleKind.Linear, 6e-4, 4000, 400000, 0, 0);
        Assert.That(s.At(0), Is.EqualTo(0));
        Assert.That(s.At(2000), Is.EqualTo(3e-4).Within(1e-12));
        Assert.That(s.At(4000), Is.EqualTo(6e-4).Within(1e-12));
        Assert.That(s.At(202000), Is.EqualTo(3e-4).Within(1e-12));
        Assert.That(s.At(400000), Is.EqualTo(0));
        Assert.That(s.At(500000), Is.EqualTo(0));
    }

    [Test]
    public void CosineFromWarmupInitToMinimum()
    {
        var s = new LrSchedule(ScheduleKind.Cosine, 6e-4, 8000, 600000, 6e-5, 1e-6);
        Assert.That(s.At(0), Is.EqualTo(1e-6));
        Assert.That(s.At(4000), Is.EqualTo(1e-6 + 4000 * (6e-4 - 1e-6) / 8000).Within(1e-15));
        // timm (warmup_prefix False): the cosine runs on the absolute step
        Assert.That(s.At(8000), Is.EqualTo(6e-5 + 0.5 * (6e-4 - 6e-5) * (1 + Math.Cos(Math.PI * 8000 / 600000))).Within(1e-15));
        Assert.That(s.At(300000), Is.EqualTo(6e-5 + 0.5 * (6e-4 - 6e-5)).Within(1e-15));
        Assert.That(s.At(600000), Is.EqualTo(6e-5));
        Assert.That(s.At(800000), Is.EqualTo(6e-5));
        for (long t = 8000; t < 600000; t += 1000) Assert.That(s.At(t + 1000), Is.LessThanOrEqualTo(s.At(t)));
    }

    [Test]
    public void FromConfigUsesMaxStepsWhenNoHorizon()
    {
        var s = LrSchedule.From(ExperimentConfig.Parse(["train.scheduler.name=linear", "train.scheduler.warmup_steps=10", "trainer.max_steps=110", "train.optimizer.lr=1e-3"]).Bind());
        Assert.That(s.TotalSteps, Is.EqualTo(110));
        Assert.That(s.At(60), Is.EqualTo(5e-4).Within(1e-12));
    }

    [Test]
    public void LossScalerBacksOffAndGrows()
    {
        using var sc = new DynamicLossScaler(CPU, 1024, growthInterval: 3);
        float Scale() => sc.Scale.item<float>();
        sc.Update(tensor(1f));
        Assert.That(Scale(), Is.EqualTo(512));
        sc.Update(tensor(0f)); sc.Update(tensor(0f));
        Assert.That(Scale(), Is.EqualTo(512));
        sc.Update(tensor(0f));
        Assert.That(Scale(), Is.EqualTo(1024));
        Assert.That(sc.GoodSteps.item<float>(), Is.EqualTo(0), "the count restarts after growing");
        sc.Update(tensor(0f)); sc.Update(tensor(1f)); sc.Update(tensor(0f)); sc.Update(tensor(0f));
        Assert.That(Scale(), Is.EqualTo(512), "a non-finite step resets the count of finite ones");
        sc.Load(1.0 / 65536, 0);
        sc.Update(tensor(1f));
        Assert.That(Scale(), Is.EqualTo(1.0 / 65536), "never below 2^-16");
    }
}
