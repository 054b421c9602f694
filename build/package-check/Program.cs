// The package check on a GPU host: build/device-prepare.sh packs FlashAttn.TorchSharp and
// FlashAttn.Models, adds them to a fresh console project with `dotnet add package` (plain TorchSharp,
// no TorchSharp-cuda: libtorch comes from the host's PyTorch through the documented loader) and
// publishes this program; build/device-run.sh swaps the CUDA build of libflashattn into the package
// and runs it. It checks that the packaged library runs the kernels, not the reference path, and
// that MHA + DropoutAddLayerNorm forward and backward and a tiny GPT training step agree with the
// float64 reference by the flash-attn rule: the kernels' error at most twice that of the same
// modules' reference path run in bf16 on the GPU.
using FlashAttn;
using TorchSharp;
using static TorchSharp.torch;

Console.WriteLine($"libtorch: {LibTorchLoader.LoadFromPyTorch()}");
Console.WriteLine($"native: {Backend.NativeBuildInfo}");
if (!cuda.is_available()) { Console.WriteLine("FAIL: no CUDA device"); return 1; }
var probe = zeros(1, device: CUDA, dtype: ScalarType.BFloat16);
if (!Backend.UsesKernels(probe)) { Console.WriteLine("FAIL: the packaged libflashattn does not run CUDA kernels here"); return 1; }

manual_seed(0);
// Weights rounded to bf16 first, so that the float64 reference and the bf16 runs share them exactly.
using var mha = layers.MHA(256, 8, num_heads_kv: 2, causal: true, rotary_emb_dim: 32);
using var ln = layers.DropoutAddLayerNorm(256, prenorm: true);
mha.to(ScalarType.BFloat16).to(ScalarType.Float64);
ln.to(ScalarType.BFloat16).to(ScalarType.Float64);
var x0 = randn(4, 197, 256, dtype: ScalarType.BFloat16).to(ScalarType.Float64);
var dy = randn(4, 197, 256, dtype: ScalarType.BFloat16).to(ScalarType.Float64);

(Tensor y, Tensor dx) Run(Device device, ScalarType dtype, bool reference)
{
    Backend.ForceReference = reference;
    mha.to(device).to(dtype);
    ln.to(device).to(dtype);
    var x = x0.to(dtype, device).detach().requires_grad_();
    var (z, residual) = ln.forward(mha.forward(x), x);
    var y = z + residual!;
    (y * dy.to(dtype, device)).sum().backward();
    Backend.ForceReference = false;
    return (y.detach().to(ScalarType.Float64, CPU), x.grad!.to(ScalarType.Float64, CPU));
}

var exact = Run(CPU, ScalarType.Float64, reference: true);
var kernels = Run(CUDA, ScalarType.BFloat16, reference: false);
var plain = Run(CUDA, ScalarType.BFloat16, reference: true);
bool ok = true;
foreach (var (name, k, p, e) in new[] { ("out", kernels.y, plain.y, exact.y), ("dx", kernels.dx, plain.dx, exact.dx) })
{
    double errK = (k - e).abs().max().item<double>(), errP = (p - e).abs().max().item<double>();
    bool pass = errK <= 2 * errP;
    ok &= pass;
    Console.WriteLine($"MHA + DropoutAddLayerNorm {name}: kernels {errK:E2}, bf16 reference {errP:E2} -> {(pass ? "ok" : "FAIL")}");
}

// A GPT training step from FlashAttn.Models with every fusion on.
using var gpt = new FlashAttn.Models.GPTLMHeadModel(FlashAttn.Models.GPTConfig.Named("tiny"), CUDA, ScalarType.BFloat16);
var ids = randint(0, 256, new long[] { 4, 64 }, device: CUDA);
var loss = gpt.loss(ids, ids);
loss.backward();
double lossValue = loss.to(ScalarType.Float32).item<float>();
double gradNorm = gpt.parameters().Select(p => p.grad!.to(ScalarType.Float32).pow(2).sum().item<float>()).Sum();
bool gptOk = double.IsFinite(lossValue) && double.IsFinite(gradNorm) && gradNorm > 0;
ok &= gptOk;
Console.WriteLine($"tiny GPT bf16 step: loss {lossValue:F4}, grad norm² {gradNorm:E2} -> {(gptOk ? "ok" : "FAIL")}");
Console.WriteLine(ok ? "package check: ok" : "package check: FAILED");
return ok ? 0 : 1;
