//! The HTTP surface: the OpenAI API, health, model list and Prometheus metrics.
pub mod error;
pub mod openai;
pub mod openai_types;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use engine::llm::LlmEngine;
use metrics_exporter_prometheus::PrometheusHandle;
use std::collections::HashMap;
use std::sync::{Arc, RwLock};

/// What the handlers share: the loaded engines by public name.
#[derive(Clone)]
pub struct AppState {
    engines: Arc<RwLock<HashMap<String, LlmEngine>>>,
    expected: usize,
    metrics: Option<PrometheusHandle>,
}

impl AppState {
    /// `expected` is how many models must be loaded before `/health` says ready.
    pub fn new(expected: usize, metrics: Option<PrometheusHandle>) -> Self {
        Self {
            engines: Arc::default(),
            expected,
            metrics,
        }
    }

    pub fn add(&self, engine: LlmEngine) {
        self.engines
            .write()
            .expect("engine table")
            .insert(engine.name().to_string(), engine);
    }

    pub fn engine(&self, name: &str) -> Option<LlmEngine> {
        self.engines
            .read()
            .expect("engine table")
            .get(name)
            .cloned()
    }

    fn names(&self) -> Vec<(String, usize)> {
        let mut v: Vec<_> = self
            .engines
            .read()
            .expect("engine table")
            .values()
            .map(|e| (e.name().to_string(), e.max_model_len()))
            .collect();
        v.sort();
        v
    }
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/v1/completions", post(openai::completions))
        .route("/v1/models", get(list_models))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .with_state(state)
}

async fn health(State(s): State<AppState>) -> impl IntoResponse {
    let loaded = s.names().len();
    if loaded >= s.expected && loaded > 0 {
        (
            StatusCode::OK,
            Json(serde_json::json!({"status": "ok", "models": loaded})),
        )
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(
                serde_json::json!({"status": "loading", "models": loaded, "expected": s.expected}),
            ),
        )
    }
}

async fn list_models(State(s): State<AppState>) -> impl IntoResponse {
    let data: Vec<_> = s
        .names()
        .into_iter()
        .map(|(id, max)| serde_json::json!({"id": id, "object": "model", "created": 0, "owned_by": "switchyard", "max_model_len": max}))
        .collect();
    Json(serde_json::json!({"object": "list", "data": data}))
}

async fn metrics(State(s): State<AppState>) -> impl IntoResponse {
    match s.metrics {
        Some(h) => (
            StatusCode::OK,
            [("content-type", "text/plain; version=0.0.4")],
            h.render(),
        )
            .into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}
