//! Aborting one command (Abort, Base 2.0 §5.1): what the answer means, and what the owner of a
//! timed-out command does next. Pure, so the decisions are tested against the controller
//! model ([`super::Loopback`]) without a device.
//!
//! The owner of a queue whose oldest command passed the I/O timeout sends Abort for it
//! ([`PcieController::abort`](super::PcieController::abort)) unless it was aborted once
//! already ([`on_timeout`]). An abort the controller performed (Dword 0 bit 0 cleared) makes
//! the command complete with *Command Abort Requested*; the owner submits it again
//! ([`resubmit_after`]). An abort not performed, an Abort that failed or timed out, or an
//! aborted command still not completed after [`ABORT_GRACE`], is the controller's fault: the
//! owner resets it ([`after_abort`], [`Aborting::overdue`]).
//!
//! What the owner looks at first, every so often while commands are in flight, is
//! [`check`]: a controller that reports a fatal status (CSTS.CFS) is reset at once; no Abort
//! goes to it, whatever its commands' age.

use std::time::{Duration, Instant};

use crate::nvme::spec::{Cqe, Status, sc, sct};

/// How long an aborted command may take to complete with *Command Abort Requested* after the
/// Abort completed, before the controller is reset.
pub const ABORT_GRACE: Duration = Duration::from_secs(1);

/// What the controller did with an Abort (Dword 0 of its completion, bit 0: §5.1.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AbortOutcome {
    /// The command was aborted: its completion, with *Command Abort Requested*, follows.
    Aborted,
    /// The controller did not abort it (it may still complete normally).
    NotAborted,
}

impl AbortOutcome {
    /// From a successful Abort's completion.
    pub fn from_cqe(cqe: &Cqe) -> AbortOutcome {
        if cqe.dw0() & 1 == 0 {
            AbortOutcome::Aborted
        } else {
            AbortOutcome::NotAborted
        }
    }
}

/// The status a command aborted by an Abort completes with (SCT 0, SC 0x07).
pub fn is_abort_requested(status: Status) -> bool {
    status.sct() == sct::GENERIC && status.sc() == sc::ABORT_REQUESTED
}

/// What the owner of a queue with commands in flight found at a health check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Health {
    /// The controller reports a fatal status (CSTS.CFS), or its registers read as all ones.
    pub fatal: bool,
    /// A command this host aborted is still in flight: `Some(overdue)`, where `overdue` is
    /// [`Aborting::overdue`].
    pub aborted_in_flight: Option<bool>,
    /// The oldest command in flight passed the I/O timeout.
    pub timed_out: bool,
}

/// What the owner does after a health check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Check {
    /// Nothing to do.
    Fine,
    /// Reset the controller: it reports a fatal status. An Abort would be an admin command to
    /// a controller that has stopped.
    ResetFatal,
    /// Reset the controller: the aborted command did not complete within [`ABORT_GRACE`].
    ResetAbortOverdue,
    /// The aborted command may still complete: wait, and look at no other timeout meanwhile.
    WaitForAbort,
    /// The oldest command timed out: [`on_timeout`] says what next.
    TimedOut,
}

/// The decision of a health check: a fatal status first, then a pending abort, then the
/// oldest command's age.
pub fn check(h: Health) -> Check {
    if h.fatal {
        return Check::ResetFatal;
    }
    match h.aborted_in_flight {
        Some(true) => Check::ResetAbortOverdue,
        Some(false) => Check::WaitForAbort,
        None if h.timed_out => Check::TimedOut,
        None => Check::Fine,
    }
}

/// What to do about a command that passed the I/O timeout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnTimeout {
    /// Send Abort for it.
    Abort,
    /// Reset the controller: the command was aborted once already and timed out again.
    Reset,
}

/// A command is aborted at most once; a second timeout resets the controller.
pub fn on_timeout(aborted_before: bool) -> OnTimeout {
    if aborted_before {
        OnTimeout::Reset
    } else {
        OnTimeout::Abort
    }
}

/// An Abort the controller performed, waiting for the aborted command's completion.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Aborting {
    /// The aborted command's identifier in its queue and when it was submitted (a later
    /// command with the same identifier is another one).
    pub cid: u16,
    pub since: Instant,
    /// When the controller is reset if the command has not completed.
    pub deadline: Instant,
}

impl Aborting {
    /// `still_in_flight`: the queue still holds command `cid` submitted at `since`. True when
    /// the grace period is over and it does: the controller must be reset.
    pub fn overdue(&self, still_in_flight: bool, now: Instant) -> bool {
        still_in_flight && now >= self.deadline
    }
}

/// What follows an Abort: wait for the aborted command (`Ok`), or reset the controller (`Err`,
/// with the reason).
pub fn after_abort<E>(
    result: &Result<AbortOutcome, E>,
    cid: u16,
    since: Instant,
    now: Instant,
) -> Result<Aborting, &'static str> {
    match result {
        Ok(AbortOutcome::Aborted) => Ok(Aborting {
            cid,
            since,
            deadline: now + ABORT_GRACE,
        }),
        Ok(AbortOutcome::NotAborted) => Err("abort not performed"),
        Err(_) => Err("abort failed"),
    }
}

/// Whether a command that completed with `status` is submitted again: it completed because
/// this host aborted it. Any other status (and *Command Abort Requested* on a command this
/// host did not abort) is its result.
pub fn resubmit_after(status: Status, aborted_by_us: bool) -> bool {
    aborted_by_us && is_abort_requested(status)
}

#[cfg(test)]
mod tests;
