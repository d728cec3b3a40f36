//! PNG plots for people (JSON is for scripts).
//!
//! plotters draws text with `ab_glyph` from font bytes registered at run time; the crate ships
//! DejaVu Sans Mono (`assets/`, Bitstream Vera licence) so that a fresh machine without
//! fontconfig or system fonts can still label its axes.

use std::path::Path;
use std::sync::Once;

use plotters::prelude::*;
use plotters::style::FontStyle;

use crate::error::{MetricsError, Result};
use crate::reconstruction::DensityHistogram;

const FONT_BYTES: &[u8] = include_bytes!("../assets/DejaVuSansMono.ttf");
const FONT: &str = "sans-serif";
static REGISTER: Once = Once::new();

/// Series colours, in order of use.
const PALETTE: [RGBColor; 8] = [
    RGBColor(66, 114, 196),
    RGBColor(214, 96, 39),
    RGBColor(60, 150, 80),
    RGBColor(150, 70, 160),
    RGBColor(120, 120, 120),
    RGBColor(190, 160, 30),
    RGBColor(40, 170, 190),
    RGBColor(200, 60, 120),
];

fn register_font() {
    REGISTER.call_once(|| {
        // The bytes are a valid TTF shipped with the crate; a failure here would be a packaging
        // bug caught by the tests, and text then falls back to not being drawn.
        if plotters::style::register_font(FONT, FontStyle::Normal, FONT_BYTES).is_err() {
            tracing::error!("the bundled DejaVu Sans Mono font could not be parsed");
        }
    });
}

fn plot_err(path: &Path) -> impl Fn(String) -> MetricsError + '_ {
    move |reason| MetricsError::Plot {
        path: path.to_path_buf(),
        reason,
    }
}

/// A bar chart of pre-binned counts: `bin_edges.len() == counts.len() + 1`.
///
/// # Errors
/// `InvalidArgument` for inconsistent bins; `Plot` if drawing or writing the PNG fails.
pub fn plot_histogram(
    bin_edges: &[f64],
    counts: &[u64],
    title: &str,
    x_label: &str,
    y_label: &str,
    path: &Path,
) -> Result<()> {
    if counts.is_empty() || bin_edges.len() != counts.len() + 1 {
        return Err(MetricsError::InvalidArgument {
            what: "histogram bins".into(),
            reason: format!(
                "need n + 1 edges for n > 0 counts, got {} edges and {} counts",
                bin_edges.len(),
                counts.len()
            ),
        });
    }
    if bin_edges.iter().any(|e| !e.is_finite()) {
        return Err(MetricsError::InvalidArgument {
            what: "histogram bin edges".into(),
            reason: "every edge must be finite".into(),
        });
    }
    register_font();
    let e = plot_err(path);
    let root = BitMapBackend::new(path, (800, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(x.to_string()))?;
    let x0 = bin_edges[0];
    let x1 = bin_edges[bin_edges.len() - 1];
    let ymax = counts.iter().copied().max().unwrap_or(1).max(1) as f64 * 1.08;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, (FONT, 20))
        .margin(12)
        .x_label_area_size(44)
        .y_label_area_size(64)
        .build_cartesian_2d(x0..x1, 0.0..ymax)
        .map_err(|x| e(x.to_string()))?;
    chart
        .configure_mesh()
        .x_desc(x_label)
        .y_desc(y_label)
        .label_style((FONT, 14))
        .axis_desc_style((FONT, 15))
        .draw()
        .map_err(|x| e(x.to_string()))?;
    let bars = counts.iter().enumerate().map(|(i, &c)| {
        Rectangle::new(
            [(bin_edges[i], 0.0), (bin_edges[i + 1], c as f64)],
            RGBColor(66, 114, 196).filled(),
        )
    });
    chart.draw_series(bars).map_err(|x| e(x.to_string()))?;
    root.present().map_err(|x| e(x.to_string()))?;
    Ok(())
}

/// The feature-density histogram (log10 firing rate), with the dead-feature count in the title
/// because log10(0) has no bin.
///
/// # Errors
/// As [`plot_histogram`].
pub fn plot_density_histogram(hist: &DensityHistogram, title: &str, path: &Path) -> Result<()> {
    let n_features = hist.counts.iter().sum::<u64>() + hist.n_dead;
    let title = format!(
        "{title} ({} of {n_features} dead over {} tokens)",
        hist.n_dead, hist.n_tokens
    );
    plot_histogram(
        &hist.bin_edges,
        &hist.counts,
        &title,
        "log10 firing rate",
        "features",
        path,
    )
}

/// Bars of named values (e.g. NLL per splicing condition), each labelled with its value.
///
/// # Errors
/// `InvalidArgument` if empty or not finite; `Plot` if drawing fails.
pub fn plot_bars(items: &[(&str, f64)], title: &str, y_label: &str, path: &Path) -> Result<()> {
    if items.is_empty() {
        return Err(MetricsError::InvalidArgument {
            what: "bar chart".into(),
            reason: "no bars to draw".into(),
        });
    }
    if let Some((name, v)) = items.iter().find(|(_, v)| !v.is_finite()) {
        return Err(MetricsError::NonFinite {
            what: format!("bar `{name}`"),
            value: *v,
        });
    }
    register_font();
    let e = plot_err(path);
    let root = BitMapBackend::new(path, (800, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(x.to_string()))?;
    let ymax = items.iter().map(|(_, v)| *v).fold(0.0, f64::max) * 1.15;
    let ymin = items.iter().map(|(_, v)| *v).fold(0.0, f64::min) * 1.15;
    let ymax = if ymax <= ymin { ymin + 1.0 } else { ymax };
    let n = items.len();
    let labels: Vec<String> = items.iter().map(|(s, _)| s.to_string()).collect();
    let mut chart = ChartBuilder::on(&root)
        .caption(title, (FONT, 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(64)
        .build_cartesian_2d((0..n).into_segmented(), ymin..ymax)
        .map_err(|x| e(x.to_string()))?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .y_desc(y_label)
        .label_style((FONT, 14))
        .axis_desc_style((FONT, 15))
        .x_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) => labels.get(*i).cloned().unwrap_or_default(),
            _ => String::new(),
        })
        .draw()
        .map_err(|x| e(x.to_string()))?;
    chart
        .draw_series(items.iter().enumerate().map(|(i, (_, v))| {
            let mut bar = Rectangle::new(
                [
                    (SegmentValue::Exact(i), 0.0),
                    (SegmentValue::Exact(i + 1), *v),
                ],
                RGBColor(66, 114, 196).filled(),
            );
            bar.set_margin(0, 0, 12, 12);
            bar
        }))
        .map_err(|x| e(x.to_string()))?;
    chart
        .draw_series(items.iter().enumerate().map(|(i, (_, v))| {
            Text::new(
                format!("{v:.4}"),
                (SegmentValue::CenterOf(i), *v),
                (FONT, 14).into_font(),
            )
        }))
        .map_err(|x| e(x.to_string()))?;
    root.present().map_err(|x| e(x.to_string()))?;
    Ok(())
}

/// One line of [`plot_lines`]: points `(x, y, low, high)`, the interval drawn as an error bar.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64, f64, f64)>,
}

/// Lines with error bars against a numeric x axis (a dose-response curve: share of responses on a
/// topic against the clamp value, with bootstrap intervals), on a symmetric-log x axis when
/// `log_x` (so that 0 can sit beside 1, 10 and 20).
///
/// # Errors
/// `InvalidArgument` if there is no point or one is not finite; `Plot` if drawing fails.
pub fn plot_lines(
    series: &[Series],
    title: &str,
    x_label: &str,
    y_label: &str,
    log_x: bool,
    path: &Path,
) -> Result<()> {
    let all: Vec<(f64, f64, f64, f64)> = series.iter().flat_map(|s| s.points.clone()).collect();
    if all.is_empty() {
        return Err(MetricsError::InvalidArgument {
            what: "line plot".into(),
            reason: "no points to draw".into(),
        });
    }
    if let Some(p) = all
        .iter()
        .find(|p| ![p.0, p.1, p.2, p.3].iter().all(|v| v.is_finite()))
    {
        return Err(MetricsError::NonFinite {
            what: format!("plot point {p:?}"),
            value: f64::NAN,
        });
    }
    let fx = |x: f64| {
        if log_x {
            x.signum() * (1.0 + x.abs()).ln()
        } else {
            x
        }
    };
    let xs: Vec<f64> = all.iter().map(|p| fx(p.0)).collect();
    let (xmin, xmax) = xs
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), &x| (a.min(x), b.max(x)));
    let pad = ((xmax - xmin) * 0.05).max(0.05);
    let ymin = all.iter().map(|p| p.2.min(p.1)).fold(f64::MAX, f64::min);
    let ymax = all.iter().map(|p| p.3.max(p.1)).fold(f64::MIN, f64::max);
    let ypad = ((ymax - ymin) * 0.08).max(1e-3);
    register_font();
    let e = plot_err(path);
    let root = BitMapBackend::new(path, (860, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(x.to_string()))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, (FONT, 20))
        .margin(14)
        .x_label_area_size(44)
        .y_label_area_size(64)
        .build_cartesian_2d(xmin - pad..xmax + pad, ymin - ypad..ymax + ypad)
        .map_err(|x| e(x.to_string()))?;
    let inv = |v: f64| {
        if log_x {
            v.signum() * (v.abs().exp() - 1.0)
        } else {
            v
        }
    };
    let short = |v: f64| {
        format!("{v:.3}")
            .trim_end_matches('0')
            .trim_end_matches('.')
            .to_string()
    };
    // On the log axis, ticks at round positions of the transformed axis read as 0.649, 1.718...:
    // label the measured x values instead.
    chart
        .configure_mesh()
        .x_desc(x_label)
        .y_desc(y_label)
        .label_style((FONT, 14))
        .axis_desc_style((FONT, 15))
        .x_labels(if log_x { 0 } else { 10 })
        .x_label_formatter(&|v| short(inv(*v)))
        .draw()
        .map_err(|x| e(x.to_string()))?;
    if log_x {
        let mut ticks: Vec<f64> = all.iter().map(|p| p.0).collect();
        ticks.sort_by(f64::total_cmp);
        ticks.dedup();
        for t in ticks {
            let (px, py) = chart.backend_coord(&(fx(t), ymin - ypad));
            root.draw(&Text::new(
                short(t),
                (px - 4 * short(t).len() as i32, py + 6),
                (FONT, 14),
            ))
            .map_err(|x| e(x.to_string()))?;
        }
    }
    for (i, s) in series.iter().enumerate() {
        let c = PALETTE[i % PALETTE.len()];
        let pts: Vec<(f64, f64)> = s.points.iter().map(|p| (fx(p.0), p.1)).collect();
        chart
            .draw_series(LineSeries::new(pts.clone(), c.stroke_width(2)))
            .map_err(|x| e(x.to_string()))?
            .label(s.name.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2)));
        chart
            .draw_series(
                s.points
                    .iter()
                    .map(|p| ErrorBar::new_vertical(fx(p.0), p.2, p.1, p.3, c.filled(), 8)),
            )
            .map_err(|x| e(x.to_string()))?;
        chart
            .draw_series(pts.iter().map(|&(x, y)| Circle::new((x, y), 4, c.filled())))
            .map_err(|x| e(x.to_string()))?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font((FONT, 14))
        .draw()
        .map_err(|x| e(x.to_string()))?;
    root.present().map_err(|x| e(x.to_string()))?;
    Ok(())
}

/// How a [`Scatter`] series is drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mark {
    /// One dot per point (measurements).
    Dots,
    /// A line through the points in order (a fitted law).
    Line,
}

/// A named set of points for [`plot_scatter`].
#[derive(Debug, Clone, PartialEq)]
pub struct Scatter {
    pub name: String,
    pub points: Vec<(f64, f64)>,
    pub mark: Mark,
}

/// Points and lines on axes that are logarithmic where asked (the scaling-law plots: loss
/// against compute, optimal size against compute). Log axes are drawn in log10 units and
/// labelled with the values.
///
/// # Errors
/// `InvalidArgument` if there is no point, or a point is not finite (or not positive on a log
/// axis); `Plot` if drawing fails.
pub fn plot_scatter(
    series: &[Scatter],
    title: &str,
    x_label: &str,
    y_label: &str,
    (log_x, log_y): (bool, bool),
    path: &Path,
) -> Result<()> {
    let t = |v: f64, log: bool| if log { v.log10() } else { v };
    let mut all = Vec::new();
    for s in series {
        for &(x, y) in &s.points {
            let (u, v) = (t(x, log_x), t(y, log_y));
            if !(u.is_finite() && v.is_finite()) {
                return Err(MetricsError::InvalidArgument {
                    what: format!("plot point ({x}, {y}) of `{}`", s.name),
                    reason: "not finite, or not positive on a log axis".into(),
                });
            }
            all.push((u, v));
        }
    }
    if all.is_empty() {
        return Err(MetricsError::InvalidArgument {
            what: "scatter plot".into(),
            reason: "no points to draw".into(),
        });
    }
    let span = |f: fn(&(f64, f64)) -> f64| {
        let (lo, hi) = all
            .iter()
            .map(f)
            .fold((f64::MAX, f64::MIN), |(a, b), v| (a.min(v), b.max(v)));
        let pad = ((hi - lo) * 0.06).max(1e-3);
        (lo - pad)..(hi + pad)
    };
    let (xr, yr) = (span(|p| p.0), span(|p| p.1));
    register_font();
    let e = plot_err(path);
    let root = BitMapBackend::new(path, (860, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(x.to_string()))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, (FONT, 20))
        .margin(14)
        .x_label_area_size(44)
        .y_label_area_size(72)
        .build_cartesian_2d(xr, yr)
        .map_err(|x| e(x.to_string()))?;
    let label = |v: f64, log: bool| {
        let v = if log { 10f64.powf(v) } else { v };
        let a = v.abs();
        if a != 0.0 && !(1e-2..1e4).contains(&a) {
            format!("{v:.1e}")
        } else {
            format!("{v:.3}")
                .trim_end_matches('0')
                .trim_end_matches('.')
                .to_string()
        }
    };
    chart
        .configure_mesh()
        .x_desc(x_label)
        .y_desc(y_label)
        .label_style((FONT, 13))
        .axis_desc_style((FONT, 15))
        .x_label_formatter(&|v| label(*v, log_x))
        .y_label_formatter(&|v| label(*v, log_y))
        .draw()
        .map_err(|x| e(x.to_string()))?;
    for (i, s) in series.iter().enumerate() {
        let c = PALETTE[i % PALETTE.len()];
        let pts: Vec<(f64, f64)> = s
            .points
            .iter()
            .map(|&(x, y)| (t(x, log_x), t(y, log_y)))
            .collect();
        match s.mark {
            Mark::Dots => chart
                .draw_series(pts.iter().map(|&p| Circle::new(p, 4, c.filled())))
                .map_err(|x| e(x.to_string()))?
                .label(s.name.clone())
                .legend(move |(x, y)| Circle::new((x + 9, y), 4, c.filled())),
            Mark::Line => chart
                .draw_series(LineSeries::new(pts, c.stroke_width(2)))
                .map_err(|x| e(x.to_string()))?
                .label(s.name.clone())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2))
                }),
        };
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font((FONT, 13))
        .draw()
        .map_err(|x| e(x.to_string()))?;
    root.present().map_err(|x| e(x.to_string()))?;
    Ok(())
}

/// A grid of numbers as coloured cells with their values written in (a transfer matrix: one row
/// per SAE, one column per model and text). Colours run from red at `range.0` to green at
/// `range.1`; NaN cells are grey.
///
/// # Errors
/// `InvalidArgument` if the grid is empty or ragged, or the labels do not match it; `Plot` if
/// drawing fails.
pub fn plot_heatmap(
    values: &[Vec<f64>],
    row_labels: &[String],
    col_labels: &[String],
    title: &str,
    range: (f64, f64),
    path: &Path,
) -> Result<()> {
    let (rows, cols) = (values.len(), values.first().map_or(0, Vec::len));
    if rows == 0 || cols == 0 || values.iter().any(|r| r.len() != cols) {
        return Err(MetricsError::InvalidArgument {
            what: "heatmap".into(),
            reason: "needs a non-empty rectangular grid".into(),
        });
    }
    if row_labels.len() != rows || col_labels.len() != cols {
        return Err(MetricsError::InvalidArgument {
            what: "heatmap".into(),
            reason: format!(
                "{} row and {} column labels for a {rows} x {cols} grid",
                row_labels.len(),
                col_labels.len()
            ),
        });
    }
    register_font();
    let e = plot_err(path);
    let (cell_w, cell_h, left, top) = (150u32, 40u32, 260u32, 90u32);
    let size = (
        left + cell_w * cols as u32 + 20,
        top + cell_h * rows as u32 + 20,
    );
    let root = BitMapBackend::new(path, size).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(x.to_string()))?;
    let text = |s: &str, x: i32, y: i32, px: u32| {
        root.draw(&Text::new(s.to_string(), (x, y), (FONT, px).into_font()))
            .map_err(|x| e(x.to_string()))
    };
    text(title, 10, 10, 20)?;
    let span = (range.1 - range.0).max(1e-12);
    for (j, c) in col_labels.iter().enumerate() {
        text(
            c,
            (left + cell_w * j as u32 + 6) as i32,
            (top - 28) as i32,
            14,
        )?;
    }
    for (i, row) in values.iter().enumerate() {
        let y0 = (top + cell_h * i as u32) as i32;
        text(&row_labels[i], 10, y0 + 12, 14)?;
        for (j, &v) in row.iter().enumerate() {
            let x0 = (left + cell_w * j as u32) as i32;
            let color = if v.is_finite() {
                let t = ((v - range.0) / span).clamp(0.0, 1.0);
                RGBColor(
                    (230.0 - 150.0 * t) as u8,
                    (90.0 + 120.0 * t) as u8,
                    (80.0 + 20.0 * t) as u8,
                )
            } else {
                RGBColor(200, 200, 200)
            };
            root.draw(&Rectangle::new(
                [(x0, y0), (x0 + cell_w as i32 - 2, y0 + cell_h as i32 - 2)],
                color.filled(),
            ))
            .map_err(|x| e(x.to_string()))?;
            let label = if v.is_finite() {
                format!("{v:.3}")
            } else {
                "n/a".into()
            };
            text(&label, x0 + 45, y0 + 12, 15)?;
        }
    }
    root.present().map_err(|x| e(x.to_string()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bundled_font_parses() {
        assert!(plotters::style::register_font("test-font", FontStyle::Normal, FONT_BYTES).is_ok());
    }

    #[test]
    fn writes_png_files() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("h.png");
        let hist = DensityHistogram {
            bin_edges: vec![-3.0, -2.0, -1.0, 0.0],
            counts: vec![3, 10, 2],
            n_dead: 1,
            n_tokens: 1000,
        };
        plot_density_histogram(&hist, "density", &p).unwrap();
        let bytes = std::fs::read(&p).unwrap();
        assert_eq!(&bytes[1..4], b"PNG");
        let p2 = dir.path().join("b.png");
        plot_bars(&[("clean", 3.3), ("spliced", 3.6)], "NLL", "nats", &p2).unwrap();
        assert_eq!(&std::fs::read(&p2).unwrap()[1..4], b"PNG");
        assert!(plot_histogram(&[0.0], &[1], "x", "x", "y", &p).is_err());
        let p3 = dir.path().join("l.png");
        let s = Series {
            name: "topic share".into(),
            points: vec![(0.0, 0.1, 0.0, 0.2), (10.0, 0.6, 0.4, 0.8)],
        };
        plot_lines(&[s], "dose", "clamp", "share", true, &p3).unwrap();
        assert_eq!(&std::fs::read(&p3).unwrap()[1..4], b"PNG");
        let nan = Series {
            name: "bad".into(),
            points: vec![(0.0, f64::NAN, 0.0, 1.0)],
        };
        assert!(plot_lines(&[nan], "dose", "clamp", "share", false, &p3).is_err());
        assert!(plot_lines(&[], "dose", "clamp", "share", false, &p3).is_err());
        let p4 = dir.path().join("s.png");
        let runs = Scatter {
            name: "runs".into(),
            points: vec![(1e9, 0.3), (1e10, 0.2), (1e11, 0.15)],
            mark: Mark::Dots,
        };
        let fit = Scatter {
            name: "fit".into(),
            points: vec![(1e9, 0.31), (1e11, 0.14)],
            mark: Mark::Line,
        };
        plot_scatter(&[runs.clone(), fit], "L(C)", "C", "FVU", (true, true), &p4).unwrap();
        assert_eq!(&std::fs::read(&p4).unwrap()[1..4], b"PNG");
        let zero = Scatter {
            points: vec![(0.0, 1.0)],
            ..runs
        };
        assert!(plot_scatter(&[zero], "x", "x", "y", (true, false), &p4).is_err());
        assert!(plot_scatter(&[], "x", "x", "y", (false, false), &p4).is_err());
    }
}
