//! The per-poller channel of a local NVMe namespace: virtio-blk operations become NVMe
//! commands on this poller's own I/O queue pair, with PRPs pointing at the guest's buffers
//! (guest memory is DMA-mapped at IOVA = its address), one doorbell write per batch, and
//! completions polled by phase bit.
//!
//! **Recovery.** The channel keeps each command's SQE and data until it completes. A command
//! older than the I/O timeout is aborted first (Abort, on the admin queue; see
//! [`crate::nvme::pcie::abort`]): if the controller performs the abort, the command completes
//! with *Command Abort Requested* and is submitted again; a command is aborted once, so a
//! second timeout of the same command goes on as below. An abort not performed, an Abort that
//! fails or times out, or an aborted command not completed within
//! [`ABORT_GRACE`](crate::nvme::pcie::abort::ABORT_GRACE), as well as a controller fatal
//! status or a queue fault, resets the controller, unless another channel already reset it
//! since this channel's queue was created (the controller's generation tells); a queue lost
//! in someone else's reset only needs a new queue. Either way the commands in flight are
//! taken back, a new queue pair is created and they are submitted again. Only when the
//! controller cannot be brought back ([`RECOVERY_ATTEMPTS`] resets) do they fail, after the
//! controller has been disabled and stopped from mastering the bus (so no late DMA reaches a
//! failed request's buffers), and new requests fail at once until a later attempt
//! ([`RETRY_DOWN`] apart) succeeds. An Abort or a reset blocks the poller that does it
//! (admin commands, bounded by the I/O timeout and CAP.TO).
//!
//! **Sleeping.** When the controller's I/O queues have MSI-X interrupts, the channel's
//! completion fd is an epoll fd of its own holding the queue's vector eventfd (re-watched
//! when recovery brings a new queue) and a timerfd armed for when the oldest command would
//! pass the I/O timeout, so an adaptive poller sleeps with commands in flight and still
//! notices a controller that went silent. An interrupt raised while the poller was polling
//! leaves the eventfd readable: one needless wake-up at most. Without interrupts (none on
//! the device, `interrupts=0`, or no vector left for this queue) the poller keeps polling
//! while commands are in flight.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tracing::{debug, error, info, warn};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::timerfd::TimerFd;

use super::Geometry;
use crate::bdev::nvme_ops::{CmdData, Namespace, Translated, translate};
use crate::bdev::{ChannelFull, IoChannel, IoOp};
use crate::nvme::cid::CmdTable;
use crate::nvme::data::DataRef;
use crate::nvme::pcie::abort::{self, Aborting, Check, OnTimeout};
use crate::nvme::pcie::io::INLINE_LEN;
use crate::nvme::pcie::{PcieController, PcieError, PcieIoQueue, QueueFull};
use crate::nvme::spec::{Sqe, Status};

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

/// Polls between two looks at the clock while the timeout timer is armed: the clock is not
/// read on every pass of a poller's loop (the timer's moment is seconds away).
const TIMER_CHECK_POLLS: u32 = 64;
/// How long after the oldest command's timeout a sleeping poller is woken to look at it.
const TIMEOUT_SLACK: Duration = Duration::from_millis(10);
/// Epoll data in the channel's own epoll fd.
const IRQ_EVENT: u64 = 0;
const TIMER_EVENT: u64 = 1;

/// The debug reset (`NvmePcieConfig::debug_reset_after`) happened.
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
    /// This command timed out once and was aborted.
    aborted: bool,
}

/// What a poller sleeps on when the queue has interrupts.
#[derive(Debug)]
struct Wait {
    epoll: Epoll,
    /// The vector eventfd in `epoll`: the current queue's, if it has one.
    watched: Option<RawFd>,
    timer: TimerFd,
    /// When `timer` fires, while it is armed.
    timer_at: Option<Instant>,
    /// Polls left before the armed timer's moment is compared with the clock.
    timer_polls: u32,
}

impl Wait {
    fn new() -> io::Result<Wait> {
        let epoll = Epoll::new()?;
        let timer = TimerFd::new()?;
        epoll.ctl(
            ControlOperation::Add,
            timer.as_raw_fd(),
            EpollEvent::new(EventSet::IN, TIMER_EVENT),
        )?;
        Ok(Wait {
            epoll,
            watched: None,
            timer,
            timer_at: None,
            timer_polls: 0,
        })
    }

    /// Watches `fd` (the current queue's vector eventfd) instead of the one watched so far.
    fn watch(&mut self, fd: Option<RawFd>) {
        if fd == self.watched {
            return;
        }
        if let Some(old) = self.watched.take() {
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                old,
                EpollEvent::new(EventSet::IN, IRQ_EVENT),
            );
        }
        if let Some(fd) = fd {
            match self.epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, IRQ_EVENT),
            ) {
                Ok(()) => self.watched = Some(fd),
                Err(e) => warn!(error = %e, "cannot watch the NVMe queue's interrupts: polling"),
            }
        }
    }
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
    /// An Abort the controller performed, until the aborted command completes.
    aborting: Option<Aborting>,
    /// Commands still to submit before the debug reset (`Geometry::debug_reset_after`).
    debug_reset_in: Option<u64>,
    /// The completion fd, when the controller's queues have interrupts.
    wait: Option<Wait>,
}

impl Drop for NvmePcieChannel {
    /// The controller's bounce count, when it has any, goes to the log with each channel
    /// closed (a session's end).
    fn drop(&mut self) {
        let bounced = self.ctrl.bounced();
        if bounced > 0 {
            info!(
                bdf = self.ctrl.bdf(),
                qid = self.queue.as_ref().map(PcieIoQueue::qid),
                bounced,
                "NVMe I/O channel closed; commands copied through bounce buffers so far"
            );
        }
    }
}

impl NvmePcieChannel {
    pub(super) fn new(
        geo: Geometry,
        ctrl: Arc<PcieController>,
        queue: PcieIoQueue,
    ) -> io::Result<Self> {
        let depth = queue.depth();
        let backlog_max = depth * BACKLOG_PER_SLOT;
        let debug_reset_in = geo.debug_reset_after;
        if let Some(n) = debug_reset_in {
            warn!(
                qid = queue.qid(),
                after = n,
                "the controller will be reset during I/O (--debug-nvme-reset-after)"
            );
        }
        let wait = if ctrl.interrupts() {
            let mut w = Wait::new()?;
            w.watch(queue.event_fd().map(AsRawFd::as_raw_fd));
            Some(w)
        } else {
            None
        };
        if wait.as_ref().is_some_and(|w| w.watched.is_none()) {
            info!(
                qid = queue.qid(),
                "no MSI-X vector for this NVMe queue: it is polled"
            );
        }
        Ok(Self {
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
            aborting: None,
            debug_reset_in,
            wait,
        })
    }

    /// Completions may come that no interrupt announces: commands in flight on a queue
    /// without a watched vector.
    fn polled(&self) -> bool {
        self.wait.as_ref().is_none_or(|w| w.watched.is_none())
    }

    /// Watches the current queue's vector (none while the controller is down).
    fn watch_queue(&mut self) {
        if let Some(w) = self.wait.as_mut() {
            w.watch(
                self.queue
                    .as_ref()
                    .and_then(PcieIoQueue::event_fd)
                    .map(AsRawFd::as_raw_fd),
            );
        }
    }

    /// Keeps the timer armed for the moment the oldest command in flight times out. It is
    /// armed once per such moment: commands that complete leave it armed (one needless
    /// wake-up at most), and once the moment has passed it is armed again for the new oldest
    /// command, or disarmed; either also clears its expiry, so that the poller's epoll does
    /// not stay readable. A moment that has passed also makes the next poll look at the
    /// commands' age (the health check). While armed, the clock is read only every
    /// [`TIMER_CHECK_POLLS`] calls.
    fn keep_timer(&mut self) {
        let Some(w) = self.wait.as_mut() else {
            return;
        };
        let busy = self.queue.as_ref().is_some_and(|q| q.in_flight() > 0);
        if w.timer_at.is_none() {
            if !busy {
                return;
            }
        } else if w.timer_polls > 0 {
            w.timer_polls -= 1;
            return;
        }
        w.timer_polls = TIMER_CHECK_POLLS;
        let now = Instant::now();
        if w.timer_at.is_some_and(|at| at > now) {
            return;
        }
        if w.timer_at.is_some() {
            self.until_check = 1;
        }
        // Only here, once per timeout period: a scan of the queue's commands.
        let oldest = self.queue.as_ref().and_then(PcieIoQueue::oldest);
        let result = match oldest {
            Some(oldest) => {
                let at = (oldest + self.geo.io_timeout).max(now) + TIMEOUT_SLACK;
                w.timer_at = Some(at);
                w.timer.reset(at - now, None)
            }
            None => {
                w.timer_at = None;
                w.timer.clear()
            }
        };
        if let Err(e) = result {
            warn!(error = %e, "cannot set the NVMe I/O timeout timer");
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
            aborted: false,
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
                    "--debug-nvme-reset-after: forcing a controller reset (debugging)"
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
        let now = Instant::now();
        let aborted_in_flight = self.aborting.and_then(|a| {
            let held = q.holds(a.cid, a.since);
            held.then(|| a.overdue(held, now))
        });
        if aborted_in_flight.is_none() {
            // The aborted command completed (or there was none).
            self.aborting = None;
        }
        let oldest = q.oldest_command();
        let health = abort::Health {
            fatal: self.ctrl.fatal(),
            aborted_in_flight,
            timed_out: oldest.is_some_and(|(_, _, since)| {
                now.saturating_duration_since(since) > self.geo.io_timeout
            }),
        };
        match abort::check(health) {
            Check::Fine | Check::WaitForAbort => {}
            Check::ResetFatal => {
                warn!(qid = q.qid(), "NVMe controller fatal status");
                self.recover("controller fatal status");
            }
            Check::ResetAbortOverdue => {
                warn!(
                    qid = q.qid(),
                    cid = self.aborting.map(|a| a.cid),
                    "aborted NVMe command not completed"
                );
                self.recover("aborted command not completed");
            }
            Check::TimedOut => {
                if let Some((cid, user, since)) = oldest {
                    warn!(
                        qid = q.qid(),
                        cid,
                        waited_ms = now.saturating_duration_since(since).as_millis(),
                        "NVMe I/O timeout"
                    );
                    self.timed_out(cid, user, since);
                }
            }
        }
    }

    /// Command `user` (CID `cid` in the queue, submitted at `since`) timed out: aborts it, or
    /// resets the controller if it was aborted before or the abort does not work.
    #[cold]
    fn timed_out(&mut self, cid: u16, user: u32, since: Instant) {
        let Some(q) = self.queue.as_ref() else {
            return;
        };
        let (qid, generation) = (q.qid(), q.generation());
        let cmd = u16::try_from(user)
            .ok()
            .and_then(|id| self.cmds.get_mut(id));
        let aborted_before = cmd.as_ref().is_none_or(|c| c.aborted);
        if abort::on_timeout(aborted_before) == OnTimeout::Reset {
            self.recover("I/O timeout after an abort");
            return;
        }
        if let Some(c) = cmd {
            c.aborted = true;
        }
        let result = self.ctrl.abort(qid, cid, generation);
        match &result {
            Ok(outcome) => info!(
                qid,
                cid,
                ?outcome,
                "NVMe Abort sent for the timed-out command"
            ),
            Err(e) => warn!(qid, cid, error = %e, "NVMe Abort failed"),
        }
        match abort::after_abort(&result, cid, since, Instant::now()) {
            Ok(a) => {
                self.aborting = Some(a);
                // Look again soon: the aborted command completes right after the Abort.
                self.until_check = 1;
            }
            Err(why) => self.recover(why),
        }
    }

    /// Takes the commands back from the queue, resets the controller unless another channel
    /// already did since the queue was created, creates a new queue pair and submits them
    /// again; fails them after [`RECOVERY_ATTEMPTS`].
    #[cold]
    fn recover(&mut self, why: &str) {
        self.aborting = None;
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
                    self.watch_queue();
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
        self.watch_queue();
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

impl NvmePcieChannel {
    /// [`IoChannel::queue`] for namespace `ns` of the channel's controller: a poller's channel
    /// serves every device on a namespace of its controller.
    ///
    /// # Safety
    ///
    /// As for [`IoChannel::queue`].
    ///
    /// Never inlined (a call, like [`IoChannel::queue`] behind `Channel`'s dispatch): inlined
    /// into `Channel::queue_for`, it keeps the poller from inlining its per-operation helper,
    /// which costs every device about 40 instructions per request.
    #[inline(never)]
    pub unsafe fn queue_ns(
        &mut self,
        ns: &Namespace,
        tag: u32,
        op: IoOp<'_>,
    ) -> Result<u32, ChannelFull> {
        if !self.has_room() {
            return Err(ChannelFull);
        }
        if self.queue.is_none() && !self.come_back() {
            // Fail fast while the controller is down.
            self.ready.push_back((tag, -libc::EIO));
            return Ok(1);
        }
        // SAFETY: the caller's contract (`IoChannel::queue`) is translate's; the channel keeps
        // the data references (to submit again after a reset) no longer than that.
        let t = unsafe {
            translate(ns, op, |sqe, data| {
                let payload = match data {
                    CmdData::None => Payload::None,
                    CmdData::Read(d) => Payload::Data(d, false),
                    CmdData::Write(d) => Payload::Data(d, true),
                    CmdData::Range(r) => Payload::Inline(r),
                };
                self.enqueue(tag, sqe, payload);
            })
        };
        Ok(match t {
            Translated::Commands(n) => n,
            Translated::Complete(res) => {
                self.ready.push_back((tag, res));
                1
            }
        })
    }
}

impl IoChannel for NvmePcieChannel {
    fn has_room(&self) -> bool {
        self.backlog.len() < self.backlog_max
    }

    unsafe fn queue(&mut self, tag: u32, op: IoOp<'_>) -> Result<u32, ChannelFull> {
        let ns = self.geo.namespace();
        // SAFETY: the caller's contract is passed on unchanged.
        unsafe { self.queue_ns(&ns, tag, op) }
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
            // The controller is down: a timer armed before it went down is disarmed once it
            // fires, or it would keep the poller's epoll readable.
            self.keep_timer();
            return n;
        };
        let (cmds, backlog) = (&mut self.cmds, &mut self.backlog);
        let polled = q.poll(|user, status| {
            let Ok(id) = u16::try_from(user) else {
                return;
            };
            if !status.is_success()
                && cmds
                    .get(id)
                    .is_some_and(|c| abort::resubmit_after(status, c.aborted))
            {
                // Aborted after a timeout: submitted again, ahead of the backlog.
                info!(id, "aborted NVMe command submitted again");
                backlog.push_front(id);
                return;
            }
            let Some(c) = cmds.remove(id) else {
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
        self.keep_timer();
        n
    }

    /// With interrupts: the channel's epoll fd (the queue's vector and the timeout timer).
    fn completion_fd(&self) -> Option<RawFd> {
        self.wait.as_ref().map(|w| w.epoll.as_raw_fd())
    }

    /// Reads the vector's eventfd; the timer is cleared or re-armed by the next poll.
    fn clear_completion_fd(&self) {
        if self.wait.as_ref().is_some_and(|w| w.watched.is_some())
            && let Some(fd) = self.queue.as_ref().and_then(PcieIoQueue::event_fd)
        {
            let _ = fd.read();
        }
    }

    /// Without interrupts, commands in flight keep the poller polling; with them, only
    /// results no interrupt announces do.
    fn must_poll(&self) -> bool {
        !self.ready.is_empty()
            || self
                .queue
                .as_ref()
                .is_some_and(PcieIoQueue::has_local_completions)
            || (!self.cmds.is_empty() && self.polled())
    }

    /// Nothing is done. A command the controller does not complete ends its wait within the
    /// I/O timeout, the Abort and its grace period, or a reset (after which the controller no
    /// longer uses the old queue nor the buffers of its commands), but the channel then
    /// submits it again, so a controller that accepts resets yet never completes it keeps a
    /// drain waiting, one reset per I/O timeout. Failing the draining commands after a reset
    /// (and an aborted one when its *Command Abort Requested* completion comes) instead of
    /// submitting them again would bound it; no test reaches that path yet (the lab's
    /// frontend cannot stop a ring with requests in flight).
    fn drain(&mut self, _draining: impl FnMut(u32) -> bool) {}
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
