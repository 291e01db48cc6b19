//! Inflight I/O tracking for split virtqueues (vhost-user, "Inflight I/O tracking",
//! protocol feature INFLIGHT_SHMFD): a shared memory region, kept by the frontend across
//! backend restarts, that records which descriptor heads were popped and not yet completed,
//! so that a new backend process resubmits exactly those, in the order they were popped.
//!
//! The region holds one area per queue:
//!
//! ```text
//! u64 features        0
//! u16 version         1 once the area is in use (0: uninitialised)
//! u16 desc_num        entries of desc[] (the queue size the frontend asked for)
//! u16 last_batch_head first entry of the last published batch's list
//! u16 used_idx        the used index the last batch was published at
//! desc[desc_num]: { u8 inflight; u8 pad[5]; u16 next; u64 counter }   (16 bytes each)
//! ```
//!
//! Every store follows the spec's order, so that a process killed at any instruction leaves a
//! state the next one recovers exactly:
//! - pop: `counter` (from the queue's running counter), then `inflight = 1`, before the
//!   request is submitted;
//! - complete: link the head into the batch list (`next = last_batch_head`,
//!   `last_batch_head = head`) before the used element is published; after the used index
//!   is published, clear `inflight` along the batch list, then set `used_idx`.
//! - recover: a `used_idx` behind the used ring's index means the last batch was published
//!   but not cleared: clear it along its list. Whatever is still in flight is resubmitted in
//!   `counter` order, and the next avail index is `used + in flight`.
//!
//! The stores are volatile: the compiler keeps their order, and the next process reads the
//! region only after this one is gone, when every store it executed is visible.
//!
//! After the queue areas, vubd keeps a small device area of its own (the region's size is
//! the backend's to choose; the frontend only keeps the file): the guest's write cache mode
//! (CONFIG_WCE), which the frontend caches and never sends again on a reconnect, so that a
//! restarted vubd keeps honouring it. A region without that area (made by another backend)
//! is still used for its queues.

use std::fs::File;
use std::sync::Arc;

use thiserror::Error;

use super::config::WriteCache;
use crate::mem::fault::{DeviceFaults, FaultError, Mapped};
use crate::mem::{SharedError, SharedMapping};

/// Size of one `desc[]` entry.
const DESC_STATE: usize = 16;
/// Size of a queue area's header.
const HEADER: usize = 16;
/// Queue areas start on cache lines.
const ALIGN: usize = 64;
/// `version` of an area in use.
const VERSION: u16 = 1;

// Header fields.
const OFF_VERSION: usize = 8;
const OFF_DESC_NUM: usize = 10;
const OFF_LAST_BATCH_HEAD: usize = 12;
const OFF_USED_IDX: usize = 14;
// Fields of a desc[] entry.
const DESC_INFLIGHT: usize = 0;
const DESC_NEXT: usize = 6;
const DESC_COUNTER: usize = 8;

/// The device area after the queue areas: a magic number, then the write cache mode.
const DEVICE_AREA: usize = 64;
const DEVICE_MAGIC: u64 = u64::from_le_bytes(*b"vubd-dev");
const OFF_WRITEBACK: usize = 8;
/// Values of the write cache byte (0: not recorded).
const WRITETHROUGH: u8 = 1;
const WRITEBACK: u8 = 2;
const WRITE_CACHE_UNKNOWN: u8 = 3;

/// Largest queue the region describes (virtio 1.2 §2.7: 32768 for split rings).
pub const MAX_QUEUE_SIZE: u16 = 32768;

/// Why a region could not be created or used.
#[derive(Debug, Error)]
pub enum InflightError {
    #[error("inflight region for {num_queues} queues of {queue_size} entries is not valid")]
    BadShape { num_queues: u16, queue_size: u16 },
    #[error("inflight region of {size} bytes at offset {offset} cannot hold {need} bytes")]
    TooSmall { size: u64, offset: u64, need: u64 },
    #[error("inflight region")]
    Shared(#[from] SharedError),
}

/// Bytes of one queue's area for queues of `queue_size` entries.
pub fn queue_area_size(queue_size: u16) -> usize {
    (HEADER + DESC_STATE * usize::from(queue_size)).next_multiple_of(ALIGN)
}

fn check_shape(num_queues: u16, queue_size: u16) -> Result<(), InflightError> {
    if num_queues == 0 || queue_size == 0 || queue_size > MAX_QUEUE_SIZE {
        return Err(InflightError::BadShape {
            num_queues,
            queue_size,
        });
    }
    Ok(())
}

/// The whole region, mapped: one area per queue.
#[derive(Debug)]
pub struct InflightRegion {
    map: SharedMapping,
    num_queues: u16,
    queue_size: u16,
}

impl InflightRegion {
    /// A new, zeroed region in a memfd (GET_INFLIGHT_FD).
    pub fn create(num_queues: u16, queue_size: u16) -> Result<Self, InflightError> {
        check_shape(num_queues, queue_size)?;
        let size = queue_area_size(queue_size) * usize::from(num_queues) + DEVICE_AREA;
        Ok(Self {
            map: SharedMapping::memfd(c"vubd-inflight", size)?,
            num_queues,
            queue_size,
        })
    }

    /// The region a frontend kept (SET_INFLIGHT_FD): `size` bytes at `offset` of `file`.
    pub fn adopt(
        file: File,
        offset: u64,
        size: u64,
        num_queues: u16,
        queue_size: u16,
    ) -> Result<Self, InflightError> {
        check_shape(num_queues, queue_size)?;
        let need = (queue_area_size(queue_size) * usize::from(num_queues)) as u64;
        if size < need {
            return Err(InflightError::TooSmall { size, offset, need });
        }
        // The device area too, when the region has room for it (one vubd made).
        let with_device = need + DEVICE_AREA as u64;
        let len = if size >= with_device {
            with_device
        } else {
            need
        };
        Ok(Self {
            map: SharedMapping::of_file(file, offset, len)?,
            num_queues,
            queue_size,
        })
    }

    /// Registers the region's mapping as `owner`'s: a fault in it (the frontend shortened the
    /// file) fails that device session instead of the process.
    pub fn watch(&mut self, owner: &Arc<DeviceFaults>) -> Result<(), FaultError> {
        self.map.watch(Mapped::Inflight, owner)
    }

    /// The file to hand to the frontend.
    pub fn file(&self) -> &File {
        self.map.file()
    }

    /// Mapped size, as GET_INFLIGHT_FD reports it.
    pub fn size(&self) -> u64 {
        self.map.len() as u64
    }

    pub fn num_queues(&self) -> u16 {
        self.num_queues
    }

    pub fn queue_size(&self) -> u16 {
        self.queue_size
    }

    /// Where the device area is, if the region has one.
    fn device_area(&self) -> Option<*mut u8> {
        let queues = queue_area_size(self.queue_size) * usize::from(self.num_queues);
        (self.map.len() >= queues + DEVICE_AREA).then(|| self.map.as_ptr().wrapping_add(queues))
    }

    /// The guest's write cache mode as an earlier process recorded it, `None` when none did.
    pub fn write_cache(&self) -> Option<WriteCache> {
        let area = self.device_area()?;
        // SAFETY: the device area lies inside the mapping (checked in `device_area`), 64-byte
        // aligned; another process may have written it, so read volatile.
        let (magic, mode) = unsafe {
            (
                area.cast::<u64>().read_volatile(),
                area.add(OFF_WRITEBACK).read_volatile(),
            )
        };
        match (magic == DEVICE_MAGIC, mode) {
            (true, WRITETHROUGH) => Some(WriteCache::Through),
            (true, WRITEBACK) => Some(WriteCache::Back),
            (true, WRITE_CACHE_UNKNOWN) => Some(WriteCache::Unknown),
            _ => None,
        }
    }

    /// Records the guest's write cache mode for the next process; false when the region has
    /// no device area.
    pub fn set_write_cache(&self, mode: WriteCache) -> bool {
        let Some(area) = self.device_area() else {
            return false;
        };
        let byte = match mode {
            WriteCache::Back => WRITEBACK,
            WriteCache::Through => WRITETHROUGH,
            WriteCache::Unknown => WRITE_CACHE_UNKNOWN,
        };
        // SAFETY: as in `write_cache`; the control plane is the only writer of this area.
        unsafe {
            area.add(OFF_WRITEBACK).write_volatile(byte);
            area.cast::<u64>().write_volatile(DEVICE_MAGIC);
        }
        true
    }

    /// The area of queue `q`, for a ring of `ring_size` entries; `None` when the region has
    /// no area for it (fewer queues, or smaller ones, than the frontend now uses).
    pub fn queue(self: &Arc<Self>, q: u16, ring_size: u16) -> Option<InflightQueue> {
        if q >= self.num_queues || ring_size > self.queue_size {
            return None;
        }
        let off = queue_area_size(self.queue_size) * usize::from(q);
        Some(InflightQueue {
            // In bounds: `off + area` ≤ the mapped size, by construction.
            base: self.map.as_ptr().wrapping_add(off),
            desc_num: self.queue_size,
            counter: 0,
            batch: 0,
            _region: Arc::clone(self),
        })
    }
}

/// One queue's area, owned by the poller that serves the queue.
#[derive(Debug)]
pub struct InflightQueue {
    base: *mut u8,
    /// Entries of `desc[]` (every head index the poller passes is checked against it).
    desc_num: u16,
    /// The running counter that orders pops.
    counter: u64,
    /// Heads linked into the batch not yet published.
    batch: u16,
    /// Keeps the mapping alive.
    _region: Arc<InflightRegion>,
}

// SAFETY: `base` points into a mapping that `_region` keeps alive; the area is used by one
// thread at a time (the control plane until it hands the queue to its poller).
unsafe impl Send for InflightQueue {}

/// What a queue's area recorded when it was taken up.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Recovered {
    /// Heads to resubmit, in the order they were first popped.
    pub resubmit: Vec<u16>,
}

impl InflightQueue {
    #[inline(always)]
    fn at(&self, off: usize) -> *mut u8 {
        self.base.wrapping_add(off)
    }

    #[inline(always)]
    fn desc(&self, head: u16) -> usize {
        HEADER + DESC_STATE * usize::from(head)
    }

    /// Stores `v` at `off` (a field of this queue's area: u8, u16 or u64).
    #[inline(always)]
    fn write<T: Copy>(&self, off: usize, v: T) {
        #[cfg(test)]
        if !tests::store_allowed() {
            return;
        }
        // SAFETY: every caller's offset is a field of this queue's area (a header field, or
        // one of a desc[] entry of an index below `desc_num`), which the mapping holds;
        // areas start 64-byte aligned and each field sits at a multiple of its size.
        unsafe { self.at(off).cast::<T>().write_volatile(v) }
    }

    /// Loads the field at `off`, as `write` stores it (another process may have).
    #[inline(always)]
    fn read<T: Copy>(&self, off: usize) -> T {
        // SAFETY: as in `write`.
        unsafe { self.at(off).cast::<T>().read_volatile() }
    }

    /// Takes the area up for a ring whose used index is `used_idx` (read from guest memory):
    /// initialises an unused area, or repairs the last batch and lists what to resubmit.
    /// The values come from another process (or a hostile frontend): every index is checked
    /// and every walk bounded.
    pub fn recover(&mut self, used_idx: u16) -> Recovered {
        if self.read::<u16>(OFF_VERSION) != VERSION {
            self.reset(used_idx);
            return Recovered::default();
        }
        let recorded = self.read::<u16>(OFF_USED_IDX);
        if recorded != used_idx {
            // The last batch reached the used ring but its entries were not all cleared.
            let batch = used_idx.wrapping_sub(recorded).min(self.desc_num);
            let mut head = self.read::<u16>(OFF_LAST_BATCH_HEAD);
            for _ in 0..batch {
                if head >= self.desc_num {
                    break;
                }
                let d = self.desc(head);
                self.write(d + DESC_INFLIGHT, 0u8);
                head = self.read::<u16>(d + DESC_NEXT);
            }
            self.write::<u16>(OFF_USED_IDX, used_idx);
        }
        let mut pending: Vec<(u64, u16)> = (0..self.desc_num)
            // Anything but 0 is in flight: when in doubt, resubmit rather than lose.
            .filter(|&i| self.read::<u8>(self.desc(i) + DESC_INFLIGHT) != 0)
            .map(|i| (self.read::<u64>(self.desc(i) + DESC_COUNTER), i))
            .collect();
        pending.sort_unstable();
        self.counter = pending.last().map_or(0, |&(c, _)| c.wrapping_add(1));
        self.batch = 0;
        Recovered {
            resubmit: pending.into_iter().map(|(_, head)| head).collect(),
        }
    }

    /// Claims the area afresh, nothing in flight, for a ring whose used index is `used_idx`:
    /// a fresh area, or one whose record cannot be true (zeroes it: a frontend may hand over
    /// any bytes).
    pub fn reset(&mut self, used_idx: u16) {
        for i in 0..self.desc_num {
            let d = self.desc(i);
            self.write(d + DESC_INFLIGHT, 0u8);
            self.write::<u16>(d + DESC_NEXT, 0);
            self.write::<u64>(d + DESC_COUNTER, 0);
        }
        self.write::<u16>(OFF_DESC_NUM, self.desc_num);
        self.write::<u16>(OFF_LAST_BATCH_HEAD, 0);
        self.write::<u16>(OFF_USED_IDX, used_idx);
        self.write::<u64>(0, 0);
        self.write::<u16>(OFF_VERSION, VERSION);
        self.counter = 0;
        self.batch = 0;
    }

    /// Records `head` as popped: before the request starts.
    #[inline(always)]
    pub fn begin(&mut self, head: u16) {
        if head >= self.desc_num {
            return;
        }
        let d = self.desc(head);
        self.write::<u64>(d + DESC_COUNTER, self.counter);
        self.counter = self.counter.wrapping_add(1);
        self.write(d + DESC_INFLIGHT, 1u8);
    }

    /// Adds `head` to the batch about to be published: before its used element.
    #[inline(always)]
    pub fn link(&mut self, head: u16) {
        if head >= self.desc_num {
            return;
        }
        let last = self.read::<u16>(OFF_LAST_BATCH_HEAD);
        self.write::<u16>(self.desc(head) + DESC_NEXT, last);
        self.write::<u16>(OFF_LAST_BATCH_HEAD, head);
        self.batch = self.batch.wrapping_add(1);
    }

    /// The heads linked since the last call were published, the used index is now
    /// `used_idx`: clears their `inflight` flags, then records the index.
    #[inline(always)]
    pub fn published(&mut self, used_idx: u16) {
        let mut head = self.read::<u16>(OFF_LAST_BATCH_HEAD);
        for _ in 0..std::mem::take(&mut self.batch) {
            if head >= self.desc_num {
                break;
            }
            let d = self.desc(head);
            self.write(d + DESC_INFLIGHT, 0u8);
            head = self.read::<u16>(d + DESC_NEXT);
        }
        self.write::<u16>(OFF_USED_IDX, used_idx);
    }
}

#[cfg(test)]
mod tests;
