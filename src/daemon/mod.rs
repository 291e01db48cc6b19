//! Wiring and lifecycle: builds the devices of the validated configuration, serves each
//! device's socket one frontend at a time on a thread of its own (a disconnect leaves that
//! device ready for the next, and the other devices serving), all devices' queues on one set
//! of pollers; takes devices in and out through the control socket while it runs
//! ([`registry`], [`control`]), and shuts everything down cleanly on SIGINT / SIGTERM.

mod control;
mod device;
mod kata;
mod methods;
mod metrics_http;
mod nvme;
mod pcie;
mod registry;
mod serving;
mod signals;
mod socket;
pub mod stdout;

pub use self::device::{device_model, open_disks};
pub use self::methods::LogControl;
pub use self::nvme::discover;
pub use self::pcie::nvme_list;
pub use crate::error_chain::error_chain;

use std::io;
use std::path::PathBuf;
use std::sync::{Arc, mpsc};

use thiserror::Error;
use tracing::{error, info};

use crate::bdev::BlockDevice;
use crate::bdev::file::FileError;
use crate::bdev::nvme_pcie::{Controllers, NvmePcieError};
use crate::bdev::nvme_tcp::NvmeTcpError;
use crate::config::{Config, ConfigError};
use crate::mem::fault;
use crate::poller::PollerSet;
use crate::sandbox::{self, Role};
use crate::systemd::{self, Notifier, SystemdError};
use methods::Methods;
use registry::Registry;
use signals::Signals;

/// Why the daemon stopped or could not start.
#[derive(Debug, Error)]
pub enum DaemonError {
    #[error("--disk")]
    Disk(#[source] FileError),
    #[error("cannot create {path}")]
    CreateDisk {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("socket {0}: another process is serving it (--incoming takes a device's over)")]
    SocketBusy(PathBuf),
    #[error("socket {0}: exists and is not a socket")]
    NotASocket(PathBuf),
    #[error("socket {path}: cannot listen")]
    Bind {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("socket {path}: cannot give it the mode and group of --socket-mode and --socket-group")]
    SocketPerms {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("--fd {0}: not a listening unix socket")]
    BadFd(i32),
    #[error("fd-name={name}: {why}")]
    NotPassed { name: String, why: String },
    #[error(
        "socket activation: descriptor {fd} (LISTEN_FDNAMES {name:?}) is passed to vubd and no \
         device serves it (give one fd-name={name})"
    )]
    UnusedSocket { fd: i32, name: String },
    #[error(transparent)]
    Systemd(SystemdError),
    #[error("kata-store: {path}: {what}")]
    KataStore {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("--disk: cannot resolve {host}")]
    Resolve {
        host: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot set up the sandbox (--seccomp off runs without it)")]
    Sandbox(#[source] crate::sandbox::SandboxError),
    #[error("cannot set up signal handling")]
    Signals(#[source] io::Error),
    #[error("cannot start the pollers")]
    Pollers(#[source] io::Error),
    #[error("vhost-user: {0}")]
    VhostUser(vhost_user_backend::Error),
    #[error("vhost-user worker")]
    Worker(#[source] io::Error),
    #[error("--disk")]
    NvmeTcp(#[source] NvmeTcpError),
    #[error("--disk")]
    NvmePcie(#[source] NvmePcieError),
    #[error("NVMe host identity")]
    NvmeHost(#[source] crate::nvme::tcp::ctrl::CtrlError),
    #[error("discover")]
    Discover(#[source] crate::nvme::tcp::ctrl::CtrlError),
    #[error("--control-socket")]
    Control(#[source] Box<DaemonError>),
    #[error("--metrics-listen {addr}: cannot listen")]
    MetricsListen {
        addr: std::net::SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Config(ConfigError),
    #[error(
        "NVMe/TCP target {0:?}: give an address (host names are resolved only at startup, \
         before the sandbox)"
    )]
    HostName(String),
    #[error("vubd is stopping")]
    Stopping,
    /// A device's rate limits or group could not be set (an unknown group).
    #[error("device {name:?}")]
    Qos {
        name: String,
        #[source]
        source: crate::qos::QosError,
    },
    #[error("--device {arg:?}")]
    Device {
        arg: String,
        #[source]
        source: Box<DaemonError>,
    },
    #[error(
        "NVMe {bdf}: {needed} pollers would serve its namespaces, one I/O queue pair each, and \
         the controller grants {granted} (fewer pollers: --cpus, or fewer queues)"
    )]
    PcieQueues {
        bdf: String,
        granted: usize,
        needed: usize,
    },
}

impl DaemonError {
    /// Exit status: 2 for a configuration the user can fix, 1 for a failure while serving.
    pub fn exit_code(&self) -> u8 {
        match self {
            DaemonError::Device { source, .. } | DaemonError::Control(source) => source.exit_code(),
            DaemonError::Disk(_)
            | DaemonError::CreateDisk { .. }
            | DaemonError::SocketBusy(_)
            | DaemonError::NotASocket(_)
            | DaemonError::Bind { .. }
            | DaemonError::MetricsListen { .. }
            | DaemonError::SocketPerms { .. }
            | DaemonError::BadFd(_)
            | DaemonError::NotPassed { .. }
            | DaemonError::UnusedSocket { .. }
            | DaemonError::Systemd(_)
            | DaemonError::KataStore { .. }
            | DaemonError::NvmeTcp(_)
            | DaemonError::NvmePcie(_)
            | DaemonError::NvmeHost(_)
            | DaemonError::PcieQueues { .. }
            | DaemonError::Resolve { .. }
            | DaemonError::Config(_)
            | DaemonError::HostName(_)
            | DaemonError::Qos { .. }
            | DaemonError::Discover(_) => 2,
            _ => 1,
        }
    }
}

/// Serves every device's metrics on the endpoint `listener` (`--metrics-listen`), reading
/// them from `registry` at each request.
fn serve_metrics(
    listener: metrics_http::MetricsListener,
    registry: &Arc<Registry>,
) -> Result<metrics_http::MetricsServer, DaemonError> {
    let addr = listener.local_addr().map_err(DaemonError::Worker)?;
    let registry = registry.clone();
    let server = listener.serve(move || {
        let readings = registry.read_metrics(None).unwrap_or_default();
        crate::metrics::prometheus::render(&readings)
    })?;
    info!(address = %addr, "metrics: serving GET /metrics over HTTP");
    Ok(server)
}

/// Tells the service manager `state`, if vubd runs under one that listens (NOTIFY_SOCKET); a
/// notification it misses is logged, not fatal: vubd serves either way.
fn notify(notifier: Option<&Notifier>, state: &str) {
    if let Some(n) = notifier
        && let Err(e) = n.notify(state)
    {
        tracing::warn!(state, error = %e, "cannot notify the service manager");
    }
}

/// Serves the configured devices, and those the control socket adds, until SIGINT / SIGTERM;
/// `log` changes what is logged (`log_set_level`).
pub fn run(mut cfg: Config, log: LogControl) -> Result<(), DaemonError> {
    // SAFETY: vubd has started no thread yet (nor has anything before it: clap and the log
    // subscriber start none), so nothing reads the environment while these remove variables.
    let (passed, notifier) = unsafe { (systemd::take_listen_fds(), Notifier::from_env()) };
    let passed = passed.map_err(DaemonError::Systemd)?;
    let notifier = notifier.map_err(DaemonError::Systemd)?;
    nvme::resolve_targets(&mut cfg)?;
    // The baseline before anything else, startup included: before any thread exists, so that
    // every thread inherits it.
    sandbox::install_baseline(cfg.seccomp).map_err(DaemonError::Sandbox)?;
    // Block the signals before any thread exists so that every thread inherits the mask and
    // only the signal thread receives them.
    let signals = Signals::block().map_err(DaemonError::Signals)?;
    // Before any thread can touch memory a frontend shares: a fault there (a file the
    // frontend shortened) fails that device's session, not the process.
    fault::install().map_err(DaemonError::Signals)?;

    // The sockets first: a busy socket must be reported before anything else happens.
    let control = cfg
        .control_socket
        .as_deref()
        .map(control::bind)
        .transpose()?;
    let metrics_listener = cfg.metrics_listen.map(metrics_http::bind).transpose()?;
    let inherited = socket::activated_fds(&cfg.devices, &passed)?;
    let mut listeners = Vec::with_capacity(cfg.devices.len());
    for (d, fd) in cfg.devices.iter().zip(inherited) {
        let l = socket::listen_device(d, fd).map_err(|e| device::in_device(d, e))?;
        listeners.push(l);
    }
    let mut ctrls = Controllers::default();
    let disks = device::open_disks_with(&cfg, &mut ctrls)?;
    let pollers = Arc::new(PollerSet::start(&cfg.pollers, cfg.poll).map_err(DaemonError::Pollers)?);
    let infos: Vec<_> = disks.iter().map(|d| d.info()).collect();
    device::print_attach_hint(&cfg, &infos);
    let devices = std::mem::take(&mut cfg.devices);
    let defaults = cfg.device_defaults.clone();
    let registry = Arc::new(Registry::new(cfg, pollers.clone(), ctrls));
    let (stop_tx, stop_rx) = mpsc::channel();
    signals
        .spawn_waiter(move || {
            let _ = stop_tx.send(());
        })
        .map_err(DaemonError::Signals)?;
    let mut started = Ok(());
    for ((d, l), disk) in devices.into_iter().zip(listeners).zip(disks) {
        started = registry.start(d, l, disk);
        if started.is_err() {
            break;
        }
    }
    let servers = started.and_then(|()| {
        let control = match control {
            Some(c) => {
                let methods = Methods {
                    registry: registry.clone(),
                    defaults,
                    log,
                };
                Some(c.serve(Arc::new(methods))?)
            }
            None => None,
        };
        let metrics = match metrics_listener.map(|l| serve_metrics(l, &registry)) {
            Some(Err(e)) => {
                if let Some(c) = control {
                    c.stop();
                }
                return Err(e);
            }
            Some(Ok(m)) => Some(m),
            None => None,
        };
        Ok((control, metrics))
    });
    if let Ok((control, _)) = &servers {
        if control.is_some() {
            info!("taking requests on the control socket");
        }
        // Every device listens, and the control socket: a service manager may start what
        // connects to them.
        notify(notifier.as_ref(), "READY=1");
        // Every device thread runs: what is left here is waiting for the end, then stopping
        // the devices.
        sandbox::enter(Role::Control);
        let _ = stop_rx.recv();
        notify(notifier.as_ref(), "STOPPING=1");
    }
    info!("shutting down");
    let result = servers.map(|(control, metrics)| {
        if let Some(m) = metrics {
            m.stop();
        }
        if let Some(c) = control {
            c.stop();
        }
    });
    registry.request_stop();
    registry.finish_all();
    drop(registry);
    match Arc::try_unwrap(pollers) {
        Ok(p) => p.stop(),
        Err(_) => error!("the pollers are still in use at the end"),
    }
    result
}
