//! `--socket-mode` and `--socket-group` (and the `--device` keys `socket-mode=`,
//! `socket-group=`): the socket file vubd creates has the mode and group asked for, checked on
//! the file itself, and a frontend connects through it; a group alone keeps the umask's mode;
//! a bad value is one line naming the option and exit status 2. The suite runs as root, so
//! vubd may give its sockets any group.

mod common;

use std::ffi::OsStr;
use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::time::{Duration, Instant};

use common::TIMEOUT;
use common::daemon::{Daemon, run_vubd, vubd_command};

/// A group id no test machine uses for anything: chown needs no entry for it.
const GID: u32 = 4242;

/// vubd with `args`, its umask 027, once it listens on `socket` (bound beside the path, then
/// renamed over it).
fn vubd(args: &[&str], socket: &Path) -> Daemon {
    let mut cmd = vubd_command();
    cmd.args(args);
    // SAFETY: the hook runs between fork and exec and makes one async-signal-safe call.
    unsafe {
        cmd.pre_exec(|| {
            libc::umask(0o027);
            Ok(())
        });
    }
    Daemon::taking_over(cmd, "vubd", socket)
}

/// The mode bits and group of the socket file at `path`.
fn perms(path: &Path) -> (u32, u32) {
    let m = fs::symlink_metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(
        m.file_type().is_socket(),
        "{}: not a socket",
        path.display()
    );
    (m.mode() & 0o7777, m.gid())
}

/// Waits until `path` is a socket file.
fn wait_for_file(path: &Path) {
    let deadline = Instant::now() + TIMEOUT;
    while !fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
        assert!(Instant::now() < deadline, "no socket at {}", path.display());
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn the_socket_gets_the_mode_and_group_asked_for() {
    let dir = tempfile::tempdir().expect("temp dir");
    let socket = dir.path().join("vubd.sock");
    let socket_s = socket.to_str().expect("utf-8");
    let gid = GID.to_string();
    let mut d = vubd(
        &[
            "--socket-path",
            socket_s,
            "--disk",
            "null:1M",
            "--socket-mode",
            "0660",
            "--socket-group",
            &gid,
        ],
        &socket,
    );
    assert_eq!(perms(&socket), (0o660, GID));
    assert!(
        !Daemon::bound_beside(&socket, d.pid()).exists(),
        "the name it was bound under is gone"
    );
    let mut client = d.connect(1);
    assert_eq!(client.queue(0).read(0, 4096), vec![0; 4096]);
    drop(client);
    d.assert_running();
}

#[test]
fn a_group_alone_keeps_the_mode_the_umask_gives() {
    let dir = tempfile::tempdir().expect("temp dir");
    let socket = dir.path().join("vubd.sock");
    let socket_s = socket.to_str().expect("utf-8");
    let _d = vubd(
        &[
            "--socket-path",
            socket_s,
            "--disk",
            "null:1M",
            "--socket-group",
            "nogroup",
        ],
        &socket,
    );
    // nogroup is 65534 on Debian; the umask 027 leaves 0750.
    assert_eq!(perms(&socket), (0o750, 65534));
}

#[test]
fn each_device_takes_the_global_values_unless_it_has_its_own() {
    let dir = tempfile::tempdir().expect("temp dir");
    let a = dir.path().join("a.sock");
    let b = dir.path().join("b.sock");
    let dev_a = format!("socket={},disk=null:1M", a.display());
    let dev_b = format!(
        "socket={},disk=null:1M,socket-mode=600,socket-group=0",
        b.display()
    );
    let gid = GID.to_string();
    let _d = vubd(
        &[
            "--socket-mode",
            "660",
            "--socket-group",
            &gid,
            "--device",
            &dev_a,
            "--device",
            &dev_b,
        ],
        &a,
    );
    wait_for_file(&b);
    assert_eq!(perms(&a), (0o660, GID));
    assert_eq!(perms(&b), (0o600, 0));
}

#[test]
fn bad_values_are_one_line_naming_the_option() {
    for (args, line) in [
        (
            &["--socket-mode", "rw-rw----"][..],
            "vubd: --socket-mode \"rw-rw----\": expected an octal mode such as 0660 (at most 0777)",
        ),
        (
            &["--socket-group", "no-such-group-vubd"],
            "vubd: --socket-group \"no-such-group-vubd\": no such group (a group name or a number)",
        ),
        (
            &["--fd", "3", "--socket-mode", "0660"],
            "vubd: --socket-mode and --socket-group apply to a socket vubd creates, not to --fd",
        ),
    ] {
        let mut all: Vec<&OsStr> = vec![OsStr::new("--disk"), OsStr::new("null:1M")];
        all.extend(args.iter().map(OsStr::new));
        let exit = run_vubd(&all);
        assert_eq!(exit.status.code(), Some(2), "{args:?}: {}", exit.stderr);
        assert_eq!(exit.stderr.trim_end(), line, "{args:?}");
    }
}
