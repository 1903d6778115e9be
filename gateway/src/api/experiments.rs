//! Prompt experiments over HTTP: `POST /v1/feedback` (a user's score for a
//! request, credited to its arm), `GET /v1/experiments` and
//! `GET /v1/experiments/{name}/summary` (per-arm figures and tests).
use super::error::{ApiError, OpenAiBody};
use super::AppState;
use crate::auth::{self, Permission};
use crate::experiment_stats::FeedbackError;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/feedback", post(feedback))
        .route("/v1/experiments", get(list))
        .route("/v1/experiments/{name}/summary", get(summary))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Feedback {
    /// The `id` of the completion (also in its `x-request-id` header).
    request_id: String,
    score: f64,
}

async fn feedback(State(s): State<AppState>, OpenAiBody(headers, body): OpenAiBody) -> Response {
    if let Err(e) = s.authorize(auth::from_headers(&headers), Permission::Invoke) {
        return ApiError::from(e).into_response();
    }
    let f: Feedback = match serde_json::from_slice(&body) {
        Ok(f) => f,
        Err(e) => return ApiError::bad_body(format!("invalid request body: {e}")).into_response(),
    };
    if !f.score.is_finite() {
        return ApiError::invalid("score", "`score` must be a finite number").into_response();
    }
    match s.stats.feedback(&f.request_id, f.score) {
        Ok((experiment, arm)) => (
            StatusCode::OK,
            Json(json!({"request_id": f.request_id, "experiment": experiment, "arm": arm})),
        )
            .into_response(),
        Err(FeedbackError::Unknown(m)) => ApiError {
            status: StatusCode::NOT_FOUND,
            code: Some("request_not_found"),
            ..ApiError::invalid("request_id", m)
        }
        .into_response(),
        Err(FeedbackError::Duplicate(m)) => ApiError {
            status: StatusCode::CONFLICT,
            code: Some("feedback_recorded"),
            ..ApiError::invalid("request_id", m)
        }
        .into_response(),
    }
}

async fn list(State(s): State<AppState>) -> Response {
    let table = s.experiments();
    let data: Vec<_> = table
        .names()
        .iter()
        .filter_map(|n| table.get(n))
        .map(|e| {
            json!({"name": e.spec.name, "route": e.spec.route, "layer": e.spec.layer, "traffic": e.spec.traffic, "metrics": e.spec.metrics,
                   "arms": e.spec.arms.iter().map(|a| json!({"name": a.name, "weight": a.weight, "deployment": a.deployment})).collect::<Vec<_>>()})
        })
        .collect();
    Json(json!({"experiments": data})).into_response()
}

async fn summary(State(s): State<AppState>, Path(name): Path<String>) -> Response {
    let Some(e) = s.experiments().get(&name) else {
        return ApiError {
            status: StatusCode::NOT_FOUND,
            code: Some("experiment_not_found"),
            ..ApiError::invalid("name", format!("no experiment named `{name}`"))
        }
        .into_response();
    };
    let arms: Vec<String> = e.spec.arms.iter().map(|a| a.name.clone()).collect();
    Json(s.stats.summary(&name, &arms)).into_response()
}
