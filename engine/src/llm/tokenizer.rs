//! The model's tokenizer: loaded from `tokenizer.json`, or rebuilt from a
//! GGUF file's own vocabulary: a byte-level BPE from its merges and
//! pre-tokenizer name (`gpt2`), or a SentencePiece vocabulary with byte
//! fallback (`llama`: Llama 2, Mistral, TinyLlama, Gemma), merged as
//! llama.cpp merges it, by the score of the merged piece.
use super::error::{LlmError, Result};
use candle_core::quantized::gguf_file::Value;
use std::collections::HashMap;
use std::path::Path;
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::{Prepend, Replace, Sequence as NormalizerSequence};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, NormalizerWrapper, PreTokenizerWrapper, SplitDelimiterBehavior};

/// The split pattern llama.cpp uses for Llama 3 style BPE vocabularies.
const LLAMA3_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// The split pattern of Qwen2's vocabulary.
const QWEN2_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    bos: Option<String>,
    eos: Option<String>,
    eos_ids: Vec<u32>,
    add_bos: bool,
}

fn tok_err(e: impl std::fmt::Display) -> LlmError {
    LlmError::Tokenizer(e.to_string())
}

impl Tokenizer {
    /// Rebuilds the tokenizer from `tokenizer.ggml.*` metadata.
    pub fn from_gguf(md: &HashMap<String, Value>) -> Result<Self> {
        let s = |k: &str| md.get(k).and_then(|v| v.to_string().ok()).cloned();
        let u = |k: &str| md.get(k).and_then(|v| v.to_u32().ok());
        let flag = |k: &str| md.get(k).and_then(|v| v.to_bool().ok());
        let model = s("tokenizer.ggml.model").unwrap_or_default();
        let tokens: Vec<String> = gguf_list(md, "tokenizer.ggml.tokens")?
            .iter()
            .map(|v| v.to_string().cloned().map_err(tok_err))
            .collect::<Result<_>>()?;
        let types: Vec<i32> = match md
            .get("tokenizer.ggml.token_type")
            .and_then(|v| v.to_vec().ok())
        {
            Some(v) => v.iter().map(|t| t.to_i32().unwrap_or(1)).collect(),
            None => vec![1; tokens.len()],
        };
        let mut inner = match model.as_str() {
            "gpt2" => byte_level_bpe(md, &tokens)?,
            "llama" => sentencepiece(
                md,
                &tokens,
                &types,
                flag("tokenizer.ggml.add_space_prefix").unwrap_or(true),
                u("tokenizer.ggml.unknown_token_id"),
            )?,
            other => {
                return Err(LlmError::Unsupported(format!(
                    "GGUF tokenizer model `{other}`: supported are byte-level BPE (`gpt2`) and \
                     SentencePiece (`llama`); pass a folder with tokenizer.json instead"
                )))
            }
        };
        // Control (3) and user-defined (4) tokens are matched whole in the
        // raw text, before anything else.
        let special: Vec<AddedToken> = tokens
            .iter()
            .zip(&types)
            .filter(|(_, &t)| t == 3 || t == 4)
            .map(|(tok, &t)| AddedToken::from(tok.clone(), t == 3).normalized(false))
            .collect();
        inner.add_special_tokens(special).map_err(tok_err)?;
        let name = |id: Option<u32>| id.and_then(|i| tokens.get(i as usize).cloned());
        let eos_id = u("tokenizer.ggml.eos_token_id");
        let mut eos_ids: Vec<u32> = eos_id.into_iter().collect();
        if let Some(eot) = u("tokenizer.ggml.eot_token_id") {
            eos_ids.push(eot);
        }
        // A chat turn's end token ends generation too, as llama.cpp has it
        // (Gemma's files name `<eos>` but chats end with `<end_of_turn>`).
        for (id, (tok, &t)) in tokens.iter().zip(&types).enumerate() {
            if t == 3 && END_OF_TURN.contains(&tok.as_str()) && !eos_ids.contains(&(id as u32)) {
                eos_ids.push(id as u32);
            }
        }
        Ok(Self {
            bos: name(u("tokenizer.ggml.bos_token_id")),
            eos: name(eos_id),
            eos_ids,
            add_bos: flag("tokenizer.ggml.add_bos_token").unwrap_or(false),
            inner,
        })
    }

    /// Loads `tokenizer.json`; special tokens come from `tokenizer_config.json` when present.
    pub fn from_file(tokenizer_json: &Path, tokenizer_config: &Path) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_file(tokenizer_json)
            .map_err(|e| tok_err(format!("{}: {e}", tokenizer_json.display())))?;
        let cfg: serde_json::Value = std::fs::read_to_string(tokenizer_config)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_default();
        let token = |k: &str| match &cfg[k] {
            serde_json::Value::String(s) => Some(s.clone()),
            serde_json::Value::Object(o) => {
                o.get("content").and_then(|c| c.as_str()).map(String::from)
            }
            _ => None,
        };
        let eos = token("eos_token");
        let eos_ids = eos.iter().filter_map(|t| inner.token_to_id(t)).collect();
        Ok(Self {
            bos: token("bos_token"),
            eos,
            eos_ids,
            add_bos: cfg["add_bos_token"].as_bool().unwrap_or(false),
            inner,
        })
    }

    /// Writes `tokenizer.json` and a `tokenizer_config.json` (special tokens,
    /// `add_bos_token`, the chat template when given) into `dir`: what
    /// [`Tokenizer::from_file`] and Transformers read back.
    pub fn save_hf(&self, dir: &Path, chat_template: Option<&str>) -> Result<()> {
        self.inner
            .save(dir.join("tokenizer.json"), false)
            .map_err(tok_err)?;
        let config = serde_json::json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.bos,
            "eos_token": self.eos,
            "add_bos_token": self.add_bos,
            "chat_template": chat_template,
        });
        let text = serde_json::to_string_pretty(&config).map_err(tok_err)?;
        std::fs::write(dir.join("tokenizer_config.json"), text).map_err(tok_err)
    }

    /// Encodes text; special-token strings in it (e.g. `<|im_start|>`) map to their ids.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, false).map_err(tok_err)?;
        let mut ids = Vec::with_capacity(enc.len() + 1);
        if let Some(bos) = self
            .add_bos
            .then(|| self.bos.as_ref().and_then(|b| self.inner.token_to_id(b)))
            .flatten()
        {
            if !text.starts_with(self.bos.as_deref().unwrap_or_default()) {
                ids.push(bos);
            }
        }
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    /// Encodes text as it stands: no BOS added.
    pub fn encode_plain(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, false).map_err(tok_err)?;
        Ok(enc.get_ids().to_vec())
    }

    /// The tokenizer as `tokenizer.json` spells it.
    pub fn to_json(&self) -> Result<String> {
        self.inner.to_string(false).map_err(tok_err)
    }

    /// Decodes ids to text, leaving out special tokens.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, true).map_err(tok_err)
    }

    /// The token's own text as the vocabulary spells it, decoded to bytes-as-text.
    /// Every token (added ones included), in id order.
    pub fn vocabulary(&self) -> Vec<String> {
        let mut v: Vec<(u32, String)> = self
            .inner
            .get_vocab(true)
            .into_iter()
            .map(|(t, id)| (id, t))
            .collect();
        v.sort_unstable();
        v.into_iter().map(|(_, t)| t).collect()
    }

    pub fn token_text(&self, id: u32) -> String {
        self.inner.decode(&[id], false).unwrap_or_default()
    }

    /// The id of a token spelled as the vocabulary spells it.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn is_eos(&self, id: u32) -> bool {
        self.eos_ids.contains(&id)
    }

    pub fn eos_ids(&self) -> &[u32] {
        &self.eos_ids
    }

    pub fn bos_token(&self) -> Option<String> {
        self.bos.clone()
    }

    pub fn eos_token(&self) -> Option<String> {
        self.eos.clone()
    }
}
/// Turn-ending tokens that end generation when the vocabulary has them as
/// control tokens.
const END_OF_TURN: [&str; 4] = ["<end_of_turn>", "<|eot_id|>", "<|im_end|>", "<|end|>"];

fn gguf_list<'a>(md: &'a HashMap<String, Value>, k: &str) -> Result<&'a Vec<Value>> {
    md.get(k)
        .and_then(|v| v.to_vec().ok())
        .ok_or_else(|| tok_err(format!("metadata {k} is missing")))
}

/// A GPT-2 style byte-level BPE from the file's merges and pre-tokenizer name.
fn byte_level_bpe(md: &HashMap<String, Value>, tokens: &[String]) -> Result<tokenizers::Tokenizer> {
    let vocab: tokenizers::models::bpe::Vocab = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect();
    // A merge's result is checked here, not left to the BPE builder: one
    // longer than every token makes it panic instead of returning an error.
    let merges: Vec<(String, String)> = gguf_list(md, "tokenizer.ggml.merges")?
        .iter()
        .map(|v| {
            let m = v.to_string().map_err(tok_err)?;
            let (a, b) = m
                .split_once(' ')
                .ok_or_else(|| tok_err(format!("bad merge `{m}`")))?;
            if !vocab.contains_key(&format!("{a}{b}")) {
                return Err(tok_err(format!(
                    "merge `{m}` makes `{a}{b}`, which is not in the vocabulary"
                )));
            }
            Ok((a.to_string(), b.to_string()))
        })
        .collect::<Result<_>>()?;
    let pre_name = md
        .get("tokenizer.ggml.pre")
        .and_then(|v| v.to_string().ok());
    // Llama 3's vocabulary takes a word found whole in the vocabulary as
    // is, before any merge (Hugging Face's `ignore_merges`, llama.cpp's
    // LLAMA3 pre-tokenizer): its merges alone do not reach every word.
    let llama3 = matches!(
        pre_name.map(|s| s.as_str()),
        Some("llama-bpe" | "llama3" | "smaug-bpe")
    );
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .ignore_merges(llama3)
        .build()
        .map_err(tok_err)?;
    let mut inner = tokenizers::Tokenizer::new(bpe);
    let byte_level = ByteLevel::new(false, true, true);
    let split = |p: &str| -> Result<PreTokenizerWrapper> {
        let sp = Split::new(
            SplitPattern::Regex(p.into()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(tok_err)?;
        Ok(sp.into())
    };
    let pre: PreTokenizerWrapper = match pre_name.map(|s| s.as_str()) {
        Some("smollm" | "starcoder" | "codeshell" | "refact") => {
            Sequence::new(vec![Digits::new(true).into(), byte_level.into()]).into()
        }
        Some("llama-bpe" | "llama3" | "smaug-bpe") => Sequence::new(vec![
            split(LLAMA3_PATTERN)?,
            ByteLevel::new(false, true, false).into(),
        ])
        .into(),
        Some("qwen2") => Sequence::new(vec![
            split(QWEN2_PATTERN)?,
            ByteLevel::new(false, true, false).into(),
        ])
        .into(),
        _ => byte_level.into(),
    };
    inner.with_pre_tokenizer(Some(pre));
    inner.with_decoder(Some(ByteLevelDecoder::default()));
    Ok(inner)
}

/// A SentencePiece vocabulary as llama.cpp tokenizes it: spaces become `▁`
/// (with one in front when `add_space_prefix`), then adjacent pieces merge,
/// highest-scoring merged piece first, and characters outside the
/// vocabulary fall back to their bytes (`<0xNN>`). As a BPE, the merges are
/// every split of a normal piece into two normal pieces, ranked by the
/// merged piece's score.
fn sentencepiece(
    md: &HashMap<String, Value>,
    tokens: &[String],
    types: &[i32],
    add_space_prefix: bool,
    unknown: Option<u32>,
) -> Result<tokenizers::Tokenizer> {
    let scores: Vec<f32> = match md
        .get("tokenizer.ggml.scores")
        .and_then(|v| v.to_vec().ok())
    {
        Some(v) => v.iter().map(|s| s.to_f32().unwrap_or(0.0)).collect(),
        None => (0..tokens.len()).map(|i| -(i as f32)).collect(),
    };
    let ids: HashMap<&str, usize> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.as_str(), i))
        .collect();
    let normal = |i: usize| types.get(i).is_none_or(|&t| t == 1);
    let mut ranked: Vec<(f32, usize, usize)> = Vec::new();
    for (id, piece) in tokens.iter().enumerate() {
        if !normal(id) {
            continue;
        }
        for (split, _) in piece.char_indices().skip(1) {
            let (l, r) = piece.split_at(split);
            if let (Some(&a), Some(&b)) = (ids.get(l), ids.get(r)) {
                if normal(a) && normal(b) {
                    ranked.push((scores.get(id).copied().unwrap_or(0.0), id, split));
                }
            }
        }
    }
    // Highest score first; ties by id, then by split, so the order is fixed.
    ranked.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
    let merges: Vec<(String, String)> = ranked
        .into_iter()
        .map(|(_, id, split)| {
            let (l, r) = tokens[id].split_at(split);
            (l.to_string(), r.to_string())
        })
        .collect();
    let vocab: tokenizers::models::bpe::Vocab = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect();
    let mut builder = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .byte_fallback(true)
        .fuse_unk(true);
    if let Some(unk) = unknown.and_then(|u| tokens.get(u as usize)) {
        builder = builder.unk_token(unk.clone());
    }
    let mut inner = tokenizers::Tokenizer::new(builder.build().map_err(tok_err)?);
    let space = Replace::new(" ", "▁").map_err(tok_err)?;
    let normalizer: NormalizerWrapper = if add_space_prefix {
        NormalizerSequence::new(vec![Prepend::new("▁".into()).into(), space.into()]).into()
    } else {
        space.into()
    };
    inner.with_normalizer(Some(normalizer)).map_err(tok_err)?;
    let mut steps: Vec<DecoderWrapper> = vec![
        Replace::new("▁", " ").map_err(tok_err)?.into(),
        ByteFallback::default().into(),
        Fuse::default().into(),
    ];
    if add_space_prefix {
        steps.push(Strip::new(' ', 1, 0).into());
    }
    inner.with_decoder(Some(DecoderSequence::new(steps)));
    Ok(inner)
}
