//! The virtio-blk configuration space (`struct virtio_blk_config`, virtio 1.2 §5.2.4), as
//! little-endian bytes, and the window arithmetic of vhost-user GET_CONFIG / SET_CONFIG.

use super::{MAX_RANGE_SEGMENTS, SECTOR_SHIFT};

/// Bytes of configuration space the device exposes: the layout up to and including the
/// secure-erase fields, zero-padded through the zoned fields so that frontends that read the
/// whole of a newer struct get zeros rather than an error.
pub const CONFIG_SPACE_SIZE: usize = 96;

/// Offset of the `writeback` byte, the only field a driver may write (CONFIG_WCE).
pub const WRITEBACK_OFFSET: usize = 32;

/// The guest's write cache mode (CONFIG_WCE) as the device knows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteCache {
    /// Write-back: a write is durable after a FLUSH.
    Back,
    /// Write-through: every write is durable when it completes.
    Through,
    /// Not known (a device taken over from another process that could not say): served
    /// write-through, which is never wrong, until the guest flushes (only a guest with a
    /// write cache does) or sets the mode.
    Unknown,
}

/// Some frontends (cloud-hypervisor) address the configuration space at this base in
/// GET_CONFIG / SET_CONFIG, as the vhost-user crate's `VHOST_USER_CONFIG_OFFSET`; others
/// (QEMU, libblkio) use offset 0.
const FRONTEND_CONFIG_BASE: u32 = vhost::vhost_user::message::VHOST_USER_CONFIG_OFFSET;

/// The values of the configuration space.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlkConfig {
    /// Capacity in 512-byte sectors.
    pub capacity_sectors: u64,
    /// Largest segment the driver may put in one descriptor, bytes.
    pub size_max: u32,
    /// Most data segments per request.
    pub seg_max: u32,
    /// Logical block size, bytes.
    pub blk_size: u32,
    /// log2(physical block size / logical block size).
    pub physical_block_exp: u8,
    /// Minimum I/O size in logical blocks.
    pub min_io_size: u16,
    /// Optimal I/O size in logical blocks.
    pub opt_io_size: u32,
    /// 1: write-back cache (the driver must flush), 0: write-through.
    pub writeback: u8,
    /// Number of request queues.
    pub num_queues: u16,
    /// Discard limits (zero when discard is not offered).
    pub max_discard_sectors: u32,
    pub discard_sector_alignment: u32,
    /// Write-zeroes limit in sectors (zero when write-zeroes is not offered).
    pub max_write_zeroes_sectors: u32,
    /// Whether write-zeroes with the UNMAP flag may deallocate.
    pub write_zeroes_may_unmap: bool,
}

impl BlkConfig {
    /// The configuration space as the driver reads it.
    pub fn to_bytes(&self) -> [u8; CONFIG_SPACE_SIZE] {
        let mut b = [0u8; CONFIG_SPACE_SIZE];
        let mut put = |off: usize, bytes: &[u8]| b[off..off + bytes.len()].copy_from_slice(bytes);
        let seg = |on: u32| {
            if on != 0 {
                MAX_RANGE_SEGMENTS as u32
            } else {
                0
            }
        };
        put(0, &self.capacity_sectors.to_le_bytes());
        put(8, &self.size_max.to_le_bytes());
        put(12, &self.seg_max.to_le_bytes());
        // 16..20: legacy CHS geometry, not offered.
        put(20, &self.blk_size.to_le_bytes());
        put(24, &[self.physical_block_exp, 0]);
        put(26, &self.min_io_size.to_le_bytes());
        put(28, &self.opt_io_size.to_le_bytes());
        put(WRITEBACK_OFFSET, &[self.writeback]);
        put(34, &self.num_queues.to_le_bytes());
        put(36, &self.max_discard_sectors.to_le_bytes());
        put(40, &seg(self.max_discard_sectors).to_le_bytes());
        put(44, &self.discard_sector_alignment.to_le_bytes());
        put(48, &self.max_write_zeroes_sectors.to_le_bytes());
        put(52, &seg(self.max_write_zeroes_sectors).to_le_bytes());
        put(56, &[u8::from(self.write_zeroes_may_unmap)]);
        b
    }

    /// Capacity in bytes.
    pub fn capacity_bytes(&self) -> u64 {
        self.capacity_sectors << SECTOR_SHIFT
    }
}

/// Maps a GET_CONFIG / SET_CONFIG `(offset, size)` onto the configuration space: returns the
/// offset into it, or `None` when the window does not start inside it.
pub fn config_window(offset: u32, size: u32) -> Option<(usize, usize)> {
    let off = if offset >= FRONTEND_CONFIG_BASE {
        offset - FRONTEND_CONFIG_BASE
    } else {
        offset
    } as usize;
    // A window is at most one page; anything larger is a malformed message.
    if off >= CONFIG_SPACE_SIZE || size > 4096 {
        return None;
    }
    Some((off, size as usize))
}

/// The bytes of GET_CONFIG: exactly `size` bytes from `offset`, zero past the end of the
/// space; empty (the frontend then sees an error) for a window outside it.
pub fn read_window(space: &[u8; CONFIG_SPACE_SIZE], offset: u32, size: u32) -> Vec<u8> {
    let Some((off, len)) = config_window(offset, size) else {
        return Vec::new();
    };
    let mut out = vec![0u8; len];
    let avail = (CONFIG_SPACE_SIZE - off).min(len);
    out[..avail].copy_from_slice(&space[off..off + avail]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> BlkConfig {
        BlkConfig {
            capacity_sectors: 2048,
            size_max: 1 << 20,
            seg_max: 254,
            blk_size: 4096,
            physical_block_exp: 0,
            min_io_size: 1,
            opt_io_size: 0,
            writeback: 1,
            num_queues: 4,
            max_discard_sectors: 1 << 22,
            discard_sector_alignment: 8,
            max_write_zeroes_sectors: 1 << 22,
            write_zeroes_may_unmap: true,
        }
    }

    #[test]
    fn layout_matches_virtio_blk_config_offsets() {
        let b = sample().to_bytes();
        assert_eq!(u64::from_le_bytes(b[0..8].try_into().expect("8")), 2048);
        assert_eq!(u32::from_le_bytes(b[12..16].try_into().expect("4")), 254);
        assert_eq!(u32::from_le_bytes(b[20..24].try_into().expect("4")), 4096);
        assert_eq!(b[32], 1);
        assert_eq!(u16::from_le_bytes(b[34..36].try_into().expect("2")), 4);
        assert_eq!(u32::from_le_bytes(b[40..44].try_into().expect("4")), 16);
        assert_eq!(u32::from_le_bytes(b[52..56].try_into().expect("4")), 16);
        assert_eq!(b[56], 1);
    }

    #[test]
    fn qemu_and_cloud_hypervisor_windows_read_the_same_bytes() {
        let space = sample().to_bytes();
        let qemu = read_window(&space, 0, 60);
        let ch = read_window(&space, FRONTEND_CONFIG_BASE, 60);
        assert_eq!(qemu.len(), 60);
        assert_eq!(qemu, ch);
        assert_eq!(&qemu[..], &space[..60]);
    }

    #[test]
    fn window_past_the_space_is_zero_padded_to_the_requested_size() {
        let space = sample().to_bytes();
        let w = read_window(&space, 32, 128);
        assert_eq!(w.len(), 128);
        assert_eq!(w[0], 1);
        assert!(w[CONFIG_SPACE_SIZE - 32..].iter().all(|&x| x == 0));
    }

    #[test]
    fn window_outside_the_space_is_refused() {
        let space = sample().to_bytes();
        assert!(read_window(&space, CONFIG_SPACE_SIZE as u32, 4).is_empty());
        assert!(read_window(&space, 0, 1 << 20).is_empty());
    }
}
