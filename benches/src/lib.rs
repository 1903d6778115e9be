//! Shared helpers of the benchmark programs: timing statistics, tables, and
//! the engine's throughput over a set of requests.
use engine::llm::{GenerationEvent, GenerationRequest, LlmEngine};
use std::path::PathBuf;
use std::time::Instant;

/// What every engine benchmark takes: the model and the run's size.
#[derive(clap::Args)]
pub struct EngineRun {
    /// The GGUF file (`switchyard models fetch` prints the default model's path).
    #[arg(long)]
    pub model: PathBuf,
    /// Tokens per request (at most).
    #[arg(long, default_value_t = 128)]
    pub tokens: usize,
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
}

/// Output tokens per second of `requests`, submitted to `e` at once.
pub fn engine_throughput(e: &LlmEngine, requests: Vec<GenerationRequest>) -> f64 {
    let start = Instant::now();
    let receivers: Vec<_> = requests
        .into_iter()
        .map(|r| e.submit(r).expect("submitting"))
        .collect();
    let mut total = 0;
    for mut rx in receivers {
        while let Some(ev) = rx.blocking_recv() {
            match ev {
                GenerationEvent::Finished {
                    completion_tokens, ..
                } => total += completion_tokens,
                GenerationEvent::Failed(m) => panic!("{m}"),
                GenerationEvent::Delta { .. } => {}
            }
        }
    }
    total as f64 / start.elapsed().as_secs_f64()
}

/// The `p`-th percentile (0–100) of `xs`, by nearest rank; 0 for no samples.
pub fn percentile(xs: &[f64], p: f64) -> f64 {
    if xs.is_empty() {
        return 0.0;
    }
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

pub fn median(xs: &[f64]) -> f64 {
    percentile(xs, 50.0)
}

/// Median seconds of `f` over `calls` calls, after a warm-up.
pub fn time(calls: usize, mut f: impl FnMut()) -> f64 {
    for _ in 0..calls.div_ceil(5) {
        f();
    }
    let samples: Vec<f64> = (0..calls)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .collect();
    median(&samples)
}

/// Prints a Markdown table.
pub fn print_table(header: &[&str], rows: &[Vec<String>]) {
    println!("| {} |", header.join(" | "));
    println!(
        "|{}|",
        header.iter().map(|_| "---").collect::<Vec<_>>().join("|")
    );
    for r in rows {
        println!("| {} |", r.join(" | "));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_by_nearest_rank() {
        let xs: Vec<f64> = (1..=20).map(f64::from).collect();
        assert_eq!(percentile(&xs, 50.0), 10.0);
        assert_eq!(percentile(&xs, 95.0), 19.0);
        assert_eq!(percentile(&xs, 100.0), 20.0);
        assert_eq!(percentile(&[], 50.0), 0.0);
    }
}
