//! Running the QEMU lab (`qemu/`) from a test: scripts bounded in time with their output in a
//! log, and the `TAG key=value ...` lines guests print on their console. For the lab tests
//! with a guest script of their own (`tests/guest/NAME.sh`): [`test_dir`], [`build_initramfs`],
//! [`kernel_image`], [`image_file`], [`Guest`] (a `run-guest.sh` command with the options they
//! all use; run to its end, or [`RunningGuest`] for a test that acts while the guest runs),
//! [`echo_lines`] and [`read_at`].

use std::collections::HashMap;
use std::fs::{self, File};
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// The lab's scripts.
pub fn lab_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("qemu")
}

/// How long building an initramfs may take, a kernel download included.
pub const BUILD_TIMEOUT: Duration = Duration::from_secs(600);

/// A test's private directory, checked to be usable in QEMU options (no comma in its path).
pub fn test_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("create test directory");
    assert!(
        !dir.path().to_string_lossy().contains(','),
        "QEMU options cannot take the path {}",
        dir.path().display()
    );
    dir
}

/// Builds `dir/NAME.cpio.gz` with `build-initramfs.sh`: the guest script
/// `tests/guest/NAME.sh` as `/test.sh`, the programs `bins` (with their shared libraries) in
/// `/usr/bin`, `tests/guest/bind-vfio.sh` and the scripts' shared functions
/// (`tests/guest/lib.sh`, as `/usr/lib/vubd-lab/lib.sh`). Its log is `dir/build.log`.
pub fn build_initramfs(dir: &Path, name: &str, bins: &[&Path]) -> PathBuf {
    let guest_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/guest");
    let initrd = dir.join(format!("{name}.cpio.gz"));
    let mut cmd = Command::new(lab_dir().join("build-initramfs.sh"));
    cmd.arg("--output")
        .arg(&initrd)
        .arg("--script")
        .arg(guest_dir.join(format!("{name}.sh")));
    for bin in bins {
        cmd.args(["--bin", &bin_arg(bin)]);
    }
    cmd.arg("--add")
        .arg(format!(
            "{}:/usr/bin/bind-vfio.sh",
            guest_dir.join("bind-vfio.sh").display()
        ))
        .arg("--add")
        .arg(format!(
            "{}:/usr/lib/vubd-lab/lib.sh",
            guest_dir.join("lib.sh").display()
        ));
    run_script(
        &mut cmd,
        &dir.join("build.log"),
        BUILD_TIMEOUT,
        "build-initramfs.sh",
    );
    initrd
}

/// The lab's guest kernel (`fetch-kernel.sh` on the lab cache, `$VUBD_LAB_CACHE` or
/// `target/lab`), for a test that boots it without `run-guest.sh`. Its log is
/// `dir/fetch-kernel.log`.
pub fn kernel_image(dir: &Path) -> PathBuf {
    let cache = std::env::var_os("VUBD_LAB_CACHE").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("target/lab"),
        PathBuf::from,
    );
    let log = dir.join("fetch-kernel.log");
    let mut cmd = Command::new(lab_dir().join("fetch-kernel.sh"));
    cmd.arg(&cache);
    run_script(&mut cmd, &log, BUILD_TIMEOUT, "fetch-kernel.sh");
    let out = fs::read_to_string(&log).expect("read fetch-kernel.sh's log");
    let kernel = out
        .lines()
        .find_map(|l| l.strip_prefix("VMLINUZ="))
        .unwrap_or_else(|| panic!("fetch-kernel.sh printed no VMLINUZ= line:\n{out}"));
    PathBuf::from(kernel)
}

/// A sparse, all-zero image file `dir/NAME` of `len` bytes.
pub fn image_file(dir: &Path, name: &str, len: u64) -> PathBuf {
    let path = dir.join(name);
    File::create(&path)
        .and_then(|f| f.set_len(len))
        .unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    path
}

/// `len` bytes of the file `path` from `offset`.
pub fn read_at(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    File::open(path)
        .and_then(|f| f.read_exact_at(&mut out, offset))
        .unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    out
}

/// Prints (to the test's output) the console lines that start with one of `prefixes`.
pub fn echo_lines(console: &str, prefixes: &[&str]) {
    for line in console
        .lines()
        .filter(|l| prefixes.iter().any(|p| l.starts_with(p)))
    {
        eprintln!("{line}");
    }
}

/// A `run-guest.sh` command with what every lab guest has: its initramfs, a time limit, and
/// its console in a log file instead of on stdout. The test adds its devices and kernel
/// command line through [`Guest::command`], then [`Guest::run`]s it.
pub struct Guest {
    command: Command,
    console_log: PathBuf,
    timeout_s: u64,
}

impl Guest {
    /// A guest that boots `initrd`, stops after `timeout_s` seconds, and writes its console to
    /// `dir/CONSOLE_LOG`.
    pub fn new(initrd: &Path, dir: &Path, console_log: &str, timeout_s: u64) -> Self {
        let console_log = dir.join(console_log);
        let mut command = Command::new(lab_dir().join("run-guest.sh"));
        command
            .arg("--initrd")
            .arg(initrd)
            .args(["--timeout", &timeout_s.to_string(), "--no-echo", "--log"])
            .arg(&console_log);
        Self {
            command,
            console_log,
            timeout_s,
        }
    }

    /// The command, for the test's own `run-guest.sh` options.
    pub fn command(&mut self) -> &mut Command {
        &mut self.command
    }

    /// The file the console goes to.
    pub fn console_log(&self) -> &Path {
        &self.console_log
    }

    /// Boots the guest with [`run_guest`] (its own output in `dir/run-guest.log`), allowing 30 s
    /// beyond the guest's time limit, and returns the console. Fails the test unless the guest
    /// passed.
    pub fn run(mut self, dir: &Path) -> String {
        let limit = Duration::from_secs(self.timeout_s + 30);
        run_guest(&mut self.command, &self.console_log, dir, limit)
    }

    /// Boots the guest without waiting for it (its own output in `dir/run-guest.log`), for a
    /// test that acts on the host while the guest runs and reads its console as it goes.
    pub fn spawn(mut self, dir: &Path) -> RunningGuest {
        let run_log = dir.join("run-guest.log");
        let out = File::create(&run_log).expect("create log");
        let child = self
            .command
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("clone log"))
            .stderr(out)
            .spawn()
            .expect("spawn run-guest.sh");
        RunningGuest {
            child: Some(child),
            console_log: self.console_log,
            run_log,
            limit: Duration::from_secs(self.timeout_s + 30),
        }
    }
}

/// A guest started by [`Guest::spawn`]. Dropping it stops the guest if it still runs.
#[derive(Debug)]
pub struct RunningGuest {
    /// `run-guest.sh`; `None` once it has been waited for.
    child: Option<Child>,
    console_log: PathBuf,
    run_log: PathBuf,
    /// How long [`RunningGuest::finish`] waits: the guest's time limit and 30 s.
    limit: Duration,
}

impl RunningGuest {
    /// The console so far, carriage returns removed.
    pub fn console(&self) -> String {
        let bytes = fs::read(&self.console_log).unwrap_or_default();
        String::from_utf8_lossy(&bytes).replace('\r', "")
    }

    /// What `run-guest.sh` printed so far.
    pub fn run_log(&self) -> String {
        fs::read_to_string(&self.run_log).unwrap_or_default()
    }

    /// Fails the test, with both logs, if the guest has ended.
    #[track_caller]
    pub fn assert_running(&mut self) {
        let child = self
            .child
            .as_mut()
            .expect("the guest was already waited for");
        if let Some(status) = child.try_wait().expect("poll run-guest.sh") {
            panic!(
                "the guest ended ({status}) while the test still needed it:\n{}\n---- console ----\n{}",
                self.run_log(),
                self.console()
            );
        }
    }

    /// Waits up to `limit` for a console line that contains `text` and returns it from `text`
    /// on. Fails the test, with both logs, if the guest ends or the time runs out first.
    #[track_caller]
    pub fn wait_line(&mut self, text: &str, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(line) = lines_with(&self.console(), text).next() {
                return line.to_owned();
            }
            self.assert_running();
            assert!(
                Instant::now() < deadline,
                "no console line with {text:?} within {limit:?}:\n{}\n---- console ----\n{}",
                self.run_log(),
                self.console()
            );
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits for the guest to end (up to its time limit and 30 s; then it is stopped) and
    /// returns how `run-guest.sh` exited (`None`: stopped) and the console.
    pub fn finish(mut self) -> (Option<ExitStatus>, String) {
        let mut child = self.child.take().expect("the guest was already waited for");
        let status = wait_limited(&mut child, self.limit);
        (status, self.console())
    }
}

impl Drop for RunningGuest {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            wait_limited(&mut child, Duration::ZERO);
        }
    }
}

/// `PATH:/usr/bin/NAME`, for `build-initramfs.sh --bin`.
pub fn bin_arg(path: &Path) -> String {
    format!(
        "{}:/usr/bin/{}",
        path.display(),
        path.file_name().expect("a file name").to_string_lossy()
    )
}

/// Waits up to `limit` for `child`; on the limit sends SIGTERM (run-guest.sh then stops QEMU),
/// then SIGKILL 15 s later, and returns `None`.
pub fn wait_limited(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait().expect("poll child") {
            return Some(status);
        }
        thread::sleep(Duration::from_millis(50));
    }
    let pid = libc::pid_t::try_from(child.id()).expect("pid fits pid_t");
    // SAFETY: kill(2) on the pid of our own child, which has not been reaped (try_wait saw it
    // running), so the pid cannot have been reused.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        if child.try_wait().expect("poll child").is_some() {
            return None;
        }
        thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

/// Runs a lab script with its output in `log`, bounded by `limit`; panics if it fails.
pub fn run_script(cmd: &mut Command, log: &Path, limit: Duration, what: &str) {
    let out = File::create(log).expect("create log");
    let err = out.try_clone().expect("clone log");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {what}: {e}"));
    let status = wait_limited(&mut child, limit);
    if status.is_some_and(|s| s.success()) {
        return;
    }
    let output = fs::read_to_string(log).unwrap_or_default();
    match status {
        Some(status) => panic!("{what} failed with {status}:\n{output}"),
        None => panic!("{what} still running after {limit:?}:\n{output}"),
    }
}

/// The `KEY=VALUE` fields of a console line after its tag; a value may be a quoted string
/// (`mn="QEMU NVMe Ctrl"`), returned without the quotes.
pub fn fields(line: &str) -> HashMap<String, String> {
    let mut out = HashMap::new();
    let mut rest = line.trim();
    while !rest.is_empty() {
        let end = rest.find(' ').unwrap_or(rest.len());
        match rest[..end].split_once('=') {
            Some((key, value)) if value.starts_with('"') => {
                let quoted = &rest[key.len() + 2..];
                let close = quoted.find('"').unwrap_or(quoted.len());
                out.insert(key.to_owned(), quoted[..close].to_owned());
                rest = quoted.get(close + 1..).unwrap_or("").trim_start();
                continue;
            }
            Some((key, value)) => {
                out.insert(key.to_owned(), value.to_owned());
            }
            None => {}
        }
        rest = rest[end..].trim_start();
    }
    out
}

/// The console line that starts with `tag` (from the tag on), or a panic that shows the
/// console.
#[track_caller]
pub fn line_with<'a>(console: &'a str, tag: &str) -> &'a str {
    console
        .lines()
        .find_map(|l| l.find(tag).map(|at| &l[at..]))
        .unwrap_or_else(|| panic!("no {tag:?} line on the guest console:\n{console}"))
}

/// Every console line that contains `tag`, from the tag on.
pub fn lines_with<'a>(console: &'a str, tag: &'a str) -> impl Iterator<Item = &'a str> + 'a {
    console
        .lines()
        .filter_map(move |l| l.find(tag).map(|at| &l[at..]))
}

/// Runs `guest` (a `run-guest.sh` command that writes its console to `console_log`) with its
/// own output in `dir/run-guest.log`, bounded by `limit`, and returns the console with
/// carriage returns removed. Fails the test, with both logs, unless the guest passed.
pub fn run_guest(guest: &mut Command, console_log: &Path, dir: &Path, limit: Duration) -> String {
    let guest_log = dir.join("run-guest.log");
    let out = std::fs::File::create(&guest_log).expect("create log");
    let mut child = guest
        .stdin(std::process::Stdio::null())
        .stdout(out.try_clone().expect("clone log"))
        .stderr(out)
        .spawn()
        .expect("spawn run-guest.sh");
    let status = wait_limited(&mut child, limit);
    let console = std::fs::read_to_string(console_log)
        .unwrap_or_default()
        .replace('\r', "");
    if !status.is_some_and(|s| s.success()) {
        panic!(
            "the guest did not pass ({status:?}):\n{}\n---- console ----\n{console}",
            std::fs::read_to_string(&guest_log).unwrap_or_default()
        );
    }
    console
}

/// Makes a lab script get SIGTERM when the thread that spawns it ends (prctl
/// PR_SET_PDEATHSIG): its trap then stops QEMU. This covers a test process killed without
/// unwinding; normally the owner's drop handler stops the guest first.
pub fn stop_with_parent_thread(cmd: &mut Command) {
    // SAFETY: the hook runs in the child between fork and exec, where only async-signal-safe
    // calls are allowed: it makes one system call with constant arguments, and neither
    // allocates nor takes a lock.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) == 0 {
                Ok(())
            } else {
                Err(io::Error::last_os_error())
            }
        });
    }
}
