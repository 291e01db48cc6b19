//! Guest memory in the controller's IOMMU domain: every region of a session's guest memory is
//! DMA-mapped whole at IOVA = its address in vubd, so PRPs point straight at guest buffers.
//!
//! A region that leaves the memory table is unmapped only once nothing can still use it: the
//! snapshot it came from is kept until no in-flight request and no poller's map holds that
//! snapshot any more (its reference count falls to the one kept here). Keeping the snapshot
//! also keeps the region's mapping in vubd alive until then.
//!
//! Several sessions (devices on namespaces of one controller) each have their own `GuestDma`
//! in the one VFIO container. Their IOVAs are addresses of distinct live mappings of this
//! process, so they never overlap, and each session maps and unmaps only its own regions.
//! Addresses are reused only after a session unmapped its regions from the IOMMU and dropped
//! them, in that order.

use std::collections::BTreeSet;
use std::sync::Arc;

use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

use crate::mem::MemSnapshot;
use crate::nvme::pcie::PcieError;
use crate::nvme::pcie::ctrl::PcieController;

/// A region as the IOMMU sees it: its host address (= IOVA) and length.
type Span = (u64, usize);

/// Unmaps a span, saying so: once per region change, never per I/O.
fn unmap(ctrl: &PcieController, (addr, len): Span, why: &'static str) {
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
pub struct GuestDma {
    ctrl: Arc<PcieController>,
    mapped: BTreeSet<Span>,
    /// Regions that left the memory table, with the snapshot that last had them.
    retired: Vec<(MemSnapshot, Vec<Span>)>,
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

impl GuestDma {
    pub fn new(ctrl: Arc<PcieController>) -> Self {
        Self {
            ctrl,
            mapped: BTreeSet::new(),
            retired: Vec::new(),
            current: None,
        }
    }

    /// Maps the regions of `mem` that are not mapped yet and retires those that left it.
    /// When a region cannot be mapped, those this call mapped are unmapped again and the
    /// mappings stay as they were: nothing is left in the IOMMU that no `GuestDma` knows of
    /// (another session's region may get those addresses later).
    pub fn update(&mut self, mem: MemSnapshot) -> Result<(), PcieError> {
        let want = spans(&mem);
        let new: Vec<Span> = want.difference(&self.mapped).copied().collect();
        for (i, &(addr, len)) in new.iter().enumerate() {
            // SAFETY: the region is a live mapping of guest memory held by `mem`, which is
            // kept (as `current`, then in `retired`) until the region is unmapped again; on
            // failure the regions mapped here are unmapped before `mem` goes.
            if let Err(e) = unsafe { self.ctrl.dma_map(addr as *mut u8, len) } {
                for &span in &new[..i] {
                    unmap(&self.ctrl, span, "map failed");
                }
                return Err(e);
            }
            tracing::info!(
                addr = %format_args!("{addr:#x}"),
                len,
                "guest memory region DMA-mapped"
            );
        }
        let gone: Vec<Span> = self.mapped.difference(&want).copied().collect();
        if let Some(old) = self.current.replace(mem) {
            self.retired.push((old, gone));
        }
        self.mapped = want;
        self.sweep();
        Ok(())
    }

    /// Unmaps retired regions nothing refers to any more.
    pub fn sweep(&mut self) {
        let mapped = &self.mapped;
        let ctrl = &self.ctrl;
        self.retired.retain(|(snapshot, spans)| {
            if Arc::strong_count(snapshot) > 1 {
                return true;
            }
            for span in spans {
                // A region back in the table under the same address stays mapped.
                if !mapped.contains(span) {
                    unmap(ctrl, *span, "removed");
                }
            }
            false
        });
    }

    /// Unmaps everything: the session is over and no request is in flight. The snapshots go
    /// only after their regions left the IOMMU: once vubd unmaps a region's memory, another
    /// session of the same controller may get the same addresses and map them as its own.
    pub fn release(&mut self) {
        let current = self.current.take();
        let mapped = std::mem::take(&mut self.mapped);
        for (_, spans) in std::mem::take(&mut self.retired) {
            for span in spans {
                if !mapped.contains(&span) {
                    unmap(&self.ctrl, span, "removed");
                }
            }
        }
        for span in mapped {
            unmap(&self.ctrl, span, "session end");
        }
        drop(current);
    }
}

impl Drop for GuestDma {
    fn drop(&mut self) {
        self.release();
    }
}
