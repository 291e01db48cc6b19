//! Direct access to a split virtqueue's available and used rings (virtio 1.2 §2.7.6, §2.7.8)
//! through host pointers: what the poller does per request, without vm-memory's generic
//! accessors. virtio-queue's `Queue` stays the owner of the ring's configuration and indices;
//! the poller reads them from it and writes the indices back once per batch.

use std::num::Wrapping;
use std::sync::atomic::{Ordering, fence};

use crate::mem::HostMap;

/// `VRING_USED_F_NO_NOTIFY`: the device does not want kicks (without EVENT_IDX).
const USED_F_NO_NOTIFY: u16 = 1;
/// `VRING_AVAIL_F_NO_INTERRUPT`: the driver does not want interrupts (without EVENT_IDX).
const AVAIL_F_NO_INTERRUPT: u16 = 1;

/// Host pointers to one queue's rings, valid while the [`HostMap`] they came from is.
#[derive(Clone, Copy, Debug)]
pub struct SplitRing {
    avail: *mut u8,
    used: *mut u8,
    size: u16,
    event_idx: bool,
    /// Guest addresses the pointers were translated from (to notice a reconfiguration).
    avail_gpa: u64,
    used_gpa: u64,
}

// SAFETY: plain addresses into guest memory that the owner of the HostMap keeps mapped; the
// ring is only used by the poller that owns the queue.
unsafe impl Send for SplitRing {}

impl SplitRing {
    /// Translates the rings at `avail` and `used` of a queue of `size` entries. `None` when
    /// either is not inside one guest memory region or is misaligned (virtio 1.2 §2.7: 2 and
    /// 4 bytes), in guest memory or in ours: a region may start at any guest address, so an
    /// aligned guest address can be a misaligned host one, which the ring's `u16` and `u32`
    /// accesses must not see.
    pub fn new(map: &HostMap, avail: u64, used: u64, size: u16, event_idx: bool) -> Option<Self> {
        if avail % 2 != 0 || used % 4 != 0 || size == 0 {
            return None;
        }
        let n = u64::from(size);
        // flags, idx, ring[size], used_event / flags, idx, ring[size] of 8 bytes, avail_event.
        let avail_ptr = map.host_range(avail, 4 + 2 * n + 2)?;
        let used_ptr = map.host_range(used, 4 + 8 * n + 2)?;
        if avail_ptr as usize % 2 != 0 || used_ptr as usize % 4 != 0 {
            return None;
        }
        Some(Self {
            avail: avail_ptr,
            used: used_ptr,
            size,
            event_idx,
            avail_gpa: avail,
            used_gpa: used,
        })
    }

    /// True when this translation is of rings at these guest addresses.
    pub fn is_at(&self, avail: u64, used: u64, size: u16, event_idx: bool) -> bool {
        (self.avail_gpa, self.used_gpa, self.size, self.event_idx) == (avail, used, size, event_idx)
    }

    pub fn size(&self) -> u16 {
        self.size
    }

    /// The used ring's guest address and length: flags, index, elements and avail_event.
    pub fn used_range(&self) -> (u64, u64) {
        (self.used_gpa, 6 + 8 * u64::from(self.size))
    }

    #[inline]
    fn read_u16(base: *mut u8, off: usize) -> u16 {
        // SAFETY: every caller passes an offset inside the ring bounds checked in `new`,
        // 2-byte aligned (rings are aligned and fields are at even offsets); volatile because
        // the driver writes the ring concurrently.
        u16::from_le(unsafe { base.add(off).cast::<u16>().read_volatile() })
    }

    #[inline]
    fn write_u16(base: *mut u8, off: usize, v: u16) {
        // SAFETY: as in `read_u16`.
        unsafe { base.add(off).cast::<u16>().write_volatile(v.to_le()) }
    }

    /// The driver's avail index, with acquire ordering: ring entries below it are visible.
    #[inline]
    pub fn avail_idx(&self) -> Wrapping<u16> {
        let idx = Self::read_u16(self.avail, 2);
        fence(Ordering::Acquire);
        Wrapping(idx)
    }

    /// Where avail entry `pos` (mod size) is, to prefetch it; never read through.
    #[inline]
    pub fn avail_entry_addr(&self, pos: Wrapping<u16>) -> *const u8 {
        self.avail
            .wrapping_add(4 + 2 * usize::from(pos.0 % self.size))
    }

    /// The descriptor head at avail position `pos` (mod size).
    #[inline]
    pub fn avail_head(&self, pos: Wrapping<u16>) -> u16 {
        Self::read_u16(self.avail, 4 + 2 * usize::from(pos.0 % self.size))
    }

    /// Writes used element `pos` (mod size); not visible to the driver before
    /// [`SplitRing::publish_used`].
    #[inline]
    pub fn put_used(&self, pos: Wrapping<u16>, id: u16, len: u32) {
        let off = 4 + 8 * usize::from(pos.0 % self.size);
        // SAFETY: `off..off + 8` is inside the used ring (checked in `new`), 4-byte aligned.
        unsafe {
            let p = self.used.add(off).cast::<u32>();
            p.write_volatile(u32::from(id).to_le());
            p.add(1).write_volatile(len.to_le());
        }
    }

    /// Makes used elements up to `idx` visible (release ordering), and tells whether the
    /// driver wants an interrupt for the elements added since `old` (virtio 1.2 §2.7.10).
    #[inline]
    pub fn publish_used(&self, old: Wrapping<u16>, idx: Wrapping<u16>) -> bool {
        fence(Ordering::Release);
        Self::write_u16(self.used, 2, idx.0);
        // The driver may have changed its used_event / flags meanwhile: order the index write
        // before reading them.
        fence(Ordering::SeqCst);
        if self.event_idx {
            let event = Wrapping(Self::read_u16(self.avail, 4 + 2 * usize::from(self.size)));
            // vring_need_event(event, new, old)
            (idx - event - Wrapping(1)).0 < (idx - old).0
        } else {
            Self::read_u16(self.avail, 0) & AVAIL_F_NO_INTERRUPT == 0
        }
    }

    /// Asks the driver for kicks from avail position `next_avail` on, and returns whether
    /// chains were made available meanwhile (the re-check that keeps a kick from being lost).
    pub fn enable_kicks(&self, next_avail: Wrapping<u16>) -> bool {
        if self.event_idx {
            Self::write_u16(self.used, 4 + 8 * usize::from(self.size), next_avail.0);
        } else {
            Self::write_u16(self.used, 0, 0);
        }
        fence(Ordering::SeqCst);
        self.avail_idx() != next_avail
    }

    /// Tells the driver that kicks are not needed (with EVENT_IDX the stale avail_event
    /// already keeps the driver from kicking once it has moved past it).
    pub fn disable_kicks(&self) {
        if !self.event_idx {
            Self::write_u16(self.used, 0, USED_F_NO_NOTIFY);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mem::GuestMemory;
    use std::sync::Arc;
    use vm_memory::{Bytes, GuestAddress};

    const AVAIL: u64 = 0x1000;
    const USED: u64 = 0x2000;

    fn setup(event_idx: bool) -> (Arc<GuestMemory>, HostMap, SplitRing) {
        let mem = Arc::new(GuestMemory::from_ranges(&[(GuestAddress(0), 0x4000)]).expect("mem"));
        let map = HostMap::new(mem.clone());
        let ring = SplitRing::new(&map, AVAIL, USED, 8, event_idx).expect("ring");
        (mem, map, ring)
    }

    #[test]
    fn reads_avail_entries_modulo_the_size() {
        let (mem, _map, ring) = setup(true);
        mem.write_obj(9u16, GuestAddress(AVAIL + 2)).expect("idx");
        mem.write_obj(5u16, GuestAddress(AVAIL + 4 + 2))
            .expect("ring[1]");
        assert_eq!(ring.avail_idx(), Wrapping(9));
        assert_eq!(ring.avail_head(Wrapping(9)), 5);
    }

    #[test]
    fn used_elements_and_index_land_where_the_driver_reads_them() {
        let (mem, _map, ring) = setup(false);
        ring.put_used(Wrapping(10), 3, 4097);
        assert!(ring.publish_used(Wrapping(10), Wrapping(11)));
        let id: u32 = mem.read_obj(GuestAddress(USED + 4 + 8 * 2)).expect("id");
        let len: u32 = mem
            .read_obj(GuestAddress(USED + 4 + 8 * 2 + 4))
            .expect("len");
        let idx: u16 = mem.read_obj(GuestAddress(USED + 2)).expect("idx");
        assert_eq!((id, len, idx), (3, 4097, 11));
    }

    #[test]
    fn interrupt_suppression_follows_event_idx_and_flags() {
        let (mem, _map, ring) = setup(true);
        // used_event = 4: notify only when the used index passes 4.
        mem.write_obj(4u16, GuestAddress(AVAIL + 4 + 16))
            .expect("used_event");
        assert!(!ring.publish_used(Wrapping(0), Wrapping(4)));
        assert!(ring.publish_used(Wrapping(4), Wrapping(6)));
        assert!(ring.publish_used(Wrapping(0), Wrapping(5)));
        let (mem, _map, ring) = setup(false);
        mem.write_obj(AVAIL_F_NO_INTERRUPT, GuestAddress(AVAIL))
            .expect("flags");
        assert!(!ring.publish_used(Wrapping(0), Wrapping(1)));
    }

    #[test]
    fn enabling_kicks_rechecks_the_avail_index() {
        let (mem, _map, ring) = setup(true);
        mem.write_obj(2u16, GuestAddress(AVAIL + 2)).expect("idx");
        assert!(ring.enable_kicks(Wrapping(1)), "a chain arrived meanwhile");
        assert!(!ring.enable_kicks(Wrapping(2)));
        let ev: u16 = mem
            .read_obj(GuestAddress(USED + 4 + 64))
            .expect("avail_event");
        assert_eq!(ev, 2);
        let (mem, _map, ring) = setup(false);
        ring.disable_kicks();
        assert_eq!(
            mem.read_obj::<u16>(GuestAddress(USED)).expect("flags"),
            USED_F_NO_NOTIFY
        );
        assert!(!ring.enable_kicks(Wrapping(0)));
        assert_eq!(mem.read_obj::<u16>(GuestAddress(USED)).expect("flags"), 0);
    }

    #[test]
    fn rings_outside_memory_or_misaligned_are_refused() {
        let (_mem, map, _ring) = setup(true);
        assert!(SplitRing::new(&map, 0x3ff0, USED, 8, true).is_none());
        assert!(SplitRing::new(&map, AVAIL + 1, USED, 8, true).is_none());
        assert!(SplitRing::new(&map, AVAIL, USED + 2, 8, true).is_none());
    }

    #[test]
    fn rings_aligned_in_the_guest_but_not_in_our_mapping_are_refused() {
        // A region at an odd guest address: its mapping starts a page, so even guest
        // addresses in it are odd host addresses (found by the vhost_user fuzz target).
        let mem =
            Arc::new(GuestMemory::from_ranges(&[(GuestAddress(0x1001), 0x4000)]).expect("mem"));
        let map = HostMap::new(mem);
        let avail = map.host_range(0x2000, 2).expect("mapped") as usize;
        assert_eq!(avail % 2, 1, "an even guest address at an odd host address");
        assert!(SplitRing::new(&map, 0x2000, 0x3000, 8, true).is_none());
        // One byte further, the host addresses are aligned and the guest ones are not.
        assert!(SplitRing::new(&map, 0x2001, 0x3003, 8, true).is_none());
        // A region at guest address 0x1004: 4-byte alignment agrees in both.
        let mem =
            Arc::new(GuestMemory::from_ranges(&[(GuestAddress(0x1004), 0x4000)]).expect("mem"));
        let map = HostMap::new(mem);
        assert!(SplitRing::new(&map, 0x2000, 0x3000, 8, true).is_some());
    }
}
