//! The per-poller channel of a local NVMe namespace: virtio-blk operations become NVMe
//! commands on this poller's own I/O queue pair, with PRPs pointing at the guest's buffers
//! (guest memory is DMA-mapped at IOVA = its address), one doorbell write per batch, and
//! completions polled by phase bit.
//!
//! **Recovery.** The channel keeps each command's SQE and data until it completes. A command
//! older than the I/O timeout, a controller fatal status or a queue fault resets the
//! controller, unless another channel already reset it since this channel's queue was created
//! (the controller's generation tells); a queue lost in someone else's reset only needs a new
//! queue. Either way the commands in flight are taken back, a new queue pair is created and
//! they are submitted again. Only when the controller cannot be brought back
//! ([`RECOVERY_ATTEMPTS`] resets) do they fail, after the controller has been disabled and
//! stopped from mastering the bus (so no late DMA reaches a failed request's buffers), and
//! new requests fail at once until a later
//! attempt ([`RETRY_DOWN`] apart) succeeds. A reset blocks the poller that does it (admin
//! commands, bounded by the I/O timeout and CAP.TO).

use std::collections::VecDeque;
use std::io;
use std::os::fd::RawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tracing::{debug, error, info, warn};

use super::Geometry;
use crate::bdev::{ChannelFull, IoChannel, IoOp};
use crate::nvme::cid::CmdTable;
use crate::nvme::data::DataRef;
use crate::nvme::pcie::io::INLINE_LEN;
use crate::nvme::pcie::{PcieController, PcieError, PcieIoQueue, QueueFull};
use crate::nvme::spec::{DsmRange, Sqe, Status};
use crate::nvme::split::split;

/// Commands waiting for a free slot in the queue pair, per slot, before the channel reports
/// itself full.
const BACKLOG_PER_SLOT: usize = 2;
/// Polls between two looks at the oldest command's age and at the controller's status (an
/// MMIO read), while commands are in flight.
const CHECK_EVERY_POLLS: u32 = 256;
/// Resets (and new queues) tried for one failure before the channel's commands fail.
pub const RECOVERY_ATTEMPTS: u32 = 3;
/// While the controller is down, how long before a new request tries to bring it back.
pub const RETRY_DOWN: Duration = Duration::from_secs(5);

/// Debugging only, off unless set: after this many commands submitted on a channel, the
/// controller is reset once (once per process) with commands in flight, to exercise
/// recovery. Read once when a channel is created.
pub const DEBUG_RESET_ENV: &str = "VUBD_DEBUG_NVME_RESET_AFTER";
/// The debug reset of [`DEBUG_RESET_ENV`] happened.
static DEBUG_RESET_DONE: AtomicBool = AtomicBool::new(false);

/// What a command carries besides its SQE.
#[derive(Clone, Copy, Debug)]
enum Payload {
    None,
    /// Guest data (`true`: to the device).
    Data(DataRef, bool),
    /// A Dataset Management range, copied into the queue's DMA memory.
    Inline([u8; INLINE_LEN]),
}

/// A command of the channel: the request it belongs to, the bytes it moves, and what it takes
/// to submit it again after a reset.
#[derive(Debug, Clone, Copy)]
struct Cmd {
    tag: u32,
    bytes: u32,
    sqe: Sqe,
    payload: Payload,
}

#[derive(Debug)]
pub struct NvmePcieChannel {
    geo: Geometry,
    ctrl: Arc<PcieController>,
    /// `None` while the controller is down (recovery failed).
    queue: Option<PcieIoQueue>,
    depth: u16,
    /// Commands submitted or waiting, by the id the queue reports them with.
    cmds: CmdTable<Cmd>,
    /// Commands in `cmds` not in the queue.
    backlog: VecDeque<u16>,
    backlog_max: usize,
    /// Results known without the controller (a flush without a volatile cache, refusals).
    ready: VecDeque<(u32, i32)>,
    /// Commands were queued since the last doorbell.
    queued: bool,
    /// Polls until the next timeout and status check.
    until_check: u32,
    /// When recovery last failed, while the controller is down.
    down_since: Option<Instant>,
    /// [`DEBUG_RESET_ENV`]: commands still to submit before the debug reset.
    debug_reset_in: Option<u64>,
}

impl NvmePcieChannel {
    pub(super) fn new(geo: Geometry, ctrl: Arc<PcieController>, queue: PcieIoQueue) -> Self {
        let depth = queue.depth();
        let backlog_max = depth * BACKLOG_PER_SLOT;
        let debug_reset_in = std::env::var(DEBUG_RESET_ENV)
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok());
        if let Some(n) = debug_reset_in {
            warn!(
                qid = queue.qid(),
                after = n,
                "{DEBUG_RESET_ENV} is set: the controller will be reset during I/O (debugging)"
            );
        }
        Self {
            geo,
            ctrl,
            depth: u16::try_from(depth).unwrap_or(u16::MAX),
            queue: Some(queue),
            cmds: CmdTable::new(u16::try_from(depth + backlog_max).unwrap_or(4096)),
            backlog: VecDeque::with_capacity(backlog_max),
            backlog_max,
            ready: VecDeque::with_capacity(backlog_max),
            queued: false,
            until_check: CHECK_EVERY_POLLS,
            down_since: None,
            debug_reset_in,
        }
    }

    fn enqueue(&mut self, tag: u32, sqe: Sqe, payload: Payload) {
        let bytes = match payload {
            Payload::Data(d, _) => u32::try_from(d.len()).unwrap_or(u32::MAX),
            Payload::None | Payload::Inline(_) => 0,
        };
        let cmd = Cmd {
            tag,
            bytes,
            sqe,
            payload,
        };
        let Some(id) = self.cmds.insert(cmd) else {
            // Unreachable: the table holds the queue's depth and the whole backlog.
            self.ready.push_back((tag, -libc::EBUSY));
            return;
        };
        if self.backlog.is_empty()
            && let Some(q) = self.queue.as_mut()
            && q.has_room()
            && submit_to(q, id, &cmd).is_ok()
        {
            self.submitted(1);
            return;
        }
        self.backlog.push_back(id);
    }

    fn drain_backlog(&mut self) {
        let Some(q) = self.queue.as_mut() else {
            return;
        };
        let mut n = 0;
        while q.has_room() {
            let Some(id) = self.backlog.pop_front() else {
                break;
            };
            let Some(cmd) = self.cmds.get(id) else {
                continue;
            };
            if submit_to(q, id, cmd).is_err() {
                self.backlog.push_front(id);
                break;
            }
            n += 1;
        }
        self.submitted(n);
    }

    /// `n` commands went into the queue.
    fn submitted(&mut self, n: u64) {
        if n == 0 {
            return;
        }
        self.queued = true;
        if let Some(left) = self.debug_reset_in.as_mut() {
            *left = left.saturating_sub(n);
        }
    }

    /// Commands too old, or a controller in a fatal state: recovers. Every
    /// [`CHECK_EVERY_POLLS`] polls with commands in flight.
    fn check_health(&mut self) {
        let Some(q) = self.queue.as_ref() else {
            return;
        };
        if q.in_flight() == 0 {
            return;
        }
        if self.debug_reset_in == Some(0) {
            self.debug_reset_in = None;
            if !DEBUG_RESET_DONE.swap(true, Ordering::AcqRel) {
                warn!(
                    qid = q.qid(),
                    in_flight = q.in_flight(),
                    "{DEBUG_RESET_ENV}: forcing a controller reset (debugging)"
                );
                self.recover("debug reset");
                return;
            }
        }
        self.until_check -= 1;
        if self.until_check > 0 {
            return;
        }
        self.until_check = CHECK_EVERY_POLLS;
        if let Some(oldest) = q.oldest()
            && oldest.elapsed() > self.geo.io_timeout
        {
            warn!(
                qid = q.qid(),
                waited_ms = oldest.elapsed().as_millis(),
                "NVMe I/O timeout"
            );
            self.recover("I/O timeout");
        } else if self.ctrl.fatal() {
            warn!(qid = q.qid(), "NVMe controller fatal status");
            self.recover("controller fatal status");
        }
    }

    /// Takes the commands back from the queue, resets the controller unless another channel
    /// already did since the queue was created, creates a new queue pair and submits them
    /// again; fails them after [`RECOVERY_ATTEMPTS`].
    #[cold]
    fn recover(&mut self, why: &str) {
        let mut back = Vec::new();
        let (mut generation, old_qid) = match self.queue.as_mut() {
            Some(q) => {
                q.drain(|user| back.push(user));
                (q.generation(), q.qid())
            }
            None => (self.ctrl.generation(), 0),
        };
        // Resubmitted first, in the order they were taken back.
        for &user in back.iter().rev() {
            if let Ok(id) = u16::try_from(user) {
                self.backlog.push_front(id);
            }
        }
        let mut old = self.queue.take();
        let mut last_err: Option<PcieError> = None;
        for attempt in 1..=RECOVERY_ATTEMPTS {
            match self.ctrl.reset_if(generation) {
                Ok(true) => warn!(
                    bdf = self.ctrl.bdf(),
                    qid = old_qid,
                    reason = why,
                    attempt,
                    generation = self.ctrl.generation(),
                    "NVMe controller reset"
                ),
                Ok(false) => debug!(
                    qid = old_qid,
                    "NVMe controller already reset by another queue"
                ),
                Err(e) => {
                    warn!(bdf = self.ctrl.bdf(), attempt, error = %e, "NVMe controller reset failed");
                    generation = self.ctrl.generation();
                    last_err = Some(e);
                    continue;
                }
            }
            // The old queue is gone with the reset: dropping it sends no Delete commands and
            // frees its QID (and its memory, which the controller no longer uses).
            drop(old.take());
            match self.ctrl.create_io_queue(self.depth) {
                Ok(q) => {
                    info!(
                        qid = q.qid(),
                        generation = q.generation(),
                        resubmitted = back.len(),
                        "NVMe I/O queue re-created; commands resubmitted"
                    );
                    self.queue = Some(q);
                    self.down_since = None;
                    self.until_check = CHECK_EVERY_POLLS;
                    self.drain_backlog();
                    self.ring();
                    return;
                }
                Err(e) => {
                    warn!(bdf = self.ctrl.bdf(), attempt, error = %e, "cannot create an NVMe I/O queue");
                    generation = self.ctrl.generation();
                    last_err = Some(e);
                }
            }
        }
        drop(old);
        error!(
            bdf = self.ctrl.bdf(),
            error = last_err.map(|e| e.to_string()).unwrap_or_default(),
            "NVMe controller cannot be brought back: failing its I/O"
        );
        self.down_since = Some(Instant::now());
        // Nothing the controller still holds may reach guest memory once its requests are
        // failed: stop it from mastering the bus first.
        if let Err(e) = self.ctrl.stop_dma() {
            warn!(bdf = self.ctrl.bdf(), error = %e, "cannot stop the NVMe controller's DMA");
        }
        self.fail_everything();
    }

    /// Fails every command the channel holds (the controller is down).
    #[cold]
    fn fail_everything(&mut self) {
        self.backlog.clear();
        let ids: Vec<u16> = self.cmds.cids().collect();
        for id in ids {
            if let Some(c) = self.cmds.remove(id) {
                self.ready.push_back((c.tag, -libc::EIO));
            }
        }
    }

    /// While the controller is down: whether it is back (tried at most every
    /// [`RETRY_DOWN`]).
    #[cold]
    fn come_back(&mut self) -> bool {
        if self.down_since.is_some_and(|t| t.elapsed() >= RETRY_DOWN) {
            self.recover("retry after failure");
        }
        self.queue.is_some()
    }

    fn ring(&mut self) {
        if self.queued {
            if let Some(q) = self.queue.as_mut() {
                q.ring_doorbell();
            }
            self.queued = false;
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
        if self.queue.is_none() && !self.come_back() {
            // Fail fast while the controller is down.
            self.ready.push_back((tag, -libc::EIO));
            return Ok(1);
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
        // until every completion for `tag` is reported (`IoChannel::queue`'s contract); the
        // channel keeps the reference (to submit again after a reset) no longer than that.
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
        self.ring();
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
        let Some(q) = self.queue.as_mut() else {
            return n;
        };
        let cmds = &mut self.cmds;
        let polled = q.poll(|user, status| {
            let Some(c) = u16::try_from(user).ok().and_then(|id| cmds.remove(id)) else {
                return;
            };
            f(c.tag, result_of(status, c.bytes));
            n += 1;
        });
        match polled {
            Ok(_) => self.check_health(),
            Err(e @ PcieError::QueueLost { .. }) => {
                info!(qid = q.qid(), "{e}");
                self.recover("queue lost in a reset");
            }
            Err(e) => {
                warn!(qid = q.qid(), error = %e, "NVMe queue fault");
                self.recover("queue fault");
            }
        }
        if !self.backlog.is_empty() {
            self.drain_backlog();
            self.ring();
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
        !self.cmds.is_empty() || !self.ready.is_empty()
    }
}

/// Queues command `id` on `queue` with its payload.
fn submit_to(queue: &mut PcieIoQueue, id: u16, cmd: &Cmd) -> Result<(), QueueFull> {
    let user = u32::from(id);
    match cmd.payload {
        Payload::None => queue.submit(user, cmd.sqe, None),
        Payload::Data(d, to_device) => queue.submit(user, cmd.sqe, Some((d, to_device))),
        Payload::Inline(b) => queue.submit_inline(user, cmd.sqe, &b),
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
