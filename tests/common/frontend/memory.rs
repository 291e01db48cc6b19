//! What a hostile frontend does to the memory it shares (`tests/hostile_memory.rs`): shorten
//! the file under guest memory or under the inflight region while the backend uses them, and
//! start again with a memory table whose region is larger than its file.
//!
//! After shortening a file, touching the cut part of the frontend's own mapping faults here
//! too: what [`BlkFrontend::submit`], [`BlkFrontend::notify`] and [`BlkFrontend::reap`] touch
//! must lie before the cut (see [`QueueLayout`]), or be written before it.

use std::io;
use std::os::fd::RawFd;

use vhost::VhostBackend;

use super::{BlkFrontend, FrontendError};

/// Where a queue's parts lie in the frontend's guest memory file (byte offsets; guest address
/// = [`super::GPA_BASE`] + offset), each starting a page: descriptor table, avail ring, used
/// ring, request headers with their status bytes, data buffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueLayout {
    pub desc: usize,
    pub avail: usize,
    pub used: usize,
    pub hdrs: usize,
    pub data: usize,
}

fn truncate(fd: RawFd, len: u64) -> io::Result<()> {
    let len =
        libc::off_t::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: `ftruncate` on a descriptor the frontend keeps open; no memory is passed.
    if unsafe { libc::ftruncate(fd, len) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl BlkFrontend {
    /// Queue `q`'s parts in guest memory.
    pub fn layout(&self, q: usize) -> QueueLayout {
        let vq = &self.queues[q];
        QueueLayout {
            desc: vq.desc,
            avail: vq.avail,
            used: vq.used,
            hdrs: vq.hdrs,
            data: vq.data,
        }
    }

    /// Bytes of guest memory (the region SET_MEM_TABLE declares: the whole mapping).
    pub fn memory_len(&self) -> usize {
        self.mem.len()
    }

    /// Shortens the guest memory file to `len` bytes; the mappings (here and the backend's)
    /// stay as they are. The next [`BlkFrontend::reconnect`] declares the region at its old
    /// size: larger than its file.
    pub fn truncate_memory(&self, len: usize) -> io::Result<()> {
        self.mem.file().set_len(len as u64)
    }

    /// Shortens the file of the kept inflight region to `len` bytes.
    pub fn truncate_inflight(&self, len: u64) -> io::Result<()> {
        let region = self
            .inflight
            .as_ref()
            .ok_or_else(|| io::Error::other("the frontend keeps no inflight region"))?;
        truncate(region.fd(), len)
    }

    /// Sends GET_FEATURES: fails once the backend has closed the connection.
    pub fn ping(&self) -> Result<u64, FrontendError> {
        let conn = self.conn.as_ref().ok_or(FrontendError::Disconnected)?;
        Ok(conn.get_features()?)
    }
}
