using TorchSharp;
using static TorchSharp.torch;

namespace FlashAttn.Models.Training;

/// <summary>
/// Where a model runs and in which type, for training (the tasks), `flashattn sample` and `flashattn export` alike:
/// the device an <see cref="Accelerator"/> names, the compute type of a <see cref="Precision"/>, and the one rule for the
/// fusion switches on a CPU.
/// </summary>
public static class DevicePolicy
{
    /// <summary>auto: CUDA when a device is available, else the CPU. <paramref name="setting"/> names the option in errors.</summary>
    public static Device Resolve(Accelerator accelerator, string setting = "trainer.accelerator")
    {
        if (accelerator == Accelerator.Cuda && !torch.cuda.is_available())
            throw new ConfigException($"{setting}=cuda but no CUDA device is available; valid values: {string.Join(", ", ConfigNames.Accelerators)}");
        return accelerator == Accelerator.Cuda || accelerator == Accelerator.Auto && torch.cuda.is_available() ? torch.CUDA : torch.CPU;
    }

    /// <summary>The type a model trains in: bf16, fp16 (both with fp32 master weights), or float32.</summary>
    public static ScalarType ComputeDtype(Precision precision) =>
        precision switch { Precision.Bf16 => ScalarType.BFloat16, Precision.Fp16 => ScalarType.Float16, _ => ScalarType.Float32 };

    /// <summary>The type a trained model generates in: float32 on a CPU (no 16-bit kernels there); on a GPU the run's
    /// 16-bit type, float32 only for a float32 run.</summary>
    public static ScalarType InferenceDtype(Device device, Precision precision) =>
        device.type == DeviceType.CPU ? ScalarType.Float32 : ComputeDtype(precision);

    /// <summary>On a CPU the fusions are off unless a model.config fusion key sets one (<see cref="ModelOverrides.SetsFusions"/>):
    /// the fused kernels are CUDA, and their reference paths are slower there than the plain modules. Elsewhere
    /// <paramref name="config"/> as it is.</summary>
    public static GPTConfig Fusions(GPTConfig config, ModelOverrides? overrides, Device device, TextWriter log) =>
        FusionsOff(overrides, device, log) ? config.WithFusions(false) : config;

    /// <inheritdoc cref="Fusions(GPTConfig, ModelOverrides?, Device, TextWriter)"/>
    public static ViTConfig Fusions(ViTConfig config, ModelOverrides? overrides, Device device, TextWriter log) =>
        FusionsOff(overrides, device, log) ? config.WithFusions(false) : config;

    static bool FusionsOff(ModelOverrides? overrides, Device device, TextWriter log)
    {
        if (device.type != DeviceType.CPU || overrides is { SetsFusions: true }) return false;
        log.WriteLine("CPU: fused kernels off (set model.config.use_flash_attn etc. to force them)");
        return true;
    }
}
