//! The control socket (`--control-socket`): a unix socket created with mode 0600, on which
//! clients (`vubd ctl`, scripts, a node agent) send JSON-RPC 2.0 requests ([`crate::jsonrpc`])
//! and get their answers. One thread accepts; each client has a thread of its own (at most
//! [`MAX_CLIENTS`] at once), so a slow request (a device that connects to an NVMe/TCP target)
//! holds up only its own client. The methods are in [`super::methods`].
//!
//! The control threads keep the sandbox's baseline: adding a device is what startup does
//! (binding its socket, opening its image, VFIO set-up, NVMe/TCP connections, starting its
//! thread), and every thread of the device narrows its own filter as at startup.

use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use serde_json::json;
use tracing::{debug, error, info, warn};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::DaemonError;
use super::methods::Methods;
use super::socket::{SocketFile, wait_for_connection};
use crate::jsonrpc::{self, Decoded, Decoder};

/// Most clients served at once; one more is answered with an error and closed.
pub(super) const MAX_CLIENTS: usize = 16;

/// The control socket, bound.
#[derive(Debug)]
pub(super) struct ControlSocket {
    listener: UnixListener,
    _file: SocketFile,
}

/// Binds the control socket at `path`, mode 0600 from its creation (startup, before any
/// other thread creates a file). A socket there that another process serves is refused
/// (another vubd uses it); one left behind is replaced.
pub(super) fn bind(path: &Path) -> Result<ControlSocket, DaemonError> {
    let err = |e| DaemonError::Control(Box::new(e));
    match std::fs::symlink_metadata(path) {
        Ok(m) if !m.file_type().is_socket() => {
            return Err(err(DaemonError::NotASocket(path.to_owned())));
        }
        Ok(_) if UnixStream::connect(path).is_ok() => {
            return Err(err(DaemonError::SocketBusy(path.to_owned())));
        }
        // Left behind by a process that is gone.
        Ok(_) => {
            let _ = std::fs::remove_file(path);
        }
        Err(_) => {}
    }
    // SAFETY: umask only changes the process's file mode creation mask; no other thread runs
    // yet to create a file meanwhile.
    let old = unsafe { libc::umask(0o177) };
    let bound = UnixListener::bind(path);
    // SAFETY: as above; the mask the process had.
    unsafe { libc::umask(old) };
    let listener = bound.map_err(|source| {
        err(DaemonError::Bind {
            path: path.to_owned(),
            source,
        })
    })?;
    let file = SocketFile::bound(path);
    listener
        .set_nonblocking(true)
        .map_err(|e| err(DaemonError::Worker(e)))?;
    Ok(ControlSocket {
        listener,
        _file: file,
    })
}

/// The control socket being served.
#[derive(Debug)]
pub(super) struct ControlServer {
    stop: Arc<EventFd>,
    thread: JoinHandle<()>,
}

/// The clients being served: their connections (to end them when vubd stops) and threads.
type Clients = Arc<Mutex<Vec<(UnixStream, JoinHandle<()>)>>>;

impl ControlSocket {
    /// Serves requests with `methods` until [`ControlServer::stop`].
    pub(super) fn serve(self, methods: Arc<Methods>) -> Result<ControlServer, DaemonError> {
        let stop = Arc::new(EventFd::new(EFD_NONBLOCK).map_err(DaemonError::Worker)?);
        let thread = {
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("vubd-control".into())
                .spawn(move || self.accept_loop(&stop, &methods))
                .map_err(DaemonError::Worker)?
        };
        Ok(ControlServer { stop, thread })
    }

    fn accept_loop(self, stop: &EventFd, methods: &Arc<Methods>) {
        let clients: Clients = Arc::default();
        let mut next = 0u64;
        while wait_for_connection(self.listener.as_raw_fd(), stop.as_raw_fd()) {
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => {
                    warn!(error = %e, "control socket: accept failed");
                    continue;
                }
            };
            let mut list = clients.lock().unwrap_or_else(|e| e.into_inner());
            // Threads of clients that left are joined (they have ended).
            let (done, live): (Vec<_>, Vec<_>) = list.drain(..).partition(|(_, t)| t.is_finished());
            *list = live;
            for (_, t) in done {
                let _ = t.join();
            }
            if list.len() >= MAX_CLIENTS {
                let busy = jsonrpc::RpcError::failed(format!(
                    "too many clients (at most {MAX_CLIENTS} at once)"
                ));
                let answer = json!({"jsonrpc": "2.0", "id": null,
                    "error": {"code": busy.code, "message": busy.message}});
                let _ = (&stream).write_all(format!("{answer}\n").as_bytes());
                continue;
            }
            let Ok(watch) = stream.try_clone() else {
                continue;
            };
            next += 1;
            let methods = methods.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("vubd-control-{next}"))
                .spawn(move || serve_client(stream, &methods));
            match spawned {
                Ok(t) => list.push((watch, t)),
                Err(e) => error!(error = %e, "control socket: cannot start a client's thread"),
            }
        }
        // vubd stops: the clients' connections end, their threads with them.
        let list = std::mem::take(&mut *clients.lock().unwrap_or_else(|e| e.into_inner()));
        for (s, t) in list {
            let _ = s.shutdown(std::net::Shutdown::Both);
            let _ = t.join();
        }
    }
}

impl ControlServer {
    /// Stops taking requests: the control socket goes, and the clients are disconnected
    /// once the requests they sent are answered.
    pub(super) fn stop(self) {
        let _ = self.stop.write(1);
        if self.thread.join().is_err() {
            error!("the control socket's thread panicked");
        }
    }
}

/// One client: requests in, answers out, until it goes, sends what is not JSON, or vubd
/// stops; then its connection ends (the accept loop holds a clone of it, for the stop).
fn serve_client(mut stream: UnixStream, methods: &Methods) {
    serve_requests(&mut stream, methods);
    let _ = stream.shutdown(std::net::Shutdown::Both);
}

fn serve_requests(stream: &mut UnixStream, methods: &Methods) {
    let mut decoder = Decoder::default();
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        match decoder.decode() {
            Decoded::Value(v) => {
                let answer = jsonrpc::respond(v, &mut |m, p| methods.call(m, p));
                if let Some(a) = answer
                    && stream.write_all(format!("{a}\n").as_bytes()).is_err()
                {
                    return;
                }
                continue;
            }
            Decoded::Invalid(why) => {
                debug!(why, "control socket: a client sent what is not JSON");
                let a = jsonrpc::parse_error(&why);
                let _ = stream.write_all(format!("{a}\n").as_bytes());
                return;
            }
            Decoded::Incomplete => {}
        }
        match stream.read(&mut chunk) {
            Ok(0) => return,
            Ok(n) => decoder.push(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                info!(error = %e, "control socket: a client's connection failed");
                return;
            }
        }
    }
}
