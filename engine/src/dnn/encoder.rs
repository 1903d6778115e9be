//! Sentence encoder on candle (BERT family, e.g. all-MiniLM-L6-v2): BYTES
//! text in, mean-pooled and L2-normalized embeddings out.
use super::backend::{output_shape, Backend};
use super::error::{DnnError, Result};
use super::model::ModelSpec;
use super::tensor::{bytes_elements, DataType, Tensor};
use candle_core::{DType, Device, Tensor as CTensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config};
use std::path::Path;
use tokenizers::{PaddingParams, Tokenizer, TruncationParams};

/// The longest input the encoder reads, in tokens (sentence-transformers' default for MiniLM).
const MAX_TOKENS: usize = 256;

pub struct SentenceEncoder {
    model: BertModel,
    tokenizer: Tokenizer,
    hidden: usize,
    output_name: String,
    spec: ModelSpec,
}

impl SentenceEncoder {
    /// Reads the weights (`weights`, checked to lie in `dir`), `config.json`
    /// and `tokenizer.json` from `dir`.
    pub fn load(spec: &ModelSpec, dir: &Path, weights: &Path) -> std::result::Result<Self, String> {
        let read = |name: &str| {
            std::fs::read_to_string(dir.join(name))
                .map_err(|e| format!("{}: {e}", dir.join(name).display()))
        };
        let config: Config = serde_json::from_str(&read("config.json")?)
            .map_err(|e| format!("{}: {e}", dir.join("config.json").display()))?;
        let mut tokenizer = Tokenizer::from_file(dir.join("tokenizer.json"))
            .map_err(|e| format!("{}: {e}", dir.join("tokenizer.json").display()))?;
        tokenizer.with_padding(Some(PaddingParams::default()));
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: MAX_TOKENS,
                ..Default::default()
            }))
            .map_err(|e| e.to_string())?;
        // SAFETY: the weights file is memory-mapped read-only and not modified while served.
        let vb =
            unsafe { VarBuilder::from_mmaped_safetensors(&[weights], DType::F32, &Device::Cpu) }
                .map_err(|e| format!("{}: {e}", weights.display()))?;
        let model =
            BertModel::load(vb, &config).map_err(|e| format!("{}: {e}", weights.display()))?;
        if spec.inputs.len() != 1 || spec.inputs[0].dtype != DataType::Bytes {
            return Err("a sentence encoder has one TYPE_STRING input".into());
        }
        if spec.outputs.len() != 1
            || spec.outputs[0].dtype != DataType::Fp32
            || spec.outputs[0].dims != [config.hidden_size as i64]
        {
            return Err(format!(
                "a sentence encoder has one TYPE_FP32 output with dims [ {} ]",
                config.hidden_size
            ));
        }
        Ok(Self {
            model,
            tokenizer,
            hidden: config.hidden_size,
            output_name: spec.outputs[0].name.clone(),
            spec: spec.clone(),
        })
    }

    fn embed(&self, texts: Vec<String>) -> candle_core::Result<Vec<f32>> {
        let encodings = self
            .tokenizer
            .encode_batch(texts, true)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let rows = encodings.len();
        let len = encodings.first().map_or(0, |e| e.get_ids().len());
        let flat = |f: &dyn Fn(&tokenizers::Encoding) -> &[u32]| -> Vec<u32> {
            encodings
                .iter()
                .flat_map(|e| f(e).iter().copied())
                .collect()
        };
        let ids = CTensor::from_vec(flat(&|e| e.get_ids()), (rows, len), &Device::Cpu)?;
        let types = CTensor::from_vec(flat(&|e| e.get_type_ids()), (rows, len), &Device::Cpu)?;
        let mask = CTensor::from_vec(flat(&|e| e.get_attention_mask()), (rows, len), &Device::Cpu)?;
        let hidden = self.model.forward(&ids, &types, Some(&mask))?;
        let mask = mask.to_dtype(DType::F32)?.unsqueeze(2)?;
        let summed = hidden.broadcast_mul(&mask)?.sum(1)?;
        let counts = mask.sum(1)?.clamp(1e-9, f64::MAX)?;
        let mean = summed.broadcast_div(&counts)?;
        let norm = mean.sqr()?.sum_keepdim(1)?.sqrt()?.clamp(1e-12, f64::MAX)?;
        mean.broadcast_div(&norm)?.flatten_all()?.to_vec1()
    }
}

impl Backend for SentenceEncoder {
    fn execute(&self, inputs: &[Tensor]) -> Result<Vec<Tensor>> {
        let texts = bytes_elements(&inputs[0].data)?
            .into_iter()
            .map(|b| {
                String::from_utf8(b.to_vec()).map_err(|_| {
                    DnnError::invalid(format!("input '{}' is not UTF-8 text", inputs[0].name))
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let rows = texts.len();
        let values = if rows == 0 {
            Vec::new()
        } else {
            self.embed(texts)
                .map_err(|e| DnnError::internal(format!("encoder: {e}")))?
        };
        debug_assert_eq!(values.len(), rows * self.hidden);
        Ok(vec![Tensor::from_f32(
            self.output_name.clone(),
            output_shape(&self.spec, &[self.hidden as i64], rows),
            &values,
        )])
    }
}
