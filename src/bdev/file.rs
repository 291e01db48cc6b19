//! A regular file or a block device as a block device: opening, locking (as QEMU does, see
//! [`super::lock`]), geometry, and the probing of what the file system under it supports
//! (O_DIRECT, hole punching, zero ranges).

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use thiserror::Error;
use tracing::{info, warn};

use super::capacity::{Capacity, Resize, ResizeError};
use super::lock::{ImageLock, LockError, LockSet};
use super::uring::{UringChannel, ZeroStrategy};
use super::{BlockDevice, DeviceInfo};
use crate::virtio_blk::SECTOR_SIZE;

/// How the file is opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CacheMode {
    /// Bypass the host page cache with O_DIRECT where the file system allows it.
    None,
    /// Go through the host page cache.
    Writeback,
}

/// Options of a file-backed device.
#[derive(Clone, Debug)]
pub struct FileOptions {
    pub path: PathBuf,
    pub read_only: bool,
    pub cache: CacheMode,
    /// Open a writable image without the write permission, for [`FileDevice::acquire_write`]
    /// to take when the frontend starts the device (`--incoming`). A read-only image ignores
    /// it: it never holds write.
    pub inactive: bool,
}

/// Why a file could not be served.
#[derive(Debug, Error)]
pub enum FileError {
    #[error("cannot open {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{0} is neither a regular file nor a block device")]
    NotFileOrBlockDevice(PathBuf),
    #[error("cannot read the size of {path}")]
    Size {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("size of {path} ({size} bytes) is not a multiple of {block} bytes")]
    UnalignedSize {
        path: PathBuf,
        size: u64,
        block: u32,
    },
    #[error("{0} is empty")]
    Empty(PathBuf),
    #[error(transparent)]
    Lock(LockError),
}

/// Alignment that O_DIRECT needs, from `statx(STATX_DIOALIGN)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DirectAlign {
    /// Buffer addresses.
    pub mem: u32,
    /// File offsets and lengths.
    pub offset: u32,
}

/// A file or block device served through io_uring.
#[derive(Debug)]
pub struct FileDevice {
    /// Opened with O_DIRECT, for requests that meet [`FileDevice::direct_align`].
    direct: Option<Arc<File>>,
    /// Opened without O_DIRECT, for everything else.
    buffered: Arc<File>,
    direct_align: DirectAlign,
    zero: ZeroStrategy,
    /// Hole punching works (discard, and write-zeroes with UNMAP).
    punch: bool,
    /// What the device is, but for its capacity (`capacity`).
    info: DeviceInfo,
    capacity: Capacity,
    is_block: bool,
    path: PathBuf,
    /// The image's locks, taken through a descriptor of their own (each open file description
    /// holds its own locks: the I/O descriptors take none).
    lock: ImageLock,
    /// The default serial number: [`image_serial`] of the image's canonical path.
    serial: String,
}

/// The serial number of the image at `canonical` (its canonical path) when none is given:
/// stable for as long as the image is served under that path (restarts, upgrades, a migration
/// between hosts that mount it alike), and telling the guest nothing of the host. The first
/// 10 bytes of SHA-256 over a vubd prefix and the path, as 20 hex digits: virtio-blk's GET_ID
/// holds 20 bytes.
pub fn image_serial(canonical: &Path) -> String {
    use sha2::{Digest, Sha256};
    use std::fmt::Write;
    let mut h = Sha256::new();
    h.update(b"vubd image serial\0");
    h.update(canonical.as_os_str().as_encoded_bytes());
    h.finalize()[..10]
        .iter()
        .fold(String::with_capacity(20), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

impl FileDevice {
    pub fn open(opts: &FileOptions) -> Result<Self, FileError> {
        let path = &opts.path;
        let open = |direct: bool| {
            let mut o = OpenOptions::new();
            o.read(true).write(!opts.read_only);
            if direct {
                o.custom_flags(libc::O_DIRECT);
            }
            o.open(path)
        };
        let open_err = |source| FileError::Open {
            path: path.clone(),
            source,
        };
        let buffered = open(false).map_err(open_err)?;
        let meta = buffered.metadata().map_err(open_err)?;
        let is_block = meta.file_type().is_block_device();
        if !is_block && !meta.is_file() {
            return Err(FileError::NotFileOrBlockDevice(path.clone()));
        }
        let buffered = Arc::new(buffered);
        let active = if opts.read_only {
            LockSet::READER
        } else {
            LockSet::WRITER
        };
        // Locks go through a descriptor of their own, never used for I/O: io_uring keeps the
        // files it works on open after a process is killed (its teardown is deferred), which
        // would keep a killed vubd's locks past its death and refuse the vubd restarted in
        // its place. This one is closed with the process.
        let lock_file = OpenOptions::new().read(true).open(path).map_err(open_err)?;
        let lock = ImageLock::take(Arc::new(lock_file), path, active, opts.inactive)
            .map_err(FileError::Lock)?;
        let serial = image_serial(&std::fs::canonicalize(path).map_err(open_err)?);
        let size = (&*buffered)
            .seek(SeekFrom::End(0))
            .map_err(|source| FileError::Size {
                path: path.clone(),
                source,
            })?;

        let (logical, physical) = if is_block {
            block_sizes(&buffered).map_err(|source| FileError::Size {
                path: path.clone(),
                source,
            })?
        } else {
            (SECTOR_SIZE as u32, 0)
        };
        if size == 0 {
            return Err(FileError::Empty(path.clone()));
        }
        if size % u64::from(logical) != 0 {
            return Err(FileError::UnalignedSize {
                path: path.clone(),
                size,
                block: logical,
            });
        }

        let direct = match opts.cache {
            CacheMode::Writeback => None,
            CacheMode::None => match open(true) {
                Ok(f) => Some(f),
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    warn!(path = %path.display(), "file system has no O_DIRECT; using the host page cache");
                    None
                }
                Err(e) => return Err(open_err(e)),
            },
        };
        let direct_align = direct_alignment(&buffered, logical);
        let physical = physical.max(direct_align.offset).max(logical);

        let (punch, zero) = if opts.read_only {
            (false, ZeroStrategy::Unsupported)
        } else if is_block {
            // On a block device, PUNCH_HOLE is a zero-out that may unmap but never falls
            // back to writing zeros: it needs the device's write-zeroes support. ZERO_RANGE
            // always works (the kernel writes zeros where the device cannot).
            (
                block_write_zeroes_supported(&buffered),
                ZeroStrategy::ZeroRange,
            )
        } else {
            probe_fallocate(path)
        };
        // Discard is carried out by punching: offered only where that works.
        let discard = punch;
        let info = DeviceInfo {
            capacity_bytes: size,
            logical_block_size: logical,
            physical_block_size: physical,
            read_only: opts.read_only,
            discard,
            write_zeroes: zero != ZeroStrategy::Unsupported,
            write_zeroes_unmaps: zero != ZeroStrategy::Unsupported,
        };
        info!(
            path = %path.display(),
            size,
            direct = direct.is_some(),
            discard,
            write_zeroes = ?zero,
            locks = %lock.held(),
            "opened disk"
        );
        (&*buffered).seek(SeekFrom::Start(0)).map_err(open_err)?;
        Ok(Self {
            direct: direct.map(Arc::new),
            buffered,
            direct_align,
            zero,
            punch,
            info,
            capacity: Capacity::new(size),
            is_block,
            path: path.clone(),
            lock,
            serial,
        })
    }

    /// Changes the capacity (see [`Resize`]): an image file is set to the size asked for
    /// (holding the image's resize permission meanwhile), or its capacity follows the size it
    /// has now; a block device's follows its size. Returns the new capacity in bytes.
    pub fn resize(&self, req: Resize) -> Result<u64, ResizeError> {
        let io_err = |source| ResizeError::Io {
            path: self.path.clone(),
            source,
        };
        let block = self.info.logical_block_size;
        let now = if self.is_block {
            (&*self.buffered).seek(SeekFrom::End(0)).map_err(io_err)?
        } else {
            self.buffered.metadata().map_err(io_err)?.len()
        };
        let to = match req.size {
            Some(s) if self.is_block && s != now => return Err(ResizeError::BlockDevice),
            Some(s) => s,
            None => now,
        };
        self.capacity.check(to, block, req.shrink)?;
        if to != now {
            if self.info.read_only {
                return Err(ResizeError::ReadOnly);
            }
            self.lock
                .resizing(|| self.buffered.set_len(to))?
                .map_err(io_err)?;
        }
        self.capacity.set(to);
        info!(path = %self.path.display(), size = to, "disk resized");
        Ok(to)
    }

    /// The serial number the guest sees unless one is given ([`image_serial`]).
    pub fn serial(&self) -> &str {
        &self.serial
    }

    /// Takes the write permission of the image (QEMU's lock bytes 101, 201 and 203) from an
    /// inactive start or after [`FileDevice::release_write`]. Fails, naming the image and the
    /// conflicting permission, while another process holds the image for writing or refuses
    /// our write, and then changes nothing. Idempotent; nothing for a read-only image.
    pub fn acquire_write(&self) -> Result<(), LockError> {
        self.lock.acquire_write()
    }

    /// Gives the write permission up: the image stays locked for consistent reads only and
    /// shares everything, as an inactive image, so another process can take it. Idempotent;
    /// nothing for a read-only image.
    pub fn release_write(&self) -> Result<(), LockError> {
        self.lock.release_write()
    }

    /// What the device holds on its image now.
    pub fn locks(&self) -> LockSet {
        self.lock.held()
    }
}

impl BlockDevice for FileDevice {
    type Channel = UringChannel;

    fn info(&self) -> DeviceInfo {
        DeviceInfo {
            capacity_bytes: self.capacity.bytes(),
            ..self.info
        }
    }

    fn open_channel(&self, depth: u32) -> io::Result<UringChannel> {
        UringChannel::new(
            depth,
            self.direct.clone(),
            self.buffered.clone(),
            self.direct_align,
            self.zero,
            self.punch,
        )
    }
}

/// Logical and physical block size of a block device.
fn block_sizes(f: &File) -> io::Result<(u32, u32)> {
    let mut logical: libc::c_int = 0;
    let mut physical: libc::c_uint = 0;
    // SAFETY: BLKSSZGET writes one int and BLKPBSZGET one unsigned int through the pointer,
    // both of which point to live locals of those types; the fd is open for the whole call.
    let rc = unsafe { libc::ioctl(f.as_raw_fd(), libc::BLKSSZGET, &mut logical) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    let rc = unsafe { libc::ioctl(f.as_raw_fd(), libc::BLKPBSZGET, &mut physical) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    let logical = u32::try_from(logical).unwrap_or(512).max(512);
    Ok((logical, physical))
}

/// O_DIRECT alignment of the file, defaulting to the logical block size where the kernel does
/// not report it.
fn direct_alignment(f: &File, logical: u32) -> DirectAlign {
    // SAFETY: statx is plain old data; all-zero is a valid value.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: the path is the empty C string with AT_EMPTY_PATH, so statx describes the open fd;
    // `stx` is a live, writable statx buffer.
    let rc = unsafe {
        libc::statx(
            f.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut stx,
        )
    };
    if rc == 0 && stx.stx_mask & libc::STATX_DIOALIGN != 0 && stx.stx_dio_offset_align != 0 {
        DirectAlign {
            mem: stx.stx_dio_mem_align.max(1),
            offset: stx.stx_dio_offset_align,
        }
    } else {
        DirectAlign {
            mem: logical,
            offset: logical,
        }
    }
}

/// Whether a block device zeroes ranges natively (`queue/write_zeroes_max_bytes` in sysfs),
/// which hole punching on it requires.
fn block_write_zeroes_supported(f: &File) -> bool {
    let Ok(meta) = f.metadata() else {
        return false;
    };
    use std::os::unix::fs::MetadataExt;
    let rdev = meta.rdev();
    let dev = format!("/sys/dev/block/{}:{}", libc::major(rdev), libc::minor(rdev));
    // A partition has no queue directory of its own: its disk's applies.
    [format!("{dev}/queue"), format!("{dev}/../queue")]
        .iter()
        .find_map(|q| std::fs::read_to_string(format!("{q}/write_zeroes_max_bytes")).ok())
        .and_then(|s| s.trim().parse::<u64>().ok())
        .is_some_and(|n| n > 0)
}

/// Probes, on an unnamed temporary file in the image's directory (same file system, no user
/// data touched), which fallocate modes work.
fn probe_fallocate(image: &Path) -> (bool, ZeroStrategy) {
    let dir = image
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let probe = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_TMPFILE)
        .open(dir);
    let Ok(probe) = probe else {
        // No O_TMPFILE here: offer both and let a failing request report an I/O error.
        return (true, ZeroStrategy::ZeroRange);
    };
    let fd = probe.as_raw_fd();
    let try_mode = |mode: libc::c_int| {
        // SAFETY: fallocate on an fd we own, with plain integer arguments.
        unsafe { libc::fallocate(fd, mode, 0, 4096) == 0 }
    };
    let punch = try_mode(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE);
    let zero = try_mode(libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE);
    let alloc = try_mode(libc::FALLOC_FL_KEEP_SIZE);
    let strategy = match (zero, punch, alloc) {
        (true, _, _) => ZeroStrategy::ZeroRange,
        (false, true, true) => ZeroStrategy::PunchThenAllocate,
        _ => ZeroStrategy::Unsupported,
    };
    (punch, strategy)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bdev::Disk;
    use std::io::Write;

    fn image(len: u64) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("disk.img");
        let f = File::create(&path).expect("create");
        f.set_len(len).expect("set_len");
        (dir, path)
    }

    fn opts(path: &Path) -> FileOptions {
        FileOptions {
            path: path.to_owned(),
            read_only: false,
            cache: CacheMode::None,
            inactive: false,
        }
    }

    #[test]
    fn an_image_is_resized_to_a_size_or_follows_its_own_and_shrinks_only_when_asked() {
        let (_dir, path) = image(1 << 20);
        let dev = FileDevice::open(&opts(&path)).expect("open");
        let grow = Resize {
            size: Some(4 << 20),
            shrink: false,
        };
        assert_eq!(dev.resize(grow).expect("grow"), 4 << 20);
        assert_eq!(std::fs::metadata(&path).expect("stat").len(), 4 << 20);
        assert_eq!(dev.info().capacity_bytes, 4 << 20);
        // The lock byte of resize is given back: another process may refuse resize again.
        assert!(!dev.locks().held.contains(super::super::lock::Perms::RESIZE));
        // Grown by someone else: the capacity follows without a size.
        File::options()
            .write(true)
            .open(&path)
            .and_then(|f| f.set_len(6 << 20))
            .expect("grow from outside");
        assert_eq!(dev.resize(Resize::default()).expect("follow"), 6 << 20);
        let shrink = Resize {
            size: Some(2 << 20),
            shrink: false,
        };
        assert!(matches!(
            dev.resize(shrink),
            Err(ResizeError::Shrink { .. })
        ));
        assert_eq!(
            std::fs::metadata(&path).expect("stat").len(),
            6 << 20,
            "unchanged"
        );
        let forced = Resize {
            size: Some(2 << 20),
            shrink: true,
        };
        assert_eq!(dev.resize(forced).expect("forced"), 2 << 20);
        let odd = Resize {
            size: Some((2 << 20) + 100),
            shrink: false,
        };
        assert!(matches!(
            dev.resize(odd),
            Err(ResizeError::Unaligned { .. })
        ));
        assert_eq!(dev.info().capacity_bytes, 2 << 20);
    }

    #[test]
    fn a_read_only_image_is_not_resized_and_another_holder_can_refuse_it() {
        let (_dir, path) = image(1 << 20);
        let ro = FileDevice::open(&FileOptions {
            read_only: true,
            ..opts(&path)
        })
        .expect("open read-only");
        let grow = Resize {
            size: Some(2 << 20),
            shrink: false,
        };
        assert!(matches!(ro.resize(grow), Err(ResizeError::ReadOnly)));
        let (_dir2, path2) = image(1 << 20);
        let writer = FileDevice::open(&opts(&path2)).expect("open");
        let other = std::fs::OpenOptions::new()
            .read(true)
            .open(&path2)
            .map(Arc::new)
            .expect("open again");
        // Another open file description (another process's) refuses resize: QEMU's lock
        // byte 203.
        let refuses_resize = LockSet {
            held: super::super::lock::Perms::CONSISTENT_READ,
            refused: super::super::lock::Perms::RESIZE,
        };
        let _other = ImageLock::take(other, &path2, refuses_resize, false).expect("lock");
        assert!(matches!(writer.resize(grow), Err(ResizeError::Lock(_))));
        assert_eq!(std::fs::metadata(&path2).expect("stat").len(), 1 << 20);
    }

    #[test]
    fn the_default_serial_is_a_hash_of_the_canonical_path_and_shows_nothing_of_it() {
        let (dir, path) = image(1 << 20);
        let serial = FileDevice::open(&opts(&path))
            .expect("open")
            .serial()
            .to_owned();
        let serial = serial.as_str();
        assert_eq!(serial.len(), 20);
        assert!(serial.bytes().all(|b| b.is_ascii_hexdigit()), "{serial}");
        assert!(!serial.contains("disk"), "{serial}");
        // Stable: the same image by another spelling of its path, opened again.
        let other = dir.path().join(".").join("disk.img");
        assert_eq!(
            FileDevice::open(&opts(&other)).expect("open").serial(),
            serial
        );
        assert_eq!(
            image_serial(&path.canonicalize().expect("canonical")),
            serial
        );
        // Pinned: a guest's /dev/disk/by-id names depend on it across vubd versions.
        assert_eq!(
            image_serial(Path::new("/var/lib/vubd/disk0.img")),
            "4cf0273a26d31940d1d3"
        );
        let (_d2, second) = image(1 << 20);
        assert_ne!(
            FileDevice::open(&opts(&second)).expect("open").serial(),
            serial
        );
    }

    #[test]
    fn regular_file_geometry() {
        let (_d, path) = image(1 << 20);
        let dev = FileDevice::open(&opts(&path)).expect("open");
        let info = dev.info();
        assert_eq!(info.capacity_bytes, 1 << 20);
        assert_eq!(info.logical_block_size, 512);
        assert!(!info.read_only);
    }

    #[test]
    fn size_not_multiple_of_sector_is_refused() {
        let (_d, path) = image(0);
        let mut f = OpenOptions::new().append(true).open(&path).expect("open");
        f.write_all(&[0u8; 1000]).expect("write");
        let err = FileDevice::open(&opts(&path)).unwrap_err();
        assert!(
            matches!(err, FileError::UnalignedSize { size: 1000, .. }),
            "{err}"
        );
    }

    #[test]
    fn missing_file_is_an_open_error_naming_the_path() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("nope.img");
        let err = FileDevice::open(&opts(&path)).unwrap_err();
        assert!(err.to_string().contains("nope.img"), "{err}");
    }

    #[test]
    fn directory_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = FileDevice::open(&FileOptions {
            read_only: true,
            ..opts(dir.path())
        })
        .unwrap_err();
        assert!(matches!(err, FileError::NotFileOrBlockDevice(_)), "{err}");
    }

    /// Runs one operation to completion on `ch` (bounded) and returns its result.
    fn run_op(ch: &mut super::super::uring::UringChannel, op: super::super::IoOp<'_>) -> i32 {
        use super::super::IoChannel;
        // SAFETY: the caller keeps the iovecs and the memory they point to alive until this
        // function has reaped the completion.
        unsafe { ch.queue(1, op) }.expect("room");
        ch.submit().expect("submit");
        for _ in 0..5000 {
            let mut res = None;
            ch.poll(1, |_, r| res = Some(r));
            if let Some(r) = res {
                return r;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        panic!("no completion within 5 s");
    }

    #[test]
    fn misaligned_guest_buffers_bypass_o_direct_instead_of_failing() {
        use crate::mem::{GuestMemory, IovecList};
        use vm_memory::{Bytes, GuestAddress};
        // A directory on the build's file system: /tmp may be a tmpfs without O_DIRECT.
        let base = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target");
        std::fs::create_dir_all(&base).expect("target dir");
        let dir = tempfile::tempdir_in(&base).expect("tempdir");
        let path = dir.path().join("disk.img");
        let content: Vec<u8> = (0u32..64 * 1024).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(&path, &content).expect("write image");
        let dev = FileDevice::open(&opts(&path)).expect("open");
        assert!(
            dev.direct.is_some(),
            "the build directory's file system has no O_DIRECT: this test would prove nothing"
        );
        let mut ch = dev.open_channel(4).expect("channel");
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 0x10000)]).expect("mem");

        // Read 4 KiB into a buffer 1 byte past a page boundary.
        let mut iov = IovecList::with_capacity(1);
        iov.push_guest(&mem, GuestAddress(0x1001), 4096)
            .expect("iov");
        let r = run_op(
            &mut ch,
            super::super::IoOp::Read {
                offset: 4096,
                iov: &iov,
            },
        );
        assert_eq!(
            r,
            4096,
            "misaligned read: {}",
            std::io::Error::from_raw_os_error(-r.min(0))
        );
        let mut back = vec![0u8; 4096];
        mem.read_slice(&mut back, GuestAddress(0x1001))
            .expect("read back");
        assert_eq!(back, content[4096..8192]);

        // Write 4 KiB from a buffer 3 bytes past a page boundary, durably.
        let data: Vec<u8> = (0u32..4096).map(|i| (i % 13) as u8).collect();
        mem.write_slice(&data, GuestAddress(0x3003)).expect("fill");
        let mut iov = IovecList::with_capacity(1);
        iov.push_guest(&mem, GuestAddress(0x3003), 4096)
            .expect("iov");
        let op = super::super::IoOp::Write {
            offset: 8192,
            iov: &iov,
            fua: true,
        };
        assert_eq!(run_op(&mut ch, op), 4096, "misaligned write");
        assert_eq!(std::fs::read(&path).expect("image")[8192..12288], data[..]);

        // An aligned buffer goes through O_DIRECT and works too.
        let mut iov = IovecList::with_capacity(1);
        iov.push_guest(&mem, GuestAddress(0x8000), 4096)
            .expect("iov");
        let r = run_op(
            &mut ch,
            super::super::IoOp::Read {
                offset: 0,
                iov: &iov,
            },
        );
        assert_eq!(r, 4096, "aligned read");
    }

    #[test]
    fn read_only_device_offers_no_discard_or_write_zeroes() {
        let (_d, path) = image(1 << 20);
        let dev = FileDevice::open(&FileOptions {
            read_only: true,
            ..opts(&path)
        })
        .expect("open");
        assert!(dev.info().read_only);
        assert!(!dev.info().discard);
        assert!(!dev.info().write_zeroes);
    }

    #[test]
    fn a_second_writable_open_of_an_image_is_refused_naming_it() {
        // Both descriptors of the first (O_DIRECT and buffered) are open: only one of them
        // locks, or the first open would already conflict with itself.
        let (_d, path) = image(1 << 20);
        let first = FileDevice::open(&opts(&path)).expect("first");
        assert_eq!(first.locks(), LockSet::WRITER);
        let err = FileDevice::open(&opts(&path)).unwrap_err();
        assert!(
            matches!(err, FileError::Lock(LockError::InUse { .. })),
            "{err}"
        );
        assert!(err.to_string().contains(&*path.to_string_lossy()), "{err}");
        let reader = FileDevice::open(&FileOptions {
            read_only: true,
            ..opts(&path)
        });
        assert!(reader.is_err(), "a reader refuses the writer's writes");
    }

    #[test]
    fn an_inactive_device_opens_beside_a_writer_and_takes_write_over_after_release() {
        let (_d, path) = image(1 << 20);
        let serving = FileDevice::open(&opts(&path)).expect("serving");
        let incoming = Disk::File(
            FileDevice::open(&FileOptions {
                inactive: true,
                ..opts(&path)
            })
            .expect("incoming"),
        );
        let Disk::File(dev) = &incoming else {
            unreachable!()
        };
        assert_eq!(dev.locks(), LockSet::INACTIVE);
        assert!(incoming.acquire_write().is_err(), "still served");
        assert_eq!(dev.locks(), LockSet::INACTIVE);
        serving.release_write().expect("release");
        incoming.acquire_write().expect("take over");
        assert_eq!(dev.locks(), LockSet::WRITER);
    }
}
