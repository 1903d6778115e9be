//! Our llama-family forward pass over a flattened batch: the tokens of many
//! sequences in one row, each with its own position, attending through the
//! paged KV cache.
use super::config::LlamaConfig;
use super::kv_cache::{KvCache, KvLayout, SeqId};
use candle_core::quantized::QMatMul;
use candle_core::{Device, Module, Result, Tensor};
use candle_nn::RmsNorm;
use kernels::paged_attention::{paged_attention, LayerKv, SeqQueries};
use kernels::quant::QuantMatrix;
use kernels::rope::RopeTables;

/// A projection's weight, `[out, in]`: Q4_0, Q4_1 and Q8_0 blocks run through
/// our own kernel on the CPU; every other type through candle's `QMatMul`.
pub enum Weight {
    Candle(QMatMul),
    Quant(QuantMatrix),
}

/// A projection with an optional bias.
pub struct Linear {
    pub weight: Weight,
    pub bias: Option<Tensor>,
}

impl Linear {
    pub fn new(weight: QMatMul, bias: Option<Tensor>) -> Self {
        Self {
            weight: Weight::Candle(weight),
            bias,
        }
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = match &self.weight {
            Weight::Candle(w) => w.forward(x)?,
            Weight::Quant(w) => {
                let rows = x.dim(0)?;
                let xs = x.flatten_all()?.to_vec1::<f32>()?;
                let mut ys = vec![0f32; rows * w.n];
                w.matmul(&xs, &mut ys);
                Tensor::from_vec(ys, (rows, w.n), x.device())?
            }
        };
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}

pub struct Layer {
    pub attn_norm: RmsNorm,
    pub q: Linear,
    pub k: Linear,
    pub v: Linear,
    pub o: Linear,
    pub ffn_norm: RmsNorm,
    pub gate: Linear,
    pub up: Linear,
    pub down: Linear,
}

/// All weights of a model, however they were stored.
pub struct Weights {
    /// `[vocab, hidden]`, f32.
    pub embed: Tensor,
    pub layers: Vec<Layer>,
    pub norm: RmsNorm,
    pub lm_head: Linear,
}

/// One sequence's slice of a flattened batch.
#[derive(Debug, Clone, Copy)]
pub struct Segment {
    pub seq: SeqId,
    /// Offset of its first token in the flattened batch.
    pub offset: usize,
    pub len: usize,
    /// Position of its first token in the sequence (tokens already cached).
    pub start_pos: usize,
}

/// The input of one forward pass.
#[derive(Debug, Default, Clone)]
pub struct ForwardBatch {
    pub tokens: Vec<u32>,
    pub positions: Vec<u32>,
    pub segments: Vec<Segment>,
}

impl ForwardBatch {
    /// Adds `tokens` of `seq`, starting at position `start_pos`.
    pub fn push(&mut self, seq: SeqId, tokens: &[u32], start_pos: usize) {
        self.segments.push(Segment {
            seq,
            offset: self.tokens.len(),
            len: tokens.len(),
            start_pos,
        });
        self.tokens.extend_from_slice(tokens);
        self.positions
            .extend((start_pos..start_pos + tokens.len()).map(|p| p as u32));
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }
}

pub struct LlamaModel {
    pub config: LlamaConfig,
    weights: Weights,
    rope: RopeTables,
    device: Device,
}

impl LlamaModel {
    pub fn new(config: LlamaConfig, weights: Weights, device: &Device) -> Result<Self> {
        Ok(Self {
            rope: RopeTables::new(
                config.head_dim,
                config.rope_theta,
                config.max_position_embeddings,
            ),
            config,
            weights,
            device: device.clone(),
        })
    }

    /// The shape of one layer's KV pool with blocks of `block_size` tokens.
    pub fn kv_layout(&self, block_size: usize) -> KvLayout {
        KvLayout {
            block_size,
            kv_heads: self.config.num_key_value_heads,
            head_dim: self.config.head_dim,
        }
    }

    /// Runs one forward pass and returns the logits of each segment's last
    /// token, `[segments, vocab]`, in segment order. Every segment's sequence
    /// must hold blocks for its tokens ([`KvCache::prepare`]).
    pub fn forward(&self, batch: &ForwardBatch, cache: &mut KvCache) -> Result<Tensor> {
        let x = self.hidden(batch, cache)?;
        let last: Vec<u32> = batch
            .segments
            .iter()
            .map(|s| (s.offset + s.len - 1) as u32)
            .collect();
        let last = x.index_select(&Tensor::new(last.as_slice(), &self.device)?, 0)?;
        self.head(&last)
    }

    /// The logits of hidden states `[rows, hidden]`.
    fn head(&self, x: &Tensor) -> Result<Tensor> {
        self.weights.lm_head.forward(&self.weights.norm.forward(x)?)
    }

    /// Teacher forcing: the log-probability of each of `tokens[from..]` given
    /// the tokens before it, from one forward pass over the whole sequence in
    /// a private cache (the engine's pool is not touched).
    pub fn score(&self, tokens: &[u32], from: usize) -> Result<Vec<f32>> {
        if from == 0 || from > tokens.len() {
            candle_core::bail!(
                "scoring starts after the first token and within the {} given",
                tokens.len()
            )
        }
        let layout = self.kv_layout(16);
        let blocks = tokens.len().div_ceil(layout.block_size);
        let mut cache = KvCache::new(self.config.num_hidden_layers, layout, blocks, false);
        cache
            .allocate(SeqId(0), tokens.len())
            .map_err(|e| candle_core::Error::Msg(format!("{e:?}")))?;
        let mut batch = ForwardBatch::default();
        batch.push(SeqId(0), tokens, 0);
        let x = self.hidden(&batch, &mut cache)?;
        let mut out = Vec::with_capacity(tokens.len() - from);
        // Row i predicts token i + 1; the vocabulary-wide logits are made a
        // few rows at a time so that long sequences stay small.
        let mut row = from - 1;
        while row < tokens.len() - 1 {
            let rows = (tokens.len() - 1 - row).min(32);
            let logits = self.head(&x.narrow(0, row, rows)?)?.to_vec2::<f32>()?;
            for (i, l) in logits.iter().enumerate() {
                out.push(kernels::sampling::log_softmax(l)[tokens[row + i + 1] as usize]);
            }
            row += rows;
        }
        Ok(out)
    }

    /// The final hidden state of every token in the batch, `[tokens, hidden]`.
    fn hidden(&self, batch: &ForwardBatch, cache: &mut KvCache) -> Result<Tensor> {
        let c = &self.config;
        let n = batch.tokens.len();
        let (heads, kv_heads, d) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        if let Some(&p) = batch.positions.iter().max() {
            if p as usize >= self.rope.positions() {
                candle_core::bail!(
                    "position {p} is beyond the model's {} positions",
                    self.rope.positions()
                )
            }
        }
        let layout = cache.layout;
        if layout.kv_heads != kv_heads || layout.head_dim != d {
            candle_core::bail!("KV cache layout {layout:?} does not fit this model")
        }
        let tables: Vec<Vec<u32>> = batch
            .segments
            .iter()
            .map(|s| cache.blocks.table(s.seq))
            .collect();
        for (s, t) in batch.segments.iter().zip(&tables) {
            if t.len() * layout.block_size < s.start_pos + s.len {
                candle_core::bail!("{:?} holds no cache blocks for its tokens", s.seq)
            }
        }
        let seqs: Vec<SeqQueries> = batch
            .segments
            .iter()
            .zip(&tables)
            .map(|(s, t)| SeqQueries {
                offset: s.offset,
                len: s.len,
                start_pos: s.start_pos,
                block_table: t,
            })
            .collect();
        let tokens = Tensor::new(batch.tokens.as_slice(), &self.device)?;
        let scale = 1.0 / (d as f32).sqrt();
        let kv_width = kv_heads * d;
        let mut x = self.weights.embed.index_select(&tokens, 0)?;
        for (li, layer) in self.weights.layers.iter().enumerate() {
            let h = layer.attn_norm.forward(&x)?;
            let project = |l: &Linear, rows: usize| -> Result<Vec<f32>> {
                let mut y = l.forward(&h)?.flatten_all()?.to_vec1::<f32>()?;
                if rows > 0 {
                    self.rope
                        .apply(&mut y, rows, &batch.positions, c.rope_interleaved);
                }
                Ok(y)
            };
            let q = project(&layer.q, heads)?;
            let k = project(&layer.k, kv_heads)?;
            let v = project(&layer.v, 0)?;
            for (s, t) in batch.segments.iter().zip(&tables) {
                let rows = s.offset * kv_width..(s.offset + s.len) * kv_width;
                layout.write(&mut cache.k[li], t, s.start_pos, &k[rows.clone()]);
                layout.write(&mut cache.v[li], t, s.start_pos, &v[rows]);
            }
            let mut out = vec![0f32; n * heads * d];
            let kv = LayerKv {
                k: &cache.k[li],
                v: &cache.v[li],
                layout,
            };
            paged_attention(&q, heads, &seqs, kv, scale, &mut out);
            let attn = Tensor::from_vec(out, (n, heads * d), &self.device)?;
            x = (x + layer.o.forward(&attn)?)?;
            let h = layer.ffn_norm.forward(&x)?;
            let gated =
                (candle_nn::ops::silu(&layer.gate.forward(&h)?)? * layer.up.forward(&h)?)?;
            x = (x + layer.down.forward(&gated)?)?;
        }
        Ok(x)
    }
}
