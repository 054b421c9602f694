using System.Net;
using System.Net.Sockets;

namespace FlashAttn.Models.Distributed;

/// <summary>
/// Hands rank 0's NCCL unique id (128 bytes) to the other ranks, either through a file
/// (rank 0 writes it to a temporary name and renames it into place, so a reader never sees a partial
/// id; the others poll for it) or over TCP (rank 0 listens on MASTER_ADDR:MASTER_PORT and sends the
/// id to each of the world_size − 1 ranks that connect; they retry until it is up). Both wait at
/// most a timeout and then fail with an error naming the file or address. A file must be fresh for
/// each run (the launcher should pick a new name): a stale id would be read at once.
/// </summary>
public static class Rendezvous
{
    public const int UniqueIdBytes = 128;
    static readonly byte[] s_magic = "FANCCLID"u8.ToArray();
    public static readonly TimeSpan DefaultTimeout = TimeSpan.FromMinutes(5);

    /// <summary>The id every rank gets: rank 0 creates it with <paramref name="createId"/> and
    /// publishes it through the file when <paramref name="file"/> is set, else over TCP.</summary>
    public static byte[] Exchange(int rank, int worldSize, Func<byte[]> createId, string? file, string masterAddr, int masterPort, TimeSpan? timeout = null, CancellationToken cancel = default)
    {
        var t = timeout ?? DefaultTimeout;
        if (rank == 0)
        {
            var id = createId();
            if (file != null) WriteFile(file, id);
            else Serve(masterAddr, masterPort, id, worldSize - 1, t, cancel);
            return id;
        }
        return file != null ? ReadFile(file, t, cancel) : Fetch(masterAddr, masterPort, t, cancel);
    }

    public static void WriteFile(string path, byte[] id)
    {
        Check(id);
        var full = Path.GetFullPath(path);
        var dir = Path.GetDirectoryName(full)!;
        Directory.CreateDirectory(dir);
        var temp = Path.Combine(dir, $".{Path.GetFileName(full)}.{Environment.ProcessId}.{Guid.NewGuid():N}.tmp");
        using (var f = new FileStream(temp, FileMode.CreateNew, FileAccess.Write))
        {
            f.Write(id);
            f.Flush(flushToDisk: true);
        }
        File.Move(temp, full, overwrite: true); // rename(2): atomic on one file system
    }

    public static byte[] ReadFile(string path, TimeSpan timeout, CancellationToken cancel = default)
    {
        var deadline = DateTime.UtcNow + timeout;
        while (true)
        {
            cancel.ThrowIfCancellationRequested();
            try
            {
                var bytes = File.ReadAllBytes(path);
                if (bytes.Length == UniqueIdBytes) return bytes;
                throw new InvalidDataException($"rendezvous file {path}: {bytes.Length} bytes, expected the {UniqueIdBytes}-byte NCCL id");
            }
            catch (Exception e) when (e is FileNotFoundException or DirectoryNotFoundException) { }
            if (DateTime.UtcNow > deadline)
                throw new TimeoutException($"rendezvous: rank 0 did not write the NCCL id to {path} within {timeout.TotalSeconds:0.#} s");
            Thread.Sleep(20);
        }
    }

    /// <summary>Rank 0: listens on addr:port and sends the id to <paramref name="clients"/> connections.</summary>
    public static void Serve(string addr, int port, byte[] id, int clients, TimeSpan timeout, CancellationToken cancel = default)
    {
        Check(id);
        if (clients <= 0) return;
        var listener = new TcpListener(Resolve(addr), port);
        try { listener.Start(clients); }
        catch (SocketException e) { throw new IOException($"rendezvous: rank 0 cannot listen on {addr}:{port}: {e.Message}", e); }
        try
        {
            using var cts = CancellationTokenSource.CreateLinkedTokenSource(cancel);
            cts.CancelAfter(timeout);
            var payload = s_magic.Concat(id).ToArray();
            for (int served = 0; served < clients; served++)
            {
                try
                {
                    using var client = listener.AcceptTcpClientAsync(cts.Token).AsTask().GetAwaiter().GetResult();
                    client.GetStream().Write(payload);
                }
                catch (OperationCanceledException) when (!cancel.IsCancellationRequested)
                {
                    throw new TimeoutException($"rendezvous: only {served} of {clients} ranks connected to {addr}:{port} within {timeout.TotalSeconds:0.#} s");
                }
            }
        }
        finally { listener.Stop(); }
    }

    /// <summary>Ranks other than 0: connect to addr:port (retrying until rank 0 listens) and read the id.</summary>
    public static byte[] Fetch(string addr, int port, TimeSpan timeout, CancellationToken cancel = default)
    {
        var deadline = DateTime.UtcNow + timeout;
        Exception? last = null;
        while (DateTime.UtcNow <= deadline)
        {
            cancel.ThrowIfCancellationRequested();
            try
            {
                using var client = new TcpClient();
                var left = deadline - DateTime.UtcNow;
                if (!client.ConnectAsync(addr, port, cancel).AsTask().Wait(left > TimeSpan.Zero ? left : TimeSpan.Zero))
                    break;
                client.ReceiveTimeout = (int)Math.Max(1000, (deadline - DateTime.UtcNow).TotalMilliseconds);
                var stream = client.GetStream();
                var buf = new byte[s_magic.Length + UniqueIdBytes];
                stream.ReadExactly(buf);
                if (!buf.AsSpan(0, s_magic.Length).SequenceEqual(s_magic))
                    throw new InvalidDataException($"rendezvous: {addr}:{port} did not answer with an NCCL id (another service on that port?)");
                return buf[s_magic.Length..];
            }
            catch (AggregateException e) when (e.InnerException is SocketException) { last = e.InnerException; }
            catch (SocketException e) { last = e; }
            catch (EndOfStreamException e) { last = e; }
            Thread.Sleep(50);
        }
        throw new TimeoutException($"rendezvous: could not get the NCCL id from rank 0 at {addr}:{port} within {timeout.TotalSeconds:0.#} s" +
            (last != null ? $" (last error: {last.Message})" : ""), last);
    }

    static IPAddress Resolve(string addr) =>
        IPAddress.TryParse(addr, out var ip) ? ip : Dns.GetHostAddresses(addr).First(a => a.AddressFamily == AddressFamily.InterNetwork);

    static void Check(byte[] id)
    {
        if (id.Length != UniqueIdBytes) throw new ArgumentException($"NCCL id must be {UniqueIdBytes} bytes, got {id.Length}", nameof(id));
    }
}
