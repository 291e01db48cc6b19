//! The devices being served, which can come and go while vubd runs: each with its disk, its
//! socket and the thread that serves its frontends. Devices are added at startup (the command
//! line) and through the control socket, removed through it (their sessions end, requests in
//! flight completed) and all together when vubd stops.
//!
//! Adds and removes are serialized (`changes`), so the checks of a new device (its name,
//! socket, image and namespace are nobody else's; its NVMe controller has queue pairs for it)
//! see a stable set; the list itself (`devices`) is locked only briefly, so a slow add (an
//! NVMe/TCP connection) never holds up `device_list`.
//!
//! The registry also keeps the groups of devices sharing rate limits (`qos::Groups`): each
//! device's limits (`qos::DeviceQos`) live as long as the device, across its frontends'
//! sessions, and change through the groups so that a device's plan always holds its group's
//! current buckets.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::os::unix::net::UnixListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use tracing::{error, info};
use vhost::vhost_user::Listener;

use super::serving::{DeviceStop, Serving};
use super::socket::{SocketFile, listen_device};
use super::{DaemonError, device, kata};
use crate::bdev::capacity::{Resize, ResizeError};
use crate::bdev::nvme_pcie::Controllers;
use crate::bdev::{BlockDevice, DeviceInfo, Disk};
use crate::clock::Clock;
use crate::config::{Config, DeviceConfig, DiskSpec, check_beside};
use crate::metrics::{DeviceMetrics, DeviceStats};
use crate::poller::PollerSet;
use crate::qos::{DeviceQos, Groups, QosError, Rates};
use crate::sandbox::{self, Role};

/// A device as `device_list` shows it.
#[derive(Clone, Debug)]
pub struct DeviceStatus {
    pub cfg: Arc<DeviceConfig>,
    pub info: DeviceInfo,
    /// A frontend is connected.
    pub connected: bool,
    /// Its own rate limits in force.
    pub qos: Rates,
    /// The group whose limits it shares.
    pub qos_group: Option<String>,
}

/// Why a device could not be removed or changed; nothing changed then.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("no device is named {0:?}")]
    NoSuchDevice(String),
    #[error(transparent)]
    Resize(#[from] ResizeError),
    #[error(transparent)]
    Qos(#[from] QosError),
}

/// A device being served.
#[derive(Debug)]
struct Entry {
    cfg: Arc<DeviceConfig>,
    disk: Arc<Disk>,
    first_poller: usize,
    stop: Arc<DeviceStop>,
    thread: JoinHandle<()>,
    /// Its counters, from its start to its removal, whatever frontends come and go (`None`
    /// with `--metrics off`).
    metrics: Option<Arc<DeviceMetrics>>,
    /// Its rate limits, from its start to its removal (its debt survives reconnections).
    qos: Arc<DeviceQos>,
    /// The minor number of its node in a Kata store, if it is in one.
    kata_minor: Option<u32>,
}

/// What [`Registry::add`] and [`Registry::remove`] change together.
#[derive(Debug, Default)]
struct Changes {
    /// The NVMe PCIe controllers open: a namespace added later shares its controller.
    ctrls: Controllers,
    /// The poller of the next device's queue 0.
    next_poller: usize,
    /// The next device's number in the log.
    next_index: usize,
}

/// The devices being served.
#[derive(Debug)]
pub(super) struct Registry {
    /// The global options devices are opened with (`devices` is empty).
    cfg: Config,
    pollers: Arc<PollerSet>,
    changes: Mutex<Changes>,
    devices: Mutex<BTreeMap<String, Entry>>,
    /// Set once vubd is stopping: no device is added any more.
    stopping: AtomicBool,
    /// The groups of devices sharing rate limits.
    groups: Arc<Groups>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Registry {
    /// An empty registry serving on `pollers`, opening devices with the options of `cfg`
    /// (its devices are ignored), with its QoS groups, and sharing the controllers in `ctrls`.
    pub(super) fn new(mut cfg: Config, pollers: Arc<PollerSet>, ctrls: Controllers) -> Self {
        cfg.devices.clear();
        // The pollers' clock: the buckets count time in its ticks.
        let groups = Arc::new(Groups::new(Clock::get()));
        for g in &cfg.qos_groups {
            groups.set_group(&g.name, g.rates);
        }
        Self {
            cfg,
            pollers,
            changes: Mutex::new(Changes {
                ctrls,
                ..Changes::default()
            }),
            devices: Mutex::new(BTreeMap::new()),
            stopping: AtomicBool::new(false),
            groups,
        }
    }

    /// The groups of devices sharing rate limits.
    pub(super) fn groups(&self) -> &Arc<Groups> {
        &self.groups
    }

    /// The limits of device `cfg` as it starts, in its group if it names one; an unknown
    /// group changes nothing.
    fn device_qos(&self, cfg: &DeviceConfig) -> Result<Arc<DeviceQos>, DaemonError> {
        let qos = Arc::new(DeviceQos::default());
        self.groups
            .set_device(&qos, cfg.qos, cfg.qos_group.as_deref())
            .map_err(|source| DaemonError::Qos {
                name: cfg.name.clone(),
                source,
            })?;
        Ok(qos)
    }

    /// Starts serving a device whose socket and disk are ready (startup).
    pub(super) fn start(
        &self,
        cfg: DeviceConfig,
        listener: (UnixListener, SocketFile),
        disk: Arc<Disk>,
    ) -> Result<(), DaemonError> {
        let mut changes = lock(&self.changes);
        let first = changes.next_poller;
        let qos = self.device_qos(&cfg)?;
        self.spawn(&mut changes, Arc::new(cfg), listener, disk, first, qos)
    }

    /// Adds a device while vubd runs: checks it beside the others, listens on its socket,
    /// opens its disk and serves it. Nothing changes when it fails.
    pub(super) fn add(&self, cfg: DeviceConfig) -> Result<(), DaemonError> {
        let mut changes = lock(&self.changes);
        if self.stopping.load(Ordering::Acquire) {
            return Err(DaemonError::Stopping);
        }
        {
            let devices = lock(&self.devices);
            check_beside(&cfg, devices.values().map(|e| &*e.cfg)).map_err(DaemonError::Config)?;
        }
        // Names are resolved before the sandbox only: it allows no DNS or netlink.
        if let DiskSpec::NvmeTcp(uri) = &cfg.disk
            && uri.host.parse::<IpAddr>().is_err()
        {
            return Err(DaemonError::HostName(uri.host.clone()));
        }
        // Before the socket and the disk, which an unknown group would leave for nothing. If
        // a later step fails, the limits are dropped and their group forgets them.
        let qos = self.device_qos(&cfg)?;
        let first = changes.next_poller;
        // A device's socket first, as at startup: a busy one is the first thing reported.
        let listener = listen_device(&cfg, None)?;
        let disk = Arc::new(device::open_disk(&self.cfg, &cfg, &mut changes.ctrls)?);
        if let DiskSpec::NvmePcie(_) = &cfg.disk {
            let devices = lock(&self.devices);
            let placed = devices
                .values()
                .map(|e| (&*e.cfg, e.first_poller))
                .chain(std::iter::once((&cfg, first)));
            device::check_pcie_queues(placed, self.pollers.len(), &changes.ctrls)?;
        }
        self.spawn(&mut changes, Arc::new(cfg), listener, disk, first, qos)
    }

    /// Starts the thread of a device that listens and has its disk, and lists it.
    fn spawn(
        &self,
        changes: &mut Changes,
        cfg: Arc<DeviceConfig>,
        (listener, socket_file): (UnixListener, SocketFile),
        disk: Arc<Disk>,
        first_poller: usize,
        qos: Arc<DeviceQos>,
    ) -> Result<(), DaemonError> {
        listener
            .set_nonblocking(true)
            .map_err(DaemonError::Worker)?;
        let listener = Listener::from(listener);
        let index = changes.next_index;
        let stop = Arc::new(DeviceStop::new().map_err(DaemonError::Signals)?);
        let metrics = self
            .cfg
            .metrics
            .then(|| Arc::new(DeviceMetrics::new(cfg.num_queues)));
        let serving = Serving {
            index,
            cfg: cfg.clone(),
            disk: disk.clone(),
            first_poller,
            pollers: self.pollers.clone(),
            stop: stop.clone(),
            metrics: metrics.clone(),
            qos: qos.clone(),
        };
        let info = disk.info();
        // Once its socket listens: Kata finds the socket from the node.
        let kata_node = match &cfg.kata_store {
            Some(store) => {
                let ours: BTreeSet<u32> = lock(&self.devices)
                    .values()
                    .filter_map(|e| e.kata_minor)
                    .collect();
                Some(kata::make_node(store, &cfg.name, &ours)?)
            }
            None => None,
        };
        let kata_minor = kata_node.as_ref().map(kata::KataNode::minor);
        let thread = std::thread::Builder::new()
            .name(format!("vubd-device-{index}"))
            .spawn(move || {
                sandbox::enter(Role::Session);
                // The socket file and the Kata node go when this device stops serving (in
                // this thread, whose role may unlink them); the node first, so that Kata
                // never finds a node without its socket.
                let _socket_file = socket_file;
                let _kata_node = kata_node;
                serving.serve(listener);
            })
            .map_err(DaemonError::Worker)?;
        info!(
            device = index,
            name = %cfg.name,
            disk = %cfg.disk,
            capacity = info.capacity_bytes,
            queues = cfg.num_queues,
            pollers = self.pollers.len(),
            poll = ?self.cfg.poll,
            "ready"
        );
        changes.next_index += 1;
        changes.next_poller =
            device::next_first_poller(first_poller, cfg.num_queues, self.pollers.len());
        let entry = Entry {
            cfg: cfg.clone(),
            disk,
            first_poller,
            stop,
            thread,
            metrics,
            qos,
            kata_minor,
        };
        lock(&self.devices).insert(cfg.name.clone(), entry);
        Ok(())
    }

    /// Removes device `name`: its frontend's session ends (requests in flight complete and
    /// are published first), its socket goes, and its disk is closed (an NVMe PCIe controller
    /// with its last namespace).
    pub(super) fn remove(&self, name: &str) -> Result<(), DeviceError> {
        let _changes = lock(&self.changes);
        let entry = lock(&self.devices)
            .remove(name)
            .ok_or_else(|| DeviceError::NoSuchDevice(name.to_owned()))?;
        finish(entry);
        Ok(())
    }

    /// Resizes device `name` as asked: its disk first, then its session (the requests'
    /// bounds, the configuration space, the frontend told). Returns the new capacity in
    /// bytes.
    pub(super) fn resize(&self, name: &str, req: Resize) -> Result<u64, DeviceError> {
        let _changes = lock(&self.changes);
        let (disk, stop) = {
            let devices = lock(&self.devices);
            let e = devices
                .get(name)
                .ok_or_else(|| DeviceError::NoSuchDevice(name.to_owned()))?;
            (e.disk.clone(), e.stop.clone())
        };
        let bytes = disk.resize(req)?;
        if let Some(session) = stop.backend() {
            session.resize(bytes);
        }
        Ok(bytes)
    }

    /// Gives device `name` its own `rates` and puts it in `group` (which must exist) or in
    /// none, at once for its running session too (its pollers see the new plan at their next
    /// pass). Returns its settings now. Nothing changes on an error.
    pub(super) fn set_qos(
        &self,
        name: &str,
        rates: Rates,
        group: Option<&str>,
    ) -> Result<(Rates, Option<String>), DeviceError> {
        // Under the list's lock: a device being removed is either changed or not found.
        let devices = lock(&self.devices);
        let e = devices
            .get(name)
            .ok_or_else(|| DeviceError::NoSuchDevice(name.to_owned()))?;
        self.groups.set_device(&e.qos, rates, group)?;
        Ok(e.qos.settings())
    }

    /// Every device, by name.
    pub(super) fn list(&self) -> Vec<DeviceStatus> {
        lock(&self.devices)
            .values()
            .map(|e| {
                let (qos, qos_group) = e.qos.settings();
                DeviceStatus {
                    cfg: e.cfg.clone(),
                    info: e.disk.info(),
                    connected: e.stop.connected(),
                    qos,
                    qos_group,
                }
            })
            .collect()
    }

    /// The metrics of every device (or of the one named), by name, read now; `None` when
    /// vubd counts none (`--metrics off`).
    pub(super) fn read_metrics(&self, name: Option<&str>) -> Option<Vec<(String, DeviceStats)>> {
        if !self.cfg.metrics {
            return None;
        }
        // Read outside the lock: a device's queues are a few kilobytes of counters each.
        let devices: Vec<(String, Arc<DeviceMetrics>)> = lock(&self.devices)
            .iter()
            .filter(|(n, _)| name.is_none_or(|name| name == n.as_str()))
            .filter_map(|(n, e)| Some((n.clone(), e.metrics.clone()?)))
            .collect();
        let clock = Clock::get();
        Some(
            devices
                .into_iter()
                .map(|(n, m)| (n, m.read(&clock)))
                .collect(),
        )
    }

    /// vubd stops: no device is added any more, and every device is asked to stop.
    pub(super) fn request_stop(&self) {
        self.stopping.store(true, Ordering::Release);
        for e in lock(&self.devices).values() {
            e.stop.request();
        }
    }

    /// Waits for every device to stop (after [`Registry::request_stop`]) and closes them.
    pub(super) fn finish_all(&self) {
        let _changes = lock(&self.changes);
        let devices = std::mem::take(&mut *lock(&self.devices));
        for e in devices.into_values() {
            finish(e);
        }
    }
}

/// Stops a device's thread (if not yet asked), waits for it, and drops its disk.
fn finish(e: Entry) {
    e.stop.request();
    if e.thread.join().is_err() {
        error!(name = %e.cfg.name, "the device's thread panicked");
    }
    info!(name = %e.cfg.name, "device removed");
}
