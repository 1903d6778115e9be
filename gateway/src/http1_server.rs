//! The server half of HTTP/1.1 (RFC 9112) for the two OpenAI generation
//! routes, the requests a gateway carries most: a request's head parsed by
//! `httparse` straight into the one `HeaderMap` its handler reads, its body
//! taken from the read buffer without a copy or a channel, the handler run
//! inside the connection's own task (no future boxed per request, no
//! header-read timer armed per request), and the answer's head written
//! with its body in one write.
//!
//! A connection stays here while its requests are plain `POST`s to those
//! routes: HTTP/1.1, a body framed by `content-length` within the body
//! bound, no `expect`, no `upgrade`, no transfer coding, no connection
//! option but `close` and `keep-alive`. At the first request that is
//! anything else (another route, HTTP/2's preface, a broken head) the
//! connection and what was read of it go to hyper for the rest of its
//! life, so every other route and every corner of the protocol is served
//! as before.
use crate::api::error::ApiError;
use crate::api::{self, Api, Generate};
use crate::http1::{connection, content_length, MAX_HEAD};
use axum::body::{Body, Bytes};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method, Request, Response};
use bytes::{Buf, BytesMut};
use http_body_util::BodyExt;
use std::future::Future;
use std::io::Write;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

/// At most this many header fields in a request's head, as hyper allows.
const MAX_FIELDS: usize = 100;

/// Room made in the read buffer when less than `MIN_ROOM` is left.
const READ: usize = 8 * 1024;

/// Space a read needs at least. Kept-alive requests are read into what is
/// left of one allocation, which their heads and bodies still share while
/// they are answered: making a whole `READ` of room before every read
/// would allocate anew for every request.
const MIN_ROOM: usize = 1024;

/// An answer whose body is known to be this long or shorter goes out in
/// one write with its head.
const ONE_WRITE: usize = 64 * 1024;

/// How a connection left this half.
pub enum Served<T> {
    /// It has ended.
    Ended,
    /// Its next request is not one this half answers: the connection, and
    /// the bytes read from it and not yet answered.
    HandOver(T, Bytes),
}

/// Where a header field's name and value lie in a request's head: their
/// start and end offsets.
type Span = [u32; 4];

/// A request head this half answers.
#[derive(Debug)]
struct Ask {
    route: Generate,
    /// The head's length in bytes.
    head: usize,
    /// How many header fields it has (their spans come first in the
    /// parser's array).
    fields: usize,
    /// The body's length in bytes.
    body: usize,
    /// Whether the client asked for the connection to close after this.
    close: bool,
}

/// What the start of a read buffer holds.
#[derive(Debug)]
enum Head {
    /// A request this half answers.
    Ours(Ask),
    /// Part of a head: more is to come.
    Partial,
    /// Anything else, for hyper: another route, method or version, a
    /// framing or option this half does not take, a body over the bound
    /// (hyper's path refuses it in OpenAI's shape), a broken head.
    Other,
}

/// Reads the request head at the start of `buf`, noting where each field
/// lies in `spans`: the header map is built from them once the head has
/// been taken from the buffer, its values sharing the head's bytes as
/// hyper's do, not copied one by one.
fn parse(buf: &[u8], max_body: usize, spans: &mut [Span; MAX_FIELDS]) -> Head {
    // Left uninitialised: httparse writes the fields it finds.
    let mut fields = [const { MaybeUninit::<httparse::Header>::uninit() }; MAX_FIELDS];
    let mut req = httparse::Request::new(&mut []);
    let config = httparse::ParserConfig::default();
    let head = match config.parse_request_with_uninit_headers(&mut req, buf, &mut fields) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() <= MAX_HEAD => return Head::Partial,
        _ => return Head::Other,
    };
    let route = match (req.method, req.version, req.path) {
        (Some("POST"), Some(1), Some(path)) => Generate::of_post(path),
        _ => None,
    };
    let Some(route) = route else {
        return Head::Other;
    };
    let (mut body, mut close) = (None, false);
    // Offsets into the head, which is at most `MAX_HEAD` long.
    let at = |part: &[u8]| (part.as_ptr() as usize - buf.as_ptr() as usize) as u32;
    for (f, span) in req.headers.iter().zip(spans.iter_mut()) {
        let name = f.name.as_bytes();
        if name.eq_ignore_ascii_case(b"content-length") {
            match content_length(f.value) {
                Some(n) if body.is_none() => body = Some(n),
                _ => return Head::Other,
            }
        } else if name.eq_ignore_ascii_case(b"connection") {
            let (asks_close, _, other) = connection(f.value);
            if other {
                return Head::Other;
            }
            close |= asks_close;
        } else if name.eq_ignore_ascii_case(b"transfer-encoding")
            || name.eq_ignore_ascii_case(b"expect")
            || name.eq_ignore_ascii_case(b"upgrade")
        {
            return Head::Other;
        }
        let (n, v) = (at(name), at(f.value));
        *span = [n, n + name.len() as u32, v, v + f.value.len() as u32];
    }
    // Without `content-length` (or a transfer coding), a request has no body.
    match usize::try_from(body.unwrap_or(0)) {
        Ok(body) if body <= max_body => Head::Ours(Ask {
            route,
            head,
            fields: req.headers.len(),
            body,
            close,
        }),
        _ => Head::Other,
    }
}

/// The header map of a head whose fields lie at `spans`; `None` where a
/// name or value is not one `http` takes.
fn header_map(head: &Bytes, spans: &[Span]) -> Option<HeaderMap> {
    let mut headers = HeaderMap::with_capacity(spans.len());
    for &[n, n_end, v, v_end] in spans {
        let name = HeaderName::from_bytes(&head[n as usize..n_end as usize]).ok()?;
        let value = head.slice(v as usize..v_end as usize);
        headers.append(name, HeaderValue::from_maybe_shared(value).ok()?);
    }
    Some(headers)
}

/// Reads what comes into `buf`; `false` once the client has closed its
/// end or the connection failed.
async fn fill<T: AsyncRead + Unpin>(io: &mut T, buf: &mut BytesMut) -> bool {
    if buf.capacity() - buf.len() < MIN_ROOM {
        buf.reserve(READ);
    }
    matches!(io.read_buf(buf).await, Ok(n) if n > 0)
}

/// Serves the connection's generation requests until it ends or brings a
/// request this half does not answer. The connection closes once a head
/// has not come whole within `idle` of the last answer (or of the start),
/// and, once `stop` has resolved, after the request in progress.
pub async fn serve<T, S>(mut io: T, api: &Api, idle: Duration, mut stop: Pin<&mut S>) -> Served<T>
where
    T: AsyncRead + AsyncWrite + Unpin,
    S: Future<Output = ()>,
{
    let state = api.state();
    let max_body = state.limits.max_body_bytes;
    let mut buf = BytesMut::new();
    let mut spans = [[0; 4]; MAX_FIELDS];
    let mut stopping = false;
    // One timer for the connection's life, moved on only when it fires:
    // kept-alive requests do not each arm and disarm one.
    let timer = tokio::time::sleep(idle);
    tokio::pin!(timer);
    loop {
        let deadline = Instant::now() + idle;
        let ask = loop {
            match parse(&buf, max_body, &mut spans) {
                Head::Ours(ask) => break ask,
                Head::Other => return Served::HandOver(io, buf.freeze()),
                Head::Partial if stopping && buf.is_empty() => return end(io).await,
                Head::Partial => {}
            }
            tokio::select! {
                biased;
                more = fill(&mut io, &mut buf) => if !more {
                    return Served::Ended;
                },
                () = stop.as_mut(), if !stopping => stopping = true,
                () = timer.as_mut() => {
                    if Instant::now() >= deadline {
                        return Served::Ended;
                    }
                    timer.as_mut().reset(deadline);
                }
            }
        };
        let head = buf.split_to(ask.head).freeze();
        let Some(headers) = header_map(&head, &spans[..ask.fields]) else {
            let mut read = BytesMut::from(head);
            read.extend_from_slice(&buf);
            return Served::HandOver(io, read.freeze());
        };
        let close = ask.close || stopping;
        if let Some(refused) = api::inference_refusal::<ApiError>(state, &headers) {
            // A refused request's body is not waited for: the connection
            // closes after the refusal unless the body is here already.
            let whole = buf.len() >= ask.body;
            if whole {
                buf.advance(ask.body);
            }
            if write(&mut io, refused, close || !whole).await.is_err() || close || !whole {
                return end(io).await;
            }
            continue;
        }
        while buf.len() < ask.body {
            if !fill(&mut io, &mut buf).await {
                return Served::Ended;
            }
        }
        let mut req = Request::new(Body::from(buf.split_to(ask.body).freeze()));
        *req.method_mut() = Method::POST;
        *req.uri_mut() = ask.route.uri();
        *req.headers_mut() = headers;
        let answer = api::generate(state.clone(), ask.route, req);
        tokio::pin!(answer);
        let answer = loop {
            tokio::select! {
                biased;
                answer = answer.as_mut() => break answer,
                // A client that closes its end while its answer is worked
                // on has gone: the work is dropped, as hyper does. What a
                // pipelining client sends meanwhile waits in the buffer.
                more = fill(&mut io, &mut buf), if buf.len() <= MAX_HEAD => if !more {
                    return Served::Ended;
                },
            }
        };
        if write(&mut io, answer, close).await.is_err() || close {
            return end(io).await;
        }
    }
}

/// Closes the connection, so that a TLS client is told.
async fn end<T: AsyncWrite + Unpin>(mut io: T) -> Served<T> {
    let _ = io.shutdown().await;
    Served::Ended
}

/// Writes `answer`: its head, then its body, framed by its length where the
/// body knows it and by chunks where it streams (each chunk sent as it
/// comes, for server-sent events).
async fn write<T: AsyncWrite + Unpin>(
    io: &mut T,
    answer: Response<Body>,
    close: bool,
) -> std::io::Result<()> {
    let (parts, mut body) = answer.into_parts();
    let mut out = Vec::with_capacity(512);
    let status = parts.status;
    for part in [
        "HTTP/1.1 ",
        status.as_str(),
        " ",
        status.canonical_reason().unwrap_or(""),
        "\r\n",
    ] {
        out.extend_from_slice(part.as_bytes());
    }
    for (name, value) in &parts.headers {
        let framing = name == header::CONTENT_LENGTH
            || name == header::TRANSFER_ENCODING
            || name == header::CONNECTION;
        if !framing {
            field(&mut out, name.as_str().as_bytes(), value.as_bytes());
        }
    }
    if !parts.headers.contains_key(header::DATE) {
        date(&mut out);
    }
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    if status.is_informational() || status == 204 || status == 304 {
        out.extend_from_slice(b"\r\n");
        return send(io, &out).await;
    }
    match hyper::body::Body::size_hint(&body).exact() {
        Some(len) => {
            field(
                &mut out,
                b"content-length",
                itoa::Buffer::new().format(len).as_bytes(),
            );
            out.extend_from_slice(b"\r\n");
            // A short body goes behind its head; a long one after it.
            let behind = len <= ONE_WRITE as u64;
            if behind {
                out.reserve(len as usize);
            } else {
                io.write_all(&out).await?;
                out.clear();
            }
            while let Some(data) = next_data(&mut body).await? {
                if behind {
                    out.extend_from_slice(&data);
                } else {
                    io.write_all(&data).await?;
                }
            }
            send(io, &out).await
        }
        None => {
            out.extend_from_slice(b"transfer-encoding: chunked\r\n\r\n");
            send(io, &out).await?;
            while let Some(data) = next_data(&mut body).await? {
                out.clear();
                write!(out, "{:x}\r\n", data.len()).expect("writing to a Vec");
                out.extend_from_slice(&data);
                out.extend_from_slice(b"\r\n");
                send(io, &out).await?;
            }
            send(io, b"0\r\n\r\n").await
        }
    }
}

/// The body's next piece of data that is not empty, passing over trailers.
async fn next_data(body: &mut Body) -> std::io::Result<Option<Bytes>> {
    while let Some(frame) = body.frame().await {
        match frame.map_err(std::io::Error::other)?.into_data() {
            Ok(data) if !data.is_empty() => return Ok(Some(data)),
            _ => {}
        }
    }
    Ok(None)
}

/// Writes `bytes` (when there are any) and flushes them out.
async fn send<T: AsyncWrite + Unpin>(io: &mut T, bytes: &[u8]) -> std::io::Result<()> {
    if !bytes.is_empty() {
        io.write_all(bytes).await?;
    }
    io.flush().await
}

fn field(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    for part in [name, b": ", value, b"\r\n"] {
        out.extend_from_slice(part);
    }
}

/// A `date` field, formatted once a second per thread.
fn date(out: &mut Vec<u8>) {
    use std::cell::RefCell;
    use std::time::{SystemTime, UNIX_EPOCH};
    thread_local! {
        static NOW: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
    }
    let now = SystemTime::now();
    let second = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    NOW.with_borrow_mut(|(at, text)| {
        if *at != second {
            (*at, *text) = (second, httpdate::fmt_http_date(now));
        }
        field(out, b"date", text.as_bytes());
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::AppState;
    use crate::http1::{parse_head, Chunked, Decoded, Framing};
    use futures::StreamExt;
    use tokio::io::DuplexStream;

    const CHAT: &str = "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n\
                        content-type: application/json\r\ncontent-length: 14\r\n\r\n{\"model\":\"no\"}";

    fn parsed(head: &str) -> Head {
        parse(head.as_bytes(), 1000, &mut [[0; 4]; MAX_FIELDS])
    }

    #[test]
    fn plain_generation_posts_are_ours_and_everything_else_is_hyper_s() {
        let mut spans = [[0; 4]; MAX_FIELDS];
        let Head::Ours(ask) = parse(CHAT.as_bytes(), 1000, &mut spans) else {
            panic!("a plain chat request is ours")
        };
        assert_eq!(
            (ask.route, ask.body, ask.close),
            (Generate::Chat, 14, false)
        );
        assert_eq!((ask.head, ask.fields), (CHAT.len() - 14, 3));
        let head = Bytes::from(&CHAT.as_bytes()[..ask.head]);
        let headers = header_map(&head, &spans[..ask.fields]).unwrap();
        assert_eq!(headers["content-type"], "application/json");
        assert_eq!(headers["Host"], "x");
        assert_eq!(headers.len(), 3);
        let ours = |head: &str| matches!(parsed(head), Head::Ours(_));
        let close = "POST /v1/completions HTTP/1.1\r\nConnection: Close\r\n\r\n";
        let Head::Ours(ask) = parsed(close) else {
            panic!("`connection: close` is ours")
        };
        assert_eq!(
            (ask.route, ask.body, ask.close),
            (Generate::Completions, 0, true)
        );
        assert!(ours(
            "POST /v1/completions HTTP/1.1\r\nconnection: keep-alive\r\n\r\n"
        ));
        assert!(matches!(
            parsed("POST /v1/completions HTTP/1.1\r\nhost"),
            Head::Partial
        ));
        assert!(matches!(parsed(""), Head::Partial));
        for other in [
            "GET /v1/chat/completions HTTP/1.1\r\n\r\n",
            "POST /v1/models HTTP/1.1\r\n\r\n",
            "POST /v1/completions?x=1 HTTP/1.1\r\n\r\n",
            "POST http://h/v1/completions HTTP/1.1\r\n\r\n",
            "POST /v1/completions HTTP/1.0\r\n\r\n",
            "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            "POST /v1/completions HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n",
            "POST /v1/completions HTTP/1.1\r\nexpect: 100-continue\r\ncontent-length: 1\r\n\r\n",
            "POST /v1/completions HTTP/1.1\r\nupgrade: h2c\r\nconnection: upgrade\r\n\r\n",
            "POST /v1/completions HTTP/1.1\r\ncontent-length: 1\r\ncontent-length: 1\r\n\r\n",
            "POST /v1/completions HTTP/1.1\r\ncontent-length: +1\r\n\r\n",
            "POST /v1/completions HTTP/1.1\r\ncontent-length: 1001\r\n\r\n",
            "POST /v1/completions HTTP/1.1\r\nbad name: 1\r\n\r\n",
            "NOT HTTP\r\n\r\n",
        ] {
            assert!(matches!(parsed(other), Head::Other), "{other:?}");
        }
        let endless = format!(
            "POST /v1/completions HTTP/1.1\r\nx: {}",
            "a".repeat(MAX_HEAD)
        );
        assert!(matches!(parsed(&endless), Head::Other), "hyper refuses it");
    }

    /// Reads one answer from `from`: its head and its body.
    async fn answer(
        from: &mut (impl AsyncRead + Unpin),
        buf: &mut BytesMut,
    ) -> (u16, bool, Vec<u8>) {
        let (head, len) = loop {
            if let Some(parsed) = parse_head(buf).unwrap() {
                break parsed;
            }
            assert!(
                from.read_buf(buf).await.unwrap() > 0,
                "the answer ended early"
            );
        };
        buf.advance(len);
        let mut body = Vec::new();
        match head.framing {
            Framing::Length(n) => {
                while buf.len() < n as usize {
                    assert!(from.read_buf(buf).await.unwrap() > 0);
                }
                body.extend_from_slice(&buf.split_to(n as usize));
            }
            Framing::Chunked => {
                let mut chunked = Chunked::default();
                loop {
                    match chunked.decode(buf).unwrap() {
                        Decoded::Data(d) => body.extend_from_slice(&d),
                        Decoded::More => assert!(from.read_buf(buf).await.unwrap() > 0),
                        Decoded::Done => break,
                    }
                }
            }
            Framing::UntilClose => panic!("an answer of ours says how it ends"),
        }
        (head.status.as_u16(), head.keep_alive, body)
    }

    fn api() -> Api {
        Api::new(AppState::new(0, None))
    }

    /// [`serve`] with no stop and five seconds to each head.
    async fn served(conn: DuplexStream, api: &Api) -> Served<DuplexStream> {
        let stop = std::future::pending::<()>();
        tokio::pin!(stop);
        serve(conn, api, Duration::from_secs(5), stop.as_mut()).await
    }

    /// Reads two answers from `client`, each a kept-alive client error in
    /// OpenAI's shape (the test requests name no model this server has).
    async fn two_errors(client: &mut DuplexStream, buf: &mut BytesMut, what: &str) {
        for _ in 0..2 {
            let (status, keep_alive, body) = answer(client, buf).await;
            assert!(
                (400..500).contains(&status) && keep_alive,
                "{what}: {status}"
            );
            let error: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert!(
                error["error"]["message"].is_string(),
                "{what}: OpenAI's shape: {error}"
            );
        }
    }

    #[tokio::test]
    async fn pipelined_requests_are_answered_in_order_and_the_first_other_one_goes_to_hyper() {
        let (mut client, conn) = tokio::io::duplex(1 << 16);
        let health = "GET /health HTTP/1.1\r\nhost: x\r\n\r\n";
        let sent = format!("{CHAT}{}{health}", CHAT.replace("chat/", ""));
        client.write_all(sent.as_bytes()).await.unwrap();
        let Served::HandOver(_, read) = served(conn, &api()).await else {
            panic!("the GET is hyper's")
        };
        assert_eq!(&read[..], health.as_bytes());
        let mut buf = BytesMut::new();
        two_errors(&mut client, &mut buf, "pipelined").await;
        assert!(buf.is_empty(), "nothing but the two answers");
    }

    #[tokio::test]
    async fn requests_arriving_in_pieces_of_any_size_are_answered_the_same() {
        let api = api();
        let sent = format!("{CHAT}{}", CHAT.replace("chat/", ""));
        for piece in [1, 2, 7, 31, 64, 200, sent.len()] {
            let (mut client, conn) = tokio::io::duplex(1 << 16);
            let api = api.clone();
            let task = tokio::spawn(async move { served(conn, &api).await });
            for part in sent.as_bytes().chunks(piece) {
                client.write_all(part).await.unwrap();
                tokio::task::yield_now().await;
            }
            let mut buf = BytesMut::new();
            two_errors(&mut client, &mut buf, &format!("in pieces of {piece}")).await;
            drop(client);
            assert!(matches!(task.await.unwrap(), Served::Ended), "{piece}");
        }
    }

    #[tokio::test]
    async fn a_client_that_asks_to_close_gets_its_answer_then_the_end() {
        let (mut client, conn) = tokio::io::duplex(1 << 16);
        let sent = CHAT.replace("host: x", "connection: close");
        client.write_all(sent.as_bytes()).await.unwrap();
        assert!(matches!(served(conn, &api()).await, Served::Ended));
        let mut buf = BytesMut::new();
        let (status, keep_alive, _) = answer(&mut client, &mut buf).await;
        assert!((400..500).contains(&status) && !keep_alive, "{status}");
        assert_eq!(client.read_buf(&mut buf).await.unwrap(), 0, "closed");
    }

    #[tokio::test]
    async fn a_connection_without_a_whole_head_in_time_is_closed_and_a_stop_closes_an_idle_one() {
        let api = api();
        let (mut client, conn) = tokio::io::duplex(1 << 16);
        client
            .write_all(b"POST /v1/completions HTTP/1.1\r\n")
            .await
            .unwrap();
        let stop = std::future::pending::<()>();
        tokio::pin!(stop);
        let started = Instant::now();
        let served = serve(conn, &api, Duration::from_millis(300), stop.as_mut()).await;
        assert!(matches!(served, Served::Ended));
        assert!(started.elapsed() >= Duration::from_millis(300));

        let (_client, conn) = tokio::io::duplex(1 << 16);
        let stop = tokio::time::sleep(Duration::from_millis(100));
        tokio::pin!(stop);
        let started = Instant::now();
        let served = serve(conn, &api, Duration::from_secs(600), stop.as_mut()).await;
        assert!(matches!(served, Served::Ended));
        assert!(started.elapsed() < Duration::from_secs(600));
    }

    #[tokio::test]
    async fn streamed_bodies_go_out_in_chunks_and_whole_ones_with_their_length() {
        let events = futures::stream::iter(["data: 1\n\n", "", "data: 2\n\n"])
            .map(|e| Ok::<_, std::convert::Infallible>(Bytes::from(e)));
        let streamed = Response::builder()
            .header("content-type", "text/event-stream")
            .header("content-length", "99")
            .body(Body::from_stream(events))
            .unwrap();
        let mut wire = Vec::new();
        write(&mut wire, streamed, false).await.unwrap();
        let text = String::from_utf8(wire.clone()).unwrap();
        assert!(text.starts_with("HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ndate: "));
        assert!(text.contains("\r\ntransfer-encoding: chunked\r\n\r\n9\r\ndata: 1\n\n\r\n"));
        assert!(
            !text.contains("99"),
            "the handler's length is not the stream's"
        );
        let mut buf = BytesMut::from(&wire[..]);
        let (status, keep_alive, body) = answer(&mut &wire[..0], &mut buf).await;
        assert_eq!(
            (status, keep_alive, &body[..]),
            (200, true, &b"data: 1\n\ndata: 2\n\n"[..])
        );

        let whole = Response::builder()
            .status(429)
            .body(Body::from("{}"))
            .unwrap();
        let mut wire = Vec::new();
        write(&mut wire, whole, true).await.unwrap();
        let text = String::from_utf8(wire).unwrap();
        assert!(
            text.starts_with("HTTP/1.1 429 Too Many Requests\r\ndate: "),
            "{text}"
        );
        assert!(
            text.ends_with("GMT\r\nconnection: close\r\ncontent-length: 2\r\n\r\n{}"),
            "{text}"
        );
    }
}
