//! A buffer at an alignment O_DIRECT accepts, for the lab's guest programs
//! (`examples/genwrite.rs`, `examples/migcheck.rs`), which include this file by path.

/// `len` zeroed bytes starting on a multiple of `align`, inside an ordinary vector.
pub struct Aligned {
    storage: Vec<u8>,
    start: usize,
    len: usize,
}

impl Aligned {
    pub fn new(len: usize, align: usize) -> Self {
        let storage = vec![0u8; len + align];
        let start = storage.as_ptr().align_offset(align);
        assert!(start < align, "cannot align a heap buffer");
        Self {
            storage,
            start,
            len,
        }
    }

    pub fn get(&self) -> &[u8] {
        &self.storage[self.start..self.start + self.len]
    }

    pub fn get_mut(&mut self) -> &mut [u8] {
        &mut self.storage[self.start..self.start + self.len]
    }
}
