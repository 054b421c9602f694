using BenchmarkDotNet.Columns;
using BenchmarkDotNet.Configs;
using BenchmarkDotNet.Jobs;
using BenchmarkDotNet.Reports;
using BenchmarkDotNet.Running;
using BenchmarkDotNet.Toolchains.InProcess.Emit;
using FlashAttn;
using FlashAttn.Benchmarks;

// GPU benchmarks, run on the device host by build/device-run.sh:
//   FLASHATTN_TORCH_LIB=... FLASHATTN_NATIVE_PATH=... ./FlashAttn.Benchmarks [--filter '*Rotary*']
// In process (the host has no SDK); short jobs keep a whole suite inside one device call.
LibTorchLoader.LoadFromEnvironment();
Console.WriteLine($"# {Backend.NativeBuildInfo}; libtorch from {LibTorchLoader.LoadedFrom ?? "package"}");

var job = Job.Default.WithToolchain(InProcessEmitToolchain.Instance)
    .WithWarmupCount(3).WithIterationCount(10).WithLaunchCount(1);
var config = ManualConfig.CreateMinimumViable().AddJob(job)
    .AddColumn(StatisticColumn.Median)
    .WithOptions(ConfigOptions.DisableOptimizationsValidator | ConfigOptions.JoinSummary);
var summaries = BenchmarkSwitcher.FromAssembly(typeof(GpuBenchmark).Assembly).Run(args, config);

// One TSV line per case (section, name, value, unit), as shared/peers/pytorch_baselines.py prints,
// with the achieved bandwidth and its ratio to the copy measured in the same run.
Console.WriteLine("\n# results (median)");
foreach (var summary in summaries)
{
    foreach (var group in summary.Reports.GroupBy(r => r.BenchmarkCase.Parameters.DisplayInfo))
    {
        var copy = group.FirstOrDefault(r => r.BenchmarkCase.Descriptor.WorkloadMethod.Name == "CopyFloor");
        foreach (var report in group)
        {
            if (report.ResultStatistics is null) continue;
            var bench = (GpuBenchmark)Activator.CreateInstance(report.BenchmarkCase.Descriptor.Type)!;
            var name = $"{report.BenchmarkCase.Descriptor.Type.Name.Replace("Benchmarks", "")} {report.BenchmarkCase.Descriptor.WorkloadMethod.Name} {group.Key}";
            double ns = report.ResultStatistics.Median;
            Console.WriteLine($"ops\t{name}\t{ns / 1e6:G4}\tms");
            if (copy?.ResultStatistics is { } c)
                Console.WriteLine($"ops\t{name} / copy floor\t{ns / c.Median:G3}\tx");
        }
    }
}
