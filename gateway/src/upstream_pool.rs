//! Kept-alive HTTP/1 connections to one replica of a remote OpenAI upstream,
//! one pool per HTTP front: a front's requests take and give back its own
//! connections without a lock held by another thread, a hash of the
//! replica's address, or a task spawned per request to wait for the
//! connection to come back (what a general-purpose client pool does).
use axum::body::Bytes;
use axum::http::{Request, Response, Uri};
use http_body_util::Full;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::SendRequest;
use hyper_util::client::legacy::connect::HttpConnector;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tower::Service;

/// How replicas are reached: TCP, or TLS when the base URL says `https`.
pub type Connector = hyper_rustls::HttpsConnector<HttpConnector>;

/// TCP, with TLS from `tls` for `https://` replicas. Connections open
/// within 2 s and send without Nagle's delay.
pub fn connector(tls: rustls::ClientConfig) -> Connector {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(Duration::from_secs(2)));
    hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(http)
}

/// A connection unused for this long is closed rather than reused: the
/// replica (or a load balancer before it) may already have dropped it.
const IDLE_FOR: Duration = Duration::from_secs(90);

/// A kept-alive connection and when its last answer ended.
struct Idle {
    conn: SendRequest<Full<Bytes>>,
    since: Instant,
}

impl Idle {
    /// Still open, and idle for less than [`IDLE_FOR`].
    fn usable(&self) -> bool {
        !self.conn.is_closed() && self.since.elapsed() < IDLE_FOR
    }
}

type IdleList = Arc<Mutex<Vec<Idle>>>;

/// Why a request got no answer.
pub enum PoolError {
    /// No connection could be opened: nothing reached the replica.
    Connect(String),
    /// The request went out on a connection that then failed.
    Failed(String),
}

/// One front's connections to one replica.
pub struct Pool {
    connector: Connector,
    /// The replica's scheme and authority, where connections go.
    root: Uri,
    idle: IdleList,
}

impl Pool {
    pub fn new(connector: Connector, root: Uri) -> Self {
        Self {
            connector,
            root,
            idle: Arc::default(),
        }
    }

    /// The connection given back last that is still open and fresh; older
    /// or closed ones met on the way are dropped.
    fn checkout(&self) -> Option<SendRequest<Full<Bytes>>> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        while let Some(i) = idle.pop() {
            if i.usable() {
                return Some(i.conn);
            }
        }
        None
    }

    /// Drops the idle connections that are closed or too old to be used
    /// again, so that a replica does not keep them open until traffic
    /// comes back. Any thread may sweep: each connection's task ends on the
    /// front that drives it.
    pub fn sweep(&self) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        idle.retain(Idle::usable);
    }

    /// Opens a connection to the replica, its I/O driven by a task on this
    /// thread's runtime.
    async fn connect(&self) -> Result<SendRequest<Full<Bytes>>, PoolError> {
        let io = self
            .connector
            .clone()
            .call(self.root.clone())
            .await
            .map_err(|e| PoolError::Connect(with_causes(&*e)))?;
        let (send, conn) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(|e| PoolError::Connect(with_causes(&e)))?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "upstream connection ended with an error");
            }
        });
        Ok(send)
    }

    /// Sends `req` (its URI in origin form, `/v1/completions`, and with its
    /// `Host` header) on a kept-alive
    /// connection, or a new one. A kept-alive connection that turns out
    /// closed before it took the request is passed over, and the request
    /// goes on the next. The connection comes back to the pool when the
    /// answer's body has been read to its end.
    pub async fn request(
        &self,
        mut req: Request<Full<Bytes>>,
    ) -> Result<Response<Pooled>, PoolError> {
        loop {
            let (mut conn, reused) = match self.checkout() {
                Some(conn) => (conn, true),
                None => (self.connect().await?, false),
            };
            // Given back as its answer ended, it may not have turned to
            // wait for the next request yet: that takes a turn of its task.
            if let Err(e) = conn.ready().await {
                if reused {
                    continue;
                }
                return Err(PoolError::Connect(with_causes(&e)));
            }
            match conn.try_send_request(req).await {
                Ok(resp) => {
                    let back = Some((conn, self.idle.clone()));
                    return Ok(resp.map(|body| Pooled { body, back }));
                }
                Err(mut e) => match e.take_message() {
                    Some(unsent) if reused => req = unsent,
                    _ => return Err(PoolError::Failed(with_causes(e.error()))),
                },
            }
        }
    }
}

/// An answer's body; its connection goes back to the pool once the body
/// has been read to its end (a body dropped before then closes it).
pub struct Pooled {
    body: Incoming,
    back: Option<(SendRequest<Full<Bytes>>, IdleList)>,
}

impl std::fmt::Debug for Pooled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pooled").field("body", &self.body).finish()
    }
}

impl Pooled {
    fn give_back(&mut self) {
        if let Some((conn, idle)) = self.back.take() {
            if !conn.is_closed() {
                let since = Instant::now();
                let mut idle = idle.lock().unwrap_or_else(|p| p.into_inner());
                idle.push(Idle { conn, since });
            }
        }
    }
}

impl Body for Pooled {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let frame = Pin::new(&mut self.body).poll_frame(cx);
        if let Poll::Ready(None) = frame {
            self.give_back();
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for Pooled {
    /// An empty body may never be polled: its connection is free all the same.
    fn drop(&mut self) {
        if self.body.is_end_stream() {
            self.give_back();
        }
    }
}

/// An error with its causes, `: `-separated (hyper's own message names
/// only the stage that failed).
fn with_causes(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text = format!("{text}: {c}");
        cause = c.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A replica on loopback that answers each request on a connection
    /// with `{}`, closing the connection after each answer when `close`
    /// says so (as a replica with keep-alive turned off does); counts the
    /// connections it accepted, and those the client closed.
    async fn replica(close: bool) -> (Uri, Arc<AtomicUsize>, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let root = format!("http://{}/", listener.local_addr().unwrap());
        let accepted = Arc::new(AtomicUsize::new(0));
        let ended = Arc::new(AtomicUsize::new(0));
        let (count, end) = (accepted.clone(), ended.clone());
        tokio::spawn(async move {
            while let Ok((mut sock, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let end = end.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    let mut have = 0;
                    loop {
                        match sock.read(&mut buf[have..]).await {
                            Ok(0) | Err(_) => {
                                end.fetch_add(1, Ordering::SeqCst);
                                return;
                            }
                            Ok(n) => have += n,
                        }
                        // Bodiless requests: a head is a request.
                        while let Some(end) = buf[..have].windows(4).position(|w| w == b"\r\n\r\n")
                        {
                            let connection = if close { "close" } else { "keep-alive" };
                            let answer = format!(
                                "HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: {connection}\r\n\r\n{{}}"
                            );
                            if sock.write_all(answer.as_bytes()).await.is_err() || close {
                                return;
                            }
                            buf.copy_within(end + 4..have, 0);
                            have -= end + 4;
                        }
                    }
                });
            }
        });
        (root.parse().unwrap(), accepted, ended)
    }

    fn pool(root: Uri) -> Pool {
        let tls = crate::tls::ClientTlsConfig::default()
            .rustls("tls")
            .unwrap();
        Pool::new(connector(tls), root)
    }

    /// Three requests one after another, each answer read to its end.
    async fn three(pool: &Pool, root: &Uri) {
        for _ in 0..3 {
            let req = Request::get("/health")
                .header("host", root.authority().unwrap().as_str())
                .body(Full::new(Bytes::new()))
                .unwrap();
            let resp = pool.request(req).await.ok().expect("an answer");
            assert_eq!(resp.status(), 200);
            assert_eq!(resp.into_body().collect().await.unwrap().to_bytes(), "{}");
        }
    }

    /// The connections a replica accepted for three requests in a row.
    async fn connections_for_three(close: bool) -> usize {
        let (root, accepted, _) = replica(close).await;
        three(&pool(root.clone()), &root).await;
        accepted.load(Ordering::SeqCst)
    }

    #[tokio::test]
    async fn requests_one_after_another_share_one_connection() {
        assert_eq!(connections_for_three(false).await, 1);
    }

    #[tokio::test]
    async fn a_sweep_closes_stale_connections_and_keeps_fresh_ones() {
        let (root, accepted, ended) = replica(false).await;
        let pool = pool(root.clone());
        three(&pool, &root).await;
        pool.sweep();
        assert_eq!(pool.idle.lock().unwrap().len(), 1, "a fresh one stays");
        pool.idle.lock().unwrap()[0].since -= IDLE_FOR;
        pool.sweep();
        assert!(pool.idle.lock().unwrap().is_empty());
        // The replica sees the connection close, without another request.
        let closed = async {
            while ended.load(Ordering::SeqCst) == 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(5), closed)
            .await
            .expect("the swept connection closed");
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_connection_the_replica_closes_is_not_used_again() {
        assert_eq!(connections_for_three(true).await, 3);
    }

    #[tokio::test]
    async fn a_replica_nobody_listens_on_is_not_reached() {
        let root: Uri = "http://127.0.0.1:9/".parse().unwrap();
        let req = Request::get("/").header("host", "127.0.0.1:9");
        let result = pool(root)
            .request(req.body(Full::new(Bytes::new())).unwrap())
            .await;
        assert!(matches!(result, Err(PoolError::Connect(_))));
    }
}
