//! [`RawFrontend`]: a vhost-user-blk frontend on libblkio's virtio layer (virtio-driver),
//! for what the libblkio API will not do: send requests for features it did not negotiate,
//! and show the raw configuration space.
//!
//! Not a submodule of `common`: declare it next to `mod common;` in the test binaries that use
//! it (see `common/mod.rs`).

// Each test binary uses a different part of this module.
#![allow(dead_code)]

use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::Instant;
use std::{ptr, slice};

use virtio_driver::{
    VhostUser, VirtioBlkConfig, VirtioBlkFeatureFlags, VirtioBlkQueue, VirtioBlkReqBuf,
    VirtioBlkTransport, VirtioFeatureFlags,
};
use vubd::mem::SharedMapping;

use crate::common::TIMEOUT;

/// The features a well-behaved virtio-blk driver asks for, minus `VIRTIO_BLK_F_RO`, so that
/// [`RawFrontend`] can send writes a read-only device must refuse.
pub fn features_without_ro() -> u64 {
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
pub const BUFFER_LEN: usize = 1 << 20;

/// A single-queue vhost-user-blk frontend on libblkio's virtio layer, one request at a time.
/// It negotiates exactly the features it is given, so it can do what libblkio will not: keep
/// `VIRTIO_BLK_F_RO` unacknowledged and send writes anyway. Not `Send`: create and use it
/// inside [`bounded`](crate::common::bounded).
pub struct RawFrontend {
    // The ring memory belongs to `transport`: the queue is declared first so it is dropped
    // first, which is what makes the `'static` borrow below harmless.
    queue: VirtioBlkQueue<'static, ()>,
    transport: Box<VirtioBlkTransport>,
    /// Memory shared with the backend: a memfd mapped into this process.
    mem: SharedMapping,
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
    /// buffer. Blocks on the socket: call inside [`bounded`](crate::common::bounded).
    pub fn connect(socket: &Path, features: u64) -> io::Result<Self> {
        let path = socket.to_str().expect("socket path is UTF-8");
        let transport = VhostUser::<VirtioBlkConfig, VirtioBlkReqBuf>::new(path, features)?;
        let mut transport: Box<VirtioBlkTransport> = Box::new(transport);
        let mut queue = VirtioBlkQueue::setup_queues(&mut *transport, 1, 16)?
            .pop()
            .expect("one queue");
        queue.set_used_notif_enabled(true);
        let mem =
            SharedMapping::memfd(c"vubd-test-buffers", BUFFER_LEN).map_err(io::Error::other)?;
        transport.map_mem_region(mem.as_ptr() as usize, mem.len(), mem.file().as_raw_fd(), 0)?;
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
            len <= self.mem.len(),
            "raw requests are limited to {BUFFER_LEN} bytes"
        );
        self.mem.as_ptr()
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
