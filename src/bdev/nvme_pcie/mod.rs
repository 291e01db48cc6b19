//! A namespace of a local NVMe controller driven from user space through VFIO
//! (`nvme::pcie`), as a block device.
//!
//! - [`NvmePcieDevice`] opens the controller at startup (errors a user can fix are reported
//!   then) and checks the namespace.
//! - Each poller gets an [`NvmePcieChannel`] with an I/O queue pair of its own, polled by phase
//!   bit, with an MSI-X vector of its own when the controller has one so that the poller can
//!   sleep with commands in flight; PRPs point straight at guest buffers.
//! - [`GuestDma`] keeps a session's guest memory DMA-mapped in the controller's IOMMU domain
//!   (IOVA = its address in vubd), in step with the memory table.
//! - Devices on namespaces of one controller share it ([`Controllers`]): one VFIO container,
//!   one admin queue, and on each poller one I/O queue pair for all of them (the poller shares
//!   the channel between devices whose [`NvmePcieDevice::controller_key`] is the same, and each
//!   operation carries its device's [`Namespace`]).
//! - A namespace's capacity follows its controller: `device_resize` reads its size again
//!   ([`NvmePcieDevice::resize`]), and a thread per controller answers its namespace notices
//!   (`events`).

mod channel;
mod dma;
mod events;

use std::collections::HashMap;
use std::io;
use std::os::fd::RawFd;
use std::sync::{Arc, Weak};
use std::time::Duration;

use thiserror::Error;
use tracing::info;

pub use self::channel::NvmePcieChannel;
pub use self::dma::GuestDma;
use self::events::Watch;
use super::capacity::{Capacity, Resize, ResizeError};
use super::nvme_ops::{Namespace, lba_shift_of};
use super::{BlockDevice, DeviceInfo};
use crate::nvme::pcie::{PcieController, PcieError, PcieOptions};
use crate::nvme::split::max_rw_blocks;

/// Deepest I/O queue pair a channel creates.
const MAX_QUEUE_DEPTH: u32 = 1024;

/// Which namespace of which controller.
#[derive(Clone, Debug)]
pub struct NvmePcieConfig {
    /// PCI address, `0000:01:00.0`.
    pub bdf: String,
    pub nsid: u32,
    /// Completions through the controller's MSI-X interrupts when it has them.
    pub interrupts: bool,
    pub io_timeout: Duration,
    pub read_only: bool,
    /// Debugging only: after this many commands on a channel, the controller is reset once
    /// (once per process) with commands in flight, to exercise recovery.
    pub debug_reset_after: Option<u64>,
}

#[derive(Debug, Error)]
pub enum NvmePcieError {
    #[error(transparent)]
    Pcie(#[from] PcieError),
    #[error("namespace {nsid} uses {ms} bytes of metadata per block, which vubd cannot serve")]
    Metadata { nsid: u32, ms: u16 },
    #[error("cannot create the namespace's capacity eventfd")]
    EventFd(#[source] io::Error),
    #[error("cannot start the thread of the controller's asynchronous events")]
    Thread(#[source] io::Error),
    #[error("namespace {nsid} now has a different {what}")]
    NamespaceChanged { nsid: u32, what: &'static str },
}

/// What the channels need to know of the namespace; fixed for the device's lifetime.
#[derive(Clone, Copy, Debug)]
struct Geometry {
    nsid: u32,
    lba_shift: u32,
    max_rw_blocks: u32,
    volatile_cache: bool,
    /// A command older than this resets the controller.
    io_timeout: Duration,
    /// [`NvmePcieConfig::debug_reset_after`].
    debug_reset_after: Option<u64>,
}

impl Geometry {
    fn namespace(&self) -> Namespace {
        Namespace {
            nsid: self.nsid,
            lba_shift: self.lba_shift,
            max_rw_blocks: self.max_rw_blocks,
            volatile_cache: self.volatile_cache,
        }
    }
}

/// A namespace on a local NVMe controller.
#[derive(Debug)]
pub struct NvmePcieDevice {
    ctrl: Arc<PcieController>,
    geo: Geometry,
    /// What the device is, but for its capacity.
    info: DeviceInfo,
    capacity: Arc<Capacity>,
    serial: String,
}

/// The controllers open, by PCI address: devices on namespaces of one controller share it
/// (and the namespaces whose notices it answers). Held weakly: a controller closes when its
/// last device goes, and the next device on it opens it again.
#[derive(Debug, Default)]
pub struct Controllers(HashMap<String, (Weak<PcieController>, Arc<Watch>)>);

impl Controllers {
    /// Every controller still open, with its PCI address.
    pub fn iter(&self) -> impl Iterator<Item = (&str, Arc<PcieController>)> {
        self.0
            .iter()
            .filter_map(|(bdf, (c, _))| Some((bdf.as_str(), c.upgrade()?)))
    }
}

impl NvmePcieDevice {
    /// Opens the controller through VFIO, unless `ctrls` has it already, and checks the
    /// namespace; blocking, for startup. The first device of a controller sets its options
    /// (`interrupts`, `io_timeout`).
    pub fn open(cfg: &NvmePcieConfig, ctrls: &mut Controllers) -> Result<Self, NvmePcieError> {
        let open = ctrls
            .0
            .get(&cfg.bdf)
            .and_then(|(c, w)| Some((c.upgrade()?, w.clone())));
        let shared = open.is_some();
        let (ctrl, watch) = match open {
            Some(open) => open,
            None => {
                let opts = PcieOptions {
                    io_timeout: cfg.io_timeout,
                    interrupts: cfg.interrupts,
                    ..PcieOptions::default()
                };
                let c = PcieController::open(&cfg.bdf, &opts)?;
                let watch = Watch::start(&c).map_err(NvmePcieError::Thread)?;
                ctrls
                    .0
                    .insert(cfg.bdf.clone(), (Arc::downgrade(&c), watch.clone()));
                (c, watch)
            }
        };
        let ns = ctrl.namespace(cfg.nsid)?;
        let lba_shift =
            lba_shift_of(&ns).map_err(|ms| NvmePcieError::Metadata { nsid: cfg.nsid, ms })?;
        let block_size = 1u32 << lba_shift;
        let id = ctrl.identify();
        // The driver's own limit on one command's data (it sizes PRP lists and bounce
        // buffers) already includes MDTS.
        let max_bytes = ctrl.max_transfer_bytes().unwrap_or(u64::MAX);
        let max_blocks = u32::try_from(max_bytes >> lba_shift).unwrap_or(u32::MAX);
        let geo = Geometry {
            nsid: cfg.nsid,
            lba_shift,
            max_rw_blocks: max_blocks.min(max_rw_blocks(0, 12, lba_shift)).max(1),
            volatile_cache: id.vwc,
            io_timeout: cfg.io_timeout,
            debug_reset_after: cfg.debug_reset_after,
        };
        let info = super::nvme_ops::device_info(id, &ns, lba_shift, cfg.read_only);
        info!(
            bdf = %cfg.bdf,
            nsid = cfg.nsid,
            blocks = ns.nsze,
            block_size,
            io_queues = ctrl.io_queues_granted(),
            msix_vectors = ctrl.vectors(),
            deallocated_reads = ns.deallocated_read().as_str(),
            write_zeroes_unmaps = info.write_zeroes_unmaps,
            namespace_notices = ctrl.namespace_notices(),
            "{}",
            if shared {
                "NVMe controller shared with another device"
            } else {
                "NVMe controller opened"
            }
        );
        let capacity =
            Arc::new(Capacity::watched(info.capacity_bytes).map_err(NvmePcieError::EventFd)?);
        watch.add(cfg.nsid, lba_shift, &capacity);
        Ok(Self {
            serial: id.sn.clone(),
            ctrl,
            geo,
            info,
            capacity,
        })
    }

    /// The capacity follows the namespace's size, read again with Identify Namespace on the
    /// controller's admin queue; a smaller one only if `req.shrink`. A size of the caller's is
    /// refused: the namespace's is its controller's. Returns the new capacity in bytes.
    /// Blocking (one admin command), for the control path.
    pub fn resize(&self, req: Resize) -> Result<u64, ResizeError> {
        if req.size.is_some() {
            return Err(ResizeError::Nvme);
        }
        let to = namespace_size(&self.ctrl, self.geo.nsid, self.geo.lba_shift)
            .map_err(|e| ResizeError::Namespace(Arc::new(e)))?;
        self.capacity
            .check(to, self.info.logical_block_size, req.shrink)?;
        self.capacity.set(to);
        info!(
            bdf = self.ctrl.bdf(),
            nsid = self.geo.nsid,
            size = to,
            "NVMe namespace resized"
        );
        Ok(to)
    }

    /// Readable when the capacity changed without `device_resize` (see [`Capacity`]).
    pub fn capacity_event(&self) -> Option<RawFd> {
        self.capacity.event_fd()
    }

    pub fn clear_capacity_event(&self) {
        self.capacity.clear_event();
    }

    /// The controller's serial number.
    pub fn serial(&self) -> &str {
        &self.serial
    }

    /// A session's guest memory mappings for this device's controller.
    pub fn guest_dma(&self) -> GuestDma {
        GuestDma::new(self.ctrl.clone())
    }

    /// The same for every device of one controller, and different from any other
    /// controller's while this device lives: a poller's channel serves all devices with the
    /// same key.
    pub fn controller_key(&self) -> usize {
        Arc::as_ptr(&self.ctrl) as usize
    }

    /// What an operation of this device tells a channel shared with the controller's other
    /// namespaces.
    pub fn namespace(&self) -> Namespace {
        self.geo.namespace()
    }
}

/// The size in bytes of namespace `nsid` of `ctrl` now (Identify Namespace), which must still
/// have blocks of `1 << lba_shift` bytes.
fn namespace_size(ctrl: &PcieController, nsid: u32, lba_shift: u32) -> Result<u64, NvmePcieError> {
    let ns = ctrl.namespace(nsid)?;
    let changed = |what| NvmePcieError::NamespaceChanged { nsid, what };
    if ns.block_size().trailing_zeros() != lba_shift {
        return Err(changed("block size"));
    }
    ns.nsze
        .checked_mul(1 << lba_shift)
        .ok_or_else(|| changed("size (too large)"))
}

impl BlockDevice for NvmePcieDevice {
    type Channel = NvmePcieChannel;

    fn info(&self) -> DeviceInfo {
        DeviceInfo {
            capacity_bytes: self.capacity.bytes(),
            ..self.info
        }
    }

    /// Creates an I/O queue pair for the calling poller.
    fn open_channel(&self, depth: u32) -> io::Result<NvmePcieChannel> {
        // Commands beyond the queue's depth wait in the channel's backlog.
        let max = u32::from(self.ctrl.cap().mqes()).min(MAX_QUEUE_DEPTH);
        let depth = u16::try_from(depth.clamp(1, max)).unwrap_or(1);
        let queue = self.ctrl.create_io_queue(depth).map_err(io::Error::other)?;
        NvmePcieChannel::new(self.geo, self.ctrl.clone(), queue)
    }
}
