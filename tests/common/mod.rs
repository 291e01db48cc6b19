//! Shared harness for the integration tests that drive a vhost-user-blk backend the way a VMM
//! does.
//!
//! - [`Image`]: a disk image in a private temporary directory, readable from the host side.
//! - [`Daemon`]: runs the backend on a private socket and stops it on drop; on a failing test it
//!   prints the backend's output.
//! - [`Client`]: a vhost-user frontend built on libblkio: N queues, one shared-memory region as
//!   I/O buffers, many requests in flight per queue, raw completion values.
//! - [`RawFrontend`]: libblkio's virtio layer used directly, for the requests libblkio refuses
//!   to send (a write to a device that offers `VIRTIO_BLK_F_RO`) and for reading the raw
//!   configuration space.
//!
//! Every wait is bounded by [`TIMEOUT`]: a test that would hang fails instead.
//!
//! With `VUBD_TEST_BACKEND=qemu-storage-daemon` the tests that start their backend through
//! [`Daemon::start`] run against QEMU's reference vhost-user-blk export instead of vubd. A
//! failure that reproduces there points at the test, not at vubd. The CLI tests always run vubd.

// Each test binary uses a different part of this module.
#![allow(dead_code)]

use std::ffi::{OsStr, OsString};
use std::fmt::Write as _;
use std::fs::{self, File};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant};
use std::{mem, panic, ptr, slice};

use blkio::{Blkio, Blkioq, Completion, Errno, ReqFlags, iovec};
use tempfile::TempDir;
use virtio_driver::{
    VhostUser, VirtioBlkConfig, VirtioBlkFeatureFlags, VirtioBlkQueue, VirtioBlkReqBuf,
    VirtioBlkTransport, VirtioFeatureFlags,
};

/// Upper bound for any single wait: a socket to appear, a connect, a batch of completions, a
/// process to exit.
pub const TIMEOUT: Duration = Duration::from_secs(10);

/// The virtio-blk sector size: offsets and lengths on the wire are in units of it.
pub const SECTOR: u64 = 512;

/// Runs `f` on a worker thread and returns its result, failing the test if it takes longer than
/// [`TIMEOUT`]. A panic in `f` is re-raised here. On a timeout the worker is left blocked; the
/// test fails and the [`Daemon`] guard's drop kills the backend, which unblocks it.
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

/// A small deterministic generator (SplitMix64), so every run uses the same data and a failure
/// reproduces exactly.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A value in `0..n`; `n` must not be zero.
    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0, "empty range");
        self.next_u64() % n
    }

    /// A `usize` in `0..n`; `n` must not be zero.
    pub fn below_usize(&mut self, n: usize) -> usize {
        let n = u64::try_from(n).expect("usize fits u64");
        usize::try_from(self.below(n)).expect("below n fits usize")
    }

    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(len + 8);
        while out.len() < len {
            out.extend_from_slice(&self.next_u64().to_le_bytes());
        }
        out.truncate(len);
        out
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

/// Backend settings that both vubd and the reference backend understand.
#[derive(Debug, Clone, Default)]
pub struct DaemonConfig {
    pub num_queues: Option<u16>,
    pub readonly: bool,
}

/// Which program [`Daemon::start`] runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backend {
    Vubd,
    QemuStorageDaemon,
}

const BACKEND_ENV: &str = "VUBD_TEST_BACKEND";

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
    args
}

fn qemu_storage_daemon_command(disk: &Path, socket: &Path, config: &DaemonConfig) -> Command {
    fn qemu_path(path: &Path) -> String {
        // QEMU option values escape a comma by doubling it.
        path.to_str()
            .expect("temporary paths are UTF-8")
            .replace(',', ",,")
    }
    let read_only = if config.readonly { "on" } else { "off" };
    let mut cmd = Command::new("qemu-storage-daemon");
    cmd.arg("--blockdev").arg(format!(
        "driver=file,filename={},node-name=disk0,discard=unmap,read-only={read_only}",
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
}

impl Daemon {
    /// Starts the selected backend (vubd unless `VUBD_TEST_BACKEND` says otherwise) with default
    /// settings.
    pub fn start(image: &Image) -> Self {
        Self::start_with(image, &DaemonConfig::default())
    }

    /// Starts the selected backend (vubd unless `VUBD_TEST_BACKEND` says otherwise).
    pub fn start_with(image: &Image, config: &DaemonConfig) -> Self {
        let dir = tempfile::tempdir().expect("create daemon directory");
        let socket = dir.path().join("vhost-user-blk.sock");
        match selected_backend() {
            Backend::Vubd => {
                let mut cmd = vubd_command();
                cmd.args(vubd_args(image.path(), &socket, config));
                Self::spawn(cmd, "vubd", dir, socket)
            }
            Backend::QemuStorageDaemon => {
                let cmd = qemu_storage_daemon_command(image.path(), &socket, config);
                Self::spawn(cmd, "qemu-storage-daemon", dir, socket)
            }
        }
    }

    /// Starts vubd (whatever `VUBD_TEST_BACKEND` says) with the usual arguments plus `extra`.
    pub fn vubd(image: &Image, config: &DaemonConfig, extra: &[&OsStr]) -> Self {
        let dir = tempfile::tempdir().expect("create daemon directory");
        let socket = dir.path().join("vhost-user-blk.sock");
        let mut cmd = vubd_command();
        cmd.args(vubd_args(image.path(), &socket, config))
            .args(extra);
        Self::spawn(cmd, "vubd", dir, socket)
    }

    /// Starts vubd with exactly `args` and waits for `socket` to appear.
    pub fn vubd_with_args(args: &[&OsStr], socket: &Path) -> Self {
        let dir = tempfile::tempdir().expect("create daemon directory");
        let mut cmd = vubd_command();
        cmd.args(args);
        Self::spawn(cmd, "vubd", dir, socket.to_owned())
    }

    fn spawn(mut cmd: Command, name: &str, dir: TempDir, socket: PathBuf) -> Self {
        let output = dir.path().join("output.log");
        let log = File::create(&output).expect("create output log");
        let log2 = log.try_clone().expect("clone output log");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        let mut daemon = Self {
            child,
            name: name.to_owned(),
            socket,
            output,
            dir,
        };
        daemon.wait_for_socket();
        daemon
    }

    fn wait_for_socket(&mut self) {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if socket_exists(&self.socket) {
                return;
            }
            if let Some(status) = self.child.try_wait().expect("poll daemon") {
                panic!(
                    "{} exited with {status} before creating {}:\n{}",
                    self.name,
                    self.socket.display(),
                    self.output()
                );
            }
            assert!(
                Instant::now() < deadline,
                "{} did not create {} within {TIMEOUT:?}",
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
fn wait_bounded(child: &mut Child) -> Option<ExitStatus> {
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
    let stderr = File::create(&stderr_path).expect("create stderr log");
    let mut child = cmd
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
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
    Exit { status, stderr }
}

/// libblkio's driver name for vhost-user-blk.
pub const DRIVER: &str = "virtio-blk-vhost-user";

/// How a [`Client`] connects.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    pub num_queues: usize,
    /// Open the device read-only (libblkio refuses to start a device that offers
    /// `VIRTIO_BLK_F_RO` otherwise, and then fails writes itself, without sending them).
    pub read_only: bool,
    /// Ring size; libblkio's default (256) when `None`.
    pub queue_size: Option<u16>,
    /// Bytes of the shared memory region reserved for each queue's I/O buffers.
    pub buffer_per_queue: usize,
}

impl ClientOptions {
    pub fn queues(num_queues: usize) -> Self {
        Self {
            num_queues,
            read_only: false,
            queue_size: None,
            buffer_per_queue: 4 << 20,
        }
    }
}

/// What the frontend learned from the device at connect time: the virtio-blk configuration
/// space and negotiated features, as libblkio exposes them.
#[derive(Debug, Clone, Copy)]
pub struct DeviceInfo {
    /// Bytes (`capacity` in sectors × 512).
    pub capacity: u64,
    /// Logical block size: `blk_size` if `VIRTIO_BLK_F_BLK_SIZE` was negotiated, else 512.
    pub block_size: u32,
    /// `num_queues` if `VIRTIO_BLK_F_MQ` was negotiated, else 1.
    pub max_queues: usize,
    /// `seg_max` if `VIRTIO_BLK_F_SEG_MAX` was negotiated, else 1.
    pub max_segments: usize,
    /// `size_max` if `VIRTIO_BLK_F_SIZE_MAX` was negotiated, else 0 (no limit).
    pub max_segment_len: usize,
    /// `seg_max × size_max` when both were negotiated, else 0 (no limit).
    pub max_transfer: usize,
    /// Bytes; 0 unless `VIRTIO_BLK_F_DISCARD` was negotiated.
    pub max_discard_len: u64,
    /// Bytes; 0 unless `VIRTIO_BLK_F_WRITE_ZEROES` was negotiated.
    pub max_write_zeroes_len: u64,
    pub discard_alignment: u32,
    pub optimal_io_alignment: u32,
    /// Whether the device has a volatile write cache (`writeback`, or `VIRTIO_BLK_F_FLUSH`).
    pub flush_needed: bool,
    /// From `GET_MAX_MEM_SLOTS`.
    pub max_mem_regions: u64,
}

impl DeviceInfo {
    fn query(blkio: &Blkio) -> Result<Self, blkio::Error> {
        fn int<T: TryFrom<i32>>(blkio: &Blkio, name: &str) -> Result<T, blkio::Error> {
            let value = blkio.get_i32(name)?;
            T::try_from(value)
                .map_err(|_| blkio::Error::new(Errno::RANGE, format!("{name} = {value}")))
        }
        Ok(Self {
            capacity: blkio.get_u64("capacity")?,
            block_size: int(blkio, "request-alignment")?,
            max_queues: int(blkio, "max-queues")?,
            max_segments: int(blkio, "max-segments")?,
            max_segment_len: int(blkio, "max-segment-len")?,
            max_transfer: int(blkio, "max-transfer")?,
            max_discard_len: blkio.get_u64("max-discard-len")?,
            max_write_zeroes_len: blkio.get_u64("max-write-zeroes-len")?,
            discard_alignment: int(blkio, "discard-alignment")?,
            optimal_io_alignment: int(blkio, "optimal-io-alignment")?,
            flush_needed: blkio.get_bool("flush-needed")?,
            max_mem_regions: blkio.get_u64("max-mem-regions")?,
        })
    }

    /// The largest single-segment request this device accepts, capped at `cap`.
    pub fn max_request(&self, cap: usize) -> usize {
        [self.max_segment_len, self.max_transfer]
            .into_iter()
            .filter(|&limit| limit > 0)
            .fold(cap, usize::min)
    }
}

/// A connected libblkio frontend. Queues are independent and `Send`: drive them from separate
/// threads with [`Client::queues_mut`].
pub struct Client {
    // Declared before `blkio`, so the queues go first on drop.
    queues: Vec<Queue>,
    blkio: Blkio,
    info: DeviceInfo,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("queues", &self.queues)
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// Connects to `socket` (bounded by [`TIMEOUT`]), starts `options.num_queues` queues and
    /// maps one memory region for their buffers.
    pub fn connect(socket: &Path, options: &ClientOptions) -> Result<Self, blkio::Error> {
        let socket = socket.to_str().expect("socket path is UTF-8").to_owned();
        let options = options.clone();
        bounded("vhost-user connect", move || {
            Self::connect_blocking(&socket, &options)
        })
    }

    fn connect_blocking(socket: &str, options: &ClientOptions) -> Result<Self, blkio::Error> {
        let mut blkio = Blkio::new(DRIVER)?;
        blkio.set_str("path", socket)?;
        if options.read_only {
            blkio.set_bool("read-only", true)?;
        }
        blkio.connect()?;
        let num_queues = i32::try_from(options.num_queues).expect("queue count fits i32");
        blkio.set_i32("num-queues", num_queues)?;
        if let Some(size) = options.queue_size {
            blkio.set_i32("queue-size", size.into())?;
        }
        let info = DeviceInfo::query(&blkio)?;
        let per_queue = options.buffer_per_queue.next_multiple_of(4096);
        let region = blkio.alloc_mem_region(per_queue * options.num_queues.max(1))?;
        let started = blkio.start()?;
        blkio.map_mem_region(&region)?;
        let base = region.addr as *mut u8;
        let queues = started
            .queues
            .into_iter()
            .enumerate()
            .map(|(i, q)| Queue::new(q, base.wrapping_add(i * per_queue), per_queue))
            .collect();
        Ok(Self {
            queues,
            blkio,
            info,
        })
    }

    pub fn info(&self) -> DeviceInfo {
        self.info
    }

    pub fn capacity(&self) -> u64 {
        self.info.capacity
    }

    pub fn block_size(&self) -> u32 {
        self.info.block_size
    }

    pub fn queue(&mut self, index: usize) -> &mut Queue {
        &mut self.queues[index]
    }

    pub fn queues_mut(&mut self) -> &mut [Queue] {
        &mut self.queues
    }
}

/// One request's outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Done {
    /// 0 or a negative errno, as libblkio reports it (`VIRTIO_BLK_S_IOERR` → `-EIO`,
    /// `VIRTIO_BLK_S_UNSUPP` → `-ENOTSUP`, anything else → `-EPROTO`).
    pub ret: i32,
    /// The data read (reads only, and only on success).
    pub data: Vec<u8>,
}

#[derive(Debug)]
struct Pending {
    // Boxed so the array libblkio points at stays put while `pending` grows.
    iov: Box<[iovec]>,
    is_read: bool,
    ret: Option<i32>,
}

/// Buffers start on this boundary: what a Linux guest guarantees (its default DMA alignment),
/// and deliberately less than a page.
const BUFFER_ALIGN: usize = 512;

/// One libblkio queue with its own slice of the shared buffer region. Submit any number of
/// requests, then reap them all with [`Queue::wait_all`].
pub struct Queue {
    q: Blkioq,
    /// Start of this queue's slice of the mapped region.
    base: *mut u8,
    len: usize,
    /// Bump allocator over the slice, reset once all requests have completed.
    used: usize,
    pending: Vec<Pending>,
}

// SAFETY: the raw pointers (`base` and the iovec arrays in `pending`) point into the memory
// region mapped for this queue's exclusive use and into boxes the queue owns; nothing else
// touches them, so moving the queue to another thread is sound. `Blkioq` itself is `Send`.
unsafe impl Send for Queue {}

impl std::fmt::Debug for Queue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queue")
            .field("buffer_len", &self.len)
            .field("in_flight", &self.pending.len())
            .finish_non_exhaustive()
    }
}

impl Queue {
    fn new(q: Blkioq, base: *mut u8, len: usize) -> Self {
        Self {
            q,
            base,
            len,
            used: 0,
            pending: Vec::new(),
        }
    }

    /// Bytes available for the buffers of one batch of requests.
    pub fn buffer_len(&self) -> usize {
        self.len
    }

    pub fn in_flight(&self) -> usize {
        self.pending.len()
    }

    fn alloc(&mut self, len: usize) -> iovec {
        let start = self.used.next_multiple_of(BUFFER_ALIGN);
        let end = start
            .checked_add(len)
            .filter(|&end| end <= self.len)
            .unwrap_or_else(|| {
                panic!(
                    "a batch needs more than the {} buffer bytes reserved per queue: wait for \
                     completions sooner or connect with a larger buffer_per_queue",
                    self.len
                )
            });
        self.used = end;
        iovec {
            iov_base: self.base.wrapping_add(start).cast(),
            iov_len: len,
        }
    }

    fn track(&mut self, iov: Box<[iovec]>, is_read: bool) -> (usize, *const iovec, u32) {
        let tag = self.pending.len();
        let ptr = iov.as_ptr();
        let count = u32::try_from(iov.len()).expect("segment count fits u32");
        self.pending.push(Pending {
            iov,
            is_read,
            ret: None,
        });
        (tag, ptr, count)
    }

    /// Queues a write of the concatenation of `segments` at `offset`, one descriptor per
    /// segment. Returns the request's tag (its index in [`Queue::wait_all`]'s result).
    pub fn submit_writev(&mut self, offset: u64, segments: &[&[u8]]) -> usize {
        let iov: Box<[iovec]> = segments
            .iter()
            .map(|segment| {
                let iov = self.alloc(segment.len());
                // SAFETY: `alloc` returned `segment.len()` bytes inside this queue's slice of
                // the mapped region, which stays mapped while `self.q` holds libblkio's region
                // registry. The allocator hands each byte out once per batch, so no in-flight
                // request uses them, and `segment` is ordinary memory that cannot overlap.
                unsafe {
                    ptr::copy_nonoverlapping(
                        segment.as_ptr(),
                        iov.iov_base.cast::<u8>(),
                        segment.len(),
                    );
                }
                iov
            })
            .collect();
        let (tag, ptr, count) = self.track(iov, false);
        self.q.writev(offset, ptr, count, tag, ReqFlags::empty());
        tag
    }

    /// Queues a read at `offset` into segments of the given lengths. Returns the request's tag.
    pub fn submit_readv(&mut self, offset: u64, segment_lens: &[usize]) -> usize {
        let iov: Box<[iovec]> = segment_lens.iter().map(|&len| self.alloc(len)).collect();
        let (tag, ptr, count) = self.track(iov, true);
        self.q.readv(offset, ptr, count, tag, ReqFlags::empty());
        tag
    }

    pub fn submit_write(&mut self, offset: u64, data: &[u8]) -> usize {
        self.submit_writev(offset, &[data])
    }

    pub fn submit_read(&mut self, offset: u64, len: usize) -> usize {
        self.submit_readv(offset, &[len])
    }

    pub fn submit_flush(&mut self) -> usize {
        let (tag, _, _) = self.track(Box::new([]), false);
        self.q.flush(tag, ReqFlags::empty());
        tag
    }

    pub fn submit_discard(&mut self, offset: u64, len: u64) -> usize {
        let (tag, _, _) = self.track(Box::new([]), false);
        self.q.discard(offset, len, tag, ReqFlags::empty());
        tag
    }

    /// `unmap` allows the device to deallocate the range (`VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP`).
    pub fn submit_write_zeroes(&mut self, offset: u64, len: u64, unmap: bool) -> usize {
        let (tag, _, _) = self.track(Box::new([]), false);
        let flags = if unmap {
            ReqFlags::empty()
        } else {
            ReqFlags::NO_UNMAP
        };
        self.q.write_zeroes(offset, len, tag, flags);
        tag
    }

    /// Makes the device see the submitted requests (libblkio only notifies it from `do_io`)
    /// without waiting for any of them.
    pub fn kick(&mut self) {
        self.q
            .do_io(&mut [], 0, None, None)
            .unwrap_or_else(|e| panic!("blkioq_do_io: {e} ({})", e.errno()));
    }

    /// Waits (bounded by [`TIMEOUT`]) for every submitted request and returns their outcomes,
    /// indexed by tag. Frees the batch's buffers.
    pub fn wait_all(&mut self) -> Vec<Done> {
        let mut remaining = self.pending.iter().filter(|p| p.ret.is_none()).count();
        let mut slots: Vec<mem::MaybeUninit<Completion>> =
            (0..remaining).map(|_| mem::MaybeUninit::uninit()).collect();
        let deadline = Instant::now() + TIMEOUT;
        while remaining > 0 {
            let mut left = deadline.saturating_duration_since(Instant::now());
            let reaped =
                match self
                    .q
                    .do_io(&mut slots[..remaining], remaining, Some(&mut left), None)
                {
                    Ok(n) => n,
                    Err(e) if e.errno() == Errno::TIME => panic!(
                        "{remaining} of {} requests still incomplete after {TIMEOUT:?}",
                        self.pending.len()
                    ),
                    Err(e) => panic!("blkioq_do_io: {e} ({})", e.errno()),
                };
            for slot in &slots[..reaped] {
                // SAFETY: do_io initialised the first `reaped` entries of the slice it was given.
                let c = unsafe { slot.assume_init_read() };
                let pending = self
                    .pending
                    .get_mut(c.user_data)
                    .filter(|p| p.ret.is_none())
                    .unwrap_or_else(|| panic!("completion for unknown request {}", c.user_data));
                pending.ret = Some(c.ret);
            }
            remaining -= reaped;
        }
        let done = self
            .pending
            .drain(..)
            .map(|p| {
                let ret = p.ret.expect("every request completed");
                let data = if p.is_read && ret == 0 {
                    p.iov
                        .iter()
                        .flat_map(|iov| {
                            // SAFETY: the segment lies in this queue's slice of the mapped
                            // region (see `alloc`), and its request has completed, so the
                            // device no longer writes to it.
                            unsafe { slice::from_raw_parts(iov.iov_base.cast::<u8>(), iov.iov_len) }
                        })
                        .copied()
                        .collect()
                } else {
                    Vec::new()
                };
                Done { ret, data }
            })
            .collect();
        self.used = 0;
        done
    }

    fn single(&mut self, submit: impl FnOnce(&mut Self) -> usize) -> Done {
        assert!(
            self.pending.is_empty(),
            "single-request helpers need an idle queue"
        );
        submit(self);
        self.wait_all().pop().expect("one completion")
    }

    fn ret_to_result(ret: i32) -> Result<(), i32> {
        if ret == 0 { Ok(()) } else { Err(ret) }
    }

    /// Writes `data` at `offset`; `Err` holds the negative errno.
    pub fn try_write(&mut self, offset: u64, data: &[u8]) -> Result<(), i32> {
        Self::ret_to_result(self.single(|q| q.submit_write(offset, data)).ret)
    }

    /// Reads `len` bytes at `offset`; `Err` holds the negative errno.
    pub fn try_read(&mut self, offset: u64, len: usize) -> Result<Vec<u8>, i32> {
        let done = self.single(|q| q.submit_read(offset, len));
        Self::ret_to_result(done.ret).map(|()| done.data)
    }

    pub fn try_flush(&mut self) -> Result<(), i32> {
        Self::ret_to_result(self.single(Self::submit_flush).ret)
    }

    pub fn try_discard(&mut self, offset: u64, len: u64) -> Result<(), i32> {
        Self::ret_to_result(self.single(|q| q.submit_discard(offset, len)).ret)
    }

    pub fn try_write_zeroes(&mut self, offset: u64, len: u64, unmap: bool) -> Result<(), i32> {
        Self::ret_to_result(
            self.single(|q| q.submit_write_zeroes(offset, len, unmap))
                .ret,
        )
    }

    #[track_caller]
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if let Err(ret) = self.try_write(offset, data) {
            panic!(
                "write of {} bytes at {offset}: {}",
                data.len(),
                describe_ret(ret)
            );
        }
    }

    #[track_caller]
    pub fn read(&mut self, offset: u64, len: usize) -> Vec<u8> {
        self.try_read(offset, len)
            .unwrap_or_else(|ret| panic!("read of {len} bytes at {offset}: {}", describe_ret(ret)))
    }

    #[track_caller]
    pub fn flush(&mut self) {
        if let Err(ret) = self.try_flush() {
            panic!("flush: {}", describe_ret(ret));
        }
    }

    #[track_caller]
    pub fn discard(&mut self, offset: u64, len: u64) {
        if let Err(ret) = self.try_discard(offset, len) {
            panic!("discard of {len} bytes at {offset}: {}", describe_ret(ret));
        }
    }

    #[track_caller]
    pub fn write_zeroes(&mut self, offset: u64, len: u64, unmap: bool) {
        if let Err(ret) = self.try_write_zeroes(offset, len, unmap) {
            panic!(
                "write-zeroes of {len} bytes at {offset} (unmap {unmap}): {}",
                describe_ret(ret)
            );
        }
    }
}

/// Memory shared with the backend: a memfd mapped into this process.
#[derive(Debug)]
struct SharedMem {
    file: File,
    addr: *mut u8,
    len: usize,
}

impl SharedMem {
    fn new(len: usize) -> io::Result<Self> {
        // SAFETY: the name is a NUL-terminated literal; the returned descriptor is checked and
        // then owned by `File`.
        let fd = unsafe { libc::memfd_create(c"vubd-test-buffers".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a freshly created descriptor nothing else owns.
        let file = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        file.set_len(u64::try_from(len).expect("usize fits u64"))?;
        // SAFETY: a new shared mapping at an address the kernel chooses overlaps no existing
        // Rust object; the result is checked against MAP_FAILED before use.
        let addr = unsafe {
            libc::mmap(
                ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Self {
            file,
            addr: addr.cast(),
            len,
        })
    }
}

impl Drop for SharedMem {
    fn drop(&mut self) {
        // SAFETY: `addr`/`len` is the mapping created in `new`; no reference into it outlives
        // the methods that copy data in and out.
        unsafe { libc::munmap(self.addr.cast(), self.len) };
    }
}

/// The features a well-behaved virtio-blk driver asks for, minus `VIRTIO_BLK_F_RO`, so that
/// [`RawFrontend`] can send writes a read-only device must refuse.
pub fn raw_features_without_ro() -> u64 {
    VirtioFeatureFlags::VERSION_1.bits()
        | (VirtioBlkFeatureFlags::SIZE_MAX
            | VirtioBlkFeatureFlags::SEG_MAX
            | VirtioBlkFeatureFlags::BLK_SIZE
            | VirtioBlkFeatureFlags::FLUSH
            | VirtioBlkFeatureFlags::TOPOLOGY
            | VirtioBlkFeatureFlags::CONFIG_WCE
            | VirtioBlkFeatureFlags::MQ
            | VirtioBlkFeatureFlags::DISCARD
            | VirtioBlkFeatureFlags::WRITE_ZEROES)
            .bits()
}

/// Size of [`RawFrontend`]'s single I/O buffer.
pub const RAW_BUFFER_LEN: usize = 1 << 20;

/// A single-queue vhost-user-blk frontend on libblkio's virtio layer, one request at a time.
/// It negotiates exactly the features it is given, so it can do what libblkio will not: keep
/// `VIRTIO_BLK_F_RO` unacknowledged and send writes anyway. Not `Send`: create and use it
/// inside [`bounded`].
pub struct RawFrontend {
    // The ring memory belongs to `transport`: the queue is declared first so it is dropped
    // first, which is what makes the `'static` borrow below harmless.
    queue: VirtioBlkQueue<'static, ()>,
    transport: Box<VirtioBlkTransport>,
    mem: SharedMem,
}

impl std::fmt::Debug for RawFrontend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawFrontend")
            .field("features", &format_args!("{:#x}", self.features()))
            .finish_non_exhaustive()
    }
}

impl RawFrontend {
    /// Connects, negotiates `features ∩ offered`, starts one queue of 16 entries and maps one
    /// buffer. Blocks on the socket: call inside [`bounded`].
    pub fn connect(socket: &Path, features: u64) -> io::Result<Self> {
        let path = socket.to_str().expect("socket path is UTF-8");
        let transport = VhostUser::<VirtioBlkConfig, VirtioBlkReqBuf>::new(path, features)?;
        let mut transport: Box<VirtioBlkTransport> = Box::new(transport);
        let mut queue = VirtioBlkQueue::setup_queues(&mut *transport, 1, 16)?
            .pop()
            .expect("one queue");
        queue.set_used_notif_enabled(true);
        let mem = SharedMem::new(RAW_BUFFER_LEN)?;
        transport.map_mem_region(mem.addr as usize, mem.len, mem.file.as_raw_fd(), 0)?;
        Ok(Self {
            queue,
            transport,
            mem,
        })
    }

    /// The negotiated virtio feature bits.
    pub fn features(&self) -> u64 {
        self.transport.get_features()
    }

    pub fn has_feature(&self, feature: VirtioBlkFeatureFlags) -> bool {
        VirtioBlkFeatureFlags::from_bits_truncate(self.features()).contains(feature)
    }

    /// The device configuration space (`GET_CONFIG`, offset 0, 60 bytes).
    pub fn config(&self) -> io::Result<VirtioBlkConfig> {
        self.transport.get_config()
    }

    fn buffer(&mut self, len: usize) -> *mut u8 {
        assert!(
            len <= self.mem.len,
            "raw requests are limited to {RAW_BUFFER_LEN} bytes"
        );
        self.mem.addr
    }

    /// Writes `data` at `offset`; returns 0 or a negative errno.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> i32 {
        let buf = self.buffer(data.len());
        // SAFETY: `buf` starts a mapping of at least `data.len()` bytes (checked by `buffer`),
        // and no request is in flight (each method reaps its request before returning).
        unsafe { ptr::copy_nonoverlapping(data.as_ptr(), buf, data.len()) };
        // SAFETY: the buffer lies in a region mapped into the device's memory table and is
        // not touched again until `complete` has reaped the request.
        unsafe { self.queue.write_raw(offset, buf, data.len(), ()) }.expect("queue write");
        self.complete()
    }

    /// Reads `len` bytes at `offset`; `Err` holds the negative errno.
    pub fn read(&mut self, offset: u64, len: usize) -> Result<Vec<u8>, i32> {
        let buf = self.buffer(len);
        // SAFETY: as in `write`: mapped, shared with the device, idle until reaped.
        unsafe { self.queue.read_raw(offset, buf, len, ()) }.expect("queue read");
        match self.complete() {
            // SAFETY: the read has completed, so the device no longer writes to the buffer,
            // which spans at least `len` mapped bytes.
            0 => Ok(unsafe { slice::from_raw_parts(buf, len) }.to_vec()),
            ret => Err(ret),
        }
    }

    pub fn discard(&mut self, offset: u64, len: u64) -> i32 {
        self.queue.discard(offset, len, ()).expect("queue discard");
        self.complete()
    }

    pub fn write_zeroes(&mut self, offset: u64, len: u64, unmap: bool) -> i32 {
        self.queue
            .write_zeroes(offset, len, unmap, ())
            .expect("queue write-zeroes");
        self.complete()
    }

    pub fn flush(&mut self) -> i32 {
        self.queue.flush(()).expect("queue flush");
        self.complete()
    }

    /// Kicks the device and waits (bounded) for the one outstanding request.
    fn complete(&mut self) -> i32 {
        self.transport
            .get_submission_notifier(0)
            .notify()
            .expect("kick");
        let call = self.transport.get_completion_fd(0);
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if let Some(c) = self.queue.completions().next() {
                return c.ret;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "raw request incomplete after {TIMEOUT:?}");
            let mut pfd = libc::pollfd {
                fd: call.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            let ms = libc::c_int::try_from(left.as_millis().clamp(1, 100)).expect("fits c_int");
            // SAFETY: `pfd` is one valid pollfd that outlives the call.
            let n = unsafe { libc::poll(&mut pfd, 1, ms) };
            assert!(n >= 0, "poll: {}", io::Error::last_os_error());
            if n > 0 {
                call.read().expect("read call eventfd");
            }
        }
    }
}
