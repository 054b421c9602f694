using System.Diagnostics;
using System.Text.RegularExpressions;

namespace FlashAttn.Models;

/// <summary>Hidden temporary paths <c>.&lt;name&gt;.tmp-&lt;pid&gt;-&lt;guid&gt;</c> beside what they become (a token cache, a
/// checkpoint, the checkpoints/last pointer): written there and renamed once complete, so a killed writer leaves one of
/// these, never a complete-looking result. The pid names the writer: the next prepare or run removes those whose process
/// has ended.</summary>
public static partial class TempPaths
{
    /// <summary>A fresh temporary path for <paramref name="name"/> in <paramref name="parent"/>, owned by this process.</summary>
    public static string For(string parent, string name) => Path.Combine(parent, $".{name}.tmp-{Environment.ProcessId}-{Guid.NewGuid():N}");

    [GeneratedRegex(@"^\.(?<name>.+)\.tmp-(?<pid>\d+)-[0-9a-f]{32}$")]
    private static partial Regex Pattern();

    /// <summary>Removes the temporary files and folders in <paramref name="parent"/> (those of <paramref name="name"/> only,
    /// when given) whose process has ended, never one of a running process; returns what it removed. Pids are this host's:
    /// callers pass a name where the folder may be shared by several hosts (a data folder), so that only a concurrent
    /// writer of the same thing elsewhere could be mistaken for a dead one.</summary>
    public static IReadOnlyList<string> RemoveStale(string parent, string? name = null)
    {
        var removed = new List<string>();
        if (!Directory.Exists(parent)) return removed;
        foreach (var path in Directory.EnumerateFileSystemEntries(parent, ".*.tmp-*"))
        {
            var m = Pattern().Match(Path.GetFileName(path));
            if (!m.Success || name is not null && m.Groups["name"].Value != name) continue;
            if (!int.TryParse(m.Groups["pid"].Value, out var pid) || IsRunning(pid)) continue;
            try
            {
                if (Directory.Exists(path)) Directory.Delete(path, recursive: true);
                else File.Delete(path);
                removed.Add(path);
            }
            catch (Exception e) when (e is IOException or UnauthorizedAccessException) { /* left for a later run; the name marks it temporary */ }
        }
        return removed;
    }

    /// <summary>Whether process <paramref name="pid"/> of this host is running (a zombie not yet reaped by its parent counts
    /// as running: its files are kept one run longer).</summary>
    public static bool IsRunning(int pid)
    {
        if (pid == Environment.ProcessId) return true;
        try
        {
            using var p = Process.GetProcessById(pid);
            return !p.HasExited;
        }
        catch (Exception e) when (e is ArgumentException or InvalidOperationException) { return false; } // no such process
    }
}
