//! Two of systemd's protocols, written out rather than taken from a crate: socket activation
//! (the listening sockets a service manager passes, `sd_listen_fds(3)` semantics) and
//! service notifications (`sd_notify(3)`: READY=1, STOPPING=1). A leaf: it uses no other
//! module of vubd.
//!
//! Socket activation: descriptors 3 to 3 + LISTEN_FDS − 1 are the process's when LISTEN_PID
//! is its pid; LISTEN_FDNAMES names them, in order, separated by colons (systemd's
//! `FileDescriptorName=`; "unknown" each when it is not set). The variables are removed once
//! read, and the descriptors made close-on-exec, so that nothing vubd might start inherits
//! them. Notifications go to the unix datagram socket NOTIFY_SOCKET names (a path, or an
//! abstract address written with a leading '@'); vubd connects to it once at startup, so that
//! a notification later is a plain write(2), which every thread's filter allows.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{OwnedFd, RawFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};

use thiserror::Error;

/// The first descriptor systemd passes.
pub const LISTEN_FDS_START: RawFd = 3;

/// A listening socket the service manager passed, and its name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListenFd {
    pub fd: RawFd,
    pub name: String,
}

/// What the environment says of passed sockets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Passed {
    /// No LISTEN_PID or LISTEN_FDS: no socket activation.
    Nothing,
    /// LISTEN_PID is another process's (this one inherited the variables): they are not
    /// vubd's.
    ForAnother { listen_pid: u32, own_pid: u32 },
    /// The sockets passed to this process, in order.
    Sockets(Vec<ListenFd>),
}

/// A variable of systemd's protocols that vubd cannot use; each names the variable.
#[derive(Debug, Error)]
pub enum SystemdError {
    #[error("LISTEN_PID {0:?}: not a process id")]
    ListenPid(String),
    #[error("LISTEN_FDS {0:?}: not a number of descriptors")]
    ListenFds(String),
    #[error("LISTEN_FDNAMES names {names} sockets and LISTEN_FDS passes {fds}")]
    NameCount { names: usize, fds: usize },
    #[error("LISTEN_FDS {count}: descriptor {fd} is not open")]
    NotOpen {
        count: usize,
        fd: RawFd,
        #[source]
        source: io::Error,
    },
    #[error("NOTIFY_SOCKET {0:?}: neither an absolute path nor an abstract address (@NAME)")]
    NotifyAddress(String),
    #[error("NOTIFY_SOCKET {addr:?}: cannot connect")]
    NotifyConnect {
        addr: String,
        #[source]
        source: io::Error,
    },
}

/// Reads socket activation's variables as `sd_listen_fds_with_names` does, removes them, and
/// makes the passed descriptors close-on-exec.
///
/// # Safety
///
/// No other thread may run: it removes variables from the environment, which another thread
/// reading or changing it at the same time would make undefined behaviour.
pub unsafe fn take_listen_fds() -> Result<Passed, SystemdError> {
    let get = |name| std::env::var(name).ok();
    let passed = parse_listen(
        get("LISTEN_PID").as_deref(),
        get("LISTEN_FDS").as_deref(),
        get("LISTEN_FDNAMES").as_deref(),
        std::process::id(),
    );
    for name in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        // SAFETY: the caller guarantees that no other thread runs.
        unsafe { std::env::remove_var(name) };
    }
    let passed = passed?;
    if let Passed::Sockets(fds) = &passed {
        for f in fds {
            // SAFETY: fcntl on a descriptor number changes only that descriptor's flags; one
            // that is not open makes it fail with EBADF.
            if unsafe { libc::fcntl(f.fd, libc::F_SETFD, libc::FD_CLOEXEC) } < 0 {
                return Err(SystemdError::NotOpen {
                    count: fds.len(),
                    fd: f.fd,
                    source: io::Error::last_os_error(),
                });
            }
        }
    }
    Ok(passed)
}

/// The sockets the variables pass to process `own_pid`.
fn parse_listen(
    pid: Option<&str>,
    fds: Option<&str>,
    names: Option<&str>,
    own_pid: u32,
) -> Result<Passed, SystemdError> {
    let (Some(pid), Some(fds)) = (pid, fds) else {
        return Ok(Passed::Nothing);
    };
    let listen_pid: u32 = pid
        .parse()
        .ok()
        .filter(|&p| p > 0)
        .ok_or_else(|| SystemdError::ListenPid(pid.to_owned()))?;
    if listen_pid != own_pid {
        return Ok(Passed::ForAnother {
            listen_pid,
            own_pid,
        });
    }
    let count: usize = fds
        .parse()
        .ok()
        // Descriptor numbers are ints.
        .filter(|&n: &usize| n <= (RawFd::MAX - LISTEN_FDS_START) as usize)
        .ok_or_else(|| SystemdError::ListenFds(fds.to_owned()))?;
    let names: Vec<String> = match names {
        Some(n) => n.split(':').map(str::to_owned).collect(),
        None => vec!["unknown".to_owned(); count],
    };
    // An empty LISTEN_FDNAMES is one empty name, or none for no descriptor.
    let names = if count == 0 && names == [""] {
        Vec::new()
    } else {
        names
    };
    if names.len() != count {
        return Err(SystemdError::NameCount {
            names: names.len(),
            fds: count,
        });
    }
    Ok(Passed::Sockets(
        (LISTEN_FDS_START..)
            .zip(names)
            .map(|(fd, name)| ListenFd { fd, name })
            .collect(),
    ))
}

/// A connection to the service manager's notification socket.
#[derive(Debug)]
pub struct Notifier {
    /// The connected datagram socket, as a file: a notification is one write(2).
    socket: File,
}

impl Notifier {
    /// Connects to the socket NOTIFY_SOCKET names, if it is set, and removes the variable.
    ///
    /// # Safety
    ///
    /// No other thread may run: it removes a variable from the environment (see
    /// [`take_listen_fds`]).
    pub unsafe fn from_env() -> Result<Option<Self>, SystemdError> {
        let addr = std::env::var("NOTIFY_SOCKET").ok();
        // SAFETY: the caller guarantees that no other thread runs.
        unsafe { std::env::remove_var("NOTIFY_SOCKET") };
        addr.as_deref().map(Self::connect).transpose()
    }

    /// Connects to `addr`: an absolute path, or `@NAME` for an abstract address.
    pub fn connect(addr: &str) -> Result<Self, SystemdError> {
        let connect_error = |source| SystemdError::NotifyConnect {
            addr: addr.to_owned(),
            source,
        };
        let target = if let Some(name) = addr.strip_prefix('@') {
            SocketAddr::from_abstract_name(name.as_bytes()).map_err(connect_error)?
        } else if addr.starts_with('/') {
            SocketAddr::from_pathname(addr).map_err(connect_error)?
        } else {
            return Err(SystemdError::NotifyAddress(addr.to_owned()));
        };
        let socket = UnixDatagram::unbound().map_err(connect_error)?;
        socket.connect_addr(&target).map_err(connect_error)?;
        Ok(Self {
            socket: File::from(OwnedFd::from(socket)),
        })
    }

    /// Sends one notification (`READY=1`, `STOPPING=1`, ...).
    pub fn notify(&self, state: &str) -> io::Result<()> {
        let sent = (&self.socket).write(state.as_bytes())?;
        if sent == state.len() {
            Ok(())
        } else {
            Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "the notification was cut short",
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fds(names: &[&str]) -> Passed {
        Passed::Sockets(
            names
                .iter()
                .zip(LISTEN_FDS_START..)
                .map(|(n, fd)| ListenFd {
                    fd,
                    name: (*n).to_owned(),
                })
                .collect(),
        )
    }

    #[test]
    fn sockets_are_passed_from_descriptor_3_with_their_names() {
        let p = parse_listen(Some("42"), Some("2"), Some("vm1:vm2"), 42).expect("valid");
        assert_eq!(p, fds(&["vm1", "vm2"]));
        let p = parse_listen(Some("42"), Some("2"), None, 42).expect("valid");
        assert_eq!(p, fds(&["unknown", "unknown"]), "sd_listen_fds_with_names");
        let p = parse_listen(Some("42"), Some("0"), Some(""), 42).expect("valid");
        assert_eq!(p, fds(&[]));
    }

    #[test]
    fn variables_of_another_process_or_none_pass_nothing() {
        assert_eq!(
            parse_listen(None, None, None, 42).expect("valid"),
            Passed::Nothing
        );
        assert_eq!(
            parse_listen(None, Some("1"), None, 42).expect("valid"),
            Passed::Nothing,
            "LISTEN_PID is what makes them this process's"
        );
        assert_eq!(
            parse_listen(Some("7"), Some("1"), Some("x"), 42).expect("valid"),
            Passed::ForAnother {
                listen_pid: 7,
                own_pid: 42
            }
        );
    }

    #[test]
    fn malformed_variables_are_named() {
        for (pid, count, names, message) in [
            ("x", "1", None, "LISTEN_PID \"x\": not a process id"),
            ("0", "1", None, "LISTEN_PID \"0\": not a process id"),
            (
                "42",
                "-1",
                None,
                "LISTEN_FDS \"-1\": not a number of descriptors",
            ),
            (
                "42",
                "two",
                None,
                "LISTEN_FDS \"two\": not a number of descriptors",
            ),
            (
                "42",
                "2",
                Some("a"),
                "LISTEN_FDNAMES names 1 sockets and LISTEN_FDS passes 2",
            ),
            (
                "42",
                "1",
                Some("a:b"),
                "LISTEN_FDNAMES names 2 sockets and LISTEN_FDS passes 1",
            ),
        ] {
            let e = parse_listen(Some(pid), Some(count), names, 42).unwrap_err();
            assert_eq!(e.to_string(), message);
        }
    }

    #[test]
    fn notifications_arrive_as_datagrams_on_a_path_or_an_abstract_address() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("notify");
        let server = UnixDatagram::bind(&path).expect("bind");
        let n = Notifier::connect(path.to_str().expect("UTF-8")).expect("connect");
        n.notify("READY=1").expect("send");
        let mut buf = [0u8; 64];
        let len = server.recv(&mut buf).expect("receive");
        assert_eq!(&buf[..len], b"READY=1");

        let name = format!("vubd-notify-test-{}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).expect("address");
        let server = UnixDatagram::bind_addr(&addr).expect("bind abstract");
        let n = Notifier::connect(&format!("@{name}")).expect("connect abstract");
        n.notify("STOPPING=1").expect("send");
        let len = server.recv(&mut buf).expect("receive");
        assert_eq!(&buf[..len], b"STOPPING=1");
    }

    #[test]
    fn a_notify_socket_that_is_neither_a_path_nor_abstract_is_named() {
        let e = Notifier::connect("relative/notify").unwrap_err();
        assert_eq!(
            e.to_string(),
            "NOTIFY_SOCKET \"relative/notify\": neither an absolute path nor an abstract \
             address (@NAME)"
        );
        let e = Notifier::connect("/nonexistent/vubd/notify").unwrap_err();
        assert!(
            e.to_string()
                .starts_with("NOTIFY_SOCKET \"/nonexistent/vubd/notify\": cannot connect"),
            "{e}"
        );
    }
}
