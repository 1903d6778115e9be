//! The server: builds the shared state from the configuration (keys, bounds,
//! registry, repository, models), then serves HTTP and gRPC through accept
//! loops that cap connections and time out slow request heads, until SIGTERM
//! or Ctrl-C, when requests in flight get a grace period to finish.
use crate::api::{self, AppState};
use crate::auth::Keys;
use crate::config::{self, Config};
use crate::control::{controller, experiments_file, rollout};
use crate::http1_server::{self, Served};
use crate::limits::Limits;
use crate::tls::{Port, ServerTls};
use crate::{models, plane, registry, upstream};
use anyhow::{Context, Result};
use engine::llm::{load_model, LlmEngine};
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};

/// The end of the grace period at shutdown: requests still in flight then
/// end with an error (a stream with an error event) instead of being cut.
#[derive(Clone)]
pub struct Shutdown(watch::Receiver<bool>);

impl Shutdown {
    /// A signal and its handle; `send(true)` ends the grace period.
    pub fn new() -> (watch::Sender<bool>, Self) {
        let (tx, rx) = watch::channel(false);
        (tx, Self(rx))
    }

    /// Resolves when requests in flight must end (never, for a server that
    /// is not shutting down).
    pub async fn ended(&self) {
        let mut rx = self.0.clone();
        if rx.wait_for(|s| *s).await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

impl Default for Shutdown {
    fn default() -> Self {
        let (tx, rx) = watch::channel(false);
        // The sender lives as long as the program: never ended.
        std::mem::forget(tx);
        Self(rx)
    }
}

/// Resolves once SIGTERM or Ctrl-C arrives.
async fn terminate() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing the SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

fn install_metrics() -> Result<metrics_exporter_prometheus::PrometheusHandle> {
    // Latencies as histograms (not summaries), as vLLM's dashboards expect.
    let buckets = [
        0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    ];
    // The Triton plane's latencies are sub-millisecond to seconds; its batch
    // sizes powers of two. Full and prefix matchers win over the suffix one.
    let dnn_buckets = [
        0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
        5.0, 10.0,
    ];
    let batch_sizes: Vec<f64> = (0..=12).map(|p| f64::from(1u32 << p)).collect();
    use metrics_exporter_prometheus::Matcher;
    let handle = metrics_exporter_prometheus::PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &buckets)?
        .set_buckets_for_metric(Matcher::Prefix("nv_inference_".into()), &dnn_buckets)?
        .set_buckets_for_metric(
            Matcher::Full("nv_inference_batch_size".into()),
            &batch_sizes,
        )?
        .install_recorder()
        .context("installing the metrics recorder")?;
    crate::telemetry::describe();
    Ok(handle)
}

/// Whether `addr` (host:port) listens beyond this machine.
fn beyond_loopback(addr: &str) -> bool {
    addr.parse::<std::net::SocketAddr>()
        .map_or(true, |a| !a.ip().is_loopback())
}

/// Serves `cfg` until SIGTERM or Ctrl-C.
pub async fn serve(cfg: Config) -> Result<()> {
    let ort = cfg
        .model_repository
        .as_ref()
        .and_then(|r| r.onnxruntime_library.clone());
    tokio::task::spawn_blocking(move || onnxruntime(ort)).await??;
    let keys =
        Keys::from_config(cfg.api_keys(), cfg.auth.min_key_length).map_err(anyhow::Error::msg)?;
    let open_control = cfg
        .model_repository
        .as_ref()
        .is_some_and(|r| r.allow_unauthenticated_control);
    if !keys.is_empty() && !cfg.auth.inference_keyed() && beyond_loopback(&cfg.server.http) {
        tracing::warn!(
            address = %cfg.server.http,
            "listening beyond loopback with inference open (auth.inference_requires_key: false)"
        );
    }
    if keys.is_empty() && beyond_loopback(&cfg.server.http) {
        tracing::warn!(
            address = %cfg.server.http,
            "listening beyond loopback with no API keys: inference and feedback are open to anyone who reaches the port"
        );
    }
    if open_control {
        tracing::warn!("repository load/unload is open to anyone who reaches the ports (--allow-unauthenticated-control)");
    }
    let limits = cfg.server.limits;
    let tls = match &cfg.server.tls {
        Some(t) => {
            let tls = ServerTls::load(t.clone()).map_err(anyhow::Error::msg)?;
            tokio::spawn(tls.clone().watch());
            Some(tls)
        }
        None => None,
    };
    let scheme = if tls.is_some() { "https" } else { "http" };
    let (end_grace, shutdown) = Shutdown::new();
    let mut state = api::AppState::new(cfg.models.len(), Some(install_metrics()?))
        .with_security(keys, open_control, cfg.auth.inference_keyed(), limits)
        .with_shutdown(shutdown);
    if !cfg.upstreams.is_empty() {
        let ups: Vec<_> = cfg
            .upstreams
            .iter()
            .cloned()
            .map(|u| upstream::Upstream::new(u, limits.http_threads))
            .collect();
        for u in &ups {
            tokio::spawn(u.clone().check_health());
            tracing::info!(upstream = %u.config.name, replicas = u.config.endpoints.len(), "remote upstream");
        }
        state = state.with_upstreams(ups);
    }
    if let Some(path) = &cfg.experiments_file {
        let exps = experiments_file::Experiments::load(path, state.routes().clone())
            .map_err(anyhow::Error::msg)?;
        tracing::info!(path = %path.display(), experiments = exps.current().names().len(), "experiments loaded; watching for changes and SIGHUP");
        tokio::spawn(exps.clone().watch());
    }
    if let Some(rc) = &cfg.registry {
        let url = rc.database_url(&cfg.server).map_err(anyhow::Error::msg)?;
        let ca = rc.database_ca.as_deref();
        // Named without its credentials.
        let at = url.split('@').next_back().unwrap_or_default().to_string();
        let registry = tokio::task::block_in_place(|| registry::Registry::open_with_ca(&url, ca))
            .with_context(|| format!("opening the registry at {at}"))?
            .with_tier_floor(rc.min_tier_without_admin);
        tracing::info!(database = %url.split('@').next_back().unwrap_or_default(), "registry open");
        registry.listen_to_other_nodes(&url, ca);
        tokio::spawn(verify_audit(
            registry.clone(),
            Duration::from_secs(rc.audit_verify_interval_secs),
        ));
        state = state.with_registry(api::registry::RegistryApi::new(registry.clone()));
        if let Some(log) = &rc.request_log {
            state.request_log = Some(crate::dispatch::log::RequestLog::start(
                registry.clone(),
                log,
            ));
        }
        if !rc.rollouts.is_empty() {
            let auto = rollout::RolloutController::new(
                registry.clone(),
                rc.rollouts.clone(),
                state.versions.clone(),
                state.shadows.clone(),
            )
            .with_lease(registry::nodes::Lease::new(&url, ca));
            tokio::spawn(auto.run(Duration::from_millis(rc.rollout_interval_ms.max(100))));
        }
        let bounds = cfg
            .model_repository
            .as_ref()
            .map(|r| r.bounds())
            .unwrap_or_default();
        let plane_root = cfg.server.data_dir().join("plane");
        let plane = tokio::task::block_in_place(|| plane::Plane::open(&plane_root, bounds))
            .map_err(anyhow::Error::msg)?;
        let plane = Arc::new(plane);
        state = state.with_plane(plane.repo.clone());
        let ctl = controller::Controller::new(
            registry,
            state.routes().clone(),
            rc.engine.clone(),
            rc.artifact_roots(&cfg.server),
        )
        .with_shadow_policies(
            rc.shadows
                .iter()
                .map(|s| (s.model.clone(), s.policy()))
                .collect(),
        )
        .with_plane(plane);
        tokio::spawn(ctl.run(Duration::from_secs(rc.reconcile_interval_secs)));
    }
    if let Some(rc) = &cfg.model_repository {
        let mode: engine::dnn::ControlMode = rc.control_mode.parse().map_err(anyhow::Error::msg)?;
        let (path, load, bounds) = (rc.path.clone(), rc.load_models.clone(), rc.bounds());
        tracing::info!(path = %path.display(), mode = %rc.control_mode, "loading the model repository");
        let repo = tokio::task::spawn_blocking(move || {
            engine::dnn::ModelRepository::open(&path, mode, &load, bounds)
                .map_err(anyhow::Error::msg)
        })
        .await??;
        if mode == engine::dnn::ControlMode::Poll {
            let (repo, every) = (repo.clone(), Duration::from_secs(rc.poll_secs));
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(every).await;
                    let r = repo.clone();
                    let _ = tokio::task::spawn_blocking(move || r.poll()).await;
                }
            });
        }
        let shadows = api::kserve::shadow::Shadows::new(&rc.shadows).map_err(anyhow::Error::msg)?;
        state = state.with_model_repository(repo, shadows);
    }
    let (stop_tx, stop) = watch::channel(false);
    let grace = Duration::from_secs(cfg.server.shutdown_grace_secs);
    let kserve_upstreams = cfg
        .upstreams
        .iter()
        .any(|u| u.protocol == upstream::Protocol::Kserve);
    let mut grpc_done = None;
    if cfg.server.grpc.is_some() || cfg.model_repository.is_some() || kserve_upstreams {
        let addr = cfg.server.grpc_addr();
        let grpc = TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding {addr}"))?;
        // The bound address: with port 0 the system picked it.
        let bound = grpc.local_addr()?;
        tracing::info!(tls = tls.is_some(), "KServe gRPC on {bound}");
        let (grpc_state, mut stop, tls) = (state.clone(), stop.clone(), tls.clone());
        grpc_done = Some(tokio::spawn(async move {
            let shutdown = async move { stopped(&mut stop).await };
            let served = api::kserve::grpc::serve(grpc, tls, grpc_state, limits, shutdown);
            if let Err(e) = served.await {
                tracing::error!("KServe gRPC stopped: {e:#}");
            }
        }));
    }
    let listener = TcpListener::bind(&cfg.server.http)
        .await
        .with_context(|| format!("binding {}", cfg.server.http))?;
    tracing::info!(
        "listening on {scheme}://{} (health: /health, API: /v1, KServe: /v2)",
        listener.local_addr()?
    );
    let app = api::Api::new(state.clone());
    let mut http = tokio::spawn(serve_http(listener, tls, app, limits, stop.clone()));
    let models = cfg.models.clone();
    let loading = tokio::task::spawn_blocking(move || load_models(&state, &models));
    tokio::select! {
        loaded = loading => loaded??,
        _ = terminate() => {
            let _ = stop_tx.send(true);
            tracing::info!("stopping before every model loaded");
            return Ok(());
        }
    }
    terminate().await;
    tracing::info!(
        grace_secs = grace.as_secs(),
        "stopping: no new connections; requests in flight may finish"
    );
    let _ = stop_tx.send(true);
    if tokio::time::timeout(grace, &mut http).await.is_err() {
        tracing::warn!("the grace period is over: requests still in flight end with an error");
        let _ = end_grace.send(true);
        if tokio::time::timeout(Duration::from_secs(5), &mut http)
            .await
            .is_err()
        {
            tracing::warn!("connections still open after the grace period; closing them");
        }
    }
    if let Some(g) = grpc_done {
        let _ = tokio::time::timeout(Duration::from_secs(5), g).await;
    }
    tracing::info!("stopped");
    Ok(())
}

/// Verifies the audit chain now and every `every`, for the metrics and the
/// log; a broken chain is an error in the log each time.
async fn verify_audit(registry: registry::Registry, every: Duration) {
    loop {
        let r = registry.clone();
        match tokio::task::spawn_blocking(move || r.verify()).await {
            Ok(Ok(v)) if v.ok => tracing::debug!(entries = v.entries, "audit chain verified"),
            Ok(Ok(v)) => {
                tracing::error!(entries = v.entries, first_bad = ?v.first_bad, "the audit chain does not verify")
            }
            Ok(Err(e)) => tracing::warn!("verifying the audit chain: {e}"),
            Err(e) => tracing::warn!("verifying the audit chain: {e}"),
        }
        tokio::time::sleep(every).await;
    }
}

/// Loads the configured (not registry-managed) models one after another.
fn load_models(state: &AppState, models: &[crate::config::ModelConfig]) -> Result<()> {
    let device = candle_core::Device::Cpu;
    for m in models {
        let path =
            models::resolve(&m.source).with_context(|| format!("fetching model `{}`", m.name))?;
        tracing::info!(model = %m.name, path = %path.display(), "loading");
        let loaded = load_model(&path, &device, m.engine.quantization)
            .with_context(|| format!("loading model `{}`", m.name))?;
        let draft = m.engine.speculative.as_ref().and_then(|s| s.draft.as_ref());
        let engine = match draft {
            None => LlmEngine::start(&m.name, loaded, (&m.engine).into()),
            Some(source) => {
                let path = models::resolve(source)
                    .with_context(|| format!("fetching the draft model of `{}`", m.name))?;
                tracing::info!(model = %m.name, path = %path.display(), "loading its draft model");
                let draft = load_model(&path, &device, engine::llm::quant::Quantization::None)
                    .with_context(|| format!("loading the draft model of `{}`", m.name))?;
                LlmEngine::start_with_draft(&m.name, loaded, draft, (&m.engine).into())
                    .with_context(|| format!("models `{}`.engine.speculative", m.name))?
            }
        };
        state.add(engine);
        tracing::info!(model = %m.name, "ready");
    }
    Ok(())
}

/// One accepted connection, holding its place under the connection cap.
pub struct Capped<T> {
    io: T,
    /// Bytes read from `io` that are to be read again first.
    unread: axum::body::Bytes,
    _permit: OwnedSemaphorePermit,
}

impl<T> Capped<T> {
    fn new(io: T, permit: OwnedSemaphorePermit) -> Self {
        Self {
            io,
            unread: axum::body::Bytes::new(),
            _permit: permit,
        }
    }

    /// Puts `read` back, to be read again before what follows it.
    pub fn put_back(&mut self, read: axum::body::Bytes) {
        self.unread = read;
    }
}

/// Accepts connections while fewer than `max` are open; further clients wait
/// in the kernel's backlog.
pub async fn accept_capped(
    listener: &TcpListener,
    permits: &Arc<Semaphore>,
) -> std::io::Result<Capped<tokio::net::TcpStream>> {
    let permit = permits
        .clone()
        .acquire_owned()
        .await
        .expect("the connection semaphore is never closed");
    loop {
        match listener.accept().await {
            Ok((tcp, _)) => {
                // Small responses go out at once, not after a delayed ACK.
                let _ = tcp.set_nodelay(true);
                return Ok(Capped::new(tcp, permit));
            }
            // Out of file descriptors and the like: wait, then accept again.
            Err(e) if is_transient(&e) => {
                tracing::warn!(error = %e, "accept failed; retrying");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// A TCP connection as it came, or after a TLS handshake: one the fronts
/// accepted, or one `upstream_pool` opened to a replica.
pub enum Conn {
    Plain(tokio::net::TcpStream),
    Tls(Box<tokio_rustls::TlsStream<tokio::net::TcpStream>>),
}

impl Capped<tokio::net::TcpStream> {
    /// With `tls`, completes the handshake (within `within`, so a client
    /// that never finishes one holds its place no longer than a slow
    /// request head would); a plaintext client on a TLS port fails here.
    pub async fn secure(
        self,
        tls: Option<&ServerTls>,
        port: Port,
        within: Duration,
    ) -> std::io::Result<Capped<Conn>> {
        let io = match tls {
            None => Conn::Plain(self.io),
            Some(tls) => {
                let handshake = tls.acceptor(port).accept(self.io);
                match tokio::time::timeout(within, handshake).await {
                    Ok(stream) => Conn::Tls(Box::new(stream?.into())),
                    Err(_) => {
                        return Err(std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            "TLS handshake timed out",
                        ))
                    }
                }
            }
        };
        Ok(Capped::new(io, self._permit))
    }
}

/// Forwards each I/O call to whichever stream the connection is.
macro_rules! either {
    ($self:ident, $s:ident => $e:expr) => {
        match $self.get_mut() {
            Conn::Plain($s) => {
                let $s = std::pin::Pin::new($s);
                $e
            }
            Conn::Tls($s) => {
                let $s = std::pin::Pin::new($s.as_mut());
                $e
            }
        }
    };
}

impl tokio::io::AsyncRead for Conn {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        either!(self, s => s.poll_read(cx, buf))
    }
}

impl tokio::io::AsyncWrite for Conn {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        either!(self, s => s.poll_write(cx, buf))
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        either!(self, s => s.poll_flush(cx))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        either!(self, s => s.poll_shutdown(cx))
    }

    fn poll_write_vectored(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        either!(self, s => s.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Conn::Plain(s) => s.is_write_vectored(),
            Conn::Tls(s) => s.is_write_vectored(),
        }
    }
}

fn is_transient(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionAborted | ConnectionReset | Interrupted | WouldBlock | OutOfMemory
    ) || e.raw_os_error().is_some_and(|c| c == 24 || c == 23) // EMFILE, ENFILE
}

impl<T: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Capped<T> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if !self.unread.is_empty() {
            use bytes::Buf;
            let n = self.unread.len().min(buf.remaining());
            buf.put_slice(&self.unread[..n]);
            self.unread.advance(n);
            return std::task::Poll::Ready(Ok(()));
        }
        std::pin::Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Capped<T> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

impl tonic::transport::server::Connected for Capped<Conn> {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        match &self.io {
            Conn::Plain(s) => s.connect_info(),
            Conn::Tls(s) => s.get_ref().0.connect_info(),
        }
    }
}

/// Resolves once `stop` turns true (or its sender is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// [`stopped`], for a connection's task, which polls it on every wake: the
/// first poll leaves the task's waker with the channel, and later ones look
/// only at whether the channel has changed since (a load and a compare, where
/// polling the channel's wait again cost 750 instructions a proxied request).
fn stopped_for_connection(stop: watch::Receiver<bool>) -> impl Future<Output = ()> {
    let seen = stop.clone();
    let mut wait = Box::pin(async move {
        let mut stop = stop;
        stopped(&mut stop).await
    });
    let mut armed = false;
    std::future::poll_fn(move |cx| {
        if armed && matches!(seen.has_changed(), Ok(false)) {
            return Poll::Pending;
        }
        armed = true;
        wait.as_mut().poll(cx)
    })
}

/// Serves `app` over HTTP/1 and HTTP/2 (cleartext, or TLS with ALPN) on `listener`
/// from `http_threads` fronts, each a single-threaded event loop of its own
/// (a request never wakes a second thread on its way through): at most
/// `max_connections` open over all of them, request heads read within the header timeout
/// (which also closes idle kept-alive connections), at most
/// `max_concurrent_streams` HTTP/2 streams per connection. When `stop` turns
/// true, accepting stops and open connections finish their requests; this
/// returns when the last one has closed.
pub async fn serve_http(
    listener: TcpListener,
    tls: Option<ServerTls>,
    app: api::Api,
    limits: Limits,
    stop: watch::Receiver<bool>,
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioExecutor, TokioTimer};
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(limits.header_read_timeout_secs))
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.max_concurrent_streams)
        .keep_alive_interval(Some(Duration::from_secs(30)));
    let (handoff, mut inboxes): (Vec<_>, Vec<_>) = (0..limits.http_threads)
        .map(|_| tokio::sync::mpsc::unbounded_channel())
        .unzip();
    let front = Front {
        index: 0,
        gauge: metrics::Gauge::noop(),
        builder: Arc::new(builder),
        permits: Arc::new(Semaphore::new(limits.max_connections)),
        open: (0..limits.http_threads)
            .map(|_| AtomicUsize::new(0))
            .collect(),
        handoff: handoff.into(),
        app,
        tls,
        limits,
        stop,
    };
    // One socket, polled by every front: whichever thread is free accepts
    // (and, with `balance_connections`, hands the connection to the front
    // with the fewest open ones).
    let listener = listener.into_std()?;
    let mut ended = Vec::new();
    for (i, inbox) in inboxes.drain(..).enumerate() {
        let socket = listener.try_clone()?;
        let front = Front {
            index: i,
            gauge: metrics::gauge!("switchyard:http_connections", "front" => i.to_string()),
            ..front.clone()
        };
        let (done, end) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name(format!("http-{i}"))
            .spawn(move || {
                FRONT.set(Some(i));
                let served = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .and_then(|rt| rt.block_on(front.serve(socket, inbox)));
                let _ = done.send(served);
            })?;
        ended.push(end);
    }
    drop(listener);
    for end in ended {
        end.await
            .map_err(|_| std::io::Error::other("an HTTP front thread panicked"))??;
    }
    Ok(())
}

thread_local! {
    /// The HTTP front this thread runs, if it runs one.
    static FRONT: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
}

/// The HTTP front thread this code runs on (`None` on any other thread), so
/// that per-front state, such as an upstream's connection pool, stays on
/// the thread that uses it.
pub fn front() -> Option<usize> {
    FRONT.get()
}

/// A connection on its way from the front that accepted it to the one
/// that serves it.
type Handed = Capped<std::net::TcpStream>;

/// One HTTP front: an event loop on a thread of its own that accepts from
/// the shared socket and serves its connections, start to end.
#[derive(Clone)]
struct Front {
    /// This front's place in `open` and `handoff`.
    index: usize,
    /// `switchyard:http_connections` of this front.
    gauge: metrics::Gauge,
    builder: Arc<hyper_util::server::conn::auto::Builder<hyper_util::rt::TokioExecutor>>,
    /// Shared by every front: the cap is on the port, not per thread.
    permits: Arc<Semaphore>,
    /// Each front's open connections.
    open: Arc<[AtomicUsize]>,
    /// Each front's inbox of connections other fronts accepted for it.
    handoff: Arc<[tokio::sync::mpsc::UnboundedSender<Handed>]>,
    app: api::Api,
    tls: Option<ServerTls>,
    limits: Limits,
    stop: watch::Receiver<bool>,
}

impl Front {
    async fn serve(
        mut self,
        socket: std::net::TcpListener,
        mut inbox: tokio::sync::mpsc::UnboundedReceiver<Handed>,
    ) -> std::io::Result<()> {
        let listener = TcpListener::from_std(socket)?;
        loop {
            tokio::select! {
                c = accept_capped(&listener, &self.permits) => self.place(c?),
                Some(c) = inbox.recv() => self.arrived(c),
                _ = stopped(&mut self.stop) => break,
            }
        }
        drop(listener);
        // Handed over before the stop: served (and closed gracefully) here.
        inbox.close();
        while let Ok(c) = inbox.try_recv() {
            self.arrived(c);
        }
        // Every connection holds a permit until it ends: all back means all
        // done, on every front (this one keeps running its own meanwhile).
        let all = u32::try_from(self.limits.max_connections).unwrap_or(u32::MAX);
        let _ = self.permits.acquire_many(all).await;
        Ok(())
    }

    /// Serves `conn` here or, with `balance_connections`, hands it to the
    /// front with the fewest open connections: whichever front is awake
    /// accepts a burst of clients, and kept-alive connections stay where
    /// they landed (measured: one front of two doing all the work at 8
    /// connections, 70% of it at 32).
    fn place(&self, conn: Capped<tokio::net::TcpStream>) {
        if !self.limits.balance_connections {
            return self.run(conn);
        }
        let load = |i: usize| self.open[i].load(Ordering::Relaxed);
        let least = (0..self.open.len())
            .min_by_key(|&i| (load(i), i != self.index))
            .unwrap_or(self.index);
        if least == self.index {
            return self.run(conn);
        }
        // Off this front's event loop, onto the other's when it arrives.
        let Capped { io, _permit, .. } = conn;
        let conn = match io.into_std() {
            Ok(io) => Capped::new(io, _permit),
            Err(e) => return tracing::warn!(error = %e, "handing a connection over failed"),
        };
        // Counted at once, so that the next accept sees it on its way.
        self.open[least].fetch_add(1, Ordering::Relaxed);
        if let Err(back) = self.handoff[least].send(conn) {
            // That front has stopped: served here.
            self.open[least].fetch_sub(1, Ordering::Relaxed);
            self.take_over(back.0);
        }
    }

    /// A connection another front handed to this one arrived: no longer
    /// counted as on its way, it is counted as open once it runs.
    fn arrived(&self, conn: Handed) {
        self.open[self.index].fetch_sub(1, Ordering::Relaxed);
        self.take_over(conn);
    }

    /// Serves a handed-over connection on this front's event loop.
    fn take_over(&self, conn: Handed) {
        let Capped { io, _permit, .. } = conn;
        match tokio::net::TcpStream::from_std(io) {
            Ok(io) => self.run(Capped::new(io, _permit)),
            Err(e) => tracing::warn!(error = %e, "taking a connection over failed"),
        }
    }

    /// Serves `conn` on this front to its end.
    fn run(&self, conn: Capped<tokio::net::TcpStream>) {
        let within = Duration::from_secs(self.limits.header_read_timeout_secs);
        let app = self.app.clone();
        let (builder, stop, tls) = (self.builder.clone(), self.stop.clone(), self.tls.clone());
        let open = Open::new(self.open.clone(), self.index, self.gauge.clone());
        tokio::spawn(async move {
            let _open = open;
            let conn = match conn.secure(tls.as_ref(), Port::Http, within).await {
                Ok(c) => c,
                Err(e) => return tracing::debug!(error = %e, "TLS handshake failed"),
            };
            // Generation requests are served by our own HTTP/1 half; the
            // first request of any other kind hands the connection to hyper.
            let ours = stopped_for_connection(stop.clone());
            tokio::pin!(ours);
            let conn = match http1_server::serve(conn, &app, within, ours).await {
                Served::Ended => return,
                Served::HandOver(mut conn, read) => {
                    conn.put_back(read);
                    conn
                }
            };
            let io = hyper_util::rt::TokioIo::new(conn);
            let service = hyper_util::service::TowerToHyperService::new(app);
            let conn = builder.serve_connection_with_upgrades(io, service);
            tokio::pin!(conn);
            // Anew: when the server is stopping already, it resolves at
            // once, after hyper's first poll has taken the request read.
            let stop = stopped_for_connection(stop);
            let result = tokio::select! {
                // The connection first: no random pick on every wake.
                biased;
                r = conn.as_mut() => r,
                _ = stop => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = result {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }
}

/// One open connection of a front, counted (and shown on the front's
/// gauge) until it ends.
struct Open(Arc<[AtomicUsize]>, usize, metrics::Gauge);

impl Open {
    fn new(open: Arc<[AtomicUsize]>, front: usize, gauge: metrics::Gauge) -> Self {
        let n = open[front].fetch_add(1, Ordering::Relaxed) + 1;
        gauge.set(n as f64);
        Self(open, front, gauge)
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        let n = self.0[self.1].fetch_sub(1, Ordering::Relaxed) - 1;
        self.2.set(n as f64);
    }
}

/// Where ONNX models tract cannot run find onnxruntime (repository models
/// and registry versions alike): the configured library, a `pypi` one
/// fetched now, or, with none configured, the pinned wheel fetched the first
/// time a model needs it.
fn onnxruntime(configured: Option<config::ModelSource>) -> Result<()> {
    const SETTING: &str = "model_repository.onnxruntime_library";
    match configured {
        // A missing file fails the models that need it, not the server.
        Some(config::ModelSource::Path(lib)) => engine::dnn::onnxrt::set_library(lib, SETTING),
        Some(source) => {
            engine::dnn::onnxrt::set_library(models::resolve(&source).context(SETTING)?, SETTING)
        }
        None => engine::dnn::onnxrt::set_fallback(
            || {
                let source = models::onnxruntime_default().ok_or(
                    "no pinned onnxruntime build for this platform; set model_repository.onnxruntime_library",
                )?;
                models::resolve(&source).map_err(|e| format!("{e:#}"))
            },
            "the pinned onnxruntime wheel (no model_repository.onnxruntime_library)",
        ),
    }
    Ok(())
}
