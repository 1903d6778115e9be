//! Fuzz targets: each takes arbitrary bytes and runs one parser that faces
//! untrusted input the way the server runs it. None may panic, hang or
//! allocate without bound; an error is a fine answer. `fuzz/` runs them under
//! libFuzzer (`cargo fuzz`), and `tests/fuzz_corpus.rs` replays the checked-in
//! corpus and mutations of it in every test run.
use crate::api::kserve;
use crate::api::openai_types::{ChatRequest, CompletionRequest};
use crate::config::Config;
use crate::params::SamplingFields;
use engine::llm::{ChatMessage, ChatTemplate, Tokenizer};
use std::collections::HashMap;
use std::sync::OnceLock;

/// A target: a name (its corpus folder) and the function.
pub type Target = (&'static str, fn(&[u8]));

/// Every target, by corpus folder name.
pub const TARGETS: &[Target] = &[
    ("kserve_http_infer", kserve_http_infer),
    ("kserve_grpc_infer", kserve_grpc_infer),
    ("model_config", model_config),
    ("config_yaml", config_yaml),
    ("gguf_header", gguf_header),
    ("safetensors_header", safetensors_header),
    ("chat_template", chat_template),
    ("tokenizer", tokenizer),
    ("openai_request", openai_request),
    ("sampling_parameters", sampling_parameters),
];

/// A KServe HTTP infer body. The first two bytes choose the binary header's
/// length (`Inference-Header-Content-Length`): 0xFFFF for none.
pub fn kserve_http_infer(data: &[u8]) {
    let Some((len, body)) = data.split_first_chunk::<2>() else {
        return;
    };
    let len = u16::from_le_bytes(*len);
    let mut headers = axum::http::HeaderMap::new();
    if len != u16::MAX {
        headers.insert("inference-header-content-length", len.into());
    }
    if let Ok((req, _)) = kserve::codec::parse_infer("m".into(), None, &headers, body, None) {
        for t in &req.inputs {
            let _ = t.check_size();
        }
    }
}

/// A KServe gRPC `ModelInferRequest` message, as the server decodes it.
pub fn kserve_grpc_infer(data: &[u8]) {
    use proto::prost::Message;
    let Ok(msg) = proto::inference::ModelInferRequest::decode(data) else {
        return;
    };
    if let Ok(req) = kserve::grpc::infer_request(msg) {
        for t in &req.inputs {
            let _ = t.check_size();
        }
        let _ = kserve::llm::call_from_tensors(&req.inputs);
    }
}

/// A `config.pbtxt` (text format), validated and completed as a repository does.
pub fn model_config(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    if let Ok(cfg) = proto::model_config::parse_text(&text) {
        let _ = engine::dnn::ModelDefinition::from_config("m", cfg);
    }
    if let Ok(cfg) = proto::model_config::from_json(&text) {
        let _ = engine::dnn::ModelDefinition::from_config("m", cfg);
    }
}

/// The server's YAML configuration.
pub fn config_yaml(data: &[u8]) {
    let _ = Config::parse(&String::from_utf8_lossy(data));
}

/// A GGUF file's header and metadata, and the tokenizer rebuilt from it.
pub fn gguf_header(data: &[u8]) {
    use candle_core::quantized::gguf_file::Content;
    if let Ok(content) = Content::read(&mut std::io::Cursor::new(data)) {
        let _ = Tokenizer::from_gguf(&content.metadata);
    }
}

/// A safetensors file's header and tensors.
pub fn safetensors_header(data: &[u8]) {
    let _ = candle_core::safetensors::load_buffer(data, &candle_core::Device::Cpu);
}

/// A chat template (up to the first NUL byte) rendered over a conversation
/// whose texts are the rest.
pub fn chat_template(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let (source, rest) = text.split_once('\0').unwrap_or((&text, ""));
    let Ok(t) = ChatTemplate::new(source, Some("<s>".into()), Some("</s>".into())) else {
        return;
    };
    let messages: Vec<ChatMessage> = rest
        .split('\0')
        .zip(["system", "user", "assistant", "user"].iter().cycle())
        .map(|(content, role)| ChatMessage {
            role: (*role).into(),
            content: content.into(),
        })
        .collect();
    let _ = t.render(&messages, true);
}

/// A byte-level BPE tokenizer, rebuilt as from GGUF metadata, encoding and
/// decoding arbitrary text.
pub fn tokenizer(data: &[u8]) {
    static TOKENIZER: OnceLock<Tokenizer> = OnceLock::new();
    let tok = TOKENIZER.get_or_init(small_tokenizer);
    let text = String::from_utf8_lossy(data);
    if let Ok(ids) = tok.encode(&text) {
        let _ = tok.decode(&ids);
        for &id in ids.iter().take(8) {
            tok.token_text(id);
        }
    }
}

/// A GPT-2 style vocabulary: the 256 byte symbols, a few merges and two
/// control tokens, with SmolLM's digit splitting.
fn small_tokenizer() -> Tokenizer {
    Tokenizer::from_gguf(&small_vocabulary()).expect("the fuzz vocabulary builds")
}

/// [`small_tokenizer`]'s vocabulary as GGUF `tokenizer.ggml.*` metadata
/// (263 tokens, the last the end of sequence); tests build tiny GGUF models
/// with it too.
pub(crate) fn small_vocabulary() -> HashMap<String, candle_core::quantized::gguf_file::Value> {
    use candle_core::quantized::gguf_file::Value;
    let bytes: Vec<String> = byte_symbols().into_iter().collect();
    let mut tokens = bytes.clone();
    let merges = ["Ġ t", "h e", "Ġt he", "i n", "e r"];
    for m in merges {
        tokens.push(m.replace(' ', ""));
    }
    tokens.push("<|im_start|>".into());
    tokens.push("<|im_end|>".into());
    let mut types = vec![1i32; tokens.len()];
    let n = types.len();
    types[n - 2] = 3;
    types[n - 1] = 3;
    let md: HashMap<String, Value> = [
        ("tokenizer.ggml.model", Value::String("gpt2".into())),
        ("tokenizer.ggml.pre", Value::String("smollm".into())),
        (
            "tokenizer.ggml.tokens",
            Value::Array(tokens.into_iter().map(Value::String).collect()),
        ),
        (
            "tokenizer.ggml.merges",
            Value::Array(merges.iter().map(|m| Value::String((*m).into())).collect()),
        ),
        (
            "tokenizer.ggml.token_type",
            Value::Array(types.into_iter().map(Value::I32).collect()),
        ),
        ("tokenizer.ggml.eos_token_id", Value::U32(n as u32 - 1)),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    md
}

/// GPT-2's byte-to-symbol table: printable bytes stand for themselves, the
/// rest map to code points from 256 on.
fn byte_symbols() -> Vec<String> {
    let mut next = 256u32;
    (0u32..256)
        .map(|b| {
            let printable = (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || b >= 0xae;
            let c = if printable {
                b
            } else {
                next += 1;
                next - 1
            };
            char::from_u32(c).expect("a valid code point").to_string()
        })
        .collect()
}

/// An OpenAI chat or completions request body, parsed and validated.
pub fn openai_request(data: &[u8]) {
    if let Ok(r) = serde_json::from_slice::<ChatRequest>(data) {
        let _ = r.chat_messages();
        let logprobs = r.logprobs().ok().flatten();
        let _ = r.common.validate(r.max_completion_tokens, logprobs);
    }
    if let Ok(r) = serde_json::from_slice::<CompletionRequest>(data) {
        let _ = r.prompts();
        let _ = r.logprobs();
        let _ = r.common.validate(None, None);
    }
}

/// KServe sampling parameters (a JSON object), converted and validated.
pub fn sampling_parameters(data: &[u8]) {
    if let Ok(serde_json::Value::Object(m)) = serde_json::from_slice(data) {
        if let Ok(f) = SamplingFields::from_json(&m) {
            let _ = f.validate(None, None);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fuzz_vocabulary_round_trips_text() {
        let tok = small_tokenizer();
        let text = "the 2026 <|im_start|>ünïcödé\n\t  x";
        let ids = tok.encode(text).unwrap();
        assert!(ids.contains(&(tok_id(&tok, "<|im_start|>"))));
        // Decoding leaves control tokens out.
        assert_eq!(tok.decode(&ids).unwrap(), text.replace("<|im_start|>", ""));
    }

    fn tok_id(tok: &Tokenizer, t: &str) -> u32 {
        tok.encode(t).unwrap()[0]
    }
}
