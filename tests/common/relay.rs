//! A TCP relay on 127.0.0.1 in front of a target behind QEMU's user network, for tests that
//! kill the initiator.
//!
//! libslirp 4.7 (Debian 12's) aborts QEMU with "soread: Assertion `buf_len != 0' failed" when
//! a host-side connection reports an error or hang-up (a peer's RST) at a moment when its
//! guest-bound buffer is exactly full: its poll loop calls `soread` for `POLLERR`/`POLLHUP`
//! without the room check it makes for `POLLIN`. A process killed with unread data in its
//! socket sends exactly that RST, so a test that kills vubd under write load against the
//! kernel target in its guest (`nvmet.rs`) would now and then kill the target too.
//!
//! The relay stands between the two and ends connections the way a clean close does: when
//! the initiator's side ends (EOF or reset), it half-closes the target's side and keeps
//! reading (and dropping) what the target still sends until the target closes too. QEMU then
//! sees a FIN and never a reset. Bytes pass unchanged and in order in both directions; a
//! target that closes or resets is seen by the initiator as a close.

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use super::TIMEOUT;

/// How often the accept loop looks at the stop flag.
const ACCEPT_POLL: Duration = Duration::from_millis(20);

/// A running relay; dropping it closes every connection and joins its threads.
pub struct Relay {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    /// Every socket the relay opened (both ends of each connection), shut down on drop so that
    /// the copying threads return.
    sockets: Arc<Mutex<Vec<TcpStream>>>,
    accept: Option<JoinHandle<Vec<JoinHandle<()>>>>,
}

impl Relay {
    /// Listens on a free port of 127.0.0.1 and forwards each connection to `upstream`.
    pub fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind relay");
        listener
            .set_nonblocking(true)
            .expect("non-blocking relay listener");
        let addr = listener.local_addr().expect("relay address");
        let stop = Arc::new(AtomicBool::new(false));
        let sockets = Arc::new(Mutex::new(Vec::new()));
        let accept = {
            let (stop, sockets) = (Arc::clone(&stop), Arc::clone(&sockets));
            thread::Builder::new()
                .name("relay-accept".into())
                .spawn(move || accept_loop(&listener, upstream, &stop, &sockets))
                .expect("spawn relay thread")
        };
        Self {
            addr,
            stop,
            sockets,
            accept: Some(accept),
        }
    }

    /// Where initiators connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let Some(accept) = self.accept.take() else {
            return;
        };
        let copiers = accept.join().unwrap_or_default();
        for socket in self.sockets.lock().expect("relay sockets").iter() {
            let _ = socket.shutdown(Shutdown::Both);
        }
        for copier in copiers {
            let _ = copier.join();
        }
    }
}

/// Accepts until told to stop; returns the copying threads it started.
fn accept_loop(
    listener: &TcpListener,
    upstream: SocketAddr,
    stop: &AtomicBool,
    sockets: &Mutex<Vec<TcpStream>>,
) -> Vec<JoinHandle<()>> {
    let mut copiers = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let client = match listener.accept() {
            Ok((client, _)) => client,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                thread::sleep(ACCEPT_POLL);
                continue;
            }
            Err(e) => panic!("relay accept: {e}"),
        };
        client
            .set_nonblocking(false)
            .expect("blocking relay socket");
        // A target that cannot be reached is a closed connection for the initiator, as a
        // refused connect would be.
        let Ok(target) = TcpStream::connect_timeout(&upstream, TIMEOUT) else {
            continue;
        };
        for s in [&client, &target] {
            s.set_nodelay(true).expect("TCP_NODELAY on a relay socket");
        }
        sockets
            .lock()
            .expect("relay sockets")
            .extend([&client, &target].map(|s| s.try_clone().expect("clone relay socket")));
        let (c2, t2) = (
            client.try_clone().expect("clone relay socket"),
            target.try_clone().expect("clone relay socket"),
        );
        copiers.push(spawn_copier("relay-up", move || forward(client, target)));
        copiers.push(spawn_copier("relay-down", move || backward(t2, c2)));
    }
    copiers
}

fn spawn_copier(name: &str, f: impl FnOnce() + Send + 'static) -> JoinHandle<()> {
    thread::Builder::new()
        .name(name.into())
        .spawn(f)
        .expect("spawn relay thread")
}

/// Initiator to target, until the initiator's side ends; then the target gets a FIN.
fn forward(mut client: TcpStream, mut target: TcpStream) {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = match client.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if target.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = target.shutdown(Shutdown::Write);
}

/// Target to initiator, until the target closes. Once the initiator is gone, what the target
/// still sends is read and dropped: closing a socket with unread data would reset it.
fn backward(mut target: TcpStream, mut client: TcpStream) {
    let mut buf = vec![0u8; 64 << 10];
    let mut client_open = true;
    loop {
        let n = match target.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if client_open && client.write_all(&buf[..n]).is_err() {
            client_open = false;
        }
    }
    let _ = client.shutdown(Shutdown::Write);
}
