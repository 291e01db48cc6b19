//! The generation-stamped blocks of `genwrite`, shared with the tests that check a disk image
//! it wrote (`#[path = "../examples/genwrite/block.rs"]`).
//!
//! A block is `len` bytes (a multiple of 8, at least 96): a header, then words every byte of
//! which follows from the header, so that a block says which write put it there and whether
//! it is whole:
//!
//! | bytes | field |
//! |---|---|
//! | 0..8 | [`MAGIC`] |
//! | 8..16 | the run's seed, little endian |
//! | 16..20 | region (the writer that owns the block) |
//! | 20..24 | block index inside the region |
//! | 24..32 | generation: the writer's count of writes when it wrote this one, from 1 |
//! | 32..96 | eight little-endian words of a SplitMix64 stream keyed by all of the above |
//! | 96.. | bytes 32..96 repeated: cheap to write, and any sector of another write differs |
//!
//! A block of zeros is generation 0: never written.

// Each user needs a different part of this module.
#![allow(dead_code)]

/// The first 8 bytes of every written block.
pub const MAGIC: [u8; 8] = *b"genwrite";
/// Bytes before the payload.
const HEADER: usize = 32;
/// Bytes of the payload's repeated pattern.
const PATTERN: usize = 64;

/// What a block read from the disk holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Found {
    /// All zeros: generation 0.
    Zero,
    /// Generation `n` of this block, whole.
    Gen(u64),
    /// A whole block of another region or block index (or of another run): a write that
    /// landed in the wrong place.
    Misplaced {
        seed: u64,
        region: u32,
        block: u32,
        generation: u64,
    },
    /// Neither zeros nor a whole block: torn or overwritten by something else. `header` is
    /// the generation its header names, if it has one; `at` the first byte that differs from
    /// what that header promises (0 when the magic is missing).
    Corrupt { header: Option<u64>, at: usize },
}

impl Found {
    /// The generation this block holds, if it is a whole block of its own place (0 for zeros).
    pub fn generation(self) -> Option<u64> {
        match self {
            Self::Zero => Some(0),
            Self::Gen(g) => Some(g),
            Self::Misplaced { .. } | Self::Corrupt { .. } => None,
        }
    }
}

impl std::fmt::Display for Found {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Zero => write!(f, "0"),
            Self::Gen(g) => write!(f, "{g}"),
            Self::Misplaced {
                seed,
                region,
                block,
                generation,
            } => write!(
                f,
                "misplaced(seed={seed:#x},region={region},block={block},gen={generation})"
            ),
            Self::Corrupt {
                header: Some(g),
                at,
            } => write!(f, "corrupt(gen={g},at={at})"),
            Self::Corrupt { header: None, at } => write!(f, "corrupt(at={at})"),
        }
    }
}

fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn key(seed: u64, region: u32, block: u32, generation: u64) -> u64 {
    let mut s = seed ^ (u64::from(region) << 32 | u64::from(block));
    let a = splitmix(&mut s);
    let mut t = a ^ generation;
    splitmix(&mut t)
}

fn header(buf: &mut [u8], seed: u64, region: u32, block: u32, generation: u64) {
    buf[0..8].copy_from_slice(&MAGIC);
    buf[8..16].copy_from_slice(&seed.to_le_bytes());
    buf[16..20].copy_from_slice(&region.to_le_bytes());
    buf[20..24].copy_from_slice(&block.to_le_bytes());
    buf[24..32].copy_from_slice(&generation.to_le_bytes());
}

/// Fills `buf` with generation `generation` of block `block` of region `region`.
pub fn fill(buf: &mut [u8], seed: u64, region: u32, block: u32, generation: u64) {
    assert!(
        buf.len() >= HEADER + PATTERN && buf.len() % 8 == 0,
        "block of {} bytes",
        buf.len()
    );
    header(buf, seed, region, block, generation);
    let mut state = key(seed, region, block, generation);
    for word in buf[HEADER..HEADER + PATTERN].chunks_exact_mut(8) {
        word.copy_from_slice(&splitmix(&mut state).to_le_bytes());
    }
    // Doubling copies: a few memcpy calls fill the block, even in a debug build.
    let payload = &mut buf[HEADER..];
    let mut filled = PATTERN;
    while filled < payload.len() {
        let n = filled.min(payload.len() - filled);
        payload.copy_within(0..n, filled);
        filled += n;
    }
}

fn le64(buf: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(buf[at..at + 8].try_into().expect("8 bytes"))
}

fn le32(buf: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(buf[at..at + 4].try_into().expect("4 bytes"))
}

/// What `buf`, read from the place of block `block` of region `region`, holds.
pub fn decode(buf: &[u8], seed: u64, region: u32, block: u32) -> Found {
    if buf.iter().all(|&b| b == 0) {
        return Found::Zero;
    }
    if buf[0..8] != MAGIC {
        return Found::Corrupt {
            header: None,
            at: 0,
        };
    }
    let (s, r, b, g) = (le64(buf, 8), le32(buf, 16), le32(buf, 20), le64(buf, 24));
    let mut expected = vec![0u8; buf.len()];
    fill(&mut expected, s, r, b, g);
    if let Some(at) = buf.iter().zip(&expected).position(|(x, y)| x != y) {
        return Found::Corrupt {
            header: Some(g),
            at,
        };
    }
    if (s, r, b) != (seed, region, block) {
        return Found::Misplaced {
            seed: s,
            region: r,
            block: b,
            generation: g,
        };
    }
    Found::Gen(g)
}

/// Whether a block that holds `found` breaks its writer's record: `acked` is the last
/// generation the device acknowledged for it (0: none) and `pending` the generations submitted
/// after that one (in flight or failed, so each may have landed). `None` when the block holds
/// `acked` or one of `pending`; else what is wrong:
///
/// - `lost`: an older generation than `acked` (an acknowledged write is gone, or an older write
///   was carried out again after a newer one completed);
/// - `unexpected`: a newer generation that was never submitted;
/// - `misplaced`, `corrupt`: not a whole block of this place (see [`Found`]).
pub fn judge(found: Found, acked: u64, pending: &[u64]) -> Option<&'static str> {
    match found {
        Found::Misplaced { .. } => Some("misplaced"),
        Found::Corrupt { .. } => Some("corrupt"),
        Found::Zero | Found::Gen(_) => {
            let g = found.generation().unwrap_or_default();
            if g == acked || pending.contains(&g) {
                None
            } else if g < acked {
                Some("lost")
            } else {
                Some("unexpected")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_filled_block_decodes_as_its_generation_and_a_torn_one_does_not() {
        let mut buf = vec![0u8; 4096];
        assert_eq!(decode(&buf, 7, 1, 2), Found::Zero);
        fill(&mut buf, 7, 1, 2, 9);
        assert_eq!(decode(&buf, 7, 1, 2), Found::Gen(9));
        assert!(matches!(
            decode(&buf, 7, 1, 3),
            Found::Misplaced { block: 2, .. }
        ));
        let mut older = vec![0u8; 4096];
        fill(&mut older, 7, 1, 2, 8);
        buf[2048..].copy_from_slice(&older[2048..]);
        assert_eq!(
            decode(&buf, 7, 1, 2),
            Found::Corrupt {
                header: Some(9),
                at: 2048
            }
        );
    }

    #[test]
    fn a_block_passes_with_its_last_acknowledged_or_a_later_submitted_generation_only() {
        assert_eq!(judge(Found::Gen(5), 5, &[]), None);
        assert_eq!(
            judge(Found::Gen(7), 5, &[6, 7]),
            None,
            "submitted after the ack"
        );
        assert_eq!(
            judge(Found::Zero, 0, &[3]),
            None,
            "never acknowledged, not landed"
        );
        assert_eq!(
            judge(Found::Gen(3), 0, &[3]),
            None,
            "never acknowledged, landed"
        );
        assert_eq!(judge(Found::Gen(4), 5, &[6]), Some("lost"));
        assert_eq!(judge(Found::Zero, 5, &[]), Some("lost"));
        assert_eq!(judge(Found::Gen(9), 5, &[6]), Some("unexpected"));
        assert_eq!(
            judge(
                Found::Corrupt {
                    header: Some(5),
                    at: 512
                },
                5,
                &[]
            ),
            Some("corrupt")
        );
    }
}
