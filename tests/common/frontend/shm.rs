//! Shared memory of the frontend: mappings of a file (guest memory, the inflight region),
//! read and written with volatile accesses, since the backend process uses them at the same
//! time.

use std::ffi::CStr;
use std::fs::File;
use std::io;
use std::mem;

use vubd::mem::SharedMapping;

/// A shared mapping of (part of) a file, with volatile accessors.
#[derive(Debug)]
pub(super) struct Mapping {
    shared: SharedMapping,
}

impl Mapping {
    /// A new zeroed memfd of `len` bytes, mapped whole.
    pub(super) fn memfd(name: &CStr, len: usize) -> io::Result<Self> {
        let shared = SharedMapping::memfd(name, len).map_err(io::Error::other)?;
        Ok(Self { shared })
    }

    /// `len` bytes at `offset` of `file` (the backend's inflight region).
    pub(super) fn new(file: &File, offset: u64, len: usize) -> io::Result<Self> {
        let shared = SharedMapping::of_file(file.try_clone()?, offset, len as u64)
            .map_err(io::Error::other)?;
        Ok(Self { shared })
    }

    pub(super) fn ptr(&self) -> *mut u8 {
        self.shared.as_ptr()
    }

    pub(super) fn len(&self) -> usize {
        self.shared.len()
    }

    pub(super) fn file(&self) -> &File {
        self.shared.file()
    }

    /// `off..off + len` of the mapping, checked.
    pub(super) fn at(&self, off: usize, len: usize) -> *mut u8 {
        assert!(
            off.checked_add(len).is_some_and(|end| end <= self.len()),
            "{len} bytes at {off} are outside a mapping of {}",
            self.len()
        );
        self.ptr().wrapping_add(off)
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
