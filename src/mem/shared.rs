//! Memory shared with another process through a file: a memfd of our own that a frontend
//! maps too (the inflight region), or a range of a file a frontend handed over (its kept
//! inflight region, the dirty log). The range is checked against the file first: a mapping
//! past the end of a file faults (SIGBUS) when touched. The other process can still shorten
//! the file later: [`SharedMapping::watch`] registers the mapping with the SIGBUS handler of
//! [`super::fault`], so that such a fault fails one device session instead of the process.

use std::ffi::CStr;
use std::fs::File;
use std::io;
use std::os::fd::FromRawFd;
use std::sync::Arc;

use thiserror::Error;
use vm_memory::{FileOffset, MmapRegion};

use super::fault::{self, DeviceFaults, FaultError, Mapped, Registration};

/// Why a shared mapping could not be made.
#[derive(Debug, Error)]
pub enum SharedError {
    #[error("{len} bytes at offset {offset} are empty or past the end of the file ({file} bytes)")]
    OutOfFile { offset: u64, len: u64, file: u64 },
    #[error("cannot create or inspect the shared file")]
    File(#[source] io::Error),
    #[error("cannot map the shared file")]
    Map(#[source] vm_memory::mmap::MmapRegionError),
}

/// A read-write, shared mapping of `len` bytes of a file, with the file.
#[derive(Debug)]
pub struct SharedMapping {
    // Declared before `map`, so dropped before it: the entry goes before the mapping.
    registration: Option<Registration>,
    map: MmapRegion<()>,
    file: File,
}

impl SharedMapping {
    /// A new zeroed memfd of `len` bytes named `name` (as /proc shows it), mapped whole.
    pub fn memfd(name: &CStr, len: usize) -> Result<Self, SharedError> {
        // SAFETY: a NUL-terminated name and valid flags; the result is checked.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(SharedError::File(io::Error::last_os_error()));
        }
        // SAFETY: `fd` was just created and nothing else owns it.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(len as u64).map_err(SharedError::File)?;
        Self::of_file(file, 0, len as u64)
    }

    /// `len` bytes at `offset` of `file`, refused when the file does not hold them all.
    pub fn of_file(file: File, offset: u64, len: u64) -> Result<Self, SharedError> {
        let file_len = file.metadata().map_err(SharedError::File)?.len();
        let out_of_file = || SharedError::OutOfFile {
            offset,
            len,
            file: file_len,
        };
        let end = offset.checked_add(len).ok_or_else(out_of_file)?;
        let size = usize::try_from(len).map_err(|_| out_of_file())?;
        if len == 0 || end > file_len {
            return Err(out_of_file());
        }
        let dup = file.try_clone().map_err(SharedError::File)?;
        let map = MmapRegion::build(
            Some(FileOffset::new(dup, offset)),
            size,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
        )
        .map_err(SharedError::Map)?;
        // A frontend's memory: not for vubd's core dumps (`mem::dump`).
        super::dump::exclude(map.as_ptr(), map.size()).map_err(SharedError::File)?;
        Ok(Self {
            registration: None,
            map,
            file,
        })
    }

    /// Registers the mapping as `mapped` of `owner`'s device session: from now on a fault in
    /// it (the other process shortened the file) is survived and fails that session.
    pub fn watch(&mut self, mapped: Mapped, owner: &Arc<DeviceFaults>) -> Result<(), FaultError> {
        let page = fault::page_size_of(&self.file);
        let registration =
            fault::register(self.map.as_ptr(), self.map.size(), page, mapped, owner)?;
        self.registration = Some(registration);
        Ok(())
    }

    /// The first mapped byte; `len()` bytes from it stay mapped while `self` lives.
    pub fn as_ptr(&self) -> *mut u8 {
        self.map.as_ptr()
    }

    pub fn len(&self) -> usize {
        self.map.size()
    }

    pub fn is_empty(&self) -> bool {
        self.map.size() == 0
    }

    /// The file, to hand to the other process.
    pub fn file(&self) -> &File {
        &self.file
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_memfd_is_mapped_whole_and_zeroed() {
        let m = SharedMapping::memfd(c"vubd-test-shared", 8192).expect("memfd");
        assert_eq!(m.len(), 8192);
        assert_eq!(m.file().metadata().expect("stat").len(), 8192);
        // SAFETY: 8192 bytes from `as_ptr` are mapped while `m` lives.
        let bytes = unsafe { std::slice::from_raw_parts(m.as_ptr(), m.len()) };
        assert!(bytes.iter().all(|&b| b == 0));
    }

    #[test]
    fn ranges_the_file_does_not_hold_are_refused() {
        let m = SharedMapping::memfd(c"vubd-test-shared", 4096).expect("memfd");
        let file = || m.file().try_clone().expect("dup");
        for (offset, len) in [(0, 0), (4096, 1), (0, 8192), (u64::MAX, 2)] {
            assert!(
                matches!(
                    SharedMapping::of_file(file(), offset, len),
                    Err(SharedError::OutOfFile { .. })
                ),
                "{len} bytes at {offset}"
            );
        }
        assert_eq!(
            SharedMapping::of_file(file(), 0, 4096)
                .expect("whole")
                .len(),
            4096
        );
    }
}
