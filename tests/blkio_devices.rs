//! Several devices in one vubd (`--device`, repeated): each on its own socket with its own
//! frontend sessions, all their queues on the same pollers. Two image files driven at the same
//! time with every byte checked; one device's frontend coming and going while the other keeps
//! working; a device on an inherited listening socket (`fd=N`) beside one on a path; SIGTERM
//! ending both; two devices on one NVMe/TCP subsystem (the fake target), a controller each;
//! and the command-line errors of `--device`. These always run vubd, whatever
//! `VUBD_TEST_BACKEND` says.

mod common;
#[path = "common/workload.rs"]
mod workload;

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use common::client::Client;
use common::daemon::{Daemon, Exit, run_vubd, socket_exists, socket_listening};
use common::fake_target::{FakeTarget, Options};
use common::{Image, Rng, TIMEOUT, assert_same, procfs};
use tempfile::TempDir;

const MIB: u64 = 1 << 20;

/// `socket=S,disk=D` plus `extra` keys, as one `--device` argument.
fn device(socket: &Path, disk: &Path, extra: &str) -> OsString {
    let text = |p: &Path| {
        p.to_str()
            .expect("temporary paths are UTF-8")
            .replace(',', ",,")
    };
    format!("socket={},disk={}{extra}", text(socket), text(disk)).into()
}

/// vubd serving `images` as one device each, with `extra` keys on every `--device`; waits
/// until every socket listens. Returns the daemon and the sockets.
fn serve(dir: &TempDir, images: &[&Image], extra: &str) -> (Daemon, Vec<PathBuf>) {
    let disks: Vec<&Path> = images.iter().map(|i| i.path()).collect();
    serve_disks(dir, &disks, extra, &[])
}

/// vubd serving `disks` as one device each, with `extra` keys on every `--device` and
/// `global` options; waits until every socket listens.
fn serve_disks(
    dir: &TempDir,
    disks: &[&Path],
    extra: &str,
    global: &[&OsStr],
) -> (Daemon, Vec<PathBuf>) {
    let sockets: Vec<PathBuf> = (0..disks.len())
        .map(|i| dir.path().join(format!("dev{i}.sock")))
        .collect();
    let mut args: Vec<OsString> = global.iter().map(|&a| a.to_owned()).collect();
    for (socket, disk) in sockets.iter().zip(disks) {
        args.push("--device".into());
        args.push(device(socket, disk, extra));
    }
    let args: Vec<&OsStr> = args.iter().map(OsString::as_os_str).collect();
    let daemon = Daemon::vubd_with_args(&args, &sockets[0]);
    let deadline = Instant::now() + TIMEOUT;
    for s in &sockets[1..] {
        while !socket_listening(s) {
            assert!(
                Instant::now() < deadline,
                "{} not listening:\n{}",
                s.display(),
                daemon.output()
            );
            thread::sleep(Duration::from_millis(5));
        }
    }
    (daemon, sockets)
}

fn connect(daemon: &Daemon, socket: &Path, num_queues: usize) -> Client {
    Client::connect(socket, &common::client::ClientOptions::queues(num_queues)).unwrap_or_else(
        |e| {
            panic!(
                "connect to {}: {e}\nvubd output:\n{}",
                socket.display(),
                daemon.output()
            )
        },
    )
}

#[test]
fn two_devices_verify_random_io_at_the_same_time() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (a, b) = (Image::new(8 * MIB), Image::new(8 * MIB));
    // Two queues each: on a two-CPU machine every poller serves a queue of both devices.
    let (mut daemon, sockets) = serve(&dir, &[&a, &b], ",num-queues=2");
    let clients: Vec<Client> = sockets.iter().map(|s| connect(&daemon, s, 2)).collect();
    let expected: Vec<Vec<u8>> = thread::scope(|s| {
        let runs: Vec<_> = clients
            .into_iter()
            .zip([0x0D01_u64, 0x0D02])
            .map(|(mut client, seed)| s.spawn(move || workload::random_io(&mut client, seed)))
            .collect();
        runs.into_iter()
            .map(|r| r.join().expect("workload"))
            .collect()
    });
    assert_ne!(
        expected[0], expected[1],
        "the seeds make different contents"
    );
    for (image, expected) in [&a, &b].into_iter().zip(&expected) {
        let on_host = image.read_host(0, expected.len());
        assert_same(expected, &on_host, 0, "image file on the host");
    }
    let log = daemon.output();
    assert!(
        log.matches("frontend connected").count() == 2,
        "one session per device:\n{log}"
    );
    daemon.assert_running();
}

#[test]
fn one_device_reconnects_while_the_other_keeps_running() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (a, b) = (Image::new(4 * MIB), Image::new(4 * MIB));
    let (mut daemon, sockets) = serve(&dir, &[&a, &b], "");
    let mut steady = connect(&daemon, &sockets[1], 1);
    let data_b = Rng::new(0xB).bytes(64 << 10);
    let stop = AtomicBool::new(false);
    let rounds = thread::scope(|s| {
        let (stop, data_b) = (&stop, &data_b);
        let steady = s.spawn(move || {
            // Writes and verifies, over and over, until the other device is done.
            let q = steady.queue(0);
            let mut rounds = 0u64;
            while !stop.load(Ordering::Acquire) || rounds < 10 {
                let offset = (rounds % 32) * (64 << 10);
                q.write(offset, data_b);
                assert_same(data_b, &q.read(offset, data_b.len()), offset, "device 1");
                rounds += 1;
            }
            rounds
        });
        let mut rng = Rng::new(0xA);
        let mut last = Vec::new();
        for round in 0..4u64 {
            let mut client = connect(&daemon, &sockets[0], 1);
            let q = client.queue(0);
            if round > 0 {
                let what = format!("device 0, connection {round}: previous data");
                assert_same(&last, &q.read(0, last.len()), 0, &what);
            }
            last = rng.bytes(128 << 10);
            q.write(0, &last);
            // Dropped here: the frontend disconnects with the other device busy.
        }
        stop.store(true, Ordering::Release);
        let rounds = steady.join().expect("steady device");
        assert_same(&last, &a.read_host(0, last.len()), 0, "device 0 image");
        rounds
    });
    assert!(rounds >= 10, "device 1 ran {rounds} rounds");
    assert_same(&data_b, &b.read_host(0, data_b.len()), 0, "device 1 image");
    let status = daemon.terminate();
    assert!(status.success(), "SIGTERM: {status}\n{}", daemon.output());
    for s in &sockets {
        assert!(!socket_exists(s), "{} left behind", s.display());
    }
}

/// The fd the `fd=` device's listening socket gets in vubd.
const INHERITED_FD: i32 = 9;

#[test]
fn a_device_on_an_inherited_socket_and_one_on_a_path_both_verify_random_io() {
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixListener;

    let dir = tempfile::tempdir().expect("temp dir");
    let (a, b) = (Image::new(4 * MIB), Image::new(4 * MIB));
    let inherited = dir.path().join("inherited.sock");
    let by_path = dir.path().join("by-path.sock");
    let listener = UnixListener::bind(&inherited).expect("bind");
    let disk_a = a.path().to_str().expect("UTF-8").replace(',', ",,");
    let mut cmd = common::daemon::vubd_command();
    cmd.arg("--device")
        .arg(format!("fd={INHERITED_FD},disk={disk_a},num-queues=2"))
        .arg("--device")
        .arg(device(&by_path, b.path(), ""));
    common::daemon::inherit_fd(&mut cmd, listener.as_raw_fd(), INHERITED_FD);
    let mut daemon = Daemon::vubd_from(cmd, &by_path);
    // vubd holds the socket now; ours goes, so only vubd accepts on it.
    drop(listener);
    let clients = [
        connect(&daemon, &inherited, 2),
        connect(&daemon, &by_path, 1),
    ];
    let expected: Vec<Vec<u8>> = thread::scope(|s| {
        let runs: Vec<_> = clients
            .into_iter()
            .zip([0x0F01_u64, 0x0F02])
            .map(|(mut client, seed)| s.spawn(move || workload::random_io(&mut client, seed)))
            .collect();
        runs.into_iter()
            .map(|r| r.join().expect("workload"))
            .collect()
    });
    for (image, expected) in [&a, &b].into_iter().zip(&expected) {
        let on_host = image.read_host(0, expected.len());
        assert_same(expected, &on_host, 0, "image file on the host");
    }
    let log = daemon.output();
    assert_eq!(
        log.matches("frontend connected").count(),
        2,
        "one session per device:\n{log}"
    );
    let status = daemon.terminate();
    assert!(status.success(), "SIGTERM: {status}\n{}", daemon.output());
    assert!(
        !socket_exists(&by_path),
        "{} left behind",
        by_path.display()
    );
}

#[test]
fn sigterm_with_both_frontends_connected_stops_cleanly() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (a, b) = (Image::new(MIB), Image::new(MIB));
    let (mut daemon, sockets) = serve(&dir, &[&a, &b], ",num-queues=2");
    let mut clients: Vec<Client> = sockets.iter().map(|s| connect(&daemon, s, 2)).collect();
    for (i, c) in (1u8..).zip(clients.iter_mut()) {
        c.queue(1).write(0, &[i; 4096]);
    }
    let status = daemon.terminate();
    assert!(status.success(), "SIGTERM: {status}\n{}", daemon.output());
    drop(clients);
    assert_eq!(a.read_host(0, 4096), [1; 4096]);
    assert_eq!(b.read_host(0, 4096), [2; 4096]);
    for s in &sockets {
        assert!(!socket_exists(s), "{} left behind", s.display());
    }
}

#[test]
fn two_devices_on_one_nvme_tcp_subsystem_get_a_controller_each() {
    let target = FakeTarget::start(Options::default()).expect("start the fake target");
    let uri = format!("nvme-tcp://{}/{}", target.addr(), target.nqn());
    let dir = tempfile::tempdir().expect("temp dir");
    // One poller serves both devices' queues.
    let cpu = procfs::own_cpus()[0].to_string();
    let (mut daemon, sockets) = serve_disks(
        &dir,
        &[Path::new(&uri), Path::new(&uri)],
        "",
        &["--cpus".as_ref(), cpu.as_ref()],
    );
    let mut clients: Vec<Client> = sockets.iter().map(|s| connect(&daemon, s, 1)).collect();
    // One namespace behind both: what one device writes, the other reads.
    let data = Rng::new(0x7C9).bytes(64 << 10);
    clients[0].queue(0).write(0, &data);
    assert_same(
        &data,
        &clients[1].queue(0).read(0, data.len()),
        0,
        "device 1",
    );
    clients[1].queue(0).write(MIB, &data);
    assert_same(
        &data,
        &clients[0].queue(0).read(MIB, data.len()),
        MIB,
        "device 0",
    );
    drop(clients);
    // A controller of its own for each device (the target numbers them); both are connected
    // by now, since serving begins only once every device's disk is open.
    let log = daemon.output();
    let connected: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("NVMe/TCP controller connected"))
        .collect();
    assert_eq!(connected.len(), 2, "{log}");
    assert!(
        connected.iter().any(|l| l.contains(" cntlid=1 "))
            && connected.iter().any(|l| l.contains(" cntlid=2 ")),
        "{log}"
    );
    daemon.assert_running();
    assert_eq!(target.counters().panics, 0);
}

/// Asserts exit status 2 and one error line on stderr containing every one of `parts` (the
/// log of devices that did start may come before it).
#[track_caller]
fn assert_rejected(exit: &Exit, parts: &[&str]) {
    assert_eq!(exit.status.code(), Some(2), "stderr:\n{}", exit.stderr);
    let lines: Vec<&str> = exit
        .stderr
        .lines()
        .filter(|l| l.starts_with("vubd: "))
        .collect();
    assert_eq!(lines.len(), 1, "one error line:\n{}", exit.stderr);
    for p in parts {
        assert!(lines[0].contains(p), "{p:?} not in: {}", lines[0]);
    }
}

#[test]
fn device_errors_name_the_argument_or_the_device() {
    let dir = tempfile::tempdir().expect("temp dir");
    let image = Image::new(MIB);
    let (s0, s1) = (dir.path().join("a.sock"), dir.path().join("b.sock"));
    let d0 = device(&s0, image.path(), "");
    // Mixed with a single-device option.
    let exit = run_vubd(&[
        "--device".as_ref(),
        &d0,
        "--disk".as_ref(),
        image.path().as_ref(),
    ]);
    assert_rejected(&exit, &["--device", "--disk"]);
    // The same socket twice; the same image written by two devices.
    let exit = run_vubd(&["--device".as_ref(), &d0, "--device".as_ref(), &d0]);
    assert_rejected(&exit, &["--device", "its socket is another's"]);
    let d1 = device(&s1, image.path(), "");
    let exit = run_vubd(&["--device".as_ref(), &d0, "--device".as_ref(), &d1]);
    assert_rejected(&exit, &["--device", "its image is another's"]);
    // A device that cannot start stops startup, named, and leaves no socket behind.
    let missing = dir.path().join("missing.img");
    let d1 = device(&s1, &missing, "");
    let exit = run_vubd(&["--device".as_ref(), &d0, "--device".as_ref(), &d1]);
    assert_rejected(&exit, &["--device", "missing.img", "b.sock"]);
    assert!(
        !socket_exists(&s0) && !socket_exists(&s1),
        "sockets left behind"
    );
    let exit = run_vubd(&["--device".as_ref(), "socket=x.sock".as_ref()]);
    assert_rejected(&exit, &["--device \"socket=x.sock\"", "disk is required"]);
    // An fd that is not a listening socket (the child's fd 0 is /dev/null).
    let d1 = "fd=0,disk=null:1M";
    let exit = run_vubd(&["--device".as_ref(), &d0, "--device".as_ref(), d1.as_ref()]);
    assert_rejected(
        &exit,
        &[&format!(
            "--device {d1:?}: --fd 0: not a listening unix socket"
        )],
    );
}
