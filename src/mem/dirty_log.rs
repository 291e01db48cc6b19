//! The dirty page log of a live migration (vhost-user "Migration": VHOST_F_LOG_ALL with
//! LOG_SHMFD, the log given by SET_LOG_BASE): one bit per 4 KiB page of guest physical
//! address space, set by the backend for every page it writes, read and cleared by the
//! frontend (which then sends those pages again).
//!
//! Bits are set with an atomic OR on their byte, as the frontend clears whole words with an
//! atomic exchange while the backend runs. Relaxed ordering is enough: the poller publishes a
//! request's used index behind a release fence, and the frontend reads the log for the last
//! time only after it stopped the rings.

use std::fs::File;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

use super::GuestMemory;
use super::fault::{DeviceFaults, FaultError, Mapped};
use super::shared::{SharedError, SharedMapping};

/// Bytes of guest memory one bit of the log stands for (`VHOST_LOG_PAGE`).
pub const LOG_PAGE: u64 = 0x1000;

/// A mapped dirty page log.
#[derive(Debug)]
pub struct DirtyLog {
    map: SharedMapping,
}

impl DirtyLog {
    /// Maps `size` bytes at `offset` of `file`, refusing a range the file does not hold (a
    /// mapping past its end would fault when a bit is set).
    pub fn new(file: &File, offset: u64, size: u64) -> Result<Self, SharedError> {
        let file = file.try_clone().map_err(SharedError::File)?;
        Ok(Self {
            map: SharedMapping::of_file(file, offset, size)?,
        })
    }

    /// Registers the log's mapping as `owner`'s: a fault in it (the frontend shortened the
    /// file) fails that device session instead of the process.
    pub fn watch(&mut self, owner: &Arc<DeviceFaults>) -> Result<(), FaultError> {
        self.map.watch(Mapped::DirtyLog, owner)
    }

    /// Guest physical bytes the log covers.
    pub fn covers(&self) -> u64 {
        (self.map.len() as u64).saturating_mul(8 * LOG_PAGE)
    }

    /// Marks the pages of guest range `gpa..gpa + len` dirty. Pages past what the log covers
    /// are not guest memory the frontend migrates; they are ignored.
    #[inline]
    pub fn mark(&self, gpa: u64, len: u64) {
        if len == 0 {
            return;
        }
        let last = gpa.saturating_add(len - 1) / LOG_PAGE;
        let bytes = self.map.len() as u64;
        // A plain loop rather than `first..=last`: RangeInclusive's exhaustion flag costs
        // about 6 instructions per mark, and most marks are of a single page.
        let mut page = gpa / LOG_PAGE;
        while page <= last {
            let byte = page / 8;
            if byte >= bytes {
                break;
            }
            // SAFETY: `byte` is inside the mapping (checked above), which lives as long as
            // `self`; the frontend shares the byte, so it is only touched atomically.
            let cell = unsafe { AtomicU8::from_ptr(self.map.as_ptr().add(byte as usize)) };
            cell.fetch_or(1 << (page % 8), Ordering::Relaxed);
            // No overflow: `page <= last <= u64::MAX / LOG_PAGE`.
            page += 1;
        }
    }

    /// Marks the guest pages behind host buffer `host..host + len` of `mem` (a buffer that a
    /// request's iovec points at). A buffer outside `mem` is ignored.
    pub fn mark_host(&self, mem: &GuestMemory, host: *const u8, len: usize) {
        let addr = host as usize;
        for r in mem.iter() {
            let Ok(base) = r.get_host_address(MemoryRegionAddress(0)) else {
                continue;
            };
            let off = addr.wrapping_sub(base as usize);
            if (off as u64) < r.len() {
                self.mark(r.start_addr().0 + off as u64, len as u64);
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestAddress;

    fn memfd(len: usize) -> File {
        let shared = SharedMapping::memfd(c"vubd-test-log", len).expect("memfd");
        shared.file().try_clone().expect("dup")
    }

    fn bits(log: &DirtyLog) -> Vec<u64> {
        let mut pages = Vec::new();
        for byte in 0..log.map.len() {
            // SAFETY: inside the mapping.
            let b = unsafe { log.map.as_ptr().add(byte).read_volatile() };
            for bit in 0..8 {
                if b & (1 << bit) != 0 {
                    pages.push(byte as u64 * 8 + bit);
                }
            }
        }
        pages
    }

    #[test]
    fn marks_every_page_a_range_touches_and_nothing_else() {
        let log = DirtyLog::new(&memfd(64), 0, 64).expect("log");
        log.mark(0x1fff, 2); // the last byte of page 1 and the first of page 2
        log.mark(9 * LOG_PAGE, LOG_PAGE); // exactly page 9
        log.mark(20 * LOG_PAGE + 5, 0); // nothing
        assert_eq!(bits(&log), vec![1, 2, 9]);
    }

    #[test]
    fn a_log_its_frontend_shortens_fails_the_session_and_the_process_lives() {
        use crate::mem::fault::{self, DeviceFaults, Fault, Mapped};
        fault::install().expect("install");
        let file = memfd(8192);
        let mut log = DirtyLog::new(&file, 0, 8192).expect("log");
        let faults = Arc::new(DeviceFaults::new().expect("eventfd"));
        log.watch(&faults).expect("watch");
        file.set_len(4096).expect("truncate");
        // A page whose bit is in byte 4096 of the log: past the file's end now.
        log.mark((4096 * 8 + 5) * LOG_PAGE, 1);
        assert_eq!(
            faults.first(),
            Some(Fault {
                mapped: Mapped::DirtyLog,
                len: 8192,
                offset: 4096
            })
        );
        assert!(faults.failed());
        log.mark(LOG_PAGE, 1);
        assert_eq!(
            bits(&log),
            vec![1, 4096 * 8 + 5],
            "the rest of the log works on"
        );
    }

    #[test]
    fn pages_beyond_the_log_are_ignored() {
        let log = DirtyLog::new(&memfd(2), 0, 2).expect("log");
        assert_eq!(log.covers(), 16 * LOG_PAGE);
        log.mark(15 * LOG_PAGE, 10 * LOG_PAGE);
        log.mark(u64::MAX - 10, 100);
        assert_eq!(bits(&log), vec![15]);
    }

    #[test]
    fn a_log_its_file_does_not_hold_is_refused() {
        let f = memfd(4096);
        assert!(DirtyLog::new(&f, 0, 0).is_err());
        assert!(DirtyLog::new(&f, 4096, 1).is_err());
        assert!(DirtyLog::new(&f, 0, 8192).is_err());
        assert!(DirtyLog::new(&f, u64::MAX, 2).is_err());
        assert!(DirtyLog::new(&f, 0, 4096).is_ok());
    }

    #[test]
    fn host_buffers_are_marked_at_their_guest_address() {
        let mem = GuestMemory::from_ranges(&[
            (GuestAddress(0), 0x10000),
            (GuestAddress(0x100000), 0x10000),
        ])
        .expect("mem");
        let region = mem.find_region(GuestAddress(0x100000)).expect("region");
        let host = region
            .get_host_address(MemoryRegionAddress(0x3000))
            .expect("host");
        let log = DirtyLog::new(&memfd(64), 0, 64).expect("log");
        log.mark_host(&mem, host, 0x1001);
        log.mark_host(&mem, std::ptr::null(), 10);
        assert_eq!(bits(&log), vec![0x103, 0x104]);
    }
}
