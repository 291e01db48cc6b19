//! Scatter gather lists for a command's data (NVMe Base 2.0 §4.1.2), for controllers that
//! report SGL support in Identify Controller (SGLS bits 1:0).
//!
//! One contiguous piece becomes a Data Block descriptor in the command itself. Several
//! become a Last Segment descriptor in the command pointing at a segment of Data Block
//! descriptors, in memory the caller provides ([`SglSegment`]); pieces that touch are joined
//! into one descriptor. Unlike PRPs, SGLs take pieces of any alignment, except that a
//! controller may require dword alignment and granularity of every Data Block (SGLS bits 1:0
//! = 10b: address and length with bits 1:0 clear).
//!
//! One segment is enough for vubd's requests (a virtio-blk request has at most `seg_max`
//! buffers); a segment too small is [`SglError::SegmentFull`].

use thiserror::Error;

use super::Dptr;
use crate::nvme::spec::Sgls;

/// SGL descriptor identifiers: type in bits 7:4, subtype (0h: Address) in bits 3:0
/// (Base 2.0 Figure 117).
const DATA_BLOCK: u8 = 0x00;
const LAST_SEGMENT: u8 = 0x30;
pub const DESCRIPTOR_LEN: usize = 16;

/// What the controller accepts for Data Block descriptors (Identify Controller SGLS 1:0).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SglAlign {
    /// 01b: any address and length.
    Byte,
    /// 10b: address and length dword aligned.
    Dword,
}

impl SglAlign {
    /// `None` when the controller does not support SGLs for the NVM command set (00b, or the
    /// reserved 11b).
    pub fn from_sgls(sgls: Sgls) -> Option<SglAlign> {
        match sgls.0 & 3 {
            1 => Some(SglAlign::Byte),
            2 => Some(SglAlign::Dword),
            _ => None,
        }
    }

    fn allows(self, iova: u64, len: u64) -> bool {
        match self {
            SglAlign::Byte => true,
            SglAlign::Dword => (iova | len) & 3 == 0,
        }
    }
}

/// Why data could not be described with an SGL.
#[derive(Clone, Copy, Debug, Error, PartialEq, Eq)]
pub enum SglError {
    /// The controller wants dword aligned Data Blocks (SGLS 10b).
    #[error("piece {index} at {iova:#x} of {len} bytes is not dword aligned")]
    Unaligned { index: usize, iova: u64, len: usize },
    /// A Data Block's length field is 32 bits.
    #[error("piece {index} of {len} bytes is longer than a descriptor holds")]
    PieceTooLong { index: usize, len: usize },
    #[error("piece {index} wraps the address space")]
    AddressOverflow { index: usize },
    #[error("pieces hold {got} bytes, the command transfers {expected}")]
    LengthMismatch { expected: usize, got: usize },
    #[error("SGL needs {needed} descriptors, the segment holds {capacity}")]
    SegmentFull { needed: usize, capacity: usize },
    /// A segment must be qword aligned (§4.1.2) and fit the address space.
    #[error("SGL segment at {iova:#x} is misplaced")]
    SegmentMisplaced { iova: u64 },
}

/// Memory for a command's SGL segment: descriptors at IOVA `iova`, written by the CPU and
/// read by the controller once the command is submitted. The caller keeps it (and does not
/// reuse it) until the command completes.
#[derive(Debug)]
pub struct SglSegment<'a> {
    descs: &'a mut [[u8; DESCRIPTOR_LEN]],
    iova: u64,
}

impl<'a> SglSegment<'a> {
    pub fn new(descs: &'a mut [[u8; DESCRIPTOR_LEN]], iova: u64) -> Result<Self, SglError> {
        let fits = (descs.len() as u64)
            .checked_mul(DESCRIPTOR_LEN as u64)
            .and_then(|b| iova.checked_add(b))
            .is_some();
        if iova % 8 != 0 || !fits {
            return Err(SglError::SegmentMisplaced { iova });
        }
        Ok(Self { descs, iova })
    }

    /// Descriptors the segment holds.
    pub fn capacity(&self) -> usize {
        self.descs.len()
    }

    pub fn iova(&self) -> u64 {
        self.iova
    }

    pub fn as_slice(&self) -> &[[u8; DESCRIPTOR_LEN]] {
        self.descs
    }
}

/// An SGL descriptor in wire format: address (bytes 7:0), length (11:8), identifier (15).
pub fn descriptor(id: u8, addr: u64, len: u32) -> [u8; DESCRIPTOR_LEN] {
    let mut d = [0; DESCRIPTOR_LEN];
    d[..8].copy_from_slice(&addr.to_le_bytes());
    d[8..12].copy_from_slice(&len.to_le_bytes());
    d[15] = id;
    d
}

/// A descriptor's identifier, address and length.
pub fn decode(d: &[u8; DESCRIPTOR_LEN]) -> (u8, u64, u32) {
    let mut addr = [0; 8];
    addr.copy_from_slice(&d[..8]);
    let mut len = [0; 4];
    len.copy_from_slice(&d[8..12]);
    (d[15], u64::from_le_bytes(addr), u32::from_le_bytes(len))
}

/// What goes into a command for its data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SglPtr {
    /// The descriptor for DPTR: a Data Block, or a Last Segment pointing at the segment.
    pub desc: [u8; DESCRIPTOR_LEN],
    /// Descriptors written to the segment; 0 when the data fits in DPTR.
    pub segment_descs: usize,
}

impl SglPtr {
    pub fn dptr(self) -> Dptr {
        Dptr::Sgl(self.desc)
    }
}

/// Builds an SGL one piece at a time (for callers that walk their data with a closure).
/// Nothing is allocated. The first error is kept: later pushes do nothing and
/// [`SglBuilder::finish`] returns it.
#[derive(Debug)]
pub struct SglBuilder<'s, 'a> {
    seg: &'s mut SglSegment<'a>,
    align: SglAlign,
    /// The newest run of bytes, not yet written: it may grow, or be the only one.
    pending: Option<(u64, u32)>,
    /// Descriptors written, or that would have been past the segment's end.
    written: usize,
    pieces: usize,
    bytes: usize,
    error: Option<SglError>,
}

impl<'s, 'a> SglBuilder<'s, 'a> {
    pub fn new(seg: &'s mut SglSegment<'a>, align: SglAlign) -> Self {
        Self {
            seg,
            align,
            pending: None,
            written: 0,
            pieces: 0,
            bytes: 0,
            error: None,
        }
    }

    /// Adds the next piece of data. Empty pieces are skipped.
    pub fn push(&mut self, iova: u64, len: usize) -> Result<(), SglError> {
        if let Some(e) = self.error {
            return Err(e);
        }
        self.add(iova, len).inspect_err(|&e| self.error = Some(e))
    }

    fn add(&mut self, iova: u64, len: usize) -> Result<(), SglError> {
        if len == 0 {
            return Ok(());
        }
        let index = self.pieces;
        let Ok(len32) = u32::try_from(len) else {
            return Err(SglError::PieceTooLong { index, len });
        };
        iova.checked_add(len as u64)
            .ok_or(SglError::AddressOverflow { index })?;
        if !self.align.allows(iova, len as u64) {
            return Err(SglError::Unaligned { index, iova, len });
        }
        self.pieces += 1;
        self.bytes += len;
        if let Some((a, n)) = self.pending {
            // Touching pieces share a descriptor while its length fits.
            if a + u64::from(n) == iova {
                if let Some(sum) = n.checked_add(len32) {
                    self.pending = Some((a, sum));
                    return Ok(());
                }
            }
            self.store(a, n);
        }
        self.pending = Some((iova, len32));
        Ok(())
    }

    fn store(&mut self, addr: u64, len: u32) {
        if let Some(d) = self.seg.descs.get_mut(self.written) {
            *d = descriptor(DATA_BLOCK, addr, len);
        }
        self.written += 1;
    }

    /// The SGL for a command transferring `transfer_len` bytes.
    pub fn finish(mut self, transfer_len: usize) -> Result<SglPtr, SglError> {
        if let Some(e) = self.error {
            return Err(e);
        }
        if self.bytes != transfer_len {
            return Err(SglError::LengthMismatch {
                expected: transfer_len,
                got: self.bytes,
            });
        }
        let (a, n) = self.pending.unwrap_or((0, 0));
        if self.written == 0 {
            return Ok(SglPtr {
                desc: descriptor(DATA_BLOCK, a, n),
                segment_descs: 0,
            });
        }
        self.store(a, n);
        let capacity = self.seg.capacity();
        let seg_len = u32::try_from(self.written * DESCRIPTOR_LEN);
        let (true, Ok(seg_len)) = (self.written <= capacity, seg_len) else {
            return Err(SglError::SegmentFull {
                needed: self.written,
                capacity,
            });
        };
        Ok(SglPtr {
            desc: descriptor(LAST_SEGMENT, self.seg.iova, seg_len),
            segment_descs: self.written,
        })
    }
}

/// An SGL for `pieces` (in transfer order) of a command transferring `transfer_len` bytes,
/// with the segment (if one is needed) in `seg`.
pub fn build(
    pieces: impl IntoIterator<Item = (u64, usize)>,
    transfer_len: usize,
    align: SglAlign,
    seg: &mut SglSegment<'_>,
) -> Result<SglPtr, SglError> {
    let mut b = SglBuilder::new(seg, align);
    for (iova, len) in pieces {
        b.push(iova, len)?;
    }
    b.finish(transfer_len)
}

#[cfg(test)]
mod tests;
