namespace FlashAttn.Tests;

/// <summary>The repository checkout the tests run from (the folder holding global.json), when there is one.</summary>
internal static class RepoPaths
{
    internal static string? TryRoot()
    {
        for (var dir = new DirectoryInfo(AppContext.BaseDirectory); dir != null; dir = dir.Parent)
            if (File.Exists(Path.Combine(dir.FullName, "global.json"))) return dir.FullName;
        return null;
    }
}
