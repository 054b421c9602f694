using System.Diagnostics;
using System.Runtime.InteropServices;
using NUnit.Framework;

namespace FlashAttn.Tests;

/// <summary>
/// What a user gets from `dotnet add package FlashAttn.TorchSharp`: packs the package from this
/// checkout into a local folder feed, installs it into a fresh console project outside the
/// repository (so only the package's own buildTransitive targets apply), and runs on CPU: rotary,
/// MHA and DropoutAddLayerNorm forward and backward, a tiny GPT from FlashAttn.Models, and a call
/// into the packed native library. Needs the .NET SDK; skipped where there is none.
/// </summary>
[Category("Package")]
public sealed class PackageTests
{
    [Test]
    public void PackedPackagesInstallIntoAFreshConsoleProjectAndRun()
    {
        InPackWorkspace("flashattn-pkg-", (root, work, version, feed) =>
        {
            // FlashAttn.Models depends on FlashAttn.TorchSharp of the same version: both go to the feed.
            foreach (var project in new[] { "FlashAttn.Managed", "FlashAttn.Models" })
                Run(root, "dotnet", $"pack {project} -c Release -o \"{feed}\" -p:Version={version} {Artifacts(work)}");
            var nupkg = Path.Combine(feed, $"FlashAttn.TorchSharp.{version}.nupkg");
            Assert.That(File.Exists(nupkg), Is.True, "dotnet pack wrote no FlashAttn.TorchSharp package");
            using (var zip = System.IO.Compression.ZipFile.OpenRead(nupkg))
            {
                var entries = zip.Entries.Select(e => e.FullName).ToList();
                Assert.That(entries, Does.Contain("runtimes/linux-x64/native/libflashattn.so"));
                Assert.That(entries, Does.Contain("buildTransitive/FlashAttn.TorchSharp.targets"));
                Assert.That(entries, Does.Contain("lib/net10.0/FlashAttn.TorchSharp.dll"));
            }

            var app = Path.Combine(work, "app");
            Run(work, "dotnet", "new console -o app --framework net10.0");
            File.WriteAllText(Path.Combine(app, "NuGet.config"), $"""
                <?xml version="1.0" encoding="utf-8"?>
                <configuration>
                  <packageSources>
                    <clear />
                    <add key="nuget.org" value="https://api.nuget.org/v3/index.json" />
                    <add key="local" value="{feed}" />
                  </packageSources>
                </configuration>
                """);
            Run(app, "dotnet", "add package TorchSharp-cpu --version 0.107.0");
            Run(app, "dotnet", $"add package FlashAttn.TorchSharp --version {version}");
            Run(app, "dotnet", $"add package FlashAttn.Models --version {version}");
            File.WriteAllText(Path.Combine(app, "Program.cs"), """
                using FlashAttn;
                using TorchSharp;
                using static TorchSharp.torch;
                var x = randn(2, 5, 3, 8, requires_grad: true);
                var freqs = outer(arange(5, dtype: ScalarType.Float32), 1.0 / pow(10000.0, arange(0, 8, 2, dtype: ScalarType.Float32) / 8.0));
                var y = flash_attn.apply_rotary_emb(x, freqs.cos(), freqs.sin());
                y.sum().backward();
                // A rotation keeps each head's norm.
                var normErr = (y.norm(-1) - x.norm(-1)).abs().max().item<float>();
                // The drop-in modules a TorchSharp model swaps in, forward and backward.
                using var mha = layers.MHA(32, 4, num_heads_kv: 2, causal: true, rotary_emb_dim: 8);
                using var ln = layers.DropoutAddLayerNorm(32, prenorm: true);
                var h = randn(2, 7, 32, requires_grad: true);
                var (z, residual) = ln.forward(mha.forward(h), h);
                (z.sum() + residual!.sum()).backward();
                using var gpt = new FlashAttn.Models.GPTLMHeadModel(FlashAttn.Models.GPTConfig.Named("tiny"));
                var ids = randint(0, 256, new long[] { 2, 16 });
                gpt.loss(ids, ids).backward();
                Console.WriteLine($"norm-err {normErr:E2} grads {x.grad!.shape.Length} {h.grad!.shape.Length} native [{Backend.NativeBuildInfo}]");
                """);
            // For this machine's platform only: TorchSharp-cpu's libtorch for every platform is 1.4 GB, this one's 0.5.
            var output = Run(app, "dotnet", $"run -c Release -r {PortableRid}");
            Assert.That(output, Does.Contain("native [FlashAttn.Native"));
            var normErr = double.Parse(output.Split("norm-err ")[1].Split(' ')[0], System.Globalization.CultureInfo.InvariantCulture);
            Assert.That(normErr, Is.LessThan(1e-5), output);
        });
    }

    /// <summary>
    /// The CLI as a dotnet tool: packs FlashAttn.Cli into a local feed as a tool for this machine's platform,
    /// installs it with `dotnet tool install` into a tool path outside the repository, and runs `flashattn --help`,
    /// `flashattn experiments` (the experiment files travel inside the package), `flashattn show` of a GPT-2 recipe and
    /// `flashattn sample --help`.
    /// </summary>
    [Test]
    public void CliToolInstallsFromThePackageAndRuns()
    {
        InPackWorkspace("flashattn-tool-", (root, work, version, feed) =>
        {
            // For this machine's platform (`-r`): the platform-agnostic package carries TorchSharp-cpu's libtorch for
            // Linux, Windows and macOS (1.4 GB installed, 2.8 GB of build output; CI ran out of disk on it); this one
            // is a 138 MB package that installs 0.76 GB.
            Run(root, "dotnet", $"pack FlashAttn.Cli -c Release -r {PortableRid} -o \"{feed}\" -p:Version={version} {Artifacts(work)}");
            var tools = Path.Combine(work, "tools");
            Run(work, "dotnet", $"tool install FlashAttn.Cli --tool-path \"{tools}\" --add-source \"{feed}\" --version {version}");
            var exe = Path.Combine(tools, "flashattn");
            Assert.That(File.Exists(exe), Is.True, "the tool's command `flashattn` was not installed");

            var help = Run(work, exe, "--help");
            Assert.That(help, Does.Contain("usage:").And.Contain("flashattn train"), help);
            var experiments = Run(work, exe, "experiments");
            Assert.That(experiments, Does.Contain("owt/gpt2s-flash").And.Contain("tiny"), experiments);
            var show = Run(work, exe, "show experiment=owt/gpt2s-flash");
            Assert.That(show, Does.Contain("experiment: owt/gpt2s-flash").And.Contain("model.name: gpt2s"), show);
            var sample = Run(work, exe, "sample --help");
            Assert.That(sample, Does.Contain("--max-new-tokens"), sample);
        });
    }

    /// <summary>Skips without a checkout or an SDK; runs <paramref name="body"/> with the repository root, a fresh
    /// temporary folder (deleted afterwards), a unique package version (so the NuGet cache never serves a stale
    /// copy of an earlier pack) and the local feed folder inside the temporary one.</summary>
    private static void InPackWorkspace(string prefix, Action<string, string, string, string> body)
    {
        var root = RepoPaths.TryRoot();
        if (root is null) Assert.Ignore("not running from a repository checkout");
        if (!HasDotnetSdk()) Assert.Ignore("no .NET SDK on this machine (the GPU host has only the published tests)");
        var work = Directory.CreateTempSubdirectory(prefix).FullName;
        var version = $"0.0.0-test.{DateTime.UtcNow:yyyyMMddHHmmssfff}";
        try
        {
            body(root, work, version, Path.Combine(work, "feed"));
        }
        finally
        {
            Directory.Delete(work, recursive: true);
            // Restore extracted this version of our packages into the global packages folder: remove it too.
            var cache = Environment.GetEnvironmentVariable("NUGET_PACKAGES") is { Length: > 0 } p ? p
                : Path.Combine(Environment.GetFolderPath(Environment.SpecialFolder.UserProfile), ".nuget", "packages");
            foreach (var id in new[] { "flashattn.torchsharp", "flashattn.models", "flashattn.cli" })
                if (Directory.Exists(Path.Combine(cache, id, version))) Directory.Delete(Path.Combine(cache, id, version), recursive: true);
        }
    }

    /// <summary>Build outputs of a pack go to the temporary folder, not the checkout's bin/obj (the tool's Release
    /// build is 1 GB even for one platform), and are deleted with it.</summary>
    private static string Artifacts(string work) => $"--artifacts-path \"{Path.Combine(work, "artifacts")}\" -v:q -nologo";

    /// <summary>linux-x64 and the like: RuntimeInformation.RuntimeIdentifier is a distribution's (ubuntu.24.04-x64) under a
    /// source-built SDK, which TorchSharp's packages do not know.</summary>
    private static string PortableRid =>
        (OperatingSystem.IsWindows() ? "win" : OperatingSystem.IsMacOS() ? "osx" : "linux") + "-" +
        RuntimeInformation.OSArchitecture.ToString().ToLowerInvariant();

    private static bool HasDotnetSdk()
    {
        try { return Run(Environment.CurrentDirectory, "dotnet", "--list-sdks", check: false).Contains('['); }
        catch (System.ComponentModel.Win32Exception) { return false; }
    }

    private static string Run(string dir, string file, string args, bool check = true)
    {
        var psi = new ProcessStartInfo(file, args)
        {
            WorkingDirectory = dir,
            RedirectStandardOutput = true,
            RedirectStandardError = true,
        };
        psi.Environment["DOTNET_CLI_TELEMETRY_OPTOUT"] = "1";
        psi.Environment["DOTNET_NOLOGO"] = "1";
        using var p = Process.Start(psi)!;
        var stderr = p.StandardError.ReadToEndAsync();
        var stdout = p.StandardOutput.ReadToEnd();
        p.WaitForExit();
        var all = stdout + stderr.Result;
        if (check && p.ExitCode != 0) Assert.Fail($"`{file} {args}` in {dir} exited {p.ExitCode}:\n{all}");
        return all;
    }
}
