//! The per-poller channel of an NVMe/TCP namespace: virtio-blk operations become NVMe
//! commands on this poller's own I/O queue (its own TCP connection).
//!
//! The hot path is the queue's: commands are queued without a syscall, one `sendmsg` per
//! batch, completions read straight into the guest's buffers. The channel adds what a lost
//! connection needs: it notices a new controller generation (one relaxed load per poll),
//! takes the connection the supervisor hands over, and fails its I/O once the controller is
//! declared lost for good.
//!
//! **Draining.** A queue being stopped (GET_VRING_BASE, the session's end) waits for its
//! requests, so their commands must not wait for a target that went away: [`IoChannel::drain`]
//! gives each of them a deadline, the I/O timeout after it was queued. A command on a live
//! connection is left alone (it may still be answered; past the I/O timeout the connection is
//! closed anyway). Off a connection (held for resending after a loss) past its deadline, it is
//! failed instead of being sent again: its identifier is forgotten, and the connection it was
//! on is closed, so no data of it can reach the guest later.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tracing::{debug, warn};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::timerfd::TimerFd;

use super::{CtrlState, Geometry, QueueShared, Shared};
use crate::bdev::nvme_ops::{CmdData, Translated, translate};
use crate::bdev::{ChannelFull, IoChannel, IoOp};
use crate::nvme::spec::{Sqe, Status, sc, sct};
use crate::nvme::tcp::queue::{Completion, Data, IoQueue};

/// Commands waiting for a free command identifier, per queue slot, before the channel
/// reports itself full.
const BACKLOG_PER_SLOT: usize = 2;
/// How often, at most, the channel looks for commands older than the I/O timeout.
const TIMEOUT_CHECK_MS: u64 = 100;
/// How long after a draining command's deadline a sleeping poller is woken to fail it.
const DRAIN_SLACK_MS: u64 = 5;

/// The status of commands failed because the controller is gone.
fn aborted() -> Status {
    Status::new(sct::GENERIC, sc::ABORTED_SQ_DELETION, true)
}

/// Epoll data of the socket, of the supervisor's notifications and of the timeout timer in
/// the channel's own epoll.
const SOCKET_EVENT: u64 = 0;
const NOTIFY_EVENT: u64 = 1;
const TIMER_EVENT: u64 = 2;

/// A command that has no identifier yet.
#[derive(Debug)]
struct Waiting {
    tag: u32,
    sqe: Sqe,
    data: Data,
    /// When it was queued (the clock's milliseconds).
    pushed: u64,
    /// Its request's queue is draining: without a connection past this moment, it fails.
    deadline: Option<u64>,
}

#[derive(Debug)]
pub struct NvmeTcpChannel {
    shared: Arc<Shared>,
    queue_shared: Arc<QueueShared>,
    geo: Geometry,
    queue: IoQueue,
    /// The controller generation the connection belongs to.
    generation: u64,
    backlog: VecDeque<Waiting>,
    backlog_max: usize,
    /// Results known without the controller (a flush without a volatile cache, failures).
    ready: VecDeque<(u32, i32)>,
    /// The channel's own epoll: the socket and the supervisor's notifications. Its fd is what
    /// the poller sleeps on.
    epoll: Epoll,
    /// The socket registered in `epoll`, and whether for writing too.
    watched: Option<(RawFd, bool)>,
    next_timeout_check: u64,
    /// In `epoll`: wakes a sleeping poller when the oldest command in flight may have timed
    /// out. The I/O timeout is checked by `poll`, which a poller asleep on `epoll` would not
    /// call while a silent target sends nothing.
    timer: TimerFd,
    /// When `timer` fires (the clock's milliseconds), while it is armed.
    timer_at: Option<u64>,
    /// The earliest deadline [`IoChannel::drain`] gave a command still held (or later: it is
    /// brought up to date when it passes).
    drain_at: Option<u64>,
}

impl NvmeTcpChannel {
    pub(super) fn new(
        shared: Arc<Shared>,
        queue_shared: Arc<QueueShared>,
        depth: u16,
    ) -> io::Result<Self> {
        let geo = shared.geo;
        let epoll = Epoll::new()?;
        epoll.ctl(
            ControlOperation::Add,
            queue_shared.notify.as_raw_fd(),
            EpollEvent::new(EventSet::IN, NOTIFY_EVENT),
        )?;
        let timer = TimerFd::new()?;
        epoll.ctl(
            ControlOperation::Add,
            timer.as_raw_fd(),
            EpollEvent::new(EventSet::IN, TIMER_EVENT),
        )?;
        let queue = IoQueue::new(depth, geo.in_capsule_max);
        let backlog_max = queue.depth() * BACKLOG_PER_SLOT;
        let mut ch = Self {
            shared,
            queue_shared,
            geo,
            queue,
            generation: 0,
            backlog: VecDeque::with_capacity(backlog_max),
            backlog_max,
            ready: VecDeque::with_capacity(backlog_max),
            epoll,
            watched: None,
            next_timeout_check: 0,
            timer,
            timer_at: None,
            drain_at: None,
        };
        ch.take_connection();
        Ok(ch)
    }

    /// Adopts the connection the supervisor prepared, if there is one.
    fn take_connection(&mut self) -> bool {
        let Some((conn, generation)) = self.queue_shared.take() else {
            return false;
        };
        if let Err(e) = self.queue.reconnect(conn, self.shared.clock.now_ms()) {
            warn!(qid = self.queue_shared.qid, error = %e, "cannot use the new connection");
            self.report_failure();
            return false;
        }
        self.generation = generation;
        self.watch();
        debug!(
            qid = self.queue_shared.qid,
            in_flight = self.queue.in_flight(),
            "I/O queue connected"
        );
        true
    }

    /// Keeps the channel's epoll in step with the queue's socket and its need to write.
    fn watch(&mut self) {
        let want = self.queue.fd().map(|fd| (fd, self.queue.wants_write()));
        if want == self.watched {
            return;
        }
        if let Some((fd, _)) = self.watched.take() {
            let _ = self
                .epoll
                .ctl(ControlOperation::Delete, fd, EpollEvent::default());
        }
        if let Some((fd, write)) = want {
            let events = if write {
                EventSet::IN | EventSet::OUT
            } else {
                EventSet::IN
            };
            match self.epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(events, SOCKET_EVENT),
            ) {
                Ok(()) => self.watched = want,
                Err(e) => warn!(error = %e, "cannot watch the I/O queue's socket"),
            }
        }
    }

    /// The connection failed: ask the supervisor for a controller reset.
    #[cold]
    fn report_failure(&mut self) {
        self.queue.disconnect();
        self.watch();
        self.queue_shared.request_reset(&self.shared);
    }

    /// Moves waiting commands into the queue while it has identifiers free.
    fn drain_backlog(&mut self) {
        let now = self.shared.clock.now_ms();
        while self.queue.has_room() {
            let Some(w) = self.backlog.pop_front() else {
                return;
            };
            match self.queue.push(w.tag, w.sqe, w.data, now) {
                Ok(cid) => {
                    if let Some(deadline) = w.deadline {
                        self.queue.set_deadline(cid, deadline);
                    }
                }
                Err(_) => {
                    self.backlog.push_front(w);
                    return;
                }
            }
        }
    }

    fn enqueue(&mut self, tag: u32, sqe: Sqe, data: Data) {
        let now = self.shared.clock.now_ms();
        if self.backlog.is_empty()
            && self.queue.has_room()
            && self.queue.push(tag, sqe, data, now).is_ok()
        {
            return;
        }
        self.backlog.push_back(Waiting {
            tag,
            sqe,
            data,
            pushed: now,
            deadline: None,
        });
    }

    /// Follows the controller's state: a new generation means the connection is stale; a
    /// lost controller fails everything. Without a connection, draining commands past their
    /// deadline fail first, before a new connection would send them again.
    fn follow_controller(&mut self) {
        let generation = self.shared.generation.load(Ordering::Acquire);
        if self.queue.is_connected() && generation != self.generation {
            self.queue.disconnect();
            self.watch();
        }
        if !self.queue.is_connected() {
            self.fail_overdue();
            if !self.take_connection() && self.shared.state() == CtrlState::Failed {
                self.fail_everything();
            }
        }
    }

    /// Without a connection: fails the commands (held, or waiting for an identifier) whose
    /// deadline from [`IoChannel::drain`] has passed.
    fn fail_overdue(&mut self) {
        let Some(at) = self.drain_at else {
            return;
        };
        let now = self.shared.clock.now_ms();
        if now < at {
            return;
        }
        let ready = &mut self.ready;
        let (mut failed, mut next) = self.queue.fail_overdue(now, aborted(), |c| {
            ready.push_back((c.user, -libc::EIO));
        });
        self.backlog.retain(|w| match w.deadline {
            Some(deadline) if deadline <= now => {
                ready.push_back((w.tag, -libc::EIO));
                failed += 1;
                false
            }
            deadline => {
                next = next.into_iter().chain(deadline).min();
                true
            }
        });
        self.drain_at = next;
        if failed > 0 {
            warn!(
                qid = self.queue_shared.qid,
                commands = failed,
                "target unreachable while their queue stops: requests failed after the I/O timeout"
            );
        }
    }

    #[cold]
    fn fail_everything(&mut self) {
        let ready = &mut self.ready;
        let n = self.queue.fail_all(aborted(), |c| {
            ready.push_back((c.user, -libc::EIO));
        });
        for w in self.backlog.drain(..) {
            self.ready.push_back((w.tag, -libc::EIO));
        }
        if n > 0 {
            warn!(
                qid = self.queue_shared.qid,
                commands = n,
                "controller lost: failing I/O in flight"
            );
        }
    }

    /// Commands older than the I/O timeout mean a stuck controller: reset it.
    fn check_timeouts(&mut self) {
        if self.queue.in_flight() == 0 {
            return;
        }
        let now = self.shared.clock.now_ms();
        if now < self.next_timeout_check {
            return;
        }
        self.next_timeout_check = now + TIMEOUT_CHECK_MS;
        if let Some(oldest) = self.queue.oldest()
            && now.saturating_sub(oldest) > self.geo.io_timeout_ms
        {
            warn!(
                qid = self.queue_shared.qid,
                waited_ms = now - oldest,
                "I/O timeout: resetting the controller"
            );
            self.report_failure();
        }
    }

    /// Keeps `timer` armed for the moment the oldest command in flight on a live connection
    /// times out, or, without a connection, for the first deadline of a draining command. It
    /// is armed once per such moment: commands that complete leave it armed (one needless
    /// wake-up at most), and once the moment has passed it is armed again for the next one,
    /// or disarmed; either also clears its expiry, so that the poller's epoll does not stay
    /// readable. A drain deadline earlier than the armed moment arms it earlier.
    fn keep_timer(&mut self) {
        let connected = self.queue.is_connected();
        let busy = connected && self.queue.in_flight() > 0;
        let drain = if connected { None } else { self.drain_at };
        if !busy && drain.is_none() && self.timer_at.is_none() {
            return;
        }
        let now = self.shared.clock.now_ms();
        let drain = drain.map(|at| at.max(now) + DRAIN_SLACK_MS);
        if self
            .timer_at
            .is_some_and(|at| at > now && drain.is_none_or(|d| at <= d))
        {
            return;
        }
        // Past the timeout (or, if that has passed, one check interval from now), and past
        // the next check `check_timeouts` makes.
        let live = if busy { self.queue.oldest() } else { None }
            .map(|oldest| (oldest + self.geo.io_timeout_ms).max(now) + TIMEOUT_CHECK_MS);
        let result = match live.into_iter().chain(drain).min() {
            Some(at) => {
                self.timer_at = Some(at);
                self.timer.reset(Duration::from_millis(at - now), None)
            }
            None => {
                self.timer_at = None;
                self.timer.clear()
            }
        };
        if let Err(e) = result {
            warn!(qid = self.queue_shared.qid, error = %e, "cannot set the I/O timeout timer");
        }
    }
}

fn result_of(c: &Completion) -> i32 {
    if c.status.is_success() {
        i32::try_from(c.bytes).unwrap_or(i32::MAX)
    } else {
        debug!(status = %c.status, "NVMe command failed");
        -libc::EIO
    }
}

impl IoChannel for NvmeTcpChannel {
    fn has_room(&self) -> bool {
        self.backlog.len() < self.backlog_max
    }

    unsafe fn queue(&mut self, tag: u32, op: IoOp<'_>) -> Result<u32, ChannelFull> {
        if !self.has_room() {
            return Err(ChannelFull);
        }
        if self.shared.state() == CtrlState::Failed && !self.queue.is_connected() {
            // Fail fast while the controller is gone.
            self.ready.push_back((tag, -libc::EIO));
            return Ok(1);
        }
        let ns = self.geo.namespace();
        // SAFETY: the caller's contract (`IoChannel::queue`) is translate's: every command
        // emitted completes before the iovecs change.
        let t = unsafe {
            translate(&ns, op, |sqe, data| {
                let data = match data {
                    CmdData::None => Data::None,
                    CmdData::Read(d) => Data::In(d),
                    CmdData::Write(d) => Data::Out(d),
                    CmdData::Range(r) => Data::OutInline(r),
                };
                self.enqueue(tag, sqe, data);
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

    fn submit(&mut self) -> io::Result<()> {
        if let Err(e) = self.queue.flush() {
            warn!(qid = self.queue_shared.qid, error = %e, "NVMe/TCP send failed");
            self.report_failure();
        }
        Ok(())
    }

    fn poll(&mut self, max: usize, mut f: impl FnMut(u32, i32)) -> usize {
        self.follow_controller();
        let mut n = 0;
        while n < max {
            let Some((tag, res)) = self.ready.pop_front() else {
                break;
            };
            f(tag, res);
            n += 1;
        }
        if n < max && self.queue.is_connected() {
            match self.queue.poll(|c| {
                f(c.user, result_of(&c));
                n += 1;
            }) {
                Ok(_) => {}
                Err(e) => {
                    warn!(qid = self.queue_shared.qid, error = %e, "NVMe/TCP connection lost");
                    self.report_failure();
                }
            }
            self.check_timeouts();
        }
        if !self.backlog.is_empty() {
            self.drain_backlog();
            // Newly queued commands go out with this poll rather than the next batch.
            if let Err(e) = self.queue.flush() {
                warn!(qid = self.queue_shared.qid, error = %e, "NVMe/TCP send failed");
                self.report_failure();
            }
        }
        if self.queue.wants_write() != self.watched.is_some_and(|(_, w)| w) {
            self.watch();
        }
        self.keep_timer();
        n
    }

    fn completion_fd(&self) -> Option<RawFd> {
        Some(self.epoll.as_raw_fd())
    }

    fn clear_completion_fd(&self) {
        // The socket is level-triggered and drained by `poll`; only the notification counter
        // needs reading.
        let _ = self.queue_shared.notify.read();
    }

    /// Gives the draining requests' commands a deadline, the I/O timeout after each was
    /// queued; `poll` fails those past it while there is no connection (see the module
    /// documentation), and the timer wakes a sleeping poller for it.
    fn drain(&mut self, mut draining: impl FnMut(u32) -> bool) {
        let timeout = self.geo.io_timeout_ms;
        let mut earliest = self.queue.set_deadlines(&mut draining, timeout);
        for w in &mut self.backlog {
            if w.deadline.is_none() && draining(w.tag) {
                w.deadline = Some(w.pushed.saturating_add(timeout));
            }
            earliest = earliest.into_iter().chain(w.deadline).min();
        }
        self.drain_at = earliest;
    }
}

impl Drop for NvmeTcpChannel {
    fn drop(&mut self) {
        // Nothing is in flight once a channel is dropped (its queues were detached first); a
        // live connection of the current controller stays for the next channel of this queue.
        let current = self.shared.generation.load(Ordering::Acquire) == self.generation;
        let conn = if current {
            self.queue.take_conn()
        } else {
            None
        };
        self.queue_shared.release(conn, self.generation);
    }
}
