//! The vubd command line and process lifecycle: bad arguments (among them bad `--cpus`,
//! `--poll`, `--poll-idle-us` and null disk sizes) exit with status 2 and one stderr line
//! naming the problem; SIGTERM exits 0 and removes the socket, in every poll mode. These always
//! run vubd, whatever `VUBD_TEST_BACKEND` says. A standard output whose reader is gone neither
//! panics `--help` nor stops a daemon from serving. `--print-capabilities` prints and exits 0
//! whatever else the command line holds.

mod common;

use std::ffi::OsStr;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;

use common::client::ClientOptions;
use common::daemon::{
    Daemon, DaemonConfig, Exit, PollMode, run_vubd, run_vubd_with, socket_exists,
};
use common::{Image, procfs};

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
    sigterm_with_a_frontend_connected_exits_0(None);
}

common::per_poll_mode! {
    #[test]
    fn sigterm_with_a_frontend_connected_exits_0_and_removes_the_socket() {
        sigterm_with_a_frontend_connected_exits_0(Some(POLL));
    }
}

/// SIGTERM with a frontend connected, with `poll` (vubd's default if `None`): exit 0, no
/// socket left, the completed write on disk.
fn sigterm_with_a_frontend_connected_exits_0(poll: Option<PollMode>) {
    let image = Image::new(MIB);
    let config = DaemonConfig {
        num_queues: Some(2),
        poll,
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

/// Runs vubd on a valid socket path and disk (unless `extra` names another `--disk`) with
/// `extra` appended, and asserts that it exits 2 with one stderr line naming `name` and leaves
/// no socket behind.
#[track_caller]
fn rejected_with(cmd: std::process::Command, extra: &[&str], name: &str) {
    let image = Image::new(MIB);
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("sock");
    let mut all: Vec<&OsStr> = args(&socket, image.path()).to_vec();
    all.extend(extra.iter().map(OsStr::new));
    let exit = run_vubd_with(cmd, &all);
    assert_rejected(&exit, &[name]);
    assert!(!socket_exists(&socket), "{extra:?}: socket left behind");
}

#[test]
fn malformed_cpu_lists_exit_2_naming_cpus() {
    // `--cpus=` so that a value starting with '-' is not taken for an option.
    for list in [
        "", "x", "0-", "-1", "1-0", "0,,1", "0,", "0;1", "0x1", "1-2-3",
    ] {
        let arg = format!("--cpus={list}");
        rejected_with(common::daemon::vubd_command(), &[&arg], "--cpus");
    }
}

#[test]
fn unavailable_cpus_exit_2_naming_cpus() {
    let cpus = procfs::own_cpus();
    let last = cpus.last().expect("at least one CPU");
    let beyond = format!("0-{}", last + 1);
    let huge = format!("0-{}", u64::MAX);
    for list in ["4096", "1024", "99999999999999999999", &beyond, &huge] {
        rejected_with(common::daemon::vubd_command(), &["--cpus", list], "--cpus");
    }
}

#[test]
fn cpu_outside_the_affinity_vubd_runs_with_exits_2_naming_cpus() {
    // vubd may only use the first of the test's CPUs: the second exists, but not for it.
    let cpus = procfs::own_cpus();
    assert!(
        cpus.len() >= 2,
        "this test needs two CPUs, and may use only {cpus:?}"
    );
    let mut cmd = common::daemon::vubd_command();
    common::daemon::restrict_to_cpus(&mut cmd, &cpus[..1]);
    rejected_with(cmd, &["--cpus", &cpus[1].to_string()], "--cpus");
}

#[test]
fn duplicate_cpus_exit_2_naming_cpus() {
    for list in ["0,0", "0-1,1", "0,0-1"] {
        rejected_with(common::daemon::vubd_command(), &["--cpus", list], "--cpus");
    }
}

#[test]
fn unknown_poll_mode_exits_2_naming_poll() {
    for mode in ["bogus", "", "Always2", "busy"] {
        rejected_with(common::daemon::vubd_command(), &["--poll", mode], "--poll");
    }
}

#[test]
fn out_of_range_poll_idle_time_exits_2_naming_poll_idle_us() {
    for us in [
        "2000000",
        "1000001",
        "18446744073709551616",
        "-1",
        "x",
        "1.5",
    ] {
        let arg = format!("--poll-idle-us={us}");
        rejected_with(common::daemon::vubd_command(), &[&arg], "--poll-idle-us");
    }
}

#[test]
fn bad_null_disk_sizes_exit_2_naming_the_disk() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("sock");
    for size in ["1000", "x", "0", "", "4k5", "-512", "16Q", "99999999999T"] {
        let disk = format!("null:{size}");
        let args: [&OsStr; 4] = [
            "--socket-path".as_ref(),
            socket.as_os_str(),
            "--disk".as_ref(),
            disk.as_ref(),
        ];
        let exit = run_vubd(&args);
        assert_rejected(&exit, &["--disk"]);
        assert!(!socket_exists(&socket), "{disk}: socket left behind");
    }
}

#[test]
fn poll_options_with_their_extreme_values_are_accepted() {
    let image = Image::new(MIB);
    let variants: [&[&str]; 4] = [
        &["--poll", "never"],
        &["--poll", "adaptive", "--poll-idle-us", "0"],
        &["--poll", "adaptive", "--poll-idle-us", "1000000"],
        &["--poll-idle-us", "1000000"],
    ];
    for extra in variants {
        let extra: Vec<&OsStr> = extra.iter().map(OsStr::new).collect();
        let mut daemon = Daemon::vubd(&image, &DaemonConfig::default(), &extra);
        let mut client = daemon.connect(1);
        client.queue(0).write(0, &[0x17; 4096]);
        assert_eq!(client.queue(0).read(0, 4096), [0x17; 4096], "{extra:?}");
        drop(client);
        daemon.assert_running();
    }
}

#[test]
fn print_capabilities_prints_the_block_backend_json_and_exits_0() {
    let out = common::daemon::vubd_command()
        .arg("--print-capabilities")
        .output()
        .expect("run vubd");
    assert!(out.status.success(), "exit status {}", out.status);
    let json: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("--print-capabilities prints JSON");
    assert_eq!(json["type"], "block");
    let features: Vec<&str> = json["features"]
        .as_array()
        .expect("features array")
        .iter()
        .filter_map(|f| f.as_str())
        .collect();
    assert!(
        features.contains(&"read-only") && features.contains(&"blk-file"),
        "{json}"
    );
}

#[test]
fn print_capabilities_ignores_every_other_argument_valid_or_not() {
    let run = |args: &[&str]| {
        let out = common::daemon::vubd_command()
            .args(args)
            .output()
            .expect("run vubd");
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            out.status.success(),
            "{args:?}: {}; stderr:\n{stderr}",
            out.status
        );
        assert!(stderr.is_empty(), "{args:?}: stderr:\n{stderr}");
        out.stdout
    };
    let alone = run(&["--print-capabilities"]);
    serde_json::from_slice::<serde_json::Value>(&alone).expect("--print-capabilities prints JSON");
    for args in [
        &["--no-such-option", "--print-capabilities"][..],
        &["--print-capabilities", "--num-queues", "0", "--cpus", "x"],
        &["--device", "garbage", "--print-capabilities"],
        &[
            "--socket-path",
            "a.sock",
            "--fd",
            "3",
            "--print-capabilities",
        ],
        &["--disk", "--print-capabilities"],
    ] {
        assert_eq!(
            String::from_utf8_lossy(&run(args)),
            String::from_utf8_lossy(&alone),
            "{args:?}"
        );
    }
}

/// The fd vubd gets through `--fd` in the inherited-socket test.
const INHERITED_FD: i32 = 7;

#[test]
fn inherited_listening_socket_is_served_through_fd() {
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixListener;

    let image = Image::new(MIB);
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("inherited.sock");
    let listener = UnixListener::bind(&socket).expect("bind");
    let fd = listener.as_raw_fd();
    let mut cmd = common::daemon::vubd_command();
    cmd.args([
        "--fd",
        &INHERITED_FD.to_string(),
        "--disk",
        text(image.path()),
    ]);
    cmd.stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    common::daemon::inherit_fd(&mut cmd, fd, INHERITED_FD);
    let mut child = cmd.spawn().expect("spawn vubd");
    drop(listener);
    let result = std::panic::catch_unwind(|| {
        let mut client = common::client::Client::connect(&socket, &ClientOptions::queues(1))
            .expect("connect through the inherited socket");
        let data = vec![0x5au8; 4096];
        client.queue(0).write(8192, &data);
        assert_eq!(client.queue(0).read(8192, 4096), data);
    });
    let pid = i32::try_from(child.id()).expect("pid fits");
    // SAFETY: kill has no memory effects; `pid` is our own child, not yet reaped.
    let _ = unsafe { libc::kill(pid, libc::SIGTERM) };
    let status = common::daemon::wait_bounded(&mut child);
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(0),
        "vubd exit after SIGTERM"
    );
    assert_eq!(image.read_host(8192, 4096), vec![0x5au8; 4096]);
}

#[test]
fn fd_that_is_not_a_listening_socket_exits_2_naming_fd() {
    let image = Image::new(MIB);
    // fd 0 of the child is /dev/null, not a socket; 987 is not open at all.
    for fd in ["0", "987"] {
        let exit = run_vubd(&[
            "--fd".as_ref(),
            fd.as_ref(),
            "--disk".as_ref(),
            image.path().as_os_str(),
        ]);
        assert_rejected(&exit, &["--fd"]);
    }
}

/// The write end of a pipe whose reader is gone: writing to it fails with EPIPE, as for
/// `vubd --help | head -1` once `head` has exited, or a supervisor that closed vubd's stdout.
fn broken_pipe() -> std::os::fd::OwnedFd {
    use std::os::fd::FromRawFd;
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2(2) writes.
    let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    assert_eq!(rc, 0, "pipe2: {}", std::io::Error::last_os_error());
    // SAFETY: pipe2 just opened both descriptors, and nothing else owns them.
    let (reader, writer) = unsafe {
        (
            std::os::fd::OwnedFd::from_raw_fd(fds[0]),
            std::os::fd::OwnedFd::from_raw_fd(fds[1]),
        )
    };
    drop(reader);
    writer
}

#[test]
fn help_and_capabilities_into_a_closed_pipe_exit_0_without_a_panic() {
    for arg in ["--help", "--print-capabilities"] {
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_vubd"))
            .arg(arg)
            .stdin(std::process::Stdio::null())
            .stdout(broken_pipe())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn vubd");
        let status = common::daemon::wait_bounded(&mut child).expect("vubd exits");
        let mut stderr = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut stderr)
            .expect("read stderr");
        assert_eq!(
            status.code(),
            Some(0),
            "vubd {arg} into a closed pipe: {status}; stderr:\n{stderr}"
        );
        assert!(stderr.is_empty(), "vubd {arg} stderr:\n{stderr}");
    }
}

#[test]
fn a_closed_stdout_does_not_stop_vubd_from_serving() {
    let image = Image::new(MIB);
    let dir = tempfile::tempdir().expect("create test directory");
    let socket = dir.path().join("vubd.sock");
    let stderr = dir.path().join("stderr.log");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_vubd"))
        .args([OsStr::new("--socket-path"), socket.as_os_str()])
        .args([OsStr::new("--disk"), image.path().as_os_str()])
        .stdin(std::process::Stdio::null())
        .stdout(broken_pipe())
        .stderr(fs::File::create(&stderr).expect("create stderr log"))
        .spawn()
        .expect("spawn vubd");
    // The start-up banner goes out once every device is ready; past that, vubd serves.
    let log = || fs::read_to_string(&stderr).unwrap_or_default();
    let deadline = std::time::Instant::now() + common::TIMEOUT;
    while !log().contains("ready device=0") && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    std::thread::sleep(std::time::Duration::from_millis(200));
    let ready = log().contains("ready device=0") && socket_exists(&socket);
    let alive = child.try_wait().expect("poll vubd").is_none();
    // SAFETY: kill(2) has no memory-safety preconditions; the child is not reaped yet.
    unsafe {
        libc::kill(
            libc::pid_t::try_from(child.id()).expect("pid"),
            libc::SIGTERM,
        )
    };
    let status = common::daemon::wait_bounded(&mut child).expect("vubd exits on SIGTERM");
    let log = log();
    assert!(
        ready && alive,
        "vubd did not serve with a closed stdout:\n{log}"
    );
    assert_eq!(status.code(), Some(0), "exit status {status}:\n{log}");
    assert!(!log.contains("panicked"), "vubd panicked:\n{log}");
}
