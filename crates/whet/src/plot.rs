//! The loss curve: training loss per step and validation loss per evaluation, as SVG.

use std::path::Path;

use anyhow::{Context, Result};
use plotters::prelude::*;

/// `train`: (step, loss) per optimizer step; `validation`: (step, loss) per evaluation.
pub fn loss_curve(
    path: &Path,
    title: &str,
    train: &[(u64, f64)],
    validation: &[(u64, f64)],
) -> Result<()> {
    let finite = |v: &&(u64, f64)| v.1.is_finite();
    let all: Vec<(u64, f64)> = train
        .iter()
        .chain(validation)
        .filter(finite)
        .copied()
        .collect();
    let max_step = all.iter().map(|p| p.0).max().unwrap_or(1).max(1);
    let (lo, hi) = all
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), p| {
            (lo.min(p.1), hi.max(p.1))
        });
    let (lo, hi) = if lo.is_finite() { (lo, hi) } else { (0.0, 1.0) };
    let pad = ((hi - lo) * 0.08).max(1e-3);

    // Drawn into memory, then written atomically like every file whet writes.
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (800, 480)).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 22))
            .margin(16)
            .x_label_area_size(40)
            .y_label_area_size(56)
            .build_cartesian_2d(0u64..max_step, (lo - pad)..(hi + pad))?;
        chart
            .configure_mesh()
            .x_desc("optimizer step")
            .y_desc("loss (nats / supervised token)")
            .draw()?;
        chart
            .draw_series(LineSeries::new(train.iter().filter(finite).copied(), &BLUE))?
            .label("train")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE));
        chart
            .draw_series(LineSeries::new(
                validation.iter().filter(finite).copied(),
                RED.stroke_width(2),
            ))?
            .label("validation")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED));
        chart.draw_series(
            validation
                .iter()
                .filter(finite)
                .map(|&(s, l)| Circle::new((s, l), 4, RED.filled())),
        )?;
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()?;
        root.present()
            .with_context(|| format!("drawing {}", path.display()))?;
    }
    whet_data::atomic::write_file(path, svg.as_bytes(), whet_data::atomic::Existing::Replace)?;
    Ok(())
}
