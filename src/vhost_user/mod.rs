//! The vhost-user control plane of one virtio-blk device session: features, configuration
//! space, and the hand-over of virtqueues to the pollers. It never does I/O.
//!
//! vhost-user-backend runs the protocol and one relay thread per session that watches the
//! queues' kick eventfds. A queue's first kick attaches it to its poller; later kicks only
//! wake the poller if it sleeps (while it polls, guest notifications are suppressed and kicks
//! are rare). GET_VRING_BASE and the end of the session detach queues again, and return only
//! once nothing of them is in flight.

mod notice;
mod queues;

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vhost::vhost_user::Backend;
use vhost::vhost_user::message::{
    VhostUserInflight, VhostUserLog, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};

use self::notice::ConfigNotice;
use self::queues::Queues;
use vhost_user_backend::{ShutdownHandle, VhostUserBackend, VringT};
use virtio_queue::QueueT;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    EventConsumer, EventFlag, EventNotifier, new_event_consumer_and_notifier,
};
use vmm_sys_util::timerfd::TimerFd;

use tracing::Level;

use crate::bdev::{BlockDevice, Disk, GuestMemoryHook};
use crate::limited;
use crate::mem::fault::GuestRegions;
use crate::mem::{DirtyLog, GuestMemoryAtomic};
use crate::poller::{Detaching, DeviceKey, DeviceShared, PollerHandle, QueueAttach, Vring};
use crate::virtio_blk::SECTOR_SHIFT;
use crate::virtio_blk::config::{self, BlkConfig, WRITEBACK_OFFSET, WriteCache};
use crate::virtio_blk::inflight::{InflightQueue, InflightRegion};
use vm_memory::{Address, Bytes, GuestAddress, GuestAddressSpace, GuestRegionMmap};

/// The shape of the device as the control plane exposes it.
#[derive(Clone, Copy, Debug)]
pub struct BlkShape {
    pub num_queues: usize,
    pub max_queue_size: u16,
    /// Virtio feature bits (without the vhost-user protocol bit).
    pub features: u64,
    /// Configuration space values; `writeback` is the initial cache mode.
    pub config: BlkConfig,
}

/// One vhost-user-blk device session (one frontend connection).
pub struct BlkBackend {
    shape: BlkShape,
    key: DeviceKey,
    shared: Arc<DeviceShared>,
    disk: Arc<Disk>,
    mem: GuestMemoryAtomic,
    /// The queues, their pollers, and which the frontend started.
    queues: Queues,
    /// Serialises attach and detach; true once the session is closing.
    transitions: Mutex<bool>,
    /// Exit-event consumers handed to the relay loop; see [`BlkBackend::close_exit_events`].
    exit_fds: Mutex<Vec<RawFd>>,
    /// What the device must know of the session's guest memory (a device that DMAs into it:
    /// the mappings in its IOMMU domain), if anything.
    mem_hook: Option<Mutex<Box<dyn GuestMemoryHook>>>,
    /// The guest memory mappings registered with the SIGBUS handler (`mem::fault`), held
    /// until nothing else does.
    regions: Mutex<GuestRegions>,
    /// Armed while regions that left the memory table are still mapped, so that the relay
    /// thread lets them go (their fault registration, and for `mem_hook` an IOMMU mapping) once
    /// the last request using them has completed.
    sweep_timer: Option<Mutex<TimerFd>>,
    /// Closes the connection: the session's memory faulted (set once the session runs).
    shutdown: Mutex<Option<ShutdownHandle>>,
    /// The inflight I/O tracking region the frontend keeps (INFLIGHT_SHMFD), if it does.
    inflight: Mutex<Option<Arc<InflightRegion>>>,
    /// The dirty log of a live migration, and whether the frontend has logging on.
    log: Mutex<LogState>,
    /// Tells the frontend of a new configuration (a resize) on the backend channel.
    notice: Arc<ConfigNotice>,
}

/// What the frontend said of dirty logging: the log (SET_LOG_BASE) and VHOST_F_LOG_ALL
/// (SET_FEATURES). Pages are marked while both are there.
#[derive(Debug, Default)]
struct LogState {
    log: Option<Arc<DirtyLog>>,
    all: bool,
}

impl LogState {
    fn active(&self) -> Option<Arc<DirtyLog>> {
        self.log.clone().filter(|_| self.all)
    }
}

/// `VHOST_F_LOG_ALL`: the backend marks the pages it writes in the dirty log.
const VHOST_F_LOG_ALL: u64 = 1 << 26;

/// How long a starting device waits for another process to give its image up.
const TAKEOVER_WAIT: Duration = Duration::from_secs(5);
const TAKEOVER_RETRY: Duration = Duration::from_millis(50);

/// How often the relay thread looks at regions that left the memory table but are still
/// DMA-mapped (in-flight requests or a poller's map still held them at the last look).
const SWEEP_EVERY: Duration = Duration::from_millis(20);

impl std::fmt::Debug for BlkBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlkBackend")
            .field("shape", &self.shape)
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The answer to a frontend's message that cannot be served: InvalidInput, with the cause
/// as its text (one place, so that every refusal reads the same to the frontend).
fn invalid(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, e)
}

impl BlkBackend {
    /// A session whose queue `q` is served by `pollers[q]`.
    pub fn new(
        shape: BlkShape,
        key: DeviceKey,
        shared: Arc<DeviceShared>,
        disk: Arc<Disk>,
        mem: GuestMemoryAtomic,
        pollers: Vec<PollerHandle>,
    ) -> Self {
        let mem_hook = disk.guest_memory_hook().map(Mutex::new);
        // Without a timer, retired regions are still let go at the next memory change or at
        // the session's end; the error is logged, not fatal.
        let sweep_timer = TimerFd::new()
            .map_err(|e| tracing::warn!(error = %e, "cannot create the memory sweep timer"))
            .ok()
            .map(Mutex::new);
        let regions = Mutex::new(GuestRegions::new(shared.faults.clone()));
        Self {
            shape,
            key,
            shared,
            disk,
            mem,
            queues: Queues::new(pollers),
            transitions: Mutex::new(false),
            exit_fds: Mutex::new(Vec::new()),
            mem_hook,
            regions,
            sweep_timer,
            shutdown: Mutex::new(None),
            inflight: Mutex::new(None),
            log: Mutex::new(LogState::default()),
            notice: Arc::default(),
        }
    }

    /// The relay-thread event of the memory sweep timer: after the queues (`0..num_queues`)
    /// and vhost-user-backend's own event (`num_queues`).
    fn sweep_event(&self) -> u16 {
        u16::try_from(self.shape.num_queues + 1).unwrap_or(u16::MAX)
    }

    /// The relay-thread event of a guest memory fault (the eventfd the SIGBUS handler writes).
    fn fault_event(&self) -> u16 {
        u16::try_from(self.shape.num_queues + 2).unwrap_or(u16::MAX)
    }

    /// The relay-thread event of a capacity the disk changed on its own (an NVMe namespace
    /// that grew).
    fn capacity_event(&self) -> u16 {
        u16::try_from(self.shape.num_queues + 3).unwrap_or(u16::MAX)
    }

    /// The file descriptors and event ids the relay thread must watch: the memory sweep timer
    /// (if it could be made), the fault eventfd and the disk's capacity eventfd (if it has
    /// one). Register them before the session starts.
    pub fn listeners(&self) -> Vec<(RawFd, u64)> {
        let mut l = vec![(self.shared.faults.event_fd(), u64::from(self.fault_event()))];
        if let Some(t) = &self.sweep_timer {
            l.push((lock(t).as_raw_fd(), u64::from(self.sweep_event())));
        }
        if let Some(fd) = self.disk.capacity_event() {
            l.push((fd, u64::from(self.capacity_event())));
        }
        l
    }

    /// Lets go of the retired regions nothing holds any more (their fault registration, and
    /// their IOMMU mapping); keeps the timer armed while some are left.
    fn sweep(&self) {
        let current = self.mem.memory();
        let mut retired = lock(&self.regions).sweep(&current);
        if let Some(hook) = &self.mem_hook {
            retired |= lock(hook).sweep();
        }
        let Some(timer) = &self.sweep_timer else {
            return;
        };
        let mut timer = lock(timer);
        let result = if retired {
            timer.reset(SWEEP_EVERY, None)
        } else {
            timer.clear()
        };
        if let Err(e) = result {
            tracing::warn!(error = %e, "cannot set the memory sweep timer");
        }
    }

    /// The session's connection, closed when its memory faults (see `mem::fault`). A fault
    /// before this is set closes the connection here.
    pub fn set_shutdown(&self, handle: Option<ShutdownHandle>) {
        let mut shutdown = lock(&self.shutdown);
        *shutdown = handle;
        if self.shared.faults.failed() {
            self.close_on_fault(&shutdown);
        }
    }

    /// The session's memory faulted (a file the frontend shortened): the session does not go
    /// on with it. Its pollers take nothing more from its queues; the connection is closed, so
    /// the frontend's next message fails, and a new connection starts with a new memory table.
    fn close_on_fault(&self, shutdown: &Option<ShutdownHandle>) {
        if let Some(h) = shutdown {
            h.shutdown();
        }
    }

    fn attach(&self, q: usize, vring: &Vring) {
        let closing = lock(&self.transitions);
        if *closing || self.queues.is_attached(q) || self.shared.faults.failed() {
            return;
        }
        {
            let state = vring.get_ref();
            if !state.get_queue().ready() || !state.is_enabled() {
                return;
            }
        }
        if !self.queues.any_attached() && !self.take_image() {
            // Not served while another process writes the image; the next kick tries again.
            return;
        }
        let (inflight, resubmit) = self.take_up_inflight(q, vring);
        self.queues.attach(q, &self.shared, |broken| QueueAttach {
            device: self.key,
            queue: q as u16,
            vring: vring.clone(),
            mem: self.mem.clone(),
            shared: self.shared.clone(),
            disk: self.disk.clone(),
            max_queue_size: self.shape.max_queue_size,
            inflight,
            resubmit,
            log: lock(&self.log).active(),
            broken,
        });
        // The device runs: a resize made before it did is told now (QEMU ignores the notice
        // until then).
        self.notice.started(self.shared.index);
    }

    /// The device now has `capacity_bytes`: the requests' bounds and the configuration
    /// space follow at once, and the frontend is told (see [`notice`]). Control path or the
    /// relay thread (a capacity the disk changed on its own); never call it from the
    /// session's protocol thread.
    pub fn resize(&self, capacity_bytes: u64) {
        let sectors = capacity_bytes >> SECTOR_SHIFT;
        let old = self.shared.capacity_sectors.swap(sectors, Ordering::AcqRel);
        if old == sectors {
            return;
        }
        // Before the frontend is told: a request it sends for the new space finds the pollers
        // past this generation.
        self.shared.changed();
        tracing::info!(
            device = self.shared.index,
            from = old << SECTOR_SHIFT,
            to = capacity_bytes,
            told = self.notice.has_channel(),
            "capacity changed"
        );
        self.notice.changed(self.shared.index);
    }

    /// Tells every poller serving a started queue of the device whether to mark pages, after
    /// the log or the LOG_ALL feature changed, and returns once they all do (the frontend starts migrating memory
    /// once SET_FEATURES or SET_LOG_BASE is acknowledged).
    fn update_log(&self, change: impl FnOnce(&mut LogState)) {
        // Serialised with attach, so a queue attached meanwhile gets the new state either in
        // its attach message or from this update, which its poller handles after it.
        let _serial = lock(&self.transitions);
        let active = {
            let mut state = lock(&self.log);
            let before = state.active();
            change(&mut state);
            let after = state.active();
            let same = match (&before, &after) {
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                (None, None) => true,
                _ => false,
            };
            if same {
                return;
            }
            after
        };
        limited!(
            self.shared.events,
            Level::INFO,
            device = self.shared.index,
            on = active.is_some(),
            "dirty page logging"
        );
        for p in self.queues.pollers_in_use() {
            p.set_log(self.key, active.clone());
        }
    }

    /// Queue `q`'s area of the inflight region, taken up before the queue starts: the heads
    /// an earlier process left in flight (last first, as the poller pops them), and the ring
    /// indices set to follow them (the frontend rewound the avail index to the used index,
    /// or gave the one of a clean stop: either way, next avail = used + still in flight).
    fn take_up_inflight(&self, q: usize, vring: &Vring) -> (Option<InflightQueue>, Vec<u16>) {
        let Some(region) = lock(&self.inflight).clone() else {
            return (None, Vec::new());
        };
        let mut state = vring.get_mut();
        let queue = state.get_queue_mut();
        let size = queue.size();
        let Some(mut area) = region.queue(q as u16, size) else {
            limited!(
                self.shared.events,
                Level::WARN,
                device = self.shared.index,
                queue = q,
                size,
                regions = region.num_queues(),
                region_size = region.queue_size(),
                "the inflight region has no area for this queue; it is not tracked"
            );
            return (None, Vec::new());
        };
        let index_at = |ring: u64| {
            let addr = GuestAddress(ring).checked_add(2)?;
            self.mem
                .memory()
                .read_obj::<u16>(addr)
                .ok()
                .map(u16::from_le)
        };
        let (Some(used), Some(avail)) = (index_at(queue.used_ring()), index_at(queue.avail_ring()))
        else {
            limited!(
                self.shared.events,
                Level::WARN,
                device = self.shared.index,
                queue = q,
                "rings unreachable; inflight tracking off"
            );
            return (None, Vec::new());
        };
        let mut recovered = area.recover(used);
        if recovered.resubmit.len() > usize::from(avail.wrapping_sub(used))
            || recovered.resubmit.iter().any(|&head| head >= size)
        {
            // More in flight than the driver ever made available past the used index, or a
            // head outside the ring's table: the region is not this ring's (or was tampered
            // with). Running its heads would leave the avail index behind ours, and the queue
            // stuck (or broken): start afresh instead, from the index the frontend gave.
            limited!(
                self.shared.events,
                Level::WARN,
                device = self.shared.index,
                queue = q,
                recorded = recovered.resubmit.len(),
                available = avail.wrapping_sub(used),
                "the inflight region does not match the ring; its record is dropped"
            );
            area.reset(used);
            return (Some(area), Vec::new());
        }
        if !recovered.resubmit.is_empty() {
            limited!(
                self.shared.events,
                Level::INFO,
                device = self.shared.index,
                queue = q,
                requests = recovered.resubmit.len(),
                used,
                "resubmitting requests left in flight by an earlier process"
            );
        }
        let in_flight = u16::try_from(recovered.resubmit.len()).unwrap_or(u16::MAX);
        queue.set_next_used(used);
        queue.set_next_avail(used.wrapping_add(in_flight));
        recovered.resubmit.reverse();
        (Some(area), recovered.resubmit)
    }

    /// The frontend starts the device: takes the image's write permission (restart, upgrade
    /// and migration hand it over between processes; see `bdev::lock`). The process that had
    /// it gives it up once its rings are stopped, which in a migration or an upgrade happens
    /// just before this frontend starts ours: a conflict is retried for a short while.
    fn take_image(&self) -> bool {
        let deadline = Instant::now() + TAKEOVER_WAIT;
        loop {
            match self.disk.acquire_write() {
                Ok(()) => return true,
                Err(e) if Instant::now() >= deadline => {
                    limited!(
                        self.shared.events,
                        Level::ERROR,
                        device = self.shared.index,
                        error = %e,
                        "the device cannot start"
                    );
                    return false;
                }
                Err(_) => std::thread::sleep(TAKEOVER_RETRY),
            }
        }
    }

    /// Every ring is stopped: another process may take the image over now.
    fn release_image(&self) {
        if let Err(e) = self.disk.release_write() {
            limited!(
                self.shared.events,
                Level::WARN,
                device = self.shared.index,
                error = %e,
                "cannot release the image's write permission"
            );
        }
    }

    /// Ends the session's data plane: detaches every queue once its in-flight requests have
    /// completed (all queues drain at once), and refuses new attachments.
    pub fn close(&self) {
        // A resize notice being sent ends first (bounded by the channel's timeouts).
        self.notice.finish();
        let mut closing = lock(&self.transitions);
        *closing = true;
        let detaching: Vec<Detaching> = (0..self.shape.num_queues)
            .filter_map(|q| self.queues.start_detach(q, self.key))
            .collect();
        let stopped = !detaching.is_empty();
        for d in detaching {
            d.wait();
        }
        if stopped {
            self.release_image();
        }
        // Nothing is in flight any more: the device may forget the guest's memory.
        if let Some(hook) = &self.mem_hook {
            lock(hook).release();
        }
        // What the rate limits held back and did not report yet, summed up once.
        let suppressed =
            self.shared.warnings.take_suppressed() + self.shared.events.take_suppressed();
        if suppressed > 0 {
            tracing::info!(
                device = self.shared.index,
                suppressed,
                "log lines of the session suppressed by the rate limit"
            );
        }
    }

    /// Closes the exit-event consumers of the relay loop. vhost-user-backend 0.24 registers
    /// each one with `into_raw_fd()` and never closes it; call this once the
    /// `VhostUserDaemon` (and with it the relay loop) is gone.
    pub fn close_exit_events(&self) {
        for fd in lock(&self.exit_fds).drain(..) {
            // SAFETY: `fd` is the consumer created in `exit_event`, whose ownership the
            // relay loop took with `into_raw_fd` and abandoned: the loop never closes it and
            // has ended, so this is the only owner and the number cannot have been reused.
            drop(unsafe { OwnedFd::from_raw_fd(fd) });
        }
    }

    /// [`invalid`], with a warning whose message is `what`. Rate-limited: a frontend may send
    /// the refused message again and again.
    fn refused<E>(&self, what: &str, e: E) -> io::Error
    where
        E: std::fmt::Display + Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        limited!(
            self.shared.events,
            Level::WARN,
            device = self.shared.index,
            error = %e,
            "{what}"
        );
        invalid(e)
    }

    fn config_space(&self) -> [u8; config::CONFIG_SPACE_SIZE] {
        let mut cfg = self.shape.config;
        cfg.capacity_sectors = self.shared.capacity_sectors.load(Ordering::Acquire);
        cfg.writeback = u8::from(self.shared.writeback.load(Ordering::Relaxed));
        cfg.to_bytes()
    }
}

impl VhostUserBackend for BlkBackend {
    type Bitmap = ();
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        self.shape.num_queues
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.shape.max_queue_size)
    }

    fn features(&self) -> u64 {
        self.shape.features | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() | VHOST_F_LOG_ALL
    }

    fn acked_features(&self, features: u64) {
        self.update_log(|s| s.all = features & VHOST_F_LOG_ALL != 0);
    }

    /// SET_LOG_BASE: the log to mark while LOG_ALL is on (a new one replaces the old one,
    /// e.g. when guest memory grew).
    fn set_log_base(&self, msg: &VhostUserLog, file: &File) -> io::Result<()> {
        let mut log = DirtyLog::new(file, msg.mmap_offset, msg.mmap_size)
            .map_err(|e| self.refused("dirty log refused", e))?;
        log.watch(&self.shared.faults).map_err(invalid)?;
        tracing::debug!(bytes = msg.mmap_size, "dirty log set");
        self.update_log(|s| s.log = Some(Arc::new(log)));
        Ok(())
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::INFLIGHT_SHMFD
            | VhostUserProtocolFeatures::LOG_SHMFD
            | VhostUserProtocolFeatures::BACKEND_REQ
    }

    /// SET_BACKEND_REQ_FD: the channel on which vubd tells the frontend of a resize.
    fn set_backend_req_fd(&self, backend: Backend) {
        self.notice.set_channel(backend);
    }

    /// GET_INFLIGHT_FD: a new, zeroed region for the frontend to keep.
    fn get_inflight_fd(&self, msg: &VhostUserInflight) -> io::Result<(VhostUserInflight, File)> {
        let mut region = InflightRegion::create(msg.num_queues, msg.queue_size).map_err(invalid)?;
        region.watch(&self.shared.faults).map_err(invalid)?;
        let file = region.file().try_clone()?;
        let reply = VhostUserInflight {
            mmap_size: region.size(),
            mmap_offset: 0,
            num_queues: msg.num_queues,
            queue_size: msg.queue_size,
        };
        // From now on the guest's cache mode is recorded where a restarted vubd finds it.
        region.set_write_cache(self.shared.write_cache());
        *lock(&self.inflight) = Some(Arc::new(region));
        Ok((reply, file))
    }

    /// SET_INFLIGHT_FD: the region the frontend kept, maybe from an earlier vubd.
    fn set_inflight_fd(&self, msg: &VhostUserInflight, file: File) -> io::Result<()> {
        let mut region = InflightRegion::adopt(
            file,
            msg.mmap_offset,
            msg.mmap_size,
            msg.num_queues,
            msg.queue_size,
        )
        .map_err(|e| self.refused("inflight region refused", e))?;
        region.watch(&self.shared.faults).map_err(invalid)?;
        tracing::debug!(
            queues = msg.num_queues,
            size = msg.queue_size,
            "inflight region set"
        );
        // The frontend caches the cache mode the guest chose and never sends it again: take
        // it from the region (an earlier session of this device, maybe of another vubd).
        match region.write_cache() {
            Some(mode) => {
                if mode != self.shared.write_cache() {
                    limited!(
                        self.shared.events,
                        Level::INFO,
                        device = self.shared.index,
                        ?mode,
                        "write cache mode kept from the earlier session"
                    );
                }
                self.shared.set_write_cache(mode);
            }
            None => {
                region.set_write_cache(self.shared.write_cache());
            }
        }
        *lock(&self.inflight) = Some(Arc::new(region));
        Ok(())
    }

    fn set_event_idx(&self, _enabled: bool) {
        // Read from each queue's state by its poller.
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        config::read_window(&self.config_space(), offset, size)
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        // Only the `writeback` byte is writable (virtio 1.2 §5.2.5, CONFIG_WCE).
        let size = u32::try_from(buf.len()).unwrap_or(u32::MAX);
        let Some((off, len)) = config::config_window(offset, size) else {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        };
        if off != WRITEBACK_OFFSET || len != 1 || buf[0] > 1 {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        }
        let mode = if buf[0] == 1 {
            WriteCache::Back
        } else {
            WriteCache::Through
        };
        self.shared.set_write_cache(mode);
        if let Some(region) = lock(&self.inflight).as_ref() {
            region.set_write_cache(mode);
        }
        // The guest writes the field as often as it likes: each write is a SET_CONFIG.
        limited!(
            self.shared.events,
            Level::INFO,
            device = self.shared.index,
            writeback = buf[0] == 1,
            "guest changed the write cache mode"
        );
        Ok(())
    }

    /// A region of a new memory table was mapped: registered with the SIGBUS handler before
    /// any thread can touch it (see `mem::fault`).
    fn region_mapped(&self, region: &GuestRegionMmap<()>) -> io::Result<()> {
        lock(&self.regions).add(region).map_err(invalid)
    }

    fn update_memory(&self, mem: GuestMemoryAtomic) -> io::Result<()> {
        // Tenants' data stays out of vubd's core dumps. A region that cannot be marked is
        // refused: serving it would leave it in.
        crate::mem::exclude_from_core_dumps(&mem.memory()).inspect_err(|e| {
            tracing::warn!(error = %e, "guest memory cannot be kept out of core dumps");
        })?;
        // A device that DMAs into guest memory must reach the new regions before any request
        // can name them (the frontend waits for this message to be acknowledged).
        if let Some(hook) = &self.mem_hook {
            lock(hook).memory_changed(mem.memory().into_inner())?;
        }
        // The pollers share the atomic map, which already holds the new one; tell them to load
        // it. The frontend is acknowledged only after this returns, so it cannot publish a
        // request that uses the new map before the pollers can see the change.
        self.shared.changed();
        // And have them load it now rather than at their next request, so that the old map
        // (and the regions only it holds) goes as soon as no request uses it.
        for p in self.queues.pollers_in_use() {
            p.memory_changed(self.key);
        }
        if let Some(timer) = &self.sweep_timer
            && let Err(e) = lock(timer).reset(SWEEP_EVERY, None)
        {
            tracing::warn!(error = %e, "cannot set the memory sweep timer");
        }
        Ok(())
    }

    /// All queues on one relay thread: it only forwards kicks.
    fn queues_per_thread(&self) -> Vec<u64> {
        vec![u64::MAX >> (64 - self.shape.num_queues)]
    }

    /// GET_VRING_BASE stops the ring: the frontend takes the returned index as final and may
    /// reuse the ring at once, so every request of the queue that was popped must be completed
    /// and published first, and none after (vhost-user spec, VHOST_USER_GET_VRING_BASE:
    /// without GET_VRING_BASE_INFLIGHT or SKIP_DRAIN, which vubd does not offer, the back-end
    /// drains). The answer waits for that however long it takes; the devices bound it (see
    /// [`crate::poller::Detaching::wait`]).
    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        let _serial = lock(&self.transitions);
        if let Some(d) = usize::try_from(queue_index)
            .ok()
            .filter(|&q| q < self.shape.num_queues)
            .and_then(|q| self.queues.start_detach(q, self.key))
        {
            d.wait();
            self.queues.detached(&self.shared);
            if !self.queues.any_attached() {
                self.release_image();
            }
        }
        Ok(())
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        let pair =
            new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC).ok()?;
        lock(&self.exit_fds).push(pair.0.as_raw_fd());
        Some(pair)
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[Vring],
        _thread_id: usize,
    ) -> io::Result<()> {
        if device_event == self.sweep_event() {
            if let Some(timer) = &self.sweep_timer {
                // Clears the expiry (non-blocking: the event says it is readable).
                let _ = lock(timer).wait();
            }
            self.sweep();
            return Ok(());
        }
        if device_event == self.fault_event() {
            self.shared.faults.clear_event();
            self.close_on_fault(&lock(&self.shutdown));
            return Ok(());
        }
        if device_event == self.capacity_event() {
            // Cleared first: a change after the read below is told again.
            self.disk.clear_capacity_event();
            self.resize(self.disk.info().capacity_bytes);
            return Ok(());
        }
        let q = usize::from(device_event);
        let Some(vring) = vrings.get(q) else {
            return Ok(());
        };
        if !self.queues.kick(q) {
            self.attach(q, vring);
        }
        Ok(())
    }
}
