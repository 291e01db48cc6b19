//! The virtio-blk device model (virtio 1.2 §5.2): feature bits, the configuration space, and
//! the pure request codec that turns a descriptor chain into a validated request.

pub mod chain;
pub mod config;
pub mod inflight;
pub mod request;
pub mod ring;

pub use chain::{Desc, DescTable};
pub use config::{BlkConfig, CONFIG_SPACE_SIZE};
pub use request::{Parsed, Range, Rejected, Request, RequestError, RequestKind, Scratch, parse};

use virtio_bindings::virtio_blk as vb;

/// Sector size of the virtio-blk protocol: sector numbers and lengths count 512-byte units
/// whatever the device's logical block size (virtio 1.2 §5.2.6).
pub const SECTOR_SIZE: u64 = 512;
/// log2 of [`SECTOR_SIZE`].
pub const SECTOR_SHIFT: u32 = 9;

/// Length of the request header `struct virtio_blk_req { le32 type; le32 reserved; le64 sector; }`.
pub const HEADER_LEN: u32 = 16;
/// Length of the device id returned by GET_ID (virtio 1.2 §5.2.6.1: "20 bytes").
pub const ID_BYTES: usize = vb::VIRTIO_BLK_ID_BYTES as usize;
/// Length of one discard / write-zeroes segment (`struct virtio_blk_discard_write_zeroes`).
pub const RANGE_SEGMENT_LEN: u32 = 16;
/// Most data segments per request, whatever the queue size (`seg_max` is at most this).
pub const MAX_SEGMENTS: u32 = 254;
/// Most segments one discard or write-zeroes request may carry (advertised as
/// `max_discard_seg` / `max_write_zeroes_seg`).
pub const MAX_RANGE_SEGMENTS: usize = 16;

/// Request status written into the last byte of a chain (virtio 1.2 §5.2.6).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Status {
    Ok = vb::VIRTIO_BLK_S_OK as u8,
    IoErr = vb::VIRTIO_BLK_S_IOERR as u8,
    Unsupp = vb::VIRTIO_BLK_S_UNSUPP as u8,
}

/// Request types (`virtio_blk_req.type`).
pub mod req_type {
    use super::vb;
    pub const IN: u32 = vb::VIRTIO_BLK_T_IN;
    pub const OUT: u32 = vb::VIRTIO_BLK_T_OUT;
    pub const FLUSH: u32 = vb::VIRTIO_BLK_T_FLUSH;
    pub const GET_ID: u32 = vb::VIRTIO_BLK_T_GET_ID;
    pub const DISCARD: u32 = vb::VIRTIO_BLK_T_DISCARD;
    pub const WRITE_ZEROES: u32 = vb::VIRTIO_BLK_T_WRITE_ZEROES;
}

/// `flags` bit of a write-zeroes segment that allows the device to deallocate the range.
pub const WRITE_ZEROES_FLAG_UNMAP: u32 = vb::VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP;

/// What the device offers, derived from the backend's capabilities.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceFeatures {
    pub read_only: bool,
    pub discard: bool,
    pub write_zeroes: bool,
    pub multi_queue: bool,
}

impl DeviceFeatures {
    /// The virtio feature bits (without the vhost-user protocol bit).
    pub fn bits(&self) -> u64 {
        use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
        use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
        let mut bits = [
            VIRTIO_F_VERSION_1,
            VIRTIO_RING_F_EVENT_IDX,
            VIRTIO_RING_F_INDIRECT_DESC,
            vb::VIRTIO_BLK_F_SIZE_MAX,
            vb::VIRTIO_BLK_F_SEG_MAX,
            vb::VIRTIO_BLK_F_BLK_SIZE,
            vb::VIRTIO_BLK_F_TOPOLOGY,
            vb::VIRTIO_BLK_F_FLUSH,
            vb::VIRTIO_BLK_F_CONFIG_WCE,
        ]
        .iter()
        .fold(0u64, |acc, bit| acc | 1 << bit);
        let optional = [
            (self.read_only, vb::VIRTIO_BLK_F_RO),
            (self.multi_queue, vb::VIRTIO_BLK_F_MQ),
            (self.discard && !self.read_only, vb::VIRTIO_BLK_F_DISCARD),
            (
                self.write_zeroes && !self.read_only,
                vb::VIRTIO_BLK_F_WRITE_ZEROES,
            ),
        ];
        for (on, bit) in optional {
            if on {
                bits |= 1 << bit;
            }
        }
        bits
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_only_device_offers_ro_and_no_discard_or_write_zeroes() {
        let f = DeviceFeatures {
            read_only: true,
            discard: true,
            write_zeroes: true,
            multi_queue: false,
        };
        let bits = f.bits();
        assert_ne!(bits & 1 << vb::VIRTIO_BLK_F_RO, 0);
        assert_eq!(bits & 1 << vb::VIRTIO_BLK_F_DISCARD, 0);
        assert_eq!(bits & 1 << vb::VIRTIO_BLK_F_WRITE_ZEROES, 0);
        assert_eq!(bits & 1 << vb::VIRTIO_BLK_F_MQ, 0);
    }

    #[test]
    fn writable_multi_queue_device_offers_everything_but_ro() {
        let f = DeviceFeatures {
            read_only: false,
            discard: true,
            write_zeroes: true,
            multi_queue: true,
        };
        let bits = f.bits();
        for bit in [
            vb::VIRTIO_BLK_F_MQ,
            vb::VIRTIO_BLK_F_DISCARD,
            vb::VIRTIO_BLK_F_WRITE_ZEROES,
            vb::VIRTIO_BLK_F_FLUSH,
            vb::VIRTIO_BLK_F_CONFIG_WCE,
            vb::VIRTIO_BLK_F_SEG_MAX,
            vb::VIRTIO_BLK_F_SIZE_MAX,
            vb::VIRTIO_BLK_F_BLK_SIZE,
            vb::VIRTIO_BLK_F_TOPOLOGY,
        ] {
            assert_ne!(bits & 1 << bit, 0, "feature bit {bit}");
        }
        assert_eq!(bits & 1 << vb::VIRTIO_BLK_F_RO, 0);
    }
}
