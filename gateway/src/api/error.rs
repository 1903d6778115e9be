//! Errors as the OpenAI API sends them: `{"error": {message, type, param, code}}`
//! with the matching HTTP status.
use super::AppState;
use crate::auth::AuthError;
use crate::limits::BodyError;
use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;
use std::borrow::Cow;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<Cow<'static, str>>,
    pub code: Option<&'static str>,
}

impl ApiError {
    pub fn invalid(param: impl Into<Cow<'static, str>>, message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param: Some(param.into()),
            code: None,
        }
    }

    pub fn bad_body(message: impl Into<String>) -> Self {
        Self {
            param: None,
            ..Self::invalid("", message)
        }
    }

    pub fn model_not_found(model: &str) -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            message: format!("The model `{model}` does not exist."),
            kind: "invalid_request_error",
            param: Some("model".into()),
            code: Some("model_not_found"),
        }
    }

    pub fn context_length(max: usize, prompt: usize, completion: usize) -> Self {
        Self {
            code: Some("context_length_exceeded"),
            ..Self::invalid(
                "messages",
                format!(
                    "This model's maximum context length is {max} tokens. However, you requested {} tokens \
                     ({prompt} in the messages, {completion} in the completion). Please reduce the length of \
                     the messages or completion.",
                    prompt.saturating_add(completion)
                ),
            )
        }
    }

    pub fn overloaded(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: message.into(),
            kind: "server_error",
            param: None,
            code: Some("queue_full"),
        }
    }

    /// A deployment the route needs is not loaded (yet).
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self {
            code: Some("deployment_unavailable"),
            ..Self::overloaded(message)
        }
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: message.into(),
            kind: "server_error",
            param: None,
            code: None,
        }
    }

    pub fn body(&self) -> serde_json::Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (self.status, Json(self.body())).into_response();
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
        }
        resp
    }
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> Self {
        let (kind, code) = match e {
            AuthError::Forbidden(_) => ("permission_error", "forbidden"),
            _ => ("authentication_error", "invalid_api_key"),
        };
        Self {
            status: e.http_status(),
            message: e.message(),
            kind,
            param: None,
            code: Some(code),
        }
    }
}

impl From<BodyError> for ApiError {
    fn from(e: BodyError) -> Self {
        Self {
            status: e.http_status(),
            code: matches!(e, BodyError::TooLarge { .. }).then_some("request_too_large"),
            ..Self::bad_body(e.message())
        }
    }
}

/// A request body of the OpenAI-shaped routes, under
/// `server.limits.max_body_bytes` (inflated under the decompressed bound
/// when compressed), with the request's headers (taken, not copied);
/// refusals come in OpenAI's error shape.
pub struct OpenAiBody(pub HeaderMap, pub Bytes);

impl FromRequest<AppState> for OpenAiBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, s: &AppState) -> Result<Self, ApiError> {
        let (headers, body) = super::read_body(req, s, s.limits.max_body_bytes).await?;
        Ok(Self(headers, body))
    }
}
