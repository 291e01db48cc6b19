//! Block devices behind the virtio-blk front: a shared [`BlockDevice`] that knows its geometry
//! and capabilities, and per-poller [`IoChannel`]s that carry the I/O.
//!
//! A channel is owned by exactly one poller thread; it queues operations without a syscall and
//! hands a whole batch to the kernel or device in one [`IoChannel::submit`].

pub mod capacity;
pub mod file;
pub mod lock;
pub mod null;
pub mod nvme_ops;
pub mod nvme_pcie;
pub mod nvme_tcp;
pub mod uring;

use std::io;
use std::os::fd::RawFd;

use crate::mem::{IovecList, MemSnapshot};

use self::file::FileDevice;
use self::lock::LockError;
use self::null::{NullChannel, NullDevice};
use self::nvme_pcie::{NvmePcieChannel, NvmePcieDevice};
use self::nvme_tcp::{NvmeTcpChannel, NvmeTcpDevice};
use self::uring::UringChannel;

/// What a device is and can do; fixed for the device's lifetime.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    pub capacity_bytes: u64,
    /// Smallest unit the device addresses, bytes (a power of two, at least 512).
    pub logical_block_size: u32,
    /// Smallest unit the device writes without read-modify-write, bytes.
    pub physical_block_size: u32,
    pub read_only: bool,
    /// Deallocation of ranges is supported.
    pub discard: bool,
    /// Zeroing of ranges is supported.
    pub write_zeroes: bool,
    /// A write-zeroes that allows unmapping may deallocate the range instead of writing it,
    /// and it still reads as zeroes (virtio-blk's `write_zeroes_may_unmap`).
    pub write_zeroes_unmaps: bool,
}

/// One operation on a channel. Offsets and lengths are in bytes.
#[derive(Clone, Copy, Debug)]
pub enum IoOp<'a> {
    Read {
        offset: u64,
        iov: &'a IovecList,
    },
    Write {
        offset: u64,
        iov: &'a IovecList,
        /// Write-through: the data must be durable when the operation completes.
        fua: bool,
    },
    Flush,
    Discard {
        offset: u64,
        len: u64,
    },
    WriteZeroes {
        offset: u64,
        len: u64,
        /// The range may be deallocated instead of written.
        unmap: bool,
    },
}

/// The channel has no room for the operation right now; retry after reaping completions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChannelFull;

/// A device shared by all pollers.
pub trait BlockDevice: Send + Sync {
    type Channel: IoChannel;

    fn info(&self) -> DeviceInfo;

    /// Opens a channel sized for `depth` operations in flight, for one poller thread.
    fn open_channel(&self, depth: u32) -> io::Result<Self::Channel>;
}

/// The per-poller I/O path of a device.
pub trait IoChannel {
    /// True when an operation can be queued now.
    fn has_room(&self) -> bool;

    /// Queues `op` under `tag` without a syscall, and returns how many completions it will
    /// report for `tag` (each with its own result).
    ///
    /// # Safety
    ///
    /// The iovec list in `op` and the guest memory it points into must stay valid and must not
    /// be reused until every completion for `tag` has been reported by [`IoChannel::poll`].
    unsafe fn queue(&mut self, tag: u32, op: IoOp<'_>) -> Result<u32, ChannelFull>;

    /// Hands every queued operation to the device: at most one syscall.
    fn submit(&mut self) -> io::Result<()>;

    /// Reports up to `max` finished operations as `(tag, result)`, where a negative result is
    /// an errno and a non-negative one the bytes transferred; returns how many it reported.
    fn poll(&mut self, max: usize, f: impl FnMut(u32, i32)) -> usize;

    /// A file descriptor that becomes readable when completions are ready, if the channel has
    /// one; the poller sleeps on it in event mode.
    fn completion_fd(&self) -> Option<RawFd>;

    /// Acknowledges a wake-up from [`IoChannel::completion_fd`].
    fn clear_completion_fd(&self);

    /// Completions will come that no file descriptor announces: the poller must keep polling
    /// instead of sleeping.
    fn must_poll(&self) -> bool {
        false
    }

    /// The operations of the requests whose tags `draining` accepts belong to queues being
    /// stopped: the frontend gets its answer once they have completed, and nothing of them may
    /// reach guest memory after that. A channel whose operations can wait on a device without
    /// bound (a remote target that went away) from now on fails each of them, reported by
    /// [`IoChannel::poll`] with an error, once it cannot complete within the device's I/O
    /// timeout and no data of it can arrive any more; a channel whose operations always
    /// complete has nothing to do. Called when a queue starts draining, never on the I/O
    /// path; the channel keeps what it needs (the poller does not call it again for the same
    /// requests).
    fn drain(&mut self, draining: impl FnMut(u32) -> bool);
}

/// Any of vubd's devices.
#[derive(Debug)]
pub enum Disk {
    File(FileDevice),
    Null(NullDevice),
    NvmeTcp(NvmeTcpDevice),
    NvmePcie(NvmePcieDevice),
}

/// What a channel needs to know of the device an operation is for, when the channel serves
/// several devices (namespaces of one NVMe controller on one poller).
#[derive(Clone, Copy, Debug)]
pub enum Target {
    /// The channel's own device.
    Own,
    NvmeNamespace(nvme_ops::Namespace),
}

/// What a device must know of a session's guest memory beyond the pollers' own map: a device
/// that DMAs into guest memory keeps it mapped in its IOMMU domain. One per session, on the
/// control path.
pub trait GuestMemoryHook: Send + std::fmt::Debug {
    /// The frontend gave a new memory table: the device must reach its regions before any
    /// request can name them. On an error the session's previous table stays as it was.
    fn memory_changed(&mut self, mem: MemSnapshot) -> io::Result<()>;

    /// Lets go of what older tables held that nothing uses any more; true while some is still
    /// held (the caller sweeps again later).
    fn sweep(&mut self) -> bool;

    /// The session is over and nothing is in flight: forget the guest's memory.
    fn release(&mut self);
}

impl Disk {
    /// Changes the device's capacity as asked ([`capacity::Resize`]); returns the new one in
    /// bytes. Control path only.
    pub fn resize(&self, req: capacity::Resize) -> Result<u64, capacity::ResizeError> {
        match self {
            Disk::File(d) => d.resize(req),
            Disk::Null(d) => d.resize(req),
            Disk::NvmeTcp(d) => d.resize(req),
            Disk::NvmePcie(d) => d.resize(req),
        }
    }

    /// A file descriptor that becomes readable when the capacity changed without
    /// [`Disk::resize`] (an NVMe namespace that grew, as its controller reported), for the
    /// device's session to watch; `None` for a disk whose capacity changes only through it.
    pub fn capacity_event(&self) -> Option<RawFd> {
        match self {
            Disk::NvmeTcp(d) => d.capacity_event(),
            Disk::NvmePcie(d) => d.capacity_event(),
            Disk::File(_) | Disk::Null(_) => None,
        }
    }

    /// Acknowledges what [`Disk::capacity_event`] told; [`BlockDevice::info`] has the
    /// capacity now.
    pub fn clear_capacity_event(&self) {
        match self {
            Disk::NvmeTcp(d) => d.clear_capacity_event(),
            Disk::NvmePcie(d) => d.clear_capacity_event(),
            Disk::File(_) | Disk::Null(_) => {}
        }
    }

    /// The hook of a session's guest memory, for a device that needs one (an NVMe PCIe
    /// namespace: IOMMU mappings of its controller).
    pub fn guest_memory_hook(&self) -> Option<Box<dyn GuestMemoryHook>> {
        match self {
            Disk::NvmePcie(d) => Some(Box::new(d.guest_dma())),
            Disk::File(_) | Disk::Null(_) | Disk::NvmeTcp(_) => None,
        }
    }

    /// Devices with the same key share one channel per poller (namespaces of one NVMe PCIe
    /// controller: one I/O queue pair per poller per controller); `None`: a channel of its
    /// own. A key stays unique while a device that has it lives.
    pub fn channel_key(&self) -> Option<usize> {
        match self {
            Disk::NvmePcie(d) => Some(d.controller_key()),
            Disk::File(_) | Disk::Null(_) | Disk::NvmeTcp(_) => None,
        }
    }

    /// What operations of this device tell a channel it shares.
    pub fn target(&self) -> Target {
        match self {
            Disk::NvmePcie(d) => Target::NvmeNamespace(d.namespace()),
            Disk::File(_) | Disk::Null(_) | Disk::NvmeTcp(_) => Target::Own,
        }
    }

    /// Takes the image's write permission over from another process (see
    /// [`FileDevice::acquire_write`]); nothing for a disk vubd does not lock (null, NVMe).
    /// Control path only.
    pub fn acquire_write(&self) -> Result<(), LockError> {
        match self {
            Disk::File(d) => d.acquire_write(),
            Disk::Null(_) | Disk::NvmeTcp(_) | Disk::NvmePcie(_) => Ok(()),
        }
    }

    /// Gives the image's write permission up for another process to take (see
    /// [`FileDevice::release_write`]); nothing for a disk vubd does not lock. Control path
    /// only.
    pub fn release_write(&self) -> Result<(), LockError> {
        match self {
            Disk::File(d) => d.release_write(),
            Disk::Null(_) | Disk::NvmeTcp(_) | Disk::NvmePcie(_) => Ok(()),
        }
    }

    /// The serial number the guest sees unless one is given: an NVMe controller's own, a
    /// hash of an image's path ([`file::image_serial`]).
    pub fn serial(&self) -> Option<&str> {
        match self {
            Disk::NvmeTcp(d) => Some(d.serial()),
            Disk::NvmePcie(d) => Some(d.serial()),
            Disk::File(d) => Some(d.serial()),
            Disk::Null(_) => None,
        }
    }
}

/// The channel of any of vubd's devices (static dispatch by `match`).
// One per device per poller, kept inline for locality on the hot path: size is no concern.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Channel {
    Uring(UringChannel),
    Null(NullChannel),
    NvmeTcp(NvmeTcpChannel),
    NvmePcie(NvmePcieChannel),
}

impl BlockDevice for Disk {
    type Channel = Channel;

    fn info(&self) -> DeviceInfo {
        match self {
            Disk::File(d) => d.info(),
            Disk::Null(d) => d.info(),
            Disk::NvmeTcp(d) => d.info(),
            Disk::NvmePcie(d) => d.info(),
        }
    }

    fn open_channel(&self, depth: u32) -> io::Result<Channel> {
        Ok(match self {
            Disk::File(d) => Channel::Uring(d.open_channel(depth)?),
            Disk::Null(d) => Channel::Null(d.open_channel(depth)?),
            Disk::NvmeTcp(d) => Channel::NvmeTcp(d.open_channel(depth)?),
            Disk::NvmePcie(d) => Channel::NvmePcie(d.open_channel(depth)?),
        })
    }
}

impl Channel {
    /// [`IoChannel::queue`] for the device `target` names.
    ///
    /// # Safety
    ///
    /// As for [`IoChannel::queue`].
    #[inline]
    pub unsafe fn queue_for(
        &mut self,
        target: &Target,
        tag: u32,
        op: IoOp<'_>,
    ) -> Result<u32, ChannelFull> {
        if let (Target::NvmeNamespace(ns), Channel::NvmePcie(c)) = (target, &mut *self) {
            // SAFETY: the caller's contract is passed on unchanged.
            return unsafe { c.queue_ns(ns, tag, op) };
        }
        // SAFETY: as above.
        unsafe { self.queue(tag, op) }
    }
}

macro_rules! each_channel {
    ($self:expr, $c:ident => $e:expr) => {
        match $self {
            Channel::Uring($c) => $e,
            Channel::Null($c) => $e,
            Channel::NvmeTcp($c) => $e,
            Channel::NvmePcie($c) => $e,
        }
    };
}

impl IoChannel for Channel {
    #[inline]
    fn has_room(&self) -> bool {
        each_channel!(self, c => c.has_room())
    }

    #[inline]
    unsafe fn queue(&mut self, tag: u32, op: IoOp<'_>) -> Result<u32, ChannelFull> {
        // SAFETY: the caller's contract is passed on unchanged.
        each_channel!(self, c => unsafe { c.queue(tag, op) })
    }

    #[inline]
    fn submit(&mut self) -> io::Result<()> {
        each_channel!(self, c => c.submit())
    }

    #[inline]
    fn poll(&mut self, max: usize, f: impl FnMut(u32, i32)) -> usize {
        each_channel!(self, c => c.poll(max, f))
    }

    fn completion_fd(&self) -> Option<RawFd> {
        each_channel!(self, c => c.completion_fd())
    }

    fn clear_completion_fd(&self) {
        each_channel!(self, c => c.clear_completion_fd())
    }

    fn must_poll(&self) -> bool {
        each_channel!(self, c => c.must_poll())
    }

    fn drain(&mut self, draining: impl FnMut(u32) -> bool) {
        each_channel!(self, c => c.drain(draining))
    }
}
