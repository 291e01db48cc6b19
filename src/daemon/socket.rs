//! The sockets vubd listens on: a device's (bound, inherited, passed by systemd's socket
//! activation, or taken over from the process that served it) and the control socket,
//! created with their mode and group before they appear at their path, and removed when vubd
//! stops serving them.

use std::collections::HashMap;
use std::io;
use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use tracing::info;

use super::{DaemonError, device, kata};
use crate::config::{ConfigError, DeviceConfig, SocketPerms, SocketSpec};
use crate::systemd::Passed;

/// Removes a file vubd made (a socket, a Kata store's device node) when vubd stops serving
/// it, unless the path has become another file meanwhile (the new vubd of an upgrade took it
/// over).
#[derive(Debug)]
pub(super) struct SocketFile(Option<(PathBuf, (u64, u64))>);

impl SocketFile {
    /// The socket just bound at `path`.
    pub(super) fn bound(path: &Path) -> Self {
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
                info!(path = %p.display(), "path taken over by another process; left in place");
            }
        }
    }
}

/// Listens on device `d`'s socket: the one systemd passed as `inherited` (see
/// [`activated_fds`]), else the one its configuration says, in its Kata store if it is in
/// one (whose directories are made first).
pub(super) fn listen_device(
    d: &DeviceConfig,
    inherited: Option<RawFd>,
) -> Result<(UnixListener, SocketFile), DaemonError> {
    if let Some(fd) = inherited {
        return listen(&SocketSpec::Fd(fd), false, SocketPerms::default());
    }
    if let Some(store) = &d.kata_store {
        kata::make_dirs(store)?;
    }
    listen(&d.socket, d.incoming, d.socket_perms)
}

/// The descriptor of each device that names a socket systemd passed (`fd-name=`), in the
/// devices' order. Refused: a name not passed (or passed twice), a passed socket that no
/// device serves (by its name or its number, `fd=`), and two devices on one descriptor.
pub(super) fn activated_fds(
    devices: &[DeviceConfig],
    passed: &Passed,
) -> Result<Vec<Option<RawFd>>, DaemonError> {
    let sockets = match passed {
        Passed::Sockets(s) => s.as_slice(),
        Passed::Nothing | Passed::ForAnother { .. } => &[],
    };
    let mut users: HashMap<RawFd, &DeviceConfig> = HashMap::new();
    let mut fds = Vec::with_capacity(devices.len());
    for d in devices {
        let fd = match &d.socket {
            SocketSpec::Activated(name) => {
                let mut named = sockets.iter().filter(|s| &s.name == name);
                let why = match (named.next(), named.next(), passed) {
                    (Some(s), None, _) => Ok(s.fd),
                    (Some(_), Some(_), _) => Err(format!(
                        "LISTEN_FDNAMES names {name:?} more than once: one device serves one \
                         socket (give each socket a name of its own: FileDescriptorName=)"
                    )),
                    (None, _, Passed::Nothing) => Err(
                        "no socket was passed (LISTEN_FDS is not set: start vubd from a \
                         systemd socket unit, or systemd-socket-activate)"
                            .to_owned(),
                    ),
                    (
                        None,
                        _,
                        Passed::ForAnother {
                            listen_pid,
                            own_pid,
                        },
                    ) => Err(format!(
                        "no socket was passed to vubd (LISTEN_PID is {listen_pid}, vubd is \
                         {own_pid})"
                    )),
                    (None, _, Passed::Sockets(_)) => Err(format!(
                        "no socket of that name was passed (LISTEN_FDNAMES: {})",
                        sockets
                            .iter()
                            .map(|s| s.name.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    )),
                };
                let fd = why.map_err(|why| {
                    device::in_device(
                        d,
                        DaemonError::NotPassed {
                            name: name.clone(),
                            why,
                        },
                    )
                })?;
                fds.push(Some(fd));
                fd
            }
            SocketSpec::Fd(fd) => {
                fds.push(None);
                *fd
            }
            SocketSpec::Path(_) => {
                fds.push(None);
                continue;
            }
        };
        if users.insert(fd, d).is_some() {
            return Err(DaemonError::Config(ConfigError::SharedDevice(
                d.label(),
                "its socket is another's",
            )));
        }
    }
    if let Some(s) = sockets.iter().find(|s| !users.contains_key(&s.fd)) {
        return Err(DaemonError::UnusedSocket {
            fd: s.fd,
            name: s.name.clone(),
        });
    }
    Ok(fds)
}

/// Listens on the device's socket. A socket file another process still listens on is
/// refused, unless the device takes over from that process (`take_over`, `--incoming`: the new
/// vubd of an upgrade): the new socket is bound beside it and renamed over it, so that new
/// connections reach this process while the other one keeps its own until it stops. A socket
/// with a mode or group of its own (`perms`) is made the same way.
pub(super) fn listen(
    spec: &SocketSpec,
    take_over: bool,
    perms: SocketPerms,
) -> Result<(UnixListener, SocketFile), DaemonError> {
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
            Ok((l, SocketFile(None)))
        }
        // Only the devices of the command line name one, and startup looks it up
        // (`activated_fds`); a control request cannot.
        SocketSpec::Activated(name) => Err(DaemonError::NotPassed {
            name: name.clone(),
            why: "a socket systemd passes is served from startup only".to_owned(),
        }),
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
            Ok((l, file))
        }
    }
}

/// Binds a socket at a name beside `path` (`PATH.PID`), gives it `perms`, then renames it over
/// `path`: atomic, so a connecting frontend finds the socket ready, or the one it replaces, or
/// none, never one with other permissions. With `perms`, the socket is bound under a umask
/// that leaves it to vubd's user alone until its group and mode are set.
fn bind_beside(path: &Path, perms: SocketPerms) -> Result<(UnixListener, SocketFile), DaemonError> {
    let mut beside = path.as_os_str().to_owned();
    beside.push(format!(".{}", std::process::id()));
    let beside = PathBuf::from(beside);
    let _ = std::fs::remove_file(&beside);
    let bind_error = |source| DaemonError::Bind {
        path: path.to_path_buf(),
        source,
    };
    let (bound, umask) = if perms.any() {
        // SAFETY: umask only changes the process's file mode creation mask. Only startup and
        // the addition of a device create files (sockets, images), and additions are
        // serialized (`registry`), so none is created meanwhile under this mask.
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
    Ok((l, file))
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

/// Waits until `listener` has a connection to accept (true) or `stop` is readable (false;
/// also when polling fails, which is logged).
pub(super) fn wait_for_connection(listener: RawFd, stop: RawFd) -> bool {
    loop {
        let mut fds = [listener, stop].map(|fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        });
        // SAFETY: `fds` is a live array of two pollfd structs and the count matches.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            tracing::error!(error = %e, "poll on a listening socket failed");
            return false;
        }
        if fds[1].revents != 0 {
            return false;
        }
        if fds[0].revents != 0 {
            return true;
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
