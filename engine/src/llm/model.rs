//! Our llama-family forward pass over a flattened batch: the tokens of many
//! sequences in one row, each with its own position, attending through the
//! paged KV cache.
use super::config::{Activation, LlamaConfig};
use super::kv_cache::{KvCache, KvDtype, KvLayout, SeqId};
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Result, Tensor};
use kernels::paged_attention::{paged_attention, LayerKv, Scoring, SeqQueries};
use kernels::quant::{Isa, QuantMatrix};
use kernels::rope::RopeTables;

/// A projection's weight, `[out, in]`: GGUF blocks with a kernel of ours run
/// through it on the CPU, anything else through candle's `QMatMul`; several
/// projections of the same input can sit side by side.
pub enum Weight {
    Candle(QMatMul, Device),
    Quant(QuantMatrix),
    Concat(Vec<Linear>),
}

/// A projection with an optional bias.
pub struct Linear {
    weight: Weight,
    bias: Option<Vec<f32>>,
    out: usize,
}

impl Linear {
    /// `weight` is `[out, in]` on `device`.
    pub fn candle(weight: QMatMul, out: usize, bias: Option<Vec<f32>>, device: &Device) -> Self {
        Self {
            weight: Weight::Candle(weight, device.clone()),
            bias,
            out,
        }
    }

    pub fn quant(weight: QuantMatrix, bias: Option<Vec<f32>>) -> Self {
        Self {
            out: weight.n,
            weight: Weight::Quant(weight),
            bias,
        }
    }

    pub fn set_bias(&mut self, bias: Vec<f32>) {
        self.bias = Some(bias);
    }

    /// Projections of the same input whose outputs are concatenated per row.
    /// Blocks of one type merge into a single matrix, so that one pass over
    /// the input and one parallel section serve all of them.
    pub fn concat(parts: Vec<Linear>) -> Self {
        let out = parts.iter().map(|p| p.out).sum();
        let bias = parts.iter().any(|p| p.bias.is_some()).then(|| {
            parts
                .iter()
                .flat_map(|p| p.bias.clone().unwrap_or_else(|| vec![0.0; p.out]))
                .collect()
        });
        let mergeable = match parts.first().map(|p| &p.weight) {
            Some(Weight::Quant(first)) => parts.iter().all(
                |p| matches!(&p.weight, Weight::Quant(m) if m.ty == first.ty && m.k == first.k),
            ),
            _ => false,
        };
        let weight = if mergeable {
            Weight::Quant(QuantMatrix::concat(
                parts
                    .into_iter()
                    .filter_map(|p| match p.weight {
                        Weight::Quant(m) => Some(m),
                        _ => None,
                    })
                    .collect(),
            ))
        } else {
            Weight::Concat(parts)
        };
        Self { weight, bias, out }
    }

    /// `[rows, out]` for `x` of `[rows, in]`.
    fn forward(&self, x: &[f32], rows: usize) -> Result<Vec<f32>> {
        let mut y = match &self.weight {
            Weight::Candle(w, device) => {
                let x = Tensor::from_slice(x, (rows, x.len() / rows.max(1)), device)?;
                w.forward(&x)?.flatten_all()?.to_vec1::<f32>()?
            }
            Weight::Quant(w) => {
                let mut y = vec![0f32; rows * w.n];
                w.matmul(x, &mut y);
                y
            }
            Weight::Concat(parts) => {
                let mut y = vec![0f32; rows * self.out];
                let mut at = 0;
                for p in parts {
                    let part = p.forward(x, rows)?;
                    for (dst, src) in y.chunks_exact_mut(self.out).zip(part.chunks_exact(p.out)) {
                        dst[at..at + p.out].copy_from_slice(src);
                    }
                    at += p.out;
                }
                y
            }
        };
        if let Some(b) = &self.bias {
            for row in y.chunks_exact_mut(self.out) {
                row.iter_mut().zip(b).for_each(|(y, b)| *y += b);
            }
        }
        Ok(y)
    }
}

/// Root-mean-square normalization with a learned scale, as candle computes it.
pub struct RmsNorm {
    weight: Vec<f32>,
    eps: f32,
}

impl RmsNorm {
    pub fn new(weight: Vec<f32>, eps: f64) -> Self {
        Self {
            weight,
            eps: eps as f32,
        }
    }

    fn forward(&self, x: &[f32]) -> Vec<f32> {
        let dim = self.weight.len();
        let mut y = vec![0f32; x.len()];
        for (x, y) in x.chunks_exact(dim).zip(y.chunks_exact_mut(dim)) {
            let sum2: f32 = x.iter().map(|v| v * v).sum();
            let m = (sum2 / dim as f32 + self.eps).sqrt();
            for ((y, x), w) in y.iter_mut().zip(x).zip(&self.weight) {
                *y = x / m * w;
            }
        }
        y
    }
}

pub struct Layer {
    pub attn_norm: RmsNorm,
    /// q, k and v side by side.
    pub qkv: Linear,
    /// Per-head norms of q and k (`[head_dim]` each), where the model has them.
    pub qk_norm: Option<(RmsNorm, RmsNorm)>,
    pub o: Linear,
    /// Norms of attention's and the MLP's outputs, where the model has them.
    pub post_norms: Option<(RmsNorm, RmsNorm)>,
    pub ffn_norm: RmsNorm,
    /// gate and up side by side.
    pub gate_up: Linear,
    pub down: Linear,
}

/// The token embedding table, `[vocab, width]`.
pub enum Embedding {
    /// Rows of f32.
    Dense { rows: Vec<f32>, width: usize },
    /// A GGUF tensor's quantized blocks, the rows a batch looks up
    /// dequantized together: a decode step reads one row a token, so the
    /// whole table need not sit in memory as f32 (SmolLM2's Q8_0 table is
    /// 28 MB in blocks and 113 MB in f32, Gemma 3 270M's 178 MB and 671 MB).
    Blocks {
        dtype: GgmlDType,
        data: Vec<u8>,
        width: usize,
    },
}

impl Embedding {
    /// The GGUF tensor `[vocab, width]`: its blocks where they are
    /// quantized in whole blocks a row, f32 rows otherwise (floats, or a
    /// row that ends inside a block, which cannot be looked up alone).
    pub fn from_qtensor(q: &QTensor) -> Result<Self> {
        let ((_, width), dtype) = (q.shape().dims2()?, q.dtype());
        let floats = matches!(dtype, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16);
        if floats || !width.is_multiple_of(dtype.block_size()) {
            return Ok(Self::Dense {
                rows: q.dequantize(&q.device())?.flatten_all()?.to_vec1()?,
                width,
            });
        }
        Ok(Self::Blocks {
            dtype,
            data: q.data()?.into_owned(),
            width,
        })
    }

    /// Rows in the table.
    pub fn rows(&self) -> usize {
        match self {
            Self::Dense { rows, width } => rows.len() / width,
            Self::Blocks { dtype, data, width } => data.len() / Self::row_bytes(*dtype, *width),
        }
    }

    fn row_bytes(dtype: GgmlDType, width: usize) -> usize {
        width / dtype.block_size() * dtype.type_size()
    }

    /// The rows of `tokens` (each below [`Embedding::rows`]) as f32,
    /// `[tokens, width]`; quantized rows are gathered and dequantized in one
    /// call, as candle dequantizes the whole table.
    pub fn lookup(&self, tokens: &[u32]) -> Result<Vec<f32>> {
        match self {
            Self::Dense { rows, width } => Ok(tokens
                .iter()
                .flat_map(|&t| &rows[t as usize * width..][..*width])
                .copied()
                .collect()),
            Self::Blocks { dtype, data, width } => {
                let bytes = Self::row_bytes(*dtype, *width);
                let gathered: Vec<u8> = tokens
                    .iter()
                    .flat_map(|&t| &data[t as usize * bytes..][..bytes])
                    .copied()
                    .collect();
                candle_core::quantized::ggml_file::qtensor_from_ggml(
                    *dtype,
                    &gathered,
                    vec![tokens.len(), *width],
                    &Device::Cpu,
                )?
                .dequantize(&Device::Cpu)?
                .flatten_all()?
                .to_vec1()
            }
        }
    }
}

/// All weights of a model, however they were stored.
pub struct Weights {
    pub embed: Embedding,
    pub layers: Vec<Layer>,
    pub norm: RmsNorm,
    pub lm_head: Linear,
}

/// Runs `f` on one of the compute pool's threads, so that the parallel
/// sections inside it fork from a worker instead of handing each one over
/// from the caller's thread and waking it at the end.
fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    rayon::join(f, || ()).0
}

fn add(x: &mut [f32], y: &[f32]) {
    x.iter_mut().zip(y).for_each(|(x, y)| *x += y);
}

/// Where a layer's projections take their input, in layer order (`as usize`
/// indexes the four).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Site {
    /// The attention norm's output, into q, k and v.
    Qkv,
    /// Attention's output, into o.
    O,
    /// The MLP norm's output, into gate and up.
    GateUp,
    /// `silu(gate)·up`, into down.
    Down,
}

/// Sees `[tokens, width]` inputs of a layer's projections during a pass.
pub type Tap<'a> = dyn FnMut(usize, Site, &[f32]) + Send + 'a;

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
    /// The rotary tables, one per distinct base (Gemma 3's local and global
    /// layers differ).
    ropes: Vec<RopeTables>,
    /// Per layer: its rotary table and how it scores.
    plans: Vec<(usize, Scoring)>,
    device: Device,
}

/// One scored token: its log-probability after the tokens before it, and
/// the most likely tokens there.
#[derive(Debug, Clone, PartialEq)]
pub struct Scored {
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

impl LlamaModel {
    pub fn new(config: LlamaConfig, weights: Weights, device: &Device) -> Result<Self> {
        let mut freqs: Vec<(Vec<f32>, f32)> = Vec::new();
        let mut plans = Vec::with_capacity(config.num_hidden_layers);
        for layer in 0..config.num_hidden_layers {
            let rope = config.layer_rope(layer);
            let table = freqs.iter().position(|f| *f == rope).unwrap_or_else(|| {
                freqs.push(rope);
                freqs.len() - 1
            });
            let scoring = Scoring {
                scale: config.attn_scale,
                window: config.sliding_window.filter(|_| config.slides(layer)),
                softcap: config.attn_softcap,
            };
            plans.push((table, scoring));
        }
        let ropes = freqs
            .iter()
            .map(|(f, factor)| {
                RopeTables::from_frequencies(f, *factor, config.max_position_embeddings)
            })
            .collect();
        Ok(Self {
            ropes,
            plans,
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
        let rows = batch.segments.len();
        let logits = self.tail_logits(batch, cache, &vec![1; rows])?;
        Tensor::from_vec(logits, (rows, self.config.vocab_size), &self.device)
    }

    /// The logits of each segment's last `tails[i]` tokens (speculative
    /// decoding verifies proposed tokens so), `[Σ tails, vocab]` flat, in
    /// segment then token order: what the engine samples from, in place.
    pub fn tail_logits(
        &self,
        batch: &ForwardBatch,
        cache: &mut KvCache,
        tails: &[usize],
    ) -> Result<Vec<f32>> {
        if tails.len() != batch.segments.len()
            || batch
                .segments
                .iter()
                .zip(tails)
                .any(|(s, &t)| t == 0 || t > s.len)
        {
            candle_core::bail!("each segment needs between 1 and its length of rows")
        }
        let x = on_pool(|| self.hidden(batch, cache, &mut |_, _, _| ()))?;
        let h = self.config.hidden_size;
        let last: Vec<f32> = batch
            .segments
            .iter()
            .zip(tails)
            .flat_map(|(s, &t)| &x[(s.offset + s.len - t) * h..(s.offset + s.len) * h])
            .copied()
            .collect();
        self.head(&last, tails.iter().sum())
    }

    /// The logits of hidden states `[rows, hidden]`.
    fn head(&self, x: &[f32], rows: usize) -> Result<Vec<f32>> {
        let mut logits = self
            .weights
            .lm_head
            .forward(&self.weights.norm.forward(x), rows)?;
        if let Some(cap) = self.config.final_softcap {
            logits.iter_mut().for_each(|l| *l = cap * (*l / cap).tanh());
        }
        Ok(logits)
    }

    /// Teacher forcing: the log-probability of each of `tokens[from..]` given
    /// the tokens before it, from one forward pass over the whole sequence in
    /// a private cache of `dtype` (the engine's pool is not touched; with its
    /// dtype, the scores equal generation's log-probabilities).
    pub fn score(&self, tokens: &[u32], from: usize, dtype: KvDtype) -> Result<Vec<f32>> {
        let scored = self.score_top(tokens, from, dtype, 0)?;
        Ok(scored.into_iter().map(|s| s.logprob).collect())
    }

    /// [`LlamaModel::score`], with the `top` most likely tokens (and their
    /// log-probabilities) at each scored position.
    pub fn score_top(
        &self,
        tokens: &[u32],
        from: usize,
        dtype: KvDtype,
        top: usize,
    ) -> Result<Vec<Scored>> {
        if from == 0 || from > tokens.len() {
            candle_core::bail!(
                "scoring starts after the first token and within the {} given",
                tokens.len()
            )
        }
        let x = self.observe(tokens, dtype, &mut |_, _, _| ())?;
        let (h, vocab) = (self.config.hidden_size, self.config.vocab_size);
        let mut out = Vec::with_capacity(tokens.len() - from);
        // Row i predicts token i + 1; the vocabulary-wide logits are made a
        // few rows at a time so that long sequences stay small.
        let mut row = from - 1;
        while row < tokens.len() - 1 {
            let rows = (tokens.len() - 1 - row).min(32);
            let logits = self.head(&x[row * h..(row + rows) * h], rows)?;
            for (i, l) in logits.chunks_exact(vocab).enumerate() {
                let lp = kernels::sampling::log_softmax(l);
                out.push(Scored {
                    logprob: lp[tokens[row + i + 1] as usize],
                    top: kernels::sampling::top_k_indices(&lp, top)
                        .into_iter()
                        .map(|t| (t as u32, lp[t]))
                        .collect(),
                });
            }
            row += rows;
        }
        Ok(out)
    }

    /// A text embedding: the final (normed) hidden states of `tokens`,
    /// mean-pooled over the tokens and L2-normalized.
    pub fn embed(&self, tokens: &[u32], dtype: KvDtype) -> Result<Vec<f32>> {
        let x = self
            .weights
            .norm
            .forward(&self.observe(tokens, dtype, &mut |_, _, _| ())?);
        let h = self.config.hidden_size;
        let mut mean = vec![0f32; h];
        for row in x.chunks_exact(h) {
            mean.iter_mut().zip(row).for_each(|(m, v)| *m += v);
        }
        let norm = mean.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
        mean.iter_mut().for_each(|v| *v /= norm);
        Ok(mean)
    }

    /// Runs `tokens` as one sequence through a private cache of `dtype` and
    /// returns the final hidden state of every token, `[tokens, hidden]`;
    /// `tap` sees each projection's input on the way.
    pub fn observe(&self, tokens: &[u32], dtype: KvDtype, tap: &mut Tap) -> Result<Vec<f32>> {
        let layout = self.kv_layout(16);
        let blocks = tokens.len().div_ceil(layout.block_size);
        let mut cache = KvCache::new(self.config.num_hidden_layers, layout, dtype, blocks, false);
        cache
            .allocate(SeqId(0), tokens.len())
            .map_err(|e| candle_core::Error::Msg(format!("{e:?}")))?;
        let mut batch = ForwardBatch::default();
        batch.push(SeqId(0), tokens, 0);
        on_pool(|| self.hidden(&batch, &mut cache, tap))
    }

    /// The final hidden state of every token in the batch, `[tokens, hidden]`.
    fn hidden(&self, batch: &ForwardBatch, cache: &mut KvCache, tap: &mut Tap) -> Result<Vec<f32>> {
        let c = &self.config;
        let n = batch.tokens.len();
        let (heads, kv_heads, d) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        if let Some(&p) = batch.positions.iter().max() {
            if p as usize >= c.max_position_embeddings {
                candle_core::bail!(
                    "position {p} is beyond the model's {} positions",
                    c.max_position_embeddings
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
        let hidden = c.hidden_size;
        let vocab = self.weights.embed.rows();
        if let Some(t) = batch.tokens.iter().find(|&&t| t as usize >= vocab) {
            candle_core::bail!("token {t} is outside the vocabulary of {vocab}")
        }
        let mut x = self.weights.embed.lookup(&batch.tokens)?;
        if c.scale_embeddings {
            // Gemma rounds √hidden to its activations' dtype; in f32, exact.
            let s = (hidden as f32).sqrt();
            x.iter_mut().for_each(|v| *v *= s);
        }
        let (qd, kvd) = (heads * d, kv_heads * d);
        let inter = c.intermediate_size;
        for (li, layer) in self.weights.layers.iter().enumerate() {
            let normed = layer.attn_norm.forward(&x);
            tap(li, Site::Qkv, &normed);
            let qkv = layer.qkv.forward(&normed, n)?;
            let column = |from: usize, width: usize| -> Vec<f32> {
                qkv.chunks_exact(qd + 2 * kvd)
                    .flat_map(|r| &r[from..from + width])
                    .copied()
                    .collect()
            };
            let (mut q, mut k, v) = (column(0, qd), column(qd, kvd), column(qd + kvd, kvd));
            if let Some((qn, kn)) = &layer.qk_norm {
                q = qn.forward(&q);
                k = kn.forward(&k);
            }
            let (table, scoring) = self.plans[li];
            let rope = &self.ropes[table];
            rope.apply(&mut q, heads, &batch.positions, c.rope_interleaved);
            rope.apply(&mut k, kv_heads, &batch.positions, c.rope_interleaved);
            for (s, t) in batch.segments.iter().zip(&tables) {
                let rows = s.offset * kvd..(s.offset + s.len) * kvd;
                layout.write(&mut cache.k[li], t, s.start_pos, &k[rows.clone()]);
                layout.write(&mut cache.v[li], t, s.start_pos, &v[rows]);
            }
            let mut attn = vec![0f32; n * qd];
            let kv = LayerKv {
                k: &cache.k[li],
                v: &cache.v[li],
                layout,
            };
            paged_attention(Isa::detect(), &q, heads, &seqs, kv, scoring, &mut attn);
            tap(li, Site::O, &attn);
            let mut out = layer.o.forward(&attn, n)?;
            if let Some((post_attn, _)) = &layer.post_norms {
                out = post_attn.forward(&out);
            }
            add(&mut x, &out);
            let normed = layer.ffn_norm.forward(&x);
            tap(li, Site::GateUp, &normed);
            let gate_up = layer.gate_up.forward(&normed, n)?;
            let gated = match c.activation {
                Activation::Silu => kernels::activation::silu_mul(&gate_up, inter),
                Activation::GeluTanh => kernels::activation::gelu_tanh_mul(&gate_up, inter),
            };
            tap(li, Site::Down, &gated);
            let mut out = layer.down.forward(&gated, n)?;
            if let Some((_, post_ffn)) = &layer.post_norms {
                out = post_ffn.forward(&out);
            }
            add(&mut x, &out);
        }
        Ok(x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Rows looked up from the blocks are the rows of the whole table
    /// dequantized at once, bit for bit, for a 32-value block type and a
    /// 256-value one; a float table is kept as rows.
    #[test]
    fn embedding_rows_dequantize_as_the_whole_table_does() -> Result<()> {
        let (vocab, width) = (7, 512);
        let table = Tensor::randn(0f32, 1.0, (vocab, width), &Device::Cpu)?;
        for dtype in [GgmlDType::Q8_0, GgmlDType::Q4K, GgmlDType::F32] {
            let q = QTensor::quantize(&table, dtype)?;
            let whole: Vec<f32> = q.dequantize(&Device::Cpu)?.flatten_all()?.to_vec1()?;
            let embedding = Embedding::from_qtensor(&q)?;
            assert_eq!(
                matches!(embedding, Embedding::Blocks { .. }),
                dtype != GgmlDType::F32
            );
            assert_eq!(embedding.rows(), vocab);
            let rows = embedding.lookup(&[3, 0, 6])?;
            let want: Vec<f32> = [3, 0, 6]
                .iter()
                .flat_map(|&t| whole[t * width..][..width].to_vec())
                .collect();
            assert!(rows
                .iter()
                .zip(&want)
                .all(|(a, b)| a.to_bits() == b.to_bits()));
            assert_eq!(rows.len(), want.len(), "{dtype:?}");
        }
        Ok(())
    }
}
