//! The client half of HTTP/1.1 (RFC 9112) that `openai` upstreams are
//! spoken with: a request's head written in one piece, an answer's head
//! parsed by `httparse`, and its body framed by `Content-Length`, chunked
//! coding or the connection's end. It is what the proxy needs and no more:
//! no pipelining, no upgrades, and only `GET` and `POST`, whose answers
//! always may have a body. A redirect is an answer like any other: it goes
//! back to the client, as from any proxy.
use axum::body::Bytes;
use axum::http::{HeaderValue, Method, StatusCode};
use bytes::{Buf, BytesMut};
use std::mem::MaybeUninit;

/// An answer's head may be this long; a longer one is refused.
pub const MAX_HEAD: usize = 64 * 1024;

/// At most this many header fields in an answer's head.
const MAX_FIELDS: usize = 100;

/// A chunk's size line, or the trailer section, may be this long.
const MAX_LINE: usize = 16 * 1024;

/// A request's head and body, in the one buffer they are written from.
pub fn request(method: &Method, target: &str, host: &str, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(96 + target.len() + host.len() + body.len());
    let method = method.as_str().as_bytes();
    for part in [method, b" ", target.as_bytes(), b" HTTP/1.1\r\nhost: "] {
        out.extend_from_slice(part);
    }
    out.extend_from_slice(host.as_bytes());
    if !body.is_empty() || method != b"GET" {
        out.extend_from_slice(b"\r\ncontent-type: application/json\r\ncontent-length: ");
        out.extend_from_slice(itoa::Buffer::new().format(body.len()).as_bytes());
    }
    out.extend_from_slice(b"\r\n\r\n");
    out.extend_from_slice(body);
    out
}

/// How an answer's body ends (RFC 9112, section 6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// After this many bytes.
    Length(u64),
    /// With its last, empty chunk.
    Chunked,
    /// When the replica closes the connection.
    UntilClose,
}

/// What the proxy needs of an answer's head.
#[derive(Debug)]
pub struct Head {
    pub status: StatusCode,
    pub content_type: Option<HeaderValue>,
    pub framing: Framing,
    /// Whether the connection may carry another request after this answer.
    pub keep_alive: bool,
}

/// Reads the answer's head at the start of `buf`: the head and its length
/// once it is whole, `None` while more is to come.
pub fn parse_head(buf: &[u8]) -> Result<Option<(Head, usize)>, String> {
    if buf.is_empty() {
        return Ok(None);
    }
    // Left uninitialised: httparse writes the fields it finds, and zeroing
    // a hundred of them was a measurable share of a proxied request.
    let mut fields = [const { MaybeUninit::<httparse::Header>::uninit() }; MAX_FIELDS];
    let mut answer = httparse::Response::new(&mut []);
    let config = httparse::ParserConfig::default();
    let len = match config.parse_response_with_uninit_headers(&mut answer, buf, &mut fields) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD => {
            return Err(format!("the answer's head is longer than {MAX_HEAD} bytes"))
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(format!("the answer's head is not HTTP/1: {e}")),
    };
    let code = answer.code.expect("a whole head has a status");
    let status = StatusCode::from_u16(code).map_err(|_| format!("status {code} is not valid"))?;
    let (mut length, mut content_type) = (None::<u64>, None);
    let (mut coded, mut chunked, mut close, mut keep_alive) = (false, false, false, false);
    for f in answer.headers.iter() {
        let name = f.name;
        if name.eq_ignore_ascii_case("content-length") {
            let n = content_length(f.value)
                .ok_or_else(|| "the answer's content-length is not a number".to_string())?;
            if length.is_some_and(|l| l != n) {
                return Err("the answer has two different content-lengths".into());
            }
            length = Some(n);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            // Chunked coding ends the body only when it is the last coding.
            let last = f.value.rsplit(|&b| b == b',').next().unwrap_or_default();
            chunked = last.trim_ascii().eq_ignore_ascii_case(b"chunked");
            coded = true;
        } else if name.eq_ignore_ascii_case("connection") {
            let (c, k, _) = connection(f.value);
            (close, keep_alive) = (close | c, keep_alive | k);
        } else if name.eq_ignore_ascii_case("content-type") {
            content_type = HeaderValue::from_bytes(f.value).ok();
        }
    }
    let framing = match (code, chunked, length) {
        // Informational, no content and not modified: never a body.
        (100..=199 | 204 | 304, ..) => Framing::Length(0),
        (_, true, _) => Framing::Chunked,
        (_, false, Some(n)) if !coded => Framing::Length(n),
        _ => Framing::UntilClose,
    };
    let head = Head {
        status,
        content_type,
        // HTTP/1.1 keeps a connection unless told to close it; HTTP/1.0
        // only when asked to; a body ended by the close never does.
        keep_alive: !close
            && (answer.version == Some(1) || keep_alive)
            && framing != Framing::UntilClose,
        framing,
    };
    Ok(Some((head, len)))
}

/// A `content-length` field's value: decimal digits and nothing else.
pub fn content_length(value: &[u8]) -> Option<u64> {
    if value.is_empty() {
        return None;
    }
    value.iter().try_fold(0u64, |n, &b| match b {
        b'0'..=b'9' => n.checked_mul(10)?.checked_add(u64::from(b - b'0')),
        _ => None,
    })
}

/// A `connection` field's options: whether it names `close`, whether
/// `keep-alive`, and whether anything else.
pub fn connection(value: &[u8]) -> (bool, bool, bool) {
    let (mut close, mut keep_alive, mut other) = (false, false, false);
    for token in value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
        if token.eq_ignore_ascii_case(b"close") {
            close = true;
        } else if token.eq_ignore_ascii_case(b"keep-alive") {
            keep_alive = true;
        } else if !token.is_empty() {
            other = true;
        }
    }
    (close, keep_alive, other)
}

/// Where a chunked body's decoding stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Before a chunk's size line.
    Size,
    /// Inside a chunk, with this many of its bytes still to come.
    Data(u64),
    /// After a chunk's data, before its CRLF.
    DataEnd,
    /// After the last chunk: trailer fields until an empty line, having
    /// read this many bytes of them.
    Trailer(usize),
    Done,
}

/// What a step of decoding gave.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    Data(Bytes),
    /// Nothing more can be decoded until more arrives.
    More,
    /// The body has ended.
    Done,
}

/// A chunked body's decoder (RFC 9112, section 7.1); extensions and
/// trailer fields are read past.
#[derive(Debug)]
pub struct Chunked(State);

impl Default for Chunked {
    fn default() -> Self {
        Self(State::Size)
    }
}

impl Chunked {
    /// Decodes what it can from the start of `buf`, taking it from there.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Decoded, String> {
        loop {
            match self.0 {
                State::Size => {
                    let Some(line) = line(buf, MAX_LINE, "a chunk's size line")? else {
                        return Ok(Decoded::More);
                    };
                    let size = chunk_size(&line)?;
                    self.0 = if size == 0 {
                        State::Trailer(0)
                    } else {
                        State::Data(size)
                    };
                }
                State::Data(left) => {
                    if buf.is_empty() {
                        return Ok(Decoded::More);
                    }
                    let take = left.min(buf.len() as u64);
                    self.0 = match left - take {
                        0 => State::DataEnd,
                        left => State::Data(left),
                    };
                    return Ok(Decoded::Data(buf.split_to(take as usize).freeze()));
                }
                State::DataEnd => match buf.first() {
                    None => return Ok(Decoded::More),
                    Some(b'\n') => {
                        buf.advance(1);
                        self.0 = State::Size;
                    }
                    Some(b'\r') if buf.len() < 2 => return Ok(Decoded::More),
                    Some(b'\r') if buf[1] == b'\n' => {
                        buf.advance(2);
                        self.0 = State::Size;
                    }
                    Some(_) => return Err("a chunk runs past its size".into()),
                },
                State::Trailer(read) => {
                    let left = MAX_LINE.saturating_sub(read);
                    let Some(line) = line(buf, left, "the trailer section")? else {
                        return Ok(Decoded::More);
                    };
                    self.0 = if line.is_empty() {
                        State::Done
                    } else {
                        State::Trailer(read + line.len() + 2)
                    };
                }
                State::Done => return Ok(Decoded::Done),
            }
        }
    }

    /// Whether the last chunk and the trailer section have been read.
    pub fn is_done(&self) -> bool {
        self.0 == State::Done
    }
}

/// The line at the start of `buf` without its line end, taken from there;
/// `None` while its end has not arrived, an error once it is longer than
/// `max`.
fn line(buf: &mut BytesMut, max: usize, what: &str) -> Result<Option<BytesMut>, String> {
    match buf.iter().take(max + 1).position(|&b| b == b'\n') {
        Some(end) => {
            let mut line = buf.split_to(end + 1);
            line.truncate(end);
            if line.last() == Some(&b'\r') {
                line.truncate(end - 1);
            }
            Ok(Some(line))
        }
        None if buf.len() > max => Err(format!("{what} is longer than {MAX_LINE} bytes")),
        None => Ok(None),
    }
}

/// A chunk's size: hex digits, then optional whitespace and extensions.
fn chunk_size(line: &[u8]) -> Result<u64, String> {
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    let rest = line[digits..].trim_ascii_start();
    if digits == 0 || digits > 15 || !(rest.is_empty() || rest[0] == b';') {
        let shown = String::from_utf8_lossy(&line[..line.len().min(32)]).into_owned();
        return Err(format!("`{shown}` is not a chunk size"));
    }
    let hex = std::str::from_utf8(&line[..digits]).expect("ASCII digits");
    Ok(u64::from_str_radix(hex, 16).expect("at most 15 hex digits"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn head(text: &str) -> Head {
        let (head, len) = parse_head(text.as_bytes()).unwrap().expect("a whole head");
        assert_eq!(len, text.len());
        head
    }

    #[test]
    fn a_request_is_one_head_then_its_body() {
        let post = request(&Method::POST, "/v1/completions", "node:8000", b"{}");
        assert_eq!(
            post,
            b"POST /v1/completions HTTP/1.1\r\nhost: node:8000\r\ncontent-type: \
              application/json\r\ncontent-length: 2\r\n\r\n{}"
        );
        let get = request(&Method::GET, "/health", "node", b"");
        assert_eq!(get, b"GET /health HTTP/1.1\r\nhost: node\r\n\r\n");
    }

    #[test]
    fn heads_are_framed_as_rfc_9112_says() {
        let h =
            head("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 12\r\n\r\n");
        assert_eq!(h.status, 200);
        assert_eq!(h.content_type.unwrap(), "application/json");
        assert_eq!(h.framing, Framing::Length(12));
        assert!(h.keep_alive);

        let h = head(
            "HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\ncontent-length: 5\r\n\r\n",
        );
        assert_eq!(h.framing, Framing::Chunked, "chunked wins over a length");
        let h = head("HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\n");
        assert_eq!((h.framing, h.keep_alive), (Framing::UntilClose, false));
        let h = head("HTTP/1.1 200 OK\r\n\r\n");
        assert_eq!((h.framing, h.keep_alive), (Framing::UntilClose, false));
        let h = head("HTTP/1.1 204 No Content\r\ncontent-length: 9\r\n\r\n");
        assert_eq!(h.framing, Framing::Length(0));
        let h = head("HTTP/1.1 100 Continue\r\n\r\n");
        assert_eq!((h.status.as_u16(), h.framing), (100, Framing::Length(0)));

        let h = head("HTTP/1.1 503 Busy\r\nconnection: close\r\ncontent-length: 0\r\n\r\n");
        assert!(!h.keep_alive);
        let h = head("HTTP/1.0 200 OK\r\ncontent-length: 0\r\n\r\n");
        assert!(!h.keep_alive, "HTTP/1.0 closes unless asked not to");
        let h = head("HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\ncontent-length: 0\r\n\r\n");
        assert!(h.keep_alive);
    }

    #[test]
    fn a_partial_head_waits_and_a_broken_one_is_refused_by_what_is_wrong() {
        assert!(parse_head(b"HTTP/1.1 200 OK\r\ncontent-le")
            .unwrap()
            .is_none());
        let err = |t: &str| parse_head(t.as_bytes()).unwrap_err();
        assert!(err("HTTP/1.1 200 OK\r\ncontent-length: 1x\r\n\r\n").contains("content-length"));
        assert!(err("HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n").contains("content-length"));
        assert!(
            err("HTTP/1.1 200 OK\r\ncontent-length: 18446744073709551616\r\n\r\n")
                .contains("content-length")
        );
        assert_eq!(content_length(b"18446744073709551615"), Some(u64::MAX));
        assert_eq!(content_length(b"007"), Some(7));
        assert_eq!(content_length(b""), None);
        let two = "HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n";
        assert!(err(two).contains("two different"));
        assert!(err("SMTP ready\r\n\r\n").contains("not HTTP/1"));
        let long = format!("HTTP/1.1 200 OK\r\nx: {}", "a".repeat(MAX_HEAD));
        assert!(parse_head(long.as_bytes())
            .unwrap_err()
            .contains("longer than"));
    }

    /// Decodes all of `input`, fed in pieces at `cuts`.
    fn decode_in_pieces(input: &[u8], cuts: &[usize]) -> Result<(Vec<u8>, bool), String> {
        let mut chunked = Chunked::default();
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        let mut from = 0;
        for to in cuts.iter().copied().chain([input.len()]) {
            buf.extend_from_slice(&input[from..to.max(from)]);
            from = to.max(from);
            loop {
                match chunked.decode(&mut buf)? {
                    Decoded::Data(d) => out.extend_from_slice(&d),
                    Decoded::More => break,
                    Decoded::Done => return Ok((out, buf.is_empty())),
                }
            }
        }
        Ok((out, false))
    }

    #[test]
    fn chunks_with_extensions_and_trailers_decode_to_their_data() {
        let body = b"5;name=value\r\nhello\r\n7 \r\n, world\r\n0\r\nx-trailer: 1\r\n\r\n";
        assert_eq!(
            decode_in_pieces(body, &[]).unwrap(),
            (b"hello, world".to_vec(), true)
        );
        // A bare LF ends lines too, as most servers accept.
        assert_eq!(
            decode_in_pieces(b"2\nhi\n0\n\n", &[]).unwrap(),
            (b"hi".to_vec(), true)
        );
        // Not yet ended.
        assert_eq!(
            decode_in_pieces(b"2\r\nhi\r\n", &[]).unwrap(),
            (b"hi".to_vec(), false)
        );
    }

    #[test]
    fn broken_chunks_are_refused_by_what_is_wrong() {
        let err = |b: &[u8]| decode_in_pieces(b, &[]).unwrap_err();
        assert!(err(b"zz\r\n").contains("not a chunk size"));
        assert!(err(b"\r\n").contains("not a chunk size"));
        assert!(err(b"1234567890abcdef0\r\n").contains("not a chunk size"));
        assert!(err(b"2\r\nhiX\r\n").contains("runs past its size"));
        assert!(err(&[b'1'; MAX_LINE + 2]).contains("size line is longer"));
        let mut trailers = b"0\r\n".to_vec();
        trailers.extend(std::iter::repeat_n(b"x: y\r\n".as_slice(), MAX_LINE / 6 + 1).flatten());
        assert!(err(&trailers).contains("trailer section is longer"));
    }

    proptest! {
        /// However the bytes arrive, the decoded body is the data sent.
        #[test]
        fn chunked_decoding_does_not_depend_on_how_bytes_arrive(
            chunks in prop::collection::vec(prop::collection::vec(any::<u8>(), 1..40), 0..8),
            mut cuts in prop::collection::vec(0usize..400, 0..12),
        ) {
            let mut wire = Vec::new();
            for c in &chunks {
                wire.extend_from_slice(format!("{:x}\r\n", c.len()).as_bytes());
                wire.extend_from_slice(c);
                wire.extend_from_slice(b"\r\n");
            }
            wire.extend_from_slice(b"0\r\n\r\n");
            cuts.sort_unstable();
            let cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(wire.len())).collect();
            let (data, whole) = decode_in_pieces(&wire, &cuts).unwrap();
            prop_assert_eq!(data, chunks.concat());
            prop_assert!(whole);
        }
    }
}
