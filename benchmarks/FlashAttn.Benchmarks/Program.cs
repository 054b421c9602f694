using System.Reflection;
using BenchmarkDotNet.Columns;
using BenchmarkDotNet.Configs;
using BenchmarkDotNet.Jobs;
using BenchmarkDotNet.Running;
using BenchmarkDotNet.Toolchains.InProcess.Emit;
using FlashAttn;
using FlashAttn.Benchmarks;

// GPU benchmarks, run on the device host by build/device-run.sh:
//   FLASHATTN_TORCH_LIB=... FLASHATTN_NATIVE_PATH=... ./FlashAttn.Benchmarks --filter '*Rotary*'
// In process (the host has no SDK); short jobs keep a whole suite inside one device call.
LibTorchLoader.LoadFromEnvironment();
Console.WriteLine($"# {Backend.NativeBuildInfo}; libtorch from {LibTorchLoader.LoadedFrom ?? "package"}");
// Peak memory of the MLP and cross-entropy (not a timing): PYTORCH_NO_CUDA_MEMORY_CACHING=1 ./FlashAttn.Benchmarks --memory
if (args.Length > 0 && args[0] == "--memory") { Environment.ExitCode = Memory.Run(); return; }

// BenchmarkDotNet sizes each iteration to 500 ms by default: the attention suite alone then took
// about 8 minutes of a 10-minute device call, with medians spread under 1%.
// 100 ms iterations cut that fivefold; check the spread when first run with them.
var job = Job.Default.WithToolchain(InProcessEmitToolchain.Instance)
    .WithWarmupCount(3).WithIterationCount(10).WithLaunchCount(1)
    .WithIterationTime(Perfolizer.Horology.TimeInterval.FromMilliseconds(100));
var config = ManualConfig.CreateMinimumViable().AddJob(job)
    .AddColumn(StatisticColumn.Median)
    .WithOptions(ConfigOptions.DisableOptimizationsValidator | ConfigOptions.JoinSummary);
var summaries = BenchmarkSwitcher.FromAssembly(typeof(GpuBenchmark).Assembly).Run(args, config);

// One TSV line per case (section, name, value, unit), as shared/peers/pytorch_baselines.py prints:
// the median time, then TB/s or TFLOP/s from the case's Bytes/Flops.
Console.WriteLine("\n# results (median)");
foreach (var report in summaries.SelectMany(s => s.Reports))
{
    if (report.ResultStatistics is null) continue;
    var descriptor = report.BenchmarkCase.Descriptor;
    var bench = (GpuBenchmark)Activator.CreateInstance(descriptor.Type)!;
    foreach (var p in report.BenchmarkCase.Parameters.Items)
        descriptor.Type.GetField(p.Name, BindingFlags.Public | BindingFlags.Instance)?.SetValue(bench, p.Value);
    var method = descriptor.WorkloadMethod.Name;
    var name = $"{descriptor.Type.Name.Replace("Benchmarks", "")} {method} {report.BenchmarkCase.Parameters.DisplayInfo}";
    if (bench.Label(method) is { } label) name += $" [{label}]";
    double seconds = report.ResultStatistics.Median / 1e9;
    Console.WriteLine($"bench\t{name}\t{seconds * 1e3:G4}\tms");
    if (bench.Bytes(method) is > 0 and var bytes) Console.WriteLine($"bench\t{name}\t{bytes / seconds / 1e12:G4}\tTB/s");
    if (bench.Flops(method) is > 0 and var flops) Console.WriteLine($"bench\t{name}\t{flops / seconds / 1e12:G4}\tTFLOP/s");
}
