//! Soak test of a running server: mixed OpenAI, KServe and registry traffic
//! above its capacity, with clients that leave mid-stream and malformed or
//! oversized requests, for a fixed time. Meanwhile it probes `/health` every
//! 100 ms and samples the server's resident memory every second. Prints, per
//! request kind, the outcomes and latencies; `/health` under load next to
//! `/health` idle (the anchor, measured first in the same run); and memory.
//!
//! benches/soak.sh (builds a repository, starts the server, runs this)
use benches::{percentile, print_table};
use clap::Parser;
use futures::StreamExt;
use serde_json::json;
use std::collections::BTreeMap;
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    url: String,
    /// The server's process id, for its resident memory.
    #[arg(long)]
    pid: u32,
    #[arg(long, default_value_t = 600)]
    duration_secs: u64,
    /// Clients sending at once (2× the engine's `max_num_seqs` is twice its capacity).
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    #[arg(long, default_value = "smollm2-135m-instruct")]
    model: String,
    /// A repository model taking FP32 `input__0` of shape [rows, 4].
    #[arg(long, default_value = "iris")]
    tensor_model: String,
    /// A key with role viewer, for registry reads.
    #[arg(long)]
    viewer_key: String,
    /// The server's `server.limits.max_body_bytes`, to send one byte more.
    #[arg(long, default_value_t = 16 << 20)]
    max_body_bytes: usize,
    /// Each request's own time limit.
    #[arg(long, default_value_t = 120)]
    timeout_secs: u64,
}

#[derive(Default)]
struct Kind {
    latencies: Vec<f64>,
    statuses: BTreeMap<String, usize>,
}

type Record = Arc<Mutex<BTreeMap<&'static str, Kind>>>;

fn record(r: &Record, kind: &'static str, outcome: String, seconds: f64) {
    let mut g = r.lock().unwrap();
    let k = g.entry(kind).or_default();
    k.latencies.push(seconds);
    *k.statuses.entry(outcome).or_default() += 1;
}

/// A status code, or what ended the request instead.
fn outcome(r: &Result<reqwest::Response, reqwest::Error>) -> String {
    match r {
        Ok(resp) => resp.status().as_u16().to_string(),
        Err(e) if e.is_timeout() => "timeout".into(),
        Err(_) => "error".into(),
    }
}

struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

fn gzip_bomb() -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..512 {
        enc.write_all(&zeros).unwrap();
    }
    enc.finish().unwrap()
}

async fn one(c: &reqwest::Client, a: &Args, rng: &mut Rng, bomb: &[u8], rec: &Record) {
    let started = Instant::now();
    let url = &a.url;
    let pick = rng.below(100);
    let (kind, res): (&'static str, _) = match pick {
        0..=39 => {
            // A streamed chat; a third of the clients leave after a few chunks.
            let leave_after = (rng.below(3) == 0).then(|| 1 + rng.below(6) as usize);
            let body = json!({"model": a.model, "stream": true, "max_tokens": 48,
                "messages": [{"role": "user", "content": format!("Tell me about the number {}.", rng.below(1000))}]});
            let res = c
                .post(format!("{url}/v1/chat/completions"))
                .json(&body)
                .send()
                .await;
            let kind = if leave_after.is_some() {
                "chat stream, client leaves"
            } else {
                "chat stream"
            };
            if let Ok(resp) = res {
                let status = resp.status().as_u16().to_string();
                let mut chunks = resp.bytes_stream();
                let mut n = 0;
                let mut failed = false;
                while let Some(chunk) = chunks.next().await {
                    n += 1;
                    failed |= chunk.is_err();
                    if leave_after.is_some_and(|k| n >= k) {
                        break;
                    }
                }
                let outcome = if failed { "cut".to_string() } else { status };
                record(rec, kind, outcome, started.elapsed().as_secs_f64());
                return;
            }
            (kind, res)
        }
        40..=49 => {
            let body = json!({"model": a.model, "max_tokens": 24,
                "messages": [{"role": "user", "content": "Name a colour."}]});
            let res = c
                .post(format!("{url}/v1/chat/completions"))
                .json(&body)
                .send()
                .await;
            ("chat", res)
        }
        50..=69 => {
            let rows = 1 + rng.below(8) as usize;
            let data: Vec<f32> = (0..rows * 4).map(|i| (i % 7) as f32 * 0.9).collect();
            let body = json!({"inputs": [{"name": "input__0", "datatype": "FP32", "shape": [rows, 4], "data": data}]});
            let res = c
                .post(format!("{url}/v2/models/{}/infer", a.tensor_model))
                .json(&body)
                .send()
                .await;
            ("kserve infer (trees)", res)
        }
        70..=79 => {
            let body =
                json!({"text_input": "Once upon a time", "parameters": {"max_tokens": "16"}});
            let res = c
                .post(format!("{url}/v2/models/{}/generate", a.model))
                .json(&body)
                .send()
                .await;
            ("kserve generate", res)
        }
        80..=84 => {
            let res = c
                .get(format!("{url}/v1/registry/audit?limit=50"))
                .bearer_auth(&a.viewer_key)
                .send()
                .await;
            ("registry read", res)
        }
        _ => {
            let (kind, req) = match rng.below(5) {
                0 => (
                    "bad: invalid JSON",
                    c.post(format!("{url}/v1/chat/completions"))
                        .body("{\"model\": "),
                ),
                1 => (
                    "bad: body over the limit",
                    c.post(format!("{url}/v1/completions"))
                        .body(vec![b'x'; a.max_body_bytes + 1]),
                ),
                2 => (
                    "bad: gzip bomb",
                    c.post(format!("{url}/v2/models/{}/infer", a.tensor_model))
                        .header("content-encoding", "gzip")
                        .body(bomb.to_vec()),
                ),
                3 => (
                    "bad: parameters",
                    c.post(format!("{url}/v2/models/{}/generate", a.model))
                        .json(&json!({"text_input": "x", "parameters": {"max_tokens": u64::MAX, "temperature": -1}})),
                ),
                _ => (
                    "bad: shape",
                    c.post(format!("{url}/v2/models/{}/infer", a.tensor_model))
                        .json(&json!({"inputs": [{"name": "input__0", "datatype": "FP32",
                            "shape": [4611686018427387904u64, 4], "parameters": {"binary_data_size": 0}}]})),
                ),
            };
            (kind, req.send().await)
        }
    };
    let out = outcome(&res);
    // Read the whole answer: the request is over when its body is.
    let out = match res {
        Ok(resp) => match resp.bytes().await {
            Ok(_) => out,
            Err(_) => "cut".into(),
        },
        Err(_) => out,
    };
    record(rec, kind, out, started.elapsed().as_secs_f64());
}

fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
}

/// `/health` every 100 ms until `until`; latencies in seconds (a failure counts as its timeout).
async fn probe_health(c: reqwest::Client, url: String, until: Instant) -> Vec<f64> {
    let mut out = Vec::new();
    while Instant::now() < until {
        let t = Instant::now();
        let ok = c
            .get(format!("{url}/health"))
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success());
        out.push(if ok { t.elapsed().as_secs_f64() } else { 5.0 });
        tokio::time::sleep(Duration::from_millis(100).saturating_sub(t.elapsed())).await;
    }
    out
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = Arc::new(Args::parse());
    let c = reqwest::Client::builder()
        .timeout(Duration::from_secs(a.timeout_secs))
        .build()?;
    let health = reqwest::Client::new();
    println!(
        "soak: {} s at concurrency {} against {} (pid {})",
        a.duration_secs, a.concurrency, a.url, a.pid
    );
    let idle = probe_health(
        health.clone(),
        a.url.clone(),
        Instant::now() + Duration::from_secs(5),
    )
    .await;
    let rss_start = rss_bytes(a.pid).unwrap_or(0);
    let until = Instant::now() + Duration::from_secs(a.duration_secs);
    let rec: Record = Arc::default();
    let bomb = Arc::new(gzip_bomb());
    let mut workers = Vec::new();
    for i in 0..a.concurrency {
        let (c, a, rec, bomb) = (c.clone(), a.clone(), rec.clone(), bomb.clone());
        workers.push(tokio::spawn(async move {
            let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (i as u64 + 1));
            while Instant::now() < until {
                one(&c, &a, &mut rng, &bomb, &rec).await;
            }
        }));
    }
    let rss = tokio::spawn({
        let pid = a.pid;
        async move {
            let mut samples = Vec::new();
            while Instant::now() < until {
                samples.extend(rss_bytes(pid));
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            samples
        }
    });
    let loaded = probe_health(health, a.url.clone(), until).await;
    for w in workers {
        w.await?;
    }
    let rss = rss.await?;
    let rec = rec.lock().unwrap();
    let mut rows = Vec::new();
    let mut over_timeout = 0;
    for (kind, k) in rec.iter() {
        let statuses: Vec<String> = k
            .statuses
            .iter()
            .map(|(s, n)| format!("{s}: {n}"))
            .collect();
        over_timeout += k.statuses.get("timeout").copied().unwrap_or(0);
        rows.push(vec![
            kind.to_string(),
            k.latencies.len().to_string(),
            statuses.join(", "),
            format!("{:.3}", percentile(&k.latencies, 50.0)),
            format!("{:.3}", percentile(&k.latencies, 99.0)),
            format!("{:.3}", k.latencies.iter().copied().fold(0.0, f64::max)),
        ]);
    }
    println!();
    print_table(
        &["request", "count", "outcomes", "p50 s", "p99 s", "max s"],
        &rows,
    );
    println!(
        "\nrequests past their {} s limit: {over_timeout}",
        a.timeout_secs
    );
    let ms = |xs: &[f64], p: f64| percentile(xs, p) * 1000.0;
    println!();
    print_table(
        &["/health", "probes", "p50 ms", "p99 ms", "max ms"],
        &[
            vec![
                "idle (anchor)".into(),
                idle.len().to_string(),
                format!("{:.2}", ms(&idle, 50.0)),
                format!("{:.2}", ms(&idle, 99.0)),
                format!("{:.2}", ms(&idle, 100.0)),
            ],
            vec![
                "under the soak".into(),
                loaded.len().to_string(),
                format!("{:.2}", ms(&loaded, 50.0)),
                format!("{:.2}", ms(&loaded, 99.0)),
                format!("{:.2}", ms(&loaded, 100.0)),
            ],
        ],
    );
    println!(
        "\n/health p99 under the soak ÷ idle: {:.2}",
        ms(&loaded, 99.0) / ms(&idle, 99.0).max(1e-9)
    );
    let mib = |b: u64| format!("{:.0}", b as f64 / (1u64 << 20) as f64);
    println!();
    print_table(
        &["resident memory", "MiB"],
        &[
            vec!["at start".into(), mib(rss_start)],
            vec![
                "largest".into(),
                mib(rss.iter().copied().max().unwrap_or(0)),
            ],
            vec!["at end".into(), mib(rss.last().copied().unwrap_or(0))],
        ],
    );
    Ok(())
}
