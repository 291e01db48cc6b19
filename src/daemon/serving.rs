//! One device's serving thread: it waits for a frontend on the device's socket, serves it (a
//! vhost-user session whose queues run on the shared pollers) until it goes, and waits for
//! the next, until the device is removed or vubd stops.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tracing::{error, info, warn};
use vhost::vhost_user::Listener;
use vhost_user_backend::{ShutdownHandle, VhostUserDaemon};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::socket::wait_for_connection;
use super::{DaemonError, device, error_chain};
use crate::bdev::{BlockDevice, Disk};
use crate::config::DeviceConfig;
use crate::mem::fault::DeviceFaults;
use crate::mem::{GuestMemory, GuestMemoryAtomic};
use crate::metrics::DeviceMetrics;
use crate::poller::PollerSet;
use crate::qos::DeviceQos;
use crate::vhost_user::BlkBackend;

/// Asks one device's thread to stop: it stops waiting for a frontend, and ends the session
/// of the frontend it serves (whose requests in flight complete first).
pub(super) struct DeviceStop {
    requested: AtomicBool,
    /// Readable once a stop was requested: wakes the device's accept loop.
    wake: EventFd,
    /// The current session, if a frontend is connected.
    session: Mutex<Option<ShutdownHandle>>,
    /// The current session's backend, from its start (while it waits for its frontend too):
    /// what a resize tells.
    backend: Mutex<Option<Arc<BlkBackend>>>,
}

impl std::fmt::Debug for DeviceStop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceStop")
            .field("requested", &self.requested())
            .field("connected", &self.connected())
            .finish()
    }
}

impl DeviceStop {
    pub(super) fn new() -> io::Result<Self> {
        Ok(Self {
            requested: AtomicBool::new(false),
            wake: EventFd::new(EFD_NONBLOCK)?,
            session: Mutex::new(None),
            backend: Mutex::new(None),
        })
    }

    pub(super) fn requested(&self) -> bool {
        self.requested.load(Ordering::Acquire)
    }

    pub(super) fn request(&self) {
        self.requested.store(true, Ordering::Release);
        // Never read: it stays readable for the accept loop.
        let _ = self.wake.write(1);
        if let Some(h) = lock(&self.session).as_ref() {
            h.shutdown();
        }
    }

    /// Whether a frontend is connected.
    pub(super) fn connected(&self) -> bool {
        lock(&self.session).is_some()
    }

    /// The current session's backend, if there is one.
    pub(super) fn backend(&self) -> Option<Arc<BlkBackend>> {
        lock(&self.backend).clone()
    }

    /// Records the current session; ends it at once if a stop was already requested.
    fn set_session(&self, handle: Option<ShutdownHandle>) {
        let mut s = lock(&self.session);
        *s = handle;
        if self.requested()
            && let Some(h) = s.as_ref()
        {
            h.shutdown();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What a device's thread serves with.
#[derive(Debug)]
pub(super) struct Serving {
    /// The device's number in the log (`device=N`), never reused while vubd runs.
    pub index: usize,
    pub cfg: Arc<DeviceConfig>,
    pub disk: Arc<Disk>,
    /// The poller of the device's queue 0; queue `q` goes to the next `q`-th one.
    pub first_poller: usize,
    pub pollers: Arc<PollerSet>,
    pub stop: Arc<DeviceStop>,
    /// The device's counters, which every session's queues count into.
    pub metrics: Option<Arc<DeviceMetrics>>,
    /// The device's rate limits, which every session's queues are held to.
    pub qos: Arc<DeviceQos>,
}

impl Serving {
    /// Serves frontends on `listener`, one at a time, until the device's stop.
    pub(super) fn serve(&self, mut listener: Listener) {
        while wait_for_frontend(&listener, &self.stop) {
            if let Err(e) = self.serve_one(&mut listener) {
                error!(
                    device = self.index,
                    error = %error_chain(&e),
                    "frontend session ended with an error"
                );
            }
        }
    }

    /// One frontend session: fresh protocol state, queues attached to the shared pollers
    /// while the frontend runs them, detached (in-flight I/O completed) when it goes.
    fn serve_one(&self, listener: &mut Listener) -> Result<(), DaemonError> {
        static NEXT_KEY: AtomicU64 = AtomicU64::new(1);
        let disk = &self.disk;
        let serial = self
            .cfg
            .serial
            .as_deref()
            .or(disk.serial())
            .unwrap_or_default();
        let faults = Arc::new(DeviceFaults::new().map_err(DaemonError::Worker)?);
        let (shape, mut shared) =
            device::device_model(&self.cfg, &disk.info(), serial, faults.clone());
        shared.index = self.index;
        shared.metrics = self.metrics.clone();
        shared.qos = self.qos.clone();
        let mem = GuestMemoryAtomic::new(GuestMemory::new());
        let handles = (0..shape.num_queues)
            .map(|q| self.pollers.for_queue(self.first_poller + q).clone())
            .collect();
        let backend = Arc::new(BlkBackend::new(
            shape,
            NEXT_KEY.fetch_add(1, Ordering::Relaxed),
            Arc::new(shared),
            disk.clone(),
            mem.clone(),
            handles,
        ));
        *lock(&self.stop.backend) = Some(backend.clone());
        // A resize between the model above and now reached the disk only.
        backend.resize(disk.info().capacity_bytes);
        let result = self.run_session(listener, &backend, mem, &faults);
        *lock(&self.stop.backend) = None;
        result
    }

    /// Serves `backend`'s frontend (guest memory `mem`, faults recorded in `faults`) until it
    /// goes, then ends the session.
    fn run_session(
        &self,
        listener: &mut Listener,
        backend: &Arc<BlkBackend>,
        mem: GuestMemoryAtomic,
        faults: &DeviceFaults,
    ) -> Result<(), DaemonError> {
        let disk = &self.disk;
        let mut daemon = VhostUserDaemon::new("vubd-vhost-user".into(), backend.clone(), mem)
            .map_err(DaemonError::VhostUser)?;
        // All queues share one relay thread (`queues_per_thread`), the memory sweep timer and
        // the fault eventfd with them.
        if let Some(h) = daemon.get_epoll_handlers().first() {
            for (fd, event) in backend.listeners() {
                h.register_listener(fd, EventSet::IN, event)
                    .map_err(|e| DaemonError::Worker(io::Error::other(e)))?;
            }
        }

        daemon.start(listener).map_err(DaemonError::VhostUser)?;
        info!(device = self.index, "frontend connected");
        self.stop.set_session(daemon.shutdown_handle());
        backend.set_shutdown(daemon.shutdown_handle());
        let result = daemon.wait();
        self.stop.set_session(None);
        match &result {
            Ok(()) => info!(device = self.index, "frontend disconnected"),
            Err(e) => warn!(device = self.index, error = %e, "frontend connection ended"),
        }
        // In-flight requests complete and are published before the pollers let go of the
        // queues; then the relay thread is stopped and joined.
        backend.close();
        if let Some(f) = faults.first() {
            error!(
                device = self.index,
                fault = %f,
                "the frontend's shared memory faulted (its file was shortened): the session was \
                 closed and its requests stopped"
            );
        }
        drop(daemon);
        backend.close_exit_events();
        // Without a frontend the device returns to how it started: a device that was not
        // taken over holds its image for writing again, unless another process took it
        // meanwhile (the destination of a migration) or the device is stopping.
        if !self.cfg.starts_inactive() && !self.stop.requested() {
            match disk.acquire_write() {
                Ok(()) => {}
                Err(e) => info!(device = self.index, error = %e, "image left to the other process"),
            }
        }
        Ok(())
    }
}

/// Waits until a frontend connects (true) or the device's stop was requested (false).
fn wait_for_frontend(listener: &Listener, stop: &DeviceStop) -> bool {
    // The stop's eventfd stays readable once requested.
    !stop.requested()
        && wait_for_connection(listener.as_raw_fd(), stop.wake.as_raw_fd())
        && !stop.requested()
}
