//! The HTTP surface: the OpenAI API, health, model list and Prometheus metrics.
pub mod error;
pub mod openai;
pub mod openai_types;
pub mod registry;

use crate::routing::{Route, Routes};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use engine::llm::LlmEngine;
use metrics_exporter_prometheus::PrometheusHandle;
use registry::RegistryApi;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// What the handlers share: the route table, the registry (when configured)
/// and the metrics handle.
#[derive(Clone)]
pub struct AppState {
    routes: Routes,
    /// Configured (not registry-managed) models still loading hold `/health` at 503.
    expected: usize,
    loaded: Arc<AtomicUsize>,
    metrics: Option<PrometheusHandle>,
    pub registry: Option<RegistryApi>,
}

impl AppState {
    /// `expected` is how many configured models must load before `/health` says ready.
    pub fn new(expected: usize, metrics: Option<PrometheusHandle>) -> Self {
        Self {
            routes: Routes::default(),
            expected,
            loaded: Arc::default(),
            metrics,
            registry: None,
        }
    }

    pub fn with_registry(mut self, api: RegistryApi) -> Self {
        self.registry = Some(api);
        self
    }

    /// Serves a configured model under its own name.
    pub fn add(&self, engine: LlmEngine) {
        self.routes.add_fixed(engine);
        self.loaded.fetch_add(1, Ordering::SeqCst);
    }

    pub fn routes(&self) -> &Routes {
        &self.routes
    }

    pub fn route(&self, name: &str) -> Option<Route> {
        self.routes.get(name)
    }

    fn names(&self) -> Vec<(String, usize)> {
        let mut v: Vec<_> = self
            .routes
            .snapshot()
            .iter()
            .map(|(name, r)| (name.clone(), r.primary.engine.max_model_len()))
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
        .merge(registry::routes())
        .with_state(state)
}

async fn health(State(s): State<AppState>) -> impl IntoResponse {
    let loaded = s.loaded.load(Ordering::SeqCst);
    if loaded >= s.expected {
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
