//! An NVMe controller through VFIO (the legacy container and group interface of
//! `vfio-ioctls`), and DMA memory for it.
//!
//! [`VfioNvme::open`] checks sysfs first ([`super::sysfs::check`]) so that the usual mistakes
//! (wrong driver, shared IOMMU group, no IOMMU) get a line that says what to do, then opens
//! the container, the group and the device, turns on memory decoding and bus mastering, and
//! maps BAR0 (or, where the region cannot be mapped, reaches it through the device file).
//!
//! [`DmaBuf`] is anonymous memory mapped for the device at IOVA = its address, as guest
//! memory is: one address space for everything the controller reads or writes.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::ptr::{self, NonNull};
use std::sync::Arc;

use vfio_ioctls::{VfioContainer, VfioDevice, VfioError, VfioRegionInfoCap};
use vmm_sys_util::eventfd::EventFd;

use super::error::PcieError;
use super::regs::offset;
use super::sysfs::{self, NVME_CLASS, PCI_DEVICES};

/// VFIO region indexes of a PCI device (`VFIO_PCI_*_REGION_INDEX`).
const BAR0_REGION: u32 = 0;
const CONFIG_REGION: u32 = 7;
/// `VFIO_PCI_MSIX_IRQ_INDEX`.
const MSIX_IRQ_INDEX: u32 = 2;
/// `VFIO_REGION_INFO_FLAG_MMAP`.
const REGION_FLAG_MMAP: u32 = 1 << 2;
/// PCI configuration space: class code (3 bytes at 0x09), command register and its bits.
const PCI_CLASS: u64 = 0x09;
const PCI_COMMAND: u64 = 0x04;
const PCI_COMMAND_MEMORY: u16 = 1 << 1;
const PCI_COMMAND_MASTER: u16 = 1 << 2;
/// BAR0 must hold the registers and at least the admin queue's doorbells.
const BAR0_MIN: u64 = offset::DOORBELLS as u64 + 8;
/// The container device.
const VFIO_CONTAINER: &str = "/dev/vfio/vfio";

/// The host's memory page size.
pub fn host_page_size() -> usize {
    // SAFETY: sysconf only reads a system constant.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(n).ok().filter(|&n| n > 0).unwrap_or(4096)
}

/// How BAR0 is reached.
#[derive(Debug)]
enum Bar0 {
    /// Mapped: `len` bytes of the region at `ptr`.
    Mmap { ptr: NonNull<u8>, len: usize },
    /// Reads and writes of the device file at the region's offset.
    Rw { base: u64, len: usize },
}

// SAFETY: the mapping is device memory owned by the `VfioNvme` that holds this value; it is
// only reached with volatile 32-bit accesses, which the device accepts from any thread.
unsafe impl Send for Bar0 {}
// SAFETY: as above; concurrent register accesses are each whole 32-bit accesses, and the
// driver keeps each register (a doorbell, CC) to one writer at a time.
unsafe impl Sync for Bar0 {}

impl Bar0 {
    fn len(&self) -> usize {
        match *self {
            Bar0::Mmap { len, .. } | Bar0::Rw { len, .. } => len,
        }
    }
}

/// An NVMe controller bound to vfio-pci, opened from user space: its VFIO container, group
/// and device, BAR0, memory decoding and bus mastering on.
pub struct VfioNvme {
    bdf: String,
    group: u32,
    /// Offset of the PCI configuration space region in the device file.
    config: u64,
    // Dropped in this order: BAR0's mapping holds a reference to the device file, which must
    // be closed before the group leaves the container.
    bar: Bar0,
    file: File,
    /// Held open: the device stays ours while it lives. Closing it also disables its
    /// interrupts.
    dev: VfioDevice,
    container: Arc<VfioContainer>,
}

impl std::fmt::Debug for VfioNvme {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VfioNvme")
            .field("bdf", &self.bdf)
            .field("group", &self.group)
            .field("bar", &self.bar)
            .finish_non_exhaustive()
    }
}

impl VfioNvme {
    /// Opens controller `bdf` (`0000:01:00.0`, or without the domain).
    pub fn open(bdf: &str) -> Result<VfioNvme, PcieError> {
        Self::open_at(Path::new(PCI_DEVICES), Path::new(VFIO_CONTAINER), bdf)
    }

    /// [`VfioNvme::open`] with the sysfs devices directory and the container device given.
    fn open_at(devices: &Path, container_dev: &Path, bdf: &str) -> Result<VfioNvme, PcieError> {
        let cand = sysfs::check(devices, bdf)?;
        if !container_dev.exists() {
            return Err(PcieError::NoVfio);
        }
        let container = VfioContainer::new(None).map_err(|e| match e {
            VfioError::OpenContainer(e) => match e.kind() {
                io::ErrorKind::PermissionDenied => PcieError::Permission(container_dev.into()),
                io::ErrorKind::NotFound => PcieError::NoVfio,
                _ => PcieError::Vfio {
                    what: "open the container",
                    source: VfioError::OpenContainer(e),
                },
            },
            VfioError::VfioExtension | VfioError::VfioType1V2 => PcieError::NoType1,
            e => PcieError::Vfio {
                what: "open the container",
                source: e,
            },
        })?;
        let container = Arc::new(container);
        let dev = VfioDevice::new(&cand.dir, container.clone(), false).map_err(|e| match e {
            VfioError::OpenGroup(e, _) if e.kind() == io::ErrorKind::PermissionDenied => {
                PcieError::Permission(PathBuf::from(format!("/dev/vfio/{}", cand.group)))
            }
            VfioError::OpenGroup(e, _) if e.raw_os_error() == Some(libc::EBUSY) => {
                PcieError::Busy {
                    bdf: cand.bdf.clone(),
                    group: cand.group,
                }
            }
            VfioError::GroupViable => PcieError::GroupNotViable {
                bdf: cand.bdf.clone(),
                group: cand.group,
                blockers: sysfs::group_blockers(&cand.dir),
            },
            e => PcieError::Vfio {
                what: "get the device from its group",
                source: e,
            },
        })?;
        // SAFETY: the descriptor belongs to `dev`, alive for this borrow; the clone is a new
        // descriptor of the same open file, owned by the returned `File`.
        let file: File = unsafe { BorrowedFd::borrow_raw(dev.as_raw_fd()) }
            .try_clone_to_owned()
            .map_err(|source| PcieError::Io {
                what: "duplicate the VFIO device descriptor",
                source,
            })?
            .into();
        let config = dev.get_region_offset(CONFIG_REGION);
        let io_err = |what| move |source| PcieError::Io { what, source };
        let mut class = [0u8; 3];
        file.read_exact_at(&mut class, config + PCI_CLASS)
            .map_err(io_err("read the PCI configuration space"))?;
        let class = u32::from_le_bytes([class[0], class[1], class[2], 0]);
        if class != NVME_CLASS {
            return Err(PcieError::NotNvme {
                bdf: cand.bdf,
                class,
            });
        }
        set_command_bits(&file, config, PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER, true)?;
        let bar = map_bar0(&dev, &cand.bdf)?;
        let nvme = VfioNvme {
            config,
            bdf: cand.bdf,
            group: cand.group,
            bar,
            file,
            dev,
            container,
        };
        if nvme.read32(offset::CSTS) == u32::MAX {
            return Err(PcieError::Removed(nvme.bdf));
        }
        Ok(nvme)
    }

    /// Lets the device master the bus (DMA) or stops it from doing so. Off, nothing the
    /// controller still holds can reach memory.
    pub fn set_bus_master(&self, on: bool) -> Result<(), PcieError> {
        set_command_bits(&self.file, self.config, PCI_COMMAND_MASTER, on)
    }

    pub fn bdf(&self) -> &str {
        &self.bdf
    }

    /// MSI-X vectors the device has (0: no MSI-X).
    pub fn msix_vectors(&self) -> u32 {
        self.dev.get_irq_info(MSIX_IRQ_INDEX).map_or(0, |i| i.count)
    }

    /// Enables MSI-X with vector `i` signalling `fds[i]`. VFIO takes the whole set at once:
    /// enabling another set later replaces this one.
    pub fn enable_msix(&self, fds: &[EventFd]) -> Result<(), PcieError> {
        self.dev
            .enable_msix(fds.iter().collect())
            .map_err(|source| PcieError::Vfio {
                what: "enable MSI-X",
                source,
            })
    }

    pub fn group(&self) -> u32 {
        self.group
    }

    /// BAR0 is mapped (`true`) or reached through the device file.
    pub fn bar0_mapped(&self) -> bool {
        matches!(self.bar, Bar0::Mmap { .. })
    }

    /// Bytes of BAR0 that can be reached.
    pub fn bar0_len(&self) -> usize {
        self.bar.len()
    }

    /// A 32-bit register. Reads outside BAR0, or that fail, give all ones, as a removed device
    /// does.
    #[inline]
    pub fn read32(&self, off: usize) -> u32 {
        if off % 4 != 0 || off.checked_add(4).is_none_or(|end| end > self.bar.len()) {
            return u32::MAX;
        }
        match self.bar {
            Bar0::Mmap { ptr, .. } => {
                // SAFETY: `off..off + 4` lies inside the mapping (checked above), which lives
                // as long as `self`; the address is 4-byte aligned (mapping page aligned,
                // `off` checked). Device registers are only reached by volatile accesses.
                u32::from_le(unsafe { ptr.add(off).cast::<u32>().read_volatile() })
            }
            Bar0::Rw { base, .. } => {
                let mut b = [0u8; 4];
                match self.file.read_exact_at(&mut b, base + off as u64) {
                    Ok(()) => u32::from_le_bytes(b),
                    Err(_) => u32::MAX,
                }
            }
        }
    }

    /// Writes a 32-bit register; a write outside BAR0, or that fails, is dropped (a removed
    /// device shows in the next read).
    #[inline]
    pub fn write32(&self, off: usize, value: u32) {
        if off % 4 != 0 || off.checked_add(4).is_none_or(|end| end > self.bar.len()) {
            return;
        }
        match self.bar {
            Bar0::Mmap { ptr, .. } => {
                // SAFETY: as in `read32`: inside the mapping, aligned, volatile.
                unsafe { ptr.add(off).cast::<u32>().write_volatile(value.to_le()) }
            }
            Bar0::Rw { base, .. } => {
                let _ = self
                    .file
                    .write_all_at(&value.to_le_bytes(), base + off as u64);
            }
        }
    }

    /// A 64-bit register as two 32-bit reads, low half first (Base 2.0 §3.1.3 allows it).
    pub fn read64(&self, off: usize) -> u64 {
        let lo = self.read32(off);
        let hi = self.read32(off + 4);
        (u64::from(hi) << 32) | u64::from(lo)
    }

    pub fn write64(&self, off: usize, value: u64) {
        self.write32(off, value as u32);
        self.write32(off + 4, (value >> 32) as u32);
    }

    /// DMA-maps `len` bytes at `addr` at IOVA = `addr`; both page aligned.
    ///
    /// # Safety
    ///
    /// `addr..addr + len` must stay mapped in this process until [`VfioNvme::dma_unmap`]
    /// succeeds for it; until then the device may read and write it at any time, so it must
    /// only be reached through raw pointers (no Rust references) while the device may use it.
    pub unsafe fn dma_map(&self, addr: *mut u8, len: usize) -> Result<(), PcieError> {
        let iova = addr as u64;
        let page = host_page_size();
        if iova % page as u64 != 0 || len % page != 0 || len == 0 {
            return Err(PcieError::DmaAlign { addr: iova, len });
        }
        // SAFETY: the caller keeps the range mapped and reached only through raw pointers
        // until it is unmapped (this function's contract).
        unsafe { self.container.vfio_dma_map(iova, len, addr) }.map_err(|source| {
            PcieError::DmaMap {
                addr: iova,
                len,
                source,
            }
        })
    }

    /// Removes the DMA mapping of `len` bytes at IOVA `addr`.
    pub fn dma_unmap(&self, addr: u64, len: usize) -> Result<(), PcieError> {
        self.container
            .vfio_dma_unmap(addr, len)
            .map_err(|source| PcieError::DmaUnmap { addr, len, source })
    }
}

/// Maps BAR0, or the mappable area at its start, if the region allows it; else the device
/// file reaches it.
fn map_bar0(dev: &VfioDevice, bdf: &str) -> Result<Bar0, PcieError> {
    let size = dev.get_region_size(BAR0_REGION);
    let base = dev.get_region_offset(BAR0_REGION);
    if size < BAR0_MIN {
        return Err(PcieError::Bar0 {
            bdf: bdf.to_owned(),
            size,
        });
    }
    let size_usize = usize::try_from(size).unwrap_or(usize::MAX);
    let rw = Bar0::Rw {
        base,
        len: size_usize,
    };
    if dev.get_region_flags(BAR0_REGION) & REGION_FLAG_MMAP == 0 {
        return Ok(rw);
    }
    let mut area = (0u64, size);
    for cap in dev.get_region_caps(BAR0_REGION) {
        if let VfioRegionInfoCap::SparseMmap(sparse) = cap {
            match sparse
                .areas
                .iter()
                .find(|a| a.offset == 0 && a.size >= BAR0_MIN)
            {
                Some(a) => area = (a.offset, a.size),
                None => return Ok(rw),
            }
        }
    }
    let Ok(len) = usize::try_from(area.1) else {
        return Ok(rw);
    };
    let Ok(off) = libc::off_t::try_from(base + area.0) else {
        return Ok(rw);
    };
    // SAFETY: a new shared mapping of the device file at an address the kernel picks; it
    // replaces nothing. The kernel checks the offset and length against the region.
    let p = unsafe {
        libc::mmap(
            ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            dev.as_raw_fd(),
            off,
        )
    };
    if p == libc::MAP_FAILED {
        return Ok(rw);
    }
    match NonNull::new(p.cast::<u8>()) {
        Some(ptr) => Ok(Bar0::Mmap { ptr, len }),
        None => Ok(rw),
    }
}

impl Drop for Bar0 {
    fn drop(&mut self) {
        if let Bar0::Mmap { ptr, len } = *self {
            // SAFETY: the mapping was made by `map_bar0` with this length; no access outlives
            // the `VfioNvme` that owns it.
            unsafe { libc::munmap(ptr.as_ptr().cast(), len) };
        }
    }
}

/// Page-aligned anonymous memory, DMA-mapped for one controller at IOVA = its address;
/// unmapped from the IOMMU and freed on drop.
///
/// The controller may read and write it whenever a command or queue points at it, so it is
/// only reached through raw pointers: volatile accesses for queue entries, plain copies for
/// data the controller is known not to touch at that moment.
pub struct DmaBuf {
    ptr: NonNull<u8>,
    len: usize,
    container: Arc<VfioContainer>,
}

impl std::fmt::Debug for DmaBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DmaBuf")
            .field("iova", &format_args!("{:#x}", self.iova()))
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

// SAFETY: the memory is owned by this value alone (a private mapping) and reached only
// through raw pointers; which thread does that makes no difference.
unsafe impl Send for DmaBuf {}
// SAFETY: `&DmaBuf` hands out only the address and length; writes go through raw pointers
// whose users keep their own regions apart.
unsafe impl Sync for DmaBuf {}

impl DmaBuf {
    /// At least `len` bytes (rounded up to whole host pages), zeroed, mapped for `nvme`.
    pub fn new(nvme: &VfioNvme, len: usize) -> Result<DmaBuf, PcieError> {
        let page = host_page_size();
        let len = len.max(1).div_ceil(page) * page;
        // SAFETY: a new private anonymous mapping at an address the kernel picks.
        let p = unsafe {
            libc::mmap(
                ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(PcieError::Alloc {
                len,
                source: io::Error::last_os_error(),
            });
        }
        let Some(ptr) = NonNull::new(p.cast::<u8>()) else {
            return Err(PcieError::Alloc {
                len,
                source: io::Error::from_raw_os_error(libc::ENOMEM),
            });
        };
        // SAFETY: the mapping is new, page aligned and ours; it stays mapped until `drop`,
        // which unmaps it from the IOMMU first, and it is only reached through raw pointers.
        if let Err(e) = unsafe { nvme.dma_map(ptr.as_ptr(), len) } {
            // SAFETY: the mapping made above, never handed out.
            unsafe { libc::munmap(p, len) };
            return Err(e);
        }
        Ok(DmaBuf {
            ptr,
            len,
            container: nvme.container.clone(),
        })
    }

    /// The IOVA, which is also the address.
    pub fn iova(&self) -> u64 {
        self.ptr.as_ptr() as u64
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The address of byte `off`, or `None` past the end.
    pub fn at(&self, off: usize) -> Option<NonNull<u8>> {
        // SAFETY: `off` is within the mapping (checked), so the result is inside it too.
        (off < self.len).then(|| unsafe { self.ptr.add(off) })
    }

    /// Zeroes `off..off + len` (clipped to the buffer) with volatile stores, so no store is
    /// dropped as dead.
    pub fn zero(&self, off: usize, len: usize) {
        let end = off.saturating_add(len).min(self.len);
        for i in off..end {
            // SAFETY: `i` is inside the mapping; a byte store needs no alignment.
            unsafe { self.ptr.add(i).write_volatile(0) }
        }
    }

    /// Copies `out.len()` bytes from `off` (clipped to the buffer); returns how many.
    ///
    /// The controller must not be writing that part at the same time (its command has
    /// completed, or none points there).
    pub fn read(&self, off: usize, out: &mut [u8]) -> usize {
        let n = out.len().min(self.len.saturating_sub(off));
        if n > 0 {
            // SAFETY: `off..off + n` is inside the mapping; the caller keeps the controller
            // away from it, and `out` is a distinct Rust buffer.
            unsafe { ptr::copy_nonoverlapping(self.ptr.as_ptr().add(off), out.as_mut_ptr(), n) }
        }
        n
    }
}

impl Drop for DmaBuf {
    fn drop(&mut self) {
        match self.container.vfio_dma_unmap(self.iova(), self.len) {
            Ok(()) => {
                // SAFETY: the IOMMU no longer maps the memory, so only this process reaches
                // it, and nothing does any more: the mapping is ours, of this length.
                unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
            }
            Err(e) => {
                // The device might still reach the pages: keep them rather than let the
                // kernel reuse them.
                tracing::warn!(
                    "keeping {} bytes of DMA memory at {:#x}: unmap failed: {e}",
                    self.len,
                    self.iova()
                );
            }
        }
    }
}

/// Sets (`on`) or clears `bits` in the PCI command register, through the configuration space
/// region at `config` of the device file.
fn set_command_bits(file: &File, config: u64, bits: u16, on: bool) -> Result<(), PcieError> {
    let io_err = |what| move |source| PcieError::Io { what, source };
    let mut cmd = [0u8; 2];
    file.read_exact_at(&mut cmd, config + PCI_COMMAND)
        .map_err(io_err("read the PCI command register"))?;
    let cmd = u16::from_le_bytes(cmd);
    let cmd = if on { cmd | bits } else { cmd & !bits };
    file.write_all_at(&cmd.to_le_bytes(), config + PCI_COMMAND)
        .map_err(io_err("write the PCI command register"))
}
