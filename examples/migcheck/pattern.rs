//! What migcheck writes to a block, and how that is checked: a block is written whole, and its
//! contents depend only on the block's number and its generation (how many times it was
//! written). Each 4 KiB page starts with a header (a magic word, the block, the generation,
//! the page's index in the block), so that a page holding something else says what it holds;
//! the rest of the page is a hash of the block, the generation and the word's position.
//!
//! `tests/migration_lab.rs` includes this file by path to check the disk image on the host.

// Each includer uses a different part.
#![allow(dead_code)]

/// The unit the checks report in: a page of guest memory, as migration copies it.
pub const PAGE: usize = 4096;

/// The first word of every page migcheck writes: "migcheck" in ASCII, little-endian.
pub const MAGIC: u64 = u64::from_le_bytes(*b"migcheck");

const WORD: usize = 8;
const HEADER_WORDS: usize = 4;
const WORDS_PER_PAGE: usize = PAGE / WORD;

/// What a page's header says it holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub block: u64,
    pub generation: u64,
    /// The page's index in its block.
    pub page: u64,
}

impl std::fmt::Display for Header {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "block={} gen={} page={}",
            self.block, self.generation, self.page
        )
    }
}

/// Word `index` of a page's body (after the header).
fn body_word(block: u64, generation: u64, page: u64, index: u64) -> u64 {
    let x = block.wrapping_mul(0x9e37_79b9_7f4a_7c15)
        ^ generation.wrapping_mul(0xbf58_476d_1ce4_e5b9)
        ^ page.wrapping_mul(0x94d0_49bb_1331_11eb)
        ^ index.wrapping_mul(0x2545_f491_4f6c_dd1d);
    x ^ (x >> 29)
}

fn words(page: &[u8]) -> impl Iterator<Item = u64> + '_ {
    page.chunks_exact(WORD)
        .map(|w| u64::from_le_bytes(w.try_into().expect("8-byte chunk")))
}

fn to_u64(n: usize) -> u64 {
    u64::try_from(n).expect("usize fits u64")
}

/// Fills `buf` (a whole number of pages) with generation `generation` of block `block`.
pub fn fill(buf: &mut [u8], block: u64, generation: u64) {
    assert_eq!(buf.len() % PAGE, 0, "a block is a whole number of pages");
    for (p, page) in buf.chunks_exact_mut(PAGE).enumerate() {
        let p = to_u64(p);
        let header = [MAGIC, block, generation, p];
        for (i, w) in page.chunks_exact_mut(WORD).enumerate() {
            let value = match header.get(i) {
                Some(&h) => h,
                None => body_word(block, generation, p, to_u64(i)),
            };
            w.copy_from_slice(&value.to_le_bytes());
        }
    }
}

/// The header of `page`, if it starts with [`MAGIC`].
pub fn header(page: &[u8]) -> Option<Header> {
    let mut w = words(&page[..HEADER_WORDS * WORD]);
    (w.next() == Some(MAGIC)).then(|| Header {
        block: w.next().expect("header word"),
        generation: w.next().expect("header word"),
        page: w.next().expect("header word"),
    })
}

/// The index of the first page of `buf` that does not hold generation `generation` of block
/// `block` (all of it), if any.
pub fn first_bad_page(buf: &[u8], block: u64, generation: u64) -> Option<usize> {
    buf.chunks_exact(PAGE).enumerate().position(|(p, page)| {
        let p = to_u64(p);
        let expected = Header {
            block,
            generation,
            page: p,
        };
        header(page) != Some(expected)
            || words(page)
                .enumerate()
                .skip(HEADER_WORDS)
                .any(|(i, w)| w != body_word(block, generation, p, to_u64(i)))
    })
}

/// The indexes of the pages of `buf` whose header is not that of generation `generation` of
/// block `block`: a cheap check that finds a page holding other contents, as a page left out
/// by a migration does (migration copies whole pages).
pub fn stale_pages(buf: &[u8], block: u64, generation: u64) -> impl Iterator<Item = usize> + '_ {
    buf.chunks_exact(PAGE)
        .enumerate()
        .filter_map(move |(p, page)| {
            let expected = Header {
                block,
                generation,
                page: to_u64(p),
            };
            (header(page) != Some(expected)).then_some(p)
        })
}

/// A digest of a disk's blocks and their generations, in block order: the guest prints it,
/// the host recomputes it from the image (FNV-1a over the little-endian words).
pub fn digest(generations: impl IntoIterator<Item = (u64, u64)>) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for (block, generation) in generations {
        for byte in block
            .to_le_bytes()
            .into_iter()
            .chain(generation.to_le_bytes())
        {
            h ^= u64::from(byte);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_filled_block_checks_and_another_generation_does_not() {
        let mut buf = vec![0u8; 4 * PAGE];
        fill(&mut buf, 7, 3);
        assert_eq!(first_bad_page(&buf, 7, 3), None);
        assert_eq!(first_bad_page(&buf, 7, 4), Some(0));
        assert_eq!(stale_pages(&buf, 7, 3).count(), 0);
        let mut other = vec![0u8; PAGE];
        fill(&mut other, 7, 4);
        buf[2 * PAGE..3 * PAGE].copy_from_slice(&other);
        assert_eq!(first_bad_page(&buf, 7, 3), Some(2));
        assert_eq!(stale_pages(&buf, 7, 3).collect::<Vec<_>>(), [2]);
        buf[3 * PAGE + 100] ^= 1;
        assert_eq!(stale_pages(&buf, 7, 3).collect::<Vec<_>>(), [2]);
        assert_eq!(
            header(&buf[2 * PAGE..]),
            Some(Header {
                block: 7,
                generation: 4,
                page: 0
            })
        );
    }
}
