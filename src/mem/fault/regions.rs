//! The guest memory regions of one device session, registered for as long as they are mapped.
//!
//! vhost-user-backend maps each region of a SET_MEM_TABLE or ADD_MEM_REG and shows it to the
//! backend before it publishes the new memory map ([`GuestRegions::add`]). A region that left
//! the table may still be mapped for a while: a poller's map or a request in flight holds the
//! snapshot it belongs to. So the mapping (vm-memory's `MmapRegion`, unmapped when its last
//! reference goes) is held here too, and let go only once this is its last reference, its
//! entry removed first ([`GuestRegions::sweep`]): the entry never outlives the mapping.

use std::sync::Arc;

use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap, MmapRegion};

use super::{DeviceFaults, FaultError, Mapped, Registration, page_size_of, register};
use crate::mem::GuestMemory;

/// A registered guest memory mapping.
#[derive(Debug)]
struct Held {
    // Declared first, so dropped first: the entry goes before the mapping can.
    _registration: Registration,
    mapping: Arc<MmapRegion<()>>,
}

impl Held {
    /// Nothing but this holds the mapping.
    fn unused(&self) -> bool {
        Arc::strong_count(&self.mapping) == 1
    }
}

/// The registered guest memory mappings of one device session.
#[derive(Debug)]
pub struct GuestRegions {
    owner: Arc<DeviceFaults>,
    held: Vec<Held>,
}

impl GuestRegions {
    pub fn new(owner: Arc<DeviceFaults>) -> Self {
        Self {
            owner,
            held: Vec::new(),
        }
    }

    /// Registers a region just mapped (before any thread can use it).
    pub fn add(&mut self, region: &GuestRegionMmap<()>) -> Result<(), FaultError> {
        let mapping = region.get_mmap();
        let page = mapping
            .file_offset()
            .map_or_else(super::base_page, |f| page_size_of(f.file()));
        let registration = register(
            mapping.as_ptr(),
            mapping.size(),
            page,
            Mapped::Guest {
                gpa: region.start_addr().0,
            },
            &self.owner,
        )?;
        self.held.push(Held {
            _registration: registration,
            mapping,
        });
        Ok(())
    }

    /// Removes the entries of the mappings nothing else holds, and lets them go (which unmaps
    /// them). Returns whether mappings that `current` does not hold are still held elsewhere
    /// (a later sweep may let them go).
    pub fn sweep(&mut self, current: &GuestMemory) -> bool {
        self.held.retain(|h| !h.unused());
        self.held.iter().any(|h| {
            let addr = h.mapping.as_ptr();
            !current.iter().any(|r| r.as_ptr() == addr)
        })
    }

    /// Mappings registered.
    pub fn len(&self) -> usize {
        self.held.len()
    }

    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }
}

impl Drop for GuestRegions {
    fn drop(&mut self) {
        let still_held = self.held.iter().filter(|h| !h.unused()).count();
        if still_held > 0 {
            // Not expected (the session's maps and requests are gone by now): their entries
            // go anyway, so a fault there is no longer survived, but no entry outlives them.
            tracing::debug!(
                regions = still_held,
                "guest memory still mapped as its session ends; its faults are no longer caught"
            );
        }
    }
}
