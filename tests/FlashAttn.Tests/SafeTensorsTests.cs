using System.Buffers.Binary;
using System.Text;
using System.Text.Json;
using FlashAttn.Models;
using NUnit.Framework;
using TorchSharp;
using static TorchSharp.torch;

namespace FlashAttn.Tests;

/// <summary>The safetensors reader/writer on files the tests write, byte by byte where the format is fixed.</summary>
[TestFixture]
public sealed class SafeTensorsTests
{
    private string _path = "";

    [SetUp]
    public void NewPath() => _path = Path.Combine(Path.GetTempPath(), $"st-{Guid.NewGuid():N}.safetensors");

    [TearDown]
    public void Delete() => File.Delete(_path);

    [Test]
    public void RoundTrips_EveryDtype()
    {
        manual_seed(0);
        var tensors = new Dictionary<string, Tensor>
        {
            ["f64"] = randn(3, 4, dtype: ScalarType.Float64),
            ["f32"] = randn(2, 3, 5),
            ["f16"] = randn(7, dtype: ScalarType.Float16),
            ["bf16"] = randn(4, 4, dtype: ScalarType.BFloat16),
            ["i64"] = randint(-1000, 1000, new long[] { 6 }),
            ["i32"] = randint(-1000, 1000, new long[] { 2, 2 }, dtype: ScalarType.Int32),
            ["i16"] = randint(-1000, 1000, new long[] { 3 }, dtype: ScalarType.Int16),
            ["i8"] = randint(-100, 100, new long[] { 3 }, dtype: ScalarType.Int8),
            ["u8"] = randint(0, 255, new long[] { 5 }, dtype: ScalarType.Byte),
            ["bool"] = randn(9).gt(0),
            ["scalar"] = tensor(3.5f),
            ["empty"] = zeros(0, 4),
            ["strided"] = randn(4, 6).t(), // not contiguous: written in row-major order of the transposed view
        };
        SafeTensors.Save(_path, tensors, new Dictionary<string, string> { ["format"] = "pt", ["note"] = "ünïcode" });
        var (back, meta) = SafeTensors.LoadWithMetadata(_path);
        Assert.That(back.Keys, Is.EquivalentTo(tensors.Keys));
        foreach (var (k, t) in tensors)
        {
            Assert.That(back[k].dtype, Is.EqualTo(t.dtype), k);
            Assert.That(back[k].shape, Is.EqualTo(t.shape), k);
            Assert.That(back[k].eq(t).all().item<bool>(), Is.True, k);
        }
        Assert.That(meta["format"], Is.EqualTo("pt"));
        Assert.That(meta["note"], Is.EqualTo("ünïcode"));
    }

    [Test]
    public void Writes_TheSpecifiedLayout()
    {
        SafeTensors.Save(_path, new[]
        {
            new KeyValuePair<string, Tensor>("a", tensor(new float[] { 1, 2, 3 })),
            new KeyValuePair<string, Tensor>("b", tensor(new long[] { 7, -1 }, new long[] { 1, 2 })),
        });
        var bytes = File.ReadAllBytes(_path);
        long n = BinaryPrimitives.ReadInt64LittleEndian(bytes);
        Assert.That(n % 8, Is.EqualTo(0), "header padded to 8 bytes");
        Assert.That(bytes.Length, Is.EqualTo(8 + n + 12 + 16));
        using var doc = JsonDocument.Parse(Encoding.UTF8.GetString(bytes, 8, (int)n).TrimEnd(' '));
        var a = doc.RootElement.GetProperty("a");
        Assert.That(a.GetProperty("dtype").GetString(), Is.EqualTo("F32"));
        Assert.That(a.GetProperty("shape").EnumerateArray().Select(e => e.GetInt64()), Is.EqualTo(new long[] { 3 }));
        Assert.That(a.GetProperty("data_offsets").EnumerateArray().Select(e => e.GetInt64()), Is.EqualTo(new long[] { 0, 12 }));
        var b = doc.RootElement.GetProperty("b");
        Assert.That(b.GetProperty("dtype").GetString(), Is.EqualTo("I64"));
        Assert.That(b.GetProperty("data_offsets").EnumerateArray().Select(e => e.GetInt64()), Is.EqualTo(new long[] { 12, 28 }));
        Assert.That(BitConverter.ToSingle(bytes, (int)(8 + n) + 4), Is.EqualTo(2f), "little-endian float32 data");
        Assert.That(BinaryPrimitives.ReadInt64LittleEndian(bytes.AsSpan((int)(8 + n) + 20)), Is.EqualTo(-1L));
    }

    /// <summary>A file assembled by hand as another writer would: unpadded header, metadata first, data out of key order.</summary>
    [Test]
    public void Reads_AHandWrittenFile()
    {
        var header = "{\"__metadata__\":{\"format\":\"pt\"},\"w\":{\"dtype\":\"BF16\",\"shape\":[2],\"data_offsets\":[8,12]}," +
                     "\"h\":{\"dtype\":\"F16\",\"shape\":[2,2],\"data_offsets\":[0,8]}}";
        var hb = Encoding.UTF8.GetBytes(header);
        var data = new byte[12];
        // h = [[1, -2], [0.5, 65504]] in float16: 0x3C00, 0xC000, 0x3800, 0x7BFF; w = [1, -3] in bfloat16: 0x3F80, 0xC040
        ushort[] halves = { 0x3C00, 0xC000, 0x3800, 0x7BFF, 0x3F80, 0xC040 };
        for (int i = 0; i < 6; i++) BinaryPrimitives.WriteUInt16LittleEndian(data.AsSpan(2 * i), halves[i]);
        using (var fs = File.Create(_path))
        {
            var len = new byte[8];
            BinaryPrimitives.WriteInt64LittleEndian(len, hb.Length);
            fs.Write(len); fs.Write(hb); fs.Write(data);
        }
        var (infos, meta) = SafeTensors.ReadHeader(_path);
        Assert.That(infos["w"], Is.EqualTo(new SafeTensorInfo("BF16", new long[] { 2 }, 8, 12)).Using<SafeTensorInfo>((x, y) =>
            x.dtype == y.dtype && x.shape.SequenceEqual(y.shape) && x.begin == y.begin && x.end == y.end));
        Assert.That(meta["format"], Is.EqualTo("pt"));
        var t = SafeTensors.Load(_path);
        Assert.That(t["h"].dtype, Is.EqualTo(ScalarType.Float16));
        Assert.That(t["h"].to(ScalarType.Float32).data<float>().ToArray(), Is.EqualTo(new float[] { 1, -2, 0.5f, 65504 }));
        Assert.That(t["w"].dtype, Is.EqualTo(ScalarType.BFloat16));
        Assert.That(t["w"].to(ScalarType.Float32).data<float>().ToArray(), Is.EqualTo(new float[] { 1, -3 }));
    }

    [Test]
    public void Rejects_MalformedFiles()
    {
        File.WriteAllBytes(_path, new byte[] { 1, 2, 3 });
        Assert.Throws<InvalidDataException>(() => SafeTensors.Load(_path));
        void Write(string header, int dataBytes)
        {
            var hb = Encoding.UTF8.GetBytes(header);
            using var fs = File.Create(_path);
            var len = new byte[8];
            BinaryPrimitives.WriteInt64LittleEndian(len, hb.Length);
            fs.Write(len); fs.Write(hb); fs.Write(new byte[dataBytes]);
        }
        Write("{\"x\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]}}", 8); // truncated data
        Assert.That(Assert.Throws<InvalidDataException>(() => SafeTensors.Load(_path))!.Message, Does.Contain("'x'"));
        Write("{\"x\":{\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[0,16]}}", 16); // size mismatch
        Assert.Throws<InvalidDataException>(() => SafeTensors.Load(_path));
        Write("{\"x\":{\"dtype\":\"C64\",\"shape\":[1],\"data_offsets\":[0,8]}}", 8); // unsupported type
        Assert.That(Assert.Throws<InvalidDataException>(() => SafeTensors.Load(_path))!.Message, Does.Contain("C64"));
        Write("not json", 0);
        Assert.Throws<InvalidDataException>(() => SafeTensors.Load(_path));
        Assert.Throws<ArgumentException>(() => SafeTensors.Save(_path, new[]
        {
            new KeyValuePair<string, Tensor>("a", zeros(1)), new KeyValuePair<string, Tensor>("a", zeros(1)),
        }));
    }
}
