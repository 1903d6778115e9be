//! Iteration-level scheduling: which sequences run in the next forward pass and
//! how many of their tokens, under `max_num_seqs` and a token budget.
use super::kv_cache::{KvCache, SeqId};
use super::model::ForwardBatch;
use std::collections::VecDeque;

/// The scheduler's view of one sequence.
pub trait Schedulable {
    fn id(&self) -> SeqId;
    /// Prompt and generated tokens so far.
    fn tokens(&self) -> &[u32];
    /// Tokens already in the KV cache.
    fn computed(&self) -> usize;
    /// Upper bound on the sequence's length, reserved in the cache at admission.
    fn max_len(&self) -> usize;
}

#[derive(Debug, Clone, Copy)]
pub struct SchedulerConfig {
    pub max_num_seqs: usize,
    pub max_num_batched_tokens: usize,
}

/// One running sequence's part in the next forward pass.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Planned {
    /// Index into [`Scheduler::running`].
    pub index: usize,
    pub len: usize,
    /// The chunk reaches the end of the known tokens, so a token is sampled.
    pub samples: bool,
}

pub struct Scheduler<S> {
    pub config: SchedulerConfig,
    pub waiting: VecDeque<S>,
    pub running: Vec<S>,
}

impl<S: Schedulable> Scheduler<S> {
    pub fn new(config: SchedulerConfig) -> Self {
        Self {
            config,
            waiting: VecDeque::new(),
            running: Vec::new(),
        }
    }

    pub fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.running.is_empty()
    }

    /// Admits waiting sequences first come, first served, then builds the batch:
    /// decode tokens of running sequences first, then prefill chunks, so one long
    /// prompt cannot stall everyone's decoding. Returns how many were admitted.
    pub fn schedule(&mut self, cache: &mut dyn KvCache) -> (ForwardBatch, Vec<Planned>, usize) {
        let mut admitted = 0;
        while self.running.len() < self.config.max_num_seqs {
            let Some(s) = self.waiting.pop_front() else {
                break;
            };
            cache.allocate(s.id(), s.max_len());
            self.running.push(s);
            admitted += 1;
        }
        let mut budget = self.config.max_num_batched_tokens;
        let mut batch = ForwardBatch::default();
        let mut plan = Vec::new();
        let remaining = |s: &S| s.tokens().len() - s.computed();
        let decoding = (0..self.running.len()).filter(|&i| remaining(&self.running[i]) == 1);
        let prefilling = (0..self.running.len()).filter(|&i| remaining(&self.running[i]) > 1);
        for index in decoding.chain(prefilling).collect::<Vec<_>>() {
            if budget == 0 {
                break;
            }
            let s = &self.running[index];
            let left = remaining(s);
            let len = left.min(budget);
            budget -= len;
            batch.push(
                s.id(),
                &s.tokens()[s.computed()..s.computed() + len],
                s.computed(),
            );
            plan.push(Planned {
                index,
                len,
                samples: len == left,
            });
        }
        (batch, plan, admitted)
    }

    /// Removes the running sequences `done` says are finished, freeing their cache.
    pub fn retire(&mut self, cache: &mut dyn KvCache, mut done: impl FnMut(&S) -> bool) -> Vec<S> {
        let (gone, keep): (Vec<S>, Vec<S>) = std::mem::take(&mut self.running)
            .into_iter()
            .partition(|s| done(s));
        self.running = keep;
        for s in &gone {
            cache.free(s.id());
        }
        gone
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llm::kv_cache::ContiguousKvCache;

    struct Seq(SeqId, Vec<u32>, usize);
    impl Schedulable for Seq {
        fn id(&self) -> SeqId {
            self.0
        }
        fn tokens(&self) -> &[u32] {
            &self.1
        }
        fn computed(&self) -> usize {
            self.2
        }
        fn max_len(&self) -> usize {
            self.1.len() + 8
        }
    }

    #[test]
    fn decodes_first_then_chunks_prefill_under_budget() {
        let mut s = Scheduler::new(SchedulerConfig {
            max_num_seqs: 2,
            max_num_batched_tokens: 5,
        });
        let mut cache = ContiguousKvCache::new(1);
        s.waiting.push_back(Seq(SeqId(1), vec![1; 8], 0));
        s.waiting.push_back(Seq(SeqId(2), vec![2; 3], 2));
        s.waiting.push_back(Seq(SeqId(3), vec![3; 3], 0));
        let (batch, plan, admitted) = s.schedule(&mut cache);
        assert_eq!(admitted, 2);
        assert_eq!(s.waiting.len(), 1, "max_num_seqs holds the third back");
        assert_eq!(
            plan[0],
            Planned {
                index: 1,
                len: 1,
                samples: true
            }
        );
        assert_eq!(
            plan[1],
            Planned {
                index: 0,
                len: 4,
                samples: false
            }
        );
        assert_eq!(batch.positions, vec![2, 0, 1, 2, 3]);
        assert_eq!(cache.num_sequences(), 2);
        let gone = s.retire(&mut cache, |q| q.0 == SeqId(2));
        assert_eq!(gone.len(), 1);
        assert_eq!(cache.num_sequences(), 1);
    }
}
