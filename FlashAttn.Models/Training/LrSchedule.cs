namespace FlashAttn.Models.Training;

/// <summary>Learning rate as a function of the optimizer step (0-based: the lr used by step s).
/// linear: transformers' get_linear_schedule_with_warmup (lr·s/warmup, then linear to 0 at
/// num_training_steps) — the seed's OpenWebText runs. cosine: timm's CosineLRScheduler as the seed's
/// Pile runs configure it (warmup linearly from warmup_lr_init, then
/// lr_min + ½(lr − lr_min)(1 + cos(π s / t_initial)), lr_min after t_initial). constant: warmup then flat.</summary>
public sealed record LrSchedule(string Name, double Lr, long WarmupSteps, long TotalSteps, double LrMin, double WarmupLrInit)
{
    public static LrSchedule From(ExperimentConfig c)
    {
        double lr = c.Float("train.optimizer.lr");
        long total = c.IntOrNull("train.scheduler.num_training_steps") ?? c.Int("trainer.max_steps");
        return new LrSchedule(c.Str("train.scheduler.name"), lr, c.Int("train.scheduler.warmup_steps"), total,
            lr * c.Float("train.scheduler.lr_min_ratio"), c.Float("train.scheduler.warmup_lr_init"));
    }

    public double At(long step)
    {
        switch (Name)
        {
            case "linear":
                if (step < WarmupSteps) return Lr * step / Math.Max(1, WarmupSteps);
                return Lr * Math.Max(0.0, (double)(TotalSteps - step) / Math.Max(1, TotalSteps - WarmupSteps));
            case "cosine":
                if (step < WarmupSteps) return WarmupLrInit + step * (Lr - WarmupLrInit) / WarmupSteps;
                if (step >= TotalSteps) return LrMin;
                return LrMin + 0.5 * (Lr - LrMin) * (1 + Math.Cos(Math.PI * step / TotalSteps));
            case "constant":
                return step < WarmupSteps ? Lr * (step + 1) / WarmupSteps : Lr;
            default:
                throw new ConfigException($"train.scheduler.name={Name} is not valid; valid values: linear, cosine, constant");
        }
    }
}
