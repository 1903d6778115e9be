//! The registry's REST API under `/v1/registry`: models, versions,
//! transitions, approvals, rollback, lineage and the audit log. Every call
//! needs an API key (`Authorization: Bearer KEY`); the key's role decides
//! what it may change, and its name is what the audit log records.
use super::AppState;
use crate::auth::{self, AuthError, Permission};
use crate::limits;
use crate::registry::records::{ModelSpec, VersionSpec};
use crate::registry::{
    lifecycle::State as VersionState, Actor, Registry, RegistryError, TransitionRequest,
};
use axum::body::Bytes;
use axum::extract::{FromRequest, Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, MethodRouter};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

/// The registry as the API serves it; keys are the server's (`AppState::keys`).
#[derive(Clone)]
pub struct RegistryApi {
    pub registry: Registry,
}

impl RegistryApi {
    pub fn new(registry: Registry) -> Self {
        Self { registry }
    }
}

/// A refused key in the registry's error shape.
fn auth_error(e: AuthError) -> Response {
    let kind = match e {
        AuthError::Forbidden(_) => "forbidden",
        _ => "unauthorized",
    };
    error(e.http_status(), kind, e.message())
}

/// Every route with its methods: the router is built from this table, and a
/// test holds it to `openapi.json` both ways (nothing served undocumented,
/// nothing documented unserved).
fn table() -> Vec<(
    &'static str,
    &'static [&'static str],
    MethodRouter<AppState>,
)> {
    vec![
        (
            "/v1/registry/models",
            &["get", "post"],
            get(list_models).post(create_model),
        ),
        ("/v1/registry/models/{model}", &["get"], get(get_model)),
        (
            "/v1/registry/models/{model}/versions",
            &["get", "post"],
            get(list_versions).post(register_version),
        ),
        (
            "/v1/registry/models/{model}/versions/{version}",
            &["get"],
            get(get_version),
        ),
        (
            "/v1/registry/models/{model}/versions/{version}/transitions",
            &["post"],
            post(transition),
        ),
        (
            "/v1/registry/models/{model}/versions/{version}/traffic",
            &["post"],
            post(ramp),
        ),
        (
            "/v1/registry/models/{model}/versions/{version}/approvals",
            &["post"],
            post(approve),
        ),
        (
            "/v1/registry/models/{model}/versions/{version}/lineage",
            &["get"],
            get(lineage),
        ),
        (
            "/v1/registry/models/{model}/rollback",
            &["post"],
            post(rollback),
        ),
        ("/v1/registry/models/{model}/served", &["get"], get(served)),
        ("/v1/registry/audit", &["get"], get(audit)),
        ("/v1/registry/audit/verify", &["get"], get(verify)),
        ("/v1/registry/whoami", &["get"], get(whoami)),
        ("/v1/requests", &["get"], get(requests)),
        ("/openapi.json", &["get"], get(openapi)),
    ]
}

pub fn routes() -> Router<AppState> {
    table()
        .into_iter()
        .fold(Router::new(), |r, (path, _, methods)| {
            r.route(path, methods)
        })
}

/// The OpenAPI 3.1 description of these routes.
const OPENAPI: &str = include_str!("openapi.json");

async fn openapi() -> Response {
    ([("content-type", "application/json")], OPENAPI).into_response()
}

fn error(status: StatusCode, kind: &str, message: impl Into<String>) -> Response {
    (
        status,
        Json(json!({"error": {"message": message.into(), "type": kind}})),
    )
        .into_response()
}

fn registry_error(e: RegistryError) -> Response {
    let (status, kind) = match &e {
        RegistryError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
        RegistryError::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
        RegistryError::Invalid(_) => (StatusCode::BAD_REQUEST, "invalid_request"),
        RegistryError::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
        RegistryError::Storage(_) => (StatusCode::INTERNAL_SERVER_ERROR, "storage"),
    };
    error(status, kind, e.to_string())
}

/// A JSON body; its error names the field (`gates.thresholds.acc.min: ...`),
/// and an empty body reads as `{}`.
struct JsonBody<T>(T);

impl<T: serde::de::DeserializeOwned> FromRequest<AppState> for JsonBody<T> {
    type Rejection = Response;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, Response> {
        let (parts, body) = req.into_parts();
        let body = limits::read_body(&parts.headers, body, state.limits.max_body_bytes)
            .await
            .map_err(|e| error(e.http_status(), "invalid_request", e.message()))?;
        let body = if body.is_empty() {
            Bytes::from_static(b"{}")
        } else {
            body
        };
        let de = &mut serde_json::Deserializer::from_slice(&body);
        serde_path_to_error::deserialize(de)
            .map(JsonBody)
            .map_err(|e| {
                let at = e.path().to_string();
                let message = if at == "." {
                    format!("invalid request body: {}", e.inner())
                } else {
                    format!("invalid request body: {at}: {}", e.inner())
                };
                error(StatusCode::BAD_REQUEST, "invalid_request", message)
            })
    }
}

/// Authenticates, then runs `f` on the blocking pool (storage may block).
async fn call<T: serde::Serialize + Send + 'static>(
    state: &AppState,
    headers: &HeaderMap,
    status: StatusCode,
    f: impl FnOnce(&Registry, Actor) -> Result<T, RegistryError> + Send + 'static,
) -> Response {
    call_with(state, headers, move |r, a| Ok((status, Json(f(r, a)?)))).await
}

async fn call_with<T: IntoResponse + Send + 'static>(
    state: &AppState,
    headers: &HeaderMap,
    f: impl FnOnce(&Registry, Actor) -> Result<T, RegistryError> + Send + 'static,
) -> Response {
    let Some(api) = state.registry.clone() else {
        return error(
            StatusCode::NOT_FOUND,
            "not_found",
            "this server has no registry: add a `registry:` section to its config",
        );
    };
    let actor = match state
        .keys
        .authorize(auth::from_headers(headers), Permission::Read)
    {
        Ok(a) => a,
        Err(e) => return auth_error(e),
    };
    match tokio::task::spawn_blocking(move || f(&api.registry, actor)).await {
        Ok(Ok(v)) => v.into_response(),
        Ok(Err(e)) => registry_error(e),
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("registry call failed: {e}"),
        ),
    }
}

/// A model as read: its record plus the badges every read shows.
fn model_view(m: &ModelSpec) -> Value {
    let mut v = serde_json::to_value(m).expect("model serializes");
    v["badges"] = json!(m.badges());
    v
}

fn version_view(
    r: &Registry,
    m: &ModelSpec,
    v: &crate::registry::Version,
) -> Result<Value, RegistryError> {
    let mut out = serde_json::to_value(v).expect("version serializes");
    out["badges"] = json!(m.badges());
    out["status"] = json!(r.status(&v.model, v.number)?);
    Ok(out)
}

async fn list_models(State(s): State<AppState>, h: HeaderMap) -> Response {
    call(&s, &h, StatusCode::OK, |r, _| {
        Ok(json!({"models": r.models()?.iter().map(model_view).collect::<Vec<_>>()}))
    })
    .await
}

async fn create_model(
    State(s): State<AppState>,
    h: HeaderMap,
    JsonBody(spec): JsonBody<ModelSpec>,
) -> Response {
    call(&s, &h, StatusCode::CREATED, move |r, a| {
        Ok(model_view(&r.create_model(&a, spec)?))
    })
    .await
}

async fn get_model(State(s): State<AppState>, h: HeaderMap, Path(model): Path<String>) -> Response {
    call(&s, &h, StatusCode::OK, move |r, _| {
        Ok(model_view(&r.model(&model)?))
    })
    .await
}

async fn list_versions(
    State(s): State<AppState>,
    h: HeaderMap,
    Path(model): Path<String>,
) -> Response {
    call(&s, &h, StatusCode::OK, move |r, _| {
        let m = r.model(&model)?;
        let vs = r
            .versions(&model)?
            .iter()
            .map(|v| version_view(r, &m, v))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(json!({"versions": vs}))
    })
    .await
}

async fn register_version(
    State(s): State<AppState>,
    h: HeaderMap,
    Path(model): Path<String>,
    JsonBody(spec): JsonBody<VersionSpec>,
) -> Response {
    call(&s, &h, StatusCode::CREATED, move |r, a| {
        let v = r.register_version(&a, &model, spec)?;
        version_view(r, &r.model(&model)?, &v)
    })
    .await
}

async fn get_version(
    State(s): State<AppState>,
    h: HeaderMap,
    Path((model, version)): Path<(String, u32)>,
) -> Response {
    call(&s, &h, StatusCode::OK, move |r, _| {
        version_view(r, &r.model(&model)?, &r.version(&model, version)?)
    })
    .await
}

async fn transition(
    State(s): State<AppState>,
    h: HeaderMap,
    Path((model, version)): Path<(String, u32)>,
    JsonBody(req): JsonBody<TransitionRequest>,
) -> Response {
    call_with(&s, &h, move |r, a| {
        let o = r.transition(&a, &model, version, req)?;
        let mut v = serde_json::to_value(&o).expect("outcome serializes");
        v["version"] = version_view(r, &r.model(&model)?, &o.version)?;
        if !o.applied {
            let failed: Vec<String> = o
                .gates
                .iter()
                .filter(|g| !g.passed)
                .map(|g| format!("{}: {}", g.gate, g.detail))
                .collect();
            v["error"] = json!({"type": "gate_failed",
                "message": format!("{} → {} refused; {}", o.from, o.to, failed.join("; "))});
        }
        // A refused transition is a conflict with the gates, said in the body.
        let status = if o.applied {
            StatusCode::OK
        } else {
            StatusCode::CONFLICT
        };
        Ok((status, Json(v)))
    })
    .await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ApprovalRequest {
    target: VersionState,
    #[serde(default)]
    comment: Option<String>,
}

async fn approve(
    State(s): State<AppState>,
    h: HeaderMap,
    Path((model, version)): Path<(String, u32)>,
    JsonBody(req): JsonBody<ApprovalRequest>,
) -> Response {
    call(&s, &h, StatusCode::CREATED, move |r, a| {
        let v = r.approve(&a, &model, version, req.target, req.comment)?;
        version_view(r, &r.model(&model)?, &v)
    })
    .await
}

async fn lineage(
    State(s): State<AppState>,
    h: HeaderMap,
    Path((model, version)): Path<(String, u32)>,
) -> Response {
    call(&s, &h, StatusCode::OK, move |r, _| {
        r.lineage(&model, version)
    })
    .await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RollbackRequest {
    #[serde(default)]
    reason: Option<String>,
    /// Answer with the plan without carrying it out.
    #[serde(default)]
    dry_run: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RampRequest {
    traffic_percent: f64,
    #[serde(default)]
    reason: Option<String>,
}

/// Changes a canary's or A/B candidate's share (a ramp, audited).
async fn ramp(
    State(s): State<AppState>,
    h: HeaderMap,
    Path((model, version)): Path<(String, u32)>,
    JsonBody(req): JsonBody<RampRequest>,
) -> Response {
    call(&s, &h, StatusCode::OK, move |r, a| {
        let v = r.set_traffic(&a, &model, version, req.traffic_percent, req.reason)?;
        version_view(r, &r.model(&model)?, &v)
    })
    .await
}

async fn rollback(
    State(s): State<AppState>,
    h: HeaderMap,
    Path(model): Path<String>,
    JsonBody(req): JsonBody<RollbackRequest>,
) -> Response {
    call(&s, &h, StatusCode::OK, move |r, a| match req.dry_run {
        true => r.preview_rollback(&a, &model),
        false => r.rollback(&a, &model, req.reason),
    })
    .await
}

/// The caller's key: its name, role and what the role may do (the console
/// shows only the actions the key may take; the API decides either way).
async fn whoami(State(s): State<AppState>, h: HeaderMap) -> Response {
    use crate::auth::Permission::*;
    call(&s, &h, StatusCode::OK, |_, a| {
        let may: Vec<&str> = [
            (Read, "read"),
            (Deploy, "deploy"),
            (Approve, "approve"),
            (Override, "override"),
            (Control, "control"),
            (Invoke, "invoke"),
        ]
        .into_iter()
        .filter(|(p, _)| a.role.allows(*p))
        .map(|(_, n)| n)
        .collect();
        Ok(json!({"name": a.name, "role": a.role, "may": may}))
    })
    .await
}

#[derive(Deserialize)]
struct ServedQuery {
    at: Option<String>,
}

/// `at` as RFC 3339 (`2026-11-23T10:00:00Z`) or Unix milliseconds.
fn parse_time(at: Option<&str>) -> Result<i64, String> {
    let Some(at) = at else {
        return Ok(crate::registry::now_ms());
    };
    if let Ok(ms) = at.parse::<i64>() {
        return Ok(ms);
    }
    humantime::parse_rfc3339_weak(at)
        .map_err(|e| format!("at: `{at}` is neither RFC 3339 nor Unix milliseconds ({e})"))
        .map(|t| {
            t.duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as i64)
        })
}

async fn served(
    State(s): State<AppState>,
    h: HeaderMap,
    Path(model): Path<String>,
    Query(q): Query<ServedQuery>,
) -> Response {
    let at = match parse_time(q.at.as_deref()) {
        Ok(t) => t,
        Err(m) => return error(StatusCode::BAD_REQUEST, "invalid_request", m),
    };
    call(&s, &h, StatusCode::OK, move |r, _| r.served_at(&model, at)).await
}

#[derive(Deserialize)]
struct AuditQuery {
    model: Option<String>,
    #[serde(default)]
    after: i64,
    limit: Option<i64>,
}

async fn audit(State(s): State<AppState>, h: HeaderMap, Query(q): Query<AuditQuery>) -> Response {
    let limit = q.limit.unwrap_or(1000).clamp(1, 10_000);
    call(&s, &h, StatusCode::OK, move |r, _| {
        let entries = r.audit(q.model.as_deref(), q.after, limit)?;
        let entries: Vec<Value> = entries
            .iter()
            .map(|e| {
                let mut v = serde_json::to_value(e).expect("entry serializes");
                v["details"] = e.body_json();
                v["at"] = json!(crate::registry::format_ms(e.at_ms));
                v
            })
            .collect();
        Ok(json!({"entries": entries}))
    })
    .await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RequestsQuery {
    route: Option<String>,
    arm: Option<String>,
    since: Option<String>,
    limit: Option<i64>,
}

/// The request log: sampled requests and answers, oldest first.
async fn requests(
    State(s): State<AppState>,
    h: HeaderMap,
    Query(q): Query<RequestsQuery>,
) -> Response {
    let since = match q.since.as_deref().map(|t| parse_time(Some(t))).transpose() {
        Ok(t) => t.unwrap_or(0),
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                e.replace("at:", "since:"),
            )
        }
    };
    let limit = q.limit.unwrap_or(1000).clamp(1, 10_000);
    call(&s, &h, StatusCode::OK, move |r, _| {
        let entries: Vec<Value> = r
            .requests(q.route.as_deref(), since, limit)?
            .into_iter()
            .filter(|e| q.arm.as_deref().is_none_or(|a| e.doc["arm"] == a))
            .map(|e| {
                let mut doc = e.doc;
                doc["at"] = json!(crate::registry::format_ms(e.at_ms));
                doc
            })
            .collect();
        Ok(json!({"requests": entries}))
    })
    .await
}

async fn verify(State(s): State<AppState>, h: HeaderMap) -> Response {
    call(&s, &h, StatusCode::OK, |r, _| r.verify()).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;
    use tower::ServiceExt;

    /// `(path, method)` pairs of `openapi.json`.
    fn documented() -> BTreeSet<(String, String)> {
        let doc: Value = serde_json::from_str(OPENAPI).unwrap();
        doc["paths"]
            .as_object()
            .unwrap()
            .iter()
            .flat_map(|(path, ops)| {
                ops.as_object()
                    .unwrap()
                    .keys()
                    .filter(|m| ["get", "post", "put", "patch", "delete"].contains(&m.as_str()))
                    .map(move |m| (path.clone(), m.clone()))
            })
            .collect()
    }

    #[test]
    fn the_table_is_the_openapi_document_both_ways() {
        let served: BTreeSet<(String, String)> = table()
            .iter()
            .flat_map(|(p, ms, _)| ms.iter().map(move |m| (p.to_string(), m.to_string())))
            .collect();
        let doc = documented();
        assert_eq!(
            served.difference(&doc).collect::<Vec<_>>(),
            Vec::<&(String, String)>::new(),
            "served but not documented"
        );
        assert_eq!(
            doc.difference(&served).collect::<Vec<_>>(),
            Vec::<&(String, String)>::new(),
            "documented but not served"
        );
    }

    /// The router answers each documented method, and only those (405 for
    /// the others), so the table's method lists cannot drift from the router.
    #[tokio::test]
    async fn the_router_serves_exactly_the_tables_methods() {
        let app = routes().with_state(AppState::new(0, None));
        for (path, methods, _) in table() {
            let concrete = path.replace("{model}", "m").replace("{version}", "1");
            for m in ["GET", "POST", "PUT", "DELETE"] {
                let req = axum::http::Request::builder()
                    .method(m)
                    .uri(&concrete)
                    .body(axum::body::Body::from("{}"))
                    .unwrap();
                let status = app.clone().oneshot(req).await.unwrap().status();
                let listed = methods.contains(&m.to_ascii_lowercase().as_str());
                assert_eq!(
                    status == StatusCode::METHOD_NOT_ALLOWED,
                    !listed,
                    "{m} {path}: {status}"
                );
            }
        }
    }
}
