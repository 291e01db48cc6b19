//! A broken queue: one whose driver broke the rules of the ring itself, so that the poller can
//! no longer tell which chains it made available or how to complete them. Such a queue is
//! stopped, not spun on: one log line, a signal on the ring's error eventfd (SET_VRING_ERR;
//! vhost-user gives a backend no way to set DEVICE_NEEDS_RESET), and the poller does not look
//! at it again until the frontend stops the ring (GET_VRING_BASE) and starts it afresh.
//!
//! What breaks a queue and what only fails a request is decided in docs/security.md ("A
//! broken queue"): a chain whose status byte can be written fails alone, with IOERR or
//! UNSUPP; a queue breaks when there is no such byte to write or no sound ring to read.

use std::fmt;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;

use tracing::Level;
use vhost_user_backend::{VringState, VringT};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::{KICK_EVENT, QueueSlot};
use crate::limited;
use crate::mem::GuestMemoryAtomic;
use crate::poller::DeviceShared;

/// Why a queue broke: each is a driver requirement of virtio 1.2 the driver did not keep,
/// and one QEMU's own virtqueue code answers with `virtio_error` (the device needs a reset).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Breakage {
    /// §2.7.6: the driver makes at most a ring's worth of chains available ("Guest moved
    /// avail index").
    AvailIndex { next: u16, avail: u16 },
    /// §2.7.6: an avail entry names the head of a chain, an index into the descriptor table
    /// ("Guest says index is available").
    Head { pos: u16, head: u16 },
    /// The inflight region the frontend keeps names a head outside the table.
    InflightHead { head: u16 },
    /// §2.7.5: a chain is followed through `next` inside its table, without a loop, at most
    /// a queue's worth long (§2.7.5.3.1, indirect tables included), whole indirect tables of
    /// whole descriptors inside guest memory ("Desc next is", "Looped descriptor", "Invalid
    /// size for indirect buffer table", "Cannot map indirect buffer").
    Chain { head: u16 },
    /// §5.2.6: a virtio-blk request ends with a device-writable status byte in guest memory
    /// ("virtio-blk request inhdr too short").
    NoStatus { head: u16 },
    /// §2.7: the queue size is the most buffers a virtqueue holds, so the driver never has
    /// more chains in use ("Virtqueue size exceeded"): a head made available again while
    /// still in flight.
    InUse { in_use: u32, size: u16 },
}

impl fmt::Display for Breakage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::AvailIndex { next, avail } => write!(
                f,
                "avail index moved from {next} to {avail}, more than the ring holds"
            ),
            Self::Head { pos, head } => {
                write!(f, "avail entry {pos} names head {head}, outside the table")
            }
            Self::InflightHead { head } => write!(
                f,
                "the inflight region names head {head}, outside the table"
            ),
            Self::Chain { head } => write!(
                f,
                "the chain at head {head} cannot be followed to its end (a next outside its \
                 table, a loop, longer than the queue, or an unreadable or malformed table)"
            ),
            Self::NoStatus { head } => write!(
                f,
                "the chain at head {head} ends without a device-writable status byte in guest \
                 memory"
            ),
            Self::InUse { in_use, size } => write!(
                f,
                "{in_use} chains in use on a ring of {size}: a head made available twice"
            ),
        }
    }
}

impl QueueSlot {
    /// Whether the queue broke: the poller skips it (one load and a branch per pass).
    #[inline(always)]
    pub(super) fn is_broken(&self) -> bool {
        self.broken
    }

    /// Puts the queue in the broken state: nothing more is popped from it, what an earlier
    /// process left to resubmit is dropped, its kicks no longer wake the poller (its eventfd
    /// leaves the poller's epoll, and the control plane stops forwarding them), and the
    /// frontend's error eventfd is signalled. Requests already in flight still complete and
    /// are published, so that a detach (GET_VRING_BASE) ends as for any queue.
    #[cold]
    #[inline(never)]
    pub(super) fn break_queue(&mut self, shared: &DeviceShared, epoll: &Epoll, why: Breakage) {
        self.broken = true;
        self.broken_flag.store(true, Ordering::Release);
        self.resubmit.clear();
        if let Some(kick) = self.kick.take() {
            let ev = EpollEvent::new(EventSet::IN, KICK_EVENT);
            let _ = epoll.ctl(ControlOperation::Delete, kick.as_raw_fd(), ev);
        }
        let signalled = signal_error(&self.vring.get_ref());
        limited!(
            shared.events,
            Level::WARN,
            device = shared.index,
            queue = self.index,
            in_flight = self.in_flight,
            error_fd_signalled = signalled,
            "queue broken, ignored until the frontend restarts it: {why}"
        );
    }
}

/// Writes 1 to the ring's error eventfd, if the frontend gave one (SET_VRING_ERR made it
/// non-blocking: a counter the frontend never reads is full, and then it already has a
/// signal). Returns whether it was written.
fn signal_error(state: &VringState<GuestMemoryAtomic>) -> bool {
    let Some(err) = state.get_err() else {
        return false;
    };
    let one = 1u64.to_ne_bytes();
    // SAFETY: writes the 8 bytes of a live local array to a descriptor the vring state owns
    // and keeps open while it is borrowed here; the descriptor is non-blocking, so the call
    // returns at once.
    let n = unsafe { libc::write(err.as_raw_fd(), one.as_ptr().cast(), one.len()) };
    usize::try_from(n) == Ok(one.len())
}
