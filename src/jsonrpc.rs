//! JSON-RPC 2.0 (jsonrpc.org/specification) over a byte stream, both ends: what the control
//! socket serves and `vubd ctl` sends. Messages are JSON texts one after another, as SPDK's
//! `rpc.py` writes them: a newline between them is allowed, none is needed. A leaf module.
//!
//! - [`Decoder`] cuts a stream into JSON values, however it arrives (a value split across
//!   reads, several in one read), and refuses one larger than it allows.
//! - [`respond`] turns one received value (a request, a notification or a batch) into the
//!   answer to write back, calling a method table for each call.
//! - [`Client`] sends calls and waits for their answers.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};

/// Invalid JSON was received.
pub const PARSE_ERROR: i64 = -32700;
/// The JSON sent is not a valid request object.
pub const INVALID_REQUEST: i64 = -32600;
/// The method does not exist.
pub const METHOD_NOT_FOUND: i64 = -32601;
/// Invalid method parameters.
pub const INVALID_PARAMS: i64 = -32602;
/// The request was valid and could not be carried out (a busy socket, a missing image, ...).
pub const FAILED: i64 = -32000;

/// Largest JSON text one message may be.
pub const MAX_MESSAGE: usize = 1 << 20;

/// An error object: a code and a message that names what was wrong.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message} (JSON-RPC error {code})")]
pub struct RpcError {
    pub code: i64,
    pub message: String,
}

impl RpcError {
    pub fn new(code: i64, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    pub fn invalid_params(message: impl Into<String>) -> Self {
        Self::new(INVALID_PARAMS, message)
    }

    pub fn failed(message: impl Into<String>) -> Self {
        Self::new(FAILED, message)
    }
}

/// Cuts a byte stream into JSON values.
#[derive(Debug, Default)]
pub struct Decoder {
    buf: Vec<u8>,
}

/// What a [`Decoder`] holds.
#[derive(Debug)]
pub enum Decoded {
    Value(Value),
    /// More bytes are needed.
    Incomplete,
    /// Not JSON, or a text longer than [`MAX_MESSAGE`]: the stream cannot be resynchronized.
    Invalid(String),
}

impl Decoder {
    /// Adds bytes read from the stream.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next whole value, if the bytes so far hold one.
    pub fn decode(&mut self) -> Decoded {
        let start = self
            .buf
            .iter()
            .position(|b| !b.is_ascii_whitespace())
            .unwrap_or(self.buf.len());
        self.buf.drain(..start);
        if self.buf.is_empty() {
            return Decoded::Incomplete;
        }
        let mut values = serde_json::Deserializer::from_slice(&self.buf).into_iter::<Value>();
        match values.next() {
            Some(Ok(v)) => {
                let used = values.byte_offset();
                self.buf.drain(..used);
                Decoded::Value(v)
            }
            Some(Err(e)) if e.is_eof() && self.buf.len() <= MAX_MESSAGE => Decoded::Incomplete,
            Some(Err(e)) if e.is_eof() => {
                Decoded::Invalid(format!("a message longer than {MAX_MESSAGE} bytes"))
            }
            Some(Err(e)) => Decoded::Invalid(e.to_string()),
            None => Decoded::Incomplete,
        }
    }
}

/// The answer to a text that is not JSON (the connection ends after it).
pub fn parse_error(why: &str) -> Value {
    error_response(
        Value::Null,
        &RpcError::new(PARSE_ERROR, format!("parse error: {why}")),
    )
}

/// The answer to `value` (one request, a notification, or a batch of them), calling
/// `call(method, params)` for each; `None` when nothing is to be written back (notifications
/// only). `params` is `Value::Null` when the request has none.
pub fn respond(
    value: Value,
    call: &mut dyn FnMut(&str, Value) -> Result<Value, RpcError>,
) -> Option<Value> {
    match value {
        Value::Array(batch) if batch.is_empty() => Some(error_response(
            Value::Null,
            &RpcError::new(INVALID_REQUEST, "invalid request: an empty batch"),
        )),
        Value::Array(batch) => {
            let answers: Vec<Value> = batch
                .into_iter()
                .filter_map(|v| respond_one(v, call))
                .collect();
            (!answers.is_empty()).then_some(Value::Array(answers))
        }
        v => respond_one(v, call),
    }
}

fn respond_one(
    value: Value,
    call: &mut dyn FnMut(&str, Value) -> Result<Value, RpcError>,
) -> Option<Value> {
    let invalid = |why: &str| RpcError::new(INVALID_REQUEST, format!("invalid request: {why}"));
    let Value::Object(mut req) = value else {
        return Some(error_response(Value::Null, &invalid("not an object")));
    };
    // A request without "id" is a notification: no answer, even to an error.
    let id = req.remove("id");
    let answer = |result: Result<Value, RpcError>| {
        let id = id.clone()?;
        Some(match result {
            Ok(r) => json!({"jsonrpc": "2.0", "id": id, "result": r}),
            Err(e) => error_response(id, &e),
        })
    };
    if let Some(id) = &id
        && !matches!(id, Value::Null | Value::Number(_) | Value::String(_))
    {
        return Some(error_response(
            Value::Null,
            &invalid("\"id\" must be a number, a string or null"),
        ));
    }
    if req.remove("jsonrpc") != Some(Value::String("2.0".into())) {
        return answer(Err(invalid("\"jsonrpc\" must be \"2.0\"")));
    }
    let method = match req.remove("method") {
        Some(Value::String(m)) => m,
        _ => return answer(Err(invalid("\"method\" must be a string"))),
    };
    let params = match req.remove("params") {
        None => Value::Null,
        Some(p @ (Value::Object(_) | Value::Array(_))) => p,
        Some(_) => return answer(Err(invalid("\"params\" must be an object or an array"))),
    };
    if let Some(key) = req.keys().next() {
        return answer(Err(invalid(&format!("unknown member {key:?}"))));
    }
    answer(call(&method, params))
}

fn error_response(id: Value, e: &RpcError) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "error": {"code": e.code, "message": e.message}})
}

/// Why a call from a [`Client`] failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to {path}")]
    Connect {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("connection to the control socket")]
    Io(#[from] io::Error),
    #[error("the server's answer is not JSON-RPC: {0}")]
    BadAnswer(String),
    #[error("{}", .0.message)]
    Rpc(RpcError),
}

/// The calling end of a control socket.
#[derive(Debug)]
pub struct Client {
    stream: UnixStream,
    decoder: Decoder,
    next_id: u64,
}

impl Client {
    /// Connects to the control socket at `path`; each answer must come within `timeout`.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Self, ClientError> {
        let stream = UnixStream::connect(path).map_err(|source| ClientError::Connect {
            path: path.display().to_string(),
            source,
        })?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        Ok(Self {
            stream,
            decoder: Decoder::default(),
            next_id: 1,
        })
    }

    /// Calls `method` with `params` (`Value::Null`: none) and returns its result.
    pub fn call(&mut self, method: &str, params: Value) -> Result<Value, ClientError> {
        let id = self.next_id;
        self.next_id += 1;
        let mut req = json!({"jsonrpc": "2.0", "id": id, "method": method});
        if !params.is_null() {
            req["params"] = params;
        }
        let mut text = req.to_string();
        text.push('\n');
        self.stream.write_all(text.as_bytes())?;
        let answer = self.read_value()?;
        if answer.get("id") != Some(&json!(id)) {
            return Err(ClientError::BadAnswer(answer.to_string()));
        }
        if let Some(e) = answer.get("error") {
            let code = e.get("code").and_then(Value::as_i64);
            let message = e.get("message").and_then(Value::as_str);
            return match (code, message) {
                (Some(code), Some(message)) => Err(ClientError::Rpc(RpcError::new(code, message))),
                _ => Err(ClientError::BadAnswer(answer.to_string())),
            };
        }
        answer
            .get("result")
            .cloned()
            .ok_or_else(|| ClientError::BadAnswer(answer.to_string()))
    }

    fn read_value(&mut self) -> Result<Value, ClientError> {
        let mut chunk = [0u8; 16 * 1024];
        loop {
            match self.decoder.decode() {
                Decoded::Value(v) => return Ok(v),
                Decoded::Invalid(why) => return Err(ClientError::BadAnswer(why)),
                Decoded::Incomplete => {}
            }
            let n = self.stream.read(&mut chunk)?;
            if n == 0 {
                return Err(ClientError::Io(io::ErrorKind::UnexpectedEof.into()));
            }
            self.decoder.push(&chunk[..n]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn echo(method: &str, params: Value) -> Result<Value, RpcError> {
        match method {
            "echo" => Ok(params),
            "fail" => Err(RpcError::failed("it failed")),
            m => Err(RpcError::new(
                METHOD_NOT_FOUND,
                format!("unknown method {m:?}"),
            )),
        }
    }

    fn answer(text: &str) -> Option<Value> {
        let v: Value = serde_json::from_str(text).expect("test JSON");
        respond(v, &mut echo)
    }

    #[test]
    fn calls_are_answered_with_their_id_and_notifications_not_at_all() {
        assert_eq!(
            answer(r#"{"jsonrpc":"2.0","id":7,"method":"echo","params":{"a":1}}"#),
            Some(json!({"jsonrpc":"2.0","id":7,"result":{"a":1}}))
        );
        assert_eq!(
            answer(r#"{"jsonrpc":"2.0","id":"x","method":"fail"}"#),
            Some(json!({"jsonrpc":"2.0","id":"x","error":{"code":FAILED,"message":"it failed"}}))
        );
        assert_eq!(answer(r#"{"jsonrpc":"2.0","method":"fail"}"#), None);
    }

    #[test]
    fn malformed_requests_get_the_error_that_names_what_is_wrong() {
        for (text, code, why) in [
            (r#"[]"#, INVALID_REQUEST, "an empty batch"),
            (r#"5"#, INVALID_REQUEST, "not an object"),
            (
                r#"{"jsonrpc":"1.0","id":1,"method":"echo"}"#,
                INVALID_REQUEST,
                "\"jsonrpc\"",
            ),
            (
                r#"{"jsonrpc":"2.0","id":1,"method":3}"#,
                INVALID_REQUEST,
                "\"method\"",
            ),
            (
                r#"{"jsonrpc":"2.0","id":1,"method":"echo","params":3}"#,
                INVALID_REQUEST,
                "\"params\"",
            ),
            (
                r#"{"jsonrpc":"2.0","id":{},"method":"echo"}"#,
                INVALID_REQUEST,
                "\"id\"",
            ),
            (
                r#"{"jsonrpc":"2.0","id":1,"method":"echo","x":1}"#,
                INVALID_REQUEST,
                "unknown member \"x\"",
            ),
            (
                r#"{"jsonrpc":"2.0","id":1,"method":"nope"}"#,
                METHOD_NOT_FOUND,
                "\"nope\"",
            ),
        ] {
            let a = answer(text).expect("an answer");
            assert_eq!(a["error"]["code"], json!(code), "{text}: {a}");
            let m = a["error"]["message"].as_str().expect("message");
            assert!(m.contains(why), "{text}: {m}");
        }
    }

    #[test]
    fn a_batch_gets_one_answer_per_call() {
        let a = answer(
            r#"[{"jsonrpc":"2.0","id":1,"method":"echo","params":[1]},
                {"jsonrpc":"2.0","method":"echo"},
                {"jsonrpc":"2.0","id":2,"method":"nope"}]"#,
        )
        .expect("answers");
        let ids: Vec<&Value> = a
            .as_array()
            .expect("array")
            .iter()
            .map(|x| &x["id"])
            .collect();
        assert_eq!(ids, [&json!(1), &json!(2)]);
        assert_eq!(
            answer(r#"[{"jsonrpc":"2.0","method":"echo"}]"#),
            None,
            "notifications only"
        );
    }

    #[test]
    fn the_decoder_takes_values_however_the_stream_cuts_them() {
        let text = br#"{"a":1}{"b":[2,3]}
 {"c":"}"}  "#;
        for cut in 1..text.len() {
            let mut d = Decoder::default();
            let mut got = Vec::new();
            for part in [&text[..cut], &text[cut..]] {
                d.push(part);
                while let Decoded::Value(v) = d.decode() {
                    got.push(v);
                }
            }
            assert_eq!(
                got,
                [json!({"a":1}), json!({"b":[2,3]}), json!({"c":"}"})],
                "cut {cut}"
            );
        }
        let mut d = Decoder::default();
        d.push(b"{\"a\": nope}");
        assert!(matches!(d.decode(), Decoded::Invalid(_)));
        let mut d = Decoder::default();
        d.push(b"[");
        d.push(&vec![b' '; MAX_MESSAGE]);
        assert!(matches!(d.decode(), Decoded::Invalid(m) if m.contains("longer")));
    }
}
