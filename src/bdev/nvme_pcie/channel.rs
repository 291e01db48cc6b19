//! The per-poller channel of a local NVMe namespace: virtio-blk operations become NVMe
//! commands on this poller's own I/O queue pair, with PRPs pointing at the guest's buffers
//! (guest memory is DMA-mapped at IOVA = its address), one doorbell write per batch, and
//! completions polled by phase bit.

use std::collections::VecDeque;
use std::io;
use std::os::fd::RawFd;

use tracing::{debug, warn};

use super::Geometry;
use crate::bdev::{ChannelFull, IoChannel, IoOp};
use crate::nvme::cid::CmdTable;
use crate::nvme::data::DataRef;
use crate::nvme::pcie::io::INLINE_LEN;
use crate::nvme::pcie::{PcieIoQueue, QueueFull};
use crate::nvme::spec::{DsmRange, Sqe, Status};
use crate::nvme::split::split;

/// Commands waiting for a free slot in the queue pair, per slot, before the channel reports
/// itself full.
const BACKLOG_PER_SLOT: usize = 2;

/// What a command carries besides its SQE.
#[derive(Clone, Copy, Debug)]
enum Payload {
    None,
    /// Guest data (`true`: to the device).
    Data(DataRef, bool),
    /// A Dataset Management range, copied into the queue's DMA memory.
    Inline([u8; INLINE_LEN]),
}

#[derive(Debug)]
struct Waiting {
    id: u16,
    sqe: Sqe,
    payload: Payload,
}

/// A command of the channel: the request it belongs to and the bytes it moves.
#[derive(Debug, Clone, Copy)]
struct Cmd {
    tag: u32,
    bytes: u32,
}

#[derive(Debug)]
pub struct NvmePcieChannel {
    geo: Geometry,
    queue: PcieIoQueue,
    /// Commands submitted or waiting, by the id the queue reports them with.
    cmds: CmdTable<Cmd>,
    backlog: VecDeque<Waiting>,
    backlog_max: usize,
    /// Results known without the controller (a flush without a volatile cache, refusals).
    ready: VecDeque<(u32, i32)>,
    /// Commands were queued since the last doorbell.
    queued: bool,
}

impl NvmePcieChannel {
    pub(super) fn new(geo: Geometry, queue: PcieIoQueue) -> Self {
        let depth = queue.depth();
        let backlog_max = depth * BACKLOG_PER_SLOT;
        Self {
            geo,
            queue,
            cmds: CmdTable::new(u16::try_from(depth + backlog_max).unwrap_or(4096)),
            backlog: VecDeque::with_capacity(backlog_max),
            backlog_max,
            ready: VecDeque::with_capacity(backlog_max),
            queued: false,
        }
    }

    fn enqueue(&mut self, tag: u32, sqe: Sqe, payload: Payload) {
        let bytes = match payload {
            Payload::Data(d, _) => u32::try_from(d.len()).unwrap_or(u32::MAX),
            Payload::None | Payload::Inline(_) => 0,
        };
        let Some(id) = self.cmds.insert(Cmd { tag, bytes }) else {
            // Unreachable: the table holds the queue's depth and the whole backlog.
            self.ready.push_back((tag, -libc::EBUSY));
            return;
        };
        if self.backlog.is_empty()
            && self.queue.has_room()
            && submit_to(&mut self.queue, id, sqe, payload).is_ok()
        {
            self.queued = true;
            return;
        }
        self.backlog.push_back(Waiting { id, sqe, payload });
    }

    fn drain_backlog(&mut self) {
        while self.queue.has_room() {
            let Some(w) = self.backlog.pop_front() else {
                return;
            };
            if submit_to(&mut self.queue, w.id, w.sqe, w.payload).is_err() {
                self.backlog.push_front(w);
                return;
            }
            self.queued = true;
        }
    }
}

impl IoChannel for NvmePcieChannel {
    fn has_room(&self) -> bool {
        self.backlog.len() < self.backlog_max
    }

    unsafe fn queue(&mut self, tag: u32, op: IoOp<'_>) -> Result<u32, ChannelFull> {
        if !self.has_room() {
            return Err(ChannelFull);
        }
        let geo = self.geo;
        let (offset, iov, write, fua) = match op {
            IoOp::Read { offset, iov } => (offset, iov, false, false),
            IoOp::Write { offset, iov, fua } => (offset, iov, true, fua),
            IoOp::Flush => {
                if geo.volatile_cache {
                    self.enqueue(tag, Sqe::flush(geo.nsid), Payload::None);
                } else {
                    self.ready.push_back((tag, 0));
                }
                return Ok(1);
            }
            IoOp::Discard { offset, len } => {
                // One range per command: its range list is the queue's inline payload.
                let Ok(pieces) = split(offset, len, geo.lba_shift, u32::MAX) else {
                    self.ready.push_back((tag, -libc::EINVAL));
                    return Ok(1);
                };
                let mut n = 0;
                for p in pieces {
                    let range = DsmRange {
                        context_attributes: 0,
                        nlb: p.blocks,
                        slba: p.slba,
                    };
                    self.enqueue(
                        tag,
                        Sqe::dsm_deallocate(geo.nsid, 0),
                        Payload::Inline(range.encode()),
                    );
                    n += 1;
                }
                return Ok(n);
            }
            IoOp::WriteZeroes { offset, len, unmap } => {
                let Ok(pieces) = split(offset, len, geo.lba_shift, 1 << 16) else {
                    self.ready.push_back((tag, -libc::EINVAL));
                    return Ok(1);
                };
                let mut n = 0;
                for p in pieces {
                    let nlb = (p.blocks - 1) as u16;
                    self.enqueue(
                        tag,
                        Sqe::write_zeroes(geo.nsid, p.slba, nlb, unmap),
                        Payload::None,
                    );
                    n += 1;
                }
                return Ok(n);
            }
        };
        let len = iov.bytes();
        let Ok(pieces) = split(offset, len, geo.lba_shift, geo.max_rw_blocks) else {
            self.ready.push_back((tag, -libc::EINVAL));
            return Ok(1);
        };
        // SAFETY: the caller keeps the iovec list and the guest memory behind it unchanged
        // until every completion for `tag` is reported (`IoChannel::queue`'s contract).
        let Some(whole) = (unsafe { DataRef::new(iov.as_slice(), 0, len as usize) }) else {
            self.ready.push_back((tag, -libc::EINVAL));
            return Ok(1);
        };
        let mut n = 0;
        for p in pieces {
            let Some(part) = whole.sub(p.offset, p.len) else {
                continue;
            };
            let nlb = (p.blocks - 1) as u16;
            let sqe = if write {
                Sqe::write(geo.nsid, p.slba, nlb, fua)
            } else {
                Sqe::read(geo.nsid, p.slba, nlb, false)
            };
            self.enqueue(tag, sqe, Payload::Data(part, write));
            n += 1;
        }
        Ok(n)
    }

    fn submit(&mut self) -> io::Result<()> {
        if self.queued {
            self.queue.ring_doorbell();
            self.queued = false;
        }
        Ok(())
    }

    fn poll(&mut self, max: usize, mut f: impl FnMut(u32, i32)) -> usize {
        let mut n = 0;
        while n < max {
            let Some((tag, res)) = self.ready.pop_front() else {
                break;
            };
            f(tag, res);
            n += 1;
        }
        let cmds = &mut self.cmds;
        match self.queue.poll(|user, status| {
            let Some(c) = u16::try_from(user).ok().and_then(|id| cmds.remove(id)) else {
                return;
            };
            f(c.tag, result_of(status, c.bytes));
            n += 1;
        }) {
            Ok(_) => {}
            Err(e) => warn!(qid = self.queue.qid(), error = %e, "NVMe queue fault"),
        }
        if !self.backlog.is_empty() {
            self.drain_backlog();
            self.submit().ok();
        }
        n
    }

    /// Completions are polled (no interrupts yet): a poller with commands in flight here must
    /// not sleep.
    fn completion_fd(&self) -> Option<RawFd> {
        None
    }

    fn clear_completion_fd(&self) {}

    fn must_poll(&self) -> bool {
        !self.cmds.is_empty()
    }
}

/// Queues command `id` on `queue` with its payload.
fn submit_to(
    queue: &mut PcieIoQueue,
    id: u16,
    sqe: Sqe,
    payload: Payload,
) -> Result<(), QueueFull> {
    let user = u32::from(id);
    match payload {
        Payload::None => queue.submit(user, sqe, None),
        Payload::Data(d, to_device) => queue.submit(user, sqe, Some((d, to_device))),
        Payload::Inline(b) => queue.submit_inline(user, sqe, &b),
    }
}

fn result_of(status: Status, bytes: u32) -> i32 {
    if status.is_success() {
        i32::try_from(bytes).unwrap_or(i32::MAX)
    } else {
        debug!(%status, "NVMe command failed");
        -libc::EIO
    }
}
