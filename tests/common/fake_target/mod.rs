//! A small NVMe/TCP target (NVMe over Fabrics 1.1, NVMe/TCP 1.0) for tests and benchmarks of
//! vubd's initiator: one NVM subsystem with one namespace (RAM, or null for benchmarks) and
//! the discovery subsystem, on a 127.0.0.1 port, with faults the Linux target never produces
//! ([`Fault`]) and counters of what it saw ([`Counters`]).
//!
//! ```ignore
//! let target = FakeTarget::start(Options::default())?;
//! // connect to target.addr(), subsystem target.nqn()
//! target.set_fault(Fault::CorruptDataDigest);
//! target.pause(); // the target goes away (listener and connections closed)...
//! target.resume()?; // ...and comes back on the same port with the same data
//! ```
//!
//! One thread per connection with a blocking socket: it reads what is there in big chunks,
//! handles every whole PDU, and sends the answers with one `writev`. This module depends on
//! nothing else in `tests/common`, so `examples/fake_target.rs` includes it by path.

mod conn;
mod ctrl;
mod faults;
mod ns;
mod nvm;
mod wire;

pub use faults::Fault;

use std::collections::HashMap;
use std::io as stdio;
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use vubd::nvme::spec::Nqn;

use ctrl::Controller;
use faults::Faults;
use ns::Namespace;

/// How the target is set up. [`Options::default`] is a 64 MiB RAM namespace of 512-byte
/// blocks with the Linux target's defaults for everything else.
#[derive(Clone, Debug)]
pub struct Options {
    /// NQN of the NVM subsystem.
    pub nqn: String,
    /// Namespace size in bytes, a multiple of `block_size`.
    pub ns_size: u64,
    /// 512 or 4096.
    pub block_size: u32,
    /// No storage: reads return zeros, writes are dropped.
    pub null: bool,
    /// MAXH2CDATA of ICResp: at least 4096, a multiple of 4.
    pub maxh2cdata: u32,
    /// I/O Queue Command Capsule Supported Size in 16-byte units: the SQE and in-capsule data.
    pub ioccsz: u32,
    /// Maximum Data Transfer Size: `4096 << mdts` bytes, 0 for no limit.
    pub mdts: u8,
    /// CAP.MQES: largest queue size, 0-based.
    pub mqes: u16,
    /// Most I/O queues a controller grants.
    pub max_queues: u16,
    /// Grant a header / data digest when the host asks for it.
    pub grant_header_digest: bool,
    pub grant_data_digest: bool,
    /// Host NQNs allowed to connect to the NVM subsystem; `None` for any.
    pub allowed_hosts: Option<Vec<String>>,
    /// Namespace Attribute Notices are offered (Identify Controller OAES bit 8), so that a
    /// host that enables them hears of [`FakeTarget::resize_namespace`].
    pub namespace_notices: bool,
    /// CPUs the connection threads are pinned to, round-robin in accept order; empty for
    /// none.
    pub cpus: Vec<usize>,
    pub serial: String,
    pub model: String,
    pub firmware: String,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            nqn: "nqn.2014-08.org.vubd:fake-target".to_owned(),
            ns_size: 64 << 20,
            block_size: 512,
            null: false,
            maxh2cdata: 128 * 1024,
            ioccsz: 4 + 8192 / 16,
            mdts: 5,
            mqes: 127,
            max_queues: 8,
            grant_header_digest: true,
            grant_data_digest: true,
            allowed_hosts: None,
            namespace_notices: true,
            cpus: Vec::new(),
            serial: "fake-target".to_owned(),
            model: "vubd fake NVMe/TCP target".to_owned(),
            firmware: "1.0".to_owned(),
        }
    }
}

impl Options {
    /// Refuses options the target cannot serve; [`FakeTarget::start`] calls it too.
    pub fn check(&self) -> stdio::Result<()> {
        let bad = |what: &str| Err(stdio::Error::new(stdio::ErrorKind::InvalidInput, what));
        if Nqn::new(&self.nqn).is_err() {
            return bad("malformed subsystem NQN");
        }
        if !matches!(self.block_size, 512 | 4096) {
            return bad("block size must be 512 or 4096");
        }
        if self.ns_size == 0 || self.ns_size % u64::from(self.block_size) != 0 {
            return bad("namespace size must be a non-zero multiple of the block size");
        }
        if self.maxh2cdata < 4096 || self.maxh2cdata % 4 != 0 || self.maxh2cdata > 1 << 24 {
            return bad("MAXH2CDATA must be a multiple of 4 from 4096 to 16 MiB");
        }
        if !(4..=1 << 16).contains(&self.ioccsz) {
            return bad("IOCCSZ must be 4 to 65536");
        }
        if self.mqes == 0 || self.max_queues == 0 {
            return bad("MQES and the queue count must not be 0");
        }
        Ok(())
    }
}

/// The target's counters, shared by its connections (each adds its own once per batch).
#[derive(Debug)]
struct SharedCounters {
    accepted: AtomicU64,
    refused: AtomicU64,
    admin: [AtomicU64; 256],
    io: [AtomicU64; 256],
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
    c2h_success: AtomicU64,
    r2t_sent: AtomicU64,
    term_reqs_sent: AtomicU64,
    kato_expired: AtomicU64,
    panics: AtomicU64,
}

impl Default for SharedCounters {
    fn default() -> SharedCounters {
        SharedCounters {
            accepted: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            admin: std::array::from_fn(|_| AtomicU64::new(0)),
            io: std::array::from_fn(|_| AtomicU64::new(0)),
            bytes_read: AtomicU64::new(0),
            bytes_written: AtomicU64::new(0),
            c2h_success: AtomicU64::new(0),
            r2t_sent: AtomicU64::new(0),
            term_reqs_sent: AtomicU64::new(0),
            kato_expired: AtomicU64::new(0),
            panics: AtomicU64::new(0),
        }
    }
}

/// A snapshot of what the target saw. Counts of a connection are published before it sends
/// the answers they led to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Counters {
    pub connections_accepted: u64,
    /// Closed at once under [`Fault::RefuseConnections`].
    pub connections_refused: u64,
    /// Commands received on admin queues (and on connections before Connect), by opcode.
    pub admin_commands: Vec<u64>,
    /// Commands received on I/O queues, by opcode.
    pub io_commands: Vec<u64>,
    /// Data sent to hosts by Read commands.
    pub bytes_read: u64,
    /// Data received from hosts by Write commands.
    pub bytes_written: u64,
    /// C2HData PDUs with the SUCCESS flag (no CapsuleResp followed).
    pub c2h_success: u64,
    pub r2ts_sent: u64,
    pub term_reqs_sent: u64,
    /// Controllers torn down because their keep alive timer expired.
    pub keep_alive_expired: u64,
    /// Connection threads that panicked: a bug in the target, whatever the host sent.
    pub panics: u64,
}

impl Counters {
    pub fn admin(&self, opcode: u8) -> u64 {
        self.admin_commands[usize::from(opcode)]
    }

    pub fn io(&self, opcode: u8) -> u64 {
        self.io_commands[usize::from(opcode)]
    }
}

/// A live connection, so that pausing the target can close it and wait for its thread.
#[derive(Debug)]
struct ConnEntry {
    stream: TcpStream,
    closed: Arc<AtomicBool>,
    thread: JoinHandle<()>,
}

/// What the acceptor and the connections share.
#[derive(Debug)]
struct Shared {
    opts: Options,
    /// The bound address, the same across pause and resume.
    addr: SocketAddr,
    ns: Namespace,
    faults: Faults,
    counters: SharedCounters,
    ctrls: Mutex<HashMap<u16, Arc<Controller>>>,
    next_cntlid: AtomicU32,
    conns: Mutex<Vec<ConnEntry>>,
    accepted: AtomicUsize,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    /// A controller ID not in use, from 1 to 0xffef (Fabrics 1.1 §4.1: FFF0h and above are
    /// reserved).
    fn new_cntlid(&self) -> u16 {
        let ctrls = lock(&self.ctrls);
        loop {
            let n = self.next_cntlid.fetch_add(1, Ordering::Relaxed);
            let id = (n % 0xffef) as u16 + 1;
            if !ctrls.contains_key(&id) {
                return id;
            }
        }
    }

    fn accept(self: &Arc<Shared>, stream: TcpStream) {
        if self.faults.refusing() {
            self.counters.refused.fetch_add(1, Ordering::Relaxed);
            let _ = stream.shutdown(Shutdown::Both);
            return;
        }
        self.counters.accepted.fetch_add(1, Ordering::Relaxed);
        let Ok(handle) = stream.try_clone() else {
            return;
        };
        let closed = Arc::new(AtomicBool::new(false));
        let n = self.accepted.fetch_add(1, Ordering::Relaxed);
        let cpu = (!self.opts.cpus.is_empty()).then(|| self.opts.cpus[n % self.opts.cpus.len()]);
        let sh = Arc::clone(self);
        let flag = Arc::clone(&closed);
        let spawned = thread::Builder::new()
            .name(format!("fake-target-{n}"))
            .spawn(move || {
                if let Some(cpu) = cpu {
                    let _ = vubd::poller::pin_current_thread(cpu);
                }
                let counters = Arc::clone(&sh);
                let served = panic::catch_unwind(AssertUnwindSafe(|| {
                    conn::serve(sh, stream, flag);
                }));
                if served.is_err() {
                    counters.counters.panics.fetch_add(1, Ordering::Relaxed);
                }
            });
        let Ok(thread) = spawned else {
            return;
        };
        let mut conns = lock(&self.conns);
        conns.retain(|c| !c.thread.is_finished());
        conns.push(ConnEntry {
            stream: handle,
            closed,
            thread,
        });
    }
}

/// The accepting thread, stopped by a flag and a connection to itself.
#[derive(Debug)]
struct Acceptor {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<()>,
}

impl Acceptor {
    fn spawn(sh: &Arc<Shared>, listener: TcpListener) -> stdio::Result<Acceptor> {
        let stop = Arc::new(AtomicBool::new(false));
        let (sh, flag) = (Arc::clone(sh), Arc::clone(&stop));
        let thread = thread::Builder::new()
            .name("fake-target-accept".to_owned())
            .spawn(move || {
                while !flag.load(Ordering::SeqCst) {
                    match listener.accept() {
                        Ok(_) if flag.load(Ordering::SeqCst) => break,
                        Ok((stream, _)) => sh.accept(stream),
                        // Out of file descriptors and the like: try again shortly.
                        Err(_) => thread::sleep(Duration::from_millis(10)),
                    }
                }
            })?;
        Ok(Acceptor { stop, thread })
    }

    fn stop(self, addr: SocketAddr) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect_timeout(&addr, Duration::from_secs(1));
        let _ = self.thread.join();
    }
}

/// A running target; dropping it closes the listener and every connection.
#[derive(Debug)]
pub struct FakeTarget {
    sh: Arc<Shared>,
    acceptor: Mutex<Option<Acceptor>>,
}

impl FakeTarget {
    /// Starts a target on an ephemeral port of 127.0.0.1.
    pub fn start(opts: Options) -> stdio::Result<FakeTarget> {
        FakeTarget::start_on(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), opts)
    }

    /// Starts a target on `addr` (port 0 for an ephemeral one); it accepts connections when
    /// this returns.
    pub fn start_on(addr: SocketAddr, opts: Options) -> stdio::Result<FakeTarget> {
        opts.check()?;
        let listener = TcpListener::bind(addr)?;
        let addr = listener.local_addr()?;
        let sh = Arc::new(Shared {
            ns: Namespace::new(opts.ns_size, opts.block_size, opts.null),
            opts,
            addr,
            faults: Faults::default(),
            counters: SharedCounters::default(),
            ctrls: Mutex::new(HashMap::new()),
            next_cntlid: AtomicU32::new(0),
            conns: Mutex::new(Vec::new()),
            accepted: AtomicUsize::new(0),
        });
        let acceptor = Acceptor::spawn(&sh, listener)?;
        Ok(FakeTarget {
            sh,
            acceptor: Mutex::new(Some(acceptor)),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.sh.addr
    }

    /// NQN of the NVM subsystem.
    pub fn nqn(&self) -> &str {
        &self.sh.opts.nqn
    }

    pub fn options(&self) -> &Options {
        &self.sh.opts
    }

    /// Arms `fault` once: it fires on the next match, then disarms. [`Fault::Stall`] and
    /// [`Fault::RefuseConnections`] last until cleared.
    pub fn set_fault(&self, fault: Fault) {
        self.sh.faults.set(fault, false);
    }

    /// Arms `fault` until [`FakeTarget::clear_fault`].
    pub fn set_fault_persistent(&self, fault: Fault) {
        self.sh.faults.set(fault, true);
    }

    /// Disarms every fault of the kind of `fault` (its payload does not matter); clearing
    /// [`Fault::Stall`] lets stalled connections go on.
    pub fn clear_fault(&self, fault: Fault) {
        self.sh.faults.clear(Some(fault));
    }

    pub fn clear_faults(&self) {
        self.sh.faults.clear(None);
    }

    /// The target goes away: the listener and every connection are closed (controllers with
    /// them) and their threads joined. The namespace keeps its contents. Idempotent.
    pub fn pause(&self) {
        if let Some(acceptor) = lock(&self.acceptor).take() {
            acceptor.stop(self.sh.addr);
        }
        let conns: Vec<ConnEntry> = lock(&self.sh.conns).drain(..).collect();
        for c in &conns {
            c.closed.store(true, Ordering::SeqCst);
            let _ = c.stream.shutdown(Shutdown::Both);
        }
        self.sh.faults.wake_stalled();
        for c in conns {
            let _ = c.thread.join();
        }
        let ctrls: Vec<_> = lock(&self.sh.ctrls).drain().map(|(_, c)| c).collect();
        for c in ctrls {
            ctrl::teardown(&self.sh, &c);
        }
    }

    /// The target comes back on the same address. Idempotent.
    pub fn resume(&self) -> stdio::Result<()> {
        let mut acceptor = lock(&self.acceptor);
        if acceptor.is_none() {
            let listener = TcpListener::bind(self.sh.addr)?;
            *acceptor = Some(Acceptor::spawn(&self.sh, listener)?);
        }
        Ok(())
    }

    pub fn is_paused(&self) -> bool {
        lock(&self.acceptor).is_none()
    }

    /// Controllers alive now.
    pub fn controllers(&self) -> usize {
        lock(&self.sh.ctrls).len()
    }

    pub fn counters(&self) -> Counters {
        let c = &self.sh.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Counters {
            connections_accepted: get(&c.accepted),
            connections_refused: get(&c.refused),
            admin_commands: c.admin.iter().map(get).collect(),
            io_commands: c.io.iter().map(get).collect(),
            bytes_read: get(&c.bytes_read),
            bytes_written: get(&c.bytes_written),
            c2h_success: get(&c.c2h_success),
            r2ts_sent: get(&c.r2t_sent),
            term_reqs_sent: get(&c.term_reqs_sent),
            keep_alive_expired: get(&c.kato_expired),
            panics: get(&c.panics),
        }
    }

    /// Reads the namespace directly (zeros for a null one). The range must lie within it.
    pub fn read_namespace(&self, offset: u64, len: usize) -> Vec<u8> {
        assert!(
            offset + len as u64 <= self.sh.ns.size(),
            "read past the namespace"
        );
        let mut out = Vec::with_capacity(len);
        self.sh.ns.read_append(offset, len as u64, &mut out);
        out
    }

    /// The namespace's size in bytes now.
    pub fn namespace_size(&self) -> u64 {
        self.sh.ns.size()
    }

    /// Changes the namespace's size to `size` bytes (a multiple of the block size, at most
    /// 4 GiB or the size it started with), as an administrator of the target would; every
    /// controller reports it with a namespace notice to a host that enabled them.
    pub fn resize_namespace(&self, size: u64) {
        let bs = u64::from(self.sh.ns.block_size());
        assert!(
            size > 0 && size % bs == 0 && size <= self.sh.ns.max_size(),
            "{size} bytes: not a size this namespace can take"
        );
        self.sh.ns.resize(size);
        for c in lock(&self.sh.ctrls).values() {
            c.namespace_changed();
        }
    }

    /// Writes the namespace directly (dropped for a null one). The range must lie within it.
    pub fn write_namespace(&self, offset: u64, data: &[u8]) {
        assert!(
            offset + data.len() as u64 <= self.sh.ns.size(),
            "write past the namespace"
        );
        self.sh.ns.write(offset, data);
    }
}

impl Drop for FakeTarget {
    fn drop(&mut self) {
        self.pause();
    }
}
