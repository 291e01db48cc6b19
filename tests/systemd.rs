//! vubd under systemd's protocols, driven by systemd's own `systemd-socket-activate` (which
//! needs no systemd as PID 1): it binds the sockets, names them (`--fdname`) and, at the
//! first connection, execs vubd with LISTEN_PID, LISTEN_FDS and LISTEN_FDNAMES, as a
//! `.socket` unit starts its service. A libblkio client's connection starts vubd and does
//! verified I/O through the activated sockets; a notification socket bound by the test
//! (NOTIFY_SOCKET) receives READY=1 once the devices listen and STOPPING=1 at SIGTERM.
//! Sockets passed but served by no device, and devices naming sockets not passed, are one
//! line naming them.

mod common;
#[path = "common/service.rs"]
mod service;

use std::ffi::OsStr;
use std::fs::File;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use common::daemon::{Daemon, run_vubd_with, socket_listening, wait_bounded};
use common::{Image, TIMEOUT};
use service::{next_notification, notify_socket, verified_io};

const MIB: u64 = 1 << 20;

/// `systemd-socket-activate`, listening on each of `sockets` (in order, so the first is
/// descriptor 3) under the colon-separated `names`, then exec'ing vubd with `args`, and
/// NOTIFY_SOCKET=`notify` as systemd sets it for a Type=notify service (it passes on only a
/// few variables of its own environment, so this is its option).
fn activate(sockets: &[&Path], names: &str, notify: Option<&Path>, args: &[&OsStr]) -> Command {
    let mut cmd = Command::new("systemd-socket-activate");
    for s in sockets {
        cmd.arg("-l").arg(s);
    }
    cmd.arg(format!("--fdname={names}"));
    if let Some(path) = notify {
        let mut set = std::ffi::OsString::from("NOTIFY_SOCKET=");
        set.push(path);
        cmd.arg("-E").arg(set);
    }
    cmd.arg("--").arg(env!("CARGO_BIN_EXE_vubd")).args(args);
    cmd
}

/// The descriptor flags of `fd` in process `pid`, from `/proc/PID/fdinfo/FD` (octal).
fn fd_flags(pid: u32, fd: i32) -> u32 {
    let info = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")).expect("fdinfo");
    let flags = info
        .lines()
        .find_map(|l| l.strip_prefix("flags:"))
        .expect("a flags line");
    u32::from_str_radix(flags.trim(), 8).expect("octal flags")
}

#[test]
fn an_activated_socket_serves_verified_io_and_the_service_manager_hears_ready_and_stopping() {
    let dir = tempfile::tempdir().expect("temp dir");
    let socket = dir.path().join("vm1.sock");
    let image = Image::new(16 * MIB);
    let (notify, notify_path) = notify_socket(dir.path());
    let device = format!("fd-name=vm1,disk={}", image.path().display());
    let cmd = activate(
        &[&socket],
        "vm1",
        Some(&notify_path),
        &["--device".as_ref(), device.as_ref()],
    );
    let mut daemon = Daemon::vubd_from(cmd, &socket);
    // The client's connection starts vubd, which accepts it once it serves.
    verified_io(&socket, &image, 1);
    assert_eq!(next_notification(&notify, &daemon), "READY=1");
    // The socket systemd bound and vubd serves, closed on exec like every descriptor vubd
    // keeps: whatever vubd started would not inherit it.
    assert_ne!(
        fd_flags(daemon.pid(), 3) & libc::O_CLOEXEC as u32,
        0,
        "fd 3 is close-on-exec"
    );
    let status = daemon.terminate();
    assert_eq!(next_notification(&notify, &daemon), "STOPPING=1");
    assert!(status.success(), "{status}\n{}", daemon.output());
    assert!(
        socket.exists(),
        "the socket is systemd's: vubd leaves it in place"
    );
}

#[test]
fn each_device_takes_the_socket_of_its_name_or_number() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (a, b) = (dir.path().join("a.sock"), dir.path().join("b.sock"));
    let (image_a, image_b) = (Image::new(16 * MIB), Image::new(16 * MIB));
    // Named in the other order than passed: the names decide, not the order.
    let dev_b = format!("fd-name=disk-b,disk={}", image_b.path().display());
    let dev_a = format!("fd=3,name=a,disk={}", image_a.path().display());
    let (notify, notify_path) = notify_socket(dir.path());
    let cmd = activate(
        &[&a, &b],
        "disk-a:disk-b",
        Some(&notify_path),
        &[
            "--device".as_ref(),
            dev_b.as_ref(),
            "--device".as_ref(),
            dev_a.as_ref(),
        ],
    );
    let daemon = Daemon::vubd_from(cmd, &a);
    verified_io(&a, &image_a, 2);
    assert_eq!(next_notification(&notify, &daemon), "READY=1");
    verified_io(&b, &image_b, 3);
}

/// Runs vubd under `systemd-socket-activate` as `cmd`, listening first on `socket`, and
/// connects to it to start vubd, expecting vubd to refuse to start: exit status 2 and one
/// line on stderr, returned.
fn refused(mut cmd: Command, socket: &Path) -> String {
    let dir = tempfile::tempdir().expect("temp dir");
    let log = dir.path().join("stderr");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(File::create(&log).expect("stderr log"))
        .spawn()
        .expect("spawn systemd-socket-activate");
    let deadline = Instant::now() + TIMEOUT;
    while !socket_listening(socket) {
        assert!(Instant::now() < deadline, "nothing listens on {socket:?}");
        thread::sleep(Duration::from_millis(5));
    }
    let _start = UnixStream::connect(socket).expect("connect to start vubd");
    let status = wait_bounded(&mut child).unwrap_or_else(|| {
        let _ = child.kill();
        panic!("vubd still runs {TIMEOUT:?} after it was started")
    });
    let stderr = std::fs::read_to_string(&log).expect("stderr");
    assert_eq!(status.code(), Some(2), "{status}: {stderr}");
    // systemd-socket-activate says what it listens on, then vubd has its line.
    let lines: Vec<&str> = stderr.lines().filter(|l| l.starts_with("vubd:")).collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    lines[0].to_owned()
}

#[test]
fn a_socket_no_device_serves_or_a_device_without_its_socket_is_one_line_naming_it() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (a, b) = (dir.path().join("a.sock"), dir.path().join("b.sock"));
    let line = refused(
        activate(
            &[&a, &b],
            "a:b",
            None,
            &["--device".as_ref(), "fd-name=a,disk=null:1M".as_ref()],
        ),
        &a,
    );
    assert_eq!(
        line,
        "vubd: socket activation: descriptor 4 (LISTEN_FDNAMES \"b\") is passed to vubd and no \
         device serves it (give one fd-name=b)"
    );
    let arg = "fd-name=c,disk=null:1M";
    let line = refused(
        activate(
            &[&a],
            "a",
            None,
            &[
                "--device".as_ref(),
                "fd-name=a,disk=null:1M".as_ref(),
                "--device".as_ref(),
                arg.as_ref(),
            ],
        ),
        &a,
    );
    assert_eq!(
        line,
        format!(
            "vubd: --device {arg:?}: fd-name=c: no socket of that name was passed \
             (LISTEN_FDNAMES: a)"
        )
    );
    let line = refused(
        activate(
            &[&a, &b],
            "a:a",
            None,
            &["--device".as_ref(), "fd-name=a,disk=null:1M".as_ref()],
        ),
        &a,
    );
    assert!(
        line.contains("LISTEN_FDNAMES names \"a\" more than once"),
        "{line}"
    );
}

#[test]
fn a_device_naming_a_socket_without_socket_activation_is_one_line_naming_it() {
    let mut cmd = common::daemon::vubd_command();
    cmd.env_remove("LISTEN_PID").env_remove("LISTEN_FDS");
    let arg = "fd-name=vm1,disk=null:1M";
    let exit = run_vubd_with(cmd, &["--device".as_ref(), arg.as_ref()]);
    assert_eq!(exit.status.code(), Some(2), "{exit:?}");
    assert_eq!(
        exit.stderr.trim_end(),
        format!(
            "vubd: --device {arg:?}: fd-name=vm1: no socket was passed (LISTEN_FDS is not set: \
             start vubd from a systemd socket unit, or systemd-socket-activate)"
        )
    );
}
