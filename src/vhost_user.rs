//! The vhost-user control plane of one virtio-blk device: features, configuration space,
//! memory table and the mapping of virtqueues onto pollers. It never does I/O itself: kicks
//! and completion events are forwarded to the poller that owns the queue.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, OnceLock};

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::VhostUserBackend;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    EventConsumer, EventFlag, EventNotifier, new_event_consumer_and_notifier,
};

use crate::bdev::IoChannel;
use crate::mem::GuestMemoryAtomic;
use crate::poller::{DeviceShared, Poller, Vring};
use crate::virtio_blk::config::{self, BlkConfig, WRITEBACK_OFFSET};

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

/// One vhost-user-blk device, shared by the protocol thread and the pollers.
pub struct BlkBackend<C: IoChannel> {
    shape: BlkShape,
    shared: Arc<DeviceShared>,
    /// One poller per worker thread; only that thread locks it while the device runs.
    pollers: Vec<Mutex<Poller<C>>>,
    /// The virtqueues each worker owns, remembered at its first event for draining.
    thread_vrings: Vec<OnceLock<Vec<Vring>>>,
    /// Exit-event consumers handed to the workers' epoll loops; see [`BlkBackend::close_exit_events`].
    exit_fds: Mutex<Vec<RawFd>>,
}

impl<C: IoChannel> BlkBackend<C> {
    /// A device whose queue `i` is served by `pollers[i]`.
    pub fn new(shape: BlkShape, shared: Arc<DeviceShared>, pollers: Vec<Poller<C>>) -> Self {
        let thread_vrings = pollers.iter().map(|_| OnceLock::new()).collect();
        Self {
            shape,
            shared,
            pollers: pollers.into_iter().map(Mutex::new).collect(),
            thread_vrings,
            exit_fds: Mutex::new(Vec::new()),
        }
    }

    /// Closes the exit-event consumers of the session's workers. vhost-user-backend 0.24
    /// registers each one with `into_raw_fd()` and never closes it; call this once the
    /// `VhostUserDaemon` (and with it every worker and its epoll loop) is gone.
    pub fn close_exit_events(&self) {
        for fd in lock(&self.exit_fds).drain(..) {
            // SAFETY: `fd` is the consumer created in `exit_event`, whose ownership the
            // worker loop took with `into_raw_fd` and abandoned: the loop never closes it and
            // has ended, so this is the only owner and the number cannot have been reused.
            drop(unsafe { OwnedFd::from_raw_fd(fd) });
        }
    }

    /// Event id under which a poller's completion fd is registered with its worker's epoll
    /// loop (ids up to `num_queues` belong to the queues and the exit event).
    pub fn completion_event_id(&self) -> u64 {
        self.shape.num_queues as u64 + 1
    }

    /// The completion fd of each worker's poller, by worker index.
    pub fn completion_fds(&self) -> Vec<Option<std::os::fd::RawFd>> {
        self.pollers
            .iter()
            .map(|p| lock(p).completion_fd())
            .collect()
    }

    /// Completes every request still in flight. Call once the workers have stopped.
    pub fn drain(&self) {
        for (poller, vrings) in self.pollers.iter().zip(&self.thread_vrings) {
            let mut p = lock(poller);
            if p.in_flight() == 0 {
                continue;
            }
            p.drain(vrings.get().map_or(&[][..], |v| &v[..]));
        }
    }

    fn config_space(&self) -> [u8; config::CONFIG_SPACE_SIZE] {
        let mut cfg = self.shape.config;
        cfg.writeback = u8::from(self.shared.writeback.load(Ordering::Relaxed));
        cfg.to_bytes()
    }
}

impl<C: IoChannel> std::fmt::Debug for BlkBackend<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlkBackend")
            .field("shape", &self.shape)
            .field("shared", &self.shared)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A poisoned poller only means a worker panicked mid-batch; its state is still the
    // table of what is in flight, which draining needs.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl<C: IoChannel + Send + 'static> VhostUserBackend for BlkBackend<C> {
    type Bitmap = ();
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        self.shape.num_queues
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.shape.max_queue_size)
    }

    fn features(&self) -> u64 {
        self.shape.features | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
    }

    fn set_event_idx(&self, _enabled: bool) {
        // Read from each queue's state by the poller.
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
        self.shared.writeback.store(buf[0] == 1, Ordering::Relaxed);
        tracing::info!(
            writeback = buf[0] == 1,
            "guest changed the write cache mode"
        );
        Ok(())
    }

    fn update_memory(&self, _mem: GuestMemoryAtomic) -> io::Result<()> {
        // Pollers share the same atomic map and load a snapshot per batch.
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.shape.num_queues).map(|q| 1u64 << q).collect()
    }

    /// GET_VRING_BASE: the frontend takes the returned index as final, so every request of
    /// the queue that was popped must be completed first (vhost-user spec, "stop ring").
    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        // Queue i is served by worker i (see `queues_per_thread`).
        let t = queue_index as usize;
        if let Some(poller) = self.pollers.get(t) {
            let mut p = lock(poller);
            if p.in_flight() > 0 {
                let vrings = self.thread_vrings[t].get().map_or(&[][..], |v| &v[..]);
                p.drain(vrings);
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
        thread_id: usize,
    ) -> io::Result<()> {
        let Some(poller) = self.pollers.get(thread_id) else {
            return Ok(());
        };
        self.thread_vrings[thread_id].get_or_init(|| vrings.to_vec());
        let mut p = lock(poller);
        if u64::from(device_event) == self.completion_event_id() {
            p.on_completion_event(vrings);
        } else if usize::from(device_event) < vrings.len() {
            p.on_kick(vrings, usize::from(device_event));
        }
        Ok(())
    }
}
