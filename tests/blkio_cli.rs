//! The vubd command line and process lifecycle: bad arguments exit with status 2 and one
//! stderr line naming the problem; SIGTERM exits 0 and removes the socket. These always run
//! vubd, whatever `VUBD_TEST_BACKEND` says.

mod common;

use std::ffi::OsStr;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;

use common::Image;
use common::client::ClientOptions;
use common::daemon::{Daemon, DaemonConfig, Exit, run_vubd, run_vubd_with, socket_exists};

const MIB: u64 = 1 << 20;

/// Asserts exit status 2 and exactly one non-empty stderr line that mentions one of `names`.
#[track_caller]
fn assert_rejected(exit: &Exit, names: &[&str]) {
    assert_eq!(
        exit.status.code(),
        Some(2),
        "exit status {}; stderr:\n{}",
        exit.status,
        exit.stderr
    );
    let lines: Vec<&str> = exit.stderr.lines().collect();
    assert!(
        lines.len() == 1 && !lines[0].trim().is_empty(),
        "expected exactly one stderr line, got {}:\n{}",
        lines.len(),
        exit.stderr
    );
    assert!(
        names.iter().any(|name| lines[0].contains(name)),
        "stderr line does not name any of {names:?}: {}",
        lines[0]
    );
}

fn args<'a>(socket: &'a Path, disk: &'a Path) -> [&'a OsStr; 4] {
    [
        "--socket-path".as_ref(),
        socket.as_os_str(),
        "--disk".as_ref(),
        disk.as_os_str(),
    ]
}

fn text(path: &Path) -> &str {
    path.to_str().expect("temporary paths are UTF-8")
}

#[test]
fn missing_disk_file_exits_2_naming_the_disk() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("sock");
    let disk = dir.path().join("no-such-disk.img");
    let exit = run_vubd(&args(&socket, &disk));
    assert_rejected(&exit, &[text(&disk)]);
    assert!(!socket_exists(&socket), "socket left behind");
}

#[test]
fn unreadable_disk_exits_2_naming_the_disk() {
    let image = Image::new(MIB);
    fs::set_permissions(image.path(), fs::Permissions::from_mode(0o000)).expect("chmod 000");
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("sock");
    let mut cmd = common::daemon::vubd_command();
    // SAFETY: geteuid(2) has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        // Permission bits do not stop root: run vubd as nobody, with directories it may use.
        cmd.uid(65534).gid(65534);
        for d in [dir.path(), image.path().parent().expect("image directory")] {
            fs::set_permissions(d, fs::Permissions::from_mode(0o777)).expect("chmod 777");
        }
    }
    let exit = run_vubd_with(cmd, &args(&socket, image.path()));
    assert_rejected(&exit, &[text(image.path())]);
}

#[test]
fn directory_as_disk_exits_2_naming_the_disk() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("sock");
    let exit = run_vubd(&args(&socket, dir.path()));
    assert_rejected(&exit, &[text(dir.path())]);
}

#[test]
fn image_size_not_a_multiple_of_512_exits_2_naming_the_problem() {
    let image = Image::new(MIB + 100);
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("sock");
    let exit = run_vubd(&args(&socket, image.path()));
    assert_rejected(&exit, &[text(image.path()), "512"]);
    assert!(!socket_exists(&socket), "socket left behind");
}

#[test]
fn socket_in_missing_directory_exits_2_naming_the_path() {
    let image = Image::new(MIB);
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("missing");
    let socket = missing.join("sock");
    let exit = run_vubd(&args(&socket, image.path()));
    assert_rejected(&exit, &[text(&missing)]);
}

#[test]
fn busy_socket_exits_2_and_the_first_daemon_keeps_serving() {
    let image = Image::new(MIB);
    let mut first = Daemon::vubd(&image, &DaemonConfig::default(), &[]);
    let other = Image::new(MIB);
    let exit = run_vubd(&args(first.socket(), other.path()));
    assert_rejected(&exit, &[text(first.socket())]);

    assert!(
        socket_exists(first.socket()),
        "the first daemon's socket is gone"
    );
    let mut client = first.connect(1);
    client.queue(0).write(0, &[0x42; 512]);
    assert_eq!(image.read_host(0, 512), [0x42; 512], "first daemon's disk");
    assert_eq!(other.read_host(0, 512), [0; 512], "second daemon's disk");
    drop(client);
    first.assert_running();
}

#[test]
fn file_prefixed_disk_is_served() {
    let image = Image::new(MIB);
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("sock");
    let disk = format!("file:{}", text(image.path()));
    let args: [&OsStr; 4] = [
        "--socket-path".as_ref(),
        socket.as_os_str(),
        "--disk".as_ref(),
        disk.as_ref(),
    ];
    let daemon = Daemon::vubd_with_args(&args, &socket);
    let mut client = daemon.connect(1);
    client.queue(0).write(4096, &[0x24; 4096]);
    assert_eq!(image.read_host(4096, 4096), [0x24; 4096]);
}

#[test]
fn queue_size_option_caps_the_ring_size_a_frontend_may_use() {
    let image = Image::new(MIB);
    let daemon = Daemon::vubd(
        &image,
        &DaemonConfig::default(),
        &["--queue-size".as_ref(), "64".as_ref()],
    );
    for size in [16, 64] {
        let mut options = ClientOptions::queues(1);
        options.queue_size = Some(size);
        let mut client = daemon.connect_with(&options);
        client.queue(0).write(0, &[0x64; 4096]);
        assert_eq!(
            client.queue(0).read(0, 4096),
            [0x64; 4096],
            "ring of {size}"
        );
    }
    let mut options = ClientOptions::queues(1);
    options.queue_size = Some(128);
    assert!(
        daemon.try_connect(&options).is_err(),
        "a ring of 128 entries was accepted with --queue-size 64"
    );
    // Refusing one frontend leaves the daemon serving the next.
    options.queue_size = Some(64);
    let mut client = daemon.connect_with(&options);
    assert_eq!(client.queue(0).read(0, 4096), [0x64; 4096]);
}

#[test]
fn sigterm_exits_0_and_removes_the_socket() {
    let image = Image::new(MIB);
    let mut daemon = Daemon::vubd(&image, &DaemonConfig::default(), &[]);
    let status = daemon.terminate();
    assert_eq!(
        status.code(),
        Some(0),
        "exit status after SIGTERM: {status}"
    );
    assert!(!socket_exists(daemon.socket()), "socket still exists");
}

#[test]
fn sigterm_with_a_frontend_connected_exits_0_and_removes_the_socket() {
    let image = Image::new(MIB);
    let config = DaemonConfig {
        num_queues: Some(2),
        ..DaemonConfig::default()
    };
    let mut daemon = Daemon::vubd(&image, &config, &[]);
    let mut client = daemon.connect(2);
    client.queue(1).write(0, &[0x99; 4096]);
    let status = daemon.terminate();
    assert_eq!(
        status.code(),
        Some(0),
        "exit status after SIGTERM: {status}"
    );
    assert!(!socket_exists(daemon.socket()), "socket still exists");
    assert_eq!(image.read_host(0, 4096), [0x99; 4096], "completed write");
    drop(client);
}
