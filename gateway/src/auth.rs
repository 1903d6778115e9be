//! API keys and what their roles may do, for every front that changes state:
//! the registry, repository load/unload (HTTP and gRPC) and feedback. Secrets
//! are held only as sha256 digests; a presented key is compared as sent.
use axum::http::{header, HeaderName};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Who may do what. Roles are granted to API keys in the config.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Reads the registry.
    Viewer,
    /// Registers models and versions, moves versions, rolls back.
    Deployer,
    Approver,
    /// Applications: inference and feedback.
    Invoke,
    Admin,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Permission {
    /// Read the registry (models, versions, audit).
    Read,
    /// Register models and versions, move versions, roll back.
    Deploy,
    Approve,
    /// Promote an irreversible model past its block; create models below the tier floor.
    Override,
    /// Load and unload repository models.
    Control,
    /// Send feedback for a request.
    Invoke,
}

impl Permission {
    /// What the permission allows, for refusals.
    pub fn describe(self) -> &'static str {
        match self {
            Permission::Read => "read the registry",
            Permission::Deploy => "register or move versions",
            Permission::Approve => "approve transitions",
            Permission::Override => "override the irreversible block or the tier floor",
            Permission::Control => "load or unload repository models",
            Permission::Invoke => "call models or send feedback",
        }
    }
}

impl Role {
    pub fn allows(self, p: Permission) -> bool {
        matches!(
            (self, p),
            (Role::Admin, _)
                | (Role::Deployer, Permission::Deploy | Permission::Read)
                | (Role::Approver, Permission::Approve | Permission::Read)
                | (Role::Viewer, Permission::Read)
                | (Role::Invoke, Permission::Invoke)
        )
    }
}

/// The identity behind a call, as its API key names it.
#[derive(Debug, Clone, PartialEq)]
pub struct Actor {
    pub name: String,
    pub role: Role,
}

/// A secret's sha256 in hex, as `key_sha256` takes it.
pub fn digest_hex(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// The shortest secret accepted by default.
pub const DEFAULT_MIN_KEY_LENGTH: usize = 16;

/// An API key as configured: the secret inline, from the environment, or as
/// the hex sha256 of the secret (no secret in the file).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyConfig {
    /// The identity recorded in the audit log.
    pub name: String,
    pub role: Role,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_env: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_sha256: Option<String>,
    /// Inference calls per second this key may make (a token bucket that
    /// holds a second's worth); beyond it, 429 with `Retry-After`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests_per_second: Option<f64>,
    /// LLM tokens (prompt and generated) this key may spend per minute (a
    /// budget that refills continuously and holds a minute's worth). A
    /// call is let through while the budget is not overdrawn; its tokens
    /// are charged as they are known, so one call may overdraw it, and the
    /// key then waits (429 with `Retry-After`) until it has refilled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_per_minute: Option<f64>,
}

impl ApiKeyConfig {
    /// Checks the form (exactly one source; a digest of 64 hex digits).
    pub fn validate(&self, at: &str) -> Result<(), String> {
        let sources = [&self.key, &self.key_env, &self.key_sha256]
            .iter()
            .filter(|s| s.is_some())
            .count();
        if sources != 1 {
            return Err(format!(
                "{at}: give exactly one of `key`, `key_env` and `key_sha256`"
            ));
        }
        for (field, v) in [
            ("requests_per_second", self.requests_per_second),
            ("tokens_per_minute", self.tokens_per_minute),
        ] {
            if let Some(r) = v.filter(|r| !(r.is_finite() && *r > 0.0)) {
                return Err(format!("{at}.{field}: {r} must be above 0"));
            }
        }
        if self.name.trim().is_empty() {
            return Err(format!("{at}.name: must not be empty"));
        }
        if let Some(h) = &self.key_sha256 {
            if h.len() != 64 || !h.chars().all(|c| c.is_ascii_hexdigit()) {
                return Err(format!("{at}.key_sha256: must be 64 hex digits"));
            }
        }
        Ok(())
    }

    /// The key's digest, reading the environment where `key_env` says so.
    /// Empty, short or padded secrets are refused, naming the key.
    fn digest(&self, at: &str, min_len: usize) -> Result<[u8; 32], String> {
        let secret = match (&self.key, &self.key_env, &self.key_sha256) {
            (Some(k), None, None) => k.clone(),
            (None, Some(var), None) => std::env::var(var).map_err(|_| {
                format!(
                    "{at} (`{}`): environment variable {var} is not set",
                    self.name
                )
            })?,
            (None, None, Some(h)) => {
                let mut out = [0u8; 32];
                hex::decode_to_slice(h, &mut out).map_err(|e| format!("{at}.key_sha256: {e}"))?;
                return Ok(out);
            }
            _ => {
                return Err(format!(
                    "{at}: give exactly one of `key`, `key_env` and `key_sha256`"
                ))
            }
        };
        if secret.is_empty() {
            return Err(format!("{at} (`{}`): the secret is empty", self.name));
        }
        if secret.trim() != secret {
            return Err(format!(
                "{at} (`{}`): the secret starts or ends with whitespace",
                self.name
            ));
        }
        if secret.chars().count() < min_len {
            return Err(format!(
                "{at} (`{}`): the secret has {} characters; at least {min_len} are needed",
                self.name,
                secret.chars().count()
            ));
        }
        Ok(Sha256::digest(secret.as_bytes()).into())
    }
}

/// Why a call was not let through.
#[derive(Debug, Clone, PartialEq)]
pub enum AuthError {
    /// No key was presented (401).
    Missing(String),
    /// The presented key is not configured (401).
    Unknown,
    /// The key's role does not allow the call (403).
    Forbidden(String),
    /// The key is over its rate (429, `Retry-After` seconds).
    RateLimited { message: String, retry_after: u64 },
}

impl AuthError {
    pub fn message(&self) -> String {
        match self {
            AuthError::Missing(m) => m.clone(),
            AuthError::Unknown => "this API key is not configured".into(),
            AuthError::Forbidden(m) => m.clone(),
            AuthError::RateLimited { message, .. } => message.clone(),
        }
    }

    /// Seconds to wait before trying again, for a rate-limited key.
    pub fn retry_after(&self) -> Option<u64> {
        match self {
            AuthError::RateLimited { retry_after, .. } => Some(*retry_after),
            _ => None,
        }
    }

    /// 401 for a missing or unknown key, 403 for a key without the role.
    pub fn http_status(&self) -> axum::http::StatusCode {
        match self {
            AuthError::Forbidden(_) => axum::http::StatusCode::FORBIDDEN,
            AuthError::RateLimited { .. } => axum::http::StatusCode::TOO_MANY_REQUESTS,
            _ => axum::http::StatusCode::UNAUTHORIZED,
        }
    }

    pub fn grpc_status(&self) -> tonic::Status {
        match self {
            AuthError::Forbidden(m) => tonic::Status::permission_denied(m.clone()),
            AuthError::RateLimited {
                message,
                retry_after,
            } => {
                let mut s = tonic::Status::resource_exhausted(message.clone());
                s.metadata_mut().insert(
                    "retry-after",
                    retry_after.to_string().parse().expect("digits are ASCII"),
                );
                s
            }
            other => tonic::Status::unauthenticated(other.message()),
        }
    }
}

/// The configured keys, by digest of their secret.
#[derive(Debug, Clone, Default)]
pub struct Keys {
    by_digest: HashMap<[u8; 32], Actor>,
    /// Per key name, the rates its inference calls are held to.
    limits: HashMap<String, KeyLimits>,
}

/// A key's requests-per-second bucket and tokens-per-minute budget.
#[derive(Debug, Clone, Default)]
struct KeyLimits {
    requests: Option<Arc<Bucket>>,
    tokens: Option<Arc<Bucket>>,
}

/// A bucket that refills at `rate` a second up to `capacity`; its level
/// may go below zero when more is charged than it holds.
#[derive(Debug)]
pub struct Bucket {
    rate: f64,
    capacity: f64,
    state: Mutex<(f64, Instant)>,
}

impl Bucket {
    pub fn new(rate: f64, capacity: f64) -> Self {
        Self {
            rate,
            capacity,
            state: Mutex::new((capacity, Instant::now())),
        }
    }

    /// Takes `cost` when the bucket holds it, or says in how many whole
    /// seconds it will (at least 1).
    pub fn take(&self, cost: f64) -> Result<(), u64> {
        let mut g = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let (level, at) = *g;
        let now = Instant::now();
        let level = (level + now.duration_since(at).as_secs_f64() * self.rate).min(self.capacity);
        if level >= cost {
            *g = (level - cost, now);
            Ok(())
        } else {
            *g = (level, now);
            Err(((cost - level) / self.rate).ceil().max(1.0) as u64)
        }
    }

    /// Charges `n` whether or not the bucket holds it.
    pub fn charge(&self, n: f64) {
        let mut g = self.state.lock().unwrap_or_else(|p| p.into_inner());
        g.0 -= n;
    }
}

impl Keys {
    /// Resolves and checks every key: `(where it is configured, its config)`.
    /// Duplicate names or secrets stop the server, naming both keys.
    pub fn from_config<'a>(
        entries: impl IntoIterator<Item = (String, &'a ApiKeyConfig)>,
        min_len: usize,
    ) -> Result<Self, String> {
        let mut by_digest: HashMap<[u8; 32], Actor> = HashMap::new();
        let mut limits = HashMap::new();
        let mut names: HashMap<String, String> = HashMap::new();
        for (at, k) in entries {
            k.validate(&at)?;
            if let Some(first) = names.insert(k.name.clone(), at.clone()) {
                return Err(format!(
                    "{at}.name: `{}` is configured twice (also at {first})",
                    k.name
                ));
            }
            let digest = k.digest(&at, min_len)?;
            limits.insert(
                k.name.clone(),
                KeyLimits {
                    // A second's worth of requests (at least one).
                    requests: k
                        .requests_per_second
                        .map(|r| Arc::new(Bucket::new(r, r.max(1.0)))),
                    tokens: k
                        .tokens_per_minute
                        .map(|t| Arc::new(Bucket::new(t / 60.0, t))),
                },
            );
            let actor = Actor {
                name: k.name.clone(),
                role: k.role,
            };
            if let Some(other) = by_digest.insert(digest, actor) {
                return Err(format!(
                    "{at} (`{}`): the same secret is configured for `{}`",
                    k.name, other.name
                ));
            }
        }
        Ok(Self { by_digest, limits })
    }

    /// Holds an inference call by `actor` to its key's rates, if it has any:
    /// its token budget must not be overdrawn, and a request is taken from
    /// its requests-per-second bucket.
    pub fn admit(&self, actor: &Actor) -> Result<(), AuthError> {
        let Some(limits) = self.limits.get(&actor.name) else {
            return Ok(());
        };
        let over = |what: String, retry_after: u64| AuthError::RateLimited {
            message: format!(
                "`{}` is over its rate of {what}; retry in {retry_after} s",
                actor.name
            ),
            retry_after,
        };
        if let Some(t) = &limits.tokens {
            t.take(0.0)
                .map_err(|s| over(format!("{} tokens per minute", t.capacity), s))?;
        }
        if let Some(r) = &limits.requests {
            r.take(1.0)
                .map_err(|s| over(format!("{} requests per second", r.rate), s))?;
        }
        Ok(())
    }

    /// The token budget of the key `presented`, if it has one: the
    /// dispatch layer charges the call's tokens to it.
    pub fn token_budget(&self, presented: Option<&str>) -> Option<Arc<Bucket>> {
        let actor = self.authenticate(presented).ok()?;
        self.limits.get(&actor.name)?.tokens.clone()
    }

    /// Keys for tests and tools: `(secret, actor)` pairs, unchecked.
    pub fn from_secrets(keys: impl IntoIterator<Item = (String, Actor)>) -> Self {
        Self {
            by_digest: keys
                .into_iter()
                .map(|(s, a)| (Sha256::digest(s.as_bytes()).into(), a))
                .collect(),
            limits: HashMap::new(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.by_digest.is_empty()
    }

    /// The actor behind a presented key.
    pub fn authenticate(&self, presented: Option<&str>) -> Result<Actor, AuthError> {
        let Some(secret) = presented.filter(|s| !s.is_empty()) else {
            return Err(AuthError::Missing(
                "an API key is needed: send `Authorization: Bearer KEY` or `x-api-key: KEY`".into(),
            ));
        };
        let digest: [u8; 32] = Sha256::digest(secret.as_bytes()).into();
        self.by_digest
            .get(&digest)
            .cloned()
            .ok_or(AuthError::Unknown)
    }

    /// The actor behind a presented key, if its role allows `p`.
    pub fn authorize(&self, presented: Option<&str>, p: Permission) -> Result<Actor, AuthError> {
        let actor = self.authenticate(presented)?;
        require(&actor, p)?;
        Ok(actor)
    }
}

/// Refuses `actor` unless its role allows `p`.
pub fn require(actor: &Actor, p: Permission) -> Result<(), AuthError> {
    if actor.role.allows(p) {
        return Ok(());
    }
    Err(AuthError::Forbidden(format!(
        "`{}` has role {:?}, which may not {}",
        actor.name,
        actor.role,
        p.describe()
    )))
}

/// The two headers a key may come in.
const KEY_HEADERS: [HeaderName; 2] = [header::AUTHORIZATION, HeaderName::from_static("x-api-key")];

/// The key a request presents: `Authorization: Bearer KEY`, else `x-api-key`,
/// read through `header` (HTTP headers or gRPC metadata) from one of
/// [`KEY_HEADERS`].
fn presented<'a>(header: impl Fn(&HeaderName) -> Option<&'a str>) -> Option<&'a str> {
    let [authorization, api_key] = &KEY_HEADERS;
    header(authorization)
        .and_then(|v| v.strip_prefix("Bearer "))
        .or_else(|| header(api_key))
}

/// The key of an HTTP request. The names are looked up as they are, not
/// parsed from text on every request.
pub fn from_headers(h: &axum::http::HeaderMap) -> Option<&str> {
    presented(|name| h.get(name).and_then(|v| v.to_str().ok()))
}

/// The key of a gRPC request.
pub fn from_metadata(m: &tonic::metadata::MetadataMap) -> Option<&str> {
    presented(|name| m.get(name.as_str()).and_then(|v| v.to_str().ok()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(name: &str, role: Role, secret: &str) -> ApiKeyConfig {
        ApiKeyConfig {
            name: name.into(),
            role,
            key: Some(secret.into()),
            key_env: None,
            key_sha256: None,
            requests_per_second: None,
            tokens_per_minute: None,
        }
    }

    #[test]
    fn a_rate_limited_key_waits_and_others_do_not() {
        let limited = ApiKeyConfig {
            requests_per_second: Some(2.0),
            ..key("batch", Role::Invoke, "a-batch-job-secret-123")
        };
        let k = keys(&[limited, key("app", Role::Invoke, "an-app-secret-12345")]).unwrap();
        let batch = k.authenticate(Some("a-batch-job-secret-123")).unwrap();
        let app = k.authenticate(Some("an-app-secret-12345")).unwrap();
        assert!(k.admit(&batch).is_ok() && k.admit(&batch).is_ok());
        let e = k.admit(&batch).unwrap_err();
        assert_eq!(e.retry_after(), Some(1));
        assert_eq!(e.http_status(), axum::http::StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(e.grpc_status().code(), tonic::Code::ResourceExhausted);
        assert!(e.message().contains("`batch`"), "{}", e.message());
        for _ in 0..100 {
            assert!(k.admit(&app).is_ok());
        }
        let bad = ApiKeyConfig {
            requests_per_second: Some(0.0),
            ..key("zero", Role::Invoke, "a-zero-rate-secret-1")
        };
        let e = keys(&[bad]).unwrap_err();
        assert!(e.contains("requests_per_second"), "{e}");
    }

    #[test]
    fn a_token_budget_admits_until_overdrawn() {
        let limited = ApiKeyConfig {
            tokens_per_minute: Some(600.0),
            ..key("tokens", Role::Invoke, "a-token-budget-secret-1")
        };
        let k = keys(&[limited, key("app", Role::Invoke, "an-app-secret-12345")]).unwrap();
        let who = k.authenticate(Some("a-token-budget-secret-1")).unwrap();
        let budget = k.token_budget(Some("a-token-budget-secret-1")).unwrap();
        assert!(k.token_budget(Some("an-app-secret-12345")).is_none());
        assert!(k.token_budget(None).is_none());
        // A call may overdraw the budget; the next waits for it to refill
        // (10 tokens a second: 100 overdrawn is about 10 s).
        assert!(k.admit(&who).is_ok());
        budget.charge(700.0);
        let e = k.admit(&who).unwrap_err();
        assert!((9..=11).contains(&e.retry_after().unwrap()), "{e:?}");
        assert!(
            e.message().contains("600 tokens per minute"),
            "{}",
            e.message()
        );
        let e = keys(&[ApiKeyConfig {
            tokens_per_minute: Some(-1.0),
            ..key("neg", Role::Invoke, "a-negative-budget-secret")
        }])
        .unwrap_err();
        assert!(e.contains("tokens_per_minute"), "{e}");
    }

    fn keys(list: &[ApiKeyConfig]) -> Result<Keys, String> {
        Keys::from_config(
            list.iter()
                .enumerate()
                .map(|(i, k)| (format!("auth.api_keys[{i}]"), k)),
            DEFAULT_MIN_KEY_LENGTH,
        )
    }

    #[test]
    fn empty_short_padded_and_duplicate_secrets_stop_the_server_naming_the_key() {
        let e = keys(&[key("ops", Role::Admin, "")]).unwrap_err();
        assert!(e.contains("auth.api_keys[0]") && e.contains("empty"), "{e}");
        let e = keys(&[key("ops", Role::Admin, "short")]).unwrap_err();
        assert!(e.contains("`ops`") && e.contains("at least 16"), "{e}");
        let e = keys(&[key("ops", Role::Admin, " a-long-enough-secret ")]).unwrap_err();
        assert!(e.contains("whitespace"), "{e}");
        let e = keys(&[
            key("a", Role::Admin, "the-same-long-secret"),
            key("b", Role::Viewer, "the-same-long-secret"),
        ])
        .unwrap_err();
        assert!(
            e.starts_with("auth.api_keys[1]") && e.contains("`a`"),
            "{e}"
        );
        let e = keys(&[
            key("a", Role::Admin, "first-long-secret-1"),
            key("a", Role::Viewer, "second-long-secret-2"),
        ])
        .unwrap_err();
        assert!(e.contains("twice"), "{e}");
        let unset = ApiKeyConfig {
            key: None,
            key_env: Some("SWITCHYARD_TEST_UNSET_KEY_VAR".into()),
            ..key("env", Role::Admin, "")
        };
        let e = keys(&[unset]).unwrap_err();
        assert!(e.contains("SWITCHYARD_TEST_UNSET_KEY_VAR"), "{e}");
    }

    #[test]
    fn an_empty_or_padded_presented_key_is_no_key() {
        let k = keys(&[key("ops", Role::Admin, "a-long-enough-secret")]).unwrap();
        assert_eq!(
            k.authenticate(Some("a-long-enough-secret")).unwrap().name,
            "ops"
        );
        assert!(matches!(
            k.authenticate(Some("")),
            Err(AuthError::Missing(_))
        ));
        assert!(matches!(k.authenticate(None), Err(AuthError::Missing(_))));
        assert_eq!(
            k.authenticate(Some(" a-long-enough-secret")),
            Err(AuthError::Unknown)
        );
    }

    #[test]
    fn hashed_keys_authenticate_and_roles_decide() {
        let digest = hex::encode(Sha256::digest(b"an-application-secret"));
        let app = ApiKeyConfig {
            key: None,
            key_sha256: Some(digest),
            ..key("app", Role::Invoke, "")
        };
        let k = keys(&[app, key("view", Role::Viewer, "a-viewer-secret-123")]).unwrap();
        let actor = k
            .authorize(Some("an-application-secret"), Permission::Invoke)
            .unwrap();
        assert_eq!(actor.role, Role::Invoke);
        let e = k
            .authorize(Some("an-application-secret"), Permission::Control)
            .unwrap_err();
        assert_eq!(e.http_status(), axum::http::StatusCode::FORBIDDEN);
        assert!(k
            .authorize(Some("a-viewer-secret-123"), Permission::Read)
            .is_ok());
        assert!(k
            .authorize(Some("a-viewer-secret-123"), Permission::Invoke)
            .is_err());
        for p in [
            Permission::Read,
            Permission::Deploy,
            Permission::Approve,
            Permission::Override,
            Permission::Control,
            Permission::Invoke,
        ] {
            assert!(Role::Admin.allows(p));
        }
        assert!(!Role::Deployer.allows(Permission::Control));
        assert!(!Role::Invoke.allows(Permission::Read));
    }
}
