//! The NVMe driver's transport-agnostic core and its transports.
//!
//! - [`spec`]: wire types shared by every transport (NVMe Base 2.0, NVMe over Fabrics 1.1):
//!   submission and completion queue entries, Identify data, controller registers, Fabrics
//!   Connect and discovery, NQNs.
//! - [`cid`], [`split`], [`data`]: the in-flight command table, MDTS / block-count splitting,
//!   and command data as byte ranges of a caller's iovecs (guest memory), shared by the
//!   transports.
//! - [`pcie`]: the PCIe transport: its hardware-independent core, and the user-space driver
//!   that owns a controller through VFIO.
//! - [`tcp`]: the NVMe/TCP transport (NVMe/TCP Transport 1.0): codec, I/O queues, controller.
//!
//! Nothing here knows of virtio, vhost or `bdev`: the block-device adapter lives in `bdev`.

pub mod cid;
pub mod data;
pub mod pcie;
pub mod spec;
pub mod split;
pub mod tcp;
