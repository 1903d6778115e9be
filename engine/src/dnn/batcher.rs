//! Per-version scheduler with Triton's dynamic batching semantics: one queue,
//! `instance_group` worker threads, batches formed up to `max_batch_size`,
//! preferred sizes, a queue delay, a bounded queue and queue timeouts.
use super::backend::Backend;
use super::error::{DnnError, Result};
use super::model::{BatchingPolicy, ModelDefinition};
use super::stats::{Execution, FailReason, VersionStats};
use super::tensor::Tensor;
use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

struct Pending {
    inputs: Vec<Tensor>,
    rows: usize,
    enqueued: Instant,
    deadline: Option<Instant>,
    reply: oneshot::Sender<Result<Vec<Tensor>>>,
}

#[derive(Default)]
struct Queue {
    pending: VecDeque<Pending>,
    stopping: bool,
}

struct Shared {
    queue: Mutex<Queue>,
    wake: Condvar,
    backend: Arc<dyn Backend>,
    policy: Option<BatchingPolicy>,
    max_batch_size: usize,
    /// Requests that may wait; more are refused (503).
    max_queue: usize,
    stats: Arc<VersionStats>,
}

/// Runs one model version; dropping it lets the workers finish what is
/// queued and exit.
pub struct Batcher {
    shared: Arc<Shared>,
}

/// What a worker does next with the queue as it is.
#[derive(Debug, PartialEq)]
enum Plan {
    /// Take this many requests from the front as one batch.
    Take(usize),
    /// Wait up to this long for more requests.
    Wait(Duration),
}

fn same_inner_shapes(a: &Pending, b: &Pending) -> bool {
    a.inputs
        .iter()
        .zip(&b.inputs)
        .all(|(x, y)| x.shape.get(1..) == y.shape.get(1..))
}

/// Triton's batch formation: the largest batch that fits `max_batch_size`
/// with matching shapes; a preferred size when one can be formed; wait out
/// `max_queue_delay` for a fuller batch unless the batch is already full.
fn plan(
    pending: &VecDeque<Pending>,
    policy: Option<&BatchingPolicy>,
    max: usize,
    now: Instant,
) -> Plan {
    let Some(policy) = policy else {
        return Plan::Take(1);
    };
    let mut total = 0;
    let mut n = 0;
    let mut best_preferred = None;
    let mut full = false;
    for p in pending {
        if total + p.rows > max || !same_inner_shapes(&pending[0], p) {
            full = true;
            break;
        }
        total += p.rows;
        n += 1;
        if policy.preferred_batch_sizes.contains(&total) {
            best_preferred = Some((n, total));
        }
    }
    full |= total == max;
    let largest_preferred = policy.preferred_batch_sizes.last().copied();
    if let Some((k, size)) = best_preferred {
        if Some(size) == largest_preferred || full {
            return Plan::Take(k);
        }
    }
    if full {
        return Plan::Take(n);
    }
    let waited = now.saturating_duration_since(pending[0].enqueued);
    if waited >= policy.max_queue_delay {
        return Plan::Take(best_preferred.map_or(n, |(k, _)| k));
    }
    Plan::Wait(policy.max_queue_delay - waited)
}

impl Batcher {
    /// Starts `spec.instances` workers over `backend`. The queue holds the
    /// policy's `max_queue_size` requests, or `default_queue` when the config
    /// sets none. A worker thread that cannot be started fails the load.
    pub fn start(
        spec: &ModelDefinition,
        backend: Arc<dyn Backend>,
        stats: Arc<VersionStats>,
        default_queue: usize,
    ) -> std::result::Result<Self, String> {
        let max_queue = spec
            .dynamic_batching
            .as_ref()
            .map(|p| p.max_queue_size)
            .filter(|&m| m > 0)
            .unwrap_or(default_queue)
            .max(1);
        let scheduler = Self {
            shared: Arc::new(Shared {
                queue: Mutex::new(Queue::default()),
                wake: Condvar::new(),
                backend,
                policy: spec.dynamic_batching.clone(),
                max_batch_size: spec.max_batch_size,
                max_queue,
                stats,
            }),
        };
        for i in 0..spec.instances.max(1) {
            let shared = scheduler.shared.clone();
            // On failure `scheduler` drops, and the started workers exit.
            std::thread::Builder::new()
                .name(format!("{}-{i}", spec.name))
                .spawn(move || worker(&shared))
                .map_err(|e| format!("starting instance {i} of {}: {e}", spec.name))?;
        }
        Ok(scheduler)
    }

    /// Queues one request of `rows` batch elements; inputs in config order.
    /// `timeout` only shortens the queue policy's (when it allows that).
    pub fn submit(
        &self,
        inputs: Vec<Tensor>,
        rows: usize,
        timeout: Option<Duration>,
    ) -> Result<oneshot::Receiver<Result<Vec<Tensor>>>> {
        let now = Instant::now();
        let policy = self.shared.policy.as_ref();
        let requested = timeout.filter(|_| policy.is_some_and(|p| p.allow_timeout_override));
        let timeout = match (policy.and_then(|p| p.default_timeout), requested) {
            (Some(d), Some(t)) => Some(d.min(t)),
            (d, t) => d.or(t),
        };
        let (tx, rx) = oneshot::channel();
        let mut q = self.shared.queue.lock().expect("queue lock");
        let max = self.shared.max_queue;
        if q.pending.len() >= max {
            drop(q);
            self.shared
                .stats
                .failure(Duration::ZERO, FailReason::Rejected);
            return Err(DnnError::unavailable(format!(
                "Exceeds maximum queue size ({max} requests waiting)"
            )));
        }
        q.pending.push_back(Pending {
            inputs,
            rows,
            enqueued: now,
            deadline: timeout.map(|t| now + t),
            reply: tx,
        });
        self.shared.stats.pending(q.pending.len());
        drop(q);
        self.shared.wake.notify_one();
        Ok(rx)
    }
}

impl Drop for Batcher {
    fn drop(&mut self) {
        self.shared.queue.lock().expect("queue lock").stopping = true;
        self.shared.wake.notify_all();
    }
}

fn worker(shared: &Shared) {
    loop {
        let batch: Vec<Pending> = {
            let mut q = shared.queue.lock().expect("queue lock");
            loop {
                let now = Instant::now();
                expire(&mut q.pending, now, &shared.stats);
                if q.pending.is_empty() {
                    if q.stopping {
                        return;
                    }
                    q = shared.wake.wait(q).expect("queue lock");
                    continue;
                }
                match plan(
                    &q.pending,
                    shared.policy.as_ref(),
                    shared.max_batch_size.max(1),
                    now,
                ) {
                    Plan::Take(n) => {
                        let batch = q.pending.drain(..n).collect();
                        shared.stats.pending(q.pending.len());
                        if !q.pending.is_empty() {
                            shared.wake.notify_one();
                        }
                        break batch;
                    }
                    Plan::Wait(d) => q = shared.wake.wait_timeout(q, d).expect("queue lock").0,
                }
            }
        };
        execute(shared, batch);
    }
}

/// Rejects requests whose queue timeout passed (Triton's REJECT action).
fn expire(pending: &mut VecDeque<Pending>, now: Instant, stats: &VersionStats) {
    let mut i = 0;
    while i < pending.len() {
        if pending[i].deadline.is_some_and(|d| d <= now) {
            let p = pending.remove(i).expect("index in range");
            stats.failure(now - p.enqueued, FailReason::Rejected);
            let _ = p.reply.send(Err(DnnError::unavailable(
                "Request timeout expired while waiting in the queue",
            )));
        } else {
            i += 1;
        }
    }
}

fn execute(shared: &Shared, mut batch: Vec<Pending>) {
    let start = Instant::now();
    let rows: Vec<usize> = batch.iter().map(|p| p.rows).collect();
    let inputs: Vec<Tensor> = if batch.len() == 1 {
        std::mem::take(&mut batch[0].inputs)
    } else {
        (0..batch[0].inputs.len())
            .map(|i| Tensor::concat(&batch.iter().map(|p| &p.inputs[i]).collect::<Vec<_>>()))
            .collect()
    };
    let inputs_ready = Instant::now();
    let result = catch_unwind(AssertUnwindSafe(|| shared.backend.execute(&inputs)))
        .unwrap_or_else(|_| Err(DnnError::internal("the backend panicked on this batch")));
    let computed = Instant::now();
    let outputs: Result<Vec<Vec<Tensor>>> = result.and_then(|outs| {
        if batch.len() == 1 {
            return Ok(vec![outs]);
        }
        let mut per_request: Vec<Vec<Tensor>> = batch
            .iter()
            .map(|_| Vec::with_capacity(outs.len()))
            .collect();
        for t in &outs {
            for (mine, piece) in per_request.iter_mut().zip(t.split(&rows)?) {
                mine.push(piece);
            }
        }
        Ok(per_request)
    });
    let done = Instant::now();
    match outputs {
        Ok(per_request) => {
            shared.stats.execution(&Execution {
                requests: batch.len() as u64,
                rows: rows.iter().sum::<usize>() as u64,
                compute_input: inputs_ready - start,
                compute_infer: computed - inputs_ready,
                compute_output: done - computed,
            });
            for (p, outs) in batch.into_iter().zip(per_request) {
                shared.stats.success(start - p.enqueued, done - p.enqueued);
                let _ = p.reply.send(Ok(outs));
            }
        }
        Err(e) => {
            for p in batch {
                shared.stats.failure(done - p.enqueued, FailReason::Backend);
                let _ = p.reply.send(Err(e.clone()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pending(rows: usize, width: i64, age: Duration, now: Instant) -> Pending {
        Pending {
            inputs: vec![Tensor::from_f32(
                "x",
                vec![rows as i64, width],
                &vec![0.0; rows * width as usize],
            )],
            rows,
            enqueued: now - age,
            deadline: None,
            reply: oneshot::channel().0,
        }
    }

    fn policy(preferred: Vec<usize>, delay_us: u64) -> BatchingPolicy {
        BatchingPolicy {
            preferred_batch_sizes: preferred,
            max_queue_delay: Duration::from_micros(delay_us),
            max_queue_size: 0,
            default_timeout: None,
            allow_timeout_override: false,
        }
    }

    #[test]
    fn batch_formation_follows_tritons_rules() {
        let now = Instant::now();
        let q = |items: &[(usize, i64, u64)]| -> VecDeque<Pending> {
            items
                .iter()
                .map(|&(r, w, age)| pending(r, w, Duration::from_micros(age), now))
                .collect()
        };
        // No dynamic batching: one request at a time.
        assert_eq!(
            plan(&q(&[(1, 2, 0), (1, 2, 0)]), None, 8, now),
            Plan::Take(1)
        );
        // Zero delay: whatever is queued goes at once.
        let p0 = policy(vec![], 0);
        assert_eq!(
            plan(&q(&[(1, 2, 0), (2, 2, 0)]), Some(&p0), 8, now),
            Plan::Take(2)
        );
        // Never beyond max_batch_size, never across different inner shapes.
        assert_eq!(
            plan(&q(&[(3, 2, 0), (3, 2, 0), (3, 2, 0)]), Some(&p0), 8, now),
            Plan::Take(2)
        );
        assert_eq!(
            plan(&q(&[(1, 2, 0), (1, 3, 0)]), Some(&p0), 8, now),
            Plan::Take(1)
        );
        // A delay waits for a fuller batch, until the oldest request has waited it out.
        let p = policy(vec![], 500);
        assert_eq!(
            plan(&q(&[(1, 2, 100)]), Some(&p), 8, now),
            Plan::Wait(Duration::from_micros(400))
        );
        assert_eq!(
            plan(&q(&[(1, 2, 600), (1, 2, 0)]), Some(&p), 8, now),
            Plan::Take(2)
        );
        assert_eq!(
            plan(&q(&[(4, 2, 0), (4, 2, 0)]), Some(&p), 8, now),
            Plan::Take(2)
        );
        // The largest preferred size goes at once; a smaller one after the delay.
        let pp = policy(vec![2, 4], 500);
        assert_eq!(
            plan(&q(&[(2, 2, 0), (2, 2, 0), (1, 2, 0)]), Some(&pp), 8, now),
            Plan::Take(2)
        );
        assert!(matches!(
            plan(&q(&[(2, 2, 0), (1, 2, 0)]), Some(&pp), 8, now),
            Plan::Wait(_)
        ));
        assert_eq!(
            plan(&q(&[(2, 2, 900), (1, 2, 0)]), Some(&pp), 8, now),
            Plan::Take(1)
        );
    }
}
