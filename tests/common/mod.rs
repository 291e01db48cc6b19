//! Shared harness for the integration tests that drive a vhost-user-blk backend the way a VMM
//! does.
//!
//! - here: [`bounded`] and [`TIMEOUT`], [`Rng`], [`assert_same`], [`Image`], a disk image in a
//!   private temporary directory, readable from the host side, and [`per_poll_mode!`], which
//!   repeats tests for every vubd poll mode.
//! - [`daemon`]: [`daemon::Daemon`] runs the backend on a private socket and stops it on drop
//!   (on a failing test it prints the backend's output); [`daemon::DaemonConfig`] holds the
//!   settings, among them vubd's poll mode and poller CPUs; [`daemon::run_vubd`] runs vubd to
//!   completion for the command-line tests.
//! - [`nvmet`]: [`nvmet::NvmetTarget`], the Linux kernel's NVMe/TCP target in a QEMU guest
//!   (`qemu/nvmet-target.sh`), reached at 127.0.0.1, for NVMe/TCP initiator tests; its guest can
//!   be paused and resumed over QMP.
//! - [`relay`]: [`relay::Relay`], a TCP relay in front of the nvmet guest that turns a killed
//!   initiator's reset into a clean close, which libslirp 4.7 survives.
//! - [`qmp`]: [`qmp::Qmp`], a QMP client for the tests that drive QEMU processes (pausing a
//!   guest, migrating it).
//! - [`fake_target`]: [`fake_target::FakeTarget`], a small NVMe/TCP target on 127.0.0.1 with
//!   a RAM or null namespace, fault injection and counters, for initiator tests the kernel
//!   target cannot serve (misbehaviour, speed). It depends on nothing else here, so
//!   `examples/fake_target.rs` includes it by path.
//! - [`loopdev`]: [`loopdev::LoopDevice`], a loop device over a file, for the tests that serve
//!   a block device, and the helpers of guards that run system tools.
//! - [`lab`]: running the QEMU lab's scripts bounded in time, building a lab test's initramfs
//!   and booting its guest, and reading the `TAG key=value` lines its guests print.
//! - [`libvirtd`]: [`libvirtd::Libvirtd`], a private libvirt daemon (Debian's, its directories
//!   in the test's own) for the libvirt lab, `virsh` calls to it bounded in time, and the QEMU
//!   it starts.
//! - [`procfs`]: the CPU time and CPU affinity of a running backend, from `/proc`.
//! - [`throttle`]: [`throttle::WriteThrottle`], a cgroup that limits a backend's writes to a
//!   disk (reads pass), so that its requests complete out of order.
//! - [`examples`]: [`examples::example_bin`], the executable of an example program (built on
//!   first use), for tests that run `blkcheck` or `vfio_probe`.
//! - [`client`]: [`client::Client`], a vhost-user frontend built on libblkio: N queues, one
//!   shared-memory region as I/O buffers, many requests in flight per queue, raw completion
//!   values.
//! - `raw.rs`: `RawFrontend`, libblkio's virtio layer used directly, for the requests libblkio
//!   refuses to send and for reading the raw configuration space.
//! - `workload.rs`: a random, self-checking I/O workload on every queue of a client at once.
//! - `restart.rs`: the restart lab's machinery (`tests/restart_lab.rs`).
//! - `frontend.rs`: `BlkFrontend`, a vhost-user-blk frontend of our own on the vhost crate's
//!   `Frontend`, with its own guest memory and split rings: it negotiates INFLIGHT_SHMFD, keeps
//!   the inflight region across backend restarts and reconnects as QEMU does after a crash
//!   (`examples/vhost_frontend_load.rs` includes it by path).
//!
//! The last four are not submodules of this one: the test binaries that need them declare them
//! themselves, next to `mod common;`, so that the others do not compile them (nor
//! virtio-driver):
//!
//! ```ignore
//! #[path = "common/raw.rs"]
//! mod raw;
//! ```
//!
//! Every wait is bounded by [`TIMEOUT`]: a test that would hang fails instead.
//!
//! With `VUBD_TEST_BACKEND=qemu-storage-daemon` the tests that start their backend through
//! [`daemon::Daemon::start`] and its variants run against QEMU's reference vhost-user-blk
//! export instead of vubd. A failure that reproduces there points at the test, not at vubd.
//! The CLI tests always run vubd.

// Each test binary uses a different part of the harness; this also covers the submodules.
#![allow(dead_code)]

pub mod client;
pub mod daemon;
pub mod examples;
pub mod fake_target;
pub mod lab;
pub mod libvirtd;
pub mod loopdev;
pub mod node;
pub mod nvmet;
pub mod procfs;
pub mod qmp;
pub mod relay;
mod rng;
pub mod throttle;

pub use rng::Rng;

use std::fs::{self, File};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::Duration;
use std::{panic, thread};

use tempfile::TempDir;

/// Upper bound for any single wait: a socket to appear, a connect, a batch of completions, a
/// process to exit.
pub const TIMEOUT: Duration = Duration::from_secs(10);

/// The virtio-blk sector size: offsets and lengths on the wire are in units of it.
pub const SECTOR: u64 = 512;

/// Repeats the given items (tests and their helpers) once per vubd poll mode, each copy in a
/// module named after the mode (`poll_always`, `poll_adaptive`, `poll_adaptive_idle_0`,
/// `poll_never`) in which the constant `POLL` is that mode and the enclosing module's names are
/// in scope:
///
/// ```ignore
/// common::per_poll_mode! {
///     #[test]
///     fn random_io_reads_back() {
///         random_io_reads_back(POLL);
///     }
/// }
/// ```
// Each test binary uses a different part of the harness (the crate-level allow covers items,
// not macros and their re-exports).
#[allow(unused_macros)]
macro_rules! per_poll_mode {
    ($($item:item)*) => {
        /// `--poll always`: busy-polling pollers.
        mod poll_always {
            use super::*;
            const POLL: $crate::common::daemon::PollMode = $crate::common::daemon::PollMode::Always;
            $($item)*
        }
        /// `--poll adaptive` with the default idle time.
        mod poll_adaptive {
            use super::*;
            const POLL: $crate::common::daemon::PollMode =
                $crate::common::daemon::PollMode::Adaptive { idle_us: None };
            $($item)*
        }
        /// `--poll adaptive --poll-idle-us 0`: sleep as soon as there is no work, but through
        /// the adaptive path.
        mod poll_adaptive_idle_0 {
            use super::*;
            const POLL: $crate::common::daemon::PollMode =
                $crate::common::daemon::PollMode::Adaptive { idle_us: Some(0) };
            $($item)*
        }
        /// `--poll never`: event-driven pollers.
        mod poll_never {
            use super::*;
            const POLL: $crate::common::daemon::PollMode = $crate::common::daemon::PollMode::Never;
            $($item)*
        }
    };
}
#[allow(unused_imports)]
pub(crate) use per_poll_mode;

/// Runs `f` on a worker thread and returns its result, failing the test if it takes longer than
/// [`TIMEOUT`]. A panic in `f` is re-raised here. On a timeout the worker is left blocked; the
/// test fails and the [`daemon::Daemon`] guard's drop kills the backend, which unblocks it.
pub fn bounded<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    let worker = thread::Builder::new()
        .name(what.to_owned())
        .spawn(move || {
            // The receiver only goes away after a timeout, when nobody wants the value.
            let _ = tx.send(f());
        })
        .expect("spawn worker thread");
    match rx.recv_timeout(TIMEOUT) {
        Ok(value) => value,
        Err(RecvTimeoutError::Timeout) => panic!("{what}: no result within {TIMEOUT:?}"),
        Err(RecvTimeoutError::Disconnected) => match worker.join() {
            Err(payload) => panic::resume_unwind(payload),
            Ok(()) => unreachable!("{what}: worker finished without sending a result"),
        },
    }
}

/// Formats a completion value (0 or a negative errno) for assertion messages.
pub fn describe_ret(ret: i32) -> String {
    if ret == 0 {
        "0 (success)".to_owned()
    } else {
        format!("{ret} ({})", io::Error::from_raw_os_error(-ret))
    }
}

/// Asserts that two byte ranges are equal, reporting the first differing offset rather than
/// dumping megabytes. `base` is the disk offset of `expected[0]`, used in the message.
#[track_caller]
pub fn assert_same(expected: &[u8], actual: &[u8], base: u64, what: &str) {
    assert_eq!(
        expected.len(),
        actual.len(),
        "{what}: length differs at disk offset {base}"
    );
    if let Some(i) = expected.iter().zip(actual).position(|(e, a)| e != a) {
        let end = (i + 16).min(expected.len());
        panic!(
            "{what}: first difference at disk offset {} (byte {i} of {}):\n expected {:02x?}\n   actual {:02x?}",
            base + u64::try_from(i).expect("usize fits u64"),
            expected.len(),
            &expected[i..end],
            &actual[i..end],
        );
    }
}

/// A disk image file in its own temporary directory.
#[derive(Debug)]
pub struct Image {
    dir: TempDir,
    path: PathBuf,
    size: u64,
}

impl Image {
    /// A sparse, all-zero image of `size` bytes.
    pub fn new(size: u64) -> Self {
        let dir = tempfile::tempdir().expect("create image directory");
        let path = dir.path().join("disk.img");
        File::create(&path)
            .and_then(|file| file.set_len(size))
            .unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
        Self { dir, path, size }
    }

    /// An image of `size` bytes filled with deterministic random data; returns it with its
    /// contents.
    pub fn with_random_contents(size: u64, seed: u64) -> (Self, Vec<u8>) {
        let image = Self::new(size);
        let data = Rng::new(seed).bytes(usize::try_from(size).expect("image fits in memory"));
        image.write_host(0, &data);
        (image, data)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// Reads the image file directly, bypassing the backend.
    pub fn read_host(&self, offset: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0; len];
        File::open(&self.path)
            .and_then(|file| file.read_exact_at(&mut buf, offset))
            .unwrap_or_else(|e| panic!("read {len} bytes at {offset} from the image: {e}"));
        buf
    }

    /// Writes the image file directly, bypassing the backend.
    pub fn write_host(&self, offset: u64, data: &[u8]) {
        fs::OpenOptions::new()
            .write(true)
            .open(&self.path)
            .and_then(|file| file.write_all_at(data, offset))
            .unwrap_or_else(|e| panic!("write {} bytes at {offset} to the image: {e}", data.len()));
    }
}
