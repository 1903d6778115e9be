//! Exact per-version statistics in Triton's shape (the statistics extension
//! and what perf_analyzer reads), mirrored into Prometheus metrics.
use metrics::{Counter, Gauge, Histogram};
use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A count of events and their summed duration.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Timed {
    pub count: u64,
    pub ns: u64,
}

impl Timed {
    fn add(&mut self, d: Duration, n: u64) {
        self.count += n;
        self.ns += d.as_nanos() as u64 * n;
    }
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct BatchTimes {
    pub compute_input: Timed,
    pub compute_infer: Timed,
    pub compute_output: Timed,
}

/// A version's statistics at one moment.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct StatsSnapshot {
    /// Milliseconds since the epoch of the last finished request (0 = none).
    pub last_inference_ms: u64,
    /// Inferences, counting every element of every batch.
    pub inference_count: u64,
    /// Backend executions (one per formed batch).
    pub execution_count: u64,
    pub success: Timed,
    pub fail: Timed,
    pub queue: Timed,
    pub compute_input: Timed,
    pub compute_infer: Timed,
    pub compute_output: Timed,
    /// Response-cache lookups that answered, and those that did not (with
    /// the time the lookup and the insertion took).
    pub cache_hit: Timed,
    pub cache_miss: Timed,
    /// Per formed batch size: executions and their times.
    pub batches: BTreeMap<u64, BatchTimes>,
}

/// Why a request failed, as Triton labels `nv_inference_request_failure`.
#[derive(Debug, Clone, Copy)]
pub enum FailReason {
    Rejected,
    Backend,
}

pub struct VersionStats {
    inner: Mutex<StatsSnapshot>,
    series: Series,
}

/// The version's Prometheus series, registered once so the request path
/// only bumps them.
struct Series {
    exec_count: Counter,
    inference_count: Counter,
    compute_input_us: Counter,
    compute_infer_us: Counter,
    compute_output_us: Counter,
    batch_size: Histogram,
    success: Counter,
    request_us: Counter,
    queue_us: Counter,
    request_seconds: Histogram,
    queue_seconds: Histogram,
    pending: Gauge,
    rejected: Counter,
    backend_failed: Counter,
    cache_hits: Counter,
    cache_misses: Counter,
    cache_hit_us: Counter,
    cache_miss_us: Counter,
}

/// One executed batch, as the scheduler measured it.
pub struct Execution {
    pub requests: u64,
    pub rows: u64,
    pub compute_input: Duration,
    pub compute_infer: Duration,
    pub compute_output: Duration,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl VersionStats {
    pub fn new(model: &str, version: i64) -> Self {
        let labels = [
            ("model", model.to_string()),
            ("version", version.to_string()),
        ];
        let failed = |reason: &'static str| {
            let [m, v] = labels.clone();
            metrics::counter!(
                "nv_inference_request_failure",
                &[m, v, ("reason", reason.to_string())]
            )
        };
        let l = &labels;
        Self {
            inner: Mutex::new(StatsSnapshot::default()),
            series: Series {
                exec_count: metrics::counter!("nv_inference_exec_count", l),
                inference_count: metrics::counter!("nv_inference_count", l),
                compute_input_us: metrics::counter!("nv_inference_compute_input_duration_us", l),
                compute_infer_us: metrics::counter!("nv_inference_compute_infer_duration_us", l),
                compute_output_us: metrics::counter!("nv_inference_compute_output_duration_us", l),
                batch_size: metrics::histogram!("nv_inference_batch_size", l),
                success: metrics::counter!("nv_inference_request_success", l),
                request_us: metrics::counter!("nv_inference_request_duration_us", l),
                queue_us: metrics::counter!("nv_inference_queue_duration_us", l),
                request_seconds: metrics::histogram!("nv_inference_request_duration_seconds", l),
                queue_seconds: metrics::histogram!("nv_inference_queue_duration_seconds", l),
                pending: metrics::gauge!("nv_inference_pending_request_count", l),
                rejected: failed("REJECTED"),
                backend_failed: failed("BACKEND"),
                cache_hits: metrics::counter!("nv_cache_num_hits_per_model", l),
                cache_misses: metrics::counter!("nv_cache_num_misses_per_model", l),
                cache_hit_us: metrics::counter!("nv_cache_hit_duration_per_model", l),
                cache_miss_us: metrics::counter!("nv_cache_miss_duration_per_model", l),
            },
        }
    }

    pub fn snapshot(&self) -> StatsSnapshot {
        self.inner.lock().expect("stats lock").clone()
    }

    pub fn pending(&self, n: usize) {
        self.series.pending.set(n as f64);
    }

    /// A batch ran: every request in it is charged the batch's compute times.
    pub fn execution(&self, e: &Execution) {
        let mut s = self.inner.lock().expect("stats lock");
        s.execution_count += 1;
        s.inference_count += e.rows;
        s.compute_input.add(e.compute_input, e.requests);
        s.compute_infer.add(e.compute_infer, e.requests);
        s.compute_output.add(e.compute_output, e.requests);
        let b = s.batches.entry(e.rows).or_default();
        b.compute_input.add(e.compute_input, 1);
        b.compute_infer.add(e.compute_infer, 1);
        b.compute_output.add(e.compute_output, 1);
        drop(s);
        let m = &self.series;
        m.exec_count.increment(1);
        m.inference_count.increment(e.rows);
        let us = |d: Duration| d.as_micros() as u64 * e.requests;
        m.compute_input_us.increment(us(e.compute_input));
        m.compute_infer_us.increment(us(e.compute_infer));
        m.compute_output_us.increment(us(e.compute_output));
        m.batch_size.record(e.rows as f64);
    }

    pub fn success(&self, queue: Duration, total: Duration) {
        let mut s = self.inner.lock().expect("stats lock");
        s.success.add(total, 1);
        s.queue.add(queue, 1);
        s.last_inference_ms = now_ms();
        drop(s);
        let m = &self.series;
        m.success.increment(1);
        m.request_us.increment(total.as_micros() as u64);
        m.queue_us.increment(queue.as_micros() as u64);
        m.request_seconds.record(total.as_secs_f64());
        m.queue_seconds.record(queue.as_secs_f64());
    }

    /// An ensemble request: its steps ran on their own models, so it counts
    /// as inferences and a success or failure, with no execution of its own.
    pub fn ensemble(&self, rows: usize, total: Duration, ok: bool) {
        self.inner.lock().expect("stats lock").inference_count += rows as u64;
        self.series.inference_count.increment(rows as u64);
        if ok {
            self.success(Duration::ZERO, total);
        } else {
            self.failure(total, FailReason::Backend);
        }
    }

    /// A response-cache lookup (and, for a miss, the insertion after the
    /// model ran). A hit is also a success that ran nothing.
    pub fn cache(&self, hit: bool, took: Duration) {
        let mut s = self.inner.lock().expect("stats lock");
        let m = &self.series;
        let (timed, count, us) = if hit {
            (&mut s.cache_hit, &m.cache_hits, &m.cache_hit_us)
        } else {
            (&mut s.cache_miss, &m.cache_misses, &m.cache_miss_us)
        };
        timed.add(took, 1);
        drop(s);
        count.increment(1);
        us.increment(took.as_micros() as u64);
        if hit {
            self.success(Duration::ZERO, took);
        }
    }

    pub fn failure(&self, total: Duration, reason: FailReason) {
        let mut s = self.inner.lock().expect("stats lock");
        s.fail.add(total, 1);
        s.last_inference_ms = now_ms();
        drop(s);
        match reason {
            FailReason::Rejected => &self.series.rejected,
            FailReason::Backend => &self.series.backend_failed,
        }
        .increment(1);
    }
}
