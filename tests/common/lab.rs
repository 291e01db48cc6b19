//! Running the QEMU lab (`qemu/`) from a test: scripts bounded in time with their output in a
//! log, and the `TAG key=value ...` lines guests print on their console.

use std::collections::HashMap;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// The lab's scripts.
pub fn lab_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("qemu")
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
