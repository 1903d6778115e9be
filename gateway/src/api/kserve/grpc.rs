//! KServe v2 over gRPC (`inference.GRPCInferenceService`) with Triton's
//! extensions, `raw_input_contents` / `raw_output_contents`, streaming
//! infer, gRPC health, and message limits as large as the clients allow.
use super::{
    config_not_a_string, index, llm, model_config, model_is_ready, model_metadata, parse_version,
    repository, server_metadata, statistics,
};
use crate::api::AppState;
use crate::dispatch::llm::LlmTarget;
use crate::dispatch::Served;
use crate::kserve_client::contents_bytes;
pub use crate::kserve_client::status;
use axum::http::HeaderMap;
use engine::dnn::{
    DataType, DnnError, InferRequest, InferResponse, ModelRepository, RequestedOutput, Tensor,
};
use futures::StreamExt;
use proto::inference::grpc_inference_service_server::{
    GrpcInferenceService, GrpcInferenceServiceServer,
};
use proto::inference::infer_parameter::ParameterChoice;
use proto::inference::model_infer_response::InferOutputTensor;
use proto::inference::*;
use std::pin::Pin;
use std::time::Duration;
use tonic::{Request, Response, Status, Streaming};

pub struct KserveGrpc {
    state: AppState,
}

type GrpcResult<T> = Result<Response<T>, Status>;

impl KserveGrpc {
    /// Repository control needs a key with the admin role (or, with no keys
    /// configured, `--allow-unauthenticated-control`).
    fn control(&self, m: &tonic::metadata::MetadataMap) -> Result<(), Status> {
        self.state
            .authorize(
                crate::auth::from_metadata(m),
                crate::auth::Permission::Control,
            )
            .map(drop)
            .map_err(|e| e.grpc_status())
    }

    /// Inference needs a key when `auth.inference_requires_key` is set.
    fn invoke(&self, m: &tonic::metadata::MetadataMap) -> Result<(), Status> {
        self.state
            .authorize_inference(|| crate::auth::from_metadata(m))
            .map_err(|e| e.grpc_status())
    }

    fn repo(&self) -> Result<&ModelRepository, Status> {
        repository(&self.state.dnn)
            .map(std::sync::Arc::as_ref)
            .map_err(status)
    }
}

fn param_u64(p: Option<&InferParameter>) -> Option<u64> {
    use infer_parameter::ParameterChoice as P;
    match p?.parameter_choice.as_ref()? {
        P::Int64Param(v) => u64::try_from(*v).ok(),
        P::Uint64Param(v) => Some(*v),
        _ => None,
    }
}

pub(crate) fn infer_request(r: ModelInferRequest) -> Result<InferRequest, DnnError> {
    let version = parse_version(&r.model_version)?;
    let raw = !r.raw_input_contents.is_empty();
    if raw && r.raw_input_contents.len() != r.inputs.len() {
        return Err(DnnError::invalid(format!(
            "raw_input_contents has {} entries for {} inputs",
            r.raw_input_contents.len(),
            r.inputs.len()
        )));
    }
    let mut raws = r.raw_input_contents.into_iter();
    let mut inputs = Vec::with_capacity(r.inputs.len());
    for input in r.inputs {
        let dtype = DataType::from_wire(&input.datatype).ok_or_else(|| {
            DnnError::invalid(format!(
                "input '{}': invalid datatype '{}'",
                input.name, input.datatype
            ))
        })?;
        if input.shape.iter().any(|&d| d < 0) {
            return Err(DnnError::invalid(format!(
                "input '{}': shape {:?} has a negative dimension",
                input.name, input.shape
            )));
        }
        let data = match (raws.next(), input.contents) {
            (Some(_), Some(_)) => {
                return Err(DnnError::invalid(format!(
                    "input '{}': contents must be empty when raw_input_contents is used",
                    input.name
                )))
            }
            (Some(bytes), None) => bytes,
            (None, Some(c)) => contents_bytes(&input.name, dtype, c)?,
            (None, None) => {
                return Err(DnnError::invalid(format!(
                    "input '{}' has no data",
                    input.name
                )))
            }
        };
        inputs.push(Tensor::new(input.name, dtype, input.shape, data));
    }
    let outputs = r
        .outputs
        .into_iter()
        .map(|o| {
            let classification = param_u64(o.parameters.get("classification")).map(|k| k as usize);
            RequestedOutput {
                name: o.name,
                classification,
            }
        })
        .collect();
    Ok(InferRequest {
        model: r.model_name,
        version,
        id: r.id,
        inputs,
        outputs,
        timeout: param_u64(r.parameters.get("timeout")).map(Duration::from_micros),
    })
}

fn infer_response(resp: InferResponse) -> ModelInferResponse {
    let mut outputs = Vec::with_capacity(resp.outputs.len());
    let mut raw = Vec::with_capacity(resp.outputs.len());
    for t in resp.outputs {
        outputs.push(InferOutputTensor {
            name: t.name,
            datatype: t.dtype.wire().into(),
            shape: t.shape,
            parameters: Default::default(),
            contents: None,
        });
        raw.push(t.data);
    }
    ModelInferResponse {
        model_name: resp.model_name,
        model_version: resp.model_version,
        id: resp.id,
        parameters: Default::default(),
        outputs,
        raw_output_contents: raw,
    }
}

/// Runs one request; what the dispatch layer chose (an LLM's version and
/// arm) comes back in the response's parameters.
async fn run_infer(
    state: &AppState,
    r: ModelInferRequest,
    headers: &HeaderMap,
) -> Result<ModelInferResponse, DnnError> {
    let (resp, served) = super::infer(state, infer_request(r)?, headers).await?;
    let mut out = infer_response(resp);
    if let Some(s) = served {
        served_parameters(&mut out, &s);
    }
    Ok(out)
}

/// `switchyard_arm`, `switchyard_model_version` and `switchyard_experiment`
/// as response parameters, as HTTP names them in headers.
fn served_parameters(out: &mut ModelInferResponse, s: &Served) {
    let text = |v: String| InferParameter {
        parameter_choice: Some(ParameterChoice::StringParam(v)),
    };
    let p = &mut out.parameters;
    p.insert("switchyard_arm".into(), text(s.arm.as_str().to_string()));
    if let Some(v) = s.version {
        p.insert("switchyard_model_version".into(), text(v.to_string()));
    }
    if let Some(e) = &s.experiment {
        p.insert("switchyard_experiment".into(), text(e.clone()));
    }
}

type StreamSender = tokio::sync::mpsc::Sender<Result<ModelStreamInferResponse, Status>>;

/// One request of a stream: an LLM asked to stream (`stream` = true) gets one
/// response per text piece, anything else one response.
async fn stream_one(
    state: &AppState,
    r: ModelInferRequest,
    headers: &HeaderMap,
    tx: &StreamSender,
) {
    let id = r.id.clone();
    let request_id = llm::request_id(&r.id, headers);
    let result = match llm::route(state, &r.model_name, headers, &request_id) {
        Ok(Some(target)) => stream_llm(state, &target, r, request_id, tx).await,
        Ok(None) => run_infer(state, r, headers).await.map(Some),
        Err(e) => Err(e),
    };
    let msg = match result {
        Ok(None) => return,
        Ok(Some(resp)) => ModelStreamInferResponse {
            error_message: String::new(),
            infer_response: Some(resp),
        },
        Err(e) => ModelStreamInferResponse {
            error_message: e.message,
            infer_response: Some(ModelInferResponse {
                id,
                ..Default::default()
            }),
        },
    };
    let _ = tx.send(Ok(msg)).await;
}

/// Streams an LLM's text pieces into `tx` (and returns `None`), or answers
/// a request that does not ask to stream with one response.
async fn stream_llm(
    state: &AppState,
    target: &LlmTarget,
    r: ModelInferRequest,
    request_id: String,
    tx: &StreamSender,
) -> Result<Option<ModelInferResponse>, DnnError> {
    // Triton ends a decoupled stream with an empty response flagged final
    // only for clients that ask (perf_analyzer and genai-perf do).
    let empty_final = matches!(
        r.parameters
            .get("triton_enable_empty_final_response")
            .and_then(|p| p.parameter_choice.as_ref()),
        Some(ParameterChoice::BoolParam(true))
    );
    let req = infer_request(r)?;
    let (call, stream) = llm::call_from_tensors(&req.inputs)?;
    let served = |mut out: ModelInferResponse| {
        served_parameters(&mut out, &target.served());
        out
    };
    if !stream {
        let resp = llm::answer(state, target, req, &call, request_id).await?;
        return Ok(Some(served(infer_response(resp))));
    }
    let version = llm::version_of(target);
    let events = llm::start(state, target, &call, request_id).await?;
    let mut pieces = Box::pin(llm::pieces(events));
    let response = |outputs: Vec<Tensor>, last: bool| {
        let mut out = served(infer_response(InferResponse {
            model_name: req.model.clone(),
            model_version: version.clone(),
            id: req.id.clone(),
            outputs,
        }));
        out.parameters.insert(
            "triton_final_response".into(),
            InferParameter {
                parameter_choice: Some(ParameterChoice::BoolParam(last)),
            },
        );
        ModelStreamInferResponse {
            error_message: String::new(),
            infer_response: Some(out),
        }
    };
    loop {
        let piece = tokio::select! {
            p = pieces.next() => match p {
                Some(p) => p,
                None => break,
            },
            _ = state.shutdown.ended() => {
                return Err(DnnError::unavailable(
                    "the server is shutting down; send the request again",
                ))
            }
        };
        let msg = response(vec![llm::text_tensor(&piece?)], false);
        if tx.send(Ok(msg)).await.is_err() {
            return Ok(None);
        }
    }
    if empty_final {
        let _ = tx.send(Ok(response(Vec::new(), true))).await;
    }
    Ok(None)
}

type InferStream =
    Pin<Box<dyn futures::Stream<Item = Result<ModelStreamInferResponse, Status>> + Send>>;

#[tonic::async_trait]
impl GrpcInferenceService for KserveGrpc {
    async fn server_live(&self, _: Request<ServerLiveRequest>) -> GrpcResult<ServerLiveResponse> {
        Ok(Response::new(ServerLiveResponse { live: true }))
    }

    async fn server_ready(
        &self,
        _: Request<ServerReadyRequest>,
    ) -> GrpcResult<ServerReadyResponse> {
        Ok(Response::new(ServerReadyResponse {
            ready: self.state.is_ready(),
        }))
    }

    async fn model_ready(&self, r: Request<ModelReadyRequest>) -> GrpcResult<ModelReadyResponse> {
        let r = r.into_inner();
        let version = parse_version(&r.version).map_err(status)?;
        let ready = model_is_ready(&self.state, &r.name, version);
        Ok(Response::new(ModelReadyResponse { ready }))
    }

    async fn server_metadata(
        &self,
        _: Request<ServerMetadataRequest>,
    ) -> GrpcResult<ServerMetadataResponse> {
        Ok(Response::new(server_metadata()))
    }

    async fn model_metadata(
        &self,
        r: Request<ModelMetadataRequest>,
    ) -> GrpcResult<ModelMetadataResponse> {
        let r = r.into_inner();
        let version = parse_version(&r.version).map_err(status)?;
        model_metadata(&self.state, &r.name, version)
            .await
            .map(Response::new)
            .map_err(status)
    }

    async fn model_infer(&self, r: Request<ModelInferRequest>) -> GrpcResult<ModelInferResponse> {
        self.invoke(r.metadata())?;
        let headers = r.metadata().clone().into_headers();
        run_infer(&self.state, r.into_inner(), &headers)
            .await
            .map(Response::new)
            .map_err(status)
    }

    type ModelStreamInferStream = InferStream;

    async fn model_stream_infer(
        &self,
        r: Request<Streaming<ModelInferRequest>>,
    ) -> GrpcResult<Self::ModelStreamInferStream> {
        self.invoke(r.metadata())?;
        let state = self.state.clone();
        let headers = r.metadata().clone().into_headers();
        let mut inbound = r.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        tokio::spawn(async move {
            while let Some(Ok(req)) = inbound.next().await {
                let (tx, state, headers) = (tx.clone(), state.clone(), headers.clone());
                tokio::spawn(async move { stream_one(&state, req, &headers, &tx).await });
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn model_config(
        &self,
        r: Request<ModelConfigRequest>,
    ) -> GrpcResult<ModelConfigResponse> {
        let r = r.into_inner();
        let version = parse_version(&r.version).map_err(status)?;
        let config = model_config(&self.state, &r.name, version)
            .await
            .map_err(status)?;
        Ok(Response::new(ModelConfigResponse {
            config: Some(config),
        }))
    }

    async fn model_statistics(
        &self,
        r: Request<ModelStatisticsRequest>,
    ) -> GrpcResult<ModelStatisticsResponse> {
        let r = r.into_inner();
        let version = parse_version(&r.version).map_err(status)?;
        let name = (!r.name.is_empty()).then_some(r.name.as_str());
        statistics(&self.state, name, version)
            .map(Response::new)
            .map_err(status)
    }

    async fn repository_index(
        &self,
        r: Request<RepositoryIndexRequest>,
    ) -> GrpcResult<RepositoryIndexResponse> {
        Ok(Response::new(index(self.repo()?, r.into_inner().ready)))
    }

    async fn repository_model_load(
        &self,
        r: Request<RepositoryModelLoadRequest>,
    ) -> GrpcResult<RepositoryModelLoadResponse> {
        self.control(r.metadata())?;
        let r = r.into_inner();
        use model_repository_parameter::ParameterChoice as P;
        let config = match r.parameters.get("config").map(|p| &p.parameter_choice) {
            None => None,
            Some(Some(P::StringParam(c))) => Some(c.clone()),
            Some(_) => return Err(status(config_not_a_string())),
        };
        let has_files = r.parameters.keys().any(|k| k.starts_with("file:"));
        super::load(&self.state, r.model_name, has_files, config)
            .await
            .map_err(status)?;
        Ok(Response::new(RepositoryModelLoadResponse {}))
    }

    async fn repository_model_unload(
        &self,
        r: Request<RepositoryModelUnloadRequest>,
    ) -> GrpcResult<RepositoryModelUnloadResponse> {
        self.control(r.metadata())?;
        self.repo()?
            .unload(&r.into_inner().model_name)
            .map_err(status)?;
        Ok(Response::new(RepositoryModelUnloadResponse {}))
    }
}

/// Serves KServe gRPC (and `grpc.health.v1.Health`) on `listener` until
/// `shutdown`: messages up to `grpc_max_message_bytes` either way (a larger
/// one is refused from its length prefix, before it is read), at most
/// `max_connections` connections and `max_concurrent_streams` streams each.
pub async fn serve(
    listener: tokio::net::TcpListener,
    tls: Option<crate::tls::ServerTls>,
    state: AppState,
    limits: crate::limits::Limits,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    use tonic::codec::CompressionEncoding::{Deflate, Gzip};
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_serving::<GrpcInferenceServiceServer<KserveGrpc>>()
        .await;
    let service = GrpcInferenceServiceServer::new(KserveGrpc { state })
        .max_decoding_message_size(limits.grpc_max_message_bytes)
        .max_encoding_message_size(limits.grpc_max_message_bytes)
        .accept_compressed(Gzip)
        .accept_compressed(Deflate)
        .send_compressed(Gzip)
        .send_compressed(Deflate);
    let permits = std::sync::Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    // Handshakes run on their own tasks, so one slow client holds up no
    // other; accepting ends when the server drops the stream.
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let within = Duration::from_secs(limits.header_read_timeout_secs);
    tokio::spawn(async move {
        loop {
            let conn = tokio::select! {
                c = crate::server::accept_capped(&listener, &permits) => c,
                _ = tx.closed() => return,
            };
            let conn = match conn {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "gRPC accept failed; retrying");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let (tx, tls) = (tx.clone(), tls.clone());
            tokio::spawn(async move {
                match conn
                    .secure(tls.as_ref(), crate::tls::Port::Grpc, within)
                    .await
                {
                    Ok(c) => {
                        let _ = tx.send(Ok::<_, std::io::Error>(c)).await;
                    }
                    Err(e) => tracing::debug!(error = %e, "gRPC connection not accepted"),
                }
            });
        }
    });
    let incoming = tokio_stream::wrappers::ReceiverStream::new(rx);
    tonic::transport::Server::builder()
        .max_concurrent_streams(limits.max_concurrent_streams)
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .add_service(health)
        .add_service(service)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await?;
    Ok(())
}
