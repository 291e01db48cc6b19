//! Submission and completion queue rings (NVMe Base 2.0 §3.3.1, §4.6) over memory the
//! caller provides.
//!
//! The rings keep the indices; the memory is reached through [`SqMem`] and [`CqMem`], so the
//! access strategy is explicit: slices for tests, volatile accesses to DMA memory for a
//! device ([`DmaSq`], [`DmaCq`]).
//!
//! - [`SqRing`]: the host owns the tail, the controller reports its head in every completion
//!   (SQHD). The queue is full with `size - 1` entries between them. Pushing marks the ring
//!   dirty; [`SqRing::take_doorbell`] hands out the tail once per batch.
//! - [`CqRing`]: the controller writes entries with a phase tag that flips on every pass
//!   through the ring; an entry is new when its tag equals the phase the host expects. The
//!   host reads the status dword first and the rest only after an Acquire fence, so it never
//!   sees half of a new entry. The head goes back in the CQ head doorbell, once per batch.
//!
//! On x86-64 the two fences only restrain the compiler: the CPU already keeps these loads,
//! and these stores, in order. A port to arm64 needs the outer-shareable barriers Linux uses
//! for DMA memory (`dma_rmb` / `dma_wmb`) in their place.

use std::ptr::NonNull;
use std::sync::atomic::{Ordering, fence};

use thiserror::Error;

use crate::nvme::spec::Cqe;

/// A submission queue entry in the form it takes in memory.
pub type SqSlot = [u8; 64];

/// Queue sizes: at least 2 entries (one is always empty), at most 65,536 (§3.3.1).
const MIN_ENTRIES: usize = 2;
const MAX_ENTRIES: usize = 1 << 16;

/// A ring that cannot be built or a controller that broke the queue protocol.
#[derive(Clone, Copy, Debug, Error, PartialEq, Eq)]
pub enum RingError {
    #[error("queue of {0} entries, need 2..=65536")]
    Size(usize),
    /// The controller reported an SQ head outside the entries it may have consumed: a
    /// controller fault; reset it.
    #[error("SQ head {sqhd} outside {head}..={tail}")]
    SqHead { sqhd: u16, head: u16, tail: u16 },
}

/// The submission queue is full: the controller has not yet consumed enough entries.
#[derive(Clone, Copy, Debug, Error, PartialEq, Eq)]
#[error("submission queue full")]
pub struct SqFull;

fn check_size(n: usize) -> Result<u32, RingError> {
    if (MIN_ENTRIES..=MAX_ENTRIES).contains(&n) {
        Ok(n as u32)
    } else {
        Err(RingError::Size(n))
    }
}

/// Memory of a submission queue: where the host writes entries for the controller to fetch.
pub trait SqMem {
    /// Number of entries.
    fn slots(&self) -> usize;
    /// Writes entry `index` (< `slots()`). The controller reads it only after a doorbell
    /// write covering it, which [`SqRing::take_doorbell`] orders after this store.
    fn store(&mut self, index: u16, entry: &SqSlot);
}

impl SqMem for [SqSlot] {
    fn slots(&self) -> usize {
        self.len()
    }

    fn store(&mut self, index: u16, entry: &SqSlot) {
        self[usize::from(index)] = *entry;
    }
}

impl SqMem for Vec<SqSlot> {
    fn slots(&self) -> usize {
        self.len()
    }

    fn store(&mut self, index: u16, entry: &SqSlot) {
        self[usize::from(index)] = *entry;
    }
}

/// Memory of a completion queue: where the controller writes entries.
pub trait CqMem {
    /// Number of entries.
    fn slots(&self) -> usize;
    /// The status field (bytes 15:14, phase tag in bit 0) of entry `index` (< `slots()`),
    /// read once from memory.
    fn load_status(&self, index: u16) -> u16;
    /// The whole of entry `index`. [`CqRing`] calls it only after `load_status` showed the
    /// expected phase, and after an Acquire fence.
    fn load(&self, index: u16) -> Cqe;
}

impl CqMem for [Cqe] {
    fn slots(&self) -> usize {
        self.len()
    }

    fn load_status(&self, index: u16) -> u16 {
        let b = self[usize::from(index)].as_bytes();
        u16::from_le_bytes([b[14], b[15]])
    }

    fn load(&self, index: u16) -> Cqe {
        self[usize::from(index)]
    }
}

impl CqMem for Vec<Cqe> {
    fn slots(&self) -> usize {
        self.len()
    }

    fn load_status(&self, index: u16) -> u16 {
        self.as_slice().load_status(index)
    }

    fn load(&self, index: u16) -> Cqe {
        self[usize::from(index)]
    }
}

/// The host's side of a submission queue.
#[derive(Debug)]
pub struct SqRing<M> {
    mem: M,
    size: u32,
    tail: u16,
    /// The controller's head, as last reported in a completion.
    head: u16,
    dirty: bool,
}

impl<M: SqMem> SqRing<M> {
    /// A ring over `mem`, empty (head = tail = 0, as after queue creation).
    pub fn new(mem: M) -> Result<Self, RingError> {
        let size = check_size(mem.slots())?;
        Ok(Self {
            mem,
            size,
            tail: 0,
            head: 0,
            dirty: false,
        })
    }

    fn next(&self, i: u16) -> u16 {
        let n = u32::from(i) + 1;
        // Below `size` <= 65536, so it fits.
        if n == self.size { 0 } else { n as u16 }
    }

    /// Entries between `from` and `to` going forward (both below `size`).
    fn distance(&self, from: u16, to: u16) -> u32 {
        let (from, to) = (u32::from(from), u32::from(to));
        if to >= from {
            to - from
        } else {
            to + self.size - from
        }
    }

    pub fn size(&self) -> u32 {
        self.size
    }

    pub fn tail(&self) -> u16 {
        self.tail
    }

    pub fn head(&self) -> u16 {
        self.head
    }

    /// Entries written and not yet reported consumed.
    pub fn in_flight(&self) -> u32 {
        self.distance(self.head, self.tail)
    }

    /// Entries that can be pushed now.
    pub fn free(&self) -> u32 {
        self.size - 1 - self.in_flight()
    }

    pub fn is_full(&self) -> bool {
        self.next(self.tail) == self.head
    }

    /// Writes `entry` at the tail and advances it; returns the new tail.
    pub fn push(&mut self, entry: &SqSlot) -> Result<u16, SqFull> {
        let next = self.next(self.tail);
        if next == self.head {
            return Err(SqFull);
        }
        self.mem.store(self.tail, entry);
        self.tail = next;
        self.dirty = true;
        Ok(next)
    }

    /// Takes the SQ head a completion reports (SQHD): the controller has fetched every entry
    /// before it. It must lie between the last reported head and the tail.
    pub fn update_head(&mut self, sqhd: u16) -> Result<(), RingError> {
        if u32::from(sqhd) >= self.size
            || self.distance(self.head, sqhd) > self.distance(self.head, self.tail)
        {
            return Err(RingError::SqHead {
                sqhd,
                head: self.head,
                tail: self.tail,
            });
        }
        self.head = sqhd;
        Ok(())
    }

    /// Entries were pushed since the last doorbell.
    pub fn needs_doorbell(&self) -> bool {
        self.dirty
    }

    /// The value for the SQ tail doorbell.
    pub fn doorbell_value(&self) -> u32 {
        u32::from(self.tail)
    }

    /// The tail for the doorbell if entries were pushed since the last one, else `None`.
    /// Issues a Release fence, so the entries' stores come before the caller's doorbell
    /// write (a volatile store to BAR0).
    pub fn take_doorbell(&mut self) -> Option<u32> {
        if !std::mem::take(&mut self.dirty) {
            return None;
        }
        fence(Ordering::Release);
        Some(self.doorbell_value())
    }

    pub fn mem(&self) -> &M {
        &self.mem
    }
}

/// The host's side of a completion queue.
#[derive(Debug)]
pub struct CqRing<M> {
    mem: M,
    size: u32,
    head: u16,
    /// The phase tag of new entries on this pass.
    phase: bool,
    dirty: bool,
}

impl<M: CqMem> CqRing<M> {
    /// A ring over `mem`, which must be zeroed before the queue is created: the controller's
    /// first pass writes phase 1 (§4.6).
    pub fn new(mem: M) -> Result<Self, RingError> {
        let size = check_size(mem.slots())?;
        Ok(Self {
            mem,
            size,
            head: 0,
            phase: true,
            dirty: false,
        })
    }

    pub fn size(&self) -> u32 {
        self.size
    }

    pub fn head(&self) -> u16 {
        self.head
    }

    /// The phase tag new entries carry on the current pass.
    pub fn phase(&self) -> bool {
        self.phase
    }

    /// The next new entry, if the controller has written one; advances the head (and flips
    /// the expected phase when it wraps).
    #[inline]
    pub fn pop(&mut self) -> Option<Cqe> {
        let status = self.mem.load_status(self.head);
        if (status & 1 != 0) != self.phase {
            return None;
        }
        // The rest of the entry was written before its phase tag; do not read it earlier.
        fence(Ordering::Acquire);
        let cqe = self.mem.load(self.head);
        let next = u32::from(self.head) + 1;
        if next == self.size {
            self.head = 0;
            self.phase = !self.phase;
        } else {
            self.head = next as u16;
        }
        self.dirty = true;
        Some(cqe)
    }

    /// Hands up to `max` new entries to `f`; returns how many.
    pub fn poll(&mut self, max: usize, mut f: impl FnMut(Cqe)) -> usize {
        let mut n = 0;
        while n < max {
            let Some(cqe) = self.pop() else { break };
            f(cqe);
            n += 1;
        }
        n
    }

    /// The value for the CQ head doorbell.
    pub fn doorbell_value(&self) -> u32 {
        u32::from(self.head)
    }

    /// The head for the doorbell if entries were consumed since the last one, else `None`.
    /// Until it is written the controller cannot reuse those entries.
    pub fn take_doorbell(&mut self) -> Option<u32> {
        std::mem::take(&mut self.dirty).then(|| self.doorbell_value())
    }

    pub fn mem(&self) -> &M {
        &self.mem
    }

    /// For a controller model writing entries (tests, [`super::Loopback`]).
    pub fn mem_mut(&mut self) -> &mut M {
        &mut self.mem
    }
}

/// Submission queue memory shared with a device (DMA memory mapped for it).
#[derive(Debug)]
pub struct DmaSq {
    base: NonNull<SqSlot>,
    slots: usize,
}

// SAFETY: `DmaSq` refers to DMA memory that its creator reserved for this queue (`new`'s
// contract); which thread writes it makes no difference to the device.
unsafe impl Send for DmaSq {}

impl DmaSq {
    /// # Safety
    ///
    /// `base` must point to `slots` entries of memory, aligned for `SqSlot`, that stay mapped
    /// and are used for nothing but this submission queue (by the host through this value,
    /// and by the controller reading it) for as long as the value lives.
    pub unsafe fn new(base: NonNull<SqSlot>, slots: usize) -> Self {
        Self { base, slots }
    }
}

impl SqMem for DmaSq {
    fn slots(&self) -> usize {
        self.slots
    }

    fn store(&mut self, index: u16, entry: &SqSlot) {
        let i = usize::from(index);
        assert!(i < self.slots, "SQ index {i} of {}", self.slots);
        // SAFETY: `i` is in bounds and `new`'s contract keeps the memory mapped and ours; the
        // controller does not read this slot until a doorbell covers it. Volatile, so the
        // compiler keeps the store before that (also volatile) doorbell write.
        unsafe { self.base.add(i).write_volatile(*entry) }
    }
}

/// Completion queue memory shared with a device (DMA memory mapped for it).
#[derive(Debug)]
pub struct DmaCq {
    base: NonNull<Cqe>,
    slots: usize,
}

// SAFETY: as for `DmaSq`: memory reserved for this queue by `new`'s contract.
unsafe impl Send for DmaCq {}

impl DmaCq {
    /// # Safety
    ///
    /// `base` must point to `slots` entries of memory, aligned for `Cqe`, that stay mapped
    /// and readable for as long as the value lives, and that nothing but the controller
    /// writes.
    pub unsafe fn new(base: NonNull<Cqe>, slots: usize) -> Self {
        Self { base, slots }
    }

    fn entry(&self, index: u16) -> NonNull<Cqe> {
        let i = usize::from(index);
        assert!(i < self.slots, "CQ index {i} of {}", self.slots);
        // SAFETY: `i` is within the `slots` entries `new`'s contract provides.
        unsafe { self.base.add(i) }
    }
}

impl CqMem for DmaCq {
    fn slots(&self) -> usize {
        self.slots
    }

    fn load_status(&self, index: u16) -> u16 {
        let dw3 = self.entry(index).cast::<u32>();
        // SAFETY: DW3 (bytes 15:12) lies within the entry, which `new`'s contract keeps mapped
        // and readable; a `Cqe` is 4-byte aligned, so is DW3. The controller may be writing it
        // right now: a volatile 32-bit load reads it once, whole.
        let dw3 = u32::from_le(unsafe { dw3.add(3).read_volatile() });
        (dw3 >> 16) as u16
    }

    fn load(&self, index: u16) -> Cqe {
        // SAFETY: in bounds and mapped (`new`'s contract); the caller saw the expected phase
        // tag, so the controller has finished writing this entry and will not touch it again
        // until the head doorbell releases it.
        unsafe { self.entry(index).read_volatile() }
    }
}

#[cfg(test)]
mod tests;
