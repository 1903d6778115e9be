//! LLMs over KServe v2, the way Triton's vLLM backend exposes them: a BYTES
//! `text_input` in, `text_output` out, through `infer`, `generate` and
//! `generate_stream`, with sampling settings as JSON (`sampling_parameters`).
use crate::api::AppState;
use crate::dispatch::llm::{Events, Generation, LlmTarget};
use crate::dispatch::{self, Unavailable};
use crate::offload::Offload;
use crate::params::{ParamError, SamplingFields};
use axum::http::HeaderMap;
use engine::dnn::tensor::{bytes_elements, encode_bytes};
use engine::dnn::{DataType, DnnError, InferRequest, InferResponse, Tensor};
use engine::llm::{GenerationEvent, GenerationRequest, LlmEngine, LlmError};
use futures::Stream;
use proto::inference::model_metadata_response::TensorMetadata;
use proto::inference::{ModelConfig, ModelInput, ModelMetadataResponse, ModelOutput};
use serde_json::Value;

/// Tokens generated when the request names no `max_tokens` (vLLM's default).
const DEFAULT_MAX_TOKENS: i64 = 16;
pub const PLATFORM: &str = "switchyard_llm";

/// One generation as the protocol asks for it.
pub struct LlmCall {
    pub prompt: String,
    /// Sampling parameters as given; checked by [`request`].
    pub fields: SamplingFields,
    /// Whether the (non-streamed) output repeats the prompt before the completion.
    pub exclude_input: bool,
}

/// Inputs: name, datatype, whether required.
const INPUTS: [(&str, DataType, bool); 4] = [
    ("text_input", DataType::Bytes, true),
    ("stream", DataType::Bool, false),
    ("sampling_parameters", DataType::Bytes, false),
    ("exclude_input_in_output", DataType::Bool, false),
];

pub fn metadata(name: &str, version: &str) -> ModelMetadataResponse {
    ModelMetadataResponse {
        name: name.into(),
        versions: vec![version.into()],
        platform: PLATFORM.into(),
        inputs: INPUTS
            .iter()
            .map(|(n, d, _)| TensorMetadata {
                name: (*n).into(),
                datatype: d.wire().into(),
                shape: vec![1],
            })
            .collect(),
        outputs: vec![TensorMetadata {
            name: "text_output".into(),
            datatype: "BYTES".into(),
            shape: vec![-1],
        }],
    }
}

pub fn config(name: &str) -> ModelConfig {
    use proto::inference::DataType as C;
    ModelConfig {
        name: name.into(),
        backend: PLATFORM.into(),
        input: INPUTS
            .iter()
            .map(|(n, d, required)| ModelInput {
                name: (*n).into(),
                data_type: if *d == DataType::Bool {
                    C::TypeBool
                } else {
                    C::TypeString
                } as i32,
                dims: vec![1],
                optional: !required,
                ..Default::default()
            })
            .collect(),
        output: vec![ModelOutput {
            name: "text_output".into(),
            data_type: C::TypeString as i32,
            dims: vec![-1],
            ..Default::default()
        }],
        model_transaction_policy: Some(proto::inference::ModelTransactionPolicy {
            decoupled: true,
        }),
        ..Default::default()
    }
}

fn one_string(t: &Tensor) -> Result<String, DnnError> {
    if t.dtype != DataType::Bytes {
        return Err(DnnError::invalid(format!(
            "input '{}' must be BYTES",
            t.name
        )));
    }
    let elements = bytes_elements(&t.data)?;
    let [one] = elements.as_slice() else {
        return Err(DnnError::invalid(format!(
            "input '{}' must hold exactly one string",
            t.name
        )));
    };
    String::from_utf8(one.to_vec())
        .map_err(|_| DnnError::invalid(format!("input '{}' is not UTF-8", t.name)))
}

fn one_bool(t: &Tensor) -> Result<bool, DnnError> {
    match (t.dtype, t.data.as_slice()) {
        (DataType::Bool, [b]) => Ok(*b != 0),
        _ => Err(DnnError::invalid(format!(
            "input '{}' must be one BOOL",
            t.name
        ))),
    }
}

/// The call an `infer` request's tensors describe; also whether it asks to stream.
pub fn call_from_tensors(inputs: &[Tensor]) -> Result<(LlmCall, bool), DnnError> {
    let mut prompt = None;
    let mut fields = SamplingFields::default();
    let (mut stream, mut exclude_input) = (false, false);
    for t in inputs {
        match t.name.as_str() {
            "text_input" => prompt = Some(one_string(t)?),
            "stream" => stream = one_bool(t)?,
            "exclude_input_in_output" => exclude_input = one_bool(t)?,
            "sampling_parameters" => {
                let text = one_string(t)?;
                fields = match serde_json::from_str(&text) {
                    Ok(Value::Object(m)) => SamplingFields::from_json(&m)?,
                    _ => {
                        return Err(DnnError::invalid(
                            "sampling_parameters must be a JSON object",
                        ))
                    }
                };
            }
            other => {
                return Err(DnnError::invalid(format!(
                    "unexpected inference input '{other}' for an LLM"
                )))
            }
        }
    }
    let prompt = prompt.ok_or_else(|| DnnError::invalid("the request has no 'text_input'"))?;
    Ok((
        LlmCall {
            prompt,
            fields,
            exclude_input,
        },
        stream,
    ))
}

fn llm_error(e: LlmError) -> DnnError {
    match e {
        LlmError::QueueFull { .. } | LlmError::EngineStopped => {
            DnnError::unavailable(e.to_string())
        }
        LlmError::InvalidRequest(_)
        | LlmError::Constraint(_)
        | LlmError::ContextLength { .. }
        | LlmError::Tokenizer(_) => DnnError::invalid(e.to_string()),
        other => DnnError::internal(other.to_string()),
    }
}

impl From<ParamError> for DnnError {
    fn from(e: ParamError) -> Self {
        DnnError::invalid(e.message)
    }
}

/// The engine request for `call`: its parameters checked as every LLM front
/// checks them, its prompt tokenized (on the blocking pool when it is long).
pub async fn request(
    offload: &Offload,
    engine: &LlmEngine,
    call: &LlmCall,
) -> Result<GenerationRequest, DnnError> {
    let mut fields = call.fields.clone();
    fields.max_tokens.get_or_insert(DEFAULT_MAX_TOKENS);
    let p = fields.validate(None, None)?;
    if p.n != 1 {
        return Err(DnnError::invalid(format!(
            "`n` must be 1 over KServe (text_output holds one completion), got {}",
            p.n
        )));
    }
    let (engine, text) = (engine.clone(), call.prompt.clone());
    let prompt = offload
        .run(text.len(), move || engine.tokenizer().encode(&text))
        .await
        .map_err(llm_error)?;
    Ok(GenerationRequest {
        prompt,
        sampling: p.sampling,
        max_tokens: p.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS as usize),
        min_tokens: p.min_tokens,
        stop: p.stop,
        ignore_eos: p.ignore_eos,
        n: 1,
        constraint: None,
    })
}

/// The LLM deployment that serves a KServe call to `name` through the
/// dispatch layer, or `None` when `name` is not an LLM (a repository model
/// of that name comes first). The rollout unit is the `x-switchyard-unit`
/// header, else the request id.
pub fn route(
    state: &AppState,
    name: &str,
    headers: &HeaderMap,
    request_id: &str,
) -> Result<Option<LlmTarget>, DnnError> {
    if state.dnn.as_ref().is_some_and(|r| r.model(name).is_ok()) {
        return Ok(None);
    }
    let table = state.routes().snapshot();
    let unit =
        dispatch::unit(&table, name, headers, None).unwrap_or_else(|| request_id.to_string());
    let target = dispatch::resolve_llm(&table, name, Some(&unit), |e| e.unit(headers, None, &[]))
        .map_err(|Unavailable(m)| DnnError::unavailable(m))?;
    Ok(target.map(|t| t.charging(state.token_budget(headers))))
}

/// The id a KServe request goes by: its own `id`, else `x-request-id`, else a new one.
pub fn request_id(id: &str, headers: &HeaderMap) -> String {
    if id.is_empty() {
        dispatch::request_id(headers, "kserve")
    } else {
        id.to_string()
    }
}

/// Starts `call` on `target` through the dispatch layer (shadows, outcome
/// statistics), its parameters checked and its prompt tokenized first.
pub async fn start(
    state: &AppState,
    target: &LlmTarget,
    call: &LlmCall,
    request_id: String,
) -> Result<Events, DnnError> {
    let request = request(&state.offload, &target.engine, call).await?;
    let generation = Generation {
        request,
        request_id,
        shadow_prompts: vec![],
    };
    target
        .start(&state.recorders(), generation)
        .map_err(llm_error)
}

/// The completion's text pieces as the engine releases them.
pub fn pieces(rx: Events) -> impl Stream<Item = Result<String, DnnError>> + Send + 'static {
    futures::stream::unfold(rx, |mut rx| async move {
        loop {
            match rx.recv().await? {
                GenerationEvent::Delta { text, .. } if text.is_empty() => continue,
                GenerationEvent::Delta { text, .. } => return Some((Ok(text), rx)),
                GenerationEvent::Finished { .. } => return None,
                GenerationEvent::Failed(e) => return Some((Err(DnnError::internal(e)), rx)),
            }
        }
    })
}

/// The whole output: the prompt (unless excluded) and the completion.
pub async fn complete(call: &LlmCall, rx: Events) -> Result<String, DnnError> {
    use futures::StreamExt;
    let mut out = if call.exclude_input {
        String::new()
    } else {
        call.prompt.clone()
    };
    let mut pieces = Box::pin(pieces(rx));
    while let Some(piece) = pieces.next().await {
        out.push_str(&piece?);
    }
    Ok(out)
}

pub fn text_tensor(text: &str) -> Tensor {
    Tensor::new(
        "text_output",
        DataType::Bytes,
        vec![1],
        encode_bytes([text.as_bytes()]),
    )
}

/// The whole `text_output` of a call already read from `req`.
pub async fn answer(
    state: &AppState,
    target: &LlmTarget,
    req: InferRequest,
    call: &LlmCall,
    request_id: String,
) -> Result<InferResponse, DnnError> {
    let rx = start(state, target, call, request_id).await?;
    let text = complete(call, rx).await?;
    Ok(InferResponse {
        model_name: req.model,
        model_version: version_of(target),
        id: req.id,
        outputs: vec![text_tensor(&text)],
    })
}

/// The version KServe answers name (1 for a model configured without the registry).
pub fn version_of(target: &LlmTarget) -> String {
    target.version.unwrap_or(1).to_string()
}
