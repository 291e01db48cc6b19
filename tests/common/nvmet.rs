//! A Linux kernel NVMe/TCP target (nvmet + nvmet-tcp) in a QEMU guest, for NVMe/TCP initiator
//! tests: [`NvmetTarget::start`] runs `qemu/nvmet-target.sh` and waits until the target listens;
//! the initiator connects to [`NvmetTarget::addr`] (127.0.0.1, forwarded by QEMU's user network
//! to port 4420 in the guest). [`NvmetTarget::stop_guest`] and [`NvmetTarget::cont_guest`]
//! pause and resume the whole guest over QMP: a target that stalls, or vanishes for a while.
//! With [`NvmetOptions::resizable`], [`NvmetTarget::resize_namespace`] changes a namespace's
//! size in the guest, and nvmet tells its hosts. Dropping the target stops QEMU.
//!
//! The guest runs under TCG (no KVM), so it takes a few seconds to boot; start one target per
//! test binary where possible and run the steps in one test. The target belongs to the thread
//! that started it: when that thread ends, the guest is stopped (a safety net for a test
//! process that dies without unwinding), so it cannot be kept in a static shared by tests.
//!
//! Readiness comes from the guest's console line `NVMET-READY ...`, not from connecting: QEMU's
//! user network accepts a TCP connection on the forwarded port before the guest listens.

use std::fmt::Write as _;
use std::fs;
use std::io::Write as _;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::daemon::wait_bounded;
use super::lab::stop_with_parent_thread;
use super::qmp::Qmp;

/// The NQN of the discovery subsystem, which every nvmet port serves.
pub const DISCOVERY_NQN: &str = "nqn.2014-08.org.nvmexpress.discovery";

/// The subsystem NQN a target gets unless told otherwise.
pub const DEFAULT_NQN: &str = "nqn.2014-08.org.vubd:test";

/// How long a target may take from start to its ready line. A boot takes a few seconds under
/// TCG on an idle machine; this leaves room for a loaded one.
pub const READY_TIMEOUT: Duration = Duration::from_secs(120);

/// How long building the guest's initramfs may take, a kernel download included (on a machine
/// whose lab cache is empty).
const BUILD_TIMEOUT: Duration = Duration::from_secs(600);

/// How long the guest may take to resize a namespace and answer (TCG, a loaded machine).
const RESIZE_TIMEOUT: Duration = Duration::from_secs(60);

/// How often to retry with another port when QEMU cannot forward the one picked (another
/// process took it between the pick and QEMU's bind).
const PORT_ATTEMPTS: usize = 3;

/// What `qemu/nvmet-target.sh` is asked for.
#[derive(Debug, Clone)]
pub struct NvmetOptions {
    /// The subsystem's NQN.
    pub nqn: String,
    /// Number of namespaces, NSIDs `1..=namespaces` (1 to 32).
    pub namespaces: u32,
    /// Size of each namespace in MiB.
    pub ns_size_mib: u64,
    /// Logical block size of the namespaces: 512 or 4096.
    pub block_size: u32,
    /// `Some(nqn)`: only this host NQN may connect; `None`: any host may.
    pub allow_host: Option<String>,
    /// Namespaces that can change size ([`NvmetTarget::resize_namespace`]): loop devices over
    /// files in the guest's memory instead of null_blk devices; 512-byte blocks only.
    pub resizable: bool,
    /// Guest memory in MiB; the script's default (512) when `None`. The namespaces live in it.
    pub memory_mib: Option<u64>,
    /// Upper bound of the guest's life, boot included: QEMU is stopped after it even if the
    /// target is never dropped.
    pub lifetime: Duration,
}

impl Default for NvmetOptions {
    fn default() -> Self {
        Self {
            nqn: DEFAULT_NQN.to_owned(),
            namespaces: 1,
            ns_size_mib: 64,
            block_size: 512,
            allow_host: None,
            resizable: false,
            memory_mib: None,
            lifetime: Duration::from_secs(600),
        }
    }
}

/// A running target. Dropping it stops QEMU (SIGTERM to `run-guest.sh`, which stops QEMU;
/// SIGKILL if that does not do) and, on a failing test, prints the guest's console.
#[derive(Debug)]
pub struct NvmetTarget {
    /// `run-guest.sh`, which `nvmet-target.sh` becomes; QEMU runs below it.
    child: Child,
    port: u16,
    options: NvmetOptions,
    /// The `NVMET-READY` line.
    ready_line: String,
    /// Time from spawning the script to the ready line.
    boot_time: Duration,
    /// The guest's second serial port, for resizable namespaces.
    control: Option<UnixStream>,
    /// Holds the console log, the script's output, the QMP socket and QEMU's pid file.
    dir: TempDir,
}

fn lab_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("qemu")
}

fn target_script() -> PathBuf {
    lab_dir().join("nvmet-target.sh")
}

/// The target's initramfs, built once per test process (and again by the next process, so that
/// changes to the lab scripts take effect). The result, or why there is none, is shared by all
/// targets of the process.
fn initramfs() -> &'static Path {
    static INITRAMFS: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    match INITRAMFS.get_or_init(build_initramfs) {
        Ok(path) => path,
        Err(e) => panic!("cannot build the nvmet target's initramfs: {e}"),
    }
}

fn build_initramfs() -> Result<PathBuf, String> {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let path = dir.join("nvmet-target.cpio.gz");
    // Built under a name of this process, then renamed into place: test processes running at
    // the same time each replace the file whole, with the same contents.
    let own = dir.join(format!("nvmet-target.{}.cpio.gz", std::process::id()));
    let log = dir.join(format!("nvmet-target.{}.build.log", std::process::id()));
    let out = fs::File::create(&log).map_err(|e| format!("create {}: {e}", log.display()))?;
    let err = out
        .try_clone()
        .map_err(|e| format!("clone {}: {e}", log.display()))?;
    let mut child = Command::new(target_script())
        .arg("--build-initrd")
        .arg(&own)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .map_err(|e| format!("run {}: {e}", target_script().display()))?;
    let status = wait_for(&mut child, BUILD_TIMEOUT);
    let output = fs::read_to_string(&log).unwrap_or_default();
    let _ = fs::remove_file(&log);
    match status {
        Some(status) if status.success() => {}
        Some(status) => return Err(format!("build exited with {status}:\n{output}")),
        None => {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!(
                "build still running after {BUILD_TIMEOUT:?}:\n{output}"
            ));
        }
    }
    fs::rename(&own, &path).map_err(|e| format!("rename {}: {e}", own.display()))?;
    Ok(path)
}

/// Waits up to `limit` for `child` to exit; `None` if it did not.
fn wait_for(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
fn free_port() -> u16 {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local address").port()
}

/// How a start attempt ended, if not with a running target.
enum StartError {
    /// QEMU could not forward the port: try another one.
    PortTaken(String),
    Failed(String),
}

impl NvmetTarget {
    /// Starts a target as `options` says and waits (up to [`READY_TIMEOUT`]) until it listens.
    /// Fails the test, with the guest's console, when it does not come up.
    pub fn start(options: &NvmetOptions) -> Self {
        let initrd = initramfs();
        let mut failures = String::new();
        for attempt in 1..=PORT_ATTEMPTS {
            match Self::try_start(options, initrd, free_port()) {
                Ok(target) => return target,
                Err(StartError::PortTaken(why)) => {
                    writeln!(failures, "attempt {attempt}: {why}").expect("write to String");
                }
                Err(StartError::Failed(why)) => panic!("nvmet target did not start: {why}"),
            }
        }
        panic!(
            "nvmet target did not start: no forwardable port in {PORT_ATTEMPTS} attempts:\n{failures}"
        )
    }

    fn try_start(options: &NvmetOptions, initrd: &Path, port: u16) -> Result<Self, StartError> {
        let dir = tempfile::tempdir().expect("create nvmet target directory");
        let output = dir.path().join("output.log");
        let out = fs::File::create(&output).expect("create output log");
        let err = out.try_clone().expect("clone output log");
        let mut cmd = Command::new(target_script());
        cmd.arg("--initrd")
            .arg(initrd)
            .args(["--port", &port.to_string()])
            .args(["--nqn", &options.nqn])
            .args(["--namespaces", &options.namespaces.to_string()])
            .args(["--ns-size", &options.ns_size_mib.to_string()])
            .args(["--block-size", &options.block_size.to_string()])
            .args(["--timeout", &options.lifetime.as_secs().max(1).to_string()])
            .arg("--qmp")
            .arg(dir.path().join("qmp.sock"))
            .arg("--pidfile")
            .arg(dir.path().join("qemu.pid"))
            .arg("--log")
            .arg(dir.path().join("console.log"))
            .arg("--no-echo");
        if let Some(host) = &options.allow_host {
            cmd.args(["--allow-host", host]);
        }
        if let Some(mib) = options.memory_mib {
            cmd.args(["--memory", &format!("{mib}M")]);
        }
        if options.resizable {
            cmd.arg("--resizable")
                .arg("--control")
                .arg(dir.path().join("control.sock"));
        }
        stop_with_parent_thread(&mut cmd);
        let started = Instant::now();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", target_script().display()));
        let mut target = Self {
            child,
            port,
            options: options.clone(),
            ready_line: String::new(),
            boot_time: Duration::ZERO,
            control: None,
            dir,
        };
        target.ready_line = target.wait_ready()?;
        target.boot_time = started.elapsed();
        target.check_ready_line();
        if options.resizable {
            // QEMU listens from its start; the guest reads the port before its ready line.
            let path = target.dir.path().join("control.sock");
            let stream = UnixStream::connect(&path).map_err(|e| {
                StartError::Failed(format!(
                    "connect {}: {e}\n{}",
                    path.display(),
                    target.logs()
                ))
            })?;
            target.control = Some(stream);
        }
        Ok(target)
    }

    /// Waits for the console's `NVMET-READY` line and returns it.
    fn wait_ready(&mut self) -> Result<String, StartError> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let console = self.console();
            // Whole lines only: QEMU may be in the middle of writing the last one.
            if let Some(line) = console
                .split_inclusive('\n')
                .filter(|l| l.ends_with('\n'))
                .find_map(|l| {
                    l.find("NVMET-READY ")
                        .map(|at| l[at..].trim_end().to_owned())
                })
            {
                return Ok(line);
            }
            if console.contains("nvmet: FAIL ") {
                return Err(StartError::Failed(format!(
                    "the guest could not set up the target\n{}",
                    self.logs()
                )));
            }
            if let Some(status) = self.child.try_wait().expect("poll nvmet-target.sh") {
                let why = format!("nvmet-target.sh exited with {status}\n{}", self.logs());
                let port_taken = self.output().contains("Could not set up host forwarding");
                return Err(if port_taken {
                    StartError::PortTaken(why)
                } else {
                    StartError::Failed(why)
                });
            }
            if Instant::now() >= deadline {
                return Err(StartError::Failed(format!(
                    "no NVMET-READY line within {READY_TIMEOUT:?}\n{}",
                    self.logs()
                )));
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Fails the test if the ready line does not describe what was asked for.
    fn check_ready_line(&self) {
        let o = &self.options;
        let allow = o.allow_host.as_deref().unwrap_or("any");
        let expected = format!(
            "NVMET-READY port=4420 host_port={} nqn={} namespaces={} ns_mib={} block_size={} allow={allow}",
            self.port, o.nqn, o.namespaces, o.ns_size_mib, o.block_size
        );
        assert_eq!(self.ready_line, expected, "unexpected ready line");
    }

    /// The target's address on the host: `127.0.0.1:port`.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, self.port))
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The subsystem's NQN.
    pub fn nqn(&self) -> &str {
        &self.options.nqn
    }

    pub fn options(&self) -> &NvmetOptions {
        &self.options
    }

    /// The guest's `NVMET-READY ...` line.
    pub fn ready_line(&self) -> &str {
        &self.ready_line
    }

    /// How long the target took from start to ready.
    pub fn boot_time(&self) -> Duration {
        self.boot_time
    }

    /// The guest's serial console so far.
    pub fn console(&self) -> String {
        let bytes = fs::read(self.dir.path().join("console.log")).unwrap_or_default();
        String::from_utf8_lossy(&bytes).replace('\r', "")
    }

    /// What the lab scripts (and QEMU) wrote on stdout and stderr so far.
    pub fn output(&self) -> String {
        fs::read_to_string(self.dir.path().join("output.log"))
            .unwrap_or_else(|e| format!("<output unreadable: {e}>"))
    }

    fn logs(&self) -> String {
        format!(
            "---- guest console ----\n{}\n---- nvmet-target.sh output ----\n{}---- end ----",
            self.console(),
            self.output()
        )
    }

    /// QEMU's pid, from its pid file, if it is still a running QEMU.
    fn qemu_pid(&self) -> Option<libc::pid_t> {
        let text = fs::read_to_string(self.dir.path().join("qemu.pid")).ok()?;
        let pid: libc::pid_t = text.trim().parse().ok()?;
        let comm = fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
        comm.starts_with("qemu-system").then_some(pid)
    }

    /// Fails the test if QEMU is gone.
    #[track_caller]
    pub fn assert_running(&mut self) {
        if let Some(status) = self.child.try_wait().expect("poll nvmet-target.sh") {
            panic!("the nvmet guest ended with {status}\n{}", self.logs());
        }
    }

    /// Changes namespace `nsid`'s size to `mib` MiB in the guest (its file and loop device)
    /// and has nvmet take it (`revalidate_size`), which sends its hosts a namespace attribute
    /// notice; returns once the guest says it is done. Only with [`NvmetOptions::resizable`].
    pub fn resize_namespace(&mut self, nsid: u32, mib: u64) {
        let done = format!("NVMET-RESIZED nsid={nsid} mib={mib}");
        let before = self.console().matches(&done).count();
        let failures = self.console().matches("nvmet: FAIL").count();
        let control = self
            .control
            .as_mut()
            .expect("resize_namespace needs NvmetOptions::resizable");
        control
            .write_all(format!("resize {nsid} {mib}\n").as_bytes())
            .unwrap_or_else(|e| panic!("tell the guest to resize: {e}"));
        let deadline = Instant::now() + RESIZE_TIMEOUT;
        loop {
            let console = self.console();
            // Whole lines only: QEMU may be in the middle of writing the last one.
            let whole = &console[..console.rfind('\n').map_or(0, |n| n + 1)];
            if whole.matches(&done).count() > before {
                return;
            }
            assert!(
                whole.matches("nvmet: FAIL").count() == failures,
                "the guest could not resize namespace {nsid}\n{}",
                self.logs()
            );
            self.assert_running();
            assert!(
                Instant::now() < deadline,
                "no {done:?} within {RESIZE_TIMEOUT:?}\n{}",
                self.logs()
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Pauses the guest (QMP `stop`): the target stops answering, its connections stay open,
    /// and new TCP connections are still accepted on the host side (by QEMU), then left
    /// without an answer.
    pub fn stop_guest(&self) {
        self.qmp("stop")
            .unwrap_or_else(|e| panic!("QMP stop: {e}\n{}", self.logs()));
    }

    /// Resumes a guest paused by [`Self::stop_guest`] (QMP `cont`).
    pub fn cont_guest(&self) {
        self.qmp("cont")
            .unwrap_or_else(|e| panic!("QMP cont: {e}\n{}", self.logs()));
    }

    /// Runs one QMP command without arguments on a fresh QMP connection and returns its
    /// `return` value. Every read and write is bounded by [`TIMEOUT`](super::TIMEOUT).
    pub fn qmp(&self, command: &str) -> Result<serde_json::Value, String> {
        Qmp::connect(&self.dir.path().join("qmp.sock"))?.execute(command, None)
    }
}

impl Drop for NvmetTarget {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let pid = libc::pid_t::try_from(self.child.id()).expect("pid fits pid_t");
            // SAFETY: kill(2) has no memory-safety preconditions; the child has not been
            // reaped (checked just above), so its pid is still its own.
            let sent = unsafe { libc::kill(pid, libc::SIGTERM) } == 0;
            if !(sent && wait_bounded(&mut self.child).is_some()) {
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }
        // run-guest.sh stops QEMU before it exits, unless it was killed; then QEMU's parent
        // (`timeout`) reaps it once it is gone.
        if let Some(pid) = self.qemu_pid() {
            // SAFETY: as above; the pid was QEMU's a moment ago (checked through /proc), and
            // QEMU's pid file is removed when it exits normally.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        if thread::panicking() {
            eprintln!("{}", self.logs());
        }
    }
}
