//! Speculative decoding's proposers.
//!
//! n-gram prompt lookup (vLLM's `ngram`): the sequence's last n tokens, for
//! n from `prompt_lookup_max` down to `prompt_lookup_min`, are looked up in
//! the sequence before them; the tokens that followed their latest earlier
//! occurrence are proposed. Text that rewrites, quotes or extracts from its
//! prompt repeats it, and there the proposals hold.
//!
//! A draft model: a smaller (or more quantized) model with the target's
//! vocabulary decodes greedily ahead of the target, in its own paged KV
//! cache, every proposing sequence in one batch per position. Its greedy
//! token is a point mass, so the target's acceptance rule is the same as
//! for n-gram proposals.
use super::kv_cache::{KvCache, SeqId};
use super::model::{ForwardBatch, LlamaModel};
use std::collections::HashMap;

/// Up to `k` tokens proposed to follow `tokens`; none when no suffix of
/// `min..=max` tokens occurred before.
pub fn ngram(tokens: &[u32], min: usize, max: usize, k: usize) -> Vec<u32> {
    for n in (min.max(1)..=max).rev() {
        if tokens.len() <= n {
            continue;
        }
        let suffix = &tokens[tokens.len() - n..];
        let found = (0..tokens.len() - n)
            .rev()
            .find(|&start| &tokens[start..start + n] == suffix);
        if let Some(start) = found {
            let from = start + n;
            return tokens[from..(from + k).min(tokens.len())].to_vec();
        }
    }
    Vec::new()
}

/// How a sequence's proposals have fared. Each proposal wholly refused
/// doubles the decode steps the sequence waits before proposing again (up
/// to 32), so text that does not repeat stops paying for verification, and
/// text that starts copying later (an answer that quotes after a preamble)
/// is caught again; an accepted token ends the wait.
#[derive(Debug, Default, Clone, Copy)]
pub struct Record {
    misses: u32,
    wait: u32,
}

impl Record {
    /// Whether to propose at this decode step (a step waited counts down).
    pub fn ready(&mut self) -> bool {
        if self.wait > 0 {
            self.wait -= 1;
            return false;
        }
        true
    }

    /// Records a proposal's outcome.
    pub fn judged(&mut self, accepted: usize) {
        if accepted > 0 {
            self.misses = 0;
        } else {
            self.misses = (self.misses + 1).min(5);
            self.wait = (1 << self.misses) - 1;
        }
    }
}

/// A draft model and its own KV cache, and how much of each sequence the
/// cache holds.
pub struct Drafter {
    model: LlamaModel,
    cache: KvCache,
    held: HashMap<SeqId, usize>,
}

impl Drafter {
    pub fn new(model: LlamaModel, cache: KvCache) -> Self {
        Self {
            model,
            cache,
            held: HashMap::new(),
        }
    }

    /// Frees the cache of sequences that are gone (finished or preempted:
    /// a resumed one is fed again from its start).
    pub fn retain(&mut self, alive: impl Fn(SeqId) -> bool) {
        let gone: Vec<SeqId> = self.held.keys().copied().filter(|&s| !alive(s)).collect();
        for s in gone {
            self.held.remove(&s);
            self.cache.blocks.free(s);
        }
    }

    /// After the target judged a proposal, the draft's cache is right for
    /// the sequence's first `valid` tokens only.
    pub fn keep(&mut self, seq: SeqId, valid: usize) {
        if let Some(h) = self.held.get_mut(&seq) {
            *h = (*h).min(valid);
        }
    }

    /// Up to `k` greedy tokens for each `(sequence, tokens, k)`: one pass
    /// feeds each sequence what its cache lacks and proposes the first
    /// token, then one pass per further token, all sequences in each. A
    /// sequence the draft's pool has no room for proposes nothing. Fails
    /// only when a forward pass fails.
    pub fn propose(
        &mut self,
        wants: &[(SeqId, &[u32], usize)],
    ) -> candle_core::Result<Vec<Vec<u32>>> {
        let mut out = vec![Vec::new(); wants.len()];
        let mut batch = ForwardBatch::default();
        let mut members = Vec::new();
        for (i, &(seq, tokens, k)) in wants.iter().enumerate() {
            let held = match self.held.get(&seq) {
                Some(&h) => h.min(tokens.len() - 1),
                None => {
                    self.cache.blocks.start(seq, &[]);
                    0
                }
            };
            if k == 0 || self.cache.prepare(seq, held, tokens.len() + k - 1).is_err() {
                self.held.remove(&seq);
                self.cache.blocks.free(seq);
                continue;
            }
            batch.push(seq, &tokens[held..], held);
            self.held.insert(seq, tokens.len());
            members.push(i);
        }
        while !batch.is_empty() {
            let logits = self.model.forward(&batch, &mut self.cache)?;
            let next = logits.argmax(candle_core::D::Minus1)?.to_vec1::<u32>()?;
            let mut again = ForwardBatch::default();
            let mut still = Vec::new();
            for (&i, token) in members.iter().zip(next) {
                let (seq, tokens, k) = wants[i];
                out[i].push(token);
                if out[i].len() < k {
                    let pos = tokens.len() + out[i].len() - 1;
                    again.push(seq, &[token], pos);
                    self.held.insert(seq, pos + 1);
                    still.push(i);
                }
            }
            batch = again;
            members = still;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_longest_suffix_seen_before_proposes_what_followed_it() {
        // "1 2 3" occurred before, followed by 4 5 6.
        let t = [9, 1, 2, 3, 4, 5, 6, 7, 1, 2, 3];
        assert_eq!(ngram(&t, 1, 3, 2), [4, 5]);
        assert_eq!(ngram(&t, 1, 3, 10), [4, 5, 6, 7, 1, 2, 3]);
        // The latest occurrence wins: 8 followed the later `1`.
        assert_eq!(ngram(&[1, 7, 1, 8, 2, 1], 1, 1, 1), [8]);
        // A longer match is preferred over a later, shorter one.
        assert_eq!(ngram(&[5, 6, 0, 9, 6, 1, 5, 6], 1, 2, 1), [0]);
        assert!(ngram(&[1, 2, 3], 1, 3, 4).is_empty());
        assert!(ngram(&[4, 2, 4], 2, 3, 4).is_empty(), "no 2-gram repeats");
        assert_eq!(ngram(&[4, 2, 4], 1, 3, 4), [2, 4]);
    }

    #[test]
    fn misses_back_off_and_an_accepted_token_resets() {
        let mut r = Record::default();
        let steps = |r: &mut Record| (0..100).take_while(|_| !r.ready()).count();
        assert_eq!(steps(&mut r), 0);
        for want in [1, 3, 7, 15, 31, 31] {
            r.judged(0);
            assert_eq!(steps(&mut r), want);
        }
        r.judged(2);
        assert_eq!(steps(&mut r), 0);
        r.judged(0);
        assert_eq!(steps(&mut r), 1, "the wait starts over");
    }
}
