//! Checks that VFIO works from user space on one NVMe controller bound to vfio-pci, the way
//! vubd's user-space NVMe driver will use it, through `vfio-ioctls`' legacy container
//! interface:
//!
//! 1. opens the container (`/dev/vfio/vfio`) and the device's group, and gets the device;
//! 2. reads vendor, device ID and class code from its PCI configuration space;
//! 3. maps BAR0 (mmap of the region, or the region's read/write interface where it cannot be
//!    mapped) and reads the controller's CAP and VS registers;
//! 4. DMA-maps one anonymous 2 MiB buffer into the container at IOVA = its virtual address
//!    (or `--iova`), and unless `--no-identify` makes the controller DMA into it: admin queues
//!    in the buffer, the controller enabled, one Identify Controller command, its completion
//!    polled, the controller disabled again;
//! 5. unmaps the buffer and prints one line:
//!
//! ```text
//! VFIO-PROBE bdf=0000:00:03.0 group=3 id=1b36:0010 class=010802 bar0_size=16384 bar0=mmap cap=0x... mqes=2048 dstrd=0 vs=1.4.0 dma_map=ok iova=0x7f... identify=ok vid=1b36 sn="..." mn="QEMU NVMe Ctrl" fr="..." dma_unmap=ok
//! ```
//!
//! On an error it prints `VFIO-PROBE-FAILED <step>: <error>` and exits with status 1.
//!
//! ```sh
//! vfio_probe 0000:01:00.0            # after binding it: tests/guest/bind-vfio.sh 0000:01:00.0
//! ```
//!
//! Every wait (controller ready, the completion) is bounded by `--timeout`.

use std::fmt;
use std::fs::{self, File};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::ptr::{self, NonNull};
use std::sync::Arc;
use std::sync::atomic::{Ordering, fence};
use std::thread;
use std::time::{Duration, Instant};

use clap::Parser;
use vfio_ioctls::{VfioContainer, VfioDevice, VfioRegionInfoCap};

/// VFIO region indexes of a PCI device (`VFIO_PCI_*_REGION_INDEX` in `<linux/vfio.h>`).
const BAR0_REGION: u32 = 0;
const CONFIG_REGION: u32 = 7;
/// `VFIO_REGION_INFO_FLAG_MMAP`.
const REGION_FLAG_MMAP: u32 = 1 << 2;

/// PCI class code of an NVMe controller: mass storage, non-volatile memory, NVM Express.
const NVME_CLASS: u32 = 0x01_08_02;
/// PCI command register and its bits.
const PCI_COMMAND: u64 = 0x04;
const PCI_COMMAND_MEMORY: u16 = 1 << 1;
const PCI_COMMAND_MASTER: u16 = 1 << 2;

/// NVMe controller registers (NVMe base specification, 3.1).
const REG_CAP: u64 = 0x00;
const REG_VS: u64 = 0x08;
const REG_CC: u64 = 0x14;
const REG_CSTS: u64 = 0x1c;
const REG_AQA: u64 = 0x24;
const REG_ASQ: u64 = 0x28;
const REG_ACQ: u64 = 0x30;
const REG_DOORBELLS: u64 = 0x1000;
const CC_EN: u32 = 1;
/// I/O submission and completion queue entry sizes (log2): 64 and 16 bytes.
const CC_IOSQES: u32 = 6 << 16;
const CC_IOCQES: u32 = 4 << 20;
const CSTS_RDY: u32 = 1;
const CSTS_CFS: u32 = 1 << 1;

/// The DMA buffer: 2 MiB, the admin submission queue at 0, the completion queue at 4 KiB, the
/// Identify data at 8 KiB.
const DMA_LEN: usize = 2 << 20;
const ASQ_OFF: usize = 0;
const ACQ_OFF: usize = 0x1000;
const IDENTIFY_OFF: usize = 0x2000;
/// Entries in each admin queue (the smallest the specification allows).
const ADMIN_DEPTH: u32 = 2;
const OPC_IDENTIFY: u32 = 0x06;
const CNS_CONTROLLER: u32 = 0x01;
const IDENTIFY_CID: u32 = 0x0001;

/// Checks VFIO from user space on one NVMe controller bound to vfio-pci.
#[derive(Debug, Parser)]
#[command(name = "vfio_probe")]
struct Args {
    /// PCI address of the controller, bound to vfio-pci: 0000:01:00.0 (the domain may be left
    /// out).
    bdf: String,
    /// IOVA of the DMA buffer (default: its virtual address); 0x-prefixed hex or decimal.
    #[arg(long, value_parser = parse_u64)]
    iova: Option<u64>,
    /// Map and unmap the buffer only; the controller does no DMA.
    #[arg(long)]
    no_identify: bool,
    /// Upper bound of each wait (controller state changes, the completion), seconds.
    #[arg(long, default_value_t = 10)]
    timeout: u64,
}

fn parse_u64(s: &str) -> Result<u64, String> {
    let r = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => s.parse(),
    };
    r.map_err(|e| format!("{s:?}: {e}"))
}

/// A failed step and why.
#[derive(Debug)]
struct Failure {
    step: &'static str,
    why: String,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.step, self.why)
    }
}

/// Attaches the step to an error.
trait Step<T> {
    fn step(self, step: &'static str) -> Result<T, Failure>;
}

impl<T, E: fmt::Display> Step<T> for Result<T, E> {
    fn step(self, step: &'static str) -> Result<T, Failure> {
        self.map_err(|e| Failure {
            step,
            why: e.to_string(),
        })
    }
}

fn fail<T>(step: &'static str, why: impl Into<String>) -> Result<T, Failure> {
    Err(Failure {
        step,
        why: why.into(),
    })
}

/// A private anonymous mapping, unmapped on drop.
#[derive(Debug)]
struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

impl Mapping {
    /// `len` bytes of `fd` from `offset`, shared (a device region); or anonymous memory.
    fn new(len: usize, fd: Option<(BorrowedFd<'_>, u64)>) -> std::io::Result<Self> {
        let prot = libc::PROT_READ | libc::PROT_WRITE;
        let (flags, raw_fd, offset) = match fd {
            Some((fd, offset)) => {
                let offset = libc::off_t::try_from(offset)
                    .map_err(|_| std::io::Error::from_raw_os_error(libc::EOVERFLOW))?;
                (libc::MAP_SHARED, fd.as_raw_fd(), offset)
            }
            None => (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0),
        };
        // SAFETY: a new mapping at an address the kernel picks; it replaces nothing, and the
        // arguments are checked by the kernel.
        let ptr = unsafe { libc::mmap(ptr::null_mut(), len, prot, flags, raw_fd, offset) };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let ptr = NonNull::new(ptr.cast::<u8>()).expect("mmap does not return NULL on success");
        Ok(Self { ptr, len })
    }

    fn at(&self, offset: usize, size: usize) -> *mut u8 {
        assert!(
            offset + size <= self.len,
            "offset {offset} + {size} beyond {}",
            self.len
        );
        self.ptr.as_ptr().wrapping_add(offset)
    }

    fn read32(&self, offset: usize) -> u32 {
        let p = self.at(offset, 4).cast::<u32>();
        assert!(p.is_aligned(), "unaligned 32-bit access at {offset:#x}");
        // SAFETY: `p` is inside the mapping (checked by `at`) and aligned. Only volatile
        // accesses touch the mapping: the device may change it at any time.
        unsafe { ptr::read_volatile(p) }
    }

    fn write32(&self, offset: usize, value: u32) {
        let p = self.at(offset, 4).cast::<u32>();
        assert!(p.is_aligned(), "unaligned 32-bit access at {offset:#x}");
        // SAFETY: as in `read32`.
        unsafe { ptr::write_volatile(p, value) }
    }

    fn write64(&self, offset: usize, value: u64) {
        self.write32(offset, value as u32);
        self.write32(offset + 4, (value >> 32) as u32);
    }

    fn addr(&self) -> u64 {
        self.ptr.as_ptr() as u64
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the mapping was made by `new` with this length and nothing refers to it any
        // more (all accesses went through raw pointers that do not outlive `self`).
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// How BAR0 is reached: a mapping of the region, or reads and writes on the device file.
#[derive(Debug)]
enum Bar0 {
    Mmap(Mapping),
    Rw { file: File, base: u64 },
}

impl Bar0 {
    fn kind(&self) -> &'static str {
        match self {
            Self::Mmap(_) => "mmap",
            Self::Rw { .. } => "rw",
        }
    }

    fn read32(&self, reg: u64) -> Result<u32, Failure> {
        match self {
            Self::Mmap(m) => Ok(m.read32(usize::try_from(reg).expect("register offset"))),
            Self::Rw { file, base } => {
                let mut b = [0u8; 4];
                file.read_exact_at(&mut b, base + reg)
                    .step("read a BAR0 register")?;
                Ok(u32::from_le_bytes(b))
            }
        }
    }

    fn write32(&self, reg: u64, value: u32) -> Result<(), Failure> {
        match self {
            Self::Mmap(m) => {
                m.write32(usize::try_from(reg).expect("register offset"), value);
                Ok(())
            }
            Self::Rw { file, base } => file
                .write_all_at(&value.to_le_bytes(), base + reg)
                .step("write a BAR0 register"),
        }
    }

    /// A 64-bit register as two 32-bit accesses, low half first.
    fn read64(&self, reg: u64) -> Result<u64, Failure> {
        let lo = self.read32(reg)?;
        let hi = self.read32(reg + 4)?;
        Ok(u64::from(hi) << 32 | u64::from(lo))
    }

    fn write64(&self, reg: u64, value: u64) -> Result<(), Failure> {
        self.write32(reg, value as u32)?;
        self.write32(reg + 4, (value >> 32) as u32)
    }
}

/// Reads of a VFIO device region through the device file.
fn region_read(
    file: &File,
    dev: &VfioDevice,
    index: u32,
    at: u64,
    buf: &mut [u8],
) -> Result<(), Failure> {
    file.read_exact_at(buf, dev.get_region_offset(index) + at)
        .step("read a device region")
}

fn region_write(
    file: &File,
    dev: &VfioDevice,
    index: u32,
    at: u64,
    buf: &[u8],
) -> Result<(), Failure> {
    file.write_all_at(buf, dev.get_region_offset(index) + at)
        .step("write a device region")
}

/// Maps the part of BAR0 that holds the registers and the first doorbells, if the region
/// allows it (with a sparse-mmap capability: if an mmap-able area covers it).
fn map_bar0(dev: &VfioDevice, file: &File) -> Result<Bar0, Failure> {
    let size = dev.get_region_size(BAR0_REGION);
    let base = dev.get_region_offset(BAR0_REGION);
    if size < REG_DOORBELLS + 0x1000 {
        return fail(
            "BAR0",
            format!("{size} bytes, too small for NVMe registers"),
        );
    }
    let rw = || {
        Ok(Bar0::Rw {
            file: file.try_clone().step("duplicate the device file")?,
            base,
        })
    };
    if dev.get_region_flags(BAR0_REGION) & REGION_FLAG_MMAP == 0 {
        return rw();
    }
    let mut area = (0, size);
    for cap in dev.get_region_caps(BAR0_REGION) {
        if let VfioRegionInfoCap::SparseMmap(sparse) = cap {
            match sparse
                .areas
                .iter()
                .find(|a| a.offset == 0 && a.size >= REG_DOORBELLS + 0x1000)
            {
                Some(a) => area = (a.offset, a.size),
                None => return rw(),
            }
        }
    }
    let len = usize::try_from(area.1).step("BAR0 size")?;
    // SAFETY: the device file outlives this call, and the mapping does not need it open.
    let fd = unsafe { BorrowedFd::borrow_raw(dev.as_raw_fd()) };
    let m = Mapping::new(len, Some((fd, base + area.0))).step("mmap BAR0")?;
    Ok(Bar0::Mmap(m))
}

/// Waits until `CSTS & mask == want`, at most `timeout`; fails on a fatal controller status.
fn wait_csts(
    bar: &Bar0,
    mask: u32,
    want: u32,
    timeout: Duration,
    what: &'static str,
) -> Result<(), Failure> {
    let deadline = Instant::now() + timeout;
    loop {
        let csts = bar.read32(REG_CSTS)?;
        if csts & CSTS_CFS != 0 && csts != u32::MAX {
            return fail(what, format!("controller fatal status, CSTS={csts:#x}"));
        }
        if csts & mask == want {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return fail(what, format!("CSTS={csts:#x} after {timeout:?}"));
        }
        thread::sleep(Duration::from_millis(1));
    }
}

/// An ASCII field of the Identify data, trailing spaces removed.
fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes)
        .trim_end_matches([' ', '\0'])
        .to_owned()
}

/// What the Identify Controller command returned.
#[derive(Debug)]
struct Identify {
    vid: u16,
    sn: String,
    mn: String,
    fr: String,
}

/// Runs one Identify Controller command through admin queues in `buf` (mapped at `iova`),
/// polling for its completion, then disables the controller.
fn identify(
    bar: &Bar0,
    cap: u64,
    buf: &Mapping,
    iova: u64,
    timeout: Duration,
) -> Result<Identify, Failure> {
    let dstrd = (cap >> 32) & 0xf;
    let ready_timeout = timeout
        .min(Duration::from_millis(500) * u32::try_from((cap >> 24) & 0xff).unwrap_or(1).max(1));

    // Disable (a reset of the controller's state), then set up the admin queues and enable.
    if bar.read32(REG_CC)? & CC_EN != 0 {
        bar.write32(REG_CC, 0)?;
    }
    wait_csts(bar, CSTS_RDY, 0, ready_timeout, "controller disable")?;
    bar.write32(REG_AQA, (ADMIN_DEPTH - 1) << 16 | (ADMIN_DEPTH - 1))?;
    bar.write64(REG_ASQ, iova + ASQ_OFF as u64)?;
    bar.write64(REG_ACQ, iova + ACQ_OFF as u64)?;
    bar.write32(REG_CC, CC_EN | CC_IOSQES | CC_IOCQES)?;
    wait_csts(bar, CSTS_RDY, CSTS_RDY, ready_timeout, "controller enable")?;

    // The submission queue entry: CDW0 (opcode, command ID), NSID 0, PRP1, CDW10 (CNS).
    for dw in 0..16 {
        buf.write32(ASQ_OFF + 4 * dw, 0);
    }
    buf.write32(ASQ_OFF, OPC_IDENTIFY | IDENTIFY_CID << 16);
    buf.write64(ASQ_OFF + 24, iova + IDENTIFY_OFF as u64);
    buf.write32(ASQ_OFF + 40, CNS_CONTROLLER);
    fence(Ordering::SeqCst);
    bar.write32(REG_DOORBELLS, 1)?; // SQ 0 tail

    let deadline = Instant::now() + timeout;
    let dw3 = loop {
        let dw3 = buf.read32(ACQ_OFF + 12);
        if dw3 & (1 << 16) != 0 {
            break dw3; // phase tag 1: the first pass over the queue
        }
        if Instant::now() >= deadline {
            return fail("identify", format!("no completion within {timeout:?}"));
        }
        thread::sleep(Duration::from_millis(1));
    };
    fence(Ordering::SeqCst);
    let cq_head_doorbell = REG_DOORBELLS + (4 << dstrd);
    bar.write32(cq_head_doorbell, 1)?;
    let status = (dw3 >> 17) & 0x7fff;
    if dw3 & 0xffff != IDENTIFY_CID || status != 0 {
        return fail(
            "identify",
            format!(
                "completion DW3 {dw3:#010x}: command ID {:#x}, status {status:#x}",
                dw3 & 0xffff
            ),
        );
    }
    let mut data = [0u8; 72];
    for (i, chunk) in data.chunks_mut(4).enumerate() {
        chunk.copy_from_slice(&buf.read32(IDENTIFY_OFF + 4 * i).to_le_bytes());
    }

    bar.write32(REG_CC, 0)?;
    wait_csts(bar, CSTS_RDY, 0, ready_timeout, "controller disable")?;
    Ok(Identify {
        vid: u16::from_le_bytes([data[0], data[1]]),
        sn: text(&data[4..24]),
        mn: text(&data[24..64]),
        fr: text(&data[64..72]),
    })
}

fn group_of(sysfs: &Path) -> Result<u32, Failure> {
    let link = fs::read_link(sysfs.join("iommu_group"))
        .step("IOMMU group (is an IOMMU on and the device bound to vfio-pci?)")?;
    link.file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| Failure {
            step: "IOMMU group",
            why: format!("cannot read a group number from {}", link.display()),
        })
}

fn run(args: &Args) -> Result<String, Failure> {
    let bdf = if args.bdf.matches(':').count() == 1 {
        format!("0000:{}", args.bdf)
    } else {
        args.bdf.clone()
    };
    let sysfs = PathBuf::from("/sys/bus/pci/devices").join(&bdf);
    if !sysfs.is_dir() {
        return fail("device", format!("no PCI device {bdf}"));
    }
    let driver = fs::read_link(sysfs.join("driver")).ok();
    let driver = driver
        .as_deref()
        .and_then(Path::file_name)
        .and_then(|n| n.to_str());
    if driver != Some("vfio-pci") {
        return fail(
            "device",
            format!(
                "{bdf} is bound to {}, not vfio-pci",
                driver.unwrap_or("no driver")
            ),
        );
    }
    let group = group_of(&sysfs)?;

    let container = Arc::new(VfioContainer::new(None).step("open the VFIO container")?);
    let dev =
        VfioDevice::new(&sysfs, container.clone(), false).step("get the device from its group")?;
    // SAFETY: the descriptor belongs to `dev`, which outlives this borrow; the clone is a new
    // descriptor of the same open file.
    let file: File = unsafe { BorrowedFd::borrow_raw(dev.as_raw_fd()) }
        .try_clone_to_owned()
        .step("duplicate the device file")?
        .into();

    let mut config = [0u8; 64];
    region_read(&file, &dev, CONFIG_REGION, 0, &mut config)?;
    let vendor = u16::from_le_bytes([config[0], config[1]]);
    let device = u16::from_le_bytes([config[2], config[3]]);
    let class = u32::from_le_bytes([config[9], config[10], config[11], 0]);
    if class != NVME_CLASS {
        return fail(
            "config space",
            format!("class {class:06x}, not an NVMe controller"),
        );
    }

    let bar = map_bar0(&dev, &file)?;
    let cap = bar.read64(REG_CAP)?;
    let vs = bar.read32(REG_VS)?;
    if cap == u64::MAX || vs == u32::MAX {
        return fail(
            "BAR0",
            "registers read as all ones (is memory decoding on?)",
        );
    }
    let mqes = (cap & 0xffff) + 1;
    let dstrd = (cap >> 32) & 0xf;
    let version = format!("{}.{}.{}", vs >> 16, (vs >> 8) & 0xff, vs & 0xff);

    let buf = Mapping::new(DMA_LEN, None).step("allocate the DMA buffer")?;
    let iova = args.iova.unwrap_or(buf.addr());
    // SAFETY: from here until the unmap below, the buffer is touched only through volatile
    // accesses of `Mapping` (no references to it exist), and it stays mapped until after the
    // unmap: `buf` is dropped at the end of this function.
    unsafe { container.vfio_dma_map(iova, DMA_LEN, buf.ptr.as_ptr()) }.step("DMA map")?;

    let mut line = format!(
        "VFIO-PROBE bdf={bdf} group={group} id={vendor:04x}:{device:04x} class={class:06x} \
         bar0_size={} bar0={} cap={cap:#018x} mqes={mqes} dstrd={dstrd} vs={version} \
         dma_map=ok iova={iova:#x} dma_len={DMA_LEN}",
        dev.get_region_size(BAR0_REGION),
        bar.kind(),
    );
    let identified = if args.no_identify {
        Ok(None)
    } else {
        let mut command = [0u8; 2];
        region_read(&file, &dev, CONFIG_REGION, PCI_COMMAND, &mut command)?;
        let command = u16::from_le_bytes(command);
        let enabled = command | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER;
        region_write(
            &file,
            &dev,
            CONFIG_REGION,
            PCI_COMMAND,
            &enabled.to_le_bytes(),
        )?;
        let r = identify(&bar, cap, &buf, iova, Duration::from_secs(args.timeout));
        region_write(
            &file,
            &dev,
            CONFIG_REGION,
            PCI_COMMAND,
            &command.to_le_bytes(),
        )?;
        r.map(Some)
    };
    // Unmapped whatever the Identify command did: the controller is disabled (or failed).
    let unmapped = container.vfio_dma_unmap(iova, DMA_LEN).step("DMA unmap");
    match identified? {
        Some(id) => {
            line += &format!(
                " identify=ok vid={:04x} sn={:?} mn={:?} fr={:?}",
                id.vid, id.sn, id.mn, id.fr
            )
        }
        None => line += " identify=skipped",
    }
    unmapped?;
    line += " dma_unmap=ok";
    drop(bar);
    drop(file);
    drop(dev);
    Ok(line)
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(line) => {
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!("VFIO-PROBE-FAILED {e}");
            ExitCode::FAILURE
        }
    }
}
