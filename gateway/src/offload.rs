//! Heavy request work (decoding and decompressing large bodies, rendering
//! chat templates, tokenizing long prompts) runs on a bounded set of blocking
//! threads, so the async workers keep answering `/health` and small requests.
use std::sync::Arc;
use tokio::sync::Semaphore;

/// The bounded blocking pool; cheap to clone.
#[derive(Clone)]
pub struct Offload {
    permits: Arc<Semaphore>,
    /// Work on inputs smaller than this runs inline: a thread hop costs more.
    threshold: usize,
}

impl Offload {
    pub fn new(threads: usize, threshold: usize) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(threads.max(1))),
            threshold,
        }
    }

    /// Runs `f`, on one of the pool's threads when `size` (the bytes it works
    /// on) reaches the threshold; callers wait for a free thread.
    pub async fn run<T: Send + 'static>(
        &self,
        size: usize,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> T {
        if size < self.threshold {
            return f();
        }
        let _permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .expect("the pool's semaphore is never closed");
        match tokio::task::spawn_blocking(f).await {
            Ok(v) => v,
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
    }
}

impl Default for Offload {
    fn default() -> Self {
        let l = crate::limits::Limits::default();
        Self::new(l.blocking_threads, l.offload_bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(flavor = "current_thread")]
    async fn heavy_work_leaves_the_async_thread_free() {
        let pool = Offload::new(1, 10);
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        // The heavy work waits for a message that only the runtime's one
        // thread can send: inline, it would time out instead.
        let heavy = tokio::spawn({
            let pool = pool.clone();
            async move {
                pool.run(100, move || rx.recv_timeout(Duration::from_secs(10)))
                    .await
            }
        });
        tokio::task::yield_now().await;
        tx.send(()).unwrap();
        assert_eq!(heavy.await.unwrap(), Ok(()));
        // Small work runs inline, on this thread.
        let here = std::thread::current().id();
        assert_eq!(pool.run(1, || std::thread::current().id()).await, here);
    }
}
