//! PNG charts of throughput and p99 latency against offered load, drawn with plotters' bitmap
//! backend. Text is rendered from the public-domain 8×8 bitmap font in `font8x8`, so no system
//! font (and no font-loading code path) is needed: the chart looks the same on every machine.

use std::path::Path;

use anyhow::{anyhow, Result};
use plotters::prelude::*;

/// One line on a chart.
#[derive(Clone, Debug)]
pub struct Series {
    /// Legend text.
    pub name: String,
    /// (x, y) points, x ascending.
    pub points: Vec<(f64, f64)>,
}

/// One panel.
#[derive(Clone, Debug)]
pub struct Panel {
    /// Title above the panel.
    pub title: String,
    /// X axis label.
    pub x_label: String,
    /// Y axis label.
    pub y_label: String,
    /// Logarithmic Y axis.
    pub log_y: bool,
    /// Lines.
    pub series: Vec<Series>,
}

const COLORS: [RGBColor; 6] = [
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0x94, 0x67, 0xbd),
    RGBColor(0xff, 0x7f, 0x0e),
    RGBColor(0x55, 0x55, 0x55),
];

type Area<'a> = DrawingArea<BitMapBackend<'a>, plotters::coord::Shift>;

/// Draws `text` with its top-left corner at (x, y), each font pixel `scale` pixels wide.
pub fn text(
    area: &Area<'_>,
    x: i32,
    y: i32,
    text: &str,
    scale: i32,
    color: &RGBColor,
) -> Result<()> {
    let mut cx = x;
    for ch in text.chars() {
        let code = ch as usize;
        let glyph = font8x8::legacy::BASIC_LEGACY
            .get(code)
            .copied()
            .unwrap_or(font8x8::legacy::BASIC_LEGACY[b'?' as usize]);
        for (row, bits) in glyph.iter().enumerate() {
            for col in 0..8 {
                if bits & (1 << col) != 0 {
                    let px = cx + col * scale;
                    let py = y + row as i32 * scale;
                    for dx in 0..scale {
                        for dy in 0..scale {
                            area.draw_pixel((px + dx, py + dy), color)
                                .map_err(|e| anyhow!("draw: {e}"))?;
                        }
                    }
                }
            }
        }
        cx += 8 * scale;
    }
    Ok(())
}

fn text_width(t: &str, scale: i32) -> i32 {
    t.chars().count() as i32 * 8 * scale
}

/// Short human form of an axis value.
pub fn fmt_num(v: f64) -> String {
    let a = v.abs();
    if a == 0.0 {
        "0".into()
    } else if a >= 1e6 {
        format!("{}M", trim(v / 1e6))
    } else if a >= 1e3 {
        format!("{}k", trim(v / 1e3))
    } else {
        trim(v)
    }
}

fn trim(v: f64) -> String {
    let s = if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else if v.abs() >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    };
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

fn nice_step(range: f64, ticks: f64) -> f64 {
    let raw = range / ticks;
    let mag = 10f64.powf(raw.log10().floor());
    let norm = raw / mag;
    let n = if norm < 1.5 {
        1.0
    } else if norm < 3.0 {
        2.0
    } else if norm < 7.0 {
        5.0
    } else {
        10.0
    };
    n * mag
}

fn draw_panel(area: &Area<'_>, p: &Panel) -> Result<()> {
    let (w, h) = area.dim_in_pixel();
    let (w, h) = (w as i32, h as i32);
    let black = RGBColor(0, 0, 0);
    let grey = RGBColor(0xdd, 0xdd, 0xdd);
    let (left, right, top, bottom) = (80, 20, 40, 60);
    let (x0, x1, y0, y1) = (left, w - right, top, h - bottom);
    let ts = if text_width(&p.title, 2) <= w - 10 {
        2
    } else {
        1
    };
    text(
        area,
        ((w - text_width(&p.title, ts)) / 2).max(2),
        8,
        &p.title,
        ts,
        &black,
    )?;

    let pts: Vec<(f64, f64)> = p
        .series
        .iter()
        .flat_map(|s| s.points.iter().copied())
        .filter(|(x, y)| x.is_finite() && y.is_finite() && (!p.log_y || *y > 0.0))
        .collect();
    if pts.is_empty() {
        text(area, x0 + 10, y0 + 10, "no data", 2, &black)?;
        return Ok(());
    }
    let xmax = pts.iter().map(|p| p.0).fold(0.0f64, f64::max).max(1e-9) * 1.05;
    let xmin = 0.0;
    let (ymin, ymax) = if p.log_y {
        let lo = pts.iter().map(|p| p.1).fold(f64::MAX, f64::min);
        let hi = pts.iter().map(|p| p.1).fold(0.0f64, f64::max);
        (
            10f64.powf(lo.log10().floor()),
            10f64.powf(hi.log10().ceil().max(lo.log10().floor() + 1.0)),
        )
    } else {
        (
            0.0,
            pts.iter().map(|p| p.1).fold(0.0f64, f64::max).max(1e-9) * 1.1,
        )
    };
    let fy = |y: f64| -> f64 {
        if p.log_y {
            (y.log10() - ymin.log10()) / (ymax.log10() - ymin.log10())
        } else {
            (y - ymin) / (ymax - ymin)
        }
    };
    let px = |x: f64| x0 + ((x - xmin) / (xmax - xmin) * f64::from(x1 - x0)) as i32;
    let py = |y: f64| y1 - (fy(y) * f64::from(y1 - y0)) as i32;
    let e = |e: DrawingAreaErrorKind<_>| anyhow!("draw: {e}");

    // Grid and tick labels.
    let xs = nice_step(xmax - xmin, 5.0);
    let mut t = 0.0;
    while t <= xmax + 1e-12 {
        let x = px(t);
        area.draw(&PathElement::new(vec![(x, y0), (x, y1)], grey))
            .map_err(e)?;
        let l = fmt_num(t);
        text(area, x - text_width(&l, 1) / 2, y1 + 6, &l, 1, &black)?;
        t += xs;
    }
    if p.log_y {
        let mut d = ymin;
        while d <= ymax * 1.0001 {
            let y = py(d);
            area.draw(&PathElement::new(vec![(x0, y), (x1, y)], grey))
                .map_err(e)?;
            let l = fmt_num(d);
            text(area, x0 - 6 - text_width(&l, 1), y - 4, &l, 1, &black)?;
            d *= 10.0;
        }
    } else {
        let ys = nice_step(ymax - ymin, 5.0);
        let mut d = 0.0;
        while d <= ymax + 1e-12 {
            let y = py(d);
            area.draw(&PathElement::new(vec![(x0, y), (x1, y)], grey))
                .map_err(e)?;
            let l = fmt_num(d);
            text(area, x0 - 6 - text_width(&l, 1), y - 4, &l, 1, &black)?;
            d += ys;
        }
    }
    area.draw(&PathElement::new(vec![(x0, y0), (x0, y1), (x1, y1)], black))
        .map_err(e)?;
    text(
        area,
        (x0 + x1 - text_width(&p.x_label, 1)) / 2,
        y1 + 24,
        &p.x_label,
        1,
        &black,
    )?;
    text(area, 4, y0 - 14, &p.y_label, 1, &black)?;

    // Lines and legend.
    for (i, s) in p.series.iter().enumerate() {
        let c = COLORS[i % COLORS.len()];
        let line: Vec<(i32, i32)> = s
            .points
            .iter()
            .filter(|(x, y)| x.is_finite() && y.is_finite() && (!p.log_y || *y > 0.0))
            .map(|&(x, y)| (px(x), py(y)))
            .collect();
        area.draw(&PathElement::new(line.clone(), c.stroke_width(2)))
            .map_err(e)?;
        for pt in line {
            area.draw(&Circle::new(pt, 3, c.filled())).map_err(e)?;
        }
        let ly = y0 + 6 + 14 * i as i32;
        area.draw(&Rectangle::new(
            [(x0 + 10, ly), (x0 + 24, ly + 8)],
            c.filled(),
        ))
        .map_err(e)?;
        text(area, x0 + 30, ly, &s.name, 1, &black)?;
    }
    Ok(())
}

/// Writes a PNG with the panels side by side.
pub fn write_png(path: &Path, panels: &[Panel]) -> Result<()> {
    let n = panels.len().max(1) as u32;
    let root = BitMapBackend::new(path, (640 * n, 440)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("fill: {e}"))?;
    let areas = root.split_evenly((1, n as usize));
    for (a, p) in areas.iter().zip(panels) {
        draw_panel(a, p)?;
    }
    root.present()
        .map_err(|e| anyhow!("writing {}: {e}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_text_and_lines() {
        let dir = std::env::temp_dir().join(format!("benches-chart-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c.png");
        let s = Series {
            name: "tailnetd".into(),
            points: vec![(0.5, 0.5), (1.0, 1.0), (2.0, 1.8)],
        };
        write_png(
            &path,
            &[
                Panel {
                    title: "Throughput".into(),
                    x_label: "offered Gbit/s".into(),
                    y_label: "Gbit/s".into(),
                    log_y: false,
                    series: vec![s.clone()],
                },
                Panel {
                    title: "p99".into(),
                    x_label: "offered".into(),
                    y_label: "us".into(),
                    log_y: true,
                    series: vec![s],
                },
            ],
        )
        .unwrap();
        let len = std::fs::metadata(&path).unwrap().len();
        assert!(len > 1000, "png is {len} bytes");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn formats_numbers() {
        assert_eq!(fmt_num(0.0), "0");
        assert_eq!(fmt_num(1500.0), "1.5k");
        assert_eq!(fmt_num(0.25), "0.25");
        assert_eq!(fmt_num(2_000_000.0), "2M");
    }
}
