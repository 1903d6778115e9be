//! Times Switchyard's tree evaluator on one model and batch: rows/s of
//! `Forest::predict` over the same random batch, median of repeats. The
//! `triton_plane.py` bench runs it next to XGBoost's own `inplace_predict`.
use anyhow::{Context, Result};
use clap::Parser;
use engine::dnn::{lightgbm, xgboost};
use std::time::Instant;

#[derive(Parser)]
struct Args {
    /// An XGBoost JSON (`.json`) or LightGBM text (`.txt`) model.
    #[arg(long)]
    model: std::path::PathBuf,
    /// Rows per predict call.
    #[arg(long, default_value_t = 1024)]
    batch: usize,
    /// Row-major f32 features (little-endian), `batch` rows; random when absent.
    #[arg(long)]
    features: Option<std::path::PathBuf>,
    #[arg(long, default_value_t = 200)]
    repeats: usize,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let text =
        std::fs::read_to_string(&args.model).with_context(|| args.model.display().to_string())?;
    let is_json = args.model.extension().is_some_and(|e| e == "json");
    let forest = if is_json {
        xgboost::parse(&text)
    } else {
        lightgbm::parse(&text)
    }
    .map_err(anyhow::Error::msg)?;
    let n = args.batch * forest.num_features;
    let x: Vec<f32> = match &args.features {
        Some(p) => std::fs::read(p)?
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
            .collect(),
        None => (0..n)
            .map(|i| ((i * 7919 % 1000) as f32) / 100.0 - 5.0)
            .collect(),
    };
    anyhow::ensure!(x.len() == n, "features hold {} values, need {n}", x.len());
    let mut times: Vec<f64> = (0..args.repeats)
        .map(|_| {
            let t = Instant::now();
            std::hint::black_box(forest.predict(&x, args.batch));
            t.elapsed().as_secs_f64()
        })
        .collect();
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    println!(
        "{{\"trees\": {}, \"batch\": {}, \"median_s\": {median}, \"rows_per_s\": {}}}",
        forest.num_trees(),
        args.batch,
        args.batch as f64 / median
    );
    Ok(())
}
