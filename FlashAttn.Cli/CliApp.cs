using System.Globalization;
using FlashAttn.Models.Data;
using FlashAttn.Models.Distributed;
using FlashAttn.Models.Training;

namespace FlashAttn.Cli;

/// <summary>The `flashattn` command line (testable: output writers and exit codes, no Environment.Exit).</summary>
public static class CliApp
{
    public const string Usage = """
        flashattn: the flash-attention training recipes on FlashAttn.TorchSharp

        usage:
          flashattn train [key=value ...]          train an experiment (default: experiment=tiny) into runs/<name>, a folder
                                                   of its own (resume=last continues it; trainer.overwrite=true replaces it)
          flashattn prepare <name> <inputs...> [--val-ratio R] [--val-split-seed S] [--data-dir DIR] [--threads N]
                                                   tokenize corpora (folders or files of .txt, .jsonl, .jsonl.zst, .parquet,
                                                   or embedded:kjv) into ${DATA_DIR}/<name> (./data/<name> when DATA_DIR is unset);
                                                   a .txt file's documents are its paragraphs; --val-ratio (default 0.02, as
                                                   datamodule.val_ratio) is the validation share of the documents
          flashattn sample [RUN] [--prompt TEXT] [--num-samples N] [--max-new-tokens N] [--temperature T] [--top-k K] [--top-p P]
                           [--seed S] [--device auto|cpu|cuda]
                                                   text from a GPT: a run folder (default runs/tiny), one of its
                                                   checkpoints (checkpoints/step-NNNNNNN, checkpoints/last), a Hugging Face
                                                   GPT-2 folder (config.json + model.safetensors) or a .safetensors file
          flashattn export MODEL OUT_DIR          a GPT (any MODEL sample reads) as a Hugging Face GPT-2 folder:
                                                   config.json + model.safetensors (float32) for transformers' from_pretrained
          flashattn experiments                    list the experiment files
          flashattn show [key=value ...]           print the resolved configuration without training
          flashattn --help                         this text, with every configuration key (the default experiment's values)
          flashattn <command> --help               that command's usage; train/show with key=value: every key's value there

        examples:
          flashattn train                                               # tiny GPT on the embedded corpus (CPU: a few minutes)
          flashattn train experiment=owt/gpt2s-flash trainer.devices=1 datamodule.batch_size=16
          flashattn train experiment=owt/gpt2m-flash trainer.precision=bf16 datamodule.batch_size=8
          flashattn sample --prompt "In the beginning" --num-samples 2     # after the first example
          flashattn train model.init_from=gpt2 name=mine-ft datamodule.dataset=mine datamodule.sources=mine.txt   # fine-tune a GPT-2 download
          flashattn prepare openwebtext /data/openwebtext/plain_text --val-ratio 0.0005   # the Hub's parquet files, the owt experiments' split
        """;

    static int CudaDevices() => TorchSharp.torch.cuda.is_available() ? TorchSharp.torch.cuda.device_count() : 0;

    /// <summary>trainer.devices=N: the N ranks run this command again, each line they write prefixed with their rank (ranks
    /// other than 0 write only their errors); the exit code is the first failing rank's (the others are stopped then), else 0.</summary>
    static int Launch(Launcher launcher, TextWriter stdout, TextWriter stderr)
    {
        stderr.WriteLine($"trainer.devices={launcher.WorldSize}: starting {launcher.WorldSize} ranks (rank 0 logs)");
        try { return launcher.Run(stdout, stderr); }
        finally { if (launcher.Options.RendezvousFile is { } f) File.Delete(f); }
    }

    public const string PrepareUsage =
        "usage: flashattn prepare <name> <inputs...> [--val-ratio R] [--val-split-seed S] [--data-dir DIR] [--threads N] [--tokenizer gpt2] [--no-progress]";

    public static int Run(string[] args, TextWriter stdout, TextWriter stderr)
    {
        try
        {
            if (args.Length == 0 || args[0] is "-h" or "--help" or "help")
            {
                stdout.WriteLine(Usage);
                WriteKeys(ExperimentConfig.Parse([]), stdout);
                return args.Length == 0 ? 2 : 0;
            }
            var rest = args.Skip(1).ToArray();
            bool help = rest.Any(a => a is "-h" or "--help");
            var options = rest.Where(a => a is not ("-h" or "--help")).ToArray();
            switch (args[0])
            {
                case "train" when help:
                    stdout.WriteLine("usage: flashattn train [key=value ...]   (experiment=NAME picks an experiment file; resume=last continues the run)");
                    WriteKeys(ExperimentConfig.Parse(options), stdout);
                    return 0;
                case "train":
                {
                    var config = ExperimentConfig.Parse(rest);
                    var settings = config.Bind();
                    var worker = WorkerEnvironment.FromLauncher();
                    if (DataParallel.LauncherFor(settings, worker, CudaDevices()) is { } launcher)
                        return Launch(launcher, stdout, stderr);
                    var result = new Trainer(config, stderr, worker).Run();
                    if (worker is { Rank: not 0 }) return 0;
                    if (result.Steps <= 0)
                    {
                        stdout.WriteLine((settings.Trainer.MaxSteps == 0 ? "evaluation only" : $"run {result.RunDir}: no training steps left") +
                            (result.ValLoss is { } val ? $", val_loss {val:F4} (ppl {Math.Exp(val):F2})" : ""));
                        return 0;
                    }
                    stdout.WriteLine($"run {result.RunDir}: loss {result.FirstLoss:F4} -> {result.LastLoss:F4}" +
                        (result.ValLoss is { } v ? $", val_loss {v:F4}" : "") + $" in {result.Elapsed:hh\\:mm\\:ss}");
                    if (settings.Task == TaskKind.LanguageModeling)
                        stdout.WriteLine($"text from it: {SelfCommand(AppContext.BaseDirectory, Directory.GetCurrentDirectory())} sample {result.RunDir}");
                    return 0;
                }
                case "show" when help:
                    stdout.WriteLine("usage: flashattn show [key=value ...]   (the configuration train would run, without training)");
                    WriteKeys(ExperimentConfig.Parse(options), stdout);
                    return 0;
                case "show":
                {
                    var config = ExperimentConfig.Parse(rest);
                    stdout.Write(config.Dump());
                    stdout.WriteLine($"# gradient accumulation: {config.Bind().Accumulation}");
                    return 0;
                }
                case "experiments":
                    foreach (var e in ExperimentConfig.AvailableExperiments()) stdout.WriteLine(e);
                    return 0;
                case "prepare" when help:
                    stdout.WriteLine(PrepareUsage);
                    stdout.WriteLine("  tokenizes corpora (folders or files of .txt, .jsonl, .jsonl.zst, .parquet, or embedded:kjv) into <data-dir>/<name>");
                    stdout.WriteLine($"  (--data-dir default: $DATA_DIR, else ./data); --val-ratio (default {PrepareOptions.DefaultValRatio.ToString(CultureInfo.InvariantCulture)}, " +
                        "as datamodule.val_ratio) is the validation share of the documents; a .txt file's documents are its paragraphs");
                    return 0;
                case "prepare":
                    return Prepare(rest, stdout, stderr);
                case "export" when help:
                    stdout.WriteLine("usage: flashattn export MODEL OUT_DIR   (MODEL: anything `flashattn sample` reads)");
                    return 0;
                case "export":
                {
                    if (args.Length != 3) { stderr.WriteLine("usage: flashattn export MODEL OUT_DIR"); return 2; }
                    var source = GptSource.Open(args[1]);
                    // float32 on the CPU: the source's full-precision weights where it has them (a checkpoint's masters)
                    var device = DevicePolicy.Resolve(Accelerator.Cpu);
                    using var model = new FlashAttn.Models.GPTLMHeadModel(source.ForDevice(device, TextWriter.Null), device,
                        DevicePolicy.InferenceDtype(device, source.Precision));
                    source.LoadInto(model);
                    model.save_pretrained(args[2]);
                    stdout.WriteLine($"{args[2]}: config.json and model.safetensors of {source.Name} ({model.num_parameters() / 1e6:F1}M parameters, float32)");
                    return 0;
                }
                case "sample" when help:
                    stdout.WriteLine(SampleCommand.Usage);
                    return 0;
                case "sample":
                    return SampleCommand.Run(rest, stdout, stderr);
                default:
                    stderr.WriteLine($"unknown command '{args[0]}'; valid commands: train, prepare, sample, export, experiments, show, --help");
                    return 2;
            }
        }
        catch (ConfigException e)
        {
            stderr.WriteLine("error: " + e.Message);
            return 2;
        }
        catch (Exception e) when (e is ArgumentException or FileNotFoundException or InvalidDataException or IOException or NotSupportedException)
        {
            stderr.WriteLine("error: " + e.Message);
            return 1;
        }
    }

    static void WriteKeys(ExperimentConfig config, TextWriter stdout)
    {
        stdout.WriteLine($"configuration keys, with their values in experiment {config["experiment"]} and the overrides given (key value {{choices}} meaning):");
        stdout.WriteLine(config.HelpText());
        stdout.WriteLine("experiments: " + string.Join(", ", ExperimentConfig.AvailableExperiments()));
    }

    /// <summary>
    /// How the user runs this tool, for the commands it suggests: `dotnet run --project &lt;dir&gt; -c &lt;configuration&gt; --`
    /// when it runs from a build of the project (its output folder is &lt;project&gt;/bin/&lt;configuration&gt;/&lt;framework&gt;/,
    /// <paramref name="baseDirectory"/>), with the project's path relative to <paramref name="workingDirectory"/>; else
    /// `flashattn` (the installed tool).
    /// </summary>
    public static string SelfCommand(string baseDirectory, string workingDirectory)
    {
        var output = new DirectoryInfo(baseDirectory.TrimEnd(Path.DirectorySeparatorChar));
        var configuration = output.Parent;
        var project = configuration?.Parent?.Parent;
        if (configuration?.Parent?.Name != "bin" || project is null || !File.Exists(Path.Combine(project.FullName, "FlashAttn.Cli.csproj")))
            return "flashattn";
        var relative = Path.GetRelativePath(workingDirectory, project.FullName);
        return $"dotnet run --project {(relative.Contains(' ') ? $"\"{relative}\"" : relative)} -c {configuration.Name} --";
    }

    static int Prepare(string[] args, TextWriter stdout, TextWriter stderr)
    {
        var positional = new List<string>();
        var options = new PrepareOptions();
        string dataDir = TokenCache.DefaultDataDir;
        for (int i = 0; i < args.Length; i++)
        {
            string Value() => i + 1 < args.Length ? args[++i] : throw new ArgumentException($"{args[i]} needs a value");
            switch (args[i])
            {
                case "--val-ratio": options = options with { ValRatio = double.Parse(Value(), CultureInfo.InvariantCulture) }; break;
                case "--val-split-seed": options = options with { ValSplitSeed = long.Parse(Value(), CultureInfo.InvariantCulture) }; break;
                case "--threads": options = options with { Threads = int.Parse(Value(), CultureInfo.InvariantCulture) }; break;
                case "--tokenizer": options = options with { Tokenizer = Value() }; break;
                case "--data-dir": dataDir = Value(); break;
                case "--no-progress": options = options with { Progress = false }; break;
                case var a when a.StartsWith("--"): throw new ArgumentException($"unknown option {a}; valid: --val-ratio, --val-split-seed, --threads, --tokenizer, --data-dir, --no-progress");
                default: positional.Add(args[i]); break;
            }
        }
        if (positional.Count < 2)
        {
            stderr.WriteLine(PrepareUsage);
            return 2;
        }
        var meta = TokenCache.Prepare(dataDir, positional[0], positional.Skip(1).ToList(), options, stderr);
        stdout.WriteLine($"{TokenCache.PathFor(dataDir, positional[0])}: {meta.Documents:N0} documents, {meta.TrainTokens:N0} train + {meta.ValTokens:N0} val tokens ({meta.Tokenizer})");
        return 0;
    }
}
