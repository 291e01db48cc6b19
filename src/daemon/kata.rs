//! A device in a Kata Containers vhost-user store (`kata-store=DIR`, `--kata-store`): Kata's
//! Go runtime (`enable_vhost_user_store`) finds a vhost-user-blk volume from the major:minor
//! of the block device a container asks for. A block device of major 241 sends it to
//! `DIR/block/devices/`, where it takes the first entry whose stat(2) has that major and
//! minor, and then to the socket of the same name in `DIR/block/sockets/`. vubd makes both
//! with the device (the socket through `socket::listen`, the node here) and removes both
//! when the device goes.
//!
//! The minor is what tells devices apart: it is unique among vubd's devices and clashes with
//! no other node of major 241 in the store. A node left with the device's name (a vubd that
//! crashed, an upgrade's old process) keeps its minor where it can, so that a restarted
//! device has the numbers it had; the new node replaces it with a rename, so that Kata never
//! finds the name missing nor two nodes with one number. Kata stops at the first entry it
//! cannot stat, so the node is made beside the directory and renamed into it whole.

use std::collections::BTreeSet;
use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use tracing::info;

use super::DaemonError;
use super::socket::SocketFile;

/// The major number Kata gives vhost-user-blk devices (`VhostUserBlkMajor`).
pub(super) const MAJOR: u32 = 241;
/// Largest minor number of a Linux device number (20 bits).
const MAX_MINOR: u32 = (1 << 20) - 1;
/// The node's mode: that of a disk's node (`brw-rw----`); nothing opens it (the kernel has no
/// driver for major 241), but runtimes copy it into the container's device.
const NODE_MODE: u32 = 0o660;

/// Where a store keeps sockets and nodes.
fn sockets(store: &Path) -> PathBuf {
    store.join("block/sockets")
}
fn devices(store: &Path) -> PathBuf {
    store.join("block/devices")
}

/// Makes the store's directories (`DIR/block/sockets`, `DIR/block/devices`) that do not
/// exist yet, before the device's socket is bound in it.
pub(super) fn make_dirs(store: &Path) -> Result<(), DaemonError> {
    for dir in [sockets(store), devices(store)] {
        std::fs::create_dir_all(&dir).map_err(|source| DaemonError::KataStore {
            path: dir.clone(),
            what: "cannot make the directory",
            source,
        })?;
    }
    Ok(())
}

/// The block device node of a device in a store: removed when dropped, unless another
/// process has put a node of its own there meanwhile.
#[derive(Debug)]
pub(super) struct KataNode {
    minor: u32,
    _file: SocketFile,
}

impl KataNode {
    /// Its minor number (its major is [`MAJOR`]).
    pub(super) fn minor(&self) -> u32 {
        self.minor
    }
}

/// Makes the node `DIR/block/devices/NAME` of device `name` in `store`, with a minor none of
/// `ours` (vubd's other devices) has.
pub(super) fn make_node(
    store: &Path,
    name: &str,
    ours: &BTreeSet<u32>,
) -> Result<KataNode, DaemonError> {
    let dir = devices(store);
    let (mut taken, left) = minors_in(&dir, name)?;
    taken.extend(ours);
    let minor = match left {
        Some(m) if !taken.contains(&m) => m,
        _ => (0..=MAX_MINOR)
            .find(|m| !taken.contains(m))
            .ok_or_else(|| DaemonError::KataStore {
                path: dir.clone(),
                what: "no minor number of major 241 is free",
                source: io::Error::from(io::ErrorKind::AddrInUse),
            })?,
    };
    let path = dir.join(name);
    // Beside the directory Kata reads: a half-made node there could be the one it finds.
    let beside = store
        .join("block")
        .join(format!(".{name}.vubd-{}", std::process::id()));
    let made = mknod(&beside, minor)
        .and_then(|()| {
            std::fs::set_permissions(&beside, std::fs::Permissions::from_mode(NODE_MODE))
        })
        .and_then(|()| std::fs::rename(&beside, &path));
    if let Err(source) = made {
        let _ = std::fs::remove_file(&beside);
        let what = if source.kind() == io::ErrorKind::PermissionDenied {
            "cannot make the block device node (it takes CAP_MKNOD: run vubd as root)"
        } else {
            "cannot make the block device node"
        };
        return Err(DaemonError::KataStore { path, what, source });
    }
    info!(node = %path.display(), major = MAJOR, minor, "kata store: block device node made");
    Ok(KataNode {
        minor,
        _file: SocketFile::bound(&path),
    })
}

/// The minors of major 241 that the nodes in `dir` other than `name` have, and the one of
/// `name`'s node, if one is left there. Entries are read as Kata reads them (stat, following
/// links); one that goes away meanwhile is skipped.
fn minors_in(dir: &Path, name: &str) -> Result<(BTreeSet<u32>, Option<u32>), DaemonError> {
    let read_error = |source| DaemonError::KataStore {
        path: dir.to_path_buf(),
        what: "cannot read the directory",
        source,
    };
    let mut taken = BTreeSet::new();
    let mut left = None;
    for entry in std::fs::read_dir(dir).map_err(read_error)? {
        let entry = entry.map_err(read_error)?;
        let Ok(meta) = std::fs::metadata(entry.path()) else {
            continue;
        };
        let rdev = meta.rdev();
        if !meta.file_type().is_block_device() || libc::major(rdev) != MAJOR {
            continue;
        }
        if entry.file_name() == name {
            left = Some(libc::minor(rdev));
        } else {
            taken.insert(libc::minor(rdev));
        }
    }
    Ok((taken, left))
}

/// A block device node of major 241 and `minor` at `path`.
fn mknod(path: &Path, minor: u32) -> io::Result<()> {
    let _ = std::fs::remove_file(path);
    let cpath = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: `cpath` is a NUL-terminated string that lives across the call; mknodat reads
    // only it.
    let rc = unsafe {
        libc::mknodat(
            libc::AT_FDCWD,
            cpath.as_ptr(),
            libc::S_IFBLK | NODE_MODE,
            libc::makedev(MAJOR, minor),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_store_gets_its_directories() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = dir.path().join("vhost-user");
        make_dirs(&store).expect("made");
        assert!(store.join("block/sockets").is_dir());
        assert!(store.join("block/devices").is_dir());
        make_dirs(&store).expect("made again: nothing to do");
    }

    #[test]
    fn a_directory_that_cannot_be_made_is_named() {
        let dir = tempfile::tempdir().expect("temp dir");
        let file = dir.path().join("file");
        std::fs::write(&file, b"").expect("write");
        let e = make_dirs(&file).unwrap_err().to_string();
        assert_eq!(
            e,
            format!(
                "kata-store: {}: cannot make the directory",
                file.join("block/sockets").display()
            )
        );
    }

    #[test]
    fn minors_are_read_from_nodes_of_major_241_only() {
        let dir = tempfile::tempdir().expect("temp dir");
        // Regular files and directories are not devices: whatever their names, no minor.
        std::fs::write(dir.path().join("a"), b"").expect("write");
        std::fs::create_dir(dir.path().join("b")).expect("mkdir");
        assert_eq!(
            minors_in(dir.path(), "a").expect("read"),
            (BTreeSet::new(), None)
        );
    }
}
