//! Cutting a byte range of a namespace into NVMe commands: at the controller's maximum data
//! transfer size and at the 16-bit block counts of Read, Write and Write Zeroes (NVM Command
//! Set 1.0 §3.3). Shared by the transports.

/// One command's share of a range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Piece {
    pub slba: u64,
    /// Blocks, at least 1 (the command's NLB field holds `blocks - 1`).
    pub blocks: u32,
    /// Where the piece's data starts within the range, bytes.
    pub offset: usize,
    pub len: usize,
}

/// The range is not made of whole blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Unaligned;

/// The pieces of `offset..offset + len` (bytes) on a namespace of `1 << lba_shift`-byte
/// blocks, each at most `max_blocks` blocks. An empty range has no pieces.
pub fn split(
    offset: u64,
    len: u64,
    lba_shift: u32,
    max_blocks: u32,
) -> Result<impl Iterator<Item = Piece>, Unaligned> {
    let mask = (1u64 << lba_shift) - 1;
    if offset & mask != 0 || len & mask != 0 {
        return Err(Unaligned);
    }
    let (first, total) = (offset >> lba_shift, len >> lba_shift);
    let max = u64::from(max_blocks.max(1));
    let mut done = 0u64;
    Ok(std::iter::from_fn(move || {
        if done == total {
            return None;
        }
        let blocks = (total - done).min(max);
        let piece = Piece {
            slba: first + done,
            blocks: blocks as u32,
            offset: (done << lba_shift) as usize,
            len: (blocks << lba_shift) as usize,
        };
        done += blocks;
        Some(piece)
    }))
}

/// Most blocks one Read or Write may move: MDTS (a power of two in units of the controller's
/// minimum page size, 0 for no limit; NVMe Base 2.0 §5.17.2.1) and the 16-bit NLB field.
pub fn max_rw_blocks(mdts: u8, min_page_shift: u32, lba_shift: u32) -> u32 {
    const NLB_MAX: u32 = 1 << 16;
    if mdts == 0 {
        return NLB_MAX;
    }
    let shift = u32::from(mdts) + min_page_shift;
    match shift.checked_sub(lba_shift) {
        Some(s) if s < 16 => 1 << s,
        Some(_) => NLB_MAX,
        // A transfer limit smaller than one block cannot move anything: one block at a time
        // is the best the namespace allows (the controller will refuse it if it means it).
        None => 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pieces(offset: u64, len: u64, shift: u32, max: u32) -> Vec<Piece> {
        split(offset, len, shift, max).expect("aligned").collect()
    }

    #[test]
    fn a_range_within_the_limit_is_one_piece() {
        assert_eq!(
            pieces(8192, 4096, 9, 256),
            [Piece {
                slba: 16,
                blocks: 8,
                offset: 0,
                len: 4096
            }]
        );
        assert!(pieces(0, 0, 12, 1).is_empty());
    }

    #[test]
    fn long_ranges_are_cut_at_the_limit_and_cover_everything_in_order() {
        let p = pieces(4096, 5 * 4096 + 4096, 12, 2);
        let got: Vec<(u64, u32, usize, usize)> = p
            .iter()
            .map(|p| (p.slba, p.blocks, p.offset, p.len))
            .collect();
        assert_eq!(
            got,
            [(1, 2, 0, 8192), (3, 2, 8192, 8192), (5, 2, 16384, 8192)]
        );
        let p = pieces(0, 5 * 512, 9, 2);
        assert_eq!(p.last().map(|p| (p.slba, p.blocks)), Some((4, 1)));
    }

    #[test]
    fn ranges_not_made_of_whole_blocks_are_refused() {
        assert!(split(512, 4096, 12, 8).is_err());
        assert!(split(0, 4096 + 512, 12, 8).is_err());
        assert!(split(512, 1024, 9, 8).is_ok());
    }

    #[test]
    fn transfer_limits() {
        // MDTS 5 with 4 KiB pages: 128 KiB, i.e. 256 blocks of 512 or 32 of 4096.
        assert_eq!(max_rw_blocks(5, 12, 9), 256);
        assert_eq!(max_rw_blocks(5, 12, 12), 32);
        assert_eq!(
            max_rw_blocks(0, 12, 9),
            65536,
            "no MDTS: the NLB field limits"
        );
        assert_eq!(max_rw_blocks(20, 12, 9), 65536);
        assert_eq!(max_rw_blocks(0, 12, 16), 65536);
    }
}
