package bench

import (
	"fmt"
	"os"
	"sort"

	"gonum.org/v1/plot"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/plotutil"
	"gonum.org/v1/plot/vg"
	"gonum.org/v1/plot/vg/draw"
	"gonum.org/v1/plot/vg/vgimg"
)

// writeChart draws the report as a PNG: the TTFT and end-to-end latency CDFs of each run, and the
// requests each shard served per run.
func writeChart(path string, rep *Report) error {
	ttft, err := cdfPlot(rep, "TTFT CDF", "time to first token (ms)", func(r Result) float64 { return r.TTFTMs })
	if err != nil {
		return err
	}
	e2e, err := cdfPlot(rep, "End-to-end latency CDF", "end-to-end latency (ms)", func(r Result) float64 { return r.E2EMs })
	if err != nil {
		return err
	}
	bars, err := shardBars(rep)
	if err != nil {
		return err
	}
	img := vgimg.New(15*vg.Inch, 4.5*vg.Inch)
	dc := draw.New(img)
	tiles := draw.Tiles{Rows: 1, Cols: 3, PadX: vg.Millimeter * 6, PadTop: vg.Millimeter * 2, PadBottom: vg.Millimeter * 2,
		PadLeft: vg.Millimeter * 2, PadRight: vg.Millimeter * 4}
	plots := [][]*plot.Plot{{ttft, e2e, bars}}
	canvases := plot.Align(plots, tiles, dc)
	for j, p := range plots[0] {
		p.Draw(canvases[0][j])
	}
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	if _, err := (vgimg.PngCanvas{Canvas: img}).WriteTo(f); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

func cdfPlot(rep *Report, title, xlabel string, value func(Result) float64) (*plot.Plot, error) {
	p := plot.New()
	p.Title.Text = title
	p.X.Label.Text = xlabel
	p.Y.Label.Text = "fraction of requests"
	p.Y.Min, p.Y.Max = 0, 1
	p.Legend.Top, p.Legend.Left = false, false
	p.Legend.YPosition = draw.PosBottom
	p.Add(plotter.NewGrid())
	positive := true
	for i, run := range rep.Runs {
		var xs []float64
		for _, r := range run.Results {
			if r.Error == "" {
				xs = append(xs, value(r))
			}
		}
		if len(xs) == 0 {
			continue
		}
		sort.Float64s(xs)
		pts := make(plotter.XYs, len(xs))
		for k, x := range xs {
			pts[k] = plotter.XY{X: x, Y: float64(k+1) / float64(len(xs))}
			positive = positive && x > 0
		}
		l, err := plotter.NewLine(pts)
		if err != nil {
			return nil, err
		}
		l.Color = plotutil.Color(i)
		l.Width = vg.Points(1.5)
		p.Add(l)
		p.Legend.Add(fmt.Sprintf("%s (p50 %.1f ms)", run.Name, quantile(xs, 0.5)), l)
	}
	if positive && p.X.Min > 0 && p.X.Max/p.X.Min > 20 {
		p.X.Scale, p.X.Tick.Marker = plot.LogScale{}, plot.LogTicks{Prec: -1}
	}
	return p, nil
}

func shardBars(rep *Report) (*plot.Plot, error) {
	p := plot.New()
	p.Title.Text = "Requests per shard"
	p.Y.Label.Text = "requests"
	p.Legend.Top = true
	var names []string
	seen := map[string]bool{}
	for _, run := range rep.Runs {
		for _, s := range run.Shards {
			if !seen[s.Shard] {
				seen[s.Shard] = true
				names = append(names, s.Shard)
			}
		}
	}
	sort.Strings(names)
	if len(names) == 0 {
		names = []string{"-"}
	}
	n := len(rep.Runs)
	width := vg.Points(min(40, 240/float64(max(1, n*len(names)))))
	for i, run := range rep.Runs {
		vals := make(plotter.Values, len(names))
		for _, s := range run.Shards {
			vals[sort.SearchStrings(names, s.Shard)] = float64(s.Requests)
		}
		b, err := plotter.NewBarChart(vals, width)
		if err != nil {
			return nil, err
		}
		b.Color = plotutil.Color(i)
		b.LineStyle.Width = 0
		b.Offset = width * vg.Length(float64(i)-float64(n-1)/2)
		p.Add(b)
		p.Legend.Add(run.Name, b)
	}
	p.NominalX(names...)
	p.X.Min, p.X.Max = -0.6, float64(len(names))-0.4
	p.Y.Min, p.Y.Max = 0, p.Y.Max*1.15
	return p, nil
}
