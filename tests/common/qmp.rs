//! A QMP (QEMU Machine Protocol) client for the tests that drive a QEMU process: pausing a
//! guest (`stop`, `cont`), migrating it (`migrate`, `query-migrate`), ending it (`quit`).
//! Every read and write is bounded by [`TIMEOUT`].

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::TIMEOUT;

/// One QMP connection, past the greeting and capabilities negotiation.
#[derive(Debug)]
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    /// Connects to the QMP socket `path`, reads QEMU's greeting and enters command mode.
    pub fn connect(path: &Path) -> Result<Self, String> {
        let stream =
            UnixStream::connect(path).map_err(|e| format!("connect {}: {e}", path.display()))?;
        stream
            .set_read_timeout(Some(TIMEOUT))
            .and_then(|()| stream.set_write_timeout(Some(TIMEOUT)))
            .map_err(|e| format!("set QMP timeouts: {e}"))?;
        let reader = BufReader::new(stream.try_clone().map_err(|e| e.to_string())?);
        let mut qmp = Self {
            reader,
            writer: stream,
        };
        let greeting = qmp.read_message()?;
        if greeting.get("QMP").is_none() {
            return Err(format!("not a QMP greeting: {greeting}"));
        }
        qmp.execute("qmp_capabilities", None)?;
        Ok(qmp)
    }

    /// [`Self::connect`], retried until QEMU has created its socket and listens on it, for at
    /// most `limit`.
    pub fn connect_within(path: &Path, limit: Duration) -> Result<Self, String> {
        let deadline = Instant::now() + limit;
        loop {
            match Self::connect(path) {
                Ok(qmp) => return Ok(qmp),
                Err(e) if Instant::now() >= deadline => {
                    return Err(format!("no QMP within {limit:?}: {e}"));
                }
                Err(_) => thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    /// Sends `{"execute": command, "arguments": arguments}` and returns the reply's `return`
    /// value, skipping the events QEMU sends in between (such as `STOP`, which comes before
    /// the reply to `stop`). A QMP error is returned as its text.
    pub fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value, String> {
        let request = match arguments {
            Some(arguments) => serde_json::json!({ "execute": command, "arguments": arguments }),
            None => serde_json::json!({ "execute": command }),
        };
        writeln!(self.writer, "{request}")
            .and_then(|()| self.writer.flush())
            .map_err(|e| format!("send {command}: {e}"))?;
        // Events are few; a bound keeps a chatty monitor from holding the test.
        for _ in 0..100 {
            let mut reply = self.read_message()?;
            if let Some(value) = reply.get_mut("return") {
                return Ok(value.take());
            }
            if let Some(error) = reply.get("error") {
                return Err(format!("{command}: {error}"));
            }
        }
        Err(format!("{command}: no reply among 100 messages"))
    }

    fn read_message(&mut self) -> Result<Value, String> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => Err("QMP connection closed".to_owned()),
            Ok(_) => {
                serde_json::from_str(&line).map_err(|e| format!("bad QMP message {line:?}: {e}"))
            }
            Err(e)
                if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::TimedOut =>
            {
                Err(format!("no QMP message within {TIMEOUT:?}"))
            }
            Err(e) => Err(format!("read QMP: {e}")),
        }
    }
}
