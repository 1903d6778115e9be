//! The top-level `model` and `stream` of a request body read in one pass
//! over its bytes, for the route to a remote upstream: the proxy needs those
//! two fields alone, and serde_json spent most of a short chat's parse
//! checking and skipping the strings of fields it then ignored: about 2,300
//! of a proxied request's 29,500 user-space instructions, against 1,150 for
//! this pass (`benches/proxy_instructions.sh`).
//!
//! The pass checks the whole body against JSON's grammar, so it accepts only
//! what serde_json accepts. It answers only for the plain case: anything else
//! (an escape or a byte outside printable ASCII in any string, a repeated
//! `model` or `stream`, nesting deeper than [`MAX_DEPTH`], or a body that is
//! not JSON at all) is parsed by serde_json, with the same fields as before.

use std::borrow::Cow;

/// Deeper nesting is left to serde_json (whose own limit is 128).
/// At most 31: a bit of a `u32` marks each level an object or an array.
const MAX_DEPTH: usize = 32;

/// The fields a proxied request is read for, where serde_json reads them.
#[derive(serde::Deserialize)]
struct Fields<'a> {
    #[serde(borrow)]
    model: Cow<'a, str>,
    #[serde(default)]
    stream: bool,
}

/// `(model, stream)` of a body: from the one pass where it answers, else
/// from serde_json; `None` where serde_json refuses the body.
pub fn model_and_stream(body: &[u8]) -> Option<(Cow<'_, str>, bool)> {
    if let Some((model, stream)) = plain(body) {
        return Some((Cow::Borrowed(model), stream));
    }
    let f: Fields = serde_json::from_slice(body).ok()?;
    Some((f.model, f.stream))
}

/// `(model, stream)` of a JSON object whose `model` is a string and whose
/// `stream`, if present, is a boolean; `None` where serde_json must decide.
fn plain(body: &[u8]) -> Option<(&str, bool)> {
    let mut s = Scan { b: body, i: 0 };
    let (mut model, mut stream) = (None, None);
    s.ws();
    s.eat(b'{')?;
    s.ws();
    if s.peek()? == b'}' {
        return None;
    }
    loop {
        match s.key()? {
            b"model" if model.is_none() => model = Some(s.string()?),
            b"stream" if stream.is_none() => stream = Some(s.boolean()?),
            b"model" | b"stream" => return None,
            _ => s.skip_value()?,
        }
        s.ws();
        match s.peek()? {
            b',' => s.i += 1,
            b'}' => break,
            _ => return None,
        }
        s.ws();
    }
    s.i += 1;
    s.ws();
    if s.i != body.len() {
        return None;
    }
    // Printable ASCII, checked by `string`: this cannot fail.
    let model = std::str::from_utf8(model?).ok()?;
    Some((model, stream.unwrap_or(false)))
}

/// The bytes a string holds as they are: printable ASCII but `"` and `\\`.
static PLAIN: [bool; 256] = {
    let mut t = [false; 256];
    let mut c = 0x20;
    while c < 0x80 {
        t[c] = c != b'"' as usize && c != b'\\' as usize;
        c += 1;
    }
    t
};

struct Scan<'a> {
    b: &'a [u8],
    i: usize,
}

impl<'a> Scan<'a> {
    #[inline]
    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    #[inline]
    fn eat(&mut self, c: u8) -> Option<()> {
        if self.peek()? != c {
            return None;
        }
        self.i += 1;
        Some(())
    }

    #[inline]
    fn ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.peek() {
            self.i += 1;
        }
    }

    #[inline]
    fn word(&mut self, w: &[u8]) -> Option<()> {
        let end = self.i + w.len();
        if self.b.get(self.i..end)? != w {
            return None;
        }
        self.i = end;
        Some(())
    }

    fn boolean(&mut self) -> Option<bool> {
        if self.peek()? == b't' {
            self.word(b"true").map(|_| true)
        } else {
            self.word(b"false").map(|_| false)
        }
    }

    /// The bytes of a string of printable ASCII without escapes.
    #[inline]
    fn string(&mut self) -> Option<&'a [u8]> {
        self.eat(b'"')?;
        let (b, start) = (self.b, self.i);
        let mut end = start;
        while end < b.len() && PLAIN[b[end] as usize] {
            end += 1;
        }
        if *b.get(end)? != b'"' {
            return None;
        }
        self.i = end + 1;
        Some(&b[start..end])
    }

    fn digits(&mut self) -> Option<()> {
        let start = self.i;
        while let Some(b'0'..=b'9') = self.peek() {
            self.i += 1;
        }
        (self.i > start).then_some(())
    }

    /// `-? (0 | [1-9][0-9]*) (. [0-9]+)? ([eE] [+-]? [0-9]+)?`
    fn number(&mut self) -> Option<()> {
        if self.peek()? == b'-' {
            self.i += 1;
        }
        match self.peek()? {
            b'0' => self.i += 1,
            b'1'..=b'9' => self.digits()?,
            _ => return None,
        }
        if self.peek() == Some(b'.') {
            self.i += 1;
            self.digits()?;
        }
        if let Some(b'e' | b'E') = self.peek() {
            self.i += 1;
            if let Some(b'+' | b'-') = self.peek() {
                self.i += 1;
            }
            self.digits()?;
        }
        Some(())
    }

    /// One value of any kind, nested ones included, without recursion: bit
    /// `d` of `objects` tells whether the container at depth `d` is an
    /// object (whose next item starts with a key) or an array.
    fn skip_value(&mut self) -> Option<()> {
        let (mut objects, mut depth) = (0u32, 0usize);
        loop {
            // A value starts here.
            match self.peek()? {
                open @ (b'{' | b'[') => {
                    self.i += 1;
                    self.ws();
                    let object = open == b'{';
                    if self.peek()? == if object { b'}' } else { b']' } {
                        self.i += 1;
                    } else {
                        depth += 1;
                        if depth >= MAX_DEPTH {
                            return None;
                        }
                        objects = (objects & !(1 << depth)) | ((object as u32) << depth);
                        if object {
                            self.key()?;
                        }
                        continue;
                    }
                }
                b'"' => {
                    self.string()?;
                }
                b't' => self.word(b"true")?,
                b'f' => self.word(b"false")?,
                b'n' => self.word(b"null")?,
                _ => self.number()?,
            }
            // A value ended: close what it ends, or go on to the next item.
            loop {
                if depth == 0 {
                    return Some(());
                }
                self.ws();
                let object = objects >> depth & 1 == 1;
                match self.peek()? {
                    b',' => {
                        self.i += 1;
                        self.ws();
                        if object {
                            self.key()?;
                        }
                        break;
                    }
                    b'}' if object => self.i += 1,
                    b']' if !object => self.i += 1,
                    _ => return None,
                }
                depth -= 1;
            }
        }
    }

    /// `"key" :` and the spaces before the value: the key's bytes.
    fn key(&mut self) -> Option<&'a [u8]> {
        let key = self.string()?;
        self.ws();
        self.eat(b':')?;
        self.ws();
        Some(key)
    }
}

#[cfg(test)]
mod tests {
    use super::{plain, Fields};
    use proptest::prelude::*;
    use serde_json::{json, Value};

    /// What serde_json reads of the fields the proxy needs.
    fn serde(body: &[u8]) -> Option<(String, bool)> {
        let f: Fields = serde_json::from_slice(body).ok()?;
        Some((f.model.into_owned(), f.stream))
    }

    fn scanned(body: &[u8]) -> Option<(String, bool)> {
        plain(body).map(|(m, s)| (m.to_string(), s))
    }

    #[test]
    fn plain_requests_are_read_without_serde() {
        let cases: [(&[u8], (&str, bool)); 4] = [
            (
                br#"{"model":"fast","messages":[{"role":"user","content":"hi"}],"max_tokens":1}"#,
                ("fast", false),
            ),
            (
                b" {\n \"stream\" : true ,\"model\":\"m-1\", \"n\": -0.5e+3, \"x\": [null, false, {}, []]}\r\n",
                ("m-1", true),
            ),
            (br#"{"model":"","stream":false}"#, ("", false)),
            (br#"{"a":{"model":"inner"},"model":"outer"}"#, ("outer", false)),
        ];
        for (body, (model, stream)) in cases {
            assert_eq!(plain(body), Some((model, stream)));
            assert_eq!(serde(body), Some((model.to_string(), stream)));
        }
    }

    #[test]
    fn what_serde_must_decide_is_left_to_it() {
        for body in [
            &br#"{"model":"fast","model":"slow"}"#[..],
            br#"{"model":"fast","stream":true,"stream":false}"#,
            br#"{"model":"f\u0061st"}"#,
            "{\"model\":\"caf\u{e9}\"}".as_bytes(),
            br#"{"model":"fast","stream":null}"#,
            br#"{"model":7}"#,
            br#"{"stream":true}"#,
            br#"{"model":"fast",}"#,
            br#"{"model":"fast"} x"#,
            br#"{"model":"fast","n":01}"#,
            br#"{"model":"fast","n":1.}"#,
            br#"{"model":"fast","n":-}"#,
            br#"{"model":"fast","n":[1,]}"#,
            br#"{"model":"fast","n":tru}"#,
            br#"["model","fast"]"#,
            br#"{"model":"fast""#,
            b"{\"model\":\"fa\tst\"}",
            b"",
        ] {
            assert_eq!(plain(body), None, "{}", String::from_utf8_lossy(body));
        }
        let deep = format!(
            r#"{{"model":"m","x":{}{}}}"#,
            "[".repeat(40),
            "]".repeat(40)
        );
        assert_eq!(plain(deep.as_bytes()), None);
        assert_eq!(serde(deep.as_bytes()), Some(("m".into(), false)));
    }

    fn value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            (-1e6f64..1e6).prop_map(Value::from),
            "[ -~é\\\\\"\n]{0,8}".prop_map(Value::from),
        ];
        leaf.prop_recursive(4, 24, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
                prop::collection::btree_map("[a-z]{1,6}", inner, 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    /// A request-like object: maybe a `model`, maybe a `stream`, other fields.
    fn body() -> impl Strategy<Value = Vec<u8>> {
        (
            prop::option::of(prop_oneof![
                "[a-zA-Z0-9._/-]{0,12}".prop_map(Value::from),
                value()
            ]),
            prop::option::of(prop_oneof![any::<bool>().prop_map(Value::from), value()]),
            prop::collection::btree_map("[a-z]{1,8}", value(), 0..4),
            any::<bool>(),
        )
            .prop_map(|(model, stream, rest, pretty)| {
                let mut v = json!({});
                for (k, x) in rest {
                    v[k] = x;
                }
                if let Some(m) = model {
                    v["model"] = m;
                }
                if let Some(s) = stream {
                    v["stream"] = s;
                }
                if pretty {
                    serde_json::to_vec_pretty(&v).expect("a value serializes")
                } else {
                    serde_json::to_vec(&v).expect("a value serializes")
                }
            })
    }

    /// A byte to write into a body: any, or one that JSON's grammar names.
    fn edit_byte() -> impl Strategy<Value = u8> {
        prop_oneof![
            any::<u8>(),
            prop::sample::select(b"{}[]\",:\\ \t0123456789-+.eEtrufalsn".to_vec())
        ]
    }

    proptest! {
        /// Wherever the pass answers, serde_json answers the same; and for a
        /// valid body it answers unless a string holds an escape or a byte
        /// outside printable ASCII.
        #[test]
        fn agrees_with_serde(body in body()) {
            let plain = body
                .iter()
                .all(|&b| (0x20..0x80).contains(&b) && b != b'\\' || b == b'\n');
            match scanned(&body) {
                Some(read) => prop_assert_eq!(Some(read), serde(&body)),
                None => prop_assert!(!plain || serde(&body).is_none()),
            }
        }

        /// Bodies broken anywhere: the pass answers only as serde_json does.
        #[test]
        fn broken_bodies_are_never_misread(
            body in body(),
            edits in prop::collection::vec((any::<prop::sample::Index>(), edit_byte(), 0..3u8), 1..4),
        ) {
            let mut body = body;
            for (at, byte, how) in edits {
                if body.is_empty() {
                    break;
                }
                let i = at.index(body.len());
                match how {
                    0 => body[i] = byte,
                    1 => { body.remove(i); }
                    _ => body.insert(i, byte),
                }
            }
            if let Some(read) = scanned(&body) {
                prop_assert_eq!(Some(read), serde(&body));
            }
        }
    }
}
