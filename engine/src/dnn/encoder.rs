//! Sentence encoder (BERT family, e.g. all-MiniLM-L6-v2): BYTES
//! text in, mean-pooled and L2-normalized embeddings out; and, when the
//! config declares it, each text's token count (`token_count`, TYPE_INT64
//! dims [ 1 ]), which `/v1/embeddings` reports as usage.
use super::backend::{output_shape, Backend};
use super::bert::{Bert, Config};
use super::error::{DnnError, Result};
use super::model::ModelDefinition;
use super::tensor::{bytes_elements, DataType, Tensor};
use candle_core::{DType, Device, Tensor as CTensor};
use candle_nn::VarBuilder;
use std::path::Path;
use tokenizers::{PaddingParams, Tokenizer, TruncationParams};

/// The longest input the encoder reads, in tokens (sentence-transformers' default for MiniLM).
const MAX_TOKENS: usize = 256;

pub struct SentenceEncoder {
    model: Bert,
    tokenizer: Tokenizer,
    hidden: usize,
    output_name: String,
    /// The token-count output, when the config declares one.
    counts_name: Option<String>,
    spec: ModelDefinition,
}

/// The name of the optional token-count output.
pub const TOKEN_COUNT: &str = "token_count";

impl SentenceEncoder {
    /// Reads the weights (`weights`, checked to lie in `dir`), `config.json`
    /// and `tokenizer.json` from `dir`.
    pub fn load(
        spec: &ModelDefinition,
        dir: &Path,
        weights: &Path,
    ) -> std::result::Result<Self, String> {
        let read = |name: &str| {
            std::fs::read_to_string(dir.join(name))
                .map_err(|e| format!("{}: {e}", dir.join(name).display()))
        };
        let config: Config = serde_json::from_str(&read("config.json")?)
            .map_err(|e| e.to_string())
            .and_then(|c: Config| c.check().map(|()| c))
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
        let model = Bert::load(vb, &config).map_err(|e| format!("{}: {e}", weights.display()))?;
        if spec.inputs.len() != 1 || spec.inputs[0].dtype != DataType::Bytes {
            return Err("a sentence encoder has one TYPE_STRING input".into());
        }
        let (embedding, counts): (Vec<_>, Vec<_>) =
            spec.outputs.iter().partition(|o| o.name != TOKEN_COUNT);
        let shape_ok = embedding.len() == 1
            && embedding[0].dtype == DataType::Fp32
            && embedding[0].dims == [config.hidden_size as i64]
            && counts
                .iter()
                .all(|c| c.dtype == DataType::Int64 && c.dims == [1]);
        if !shape_ok {
            return Err(format!(
                "a sentence encoder has one TYPE_FP32 output with dims [ {} ], and optionally \
                 `{TOKEN_COUNT}` of TYPE_INT64 with dims [ 1 ]",
                config.hidden_size
            ));
        }
        Ok(Self {
            model,
            tokenizer,
            hidden: config.hidden_size,
            output_name: embedding[0].name.clone(),
            counts_name: counts.first().map(|c| c.name.clone()),
            spec: spec.clone(),
        })
    }

    /// The embeddings of `texts`, and how many tokens each read.
    fn embed(&self, texts: Vec<String>) -> candle_core::Result<(Vec<f32>, Vec<i64>)> {
        let encodings = self
            .tokenizer
            .encode_batch(texts, true)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let tokens: Vec<i64> = encodings
            .iter()
            .map(|e| e.get_attention_mask().iter().map(|&m| m as i64).sum())
            .collect();
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
        let hidden = self.model.forward(&ids, &types, &mask)?;
        let mask = mask.to_dtype(DType::F32)?.unsqueeze(2)?;
        let summed = hidden.broadcast_mul(&mask)?.sum(1)?;
        let counts = mask.sum(1)?.clamp(1e-9, f64::MAX)?;
        let mean = summed.broadcast_div(&counts)?;
        let norm = mean.sqr()?.sum_keepdim(1)?.sqrt()?.clamp(1e-12, f64::MAX)?;
        Ok((mean.broadcast_div(&norm)?.flatten_all()?.to_vec1()?, tokens))
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
        let (values, tokens) = if rows == 0 {
            (Vec::new(), Vec::new())
        } else {
            self.embed(texts)
                .map_err(|e| DnnError::internal(format!("encoder: {e}")))?
        };
        debug_assert_eq!(values.len(), rows * self.hidden);
        let mut out = vec![Tensor::from_f32(
            self.output_name.clone(),
            output_shape(&self.spec, &[self.hidden as i64], rows),
            &values,
        )];
        if let Some(name) = &self.counts_name {
            let data = tokens.iter().flat_map(|t| t.to_le_bytes()).collect();
            out.push(Tensor::new(
                name.clone(),
                DataType::Int64,
                output_shape(&self.spec, &[1], rows),
                data,
            ));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dnn::tensor::encode_bytes;
    use serde_json::json;
    use std::collections::HashMap;

    const HIDDEN: usize = 8;

    /// A one-layer BERT of width 8 with seeded weights, a word-level
    /// tokenizer with BERT's `[CLS] … [SEP]` template, and its config.
    fn tiny_bert(dir: &Path) {
        let words = [
            "[PAD]", "[CLS]", "[SEP]", "[UNK]", "the", "cat", "sat", "on", "a", "mat",
        ];
        let config = json!({"vocab_size": words.len(), "hidden_size": HIDDEN, "num_hidden_layers": 1,
            "num_attention_heads": 2, "intermediate_size": 16, "hidden_act": "gelu",
            "hidden_dropout_prob": 0.0, "max_position_embeddings": 32, "type_vocab_size": 2,
            "initializer_range": 0.02, "layer_norm_eps": 1e-12, "pad_token_id": 0,
            "position_embedding_type": "absolute", "use_cache": false, "model_type": "bert"});
        std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
        let special = |id: usize| {
            json!({"id": id, "content": words[id], "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": true})
        };
        let token = |t: &str, id: usize| json!({"id": t, "ids": [id], "tokens": [t]});
        let piece = |p: serde_json::Value| {
            json!([{"SpecialToken": {"id": "[CLS]", "type_id": 0}}, p,
            {"SpecialToken": {"id": "[SEP]", "type_id": 0}}])
        };
        let tokenizer = json!({"version": "1.0", "truncation": null, "padding": null,
            "added_tokens": [special(0), special(1), special(2), special(3)],
            "normalizer": null, "pre_tokenizer": {"type": "WhitespaceSplit"},
            "post_processor": {"type": "TemplateProcessing",
                "single": piece(json!({"Sequence": {"id": "A", "type_id": 0}})),
                "pair": piece(json!({"Sequence": {"id": "B", "type_id": 1}})),
                "special_tokens": {"[CLS]": token("[CLS]", 1), "[SEP]": token("[SEP]", 2)}},
            "decoder": null,
            "model": {"type": "WordLevel", "unk_token": "[UNK]",
                "vocab": words.iter().enumerate().map(|(i, w)| (w.to_string(), json!(i))).collect::<serde_json::Map<_, _>>()}});
        std::fs::write(dir.join("tokenizer.json"), tokenizer.to_string()).unwrap();
        let mut seed = 11u32;
        let mut t = HashMap::new();
        let mut put = |name: &str, dims: &[usize], around: f32| {
            let n: usize = dims.iter().product();
            let v: Vec<f32> = (0..n)
                .map(|_| {
                    seed = seed.wrapping_mul(1664525).wrapping_add(1013904223);
                    around + ((seed >> 8) as f32 / (1u32 << 24) as f32 - 0.5) * 0.4
                })
                .collect();
            t.insert(
                name.to_string(),
                CTensor::from_vec(v, dims, &Device::Cpu).unwrap(),
            );
        };
        put(
            "embeddings.word_embeddings.weight",
            &[words.len(), HIDDEN],
            0.0,
        );
        put("embeddings.position_embeddings.weight", &[32, HIDDEN], 0.0);
        put("embeddings.token_type_embeddings.weight", &[2, HIDDEN], 0.0);
        for ln in [
            "embeddings.LayerNorm",
            "encoder.layer.0.attention.output.LayerNorm",
            "encoder.layer.0.output.LayerNorm",
        ] {
            put(&format!("{ln}.weight"), &[HIDDEN], 1.0);
            put(&format!("{ln}.bias"), &[HIDDEN], 0.0);
        }
        for (name, out, inp) in [
            ("attention.self.query", HIDDEN, HIDDEN),
            ("attention.self.key", HIDDEN, HIDDEN),
            ("attention.self.value", HIDDEN, HIDDEN),
            ("attention.output.dense", HIDDEN, HIDDEN),
            ("intermediate.dense", 16, HIDDEN),
            ("output.dense", HIDDEN, 16),
        ] {
            put(&format!("encoder.layer.0.{name}.weight"), &[out, inp], 0.0);
            put(&format!("encoder.layer.0.{name}.bias"), &[out], 0.0);
        }
        candle_core::safetensors::save(&t, dir.join("model.safetensors")).unwrap();
    }

    fn spec(dims: i64) -> ModelDefinition {
        let text = format!(
            r#"backend: "candle" max_batch_size: 4
            input [ {{ name: "text" data_type: TYPE_STRING dims: [ 1 ] }} ]
            output [ {{ name: "embedding" data_type: TYPE_FP32 dims: [ {dims} ] }} ]
            parameters [ {{ key: "model_type" value: {{ string_value: "sentence_encoder" }} }} ]"#
        );
        ModelDefinition::from_config("enc", proto::model_config::parse_text(&text).unwrap())
            .unwrap()
    }

    fn embed(e: &SentenceEncoder, texts: &[&str]) -> Vec<Vec<f32>> {
        let data = encode_bytes(texts.iter().map(|t| t.as_bytes()));
        let input = Tensor::new("text", DataType::Bytes, vec![texts.len() as i64, 1], data);
        let out = e.execute(&[input]).unwrap();
        assert_eq!(out[0].shape, vec![texts.len() as i64, HIDDEN as i64]);
        out[0]
            .to_f32()
            .unwrap()
            .chunks(HIDDEN)
            .map(<[f32]>::to_vec)
            .collect()
    }

    /// Our BERT gives candle-transformers' `BertModel`'s hidden states for a
    /// padded batch (the padding rows are masked the same way).
    #[test]
    fn bert_matches_candle_transformers() {
        use candle_transformers::models::bert as reference;
        let dir = tempfile::tempdir().unwrap();
        tiny_bert(dir.path());
        let config = std::fs::read_to_string(dir.path().join("config.json")).unwrap();
        let weights = dir.path().join("model.safetensors");
        // SAFETY: a file of this test's own, not modified while mapped.
        let vb = unsafe {
            VarBuilder::from_mmaped_safetensors(&[&weights], DType::F32, &Device::Cpu).unwrap()
        };
        let ours = Bert::load(vb.clone(), &serde_json::from_str(&config).unwrap()).unwrap();
        let theirs =
            reference::BertModel::load(vb, &serde_json::from_str(&config).unwrap()).unwrap();
        let t = |v: &[u32]| CTensor::from_slice(v, (2, 5), &Device::Cpu).unwrap();
        let ids = t(&[1, 4, 5, 6, 2, 1, 8, 2, 0, 0]);
        let types = t(&[0, 0, 0, 1, 1, 0, 0, 0, 0, 0]);
        let mask = t(&[1, 1, 1, 1, 1, 1, 1, 1, 0, 0]);
        let a: Vec<f32> = ours
            .forward(&ids, &types, &mask)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let b: Vec<f32> = theirs
            .forward(&ids, &types, Some(&mask))
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(a.len(), 2 * 5 * HIDDEN);
        for (i, (x, y)) in a.iter().zip(&b).enumerate() {
            assert!((x - y).abs() <= 1e-5, "element {i}: {x} vs {y}");
        }
    }

    /// A config the model cannot run is refused with the field it names.
    #[test]
    fn unsupported_configs_are_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        tiny_bert(dir.path());
        let weights = dir.path().join("model.safetensors");
        let path = dir.path().join("config.json");
        let good: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        for (field, value, says) in [
            (
                "position_embedding_type",
                json!("relative_key"),
                "relative_key",
            ),
            ("hidden_act", json!("silu"), "silu"),
            ("num_attention_heads", json!(3), "num_attention_heads 3"),
        ] {
            let mut config = good.clone();
            config[field] = value;
            std::fs::write(&path, config.to_string()).unwrap();
            let e = SentenceEncoder::load(&spec(HIDDEN as i64), dir.path(), &weights)
                .err()
                .unwrap();
            assert!(
                e.contains("config.json") && e.contains(says),
                "{field}: {e}"
            );
        }
    }

    #[test]
    fn embeddings_are_normalized_and_padding_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        tiny_bert(dir.path());
        let weights = dir.path().join("model.safetensors");
        let e = SentenceEncoder::load(&spec(HIDDEN as i64), dir.path(), &weights).unwrap();
        let batch = embed(&e, &["the cat sat on a mat", "a cat", "the mat"]);
        for row in &batch {
            let norm: f32 = row.iter().map(|v| v * v).sum::<f32>().sqrt();
            assert!((norm - 1.0).abs() < 1e-5, "{norm}");
        }
        assert!(
            batch[1] != batch[2],
            "different sentences embed differently"
        );
        // Alone, the short sentence has no padding; in the batch it had four
        // padding tokens, which the attention mask and the pooling leave out.
        let alone = embed(&e, &["a cat"]);
        for (a, b) in alone[0].iter().zip(&batch[1]) {
            assert!((a - b).abs() < 1e-5, "{:?} vs {:?}", alone[0], batch[1]);
        }
        let e = SentenceEncoder::load(&spec(3), dir.path(), &weights)
            .err()
            .unwrap();
        assert!(e.contains("dims [ 8 ]"), "{e}");
    }
}
