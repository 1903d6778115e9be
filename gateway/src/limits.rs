//! The server's bounds, each configurable under `server.limits` with a safe
//! default and enforced before the work is done: body sizes per route family,
//! the size a compressed body may inflate to, gRPC message size, the header
//! read timeout, connection and stream caps, and the blocking pool's size.
use axum::body::{Body, Bytes};
use axum::http::{header, HeaderMap};
use bytes::BytesMut;
use http_body_util::BodyExt;
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::io::Read;

const MIB: usize = 1 << 20;
/// Each front is an OS thread with a runtime and, per OpenAI upstream, a
/// connection pool of its own.
const MAX_HTTP_THREADS: usize = 1024;

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// JSON bodies: the OpenAI API, `generate`, the registry, feedback,
    /// repository control.
    pub max_body_bytes: usize,
    /// KServe `infer` over HTTP (JSON or binary tensors).
    pub max_tensor_body_bytes: usize,
    /// What a gzip or deflate body may inflate to.
    pub max_decompressed_bytes: usize,
    /// One gRPC message, either way.
    pub grpc_max_message_bytes: usize,
    /// From when an HTTP/1 connection starts waiting for a request (at open,
    /// or after the previous response) until the request's head is read; a
    /// kept-alive connection that sends nothing within it is closed too.
    pub header_read_timeout_secs: u64,
    /// Open connections per listener (HTTP, gRPC); further ones wait in the
    /// kernel's backlog until one closes.
    pub max_connections: usize,
    /// Concurrent HTTP/2 streams per connection (HTTP and gRPC).
    pub max_concurrent_streams: u32,
    /// Threads that decode, decompress, render templates and tokenize large
    /// requests, off the async workers.
    pub blocking_threads: usize,
    /// Bodies from this size on are decoded on the blocking threads.
    pub offload_bytes: usize,
    /// Threads serving the HTTP port, each an event loop of its own over the
    /// one listening socket (as nginx's workers are): a connection's
    /// requests are read, dispatched and answered on the thread that
    /// accepted it.
    pub http_threads: usize,
    /// Hands each accepted connection to the front with the fewest open
    /// ones (as Envoy's `exact_balance`), instead of leaving it on the
    /// front that happened to accept it: for a few long-lived clients (a
    /// load balancer's kept-alive pool) on cores of the server's own.
    pub balance_connections: bool,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_body_bytes: 16 * MIB,
            max_tensor_body_bytes: 64 * MIB,
            max_decompressed_bytes: 64 * MIB,
            grpc_max_message_bytes: 64 * MIB,
            header_read_timeout_secs: 30,
            max_connections: 1024,
            max_concurrent_streams: 128,
            blocking_threads: std::thread::available_parallelism().map_or(2, |n| n.get().max(2)),
            offload_bytes: 64 * 1024,
            http_threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            balance_connections: false,
        }
    }
}

impl Limits {
    /// Every bound must be at least 1; an inflated body may not be smaller
    /// than the body it came from.
    pub fn validate(&self, at: &str) -> Result<(), String> {
        for (k, v) in [
            ("max_body_bytes", self.max_body_bytes),
            ("max_tensor_body_bytes", self.max_tensor_body_bytes),
            ("max_decompressed_bytes", self.max_decompressed_bytes),
            ("grpc_max_message_bytes", self.grpc_max_message_bytes),
            (
                "header_read_timeout_secs",
                self.header_read_timeout_secs as usize,
            ),
            ("max_connections", self.max_connections),
            (
                "max_concurrent_streams",
                self.max_concurrent_streams as usize,
            ),
            ("blocking_threads", self.blocking_threads),
            ("http_threads", self.http_threads),
        ] {
            if v == 0 {
                return Err(format!("{at}.{k}: must be at least 1"));
            }
        }
        if self.http_threads > MAX_HTTP_THREADS {
            return Err(format!(
                "{at}.http_threads: at most {MAX_HTTP_THREADS} (one front per core is the default)"
            ));
        }
        if self.grpc_max_message_bytes > i32::MAX as usize {
            return Err(format!(
                "{at}.grpc_max_message_bytes: at most {} (gRPC's own bound)",
                i32::MAX
            ));
        }
        Ok(())
    }
}

/// Why a body could not be read.
#[derive(Debug, Clone, PartialEq)]
pub enum BodyError {
    /// Larger than `limit` bytes (413).
    TooLarge { what: &'static str, limit: usize },
    /// Malformed: a broken connection, a body that does not inflate (400).
    Invalid(String),
    /// A `Content-Encoding` we do not take (415).
    Unsupported(String),
}

impl BodyError {
    /// 413 for too large, 415 for an encoding we do not take, else 400.
    pub fn http_status(&self) -> axum::http::StatusCode {
        use axum::http::StatusCode;
        match self {
            BodyError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            BodyError::Invalid(_) => StatusCode::BAD_REQUEST,
            BodyError::Unsupported(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
        }
    }

    pub fn message(&self) -> String {
        match self {
            BodyError::TooLarge { what, limit } => format!(
                "the {what} is larger than {limit} bytes (server.limits); send less per request"
            ),
            BodyError::Invalid(m) | BodyError::Unsupported(m) => m.clone(),
        }
    }
}

/// Reads a request body of at most `limit` bytes. A `Content-Length` above
/// the limit is refused before anything is read. A body that comes in one
/// piece (most do) is kept as it came, without a copy.
pub async fn read_body(headers: &HeaderMap, body: Body, limit: usize) -> Result<Bytes, BodyError> {
    let too_large = BodyError::TooLarge {
        what: "request body",
        limit,
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large);
    }
    collect(body, limit)
        .await
        .map_err(|e| BodyError::Invalid(format!("reading the request body: {e}")))?
        .ok_or(too_large)
}

/// Reads `body` whole, up to `limit` bytes; `None` once more than that has
/// arrived. A body that comes in one piece (most do) is kept as it came,
/// without a copy.
pub async fn collect<B>(mut body: B, limit: usize) -> Result<Option<Bytes>, B::Error>
where
    B: hyper::body::Body<Data = Bytes> + Unpin,
{
    let (mut first, mut joined, mut read) = (Bytes::new(), None::<BytesMut>, 0);
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame?.into_data() else {
            continue;
        };
        read += data.len();
        if read > limit {
            return Ok(None);
        }
        if first.is_empty() {
            first = data;
        } else {
            joined
                .get_or_insert_with(|| BytesMut::from(&first[..]))
                .extend_from_slice(&data);
        }
    }
    Ok(Some(joined.map_or(first, BytesMut::freeze)))
}

/// `Content-Encoding` of a request, lower-cased; `identity` when absent.
pub fn content_encoding(headers: &HeaderMap) -> Cow<'static, str> {
    match headers
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
    {
        Some(e) => Cow::Owned(e.trim().to_ascii_lowercase()),
        None => Cow::Borrowed("identity"),
    }
}

/// Inflates a gzip or deflate body, streaming, stopping as soon as the output
/// passes `limit` bytes. `identity` is returned as is.
pub fn inflate(encoding: &str, body: Bytes, limit: usize) -> Result<Bytes, BodyError> {
    let mut out = Vec::new();
    let cap = limit as u64 + 1;
    let read = match encoding {
        "identity" | "" => return Ok(body),
        "gzip" => flate2::read::GzDecoder::new(&body[..])
            .take(cap)
            .read_to_end(&mut out),
        "deflate" => flate2::read::ZlibDecoder::new(&body[..])
            .take(cap)
            .read_to_end(&mut out),
        other => {
            return Err(BodyError::Unsupported(format!(
                "Content-Encoding '{other}' is not supported (gzip, deflate)"
            )))
        }
    };
    read.map_err(|e| BodyError::Invalid(format!("the {encoding} body does not decompress: {e}")))?;
    if out.len() > limit {
        return Err(BodyError::TooLarge {
            what: "decompressed request body",
            limit,
        });
    }
    Ok(Bytes::from(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn gzip(data: &[u8]) -> Bytes {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        enc.write_all(data).unwrap();
        Bytes::from(enc.finish().unwrap())
    }

    #[test]
    fn a_bomb_stops_at_the_cap() {
        // 64 MiB of zeros compress to ~64 KiB; the cap is 1 MiB.
        let bomb = gzip(&vec![0u8; 64 << 20]);
        assert!(bomb.len() < 100_000);
        let e = inflate("gzip", bomb, 1 << 20).unwrap_err();
        assert_eq!(
            e,
            BodyError::TooLarge {
                what: "decompressed request body",
                limit: 1 << 20
            }
        );
        let ok = inflate("gzip", gzip(b"{\"a\": 1}"), 8).unwrap();
        assert_eq!(&ok[..], b"{\"a\": 1}");
        let e = inflate("gzip", gzip(b"{\"a\": 1}"), 7).unwrap_err();
        assert!(matches!(e, BodyError::TooLarge { .. }));
        assert!(matches!(
            inflate("br", Bytes::new(), 1),
            Err(BodyError::Unsupported(_))
        ));
        assert!(matches!(
            inflate("gzip", Bytes::from_static(b"not gzip"), 10),
            Err(BodyError::Invalid(_))
        ));
    }

    #[tokio::test]
    async fn bodies_over_the_limit_are_refused_declared_or_not() {
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_LENGTH, "11".parse().unwrap());
        let e = read_body(&h, Body::from("hello world"), 10)
            .await
            .unwrap_err();
        assert!(matches!(e, BodyError::TooLarge { limit: 10, .. }));
        // No Content-Length (chunked): refused once more than the limit arrived.
        let e = read_body(&HeaderMap::new(), Body::from("hello world"), 10)
            .await
            .unwrap_err();
        assert!(matches!(e, BodyError::TooLarge { limit: 10, .. }), "{e:?}");
        let b = read_body(&HeaderMap::new(), Body::from("hello"), 10)
            .await
            .unwrap();
        assert_eq!(&b[..], b"hello");
    }

    /// A body that arrives in pieces.
    fn pieces(parts: &[&'static str]) -> Body {
        let parts = parts
            .iter()
            .map(|p| Ok::<_, std::io::Error>(Bytes::from_static(p.as_bytes())));
        Body::from_stream(futures::stream::iter(parts.collect::<Vec<_>>()))
    }

    #[tokio::test]
    async fn a_body_in_pieces_is_joined_and_bounded_across_them() {
        let b = read_body(&HeaderMap::new(), pieces(&["he", "", "llo", " world"]), 11)
            .await
            .unwrap();
        assert_eq!(&b[..], b"hello world");
        let e = read_body(&HeaderMap::new(), pieces(&["hello", " world"]), 10)
            .await
            .unwrap_err();
        assert!(matches!(e, BodyError::TooLarge { limit: 10, .. }), "{e:?}");
    }

    #[test]
    fn zero_bounds_name_themselves() {
        let l = Limits {
            max_connections: 0,
            ..Limits::default()
        };
        let e = l.validate("server.limits").unwrap_err();
        assert_eq!(e, "server.limits.max_connections: must be at least 1");
        assert!(Limits::default().validate("server.limits").is_ok());
        let many = Limits {
            http_threads: 100_000,
            ..Limits::default()
        };
        let e = many.validate("server.limits").unwrap_err();
        assert!(
            e.starts_with("server.limits.http_threads: at most 1024"),
            "{e}"
        );
    }
}
