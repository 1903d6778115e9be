//! The paged KV cache: one preallocated pool of fixed-size blocks per layer for
//! keys and values, and the block manager that hands the blocks out.
use super::block_manager::{BlockManager, OutOfBlocks};
pub use kernels::paged_attention::{KvDtype, KvLayout, Pool};

/// Identifies one sequence in the engine for its whole life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SeqId(pub u64);

pub struct KvCache {
    pub layout: KvLayout,
    pub dtype: KvDtype,
    /// Per layer, `[num_blocks, kv_heads, block_size, head_dim]`.
    pub k: Vec<Pool>,
    pub v: Vec<Pool>,
    pub blocks: BlockManager,
}

impl KvCache {
    /// A pool of `num_blocks` blocks. The memory is zeroed lazily by the OS, so
    /// a large pool costs only what sequences touch.
    pub fn new(
        num_layers: usize,
        layout: KvLayout,
        dtype: KvDtype,
        num_blocks: usize,
        prefix_caching: bool,
    ) -> Self {
        let len = num_blocks * layout.block_len();
        let pool = || Pool::zeros(dtype, layout, len);
        Self {
            layout,
            dtype,
            k: (0..num_layers).map(|_| pool()).collect(),
            v: (0..num_layers).map(|_| pool()).collect(),
            blocks: BlockManager::new(num_blocks, layout.block_size, prefix_caching),
        }
    }

    /// Bytes one block takes over all layers, keys and values.
    pub fn block_bytes(num_layers: usize, layout: KvLayout, dtype: KvDtype) -> usize {
        2 * num_layers * layout.kv_heads * layout.block_size * dtype.row_bytes(layout.head_dim)
    }

    /// Starts `seq` without prefix reuse, with room for `tokens` tokens.
    pub fn allocate(&mut self, seq: SeqId, tokens: usize) -> Result<(), OutOfBlocks> {
        self.blocks.start(seq, &[]);
        self.prepare(seq, 0, tokens)
    }

    /// Makes room for `seq` to hold `total` tokens with `computed` cached, doing
    /// any copy-on-write the block manager asks for.
    pub fn prepare(
        &mut self,
        seq: SeqId,
        computed: usize,
        total: usize,
    ) -> Result<(), OutOfBlocks> {
        let n = self.layout.block_len();
        for c in self.blocks.reserve(seq, computed, total)? {
            let (src, dst) = (c.src.0 as usize * n, c.dst.0 as usize * n);
            for pool in self.k.iter_mut().chain(self.v.iter_mut()) {
                pool.copy_within(src..src + n, dst, self.layout.head_dim);
            }
        }
        Ok(())
    }
}
