//! Guest memory in the controller's IOMMU domain: every region of a session's guest memory is
//! DMA-mapped whole at IOVA = its address in vubd, so PRPs point straight at guest buffers.
//!
//! A region that leaves the memory table is unmapped only once nothing can still use it: every
//! earlier snapshot is kept until no in-flight request and no poller's map holds it any more
//! (its reference count falls to the one kept here), and a region stays mapped while any kept
//! snapshot has it (a request of a table two changes back may still use a region the last
//! change removed). Keeping the snapshots also keeps the regions' mappings in vubd alive.
//!
//! Several sessions (devices on namespaces of one controller) each have their own `GuestDma`
//! in the one VFIO container. Their IOVAs are addresses of distinct live mappings of this
//! process, so they never overlap, and each session maps and unmaps only its own regions.
//! Addresses are reused only after a session unmapped its regions from the IOMMU and dropped
//! them, in that order.

use std::collections::BTreeSet;
use std::io;
use std::sync::Arc;

use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

use crate::mem::MemSnapshot;
use crate::nvme::pcie::PcieError;
use crate::nvme::pcie::ctrl::PcieController;

/// A region as the IOMMU sees it: its host address (= IOVA) and length.
type Span = (u64, usize);

/// The IOMMU domain guest memory goes into: the controller's (a recording fake in the tests).
pub trait Iommu: std::fmt::Debug {
    /// Maps `len` bytes at `addr` at IOVA = `addr`.
    ///
    /// # Safety
    ///
    /// As [`PcieController::dma_map`].
    unsafe fn dma_map(&self, addr: *mut u8, len: usize) -> Result<(), PcieError>;
    fn dma_unmap(&self, addr: u64, len: usize) -> Result<(), PcieError>;
}

impl Iommu for PcieController {
    unsafe fn dma_map(&self, addr: *mut u8, len: usize) -> Result<(), PcieError> {
        // SAFETY: this function's contract is the one `PcieController::dma_map` asks for.
        unsafe { PcieController::dma_map(self, addr, len) }
    }

    fn dma_unmap(&self, addr: u64, len: usize) -> Result<(), PcieError> {
        PcieController::dma_unmap(self, addr, len)
    }
}

/// Unmaps a span, saying so: once per region change, never per I/O.
fn unmap(ctrl: &impl Iommu, (addr, len): Span, why: &'static str) {
    match ctrl.dma_unmap(addr, len) {
        Ok(()) => tracing::info!(
            addr = %format_args!("{addr:#x}"),
            len,
            why,
            "guest memory region DMA-unmapped"
        ),
        Err(e) => tracing::warn!(addr, len, error = %e, "cannot unmap guest memory"),
    }
}

/// The DMA mappings of one session's guest memory.
#[derive(Debug)]
pub struct GuestDma<I: Iommu = PcieController> {
    ctrl: Arc<I>,
    /// The spans of `current`.
    mapped: BTreeSet<Span>,
    /// Every span in the IOMMU: `mapped`, and those of retired snapshots still held.
    in_iommu: BTreeSet<Span>,
    /// Earlier snapshots, with all their spans: a request or a poller's map may still hold
    /// one, and then use any of its regions.
    retired: Vec<(MemSnapshot, BTreeSet<Span>)>,
    /// The snapshot `mapped` describes.
    current: Option<MemSnapshot>,
}

/// The host pages of every region: the IOMMU maps whole pages, and a region need not start or
/// end on one (a frontend may share a small ring area at an offset into its mapping). The
/// pages around a region belong to the same mapping, so IOVA = address holds for every byte.
fn spans(mem: &MemSnapshot) -> BTreeSet<Span> {
    // SAFETY: sysconf has no memory-safety preconditions.
    let page = u64::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) })
        .ok()
        .filter(|p| p.is_power_of_two())
        .unwrap_or(4096);
    mem.iter()
        .filter_map(|r| {
            let host = r.get_host_address(MemoryRegionAddress(0)).ok()? as u64;
            let start = host & !(page - 1);
            let end = host.checked_add(r.len())?.checked_next_multiple_of(page)?;
            Some((start, usize::try_from(end - start).ok()?))
        })
        .collect()
}

impl<I: Iommu> GuestDma<I> {
    pub fn new(ctrl: Arc<I>) -> Self {
        Self {
            ctrl,
            mapped: BTreeSet::new(),
            in_iommu: BTreeSet::new(),
            retired: Vec::new(),
            current: None,
        }
    }

    /// Maps the regions of `mem` that are not mapped yet and retires the previous snapshot.
    /// When a region cannot be mapped, those this call mapped are unmapped again and the
    /// mappings stay as they were: nothing is left in the IOMMU that no `GuestDma` knows of
    /// (another session's region may get those addresses later).
    pub fn update(&mut self, mem: MemSnapshot) -> Result<(), PcieError> {
        let want = spans(&mem);
        let new: Vec<Span> = want.difference(&self.in_iommu).copied().collect();
        for (i, &(addr, len)) in new.iter().enumerate() {
            // SAFETY: the region is a live mapping of guest memory held by `mem`, which is
            // kept (as `current`, then in `retired`) until the region is unmapped again; on
            // failure the regions mapped here are unmapped before `mem` goes.
            if let Err(e) = unsafe { self.ctrl.dma_map(addr as *mut u8, len) } {
                for &span in &new[..i] {
                    unmap(&*self.ctrl, span, "map failed");
                }
                return Err(e);
            }
            tracing::info!(
                addr = %format_args!("{addr:#x}"),
                len,
                "guest memory region DMA-mapped"
            );
        }
        self.in_iommu.extend(new);
        let old_spans = std::mem::replace(&mut self.mapped, want);
        if let Some(old) = self.current.replace(mem) {
            self.retired.push((old, old_spans));
        }
        self.sweep();
        Ok(())
    }

    /// Retired regions are still mapped (something held them at the last sweep).
    pub fn has_retired(&self) -> bool {
        !self.retired.is_empty()
    }

    /// Unmaps the regions that neither the current snapshot nor a retired one still held
    /// has. A region removed from the table stays mapped while any snapshot that had it is
    /// held, not only the last one: a request started under an older table may use it.
    pub fn sweep(&mut self) {
        let (dead, held): (Vec<_>, Vec<_>) = std::mem::take(&mut self.retired)
            .into_iter()
            .partition(|(snapshot, _)| Arc::strong_count(snapshot) == 1);
        self.retired = held;
        if dead.is_empty() {
            return;
        }
        let mut needed = self.mapped.clone();
        for (_, spans) in &self.retired {
            needed.extend(spans);
        }
        let gone: Vec<Span> = self.in_iommu.difference(&needed).copied().collect();
        for span in gone {
            unmap(&*self.ctrl, span, "removed");
            self.in_iommu.remove(&span);
        }
        // Only now may the dead snapshots let their regions' memory go: once vubd unmaps a
        // region, another session may get its addresses and map them as its own.
        drop(dead);
    }

    /// Unmaps everything: the session is over and no request is in flight. The snapshots go
    /// only after their regions left the IOMMU: once vubd unmaps a region's memory, another
    /// session of the same controller may get the same addresses and map them as its own.
    pub fn release(&mut self) {
        for span in std::mem::take(&mut self.in_iommu) {
            unmap(&*self.ctrl, span, "session end");
        }
        self.mapped.clear();
        self.retired.clear();
        self.current = None;
    }
}

impl<I: Iommu + Send + Sync + std::fmt::Debug> crate::bdev::GuestMemoryHook for GuestDma<I> {
    fn memory_changed(&mut self, mem: MemSnapshot) -> io::Result<()> {
        self.update(mem).map_err(io::Error::other)
    }

    fn sweep(&mut self) -> bool {
        GuestDma::sweep(self);
        self.has_retired()
    }

    fn release(&mut self) {
        GuestDma::release(self);
    }
}

impl<I: Iommu> Drop for GuestDma<I> {
    fn drop(&mut self) {
        self.release();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use vm_memory::{GuestAddress, GuestMemoryMmap};

    use super::*;

    /// An IOMMU that records what is mapped, and refuses to map twice or unmap what is not
    /// mapped (as VFIO does).
    #[derive(Debug, Default)]
    struct FakeIommu {
        mapped: Mutex<BTreeSet<Span>>,
        /// Maps from this one on fail.
        fail_after: Option<usize>,
        maps: Mutex<usize>,
    }

    impl FakeIommu {
        fn mapped(&self) -> BTreeSet<Span> {
            self.mapped.lock().unwrap().clone()
        }
    }

    impl Iommu for FakeIommu {
        unsafe fn dma_map(&self, addr: *mut u8, len: usize) -> Result<(), PcieError> {
            let mut maps = self.maps.lock().unwrap();
            *maps += 1;
            if self.fail_after.is_some_and(|n| *maps > n) {
                return Err(PcieError::NoVfio);
            }
            assert!(self.mapped.lock().unwrap().insert((addr as u64, len)));
            Ok(())
        }

        fn dma_unmap(&self, addr: u64, len: usize) -> Result<(), PcieError> {
            assert!(self.mapped.lock().unwrap().remove(&(addr, len)));
            Ok(())
        }
    }

    const REGION: usize = 64 << 10;

    /// Guest memory with one region per start address (in units of `REGION`).
    fn memory(starts: &[u64]) -> MemSnapshot {
        let ranges: Vec<_> = starts
            .iter()
            .map(|&s| (GuestAddress(s * REGION as u64), REGION))
            .collect();
        Arc::new(GuestMemoryMmap::from_ranges(&ranges).expect("anonymous guest memory"))
    }

    /// `mem` without the region at `start`, the others shared (as REM_MEM_REG leaves them).
    fn without(mem: &MemSnapshot, start: u64) -> MemSnapshot {
        let (rest, _) = mem
            .remove_region(GuestAddress(start * REGION as u64), REGION as u64)
            .expect("region present");
        Arc::new(rest)
    }

    /// `mem` with `other`'s region at `start` added (as ADD_MEM_REG does).
    fn with(mem: &MemSnapshot, other: &MemSnapshot, start: u64) -> MemSnapshot {
        let (_, region) = other
            .remove_region(GuestAddress(start * REGION as u64), REGION as u64)
            .expect("region present");
        Arc::new(mem.insert_region(region).expect("a memory table"))
    }

    #[test]
    fn a_removed_region_stays_mapped_while_a_poller_or_request_holds_its_snapshot() {
        let iommu = Arc::new(FakeIommu::default());
        let mut dma = GuestDma::new(iommu.clone());
        let first = memory(&[0, 1]);
        dma.update(first.clone()).unwrap();
        let both = iommu.mapped();
        assert_eq!(both.len(), 2);
        // A poller's map (or a request in flight) still holds the first table.
        let held = first.clone();
        let second = without(&first, 1);
        drop(first);
        dma.update(second.clone()).unwrap();
        dma.sweep();
        assert_eq!(iommu.mapped(), both, "unmapped while still in use");
        // Another change: the region added is mapped, the removed one still stays.
        let third = with(&second, &memory(&[2]), 2);
        drop(second);
        dma.update(third.clone()).unwrap();
        assert_eq!(iommu.mapped().len(), 3);
        assert!(both.is_subset(&iommu.mapped()));
        // The last holder lets go: the next sweep unmaps the removed region, only it.
        drop(held);
        dma.sweep();
        let now = iommu.mapped();
        assert_eq!(now, spans(&third));
        assert_eq!(now.intersection(&both).count(), 1);
        drop(dma);
        assert!(
            iommu.mapped().is_empty(),
            "the session's end unmaps the rest"
        );
    }

    #[test]
    fn a_region_stays_mapped_while_any_older_table_that_had_it_is_held() {
        let iommu = Arc::new(FakeIommu::default());
        let mut dma = GuestDma::new(iommu.clone());
        // A request in flight under the first table (regions A and B) may use either.
        let first = memory(&[0, 1]);
        dma.update(first.clone()).unwrap();
        let all = iommu.mapped();
        let in_flight = first.clone();
        // B goes, then A: the pollers move to each new table at once.
        let second = without(&first, 1);
        drop(first);
        dma.update(second.clone()).unwrap();
        let third = without(&second, 0);
        drop(second);
        dma.update(third).unwrap();
        dma.sweep();
        assert_eq!(
            iommu.mapped(),
            all,
            "a region left the IOMMU while a request of a table that had it was in flight"
        );
        drop(in_flight);
        dma.sweep();
        assert!(iommu.mapped().is_empty());
    }

    #[test]
    fn the_session_end_unmaps_removed_and_current_regions_once() {
        let iommu = Arc::new(FakeIommu::default());
        let mut dma = GuestDma::new(iommu.clone());
        let first = memory(&[0, 1]);
        dma.update(first.clone()).unwrap();
        let held = first.clone();
        dma.update(without(&first, 0)).unwrap();
        // The removed region is still held: not yet unmapped.
        assert_eq!(iommu.mapped().len(), 2);
        // The queues have drained (close): everything goes, each once (the fake panics on a
        // second unmap), and dropping afterwards unmaps nothing more.
        dma.release();
        assert!(iommu.mapped().is_empty());
        drop(dma);
        drop(held);
    }

    #[test]
    fn a_table_that_cannot_be_mapped_whole_leaves_the_mappings_as_they_were() {
        let iommu = Arc::new(FakeIommu {
            fail_after: Some(2),
            ..FakeIommu::default()
        });
        let mut dma = GuestDma::new(iommu.clone());
        let first = memory(&[0]);
        dma.update(first.clone()).unwrap();
        let before = iommu.mapped();
        // Two new regions: one maps (the fake's second map), the other fails (its third).
        let bigger = with(&with(&first, &memory(&[1]), 1), &memory(&[2]), 2);
        assert!(dma.update(bigger).is_err());
        assert_eq!(iommu.mapped(), before, "a partial table stayed mapped");
        // The table in force is still the first one: a later table maps from there.
        let iommu_maps = *iommu.maps.lock().unwrap();
        assert_eq!(iommu_maps, 3);
        drop(dma);
        assert!(iommu.mapped().is_empty());
    }
}
