//! Image locks compatible with QEMU's `file-posix` driver (`raw_apply_lock_bytes`,
//! `raw_check_lock_bytes` in QEMU's block/file-posix.c), so that vubd, QEMU, qemu-img,
//! qemu-io and qemu-storage-daemon see each other's use of an image.
//!
//! A process marks each permission `i` it holds with a shared (read) open-file-description
//! lock on byte `100 + i` of the image, and each permission it refuses to share with one on
//! byte `200 + i`. The permissions are QEMU's block-layer ones that QEMU 7.2 still locks:
//! bit 0 consistent read, bit 1 write, bit 2 write unchanged, bit 3 resize (bytes 100-103 and
//! 200-203). Whether a lock set can be taken is asked of the kernel with `F_OFD_GETLK` and a
//! write lock on one byte: it reports a conflict only for another open file description's
//! lock. So for each permission we want to hold, a lock on `200 + i` means someone refuses
//! it; for each one we refuse, a lock on `100 + i` means someone holds it.
//!
//! Locks of one open file description never conflict with each other, but two `open`s of the
//! same file in one process do: a device that opens its image twice locks through one
//! descriptor only.
//!
//! QEMU 7.2 itself, for comparison (seen in /proc/locks): a writable virtio-blk disk holds
//! consistent read and write and refuses write only (it can follow a resize); a read-only
//! one holds consistent read and refuses write; an image of an incoming migration holds
//! nothing until the migration completes.

use std::fmt;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use thiserror::Error;
use tracing::{info, warn};

/// First byte of the "holds permission `i`" locks (QEMU's `RAW_LOCK_PERM_BASE`).
pub const PERM_BASE: u64 = 100;
/// First byte of the "refuses to share permission `i`" locks (`RAW_LOCK_SHARED_BASE`).
pub const SHARED_BASE: u64 = 200;
/// How many permissions are locked: bytes 100-103 and 200-203.
pub const PERM_COUNT: u32 = 4;

/// A set of QEMU block-layer permissions (`BLK_PERM_*`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Perms(u8);

impl Perms {
    pub const NONE: Perms = Perms(0);
    /// Reads return data that is consistent with what was written before.
    pub const CONSISTENT_READ: Perms = Perms(1 << 0);
    pub const WRITE: Perms = Perms(1 << 1);
    /// Writes that do not change what reads return.
    pub const WRITE_UNCHANGED: Perms = Perms(1 << 2);
    pub const RESIZE: Perms = Perms(1 << 3);
    pub const ALL: Perms = Perms((1 << PERM_COUNT) - 1);

    pub const fn union(self, other: Perms) -> Perms {
        Perms(self.0 | other.0)
    }

    pub const fn contains(self, other: Perms) -> bool {
        self.0 & other.0 == other.0
    }

    /// The single permissions of the set, lowest bit first, with their bit numbers.
    fn each(self) -> impl Iterator<Item = (u32, Perms)> {
        (0..PERM_COUNT)
            .map(|i| (i, Perms(1 << i)))
            .filter(move |&(_, p)| self.contains(p))
    }

    /// QEMU's name of permission bit `i` (`bdrv_perm_names`), as its messages quote it.
    fn bit_name(i: u32) -> &'static str {
        ["consistent read", "write", "write unchanged", "resize"][i as usize]
    }
}

/// The names QEMU gives the permissions, separated by commas (`none` for the empty set).
impl fmt::Display for Perms {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if *self == Perms::NONE {
            return f.write_str("none");
        }
        for (n, (i, _)) in self.each().enumerate() {
            if n > 0 {
                f.write_str(", ")?;
            }
            f.write_str(Perms::bit_name(i))?;
        }
        Ok(())
    }
}

/// What a process holds on an image and what it refuses to share with others.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LockSet {
    pub held: Perms,
    pub refused: Perms,
}

impl LockSet {
    /// No lock at all.
    pub const NONE: LockSet = LockSet {
        held: Perms::NONE,
        refused: Perms::NONE,
    };
    /// A writable disk: reads and writes, and lets nobody else write or resize the image
    /// (vubd fixes the capacity at startup, so unlike QEMU it refuses resize too).
    pub const WRITER: LockSet = LockSet {
        held: Perms::CONSISTENT_READ.union(Perms::WRITE),
        refused: Perms::WRITE.union(Perms::RESIZE),
    };
    /// A read-only disk: the data it serves must not change under it.
    pub const READER: LockSet = LockSet {
        held: Perms::CONSISTENT_READ,
        refused: Perms::WRITE.union(Perms::RESIZE),
    };
    /// A writable disk that does not serve yet (a migration's destination, the new process
    /// of an upgrade) or no longer serves: it refuses nothing, so the serving process keeps
    /// or takes the write permission. QEMU's inactive images hold no byte at all; this one
    /// keeps consistent read, which shows the image in use and keeps anyone from refusing
    /// consistent reads to the process about to take it over.
    pub const INACTIVE: LockSet = LockSet {
        held: Perms::CONSISTENT_READ,
        refused: Perms::NONE,
    };

    const fn union(self, other: LockSet) -> LockSet {
        LockSet {
            held: self.held.union(other.held),
            refused: self.refused.union(other.refused),
        }
    }

    /// The lock bytes of this set, in increasing order.
    fn bytes(self) -> impl Iterator<Item = u64> {
        let held = self.held.each().map(|(i, _)| PERM_BASE + u64::from(i));
        let refused = self.refused.each().map(|(i, _)| SHARED_BASE + u64::from(i));
        held.chain(refused)
    }

    fn has_byte(self, byte: u64) -> bool {
        self.bytes().any(|b| b == byte)
    }

    /// Whether going from `self` to `to` only drops locks (which cannot meet a conflict).
    fn only_drops_to(self, to: LockSet) -> bool {
        self.held.contains(to.held) && self.refused.contains(to.refused)
    }
}

/// `holds consistent read, write; refuses write, resize`.
impl fmt::Display for LockSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "holds {}; refuses {}", self.held, self.refused)
    }
}

/// Another process's lock that stands in the way of a lock set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Conflict {
    /// It holds a permission we refuse to share.
    Holds(Perms),
    /// It refuses to share a permission we want to hold.
    Refuses(Perms),
}

impl fmt::Display for Conflict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Conflict::Holds(p) => write!(f, "it holds the \"{p}\" permission"),
            Conflict::Refuses(p) => write!(f, "it does not share the \"{p}\" permission"),
        }
    }
}

/// What to tell the user about a conflict, by where it was met.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hint {
    /// A writable device at startup: the other process serves the image.
    StartWriter,
    /// A read-only device at startup.
    StartReader,
    /// Taking the write permission over from another process.
    Takeover,
    /// Taking the resize permission for a moment, to change the image's size.
    Resize,
}

impl fmt::Display for Hint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Hint::StartWriter => {
                "stop it, or start vubd with --incoming to take the image over when the \
                 frontend starts the device"
            }
            Hint::StartReader => "stop it first: a read-only disk must not change under its guest",
            Hint::Takeover => "it must release the image (stop its device) first",
            Hint::Resize => "it must let the image be resized, or close it, first",
        })
    }
}

/// Why an image could not be locked as asked.
#[derive(Debug, Error)]
pub enum LockError {
    #[error("image {path} is in use by another process ({conflict}); {hint}")]
    InUse {
        path: PathBuf,
        conflict: Conflict,
        hint: Hint,
    },
    #[error("cannot read the locks of image {path}")]
    Probe {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot lock byte {byte} of image {path}")]
    Lock {
        path: PathBuf,
        byte: u64,
        #[source]
        source: io::Error,
    },
}

/// One `fcntl` open-file-description lock request of `kind` (`F_RDLCK`, `F_WRLCK`,
/// `F_UNLCK`) on byte `byte`; returns the `flock` as the kernel left it.
fn ofd_lock(
    fd: BorrowedFd<'_>,
    cmd: libc::c_int,
    kind: libc::c_int,
    byte: u64,
) -> io::Result<libc::flock> {
    let start =
        libc::off_t::try_from(byte).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: `flock` is plain old data; all-zero is a valid value (and OFD locks require
    // l_pid to be 0).
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    // The lock types and SEEK_SET are small constants that fit the short fields.
    fl.l_type = kind as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = start;
    fl.l_len = 1;
    // SAFETY: F_OFD_SETLK and F_OFD_GETLK read (and GETLK writes) one `struct flock` through
    // the pointer, which points to a live, writable local of that type for the whole call;
    // `fd` is borrowed, so it stays open until the call returns.
    let rc = unsafe { libc::fcntl(fd.as_raw_fd(), cmd, &mut fl as *mut libc::flock) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fl)
}

/// Whether another open file description holds a lock on `byte`.
pub fn locked_by_other(fd: BorrowedFd<'_>, byte: u64) -> io::Result<bool> {
    let fl = ofd_lock(fd, libc::F_OFD_GETLK, libc::F_WRLCK, byte)?;
    Ok(libc::c_int::from(fl.l_type) != libc::F_UNLCK)
}

/// The first lock of another process that `want` would conflict with: someone holding a
/// permission `want` refuses (checked first: the usual case, another writer), then someone
/// refusing a permission `want` holds.
pub fn check(fd: BorrowedFd<'_>, want: LockSet) -> io::Result<Option<Conflict>> {
    for (i, p) in want.refused.each() {
        if locked_by_other(fd, PERM_BASE + u64::from(i))? {
            return Ok(Some(Conflict::Holds(p)));
        }
    }
    for (i, p) in want.held.each() {
        if locked_by_other(fd, SHARED_BASE + u64::from(i))? {
            return Ok(Some(Conflict::Refuses(p)));
        }
    }
    Ok(None)
}

/// Changes the locks `fd` holds from `from` to `to`: locks the bytes of `to` not in `from`,
/// then unlocks those of `from` not in `to`. Does not look for conflicts (see [`check`]).
/// If a lock fails, the bytes this call locked are unlocked again, so that `fd` holds `from`,
/// and the error comes with the byte that failed.
pub fn apply(fd: BorrowedFd<'_>, from: LockSet, to: LockSet) -> Result<(), (u64, io::Error)> {
    for byte in to.bytes().filter(|&b| !from.has_byte(b)) {
        if let Err(e) = ofd_lock(fd, libc::F_OFD_SETLK, libc::F_RDLCK, byte) {
            for taken in to.bytes().filter(|&b| !from.has_byte(b) && b < byte) {
                unlock(fd, taken);
            }
            return Err((byte, e));
        }
    }
    unlock_extra(fd, from, to);
    Ok(())
}

/// Unlocks the bytes of `from` that `to` does not have: nothing to check, nothing to fail.
fn unlock_extra(fd: BorrowedFd<'_>, from: LockSet, to: LockSet) {
    for byte in from.bytes().filter(|&b| !to.has_byte(b)) {
        unlock(fd, byte);
    }
}

/// Unlocks one byte. Unlocking meets no conflict; a failure is logged (the lock goes when
/// the descriptor closes).
fn unlock(fd: BorrowedFd<'_>, byte: u64) {
    if let Err(e) = ofd_lock(fd, libc::F_OFD_SETLK, libc::F_UNLCK, byte) {
        warn!(byte, error = %e, "cannot unlock an image lock byte");
    }
}

/// The locks of one served image, taken through one of its descriptors, and the moves of the
/// write permission between this process and another. Used from the control path only.
#[derive(Debug)]
pub struct ImageLock {
    /// The locking descriptor: the locks live as long as it is open.
    file: Arc<File>,
    path: PathBuf,
    /// What the device holds while it serves: [`LockSet::WRITER`] or [`LockSet::READER`].
    active: LockSet,
    state: Mutex<LockSet>,
}

impl ImageLock {
    /// Locks the image open as `file` for a device that serves it with `active`
    /// ([`LockSet::WRITER`] or [`LockSet::READER`]); `inactive` starts a writer without the
    /// write permission ([`LockSet::INACTIVE`]), to be taken by [`ImageLock::acquire_write`].
    pub fn take(
        file: Arc<File>,
        path: &Path,
        active: LockSet,
        inactive: bool,
    ) -> Result<Self, LockError> {
        let start = if inactive {
            inactive_of(active)
        } else {
            active
        };
        let hint = if active.held.contains(Perms::WRITE) {
            Hint::StartWriter
        } else {
            Hint::StartReader
        };
        let lock = ImageLock {
            file,
            path: path.to_owned(),
            active,
            state: Mutex::new(LockSet::NONE),
        };
        lock.move_to(&mut lock.state(), start, hint)?;
        Ok(lock)
    }

    /// Takes the write permission: the full set the device serves with. Fails, naming the
    /// image and the conflicting permission, if another process holds the image for writing
    /// or refuses our write; then nothing has changed. Does nothing if already held, or for a
    /// read-only device.
    pub fn acquire_write(&self) -> Result<(), LockError> {
        let moved = self.move_to(&mut self.state(), self.active, Hint::Takeover)?;
        if moved {
            info!(path = %self.path.display(), locks = %self.active, "took the image's write permission");
        }
        Ok(())
    }

    /// Gives the write permission up for another process to take: the image stays marked as
    /// used ([`LockSet::INACTIVE`]) and nothing is refused. Does nothing if not held, or for
    /// a read-only device.
    pub fn release_write(&self) -> Result<(), LockError> {
        let to = inactive_of(self.active);
        let moved = self.move_to(&mut self.state(), to, Hint::Takeover)?;
        if moved {
            info!(path = %self.path.display(), locks = %to, "gave the image's write permission up");
        }
        Ok(())
    }

    /// Runs `resize` (which changes the image's size) holding the resize permission, taken
    /// for the moment (QEMU's lock byte 103) and given back after: fails, naming the image
    /// and the process's conflict, while another process refuses resize (a QEMU serving
    /// the image, say), and then `resize` does not run.
    pub fn resizing<T>(
        &self,
        resize: impl FnOnce() -> io::Result<T>,
    ) -> Result<io::Result<T>, LockError> {
        let mut state = self.state();
        let before = *state;
        let with = LockSet {
            held: before.held.union(Perms::RESIZE),
            refused: before.refused,
        };
        self.move_to(&mut state, with, Hint::Resize)?;
        let result = resize();
        self.move_to(&mut state, before, Hint::Resize)?;
        Ok(result)
    }

    /// What the device holds now.
    pub fn held(&self) -> LockSet {
        *self.state()
    }

    fn state(&self) -> MutexGuard<'_, LockSet> {
        // The state is one Copy value, always whole: a panic elsewhere cannot leave it torn.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Moves from `*state` to `to`: check, then lock the union of both, check again (another
    /// process may have locked between our check and our locks: one of the two then sees the
    /// other), then drop what `to` does not have. On a conflict or a failure the locks go back
    /// to `*state`. Returns whether anything changed.
    fn move_to(&self, state: &mut LockSet, to: LockSet, hint: Hint) -> Result<bool, LockError> {
        let from = *state;
        if from == to {
            return Ok(false);
        }
        let fd = self.file.as_fd();
        let conflicts = || -> Result<(), LockError> {
            if from.only_drops_to(to) {
                return Ok(());
            }
            match check(fd, to) {
                Ok(None) => Ok(()),
                Ok(Some(conflict)) => Err(LockError::InUse {
                    path: self.path.clone(),
                    conflict,
                    hint,
                }),
                Err(source) => Err(LockError::Probe {
                    path: self.path.clone(),
                    source,
                }),
            }
        };
        conflicts()?;
        let both = from.union(to);
        apply(fd, from, both).map_err(|(byte, source)| LockError::Lock {
            path: self.path.clone(),
            byte,
            source,
        })?;
        if let Err(e) = conflicts() {
            unlock_extra(fd, both, from);
            return Err(e);
        }
        unlock_extra(fd, both, to);
        *state = to;
        Ok(true)
    }
}

/// The locks go with the device, not with the last reference to its descriptor: an io_uring
/// ring's registered files keep the open file description (and its locks) alive until the
/// ring's asynchronous teardown ends, tens of milliseconds after the process exits, which
/// would refuse a vubd restarted at once.
impl Drop for ImageLock {
    fn drop(&mut self) {
        let state = *self.state();
        unlock_extra(self.file.as_fd(), state, LockSet::NONE);
    }
}

/// The set a device serving with `active` holds while it does not write.
fn inactive_of(active: LockSet) -> LockSet {
    if active.held.contains(Perms::WRITE) {
        LockSet::INACTIVE
    } else {
        active
    }
}

#[cfg(test)]
mod tests {
    use std::fs::OpenOptions;

    use super::*;

    /// A temporary image and a way to open it again: each open is an open file description
    /// of its own, as another process's would be.
    struct Image {
        _dir: tempfile::TempDir,
        path: PathBuf,
    }

    impl Image {
        fn new() -> Self {
            let dir = tempfile::tempdir().expect("tempdir");
            let path = dir.path().join("disk.img");
            File::create(&path)
                .and_then(|f| f.set_len(1 << 20))
                .expect("create image");
            Image { _dir: dir, path }
        }

        fn open(&self) -> Arc<File> {
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&self.path)
                .expect("open image");
            Arc::new(f)
        }

        fn lock(&self, active: LockSet, inactive: bool) -> Result<ImageLock, LockError> {
            ImageLock::take(self.open(), &self.path, active, inactive)
        }

        /// The lock bytes someone holds, as a third open of the image sees them.
        fn locked_bytes(&self) -> Vec<u64> {
            let observer = self.open();
            (PERM_BASE..PERM_BASE + 4)
                .chain(SHARED_BASE..SHARED_BASE + 4)
                .filter(|&b| locked_by_other(observer.as_fd(), b).expect("F_OFD_GETLK"))
                .collect()
        }
    }

    #[track_caller]
    fn in_use(r: Result<ImageLock, LockError>) -> (Conflict, Hint) {
        match r {
            Err(LockError::InUse { conflict, hint, .. }) => (conflict, hint),
            other => panic!("expected a conflict, got {other:?}"),
        }
    }

    #[test]
    fn lock_sets_use_qemus_bytes() {
        assert_eq!(
            LockSet::WRITER.bytes().collect::<Vec<_>>(),
            [100, 101, 201, 203]
        );
        assert_eq!(LockSet::READER.bytes().collect::<Vec<_>>(), [100, 201, 203]);
        assert_eq!(LockSet::INACTIVE.bytes().collect::<Vec<_>>(), [100]);
        assert_eq!(
            Perms::ALL.to_string(),
            "consistent read, write, write unchanged, resize"
        );
        let image = Image::new();
        let _writer = image.lock(LockSet::WRITER, false).expect("writer");
        assert_eq!(image.locked_bytes(), [100, 101, 201, 203]);
    }

    #[test]
    fn a_second_writer_conflicts_and_names_the_write_permission() {
        let image = Image::new();
        let _first = image.lock(LockSet::WRITER, false).expect("first writer");
        let err = image.lock(LockSet::WRITER, false).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains(&format!("image {} is in use", image.path.display()))
                && text.contains("it holds the \"write\" permission")
                && text.contains("--incoming"),
            "{text}"
        );
        assert_eq!(
            image.locked_bytes(),
            [100, 101, 201, 203],
            "the first's locks only"
        );
    }

    #[test]
    fn two_readers_coexist() {
        let image = Image::new();
        let _a = image.lock(LockSet::READER, false).expect("first reader");
        let _b = image.lock(LockSet::READER, false).expect("second reader");
    }

    #[test]
    fn a_reader_and_a_writer_conflict_whichever_comes_first() {
        let image = Image::new();
        let reader = image.lock(LockSet::READER, false).expect("reader");
        assert_eq!(
            in_use(image.lock(LockSet::WRITER, false)),
            (Conflict::Refuses(Perms::WRITE), Hint::StartWriter),
            "the reader refuses write"
        );
        drop(reader);
        let _writer = image.lock(LockSet::WRITER, false).expect("writer");
        assert_eq!(
            in_use(image.lock(LockSet::READER, false)),
            (Conflict::Holds(Perms::WRITE), Hint::StartReader)
        );
    }

    #[test]
    fn an_incoming_writer_starts_beside_a_writer_holding_consistent_read_only() {
        let image = Image::new();
        let _writer = image.lock(LockSet::WRITER, false).expect("writer");
        let incoming = image.lock(LockSet::WRITER, true).expect("incoming");
        assert_eq!(incoming.held(), LockSet::INACTIVE);
        // A read-only device ignores `inactive`: it never holds write.
        let image = Image::new();
        let reader = image.lock(LockSet::READER, true).expect("reader");
        assert_eq!(reader.held(), LockSet::READER);
        reader.release_write().expect("no-op");
        reader.acquire_write().expect("no-op");
        assert_eq!(reader.held(), LockSet::READER);
    }

    #[test]
    fn release_write_lets_another_take_the_write_set_and_back() {
        let image = Image::new();
        let a = image.lock(LockSet::WRITER, false).expect("a");
        let b = image.lock(LockSet::WRITER, true).expect("b, incoming");
        let err = b.acquire_write().unwrap_err();
        assert!(
            matches!(
                err,
                LockError::InUse {
                    conflict: Conflict::Holds(Perms::WRITE),
                    hint: Hint::Takeover,
                    ..
                }
            ),
            "{err}"
        );

        a.release_write().expect("release");
        a.release_write().expect("release again: nothing to do");
        assert_eq!(a.held(), LockSet::INACTIVE);
        b.acquire_write().expect("take over");
        b.acquire_write().expect("again: nothing to do");
        assert_eq!(b.held(), LockSet::WRITER);
        assert!(a.acquire_write().is_err(), "b holds write now");

        b.release_write().expect("hand back");
        a.acquire_write().expect("a takes it back");
        assert_eq!(image.locked_bytes(), [100, 101, 201, 203]);
    }

    #[test]
    fn a_failed_acquire_changes_nothing() {
        let image = Image::new();
        // Another process holds write without refusing anything (qemu-io does so).
        let other = image.open();
        let qemu_io = LockSet {
            held: Perms::CONSISTENT_READ.union(Perms::WRITE),
            refused: Perms::NONE,
        };
        apply(other.as_fd(), LockSet::NONE, qemu_io).expect("other's locks");
        let incoming = image.lock(LockSet::WRITER, true).expect("incoming");
        let before = image.locked_bytes();
        assert_eq!(before, [100, 101]);

        let (conflict, hint) = in_use(incoming.acquire_write().map(|()| unreachable!()));
        assert_eq!(
            (conflict, hint),
            (Conflict::Holds(Perms::WRITE), Hint::Takeover)
        );
        assert_eq!(incoming.held(), LockSet::INACTIVE);
        assert_eq!(
            image.locked_bytes(),
            before,
            "no refusal byte was left locked"
        );

        // Once the other goes, the same call succeeds.
        drop(other);
        incoming.acquire_write().expect("acquire");
        assert_eq!(image.locked_bytes(), [100, 101, 201, 203]);
    }

    #[test]
    fn a_lock_that_fails_midway_is_rolled_back() {
        let image = Image::new();
        // Byte 203 (refuse resize) write-locked by someone: no permission check looks at it
        // for a writer, so the check passes and the lock of that byte fails after 101 and 201
        // were taken.
        let other = image.open();
        ofd_lock(
            other.as_fd(),
            libc::F_OFD_SETLK,
            libc::F_WRLCK,
            SHARED_BASE + 3,
        )
        .expect("wrlck");
        let incoming = image.lock(LockSet::WRITER, true).expect("incoming");
        let err = incoming.acquire_write().unwrap_err();
        assert!(
            matches!(err, LockError::Lock { byte: 203, .. }),
            "{err}: expected the lock of byte 203 to fail"
        );
        assert_eq!(incoming.held(), LockSet::INACTIVE);
        assert_eq!(
            image.locked_bytes(),
            [100, 203],
            "101 and 201 were unlocked again"
        );
    }

    #[test]
    fn dropping_the_lock_unlocks_even_while_the_file_stays_open() {
        let image = Image::new();
        let file = image.open();
        let lock =
            ImageLock::take(file.clone(), &image.path, LockSet::WRITER, false).expect("writer");
        assert_eq!(image.locked_bytes(), [100, 101, 201, 203]);
        drop(lock);
        assert_eq!(
            image.locked_bytes(),
            Vec::<u64>::new(),
            "an io_uring ring may hold the file on"
        );
        drop(file);
    }

    #[test]
    fn locks_of_one_open_never_conflict_but_two_opens_do() {
        let image = Image::new();
        let f = image.open();
        apply(f.as_fd(), LockSet::NONE, LockSet::WRITER).expect("writer");
        assert_eq!(check(f.as_fd(), LockSet::WRITER).expect("check"), None);
        let dup = f.try_clone().expect("dup: the same open file description");
        assert_eq!(check(dup.as_fd(), LockSet::WRITER).expect("check"), None);
        let second = image.open();
        assert_eq!(
            check(second.as_fd(), LockSet::WRITER).expect("check"),
            Some(Conflict::Holds(Perms::WRITE))
        );
    }
}
