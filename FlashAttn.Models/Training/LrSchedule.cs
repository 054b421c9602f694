namespace FlashAttn.Models.Training;

/// <summary>Learning rate as a function of the optimizer step (0-based: the lr used by step s).
/// linear: transformers' get_linear_schedule_with_warmup (lr·s/warmup, then linear to 0 at
/// num_training_steps) — flash-attention's OpenWebText runs. cosine: timm's CosineLRScheduler as flash-attention's
/// Pile runs configure it (warmup linearly from warmup_lr_init, then
/// lr_min + ½(lr − lr_min)(1 + cos(π s / t_initial)), lr_min after t_initial). constant: warmup then flat.</summary>
public sealed record LrSchedule(ScheduleKind Kind, double Lr, long WarmupSteps, long TotalSteps, double LrMin, double WarmupLrInit)
{
    public static LrSchedule From(RunConfig c)
    {
        var s = c.Scheduler;
        double lr = c.Optimizer.Lr;
        return new LrSchedule(s.Name, lr, s.WarmupSteps, s.NumTrainingSteps ?? c.Trainer.MaxSteps, lr * s.LrMinRatio, s.WarmupLrInit);
    }

    public double At(long step)
    {
        switch (Kind)
        {
            case ScheduleKind.Linear:
                if (step < WarmupSteps) return Lr * step / Math.Max(1, WarmupSteps);
                return Lr * Math.Max(0.0, (double)(TotalSteps - step) / Math.Max(1, TotalSteps - WarmupSteps));
            case ScheduleKind.Cosine:
                if (step < WarmupSteps) return WarmupLrInit + step * (Lr - WarmupLrInit) / WarmupSteps;
                if (step >= TotalSteps) return LrMin;
                return LrMin + 0.5 * (Lr - LrMin) * (1 + Math.Cos(Math.PI * step / TotalSteps));
            default:
                return step < WarmupSteps ? Lr * (step + 1) / WarmupSteps : Lr;
        }
    }
}
