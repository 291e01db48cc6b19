//! A vhost-user-blk frontend on libblkio: [`Client`] connects and starts the queues, each
//! [`Queue`] submits any number of requests into its own slice of one shared buffer region and
//! reaps them with a bounded wait.

use std::path::Path;
use std::time::{Duration, Instant};
use std::{mem, ptr, slice};

use blkio::{Blkio, Blkioq, Completion, Errno, ReqFlags, iovec};

use super::{TIMEOUT, bounded, describe_ret};

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

    /// Maps a new memory region while the device runs (ADD_MEM_REG) and moves every queue's
    /// buffers into it; the old region stays mapped. Only with nothing in flight.
    pub fn move_buffers_to_new_region(&mut self) -> Result<(), blkio::Error> {
        assert!(
            self.queues.iter().all(|q| q.pending.is_empty()),
            "requests in flight"
        );
        let per_queue = self.queues.first().map_or(0, |q| q.len);
        let region = self
            .blkio
            .alloc_mem_region(per_queue * self.queues.len().max(1))?;
        self.blkio.map_mem_region(&region)?;
        let base = region.addr as *mut u8;
        for (i, q) in self.queues.iter_mut().enumerate() {
            q.base = base.wrapping_add(i * per_queue);
            q.used = 0;
        }
        Ok(())
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
    /// The guard areas around the buffer of a [`Queue::submit_read_guarded`] read (before,
    /// then after) as they are now; empty for other requests.
    pub guards: Vec<Vec<u8>>,
}

#[derive(Debug)]
struct Pending {
    // Boxed so the array libblkio points at stays put while `pending` grows.
    iov: Box<[iovec]>,
    is_read: bool,
    ret: Option<i32>,
    /// Memory around the request's buffers, outside every request (see
    /// [`Queue::submit_read_guarded`]).
    guards: Box<[iovec]>,
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
            guards: Box::new([]),
        });
        (tag, ptr, count)
    }

    /// Buffers of this batch holding a copy of `segments`, one iovec each.
    fn filled(&mut self, segments: &[&[u8]]) -> Box<[iovec]> {
        segments
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
            .collect()
    }

    /// Queues a write of the concatenation of `segments` at `offset`, one descriptor per
    /// segment. Returns the request's tag (its index in [`Queue::wait_all`]'s result).
    pub fn submit_writev(&mut self, offset: u64, segments: &[&[u8]]) -> usize {
        let iov = self.filled(segments);
        let (tag, ptr, count) = self.track(iov, false);
        self.q.writev(offset, ptr, count, tag, ReqFlags::empty());
        tag
    }

    /// Queues a read at `offset` into buffers that hold `segments` beforehand, one descriptor
    /// per segment: the data read back shows what the device wrote into them and what it left
    /// alone. Returns the request's tag.
    pub fn submit_readv_over(&mut self, offset: u64, segments: &[&[u8]]) -> usize {
        let iov = self.filled(segments);
        let (tag, ptr, count) = self.track(iov, true);
        self.q.readv(offset, ptr, count, tag, ReqFlags::empty());
        tag
    }

    /// Queues a read at `offset` into segments of the given lengths. Returns the request's tag.
    pub fn submit_readv(&mut self, offset: u64, segment_lens: &[usize]) -> usize {
        let iov: Box<[iovec]> = segment_lens.iter().map(|&len| self.alloc(len)).collect();
        let (tag, ptr, count) = self.track(iov, true);
        self.q.readv(offset, ptr, count, tag, ReqFlags::empty());
        tag
    }

    /// Queues a read of `len` bytes at `offset` into a buffer that has a copy of `guard` right
    /// before and right after it, in the same memory region but outside every request: what
    /// [`Done::guards`] then holds shows whether the device wrote outside the request's
    /// buffer. `len` and `guard.len()` are multiples of 512, so that no gap lies between the
    /// buffer and its guards. Returns the request's tag.
    pub fn submit_read_guarded(&mut self, offset: u64, len: usize, guard: &[u8]) -> usize {
        assert!(
            len % BUFFER_ALIGN == 0 && guard.len() % BUFFER_ALIGN == 0,
            "guarded reads need lengths that are multiples of {BUFFER_ALIGN}"
        );
        let before = self.filled(&[guard]);
        let iov: Box<[iovec]> = Box::new([self.alloc(len)]);
        let after = self.filled(&[guard]);
        let (tag, ptr, count) = self.track(iov, true);
        self.pending[tag].guards = before.iter().chain(after.iter()).copied().collect();
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
        self.wait_all_within(TIMEOUT).unwrap_or_else(|remaining| {
            panic!(
                "{remaining} of {} requests still incomplete after {TIMEOUT:?}",
                self.pending.len()
            )
        })
    }

    /// [`Queue::wait_all`] within `timeout`; `Err` holds how many requests are still
    /// incomplete then (they stay pending).
    pub fn wait_all_within(&mut self, timeout: Duration) -> Result<Vec<Done>, usize> {
        let mut remaining = self.pending.iter().filter(|p| p.ret.is_none()).count();
        let mut slots: Vec<mem::MaybeUninit<Completion>> =
            (0..remaining).map(|_| mem::MaybeUninit::uninit()).collect();
        let deadline = Instant::now() + timeout;
        while remaining > 0 {
            let mut left = deadline.saturating_duration_since(Instant::now());
            let reaped =
                match self
                    .q
                    .do_io(&mut slots[..remaining], remaining, Some(&mut left), None)
                {
                    Ok(n) => n,
                    Err(e) if e.errno() == Errno::TIME => return Err(remaining),
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
                let guards = p
                    .guards
                    .iter()
                    .map(|iov| {
                        // SAFETY: the guard lies in this queue's slice of the mapped region
                        // (see `alloc`) and no request uses it; the batch is over, so nothing
                        // writes to it any more.
                        unsafe { slice::from_raw_parts(iov.iov_base.cast::<u8>(), iov.iov_len) }
                            .to_vec()
                    })
                    .collect();
                Done { ret, data, guards }
            })
            .collect();
        self.used = 0;
        Ok(done)
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

    /// Reads `prefill.len()` bytes at `offset` into a buffer that holds `prefill` beforehand;
    /// `Err` holds the negative errno.
    pub fn try_read_over(&mut self, offset: u64, prefill: &[u8]) -> Result<Vec<u8>, i32> {
        let done = self.single(|q| q.submit_readv_over(offset, &[prefill]));
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
