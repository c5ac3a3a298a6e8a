//! The comparison chart (PNG, plotters' bitmap backend): deliveries per second per system on
//! the left, latency p50/p99/p999 per system on the right. Text goes through ab_glyph with a
//! TrueType font read at run time (Debian's fonts-dejavu-core), so no fontconfig is needed.

use std::path::Path;

use anyhow::{Context as _, anyhow};
use plotters::prelude::*;
use plotters::style::{FontStyle, register_font};

use crate::fanout::FanoutResult;
use crate::util;

const FONTS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
];

fn load_font() -> anyhow::Result<()> {
    let path = FONTS
        .iter()
        .find(|p| Path::new(p).exists())
        .context("no DejaVuSans.ttf (Debian: apt-get install fonts-dejavu-core)")?;
    let bytes: &'static [u8] = Box::leak(std::fs::read(path)?.into_boxed_slice());
    register_font("sans-serif", FontStyle::Normal, bytes)
        .map_err(|_| anyhow!("{path} is not a usable font"))?;
    Ok(())
}

pub fn draw(path: &Path, subtitle: &str, results: &[FanoutResult]) -> anyhow::Result<()> {
    load_font()?;
    let root = BitMapBackend::new(path, (1400, 620)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
    let root = root
        .titled(
            "Fan-out: deliveries per second and end-to-end latency",
            ("sans-serif", 26),
        )
        .map_err(|e| anyhow!("{e}"))?;
    let (top, bottom) = root.split_vertically(560);
    bottom
        .draw(&Text::new(
            subtitle.to_owned(),
            (10, 15),
            ("sans-serif", 15),
        ))
        .map_err(|e| anyhow!("{e}"))?;
    let (left, right) = top.split_horizontally(620);
    let n = results.len().max(1) as f64;
    let palette = [
        RGBColor(31, 119, 180),
        RGBColor(255, 127, 14),
        RGBColor(44, 160, 44),
    ];

    // Left: throughput.
    let max = results
        .iter()
        .map(FanoutResult::per_sec)
        .fold(1.0, f64::max)
        * 1.2;
    let mut chart = ChartBuilder::on(&left)
        .caption("deliveries / s", ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(80)
        .build_cartesian_2d(0f64..n, 0f64..max)
        .map_err(|e| anyhow!("{e}"))?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(0)
        .y_label_formatter(&|v| util::int(*v))
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    for (i, r) in results.iter().enumerate() {
        let x = i as f64;
        let v = r.per_sec();
        chart
            .draw_series(std::iter::once(Rectangle::new(
                [(x + 0.15, 0.0), (x + 0.85, v)],
                palette[0].filled(),
            )))
            .map_err(|e| anyhow!("{e}"))?;
        chart
            .draw_series(std::iter::once(Text::new(
                util::int(v),
                (x + 0.2, v + max * 0.02),
                ("sans-serif", 15),
            )))
            .map_err(|e| anyhow!("{e}"))?;
        chart
            .draw_series(std::iter::once(Text::new(
                r.system.clone(),
                (x + 0.2, v + max * 0.08),
                ("sans-serif", 14),
            )))
            .map_err(|e| anyhow!("{e}"))?;
    }

    // Right: latency percentiles.
    let lat: Vec<[f64; 3]> = results
        .iter()
        .map(|r| util::percentiles_ms(&r.latency_us))
        .collect();
    let max = lat.iter().flatten().copied().fold(0.1, f64::max) * 1.2;
    let mut chart = ChartBuilder::on(&right)
        .caption("latency, ms (p50 / p99 / p999)", ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..n, 0f64..max)
        .map_err(|e| anyhow!("{e}"))?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(0)
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    for (j, name) in ["p50", "p99", "p999"].iter().enumerate() {
        let color = palette[j];
        chart
            .draw_series(lat.iter().enumerate().map(|(i, l)| {
                let x = i as f64 + 0.1 + j as f64 * 0.27;
                Rectangle::new([(x, 0.0), (x + 0.24, l[j])], color.filled())
            }))
            .map_err(|e| anyhow!("{e}"))?
            .label(*name)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], color.filled()));
    }
    for (i, r) in results.iter().enumerate() {
        chart
            .draw_series(std::iter::once(Text::new(
                r.system.clone(),
                (i as f64 + 0.1, max * 0.95),
                ("sans-serif", 14),
            )))
            .map_err(|e| anyhow!("{e}"))?;
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .label_font(("sans-serif", 15))
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    root.present().map_err(|e| anyhow!("{e}"))?;
    Ok(())
}
