//! The sector pattern of `blkcheck pattern`: every 512-byte sector of the disk gets bytes that
//! depend on its offset and on the seed only, so that any copy of the disk (an image file, a
//! namespace read by other means) can be checked without the program that wrote it.
//!
//! Sector `lba` (at byte offset `lba * 512`) with seed `seed` is:
//!
//! - bytes 0..40: the ASCII text `blkcheck lba LLLLLLLLLLLL seed SSSSSSSS\n`, `L` the sector
//!   number in 12 lower-case hex digits, `S` the low 32 bits of the seed in 8;
//! - bytes 40..512: the output of SplitMix64 seeded with `seed ^ lba * 0x9e3779b97f4a7c15`
//!   (wrapping), each 64-bit value in little-endian order, cut at the sector's end.
//!
//! Shared by `examples/blkcheck.rs` and the tests that check what it wrote (by `#[path]`).

// Each user takes the part it needs.
#![allow(dead_code)]

/// The unit of the pattern.
pub const SECTOR: usize = 512;
/// Length of the text header of each sector.
pub const HEADER: usize = 40;

/// One step of SplitMix64.
fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Fills `out` with sector `lba` of the pattern for `seed`.
pub fn fill_sector(seed: u64, lba: u64, out: &mut [u8; SECTOR]) {
    let header = format!(
        "blkcheck lba {:012x} seed {:08x}\n",
        lba & 0xffff_ffff_ffff,
        seed & 0xffff_ffff
    );
    debug_assert_eq!(header.len(), HEADER);
    out[..HEADER].copy_from_slice(header.as_bytes());
    let mut state = seed ^ lba.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    for chunk in out[HEADER..].chunks_mut(8) {
        let word = splitmix64(&mut state).to_le_bytes();
        chunk.copy_from_slice(&word[..chunk.len()]);
    }
}

/// The pattern for the sectors of `len` bytes (a multiple of [`SECTOR`]) from byte `offset` (a
/// multiple of [`SECTOR`]).
pub fn bytes(seed: u64, offset: u64, len: usize) -> Vec<u8> {
    assert!(
        offset % SECTOR as u64 == 0 && len % SECTOR == 0,
        "offset {offset} and length {len} must be multiples of {SECTOR}"
    );
    let mut out = vec![0u8; len];
    let first = offset / SECTOR as u64;
    for (i, sector) in out.chunks_exact_mut(SECTOR).enumerate() {
        let sector: &mut [u8; SECTOR] = sector.try_into().expect("a whole sector");
        fill_sector(seed, first + i as u64, sector);
    }
    out
}

/// Checks that `data`, read from byte `offset` of the disk, holds the pattern for `seed`.
/// On a difference returns the byte offset (on the disk) of the first sector that differs.
pub fn check(seed: u64, offset: u64, data: &[u8]) -> Result<(), u64> {
    assert!(
        offset % SECTOR as u64 == 0 && data.len() % SECTOR == 0,
        "offset {offset} and length {} must be multiples of {SECTOR}",
        data.len()
    );
    let first = offset / SECTOR as u64;
    let mut want = [0u8; SECTOR];
    for (i, got) in data.chunks_exact(SECTOR).enumerate() {
        let lba = first + i as u64;
        fill_sector(seed, lba, &mut want);
        if got != want {
            return Err(lba * SECTOR as u64);
        }
    }
    Ok(())
}
