//! The KServe v2 gRPC client (a model on another node: Triton, or another
//! Switchyard, for remote shadows and KServe upstreams), with the protocol's
//! tensor and status conversions that the server shares.
use engine::dnn::{DataType, DnnError, ErrorKind, InferRequest, InferResponse, Tensor};
use proto::inference::*;
use std::time::Duration;
use tonic::Status;

/// Our error as a gRPC status.
pub fn status(e: DnnError) -> Status {
    let code = match e.kind {
        ErrorKind::InvalidArg => tonic::Code::InvalidArgument,
        ErrorKind::NotFound => tonic::Code::NotFound,
        ErrorKind::Unavailable => tonic::Code::Unavailable,
        ErrorKind::Unsupported => tonic::Code::Unimplemented,
        ErrorKind::Internal => tonic::Code::Internal,
        ErrorKind::TooLarge => tonic::Code::ResourceExhausted,
    };
    Status::new(code, e.message)
}

/// Encodes `values` little-endian as `dtype`; a value `convert` cannot fit
/// (`None`) is named in the error.
pub fn encode<S: std::fmt::Display + Copy, T, const N: usize>(
    input: &str,
    dtype: DataType,
    values: impl IntoIterator<Item = S>,
    convert: impl Fn(S) -> Option<T>,
    le_bytes: impl Fn(T) -> [u8; N],
) -> Result<Vec<u8>, DnnError> {
    let values = values.into_iter();
    let mut out = Vec::with_capacity(values.size_hint().0 * N);
    for v in values {
        let t = convert(v).ok_or_else(|| {
            DnnError::invalid(format!(
                "input '{input}': {v} is not a valid {} value",
                dtype.wire()
            ))
        })?;
        out.extend(le_bytes(t));
    }
    Ok(out)
}

/// Typed `contents` as the tensor's binary encoding.
pub fn contents_bytes(
    name: &str,
    dtype: DataType,
    c: InferTensorContents,
) -> Result<Vec<u8>, DnnError> {
    match dtype {
        DataType::Bool => encode(name, dtype, c.bool_contents, Some, |b| [b as u8]),
        DataType::Int8 => encode(
            name,
            dtype,
            c.int_contents,
            narrow::<i32, i8>,
            i8::to_le_bytes,
        ),
        DataType::Int16 => encode(
            name,
            dtype,
            c.int_contents,
            narrow::<i32, i16>,
            i16::to_le_bytes,
        ),
        DataType::Int32 => encode(name, dtype, c.int_contents, Some, i32::to_le_bytes),
        DataType::Int64 => encode(name, dtype, c.int64_contents, Some, i64::to_le_bytes),
        DataType::Uint8 => encode(
            name,
            dtype,
            c.uint_contents,
            narrow::<u32, u8>,
            u8::to_le_bytes,
        ),
        DataType::Uint16 => encode(
            name,
            dtype,
            c.uint_contents,
            narrow::<u32, u16>,
            u16::to_le_bytes,
        ),
        DataType::Uint32 => encode(name, dtype, c.uint_contents, Some, u32::to_le_bytes),
        DataType::Uint64 => encode(name, dtype, c.uint64_contents, Some, u64::to_le_bytes),
        DataType::Fp32 => encode(name, dtype, c.fp32_contents, Some, f32::to_le_bytes),
        DataType::Fp64 => encode(name, dtype, c.fp64_contents, Some, f64::to_le_bytes),
        DataType::Bytes => Ok(engine::dnn::tensor::encode_bytes(
            c.bytes_contents.iter().map(Vec::as_slice),
        )),
        DataType::Fp16 | DataType::Bf16 => Err(DnnError::invalid(format!(
            "input '{name}': {} data must be sent in raw_input_contents",
            dtype.wire()
        ))),
    }
}

/// `v` as the narrower type `T`, if it fits.
fn narrow<S, T: TryFrom<S>>(v: S) -> Option<T> {
    T::try_from(v).ok()
}

/// A remote node's answer as ours: raw contents, or typed ones.
fn remote_response(r: ModelInferResponse) -> Result<InferResponse, DnnError> {
    let mut raws = r.raw_output_contents.into_iter();
    let mut outputs = Vec::with_capacity(r.outputs.len());
    for o in r.outputs {
        let dtype = DataType::from_wire(&o.datatype).ok_or_else(|| {
            DnnError::internal(format!(
                "the remote node sent output '{}' as unknown datatype '{}'",
                o.name, o.datatype
            ))
        })?;
        let data = match (raws.next(), o.contents) {
            (Some(bytes), _) => bytes,
            (None, Some(c)) => contents_bytes(&o.name, dtype, c)?,
            (None, None) => Vec::new(),
        };
        outputs.push(Tensor::new(o.name, dtype, o.shape, data));
    }
    Ok(InferResponse {
        model_name: r.model_name,
        model_version: r.model_version,
        id: r.id,
        outputs,
    })
}

/// A model on another node speaking KServe v2 over gRPC (Triton, or another
/// Switchyard).
#[derive(Clone)]
pub struct Remote {
    client: proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient<
        tonic::transport::Channel,
    >,
    /// The model's name there.
    pub model: String,
    pub endpoint: String,
}

impl Remote {
    /// Connects lazily to `endpoint` (`grpc://host:port` or `http://host:port`;
    /// `grpcs://` or `https://` for TLS, with `tls`'s CA and client
    /// certificate, or the webpki roots). An answer over `max_answer` bytes
    /// is refused before it is read ([`Remote::too_large`]).
    pub fn new(
        endpoint: &str,
        model: &str,
        timeout: Duration,
        tls: Option<&crate::tls::ClientTlsConfig>,
        max_answer: usize,
    ) -> Result<Self, String> {
        let mut channel = Self::endpoint(endpoint)?;
        if channel.uri().scheme_str() == Some("https") {
            let tls = tls.cloned().unwrap_or_default().tonic("tls")?;
            channel = channel
                .tls_config(tls)
                .map_err(|e| format!("`{endpoint}`: {e}"))?;
        }
        let channel = channel
            .connect_timeout(Duration::from_secs(2).min(timeout))
            .timeout(timeout)
            .tcp_nodelay(true)
            .connect_lazy();
        Ok(Self {
            client:
                proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient::new(
                    channel,
                )
                .max_decoding_message_size(max_answer)
                .max_encoding_message_size(usize::MAX),
            model: model.to_string(),
            endpoint: endpoint.to_string(),
        })
    }

    /// `grpc://host:port` (or `http://`) as tonic's endpoint; checks the
    /// address without connecting, so configs are validated before start.
    pub fn endpoint(endpoint: &str) -> Result<tonic::transport::Endpoint, String> {
        let url = if let Some(rest) = endpoint.strip_prefix("grpc://") {
            format!("http://{rest}")
        } else if let Some(rest) = endpoint.strip_prefix("grpcs://") {
            format!("https://{rest}")
        } else {
            endpoint.to_string()
        };
        tonic::transport::Endpoint::from_shared(url)
            .map_err(|e| format!("`{endpoint}` is not a gRPC endpoint: {e}"))
    }

    /// Runs `req` there (under the remote model's name), raw tensors both ways.
    pub async fn call(&self, req: &InferRequest) -> Result<InferResponse, Status> {
        let (inputs, raw) = req
            .inputs
            .iter()
            .map(|t| {
                let meta = model_infer_request::InferInputTensor {
                    name: t.name.clone(),
                    datatype: t.dtype.wire().into(),
                    shape: t.shape.clone(),
                    parameters: Default::default(),
                    contents: None,
                };
                (meta, t.data.clone())
            })
            .unzip();
        let outputs = req
            .outputs
            .iter()
            .map(|o| model_infer_request::InferRequestedOutputTensor {
                name: o.name.clone(),
                parameters: Default::default(),
            })
            .collect();
        let msg = ModelInferRequest {
            model_name: self.model.clone(),
            model_version: req.version.map(|v| v.to_string()).unwrap_or_default(),
            id: req.id.clone(),
            parameters: Default::default(),
            inputs,
            outputs,
            raw_input_contents: raw,
        };
        let resp = self.client.clone().model_infer(msg).await?;
        remote_response(resp.into_inner()).map_err(status)
    }

    pub async fn infer(&self, req: &InferRequest) -> Result<InferResponse, DnnError> {
        self.call(req).await.map_err(|s| self.error(s))
    }

    /// Whether `s` is tonic's refusal of an answer over `max_answer`.
    pub fn too_large(s: &Status) -> bool {
        s.code() == tonic::Code::OutOfRange
            && s.message()
                .starts_with("Error, decoded message length too large")
    }

    /// The remote's status as our error, naming the model and node.
    pub fn error(&self, s: Status) -> DnnError {
        let kind = match s.code() {
            tonic::Code::InvalidArgument => ErrorKind::InvalidArg,
            tonic::Code::NotFound => ErrorKind::NotFound,
            tonic::Code::Unimplemented => ErrorKind::Unsupported,
            tonic::Code::Internal => ErrorKind::Internal,
            tonic::Code::ResourceExhausted | tonic::Code::OutOfRange => ErrorKind::TooLarge,
            _ => ErrorKind::Unavailable,
        };
        DnnError {
            kind,
            message: format!("{} at {}: {}", self.model, self.endpoint, s.message()),
        }
    }

    pub async fn is_ready(&self) -> bool {
        let req = ModelReadyRequest {
            name: self.model.clone(),
            version: String::new(),
        };
        self.client
            .clone()
            .model_ready(req)
            .await
            .is_ok_and(|r| r.into_inner().ready)
    }

    pub async fn metadata(&self) -> Result<ModelMetadataResponse, DnnError> {
        let req = ModelMetadataRequest {
            name: self.model.clone(),
            version: String::new(),
        };
        let r = self.client.clone().model_metadata(req).await;
        r.map(tonic::Response::into_inner)
            .map_err(|s| self.error(s))
    }

    pub async fn config(&self) -> Result<ModelConfig, DnnError> {
        let req = ModelConfigRequest {
            name: self.model.clone(),
            version: String::new(),
        };
        let r = self.client.clone().model_config(req).await;
        r.map_err(|s| self.error(s))?
            .into_inner()
            .config
            .ok_or_else(|| {
                DnnError::internal(format!(
                    "{} at {} sent no config",
                    self.model, self.endpoint
                ))
            })
    }
}
