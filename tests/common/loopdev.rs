//! Loop devices for the tests that serve a block device: [`LoopDevice`] (attached over a file,
//! detached on drop), [`require_loop_devices`], and the helpers they and other system-tool
//! guards use: [`run_tool`], [`retry_until_timeout`] and [`cleanup_failed`].
//!
//! Creating loop devices needs root and the loop driver; a test that cannot have them fails
//! and says why, it never skips.

use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use super::daemon::wait_bounded;
use super::{SECTOR, TIMEOUT};

/// Runs a system tool to completion (bounded by [`TIMEOUT`]) and returns what it printed on
/// stdout, or why it did not run, did not finish or failed. Never panics: the guards below use
/// it while a failing test unwinds.
pub fn run_tool(cmd: &mut Command) -> Result<String, String> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => format!("{cmd:?}: program not found ({e})"),
            _ => format!("{cmd:?}: cannot run: {e}"),
        })?;
    if wait_bounded(&mut child).is_none() {
        let _ = child.kill();
        let _ = child.wait();
        return Err(format!("{cmd:?}: still running after {TIMEOUT:?}"));
    }
    // The tool has exited: its pipes end after what it wrote, and its status is known.
    let output = child
        .wait_with_output()
        .map_err(|e| format!("{cmd:?}: cannot collect its output: {e}"))?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(format!(
            "{cmd:?} exited with {}: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

/// Calls `attempt` until it succeeds, for up to [`TIMEOUT`]; returns its last error otherwise.
pub fn retry_until_timeout<T>(mut attempt: impl FnMut() -> Result<T, String>) -> Result<T, String> {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        match attempt() {
            Ok(value) => return Ok(value),
            Err(e) if Instant::now() >= deadline => return Err(format!("{e} (for {TIMEOUT:?})")),
            Err(_) => thread::sleep(Duration::from_millis(10)),
        }
    }
}

/// Reports a guard that could not clean up: fails the test, or only prints if it is failing
/// already (a second panic would abort).
pub fn cleanup_failed(message: &str) {
    if thread::panicking() {
        eprintln!("{message}");
    } else {
        panic!("{message}");
    }
}

/// Fails the test, saying why, if this process cannot create loop devices.
pub fn require_loop_devices() {
    // SAFETY: geteuid(2) takes no arguments, touches no memory and cannot fail.
    let euid = unsafe { libc::geteuid() };
    assert!(
        euid == 0,
        "creating loop devices needs root, and these tests run with effective uid {euid}: \
         run them as root"
    );
    let control = Path::new("/dev/loop-control");
    assert!(
        control.exists(),
        "{} does not exist: no loop driver here (load the `loop` module, or give the container \
         access to loop devices)",
        control.display()
    );
}

/// A loop device over a file, detached on drop, also when the test fails. Keep the backing
/// file's owner alive longer (declare it first).
#[derive(Debug)]
pub struct LoopDevice {
    path: PathBuf,
    /// `/sys/dev/block/MAJOR:MINOR`.
    sysfs: PathBuf,
}

impl LoopDevice {
    /// Attaches a loop device with `sector_size`-byte logical blocks over `backing`. With
    /// `direct_io` the device bypasses the page cache of the backing file, so what it writes
    /// is in the file (a file system without O_DIRECT refuses it).
    pub fn attach(backing: &Path, sector_size: u32, direct_io: bool) -> Self {
        require_loop_devices();
        let stdout = run_tool(
            Command::new("losetup")
                .args(["--find", "--show", "--sector-size"])
                .arg(sector_size.to_string())
                .arg(if direct_io {
                    "--direct-io=on"
                } else {
                    "--direct-io=off"
                })
                .arg(backing),
        )
        .unwrap_or_else(|e| {
            panic!(
                "cannot create a loop device over {}: {e}",
                backing.display()
            )
        });
        let path = PathBuf::from(stdout.trim());
        let rdev = fs::metadata(&path)
            .unwrap_or_else(|e| panic!("losetup printed {path:?}, which cannot be examined: {e}"))
            .rdev();
        let sysfs = PathBuf::from(format!(
            "/sys/dev/block/{}:{}",
            libc::major(rdev),
            libc::minor(rdev)
        ));
        Self { path, sysfs }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn sysfs_u64(&self, attr: &str) -> u64 {
        let file = self.sysfs.join(attr);
        let text =
            fs::read_to_string(&file).unwrap_or_else(|e| panic!("read {}: {e}", file.display()));
        text.trim()
            .parse()
            .unwrap_or_else(|e| panic!("{}: {text:?}: {e}", file.display()))
    }

    /// A limit of the device's request queue (`queue/LIMIT` in sysfs).
    pub fn queue_limit(&self, limit: &str) -> u64 {
        self.sysfs_u64(&format!("queue/{limit}"))
    }

    /// Flush requests the device has completed (field 16 of sysfs `stat`): a write with FUA
    /// counts too, since a loop device has a write cache and no FUA, so the block layer sends
    /// such a write as the write and a flush.
    pub fn flushes(&self) -> u64 {
        let file = self.sysfs.join("stat");
        let text =
            fs::read_to_string(&file).unwrap_or_else(|e| panic!("read {}: {e}", file.display()));
        text.split_whitespace()
            .nth(15)
            .and_then(|f| f.parse().ok())
            .unwrap_or_else(|| panic!("{}: no flush count in {text:?}", file.display()))
    }

    /// Capacity in bytes (sysfs `size` counts 512-byte sectors whatever the block size).
    pub fn size(&self) -> u64 {
        self.sysfs_u64("size") * SECTOR
    }
}

impl Drop for LoopDevice {
    /// Detaches the device and waits until the kernel has let go of the backing file, which it
    /// may do after `losetup --detach` has returned.
    fn drop(&mut self) {
        let detached =
            run_tool(Command::new("losetup").arg("--detach").arg(&self.path)).and_then(|_| {
                retry_until_timeout(|| {
                    if self.sysfs.join("loop").exists() {
                        Err("still bound to its backing file".to_owned())
                    } else {
                        Ok(())
                    }
                })
            });
        if let Err(e) = detached {
            cleanup_failed(&format!(
                "cannot detach loop device {}: {e}",
                self.path.display()
            ));
        }
    }
}
