//! Wiring and lifecycle: builds the device from the validated configuration, serves the
//! socket one frontend at a time (a disconnect leaves vubd ready for the next), and shuts down
//! cleanly on SIGINT / SIGTERM.

mod nvme;
mod pcie;

pub use self::nvme::discover;
pub use self::pcie::nvme_list;

use std::fs::OpenOptions;
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
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::bdev::file::{FileDevice, FileError, FileOptions};
use crate::bdev::null::NullDevice;
use crate::bdev::nvme_pcie::{NvmePcieConfig, NvmePcieDevice, NvmePcieError};
use crate::bdev::nvme_tcp::{NvmeTcpDevice, NvmeTcpError};
use crate::bdev::{BlockDevice, DeviceInfo, Disk};
use crate::config::{Config, DiskSpec, SocketSpec};
use crate::mem::{GuestMemory, GuestMemoryAtomic};
use crate::poller::{DeviceShared, PollerSet};
use crate::vhost_user::{BlkBackend, BlkShape};
use crate::virtio_blk::request::Limits;
use crate::virtio_blk::{BlkConfig, DeviceFeatures, ID_BYTES, MAX_SEGMENTS, SECTOR_SHIFT};

/// Largest data segment a driver may use, bytes (`size_max`).
const SIZE_MAX: u32 = 4 << 20;
/// Largest discard / write-zeroes segment, sectors.
const MAX_RANGE_SECTORS: u32 = 1 << 22;

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
    #[error("--socket-path {0}: another process is serving this socket")]
    SocketBusy(PathBuf),
    #[error("--socket-path {0}: exists and is not a socket")]
    NotASocket(PathBuf),
    #[error("--socket-path {path}: cannot listen")]
    Bind {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("--fd {0}: not a listening unix socket")]
    BadFd(i32),
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
}

impl DaemonError {
    /// Exit status: 2 for a configuration the user can fix, 1 for a failure while serving.
    pub fn exit_code(&self) -> u8 {
        match self {
            DaemonError::Disk(_)
            | DaemonError::CreateDisk { .. }
            | DaemonError::SocketBusy(_)
            | DaemonError::NotASocket(_)
            | DaemonError::Bind { .. }
            | DaemonError::BadFd(_)
            | DaemonError::NvmeTcp(_)
            | DaemonError::NvmePcie(_)
            | DaemonError::NvmeHost(_)
            | DaemonError::Discover(_) => 2,
            _ => 1,
        }
    }
}

/// Serves the configured device until SIGINT / SIGTERM.
pub fn run(cfg: Config) -> Result<(), DaemonError> {
    // Block the signals before any thread exists so that every thread inherits the mask and
    // only the signal thread receives them.
    let signals = Signals::block().map_err(DaemonError::Signals)?;

    // The socket first: a busy socket must be reported before anything else happens.
    let (mut listener, _socket_file) = listen(&cfg.socket)?;
    let disk = Arc::new(open_disk(&cfg)?);
    let info = disk.info();
    listener
        .set_nonblocking(true)
        .map_err(|e| DaemonError::VhostUser(vhost_user_backend::Error::CreateBackendListener(e)))?;
    let stop = Arc::new(StopState::new().map_err(DaemonError::Signals)?);
    signals
        .spawn_waiter(stop.clone())
        .map_err(DaemonError::Signals)?;

    let pollers = PollerSet::start(&cfg.pollers, cfg.poll).map_err(DaemonError::Pollers)?;
    print_attach_hint(&cfg, &info);
    info!(
        disk = ?cfg.disk,
        capacity = info.capacity_bytes,
        queues = cfg.num_queues,
        pollers = pollers.len(),
        poll = ?cfg.poll,
        "ready"
    );
    while wait_for_frontend(&listener, &stop) {
        if let Err(e) = serve_one(&cfg, &disk, &pollers, &mut listener, &stop) {
            error!(error = %error_chain(&e), "frontend session ended with an error");
        }
    }
    info!("shutting down");
    pollers.stop();
    Ok(())
}

fn open_disk(cfg: &Config) -> Result<Disk, DaemonError> {
    Ok(match &cfg.disk {
        DiskSpec::File(path) => {
            if let Some(size) = cfg.create_size {
                create_sparse(path, size)?;
            }
            Disk::File(
                FileDevice::open(&FileOptions {
                    path: path.clone(),
                    read_only: cfg.read_only,
                    cache: cfg.cache,
                })
                .map_err(DaemonError::Disk)?,
            )
        }
        DiskSpec::Null(size) => Disk::Null(NullDevice::new(*size, cfg.read_only)),
        DiskSpec::NvmeTcp(uri) => {
            let tcp = nvme::tcp_config(uri, &cfg.nvme, cfg.pollers.len(), cfg.read_only)?;
            Disk::NvmeTcp(NvmeTcpDevice::open(tcp).map_err(DaemonError::NvmeTcp)?)
        }
        DiskSpec::NvmePcie(uri) => Disk::NvmePcie(
            NvmePcieDevice::open(&NvmePcieConfig {
                bdf: uri.bdf.clone(),
                nsid: uri.nsid,
                interrupts: uri.interrupts,
                io_timeout: cfg.nvme.io_timeout,
                read_only: cfg.read_only,
            })
            .map_err(DaemonError::NvmePcie)?,
        ),
    })
}

/// One frontend session: fresh protocol state, queues attached to the shared pollers while
/// the frontend runs them, detached (in-flight I/O completed) when it goes.
fn serve_one(
    cfg: &Config,
    disk: &Arc<Disk>,
    pollers: &PollerSet,
    listener: &mut Listener,
    stop: &StopState,
) -> Result<(), DaemonError> {
    static NEXT_KEY: AtomicU64 = AtomicU64::new(1);
    let serial = cfg.serial.as_deref().or(disk.serial()).unwrap_or_default();
    let (shape, shared) = device_model(cfg, &disk.info(), serial);
    let mem = GuestMemoryAtomic::new(GuestMemory::new());
    let handles = (0..shape.num_queues)
        .map(|q| pollers.for_queue(q).clone())
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

    daemon.start(listener).map_err(DaemonError::VhostUser)?;
    info!("frontend connected");
    stop.set_session(daemon.shutdown_handle());
    let result = daemon.wait();
    stop.set_session(None);
    match &result {
        Ok(()) => info!("frontend disconnected"),
        Err(e) => warn!(error = %e, "frontend connection ended"),
    }
    // In-flight requests complete and are published before the pollers let go of the queues;
    // then the relay thread is stopped and joined.
    backend.close();
    drop(daemon);
    backend.close_exit_events();
    Ok(())
}

/// The guest-visible model of the disk: features, configuration space, request limits, and
/// `device_serial` as the GET_ID answer.
fn device_model(cfg: &Config, info: &DeviceInfo, device_serial: &str) -> (BlkShape, DeviceShared) {
    let seg_max = (u32::from(cfg.queue_size) - 2).clamp(1, MAX_SEGMENTS);
    let capacity_sectors = info.capacity_bytes >> SECTOR_SHIFT;
    let features = DeviceFeatures {
        read_only: info.read_only,
        discard: info.discard,
        write_zeroes: info.write_zeroes,
        multi_queue: cfg.num_queues > 1,
    };
    let logical = info.logical_block_size;
    let physical_exp = (info.physical_block_size / logical).max(1).ilog2();
    let range_align = info.physical_block_size.max(4096) >> SECTOR_SHIFT;
    let config = BlkConfig {
        capacity_sectors,
        size_max: SIZE_MAX,
        seg_max,
        blk_size: logical,
        physical_block_exp: u8::try_from(physical_exp).unwrap_or(0),
        min_io_size: 1,
        opt_io_size: 0,
        writeback: 1,
        num_queues: cfg.num_queues,
        max_discard_sectors: if features.discard {
            MAX_RANGE_SECTORS
        } else {
            0
        },
        discard_sector_alignment: if features.discard { range_align } else { 0 },
        max_write_zeroes_sectors: if features.write_zeroes {
            MAX_RANGE_SECTORS
        } else {
            0
        },
        write_zeroes_may_unmap: features.write_zeroes && info.write_zeroes_unmaps,
    };
    let mut serial = [0u8; ID_BYTES];
    let n = device_serial.len().min(ID_BYTES);
    serial[..n].copy_from_slice(&device_serial.as_bytes()[..n]);
    let shape = BlkShape {
        num_queues: usize::from(cfg.num_queues),
        max_queue_size: cfg.queue_size,
        features: features.bits(),
        config,
    };
    let shared = DeviceShared {
        limits: Limits {
            capacity_sectors,
            seg_max,
            read_only: info.read_only,
            max_discard_sectors: (info.discard && !info.read_only).then_some(MAX_RANGE_SECTORS),
            max_write_zeroes_sectors: (info.write_zeroes && !info.read_only)
                .then_some(MAX_RANGE_SECTORS),
        },
        serial,
        writeback: AtomicBool::new(true),
        mem_gen: AtomicU64::new(0),
    };
    (shape, shared)
}

fn create_sparse(path: &Path, size: u64) -> Result<(), DaemonError> {
    let err = |source| DaemonError::CreateDisk {
        path: path.to_owned(),
        source,
    };
    match OpenOptions::new().write(true).create_new(true).open(path) {
        Ok(f) => {
            f.set_len(size).map_err(err)?;
            info!(path = %path.display(), size, "created a sparse disk image");
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(err(e)),
    }
}

/// Removes the socket file when vubd stops serving it.
struct SocketFile(Option<PathBuf>);

impl Drop for SocketFile {
    fn drop(&mut self) {
        if let Some(p) = &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

fn listen(spec: &SocketSpec) -> Result<(Listener, SocketFile), DaemonError> {
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
                        return Err(DaemonError::SocketBusy(path.clone()));
                    }
                    // Left behind by a process that is gone.
                    let _ = std::fs::remove_file(path);
                }
                Ok(_) => return Err(DaemonError::NotASocket(path.clone())),
                Err(_) => {}
            }
            let l = UnixListener::bind(path).map_err(|source| DaemonError::Bind {
                path: path.clone(),
                source,
            })?;
            Ok((Listener::from(l), SocketFile(Some(path.clone()))))
        }
    }
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
    wake: EventFd,
    session: Mutex<Option<ShutdownHandle>>,
}

impl StopState {
    fn new() -> io::Result<Self> {
        Ok(Self {
            requested: AtomicBool::new(false),
            wake: EventFd::new(EFD_NONBLOCK)?,
            session: Mutex::new(None),
        })
    }

    fn requested(&self) -> bool {
        self.requested.load(Ordering::Acquire)
    }

    fn request(&self) {
        self.requested.store(true, Ordering::Release);
        let _ = self.wake.write(1);
        if let Some(h) = self
            .session
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            h.shutdown();
        }
    }

    /// Records the current session; ends it at once if shutdown was already requested.
    fn set_session(&self, handle: Option<ShutdownHandle>) {
        let mut s = self.session.lock().unwrap_or_else(|e| e.into_inner());
        *s = handle;
        if self.requested() {
            if let Some(h) = s.as_ref() {
                h.shutdown();
            }
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

fn print_attach_hint(cfg: &Config, info: &DeviceInfo) {
    let SocketSpec::Path(sock) = &cfg.socket else {
        return;
    };
    let abs = std::path::absolute(sock).unwrap_or_else(|_| sock.clone());
    let size = match info.capacity_bytes {
        b if b % (1 << 30) == 0 => format!("{} GiB", b >> 30),
        b if b % (1 << 20) == 0 => format!("{} MiB", b >> 20),
        b => format!("{b} bytes"),
    };
    println!(
        "vubd: serving {} ({size}{}) on {}",
        match &cfg.disk {
            DiskSpec::File(p) => p.display().to_string(),
            DiskSpec::Null(_) => "a null device".to_owned(),
            DiskSpec::NvmeTcp(u) => format!(
                "namespace {} of {} at {}:{}",
                u.nsid, u.subnqn, u.host, u.port
            ),
            DiskSpec::NvmePcie(uri) => {
                format!("namespace {} of NVMe {}", uri.nsid, uri.bdf)
            }
        },
        if info.read_only { ", read-only" } else { "" },
        abs.display()
    );
    println!("Attach a QEMU VM (guest RAM must be shared) with:");
    println!(
        "  -object memory-backend-memfd,id=mem,size=1G,share=on -numa node,memdev=mem \\\n  \
         -chardev socket,id=vubd0,path={} \\\n  \
         -device vhost-user-blk-pci,chardev=vubd0,num-queues={}",
        abs.display(),
        cfg.num_queues
    );
}

/// An error and its causes on one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Args, Command};
    use clap::Parser;

    fn config() -> Config {
        let args = Args::try_parse_from(["vubd", "--socket-path", "/s", "--disk", "null:1G"])
            .expect("clap accepts");
        match Command::try_from(args) {
            Ok(Command::Serve(c)) => c,
            other => panic!("expected a config, got {other:?}"),
        }
    }

    fn info(write_zeroes: bool, write_zeroes_unmaps: bool) -> DeviceInfo {
        DeviceInfo {
            capacity_bytes: 1 << 30,
            logical_block_size: 512,
            physical_block_size: 512,
            read_only: false,
            discard: false,
            write_zeroes,
            write_zeroes_unmaps,
        }
    }

    #[test]
    fn write_zeroes_may_unmap_only_where_the_device_says_unmapped_blocks_read_as_zeroes() {
        let cfg = config();
        // virtio-blk configuration space: write_zeroes_may_unmap at byte 56.
        let unmap = |i: &DeviceInfo| device_model(&cfg, i, "s").0.config.to_bytes()[56];
        assert_eq!(unmap(&info(true, true)), 1);
        assert_eq!(
            unmap(&info(true, false)),
            0,
            "an NVMe namespace without DLFEAT"
        );
        assert_eq!(unmap(&info(false, true)), 0, "no write-zeroes at all");
    }
}
