//! Guest memory faults, survived. Everything a frontend shares with vubd (guest memory
//! regions, the inflight region, the dirty log) is a mapping of a file the frontend keeps,
//! and the frontend can make that file shorter at any time: `ftruncate` needs no seal, and
//! seals cannot be required (libblkio's memfds and QEMU's memory-backend-file have none). A
//! load or store of vubd in a page past the file's new end raises SIGBUS, whose default action
//! ends the process and every device it serves.
//!
//! [`install`] puts a SIGBUS handler in place once, at startup. Every such mapping is entered
//! in a fixed table of atomics ([`register`]) with the device session that owns it
//! ([`DeviceFaults`]). A fault inside a registered mapping is survived: the handler maps a
//! private anonymous page over the faulting page (the access restarts and succeeds, on
//! zeros), marks the session failed and wakes it through its eventfd; the session then closes
//! its connection, and its pollers take nothing more from its queues. A fault anywhere else
//! goes to the handler that was there before (Rust's stack overflow check, then the default
//! action): a real bug still ends the process with a core.
//!
//! The handler allocates nothing and takes no lock: it scans the table, validating each entry
//! with the entry's sequence number (a seqlock: odd while the entry is being written), calls
//! `mmap` and `write`, and stores atomics.
//!
//! An entry never outlives its mapping: it is removed before the mapping is unmapped, never
//! after. [`crate::mem::SharedMapping`] drops its registration before its map, and
//! [`GuestRegions`] keeps a reference to every guest memory mapping it registered and drops it
//! only once nothing else holds it, after removing its entry. An address in the table is
//! therefore always the registered mapping's own, never one that another mapping got since;
//! and a registration that overlaps an entry (which only a mapping unmapped while still
//! registered could leave) is refused.

mod regions;
#[cfg(test)]
mod tests;

pub use regions::GuestRegions;

use std::ffi::c_void;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{
    AtomicBool, AtomicI32, AtomicPtr, AtomicU8, AtomicU64, AtomicUsize, Ordering, fence,
};
use std::sync::{Arc, Once, OnceLock};

use thiserror::Error;
use vmm_sys_util::eventfd::{EFD_CLOEXEC, EFD_NONBLOCK, EventFd};

/// Entries of the table: every device session's guest memory regions (at most 509 each, the
/// slots vhost-user-backend advertises, plus regions that left its table but are still in
/// use), its inflight region and its dirty log.
pub const CAPACITY: usize = 16384;

/// Most entries one device session may hold, so that one frontend cannot fill the table for
/// the others: 509 memory slots, as many retired regions still in use, and a few more.
pub const PER_DEVICE: usize = 1024;

// The handler reads 64-bit atomics; they must be lock-free.
const _: () = assert!(cfg!(target_has_atomic = "64"));

/// What a registered mapping holds, for the log line that reports a fault in it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mapped {
    /// A guest memory region starting at guest physical address `gpa`.
    Guest { gpa: u64 },
    /// The inflight I/O tracking region.
    Inflight,
    /// The dirty page log of a live migration.
    DirtyLog,
}

impl Mapped {
    fn encode(self) -> (u8, u64) {
        match self {
            Self::Guest { gpa } => (0, gpa),
            Self::Inflight => (1, 0),
            Self::DirtyLog => (2, 0),
        }
    }

    fn decode(kind: u8, gpa: u64) -> Self {
        match kind {
            0 => Self::Guest { gpa },
            1 => Self::Inflight,
            _ => Self::DirtyLog,
        }
    }
}

/// The first fault a device session survived: where, in which mapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fault {
    pub mapped: Mapped,
    /// Bytes of the mapping.
    pub len: u64,
    /// Offset of the faulting byte in the mapping.
    pub offset: u64,
}

impl std::fmt::Display for Fault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (off, len) = (self.offset, self.len);
        match self.mapped {
            Mapped::Guest { gpa } => write!(
                f,
                "guest address {:#x}, in the region at {gpa:#x} ({len} bytes)",
                gpa.wrapping_add(off)
            ),
            Mapped::Inflight => write!(f, "byte {off} of the inflight region ({len} bytes)"),
            Mapped::DirtyLog => write!(f, "byte {off} of the dirty log ({len} bytes)"),
        }
    }
}

/// Why a mapping could not be registered.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum FaultError {
    #[error("a mapping of {len} bytes at {start:#x} is empty or not aligned to its pages")]
    Shape { start: usize, len: usize },
    #[error("the device holds {PER_DEVICE} shared memory mappings already")]
    Quota,
    #[error("the table of shared memory mappings is full ({0} entries)")]
    Full(usize),
    #[error("{len} bytes at {start:#x} overlap a registered mapping at {other:#x}")]
    Overlap {
        start: usize,
        len: usize,
        other: usize,
    },
}

/// The faults of one device session: set by the SIGBUS handler, read by the session and its
/// pollers. Lives as long as any registration of the session (each holds an `Arc`), so the
/// handler never writes to a freed record or a closed eventfd.
#[derive(Debug)]
pub struct DeviceFaults {
    /// A fault was survived: the session's memory is not what the guest sees any more.
    failed: AtomicBool,
    /// The first fault's details are being written (only one handler writes them).
    claimed: AtomicBool,
    /// The first fault's details are written.
    recorded: AtomicBool,
    kind: AtomicU8,
    gpa: AtomicU64,
    len: AtomicU64,
    offset: AtomicU64,
    /// Entries held in the table.
    registered: AtomicUsize,
    /// Written by the handler (`write` is async-signal-safe); the session watches it.
    event: EventFd,
}

impl DeviceFaults {
    pub fn new() -> io::Result<Self> {
        Ok(Self {
            failed: AtomicBool::new(false),
            claimed: AtomicBool::new(false),
            recorded: AtomicBool::new(false),
            kind: AtomicU8::new(0),
            gpa: AtomicU64::new(0),
            len: AtomicU64::new(0),
            offset: AtomicU64::new(0),
            registered: AtomicUsize::new(0),
            event: EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC)?,
        })
    }

    /// A fault was survived in one of the session's mappings: one relaxed load, for the
    /// pollers (the handler's stores are seen at most one pass later).
    #[inline]
    pub fn failed(&self) -> bool {
        self.failed.load(Ordering::Relaxed)
    }

    /// The first fault, once the handler has recorded it.
    pub fn first(&self) -> Option<Fault> {
        if !self.recorded.load(Ordering::Acquire) {
            return None;
        }
        Some(Fault {
            mapped: Mapped::decode(
                self.kind.load(Ordering::Relaxed),
                self.gpa.load(Ordering::Relaxed),
            ),
            len: self.len.load(Ordering::Relaxed),
            offset: self.offset.load(Ordering::Relaxed),
        })
    }

    /// Readable once a fault was survived.
    pub fn event_fd(&self) -> RawFd {
        self.event.as_raw_fd()
    }

    /// Reads the eventfd (non-blocking), so that it is not readable until the next fault.
    pub fn clear_event(&self) {
        let _ = self.event.read();
    }

    /// Entries the session holds in the table.
    pub fn registered(&self) -> usize {
        self.registered.load(Ordering::Relaxed)
    }

    /// Records a fault at `offset` of `entry`'s mapping (from the signal handler: atomics and
    /// `write` only).
    fn record(&self, entry: &Found, offset: u64) {
        if !self.claimed.swap(true, Ordering::Relaxed) {
            let (kind, gpa) = entry.mapped.encode();
            self.kind.store(kind, Ordering::Relaxed);
            self.gpa.store(gpa, Ordering::Relaxed);
            self.len.store(entry.len as u64, Ordering::Relaxed);
            self.offset.store(offset, Ordering::Relaxed);
            self.recorded.store(true, Ordering::Release);
        }
        self.failed.store(true, Ordering::Release);
        let one = 1u64;
        // SAFETY: writes 8 bytes from a live local to the eventfd this record owns (open while
        // the record lives, and an entry keeps its record alive). `write` is async-signal-safe;
        // a full counter (never reached: 2^64 - 2 faults) would only fail with EAGAIN.
        unsafe { libc::write(self.event.as_raw_fd(), (&raw const one).cast(), 8) };
    }
}

/// One entry of the table. `seq` is even while the entry is stable and odd while its owner
/// writes it; `len == 0` when it is free.
#[derive(Debug)]
struct Entry {
    seq: AtomicU64,
    start: AtomicUsize,
    len: AtomicUsize,
    /// Size of the mapping's pages: what the handler replaces at once (a huge page for
    /// hugetlbfs, whose mappings cannot be split anywhere else).
    page: AtomicUsize,
    kind: AtomicU8,
    gpa: AtomicU64,
    owner: AtomicPtr<DeviceFaults>,
}

impl Entry {
    const fn free() -> Self {
        Self {
            seq: AtomicU64::new(0),
            start: AtomicUsize::new(0),
            len: AtomicUsize::new(0),
            page: AtomicUsize::new(0),
            kind: AtomicU8::new(0),
            gpa: AtomicU64::new(0),
            owner: AtomicPtr::new(std::ptr::null_mut()),
        }
    }

    /// The entry's fields, if they were stable while read and it is in use.
    fn read(&self) -> Option<Found> {
        let s1 = self.seq.load(Ordering::Acquire);
        if s1 & 1 != 0 {
            return None;
        }
        let len = self.len.load(Ordering::Relaxed);
        if len == 0 {
            return None;
        }
        let found = Found {
            start: self.start.load(Ordering::Relaxed),
            len,
            page: self.page.load(Ordering::Relaxed),
            mapped: Mapped::decode(
                self.kind.load(Ordering::Relaxed),
                self.gpa.load(Ordering::Relaxed),
            ),
            owner: self.owner.load(Ordering::Relaxed),
        };
        fence(Ordering::Acquire);
        (self.seq.load(Ordering::Relaxed) == s1).then_some(found)
    }
}

/// A table entry as read.
#[derive(Clone, Copy, Debug)]
struct Found {
    start: usize,
    len: usize,
    page: usize,
    mapped: Mapped,
    owner: *mut DeviceFaults,
}

impl Found {
    fn contains(&self, addr: usize) -> bool {
        addr.wrapping_sub(self.start) < self.len
    }

    fn overlaps(&self, start: usize, len: usize) -> bool {
        start < self.start.saturating_add(self.len) && self.start < start.saturating_add(len)
    }
}

/// The process's table.
static TABLE: [Entry; CAPACITY] = [const { Entry::free() }; CAPACITY];

/// Enters `len` bytes at `start` (a mapping of `page`-byte pages, `start` aligned to them) in
/// `table` for `owner`.
fn insert(
    table: &'static [Entry],
    (start, len, page): (usize, usize, usize),
    mapped: Mapped,
    owner: &Arc<DeviceFaults>,
) -> Result<Registration, FaultError> {
    if len == 0 || !page.is_power_of_two() || start % page != 0 || start.checked_add(len).is_none()
    {
        return Err(FaultError::Shape { start, len });
    }
    if owner.registered.fetch_add(1, Ordering::Relaxed) >= PER_DEVICE {
        owner.registered.fetch_sub(1, Ordering::Relaxed);
        return Err(FaultError::Quota);
    }
    // A failure below gives the quota back with the guard.
    let mut guard = Registration {
        table,
        index: usize::MAX,
        owner: owner.clone(),
    };
    // Live mappings never overlap: an overlapping entry is one whose mapping went without
    // it, and would make a fault in this one be taken for a fault in that one's device.
    if let Some(other) = table
        .iter()
        .filter_map(Entry::read)
        .find(|e| e.overlaps(start, len))
    {
        return Err(FaultError::Overlap {
            start,
            len,
            other: other.start,
        });
    }
    let (kind, gpa) = mapped.encode();
    for (index, e) in table.iter().enumerate() {
        let s = e.seq.load(Ordering::Acquire);
        if s & 1 != 0 || e.len.load(Ordering::Relaxed) != 0 {
            continue;
        }
        // Claimed when the sequence number is still the one read with `len == 0`.
        if e.seq
            .compare_exchange(s, s + 1, Ordering::Relaxed, Ordering::Relaxed)
            .is_err()
        {
            continue;
        }
        fence(Ordering::Release);
        e.start.store(start, Ordering::Relaxed);
        e.page.store(page, Ordering::Relaxed);
        e.kind.store(kind, Ordering::Relaxed);
        e.gpa.store(gpa, Ordering::Relaxed);
        e.owner
            .store(Arc::as_ptr(owner).cast_mut(), Ordering::Relaxed);
        e.len.store(len, Ordering::Relaxed);
        e.seq.store(s + 2, Ordering::Release);
        guard.index = index;
        return Ok(guard);
    }
    Err(FaultError::Full(table.len()))
}

/// The registered mapping holding `addr`, if any.
fn lookup(table: &[Entry], addr: usize) -> Option<Found> {
    table
        .iter()
        .filter_map(Entry::read)
        .find(|e| e.contains(addr))
}

/// A mapping's entry in the table: removed when dropped, which must happen before the mapping
/// is unmapped.
#[derive(Debug)]
pub struct Registration {
    table: &'static [Entry],
    /// `usize::MAX` until the entry is written.
    index: usize,
    owner: Arc<DeviceFaults>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Some(e) = self.table.get(self.index) {
            // Only the registration writes its entry once it is in use.
            let s = e.seq.load(Ordering::Relaxed);
            e.seq.store(s + 1, Ordering::Relaxed);
            fence(Ordering::Release);
            e.len.store(0, Ordering::Relaxed);
            e.start.store(0, Ordering::Relaxed);
            e.owner.store(std::ptr::null_mut(), Ordering::Relaxed);
            e.seq.store(s + 2, Ordering::Release);
        }
        self.owner.registered.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Registers the mapping of `len` bytes at `start`, made of `page`-byte pages (see
/// [`page_size_of`]), for `owner`: a SIGBUS inside it is survived and fails `owner`.
///
/// The returned registration must be dropped before the mapping is unmapped (or replaced).
pub fn register(
    start: *const u8,
    len: usize,
    page: usize,
    mapped: Mapped,
    owner: &Arc<DeviceFaults>,
) -> Result<Registration, FaultError> {
    insert(&TABLE, (start as usize, len, page), mapped, owner)
}

/// The size of the pages a shared mapping of `file` is made of: the huge page size on
/// hugetlbfs, else the base page size.
pub fn page_size_of(file: &File) -> usize {
    // SAFETY: `statfs` is plain data, filled by `fstatfs` on an open descriptor we borrow.
    let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above; the result is checked.
    let ok = unsafe { libc::fstatfs(file.as_raw_fd(), &raw mut fs) } == 0;
    if ok
        && fs.f_type == libc::HUGETLBFS_MAGIC
        && let Ok(size) = usize::try_from(fs.f_bsize)
        && size.is_power_of_two()
    {
        return size;
    }
    base_page()
}

fn base_page() -> usize {
    // SAFETY: sysconf has no memory-safety preconditions.
    usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) })
        .ok()
        .filter(|p| p.is_power_of_two())
        .unwrap_or(4096)
}

/// The action SIGBUS had before [`install`]: faults outside the table go there.
static PREVIOUS: OnceLock<libc::sigaction> = OnceLock::new();
static INSTALL: Once = Once::new();
/// The `errno` of a failed installation (0: installed).
static INSTALL_ERRNO: AtomicI32 = AtomicI32::new(0);

/// Installs the SIGBUS handler (once per process; later calls return the first result).
/// Call it at startup, before the threads that touch guest memory exist.
pub fn install() -> io::Result<()> {
    INSTALL.call_once(|| {
        if let Err(e) = install_once() {
            INSTALL_ERRNO.store(e.raw_os_error().unwrap_or(libc::EINVAL), Ordering::Relaxed);
        }
    });
    match INSTALL_ERRNO.load(Ordering::Relaxed) {
        0 => Ok(()),
        errno => Err(io::Error::from_raw_os_error(errno)),
    }
}

fn install_once() -> io::Result<()> {
    // SAFETY: `sigaction` is plain data; a zeroed one is a valid output buffer.
    let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
    // SAFETY: queries the current action into `old`; no action is changed.
    if unsafe { libc::sigaction(libc::SIGBUS, std::ptr::null(), &raw mut old) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // Set before the handler can run, which reads it.
    let _ = PREVIOUS.set(old);
    // SAFETY: as above.
    let mut new: libc::sigaction = unsafe { std::mem::zeroed() };
    new.sa_sigaction = on_sigbus as extern "C" fn(_, _, _) as libc::sighandler_t;
    // SA_ONSTACK: on the alternate stack where Rust's stack overflow check put one.
    new.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
    // SAFETY: `new.sa_mask` is a valid sigset to initialise; `new` is a complete action whose
    // handler is an `extern "C"` function of the SA_SIGINFO signature.
    unsafe {
        libc::sigemptyset(&raw mut new.sa_mask);
        if libc::sigaction(libc::SIGBUS, &raw const new, std::ptr::null_mut()) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The SIGBUS handler: async-signal-safe (atomics, `mmap`, `write`, `sigaction`).
extern "C" fn on_sigbus(signo: libc::c_int, info: *mut libc::siginfo_t, context: *mut c_void) {
    // SAFETY: the kernel passes a valid siginfo for an SA_SIGINFO handler; `si_addr` is the
    // faulting address for SIGBUS. errno is thread-local and saved for the interrupted code.
    let (code, addr, errno) = unsafe {
        (
            (*info).si_code,
            (*info).si_addr() as usize,
            *libc::__errno_location(),
        )
    };
    let hardware = code == libc::BUS_ADRERR || code == libc::BUS_MCEERR_AR;
    if !(hardware && survive(&TABLE, addr)) {
        // SAFETY: the arguments are the ones the kernel gave this handler.
        unsafe { chain(signo, info, context, code) };
    }
    // SAFETY: restores the interrupted code's errno.
    unsafe { *libc::__errno_location() = errno };
}

/// Survives a fault at `addr` if it lies in a registered mapping: maps a private anonymous
/// page over the faulting page (zeros: the access restarts and succeeds; nothing written there
/// reaches the file, and nothing of the file is read) and records the fault for the mapping's
/// device. False when `addr` is not registered or the page cannot be replaced.
fn survive(table: &[Entry], addr: usize) -> bool {
    let Some(e) = lookup(table, addr) else {
        return false;
    };
    let base = addr & !(e.page - 1);
    // SAFETY: `base..base + page` lies in the registered mapping (its start is page aligned
    // and `addr` inside it; the kernel rounds a mapping up to whole pages), which is alive:
    // an entry is removed before its mapping goes. Replacing those pages changes no Rust
    // object: guest memory is only reached through raw pointers.
    let p = unsafe {
        libc::mmap(
            base as *mut c_void,
            e.page,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_FIXED | libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if p as usize != base {
        return false;
    }
    // SAFETY: the entry holds its owner's `Arc` (through the registration) while it is in the
    // table, and it was read in the table just now; its mapping is being accessed, so it is
    // in use and not being removed.
    let owner = unsafe { &*e.owner };
    owner.record(&e, (addr - e.start) as u64);
    true
}

/// Hands a fault that is not ours to the action SIGBUS had before.
///
/// # Safety
///
/// Only from the signal handler, with the kernel's arguments.
unsafe fn chain(signo: libc::c_int, info: *mut libc::siginfo_t, context: *mut c_void, code: i32) {
    let previous = PREVIOUS.get();
    match previous {
        Some(p) if p.sa_sigaction != libc::SIG_DFL && p.sa_sigaction != libc::SIG_IGN => {
            if p.sa_flags & libc::SA_SIGINFO != 0 {
                // SAFETY: the previous SA_SIGINFO handler, called as the kernel would.
                let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut c_void) =
                    unsafe { std::mem::transmute(p.sa_sigaction) };
                f(signo, info, context);
            } else {
                // SAFETY: the previous plain handler, called as the kernel would.
                let f: extern "C" fn(libc::c_int) = unsafe { std::mem::transmute(p.sa_sigaction) };
                f(signo);
            }
        }
        _ => {
            // The default action: a fault repeats when the access restarts and ends the
            // process with a core; a SIGBUS sent by a process is raised again (blocked until
            // this handler returns).
            // SAFETY: a zeroed action with SIG_DFL is the default disposition.
            unsafe {
                let mut dfl: libc::sigaction = std::mem::zeroed();
                dfl.sa_sigaction = libc::SIG_DFL;
                libc::sigaction(libc::SIGBUS, &raw const dfl, std::ptr::null_mut());
                if code <= 0 {
                    libc::raise(libc::SIGBUS);
                }
            }
        }
    }
}
