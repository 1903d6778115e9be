//! The KV cache interface the runner writes through, and its first implementation:
//! one contiguous, preallocated buffer per sequence and layer.
use candle_core::{Result, Tensor};
use std::collections::HashMap;

/// Identifies one sequence in the engine for its whole life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SeqId(pub u64);

/// Storage of keys and values per sequence and layer. Keys and values are laid
/// out `[kv_heads, tokens, head_dim]`.
pub trait KvCache {
    /// Reserves room for a sequence of up to `max_tokens` tokens.
    fn allocate(&mut self, seq: SeqId, max_tokens: usize);
    /// Appends `k`, `v` for the next tokens of `seq` at `layer` and returns all
    /// keys and values of `seq` at that layer so far.
    fn append(
        &mut self,
        seq: SeqId,
        layer: usize,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<(Tensor, Tensor)>;
    /// Releases everything held for `seq`.
    fn free(&mut self, seq: SeqId);
    /// Number of sequences holding cache.
    fn num_sequences(&self) -> usize;
}

/// One growable buffer per sequence and layer, sized up front to the sequence's
/// prompt plus `max_tokens`.
pub struct ContiguousKvCache {
    num_layers: usize,
    seqs: HashMap<SeqId, Vec<candle_nn::kv_cache::KvCache>>,
}

impl ContiguousKvCache {
    pub fn new(num_layers: usize) -> Self {
        Self {
            num_layers,
            seqs: HashMap::new(),
        }
    }
}

impl KvCache for ContiguousKvCache {
    fn allocate(&mut self, seq: SeqId, max_tokens: usize) {
        let layers = (0..self.num_layers)
            .map(|_| candle_nn::kv_cache::KvCache::new(1, max_tokens.max(1)))
            .collect();
        self.seqs.insert(seq, layers);
    }

    fn append(
        &mut self,
        seq: SeqId,
        layer: usize,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let layers = self
            .seqs
            .get_mut(&seq)
            .ok_or_else(|| candle_core::Error::Msg(format!("no cache allocated for {seq:?}")))?;
        layers[layer].append(&k.contiguous()?, &v.contiguous()?)
    }

    fn free(&mut self, seq: SeqId) {
        self.seqs.remove(&seq);
    }

    fn num_sequences(&self) -> usize {
        self.seqs.len()
    }
}
