//! Load generator for any OpenAI-compatible server: N concurrent streaming
//! chat requests with unique prompts and a forced output length; prints output
//! tokens/s, TTFT p50/p95 and mean inter-token latency.
//!
//! cargo run --release -p benches --bin loadgen -- --url http://127.0.0.1:8080 --concurrency 1,4,16
use benches::{percentile, print_table};
use clap::Parser;
use futures::StreamExt;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    url: String,
    #[arg(long, default_value = "smollm2-135m-instruct")]
    model: String,
    /// Comma-separated concurrency levels; each runs `requests_per_level` requests.
    #[arg(long, default_value = "1,4")]
    concurrency: String,
    #[arg(long, default_value_t = 8)]
    requests_per_level: usize,
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// Approximate prompt length in words.
    #[arg(long, default_value_t = 80)]
    prompt_words: usize,
    /// Send vLLM's `ignore_eos` so every answer has `max_tokens` tokens.
    #[arg(long, default_value_t = true)]
    ignore_eos: bool,
}

struct Sample {
    ttft: f64,
    gaps: Vec<f64>,
    tokens: usize,
}

fn prompt(i: usize, words: usize) -> String {
    // A unique opening so no prefix cache can help.
    let filler = "please describe the weather markets rivers and mountains of the region in detail";
    let body: Vec<&str> = filler.split(' ').cycle().take(words).collect();
    format!(
        "Request {i} ({:x}): {}",
        i.wrapping_mul(2654435761),
        body.join(" ")
    )
}

async fn one(client: &reqwest::Client, a: &Args, i: usize) -> anyhow::Result<Sample> {
    let body = json!({
        "model": a.model, "stream": true, "max_tokens": a.max_tokens, "temperature": 0,
        "ignore_eos": a.ignore_eos, "min_tokens": if a.ignore_eos { a.max_tokens } else { 0 },
        "stream_options": {"include_usage": true},
        "messages": [{"role": "user", "content": prompt(i, a.prompt_words)}],
    });
    let start = Instant::now();
    let resp = client
        .post(format!("{}/v1/chat/completions", a.url))
        .json(&body)
        .send()
        .await?
        .error_for_status()?;
    let mut stream = resp.bytes_stream();
    let (mut buf, mut ttft, mut last, mut gaps, mut tokens) =
        (String::new(), None, start, Vec::new(), 0);
    while let Some(chunk) = stream.next().await {
        buf.push_str(&String::from_utf8_lossy(&chunk?));
        while let Some(end) = buf.find("\n\n") {
            let event: String = buf.drain(..end + 2).collect();
            let Some(data) = event.trim().strip_prefix("data: ") else {
                continue;
            };
            if data == "[DONE]" {
                continue;
            }
            let v: Value = serde_json::from_str(data)?;
            if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
                tokens = n as usize;
            }
            let has_text = v["choices"][0]["delta"]["content"]
                .as_str()
                .is_some_and(|s| !s.is_empty());
            if has_text {
                let now = Instant::now();
                match ttft {
                    None => ttft = Some((now - start).as_secs_f64()),
                    Some(_) => gaps.push((now - last).as_secs_f64()),
                }
                last = now;
            }
        }
    }
    Ok(Sample {
        ttft: ttft.unwrap_or(f64::NAN),
        gaps,
        tokens,
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(600))
        .build()?;
    let mut rows = Vec::new();
    let mut next_id = 0;
    for level in a.concurrency.split(',').map(|s| s.trim().parse::<usize>()) {
        let level = level?;
        let ids: Vec<usize> = (next_id..next_id + a.requests_per_level.max(level)).collect();
        next_id += ids.len();
        let start = Instant::now();
        let samples: Vec<Sample> = futures::stream::iter(ids.iter().map(|&i| one(&client, &a, i)))
            .buffer_unordered(level)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect::<anyhow::Result<_>>()?;
        let wall = start.elapsed().as_secs_f64();
        let tokens: usize = samples.iter().map(|s| s.tokens).sum();
        let ttfts: Vec<f64> = samples.iter().map(|s| s.ttft).collect();
        let gaps: Vec<f64> = samples
            .iter()
            .flat_map(|s| s.gaps.iter().copied())
            .collect();
        let itl = gaps.iter().sum::<f64>() / gaps.len().max(1) as f64;
        rows.push(vec![
            level.to_string(),
            samples.len().to_string(),
            format!("{:.1}", tokens as f64 / wall),
            format!("{:.0}", percentile(&ttfts, 50.0) * 1e3),
            format!("{:.0}", percentile(&ttfts, 95.0) * 1e3),
            format!("{:.1}", itl * 1e3),
        ]);
    }
    println!(
        "{} — {} output tokens per request, ~{} prompt words\n",
        a.url, a.max_tokens, a.prompt_words
    );
    print_table(
        &[
            "concurrency",
            "requests",
            "output tok/s",
            "TTFT p50 ms",
            "TTFT p95 ms",
            "mean ITL ms",
        ],
        &rows,
    );
    Ok(())
}
