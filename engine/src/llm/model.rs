//! Our llama-family forward pass over a flattened batch: the tokens of many
//! sequences in one row, each with its own position, attending through the KV cache.
use super::config::LlamaConfig;
use super::kv_cache::{KvCache, SeqId};
use candle_core::quantized::QMatMul;
use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::RmsNorm;

/// A projection's weight, `[out, in]`: Q4_1 blocks run through our own
/// kernel on the CPU; every other type through candle's `QMatMul`.
pub enum Weight {
    Candle(QMatMul),
    Q4_1 {
        blocks: Vec<u8>,
        out: usize,
        inp: usize,
    },
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
            Weight::Q4_1 { blocks, out, inp } => {
                let rows = x.dim(0)?;
                let xs = x.flatten_all()?.to_vec1::<f32>()?;
                let mut ys = vec![0f32; rows * out];
                kernels::q4_1::matmul(&xs, rows, *inp, blocks, *out, &mut ys);
                Tensor::from_vec(ys, (rows, *out), x.device())?
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
    cos: Tensor,
    sin: Tensor,
    device: Device,
}

impl LlamaModel {
    pub fn new(config: LlamaConfig, weights: Weights, device: &Device) -> Result<Self> {
        let half = config.head_dim / 2;
        let inv_freq: Vec<f32> = (0..half)
            .map(|i| {
                1.0 / config
                    .rope_theta
                    .powf(2.0 * i as f32 / config.head_dim as f32)
            })
            .collect();
        let max_pos = config.max_position_embeddings;
        let inv_freq = Tensor::from_vec(inv_freq, (1, half), device)?;
        let t = Tensor::arange(0u32, max_pos as u32, device)?
            .to_dtype(DType::F32)?
            .reshape((max_pos, 1))?;
        let freqs = t.matmul(&inv_freq)?;
        Ok(Self {
            cos: freqs.cos()?,
            sin: freqs.sin()?,
            config,
            weights,
            device: device.clone(),
        })
    }

    /// Runs one forward pass and returns the logits of each segment's last
    /// token, `[segments, vocab]`, in segment order.
    pub fn forward(&self, batch: &ForwardBatch, cache: &mut dyn KvCache) -> Result<Tensor> {
        let c = &self.config;
        let n = batch.tokens.len();
        let tokens = Tensor::new(batch.tokens.as_slice(), &self.device)?;
        let positions = Tensor::new(batch.positions.as_slice(), &self.device)?;
        if let Some(&p) = batch.positions.iter().max() {
            if p as usize >= c.max_position_embeddings {
                candle_core::bail!(
                    "position {p} is beyond the model's {} positions",
                    c.max_position_embeddings
                )
            }
        }
        let cos = self.cos.index_select(&positions, 0)?;
        let sin = self.sin.index_select(&positions, 0)?;
        // Causal masks depend only on the segment, so they are built once for all layers.
        let masks = batch
            .segments
            .iter()
            .map(|s| self.causal_mask(s))
            .collect::<Result<Vec<_>>>()?;
        let mut x = self.weights.embed.index_select(&tokens, 0)?;
        for (li, layer) in self.weights.layers.iter().enumerate() {
            let h = layer.attn_norm.forward(&x)?;
            let q = self.heads(&layer.q.forward(&h)?, c.num_attention_heads, n)?;
            let k = self.heads(&layer.k.forward(&h)?, c.num_key_value_heads, n)?;
            let v = self.heads(&layer.v.forward(&h)?, c.num_key_value_heads, n)?;
            let (q, k) = (self.rope(&q, &cos, &sin)?, self.rope(&k, &cos, &sin)?);
            let mut outs = Vec::with_capacity(batch.segments.len());
            for (s, mask) in batch.segments.iter().zip(&masks) {
                let (ks, vs) = cache.append(
                    s.seq,
                    li,
                    &k.narrow(1, s.offset, s.len)?,
                    &v.narrow(1, s.offset, s.len)?,
                )?;
                outs.push(self.attention(
                    &q.narrow(1, s.offset, s.len)?,
                    &ks,
                    &vs,
                    mask.as_ref(),
                )?);
            }
            // [heads, n, head_dim] -> [n, heads * head_dim]
            let attn = Tensor::cat(&outs, 1)?
                .transpose(0, 1)?
                .reshape((n, c.num_attention_heads * c.head_dim))?;
            x = (x + layer.o.forward(&attn)?)?;
            let h = layer.ffn_norm.forward(&x)?;
            let gated =
                (candle_nn::ops::silu(&layer.gate.forward(&h)?)? * layer.up.forward(&h)?)?;
            x = (x + layer.down.forward(&gated)?)?;
        }
        let last: Vec<u32> = batch
            .segments
            .iter()
            .map(|s| (s.offset + s.len - 1) as u32)
            .collect();
        let last = x.index_select(&Tensor::new(last.as_slice(), &self.device)?, 0)?;
        self.weights
            .lm_head
            .forward(&self.weights.norm.forward(&last)?)
    }

    /// `[len, ctx]` with `-inf` where query `i` (at `start_pos + i`) would see a
    /// later key; `None` for a single query, which sees the whole cache.
    fn causal_mask(&self, s: &Segment) -> Result<Option<Tensor>> {
        if s.len == 1 {
            return Ok(None);
        }
        let ctx = s.start_pos + s.len;
        let mask: Vec<f32> = (0..s.len)
            .flat_map(|i| {
                (0..ctx).map(move |j| {
                    if j > s.start_pos + i {
                        f32::NEG_INFINITY
                    } else {
                        0.0
                    }
                })
            })
            .collect();
        Tensor::from_vec(mask, (s.len, ctx), &self.device).map(Some)
    }

    /// `[n, heads * head_dim]` -> `[heads, n, head_dim]`, contiguous.
    fn heads(&self, x: &Tensor, heads: usize, n: usize) -> Result<Tensor> {
        x.reshape((n, heads, self.config.head_dim))?
            .transpose(0, 1)?
            .contiguous()
    }

    fn rope(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let x = x.unsqueeze(0)?;
        let y = if self.config.rope_interleaved {
            candle_nn::rotary_emb::rope_i(&x, cos, sin)?
        } else {
            candle_nn::rotary_emb::rope(&x, cos, sin)?
        };
        y.squeeze(0)
    }

    /// Causal grouped-query attention of one segment's queries `[heads, len, d]`
    /// over its cached keys and values `[kv_heads, ctx, d]`.
    fn attention(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let c = &self.config;
        let (heads, len, d) = q.dims3()?;
        let (kv_heads, ctx, _) = k.dims3()?;
        let group = heads / kv_heads;
        let q = q.contiguous()?.reshape((kv_heads, group * len, d))?;
        let scores = (q.matmul(&k.t()?)? / (c.head_dim as f64).sqrt())?;
        let scores = match mask {
            Some(mask) => scores
                .reshape((kv_heads, group, len, ctx))?
                .broadcast_add(mask)?
                .reshape((kv_heads, group * len, ctx))?,
            None => scores,
        };
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        probs.matmul(&v.contiguous()?)?.reshape((heads, len, d))
    }
}
