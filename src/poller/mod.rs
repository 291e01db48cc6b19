//! The data plane: poller threads, each pinnable to a CPU, each exclusively owning the
//! virtqueues attached to it (of any number of devices), one I/O channel per device (devices
//! on namespaces of one NVMe PCIe controller share one: one I/O queue pair per poller per
//! controller), and a preallocated in-flight table.
//!
//! The control plane talks to a poller only through [`PollerHandle`]: attach a queue, detach
//! it (acknowledged once nothing of it is in flight, however long that takes: see
//! [`Detaching::wait`]), wake it. A poller polls its queues and channels while there is work;
//! depending on [`PollMode`] it then keeps spinning, or re-enables guest notifications,
//! re-checks its rings and sleeps on its wake eventfd and its channels' completion fds.

mod dirty;
mod slots;
mod warm;
mod worker;

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tracing::warn;
use vhost_user_backend::VringRwLock;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::bdev::Disk;
use crate::log_limit::LogLimit;
use crate::mem::fault::DeviceFaults;
use crate::mem::{DirtyLog, GuestMemoryAtomic};
use crate::metrics::DeviceMetrics;
use crate::qos::DeviceQos;
use crate::virtio_blk::ID_BYTES;
use crate::virtio_blk::config::WriteCache;
use crate::virtio_blk::inflight::InflightQueue;
use crate::virtio_blk::request::Limits;

/// Virtqueue handle as the vhost-user layer shares it with the pollers.
pub type Vring = VringRwLock<GuestMemoryAtomic>;

/// Identifies one device session (one frontend connection) across pollers.
pub type DeviceKey = u64;

/// How a poller waits for work.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PollMode {
    /// Busy-poll avail rings and completions; guest notifications stay suppressed.
    Always,
    /// Poll while there is work and for `idle` after the last of it, then sleep.
    Adaptive { idle: Duration },
    /// Sleep as soon as there is no work: purely event-driven.
    Never,
}

/// Per-request warnings of one device (a request failed, a ring unreachable, an interrupt the
/// frontend did not take) let through per second; the rest are counted.
pub const WARNINGS_PER_SECOND: u32 = 5;

/// Lines of queue lifecycle and control-path notices of one device (queues attached, stopped,
/// broken; the guest's write cache choice) let through per second, besides
/// [`EVENTS_PER_QUEUE`] per queue the frontend started.
pub const EVENTS_PER_SECOND: u32 = 8;

/// The lifecycle lines of one queue (attached, stopping, detached, broken) let through per
/// second, once its frontend started it: a queue never started costs no log budget.
pub const EVENTS_PER_QUEUE: u32 = 4;

/// What all queues of one device share, read-only or atomically.
#[derive(Debug)]
pub struct DeviceShared {
    /// The device's number in the daemon (its `--device` place), named by its log lines.
    pub index: usize,
    /// Rate limit of the per-request warnings ([`WARNINGS_PER_SECOND`]).
    pub warnings: LogLimit,
    /// Rate limit of lifecycle lines and control-path notices a frontend or a guest can cause
    /// with every message ([`EVENTS_PER_SECOND`], and [`EVENTS_PER_QUEUE`] per queue started:
    /// [`DeviceShared::queue_started`]).
    pub events: LogLimit,
    /// The request limits; the capacity in them is the session's first, and
    /// `capacity_sectors` the one in force.
    pub limits: Limits,
    /// The device's capacity now: the control plane changes it when the device is resized,
    /// and each pass of a poller reads it once.
    pub capacity_sectors: AtomicU64,
    /// GET_ID answer, zero-padded.
    pub serial: [u8; ID_BYTES],
    /// Guest-visible write cache mode (CONFIG_WCE): false means every write is write-through.
    pub writeback: AtomicBool,
    /// The guest's mode is not known (`WriteCache::Unknown`): `writeback` is false until the
    /// guest's first FLUSH, which only a guest with a write cache sends.
    pub learning: AtomicBool,
    /// Faults survived in the session's memory (`mem::fault`): once one is, the pollers take
    /// nothing more from the device's queues.
    pub faults: Arc<DeviceFaults>,
    /// Most requests of the device in flight on one poller: its share of `in_flight_cap`,
    /// split evenly over the pollers that serve a queue the frontend started
    /// ([`DeviceShared::spread_in_flight`]; `u32::MAX`: no cap). Past it, the device's queues
    /// keep their chains in the avail ring (back-pressure, never an error) until one of its
    /// requests completes.
    pub max_in_flight: AtomicU32,
    /// `--device max-inflight=N`: most requests of the device in flight at once.
    in_flight_cap: Option<u32>,
    /// The device's counters (`None` with `--metrics off`): they belong to the device, not to
    /// the session, so that they survive its frontend's reconnections. Each queue's poller
    /// writes that queue's.
    pub metrics: Option<Arc<DeviceMetrics>>,
    /// The device's rate limits (none until the caller, which knows the device, sets them):
    /// like its metrics, they belong to the device and outlive the session. Its generation is
    /// the device's: bumped after any change pollers must take ([`DeviceShared::changed`]).
    pub qos: Arc<DeviceQos>,
}

impl DeviceShared {
    /// A device's shared state as a session starts: the request limits, the GET_ID answer,
    /// the write cache mode it serves first, the session's fault record, and the cap on its
    /// requests in flight (`None`: none), all of it for one poller until queues start on
    /// more. Its log limits follow [`WARNINGS_PER_SECOND`] and [`EVENTS_PER_SECOND`]; `index`
    /// is 0, `metrics` `None` and `qos` unlimited until the caller, which knows the device,
    /// sets them.
    pub fn new(
        limits: Limits,
        serial: [u8; ID_BYTES],
        write_cache: WriteCache,
        faults: Arc<DeviceFaults>,
        in_flight_cap: Option<u32>,
    ) -> Self {
        let per_second = Duration::from_secs(1);
        Self {
            index: 0,
            warnings: LogLimit::new(WARNINGS_PER_SECOND, per_second),
            events: LogLimit::new(EVENTS_PER_SECOND, per_second),
            capacity_sectors: AtomicU64::new(limits.capacity_sectors),
            limits,
            serial,
            writeback: AtomicBool::new(write_cache == WriteCache::Back),
            learning: AtomicBool::new(write_cache == WriteCache::Unknown),
            faults,
            max_in_flight: AtomicU32::new(in_flight_cap.unwrap_or(u32::MAX)),
            in_flight_cap,
            metrics: None,
            qos: Arc::default(),
        }
    }

    /// The control plane changed what pollers keep of the device: the session's guest memory
    /// map (called before the frontend is acknowledged), or its capacity (before the frontend
    /// is told). Pollers compare the generation with one load per pass instead of loading the
    /// map and the capacity.
    pub fn changed(&self) {
        self.qos.changed();
    }

    /// The frontend started a queue of the device for the first time in the session: its
    /// lifecycle lines get a log budget of their own.
    pub fn queue_started(&self) {
        self.events.raise(EVENTS_PER_QUEUE);
    }

    /// The started queues of the device run on `pollers` pollers: each may have an equal
    /// share of the cap in flight, at least one. A poller over its new share takes nothing
    /// new until its own completions bring it under.
    pub fn spread_in_flight(&self, pollers: usize) {
        if let Some(cap) = self.in_flight_cap {
            let share = cap.div_ceil(u32::try_from(pollers.max(1)).unwrap_or(u32::MAX));
            self.max_in_flight.store(share, Ordering::Relaxed);
        }
    }

    /// The guest's write cache mode as the device serves it.
    pub fn write_cache(&self) -> WriteCache {
        if self.learning.load(Ordering::Relaxed) {
            WriteCache::Unknown
        } else if self.writeback.load(Ordering::Relaxed) {
            WriteCache::Back
        } else {
            WriteCache::Through
        }
    }

    /// Serves the guest's writes in `mode` from now on.
    pub fn set_write_cache(&self, mode: WriteCache) {
        self.learning
            .store(mode == WriteCache::Unknown, Ordering::Relaxed);
        self.writeback
            .store(mode == WriteCache::Back, Ordering::Relaxed);
    }

    /// The guest sent a FLUSH: if its mode was not known, it has a write cache.
    #[inline]
    pub fn flushed(&self) {
        if self.learning.load(Ordering::Relaxed) {
            self.writeback.store(true, Ordering::Relaxed);
            self.learning.store(false, Ordering::Relaxed);
            tracing::info!("the guest flushes: serving it write-back");
        }
    }
}

/// Everything a poller needs to serve one virtqueue.
pub struct QueueAttach {
    pub device: DeviceKey,
    pub queue: u16,
    pub vring: Vring,
    pub mem: GuestMemoryAtomic,
    pub shared: Arc<DeviceShared>,
    pub disk: Arc<Disk>,
    /// Largest size the queue can have: in-flight slots reserved for it.
    pub max_queue_size: u16,
    /// The queue's area of the inflight region, when the frontend keeps one.
    pub inflight: Option<InflightQueue>,
    /// Heads an earlier process left in flight, to run before any new one, last first.
    pub resubmit: Vec<u16>,
    /// The dirty log, while the frontend has logging on.
    pub log: Option<Arc<DirtyLog>>,
    /// Set by the poller when the queue breaks (cleared by the control plane before it
    /// attaches the queue again): the control plane then no longer wakes the poller for its
    /// kicks.
    pub broken: Arc<AtomicBool>,
}

impl std::fmt::Debug for QueueAttach {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueueAttach")
            .field("device", &self.device)
            .field("queue", &self.queue)
            .finish_non_exhaustive()
    }
}

/// A detach in progress: how the poller acknowledges it, and what it tells the waiter
/// meanwhile.
#[derive(Debug)]
struct DetachWait {
    done: mpsc::SyncSender<()>,
    /// The queue's requests in flight, as the poller last counted them.
    in_flight: Arc<AtomicU32>,
}

impl DetachWait {
    /// One nobody waits for (the poller is stopping).
    fn unwatched() -> Self {
        Self {
            done: mpsc::sync_channel(1).0,
            in_flight: Arc::default(),
        }
    }
}

#[derive(Debug)]
enum Command {
    Attach(Box<QueueAttach>),
    Detach {
        device: DeviceKey,
        queue: u16,
        wait: DetachWait,
    },
    /// The device's memory map changed: load it now.
    MemoryChanged(DeviceKey),
    /// Start (`Some`) or stop marking the device's writes in a dirty log; acknowledged once
    /// the poller does.
    SetLog {
        device: DeviceKey,
        log: Option<Arc<DirtyLog>>,
        done: mpsc::SyncSender<()>,
    },
    Stop,
}

/// State a poller shares with the control plane.
#[derive(Debug)]
struct Shared {
    commands: Mutex<Vec<Command>>,
    /// Commands are waiting: checked every loop iteration without taking the lock.
    has_commands: AtomicBool,
    /// The poller is (about to be) asleep: kicks must wake it.
    sleeping: AtomicBool,
    wake: EventFd,
}

/// The control plane's handle on one poller.
#[derive(Clone, Debug)]
pub struct PollerHandle {
    index: usize,
    shared: Arc<Shared>,
}

/// How often a detach that still waits for requests in flight says so.
const DETACH_WARN_EVERY: Duration = Duration::from_secs(10);

impl PollerHandle {
    fn send(&self, cmd: Command) {
        self.shared
            .commands
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(cmd);
        self.shared.has_commands.store(true, Ordering::Release);
        let _ = self.shared.wake.write(1);
    }

    /// Hands a queue to the poller, which starts serving it at once.
    pub fn attach(&self, attach: QueueAttach) {
        self.send(Command::Attach(Box::new(attach)));
    }

    /// Asks the poller to give a queue back: it stops popping from it at once. Several queues
    /// drain together when all are asked before any is waited for.
    pub fn start_detach(&self, device: DeviceKey, queue: u16) -> Detaching {
        let (done, acked) = mpsc::sync_channel(1);
        let in_flight = Arc::new(AtomicU32::new(0));
        self.send(Command::Detach {
            device,
            queue,
            wait: DetachWait {
                done,
                in_flight: in_flight.clone(),
            },
        });
        Detaching {
            poller: self.index,
            device,
            queue,
            acked,
            in_flight,
        }
    }

    /// Which poller of the set this is.
    pub fn index(&self) -> usize {
        self.index
    }

    /// The memory map of `device` changed (after `mem_gen` was bumped): the poller loads it
    /// on its next pass, even with no request to serve, and lets the old one go.
    pub fn memory_changed(&self, device: DeviceKey) {
        self.send(Command::MemoryChanged(device));
    }

    /// Has the poller mark `device`'s writes in `log` (or stop, for `None`) from its next
    /// request on; returns once it does.
    pub fn set_log(&self, device: DeviceKey, log: Option<Arc<DirtyLog>>) {
        let (done, wait) = mpsc::sync_channel(1);
        self.send(Command::SetLog { device, log, done });
        // The poller answers within one pass of its loop; it is gone only at shutdown.
        let _ = wait.recv();
    }

    /// A guest kicked one of this poller's queues: wake it if it sleeps. While it polls,
    /// nothing is needed (and nothing is done: no syscall).
    pub fn kick(&self) {
        if self.shared.sleeping.load(Ordering::SeqCst) {
            let _ = self.shared.wake.write(1);
        }
    }
}

/// A queue the control plane asked a poller to give back.
#[derive(Debug)]
#[must_use = "a detach is over only once waited for"]
pub struct Detaching {
    poller: usize,
    device: DeviceKey,
    queue: u16,
    acked: mpsc::Receiver<()>,
    in_flight: Arc<AtomicU32>,
}

impl Detaching {
    /// Returns once every request of the queue that the poller popped has completed and been
    /// published, and never before: the frontend takes the ring as final once it is answered,
    /// and a late completion would write into a ring it may have handed to someone else. The
    /// wait is bounded by the devices, not here: file I/O always completes, and a device that
    /// can wait without bound on something remote fails the queue's requests once they cannot
    /// complete within its I/O timeout ([`crate::bdev::IoChannel::drain`]). Every
    /// [`DETACH_WARN_EVERY`] it logs a warning with what is still in flight, so that a drain
    /// that does not end is seen.
    pub fn wait(self) {
        let started = Instant::now();
        // Disconnected: the poller is gone (its thread ended), and the queue with it.
        while let Err(RecvTimeoutError::Timeout) = self.acked.recv_timeout(DETACH_WARN_EVERY) {
            warn!(
                poller = self.poller,
                device = self.device,
                queue = self.queue,
                in_flight = self.in_flight.load(Ordering::Relaxed),
                waited_s = started.elapsed().as_secs(),
                "queue stopping: still waiting for its requests in flight to complete"
            );
        }
    }
}

/// The running pollers.
#[derive(Debug)]
pub struct PollerSet {
    handles: Vec<PollerHandle>,
    threads: Vec<JoinHandle<()>>,
}

impl PollerSet {
    /// Starts one poller per entry of `cpus`: pinned to that CPU, or unpinned for `None`.
    pub fn start(cpus: &[Option<usize>], mode: PollMode) -> io::Result<Self> {
        let mut set = Self {
            handles: Vec::with_capacity(cpus.len()),
            threads: Vec::with_capacity(cpus.len()),
        };
        for (index, &cpu) in cpus.iter().enumerate() {
            let shared = Arc::new(Shared {
                commands: Mutex::new(Vec::new()),
                has_commands: AtomicBool::new(false),
                sleeping: AtomicBool::new(false),
                wake: EventFd::new(EFD_NONBLOCK)?,
            });
            let w = worker::Worker::new(shared.clone(), mode)?;
            let thread = std::thread::Builder::new()
                .name(format!("vubd-poller-{index}"))
                .spawn(move || {
                    if let Some(cpu) = cpu {
                        if let Err(e) = pin_current_thread(cpu) {
                            warn!(cpu, error = %e, "cannot pin poller");
                        }
                    }
                    crate::sandbox::enter(crate::sandbox::Role::Poller);
                    w.run();
                })?;
            set.handles.push(PollerHandle { index, shared });
            set.threads.push(thread);
        }
        Ok(set)
    }

    pub fn len(&self) -> usize {
        self.handles.len()
    }

    pub fn is_empty(&self) -> bool {
        self.handles.is_empty()
    }

    /// The poller that serves queue `queue` of a device (queues are spread round-robin).
    pub fn for_queue(&self, queue: usize) -> &PollerHandle {
        &self.handles[queue % self.handles.len()]
    }

    /// Stops every poller once its queues are drained, and joins it.
    pub fn stop(self) {
        for h in &self.handles {
            h.send(Command::Stop);
        }
        for t in self.threads {
            let _ = t.join();
        }
    }
}

/// Pins the calling thread to one CPU.
pub fn pin_current_thread(cpu: usize) -> io::Result<()> {
    // SAFETY: cpu_set_t is plain data; CPU_ZERO/CPU_SET only write inside it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a live cpu_set_t; `cpu` was validated against CPU_SETSIZE by the config.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: pid 0 is the calling thread; `set` is a valid mask of the size passed.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The CPUs this process may run on.
pub fn allowed_cpus() -> Vec<usize> {
    // SAFETY: as in `pin_current_thread`.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: pid 0 is the calling process; `set` is a writable mask of the size passed.
    let rc =
        unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    if rc != 0 {
        return vec![0];
    }
    (0..libc::CPU_SETSIZE as usize)
        // SAFETY: `set` is initialised and the index is below CPU_SETSIZE.
        .filter(|&c| unsafe { libc::CPU_ISSET(c, &set) })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shared() -> DeviceShared {
        let limits = Limits {
            capacity_sectors: 8,
            seg_max: 1,
            size_max: 4096,
            read_only: false,
            max_discard_sectors: None,
            max_write_zeroes_sectors: None,
        };
        let faults = Arc::new(DeviceFaults::new().expect("eventfd"));
        DeviceShared::new(limits, [0; ID_BYTES], WriteCache::Back, faults, None)
    }

    /// How many of `n` lifecycle lines asked for at once get through.
    fn events_through(s: &DeviceShared, n: u32) -> u32 {
        (0..n).map(|_| u32::from(s.events.allow().is_some())).sum()
    }

    #[test]
    fn each_started_queue_brings_its_own_lifecycle_log_budget() {
        let idle = shared();
        assert_eq!(
            events_through(&idle, 100),
            EVENTS_PER_SECOND,
            "no queue started"
        );
        let two = shared();
        two.queue_started();
        two.queue_started();
        assert_eq!(
            events_through(&two, 100),
            EVENTS_PER_SECOND + 2 * EVENTS_PER_QUEUE,
            "two queues started"
        );
    }
}
