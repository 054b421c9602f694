using System.Globalization;
using SkiaSharp;

namespace FlashAttn.Models.Training;

/// <summary>The end-of-run PNG: training loss (and validation loss points) over steps on top,
/// learning rate below (SkiaSharp; no system fonts needed beyond Skia's default typeface).</summary>
public static class LossPlot
{
    public static void Write(string path, string title, IReadOnlyList<(long step, double loss)> train, IReadOnlyList<(long step, double loss)> val,
        IReadOnlyList<(long step, double lr)> lr, int width = 1200, int height = 900)
    {
        using var surface = SKSurface.Create(new SKImageInfo(width, height));
        var canvas = surface.Canvas;
        canvas.Clear(SKColors.White);
        using var font = new SKFont(SKTypeface.Default, 16);
        using var titleFont = new SKFont(SKTypeface.Default, 18);
        using var text = new SKPaint { Color = SKColors.Black, IsAntialias = true };
        canvas.DrawText(title, 70, 30, titleFont, text);
        int split = (int)(height * 0.62);
        var lossSeries = new List<(IReadOnlyList<(double x, double y)> pts, SKColor color, bool markers, string label)>
        {
            (train.Select(p => ((double)p.step, p.loss)).ToList(), new SKColor(31, 119, 180), false, "train loss"),
        };
        if (val.Count > 0) lossSeries.Add((val.Select(p => ((double)p.step, p.loss)).ToList(), new SKColor(214, 39, 40), true, "val loss"));
        Panel(canvas, font, new SKRect(70, 50, width - 30, split - 40), "loss", lossSeries);
        Panel(canvas, font, new SKRect(70, split + 10, width - 30, height - 50), "learning rate",
            [(lr.Select(p => ((double)p.step, p.lr)).ToList(), new SKColor(44, 160, 44), false, "lr")]);
        canvas.DrawText("step", width / 2f, height - 12, font, text);
        using var image = surface.Snapshot();
        using var data = image.Encode(SKEncodedImageFormat.Png, 100);
        var tmp = path + ".tmp";
        using (var fs = File.Create(tmp)) data.SaveTo(fs);
        File.Move(tmp, path, overwrite: true);
    }

    static void Panel(SKCanvas canvas, SKFont font, SKRect r, string yLabel, IReadOnlyList<(IReadOnlyList<(double x, double y)> pts, SKColor color, bool markers, string label)> series)
    {
        using var axis = new SKPaint { Color = SKColors.Black, StrokeWidth = 1, IsAntialias = true, Style = SKPaintStyle.Stroke };
        using var grid = new SKPaint { Color = new SKColor(225, 225, 225), StrokeWidth = 1, Style = SKPaintStyle.Stroke };
        using var text = new SKPaint { Color = SKColors.Black, IsAntialias = true };
        var all = series.SelectMany(s => s.pts).Where(p => double.IsFinite(p.y)).ToList();
        canvas.DrawRect(r, axis);
        if (all.Count == 0) return;
        double x0 = all.Min(p => p.x), x1 = all.Max(p => p.x), y0 = all.Min(p => p.y), y1 = all.Max(p => p.y);
        if (x1 == x0) x1 = x0 + 1;
        if (y1 == y0) { y1 += Math.Abs(y1) * 0.05 + 1e-12; y0 -= Math.Abs(y0) * 0.05 + 1e-12; }
        double pad = (y1 - y0) * 0.05; y0 -= pad; y1 += pad;
        float X(double x) => r.Left + (float)((x - x0) / (x1 - x0)) * r.Width;
        float Y(double y) => r.Bottom - (float)((y - y0) / (y1 - y0)) * r.Height;
        for (int i = 0; i <= 5; i++)
        {
            double yv = y0 + (y1 - y0) * i / 5, xv = x0 + (x1 - x0) * i / 5;
            canvas.DrawLine(r.Left, Y(yv), r.Right, Y(yv), grid);
            canvas.DrawLine(X(xv), r.Top, X(xv), r.Bottom, grid);
            var ys = yv.ToString(Math.Abs(y1) < 0.01 ? "0.0e0" : "G4", CultureInfo.InvariantCulture);
            canvas.DrawText(ys, r.Left - 6 - font.MeasureText(ys), Y(yv) + 5, font, text);
            var xs = ((long)Math.Round(xv)).ToString(CultureInfo.InvariantCulture);
            canvas.DrawText(xs, X(xv) - font.MeasureText(xs) / 2, r.Bottom + 18, font, text);
        }
        canvas.DrawRect(r, axis);
        float legendY = r.Top + 20;
        foreach (var (pts, color, markers, label) in series)
        {
            using var pen = new SKPaint { Color = color, StrokeWidth = 2, IsAntialias = true, Style = markers ? SKPaintStyle.Fill : SKPaintStyle.Stroke };
            var valid = pts.Where(p => double.IsFinite(p.y)).ToList();
            if (markers)
                foreach (var p in valid) canvas.DrawCircle(X(p.x), Y(p.y), 4, pen);
            else if (valid.Count > 0)
            {
                using var path = new SKPath();
                path.MoveTo(X(valid[0].x), Y(valid[0].y));
                foreach (var p in valid.Skip(1)) path.LineTo(X(p.x), Y(p.y));
                canvas.DrawPath(path, pen);
            }
            canvas.DrawLine(r.Right - 150, legendY - 5, r.Right - 120, legendY - 5, pen);
            canvas.DrawText(label, r.Right - 112, legendY, font, text);
            legendY += 20;
        }
        canvas.Save();
        canvas.RotateDegrees(-90, r.Left - 55, r.MidY);
        canvas.DrawText(yLabel, r.Left - 55 - font.MeasureText(yLabel) / 2, r.MidY, font, text);
        canvas.Restore();
    }
}
