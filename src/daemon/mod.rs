//! Wiring and lifecycle: builds the devices from the validated configuration, serves each
//! device's socket one frontend at a time on a thread of its own (a disconnect leaves that
//! device ready for the next, and the other devices serving), all devices' queues on one set
//! of pollers, and shuts everything down cleanly on SIGINT / SIGTERM.

mod device;
mod nvme;
mod pcie;
pub mod stdout;

pub use self::device::{device_model, open_disks};
pub use self::nvme::discover;
pub use self::pcie::nvme_list;
pub use crate::error_chain::error_chain;

use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use thiserror::Error;
use tracing::{error, info, warn};
use vhost::vhost_user::Listener;
use vhost_user_backend::{ShutdownHandle, VhostUserDaemon};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::bdev::file::FileError;
use crate::bdev::nvme_pcie::NvmePcieError;
use crate::bdev::nvme_tcp::NvmeTcpError;
use crate::bdev::{BlockDevice, Disk};
use crate::config::{Config, DeviceConfig, SocketPerms, SocketSpec};
use crate::mem::fault::{self, DeviceFaults};
use crate::mem::{GuestMemory, GuestMemoryAtomic};
use crate::poller::PollerSet;
use crate::sandbox::{self, Role};
use crate::vhost_user::BlkBackend;

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
    #[error("--socket-path {0}: another process is serving this socket (--incoming takes it over)")]
    SocketBusy(PathBuf),
    #[error("--socket-path {0}: exists and is not a socket")]
    NotASocket(PathBuf),
    #[error("--socket-path {path}: cannot listen")]
    Bind {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "--socket-path {path}: cannot give it the mode and group of --socket-mode and --socket-group"
    )]
    SocketPerms {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("--fd {0}: not a listening unix socket")]
    BadFd(i32),
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
            DaemonError::Device { source, .. } => source.exit_code(),
            DaemonError::Disk(_)
            | DaemonError::CreateDisk { .. }
            | DaemonError::SocketBusy(_)
            | DaemonError::NotASocket(_)
            | DaemonError::Bind { .. }
            | DaemonError::SocketPerms { .. }
            | DaemonError::BadFd(_)
            | DaemonError::NvmeTcp(_)
            | DaemonError::NvmePcie(_)
            | DaemonError::NvmeHost(_)
            | DaemonError::PcieQueues { .. }
            | DaemonError::Resolve { .. }
            | DaemonError::Discover(_) => 2,
            _ => 1,
        }
    }
}

/// Serves the configured devices until SIGINT / SIGTERM.
pub fn run(mut cfg: Config) -> Result<(), DaemonError> {
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
    let mut listeners = Vec::with_capacity(cfg.devices.len());
    for d in &cfg.devices {
        let (listener, file) =
            listen(&d.socket, d.incoming, d.socket_perms).map_err(|e| device::in_device(d, e))?;
        listener.set_nonblocking(true).map_err(|e| {
            device::in_device(
                d,
                DaemonError::VhostUser(vhost_user_backend::Error::CreateBackendListener(e)),
            )
        })?;
        listeners.push((listener, file));
    }
    let disks = device::open_disks(&cfg)?;
    let stop = Arc::new(StopState::new(cfg.devices.len()).map_err(DaemonError::Signals)?);
    signals
        .spawn_waiter(stop.clone())
        .map_err(DaemonError::Signals)?;

    let pollers = PollerSet::start(&cfg.pollers, cfg.poll).map_err(DaemonError::Pollers)?;
    let infos: Vec<_> = disks.iter().map(|d| d.info()).collect();
    device::print_attach_hint(&cfg, &infos);
    let first_pollers = device::first_pollers(&cfg);
    std::thread::scope(|scope| {
        for (index, (listener, socket_file)) in listeners.into_iter().enumerate() {
            let serving = Serving {
                index,
                cfg: &cfg.devices[index],
                disk: &disks[index],
                first_poller: first_pollers[index],
                pollers: &pollers,
                stop: &stop,
            };
            info!(
                device = index,
                disk = ?serving.cfg.disk,
                capacity = infos[index].capacity_bytes,
                queues = serving.cfg.num_queues,
                pollers = pollers.len(),
                poll = ?cfg.poll,
                "ready"
            );
            let spawned = std::thread::Builder::new()
                .name(format!("vubd-device-{index}"))
                .spawn_scoped(scope, move || {
                    sandbox::enter(Role::Session);
                    // The socket file goes when this device stops serving.
                    let _socket_file = socket_file;
                    serving.serve(listener);
                });
            if let Err(e) = spawned {
                error!(device = index, error = %e, "cannot start the device's thread: stopping");
                stop.request();
            }
        }
        // Every device thread runs: what is left here is waiting for them, then the end.
        sandbox::enter(Role::Control);
    });
    info!("shutting down");
    pollers.stop();
    Ok(())
}

/// One device's serving loop: its frontends, one at a time.
struct Serving<'a> {
    index: usize,
    cfg: &'a DeviceConfig,
    disk: &'a Arc<Disk>,
    /// The poller of the device's queue 0; queue `q` goes to the next `q`-th one.
    first_poller: usize,
    pollers: &'a PollerSet,
    stop: &'a StopState,
}

impl Serving<'_> {
    fn serve(&self, mut listener: Listener) {
        while wait_for_frontend(&listener, self.stop) {
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
        let disk = self.disk;
        let serial = self
            .cfg
            .serial
            .as_deref()
            .or(disk.serial())
            .unwrap_or_default();
        let faults = Arc::new(DeviceFaults::new().map_err(DaemonError::Worker)?);
        let (shape, mut shared) = device::device_model(
            self.cfg,
            &disk.info(),
            serial,
            faults.clone(),
            self.pollers.len(),
        );
        shared.index = self.index;
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
        self.stop.set_session(self.index, daemon.shutdown_handle());
        backend.set_shutdown(daemon.shutdown_handle());
        let result = daemon.wait();
        self.stop.set_session(self.index, None);
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
        // meanwhile (the destination of a migration) or vubd is stopping.
        if !self.cfg.starts_inactive() && !self.stop.requested.load(Ordering::SeqCst) {
            match disk.acquire_write() {
                Ok(()) => {}
                Err(e) => info!(device = self.index, error = %e, "image left to the other process"),
            }
        }
        Ok(())
    }
}

/// Removes the socket file when vubd stops serving it, unless the path has become another
/// socket meanwhile (the new vubd of an upgrade took it over).
struct SocketFile(Option<(PathBuf, (u64, u64))>);

impl SocketFile {
    /// The socket just bound at `path`.
    fn bound(path: &Path) -> Self {
        Self(file_id(path).map(|id| (path.to_path_buf(), id)))
    }
}

/// Device and inode of what `path` names, not following a symbolic link.
fn file_id(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path)
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        if let Some((p, id)) = &self.0 {
            if file_id(p) == Some(*id) {
                let _ = std::fs::remove_file(p);
            } else {
                info!(path = %p.display(), "socket path taken over; left in place");
            }
        }
    }
}

/// Listens on the device's socket. A socket file another process still listens on is
/// refused, unless the device takes over from that process (`take_over`, `--incoming`: the new
/// vubd of an upgrade): the new socket is bound beside it and renamed over it, so that new
/// connections reach this process while the other one keeps its own until it stops. A socket
/// with a mode or group of its own (`perms`) is made the same way.
fn listen(
    spec: &SocketSpec,
    take_over: bool,
    perms: SocketPerms,
) -> Result<(Listener, SocketFile), DaemonError> {
    match spec {
        SocketSpec::Fd(fd) => {
            let fd = *fd;
            if !is_listening_socket(fd) {
                return Err(DaemonError::BadFd(fd));
            }
            // SAFETY: the fd was handed to us by the parent (backend program conventions),
            // checked above to be an open listening socket, and is owned by nothing else in
            // this process.
            let l = unsafe { UnixListener::from_raw_fd(fd) };
            Ok((Listener::from(l), SocketFile(None)))
        }
        SocketSpec::Path(path) => {
            match std::fs::symlink_metadata(path) {
                Ok(meta) if meta.file_type().is_socket() => {
                    if UnixStream::connect(path).is_ok() {
                        if take_over {
                            let bound = bind_beside(path, perms)?;
                            info!(path = %path.display(), "socket taken over from the process serving it");
                            return Ok(bound);
                        }
                        return Err(DaemonError::SocketBusy(path.clone()));
                    }
                    // Left behind by a process that is gone.
                    let _ = std::fs::remove_file(path);
                }
                Ok(_) => return Err(DaemonError::NotASocket(path.clone())),
                Err(_) => {}
            }
            if perms.any() {
                return bind_beside(path, perms);
            }
            let l = UnixListener::bind(path).map_err(|source| DaemonError::Bind {
                path: path.clone(),
                source,
            })?;
            let file = SocketFile::bound(path);
            Ok((Listener::from(l), file))
        }
    }
}

/// Binds a socket at a name beside `path` (`PATH.PID`), gives it `perms`, then renames it over
/// `path`: atomic, so a connecting frontend finds the socket ready, or the one it replaces, or
/// none, never one with other permissions. With `perms`, the socket is bound under a umask
/// that leaves it to vubd's user alone until its group and mode are set.
fn bind_beside(path: &Path, perms: SocketPerms) -> Result<(Listener, SocketFile), DaemonError> {
    let mut beside = path.as_os_str().to_owned();
    beside.push(format!(".{}", std::process::id()));
    let beside = PathBuf::from(beside);
    let _ = std::fs::remove_file(&beside);
    let bind_error = |source| DaemonError::Bind {
        path: path.to_path_buf(),
        source,
    };
    let (bound, umask) = if perms.any() {
        // SAFETY: umask only changes the process's file mode creation mask; no other thread
        // runs yet to create a file meanwhile (startup binds every socket first).
        let old = unsafe { libc::umask(0o177) };
        let bound = UnixListener::bind(&beside);
        // SAFETY: as above; the mask the process had.
        unsafe { libc::umask(old) };
        (bound, old)
    } else {
        (UnixListener::bind(&beside), 0)
    };
    let l = bound.map_err(bind_error)?;
    let result = set_perms(&beside, perms, 0o777 & !umask)
        .map_err(|source| DaemonError::SocketPerms {
            path: path.to_path_buf(),
            source,
        })
        .and_then(|()| std::fs::rename(&beside, path).map_err(bind_error));
    if let Err(e) = result {
        let _ = std::fs::remove_file(&beside);
        return Err(e);
    }
    let file = SocketFile::bound(path);
    Ok((Listener::from(l), file))
}

/// Gives the socket file at `path` the group and mode of `perms`; a group without a mode gets
/// `default_mode` (what binding would have given). Nothing for empty `perms`.
fn set_perms(path: &Path, perms: SocketPerms, default_mode: u32) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if !perms.any() {
        return Ok(());
    }
    if let Some(gid) = perms.group {
        std::os::unix::fs::lchown(path, None, Some(gid))?;
    }
    let mode = perms.mode.unwrap_or(default_mode);
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

fn is_listening_socket(fd: i32) -> bool {
    let mut accepting: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `accepting`, a live c_int; an fd that
    // is not a socket just makes it fail.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ACCEPTCONN,
            (&mut accepting as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    rc == 0 && accepting != 0
}

/// Waits until a frontend connects (true) or shutdown was requested (false).
fn wait_for_frontend(listener: &Listener, stop: &StopState) -> bool {
    loop {
        if stop.requested() {
            return false;
        }
        let mut fds = [
            libc::pollfd {
                fd: listener.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: stop.wake.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: `fds` is a live array of two pollfd structs and the count matches.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                error!(error = %e, "poll on the listening socket failed");
                return false;
            }
            continue;
        }
        if stop.requested() {
            return false;
        }
        if fds[0].revents & libc::POLLIN != 0 {
            return true;
        }
    }
}

/// Shutdown requests, shared between the signal thread and the serving loop.
struct StopState {
    requested: AtomicBool,
    /// Readable once shutdown was requested: wakes every device's accept loop.
    wake: EventFd,
    /// Each device's current session.
    sessions: Mutex<Vec<Option<ShutdownHandle>>>,
}

impl StopState {
    fn new(devices: usize) -> io::Result<Self> {
        Ok(Self {
            requested: AtomicBool::new(false),
            wake: EventFd::new(EFD_NONBLOCK)?,
            sessions: Mutex::new((0..devices).map(|_| None).collect()),
        })
    }

    fn requested(&self) -> bool {
        self.requested.load(Ordering::Acquire)
    }

    fn request(&self) {
        self.requested.store(true, Ordering::Release);
        // Never read: it stays readable for every device's accept loop.
        let _ = self.wake.write(1);
        let sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        for h in sessions.iter().flatten() {
            h.shutdown();
        }
    }

    /// Records device `index`'s current session; ends it at once if shutdown was already
    /// requested.
    fn set_session(&self, index: usize, handle: Option<ShutdownHandle>) {
        let mut sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        let Some(s) = sessions.get_mut(index) else {
            return;
        };
        *s = handle;
        if self.requested()
            && let Some(h) = s.as_ref()
        {
            h.shutdown();
        }
    }
}

/// SIGINT and SIGTERM, blocked in every thread and received by one waiter thread.
struct Signals {
    set: libc::sigset_t,
}

impl Signals {
    fn block() -> io::Result<Self> {
        // SAFETY: sigset_t is plain data; sigemptyset initialises it before use.
        let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: `set` is a live sigset_t; the calls only write to it and to this thread's
        // signal mask.
        let rc = unsafe {
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGINT);
            libc::sigaddset(&mut set, libc::SIGTERM);
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut())
        };
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        Ok(Self { set })
    }

    fn spawn_waiter(self, stop: Arc<StopState>) -> io::Result<()> {
        std::thread::Builder::new()
            .name("vubd-signals".into())
            .spawn(move || {
                sandbox::enter(Role::Control);
                let mut first = true;
                loop {
                    let mut sig: libc::c_int = 0;
                    // SAFETY: `self.set` is an initialised sigset_t and `sig` a live c_int.
                    if unsafe { libc::sigwait(&self.set, &mut sig) } != 0 {
                        continue;
                    }
                    if first {
                        info!(signal = sig, "stopping: finishing in-flight I/O");
                        stop.request();
                        first = false;
                    } else {
                        warn!(signal = sig, "second signal: exiting at once");
                        std::process::exit(1);
                    }
                }
            })
            .map(|_| ())
    }
}
