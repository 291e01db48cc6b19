//! The in-flight table of a poller: one slot per request the guest can have outstanding,
//! allocated up front, found by tag in O(1) through a free list.

use vm_memory::GuestAddress;

use super::worker::Completion;
use crate::mem::{IovecList, MemSnapshot};
use crate::virtio_blk::Status;

/// Index of a slot; travels through the I/O channel as the operation's user data.
pub type Tag = u32;

#[derive(Debug)]
struct Slot {
    /// Local queue index within the poller.
    queue: u16,
    head: u16,
    status_addr: GuestAddress,
    used_len: u32,
    /// Bytes a read or write request must transfer, summed over its operations (a device may
    /// split a request); `None` for other requests.
    expect: Option<u32>,
    /// Bytes the request's operations reported so far.
    transferred: u32,
    /// Channel completions still to come.
    pending: u32,
    error: bool,
    /// When the poller took the request, on its clock (0 without metrics).
    started: u64,
    /// Keeps the guest memory the iovecs point into mapped until the request ends.
    mem: Option<MemSnapshot>,
    iov: IovecList,
}

impl Slot {
    fn new(iov_cap: usize) -> Self {
        Slot {
            queue: 0,
            head: 0,
            status_addr: GuestAddress(0),
            used_len: 0,
            expect: None,
            transferred: 0,
            pending: 0,
            error: false,
            started: 0,
            mem: None,
            iov: IovecList::with_capacity(iov_cap),
        }
    }
}

/// Preallocated slots and their free list.
#[derive(Debug)]
pub struct SlotTable {
    slots: Vec<Slot>,
    free: Vec<Tag>,
    iov_cap: usize,
}

impl SlotTable {
    /// `depth` slots, each able to hold `iov_cap` iovecs.
    pub fn new(depth: usize, iov_cap: usize) -> Self {
        let mut t = Self {
            slots: Vec::new(),
            free: Vec::new(),
            iov_cap,
        };
        t.grow(depth);
        t
    }

    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    /// Adds `n` free slots (control path: allocates).
    pub fn grow(&mut self, n: usize) {
        let iov_cap = self.iov_cap;
        let start = self.slots.len();
        self.slots.extend((0..n).map(|_| Slot::new(iov_cap)));
        self.free.extend((start..start + n).rev().map(|t| t as Tag));
    }

    #[inline]
    pub fn is_full(&self) -> bool {
        self.free.is_empty()
    }

    #[cfg(test)]
    pub fn in_use(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    #[inline]
    pub fn alloc(&mut self) -> Option<Tag> {
        self.free.pop()
    }

    /// Returns a slot to the free list, dropping its memory snapshot.
    #[inline]
    pub fn free(&mut self, tag: Tag) {
        let slot = &mut self.slots[tag as usize];
        slot.mem = None;
        slot.pending = 0;
        self.free.push(tag);
    }

    #[inline]
    pub fn iov(&self, tag: Tag) -> &IovecList {
        &self.slots[tag as usize].iov
    }

    #[inline]
    pub fn iov_mut(&mut self, tag: Tag) -> &mut IovecList {
        &mut self.slots[tag as usize].iov
    }

    /// Records a request that is about to be queued to the channel, which the poller took at
    /// `started` (for the metrics).
    #[allow(clippy::too_many_arguments)]
    #[inline]
    pub fn begin(
        &mut self,
        tag: Tag,
        queue: usize,
        head: u16,
        status_addr: GuestAddress,
        used_len: u32,
        expect: Option<u32>,
        started: u64,
        mem: MemSnapshot,
    ) {
        let slot = &mut self.slots[tag as usize];
        slot.queue = queue as u16;
        slot.head = head;
        slot.status_addr = status_addr;
        slot.used_len = used_len;
        slot.expect = expect;
        slot.transferred = 0;
        slot.pending = 0;
        slot.error = false;
        slot.started = started;
        slot.mem = Some(mem);
    }

    #[inline]
    pub fn add_pending(&mut self, tag: Tag, n: u32) {
        self.slots[tag as usize].pending += n;
    }

    pub fn set_error(&mut self, tag: Tag) {
        self.slots[tag as usize].error = true;
    }

    /// Accounts one channel completion; true when it was the request's last one. A result
    /// for a tag that has nothing pending is ignored.
    #[inline]
    pub fn complete_op(&mut self, tag: Tag, result: i32) -> bool {
        let Some(slot) = self.slots.get_mut(tag as usize) else {
            return false;
        };
        if slot.pending == 0 {
            return false;
        }
        match u32::try_from(result) {
            Ok(n) => slot.transferred = slot.transferred.saturating_add(n),
            Err(_) => {
                tracing::debug!(tag, result, "I/O operation failed");
                slot.error = true;
            }
        }
        slot.pending -= 1;
        if slot.pending > 0 {
            return false;
        }
        if slot.expect.is_some_and(|want| want != slot.transferred) {
            tracing::debug!(tag, transferred = slot.transferred, expect = ?slot.expect, "short transfer");
            slot.error = true;
        }
        true
    }

    /// How the request in `tag` ends.
    #[inline]
    pub fn finish(&self, tag: Tag) -> Completion {
        let slot = &self.slots[tag as usize];
        Completion {
            status_addr: slot.status_addr,
            status: if slot.error {
                Status::IoErr
            } else {
                Status::Ok
            },
            used_len: if slot.error { 1 } else { slot.used_len },
        }
    }

    /// For the metrics: when the request in `tag` started, and the bytes it moves if it
    /// succeeds (into the guest's buffers: true, for a read; out of them: false).
    #[inline]
    pub fn accounting(&self, tag: Tag) -> (u64, (bool, u32)) {
        let slot = &self.slots[tag as usize];
        (slot.started, (slot.used_len > 1, slot.expect.unwrap_or(0)))
    }

    /// Frees the slot and hands back its memory snapshot (for writing the status).
    #[inline]
    pub fn release(&mut self, tag: Tag) -> Option<MemSnapshot> {
        let mem = self.slots[tag as usize].mem.take();
        self.free(tag);
        mem
    }

    /// The request returns data in its buffers (a read): they are guest memory written.
    #[inline]
    pub fn returns_data(&self, tag: Tag) -> bool {
        self.slots[tag as usize].used_len > 1
    }

    /// The memory snapshot the request's iovecs point into.
    #[inline]
    pub fn mem_of(&self, tag: Tag) -> Option<&MemSnapshot> {
        self.slots[tag as usize].mem.as_ref()
    }

    #[inline]
    pub fn queue_of(&self, tag: Tag) -> usize {
        usize::from(self.slots[tag as usize].queue)
    }

    #[inline]
    pub fn head_of(&self, tag: Tag) -> u16 {
        self.slots[tag as usize].head
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_are_reused_after_free_and_table_reports_full() {
        let mut t = SlotTable::new(2, 1);
        let a = t.alloc().expect("a");
        let b = t.alloc().expect("b");
        assert_ne!(a, b);
        assert!(t.is_full());
        assert_eq!(t.in_use(), 2);
        t.free(a);
        assert_eq!(t.alloc(), Some(a));
    }

    #[test]
    fn request_finishes_after_its_last_operation_with_first_error_kept() {
        let mem = std::sync::Arc::new(
            crate::mem::GuestMemory::from_ranges(&[(GuestAddress(0), 0x1000)]).expect("mem"),
        );
        let mut t = SlotTable::new(1, 1);
        let tag = t.alloc().expect("tag");
        t.begin(tag, 0, 7, GuestAddress(0x10), 1, None, 0, mem);
        t.add_pending(tag, 2);
        assert!(!t.complete_op(tag, -libc::EIO));
        assert!(t.complete_op(tag, 0));
        let c = t.finish(tag);
        assert_eq!(c.status, Status::IoErr);
        assert_eq!(t.head_of(tag), 7);
        assert!(t.release(tag).is_some());
        assert!(!t.complete_op(tag, 0), "a stray completion is ignored");
    }

    #[test]
    fn short_transfer_is_an_error() {
        let mem = std::sync::Arc::new(
            crate::mem::GuestMemory::from_ranges(&[(GuestAddress(0), 0x1000)]).expect("mem"),
        );
        let mut t = SlotTable::new(1, 1);
        let tag = t.alloc().expect("tag");
        t.begin(tag, 0, 0, GuestAddress(0), 4097, Some(4096), 0, mem);
        t.add_pending(tag, 1);
        assert!(t.complete_op(tag, 2048));
        assert_eq!(t.finish(tag).status, Status::IoErr);
        assert_eq!(t.finish(tag).used_len, 1);
    }

    #[test]
    fn a_request_split_into_operations_transfers_the_sum_of_their_bytes() {
        let mem = std::sync::Arc::new(
            crate::mem::GuestMemory::from_ranges(&[(GuestAddress(0), 0x1000)]).expect("mem"),
        );
        let mut t = SlotTable::new(1, 1);
        let tag = t.alloc().expect("tag");
        t.begin(
            tag,
            0,
            0,
            GuestAddress(0),
            8193,
            Some(8192),
            77,
            mem.clone(),
        );
        t.add_pending(tag, 2);
        assert!(!t.complete_op(tag, 4096));
        assert!(t.complete_op(tag, 4096));
        let c = t.finish(tag);
        assert_eq!(c.status, Status::Ok);
        assert_eq!(c.used_len, 8193);
        assert_eq!(t.accounting(tag), (77, (true, 8192)), "for the metrics");
        assert!(t.release(tag).is_some());
        // One part short: the whole request fails.
        let tag = t.alloc().expect("tag");
        t.begin(tag, 0, 0, GuestAddress(0), 8193, Some(8192), 0, mem);
        t.add_pending(tag, 2);
        assert!(!t.complete_op(tag, 4096));
        assert!(t.complete_op(tag, 4095));
        assert_eq!(t.finish(tag).status, Status::IoErr);
    }
}
