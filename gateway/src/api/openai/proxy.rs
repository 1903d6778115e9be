//! Models served by remote OpenAI-compatible nodes: the request is forwarded
//! as it came (renamed when the node knows the model by another name), and
//! the answer comes back as it is, a stream as it streams.
use super::scan;
use crate::api::error::ApiError;
use crate::api::AppState;
use crate::upstream::{Protocol, ProxyRequest, Upstream, UpstreamError};
use axum::body::Bytes;
use axum::http::{header, HeaderName, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

/// Names the replica that answered.
const UPSTREAM_HEADER: HeaderName = HeaderName::from_static("x-switchyard-upstream");

/// The remote upstream serving the body's `model`, if any.
pub fn upstream_for<'a>(state: &'a AppState, body: &Bytes) -> Option<(&'a Upstream, bool)> {
    if state.upstreams.is_empty() {
        return None;
    }
    let (model, stream) = scan::model_and_stream(body)?;
    state
        .upstream(&model, Protocol::Openai)
        .map(|u| (u, stream))
}

/// Forwards the request to a replica and sends its answer back as is (a
/// stream as it comes), naming the replica in `x-switchyard-upstream`. The
/// body is rewritten only when the upstream knows the model by another name.
pub async fn proxy(u: &Upstream, stream: bool, path: &'static str, body: Bytes) -> Response {
    let body = match &u.config.model {
        Some(m) => {
            let mut v: Value = match serde_json::from_slice(&body) {
                Ok(v) => v,
                Err(e) => {
                    return ApiError::bad_body(format!("invalid request body: {e}")).into_response()
                }
            };
            v["model"] = json!(m);
            Bytes::from(serde_json::to_vec(&v).expect("a JSON value serializes"))
        }
        None => body,
    };
    let started = tokio::time::Instant::now();
    match u.send(ProxyRequest { path, body, stream }).await {
        Ok((resp, replica)) => {
            let status = resp.status;
            replica.count(&u.config.name, status.as_str());
            let content_type = resp.content_type;
            let body = if stream {
                axum::body::Body::new(u.until_stalled(resp.body, stalled))
            } else {
                match u.read_whole(resp.body, started).await {
                    Ok(b) => axum::body::Body::from(b),
                    Err(e) => return upstream_error(&u.config.name, e),
                }
            };
            let mut out = Response::new(body);
            *out.status_mut() = status;
            let headers = out.headers_mut();
            if let Some(name) = replica.header() {
                headers.insert(UPSTREAM_HEADER, name.clone());
            }
            if let Some(ct) = content_type {
                headers.insert(header::CONTENT_TYPE, ct);
            }
            out
        }
        Err(e) => upstream_error(&u.config.name, e),
    }
}

/// How a proxied stream that stalled between two events ends: with an
/// error event and `[DONE]`, as a stream of ours ends at shutdown.
fn stalled(e: &UpstreamError) -> Bytes {
    let body = unavailable(e).body();
    Bytes::from(format!("data: {body}\n\ndata: [DONE]\n\n"))
}

fn upstream_error(name: &str, e: UpstreamError) -> Response {
    crate::upstream::count_error(name);
    unavailable(&e).into_response()
}

/// No (whole) answer from the upstream, in OpenAI's shape.
fn unavailable(e: &UpstreamError) -> ApiError {
    let status = match e {
        UpstreamError::Timeout(..) => StatusCode::GATEWAY_TIMEOUT,
        UpstreamError::Failed(..) => StatusCode::BAD_GATEWAY,
        _ => StatusCode::SERVICE_UNAVAILABLE,
    };
    ApiError {
        status,
        code: Some("upstream_unavailable"),
        ..ApiError::internal(e.to_string())
    }
}
