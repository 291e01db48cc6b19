//! Guest memory: the snapshot type the data plane works on, and the translation of guest
//! buffers into host iovecs that the kernel (or a device) reads and writes directly.
//!
//! This is the main home of raw guest pointers. An iovec produced here stays valid for as long
//! as the [`MemSnapshot`] it was translated from is alive: in-flight requests hold one.
//!
//! Every mapping of memory a frontend shares is registered with [`fault`], whose SIGBUS
//! handler survives a fault in it (a file the frontend shortened) and fails only the device
//! session it belongs to.

mod dirty_log;
mod dump;
pub mod fault;
mod shared;

pub use dirty_log::{DirtyLog, LOG_PAGE};
pub use dump::exclude_from_core_dumps;
pub use shared::{SharedError, SharedMapping};

use std::sync::Arc;

use thiserror::Error;
use vm_memory::{
    Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    MemoryRegionAddress,
};

/// Guest memory as the vhost-user frontend shared it (no dirty bitmap).
pub type GuestMemory = GuestMemoryMmap<()>;

/// The atomically replaceable guest memory of one device: the control plane swaps in a new
/// map on SET_MEM_TABLE / ADD_MEM_REG, pollers load a snapshot once per batch.
pub type GuestMemoryAtomic = vm_memory::GuestMemoryAtomic<GuestMemory>;

/// A counted reference that keeps one version of the guest memory map mapped.
pub type MemSnapshot = Arc<GuestMemory>;

/// The host addresses of one guest memory snapshot's regions, for translation on the data
/// path without going through vm-memory's generic accessors. Built when the memory table
/// changes; holds the snapshot, so its addresses stay mapped while the map exists.
#[derive(Debug)]
pub struct HostMap {
    snapshot: MemSnapshot,
    regions: Box<[HostRegion]>,
}

#[derive(Clone, Copy, Debug)]
struct HostRegion {
    start: u64,
    /// Bytes (non-zero, and `start + len` does not overflow).
    len: u64,
    host: usize,
}

impl HostMap {
    /// Builds the map of `snapshot` (allocates: control path only).
    pub fn new(snapshot: MemSnapshot) -> Self {
        let regions = snapshot
            .iter()
            .filter_map(|r| {
                let host = r.get_host_address(MemoryRegionAddress(0)).ok()?;
                r.start_addr().0.checked_add(r.len())?;
                Some(HostRegion {
                    start: r.start_addr().0,
                    len: r.len(),
                    host: host as usize,
                })
            })
            .collect();
        Self { snapshot, regions }
    }

    /// The snapshot the map was built from.
    pub fn snapshot(&self) -> &MemSnapshot {
        &self.snapshot
    }

    /// True when the map describes exactly `mem`.
    pub fn is_of(&self, mem: &GuestMemory) -> bool {
        std::ptr::eq(Arc::as_ptr(&self.snapshot), mem)
    }

    /// The region holding `addr`, and `addr`'s offset in it: one comparison per region (an
    /// address below a region's start wraps to an offset past its end).
    #[inline]
    fn region(&self, addr: u64) -> Option<(&HostRegion, u64)> {
        self.regions.iter().find_map(|r| {
            let off = addr.wrapping_sub(r.start);
            (off < r.len).then_some((r, off))
        })
    }

    /// Host address of `addr..addr + len` when the range lies inside one region.
    #[inline]
    pub fn host_range(&self, addr: u64, len: u64) -> Option<*mut u8> {
        let (r, off) = self.region(addr)?;
        // `off < r.len`, so `r.len - off` is the room left in the region.
        if len > r.len - off {
            return None;
        }
        Some((r.host + off as usize) as *mut u8)
    }

    /// True when `addr` is guest memory.
    #[inline]
    pub fn contains(&self, addr: u64) -> bool {
        self.region(addr).is_some()
    }

    /// Reads `buf.len()` bytes at `addr` (any alignment, across regions if need be).
    #[inline]
    pub fn read(&self, addr: u64, buf: &mut [u8]) -> bool {
        match self.host_range(addr, buf.len() as u64) {
            Some(p) => {
                for (i, b) in buf.iter_mut().enumerate() {
                    // SAFETY: `p..p + len` lies inside one mapping kept alive by `snapshot`
                    // and `i < len`. Guest memory is shared with the guest: read volatile.
                    *b = unsafe { p.add(i).read_volatile() };
                }
                true
            }
            None => self.snapshot.read_slice(buf, GuestAddress(addr)).is_ok(),
        }
    }

    /// Reads 16 bytes at `addr`: two aligned volatile loads in the common case.
    #[inline]
    pub fn read16(&self, addr: u64) -> Option<[u8; 16]> {
        match self.host_range(addr, 16) {
            // SAFETY: 16 bytes inside one live mapping (kept by `snapshot`).
            Some(p) => Some(unsafe { read16_at(p) }),
            None => {
                let mut out = [0u8; 16];
                self.read(addr, &mut out).then_some(out)
            }
        }
    }

    /// Writes one byte at `addr`.
    #[inline]
    pub fn write_u8(&self, addr: u64, value: u8) -> bool {
        match self.host_range(addr, 1) {
            Some(p) => {
                // SAFETY: one byte inside a live mapping; volatile as the guest shares it.
                unsafe { p.write_volatile(value) };
                true
            }
            None => false,
        }
    }
}

/// Reads 16 bytes of guest memory at `p`, volatile (the guest shares it): two 8-byte loads
/// when `p` is 8-byte aligned, else byte by byte.
///
/// # Safety
///
/// `p..p + 16` must lie inside a live guest memory mapping.
#[inline]
pub unsafe fn read16_at(p: *const u8) -> [u8; 16] {
    let mut out = [0u8; 16];
    if p as usize % 8 == 0 {
        let q = p.cast::<u64>();
        // SAFETY: aligned and inside the mapping (caller's contract).
        let (a, b) = unsafe { (q.read_volatile(), q.add(1).read_volatile()) };
        out[..8].copy_from_slice(&a.to_ne_bytes());
        out[8..].copy_from_slice(&b.to_ne_bytes());
    } else {
        for (i, b) in out.iter_mut().enumerate() {
            // SAFETY: `i < 16`, inside the mapping (caller's contract).
            *b = unsafe { p.add(i).read_volatile() };
        }
    }
    out
}

/// Reads two consecutive 8-byte words of guest memory at `p`, volatile (the guest shares it),
/// as stored (native byte order): two loads when `p` is 8-byte aligned, else byte by byte.
///
/// # Safety
///
/// `p..p + 16` must lie inside a live guest memory mapping.
#[inline]
pub unsafe fn read_u64_pair_at(p: *const u8) -> (u64, u64) {
    if p as usize % 8 == 0 {
        let q = p.cast::<u64>();
        // SAFETY: aligned and inside the mapping (caller's contract).
        unsafe { (q.read_volatile(), q.add(1).read_volatile()) }
    } else {
        // SAFETY: as above; `read16_at` handles any alignment.
        let b = unsafe { read16_at(p) };
        let word = |i: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&b[i..i + 8]);
            u64::from_ne_bytes(w)
        };
        (word(0), word(8))
    }
}

/// Why a guest buffer could not be translated.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum MemError {
    /// Part of the buffer lies outside every guest memory region.
    #[error("guest buffer {addr:#x}+{len:#x} is outside guest memory")]
    OutOfRange { addr: u64, len: u32 },
    /// The buffer needs more iovecs than the request may carry.
    #[error("guest buffer needs more than {0} iovecs")]
    TooManyIovecs(usize),
}

/// A fixed-capacity list of iovecs pointing into guest memory. Allocated once per in-flight
/// slot; filling it never allocates.
#[derive(Debug)]
pub struct IovecList {
    iov: Box<[libc::iovec]>,
    len: usize,
    bytes: u64,
}

// SAFETY: the iovecs are plain addresses into guest memory mappings that are shared with the
// frontend anyway; the list does not own or alias Rust objects, so moving it to another thread
// cannot create a data race on Rust-visible state.
unsafe impl Send for IovecList {}

impl IovecList {
    /// A list that holds at most `capacity` iovecs.
    pub fn with_capacity(capacity: usize) -> Self {
        let empty = libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        };
        Self {
            iov: vec![empty; capacity].into_boxed_slice(),
            len: 0,
            bytes: 0,
        }
    }

    /// Forgets every entry (keeps the storage).
    pub fn clear(&mut self) {
        self.len = 0;
        self.bytes = 0;
    }

    /// The filled entries.
    pub fn as_slice(&self) -> &[libc::iovec] {
        &self.iov[..self.len]
    }

    /// Number of filled entries.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when no entry is filled.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Total bytes covered by the entries.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Appends the host address of guest range `addr..addr+len`: one iovec when it lies in one
    /// region (the common case, through `map`), else one per region crossed.
    #[inline(always)]
    pub fn push(&mut self, map: &HostMap, addr: u64, len: u32) -> Result<(), MemError> {
        match map.host_range(addr, u64::from(len)) {
            Some(p) if self.len < self.iov.len() => {
                self.iov[self.len] = libc::iovec {
                    iov_base: p.cast(),
                    iov_len: len as usize,
                };
                self.len += 1;
                self.bytes += u64::from(len);
                Ok(())
            }
            Some(_) => Err(MemError::TooManyIovecs(self.iov.len())),
            None => self.push_guest(map.snapshot(), GuestAddress(addr), len),
        }
    }

    /// Appends the host addresses of guest range `addr..addr+len`, split where it crosses
    /// guest memory regions.
    pub fn push_guest(
        &mut self,
        mem: &GuestMemory,
        addr: GuestAddress,
        len: u32,
    ) -> Result<(), MemError> {
        let out_of_range = || MemError::OutOfRange { addr: addr.0, len };
        let start_len = self.len;
        let mut covered = 0usize;
        for slice in mem.get_slices(addr, len as usize) {
            let Ok(slice) = slice else {
                self.len = start_len;
                return Err(out_of_range());
            };
            if self.len == self.iov.len() {
                self.len = start_len;
                return Err(MemError::TooManyIovecs(self.iov.len()));
            }
            let guard = slice.ptr_guard_mut();
            self.iov[self.len] = libc::iovec {
                iov_base: guard.as_ptr().cast(),
                iov_len: slice.len(),
            };
            self.len += 1;
            covered += slice.len();
        }
        if covered != len as usize {
            self.len = start_len;
            return Err(out_of_range());
        }
        self.bytes += u64::from(len);
        Ok(())
    }

    /// True when every entry's address is a multiple of `mem_align` and its length a multiple
    /// of `len_align` (both powers of two): what O_DIRECT requires of each segment.
    pub fn is_dio_aligned(&self, mem_align: usize, len_align: usize) -> bool {
        let (mm, lm) = (mem_align - 1, len_align - 1);
        self.as_slice()
            .iter()
            .all(|v| v.iov_base as usize & mm == 0 && v.iov_len & lm == 0)
    }

    /// Copies `src` into the buffers, in order, and returns how many bytes were written
    /// (at most the buffers' total size).
    ///
    /// # Safety
    ///
    /// Every entry must point into guest memory that is still mapped: the caller holds the
    /// [`MemSnapshot`] the list was filled from.
    pub unsafe fn copy_from(&self, src: &[u8]) -> usize {
        let mut done = 0;
        for v in self.as_slice() {
            if done == src.len() {
                break;
            }
            let n = v.iov_len.min(src.len() - done);
            // SAFETY: `v` covers `iov_len` bytes of a live guest mapping (caller's contract);
            // `n <= iov_len` and `src[done..done + n]` is in bounds. Guest memory is never a
            // Rust allocation, so the ranges cannot overlap `src`.
            unsafe {
                std::ptr::copy_nonoverlapping(src.as_ptr().add(done), v.iov_base.cast::<u8>(), n);
            }
            done += n;
        }
        done
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn two_regions() -> GuestMemory {
        // Two regions that touch at 0x2000, and a hole after 0x3000.
        GuestMemory::from_ranges(&[
            (GuestAddress(0x1000), 0x1000),
            (GuestAddress(0x2000), 0x1000),
        ])
        .expect("guest memory")
    }

    #[test]
    fn buffer_within_one_region_is_one_iovec() {
        let mem = two_regions();
        let mut list = IovecList::with_capacity(4);
        list.push_guest(&mem, GuestAddress(0x1100), 0x200)
            .expect("push");
        assert_eq!(list.len(), 1);
        assert_eq!(list.bytes(), 0x200);
        assert_eq!(list.as_slice()[0].iov_len, 0x200);
    }

    #[test]
    fn buffer_across_regions_is_split() {
        let mem = two_regions();
        let mut list = IovecList::with_capacity(4);
        list.push_guest(&mem, GuestAddress(0x1f00), 0x200)
            .expect("push");
        assert_eq!(list.len(), 2);
        assert_eq!(list.as_slice()[0].iov_len, 0x100);
        assert_eq!(list.as_slice()[1].iov_len, 0x100);
        assert_eq!(list.bytes(), 0x200);
    }

    #[test]
    fn buffer_reaching_outside_memory_is_rejected_and_leaves_list_unchanged() {
        let mem = two_regions();
        let mut list = IovecList::with_capacity(4);
        list.push_guest(&mem, GuestAddress(0x1000), 0x10)
            .expect("push");
        let err = list
            .push_guest(&mem, GuestAddress(0x2f00), 0x200)
            .unwrap_err();
        assert_eq!(
            err,
            MemError::OutOfRange {
                addr: 0x2f00,
                len: 0x200
            }
        );
        assert_eq!(list.len(), 1);
        assert_eq!(list.bytes(), 0x10);
        assert!(list.push_guest(&mem, GuestAddress(0x9000), 1).is_err());
    }

    #[test]
    fn capacity_is_enforced() {
        let mem = two_regions();
        let mut list = IovecList::with_capacity(1);
        let err = list
            .push_guest(&mem, GuestAddress(0x1f00), 0x200)
            .unwrap_err();
        assert_eq!(err, MemError::TooManyIovecs(1));
        assert!(list.is_empty());
    }

    #[test]
    fn host_map_translates_like_vm_memory() {
        let mem = Arc::new(two_regions());
        let map = HostMap::new(mem.clone());
        assert!(map.is_of(&mem));
        for addr in [0x1000u64, 0x1abc, 0x1fff, 0x2000, 0x2fff] {
            let want = mem.get_host_address(GuestAddress(addr)).expect("mapped");
            assert_eq!(map.host_range(addr, 1), Some(want));
        }
        assert_eq!(map.host_range(0x1f00, 0x200), None, "crosses regions");
        assert_eq!(map.host_range(0x3000, 1), None, "hole");
        assert_eq!(map.host_range(u64::MAX, 2), None, "overflow");
        assert!(!map.contains(0xfff));
    }

    #[test]
    fn host_map_reads_and_writes_guest_bytes() {
        let mem = Arc::new(two_regions());
        let map = HostMap::new(mem.clone());
        let bytes: Vec<u8> = (0u8..32).collect();
        mem.write_slice(&bytes, GuestAddress(0x1ff0))
            .expect("write");
        assert_eq!(map.read16(0x1ff0).expect("aligned"), bytes[..16]);
        assert_eq!(map.read16(0x1ff8).expect("across regions"), bytes[8..24]);
        assert_eq!(map.read16(0x1ff1).expect("unaligned"), bytes[1..17]);
        assert!(map.read16(0x2ff8).is_none());
        assert!(map.write_u8(0x2001, 0xaa));
        assert_eq!(
            mem.read_obj::<u8>(GuestAddress(0x2001)).expect("read"),
            0xaa
        );
        let mut list = IovecList::with_capacity(4);
        list.push(&map, 0x1f00, 0x200)
            .expect("split by the slow path");
        assert_eq!(list.len(), 2);
        list.push(&map, 0x1000, 0x10).expect("fast path");
        assert_eq!(list.len(), 3);
        assert_eq!(list.bytes(), 0x210);
    }

    #[test]
    fn copy_from_fills_buffers_in_order() {
        let mem = two_regions();
        let mut list = IovecList::with_capacity(4);
        list.push_guest(&mem, GuestAddress(0x1ffe), 4)
            .expect("push");
        // SAFETY: `mem` outlives the list's use here.
        let n = unsafe { list.copy_from(b"abcdef") };
        assert_eq!(n, 4);
        let mut back = [0u8; 4];
        vm_memory::Bytes::read_slice(&mem, &mut back, GuestAddress(0x1ffe)).expect("read");
        assert_eq!(&back, b"abcd");
    }
}
