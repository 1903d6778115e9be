//! The HTTP surface: the OpenAI API, KServe v2, health, model list and
//! Prometheus metrics; KServe gRPC lives in `kserve::grpc`.
pub mod error;
pub mod experiments;
pub mod kserve;
pub mod openai;
pub mod openai_types;
pub mod registry;

use crate::auth::{self, Actor, AuthError, Keys, Permission};
use crate::dispatch::outcomes::VersionOutcomes;
use crate::dispatch::routing::Routes;
use crate::divergence::ShadowStats;
use crate::experiment_stats::ExperimentStats;
use crate::limits::Limits;
use crate::offload::Offload;
use crate::upstream::{Protocol, Upstream};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use engine::dnn::ModelRepository;
use engine::llm::LlmEngine;
use error::ApiError;
use metrics_exporter_prometheus::PrometheusHandle;
use registry::RegistryApi;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// What the handlers share, behind one reference count: every request
/// clones it (the router, the middleware, the handler), and a clone of
/// [`Shared`] would count up each of its shared parts in turn.
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

impl std::ops::Deref for AppState {
    type Target = Shared;
    fn deref(&self) -> &Shared {
        &self.0
    }
}

/// Changes apply to this handle alone, as they did when the state was
/// cloned field by field: the builders run before the router shares it.
impl std::ops::DerefMut for AppState {
    fn deref_mut(&mut self) -> &mut Shared {
        Arc::make_mut(&mut self.0)
    }
}

/// The route table, the registry (when configured), the metrics handle and
/// the rest of what the handlers read.
#[derive(Clone)]
pub struct Shared {
    routes: Routes,
    /// Configured (not registry-managed) models still loading hold `/health` at 503.
    expected: usize,
    loaded: Arc<AtomicUsize>,
    metrics: Option<PrometheusHandle>,
    pub registry: Option<RegistryApi>,
    pub stats: ExperimentStats,
    pub shadows: ShadowStats,
    /// Outcomes per route version, for rollout policies.
    pub versions: VersionOutcomes,
    /// Triton's statistics of LLM routes.
    pub llm_stats: crate::dispatch::outcomes::LlmStatistics,
    /// Model names served by remote nodes.
    pub upstreams: Arc<HashMap<String, Upstream>>,
    /// The Triton model repository served over KServe v2, when configured.
    pub dnn: Option<Arc<ModelRepository>>,
    /// Shadows of repository models.
    pub kserve_shadows: kserve::shadow::Shadows,
    /// The registry's repository plane (tree and DNN versions).
    pub plane: Option<Arc<ModelRepository>>,
    /// Sampled requests and answers, in the registry's database.
    pub request_log: Option<crate::dispatch::log::RequestLog>,
    /// The configured API keys (empty: none configured).
    pub keys: Arc<Keys>,
    /// With no keys, repository control without one (explicit mode,
    /// `--allow-unauthenticated-control`).
    pub open_control: bool,
    /// Inference on every front needs a key allowing it
    /// (`auth.inference_requires_key`, `--api-key`).
    pub keyed_inference: bool,
    pub limits: Limits,
    /// The bounded pool for heavy request work.
    pub offload: Offload,
    /// Ends requests still in flight when the shutdown grace period is over.
    pub shutdown: crate::server::Shutdown,
}

impl AppState {
    /// `expected` is how many configured models must load before `/health` says ready.
    pub fn new(expected: usize, metrics: Option<PrometheusHandle>) -> Self {
        Self(Arc::new(Shared {
            routes: Routes::default(),
            expected,
            loaded: Arc::default(),
            metrics,
            registry: None,
            stats: ExperimentStats::default(),
            shadows: ShadowStats::default(),
            versions: VersionOutcomes::default(),
            llm_stats: Default::default(),
            upstreams: Arc::default(),
            dnn: None,
            kserve_shadows: Default::default(),
            plane: None,
            request_log: None,
            keys: Arc::default(),
            open_control: false,
            keyed_inference: false,
            limits: Limits::default(),
            offload: Offload::default(),
            shutdown: Default::default(),
        }))
    }

    pub fn with_shutdown(mut self, shutdown: crate::server::Shutdown) -> Self {
        self.shutdown = shutdown;
        self
    }

    /// Keys and bounds for every front.
    pub fn with_security(
        mut self,
        keys: Keys,
        open_control: bool,
        keyed_inference: bool,
        limits: Limits,
    ) -> Self {
        self.keys = Arc::new(keys);
        self.open_control = open_control;
        self.keyed_inference = keyed_inference;
        self.offload = Offload::new(limits.blocking_threads, limits.offload_bytes);
        self.limits = limits;
        self
    }

    /// Lets a call through if the presented key allows `p`. With no keys
    /// configured, feedback is open (as inference is), and repository
    /// control only when the server was started to allow it.
    pub fn authorize(
        &self,
        presented: Option<&str>,
        p: Permission,
    ) -> Result<Option<Actor>, AuthError> {
        if !self.keys.is_empty() {
            return self.keys.authorize(presented, p).map(Some);
        }
        match p {
            Permission::Invoke => Ok(None),
            Permission::Control if self.open_control => Ok(None),
            Permission::Control => Err(AuthError::Missing(
                "repository control needs an API key with role admin (auth.api_keys); \
                 without keys, start with --model-control-mode explicit \
                 --allow-unauthenticated-control"
                    .into(),
            )),
            _ => Err(AuthError::Missing(
                "no API keys are configured (auth.api_keys)".into(),
            )),
        }
    }

    /// Lets an inference call through when inference is open, or when the
    /// presented key allows it.
    /// A key's `requests_per_second` holds its calls, whether or not
    /// inference needs a key. The key is looked up only when one can
    /// matter: with no keys configured and none required, inference is open
    /// whatever a request presents.
    pub fn authorize_inference<'k>(
        &self,
        presented: impl FnOnce() -> Option<&'k str>,
    ) -> Result<(), AuthError> {
        if !self.keyed_inference && self.keys.is_empty() {
            return Ok(());
        }
        let presented = presented();
        let actor = if self.keyed_inference {
            Some(self.keys.authorize(presented, Permission::Invoke)?)
        } else {
            presented.and_then(|p| self.keys.authenticate(Some(p)).ok())
        };
        match actor {
            Some(a) => self.keys.admit(&a),
            None => Ok(()),
        }
    }

    /// The token budget of the key in `headers`, if it has one.
    pub fn token_budget(&self, headers: &axum::http::HeaderMap) -> Option<Arc<auth::Bucket>> {
        if self.keys.is_empty() {
            return None;
        }
        self.keys.token_budget(auth::from_headers(headers))
    }

    pub fn with_model_repository(
        mut self,
        repo: Arc<ModelRepository>,
        shadows: kserve::shadow::Shadows,
    ) -> Self {
        self.dnn = Some(repo);
        self.kserve_shadows = shadows;
        self
    }

    /// Every configured LLM has loaded (the repository loads before serving starts).
    pub fn is_ready(&self) -> bool {
        self.loaded.load(Ordering::SeqCst) >= self.expected
    }

    pub fn with_upstreams(mut self, upstreams: impl IntoIterator<Item = Upstream>) -> Self {
        self.upstreams = Arc::new(
            upstreams
                .into_iter()
                .map(|u| (u.config.name.clone(), u))
                .collect(),
        );
        self
    }

    /// The prompt experiments in force.
    pub fn experiments(&self) -> Arc<crate::dispatch::experiments::ExperimentTable> {
        self.routes.snapshot().experiments.clone()
    }

    /// The remote upstream serving `name` over `protocol`.
    pub fn upstream(&self, name: &str, protocol: Protocol) -> Option<&Upstream> {
        self.upstreams
            .get(name)
            .filter(|u| u.config.protocol == protocol)
    }

    /// The engine of `model` (its route's primary) or `model@version` (any
    /// deployment of that version in the route), with its version.
    pub fn deployment(&self, name: &str) -> Option<(LlmEngine, Option<u32>)> {
        self.routes.snapshot().deployment(name)
    }

    pub fn with_plane(mut self, plane: Arc<ModelRepository>) -> Self {
        self.plane = Some(plane);
        self
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

    /// Where the dispatch layer records outcomes.
    pub fn recorders(&self) -> crate::dispatch::Recorders {
        crate::dispatch::Recorders {
            experiments: self.stats.clone(),
            versions: self.versions.clone(),
            llm: self.llm_stats.clone(),
            shadows: self.shadows.clone(),
            log: self.request_log.clone(),
        }
    }

    /// Public model names: routes, and the routes prompt experiments serve.
    fn names(&self) -> Vec<(String, usize)> {
        let table = self.routes.snapshot();
        let mut v: Vec<_> = table
            .routes
            .iter()
            .map(|(name, r)| (name.clone(), r.primary.engine.max_model_len()))
            .collect();
        for name in table.experiments.names() {
            let Some(e) = table.experiments.get(&name) else {
                continue;
            };
            let served = e
                .spec
                .arms
                .iter()
                .find_map(|a| table.deployment(&a.deployment));
            if let Some((engine, _)) = served {
                if !v.iter().any(|(n, _)| n == &e.spec.route) {
                    v.push((e.spec.route.clone(), engine.max_model_len()));
                }
            }
        }
        v.extend(
            self.upstreams
                .values()
                .filter(|u| u.config.protocol == Protocol::Openai)
                .map(|u| (u.config.name.clone(), 0)),
        );
        v.sort();
        v
    }
}

pub fn router(state: AppState) -> Router {
    // The OpenAI front: with `auth.inference_requires_key`, every route of
    // it needs a key, as vLLM's `--api-key` has it.
    let openai = Router::new()
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/v1/completions", post(openai::completions))
        .route("/v1/models", get(list_models))
        .route("/v1/models/{*id}", get(retrieve_model))
        .route("/tokenize", post(openai::tokenize))
        .route("/detokenize", post(openai::detokenize))
        .route("/tokenizer_info", get(openai::tokenizer_info))
        .route("/v1/embeddings", post(openai::embeddings))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            inference_key::<ApiError>,
        ));
    Router::new()
        .merge(openai)
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/v1/routes", get(list_routes))
        .route("/v1/routes/{name}/shadows", get(shadow_summary))
        .merge(registry::routes())
        .merge(crate::console::routes())
        .merge(experiments::routes())
        .merge(kserve::http::routes(&state))
        .fallback(unknown_route)
        .method_not_allowed_fallback(wrong_method)
        .with_state(state)
}

/// The HTTP port's service: [`router`], with the two OpenAI generation
/// routes answered without it. A POST to `/v1/chat/completions` or
/// `/v1/completions` goes through what its route does (the key check,
/// the body read, the handler), without the router's path matching, the
/// middleware's boxed futures and the extensions they fill: 15% of a
/// proxied request's user-space instructions
/// (`benches/proxy_instructions.sh`). The router keeps both routes, so
/// that every other method on them gets its 405.
#[derive(Clone)]
pub struct Api {
    router: Router,
    state: AppState,
}

impl Api {
    pub fn new(state: AppState) -> Self {
        Self {
            router: router(state.clone()),
            state,
        }
    }

    /// What every handler shares.
    pub(crate) fn state(&self) -> &AppState {
        &self.state
    }
}

/// The routes [`Api`] answers without the router, and the front's own
/// HTTP/1 half (`http1_server`) without hyper.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Generate {
    Chat,
    Completions,
}

impl Generate {
    /// The route a POST to `path` goes to, if it is one of these.
    pub(crate) fn of_post(path: &str) -> Option<Self> {
        match path {
            "/v1/chat/completions" => Some(Self::Chat),
            "/v1/completions" => Some(Self::Completions),
            _ => None,
        }
    }

    /// The route's URI, parsed once.
    pub(crate) fn uri(self) -> axum::http::Uri {
        use axum::http::Uri;
        static CHAT: std::sync::LazyLock<Uri> =
            std::sync::LazyLock::new(|| Uri::from_static("/v1/chat/completions"));
        static COMPLETIONS: std::sync::LazyLock<Uri> =
            std::sync::LazyLock::new(|| Uri::from_static("/v1/completions"));
        match self {
            Self::Chat => CHAT.clone(),
            Self::Completions => COMPLETIONS.clone(),
        }
    }
}

/// Answers a request to `route` that the key check let through: its body
/// read under the bound, then the route's handler.
pub(crate) async fn generate(
    state: AppState,
    route: Generate,
    req: axum::extract::Request,
) -> Response {
    use axum::extract::FromRequest;
    let body = match error::OpenAiBody::from_request(req, &state).await {
        Ok(body) => body,
        Err(e) => return ApiError::into_response(e),
    };
    match route {
        Generate::Chat => openai::chat_completions(State(state), body).await,
        Generate::Completions => openai::completions(State(state), body).await,
    }
}

impl tower::Service<axum::http::Request<hyper::body::Incoming>> for Api {
    type Response = Response;
    type Error = std::convert::Infallible;
    type Future = futures::future::Either<
        futures::future::BoxFuture<'static, Result<Response, std::convert::Infallible>>,
        axum::routing::future::RouteFuture<std::convert::Infallible>,
    >;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: axum::http::Request<hyper::body::Incoming>) -> Self::Future {
        use futures::future::Either;
        let route = match *req.method() {
            axum::http::Method::POST => Generate::of_post(req.uri().path()),
            _ => None,
        };
        let Some(route) = route else {
            return Either::Right(self.router.call(req));
        };
        let state = self.state.clone();
        let req = req.map(axum::body::Body::new);
        Either::Left(Box::pin(async move {
            if let Some(refused) = inference_refusal::<ApiError>(&state, req.headers()) {
                return Ok(refused);
            }
            Ok(generate(state, route, req).await)
        }))
    }
}

/// Lets an inference route's request through when inference is open or
/// its key allows it, before its body is read; refused in the shape `E` of
/// the route's protocol.
pub(crate) async fn inference_key<E: From<AuthError> + IntoResponse>(
    State(s): State<AppState>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    match inference_refusal::<E>(&s, req.headers()) {
        None => next.run(req).await,
        Some(refused) => refused,
    }
}

/// The refusal, in the shape `E` and with `Retry-After` when a rate limit
/// refused, unless inference is open or the key in `headers` allows it.
pub(crate) fn inference_refusal<E: From<AuthError> + IntoResponse>(
    s: &AppState,
    headers: &axum::http::HeaderMap,
) -> Option<Response> {
    let e = s
        .authorize_inference(|| auth::from_headers(headers))
        .err()?;
    let retry_after = e.retry_after();
    let mut resp = E::from(e).into_response();
    if let Some(secs) = retry_after {
        resp.headers_mut()
            .insert(axum::http::header::RETRY_AFTER, secs.into());
    }
    Some(resp)
}

/// A path no route serves: 404 in the shape of the protocol the path
/// belongs to (KServe's `{"error": "..."}` under `/v2`, OpenAI's elsewhere).
async fn unknown_route(method: axum::http::Method, uri: axum::http::Uri) -> Response {
    no_route(StatusCode::NOT_FOUND, method, uri)
}

/// A route that exists for other methods: 405, shaped as [`unknown_route`].
async fn wrong_method(method: axum::http::Method, uri: axum::http::Uri) -> Response {
    no_route(StatusCode::METHOD_NOT_ALLOWED, method, uri)
}

fn no_route(status: StatusCode, method: axum::http::Method, uri: axum::http::Uri) -> Response {
    let path = uri.path();
    let (code, message) = if status == StatusCode::NOT_FOUND {
        (
            "unknown_url",
            format!("Unknown request URL: {method} {path}"),
        )
    } else {
        (
            "method_not_allowed",
            format!("Method {method} is not allowed on {path}"),
        )
    };
    if path.starts_with("/v2") {
        return (status, Json(serde_json::json!({ "error": message }))).into_response();
    }
    ApiError {
        status,
        message,
        kind: "invalid_request_error",
        param: None,
        code: Some(code),
    }
    .into_response()
}

async fn health(State(s): State<AppState>) -> impl IntoResponse {
    let loaded = s.loaded.load(Ordering::SeqCst);
    if s.is_ready() {
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

/// A model as OpenAI's `/v1/models` describes one (with vLLM's `max_model_len`).
fn model_object(id: &str, max_model_len: usize) -> serde_json::Value {
    serde_json::json!({"id": id, "object": "model", "created": 0, "owned_by": "switchyard", "max_model_len": max_model_len})
}

async fn list_models(State(s): State<AppState>) -> impl IntoResponse {
    let data: Vec<_> = s
        .names()
        .into_iter()
        .map(|(id, max)| model_object(&id, max))
        .collect();
    Json(serde_json::json!({"object": "list", "data": data}))
}

/// `GET /v1/models/{id}` (`client.models.retrieve`): the model, or OpenAI's 404.
async fn retrieve_model(
    State(s): State<AppState>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Response {
    match s.names().into_iter().find(|(name, _)| *name == id) {
        Some((id, max)) => Json(model_object(&id, max)).into_response(),
        None => ApiError::model_not_found(&id).into_response(),
    }
}

/// Seconds of outcomes `GET /v1/routes` reports per version.
const ROUTE_WINDOW_SECS: i64 = 60;

/// The routes this node serves, as its controller last published them:
/// each public name's primary, candidate (arm and share) and shadows, with
/// what each registry version served here over the last minute. With keys
/// configured, a key that may read the registry is needed.
async fn list_routes(State(s): State<AppState>, headers: axum::http::HeaderMap) -> Response {
    if !s.keys.is_empty() {
        if let Err(e) = s
            .keys
            .authorize(auth::from_headers(&headers), auth::Permission::Read)
        {
            return ApiError::from(e).into_response();
        }
    }
    use crate::dispatch::outcomes::VersionOutcomes;
    use crate::dispatch::routing::Route;
    use serde_json::{json, Value};
    fn describe<D>(
        outcomes: &VersionOutcomes,
        name: &str,
        kind: &str,
        r: &Route<D>,
        version: impl Fn(&D) -> Option<u32>,
    ) -> Value {
        let since = crate::registry::now_ms() - ROUTE_WINDOW_SECS * 1000;
        let deployment = |d: &D| {
            let v = version(d);
            json!({"version": v, "served": v.map(|v| outcomes.recent(name, v, since))})
        };
        json!({
            "name": name,
            "kind": kind,
            "window_secs": ROUTE_WINDOW_SECS,
            "primary": deployment(&r.primary),
            "candidate": r.candidate.as_ref().map(|c| {
                let mut d = deployment(&c.deployment);
                d["arm"] = json!(c.arm.as_str());
                d["percent"] = json!(c.percent);
                d
            }),
            "shadows": r.shadows.iter().map(|sh| deployment(&sh.deployment)).collect::<Vec<_>>(),
        })
    }
    let table = s.routes().snapshot();
    let llm = table
        .routes
        .iter()
        .map(|(n, r)| describe(&s.versions, n, "llm", r, |d| d.version));
    let tensor = table
        .tensor_routes
        .iter()
        .map(|(n, r)| describe(&s.versions, n, "tensor", r, |d| Some(d.version)));
    let mut routes: Vec<Value> = llm.chain(tensor).collect();
    routes.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
    Json(json!({ "routes": routes })).into_response()
}

/// How far each shadow of a route diverges from its primary.
async fn shadow_summary(
    State(s): State<AppState>,
    axum::extract::Path(name): axum::extract::Path<String>,
) -> impl IntoResponse {
    Json(s.shadows.summary(&name))
}

async fn metrics(State(s): State<AppState>) -> impl IntoResponse {
    match &s.metrics {
        Some(h) => (
            StatusCode::OK,
            [("content-type", "text/plain; version=0.0.4")],
            h.render(),
        )
            .into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

/// A request's body read under `limit` and, when compressed, inflated under
/// `server.limits.max_decompressed_bytes` (on the blocking pool, when that
/// is work); with the request's headers.
pub async fn read_body(
    req: axum::extract::Request,
    s: &AppState,
    limit: usize,
) -> Result<(axum::http::HeaderMap, axum::body::Bytes), crate::limits::BodyError> {
    use crate::limits;
    let (parts, body) = req.into_parts();
    let raw = limits::read_body(&parts.headers, body, limit).await?;
    let encoding = limits::content_encoding(&parts.headers);
    let cap = s.limits.max_decompressed_bytes;
    let size = if encoding == "identity" { 0 } else { raw.len() };
    let body = s
        .offload
        .run(size, move || limits::inflate(&encoding, raw, cap))
        .await?;
    Ok((parts.headers, body))
}

/// `events`, ended by the shutdown grace period running out, with `last()`
/// appended then (an error event, so that a client sees why its stream
/// ended rather than a cut connection).
pub fn until_shutdown<S, T>(
    events: S,
    shutdown: crate::server::Shutdown,
    last: impl FnOnce() -> Vec<T> + Send + 'static,
) -> impl futures::Stream<Item = T> + Send
where
    S: futures::Stream<Item = T> + Send,
    T: Send + 'static,
{
    use futures::StreamExt;
    let cut = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = cut.clone();
    let ended = async move {
        shutdown.ended().await;
        flag.store(true, Ordering::SeqCst);
    };
    let tail = futures::stream::once(async move {
        if cut.load(Ordering::SeqCst) {
            last()
        } else {
            Vec::new()
        }
    })
    .flat_map(futures::stream::iter);
    events.take_until(Box::pin(ended)).chain(tail)
}
