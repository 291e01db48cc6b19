//! Running the backend under test: the [`Daemon`] guard for a backend serving a socket, the
//! process helpers behind it, and [`run_vubd`] for vubd runs that are expected to exit.

use std::ffi::{OsStr, OsString};
use std::fmt::Write as _;
use std::fs::{self, File};
use std::io;
use std::os::fd::RawFd;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::client::{Client, ClientOptions};
use super::{Image, TIMEOUT, procfs};

/// Backend settings. The reference backend understands `num_queues` and `readonly`; the rest
/// are vubd's own, and [`Daemon::start_with`] refuses them when it would start the reference.
#[derive(Debug, Clone, Default)]
pub struct DaemonConfig {
    pub num_queues: Option<u16>,
    pub readonly: bool,
    /// vubd only: `--poll` (and `--poll-idle-us`); vubd's default (adaptive) when `None`.
    pub poll: Option<PollMode>,
    /// vubd only: `--cpus`, the CPUs to run one pinned poller each on.
    pub cpus: Option<Vec<usize>>,
    /// vubd only: the CPUs the vubd process may run on, set before it starts; vubd counts
    /// them as the machine's CPUs. Inherited from the tests when `None`.
    pub affinity: Option<Vec<usize>>,
}

impl DaemonConfig {
    fn has_vubd_only_settings(&self) -> bool {
        self.poll.is_some() || self.cpus.is_some() || self.affinity.is_some()
    }
}

/// How vubd's pollers wait for work (`--poll`, `--poll-idle-us`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PollMode {
    /// `--poll always`: busy-poll, a full CPU per poller.
    Always,
    /// `--poll adaptive`: poll while busy and `idle_us` (`--poll-idle-us`, vubd's default when
    /// `None`) after the last request, then sleep.
    Adaptive { idle_us: Option<u32> },
    /// `--poll never`: sleep whenever there is no work.
    Never,
}

impl PollMode {
    fn args(self) -> Vec<OsString> {
        let (mode, idle_us) = match self {
            Self::Always => ("always", None),
            Self::Adaptive { idle_us } => ("adaptive", idle_us),
            Self::Never => ("never", None),
        };
        let mut args: Vec<OsString> = vec!["--poll".into(), mode.into()];
        if let Some(us) = idle_us {
            args.extend(["--poll-idle-us".into(), us.to_string().into()]);
        }
        args
    }
}

impl std::fmt::Display for PollMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let args = self.args();
        let args: Vec<_> = args.iter().map(|a| a.to_string_lossy()).collect();
        f.write_str(&args.join(" "))
    }
}

/// `0,1` for `--cpus`.
fn cpu_list(cpus: &[usize]) -> String {
    let cpus: Vec<String> = cpus.iter().map(ToString::to_string).collect();
    cpus.join(",")
}

/// Which program [`Daemon::start`] runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backend {
    Vubd,
    QemuStorageDaemon,
}

const BACKEND_ENV: &str = "VUBD_TEST_BACKEND";

/// Whether `VUBD_TEST_BACKEND` selects QEMU's reference backend (qemu-storage-daemon).
pub fn reference_backend_selected() -> bool {
    selected_backend() == Backend::QemuStorageDaemon
}

fn selected_backend() -> Backend {
    match std::env::var(BACKEND_ENV).as_deref() {
        Err(std::env::VarError::NotPresent) | Ok("" | "vubd") => Backend::Vubd,
        Ok("qemu-storage-daemon") => Backend::QemuStorageDaemon,
        other => panic!("{BACKEND_ENV}={other:?}: expected vubd or qemu-storage-daemon"),
    }
}

/// A command for the vubd binary under test.
pub fn vubd_command() -> Command {
    Command::new(env!("CARGO_BIN_EXE_vubd"))
}

fn vubd_args(disk: &Path, socket: &Path, config: &DaemonConfig) -> Vec<OsString> {
    let mut args: Vec<OsString> = vec![
        "--socket-path".into(),
        socket.into(),
        "--disk".into(),
        disk.into(),
    ];
    if config.readonly {
        args.push("--readonly".into());
    }
    if let Some(n) = config.num_queues {
        args.extend(["--num-queues".into(), n.to_string().into()]);
    }
    if let Some(poll) = config.poll {
        args.extend(poll.args());
    }
    if let Some(cpus) = &config.cpus {
        args.extend(["--cpus".into(), cpu_list(cpus).into()]);
    }
    args
}

/// Whether a busy-polling daemon of this test binary is running: they run one at a time.
static BUSY_POLLING: AtomicBool = AtomicBool::new(false);

/// The turn of one busy-polling daemon; the next one may start once it is dropped.
#[derive(Debug)]
struct BusyPollTurn;

impl Drop for BusyPollTurn {
    fn drop(&mut self) {
        BUSY_POLLING.store(false, Ordering::Release);
    }
}

/// For a vubd that busy-polls (`--poll always`), waits for the other busy-polling daemons of
/// this test binary to be gone and returns the turn that keeps the next ones waiting until
/// this one is gone too. Each such daemon keeps up to one CPU per poller busy as long as a
/// frontend is connected: several at once on a small machine would starve each other and
/// every test running beside them. The wait is bounded, generously, since tests queue here.
fn busy_poll_turn(config: &DaemonConfig) -> Option<BusyPollTurn> {
    if config.poll != Some(PollMode::Always) {
        return None;
    }
    let patience = 6 * TIMEOUT;
    let deadline = Instant::now() + patience;
    while BUSY_POLLING
        .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
        .is_err()
    {
        assert!(
            Instant::now() < deadline,
            "another busy-polling vubd of this test binary ran for more than {patience:?}"
        );
        thread::sleep(Duration::from_millis(5));
    }
    Some(BusyPollTurn)
}

/// A command for vubd serving `disk` on `socket` as `config` says.
fn vubd_process(disk: &Path, socket: &Path, config: &DaemonConfig) -> Command {
    let mut cmd = vubd_command();
    cmd.args(vubd_args(disk, socket, config));
    if let Some(cpus) = &config.affinity {
        restrict_to_cpus(&mut cmd, cpus);
    }
    cmd
}

/// Makes `cmd` run on `cpus` only (sched_setaffinity(2) between fork and exec).
pub fn restrict_to_cpus(cmd: &mut Command, cpus: &[usize]) {
    // SAFETY: cpu_set_t is plain data, for which all zeros is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &cpu in cpus {
        assert!(
            cpu < 8 * std::mem::size_of::<libc::cpu_set_t>(),
            "CPU {cpu} is beyond cpu_set_t"
        );
        // SAFETY: `set` is a live cpu_set_t and `cpu` is within it (checked above).
        unsafe { libc::CPU_SET(cpu, &mut set) };
    }
    // SAFETY: the hook runs in the child between fork and exec, where only async-signal-safe
    // calls are allowed: it makes one system call on a mask built beforehand (moved into the
    // closure), and neither allocates nor takes a lock.
    unsafe {
        cmd.pre_exec(move || {
            if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) == 0 {
                Ok(())
            } else {
                Err(io::Error::last_os_error())
            }
        });
    }
}

/// Makes the child of `cmd` inherit `fd` (open in this process until `cmd` spawns) as its fd
/// `target`, open across exec.
pub fn inherit_fd(cmd: &mut Command, fd: RawFd, target: RawFd) {
    // SAFETY: the hook runs in the child between fork and exec, where only async-signal-safe
    // calls are allowed: one dup2 or fcntl on numbers copied into the closure; it neither
    // allocates nor takes a lock. dup2 onto the same number would leave close-on-exec set, so
    // then the flag is cleared on `fd` itself.
    unsafe {
        cmd.pre_exec(move || {
            let rc = if fd == target {
                libc::fcntl(fd, libc::F_SETFD, 0)
            } else {
                libc::dup2(fd, target)
            };
            if rc < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(())
            }
        });
    }
}

/// Whether qemu-storage-daemon takes QEMU's image locks (`locking=` of its `file` driver).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Locking {
    On,
    Off,
}

fn qemu_storage_daemon_command(
    disk: &Path,
    socket: &Path,
    config: &DaemonConfig,
    locking: Locking,
) -> Command {
    assert!(
        !config.has_vubd_only_settings(),
        "{config:?} has settings only vubd understands: start vubd itself (Daemon::vubd)"
    );
    fn qemu_path(path: &Path) -> String {
        // QEMU option values escape a comma by doubling it.
        path.to_str()
            .expect("temporary paths are UTF-8")
            .replace(',', ",,")
    }
    let read_only = if config.readonly { "on" } else { "off" };
    // QEMU's `file` driver refuses block devices; `host_device` is the one for them.
    let is_block_device = fs::metadata(disk).is_ok_and(|m| m.file_type().is_block_device());
    let driver = if is_block_device {
        "host_device"
    } else {
        "file"
    };
    let mut cmd = Command::new("qemu-storage-daemon");
    let locking = match locking {
        Locking::On => "auto",
        Locking::Off => "off",
    };
    cmd.arg("--blockdev").arg(format!(
        "driver={driver},filename={},node-name=disk0,discard=unmap,read-only={read_only},locking={locking}",
        qemu_path(disk)
    ));
    let mut export = format!(
        "type=vhost-user-blk,id=export0,node-name=disk0,addr.type=unix,addr.path={},writable={}",
        qemu_path(socket),
        if config.readonly { "off" } else { "on" },
    );
    if let Some(n) = config.num_queues {
        write!(export, ",num-queues={n}").expect("write to String");
    }
    cmd.arg("--export").arg(export);
    cmd
}

/// A running backend serving one image on a socket in a private directory. Dropping it sends
/// SIGTERM (SIGKILL if that is not enough); if the test is failing it prints the backend's
/// output.
#[derive(Debug)]
pub struct Daemon {
    child: Child,
    name: String,
    socket: PathBuf,
    output: PathBuf,
    /// Holds the socket (usually) and the output log; removed on drop.
    dir: TempDir,
    /// Held by a busy-polling vubd (see [`busy_poll_turn`]) and released after the drop
    /// handler has stopped it, like every field.
    busy_poll: Option<BusyPollTurn>,
}

impl Daemon {
    /// Starts the selected backend (vubd unless `VUBD_TEST_BACKEND` says otherwise) with default
    /// settings.
    pub fn start(image: &Image) -> Self {
        Self::start_with(image, &DaemonConfig::default())
    }

    /// Starts the selected backend (vubd unless `VUBD_TEST_BACKEND` says otherwise).
    pub fn start_with(image: &Image, config: &DaemonConfig) -> Self {
        Self::start_disk(image.path(), config)
    }

    /// Starts the selected backend (vubd unless `VUBD_TEST_BACKEND` says otherwise) on `disk`,
    /// a regular file or a block device.
    pub fn start_disk(disk: &Path, config: &DaemonConfig) -> Self {
        let dir = tempfile::tempdir().expect("create daemon directory");
        let socket = dir.path().join("vhost-user-blk.sock");
        match selected_backend() {
            Backend::Vubd => {
                let turn = busy_poll_turn(config);
                let cmd = vubd_process(disk, &socket, config);
                Self::spawn(cmd, "vubd", dir, socket).holding(turn)
            }
            Backend::QemuStorageDaemon => {
                let cmd = qemu_storage_daemon_command(disk, &socket, config, Locking::On);
                Self::spawn(cmd, "qemu-storage-daemon", dir, socket)
            }
        }
    }

    /// Starts qemu-storage-daemon (whatever `VUBD_TEST_BACKEND` says) on `disk` without QEMU's
    /// image locks, serving `socket`: for tests in which two backends open one image at once,
    /// such as the source and the destination of a live migration.
    pub fn qemu_storage_daemon_unlocked(disk: &Path, socket: &Path, config: &DaemonConfig) -> Self {
        let dir = tempfile::tempdir().expect("create daemon directory");
        let cmd = qemu_storage_daemon_command(disk, socket, config, Locking::Off);
        Self::spawn(cmd, "qemu-storage-daemon", dir, socket.to_owned())
    }

    /// Starts vubd (whatever `VUBD_TEST_BACKEND` says) with the usual arguments plus `extra`.
    pub fn vubd(image: &Image, config: &DaemonConfig, extra: &[&OsStr]) -> Self {
        Self::vubd_disk(image.path(), config, extra)
    }

    /// Starts vubd (whatever `VUBD_TEST_BACKEND` says) on `disk`, a regular file or a block
    /// device, with the usual arguments plus `extra`.
    pub fn vubd_disk(disk: &Path, config: &DaemonConfig, extra: &[&OsStr]) -> Self {
        let dir = tempfile::tempdir().expect("create daemon directory");
        let socket = dir.path().join("vhost-user-blk.sock");
        let turn = busy_poll_turn(config);
        let mut cmd = vubd_process(disk, &socket, config);
        cmd.args(extra);
        Self::spawn(cmd, "vubd", dir, socket).holding(turn)
    }

    /// Starts vubd (whatever `VUBD_TEST_BACKEND` says) with `config`, its pollers in `mode`.
    pub fn vubd_polling(mode: PollMode, image: &Image, config: &DaemonConfig) -> Self {
        let config = DaemonConfig {
            poll: Some(mode),
            ..config.clone()
        };
        Self::vubd(image, &config, &[])
    }

    /// Starts vubd on a null disk (`--disk null:SIZE`, `size` as the command line takes it:
    /// `4k`, `16G`, `1536`), which completes every request at once and stores nothing.
    pub fn vubd_null(size: &str, config: &DaemonConfig) -> Self {
        Self::vubd_disk(Path::new(&format!("null:{size}")), config, &[])
    }

    /// Starts vubd with exactly `args` and waits until it listens on `socket`.
    pub fn vubd_with_args(args: &[&OsStr], socket: &Path) -> Self {
        let mut cmd = vubd_command();
        cmd.args(args);
        Self::vubd_from(cmd, socket)
    }

    /// Starts `cmd`, a [`vubd_command`] with its arguments (and whatever else it needs, such
    /// as [`inherit_fd`]), and waits until vubd listens on `socket`.
    pub fn vubd_from(cmd: Command, socket: &Path) -> Self {
        Self::backend_from(cmd, "vubd", socket)
    }

    /// Starts `cmd`, the backend `name` with its arguments, and waits until it listens on
    /// `socket`.
    pub fn backend_from(cmd: Command, name: &str, socket: &Path) -> Self {
        let dir = tempfile::tempdir().expect("create daemon directory");
        Self::spawn(cmd, name, dir, socket.to_owned())
    }

    /// Starts `cmd`, a vubd `--incoming` whose socket path another process still serves (or one
    /// that gives its socket a mode or group: `--socket-mode`, `--socket-group`), and waits
    /// until it listens under the name it binds beside the path (`PATH.PID`, renamed over
    /// `PATH` at once: its connections show that name in /proc/net/unix).
    pub fn taking_over(cmd: Command, name: &str, socket: &Path) -> Self {
        let dir = tempfile::tempdir().expect("create daemon directory");
        let mut daemon = Self::start_process(cmd, name, dir, socket.to_owned());
        daemon.socket = Self::bound_beside(socket, daemon.pid());
        daemon.wait_for_socket();
        daemon.socket = socket.to_owned();
        daemon
    }

    /// The name a vubd of process `pid` taking `socket` over binds before renaming it.
    pub fn bound_beside(socket: &Path, pid: u32) -> PathBuf {
        let mut name = socket.as_os_str().to_owned();
        name.push(format!(".{pid}"));
        name.into()
    }

    fn spawn(cmd: Command, name: &str, dir: TempDir, socket: PathBuf) -> Self {
        let mut daemon = Self::start_process(cmd, name, dir, socket);
        daemon.wait_for_socket();
        daemon
    }

    fn start_process(mut cmd: Command, name: &str, dir: TempDir, socket: PathBuf) -> Self {
        let output = dir.path().join("output.log");
        let log = File::create(&output).expect("create output log");
        let log2 = log.try_clone().expect("clone output log");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        Self {
            child,
            name: name.to_owned(),
            socket,
            output,
            dir,
            busy_poll: None,
        }
    }

    fn holding(mut self, busy_poll: Option<BusyPollTurn>) -> Self {
        self.busy_poll = busy_poll;
        self
    }

    /// Waits until the backend listens on its socket: a connect between its bind(2), which
    /// creates the socket file, and its listen(2) would be refused.
    fn wait_for_socket(&mut self) {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if socket_listening(&self.socket) {
                return;
            }
            if let Some(status) = self.child.try_wait().expect("poll daemon") {
                panic!(
                    "{} exited with {status} before listening on {}:\n{}",
                    self.name,
                    self.socket.display(),
                    self.output()
                );
            }
            assert!(
                Instant::now() < deadline,
                "{} did not listen on {} within {TIMEOUT:?}",
                self.name,
                self.socket.display()
            );
            thread::sleep(Duration::from_millis(5));
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// CPU time the backend has used so far, all threads together (see [`procfs::cpu_time`]).
    pub fn cpu_time(&self) -> Duration {
        procfs::cpu_time(self.pid())
    }

    /// Everything the backend wrote to stdout and stderr so far.
    pub fn output(&self) -> String {
        fs::read_to_string(&self.output).unwrap_or_else(|e| format!("<output unreadable: {e}>"))
    }

    /// Fails the test if the backend has exited.
    #[track_caller]
    pub fn assert_running(&mut self) {
        if let Some(status) = self.child.try_wait().expect("poll daemon") {
            panic!(
                "{} exited unexpectedly with {status}:\n{}",
                self.name,
                self.output()
            );
        }
    }

    /// Sends SIGTERM and waits (bounded) for the backend to exit.
    pub fn terminate(&mut self) -> ExitStatus {
        self.assert_running();
        send_signal(&self.child, libc::SIGTERM).expect("send SIGTERM");
        wait_bounded(&mut self.child).unwrap_or_else(|| {
            let _ = self.child.kill();
            let _ = self.child.wait();
            panic!(
                "{} still running {TIMEOUT:?} after SIGTERM:\n{}",
                self.name,
                self.output()
            )
        })
    }

    /// Kills the backend with SIGKILL, as a crash would, and waits (bounded) until it is gone:
    /// its socket file stays behind, and nothing of it runs any more.
    pub fn kill(&mut self) -> ExitStatus {
        self.assert_running();
        send_signal(&self.child, libc::SIGKILL).expect("send SIGKILL");
        wait_bounded(&mut self.child)
            .unwrap_or_else(|| panic!("{} still running {TIMEOUT:?} after SIGKILL", self.name))
    }

    /// Stops every thread of the backend (SIGSTOP) and waits until all are stopped, so that
    /// the memory it shares holds what it wrote up to one instant; [`Daemon::thaw`] resumes
    /// it, [`Daemon::kill`] ends it there.
    pub fn freeze(&mut self) {
        send_signal(&self.child, libc::SIGSTOP).expect("send SIGSTOP");
        let pid = libc::pid_t::try_from(self.child.id()).expect("pid fits pid_t");
        let mut status = 0;
        // SAFETY: waitpid(2) on our own child, not reaped (`send_signal` just reached it), with
        // a status pointer to a live local. WUNTRACED reports the stop once every thread has
        // stopped; it reaps the child only if it exited instead, which fails the test here.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WUNTRACED) };
        assert!(
            r == pid && libc::WIFSTOPPED(status),
            "{} did not stop (waitpid {r}, status {status:#x}):\n{}",
            self.name,
            self.output()
        );
    }

    /// Resumes a backend stopped by [`Daemon::freeze`].
    pub fn thaw(&mut self) {
        send_signal(&self.child, libc::SIGCONT).expect("send SIGCONT");
    }

    /// Connects a frontend with `num_queues` queues, failing the test on error.
    pub fn connect(&self, num_queues: usize) -> Client {
        self.connect_with(&ClientOptions::queues(num_queues))
    }

    /// Connects a frontend, failing the test on error.
    pub fn connect_with(&self, options: &ClientOptions) -> Client {
        self.try_connect(options).unwrap_or_else(|e| {
            panic!(
                "connect to {} with {options:?}: {e} ({})\n{} output:\n{}",
                self.socket.display(),
                e.errno(),
                self.name,
                self.output()
            )
        })
    }

    /// Connects a frontend and returns libblkio's error if that fails.
    pub fn try_connect(&self, options: &ClientOptions) -> Result<Client, blkio::Error> {
        Client::connect(&self.socket, options)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let stopped = send_signal(&self.child, libc::SIGTERM).is_ok()
                && wait_bounded(&mut self.child).is_some();
            if !stopped {
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }
        if thread::panicking() {
            eprintln!(
                "---- {} output ----\n{}---- end of {} output ----",
                self.name,
                self.output(),
                self.name
            );
        }
    }
}

/// Whether `path` exists as a socket file.
pub fn socket_exists(path: &Path) -> bool {
    fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket())
}

/// Whether a unix socket bound to `path` (as given to bind(2)) is listening, from
/// `/proc/net/unix` (columns `Num RefCount Protocol Flags Type St Inode Path`; `Flags` has
/// `__SO_ACCEPTCON` set once the socket listens). Connecting to find out would start a session
/// with the backend.
pub fn socket_listening(path: &Path) -> bool {
    const SO_ACCEPTCON: u32 = 1 << 16;
    let table =
        fs::read_to_string("/proc/net/unix").unwrap_or_else(|e| panic!("read /proc/net/unix: {e}"));
    let suffix = format!(" {}", path.display());
    table.lines().skip(1).any(|line| {
        line.ends_with(&suffix)
            && line
                .split_whitespace()
                .nth(3)
                .and_then(|flags| u32::from_str_radix(flags, 16).ok())
                .is_some_and(|flags| flags & SO_ACCEPTCON != 0)
    })
}

/// Whether a frontend is connected to the unix socket bound to `path`, from `/proc/net/unix`:
/// a socket the listener accepted carries the listener's path and is in state 03 (connected).
pub fn socket_connected(path: &Path) -> bool {
    let table =
        fs::read_to_string("/proc/net/unix").unwrap_or_else(|e| panic!("read /proc/net/unix: {e}"));
    let suffix = format!(" {}", path.display());
    table
        .lines()
        .skip(1)
        .any(|line| line.ends_with(&suffix) && line.split_whitespace().nth(5) == Some("03"))
}

fn send_signal(child: &Child, signal: libc::c_int) -> io::Result<()> {
    let pid = libc::pid_t::try_from(child.id()).expect("pid fits pid_t");
    // SAFETY: kill(2) has no memory-safety preconditions. `child` has not been reaped (callers
    // check with try_wait first), so its pid cannot have been reused by another process.
    if unsafe { libc::kill(pid, signal) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Waits up to [`TIMEOUT`] for `child` to exit; `None` if it did not (or cannot be polled).
pub fn wait_bounded(child: &mut Child) -> Option<ExitStatus> {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) => {}
            Err(_) => return None,
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(5));
    }
}

/// How a short-lived vubd run ended.
#[derive(Debug)]
pub struct Exit {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// Runs vubd with `args` and waits (bounded) for it to exit on its own; fails the test if it is
/// still running after [`TIMEOUT`] (for a bad argument, that means it was accepted).
pub fn run_vubd(args: &[&OsStr]) -> Exit {
    run_vubd_with(vubd_command(), args)
}

/// Like [`run_vubd`], with a prepared command (for example one that drops privileges).
pub fn run_vubd_with(mut cmd: Command, args: &[&OsStr]) -> Exit {
    let dir = tempfile::tempdir().expect("create output directory");
    let stderr_path = dir.path().join("stderr.log");
    let stdout_path = dir.path().join("stdout.log");
    let stderr = File::create(&stderr_path).expect("create stderr log");
    let stdout = File::create(&stdout_path).expect("create stdout log");
    let mut child = cmd
        .args(args)
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        .spawn()
        .expect("spawn vubd");
    let status = wait_bounded(&mut child).unwrap_or_else(|| {
        let _ = child.kill();
        let _ = child.wait();
        panic!(
            "vubd {args:?} still running after {TIMEOUT:?}; stderr:\n{}",
            fs::read_to_string(&stderr_path).unwrap_or_default()
        )
    });
    let stderr = fs::read_to_string(&stderr_path).expect("read stderr log");
    let stdout = fs::read_to_string(&stdout_path).expect("read stdout log");
    Exit {
        status,
        stdout,
        stderr,
    }
}
