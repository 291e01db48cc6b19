//! Image locks as QEMU's tools see them: vubd locks the bytes QEMU's `file-posix` driver does,
//! so qemu-io and qemu-img (Debian's qemu-utils) find an image vubd serves in use, and vubd
//! finds an image they hold; a second vubd is refused unless it starts `--incoming`. These
//! always run vubd, whatever `VUBD_TEST_BACKEND` says.

mod common;

use std::ffi::OsStr;
use std::fs::File;
use std::os::fd::AsFd;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use common::daemon::{Daemon, DaemonConfig, Exit, run_vubd, wait_bounded};
use common::{Image, TIMEOUT};
use vubd::bdev::lock::{PERM_BASE, SHARED_BASE, locked_by_other};

const MIB: u64 = 1 << 20;

/// Runs one of QEMU's tools to completion, bounded in time.
fn qemu_tool(program: &str, args: &[&OsStr]) -> Output {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("run {program} (Debian package qemu-utils): {e}"));
    // The outputs are a few lines: the pipes cannot fill before the tool exits.
    if wait_bounded(&mut child).is_none() {
        let _ = child.kill();
        let _ = child.wait();
        panic!("{program} {args:?} still running after {TIMEOUT:?}");
    }
    child.wait_with_output().expect("collect output")
}

/// `qemu-io -f raw ARGS IMAGE -c quit`: opens the image as QEMU would (for writing unless
/// `-r`), then exits.
fn qemu_io_opens(image: &Path, args: &[&str]) -> Output {
    let mut all: Vec<&OsStr> = vec!["-f".as_ref(), "raw".as_ref()];
    all.extend(args.iter().map(OsStr::new));
    all.extend([OsStr::new("-c"), OsStr::new("quit"), image.as_os_str()]);
    qemu_tool("qemu-io", &all)
}

/// The lock bytes (100-103, 200-203) some process holds on `image`, seen from a new open.
fn locked_bytes(image: &Path) -> Vec<u64> {
    let f = File::open(image).expect("open image");
    (PERM_BASE..PERM_BASE + 4)
        .chain(SHARED_BASE..SHARED_BASE + 4)
        .filter(|&b| locked_by_other(f.as_fd(), b).expect("F_OFD_GETLK"))
        .collect()
}

/// Asserts a failed run whose stderr says `message`.
#[track_caller]
fn assert_refused(out: &Output, message: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains(message),
        "expected a failure saying {message:?}, got {}; stderr:\n{stderr}",
        out.status
    );
}

#[track_caller]
fn assert_ok(out: &Output) {
    assert!(
        out.status.success(),
        "{}; stderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Asserts that vubd stopped at startup with status 2 and one line naming the image and the
/// conflict.
#[track_caller]
fn assert_in_use(exit: &Exit, image: &Path, conflict: &str) {
    let lines: Vec<&str> = exit.stderr.lines().collect();
    assert!(
        exit.status.code() == Some(2) && lines.len() == 1,
        "expected status 2 and one line, got {}:\n{}",
        exit.status,
        exit.stderr
    );
    let expected = format!(
        "image {} is in use by another process ({conflict})",
        image.display()
    );
    assert!(lines[0].contains(&expected), "{}", lines[0]);
}

fn vubd_args<'a>(socket: &'a Path, image: &'a Path, extra: &[&'a str]) -> Vec<&'a OsStr> {
    let mut args: Vec<&OsStr> = vec![
        "--socket-path".as_ref(),
        socket.as_os_str(),
        "--disk".as_ref(),
        image.as_os_str(),
    ];
    args.extend(extra.iter().map(|&a| OsStr::new(a)));
    args
}

/// `qemu-io -f raw IMAGE` kept running with its stdin open: it holds the image for writing
/// (consistent read and write, bytes 100 and 101) until dropped.
struct QemuIoHolding {
    child: Child,
}

impl QemuIoHolding {
    fn start(image: &Path) -> Self {
        let child = Command::new("qemu-io")
            .args(["-f", "raw"])
            .arg(image)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("run qemu-io (Debian package qemu-utils): {e}"));
        let mut holding = QemuIoHolding { child };
        let deadline = Instant::now() + TIMEOUT;
        while !locked_bytes(image).contains(&(PERM_BASE + 1)) {
            if let Some(status) = holding.child.try_wait().expect("poll qemu-io") {
                panic!("qemu-io exited with {status} before locking the image");
            }
            assert!(
                Instant::now() < deadline,
                "qemu-io did not lock the image within {TIMEOUT:?}"
            );
            thread::sleep(Duration::from_millis(10));
        }
        holding
    }
}

impl Drop for QemuIoHolding {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn qemu_tools_find_an_image_vubd_serves_in_use_unless_they_force_sharing() {
    let image = Image::new(MIB);
    let _vubd = Daemon::vubd(&image, &DaemonConfig::default(), &[]);
    assert_eq!(locked_bytes(image.path()), [100, 101, 201, 203]);

    // QEMU opening the image for writing: vubd refuses writes by others.
    assert_refused(
        &qemu_io_opens(image.path(), &[]),
        "Failed to get \"write\" lock",
    );
    // A copy with consistent reads: vubd writes, so the source is not stable.
    let dir = tempfile::tempdir().expect("tempdir");
    let copy = dir.path().join("copy.img");
    let convert = |force_share: bool| {
        let mut args: Vec<&OsStr> = vec!["convert".as_ref()];
        if force_share {
            args.push("-U".as_ref());
        }
        args.extend(["-f", "raw", "-O", "raw"].map(OsStr::new));
        args.extend([image.path().as_os_str(), copy.as_os_str()]);
        qemu_tool("qemu-img", &args)
    };
    assert_refused(&convert(false), "Failed to get shared \"write\" lock");
    // With -U (force share) QEMU's tools take no locks and go ahead.
    assert_ok(&convert(true));
    assert_ok(&qemu_tool(
        "qemu-img",
        &["info".as_ref(), "-U".as_ref(), image.path().as_os_str()],
    ));
    // A reader that shares everything (qemu-io -r) does not conflict with vubd.
    assert_ok(&qemu_io_opens(image.path(), &["-r"]));
}

#[test]
fn vubd_refuses_to_start_on_an_image_qemu_holds_for_writing() {
    let image = Image::new(MIB);
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("sock");
    let qemu = QemuIoHolding::start(image.path());

    let exit = run_vubd(&vubd_args(&socket, image.path(), &[]));
    assert_in_use(&exit, image.path(), "it holds the \"write\" permission");
    assert!(exit.stderr.contains("--incoming"), "{}", exit.stderr);
    // A read-only disk must not change under its guest either.
    let exit = run_vubd(&vubd_args(&socket, image.path(), &["--readonly"]));
    assert_in_use(&exit, image.path(), "it holds the \"write\" permission");

    drop(qemu);
    let _vubd = Daemon::vubd(&image, &DaemonConfig::default(), &[]);
}

#[test]
fn a_second_vubd_is_refused_and_an_incoming_one_starts_beside_the_first() {
    let image = Image::new(MIB);
    let mut first = Daemon::vubd(&image, &DaemonConfig::default(), &[]);
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("sock");
    let exit = run_vubd(&vubd_args(&socket, image.path(), &[]));
    assert_in_use(&exit, image.path(), "it holds the \"write\" permission");

    let mut incoming = Daemon::vubd(&image, &DaemonConfig::default(), &["--incoming".as_ref()]);
    first.assert_running();
    let mut client = first.connect(1);
    client.queue(0).write(0, &[0x5a; 512]);
    assert_eq!(
        image.read_host(0, 512),
        [0x5a; 512],
        "the first still serves"
    );
    drop(client);

    // Alone, the incoming vubd holds consistent read only and shares everything, as QEMU's
    // tools see: they may write the image.
    first.terminate();
    assert_eq!(locked_bytes(image.path()), [100]);
    assert_ok(&qemu_io_opens(image.path(), &[]));
    incoming.assert_running();
}

#[test]
fn a_vubd_restarted_as_soon_as_the_last_one_exits_takes_the_image() {
    // The first one's io_uring ring keeps its image open for a while after it exits: its
    // locks must go with it regardless.
    let image = Image::new(MIB);
    for round in 0..3u8 {
        let mut vubd = Daemon::vubd(&image, &DaemonConfig::default(), &[]);
        let mut client = vubd.connect(1);
        client.queue(0).write(0, &[round; 512]);
        drop(client);
        vubd.terminate();
    }
    assert_eq!(image.read_host(0, 512), [2; 512]);
}

#[test]
fn incoming_is_a_device_key_too() {
    let image = Image::new(MIB);
    let _first = Daemon::vubd(&image, &DaemonConfig::default(), &[]);
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("sock");
    let device = |incoming: &str| {
        format!(
            "socket={},disk={},incoming={incoming}",
            socket.display(),
            image.path().display()
        )
    };
    let off = device("off");
    let exit = run_vubd(&["--incoming".as_ref(), "--device".as_ref(), off.as_ref()]);
    assert_in_use(&exit, image.path(), "it holds the \"write\" permission");
    assert!(
        exit.stderr
            .starts_with(&format!("vubd: --device {off:?}: ")),
        "{}",
        exit.stderr
    );
    let on = device("on");
    let args: [&OsStr; 2] = ["--device".as_ref(), on.as_ref()];
    let mut cmd = common::daemon::vubd_command();
    cmd.args(args);
    let mut second = Daemon::vubd_from(cmd, &socket);
    second.assert_running();
}

/// The upgrade procedure: the new vubd starts `--incoming` on the same socket and takes it
/// over, the old one is stopped (its frontends are disconnected, its socket file stays: it is
/// the new one's), and a frontend that connects again reaches the new vubd, which takes the
/// image for writing when the frontend starts the device.
#[test]
fn an_upgrade_hands_the_socket_and_the_image_to_the_new_vubd() {
    use std::os::unix::fs::MetadataExt;
    let image = Image::new(MIB);
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("sock");
    let mut old = Daemon::vubd_with_args(&vubd_args(&socket, image.path(), &[]), &socket);
    let mut client = old.connect(1);
    client.queue(0).write(0, &[1; 512]);
    let old_socket = std::fs::metadata(&socket).expect("socket").ino();

    let mut new =
        Daemon::vubd_with_args(&vubd_args(&socket, image.path(), &["--incoming"]), &socket);
    let deadline = Instant::now() + TIMEOUT;
    while std::fs::metadata(&socket).map(|m| m.ino()).ok() == Some(old_socket) {
        new.assert_running();
        assert!(Instant::now() < deadline, "the socket was not taken over");
        thread::sleep(Duration::from_millis(10));
    }
    // The old vubd still serves its frontend and holds the image.
    client.queue(0).write(512, &[2; 512]);
    assert_eq!(locked_bytes(image.path()), [100, 101, 201, 203]);

    let status = old.terminate();
    assert!(status.success(), "the old vubd: {status}\n{}", old.output());
    drop(client);
    assert!(socket.exists(), "the old vubd removed the new one's socket");
    assert_eq!(
        locked_bytes(image.path()),
        [100],
        "only the new vubd, inactive"
    );

    let mut client = new.connect(1);
    client.queue(0).write(1024, &[3; 512]);
    assert_eq!(locked_bytes(image.path()), [100, 101, 201, 203]);
    assert_eq!(
        image.read_host(0, 1536),
        [[1; 512], [2; 512], [3; 512]].concat()
    );
    drop(client);
    new.assert_running();
}

/// The write permission follows the rings: given up when the frontend stops the device (a
/// migration's destination may take it then), and held again once the frontend is gone,
/// when nobody else took it, so QEMU's tools still find an idle vubd's image in use.
#[test]
fn a_device_holds_its_image_again_when_its_frontend_goes() {
    let image = Image::new(MIB);
    let vubd = Daemon::vubd(&image, &DaemonConfig::default(), &[]);
    for round in 0..2u8 {
        let mut client = vubd.connect(1);
        client.queue(0).write(0, &[round; 512]);
        assert_eq!(locked_bytes(image.path()), [100, 101, 201, 203], "serving");
        drop(client);
        // Each session gives the permission up when its rings stop and takes it again when
        // the frontend is gone (at the ring start it is still held from the last time).
        let count = |what: &str| vubd.output().matches(what).count();
        let want = usize::from(round) + 1;
        let deadline = Instant::now() + TIMEOUT;
        while count("gave the image's write permission up") < want
            || count("took the image's write permission") < want
        {
            assert!(
                Instant::now() < deadline,
                "round {round}: the image is not held again after the frontend went:\n{}",
                vubd.output()
            );
            thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(
            locked_bytes(image.path()),
            [100, 101, 201, 203],
            "held again"
        );
        assert_refused(
            &qemu_io_opens(image.path(), &[]),
            "Failed to get \"write\" lock",
        );
    }
}
