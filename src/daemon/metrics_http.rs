//! The metrics endpoint (`--metrics-listen`): a small HTTP/1.1 server that answers
//! `GET /metrics` with every device's metrics in Prometheus's text format, and anything else
//! with an error status.
//!
//! One thread serves every connection, non-blocking, from one `poll`: at most
//! [`MAX_CONNECTIONS`] at once (more wait in the listen backlog), a request head of at most
//! [`MAX_REQUEST`] bytes, and [`CONNECTION_TIMEOUT`] for a connection's whole exchange, so
//! that a slow or hostile client holds nothing for long. Each connection carries one request
//! and its answer (`Connection: close`), which is how Prometheus scrapes.
//!
//! The thread's sandbox role (`sandbox::Role::Metrics`) lets it accept connections, read and
//! write them and poll: what a client sends cannot reach a file, another socket or a device.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tracing::{debug, error, warn};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::DaemonError;
use crate::metrics::prometheus::CONTENT_TYPE;

/// Connections served at once.
const MAX_CONNECTIONS: usize = 16;
/// Largest request head (request line and headers) read.
const MAX_REQUEST: usize = 8192;
/// How long a connection may take, from accept to the last byte of the answer.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(10);

/// The endpoint's socket, bound.
#[derive(Debug)]
pub(super) struct MetricsListener {
    listener: TcpListener,
}

/// Binds the endpoint's socket at `addr` (startup, before the sandbox's roles).
pub(super) fn bind(addr: SocketAddr) -> Result<MetricsListener, DaemonError> {
    let listener = TcpListener::bind(addr)
        .and_then(|l| l.set_nonblocking(true).map(|()| l))
        .map_err(|source| DaemonError::MetricsListen { addr, source })?;
    Ok(MetricsListener { listener })
}

/// The endpoint being served.
#[derive(Debug)]
pub(super) struct MetricsServer {
    stop: Arc<EventFd>,
    thread: JoinHandle<()>,
}

impl MetricsListener {
    /// The address it listens on (the port the kernel chose for port 0).
    pub(super) fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves requests until [`MetricsServer::stop`]; `render` writes the metrics text.
    pub(super) fn serve(
        self,
        render: impl Fn() -> String + Send + 'static,
    ) -> Result<MetricsServer, DaemonError> {
        let stop = Arc::new(EventFd::new(EFD_NONBLOCK).map_err(DaemonError::Worker)?);
        let thread = {
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("vubd-metrics".into())
                .spawn(move || {
                    crate::sandbox::enter(crate::sandbox::Role::Metrics);
                    serve(&self.listener, &stop, &render);
                })
                .map_err(DaemonError::Worker)?
        };
        Ok(MetricsServer { stop, thread })
    }
}

impl MetricsServer {
    /// Stops serving: open connections are closed, the socket with them.
    pub(super) fn stop(self) {
        let _ = self.stop.write(1);
        if self.thread.join().is_err() {
            error!("the metrics endpoint's thread panicked");
        }
    }
}

/// One client connection.
struct Conn {
    stream: TcpStream,
    /// The request head so far, then the answer.
    buf: Vec<u8>,
    /// Bytes of the answer sent; `None` while the request is read.
    sent: Option<usize>,
    deadline: Instant,
}

/// What became of a connection after it was ready.
enum Next {
    Keep,
    Close,
}

fn serve(listener: &TcpListener, stop: &EventFd, render: &dyn Fn() -> String) {
    let mut conns: Vec<Conn> = Vec::with_capacity(MAX_CONNECTIONS);
    let mut fds: Vec<libc::pollfd> = Vec::with_capacity(MAX_CONNECTIONS + 2);
    loop {
        let now = Instant::now();
        conns.retain(|c| c.deadline > now);
        fds.clear();
        let pollfd = |fd, events| libc::pollfd {
            fd,
            events,
            revents: 0,
        };
        fds.push(pollfd(stop.as_raw_fd(), libc::POLLIN));
        // A full server leaves new connections in the backlog.
        let listener_fd = if conns.len() < MAX_CONNECTIONS {
            listener.as_raw_fd()
        } else {
            -1
        };
        fds.push(pollfd(listener_fd, libc::POLLIN));
        for c in &conns {
            let events = if c.sent.is_some() {
                libc::POLLOUT
            } else {
                libc::POLLIN
            };
            fds.push(pollfd(c.stream.as_raw_fd(), events));
        }
        let timeout = conns
            .iter()
            .map(|c| c.deadline.saturating_duration_since(now))
            .min()
            .map_or(-1, |d| {
                i32::try_from(d.as_millis().saturating_add(1)).unwrap_or(i32::MAX)
            });
        let nfds = libc::nfds_t::try_from(fds.len()).unwrap_or(0);
        // SAFETY: `fds` is a live array of `nfds` pollfd structs.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), nfds, timeout) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            error!(error = %e, "metrics endpoint: poll failed");
            return;
        }
        if fds[0].revents != 0 {
            return;
        }
        // Connections first: their entries follow the two of `fds`, in `conns`' order.
        let mut i = 0;
        conns.retain_mut(|c| {
            let revents = fds[2 + i].revents;
            i += 1;
            revents == 0 || matches!(ready(c, render), Next::Keep)
        });
        if fds[1].revents != 0 {
            accept(listener, &mut conns);
        }
    }
}

/// Takes the connections waiting, up to [`MAX_CONNECTIONS`].
fn accept(listener: &TcpListener, conns: &mut Vec<Conn>) {
    while conns.len() < MAX_CONNECTIONS {
        match listener.accept() {
            Ok((stream, peer)) => {
                if let Err(e) = stream.set_nonblocking(true) {
                    debug!(%peer, error = %e, "metrics endpoint: cannot serve a connection");
                    continue;
                }
                conns.push(Conn {
                    stream,
                    buf: Vec::new(),
                    sent: None,
                    deadline: Instant::now() + CONNECTION_TIMEOUT,
                });
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                warn!(error = %e, "metrics endpoint: accept failed");
                return;
            }
        }
    }
}

/// Reads what a connection sent, or sends it what is left of its answer.
fn ready(c: &mut Conn, render: &dyn Fn() -> String) -> Next {
    if c.sent.is_none() {
        let mut chunk = [0u8; 1024];
        loop {
            match c.stream.read(&mut chunk) {
                Ok(0) => return Next::Close,
                Ok(n) => c.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return Next::Close,
            }
            if head_len(&c.buf).is_some() || c.buf.len() > MAX_REQUEST {
                break;
            }
        }
        let answer = match head_len(&c.buf) {
            Some(n) => answer(&c.buf[..n], render),
            None if c.buf.len() > MAX_REQUEST => status(431, "Request Header Fields Too Large"),
            None => return Next::Keep,
        };
        c.buf = answer;
        c.sent = Some(0);
    }
    let Some(sent) = c.sent.as_mut() else {
        return Next::Close;
    };
    while *sent < c.buf.len() {
        match c.stream.write(&c.buf[*sent..]) {
            Ok(0) => return Next::Close,
            Ok(n) => *sent += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Next::Keep,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return Next::Close,
        }
    }
    let _ = c.stream.shutdown(std::net::Shutdown::Write);
    Next::Close
}

/// The length of the request head in `buf` (up to and including its empty line), if it has
/// all of it.
fn head_len(buf: &[u8]) -> Option<usize> {
    let crlf = buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4);
    let lf = buf.windows(2).position(|w| w == b"\n\n").map(|i| i + 2);
    match (crlf, lf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// The answer to a request whose head is `head`.
fn answer(head: &[u8], render: &dyn Fn() -> String) -> Vec<u8> {
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let Ok(line) = std::str::from_utf8(line) else {
        return status(400, "Bad Request");
    };
    let mut words = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (words.next(), words.next(), words.next(), words.next())
    else {
        return status(400, "Bad Request");
    };
    if !version.starts_with("HTTP/1.") || !target.starts_with('/') {
        return status(400, "Bad Request");
    }
    let path = target.split('?').next().unwrap_or_default();
    if path != "/metrics" {
        return status(404, "Not Found");
    }
    if method != "GET" {
        return error(405, "Method Not Allowed", "Allow: GET\r\n");
    }
    response((200, "OK"), CONTENT_TYPE, "", render().as_bytes())
}

/// An error answer: the status line, and its reason as the body.
fn status(code: u16, reason: &str) -> Vec<u8> {
    error(code, reason, "")
}

/// An error answer with `headers` (each ending in CRLF) besides the usual ones.
fn error(code: u16, reason: &str, headers: &str) -> Vec<u8> {
    let body = format!("{reason}\n");
    response(
        (code, reason),
        "text/plain; charset=utf-8",
        headers,
        body.as_bytes(),
    )
}

fn response(
    (code, reason): (u16, &str),
    content_type: &str,
    headers: &str,
    body: &[u8],
) -> Vec<u8> {
    let mut a = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         {headers}Connection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    a.extend_from_slice(body);
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Serves `render` on a port of 127.0.0.1 the kernel chose.
    fn server(render: impl Fn() -> String + Send + 'static) -> (MetricsServer, SocketAddr) {
        let l = bind("127.0.0.1:0".parse().expect("address")).expect("bind");
        let addr = l.local_addr().expect("address");
        (l.serve(render).expect("serve"), addr)
    }

    /// Sends `request` and returns the whole answer, read until the server closes.
    fn exchange(addr: SocketAddr, request: &[u8]) -> String {
        let mut s = TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        s.write_all(request).expect("send");
        let mut answer = String::new();
        s.read_to_string(&mut answer).expect("answer");
        answer
    }

    #[test]
    fn get_metrics_is_answered_with_the_text_and_its_type() {
        let (srv, addr) = server(|| "vubd_x 1\n".to_owned());
        for request in [
            &b"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: text/plain\r\n\r\n"[..],
            b"GET /metrics?name[]=x HTTP/1.0\n\n",
        ] {
            assert_eq!(
                exchange(addr, request),
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n\
                 Content-Length: 9\r\nConnection: close\r\n\r\nvubd_x 1\n"
            );
        }
        srv.stop();
    }

    #[test]
    fn other_paths_methods_and_malformed_requests_get_an_error_status() {
        let (srv, addr) = server(|| "vubd_x 1\n".to_owned());
        let first_line = |request: &[u8]| {
            let a = exchange(addr, request);
            a.lines().next().unwrap_or_default().to_owned()
        };
        assert_eq!(
            first_line(b"GET / HTTP/1.1\r\n\r\n"),
            "HTTP/1.1 404 Not Found"
        );
        assert_eq!(
            first_line(b"GET /metricsx HTTP/1.1\r\n\r\n"),
            "HTTP/1.1 404 Not Found"
        );
        let post = exchange(addr, b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n");
        assert!(
            post.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"),
            "{post}"
        );
        assert!(
            post.contains("\r\nAllow: GET\r\nConnection: close\r\n\r\n"),
            "{post}"
        );
        for bad in [
            &b"GET /metrics\r\n\r\n"[..],
            b"GET /metrics HTTP/1.1 extra\r\n\r\n",
            b"GET metrics HTTP/1.1\r\n\r\n",
            b"GET /metrics SMTP/1.1\r\n\r\n",
            b"\xff\xfe /metrics HTTP/1.1\r\n\r\n",
        ] {
            assert_eq!(first_line(bad), "HTTP/1.1 400 Bad Request", "{bad:?}");
        }
        // A head that never ends is cut at MAX_REQUEST.
        let mut long = b"GET /metrics HTTP/1.1\r\nX: ".to_vec();
        long.resize(MAX_REQUEST + 100, b'a');
        assert_eq!(
            first_line(&long),
            "HTTP/1.1 431 Request Header Fields Too Large"
        );
        srv.stop();
    }

    #[test]
    fn a_client_that_sends_nothing_does_not_hold_up_the_others() {
        let (srv, addr) = server(|| "vubd_x 1\n".to_owned());
        // Silent clients keep their places until their time runs out; the others are served
        // meanwhile.
        let silent: Vec<TcpStream> = (0..4)
            .map(|_| TcpStream::connect(addr).expect("connect"))
            .collect();
        let a = exchange(addr, b"GET /metrics HTTP/1.1\r\n\r\n");
        assert!(a.starts_with("HTTP/1.1 200 OK\r\n"), "{a}");
        drop(silent);
        // A request sent a byte at a time is read whole.
        let mut s = TcpStream::connect(addr).expect("connect");
        for b in b"GET /metrics HTTP/1.1\r\n\r\n" {
            s.write_all(&[*b]).expect("send");
        }
        let mut answer = String::new();
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        s.read_to_string(&mut answer).expect("answer");
        assert!(answer.ends_with("\r\n\r\nvubd_x 1\n"), "{answer}");
        srv.stop();
    }
}
