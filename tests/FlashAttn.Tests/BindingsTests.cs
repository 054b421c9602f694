using BindingsGen;
using NUnit.Framework;

namespace FlashAttn.Tests;

/// <summary>
/// FlashAttn.Native/include/flashattn.h is the source of truth for the P/Invoke declarations:
/// these tests fail while FlashAttn.Managed/Native/NativeMethods.*.g.cs lag behind it.
/// </summary>
[TestFixture]
public class BindingsTests
{
    private const string HeaderRelativePath = "FlashAttn.Native/include/flashattn.h";
    private const string GeneratedRelativeDir = "FlashAttn.Managed/Native";
    private const string RotaryFile = "NativeMethods.Rotary.g.cs";

    private static string RepoRoot() => RepoPaths.TryRoot() ?? throw new InvalidOperationException(
        $"No directory containing global.json above {AppContext.BaseDirectory}");

    private static string HeaderText() => File.ReadAllText(Path.Combine(RepoRoot(), HeaderRelativePath));

    private static string GeneratedDir() => Path.Combine(RepoRoot(), GeneratedRelativeDir);

    private static IReadOnlyDictionary<string, string> Generate(string headerText) =>
        BindingsGenerator.Generate(headerText, HeaderRelativePath);

    /// <summary>"line N: expected / actual" for the first line where the two texts differ.</summary>
    private static string FirstDifference(string expected, string actual)
    {
        var e = expected.Split('\n');
        var a = actual.Split('\n');
        for (var i = 0; i < Math.Max(e.Length, a.Length); i++)
        {
            var el = i < e.Length ? e[i] : "<end of file>";
            var al = i < a.Length ? a[i] : "<end of file>";
            if (el != al)
                return $"first difference at line {i + 1}:\n  generated:  {el}\n  checked in: {al}";
        }
        return "the files differ only in encoding";
    }

    [Test]
    public void GeneratedBindingsMatchHeader()
    {
        var generated = Generate(HeaderText());
        var dir = GeneratedDir();
        Assert.That(generated.Keys, Has.Member("NativeMethods.Types.g.cs"));

        var problems = new List<string>();
        foreach (var (name, content) in generated)
        {
            var path = Path.Combine(dir, name);
            if (!File.Exists(path))
            {
                problems.Add($"{GeneratedRelativeDir}/{name} is missing");
                continue;
            }
            var checkedIn = File.ReadAllText(path);
            if (checkedIn != content)
                problems.Add($"{GeneratedRelativeDir}/{name} is out of date with {HeaderRelativePath}; " +
                             FirstDifference(content, checkedIn));
        }
        foreach (var path in Directory.EnumerateFiles(dir, "NativeMethods.*.g.cs"))
        {
            var name = Path.GetFileName(path);
            if (BindingsGenerator.GeneratedFileName.IsMatch(name) && !generated.ContainsKey(name))
                problems.Add($"{GeneratedRelativeDir}/{name} is stale: the header no longer generates it");
        }

        Assert.That(problems, Is.Empty,
            "The checked-in bindings differ from the header; run build/gen-bindings.sh and commit the result.\n" +
            string.Join("\n", problems));
    }

    [Test]
    public void ChangedSignatureIsDetected()
    {
        var header = HeaderText();
        const string original = "int64_t seqlen_ro";
        Assert.That(header, Does.Contain(original), "the test needs FlashAttn_rotary_apply's seqlen_ro parameter");

        var changed = Generate(header.Replace(original, "int32_t seqlen_ro"));
        var checkedIn = File.ReadAllText(Path.Combine(GeneratedDir(), RotaryFile));

        Assert.That(changed[RotaryFile], Is.Not.EqualTo(checkedIn));
        Assert.That(changed[RotaryFile], Does.Contain("        int seqlen_ro,"));
        // Sanity: the unchanged header reproduces the checked-in file, so the difference is the edit.
        Assert.That(Generate(header)[RotaryFile], Is.EqualTo(checkedIn));
    }

    [Test]
    public void UnknownTypeIsRejected()
    {
        const string header =
            "#define FLASHATTN_ABI_VERSION 1\n" +
            "// area: Core\n" +
            "\n" +
            "FLASHATTN_API size_t FlashAttn_core_size(void);\n";

        var ex = Assert.Throws<FormatException>(() => Generate(header));
        Assert.That(ex!.Message, Does.Contain($"{HeaderRelativePath}:4:"));
        Assert.That(ex.Message, Does.Contain("unknown type 'size_t'"));
        Assert.That(ex.Message, Does.Contain("FLASHATTN_API size_t FlashAttn_core_size(void);"));
    }

    [Test]
    public void DeclarationOutsideAreaIsRejected()
    {
        const string header =
            "#define FLASHATTN_ABI_VERSION 1\n" +
            "\n" +
            "// Has no area.\n" +
            "FLASHATTN_API int32_t FlashAttn_core_abi_version(void);\n" +
            "// area: Core\n";

        var ex = Assert.Throws<FormatException>(() => Generate(header));
        Assert.That(ex!.Message, Does.Contain($"{HeaderRelativePath}:4:"));
        Assert.That(ex.Message, Does.Contain("area"));
        Assert.That(ex.Message, Does.Contain("FlashAttn_core_abi_version"));
    }

    [Test]
    public void KeywordParameterIsEscaped()
    {
        const string header =
            "#define FLASHATTN_ABI_VERSION 7\n" +
            "// area: X\n" +
            "FLASHATTN_API int32_t FlashAttn_x_y(void* out);\n";

        var files = Generate(header);

        Assert.That(files.Keys, Is.EqualTo(new[] { "NativeMethods.Types.g.cs", "NativeMethods.X.g.cs" }));
        Assert.That(files["NativeMethods.X.g.cs"], Does.Contain(
            "    [LibraryImport(LibraryName, EntryPoint = \"FlashAttn_x_y\")]\n" +
            "    internal static partial int FlashAttn_x_y(IntPtr /* void* */ @out);\n"));
        Assert.That(files["NativeMethods.Types.g.cs"], Does.Contain("internal const int AbiVersion = 7;"));
    }
}
