//! vhost-user message sequences against an in-process vubd backend: a `BlkBackend` on a null
//! device behind vhost-user-backend's `VhostUserDaemon`, served on one end of a Unix socket,
//! its queues on a real poller. The other end is a frontend: the vhost crate's `Frontend` for
//! well-formed messages, raw writes for the vring descriptor messages, GET_CONFIG, arbitrary
//! (well-framed) messages and garbage. It also plays the guest: memory regions are memfds,
//! which the guest writes (rings, descriptors, requests) before it kicks.
//!
//! Checked beyond "no panic" (a panic on any thread, a SIGBUS or a SIGSEGV ends the process):
//! after every step the backend answers a GET_FEATURES probe or closes the connection within
//! 5 s; after garbage and EOF it closes; once the frontend has gone the session ends (handler
//! thread joined, queues drained and detached, relay thread joined) within a bound, and
//! leaves no file descriptor and no thread behind. A watchdog aborts an input that makes no
//! progress, saying which step it was at.
//!
//! The frontend is as hostile as the input makes it:
//!
//! - A memory region's memfd covers the region, except for one region in four (those whose
//!   `file_pages` is 3 modulo 4), whose memfd holds exactly `file_pages` pages, usually fewer
//!   than the region needs; `Truncate` shrinks a memfd under a running session, and raw
//!   memory-table messages may carry any memfd. vubd must refuse the first and survive the
//!   others (a SIGBUS fails only the session: `mem::fault`, installed here as vubd does).
//! - Pipes and sockets handed to the backend as vring descriptors block (vubd takes only
//!   eventfds; `fuzz/findings/vhost_user/kick_replaced_by_a_blocking_pipe` wedged a poller
//!   before it did).
//! - SET_INFLIGHT_FD regions hold the input's bytes: records of requests in flight, however
//!   inconsistent with the rings (`fuzz/findings/vhost_user/resubmit_behind_an_impossible_avail_index`
//!   made a detach wait for good before a broken queue dropped its resubmits).

#![no_main]

use std::ffi::CStr;
use std::fs::File;
use std::io::Write as _;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::fs::FileExt;
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserInflight, VhostUserProtocolFeatures,
};
use vhost::vhost_user::{Frontend, Listener, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserDirtyLogRegion, VhostUserMemoryRegionInfo, VringConfigData};
use vhost_user_backend::{VhostUserBackend, VhostUserDaemon};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;
use vubd::bdev::null::NullDevice;
use vubd::bdev::{BlockDevice, Disk};
use vubd::config::{Config, DeviceConfig};
use vubd::daemon::device_model;
use vubd::mem::fault::DeviceFaults;
use vubd::mem::{GuestMemory, GuestMemoryAtomic};
use vubd::metrics::DeviceMetrics;
use vubd::poller::{PollMode, PollerHandle, PollerSet};
use vubd::vhost_user::BlkBackend;
use vubd::virtio_blk::req_type;
use vubd_fuzz::vhost_user::{
    FdKind, Features, Gpa, Input, Offset, Op, Region, RegionRef, ReqKind, Size, User, UserAddr,
    VringFd,
};

const PAGE: u64 = 4096;
const NUM_QUEUES: usize = 2;
const QUEUE_SIZE: u16 = 256;
const CAPACITY: u64 = 64 << 20;
/// Where a region's frontend address is, relative to its guest address (`User::Mapped`).
const USER_BASE: u64 = 0x7f00_0000_0000;
/// The frontend tells the backend of at most this many queues.
const FRONTEND_QUEUES: u64 = 8;
/// How long the probe waits for the backend to answer or close.
const PROBE_WAIT: Duration = Duration::from_secs(5);
/// How long a driver waits for a completion before going on.
const COMPLETION_WAIT: Duration = Duration::from_millis(2);
/// No input step may take longer.
const STEP_LIMIT: Duration = Duration::from_secs(20);
/// The session's end, once the frontend has gone, may take no longer.
const TEARDOWN_LIMIT: Duration = Duration::from_secs(20);
/// How long leftovers (descriptors, threads) may take to go after the session ended.
const SETTLE: Duration = Duration::from_secs(2);

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;
const GET_FEATURES: u32 = 1;
const SET_PROTOCOL_FEATURES: u32 = 16;
const GET_CONFIG: u32 = 24;

fuzz_target!(|input: Input| run(&input));

/// What every input shares: the poller, the disk, the listening socket, the watchdog.
struct Setup {
    poller: PollerHandle,
    disk: Arc<Disk>,
    listener: Mutex<Listener>,
    addr: SocketAddr,
    offered: u64,
    offered_protocol: u64,
}

fn setup() -> &'static Setup {
    static SETUP: OnceLock<Setup> = OnceLock::new();
    SETUP.get_or_init(|| {
        // As in vubd's own process (Rust's runtime does this for it; libFuzzer's main does not).
        // SAFETY: setting a signal's disposition to "ignore" has no preconditions.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
        // As vubd does at startup: a frontend that shortens a file it shares fails its session,
        // not the process (faults outside that memory still reach libFuzzer's handler).
        vubd::mem::fault::install().expect("install the SIGBUS handler");
        let pollers = PollerSet::start(&[None], PollMode::Never).expect("start a poller");
        let poller = pollers.for_queue(0).clone();
        // The poller lives as long as the process.
        std::mem::forget(pollers);
        let name = format!("vubd-fuzz-{}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).expect("abstract name");
        let listener = UnixListener::bind_addr(&addr).expect("listen");
        let disk = Arc::new(null_disk());
        let backend = new_backend(&poller, &disk, GuestMemoryAtomic::new(GuestMemory::new()));
        let offered = backend.features();
        let offered_protocol = backend.protocol_features() | VhostUserProtocolFeatures::REPLY_ACK;
        drop(backend);
        Watchdog::start();
        Setup {
            poller,
            disk,
            listener: Mutex::new(Listener::from(listener)),
            addr,
            offered,
            offered_protocol: offered_protocol.bits(),
        }
    })
}

fn null_disk() -> Disk {
    Disk::Null(NullDevice::new(CAPACITY, false))
}

/// The device the target serves, as vubd's command line describes it: a null device of
/// `CAPACITY` bytes with `NUM_QUEUES` queues of up to `QUEUE_SIZE` entries.
fn device() -> &'static DeviceConfig {
    static DEVICE: OnceLock<DeviceConfig> = OnceLock::new();
    DEVICE.get_or_init(|| {
        let mut cfg = Config::from_args([
            "--socket-path".to_owned(),
            "vubd-fuzz.sock".to_owned(),
            "--disk".to_owned(),
            format!("null:{CAPACITY}"),
            "--num-queues".to_owned(),
            NUM_QUEUES.to_string(),
            "--queue-size".to_owned(),
            QUEUE_SIZE.to_string(),
        ])
        .expect("a valid command line");
        cfg.devices.remove(0)
    })
}

/// A session's backend, built as the daemon builds it (`daemon::device_model`, and the
/// device's metrics, on by default), on guest memory `mem`.
fn new_backend(poller: &PollerHandle, disk: &Arc<Disk>, mem: GuestMemoryAtomic) -> Arc<BlkBackend> {
    static KEY: AtomicU64 = AtomicU64::new(1);
    let faults = Arc::new(DeviceFaults::new().expect("the session's fault eventfd"));
    let (shape, mut shared) = device_model(device(), &disk.info(), "vubd-fuzz", faults);
    shared.metrics = Some(Arc::new(DeviceMetrics::new(device().num_queues)));
    Arc::new(BlkBackend::new(
        shape,
        KEY.fetch_add(1, Ordering::Relaxed),
        Arc::new(shared),
        disk.clone(),
        mem,
        vec![poller.clone(); NUM_QUEUES],
    ))
}

/// Aborts the process, saying what it was doing, when a step makes no progress in time.
struct Watchdog;

static WATCH: Mutex<Option<(Instant, String)>> = Mutex::new(None);

impl Watchdog {
    fn start() {
        std::thread::spawn(|| {
            loop {
                std::thread::sleep(Duration::from_millis(100));
                let w = WATCH.lock().unwrap_or_else(|e| e.into_inner());
                if let Some((deadline, what)) = &*w
                    && Instant::now() > *deadline
                {
                    eprintln!("vhost_user: no progress within the time allowed: {what}");
                    std::process::abort();
                }
            }
        });
    }

    fn arm(limit: Duration, what: String) {
        *WATCH.lock().unwrap_or_else(|e| e.into_inner()) = Some((Instant::now() + limit, what));
    }

    fn disarm() {
        *WATCH.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

fn run(input: &Input) {
    let s = setup();
    let fds_before = open_fds();
    let threads_before = threads();

    // The backend and the daemon share one memory map, as in `daemon::Serving::serve_one`.
    let mem = GuestMemoryAtomic::new(GuestMemory::new());
    let backend = new_backend(&s.poller, &s.disk, mem.clone());
    let mut daemon =
        VhostUserDaemon::new("vubd-fuzz".into(), backend.clone(), mem).expect("daemon");
    let sock = UnixStream::connect_addr(&s.addr).expect("connect");
    {
        let mut l = s.listener.lock().unwrap_or_else(|e| e.into_inner());
        daemon.start(&mut l).expect("accept");
    }
    // The frontend's own reads retry on a timeout; the probe's end there.
    sock.set_read_timeout(Some(PROBE_WAIT))
        .expect("read timeout");
    let raw = sock.try_clone().expect("clone the socket");
    let mut session = Session {
        s,
        fe: Frontend::from_stream(sock, FRONTEND_QUEUES),
        raw,
        need_reply: false,
        regions: Vec::new(),
        files: Vec::new(),
        queues: Default::default(),
        kept: Vec::new(),
        pending_features: 0,
    };
    for (i, op) in input.ops.iter().enumerate() {
        Watchdog::arm(STEP_LIMIT, format!("op {i}: {op:?}"));
        if trace() {
            eprintln!("op {i}: {op:?}");
        }
        match session.op(op) {
            Flow::Go => {
                if !session.probe(&format!("op {i}: {op:?}")) {
                    break;
                }
            }
            Flow::Closed | Flow::End => break,
        }
    }

    // The frontend goes; the session ends as the daemon ends it.
    Watchdog::arm(TEARDOWN_LIMIT, "the session's end".into());
    drop(session);
    let _ = daemon.wait();
    backend.close();
    drop(daemon);
    backend.close_exit_events();
    drop(backend);
    Watchdog::arm(TEARDOWN_LIMIT, "leftovers".into());
    settle("open file descriptors", fds_before, open_fds);
    settle("threads", threads_before, threads);
    Watchdog::disarm();
}

/// Waits until `count()` is back to `before`; panics with what is left if it does not.
fn settle(what: &str, before: usize, count: fn() -> usize) {
    let start = Instant::now();
    loop {
        let now = count();
        if now <= before {
            return;
        }
        if start.elapsed() > SETTLE {
            let fds = std::fs::read_dir("/proc/self/fd")
                .map(|d| {
                    d.filter_map(|e| e.ok())
                        .filter_map(|e| std::fs::read_link(e.path()).ok())
                        .map(|p| p.display().to_string())
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default();
            panic!("{what}: {before} before the session, {now} after it; descriptors: {fds:?}");
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
}

fn threads() -> usize {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Threads:"))
                .and_then(|n| n.trim().parse().ok())
        })
        .unwrap_or(0)
}

/// `VUBD_FUZZ_TRACE` set: print what the frontend got for each message, and vubd's log.
fn trace() -> bool {
    static TRACE: OnceLock<bool> = OnceLock::new();
    *TRACE.get_or_init(|| {
        let on = std::env::var_os("VUBD_FUZZ_TRACE").is_some();
        if on {
            let _ = tracing_subscriber::fmt()
                .with_env_filter("debug")
                .with_writer(std::io::stderr)
                .try_init();
        }
        on
    })
}

/// Makes a frontend call whose result only matters to the probe that follows; with
/// `VUBD_FUZZ_TRACE`, prints it and its result.
macro_rules! t {
    ($e:expr) => {{
        let r = $e;
        if trace() {
            eprintln!("  {} -> {:?}", stringify!($e), r);
        }
    }};
}

/// What follows an operation.
enum Flow {
    /// Probe, then go on.
    Go,
    /// The backend closed the connection.
    Closed,
    /// The frontend has stopped.
    End,
}

/// A region as the frontend described it to the backend, and its memfd (in `files`).
#[derive(Clone, Copy, Debug)]
struct Known {
    gpa: u64,
    size: u64,
    user: u64,
    offset: u64,
    file: usize,
}

/// A queue as a driver set it up in region 0: descriptor table at `base`, avail ring at
/// +0x1000, used ring at +0x2000, headers and status bytes at +0x3000, indirect tables at
/// +0x4000, data at +0x8000.
struct Queue {
    base: u64,
    size: u16,
    next_avail: u16,
    next_desc: u16,
    kick: EventFd,
    call: EventFd,
}

/// The frontend's (and guest's) side of one session.
struct Session {
    s: &'static Setup,
    fe: Frontend,
    raw: UnixStream,
    need_reply: bool,
    regions: Vec<Known>,
    /// Every memfd made, kept until the session ends (as a VMM keeps guest memory).
    files: Vec<File>,
    queues: [Option<Queue>; 8],
    /// Descriptors whose other end went to the backend (pipe ends, sockets, eventfds).
    kept: Vec<OwnedFd>,
    /// Answers to GET_FEATURES nobody read yet (the frontend's wait ended first, or a raw
    /// one): the probe sees them before its own.
    pending_features: u64,
}

#[path = "vhost_user/frontend.rs"]
mod frontend;
#[path = "vhost_user/guest.rs"]
mod guest;
#[path = "vhost_user/wire.rs"]
mod wire;
