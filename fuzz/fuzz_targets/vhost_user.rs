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

/// A session's backend, built as the daemon builds it (`daemon::device_model`), on guest
/// memory `mem`.
fn new_backend(poller: &PollerHandle, disk: &Arc<Disk>, mem: GuestMemoryAtomic) -> Arc<BlkBackend> {
    static KEY: AtomicU64 = AtomicU64::new(1);
    let faults = Arc::new(DeviceFaults::new().expect("the session's fault eventfd"));
    let (shape, shared) = device_model(device(), &disk.info(), "vubd-fuzz", faults, 1);
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

impl Session {
    fn op(&mut self, op: &Op) -> Flow {
        let fe = &mut self.fe;
        match op {
            Op::Handshake => {
                let f = self.get_features();
                t!(self.fe.set_features(f));
                let pf = self
                    .fe
                    .get_protocol_features()
                    .map_or(self.s.offered_protocol, |p| p.bits());
                t!(self
                    .fe
                    .set_protocol_features(VhostUserProtocolFeatures::from_bits_truncate(pf)));
                t!(self.fe.set_owner());
                self.set_need_reply(true);
            }
            Op::GetFeatures => {
                self.get_features();
            }
            Op::SetFeatures(f) => {
                t!(fe.set_features(self.s.features(*f)));
            }
            Op::GetProtocolFeatures => {
                t!(fe.get_protocol_features());
            }
            Op::SetProtocolFeatures(f) => {
                let bits = match f {
                    Features::Offered => self.s.offered_protocol,
                    Features::Raw(b) => *b,
                };
                t!(fe.set_protocol_features(VhostUserProtocolFeatures::from_bits_retain(bits)));
            }
            Op::SetOwner => {
                t!(fe.set_owner());
            }
            Op::ResetOwner => {
                t!(fe.reset_owner());
            }
            Op::NeedReply(on) => self.set_need_reply(*on),
            Op::GetQueueNum => {
                t!(fe.get_queue_num());
            }
            Op::GetConfig { offset, size } => {
                // Raw: vhost's `Frontend::get_config` waits forever for the rest of an error
                // reply (a config of size 0, as the spec has it).
                let mut body = Vec::with_capacity(12 + usize::from(*size));
                body.extend_from_slice(&u32::from(*offset).to_le_bytes());
                body.extend_from_slice(&u32::from(*size).to_le_bytes());
                body.extend_from_slice(&0u32.to_le_bytes());
                body.resize(12 + usize::from(*size), 0);
                if !self.send_raw(GET_CONFIG, self.flags(), &body, &[]) {
                    return Flow::Closed;
                }
            }
            Op::SetConfig { offset, bytes } => {
                t!(fe.set_config(u32::from(*offset), VhostUserConfigFlags::WRITABLE, bytes));
            }
            Op::SetMemTable(regions) => {
                let made: Vec<_> = regions
                    .iter()
                    .take(8)
                    .filter_map(|r| self.region(r))
                    .collect();
                if made.is_empty() {
                    return Flow::Go;
                }
                let infos: Vec<_> = made.iter().map(|m| m.0).collect();
                t!(self.fe.set_mem_table(&infos));
                self.regions = made.into_iter().map(|m| m.1).collect();
            }
            Op::AddMemReg(r) => {
                if let Some((info, known)) = self.region(r) {
                    t!(self.fe.add_mem_region(&info));
                    self.regions.push(known);
                }
            }
            Op::RemMemReg(which) => {
                let (gpa, size) = match *which {
                    RegionRef::Known(i) if !self.regions.is_empty() => {
                        let k = self.regions.remove(usize::from(i) % self.regions.len());
                        (k.gpa, k.size)
                    }
                    RegionRef::Known(_) => (0, PAGE),
                    RegionRef::Raw { gpa, size } => (gpa, size),
                };
                let info = region_info(gpa, size, 0, 0, -1);
                t!(self.fe.remove_mem_region(&info));
            }
            Op::GetMaxMemSlots => {
                t!(fe.get_max_mem_slots());
            }
            Op::SetVringNum { q, num } => {
                t!(fe.set_vring_num(usize::from(*q), *num));
            }
            Op::SetVringAddr {
                q,
                desc,
                used,
                avail,
                flags,
                log,
            } => {
                let cfg = VringConfigData {
                    queue_max_size: QUEUE_SIZE,
                    queue_size: QUEUE_SIZE,
                    flags: u32::from(flags & 1),
                    desc_table_addr: self.user_addr(*desc),
                    used_ring_addr: self.user_addr(*used),
                    avail_ring_addr: self.user_addr(*avail),
                    log_addr: *log,
                };
                t!(self.fe.set_vring_addr(usize::from(*q), &cfg));
            }
            Op::SetVringBase { q, base } => {
                t!(fe.set_vring_base(usize::from(*q), *base));
            }
            Op::GetVringBase { q } => {
                t!(fe.get_vring_base(usize::from(*q)));
            }
            Op::SetVringFd { which, q, fd } => return self.set_vring_fd(*which, *q, *fd),
            Op::SetVringEnable { q, enable } => {
                t!(fe.set_vring_enable(usize::from(*q), *enable));
            }
            Op::GetInflightFd {
                num_queues,
                queue_size,
            } => {
                let msg = VhostUserInflight {
                    mmap_size: 0,
                    mmap_offset: 0,
                    num_queues: *num_queues,
                    queue_size: *queue_size,
                };
                t!(fe.get_inflight_fd(&msg).map(|r| r.1));
            }
            Op::SetInflightFd {
                num_queues,
                queue_size,
                size,
                offset,
                fill,
            } => {
                let (size, offset) = (bytes(*size), offset_bytes(*offset));
                let Some(f) = offset.checked_add(size).and_then(memfd) else {
                    return Flow::Go;
                };
                let _ = f.write_at(&fill[..fill.len().min(size as usize)], offset);
                let msg = VhostUserInflight {
                    mmap_size: size,
                    mmap_offset: offset,
                    num_queues: *num_queues,
                    queue_size: *queue_size,
                };
                t!(self.fe.set_inflight_fd(&msg, f.as_raw_fd()));
                self.files.push(f);
            }
            Op::SetLogBase { size, offset } => {
                let (size, offset) = (bytes(*size), offset_bytes(*offset));
                let Some(f) = offset.checked_add(size).and_then(memfd) else {
                    return Flow::Go;
                };
                let region = VhostUserDirtyLogRegion {
                    mmap_size: size,
                    mmap_offset: offset,
                    mmap_handle: f.as_raw_fd(),
                };
                t!(self.fe.set_log_base(0, Some(region)));
                self.files.push(f);
            }
            Op::SetupQueue { q, size } => self.setup_queue(usize::from(q % 8), 1 << (size % 9)),
            Op::Request {
                q,
                kind,
                sector,
                sectors,
                indirect,
            } => self.request(usize::from(q % 8), *kind, *sector, *sectors, *indirect),
            Op::WriteGuest { gpa, bytes } => {
                let gpa = match gpa {
                    Gpa::Page(p) => u64::from(*p) * PAGE,
                    Gpa::Raw(a) => *a,
                };
                self.guest_write(gpa, bytes);
            }
            Op::Kick(q) => {
                if let Some(queue) = &self.queues[usize::from(q % 8)] {
                    let _ = queue.kick.write(1);
                }
            }
            Op::Truncate { region, pages } => {
                if !self.files.is_empty() {
                    let f = &self.files[usize::from(*region) % self.files.len()];
                    let _ = f.set_len(u64::from(*pages) * PAGE);
                }
            }
            Op::Raw {
                code,
                flags,
                body,
                fds,
            } => {
                let mut given = Vec::new();
                for &kind in fds.iter().take(8) {
                    if let Some((f, _)) = self.make_fd(kind) {
                        given.push(f);
                    }
                }
                let raw: Vec<RawFd> = given.iter().map(|f| f.as_raw_fd()).collect();
                if !self.send_raw(u32::from(*code), u32::from(*flags), body, &raw) {
                    return Flow::Closed;
                }
                match (u32::from(*code), <[u8; 8]>::try_from(&body[..])) {
                    (GET_FEATURES, _) => self.pending_features += 1,
                    (SET_PROTOCOL_FEATURES, Ok(b)) => {
                        // The backend acks (or not) by what this said: tell the frontend the
                        // same, or it would wait for acks that never come.
                        let f = VhostUserProtocolFeatures::from_bits_retain(u64::from_le_bytes(b));
                        t!(self.fe.set_protocol_features(f));
                    }
                    _ => {}
                }
            }
            Op::Garbage(bytes) => {
                let _ = (&self.raw).write_all(bytes);
                let _ = self.raw.shutdown(std::net::Shutdown::Write);
                loop {
                    match recv_msg(&self.raw) {
                        Recv::Msg { .. } => {}
                        Recv::Eof => break,
                        Recv::Timeout => panic!(
                            "garbage then EOF: the backend did not close within {PROBE_WAIT:?}"
                        ),
                    }
                }
                return Flow::End;
            }
            Op::Disconnect => return Flow::End,
        }
        Flow::Go
    }

    /// GET_FEATURES through the frontend; a reply it did not take is left for the probe.
    fn get_features(&mut self) -> u64 {
        match self.fe.get_features() {
            Ok(f) => f,
            Err(_) => {
                self.pending_features += 1;
                self.s.offered
            }
        }
    }

    /// Header flags of the messages written raw: version 1, and NEED_REPLY if asked for.
    fn flags(&self) -> u32 {
        let need_reply = VhostUserHeaderFlag::NEED_REPLY.bits();
        1 | if self.need_reply { need_reply } else { 0 }
    }

    fn set_need_reply(&mut self, on: bool) {
        self.need_reply = on;
        let flags = if on {
            VhostUserHeaderFlag::NEED_REPLY
        } else {
            VhostUserHeaderFlag::empty()
        };
        self.fe.set_hdr_flags(flags);
    }

    /// Sends a GET_FEATURES of its own and reads up to its answer: true once it came, false
    /// when the backend closed the connection. Anything else is a hang the input caused.
    fn probe(&mut self, after: &str) -> bool {
        if !self.send_raw(GET_FEATURES, 1, &[], &[]) {
            return false;
        }
        let mut want = 1 + std::mem::take(&mut self.pending_features);
        loop {
            match recv_msg(&self.raw) {
                Recv::Msg { code, flags } => {
                    let reply = VhostUserHeaderFlag::REPLY.bits();
                    if code == GET_FEATURES && flags & reply != 0 {
                        want -= 1;
                        if want == 0 {
                            return true;
                        }
                    }
                }
                Recv::Eof => return false,
                Recv::Timeout => panic!(
                    "after {after}: the backend neither answered nor closed within {PROBE_WAIT:?}"
                ),
            }
        }
    }

    /// Writes one message: header (`code`, `flags`, the body's length), body, descriptors.
    fn send_raw(&self, code: u32, flags: u32, body: &[u8], fds: &[RawFd]) -> bool {
        let mut msg = Vec::with_capacity(12 + body.len());
        msg.extend_from_slice(&code.to_le_bytes());
        msg.extend_from_slice(&flags.to_le_bytes());
        msg.extend_from_slice(&(body.len() as u32).to_le_bytes());
        msg.extend_from_slice(body);
        match self.raw.send_with_fds(&[&msg[..]], fds) {
            Ok(n) if n == msg.len() => true,
            Ok(n) => (&self.raw).write_all(&msg[n..]).is_ok(),
            Err(_) => false,
        }
    }

    /// A memfd for region `r` and how the frontend describes it; `None` when no file of the
    /// size needed can be made.
    fn region(&mut self, r: &Region) -> Option<(VhostUserMemoryRegionInfo, Known)> {
        let size = bytes(r.size);
        let offset = offset_bytes(r.offset);
        let gpa = match r.gpa {
            Gpa::Page(p) => u64::from(p) * PAGE,
            Gpa::Raw(a) => a,
        };
        let user = match r.user {
            User::Mapped => gpa.wrapping_add(USER_BASE),
            User::Raw(a) => a,
        };
        let file_len = u64::from(r.file_pages) * PAGE;
        // One region in four has a memfd of exactly `file_pages` pages, usually too short.
        let len = match offset.checked_add(size) {
            _ if r.file_pages % 4 == 3 => file_len,
            Some(need) => need.max(file_len),
            // The backend cannot map it at all.
            None => file_len,
        };
        let f = memfd(len)?;
        let info = region_info(gpa, size, user, offset, f.as_raw_fd());
        self.files.push(f);
        let known = Known {
            gpa,
            size,
            user,
            offset,
            file: self.files.len() - 1,
        };
        Some((info, known))
    }

    fn user_addr(&self, a: UserAddr) -> u64 {
        match a {
            UserAddr::In { region, offset } if !self.regions.is_empty() => {
                let k = self.regions[usize::from(region) % self.regions.len()];
                k.user.wrapping_add(u64::from(offset) % k.size.max(1))
            }
            UserAddr::In { offset, .. } => u64::from(offset),
            UserAddr::Raw(a) => a,
        }
    }

    /// Writes guest memory through the memfd of the region holding `gpa` (what fits in the
    /// region and in its file).
    fn guest_write(&self, gpa: u64, data: &[u8]) {
        let Some(k) = self
            .regions
            .iter()
            .find(|k| gpa.wrapping_sub(k.gpa) < k.size)
        else {
            return;
        };
        let f = &self.files[k.file];
        let file_len = f.metadata().map_or(0, |m| m.len());
        // `rel < k.size`, however the region wraps around the address space.
        let rel = gpa.wrapping_sub(k.gpa);
        let Some(off) = k.offset.checked_add(rel) else {
            return;
        };
        let room = (k.size - rel).min(file_len.saturating_sub(off));
        let n = data.len().min(usize::try_from(room).unwrap_or(usize::MAX));
        if n > 0 {
            let _ = f.write_at(&data[..n], off);
        }
    }

    /// Reads guest memory through the memfd of the region holding `gpa` (zeros where it has
    /// none).
    fn guest_read(&self, gpa: u64, out: &mut [u8]) {
        let Some(k) = self
            .regions
            .iter()
            .find(|k| gpa.wrapping_sub(k.gpa) < k.size)
        else {
            return;
        };
        let _ = self.files[k.file].read_at(out, k.offset.wrapping_add(gpa.wrapping_sub(k.gpa)));
    }

    /// A descriptor of `kind` to hand the backend, and the eventfd behind it if it is one.
    fn make_fd(&mut self, kind: FdKind) -> Option<(OwnedFd, Option<EventFd>)> {
        match kind {
            FdKind::EventFd => {
                let e = EventFd::new(EFD_NONBLOCK).ok()?;
                let give = owned(e.try_clone().ok()?);
                Some((give, Some(e)))
            }
            FdKind::PipeRead | FdKind::PipeWrite => {
                let mut p = [0 as RawFd; 2];
                // SAFETY: `p` has room for the two descriptors pipe2 writes.
                if unsafe { libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
                    return None;
                }
                // SAFETY: pipe2 succeeded: both are new descriptors nothing else owns.
                let (r, w) = unsafe { (OwnedFd::from_raw_fd(p[0]), OwnedFd::from_raw_fd(p[1])) };
                let (give, keep) = if kind == FdKind::PipeRead {
                    (r, w)
                } else {
                    (w, r)
                };
                self.kept.push(keep);
                Some((give, None))
            }
            FdKind::Memfd(n) => memfd((1 + u64::from(n)) * PAGE).map(|f| (OwnedFd::from(f), None)),
            FdKind::Socket => {
                let (a, b) = UnixStream::pair().ok()?;
                self.kept.push(OwnedFd::from(b));
                Some((OwnedFd::from(a), None))
            }
        }
    }

    fn set_vring_fd(&mut self, which: VringFd, q: u8, fd: Option<FdKind>) -> Flow {
        let code = match which {
            VringFd::Kick => 12,
            VringFd::Call => 13,
            VringFd::Err => 14,
        };
        let made = fd.and_then(|k| self.make_fd(k));
        let body = (u64::from(q) | if fd.is_none() { 0x100 } else { 0 }).to_le_bytes();
        let fds: Vec<RawFd> = made.iter().map(|m| m.0.as_raw_fd()).collect();
        let flags = 1 | if self.need_reply {
            VhostUserHeaderFlag::NEED_REPLY.bits()
        } else {
            0
        };
        if !self.send_raw(code, flags, &body, &fds) {
            return Flow::Closed;
        }
        if let Some((_, Some(e))) = made {
            if let Some(queue) = &mut self.queues[usize::from(q % 8)] {
                match which {
                    VringFd::Kick => queue.kick = e,
                    VringFd::Call => queue.call = e,
                    VringFd::Err => self.kept.push(owned(e)),
                }
            } else {
                self.kept.push(owned(e));
            }
        }
        Flow::Go
    }

    /// What a driver does to start queue `q` with `n` entries in region 0.
    fn setup_queue(&mut self, q: usize, n: u16) {
        let Some(r0) = self.regions.first().copied() else {
            return;
        };
        let base = r0.gpa.wrapping_add(q as u64 * 0x1_0000);
        self.guest_write(base, &[0u8; 0x3000]);
        let user = |gpa: u64| gpa.wrapping_sub(r0.gpa).wrapping_add(r0.user);
        let (Ok(kick), Ok(call)) = (EventFd::new(EFD_NONBLOCK), EventFd::new(EFD_NONBLOCK)) else {
            return;
        };
        let fe = &mut self.fe;
        t!(fe.set_vring_num(q, n));
        let cfg = VringConfigData {
            queue_max_size: QUEUE_SIZE,
            queue_size: n,
            flags: 0,
            desc_table_addr: user(base),
            used_ring_addr: user(base + 0x2000),
            avail_ring_addr: user(base + 0x1000),
            log_addr: None,
        };
        t!(fe.set_vring_addr(q, &cfg));
        t!(fe.set_vring_base(q, 0));
        t!(fe.set_vring_call(q, &call));
        t!(fe.set_vring_kick(q, &kick));
        t!(fe.set_vring_enable(q, true));
        self.queues[q] = Some(Queue {
            base,
            size: n,
            next_avail: 0,
            next_desc: 0,
            kick,
            call,
        });
    }

    /// What a driver does to send one request on queue `q`: header, data and status
    /// descriptors (direct, or in an indirect table), the avail entry and index, a kick; then
    /// it waits a little for the completion.
    fn request(&mut self, q: usize, kind: ReqKind, sector: u16, sectors: u8, indirect: bool) {
        let Some(queue) = &self.queues[q] else {
            return;
        };
        let (base, size, slot) = (queue.base, queue.size, queue.next_avail);
        let hdr = base + 0x3000 + 32 * u64::from(slot % 64);
        let data = base + 0x8000 + 0x2000 * u64::from(slot % 4);
        let len = 512 * (u32::from(sectors) % 17);
        let (rtype, payload) = match kind {
            ReqKind::In => (req_type::IN, (len > 0).then_some((len, F_WRITE))),
            ReqKind::Out => (req_type::OUT, (len > 0).then_some((len, 0))),
            ReqKind::Flush => (req_type::FLUSH, None),
            ReqKind::GetId => (req_type::GET_ID, Some((20, F_WRITE))),
            ReqKind::Discard | ReqKind::WriteZeroes => {
                let mut seg = [0u8; 16];
                seg[..8].copy_from_slice(&u64::from(sector).to_le_bytes());
                seg[8..12].copy_from_slice(&u32::from(sectors).to_le_bytes());
                seg[12] = u8::from(kind == ReqKind::WriteZeroes);
                self.guest_write(data, &seg);
                let t = if kind == ReqKind::Discard {
                    req_type::DISCARD
                } else {
                    req_type::WRITE_ZEROES
                };
                (t, Some((16, 0)))
            }
        };
        let mut header = [0u8; 16];
        header[..4].copy_from_slice(&rtype.to_le_bytes());
        header[8..].copy_from_slice(&u64::from(sector).to_le_bytes());
        self.guest_write(hdr, &header);
        let mut chain = vec![(hdr, 16u32, 0u16)];
        chain.extend(payload.map(|(l, f)| (data, l, f)));
        chain.push((hdr + 16, 1, F_WRITE));

        let desc = |addr: u64, len: u32, flags: u16, next: u16| {
            let mut b = [0u8; 16];
            b[..8].copy_from_slice(&addr.to_le_bytes());
            b[8..12].copy_from_slice(&len.to_le_bytes());
            b[12..14].copy_from_slice(&flags.to_le_bytes());
            b[14..].copy_from_slice(&next.to_le_bytes());
            b
        };
        let queue = self.queues[q].as_mut().expect("checked above");
        let mut writes = Vec::new();
        let head = queue.next_desc % size;
        if indirect || usize::from(size) < chain.len() {
            let table = base + 0x4000 + 64 * u64::from(slot % 64);
            for (i, &(a, l, f)) in chain.iter().enumerate() {
                let last = i + 1 == chain.len();
                let flags = if last { f } else { f | F_NEXT };
                writes.push((table + 16 * i as u64, desc(a, l, flags, i as u16 + 1)));
            }
            let entry = desc(table, 16 * chain.len() as u32, F_INDIRECT, 0);
            writes.push((base + 16 * u64::from(head), entry));
            queue.next_desc = queue.next_desc.wrapping_add(1);
        } else {
            for (i, &(a, l, f)) in chain.iter().enumerate() {
                let at = (queue.next_desc.wrapping_add(i as u16)) % size;
                let next = (queue.next_desc.wrapping_add(i as u16 + 1)) % size;
                let last = i + 1 == chain.len();
                let flags = if last { f } else { f | F_NEXT };
                writes.push((base + 16 * u64::from(at), desc(a, l, flags, next)));
            }
            queue.next_desc = queue.next_desc.wrapping_add(chain.len() as u16);
        }
        let avail = base + 0x1000;
        let pos = u64::from(queue.next_avail % size);
        queue.next_avail = queue.next_avail.wrapping_add(1);
        let idx = queue.next_avail;
        for (at, d) in writes {
            self.guest_write(at, &d);
        }
        self.guest_write(avail + 4 + 2 * pos, &head.to_le_bytes());
        // used_event: an interrupt once this request is used (with EVENT_IDX).
        self.guest_write(avail + 4 + 2 * u64::from(size), &slot.to_le_bytes());
        self.guest_write(avail + 2, &idx.to_le_bytes());
        let queue = self.queues[q].as_ref().expect("checked above");
        let _ = queue.kick.write(1);
        wait_readable(queue.call.as_raw_fd(), COMPLETION_WAIT);
        let called = queue.call.read();
        if trace() {
            let mut used = [0u8; 2];
            let mut status = [0xffu8];
            self.guest_read(base + 0x2002, &mut used);
            self.guest_read(hdr + 16, &mut status);
            let used = u16::from_le_bytes(used);
            eprintln!("  call {called:?}, used index {used}, status {}", status[0]);
        }
    }
}

impl Setup {
    fn features(&self, f: Features) -> u64 {
        match f {
            Features::Offered => self.offered,
            Features::Raw(b) => b,
        }
    }
}

fn bytes(s: Size) -> u64 {
    match s {
        Size::Pages(n) => (1 + u64::from(n)) * PAGE,
        Size::Raw(b) => b,
    }
}

fn offset_bytes(o: Offset) -> u64 {
    match o {
        Offset::Pages(n) => u64::from(n) * PAGE,
        Offset::Raw(b) => b,
    }
}

fn region_info(
    gpa: u64,
    size: u64,
    user: u64,
    offset: u64,
    fd: RawFd,
) -> VhostUserMemoryRegionInfo {
    VhostUserMemoryRegionInfo {
        guest_phys_addr: gpa,
        memory_size: size,
        userspace_addr: user,
        mmap_offset: offset,
        mmap_handle: fd,
    }
}

/// A new memfd of `len` bytes (sparse); `None` when the kernel refuses the size.
fn memfd(len: u64) -> Option<File> {
    const NAME: &CStr = c"vubd-fuzz";
    // SAFETY: a NUL-terminated name and valid flags; the result is checked.
    let fd = unsafe { libc::memfd_create(NAME.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return None;
    }
    // SAFETY: `fd` was just created and nothing else owns it.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(len).ok()?;
    Some(f)
}

/// Waits until `fd` is readable or `timeout` has passed.
fn wait_readable(fd: RawFd, timeout: Duration) {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: one live pollfd, and the count says one.
    unsafe { libc::poll(&mut p, 1, ms) };
}

enum Recv {
    /// A message (its body read and its descriptors closed).
    Msg {
        code: u32,
        flags: u32,
    },
    Eof,
    Timeout,
}

/// Reads one message from the backend.
fn recv_msg(sock: &UnixStream) -> Recv {
    let mut hdr = [0u8; 12];
    match recv_exact(sock, &mut hdr) {
        Ok(true) => {}
        Ok(false) => return Recv::Eof,
        Err(()) => return Recv::Timeout,
    }
    let word = |i: usize| u32::from_le_bytes(hdr[i..i + 4].try_into().expect("4 bytes"));
    let (code, flags, size) = (word(0), word(4), word(8));
    assert!(
        size <= 0x1000,
        "the backend sent a message of {size} bytes (code {code})"
    );
    let mut body = vec![0u8; size as usize];
    match recv_exact(sock, &mut body) {
        Ok(true) => Recv::Msg { code, flags },
        Ok(false) => Recv::Eof,
        Err(()) => Recv::Timeout,
    }
}

/// Fills `buf` from the socket, closing any descriptors that come with it: `Ok(false)` at
/// EOF (or a reset), `Err` when the read timeout passed.
fn recv_exact(sock: &UnixStream, buf: &mut [u8]) -> Result<bool, ()> {
    let mut at = 0;
    while at < buf.len() {
        let rest = &mut buf[at..];
        let mut iov = [libc::iovec {
            iov_base: rest.as_mut_ptr().cast(),
            iov_len: rest.len(),
        }];
        let mut fds = [0 as RawFd; 8];
        // SAFETY: the iovec covers the unfilled part of `buf`, which lives across the call.
        match unsafe { sock.recv_with_fds(&mut iov, &mut fds) } {
            Ok((0, _)) => return Ok(false),
            Ok((n, nfds)) => {
                for &fd in &fds[..nfds] {
                    // SAFETY: the descriptors just received are ours and owned by nothing else.
                    drop(unsafe { OwnedFd::from_raw_fd(fd) });
                }
                at += n;
            }
            Err(e) if e.errno() == libc::EINTR => {}
            Err(e) if e.errno() == libc::EAGAIN => return Err(()),
            Err(_) => return Ok(false),
        }
    }
    Ok(true)
}

fn owned(e: EventFd) -> OwnedFd {
    // SAFETY: `into_raw_fd` hands over the descriptor the eventfd owned, to no one else.
    unsafe { OwnedFd::from_raw_fd(e.into_raw_fd()) }
}
