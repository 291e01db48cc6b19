//! Each role's filter, installed with the baseline in a forked child of the test process: the
//! calls the role makes go through, calls outside its list kill the child (or, in log mode, go
//! through), clone3 is answered ENOSYS. The child makes raw syscalls only: it is a fork of a
//! multi-threaded process, where nothing that may take a lock is safe.

use std::ffi::CStr;

use super::*;

/// How a child ended.
#[derive(Debug, PartialEq, Eq)]
enum End {
    Exited(i32),
    Killed(i32),
}

/// The filters of `role` (with the baseline's) in `mode`, compiled in the parent.
fn programs(role: Role, mode: SeccompMode) -> Vec<BpfProgram> {
    let mut p: Vec<BpfProgram> = baseline_programs(mode).expect("baseline").into();
    p.extend(role_programs(role, mode).expect("role"));
    p
}

/// Runs `body` in a forked child under `programs`; its result is the exit status.
fn in_child(programs: &[BpfProgram], body: impl FnOnce() -> i32) -> End {
    // SAFETY: the child only makes raw system calls (setrlimit, prctl and seccomp through
    // seccompiler, which builds its arguments on the stack, then `body`'s) and leaves with
    // _exit; it touches no lock another thread of the parent might have held.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
    if pid == 0 {
        let none = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: no core file of a child killed on purpose; `none` is a live rlimit.
        unsafe { libc::setrlimit(libc::RLIMIT_CORE, &none) };
        for p in programs {
            if seccompiler::apply_filter(p).is_err() {
                // SAFETY: ends the child without running anything of the parent's.
                unsafe { libc::_exit(100) };
            }
        }
        let code = body();
        // SAFETY: as above.
        unsafe { libc::_exit(code) };
    }
    let mut status = 0;
    // SAFETY: waits for our own child; `status` is a live c_int.
    let rc = unsafe { libc::waitpid(pid, &mut status, 0) };
    assert_eq!(rc, pid, "waitpid: {}", std::io::Error::last_os_error());
    if libc::WIFSIGNALED(status) {
        End::Killed(libc::WTERMSIG(status))
    } else {
        End::Exited(libc::WEXITSTATUS(status))
    }
}

/// A raw syscall's result, negative errno on failure.
fn sys(result: libc::c_long) -> i64 {
    if result < 0 {
        // SAFETY: reads this thread's errno, which the failed call just set.
        -i64::from(unsafe { *libc::__errno_location() })
    } else {
        result
    }
}

/// 0 when every result is non-negative, else the index of the first failure plus one.
fn all_ok(results: &[i64]) -> i32 {
    results
        .iter()
        .position(|&r| r < 0)
        .map_or(0, |i| i32::try_from(i).unwrap_or(i32::MAX - 1) + 1)
}

const KILLED: End = End::Killed(libc::SIGSYS);

/// Calls no thread may make.
#[derive(Clone, Copy, Debug)]
enum Forbidden {
    Execve,
    PacketSocket,
    Ptrace,
    ExecutableMemory,
}

impl Forbidden {
    /// Makes the call (raw, no allocation: for a forked child).
    fn make(self) -> i32 {
        let path: &CStr = c"/bin/true";
        let argv = [path.as_ptr(), std::ptr::null()];
        let r = match self {
            // SAFETY: valid NUL-terminated path and argv; a filter stops it first anyway.
            Forbidden::Execve => unsafe {
                libc::syscall(libc::SYS_execve, path.as_ptr(), argv.as_ptr(), 0)
            },
            // SAFETY: no pointer arguments.
            Forbidden::PacketSocket => unsafe {
                libc::syscall(libc::SYS_socket, libc::AF_PACKET, libc::SOCK_RAW, 0)
            },
            // SAFETY: no pointer arguments.
            Forbidden::Ptrace => unsafe { libc::syscall(libc::SYS_ptrace, libc::PTRACE_TRACEME) },
            // SAFETY: a new anonymous mapping, replacing nothing.
            Forbidden::ExecutableMemory => unsafe {
                libc::syscall(
                    libc::SYS_mmap,
                    0,
                    4096,
                    libc::PROT_READ | libc::PROT_EXEC,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            },
        };
        i32::from(r >= 0)
    }
}

#[test]
fn every_filter_builds() {
    for mode in [SeccompMode::Log, SeccompMode::Enforce] {
        baseline_programs(mode).expect("baseline");
        for role in [
            Role::Control,
            Role::Session,
            Role::Poller,
            Role::Supervisor,
            Role::Metrics,
        ] {
            role_programs(role, mode).expect("role");
        }
    }
}

#[test]
fn a_poller_waits_on_eventfds_and_cannot_exec_trace_map_code_or_open_packet_sockets() {
    let p = programs(Role::Poller, SeccompMode::Enforce);
    let works = in_child(&p, || {
        // SAFETY: raw syscalls on a descriptor of the child's own and a local counter.
        unsafe {
            let fd = libc::syscall(libc::SYS_eventfd2, 0, libc::EFD_NONBLOCK);
            let one: u64 = 1;
            let mut got: u64 = 0;
            let w = libc::syscall(libc::SYS_write, fd, &one as *const u64, 8);
            let r = libc::syscall(libc::SYS_read, fd, &mut got as *mut u64, 8);
            let c = libc::syscall(libc::SYS_close, fd);
            all_ok(&[sys(fd), sys(w), sys(r), sys(c), i64::from(got == 1) - 1])
        }
    });
    assert_eq!(works, End::Exited(0));
    for call in [
        Forbidden::Execve,
        Forbidden::PacketSocket,
        Forbidden::Ptrace,
        Forbidden::ExecutableMemory,
    ] {
        assert_eq!(in_child(&p, || call.make()), KILLED, "{call:?}");
    }
}

#[test]
fn roles_that_open_no_file_get_eacces_for_an_open() {
    let path = c"/proc/sys/vm/overcommit_memory";
    let open = || {
        // SAFETY: a raw openat of a NUL-terminated path.
        let r = sys(unsafe { libc::syscall(libc::SYS_openat, libc::AT_FDCWD, path.as_ptr(), 0) });
        i32::from(r != -i64::from(libc::EACCES))
    };
    for role in [Role::Control, Role::Poller, Role::Supervisor, Role::Metrics] {
        let p = programs(role, SeccompMode::Enforce);
        assert_eq!(in_child(&p, open), End::Exited(0), "{role:?}");
    }
}

#[test]
fn threads_may_start_threads_but_not_processes() {
    let p = programs(Role::Session, SeccompMode::Enforce);
    // clone3 never reaches the kernel: glibc falls back to clone, whose flags are checked.
    let clone3 = in_child(&p, || {
        // SAFETY: the filter answers before the kernel reads the (null) arguments.
        let r = sys(unsafe { libc::syscall(libc::SYS_clone3, 0, 0) });
        i32::from(r != -i64::from(libc::ENOSYS))
    });
    assert_eq!(clone3, End::Exited(0));
    // A new process (fork's flags): killed.
    let fork = in_child(&p, || {
        // SAFETY: as for fork(2); the filter stops it first.
        unsafe { libc::syscall(libc::SYS_clone, libc::SIGCHLD, 0, 0, 0, 0) as i32 }
    });
    assert_eq!(fork, KILLED);
}

#[test]
fn the_session_opens_for_reading_only() {
    let p = programs(Role::Session, SeccompMode::Enforce);
    let path = c"/proc/self/status";
    let read = in_child(&p, || {
        // SAFETY: a raw openat of a NUL-terminated path.
        let fd = unsafe { libc::syscall(libc::SYS_openat, libc::AT_FDCWD, path.as_ptr(), 0) };
        all_ok(&[sys(fd)])
    });
    assert_eq!(read, End::Exited(0));
    let write = in_child(&p, || {
        // SAFETY: as above; the filter stops it first.
        unsafe {
            libc::syscall(
                libc::SYS_openat,
                libc::AT_FDCWD,
                path.as_ptr(),
                libc::O_RDWR,
            ) as i32
        }
    });
    assert_eq!(write, KILLED);
}

#[test]
fn a_supervisor_opens_tcp_connections_only() {
    let p = programs(Role::Supervisor, SeccompMode::Enforce);
    let tcp = in_child(&p, || {
        // SAFETY: raw socket and close calls.
        unsafe {
            let v4 = libc::syscall(libc::SYS_socket, libc::AF_INET, libc::SOCK_STREAM, 0);
            let v6 = libc::syscall(
                libc::SYS_socket,
                libc::AF_INET6,
                libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
                0,
            );
            all_ok(&[sys(v4), sys(v6)])
        }
    });
    assert_eq!(tcp, End::Exited(0));
    for (family, kind) in [
        (libc::AF_INET, libc::SOCK_DGRAM),
        (libc::AF_UNIX, libc::SOCK_STREAM),
        (libc::AF_NETLINK, libc::SOCK_RAW),
    ] {
        let end = in_child(&p, || {
            // SAFETY: a raw socket call; the filter stops it first.
            unsafe { libc::syscall(libc::SYS_socket, family, kind, 0) as i32 }
        });
        assert_eq!(end, KILLED, "socket({family}, {kind})");
    }
}

#[test]
fn the_metrics_endpoint_accepts_and_polls_but_makes_no_socket_of_its_own() {
    let p = programs(Role::Metrics, SeccompMode::Enforce);
    let serves = in_child(&p, || {
        let now = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: raw calls on a descriptor that is no socket (accept4 fails with ENOTSOCK,
        // after the filter let it through) and a poll of no descriptors that returns at once
        // (`now` is a live timespec).
        unsafe {
            let accept = libc::syscall(libc::SYS_accept4, 0, 0, 0, libc::SOCK_CLOEXEC);
            let poll = libc::syscall(libc::SYS_ppoll, 0, 0, &now as *const libc::timespec, 0, 8);
            all_ok(&[
                i64::from(sys(accept) == -i64::from(libc::ENOTSOCK)) - 1,
                sys(poll),
            ])
        }
    });
    assert_eq!(serves, End::Exited(0));
    let socket = in_child(&p, || {
        // SAFETY: a raw socket call; the filter stops it first.
        unsafe { libc::syscall(libc::SYS_socket, libc::AF_INET, libc::SOCK_STREAM, 0) as i32 }
    });
    assert_eq!(socket, KILLED, "socket");
    let connect = in_child(&p, || {
        // SAFETY: a raw connect call; the filter stops it first.
        unsafe { libc::syscall(libc::SYS_connect, 0, 0, 0) as i32 }
    });
    assert_eq!(connect, KILLED, "connect");
}

#[test]
fn log_mode_lets_a_call_outside_the_list_through() {
    // getppid is in no list: harmless to let through.
    // SAFETY: getppid has no arguments.
    let call = || i32::from(sys(unsafe { libc::syscall(libc::SYS_getppid) }) <= 0);
    let logged = programs(Role::Poller, SeccompMode::Log);
    assert_eq!(in_child(&logged, call), End::Exited(0));
    let enforced = programs(Role::Poller, SeccompMode::Enforce);
    assert_eq!(in_child(&enforced, call), KILLED);
}

#[test]
fn startup_makes_block_device_nodes_and_directories_but_no_character_device() {
    let p: Vec<BpfProgram> = baseline_programs(SeccompMode::Enforce)
        .expect("baseline")
        .into();
    let dir = tempfile::tempdir().expect("temp dir");
    let path = |name: &str| {
        std::ffi::CString::new(dir.path().join(name).into_os_string().into_encoded_bytes())
            .expect("no NUL")
    };
    let (node, sub) = (path("node"), path("sub"));
    let made = in_child(&p, || {
        let block = libc::S_IFBLK | 0o600;
        // SAFETY: raw mknodat and mkdirat of NUL-terminated paths made before the fork.
        unsafe {
            let n = libc::syscall(
                libc::SYS_mknodat,
                libc::AT_FDCWD,
                node.as_ptr(),
                block,
                libc::makedev(241, 0),
            );
            let d = libc::syscall(libc::SYS_mkdirat, libc::AT_FDCWD, sub.as_ptr(), 0o700);
            // Without CAP_MKNOD the node is refused by the kernel, not by the filter.
            all_ok(&[if n == -1 { 0 } else { n }, sys(d)])
        }
    });
    assert_eq!(made, End::Exited(0));
    let chr = path("chr");
    let end = in_child(&p, || {
        // SAFETY: as above; the filter stops it first.
        unsafe {
            libc::syscall(
                libc::SYS_mknodat,
                libc::AT_FDCWD,
                chr.as_ptr(),
                libc::S_IFCHR | 0o600,
                libc::makedev(1, 3),
            ) as i32
        }
    });
    assert_eq!(end, KILLED, "a character device node");
}

#[test]
fn the_control_threads_notify_with_a_write_on_a_socket_connected_at_startup() {
    use std::os::fd::AsRawFd;
    let (ours, theirs) = std::os::unix::net::UnixDatagram::pair().expect("socket pair");
    let fd = ours.as_raw_fd();
    let msg = b"STOPPING=1";
    let p = programs(Role::Control, SeccompMode::Enforce);
    let written = in_child(&p, || {
        // SAFETY: a raw write of a live buffer on a descriptor the child inherited.
        let r = unsafe { libc::syscall(libc::SYS_write, fd, msg.as_ptr(), msg.len()) };
        all_ok(&[sys(r)])
    });
    assert_eq!(written, End::Exited(0));
    let mut buf = [0u8; 16];
    let len = theirs.recv(&mut buf).expect("the notification");
    assert_eq!(&buf[..len], msg);
    // What sd_notify itself does, sendmsg to an address, is not theirs to make.
    let end = in_child(&p, || {
        // SAFETY: a raw sendto of a live buffer; the filter stops it first.
        unsafe { libc::syscall(libc::SYS_sendto, fd, msg.as_ptr(), msg.len(), 0, 0, 0) as i32 }
    });
    assert_eq!(end, KILLED, "sendto");
}
