//! A BERT encoder on candle's tensors (Hugging Face's `BertModel`: absolute
//! positions, post-norm layers), the body of the sentence encoder: token ids
//! in, the last layer's hidden states out.
use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::{embedding, layer_norm, linear, Embedding, LayerNorm, Linear, VarBuilder};
use serde::Deserialize;

/// The fields of a Hugging Face `config.json` that the model reads; the
/// optional ones default as in Hugging Face's `BertConfig`.
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub hidden_act: Activation,
    #[serde(default = "two")]
    pub type_vocab_size: usize,
    #[serde(default = "eps")]
    pub layer_norm_eps: f64,
    #[serde(default)]
    pub position_embedding_type: Option<String>,
}

fn two() -> usize {
    2
}

fn eps() -> f64 {
    1e-12
}

/// The feed-forward activation (`hidden_act`).
#[derive(Debug, Clone, Copy, Default, Deserialize)]
pub enum Activation {
    /// The exact GELU, with erf.
    #[default]
    #[serde(rename = "gelu")]
    Gelu,
    /// GELU's tanh approximation.
    #[serde(rename = "gelu_new", alias = "gelu_pytorch_tanh")]
    GeluTanh,
    #[serde(rename = "relu")]
    Relu,
}

impl Activation {
    fn apply(self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Gelu => x.gelu_erf(),
            Self::GeluTanh => x.gelu(),
            Self::Relu => x.relu(),
        }
    }
}

impl Config {
    /// What the model cannot run, in the config's own words.
    pub fn check(&self) -> std::result::Result<(), String> {
        match self.position_embedding_type.as_deref() {
            None | Some("absolute") => {}
            Some(other) => {
                return Err(format!(
                    "position_embedding_type \"{other}\" is not supported (only \"absolute\")"
                ))
            }
        }
        if self.num_attention_heads == 0
            || !self.hidden_size.is_multiple_of(self.num_attention_heads)
        {
            return Err(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        Ok(())
    }
}

struct Layer {
    query: Linear,
    key: Linear,
    value: Linear,
    attention_out: Linear,
    attention_norm: LayerNorm,
    up: Linear,
    down: Linear,
    norm: LayerNorm,
    heads: usize,
    act: Activation,
}

impl Layer {
    fn load(vb: VarBuilder, c: &Config) -> Result<Self> {
        let (h, i) = (c.hidden_size, c.intermediate_size);
        let (attention, output) = (vb.pp("attention"), vb.pp("output"));
        let linear_in = |name: &str| linear(h, h, attention.pp("self").pp(name));
        Ok(Self {
            query: linear_in("query")?,
            key: linear_in("key")?,
            value: linear_in("value")?,
            attention_out: linear(h, h, attention.pp("output").pp("dense"))?,
            attention_norm: layer_norm(
                h,
                c.layer_norm_eps,
                attention.pp("output").pp("LayerNorm"),
            )?,
            up: linear(h, i, vb.pp("intermediate").pp("dense"))?,
            down: linear(i, h, output.pp("dense"))?,
            norm: layer_norm(h, c.layer_norm_eps, output.pp("LayerNorm"))?,
            heads: c.num_attention_heads,
            act: c.hidden_act,
        })
    }

    /// `x`: [batch, len, hidden]; `bias`: [batch, 1, 1, len], added to the
    /// attention scores.
    fn forward(&self, x: &Tensor, bias: &Tensor) -> Result<Tensor> {
        let (b, n, h) = x.dims3()?;
        let d = h / self.heads;
        let heads = |l: &Linear| {
            l.forward(x)?
                .reshape((b, n, self.heads, d))?
                .transpose(1, 2)?
                .contiguous()
        };
        let (q, k, v) = (heads(&self.query)?, heads(&self.key)?, heads(&self.value)?);
        let scores = (q.matmul(&k.t()?)? / (d as f64).sqrt())?.broadcast_add(bias)?;
        let probs = candle_nn::ops::softmax(&scores, D::Minus1)?;
        let context = probs
            .matmul(&v)?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b, n, h))?;
        let x = self
            .attention_norm
            .forward(&(self.attention_out.forward(&context)? + x)?)?;
        let up = self.act.apply(&self.up.forward(&x)?)?;
        self.norm.forward(&(self.down.forward(&up)? + x)?)
    }
}

pub struct Bert {
    words: Embedding,
    positions: Embedding,
    types: Embedding,
    norm: LayerNorm,
    layers: Vec<Layer>,
}

impl Bert {
    /// The weights under `embeddings.` and `encoder.`, or the same under
    /// `bert.` (checkpoints saved with a task head).
    pub fn load(vb: VarBuilder, c: &Config) -> Result<Self> {
        let vb = if vb.contains_tensor("bert.embeddings.word_embeddings.weight") {
            vb.pp("bert")
        } else {
            vb
        };
        let (e, h) = (vb.pp("embeddings"), c.hidden_size);
        let layers = vb.pp("encoder").pp("layer");
        Ok(Self {
            words: embedding(c.vocab_size, h, e.pp("word_embeddings"))?,
            positions: embedding(c.max_position_embeddings, h, e.pp("position_embeddings"))?,
            types: embedding(c.type_vocab_size, h, e.pp("token_type_embeddings"))?,
            norm: layer_norm(h, c.layer_norm_eps, e.pp("LayerNorm"))?,
            layers: (0..c.num_hidden_layers)
                .map(|i| Layer::load(layers.pp(i), c))
                .collect::<Result<_>>()?,
        })
    }

    /// The hidden states [batch, len, hidden] of `ids` and `types`
    /// ([batch, len], u32), reading only the tokens where `mask` is 1.
    pub fn forward(&self, ids: &Tensor, types: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let (_, len) = ids.dims2()?;
        let at = Tensor::arange(0u32, len as u32, ids.device())?;
        let x = (self.words.forward(ids)? + self.types.forward(types)?)?
            .broadcast_add(&self.positions.forward(&at)?)?;
        let mut x = self.norm.forward(&x)?;
        // 0 where a token is read, the lowest f32 where it is padding.
        let low = f32::MIN as f64;
        let bias = mask
            .to_dtype(DType::F32)?
            .affine(-low, low)?
            .unsqueeze(1)?
            .unsqueeze(1)?;
        for layer in &self.layers {
            x = layer.forward(&x, &bias)?;
        }
        Ok(x)
    }
}
