//! A namespace of a remote NVMe/TCP subsystem as a block device, through vubd's own
//! initiator (`nvme::tcp`).
//!
//! - [`NvmeTcpDevice`] brings the controller up at startup (errors the user can fix are
//!   reported then) and starts the supervisor thread, which owns the admin queue: keep-alive
//!   at half the keep-alive timeout, and the reconnection of the whole controller when any
//!   queue fails (a lost connection, a malformed PDU, an I/O timeout).
//! - Each poller gets an [`NvmeTcpChannel`] with an I/O queue of its own (one QID, one TCP
//!   connection). Connections travel between the supervisor and the channels through a
//!   per-queue hand-off slot: only the reconnection path takes its lock.
//!
//! - The namespace's capacity follows its controller: the supervisor keeps an Asynchronous
//!   Event Request outstanding on the admin queue and, when the controller reports that the
//!   namespace changed, reads its size again (`supervisor`); `device_resize` asks the
//!   supervisor to read it ([`NvmeTcpDevice::resize`]), since the admin queue is its alone.
//!
//! After a fault, the commands in flight stay in their queues and are sent again on the new
//! connections, so the guest sees no error, until `ctrl_loss_tmo` passes: then the channels
//! fail them and fail new requests at once, until the supervisor brings the controller back.
//! The requests of a queue being stopped wait no longer than the I/O timeout (see
//! [`NvmeTcpChannel`]'s draining).

mod channel;
mod supervisor;

use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use thiserror::Error;
use tracing::info;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

pub use self::channel::NvmeTcpChannel;
use self::supervisor::{SizeAnswer, Supervisor};
use super::capacity::{Capacity, Resize, ResizeError};
use super::nvme_ops::{Namespace, lba_shift_of};
use super::{BlockDevice, DeviceInfo};
use crate::nvme::split::max_rw_blocks;
use crate::nvme::tcp::ctrl::{Controller, CtrlError, CtrlOptions, TargetAddr};
use crate::nvme::tcp::host::HostId;
use crate::nvme::tcp::queue::IoQueueConn;

/// Where the namespace is and how to reach it.
#[derive(Clone, Debug)]
pub struct NvmeTcpConfig {
    pub addr: TargetAddr,
    pub subnqn: crate::nvme::spec::Nqn,
    pub nsid: u32,
    pub host: HostId,
    pub ctrl: CtrlOptions,
    pub ctrl_loss_tmo: Duration,
    pub reconnect_delay: Duration,
    /// I/O queues to ask for: one per poller.
    pub io_queues: u16,
    pub read_only: bool,
}

#[derive(Debug, Error)]
pub enum NvmeTcpError {
    #[error(transparent)]
    Ctrl(#[from] CtrlError),
    #[error("namespace {nsid} uses {ms} bytes of metadata per block, which vubd cannot serve")]
    Metadata { nsid: u32, ms: u16 },
    #[error(
        "the controller grants {granted} I/O queues and vubd needs {wanted}, one per poller \
         (use --cpus with at most {granted} CPUs)"
    )]
    TooFewQueues { granted: u16, wanted: u16 },
    #[error("cannot start the NVMe/TCP supervisor")]
    Thread(#[source] io::Error),
}

/// What the channels need to know of the namespace and controller; fixed for the device's
/// lifetime (a reconnected controller must present the same namespace).
#[derive(Clone, Copy, Debug)]
struct Geometry {
    nsid: u32,
    lba_shift: u32,
    max_rw_blocks: u32,
    in_capsule_max: u32,
    volatile_cache: bool,
    io_timeout_ms: u64,
}

impl Geometry {
    fn namespace(&self) -> Namespace {
        Namespace {
            nsid: self.nsid,
            lba_shift: self.lba_shift,
            max_rw_blocks: self.max_rw_blocks,
            volatile_cache: self.volatile_cache,
        }
    }
}

/// The controller as the channels see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
enum CtrlState {
    Live = 0,
    /// Lost; the supervisor is reconnecting it and queued I/O waits.
    Reconnecting = 1,
    /// Lost for longer than `ctrl_loss_tmo`: I/O fails until it comes back.
    Failed = 2,
}

/// A monotonic millisecond clock shared by the channels and the supervisor.
#[derive(Debug)]
struct Clock(Instant);

impl Clock {
    fn now_ms(&self) -> u64 {
        self.0.elapsed().as_millis() as u64
    }
}

/// State shared by the supervisor and every channel of one controller.
#[derive(Debug)]
struct Shared {
    geo: Geometry,
    clock: Clock,
    state: AtomicU8,
    /// Bumped by each (re)connection of the controller: connections of an older one are
    /// stale.
    generation: AtomicU64,
    /// Wakes the supervisor: a queue failed, or the device is closing.
    wake: EventFd,
    reset_requested: AtomicBool,
    stopping: AtomicBool,
    /// One entry per I/O queue (QID = index + 1).
    queues: Vec<Arc<QueueShared>>,
    /// The namespace's capacity: the supervisor changes it when the namespace grew.
    capacity: Capacity,
    /// The control path's questions for the namespace's size, which the supervisor answers.
    size_asks: Mutex<Vec<mpsc::Sender<SizeAnswer>>>,
}

impl Shared {
    fn state(&self) -> CtrlState {
        match self.state.load(Ordering::Acquire) {
            0 => CtrlState::Live,
            1 => CtrlState::Reconnecting,
            _ => CtrlState::Failed,
        }
    }

    fn set_state(&self, s: CtrlState) {
        self.state.store(s as u8, Ordering::Release);
    }
}

/// One I/O queue's hand-off slot between the supervisor and the channel that uses it.
#[derive(Debug)]
struct QueueShared {
    qid: u16,
    /// Written by the supervisor when a connection is ready (or the controller's state
    /// changed); it is in the channel's epoll, so it wakes a sleeping poller.
    notify: EventFd,
    /// A connection ready to be used, with the controller generation it belongs to.
    slot: Mutex<Option<(IoQueueConn, u64)>>,
    /// `slot` holds a connection: lets channels skip the lock.
    ready: AtomicBool,
    /// A channel uses this queue.
    claimed: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl QueueShared {
    /// Takes the ready connection, if any.
    fn take(&self) -> Option<(IoQueueConn, u64)> {
        if !self.ready.load(Ordering::Acquire) {
            return None;
        }
        let taken = lock(&self.slot).take();
        self.ready.store(false, Ordering::Release);
        taken
    }

    /// Offers a connection to the channel.
    fn offer(&self, conn: IoQueueConn, generation: u64) {
        *lock(&self.slot) = Some((conn, generation));
        self.ready.store(true, Ordering::Release);
        let _ = self.notify.write(1);
    }

    /// The channel is done with the queue; a still-live connection stays for the next one.
    fn release(&self, conn: Option<IoQueueConn>, generation: u64) {
        if let Some(conn) = conn {
            let mut slot = lock(&self.slot);
            if slot.is_none() {
                *slot = Some((conn, generation));
                self.ready.store(true, Ordering::Release);
            }
        }
        self.claimed.store(false, Ordering::Release);
    }

    /// The channel's connection failed: the whole controller is reconnected.
    fn request_reset(&self, shared: &Shared) {
        shared.reset_requested.store(true, Ordering::Release);
        let _ = shared.wake.write(1);
    }
}

/// A namespace on a remote NVMe/TCP controller.
#[derive(Debug)]
pub struct NvmeTcpDevice {
    info: DeviceInfo,
    serial: String,
    depth: u16,
    shared: Arc<Shared>,
    supervisor: Option<JoinHandle<()>>,
}

impl NvmeTcpDevice {
    /// Connects to the controller, checks the namespace and connects one I/O queue per
    /// poller; blocking, for startup.
    pub fn open(cfg: NvmeTcpConfig) -> Result<Self, NvmeTcpError> {
        let ctrl = Controller::connect(
            &cfg.addr,
            &cfg.subnqn,
            &cfg.host,
            &cfg.ctrl,
            cfg.io_queues,
            cfg.nsid,
        )?;
        let ns = ctrl.namespace();
        let lba_shift =
            lba_shift_of(ns).map_err(|ms| NvmeTcpError::Metadata { nsid: cfg.nsid, ms })?;
        let block_size = 1u32 << lba_shift;
        let id = ctrl.identify();
        let min_page_shift = 12 + u32::from(ctrl.cap().mpsmin());
        let geo = Geometry {
            nsid: cfg.nsid,
            lba_shift,
            max_rw_blocks: max_rw_blocks(id.mdts, min_page_shift, lba_shift),
            in_capsule_max: ctrl.in_capsule_data_max(),
            volatile_cache: id.vwc,
            io_timeout_ms: cfg.ctrl.io_timeout.as_millis() as u64,
        };
        let info = super::nvme_ops::device_info(id, ns, lba_shift, cfg.read_only);
        let serial = id.sn.clone();
        let granted = ctrl.io_queues_granted();
        if granted < cfg.io_queues {
            return Err(NvmeTcpError::TooFewQueues {
                granted,
                wanted: cfg.io_queues,
            });
        }
        let granted = cfg.io_queues;
        let depth = ctrl.max_queue_entries().min(1024);
        let queues = (1..=granted)
            .map(|qid| {
                Ok(Arc::new(QueueShared {
                    qid,
                    notify: EventFd::new(EFD_NONBLOCK).map_err(NvmeTcpError::Thread)?,
                    slot: Mutex::new(None),
                    ready: AtomicBool::new(false),
                    claimed: AtomicBool::new(false),
                }))
            })
            .collect::<Result<Vec<_>, NvmeTcpError>>()?;
        let shared = Arc::new(Shared {
            geo,
            clock: Clock(Instant::now()),
            state: AtomicU8::new(CtrlState::Live as u8),
            generation: AtomicU64::new(1),
            wake: EventFd::new(EFD_NONBLOCK).map_err(NvmeTcpError::Thread)?,
            reset_requested: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            queues,
            capacity: Capacity::watched(info.capacity_bytes).map_err(NvmeTcpError::Thread)?,
            size_asks: Mutex::new(Vec::new()),
        });
        // Every I/O queue is connected now, so that a target that refuses them is reported
        // at startup rather than at the guest's first request.
        for q in &shared.queues {
            let conn = ctrl.connect_io_queue(q.qid, depth)?;
            q.offer(conn, 1);
        }
        info!(
            target = %cfg.addr,
            subnqn = %cfg.subnqn,
            nsid = cfg.nsid,
            cntlid = ctrl.cntlid(),
            blocks = ns.nsze,
            block_size,
            io_queues = granted,
            depth,
            "NVMe/TCP controller connected"
        );
        let supervisor = Supervisor::new(cfg, ctrl, shared.clone(), depth);
        let handle = std::thread::Builder::new()
            .name("vubd-nvme-tcp".into())
            .spawn(move || supervisor.run())
            .map_err(NvmeTcpError::Thread)?;
        Ok(Self {
            info,
            serial,
            depth,
            shared,
            supervisor: Some(handle),
        })
    }

    /// The controller's serial number.
    pub fn serial(&self) -> &str {
        &self.serial
    }

    /// The capacity follows the namespace's size, which the supervisor reads again through
    /// the admin queue; a smaller one only if `req.shrink`. A size of the caller's is refused:
    /// the namespace's is its controller's. Returns the new capacity in bytes. Blocking, for
    /// the control path: at most about twice the I/O timeout.
    pub fn resize(&self, req: Resize) -> Result<u64, ResizeError> {
        if req.size.is_some() {
            return Err(ResizeError::Nvme);
        }
        let (tx, rx) = mpsc::channel();
        lock(&self.shared.size_asks).push(tx);
        let _ = self.shared.wake.write(1);
        let wait = Duration::from_millis(2 * self.shared.geo.io_timeout_ms) + SIZE_ASK_SLACK;
        let to = rx
            .recv_timeout(wait)
            .map_err(|_| ResizeError::Namespace(Arc::new(supervisor::NoAnswer(wait))))?
            .map_err(ResizeError::Namespace)?;
        let capacity = &self.shared.capacity;
        capacity.check(to, self.info.logical_block_size, req.shrink)?;
        capacity.set(to);
        info!(
            nsid = self.shared.geo.nsid,
            size = to,
            "NVMe/TCP namespace resized"
        );
        Ok(to)
    }

    /// Readable when the capacity changed without `device_resize` (see [`Capacity`]).
    pub fn capacity_event(&self) -> Option<RawFd> {
        self.shared.capacity.event_fd()
    }

    pub fn clear_capacity_event(&self) {
        self.shared.capacity.clear_event();
    }
}

/// What the control path waits for the supervisor beyond its admin commands.
const SIZE_ASK_SLACK: Duration = Duration::from_secs(1);

impl BlockDevice for NvmeTcpDevice {
    type Channel = NvmeTcpChannel;

    fn info(&self) -> DeviceInfo {
        DeviceInfo {
            capacity_bytes: self.shared.capacity.bytes(),
            ..self.info
        }
    }

    /// Claims a free I/O queue for the calling poller.
    fn open_channel(&self, _depth: u32) -> io::Result<NvmeTcpChannel> {
        let q = self
            .shared
            .queues
            .iter()
            .find(|q| {
                q.claimed
                    .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
            })
            .ok_or_else(|| {
                io::Error::other(format!(
                    "all {} NVMe/TCP I/O queues granted by the controller are in use",
                    self.shared.queues.len()
                ))
            })?;
        NvmeTcpChannel::new(self.shared.clone(), q.clone(), self.depth)
    }
}

/// How long closing the device waits for the supervisor, which may be in the middle of a
/// connection attempt bounded only by the I/O timeout.
const SUPERVISOR_STOP_WAIT: Duration = Duration::from_secs(2);

impl Drop for NvmeTcpDevice {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::Release);
        let _ = self.shared.wake.write(1);
        let Some(h) = self.supervisor.take() else {
            return;
        };
        let deadline = Instant::now() + SUPERVISOR_STOP_WAIT;
        while !h.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        if h.is_finished() {
            let _ = h.join();
        } else {
            // Still waiting on an unresponsive target: leave it, it stops at its next check
            // (or with the process).
            tracing::debug!("NVMe/TCP supervisor still busy; not waiting for it");
        }
    }
}
