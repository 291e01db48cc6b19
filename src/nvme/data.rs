//! Command data as byte ranges of a caller's iovec array, without copying: what an NVMe/TCP
//! capsule or H2CData PDU sends and a C2HData PDU fills, what PCIe PRP entries point at. The
//! iovecs point into memory the caller keeps alive (and does not reuse) until the command
//! completes.

use libc::iovec;

/// Bytes `offset..offset + len` of the buffers an iovec array describes.
#[derive(Clone, Copy, Debug)]
pub struct DataRef {
    iov: *const iovec,
    count: usize,
    offset: usize,
    len: usize,
}

// SAFETY: a `DataRef` is an address range description; the caller of `DataRef::new` promises
// that the iovec array and the memory it points at stay valid and reserved for the command
// until it completes, whichever thread the owning queue runs on.
unsafe impl Send for DataRef {}

/// An empty range.
impl Default for DataRef {
    fn default() -> Self {
        Self {
            iov: std::ptr::null(),
            count: 0,
            offset: 0,
            len: 0,
        }
    }
}

impl DataRef {
    /// The range `offset..offset + len` of `iov`, or `None` when the iovecs hold fewer bytes.
    ///
    /// # Safety
    ///
    /// `iov` must stay valid, unchanged, and its buffers mapped and not used for anything
    /// else until every command built on the returned range (or a part of it) has completed.
    pub unsafe fn new(iov: &[iovec], offset: usize, len: usize) -> Option<Self> {
        let total: usize = iov.iter().map(|v| v.iov_len).sum();
        (offset.checked_add(len)? <= total).then_some(Self {
            iov: iov.as_ptr(),
            count: iov.len(),
            offset,
            len,
        })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The part `from..from + len` of this range, or `None` when it does not fit inside.
    pub fn sub(&self, from: usize, len: usize) -> Option<Self> {
        (from.checked_add(len)? <= self.len).then_some(Self {
            offset: self.offset + from,
            len,
            ..*self
        })
    }

    fn iovecs(&self) -> &[iovec] {
        if self.count == 0 {
            return &[];
        }
        // SAFETY: `new`'s contract keeps `count` iovecs at `iov` valid while the range is used.
        unsafe { std::slice::from_raw_parts(self.iov, self.count) }
    }

    /// Calls `f` with each contiguous piece `(address, length)` of `from..from + len` (clipped
    /// to the range), in order.
    pub fn for_each_piece(&self, from: usize, len: usize, mut f: impl FnMut(*mut u8, usize)) {
        let end = from.saturating_add(len).min(self.len);
        if from >= end {
            return;
        }
        // Absolute positions within the iovec array.
        let (mut at, stop) = (self.offset + from, self.offset + end);
        let mut base = 0usize;
        for v in self.iovecs() {
            let next = base + v.iov_len;
            if at < next {
                let piece_end = next.min(stop);
                f(
                    v.iov_base.cast::<u8>().wrapping_add(at - base),
                    piece_end - at,
                );
                at = piece_end;
                if at == stop {
                    return;
                }
            }
            base = next;
        }
    }

    /// The range as one contiguous piece `(address, length)`, if it lies inside a single
    /// iovec (the common case: one guest buffer per request).
    #[inline]
    pub fn single_piece(&self) -> Option<(*mut u8, usize)> {
        let mut base = 0usize;
        for v in self.iovecs() {
            let next = base + v.iov_len;
            if self.offset < next {
                return (self.offset + self.len <= next).then(|| {
                    (
                        v.iov_base.cast::<u8>().wrapping_add(self.offset - base),
                        self.len,
                    )
                });
            }
            base = next;
        }
        None
    }

    /// Appends iovecs for `from..from + len` of the range to `out`, as far as `out` has room;
    /// returns the bytes they cover.
    pub fn append_to(&self, from: usize, len: usize, out: &mut IovBuf) -> usize {
        let mut covered = 0;
        let mut full = false;
        self.for_each_piece(from, len, |p, n| {
            if full || !out.push(p, n) {
                full = true;
            } else {
                covered += n;
            }
        });
        covered
    }

    /// Folds the bytes `from..from + len` of the range into a CRC32C.
    pub fn crc32c_append(&self, crc: u32, from: usize, len: usize) -> u32 {
        let mut crc = crc;
        self.for_each_piece(from, len, |p, n| {
            // SAFETY: the piece lies inside a buffer that `new`'s contract keeps mapped. The
            // memory may be shared with a guest that could change it meanwhile: the bytes are
            // only used for a digest, and a torn read yields a wrong digest, never UB-visible
            // Rust state.
            let bytes = unsafe { std::slice::from_raw_parts(p.cast_const(), n) };
            crc = crc32c::crc32c_append(crc, bytes);
        });
        crc
    }
}

/// A fixed-capacity iovec array for one `sendmsg` / `readv`; filling it never allocates.
#[derive(Debug)]
pub struct IovBuf {
    v: Box<[iovec]>,
    len: usize,
    bytes: usize,
}

// SAFETY: the iovecs are addresses only; `IovBuf` owns no Rust object through them.
unsafe impl Send for IovBuf {}

impl IovBuf {
    pub fn with_capacity(n: usize) -> Self {
        let empty = iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        };
        Self {
            v: vec![empty; n].into_boxed_slice(),
            len: 0,
            bytes: 0,
        }
    }

    pub fn clear(&mut self) {
        self.len = 0;
        self.bytes = 0;
    }

    /// Appends one buffer; false when the array is full (nothing appended). Empty buffers are
    /// skipped.
    pub fn push(&mut self, base: *mut u8, len: usize) -> bool {
        if len == 0 {
            return true;
        }
        let Some(slot) = self.v.get_mut(self.len) else {
            return false;
        };
        *slot = iovec {
            iov_base: base.cast(),
            iov_len: len,
        };
        self.len += 1;
        self.bytes += len;
        true
    }

    /// Room for at least `n` more iovecs.
    pub fn has_room(&self, n: usize) -> bool {
        self.v.len() - self.len >= n
    }

    pub fn as_slice(&self) -> &[iovec] {
        &self.v[..self.len]
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes the iovecs cover.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iov(buf: &mut [u8]) -> iovec {
        iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        }
    }

    /// Three buffers of 3, 0 and 5 bytes holding 0..8.
    fn fixture(a: &mut [u8; 3], b: &mut [u8; 0], c: &mut [u8; 5]) -> [iovec; 3] {
        a.copy_from_slice(&[0, 1, 2]);
        c.copy_from_slice(&[3, 4, 5, 6, 7]);
        [iov(a), iov(b), iov(c)]
    }

    fn collect(d: &DataRef, from: usize, len: usize) -> Vec<u8> {
        let mut out = Vec::new();
        d.for_each_piece(from, len, |p, n| {
            // SAFETY: test buffers alive for the whole test.
            out.extend_from_slice(unsafe { std::slice::from_raw_parts(p, n) });
        });
        out
    }

    #[test]
    fn pieces_of_every_sub_range_are_the_bytes_in_order() {
        let (mut a, mut b, mut c) = ([0u8; 3], [0u8; 0], [0u8; 5]);
        let v = fixture(&mut a, &mut b, &mut c);
        // SAFETY: the buffers outlive every use below.
        let whole = unsafe { DataRef::new(&v, 0, 8) }.expect("fits");
        for off in 0..=8 {
            for len in 0..=8 - off {
                let d = whole.sub(off, len).expect("inside");
                assert_eq!(d.len(), len);
                let want: Vec<u8> = (off as u8..(off + len) as u8).collect();
                assert_eq!(collect(&d, 0, len), want, "{off}+{len}");
                for from in 0..=len {
                    assert_eq!(
                        collect(&d, from, len),
                        want[from..],
                        "{off}+{len} from {from}"
                    );
                }
            }
        }
        assert!(whole.sub(8, 1).is_none());
        assert!(whole.sub(usize::MAX, 2).is_none());
        // SAFETY: as above.
        assert!(unsafe { DataRef::new(&v, 4, 5) }.is_none());
    }

    #[test]
    fn append_stops_when_the_iovec_array_is_full() {
        let (mut a, mut b, mut c) = ([0u8; 3], [0u8; 0], [0u8; 5]);
        let v = fixture(&mut a, &mut b, &mut c);
        // SAFETY: the buffers outlive every use below.
        let d = unsafe { DataRef::new(&v, 1, 6) }.expect("fits");
        let mut out = IovBuf::with_capacity(1);
        assert_eq!(d.append_to(0, 6, &mut out), 2, "only the first piece fits");
        assert_eq!(out.bytes(), 2);
        let mut out = IovBuf::with_capacity(4);
        assert_eq!(d.append_to(1, 100, &mut out), 5);
        assert_eq!(out.as_slice().len(), 2);
    }

    #[test]
    fn crc_over_pieces_equals_crc_over_the_bytes() {
        let (mut a, mut b, mut c) = ([0u8; 3], [0u8; 0], [0u8; 5]);
        let v = fixture(&mut a, &mut b, &mut c);
        // SAFETY: the buffers outlive every use below.
        let d = unsafe { DataRef::new(&v, 0, 8) }.expect("fits");
        let bytes: Vec<u8> = (0..8).collect();
        assert_eq!(d.crc32c_append(0, 0, 8), crc32c::crc32c(&bytes));
        let part = d.crc32c_append(0, 0, 2);
        assert_eq!(d.crc32c_append(part, 2, 6), crc32c::crc32c(&bytes));
    }
}
