//! Load generator for any OpenAI-compatible server: N concurrent streaming
//! chat requests with unique prompts and a forced output length; prints output
//! tokens/s, TTFT p50/p95 and mean inter-token latency, and with `--anchor` the
//! same for a second server (e.g. llama.cpp's llama-server) with the ratios.
//! `--prefix-words` measures instead what a repeated long system prompt costs
//! once cached, against its cold TTFT.
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
    /// A second server measured the same way, in the same run.
    #[arg(long)]
    anchor: Option<String>,
    /// Instead of the load levels: TTFT of a system prompt of this many words,
    /// cold and then repeated (prefix caching).
    #[arg(long)]
    prefix_words: Option<usize>,
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

fn words(n: usize) -> String {
    let filler = "please describe the weather markets rivers and mountains of the region in detail";
    filler
        .split(' ')
        .cycle()
        .take(n)
        .collect::<Vec<_>>()
        .join(" ")
}

fn prompt(i: usize, n: usize) -> String {
    // A unique opening so no prefix cache can help: unique within a run,
    // and across runs too (a server kept up between two runs would
    // otherwise find the second run's prompts cached from the first).
    static RUN: std::sync::LazyLock<u128> = std::sync::LazyLock::new(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    });
    format!(
        "Request {i} ({:x}-{:x}): {}",
        *RUN,
        i.wrapping_mul(2654435761),
        words(n)
    )
}

/// One streamed request of `messages` to `url`.
async fn one(
    client: &reqwest::Client,
    a: &Args,
    url: &str,
    messages: Value,
    max_tokens: usize,
) -> anyhow::Result<Sample> {
    let mut body = json!({
        "model": a.model, "stream": true, "max_tokens": max_tokens, "temperature": 0,
        "ignore_eos": a.ignore_eos, "min_tokens": if a.ignore_eos { max_tokens } else { 0 },
        "stream_options": {"include_usage": true},
        "messages": messages,
    });
    if a.anchor.as_deref() == Some(url) {
        // llama-server's own field: its prompt cache off. Switchyard refuses
        // fields it does not honour, so only the anchor gets it.
        body["cache_prompt"] = json!(false);
    }
    let start = Instant::now();
    let send = || {
        client
            .post(format!("{url}/v1/chat/completions"))
            .json(&body)
            .send()
    };
    // A server may close a kept-alive connection just as a request goes out:
    // that request is sent once more (its time still counts from the first try).
    let resp = match send().await {
        Err(e) if e.is_request() => send().await?,
        r => r?,
    }
    .error_for_status()?;
    let mut stream = resp.bytes_stream();
    let (mut buf, mut ttft, mut last, mut gaps, mut tokens, mut chunks) =
        (String::new(), None, start, Vec::new(), 0, 0);
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
                chunks += 1;
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
        // Servers that send no usage: one token per content chunk.
        tokens: if tokens > 0 { tokens } else { chunks },
    })
}

/// Output tokens/s and TTFT p50/p95 of one concurrency level.
struct Level {
    concurrency: usize,
    requests: usize,
    tok_s: f64,
    ttft_p50: f64,
    ttft_p95: f64,
    itl: f64,
}

async fn run_levels(client: &reqwest::Client, a: &Args, url: &str) -> anyhow::Result<Vec<Level>> {
    let mut levels = Vec::new();
    let mut next_id = 0;
    for level in a.concurrency.split(',').map(|s| s.trim().parse::<usize>()) {
        let level = level?;
        let ids: Vec<usize> = (next_id..next_id + a.requests_per_level.max(level)).collect();
        next_id += ids.len();
        let start = Instant::now();
        let requests = ids.iter().map(|&i| {
            let messages = json!([{"role": "user", "content": prompt(i, a.prompt_words)}]);
            one(client, a, url, messages, a.max_tokens)
        });
        let samples: Vec<Sample> = futures::stream::iter(requests)
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
        levels.push(Level {
            concurrency: level,
            requests: samples.len(),
            tok_s: tokens as f64 / wall,
            ttft_p50: percentile(&ttfts, 50.0),
            ttft_p95: percentile(&ttfts, 95.0),
            itl: gaps.iter().sum::<f64>() / gaps.len().max(1) as f64,
        });
    }
    Ok(levels)
}

fn print_levels(url: &str, levels: &[Level]) {
    println!("\n{url}\n");
    let rows: Vec<Vec<String>> = levels
        .iter()
        .map(|l| {
            vec![
                l.concurrency.to_string(),
                l.requests.to_string(),
                format!("{:.1}", l.tok_s),
                format!("{:.0}", l.ttft_p50 * 1e3),
                format!("{:.0}", l.ttft_p95 * 1e3),
                format!("{:.1}", l.itl * 1e3),
            ]
        })
        .collect();
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
}

/// Cold TTFT of a long system prompt, then the median TTFT of five requests
/// repeating it with other questions.
async fn prefix(client: &reqwest::Client, a: &Args, url: &str, n: usize) -> anyhow::Result<()> {
    let system = format!("Session {:x}. {}", std::process::id(), words(n));
    let ask = |q: usize| {
        let messages = json!([
            {"role": "system", "content": system},
            {"role": "user", "content": format!("Question {q}: what is the weather?")},
        ]);
        one(client, a, url, messages, 1)
    };
    let cold = ask(0).await?.ttft;
    let mut warm = Vec::new();
    for q in 1..=5 {
        warm.push(ask(q).await?.ttft);
    }
    let warm = percentile(&warm, 50.0);
    println!("\n{url}: system prompt of {n} words\n");
    print_table(
        &[
            "cold TTFT ms",
            "cached TTFT ms (median of 5)",
            "cached ÷ cold",
        ],
        &[vec![
            format!("{:.0}", cold * 1e3),
            format!("{:.0}", warm * 1e3),
            format!("{:.3}", warm / cold),
        ]],
    );
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(600))
        .build()?;
    println!(
        "{} output tokens per request, ~{} prompt words",
        a.max_tokens, a.prompt_words
    );
    if let Some(n) = a.prefix_words {
        return prefix(&client, &a, &a.url, n).await;
    }
    let ours = run_levels(&client, &a, &a.url).await?;
    print_levels(&a.url, &ours);
    let Some(anchor) = &a.anchor else {
        return Ok(());
    };
    let theirs = run_levels(&client, &a, anchor).await?;
    print_levels(anchor, &theirs);
    println!("\nratios ({} ÷ {anchor})\n", a.url);
    let rows: Vec<Vec<String>> = ours
        .iter()
        .zip(&theirs)
        .map(|(o, t)| {
            vec![
                o.concurrency.to_string(),
                format!("{:.2}", o.tok_s / t.tok_s),
                format!("{:.2}", o.ttft_p50 / t.ttft_p50),
            ]
        })
        .collect();
    print_table(&["concurrency", "output tok/s", "TTFT p50"], &rows);
    Ok(())
}
