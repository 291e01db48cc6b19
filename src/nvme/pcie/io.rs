//! An I/O queue pair of a controller owned through VFIO, for one poller thread. Completions
//! are found by polling; with an MSI-X vector, its eventfd also tells when there are some.
//!
//! Its memory is one [`DmaBuf`]: the submission ring, the completion ring, one list area per
//! command (a PRP list or an SGL segment, sized for the largest transfer) and a few bounce
//! buffers. Submitting builds the command's data pointer without a system call or an
//! allocation: PRPs when the data follows their rules, else an SGL when the controller takes
//! them, else a copy through a bounce buffer ([`layout::describe`]). The doorbell is written
//! once per batch; completions are found by their phase tag and the CQ head doorbell is
//! written once per poll.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use thiserror::Error;

use super::ctrl::PcieController;
use super::error::PcieError;
use super::layout::{self, Layout};
use super::prp;
use super::regs::{cq_head_doorbell, sq_tail_doorbell};
use super::ring::{DmaCq, DmaSq};
use super::sgl::SglAlign;
use super::vfio::DmaBuf;
use super::{PageSize, QueuePair};
use crate::nvme::data::DataRef;
use crate::nvme::spec::{Cqe, Sqe, Status, sc, sct};

/// Bounce buffers per queue, each of the largest transfer.
const BOUNCE_BUFFERS: usize = 4;
/// Bytes of payload [`PcieIoQueue::submit_inline`] carries.
pub const INLINE_LEN: usize = 16;

/// The queue has no room for the command now: poll for completions and try again.
#[derive(Clone, Copy, Debug, Error, PartialEq, Eq)]
#[error("I/O queue full")]
pub struct QueueFull;

/// Why a command did not reach the submission queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum NotSent {
    /// No room now (SQ or bounce buffers): the caller tries again later.
    Full,
    /// Its data cannot be described: it is in `failed`, completed by the next poll.
    Failed,
}

/// A command whose data passes through a bounce buffer.
#[derive(Debug)]
struct Bounce {
    slot: u8,
    data: DataRef,
    to_device: bool,
}

/// One command in flight.
#[derive(Debug)]
struct Cmd {
    user: u32,
    area: u16,
    bounce: Option<Bounce>,
    since: Instant,
}

/// An I/O submission / completion queue pair; owned by one thread (`Send`, not `Sync`).
#[derive(Debug)]
pub struct PcieIoQueue {
    // Before `mem`: the rings point into it.
    qp: QueuePair<Cmd, DmaSq, DmaCq>,
    mem: DmaBuf,
    ctrl: Arc<PcieController>,
    qid: u16,
    /// The MSI-X vector of its completion queue, if interrupts are on.
    vector: Option<u16>,
    generation: u64,
    sq_db: usize,
    cq_db: usize,
    page: PageSize,
    sgl: Option<SglAlign>,
    max_len: usize,
    area_off: usize,
    area_bytes: usize,
    free_areas: Vec<u16>,
    bounce_off: usize,
    free_bounce: Vec<u8>,
    /// The submission time of the commands queued since the last doorbell (the first one's):
    /// one clock read per batch, not per command. Timeouts are seconds; a batch is queued
    /// and rung within one pass of the owner's loop.
    batch_time: Option<Instant>,
    /// Commands refused before submission, completed at the next poll.
    failed: VecDeque<(u32, Status)>,
    bounces: u64,
    /// The controller no longer has the queue ([`PcieIoQueue::delete`] ran).
    deleted: bool,
}

// Created on the control path, then moved to its poller.
const _: () = {
    const fn movable<T: Send>() {}
    movable::<PcieIoQueue>();
};

fn round_up(n: usize, to: usize) -> usize {
    n.div_ceil(to) * to
}

/// The status of a command whose data the driver cannot describe.
fn unusable_status() -> Status {
    Status::new(sct::GENERIC, sc::INVALID_FIELD, true)
}

impl PcieIoQueue {
    /// Creates queue pair `depth` deep on `ctrl` (see [`PcieController::create_io_queue`]).
    pub(super) fn create(ctrl: Arc<PcieController>, depth: u16) -> Result<PcieIoQueue, PcieError> {
        // One ring entry is always empty; the rings hold at most MQES + 1 entries, and the
        // command table 4096 commands.
        let max = u32::from(ctrl.cap().mqes()).min(4095);
        if depth == 0 || u32::from(depth) > max {
            return Err(PcieError::QueueDepth { depth, max });
        }
        let qid = ctrl.alloc_qid().ok_or(PcieError::NoQueueId {
            granted: ctrl.io_queues_granted(),
        })?;
        Self::create_with(ctrl.clone(), qid, depth).inspect_err(|_| ctrl.free_qid(qid))
    }

    fn create_with(
        ctrl: Arc<PcieController>,
        qid: u16,
        depth: u16,
    ) -> Result<PcieIoQueue, PcieError> {
        let page = ctrl.page_size();
        let p = page.bytes();
        let entries = depth + 1;
        let n = usize::from(entries);
        let max_len = ctrl
            .max_transfer_bytes()
            .and_then(|m| usize::try_from(m).ok())
            .unwrap_or(p);
        // A list area holds the PRP list of the largest transfer, and at least a page.
        let area_bytes = round_up((prp::list_slots_for(max_len, page) * 8).max(p), p);
        let sq_bytes = round_up(n * 64, p);
        let cq_bytes = round_up(n * 16, p);
        let area_off = sq_bytes + cq_bytes;
        let bounce_off = area_off + usize::from(depth) * area_bytes;
        let bounce_len = round_up(max_len, p);
        let total = bounce_off + BOUNCE_BUFFERS * bounce_len;
        let mem = DmaBuf::new(ctrl.nvme(), total)?;
        let (Some(sq), Some(cq)) = (mem.at(0), mem.at(sq_bytes)) else {
            return Err(PcieError::QueueDepth {
                depth,
                max: u32::from(depth),
            });
        };
        // SAFETY: both rings lie inside `mem` (n entries each, in their own page-aligned
        // areas), are used for nothing else, and `mem` outlives them (field order). Only the
        // controller writes the CQ.
        let (sq_mem, cq_mem) = unsafe { (DmaSq::new(sq.cast(), n), DmaCq::new(cq.cast(), n)) };
        let qp = QueuePair::new(qid, sq_mem, cq_mem).map_err(|source| PcieError::Queue {
            qid,
            source: source.into(),
        })?;
        let (sq_iova, cq_iova) = (mem.iova(), mem.iova() + sq_bytes as u64);
        let vector = ctrl.vector_for(qid);
        let generation = ctrl.create_queue_pair(qid, entries, sq_iova, cq_iova, vector)?;
        let dstrd = ctrl.cap().dstrd();
        let depth_n = usize::from(depth);
        Ok(PcieIoQueue {
            qp,
            mem,
            qid,
            vector,
            generation,
            sq_db: sq_tail_doorbell(qid, dstrd),
            cq_db: cq_head_doorbell(qid, dstrd),
            page,
            sgl: ctrl.sgl_align(),
            max_len,
            area_off,
            area_bytes,
            free_areas: (0..depth).rev().collect(),
            bounce_off,
            free_bounce: (0..BOUNCE_BUFFERS as u8).rev().collect(),
            batch_time: None,
            failed: VecDeque::with_capacity(depth_n),
            bounces: 0,
            deleted: false,
            ctrl,
        })
    }

    pub fn qid(&self) -> u16 {
        self.qid
    }

    /// The MSI-X vector the queue's completions raise, if it has one.
    pub fn vector(&self) -> Option<u16> {
        self.vector
    }

    /// Readable when the controller has raised the queue's vector since it was last read
    /// (non-blocking): completions may be waiting. `None`: the queue has no interrupts and
    /// must be polled. A later queue with the same QID (once this one is gone) gets the same one.
    pub fn event_fd(&self) -> Option<&vmm_sys_util::eventfd::EventFd> {
        self.vector.and_then(|v| self.ctrl.vector_fd(v))
    }

    /// Completions known without the controller (commands whose data could not be
    /// described) wait for the next poll; no interrupt announces them.
    pub fn has_local_completions(&self) -> bool {
        !self.failed.is_empty()
    }

    /// The controller generation the queue was created in (see [`PcieController::reset`]).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Commands that can be in flight at once.
    pub fn depth(&self) -> usize {
        self.qp.depth()
    }

    pub fn in_flight(&self) -> usize {
        self.qp.in_flight() + self.failed.len()
    }

    /// Room for one more command (one needing a bounce buffer may still find none free).
    pub fn has_room(&self) -> bool {
        self.in_flight() < self.qp.depth() && !self.free_areas.is_empty()
    }

    /// Commands whose data went through a bounce buffer so far.
    pub fn bounces(&self) -> u64 {
        self.bounces
    }

    /// When the oldest command in flight was submitted.
    pub fn oldest(&self) -> Option<Instant> {
        self.oldest_command().map(|(_, _, since)| since)
    }

    /// The oldest command in flight: its CID, its `user` value and when it was submitted.
    ///
    /// A scan of the command table (at most the queue's depth): callers look at the oldest
    /// command every few hundred polls, not per command, so keeping the commands in
    /// submission order (a push per submit, a pop per completion) would cost more.
    pub fn oldest_command(&self) -> Option<(u16, u32, Instant)> {
        self.qp
            .cids()
            .filter_map(|cid| self.qp.get(cid).map(|c| (cid, c.user, c.since)))
            .min_by_key(|&(_, _, since)| since)
    }

    /// Command `cid` submitted at `since` is still in flight.
    pub fn holds(&self, cid: u16, since: Instant) -> bool {
        self.qp.get(cid).is_some_and(|c| c.since == since)
    }

    /// The address of command list area `i`.
    fn area(&self, i: u16) -> Option<(std::ptr::NonNull<u8>, u64)> {
        let off = self.area_off + usize::from(i) * self.area_bytes;
        self.mem.at(off).map(|p| (p, self.mem.iova() + off as u64))
    }

    /// Queues `sqe` with `data` (iovec addresses are IOVAs; `true`: to the device), as
    /// command `user`. Nothing reaches the controller before [`PcieIoQueue::ring_doorbell`].
    /// Data that cannot be described at all (longer than the largest transfer) completes at
    /// the next poll with Invalid Field.
    pub fn submit(
        &mut self,
        user: u32,
        sqe: Sqe,
        data: Option<(DataRef, bool)>,
    ) -> Result<(), QueueFull> {
        if !self.has_room() {
            return Err(QueueFull);
        }
        let Some(area) = self.free_areas.pop() else {
            return Err(QueueFull);
        };
        match self.submit_in(user, &sqe, data, area) {
            Ok(()) => Ok(()),
            Err(not_sent) => {
                self.free_areas.push(area);
                match not_sent {
                    NotSent::Full => Err(QueueFull),
                    // Reported by the next poll.
                    NotSent::Failed => Ok(()),
                }
            }
        }
    }

    /// Queues `sqe` with a 16-byte payload the controller reads (a Dataset Management range,
    /// say), as command `user`. The payload is copied into the command's list area, which
    /// lives as long as the command and which a payload this small needs no PRP list from:
    /// PRP1 points at it. Nothing reaches the controller before
    /// [`PcieIoQueue::ring_doorbell`].
    pub fn submit_inline(
        &mut self,
        user: u32,
        sqe: Sqe,
        payload: &[u8; INLINE_LEN],
    ) -> Result<(), QueueFull> {
        if !self.has_room() {
            return Err(QueueFull);
        }
        let Some(area) = self.free_areas.pop() else {
            return Err(QueueFull);
        };
        let Some((area_ptr, area_iova)) = self.area(area) else {
            self.free_areas.push(area);
            return Err(QueueFull);
        };
        // SAFETY: list area `area` was taken from the free list, so no command in flight uses
        // it and the controller does not read it until this command is submitted; it is
        // `area_bytes` long inside `mem`, and the slice lives only for this statement.
        let list = unsafe { std::slice::from_raw_parts_mut(area_ptr.as_ptr(), self.area_bytes) };
        let Some(dptr) = put_inline(list, area_iova, payload) else {
            self.free_areas.push(area);
            return Err(QueueFull);
        };
        match self.push(user, &sqe, dptr, area, None) {
            Ok(()) => Ok(()),
            Err(NotSent::Full | NotSent::Failed) => {
                self.free_areas.push(area);
                Err(QueueFull)
            }
        }
    }

    /// `submit` with list area `area` taken; the caller takes it back on an `Err`.
    fn submit_in(
        &mut self,
        user: u32,
        sqe: &Sqe,
        data: Option<(DataRef, bool)>,
        area: u16,
    ) -> Result<(), NotSent> {
        let Some((area_ptr, area_iova)) = self.area(area) else {
            return Err(NotSent::Full);
        };
        let slots = self.area_bytes / 8;
        let mut bounce = None;
        let dptr = match data {
            None => super::Dptr::NONE,
            Some((d, to_device)) => {
                // SAFETY: list area `area` was taken from the free list, so no command in
                // flight uses it and the controller does not read it until this command is
                // submitted; it is 8-byte aligned (page aligned areas) and `slots` qwords long
                // inside `mem`. The slice lives only for this block.
                let list = unsafe {
                    std::slice::from_raw_parts_mut(area_ptr.as_ptr().cast::<u64>(), slots)
                };
                match layout::describe(&d, self.max_len, self.page, self.sgl, list, area_iova) {
                    Ok(Layout::Prp(p)) => p.dptr(),
                    Ok(Layout::Sgl(s)) => s.dptr(),
                    Ok(Layout::Bounce) => {
                        let Some(slot) = self.free_bounce.pop() else {
                            return Err(NotSent::Full);
                        };
                        let (buf, iova) = self.bounce_at(slot);
                        if to_device {
                            let mut at = 0;
                            d.for_each_piece(0, d.len(), |p, n| {
                                // SAFETY: `p..p + n` is a piece of the caller's data (mapped,
                                // per `DataRef::new`); the bounce buffer is free, so the
                                // controller is not reading it, and `at + n <= d.len()` fits
                                // in it (`describe` checked the length against max_len).
                                unsafe { std::ptr::copy_nonoverlapping(p, buf.add(at), n) };
                                at += n;
                            });
                        }
                        let v = [libc::iovec {
                            iov_base: iova as *mut libc::c_void,
                            iov_len: d.len(),
                        }];
                        // SAFETY: the iovec describes the bounce buffer, which this command
                        // holds until it completes; `v` outlives the `DataRef`.
                        let Some(bd) = (unsafe { DataRef::new(&v, 0, d.len()) }) else {
                            self.free_bounce.push(slot);
                            return Err(NotSent::Full);
                        };
                        match layout::prps(&bd, self.page, list, area_iova) {
                            Ok(p) => {
                                self.bounces += 1;
                                self.ctrl.note_bounce(self.qid);
                                bounce = Some(Bounce {
                                    slot,
                                    data: d,
                                    to_device,
                                });
                                p.dptr()
                            }
                            Err(_) => {
                                self.free_bounce.push(slot);
                                self.failed.push_back((user, unusable_status()));
                                return Err(NotSent::Failed);
                            }
                        }
                    }
                    Err(_) => {
                        self.failed.push_back((user, unusable_status()));
                        return Err(NotSent::Failed);
                    }
                }
            }
        };
        self.push(user, sqe, dptr, area, bounce)
    }

    /// Puts the command in the submission ring with its data pointer built; on an `Err` the
    /// bounce buffer is free again and the caller takes list area `area` back.
    fn push(
        &mut self,
        user: u32,
        sqe: &Sqe,
        dptr: super::Dptr,
        area: u16,
        bounce: Option<Bounce>,
    ) -> Result<(), NotSent> {
        let since = self.batch_time.unwrap_or_else(Instant::now);
        let cmd = Cmd {
            user,
            area,
            bounce,
            since,
        };
        match self.qp.submit(sqe, dptr, cmd) {
            Ok(_) => {
                self.batch_time = Some(since);
                Ok(())
            }
            Err((_, cmd)) => {
                if let Some(b) = cmd.bounce {
                    self.free_bounce.push(b.slot);
                }
                Err(NotSent::Full)
            }
        }
    }

    /// Bounce buffer `slot`: its address and IOVA (the same number).
    fn bounce_at(&self, slot: u8) -> (*mut u8, u64) {
        let off = self.bounce_off + usize::from(slot) * round_up(self.max_len, self.page.bytes());
        let p = self
            .mem
            .at(off)
            .map_or(std::ptr::null_mut(), std::ptr::NonNull::as_ptr);
        (p, self.mem.iova() + off as u64)
    }

    /// Tells the controller about the commands queued since the last call, if any.
    pub fn ring_doorbell(&mut self) {
        self.batch_time = None;
        if let Some(v) = self.qp.take_sq_doorbell() {
            self.ctrl.nvme().write32(self.sq_db, v);
        }
    }

    /// Hands every completion so far to `f` as `(user, status)`; returns how many. Data of
    /// bounced reads is copied back first. A controller that broke the queue protocol, or a
    /// queue lost in a reset, is an error: see [`PcieController::reset`].
    pub fn poll(&mut self, mut f: impl FnMut(u32, Status)) -> Result<usize, PcieError> {
        if self.ctrl.generation() != self.generation {
            return Err(PcieError::QueueLost { qid: self.qid });
        }
        let mut n = 0;
        while let Some((user, status)) = self.failed.pop_front() {
            f(user, status);
            n += 1;
        }
        let bounce_len = round_up(self.max_len, self.page.bytes());
        let bounce_base = self.mem.at(self.bounce_off);
        let Self {
            qp,
            free_areas,
            free_bounce,
            ..
        } = self;
        let polled = qp.poll(usize::MAX, |cmd: Cmd, cqe: Cqe| {
            let status = cqe.status();
            if let Some(b) = cmd.bounce {
                if !b.to_device && status.is_success() {
                    copy_back(bounce_base, usize::from(b.slot) * bounce_len, &b.data);
                }
                free_bounce.push(b.slot);
            }
            free_areas.push(cmd.area);
            f(cmd.user, status);
        });
        if let Some(v) = self.qp.take_cq_doorbell() {
            self.ctrl.nvme().write32(self.cq_db, v);
        }
        let done = polled.map_err(|source| PcieError::Queue {
            qid: self.qid,
            source,
        })?;
        Ok(n + done)
    }

    /// Takes back every command not completed (after [`PcieError::QueueLost`] or a fault),
    /// handing their `user` values to `f`; the queue is then empty.
    pub fn drain(&mut self, mut f: impl FnMut(u32)) {
        while let Some((user, _)) = self.failed.pop_front() {
            f(user);
        }
        let cids: Vec<u16> = self.qp.cids().collect();
        for cid in cids {
            if let Some(cmd) = self.qp.take(cid) {
                if let Some(b) = cmd.bounce {
                    self.free_bounce.push(b.slot);
                }
                self.free_areas.push(cmd.area);
                f(cmd.user);
            }
        }
    }
}

/// Puts a small payload at the start of a command's list area (at `area_iova`) and returns
/// the data pointer to it: PRP1 alone, as the payload does not cross a page. `None` if the
/// area is too small.
pub(super) fn put_inline(
    area: &mut [u8],
    area_iova: u64,
    payload: &[u8; INLINE_LEN],
) -> Option<super::Dptr> {
    area.get_mut(..INLINE_LEN)?.copy_from_slice(payload);
    Some(super::Dptr::Prp {
        prp1: area_iova,
        prp2: 0,
    })
}

/// Copies a bounced read from the bounce buffer at `base + off` into the command's data.
fn copy_back(base: Option<std::ptr::NonNull<u8>>, off: usize, data: &DataRef) {
    let Some(base) = base else { return };
    let mut at = off;
    data.for_each_piece(0, data.len(), |p, n| {
        // SAFETY: the bounce buffer holds the command's data (at most one bounce buffer's
        // worth, checked at submission) and the controller has finished with it (the command
        // completed); `p..p + n` is a piece of the caller's buffers, mapped per
        // `DataRef::new`.
        unsafe { std::ptr::copy_nonoverlapping(base.as_ptr().add(at), p, n) };
        at += n;
    });
}

impl PcieIoQueue {
    /// Deletes the queue pair on the controller (SQ, then CQ) and reports how that went;
    /// dropping the queue does the same and only logs a failure. Commands still in flight are
    /// aborted by the controller and never reported.
    pub fn delete(mut self) -> Result<(), PcieError> {
        self.deleted = true;
        self.ctrl.delete_queue_pair(self.qid, self.generation)
    }
}

impl Drop for PcieIoQueue {
    /// Deletes the SQ then the CQ (commands still in flight are aborted by the controller),
    /// unless a reset or [`PcieIoQueue::delete`] already did; the QID goes back to the pool
    /// either way.
    fn drop(&mut self) {
        let ctrl = self.ctrl.clone();
        if !self.deleted {
            if let Err(e) = ctrl.delete_queue_pair(self.qid, self.generation) {
                tracing::warn!("{}: I/O queue {}: {e}", ctrl.bdf(), self.qid);
            }
        }
        ctrl.free_qid(self.qid);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nvme::pcie::Loopback;
    use crate::nvme::pcie::ring::SqSlot;
    use crate::nvme::spec::DsmRange;

    #[test]
    fn an_inline_payload_is_in_the_list_area_and_prp1_points_at_it() {
        let mut area = vec![0xeeu8; 4096];
        let iova = 0x7f00_0004_2000;
        let range = DsmRange {
            context_attributes: 0,
            nlb: 8,
            slba: 0x1234,
        };
        let dptr = put_inline(&mut area, iova, &range.encode()).expect("room");
        assert_eq!(area[..INLINE_LEN], range.encode());
        assert!(area[INLINE_LEN..].iter().all(|&b| b == 0xee));
        assert!(put_inline(&mut [0; 8], iova, &range.encode()).is_none());

        // Through a queue pair and the controller model: the SQE carries the DSM dwords and
        // PRP1 = the area, PRP2 = 0, and the command completes with its value.
        let mut q: QueuePair<u32, Vec<SqSlot>, Vec<Cqe>> =
            QueuePair::new(1, vec![[0; 64]; 4], vec![Cqe::from_bytes([0; 16]); 4]).expect("q");
        let cid = q
            .submit(&Sqe::dsm_deallocate(2, 0), dptr, 7)
            .map_err(|(e, _)| e)
            .expect("room");
        let e = q.sq().mem()[0];
        assert_eq!(e[0], 0x09, "DSM opcode");
        assert_eq!(e[1] & 0xc0, 0, "PSDT: PRPs");
        assert_eq!(e[24..32], iova.to_le_bytes());
        assert_eq!(e[32..40], [0; 8]);
        assert_eq!(e[40..44], 0u32.to_le_bytes(), "one range");
        assert_eq!(e[44..48], 4u32.to_le_bytes(), "deallocate");
        let mut dev = Loopback::new(1);
        let tail = q.take_sq_doorbell().expect("doorbell");
        assert_eq!(dev.sq_doorbell(&mut q, tail), 1);
        let mut done = Vec::new();
        q.poll(usize::MAX, |v, cqe| done.push((v, cqe.cid(), cqe.status())))
            .expect("poll");
        assert_eq!(done, [(7, cid, Status::SUCCESS)]);
    }
}
