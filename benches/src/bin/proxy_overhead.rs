//! Gateway overhead: one instant upstream (a canned OpenAI answer) reached
//! directly, through nginx as a plain reverse proxy, and through Switchyard's
//! remote-upstream route, in the same run. Prints requests/s and p50/p99 for
//! each, the latency each proxy adds over the direct path, the CPU time each
//! proxy spends per request (from `/proc`: steadier than throughput on a
//! shared machine), and Switchyard's throughput ÷ nginx's.
//!
//! `cargo build --release -p benches -p gateway && ./target/release/proxy_overhead`
use anyhow::{bail, Context, Result};
use benches::{percentile, print_table};
use clap::Parser;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Parser)]
struct Args {
    /// The `switchyard` binary.
    #[arg(long, default_value = "target/release/switchyard")]
    switchyard: PathBuf,
    #[arg(long, default_value = "nginx")]
    nginx: String,
    /// Concurrent connections, comma-separated.
    #[arg(long, default_value = "1,8,32")]
    concurrency: String,
    /// Seconds of load per target and level.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Run only the instant upstream on this port (used by the benchmark itself).
    #[arg(long, hide = true)]
    upstream_only: Option<u16>,
}

const ANSWER: &str = r#"{"id":"chatcmpl-0","object":"chat.completion","created":0,"model":"fast","choices":[{"index":0,"message":{"role":"assistant","content":"ok"},"finish_reason":"stop"}],"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}"#;
const REQUEST: &str =
    r#"{"model":"fast","messages":[{"role":"user","content":"hi"}],"max_tokens":1}"#;

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The instant upstream: answers every POST with `ANSWER`, `/health` with 200.
async fn serve_upstream(port: u16) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    loop {
        let (mut sock, _) = listener.accept().await?;
        tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut buf = vec![0u8; 64 * 1024];
            let mut have = 0;
            loop {
                // Read one request: headers, then Content-Length bytes of body.
                let n = match sock.read(&mut buf[have..]).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                have += n;
                while let Some(end) = find(&buf[..have], b"\r\n\r\n") {
                    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                    let len = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .and_then(|v| v.trim().parse::<usize>().ok())
                        .unwrap_or(0);
                    if have < end + 4 + len {
                        break;
                    }
                    let body = if head.starts_with("get") {
                        "ok"
                    } else {
                        ANSWER
                    };
                    let resp = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    if sock.write_all(resp.as_bytes()).await.is_err() {
                        return;
                    }
                    buf.copy_within(end + 4 + len..have, 0);
                    have -= end + 4 + len;
                }
            }
        });
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn wait_for(port: u16, what: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) {
            let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
            let _ = s.write_all(b"GET /health HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
            let mut first = [0u8; 12];
            if s.read_exact(&mut first).is_ok() && &first == b"HTTP/1.1 200" {
                return Ok(());
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("{what} on port {port} did not answer /health within 60 s")
}

/// CPU seconds (user and system) used so far by process `pid` and its
/// running children (nginx's workers).
fn cpu_seconds(pid: u32, tick: f64) -> Result<f64> {
    let mut total = 0.0;
    for entry in std::fs::read_dir("/proc")? {
        let Ok(text) = std::fs::read_to_string(entry?.path().join("stat")) else {
            continue;
        };
        let id = text.split(' ').next().and_then(|f| f.parse::<u32>().ok());
        // Fields after the command's name, which may hold spaces: state,
        // ppid, …, utime and stime are the 12th and 13th.
        let Some((_, rest)) = text.rsplit_once(") ") else {
            continue;
        };
        let f: Vec<&str> = rest.split(' ').collect();
        if f.len() < 13 || (id != Some(pid) && f[1] != pid.to_string()) {
            continue;
        }
        let ticks: f64 = f[11].parse::<f64>()? + f[12].parse::<f64>()?;
        total += ticks / tick;
    }
    Ok(total)
}

/// The kernel's clock ticks per second, as `/proc` counts CPU time.
fn clock_ticks() -> Result<f64> {
    let out = Command::new("getconf").arg("CLK_TCK").output()?;
    Ok(String::from_utf8(out.stdout)?.trim().parse()?)
}

struct Killed(Child);

impl Drop for Killed {
    /// SIGTERM first, so that nginx's master takes its workers down with it.
    fn drop(&mut self) {
        let term = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while term.is_ok() && Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Closed-loop load: `c` clients, each sending the next request as soon as
/// the last one is answered. Returns (requests/s, latencies in µs).
async fn load(url: &str, c: usize, seconds: f64) -> Result<(f64, Vec<f64>)> {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(c)
        .build()?;
    let until = Instant::now() + Duration::from_secs_f64(seconds);
    let started = Instant::now();
    let tasks: Vec<_> = (0..c)
        .map(|_| {
            let (client, url) = (client.clone(), url.to_string());
            tokio::spawn(async move {
                let mut lat = Vec::new();
                while Instant::now() < until {
                    let t = Instant::now();
                    let r = client
                        .post(&url)
                        .header("content-type", "application/json")
                        .body(REQUEST)
                        .send()
                        .await?;
                    if !r.status().is_success() {
                        bail!("{url} answered {}", r.status());
                    }
                    r.bytes().await?;
                    lat.push(t.elapsed().as_secs_f64() * 1e6);
                }
                Ok(lat)
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await??);
    }
    Ok((all.len() as f64 / started.elapsed().as_secs_f64(), all))
}

fn main() -> Result<()> {
    let args = Args::parse();
    if let Some(port) = args.upstream_only {
        return tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(serve_upstream(port));
    }
    let dir = std::env::temp_dir().join(format!("proxy-overhead-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let (up, ngx, sy) = (free_port()?, free_port()?, free_port()?);

    let me = std::env::current_exe()?;
    let _upstream = Killed(
        Command::new(me)
            .args(["--upstream-only", &up.to_string()])
            .spawn()?,
    );
    wait_for(up, "the instant upstream")?;

    let d = dir.display();
    std::fs::write(
        dir.join("nginx.conf"),
        format!(
            "worker_processes auto; daemon off; pid {d}/nginx.pid; error_log {d}/nginx.err;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {d}/body; proxy_temp_path {d}/proxy;
  fastcgi_temp_path {d}/fcgi; uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;
  upstream fast {{ server 127.0.0.1:{up}; keepalive 128; }}
  server {{
    listen 127.0.0.1:{ngx};
    location / {{ proxy_pass http://fast; proxy_http_version 1.1; proxy_set_header Connection \"\"; }}
  }}
}}
"
        ),
    )?;
    let nginx = Killed(
        Command::new(&args.nginx)
            .args(["-p", &d.to_string(), "-c"])
            .arg(dir.join("nginx.conf"))
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {} (apt-get install nginx)", args.nginx))?,
    );
    wait_for(ngx, "nginx")?;

    std::fs::write(
        dir.join("switchyard.yaml"),
        format!("server: {{ http: 127.0.0.1:{sy} }}\nupstreams:\n  - {{ name: fast, endpoints: [http://127.0.0.1:{up}] }}\n"),
    )?;
    let switchyard = Killed(
        Command::new(&args.switchyard)
            .args(["serve", "--config"])
            .arg(dir.join("switchyard.yaml"))
            .env("RUST_LOG", "warn")
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", args.switchyard.display()))?,
    );
    wait_for(sy, "switchyard")?;

    let rt = tokio::runtime::Runtime::new()?;
    let tick = clock_ticks()?;
    let targets = [
        ("direct", up, None),
        ("nginx", ngx, Some(nginx.0.id())),
        ("switchyard", sy, Some(switchyard.0.id())),
    ];
    let mut rows = Vec::new();
    for c in args
        .concurrency
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
    {
        let c: usize = c.parse().context("--concurrency takes numbers")?;
        let mut results = Vec::new();
        for (name, port, proxy) in targets {
            let url = format!("http://127.0.0.1:{port}/v1/chat/completions");
            rt.block_on(load(&url, c, 0.5))?; // warm the connections
            let cpu = |pid| cpu_seconds(pid, tick);
            let before = proxy.map(cpu).transpose()?;
            let (rps, lat) = rt.block_on(load(&url, c, args.seconds))?;
            let used = proxy.map(cpu).transpose()?.zip(before).map(|(a, b)| a - b);
            let per_request = used.map(|s| s * 1e6 / lat.len() as f64);
            results.push((
                name,
                rps,
                percentile(&lat, 50.0),
                percentile(&lat, 99.0),
                per_request,
            ));
        }
        let (_, _, d50, d99, _) = results[0];
        let nginx_rps = results[1].1;
        for (name, rps, p50, p99, per_request) in &results {
            rows.push(vec![
                c.to_string(),
                name.to_string(),
                format!("{rps:.0}"),
                format!("{p50:.0}"),
                format!("{p99:.0}"),
                if *name == "direct" {
                    "—".into()
                } else {
                    format!("{:.0}", p50 - d50)
                },
                if *name == "direct" {
                    "—".into()
                } else {
                    format!("{:.0}", p99 - d99)
                },
                per_request.map_or("—".into(), |us| format!("{us:.1}")),
                format!("{:.2}", rps / nginx_rps),
            ]);
        }
    }
    print_table(
        &[
            "concurrency",
            "path",
            "req/s",
            "p50 µs",
            "p99 µs",
            "added p50 µs",
            "added p99 µs",
            "proxy CPU µs/req",
            "req/s ÷ nginx",
        ],
        &rows,
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
