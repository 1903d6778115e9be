//! Iteration-level scheduling: which sequences run in the next forward pass and
//! how many of their tokens, under `max_num_seqs`, a token budget and the KV
//! blocks there are; preempts the newest sequence when blocks run out.
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
    fn set_computed(&mut self, n: usize);
    /// Called when it is admitted with `cached` tokens found in the prefix cache.
    fn admitted(&mut self, _cached: usize) {}
    /// Sequences it occupies under `max_num_seqs` (more than one while it waits
    /// to fork into parallel samples).
    fn width(&self) -> usize {
        1
    }
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

/// What one call to [`Scheduler::schedule`] decided.
#[derive(Debug, Default)]
pub struct Schedule {
    pub batch: ForwardBatch,
    pub plan: Vec<Planned>,
    /// Sequences taken from `waiting`: admitted, or ended as unfit (not
    /// counting resumed preempted ones).
    pub admitted: usize,
    /// Sequences preempted to free blocks; they recompute when resumed.
    pub preempted: usize,
}

impl Schedule {
    /// Puts tokens `start..start + len` of `s` (at `index` in `running`) in
    /// the batch; it samples when they reach the end of its known tokens.
    fn add<S: Schedulable>(&mut self, index: usize, s: &S, start: usize, len: usize) {
        self.batch
            .push(s.id(), &s.tokens()[start..start + len], start);
        self.plan.push(Planned {
            index,
            len,
            samples: start + len == s.tokens().len(),
        });
    }
}

pub struct Scheduler<S> {
    pub config: SchedulerConfig,
    pub waiting: VecDeque<S>,
    /// Preempted sequences, oldest first; resumed before any new admission.
    pub preempted: VecDeque<S>,
    /// In admission order: the last is the newest.
    pub running: Vec<S>,
    /// Sequences that cannot fit the KV pool even with every other sequence
    /// gone; the engine ends them with an error (they would preempt
    /// themselves forever).
    pub unfit: Vec<S>,
}

impl<S: Schedulable> Scheduler<S> {
    pub fn new(config: SchedulerConfig) -> Self {
        Self {
            config,
            waiting: VecDeque::new(),
            preempted: VecDeque::new(),
            running: Vec::new(),
            unfit: Vec::new(),
        }
    }

    pub fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.preempted.is_empty() && self.running.is_empty()
    }

    /// Builds the next batch: decode tokens of running sequences first, then
    /// their prefill chunks, then newly admitted sequences (first come, first
    /// served, after a prefix-cache lookup), all under the token budget, so one
    /// long prompt cannot stall everyone's decoding. When a sequence needs a
    /// block and none is free, the newest sequence not yet in this batch is
    /// preempted: its blocks are freed and it recomputes later. A sequence
    /// that needs a block while no other sequence holds any can never run:
    /// it goes to `unfit` instead.
    pub fn schedule(&mut self, cache: &mut KvCache) -> Schedule {
        let mut out = Schedule::default();
        let mut budget = self.config.max_num_batched_tokens;
        let mut victim = vec![false; self.running.len()];
        let mut unfit = vec![false; self.running.len()];
        let remaining = |s: &S| s.tokens().len() - s.computed();
        let decoding = (0..self.running.len()).filter(|&i| remaining(&self.running[i]) == 1);
        let prefilling = (0..self.running.len()).filter(|&i| remaining(&self.running[i]) > 1);
        for index in decoding.chain(prefilling).collect::<Vec<_>>() {
            if budget == 0 {
                break;
            }
            if victim[index] {
                continue;
            }
            let s = &self.running[index];
            let computed = s.computed();
            let len = remaining(s).min(budget);
            loop {
                if cache.prepare(s.id(), computed, computed + len).is_ok() {
                    budget -= len;
                    out.add(index, s, computed, len);
                    break;
                }
                let planned = |j: usize| out.plan.iter().any(|p| p.index == j);
                let v = (0..self.running.len())
                    .rev()
                    .find(|&j| j != index && !victim[j] && !planned(j))
                    .unwrap_or(index);
                if v == index {
                    // Alone, it would get every block there is.
                    unfit[index] = (0..self.running.len()).all(|j| j == index || victim[j]);
                }
                victim[v] = true;
                cache.blocks.free(self.running[v].id());
                if v == index {
                    break;
                }
            }
        }
        let preempting = victim.iter().any(|&v| v);
        let mut occupied: usize = self.running.iter().map(|s| s.width()).sum();
        while !preempting && budget > 0 {
            let from_preempted = !self.preempted.is_empty();
            let queue = if from_preempted {
                &mut self.preempted
            } else {
                &mut self.waiting
            };
            let Some(mut s) = queue.pop_front() else {
                break;
            };
            if occupied + s.width() > self.config.max_num_seqs {
                queue.push_front(s);
                break;
            }
            let cached = cache.blocks.start(s.id(), s.tokens());
            s.set_computed(cached);
            let len = remaining(&s).min(budget);
            if cache.prepare(s.id(), cached, cached + len).is_err() {
                cache.blocks.undo_start(s.id());
                s.set_computed(0);
                if self.running.is_empty() {
                    // Every block is free, and still too few.
                    self.unfit.push(s);
                    if !from_preempted {
                        out.admitted += 1;
                    }
                    continue;
                }
                // It waits for blocks; its lookup is made again when it is admitted.
                queue.push_front(s);
                break;
            }
            budget -= len;
            occupied += s.width();
            s.admitted(cached);
            out.add(self.running.len(), &s, cached, len);
            self.running.push(s);
            if !from_preempted {
                out.admitted += 1;
            }
        }
        if preempting {
            // Indices shift down past each removed sequence.
            for p in &mut out.plan {
                p.index -= victim[..p.index].iter().filter(|&&v| v).count();
            }
            let running = std::mem::take(&mut self.running);
            let mut resumed = Vec::new();
            // Nothing was admitted while preempting: `victim` covers `running`.
            for ((s, v), u) in running.into_iter().zip(&victim).zip(&unfit) {
                if *u {
                    self.unfit.push(s);
                } else if *v {
                    resumed.push(s);
                } else {
                    self.running.push(s);
                }
            }
            out.preempted = resumed.len();
            for mut s in resumed.into_iter().rev() {
                tracing::debug!(seq = s.id().0, "preempted: out of KV blocks");
                s.set_computed(0);
                self.preempted.push_front(s);
            }
        }
        out
    }

    /// Removes the running sequences `done` says are finished, freeing their blocks.
    pub fn retire(&mut self, cache: &mut KvCache, mut done: impl FnMut(&S) -> bool) -> Vec<S> {
        let (gone, keep): (Vec<S>, Vec<S>) = std::mem::take(&mut self.running)
            .into_iter()
            .partition(|s| done(s));
        self.running = keep;
        for s in &gone {
            cache.blocks.free(s.id());
        }
        gone
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llm::kv_cache::{KvDtype, KvLayout};

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
        fn set_computed(&mut self, n: usize) {
            self.2 = n;
        }
    }

    fn cache(num_blocks: usize) -> KvCache {
        let layout = KvLayout {
            block_size: 4,
            kv_heads: 1,
            head_dim: 2,
        };
        KvCache::new(1, layout, KvDtype::F16, num_blocks, true)
    }

    /// Runs the plan: every planned token becomes computed, and a sequence that
    /// samples grows by one token.
    fn advance(s: &mut Scheduler<Seq>, sched: &Schedule, cache: &mut KvCache) {
        for p in &sched.plan {
            let q = &mut s.running[p.index];
            q.2 += p.len;
            if p.samples {
                q.1.push(7);
            }
            cache.blocks.computed(q.0, &q.1, q.2);
        }
    }

    #[test]
    fn decodes_first_then_chunks_prefill_under_budget() {
        let mut s = Scheduler::new(SchedulerConfig {
            max_num_seqs: 2,
            max_num_batched_tokens: 5,
        });
        let mut cache = cache(16);
        s.waiting.push_back(Seq(SeqId(1), vec![1; 8], 0));
        s.waiting.push_back(Seq(SeqId(2), vec![2; 3], 0));
        s.waiting.push_back(Seq(SeqId(3), vec![3; 3], 0));
        let first = s.schedule(&mut cache);
        assert_eq!(first.admitted, 1, "the budget holds the second back");
        assert_eq!(first.batch.positions, vec![0, 1, 2, 3, 4]);
        advance(&mut s, &first, &mut cache);
        let second = s.schedule(&mut cache);
        assert_eq!(second.admitted, 1);
        assert_eq!(s.waiting.len(), 1, "max_num_seqs holds the third back");
        // Sequence 1 finishes its prompt (3 tokens), then 2 starts.
        assert_eq!(second.batch.positions, vec![5, 6, 7, 0, 1]);
        advance(&mut s, &second, &mut cache);
        let third = s.schedule(&mut cache);
        // Decode of 1 comes before the rest of 2's prompt.
        assert_eq!(
            third.plan[0],
            Planned {
                index: 0,
                len: 1,
                samples: true
            }
        );
        assert_eq!(third.batch.positions, vec![8, 2]);
        let gone = s.retire(&mut cache, |q| q.0 == SeqId(2));
        assert_eq!(gone.len(), 1);
        assert!(!cache.blocks.has(SeqId(2)));
    }

    #[test]
    fn out_of_blocks_preempts_the_newest_and_resumes_it_first() {
        let mut s = Scheduler::new(SchedulerConfig {
            max_num_seqs: 4,
            max_num_batched_tokens: 64,
        });
        // 4 blocks of 4 tokens: two 8-token sequences fill the pool.
        let mut cache = cache(4);
        s.waiting.push_back(Seq(SeqId(1), (0..7).collect(), 0));
        s.waiting.push_back(Seq(SeqId(2), (10..17).collect(), 0));
        let first = s.schedule(&mut cache);
        assert_eq!(first.admitted, 2);
        advance(&mut s, &first, &mut cache);
        // Both now hold 8 tokens; the next token of each needs a fifth block.
        let second = s.schedule(&mut cache);
        advance(&mut s, &second, &mut cache);
        let sched = s.schedule(&mut cache);
        assert_eq!(sched.preempted, 1);
        assert_eq!(s.running.len(), 1);
        assert_eq!(s.running[0].0, SeqId(1), "the newest goes");
        assert_eq!(s.preempted[0].0, SeqId(2));
        assert_eq!(s.preempted[0].2, 0, "it recomputes");
        assert_eq!(sched.plan[0].index, 0);
        s.retire(&mut cache, |_| true);
        // Sequence 2 comes back before anything waiting.
        s.waiting.push_back(Seq(SeqId(3), vec![1; 3], 0));
        let resumed = s.schedule(&mut cache);
        assert_eq!(resumed.admitted, 1);
        assert_eq!(s.running[0].0, SeqId(2));
        // Its tail block went to sequence 1 (tails are evicted first); its
        // first block is still cached.
        assert_eq!(resumed.batch.segments[0].start_pos, 4);
    }

    #[test]
    fn a_sequence_that_outgrows_the_pool_alone_is_ended_and_the_others_progress() {
        let mut s = Scheduler::new(SchedulerConfig {
            max_num_seqs: 4,
            max_num_batched_tokens: 64,
        });
        // 4 blocks of 4 tokens; sequence 1 grows without end, 2 stops at 6 tokens.
        let mut cache = cache(4);
        s.waiting.push_back(Seq(SeqId(1), (0..7).collect(), 0));
        s.waiting.push_back(Seq(SeqId(2), (10..13).collect(), 0));
        let mut done = Vec::new();
        for _ in 0..40 {
            let sched = s.schedule(&mut cache);
            advance(&mut s, &sched, &mut cache);
            done.extend(s.retire(&mut cache, |q| q.0 == SeqId(2) && q.1.len() >= 6));
            if s.is_idle() && s.unfit.len() == 1 {
                break;
            }
        }
        assert_eq!(done.len(), 1, "the other sequence finished");
        assert_eq!(done[0].1.len(), 6);
        assert_eq!(s.unfit.len(), 1, "the one that cannot fit was ended");
        assert_eq!(s.unfit[0].0, SeqId(1));
        assert!(
            s.is_idle(),
            "nothing spins: no sequence is left to schedule"
        );
        assert_eq!(cache.blocks.num_free(), 4, "every block came back");
    }

    #[test]
    fn a_prompt_larger_than_the_pool_is_ended_at_admission() {
        let mut s = Scheduler::new(SchedulerConfig {
            max_num_seqs: 4,
            max_num_batched_tokens: 64,
        });
        let mut cache = cache(2);
        s.waiting.push_back(Seq(SeqId(1), (0..20).collect(), 0));
        s.waiting.push_back(Seq(SeqId(2), vec![1, 2, 3], 0));
        let sched = s.schedule(&mut cache);
        assert_eq!(s.unfit.len(), 1);
        assert_eq!(s.unfit[0].0, SeqId(1));
        assert_eq!(sched.admitted, 2, "both left the queue");
        assert_eq!(
            s.running.len(),
            1,
            "the next one is admitted in the same pass"
        );
        assert_eq!(s.running[0].0, SeqId(2));
    }
}
