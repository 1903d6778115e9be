//! Kept-alive HTTP/1 connections to one replica of a remote OpenAI upstream,
//! one pool per HTTP front. A request is written, and its answer read, by
//! the task that proxies it, through [`crate::http1`]: no connection task
//! to hand the request to and the answer back from, no channel for the
//! body, no lock held by another thread, and no task spawned per request
//! (what a general-purpose client does).
use crate::http1::{self, Chunked, Decoded, Framing};
use crate::server::Conn as Socket;
use axum::body::Bytes;
use axum::http::uri::Scheme;
use axum::http::{HeaderValue, Method, StatusCode, Uri};
use bytes::{Buf, BytesMut};
use hyper::body::{Body, Frame, SizeHint};
use rustls::pki_types::ServerName;
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll, Waker};
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// A TCP connection is opened within this long, or the replica counts as
/// not reached.
const CONNECT_WITHIN: Duration = Duration::from_secs(2);

/// A connection unused for this long is closed rather than reused: the
/// replica (or a load balancer before it) may already have dropped it.
const IDLE_FOR: Duration = Duration::from_secs(90);

/// A connection and what has been read from it but not yet taken.
struct Conn {
    io: Socket,
    buf: BytesMut,
}

impl Conn {
    /// Reads what the replica sent into `buf`; `Ok(0)` when it has closed.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.buf.capacity() - self.buf.len() < 4096 {
            self.buf.reserve(16 * 1024);
        }
        tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut self.buf)
    }

    /// Whether an idle connection may carry a request: the replica has
    /// neither closed it nor sent anything unasked.
    fn is_open(&mut self) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        self.poll_fill(&mut cx).is_pending()
    }

    /// Reads the answer's head (past any informational ones).
    async fn answer(mut self, idle: IdleList) -> Result<Reply, String> {
        loop {
            if let Some((head, len)) = http1::parse_head(&self.buf)? {
                self.buf.advance(len);
                if head.status == StatusCode::SWITCHING_PROTOCOLS {
                    return Err("the replica switched protocols unasked".into());
                }
                if head.status.is_informational() {
                    continue;
                }
                let body = Pooled::new(self, head.framing, head.keep_alive, idle);
                return Ok(Reply {
                    status: head.status,
                    content_type: head.content_type,
                    body,
                });
            }
            match poll_fn(|cx| self.poll_fill(cx)).await {
                Ok(0) => return Err("the replica closed the connection before answering".into()),
                Ok(_) => {}
                Err(e) => return Err(format!("reading the answer: {e}")),
            }
        }
    }
}

/// A kept-alive connection and when its last answer ended.
struct Idle {
    conn: Conn,
    since: Instant,
}

impl Idle {
    /// Still open, and idle for less than [`IDLE_FOR`].
    fn usable(&mut self) -> bool {
        self.since.elapsed() < IDLE_FOR && self.conn.is_open()
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

/// A replica's answer: what the proxy passes on of its head, and its body.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub content_type: Option<HeaderValue>,
    pub body: Pooled,
}

/// One front's connections to one replica.
pub struct Pool {
    tls: TlsConnector,
    /// The replica's scheme and authority, where connections go.
    root: Uri,
    idle: IdleList,
}

impl Pool {
    /// `tls` is used when `root`'s scheme is `https`.
    pub fn new(tls: TlsConnector, root: Uri) -> Self {
        Self {
            tls,
            root,
            idle: Arc::default(),
        }
    }

    /// The connection given back last that is still open and fresh; older
    /// or closed ones met on the way are dropped.
    fn checkout(&self) -> Option<Conn> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        while let Some(mut i) = idle.pop() {
            if i.usable() {
                return Some(i.conn);
            }
        }
        None
    }

    /// Drops the idle connections that are closed or too old to be used
    /// again, so that a replica does not keep them open until traffic
    /// comes back.
    pub fn sweep(&self) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        idle.retain_mut(Idle::usable);
    }

    /// Opens a connection to the replica: TCP without Nagle's delay, then
    /// TLS for an `https` replica.
    async fn connect(&self) -> Result<Conn, PoolError> {
        let https = self.root.scheme() == Some(&Scheme::HTTPS);
        let host = self.root.host().unwrap_or_default();
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let port = self.root.port_u16().unwrap_or(if https { 443 } else { 80 });
        let failed = |what: &str, e: &dyn std::fmt::Display| {
            PoolError::Connect(format!("{what} {host}:{port}: {e}"))
        };
        let tcp = match tokio::time::timeout(CONNECT_WITHIN, TcpStream::connect((host, port))).await
        {
            Ok(Ok(tcp)) => tcp,
            Ok(Err(e)) => return Err(failed("connecting to", &e)),
            Err(_) => return Err(failed("connecting to", &"no answer within 2 s")),
        };
        tcp.set_nodelay(true)
            .map_err(|e| failed("connecting to", &e))?;
        let io = if https {
            let name = ServerName::try_from(host.to_string())
                .map_err(|e| failed("naming the TLS server", &e))?;
            let tls = self.tls.connect(name, tcp).await;
            let tls = tls.map_err(|e| failed("a TLS handshake with", &e))?;
            Socket::Tls(Box::new(tls.into()))
        } else {
            Socket::Plain(tcp)
        };
        Ok(Conn {
            io,
            buf: BytesMut::new(),
        })
    }

    /// Sends a request for `target` (origin form, `/v1/completions`) with
    /// `host` as its `Host` header and `body` (JSON, when not empty) on a
    /// kept-alive connection, or a new one. A kept-alive connection that
    /// could not take the request is passed over, and the request goes on
    /// the next. The connection comes back to the pool when the answer's
    /// body has been read to its end.
    pub async fn request(
        &self,
        method: &Method,
        target: &str,
        host: &str,
        body: &[u8],
    ) -> Result<Reply, PoolError> {
        let message = http1::request(method, target, host, body);
        loop {
            let (mut conn, reused) = match self.checkout() {
                Some(conn) => (conn, true),
                None => (self.connect().await?, false),
            };
            let sent = async {
                conn.io.write_all(&message).await?;
                conn.io.flush().await
            };
            match sent.await {
                Ok(()) => {
                    return conn
                        .answer(self.idle.clone())
                        .await
                        .map_err(PoolError::Failed)
                }
                Err(_) if reused => continue,
                Err(e) => return Err(PoolError::Failed(format!("sending the request: {e}"))),
            }
        }
    }
}

/// How much of an answer's body is still to come.
#[derive(Debug)]
enum Rest {
    Length(u64),
    Chunked(Chunked),
    UntilClose,
}

/// An answer's body, read from its connection as it is polled; the
/// connection goes back to the pool once the body has been read to its
/// end (a body dropped before then closes it).
pub struct Pooled {
    /// `None` once the body has ended.
    conn: Option<Conn>,
    rest: Rest,
    keep_alive: bool,
    idle: IdleList,
}

impl std::fmt::Debug for Pooled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pooled").field("rest", &self.rest).finish()
    }
}

impl Pooled {
    fn new(conn: Conn, framing: Framing, keep_alive: bool, idle: IdleList) -> Self {
        let rest = match framing {
            Framing::Length(n) => Rest::Length(n),
            Framing::Chunked => Rest::Chunked(Chunked::default()),
            Framing::UntilClose => Rest::UntilClose,
        };
        let mut body = Self {
            conn: Some(conn),
            rest,
            keep_alive,
            idle,
        };
        if matches!(body.rest, Rest::Length(0)) {
            body.end();
        }
        body
    }

    /// The body has ended: its connection goes back to the pool when the
    /// replica keeps it alive and sent nothing past the answer.
    fn end(&mut self) {
        if let Some(conn) = self.conn.take() {
            if self.keep_alive && conn.buf.is_empty() {
                let since = Instant::now();
                let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
                idle.push(Idle { conn, since });
            }
        }
    }

    /// The next piece of the body from what has been read, if any.
    fn take(&mut self) -> io::Result<Option<Bytes>> {
        let Some(conn) = self.conn.as_mut() else {
            return Ok(None);
        };
        let buf = &mut conn.buf;
        let (data, ended) = match &mut self.rest {
            Rest::Length(left) if !buf.is_empty() => {
                let take = (*left).min(buf.len() as u64);
                *left -= take;
                (buf.split_to(take as usize).freeze(), *left == 0)
            }
            Rest::Chunked(c) => match c.decode(buf) {
                Ok(Decoded::Data(data)) => (data, false),
                Ok(Decoded::Done) => (Bytes::new(), true),
                Ok(Decoded::More) => return Ok(None),
                Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, e)),
            },
            Rest::UntilClose if !buf.is_empty() => (buf.split().freeze(), false),
            _ => return Ok(None),
        };
        if ended {
            self.end();
        }
        Ok(Some(data))
    }
}

impl Body for Pooled {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        loop {
            match self.take() {
                Ok(Some(data)) if !data.is_empty() => {
                    return Poll::Ready(Some(Ok(Frame::data(data))))
                }
                Ok(_) => {}
                Err(e) => {
                    self.conn = None;
                    return Poll::Ready(Some(Err(e)));
                }
            }
            let Some(conn) = self.conn.as_mut() else {
                return Poll::Ready(None);
            };
            let read = ready!(conn.poll_fill(cx));
            if matches!(read, Ok(n) if n > 0) {
                continue;
            }
            // Closed or failed: the connection is not used again.
            self.conn = None;
            return Poll::Ready(match read {
                Err(e) => Some(Err(e)),
                Ok(_) if matches!(self.rest, Rest::UntilClose) => None,
                Ok(_) => Some(Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the replica closed the connection before the answer's end",
                ))),
            });
        }
    }

    fn is_end_stream(&self) -> bool {
        self.conn.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        match (&self.conn, &self.rest) {
            (None, _) => SizeHint::with_exact(0),
            (Some(_), Rest::Length(n)) => SizeHint::with_exact(*n),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// What a test replica writes for each request, and whether it then
    /// closes the connection.
    type Script = Box<dyn FnMut() -> (String, bool) + Send>;

    /// A replica on loopback that answers each request, on any connection,
    /// with what `script` gives next; counts the connections it accepted,
    /// and those that ended (closed by either side).
    async fn scripted(script: Script) -> (Uri, Arc<AtomicUsize>, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let root = format!("http://{}/", listener.local_addr().unwrap());
        let accepted = Arc::new(AtomicUsize::new(0));
        let ended = Arc::new(AtomicUsize::new(0));
        let (count, end) = (accepted.clone(), ended.clone());
        let script = Arc::new(Mutex::new(script));
        tokio::spawn(async move {
            while let Ok((mut sock, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let (end, script) = (end.clone(), script.clone());
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    let mut have = 0;
                    'conn: loop {
                        match sock.read(&mut buf[have..]).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => have += n,
                        }
                        // Bodiless requests: a head is a request.
                        while let Some(end) = buf[..have].windows(4).position(|w| w == b"\r\n\r\n")
                        {
                            let (answer, close) = (script.lock().unwrap())();
                            if sock.write_all(answer.as_bytes()).await.is_err() || close {
                                break 'conn;
                            }
                            buf.copy_within(end + 4..have, 0);
                            have -= end + 4;
                        }
                    }
                    drop(sock);
                    end.fetch_add(1, Ordering::SeqCst);
                });
            }
        });
        (root.parse().unwrap(), accepted, ended)
    }

    /// A replica that answers every request with `{}`, closing the
    /// connection after each answer when `close` says so (as a replica
    /// with keep-alive turned off does).
    async fn replica(close: bool) -> (Uri, Arc<AtomicUsize>, Arc<AtomicUsize>) {
        let connection = if close { "close" } else { "keep-alive" };
        let answer =
            format!("HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: {connection}\r\n\r\n{{}}");
        scripted(Box::new(move || (answer.clone(), close))).await
    }

    fn pool(root: Uri) -> Pool {
        let tls = crate::tls::ClientTlsConfig::default()
            .rustls("tls")
            .unwrap();
        Pool::new(Arc::new(tls).into(), root)
    }

    /// Three requests one after another, each answer read to its end.
    async fn three(pool: &Pool, root: &Uri) {
        let host = root.authority().unwrap().as_str();
        for _ in 0..3 {
            let resp = pool.request(&Method::GET, "/health", host, b"").await;
            let resp = resp.ok().expect("an answer");
            assert_eq!(resp.status, 200);
            assert_eq!(resp.body.collect().await.unwrap().to_bytes(), "{}");
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
        let result = pool(root)
            .request(&Method::GET, "/", "127.0.0.1:9", b"")
            .await;
        assert!(matches!(result, Err(PoolError::Connect(_))));
    }

    /// A replica that answers with `answers` in turn, each `(text, close)`.
    async fn answering(answers: &[(&str, bool)]) -> (Uri, Arc<AtomicUsize>, Arc<AtomicUsize>) {
        let mut answers: Vec<(String, bool)> = answers
            .iter()
            .rev()
            .map(|&(a, c)| (a.to_string(), c))
            .collect();
        scripted(Box::new(move || answers.pop().expect("an answer left"))).await
    }

    /// The body of one GET, read whole.
    async fn body_of(pool: &Pool, root: &Uri) -> Bytes {
        let host = root.authority().unwrap().as_str();
        let resp = pool.request(&Method::GET, "/", host, b"").await;
        let resp = resp.ok().expect("an answer");
        resp.body.collect().await.unwrap().to_bytes()
    }

    #[tokio::test]
    async fn chunked_and_close_delimited_bodies_are_read_whole() {
        let (root, accepted, _) = answering(&[
            ("HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n6;x=y\r\n world\r\n0\r\ntrailer: 1\r\n\r\n", false),
            ("HTTP/1.1 200 OK\r\n\r\nuntil the end", true),
            ("HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nnext", false),
        ])
        .await;
        let pool = pool(root.clone());
        assert_eq!(body_of(&pool, &root).await, "hello world");
        assert_eq!(body_of(&pool, &root).await, "until the end");
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            1,
            "kept alive after chunks"
        );
        assert_eq!(body_of(&pool, &root).await, "next");
        assert_eq!(accepted.load(Ordering::SeqCst), 2, "not after the close");
    }

    #[tokio::test]
    async fn a_connection_the_replica_drops_while_idle_is_passed_over() {
        let ok = "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}";
        let (root, accepted, ended) = answering(&[(ok, true), (ok, false)]).await;
        let pool = pool(root.clone());
        assert_eq!(body_of(&pool, &root).await, "{}");
        // The replica closed it without saying so in the answer.
        while ended.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        assert_eq!(body_of(&pool, &root).await, "{}");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn an_answer_cut_short_is_an_error_and_its_connection_is_not_kept() {
        let cut = "HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nshort";
        let (root, accepted, _) = answering(&[
            (cut, true),
            ("HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n", false),
        ])
        .await;
        let pool = pool(root.clone());
        let host = root.authority().unwrap().as_str();
        let resp = pool
            .request(&Method::GET, "/", host, b"")
            .await
            .ok()
            .unwrap();
        let e = resp.body.collect().await.unwrap_err();
        assert!(e.to_string().contains("before the answer's end"), "{e}");
        assert_eq!(body_of(&pool, &root).await, "");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }
}
