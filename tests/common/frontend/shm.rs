//! Shared memory of the frontend: mappings of a file (guest memory, the inflight region),
//! read and written with volatile accesses, since the backend process uses them at the same
//! time.

use std::ffi::CStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::{mem, ptr};

/// A shared mapping of (part of) a file.
#[derive(Debug)]
pub(super) struct Mapping {
    pub(super) ptr: *mut u8,
    pub(super) len: usize,
}

impl Mapping {
    pub(super) fn new(file: &File, offset: u64, len: usize) -> io::Result<Self> {
        let offset = libc::off_t::try_from(offset).map_err(|_| io::ErrorKind::InvalidInput)?;
        // SAFETY: a new shared mapping at an address the kernel chooses overlaps no Rust
        // object; the result is checked against MAP_FAILED before use.
        let ptr = unsafe {
            libc::mmap(
                ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                offset,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Self {
            ptr: ptr.cast(),
            len,
        })
    }

    /// `off..off + len` of the mapping, checked.
    pub(super) fn at(&self, off: usize, len: usize) -> *mut u8 {
        assert!(
            off.checked_add(len).is_some_and(|end| end <= self.len),
            "{len} bytes at {off} are outside a mapping of {}",
            self.len
        );
        self.ptr.wrapping_add(off)
    }

    pub(super) fn read<T: Copy>(&self, off: usize) -> T {
        let p = self.at(off, mem::size_of::<T>()).cast::<T>();
        assert!(p.is_aligned(), "misaligned access at {off}");
        // SAFETY: in bounds of the live mapping and aligned (both asserted); volatile, because
        // the backend process writes the same memory concurrently.
        unsafe { p.read_volatile() }
    }

    pub(super) fn write<T: Copy>(&self, off: usize, v: T) {
        let p = self.at(off, mem::size_of::<T>()).cast::<T>();
        assert!(p.is_aligned(), "misaligned access at {off}");
        // SAFETY: as in `read`.
        unsafe { p.write_volatile(v) }
    }

    pub(super) fn u16_at(&self, off: usize) -> u16 {
        u16::from_le(self.read(off))
    }

    pub(super) fn set_u16(&self, off: usize, v: u16) {
        self.write(off, v.to_le());
    }

    pub(super) fn u32_at(&self, off: usize) -> u32 {
        u32::from_le(self.read(off))
    }

    pub(super) fn set_u32(&self, off: usize, v: u32) {
        self.write(off, v.to_le());
    }

    pub(super) fn u64_at(&self, off: usize) -> u64 {
        u64::from_le(self.read(off))
    }

    pub(super) fn set_u64(&self, off: usize, v: u64) {
        self.write(off, v.to_le());
    }
}

// SAFETY: the mapping is plain shared memory owned by this value; nothing about it is tied
// to the thread that made it, and access goes through `&self` / `&mut self` of its owner.
unsafe impl Send for Mapping {}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` is the mapping made in `new`; references into it (`reap`'s data
        // slices, `Area`s) borrow the frontend that owns it, so none outlives it.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

pub(super) fn memfd(name: &CStr, len: usize) -> io::Result<File> {
    // SAFETY: a NUL-terminated name and valid flags; the result is checked.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just created and nothing else owns it.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(len as u64)?;
    Ok(file)
}
