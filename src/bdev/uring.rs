//! The io_uring I/O channel of a file or block device: one ring per poller, guest buffers as
//! the iovecs (zero-copy), one `io_uring_enter` per batch.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use io_uring::{IoUring, opcode, squeue, types};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::file::DirectAlign;
use super::{ChannelFull, IoChannel, IoOp};
use crate::mem::IovecList;
use crate::sandbox::uring::{RingRules, restricted_ring};

/// Registered-file index of the O_DIRECT descriptor (the buffered one when there is none).
const DIRECT: types::Fixed = types::Fixed(0);
/// Registered-file index of the buffered descriptor.
const BUFFERED: types::Fixed = types::Fixed(1);

/// All the ring may do (`sandbox::uring`): the operations `queue` submits, on the two files
/// registered at creation only, linked for a punch followed by an allocation.
const RING_RULES: RingRules<'static> = RingRules {
    ops: &[
        opcode::Readv::CODE,
        opcode::Writev::CODE,
        opcode::Fsync::CODE,
        opcode::Fallocate::CODE,
    ],
    flags_allowed: squeue::Flags::IO_LINK,
    flags_required: squeue::Flags::FIXED_FILE,
};

/// How WRITE_ZEROES without UNMAP is carried out on this file system.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ZeroStrategy {
    /// `fallocate(FALLOC_FL_ZERO_RANGE)`: zeroed and still allocated.
    ZeroRange,
    /// No zero-range (e.g. tmpfs): punch a hole, then allocate it again, as two linked
    /// operations.
    PunchThenAllocate,
    /// Neither works: write-zeroes is not offered.
    Unsupported,
}

/// An io_uring owned by one poller.
pub struct UringChannel {
    ring: IoUring,
    has_direct: bool,
    align: DirectAlign,
    zero: ZeroStrategy,
    /// `fallocate(PUNCH_HOLE)` works: used for discard and for write-zeroes with UNMAP.
    punch: bool,
    eventfd: EventFd,
    /// The registered files stay open as long as the ring may use them.
    _files: (Option<Arc<File>>, Arc<File>),
}

impl UringChannel {
    /// Most submission entries one operation takes (a linked punch and allocate).
    const MAX_COMPLETIONS_PER_OP: u32 = 2;

    pub(super) fn new(
        depth: u32,
        direct: Option<Arc<File>>,
        buffered: Arc<File>,
        align: DirectAlign,
        zero: ZeroStrategy,
        punch: bool,
    ) -> io::Result<Self> {
        let entries = (depth.max(1) * Self::MAX_COMPLETIONS_PER_OP).next_power_of_two();
        let first = direct.as_deref().unwrap_or(&buffered).as_raw_fd();
        let eventfd = EventFd::new(EFD_NONBLOCK)?;
        let ring = restricted_ring(entries.min(32768), &RING_RULES, |s| {
            s.register_files(&[first, buffered.as_raw_fd()])?;
            s.register_eventfd(eventfd.as_raw_fd())
        })?;
        Ok(Self {
            ring,
            has_direct: direct.is_some(),
            align,
            zero,
            punch,
            eventfd,
            _files: (direct, buffered),
        })
    }

    /// The descriptor to use for a transfer: O_DIRECT when the request meets its alignment.
    fn rw_target(&self, offset: u64, iov: &IovecList) -> types::Fixed {
        let aligned = offset % u64::from(self.align.offset) == 0
            && iov.is_dio_aligned(self.align.mem as usize, self.align.offset as usize);
        if self.has_direct && aligned {
            DIRECT
        } else {
            BUFFERED
        }
    }

    fn fallocate(&self, tag: u32, offset: u64, len: u64, mode: libc::c_int) -> squeue::Entry {
        opcode::Fallocate::new(BUFFERED, len)
            .offset(offset)
            .mode(mode)
            .build()
            .user_data(u64::from(tag))
    }
}

impl std::fmt::Debug for UringChannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UringChannel")
            .field("has_direct", &self.has_direct)
            .field("align", &self.align)
            .field("zero", &self.zero)
            .finish_non_exhaustive()
    }
}

impl IoChannel for UringChannel {
    fn has_room(&self) -> bool {
        // SAFETY: only reads the ring's head and tail; the ring is owned by this thread and
        // no SubmissionQueue handle is alive at the same time.
        let sq = unsafe { self.ring.submission_shared() };
        sq.capacity() - sq.len() >= Self::MAX_COMPLETIONS_PER_OP as usize
    }

    unsafe fn queue(&mut self, tag: u32, op: IoOp<'_>) -> Result<u32, ChannelFull> {
        if !self.has_room() {
            return Err(ChannelFull);
        }
        let user_data = u64::from(tag);
        let keep = libc::FALLOC_FL_KEEP_SIZE;
        let punch = libc::FALLOC_FL_PUNCH_HOLE | keep;
        let mut entries: [Option<squeue::Entry>; 2] = [None, None];
        match op {
            IoOp::Read { offset, iov } => {
                let fd = self.rw_target(offset, iov);
                entries[0] = Some(
                    opcode::Readv::new(fd, iov.as_slice().as_ptr(), iov.len() as u32)
                        .offset(offset)
                        .build()
                        .user_data(user_data),
                );
            }
            IoOp::Write { offset, iov, fua } => {
                let fd = self.rw_target(offset, iov);
                let flags = if fua { libc::RWF_DSYNC } else { 0 };
                entries[0] = Some(
                    opcode::Writev::new(fd, iov.as_slice().as_ptr(), iov.len() as u32)
                        .offset(offset)
                        .rw_flags(flags)
                        .build()
                        .user_data(user_data),
                );
            }
            IoOp::Flush => {
                entries[0] = Some(
                    opcode::Fsync::new(BUFFERED)
                        .flags(types::FsyncFlags::DATASYNC)
                        .build()
                        .user_data(user_data),
                );
            }
            IoOp::Discard { offset, len } => {
                entries[0] = Some(self.fallocate(tag, offset, len, punch));
            }
            IoOp::WriteZeroes { offset, len, unmap } => match (unmap && self.punch, self.zero) {
                // UNMAP allows deallocation (virtio 1.2 §5.2.6.2): a punched hole reads as zeros.
                (true, _) | (false, ZeroStrategy::Unsupported) => {
                    entries[0] = Some(self.fallocate(tag, offset, len, punch));
                }
                (false, ZeroStrategy::ZeroRange) => {
                    let mode = libc::FALLOC_FL_ZERO_RANGE | keep;
                    entries[0] = Some(self.fallocate(tag, offset, len, mode));
                }
                (false, ZeroStrategy::PunchThenAllocate) => {
                    entries[0] = Some(
                        self.fallocate(tag, offset, len, punch)
                            .flags(squeue::Flags::IO_LINK),
                    );
                    entries[1] = Some(self.fallocate(tag, offset, len, keep));
                }
            },
        }
        let mut sq = self.ring.submission();
        let mut n = 0;
        for e in entries.iter().flatten() {
            // SAFETY: every pointer in the entry (the iovec array, the buffers it points to)
            // stays valid until the completion for `tag` is reaped: the caller's contract of
            // `queue`. The room check above guarantees the push succeeds.
            if unsafe { sq.push(e) }.is_err() {
                return Err(ChannelFull);
            }
            n += 1;
        }
        Ok(n)
    }

    fn submit(&mut self) -> io::Result<()> {
        {
            // io_uring_enter only when something is queued or the kernel holds back
            // completions (CQ overflow): an idle poll loop makes no syscall.
            let sq = self.ring.submission();
            if sq.is_empty() && !sq.cq_overflow() && !sq.taskrun() {
                return Ok(());
            }
        }
        loop {
            match self.ring.submit() {
                Ok(_) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                // The completion queue is full: what is queued stays queued and goes out with
                // the next submit, after the poller has reaped.
                Err(e) if matches!(e.raw_os_error(), Some(libc::EBUSY | libc::EAGAIN)) => {
                    return Ok(());
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn poll(&mut self, max: usize, mut f: impl FnMut(u32, i32)) -> usize {
        let mut n = 0;
        for cqe in self.ring.completion().take(max) {
            // Tags are u32 by construction (see `queue`).
            f(cqe.user_data() as u32, cqe.result());
            n += 1;
        }
        n
    }

    fn completion_fd(&self) -> Option<RawFd> {
        Some(self.eventfd.as_raw_fd())
    }

    fn clear_completion_fd(&self) {
        // Non-blocking: EAGAIN just means nothing was pending.
        let _ = self.eventfd.read();
    }

    /// Nothing to do: file I/O always completes (a slow or failing disk ends it with an
    /// error), and until then the kernel owns the buffers, so an operation can neither be
    /// failed early nor be cancelled without waiting for the kernel to let go of them anyway.
    fn drain(&mut self, _draining: impl FnMut(u32) -> bool) {}
}
