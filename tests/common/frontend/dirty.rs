//! Dirty page logging as a migrating frontend turns it on (vhost-user, "Migration"): with
//! LOG_SHMFD negotiated, SET_LOG_BASE hands the backend a shared log (one bit per 4 KiB page of
//! guest physical address space, from address 0 to the end of guest memory), then SET_FEATURES
//! with VHOST_F_LOG_ALL makes it mark every page it writes. The log is mapped here too, so that
//! a user can check which pages were marked.

use std::os::fd::AsRawFd;

use vhost::{VhostBackend, VhostUserDirtyLogRegion};

use super::shm::Mapping;
use super::{BLOCK, BlkFrontend, FrontendError, GPA_BASE, HDR_AREA, STATUS_OFF};

/// `VHOST_F_LOG_ALL`: the backend logs the pages it writes.
pub(super) const F_LOG_ALL: u64 = 1 << 26;
/// Guest bytes one bit of the log stands for (`VHOST_LOG_PAGE`).
const LOG_PAGE: u64 = 0x1000;

/// The log the frontend gave the backend, kept across backend restarts.
#[derive(Debug)]
pub(super) struct KeptLog {
    map: Mapping,
}

impl KeptLog {
    /// A zeroed log covering guest addresses `0..max_gpa`: `ceil(max_gpa / 4096 / 8)` bytes.
    fn new(max_gpa: u64) -> Result<Self, FrontendError> {
        let bytes = max_gpa.div_ceil(LOG_PAGE).div_ceil(8);
        let len = usize::try_from(bytes).expect("the log of a test's guest memory fits");
        let map = Mapping::memfd(c"blk-frontend-dirty-log", len)?;
        Ok(Self { map })
    }

    fn marked(&self, page: u64) -> bool {
        let byte = usize::try_from(page / 8).expect("a page of the log");
        self.map.read::<u8>(byte) & (1 << (page % 8)) != 0
    }
}

impl BlkFrontend {
    /// Turns dirty logging on (at every start while [`super::Options::dirty_log`] is set):
    /// SET_LOG_BASE with the kept log (made on the first start, sized for guest memory), then
    /// SET_FEATURES with the negotiated features and VHOST_F_LOG_ALL.
    pub(super) fn log_all(&mut self) -> Result<(), FrontendError> {
        if self.log.is_none() {
            self.log = Some(KeptLog::new(GPA_BASE + self.mem.len() as u64)?);
        }
        let log = self.log.as_ref().expect("made above");
        let conn = self.conn.as_ref().ok_or(FrontendError::Disconnected)?;
        let region = VhostUserDirtyLogRegion {
            mmap_size: log.map.len() as u64,
            mmap_offset: 0,
            mmap_handle: log.map.file().as_raw_fd(),
        };
        // With LOG_SHMFD the vhost crate sends the fd and waits for the backend's reply (the
        // log message echoed), so the backend has mapped the log when this returns.
        conn.set_log_base(0, Some(region))?;
        conn.set_features(self.features | F_LOG_ALL)?;
        self.features |= F_LOG_ALL;
        Ok(())
    }

    /// Whether the page holding guest address `gpa` is marked in the dirty log (false without
    /// a log).
    pub fn page_logged(&self, gpa: u64) -> bool {
        self.log
            .as_ref()
            .is_some_and(|log| gpa < GPA_BASE + self.mem.len() as u64 && log.marked(gpa / LOG_PAGE))
    }

    /// The guest pages queue `q`'s first `reads` reads wrote that the dirty log does not have
    /// marked: the used ring, and each request slot's status byte and data buffer (slots are
    /// taken in order, so `reads` reads used the first `min(reads, slots)`).
    pub fn unlogged_pages(&self, q: usize, reads: u64) -> Vec<u64> {
        let vq = &self.queues[q];
        let used = usize::try_from(reads)
            .unwrap_or(usize::MAX)
            .min(vq.slots.len());
        let mut ranges = vec![(vq.used, 6 + 8 * usize::from(vq.size))];
        for slot in 0..used {
            ranges.push((vq.hdrs + HDR_AREA * slot + STATUS_OFF, 1));
            ranges.push((vq.data + BLOCK * slot, BLOCK));
        }
        let mut missing = Vec::new();
        for (off, len) in ranges {
            let (first, last) = (Self::gpa(off), Self::gpa(off + len - 1));
            for page in first / LOG_PAGE..=last / LOG_PAGE {
                if !self.page_logged(page * LOG_PAGE) && !missing.contains(&page) {
                    missing.push(page);
                }
            }
        }
        missing
    }
}
