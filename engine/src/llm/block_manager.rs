//! The KV block manager: a fixed pool of blocks, a block table per sequence,
//! reference counts for sharing (prefixes, parallel samples) with copy-on-write,
//! and automatic prefix caching keyed by (parent key, block tokens), evicted LRU.
use super::kv_cache::SeqId;
use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};

/// Index of one block in the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockId(pub u32);

/// Not enough free blocks for what was asked; nothing was changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutOfBlocks {
    pub needed: usize,
    pub free: usize,
}

/// A block copy the runner must do before the next forward pass (copy-on-write).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockCopy {
    pub src: BlockId,
    pub dst: BlockId,
}

/// The identity of a full block's contents: its tokens and everything before them.
#[derive(Debug, Clone, PartialEq, Eq)]
struct BlockKey {
    hash: u64,
    parent: Option<u64>,
    tokens: Vec<u32>,
}

impl BlockKey {
    fn new(parent: Option<u64>, tokens: &[u32]) -> Self {
        let mut h = DefaultHasher::new();
        parent.hash(&mut h);
        tokens.hash(&mut h);
        Self {
            hash: h.finish(),
            parent,
            tokens: tokens.to_vec(),
        }
    }
}

#[derive(Debug, Default)]
struct BlockMeta {
    ref_count: u32,
    /// Set once the block is full and registered in the prefix cache.
    key: Option<BlockKey>,
    /// Position in the free queue while `ref_count == 0`.
    free_stamp: Option<u64>,
}

#[derive(Debug, Default)]
struct SeqBlocks {
    blocks: Vec<BlockId>,
    /// Leading blocks already keyed (registered or found in the cache).
    keyed: usize,
    /// What its prefix-cache lookup added to the stats.
    lookup: PrefixStats,
}

/// Prefix-cache lookups since start, in tokens.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PrefixStats {
    pub queried: u64,
    pub hit: u64,
}

pub struct BlockManager {
    block_size: usize,
    blocks: Vec<BlockMeta>,
    /// Free blocks, oldest first: allocation takes (and evicts) from the front.
    free: BTreeMap<u64, BlockId>,
    next_stamp: u64,
    /// Full blocks by content hash, free or in use.
    cached: HashMap<u64, BlockId>,
    prefix_caching: bool,
    seqs: HashMap<SeqId, SeqBlocks>,
    stats: PrefixStats,
}

impl BlockManager {
    pub fn new(num_blocks: usize, block_size: usize, prefix_caching: bool) -> Self {
        assert!(block_size > 0 && num_blocks > 0);
        let mut m = Self {
            block_size,
            blocks: (0..num_blocks).map(|_| BlockMeta::default()).collect(),
            free: BTreeMap::new(),
            next_stamp: 0,
            cached: HashMap::new(),
            prefix_caching,
            seqs: HashMap::new(),
            stats: PrefixStats::default(),
        };
        for b in 0..num_blocks {
            m.push_free(BlockId(b as u32));
        }
        m
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn num_blocks(&self) -> usize {
        self.blocks.len()
    }

    /// Blocks no sequence holds (cached ones included: they can be evicted).
    pub fn num_free(&self) -> usize {
        self.free.len()
    }

    /// Share of blocks held by sequences, 0 to 1.
    pub fn usage(&self) -> f64 {
        1.0 - self.num_free() as f64 / self.num_blocks() as f64
    }

    pub fn prefix_stats(&self) -> PrefixStats {
        self.stats
    }

    pub fn has(&self, seq: SeqId) -> bool {
        self.seqs.contains_key(&seq)
    }

    /// The block table of `seq`, as the attention kernel reads it.
    pub fn table(&self, seq: SeqId) -> Vec<u32> {
        self.seqs
            .get(&seq)
            .map(|s| s.blocks.iter().map(|b| b.0).collect())
            .unwrap_or_default()
    }

    /// Blocks `seq` needs beyond what it holds to cover `total` tokens.
    fn new_blocks_for(&self, seq: SeqId, total: usize) -> usize {
        let held = self.seqs.get(&seq).map_or(0, |s| s.blocks.len());
        total.div_ceil(self.block_size).saturating_sub(held)
    }

    /// Starts `seq` with the longest cached prefix of `tokens` and returns how
    /// many tokens it covers. At least one token is always left to compute, so
    /// the caller gets logits to sample from.
    pub fn start(&mut self, seq: SeqId, tokens: &[u32]) -> usize {
        assert!(!self.seqs.contains_key(&seq), "{seq:?} already started");
        let mut entry = SeqBlocks::default();
        if self.prefix_caching {
            let cacheable = tokens.len().saturating_sub(1) / self.block_size;
            self.stats.queried += tokens.len() as u64;
            let mut parent = None;
            for chunk in tokens.chunks_exact(self.block_size).take(cacheable) {
                let key = BlockKey::new(parent, chunk);
                let Some(&b) = self.cached.get(&key.hash) else {
                    break;
                };
                if self.blocks[b.0 as usize].key.as_ref() != Some(&key) {
                    break; // a hash collision, not the same contents
                }
                self.retain(b);
                entry.blocks.push(b);
                parent = Some(key.hash);
            }
            entry.keyed = entry.blocks.len();
            entry.lookup = PrefixStats {
                queried: tokens.len() as u64,
                hit: (entry.blocks.len() * self.block_size) as u64,
            };
            self.stats.hit += entry.lookup.hit;
        }
        let cached = entry.blocks.len() * self.block_size;
        self.seqs.insert(seq, entry);
        cached
    }

    /// Makes `seq` able to hold `total` tokens when its first `computed` are in
    /// the cache: appends blocks, and gives it a private copy of a shared block
    /// it is about to write into. Either all of it happens or nothing does.
    pub fn reserve(
        &mut self,
        seq: SeqId,
        computed: usize,
        total: usize,
    ) -> Result<Vec<BlockCopy>, OutOfBlocks> {
        let first_write = computed / self.block_size;
        let s = self.seqs.get(&seq).expect("reserve on an unknown sequence");
        let shared = s
            .blocks
            .get(first_write)
            .filter(|b| computed < total && self.blocks[b.0 as usize].ref_count > 1)
            .copied();
        let needed = self.new_blocks_for(seq, total) + usize::from(shared.is_some());
        if needed > self.num_free() {
            return Err(OutOfBlocks {
                needed,
                free: self.num_free(),
            });
        }
        let mut copies = Vec::new();
        if let Some(src) = shared {
            let dst = self.take_free();
            self.blocks[src.0 as usize].ref_count -= 1;
            let s = self.seqs.get_mut(&seq).expect("checked above");
            s.blocks[first_write] = dst;
            s.keyed = s.keyed.min(first_write);
            copies.push(BlockCopy { src, dst });
        }
        for _ in 0..self.new_blocks_for(seq, total) {
            let b = self.take_free();
            self.seqs
                .get_mut(&seq)
                .expect("checked above")
                .blocks
                .push(b);
        }
        Ok(copies)
    }

    /// Records that the first `computed` of `tokens` are in the cache, so the
    /// full blocks among them become reusable by later requests.
    pub fn computed(&mut self, seq: SeqId, tokens: &[u32], computed: usize) {
        if !self.prefix_caching {
            return;
        }
        let Some(s) = self.seqs.get(&seq) else {
            return;
        };
        let full = computed / self.block_size;
        let mut parent = match s.keyed {
            0 => None,
            k => self.blocks[s.blocks[k - 1].0 as usize]
                .key
                .as_ref()
                .map(|key| key.hash),
        };
        let start = s.keyed;
        let blocks: Vec<BlockId> = s.blocks[start..full].to_vec();
        for (i, b) in blocks.into_iter().enumerate() {
            let i = start + i;
            let key = BlockKey::new(
                parent,
                &tokens[i * self.block_size..(i + 1) * self.block_size],
            );
            parent = Some(key.hash);
            // A block with the same contents may already be cached (two requests
            // prefilled the same prefix at once); the first one stays the entry.
            self.cached.entry(key.hash).or_insert(b);
            self.blocks[b.0 as usize].key = Some(key);
        }
        if let Some(s) = self.seqs.get_mut(&seq) {
            s.keyed = s.keyed.max(full);
        }
    }

    /// Gives `child` the blocks of `parent`, shared (e.g. parallel samples of
    /// one prompt); the first divergent write copies the shared last block.
    pub fn fork(&mut self, parent: SeqId, child: SeqId) {
        let p = self.seqs.get(&parent).expect("fork of an unknown sequence");
        let entry = SeqBlocks {
            blocks: p.blocks.clone(),
            keyed: p.keyed,
            lookup: PrefixStats::default(),
        };
        for &b in &entry.blocks {
            self.blocks[b.0 as usize].ref_count += 1;
        }
        self.seqs.insert(child, entry);
    }

    /// Takes back a [`start`](Self::start) whose sequence could not be admitted
    /// after all: its blocks are released and its lookup leaves the stats, so
    /// that a request waiting for blocks is counted once, when it is admitted.
    pub fn undo_start(&mut self, seq: SeqId) {
        if let Some(s) = self.seqs.get(&seq) {
            self.stats.queried -= s.lookup.queried;
            self.stats.hit -= s.lookup.hit;
        }
        self.free(seq);
    }

    /// Releases `seq`'s blocks. Last blocks are freed first, so they are
    /// evicted first: a prompt's tail is the least likely to be shared.
    pub fn free(&mut self, seq: SeqId) {
        let Some(s) = self.seqs.remove(&seq) else {
            return;
        };
        for &b in s.blocks.iter().rev() {
            let meta = &mut self.blocks[b.0 as usize];
            meta.ref_count -= 1;
            if meta.ref_count == 0 {
                self.push_free(b);
            }
        }
    }

    fn push_free(&mut self, b: BlockId) {
        let stamp = self.next_stamp;
        self.next_stamp += 1;
        self.blocks[b.0 as usize].free_stamp = Some(stamp);
        self.free.insert(stamp, b);
    }

    /// Takes a cached block back into use (it may be free, awaiting eviction).
    fn retain(&mut self, b: BlockId) {
        let meta = &mut self.blocks[b.0 as usize];
        if let Some(stamp) = meta.free_stamp.take() {
            self.free.remove(&stamp);
        }
        meta.ref_count += 1;
    }

    /// Pops the least recently freed block, evicting its cached contents.
    fn take_free(&mut self) -> BlockId {
        let (_, b) = self.free.pop_first().expect("caller checked free blocks");
        let meta = &mut self.blocks[b.0 as usize];
        meta.free_stamp = None;
        meta.ref_count = 1;
        if let Some(key) = meta.key.take() {
            if self.cached.get(&key.hash) == Some(&b) {
                self.cached.remove(&key.hash);
            }
        }
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toks(n: usize, base: u32) -> Vec<u32> {
        (0..n as u32).map(|i| base + i).collect()
    }

    /// Computes all of `tokens` for `seq`, then ends it; its full blocks stay cached.
    fn run_and_free(m: &mut BlockManager, seq: SeqId, tokens: &[u32]) {
        m.start(seq, tokens);
        m.reserve(seq, 0, tokens.len()).unwrap();
        m.computed(seq, tokens, tokens.len());
        m.free(seq);
    }

    #[test]
    fn blocks_return_to_the_pool_when_sequences_end() {
        let mut m = BlockManager::new(8, 4, false);
        assert_eq!(m.start(SeqId(1), &toks(10, 0)), 0);
        assert!(m.reserve(SeqId(1), 0, 10).unwrap().is_empty());
        assert_eq!(m.table(SeqId(1)).len(), 3);
        assert_eq!(m.num_free(), 5);
        m.reserve(SeqId(1), 10, 13).unwrap();
        assert_eq!(m.num_free(), 4);
        m.start(SeqId(2), &toks(20, 100));
        let err = m.reserve(SeqId(2), 0, 20).unwrap_err();
        assert_eq!(err, OutOfBlocks { needed: 5, free: 4 });
        assert!(
            m.table(SeqId(2)).is_empty(),
            "a failed reserve changes nothing"
        );
        m.free(SeqId(1));
        m.free(SeqId(2));
        assert_eq!(m.num_free(), 8);
        assert_eq!(m.usage(), 0.0);
    }

    #[test]
    fn a_cached_prefix_is_shared_and_never_covers_the_last_token() {
        let mut m = BlockManager::new(16, 4, true);
        let prompt = toks(10, 0);
        m.start(SeqId(1), &prompt);
        m.reserve(SeqId(1), 0, 10).unwrap();
        m.computed(SeqId(1), &prompt, 10);
        // Same first 9 tokens, different 10th: two full blocks are shared.
        let mut other = prompt.clone();
        other[9] = 999;
        assert_eq!(m.start(SeqId(2), &other), 8);
        assert_eq!(m.table(SeqId(2)), m.table(SeqId(1))[..2].to_vec());
        // An 8-token prompt equal to two cached blocks still computes its last token.
        assert_eq!(m.start(SeqId(3), &prompt[..8]), 4);
        assert_eq!(
            m.prefix_stats(),
            PrefixStats {
                queried: 28,
                hit: 12
            }
        );
        // A different first block shares nothing, even with the same second block.
        let mut shifted = prompt.clone();
        shifted[0] = 777;
        assert_eq!(m.start(SeqId(4), &shifted), 0);
    }

    #[test]
    fn an_undone_start_leaves_no_trace() {
        let mut m = BlockManager::new(4, 2, true);
        let a = toks(5, 0);
        run_and_free(&mut m, SeqId(1), &a);
        let before = m.prefix_stats();
        assert_eq!(m.start(SeqId(2), &a), 4);
        m.undo_start(SeqId(2));
        assert_eq!(m.prefix_stats(), before);
        assert_eq!(m.num_free(), 4);
        assert!(!m.has(SeqId(2)));
    }

    #[test]
    fn freed_cached_blocks_are_reused_until_evicted_lru() {
        let mut m = BlockManager::new(4, 2, true);
        let a = toks(5, 0);
        run_and_free(&mut m, SeqId(1), &a);
        assert_eq!(m.num_free(), 4);
        assert_eq!(
            m.start(SeqId(2), &a),
            4,
            "both full blocks found after free"
        );
        m.free(SeqId(2));
        // A different request needing every block evicts them all.
        let b = toks(8, 50);
        assert_eq!(m.start(SeqId(3), &b), 0);
        m.reserve(SeqId(3), 0, 8).unwrap();
        m.free(SeqId(3));
        assert_eq!(m.start(SeqId(4), &a), 0, "evicted");
    }

    #[test]
    fn eviction_takes_the_oldest_freed_and_tails_first() {
        let mut m = BlockManager::new(6, 2, true);
        let a = toks(7, 0);
        // 4 blocks, 3 keyed; the last block is freed first.
        run_and_free(&mut m, SeqId(1), &a);
        // Taking 4 blocks evicts the 2 never used, then a's unkeyed tail, then
        // a's last keyed block.
        m.start(SeqId(2), &toks(8, 100));
        m.reserve(SeqId(2), 0, 8).unwrap();
        assert_eq!(m.start(SeqId(3), &a), 4, "a's first two blocks survive");
    }

    #[test]
    fn forked_sequences_copy_the_shared_block_on_first_write() {
        let mut m = BlockManager::new(8, 4, false);
        m.start(SeqId(1), &toks(6, 0));
        m.reserve(SeqId(1), 0, 6).unwrap();
        m.fork(SeqId(1), SeqId(2));
        assert_eq!(m.num_free(), 6, "forking takes no blocks");
        // The parent writes token 6 into block 1, shared: it gets a copy.
        let copies = m.reserve(SeqId(1), 6, 7).unwrap();
        assert_eq!(copies.len(), 1);
        assert_eq!(copies[0].src.0, m.table(SeqId(2))[1]);
        assert_eq!(copies[0].dst.0, m.table(SeqId(1))[1]);
        assert_eq!(m.table(SeqId(1))[0], m.table(SeqId(2))[0]);
        // The child is now the only holder and writes in place.
        assert!(m.reserve(SeqId(2), 6, 7).unwrap().is_empty());
        m.free(SeqId(1));
        m.free(SeqId(2));
        assert_eq!(m.num_free(), 8);
    }
}
