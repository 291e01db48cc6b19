//! [`BlkFrontend`]: a vhost-user-blk frontend of our own, on the vhost crate's `Frontend`, for
//! what libblkio does not do: negotiate INFLIGHT_SHMFD, keep the inflight region across backend
//! restarts, and reconnect after a backend crash the way QEMU does.
//!
//! - **Guest memory** is one memfd region at guest address [`GPA_BASE`], holding every queue's
//!   split rings (descriptor table, avail ring, used ring, each on pages of its own) and the
//!   request buffers. A queue of `queue_size` entries has `queue_size / 3` request slots: slot
//!   `i` owns descriptors `3i..3i + 3` (header, data, status), so its head is `3i`, a 16-byte
//!   header and a status byte, and a [`BLOCK`]-byte data buffer.
//! - **Start** ([`BlkFrontend::connect`]): SET_OWNER, GET_FEATURES, the protocol features (MQ,
//!   REPLY_ACK, CONFIG, and INFLIGHT_SHMFD unless [`Options::inflight`] is off; with REPLY_ACK
//!   every later message waits for its ack), GET_QUEUE_NUM, SET_FEATURES (VERSION_1, MQ, FLUSH,
//!   EVENT_IDX if [`Options::event_idx`]), GET_CONFIG (the capacity), then as QEMU 7.2 does:
//!   GET_INFLIGHT_FD on the first start only, keeping the fd and size it returns, and
//!   SET_INFLIGHT_FD with them on every start; SET_MEM_TABLE; per queue SET_VRING_NUM, BASE,
//!   ADDR (addresses in this process, translated through the memory table), KICK, CALL, ENABLE;
//!   and a kick of every queue ([`Options::kick_after_start`]). With [`Options::dirty_log`]
//!   it also negotiates LOG_SHMFD and ends with SET_LOG_BASE and SET_FEATURES + LOG_ALL.
//! - **Restart** ([`BlkFrontend::reconnect`]), after the backend died: what QEMU does when
//!   GET_VRING_BASE fails on a dead backend: the device's next avail index is rewound to the
//!   used ring's index (`virtio_queue_restore_last_avail_idx`), then the start above runs on a
//!   new connection (the region kept, so GET_INFLIGHT_FD is not sent again) with SET_VRING_BASE
//!   = that used index.
//! - **Requests**: [`BlkFrontend::submit`] writes a chain and its avail entry,
//!   [`BlkFrontend::notify`] publishes the avail index and kicks unless the backend suppressed
//!   kicks, [`BlkFrontend::reap`] walks the used ring and fails on a used element whose head is
//!   not in flight: a request completed twice, or one never submitted. Slots are reused in the
//!   order they were freed, so that a head stays free as long as possible.
//! - **Inspection**: the inflight region is mapped here too ([`BlkFrontend::inflight_area`]),
//!   and the used ring can be written as a backend would ([`BlkFrontend::put_used`]), so that a
//!   test can read what a killed backend left, or build the exact state a kill at a given
//!   instruction leaves.
//! - **Misbehaving** (`frontend/hostile.rs`): what a guest or a frontend taken over by one can
//!   do to a backend: avail indices and heads out of range, chains of its own making
//!   (descriptor loops, huge indirect tables in [`Options::extra_memory`]), pipes instead of
//!   eventfds ([`Options::kick_fd`], [`Options::call_fd`]), the error eventfd watched
//!   ([`Options::err_fd`]), raw messages, and a ring stopped and started again.
//!
//! Not a submodule of `common`: the test binaries that use it declare it next to `mod common;`
//! (see `common/mod.rs`). It depends on nothing else there, so `examples/vhost_frontend_load.rs`
//! includes it by path.

// Each user (test binaries, the load example) uses a different part of this module.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{Ordering, fence};
use std::time::Duration;
use std::{ptr, slice};

use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserInflight, VhostUserProtocolFeatures,
    VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

#[path = "frontend/dirty.rs"]
mod dirty;
#[path = "frontend/memory.rs"]
mod memory;
#[path = "frontend/region.rs"]
mod region;
#[path = "frontend/shm.rs"]
mod shm;

use dirty::KeptLog;
pub use region::Area;
use region::KeptRegion;
use shm::Mapping;

/// Guest address of the first byte of guest memory: not 0, so that a backend confusing
/// offsets with addresses fails.
pub const GPA_BASE: u64 = 1 << 30;
/// Bytes of a request's data buffer: the largest read or write [`BlkFrontend::submit`] takes.
pub const BLOCK: usize = 4096;
/// The virtio-blk sector (virtio 1.2 §5.2.6).
pub const SECTOR: u64 = 512;
/// `VIRTIO_BLK_S_OK`.
pub const STATUS_OK: u8 = 0;
/// What a status byte holds until the backend writes one.
pub const STATUS_UNSET: u8 = 0xff;

const PAGE: usize = 4096;
/// Descriptors per request: header, data, status.
const CHAIN: u16 = 3;
/// Bytes of a slot's header area: the 16-byte request header, then the status byte.
const HDR_AREA: usize = 32;
const STATUS_OFF: usize = 16;

// virtio 1.2 §2.7.5, §2.7.6, §2.7.8: descriptor, avail and used flags.
pub const DESC_F_NEXT: u16 = 1;
pub const DESC_F_WRITE: u16 = 2;
pub const DESC_F_INDIRECT: u16 = 4;
const AVAIL_F_NO_INTERRUPT: u16 = 1;
const USED_F_NO_NOTIFY: u16 = 1;
// virtio 1.2 §5.2.6: request types.
const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
// Feature bits: virtio-blk FLUSH and MQ (§5.2.3), RING_EVENT_IDX and VERSION_1 (§6).
const F_BLK_FLUSH: u64 = 1 << 9;
const F_BLK_MQ: u64 = 1 << 12;
const F_EVENT_IDX: u64 = 1 << 29;
const F_VERSION_1: u64 = 1 << 32;

/// Why the frontend failed.
#[derive(Debug, thiserror::Error)]
pub enum FrontendError {
    #[error("vhost-user request failed")]
    Vhost(#[source] vhost::Error),
    #[error("cannot set up shared memory or eventfds")]
    Io(#[source] io::Error),
    #[error("the backend does not offer {0}")]
    Missing(&'static str),
    #[error("the backend has {offered} queues, {wanted} wanted")]
    TooFewQueues { offered: u64, wanted: u16 },
    #[error("the inflight region ({size} bytes for {queues} queues) cannot hold {entries} entries")]
    BadRegion {
        size: u64,
        queues: u16,
        entries: u16,
    },
    #[error("not connected")]
    Disconnected,
    #[error("queue {queue}: no free request slot")]
    Full { queue: usize },
    #[error("queue {queue}: used element {pos} names {id}, not a request head of this frontend")]
    BadHead { queue: usize, pos: u16, id: u32 },
    #[error("queue {queue}: used element {pos} completes head {head}, which is not in flight")]
    NotInFlight { queue: usize, pos: u16, head: u16 },
}

impl From<vhost::Error> for FrontendError {
    fn from(e: vhost::Error) -> Self {
        Self::Vhost(e)
    }
}

impl From<io::Error> for FrontendError {
    fn from(e: io::Error) -> Self {
        Self::Io(e)
    }
}

/// What the frontend gives the backend as a ring's kick or call fd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FdKind {
    /// An eventfd, as vhost-user requires.
    Eventfd,
    /// A pipe (blocking): the backend reads the kick from its read end, or writes interrupts
    /// to its write end, which nobody reads.
    Pipe,
    /// A blocking eventfd whose counter is at its maximum (0xffff_ffff_ffff_fffe), as a
    /// frontend that never reads it leaves it: one more write would wait for a read.
    FullEventfd,
}

/// What the frontend negotiates and how it behaves.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    pub num_queues: u16,
    /// Entries of every queue (a multiple of 3 is not needed; `size / 3` requests fit).
    pub queue_size: u16,
    /// Negotiate INFLIGHT_SHMFD and keep the region (fails to start if it is not offered).
    pub inflight: bool,
    /// Negotiate VIRTIO_F_RING_EVENT_IDX if offered.
    pub event_idx: bool,
    /// Ask for used-buffer notifications (off: a client that busy-polls the used rings).
    pub interrupts: bool,
    /// Kick every queue once it is set up on a (new) connection.
    pub kick_after_start: bool,
    /// Negotiate LOG_SHMFD and turn dirty logging on after each start ([`BlkFrontend::log_all`]).
    pub dirty_log: bool,
    /// How long to wait for each reply of the backend (and to send a message): a backend
    /// that hangs fails the frontend instead of blocking it.
    pub reply_timeout: Duration,
    /// Give every queue an error eventfd (SET_VRING_ERR), watched by `error_signalled`.
    pub err_fd: bool,
    /// What every queue's kick fd is.
    pub kick_fd: FdKind,
    /// What every queue's call fd is.
    pub call_fd: FdKind,
    /// Bytes of guest memory after the queues' parts, for chains a test builds itself.
    pub extra_memory: usize,
    /// Negotiate BACKEND_REQ and give the backend a channel for its own messages
    /// ([`BlkFrontend::config_notice`]).
    pub backend_channel: bool,
    /// Where GET_CONFIG reads the configuration space: 0, as QEMU and libblkio ask, or
    /// VHOST_USER_CONFIG_OFFSET (0x100), as cloud-hypervisor does.
    pub config_offset: u32,
}

impl Options {
    /// `num_queues` queues of 256 entries, inflight tracking, EVENT_IDX, interrupts, a kick
    /// after each start, 10 s for each reply.
    pub fn new(num_queues: u16) -> Self {
        Self {
            num_queues,
            queue_size: 256,
            inflight: true,
            event_idx: true,
            interrupts: true,
            kick_after_start: true,
            dirty_log: false,
            reply_timeout: Duration::from_secs(10),
            err_fd: false,
            kick_fd: FdKind::Eventfd,
            call_fd: FdKind::Eventfd,
            extra_memory: 0,
            backend_channel: false,
            config_offset: 0,
        }
    }
}

/// One request for [`BlkFrontend::submit`].
#[derive(Debug, Clone, Copy)]
pub enum Request<'a> {
    /// Reads `len` (at most [`BLOCK`], a multiple of 512) bytes at `sector`.
    Read {
        sector: u64,
        len: usize,
    },
    /// Writes `data` (at most [`BLOCK`] bytes, a multiple of 512) at `sector`.
    Write {
        sector: u64,
        data: &'a [u8],
    },
    Flush,
    GetId,
}

/// A request the backend completed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    pub queue: usize,
    pub head: u16,
    /// What the submitter gave [`BlkFrontend::submit`].
    pub tag: u64,
    pub status: u8,
    /// The used element's length.
    pub len: u32,
}

/// One virtqueue: where its parts are in guest memory (offsets), and the driver's state.
#[derive(Debug)]
struct Vq {
    size: u16,
    desc: usize,
    avail: usize,
    used: usize,
    hdrs: usize,
    data: usize,
    /// What the frontend writes to kick, and reads and polls for interrupts.
    kick: EventFd,
    call: EventFd,
    /// What the backend gets instead, when it is not the same fd: a pipe's other end.
    kick_sent: Option<EventFd>,
    call_sent: Option<EventFd>,
    /// The error eventfd (SET_VRING_ERR, with [`Options::err_fd`]).
    err: EventFd,
    /// The driver's avail index, published or not.
    avail_idx: u16,
    /// The avail index last published.
    published: u16,
    /// The next used element to read.
    last_used: u16,
    /// The submitter's tag of the request in each slot; `None` when free.
    slots: Vec<Option<u64>>,
    /// Free slots, the longest free first: a head is reused as late as possible, so that a
    /// second completion of it is seen as one (not taken for the next request's).
    free: VecDeque<u16>,
}

/// A vhost-user-blk frontend with its own guest memory; see the module documentation.
pub struct BlkFrontend {
    socket: PathBuf,
    opts: Options,
    conn: Option<Frontend>,
    mem: Mapping,
    queues: Vec<Vq>,
    inflight: Option<KeptRegion>,
    log: Option<KeptLog>,
    features: u64,
    protocol: VhostUserProtocolFeatures,
    capacity: u64,
    starts: u32,
    /// Offset of [`Options::extra_memory`] in guest memory.
    extra: usize,
    /// This end of the backend's channel ([`Options::backend_channel`]).
    backend_channel: Option<UnixStream>,
}

impl std::fmt::Debug for BlkFrontend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlkFrontend")
            .field("socket", &self.socket)
            .field("opts", &self.opts)
            .field("features", &format_args!("{:#x}", self.features))
            .field("protocol", &self.protocol)
            .field("starts", &self.starts)
            .finish_non_exhaustive()
    }
}

fn page_align(n: usize) -> usize {
    n.next_multiple_of(PAGE)
}

impl BlkFrontend {
    /// Connects to the backend listening on `socket` and starts every queue.
    pub fn connect(socket: &Path, opts: Options) -> Result<Self, FrontendError> {
        assert!(opts.num_queues > 0 && opts.queue_size >= CHAIN);
        let size = usize::from(opts.queue_size);
        let slots = opts.queue_size / CHAIN;
        let mut len = 0;
        let mut parts = Vec::new();
        for _ in 0..opts.num_queues {
            let desc = len;
            let avail = desc + page_align(16 * size);
            let used = avail + page_align(6 + 2 * size);
            let hdrs = used + page_align(6 + 8 * size);
            let data = hdrs + page_align(HDR_AREA * usize::from(slots));
            len = data + BLOCK * usize::from(slots);
            parts.push((desc, avail, used, hdrs, data));
        }
        let extra = page_align(len);
        let len = extra + page_align(opts.extra_memory);
        let mem = Mapping::memfd(c"blk-frontend-memory", len)?;
        let mut queues = Vec::new();
        for (desc, avail, used, hdrs, data) in parts {
            // A pipe's write end is what the frontend keeps for kicks and gives for calls.
            let (kick, kick_sent) = vring_fd(opts.kick_fd, true)?;
            let (call, call_sent) = vring_fd(opts.call_fd, false)?;
            queues.push(Vq {
                size: opts.queue_size,
                desc,
                avail,
                used,
                hdrs,
                data,
                kick,
                call,
                kick_sent,
                call_sent,
                err: EventFd::new(EFD_NONBLOCK)?,
                avail_idx: 0,
                published: 0,
                last_used: 0,
                slots: vec![None; usize::from(slots)],
                free: (0..slots).collect(),
            });
        }
        let mut fe = Self {
            socket: socket.to_owned(),
            opts,
            conn: None,
            mem,
            queues,
            inflight: None,
            log: None,
            features: 0,
            protocol: VhostUserProtocolFeatures::empty(),
            capacity: 0,
            starts: 0,
            extra,
            backend_channel: None,
        };
        fe.start()?;
        Ok(fe)
    }

    /// After the backend died: a new connection to `socket` (a new backend listening there),
    /// with every queue's next avail index rewound to its used index, as QEMU does.
    pub fn reconnect(&mut self) -> Result<(), FrontendError> {
        self.conn = None;
        self.start()
    }

    /// Stops queue `q` (GET_VRING_BASE) and returns the backend's next avail index: every
    /// request below it has completed (vhost-user, "Starting and stopping rings").
    pub fn stop_queue(&mut self, q: usize) -> Result<u16, FrontendError> {
        let conn = self.conn.as_ref().ok_or(FrontendError::Disconnected)?;
        let base = conn.get_vring_base(q)?;
        // The index is 16 bits on a split ring; the message carries 32.
        Ok(u16::try_from(base & 0xffff).expect("masked"))
    }

    /// Closes the connection (the backend sees the frontend go).
    pub fn disconnect(&mut self) {
        self.conn = None;
    }

    fn start(&mut self) -> Result<(), FrontendError> {
        let opts = self.opts;
        let stream = UnixStream::connect(&self.socket)?;
        stream.set_read_timeout(Some(opts.reply_timeout))?;
        stream.set_write_timeout(Some(opts.reply_timeout))?;
        let mut conn = Frontend::from_stream(stream, u64::from(opts.num_queues));
        conn.set_owner()?;
        let offered = conn.get_features()?;
        let protocol_bit = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if offered & F_VERSION_1 == 0 {
            return Err(FrontendError::Missing("VIRTIO_F_VERSION_1"));
        }
        if offered & protocol_bit == 0 {
            return Err(FrontendError::Missing("VHOST_USER_F_PROTOCOL_FEATURES"));
        }
        let offered_protocol = conn.get_protocol_features()?;
        let mut want = VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIG;
        if opts.inflight {
            if !offered_protocol.contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD) {
                return Err(FrontendError::Missing(
                    "VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD",
                ));
            }
            want |= VhostUserProtocolFeatures::INFLIGHT_SHMFD;
        }
        if opts.dirty_log {
            if !offered_protocol.contains(VhostUserProtocolFeatures::LOG_SHMFD) {
                return Err(FrontendError::Missing("VHOST_USER_PROTOCOL_F_LOG_SHMFD"));
            }
            if offered & dirty::F_LOG_ALL == 0 {
                return Err(FrontendError::Missing("VHOST_F_LOG_ALL"));
            }
            want |= VhostUserProtocolFeatures::LOG_SHMFD;
        }
        if opts.backend_channel {
            if !offered_protocol.contains(VhostUserProtocolFeatures::BACKEND_REQ) {
                return Err(FrontendError::Missing("VHOST_USER_PROTOCOL_F_BACKEND_REQ"));
            }
            want |= VhostUserProtocolFeatures::BACKEND_REQ;
        }
        let protocol = offered_protocol & want;
        conn.set_protocol_features(protocol)?;
        if protocol.contains(VhostUserProtocolFeatures::REPLY_ACK) {
            conn.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }
        let queue_num = conn.get_queue_num()?;
        if queue_num < u64::from(opts.num_queues) {
            return Err(FrontendError::TooFewQueues {
                offered: queue_num,
                wanted: opts.num_queues,
            });
        }
        let mut features = F_VERSION_1 | F_BLK_MQ | F_BLK_FLUSH | protocol_bit;
        if opts.event_idx {
            features |= F_EVENT_IDX;
        }
        let features = features & offered;
        conn.set_features(features)?;
        if opts.backend_channel {
            let (ours, theirs) = UnixStream::pair()?;
            conn.set_backend_request_fd(&theirs)?;
            self.backend_channel = Some(ours);
        }
        let (_, capacity) = conn.get_config(
            opts.config_offset,
            8,
            VhostUserConfigFlags::empty(),
            &[0; 8],
        )?;
        let capacity = u64::from_le_bytes(capacity[..8].try_into().expect("8 bytes"));
        if opts.inflight {
            if self.inflight.is_none() {
                let ask = VhostUserInflight::new(0, 0, opts.num_queues, opts.queue_size);
                let (msg, file) = conn.get_inflight_fd(&ask)?;
                self.inflight = Some(KeptRegion::new(msg, file, opts)?);
            }
            let kept = self.inflight.as_ref().expect("kept above");
            conn.set_inflight_fd(kept.msg(), kept.fd())?;
        }
        conn.set_mem_table(&[VhostUserMemoryRegionInfo {
            guest_phys_addr: GPA_BASE,
            memory_size: self.mem.len() as u64,
            userspace_addr: self.mem.ptr() as u64,
            mmap_offset: 0,
            mmap_handle: self.mem.file().as_raw_fd(),
        }])?;
        for (q, vq) in self.queues.iter().enumerate() {
            // The device's next avail index: 0 on a new ring; after a crash, QEMU's rewind to
            // the used index (a backend with the region adds what is still in flight).
            let base = if self.starts == 0 {
                0
            } else {
                self.mem.u16_at(vq.used + 2)
            };
            self.set_up_ring(&mut conn, q, base)?;
        }
        self.conn = Some(conn);
        self.features = features;
        self.protocol = protocol;
        self.capacity = capacity;
        self.starts += 1;
        if opts.dirty_log {
            self.log_all()?;
        }
        for q in 0..self.queues.len() {
            self.ask_interrupts(q);
            if opts.kick_after_start {
                self.kick(q)?;
            }
        }
        Ok(())
    }

    /// Sets queue `q`'s ring up on `conn` and enables it: SET_VRING_NUM, BASE (`base`), ADDR,
    /// KICK, CALL, ERR (with [`Options::err_fd`]), ENABLE.
    fn set_up_ring(&self, conn: &mut Frontend, q: usize, base: u16) -> Result<(), FrontendError> {
        let vq = &self.queues[q];
        let host = |off: usize| self.mem.ptr().wrapping_add(off) as u64;
        conn.set_vring_num(q, vq.size)?;
        conn.set_vring_base(q, base)?;
        conn.set_vring_addr(
            q,
            &VringConfigData {
                queue_max_size: vq.size,
                queue_size: vq.size,
                flags: 0,
                desc_table_addr: host(vq.desc),
                used_ring_addr: host(vq.used),
                avail_ring_addr: host(vq.avail),
                log_addr: None,
            },
        )?;
        conn.set_vring_kick(q, vq.kick_sent.as_ref().unwrap_or(&vq.kick))?;
        conn.set_vring_call(q, vq.call_sent.as_ref().unwrap_or(&vq.call))?;
        if self.opts.err_fd {
            conn.set_vring_err(q, &vq.err)?;
        }
        conn.set_vring_enable(q, true)?;
        Ok(())
    }

    /// The negotiated virtio features.
    pub fn features(&self) -> u64 {
        self.features
    }

    pub fn event_idx(&self) -> bool {
        self.features & F_EVENT_IDX != 0
    }

    /// Whether INFLIGHT_SHMFD was negotiated.
    pub fn tracks_inflight(&self) -> bool {
        self.protocol
            .contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD)
    }

    /// The disk's capacity in sectors (GET_CONFIG).
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    pub fn num_queues(&self) -> usize {
        self.queues.len()
    }

    /// Request slots of each queue.
    pub fn slots(&self) -> usize {
        usize::from(self.opts.queue_size / CHAIN)
    }

    pub fn free_slots(&self, q: usize) -> usize {
        self.queues[q].free.len()
    }

    /// Reorders queue `q`'s free slots as out-of-order completions would have (a fixed
    /// shuffle), so that the next requests' heads are not in ascending order.
    pub fn scramble_free_slots(&mut self, q: usize) {
        let free = self.queues[q].free.make_contiguous();
        free.sort_unstable_by_key(|&s| u32::from(s).wrapping_mul(2_654_435_761) >> 8);
    }

    /// Requests of queue `q` in flight: `(head, tag)`.
    pub fn in_flight(&self, q: usize) -> Vec<(u16, u64)> {
        let vq = &self.queues[q];
        (0..vq.slots.len())
            .filter_map(|s| vq.slots[s].map(|tag| (head_of(s), tag)))
            .collect()
    }

    fn hdr(&self, q: usize, slot: usize) -> usize {
        self.queues[q].hdrs + HDR_AREA * slot
    }

    fn data(&self, q: usize, slot: usize) -> usize {
        self.queues[q].data + BLOCK * slot
    }

    fn gpa(off: usize) -> u64 {
        GPA_BASE + off as u64
    }

    fn set_desc(&self, q: usize, i: u16, (addr, len, flags, next): (u64, u32, u16, u16)) {
        let d = self.queues[q].desc + 16 * usize::from(i);
        self.mem.set_u64(d, addr);
        self.mem.set_u32(d + 8, len);
        self.mem.set_u16(d + 12, flags);
        self.mem.set_u16(d + 14, next);
    }

    /// Writes `req`'s chain and avail entry on queue `q` (visible to the backend at the next
    /// [`BlkFrontend::publish`] or [`BlkFrontend::notify`]); returns its head.
    pub fn submit(&mut self, q: usize, req: Request<'_>, tag: u64) -> Result<u16, FrontendError> {
        let slot = self.queues[q]
            .free
            .pop_front()
            .ok_or(FrontendError::Full { queue: q })?;
        let s = usize::from(slot);
        let head = head_of(s);
        let (hdr, data) = (self.hdr(q, s), self.data(q, s));
        let (kind, sector, data_len, data_flags) = match req {
            Request::Read { sector, len } => (T_IN, sector, len, DESC_F_WRITE),
            Request::Write {
                sector,
                data: bytes,
            } => {
                assert!(bytes.len() <= BLOCK, "writes are limited to {BLOCK} bytes");
                let dst = self.mem.at(data, bytes.len());
                // SAFETY: `dst` is `bytes.len()` bytes of the mapping (checked by `at`), in
                // this free slot's buffer, which the backend does not touch before the request
                // is published.
                unsafe { ptr::copy_nonoverlapping(bytes.as_ptr(), dst, bytes.len()) };
                (T_OUT, sector, bytes.len(), 0)
            }
            Request::Flush => (T_FLUSH, 0, 0, 0),
            Request::GetId => (T_GET_ID, 0, 20, DESC_F_WRITE),
        };
        assert!(data_len <= BLOCK, "requests are limited to {BLOCK} bytes");
        self.mem.set_u32(hdr, kind);
        self.mem.set_u32(hdr + 4, 0);
        self.mem.set_u64(hdr + 8, sector);
        self.mem.write(hdr + STATUS_OFF, STATUS_UNSET);
        let status = (Self::gpa(hdr + STATUS_OFF), 1, DESC_F_WRITE, 0);
        self.set_desc(q, head, (Self::gpa(hdr), 16, DESC_F_NEXT, head + 1));
        if data_len > 0 {
            let len = u32::try_from(data_len).expect("at most BLOCK");
            let flags = DESC_F_NEXT | data_flags;
            self.set_desc(q, head + 1, (Self::gpa(data), len, flags, head + 2));
            self.set_desc(q, head + 2, status);
        } else {
            self.set_desc(q, head + 1, status);
        }
        let vq = &mut self.queues[q];
        let pos = vq.avail + 4 + 2 * usize::from(vq.avail_idx % vq.size);
        self.mem.set_u16(pos, head);
        vq.avail_idx = vq.avail_idx.wrapping_add(1);
        vq.slots[s] = Some(tag);
        Ok(head)
    }

    /// Makes the submitted chains of queue `q` available (release ordering), without a kick.
    /// Returns the avail index published before.
    pub fn publish(&mut self, q: usize) -> u16 {
        let vq = &mut self.queues[q];
        let old = vq.published;
        fence(Ordering::Release);
        self.mem.set_u16(vq.avail + 2, vq.avail_idx);
        vq.published = vq.avail_idx;
        old
    }

    /// Publishes queue `q`'s new chains and kicks the backend unless it suppressed kicks
    /// (virtio 1.2 §2.7.10); returns whether it kicked.
    pub fn notify(&mut self, q: usize) -> Result<bool, FrontendError> {
        let old = self.publish(q);
        let vq = &self.queues[q];
        let new = vq.published;
        if old == new {
            return Ok(false);
        }
        // The index store before the backend's suppression state is read.
        fence(Ordering::SeqCst);
        let kick = if self.event_idx() {
            let event = self.mem.u16_at(vq.used + 4 + 8 * usize::from(vq.size));
            // vring_need_event(event, new, old)
            new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
        } else {
            self.mem.u16_at(vq.used) & USED_F_NO_NOTIFY == 0
        };
        if kick {
            self.kick(q)?;
        }
        Ok(kick)
    }

    /// Kicks queue `q`, whatever the backend asked.
    pub fn kick(&self, q: usize) -> Result<(), FrontendError> {
        self.queues[q].kick.write(1).map_err(FrontendError::Io)
    }

    /// Tells the backend whether used-buffer notifications are wanted, from the next used
    /// element on.
    fn ask_interrupts(&self, q: usize) {
        let vq = &self.queues[q];
        if self.event_idx() {
            if self.opts.interrupts {
                let at = vq.avail + 4 + 2 * usize::from(vq.size);
                self.mem.set_u16(at, vq.last_used);
            }
        } else {
            let flags = if self.opts.interrupts {
                0
            } else {
                AVAIL_F_NO_INTERRUPT
            };
            self.mem.set_u16(vq.avail, flags);
        }
    }

    /// Reads queue `q`'s new used elements: `f` gets each completion and the request's data
    /// buffer (what a read returned). A used element naming a head that is not in flight is
    /// an error. Returns how many completed.
    pub fn reap(
        &mut self,
        q: usize,
        mut f: impl FnMut(Completion, &[u8]),
    ) -> Result<usize, FrontendError> {
        let used_idx = self.used_idx(q);
        fence(Ordering::Acquire);
        let mut n = 0;
        while self.queues[q].last_used != used_idx {
            let vq = &self.queues[q];
            let pos = vq.last_used;
            let elem = vq.used + 4 + 8 * usize::from(pos % vq.size);
            let (id, len) = (self.mem.u32_at(elem), self.mem.u32_at(elem + 4));
            let slot = u16::try_from(id)
                .ok()
                .filter(|h| h % CHAIN == 0 && usize::from(h / CHAIN) < vq.slots.len())
                .map(|h| usize::from(h / CHAIN))
                .ok_or(FrontendError::BadHead { queue: q, pos, id })?;
            let head = head_of(slot);
            let tag = self.queues[q].slots[slot].ok_or(FrontendError::NotInFlight {
                queue: q,
                pos,
                head,
            })?;
            let status = self.mem.read(self.hdr(q, slot) + STATUS_OFF);
            let data = self.mem.at(self.data(q, slot), BLOCK);
            // SAFETY: the slot's buffer is BLOCK bytes of the live mapping (checked by `at`);
            // its request completed, so the backend does not write it until it is submitted
            // again, which cannot happen while the slice, borrowed with `self`, is alive.
            let data = unsafe { slice::from_raw_parts(data, BLOCK) };
            let c = Completion {
                queue: q,
                head,
                tag,
                status,
                len,
            };
            f(c, data);
            let vq = &mut self.queues[q];
            vq.slots[slot] = None;
            vq.free
                .push_back(u16::try_from(slot).expect("slots fit u16"));
            vq.last_used = pos.wrapping_add(1);
            n += 1;
        }
        if n > 0 {
            self.ask_interrupts(q);
        }
        Ok(n)
    }

    /// Waits up to `timeout` for a used-buffer notification on any queue (and clears them).
    pub fn wait(&self, timeout: Duration) -> Result<bool, FrontendError> {
        let mut fds: Vec<libc::pollfd> = self
            .queues
            .iter()
            .map(|vq| libc::pollfd {
                fd: vq.call.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
        let nfds = libc::nfds_t::try_from(fds.len()).expect("few queues");
        // SAFETY: `fds` is a live array of `nfds` pollfd structures.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), nfds, ms) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.kind() {
                io::ErrorKind::Interrupted => Ok(false),
                _ => Err(FrontendError::Io(e)),
            };
        }
        for vq in &self.queues {
            // Non-blocking: nothing to read is not an error worth reporting here.
            let _ = vq.call.read();
        }
        Ok(n > 0)
    }

    /// The used ring's index of queue `q`.
    pub fn used_idx(&self, q: usize) -> u16 {
        self.mem.u16_at(self.queues[q].used + 2)
    }

    /// The next used element this frontend will read.
    pub fn last_used(&self, q: usize) -> u16 {
        self.queues[q].last_used
    }

    /// The driver's avail index (published or not).
    pub fn avail_idx(&self, q: usize) -> u16 {
        self.queues[q].avail_idx
    }

    /// The head used element `pos` of queue `q` names (whatever the used index says).
    pub fn used_id(&self, q: usize, pos: u16) -> u32 {
        let vq = &self.queues[q];
        self.mem
            .u32_at(vq.used + 4 + 8 * usize::from(pos % vq.size))
    }

    /// Writes used element `pos` of queue `q` as a backend would (without publishing it).
    pub fn put_used(&self, q: usize, pos: u16, head: u16, len: u32) {
        let vq = &self.queues[q];
        let elem = vq.used + 4 + 8 * usize::from(pos % vq.size);
        self.mem.set_u32(elem, u32::from(head));
        self.mem.set_u32(elem + 4, len);
    }

    /// Sets queue `q`'s used index as a backend would when it publishes.
    pub fn set_used_idx(&self, q: usize, idx: u16) {
        fence(Ordering::Release);
        self.mem.set_u16(self.queues[q].used + 2, idx);
    }

    /// Writes the status byte of the request at `head` of queue `q` as a backend would.
    pub fn set_status(&self, q: usize, head: u16, status: u8) {
        let slot = usize::from(head / CHAIN);
        self.mem.write(self.hdr(q, slot) + STATUS_OFF, status);
    }

    /// Queue `q`'s area of the kept inflight region, if the frontend keeps one.
    pub fn inflight_area(&mut self, q: usize) -> Option<Area<'_>> {
        Some(self.inflight.as_mut()?.area(q))
    }
}

/// The head of request slot `slot`.
fn head_of(slot: usize) -> u16 {
    u16::try_from(slot).expect("slots fit u16") * CHAIN
}

/// A ring's kick (`kick`) or call fd of kind `kind`: what the frontend keeps (writes kicks
/// to, or polls and reads for interrupts), and what the backend gets if that is another fd.
fn vring_fd(kind: FdKind, kick: bool) -> io::Result<(EventFd, Option<EventFd>)> {
    match kind {
        FdKind::Eventfd => Ok((EventFd::new(EFD_NONBLOCK)?, None)),
        FdKind::FullEventfd => {
            let fd = EventFd::new(0)?;
            fd.write(u64::MAX - 1)?;
            Ok((fd, None))
        }
        FdKind::Pipe => {
            let mut fds = [0; 2];
            // SAFETY: `fds` is a live array of the two ints pipe2 writes.
            if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: pipe2 returned two new descriptors that nothing else owns; each is
            // moved into one EventFd (its reads and writes of 8 bytes work on a pipe too).
            let (read, write) =
                unsafe { (EventFd::from_raw_fd(fds[0]), EventFd::from_raw_fd(fds[1])) };
            Ok(if kick {
                (write, Some(read))
            } else {
                (read, Some(write))
            })
        }
    }
}

#[path = "frontend/hostile.rs"]
mod hostile;
#[path = "frontend/notice.rs"]
mod notice;
