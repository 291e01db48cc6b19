//! A device's capacity, which can change while it serves: an image grown (or, when asked to,
//! shrunk) through `device_resize`, a block device or an NVMe namespace resized underneath.
//! What the guest sees follows it: the daemon tells the session, which updates the
//! configuration space and the requests' bounds and tells the frontend. A capacity that also
//! changes without `device_resize` (an NVMe namespace that grew, as its controller reports)
//! is [`Capacity::watched`]: each change makes an eventfd readable, which the device's
//! session watches.

use std::error::Error as StdError;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use thiserror::Error;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::lock::LockError;

/// What `device_resize` asks of a disk.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Resize {
    /// The new size in bytes; `None`: whatever the disk has now (an image or a namespace
    /// resized by someone else).
    pub size: Option<u64>,
    /// A smaller capacity is accepted (the guest loses what lies past the new end).
    pub shrink: bool,
}

/// Why a disk was not resized; nothing changed then.
#[derive(Debug, Error)]
pub enum ResizeError {
    #[error("size: a null device has no size of its own; give one")]
    NeedSize,
    #[error("size: {size} bytes is not a positive multiple of the {block}-byte block")]
    Unaligned { size: u64, block: u32 },
    #[error(
        "size: from {from} to {to} bytes shrinks the disk, and the guest loses what lies past the new end; say force=true to mean it"
    )]
    Shrink { from: u64, to: u64 },
    #[error(
        "size: a block device's size is its own; resize it, then resize the device without a size"
    )]
    BlockDevice,
    #[error("size: the device is read-only; its image's size is not vubd's to change")]
    ReadOnly,
    #[error("the size of {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Lock(#[from] LockError),
    #[error(
        "size: an NVMe namespace's size is its controller's; resize the namespace, then resize the device without a size"
    )]
    Nvme,
    #[error("cannot read the namespace's size from its controller")]
    Namespace(#[source] Arc<dyn StdError + Send + Sync>),
}

/// A capacity in bytes that the control path changes and the guest-facing paths read.
#[derive(Debug)]
pub struct Capacity {
    bytes: AtomicU64,
    /// Written at each change, for a capacity that changes on its own.
    changed: Option<EventFd>,
}

impl Capacity {
    pub fn new(bytes: u64) -> Self {
        Self {
            bytes: AtomicU64::new(bytes),
            changed: None,
        }
    }

    /// A capacity whose every change makes [`Capacity::event_fd`] readable.
    pub fn watched(bytes: u64) -> io::Result<Self> {
        Ok(Self {
            bytes: AtomicU64::new(bytes),
            changed: Some(EventFd::new(EFD_NONBLOCK)?),
        })
    }

    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Acquire)
    }

    /// Readable once the capacity changed, until [`Capacity::clear_event`]; only for a
    /// [`Capacity::watched`] one.
    pub fn event_fd(&self) -> Option<RawFd> {
        self.changed.as_ref().map(|e| e.as_raw_fd())
    }

    /// Acknowledges the changes [`Capacity::event_fd`] told of.
    pub fn clear_event(&self) {
        if let Some(e) = &self.changed {
            let _ = e.read();
        }
    }

    /// Checks `to` against the block size and the current capacity (see [`ResizeError`])
    /// without changing anything.
    pub fn check(&self, to: u64, block: u32, shrink: bool) -> Result<(), ResizeError> {
        if to == 0 || to % u64::from(block) != 0 {
            return Err(ResizeError::Unaligned { size: to, block });
        }
        let from = self.bytes();
        if to < from && !shrink {
            return Err(ResizeError::Shrink { from, to });
        }
        Ok(())
    }

    /// The device's own size is `bytes` now: a larger one becomes the capacity (the guest can
    /// use it at once); a smaller one does not, as the guest would lose what lies past the new
    /// end (`device_resize` with `force` takes it). Returns the capacity before.
    pub fn follow_growth(&self, bytes: u64) -> u64 {
        let before = self.bytes();
        if bytes > before {
            self.set(bytes);
        }
        before
    }

    pub fn set(&self, bytes: u64) {
        let old = self.bytes.swap(bytes, Ordering::AcqRel);
        if old != bytes
            && let Some(e) = &self.changed
        {
            // A full counter is still readable: the change is told either way.
            let _ = e.write(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn growth_is_checked_against_the_block_and_shrinking_needs_leave() {
        let c = Capacity::new(1 << 20);
        assert!(c.check(2 << 20, 512, false).is_ok());
        assert!(c.check(1 << 20, 512, false).is_ok(), "the same size");
        assert!(matches!(
            c.check(512 * 1001, 4096, false),
            Err(ResizeError::Unaligned { .. })
        ));
        assert!(matches!(
            c.check(0, 512, true),
            Err(ResizeError::Unaligned { .. })
        ));
        assert!(matches!(
            c.check(1 << 19, 512, false),
            Err(ResizeError::Shrink { from, to }) if from == 1 << 20 && to == 1 << 19
        ));
        assert!(c.check(1 << 19, 512, true).is_ok());
        c.set(3 << 20);
        assert_eq!(c.bytes(), 3 << 20);
        assert_eq!(c.event_fd(), None, "only a watched capacity tells");
    }

    fn readable(fd: RawFd) -> bool {
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call; no wait.
        unsafe { libc::poll(&mut p, 1, 0) == 1 }
    }

    #[test]
    fn a_watched_capacity_tells_each_change_until_cleared() {
        let c = Capacity::watched(1 << 20).expect("eventfd");
        let fd = c.event_fd().expect("watched");
        assert!(!readable(fd));
        c.set(1 << 20);
        assert!(!readable(fd), "the same size is no change");
        c.set(2 << 20);
        c.set(3 << 20);
        assert!(readable(fd));
        c.clear_event();
        assert!(!readable(fd), "both changes acknowledged at once");
        assert_eq!(c.bytes(), 3 << 20);
        assert_eq!(c.follow_growth(2 << 20), 3 << 20);
        assert_eq!(c.bytes(), 3 << 20, "shrinking is not followed");
        assert!(!readable(fd));
        assert_eq!(c.follow_growth(4 << 20), 3 << 20);
        assert_eq!(c.bytes(), 4 << 20, "growth is");
        assert!(readable(fd));
    }
}
