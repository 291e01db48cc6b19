//! The asynchronous events of an NVMe PCIe controller, answered on a thread of its own
//! (`vubd-nvme-events`, one per controller, in the pollers' sandbox role: the admin queue and
//! its registers are what pollers touch when they reset a controller). It sleeps on the admin
//! queue's interrupt (MSI-X vector 0) when there is one, and looks at least every
//! [`WATCH_EVERY`]; when the controller reports that namespaces changed
//! ([`PcieController::namespace_changes`]), each one a device serves is read again and a
//! larger size becomes its capacity (the capacity's eventfd tells the device's session). It
//! ends once the controller is closed.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::thread;
use std::time::Duration;

use tracing::{debug, info, warn};
use vmm_sys_util::eventfd::EventFd;

use super::namespace_size;
use crate::bdev::capacity::Capacity;
use crate::nvme::pcie::PcieController;
use crate::nvme::spec::ChangedNamespaces;

/// The longest the thread sleeps between two looks at the admin queue.
const WATCH_EVERY: Duration = Duration::from_millis(500);

/// The namespaces of one controller whose capacity follows its notices.
#[derive(Debug, Default)]
pub(super) struct Watch {
    namespaces: Mutex<Vec<Watched>>,
}

#[derive(Debug)]
struct Watched {
    nsid: u32,
    lba_shift: u32,
    /// The device's; gone with it.
    capacity: Weak<Capacity>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Watch {
    /// Starts the thread of `ctrl`'s events.
    pub(super) fn start(ctrl: &Arc<PcieController>) -> io::Result<Arc<Watch>> {
        let watch = Arc::new(Watch::default());
        let wake = ctrl.admin_event_fd().map(EventFd::try_clone).transpose()?;
        let (ctrl, w) = (Arc::downgrade(ctrl), watch.clone());
        thread::Builder::new()
            .name("vubd-nvme-events".into())
            .spawn(move || run(&ctrl, &w, wake.as_ref()))?;
        Ok(watch)
    }

    /// Namespace `nsid` (blocks of `1 << lba_shift` bytes) has `capacity` while its device
    /// lives.
    pub(super) fn add(&self, nsid: u32, lba_shift: u32, capacity: &Arc<Capacity>) {
        let mut namespaces = lock(&self.namespaces);
        namespaces.retain(|w| w.capacity.strong_count() > 0);
        namespaces.push(Watched {
            nsid,
            lba_shift,
            capacity: Arc::downgrade(capacity),
        });
    }

    /// Reads again the size of each namespace served that `changed` names.
    fn follow(&self, ctrl: &PcieController, changed: &ChangedNamespaces) {
        let namespaces: Vec<(u32, u32, Arc<Capacity>)> = lock(&self.namespaces)
            .iter()
            .filter(|w| changed.contains(w.nsid))
            .filter_map(|w| Some((w.nsid, w.lba_shift, w.capacity.upgrade()?)))
            .collect();
        for (nsid, lba_shift, capacity) in namespaces {
            let bdf = ctrl.bdf();
            match namespace_size(ctrl, nsid, lba_shift) {
                Ok(bytes) => {
                    let before = capacity.follow_growth(bytes);
                    if bytes > before {
                        info!(bdf, nsid, from = before, to = bytes, "NVMe namespace grew");
                    } else if bytes < before {
                        warn!(
                            bdf,
                            nsid,
                            from = before,
                            to = bytes,
                            "NVMe namespace shrank; the guest keeps its capacity until \
                             device_resize with force=true"
                        );
                    }
                }
                Err(e) => warn!(
                    bdf, nsid, error = %crate::error_chain::error_chain(&e),
                    "cannot read the size of a changed NVMe namespace"
                ),
            }
        }
    }
}

fn run(ctrl: &Weak<PcieController>, watch: &Watch, wake: Option<&EventFd>) {
    crate::sandbox::enter(crate::sandbox::Role::Poller);
    loop {
        sleep(wake);
        let Some(ctrl) = ctrl.upgrade() else {
            return;
        };
        match ctrl.namespace_changes() {
            Ok(Some(changed)) => {
                debug!(bdf = ctrl.bdf(), ?changed, "NVMe namespaces changed");
                watch.follow(&ctrl, &changed);
            }
            Ok(None) => {}
            // A failed admin queue: the pollers reset the controller, which sends a new
            // request.
            Err(e) => debug!(bdf = ctrl.bdf(), error = %e, "NVMe asynchronous events"),
        }
    }
}

/// Waits for the admin queue's interrupt, or [`WATCH_EVERY`].
fn sleep(wake: Option<&EventFd>) {
    let Some(fd) = wake else {
        thread::sleep(WATCH_EVERY);
        return;
    };
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = i32::try_from(WATCH_EVERY.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: one valid pollfd for the duration of the call.
    unsafe { libc::poll(&mut p, 1, ms) };
    let _ = fd.read();
}
