//! Physical Region Page entries for a command's data (NVMe Base 2.0 §4.1.1).
//!
//! The data arrives as pieces `(iova, len)` in transfer order (an iovec list, say). PRPs can
//! describe it only if it is made of whole controller pages apart from its two ends:
//!
//! - the first byte may be anywhere dword aligned in its page (PRP Entry 1 carries an
//!   offset, bits 1:0 clear);
//! - every later piece starts on a page boundary, every piece before the last ends on one;
//! - the pieces hold exactly the command's transfer length.
//!
//! PRP1 points at the first byte. One more page goes straight into PRP2; more than that and
//! PRP2 points at a PRP list, in memory the caller provides ([`PrpList`]). When the list
//! reaches the last entry of a page and more than one entry remains, that entry points to the
//! next page of the list instead (the list area is contiguous, so "the next page" is simply
//! the next entry).
//!
//! Pieces that break the rules give a [`PrpError`] for which [`PrpError::needs_fallback`]
//! is true: the caller describes the data with an SGL instead, or bounces it. A list area
//! too small is a different error ([`PrpError::ListTooSmall`]).

use thiserror::Error;

use super::{Dptr, PageSize};

const ENTRY: u64 = 8;

/// Why data could not be described with PRPs.
#[derive(Clone, Copy, Debug, Error, PartialEq, Eq)]
pub enum PrpError {
    /// PRP Entry 1 must be dword aligned (bits 1:0 clear, §4.1.1).
    #[error("data starts at {iova:#x}, not dword aligned")]
    FirstUnaligned { iova: u64 },
    /// Every piece after the first must start a page.
    #[error("piece {index} starts at {iova:#x}, inside a page")]
    PieceStartUnaligned { index: usize, iova: u64 },
    /// Every piece before the last must end a page.
    #[error("piece {index} ends at {end:#x}, inside a page")]
    PieceEndUnaligned { index: usize, end: u64 },
    #[error("piece {index} wraps the address space")]
    AddressOverflow { index: usize },
    #[error("pieces hold {got} bytes, the command transfers {expected}")]
    LengthMismatch { expected: usize, got: usize },
    /// The PRP list needs `needed` entries (chain pointers included); the area has
    /// `capacity`.
    #[error("PRP list needs {needed} entries, the area holds {capacity}")]
    ListTooSmall { needed: usize, capacity: usize },
    /// A list area must be qword aligned, and start a page unless it lies within one.
    #[error("PRP list area at {iova:#x} of {slots} entries is misplaced")]
    ListMisplaced { iova: u64, slots: usize },
}

impl PrpError {
    /// The data cannot be described by PRPs at all: use an SGL or a bounce buffer. False for
    /// the caller's own mistakes (length, list area), which no other layout fixes.
    pub fn needs_fallback(&self) -> bool {
        matches!(
            self,
            PrpError::FirstUnaligned { .. }
                | PrpError::PieceStartUnaligned { .. }
                | PrpError::PieceEndUnaligned { .. }
        )
    }
}

/// Memory for a command's PRP list: `slots` at IOVA `iova`, written by the CPU and read by
/// the controller once the command is submitted. The caller keeps it (and does not reuse it)
/// until the command completes.
#[derive(Debug)]
pub struct PrpList<'a> {
    slots: &'a mut [u64],
    iova: u64,
    page: PageSize,
}

impl<'a> PrpList<'a> {
    /// A list area at `iova` for pages of `page`. It must be qword aligned, and if it
    /// crosses a page boundary it must start one.
    ///
    /// The spec lets a list start anywhere in a page and chains at the page's last entry,
    /// but QEMU's controller counts a page's worth of entries from PRP2 instead; a list that
    /// starts a page, or never reaches a page boundary, reads the same both ways.
    #[inline]
    pub fn new(slots: &'a mut [u64], iova: u64, page: PageSize) -> Result<Self, PrpError> {
        let misplaced = PrpError::ListMisplaced {
            iova,
            slots: slots.len(),
        };
        let bytes = (slots.len() as u64).checked_mul(ENTRY).ok_or(misplaced)?;
        let end = iova.checked_add(bytes).ok_or(misplaced)?;
        let within_one_page = bytes == 0 || (end - 1) >> page.shift == iova >> page.shift;
        if iova % ENTRY != 0 || !(page.is_aligned(iova) || within_one_page) {
            return Err(misplaced);
        }
        Ok(Self { slots, iova, page })
    }

    /// Entries the area holds.
    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    pub fn iova(&self) -> u64 {
        self.iova
    }

    /// The entries as written (for tests and debugging).
    pub fn as_slice(&self) -> &[u64] {
        self.slots
    }

    /// The last entry of a page is a chain pointer when more than one entry follows.
    fn ends_page(&self, slot: usize) -> bool {
        self.page.offset(self.iova + slot as u64 * ENTRY) == self.page.bytes() as u64 - ENTRY
    }

    fn slot_iova(&self, slot: usize) -> u64 {
        self.iova + slot as u64 * ENTRY
    }
}

/// Entries a page-aligned list needs, at most, for a transfer of up to `max_len` bytes with
/// pages of `page` (chain pointers included): what to allocate per command given MDTS.
pub fn list_slots_for(max_len: usize, page: PageSize) -> usize {
    // Worst case: the data starts just past a page's start, so it touches one page more.
    let data_entries = max_len.div_ceil(page.bytes()) + usize::from(max_len > 0);
    if data_entries <= 2 {
        return 0;
    }
    let in_list = data_entries - 1;
    // A list page holds `per_page - 1` entries and a chain pointer, the last one `per_page`.
    let per_page = page.bytes() / ENTRY as usize;
    let pages = (in_list - 1).div_ceil(per_page - 1);
    in_list + pages - 1
}

/// What goes into a command for its data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Prps {
    pub prp1: u64,
    /// The second data page, the IOVA of the PRP list, or 0.
    pub prp2: u64,
    /// Entries written to the PRP list (data and chain pointers); 0 when none is used.
    pub list_slots: usize,
}

impl Prps {
    pub fn dptr(self) -> Dptr {
        Dptr::Prp {
            prp1: self.prp1,
            prp2: self.prp2,
        }
    }
}

/// Builds PRPs one piece at a time, for callers that walk their data with a closure
/// (`DataRef::for_each_piece`). Nothing is allocated.
///
/// The first rule broken is kept: later pushes do nothing and [`PrpBuilder::finish`]
/// returns it.
#[derive(Debug)]
pub struct PrpBuilder<'l, 'a> {
    list: &'l mut PrpList<'a>,
    /// Data entries so far.
    entries: usize,
    prp1: u64,
    second: u64,
    /// The newest entry past the second, written once it is known whether it is the last.
    pending: u64,
    /// Next list slot.
    slot: usize,
    /// Non-empty pieces so far.
    pieces: usize,
    prev_end: u64,
    bytes: usize,
    error: Option<PrpError>,
}

impl<'l, 'a> PrpBuilder<'l, 'a> {
    #[inline]
    pub fn new(list: &'l mut PrpList<'a>) -> Self {
        Self {
            list,
            entries: 0,
            prp1: 0,
            second: 0,
            pending: 0,
            slot: 0,
            pieces: 0,
            prev_end: 0,
            bytes: 0,
            error: None,
        }
    }

    /// Adds the next piece of data. Empty pieces are skipped.
    #[inline]
    pub fn push(&mut self, iova: u64, len: usize) -> Result<(), PrpError> {
        if let Some(e) = self.error {
            return Err(e);
        }
        self.add(iova, len).inspect_err(|&e| self.error = Some(e))
    }

    #[inline]
    fn add(&mut self, iova: u64, len: usize) -> Result<(), PrpError> {
        if len == 0 {
            return Ok(());
        }
        let index = self.pieces;
        let page = self.list.page;
        let end = iova
            .checked_add(len as u64)
            .ok_or(PrpError::AddressOverflow { index })?;
        let mut at = if index == 0 {
            if iova % 4 != 0 {
                return Err(PrpError::FirstUnaligned { iova });
            }
            self.entry(iova);
            // The next page boundary; `end` is past it only if the data crosses it.
            (iova | (page.bytes() as u64 - 1)) + 1
        } else {
            if !page.is_aligned(self.prev_end) {
                return Err(PrpError::PieceEndUnaligned {
                    index: index - 1,
                    end: self.prev_end,
                });
            }
            if !page.is_aligned(iova) {
                return Err(PrpError::PieceStartUnaligned { index, iova });
            }
            iova
        };
        while at < end {
            self.entry(at);
            at += page.bytes() as u64;
        }
        self.pieces += 1;
        self.prev_end = end;
        self.bytes += len;
        Ok(())
    }

    #[inline]
    fn entry(&mut self, e: u64) {
        self.entries += 1;
        match self.entries {
            1 => self.prp1 = e,
            2 => self.second = e,
            3 => {
                self.write(self.second, true);
                self.pending = e;
            }
            _ => {
                self.write(self.pending, true);
                self.pending = e;
            }
        }
    }

    /// Puts a data entry into the list; `more` says another entry follows it.
    fn write(&mut self, e: u64, more: bool) {
        if more && self.list.ends_page(self.slot) {
            let next = self.list.slot_iova(self.slot + 1);
            self.store(next);
        }
        self.store(e);
    }

    fn store(&mut self, v: u64) {
        // Past the end, only count: the error says how much was needed.
        if let Some(s) = self.list.slots.get_mut(self.slot) {
            *s = v;
        }
        self.slot += 1;
    }

    /// The PRPs for a command transferring `transfer_len` bytes.
    #[inline]
    pub fn finish(mut self, transfer_len: usize) -> Result<Prps, PrpError> {
        if let Some(e) = self.error {
            return Err(e);
        }
        if self.bytes != transfer_len {
            return Err(PrpError::LengthMismatch {
                expected: transfer_len,
                got: self.bytes,
            });
        }
        let prp2 = match self.entries {
            0 | 1 => 0,
            2 => self.second,
            _ => {
                self.write(self.pending, false);
                if self.slot > self.list.capacity() {
                    return Err(PrpError::ListTooSmall {
                        needed: self.slot,
                        capacity: self.list.capacity(),
                    });
                }
                self.list.iova
            }
        };
        Ok(Prps {
            prp1: self.prp1,
            prp2,
            list_slots: self.slot,
        })
    }
}

/// PRPs for `pieces` (in transfer order) of a command transferring `transfer_len` bytes,
/// with the list (if one is needed) in `list`.
#[inline]
pub fn build(
    pieces: impl IntoIterator<Item = (u64, usize)>,
    transfer_len: usize,
    list: &mut PrpList<'_>,
) -> Result<Prps, PrpError> {
    let mut b = PrpBuilder::new(list);
    for (iova, len) in pieces {
        b.push(iova, len)?;
    }
    b.finish(transfer_len)
}

#[cfg(test)]
mod tests;
