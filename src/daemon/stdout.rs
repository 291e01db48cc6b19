//! Standard output that cannot kill the daemon. What vubd prints there (help, capabilities, a
//! discovery log, the start-up banner) is for a reader who may be gone: `vubd --help | head -1`,
//! or a supervisor that closed vubd's standard output. Rust ignores SIGPIPE, so `print!` would
//! panic on the broken pipe; a device must not fail to start for it.

use std::io::{self, Write};

/// Writes `text` to standard output and flushes it; a write error is dropped, as the reader
/// it would concern is gone.
pub fn write(text: &str) {
    let mut out = io::stdout().lock();
    let _ = out.write_all(text.as_bytes()).and_then(|()| out.flush());
}
