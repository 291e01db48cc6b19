//! One queue pair: a submission ring, its completion ring and the commands in flight.
//!
//! Command identifiers come from a [`CmdTable`], so a completion for a command that already
//! finished (its slot reused under a new generation) is unknown rather than completing the
//! wrong command. Any breach of the queue protocol by the controller (an unknown command
//! identifier, an SQ head out of range, the wrong SQ identifier) stops the poll with a
//! [`QueueError`]: the controller must be reset, the commands still in the table retried.

use thiserror::Error;

use super::Dptr;
use super::ring::{CqMem, CqRing, RingError, SqMem, SqRing};
use crate::nvme::cid::CmdTable;
use crate::nvme::spec::{Cqe, Sqe};

/// Why a command was not submitted (it is handed back with the error).
#[derive(Clone, Copy, Debug, Error, PartialEq, Eq)]
pub enum SubmitError {
    /// The submission queue or the command table is full: wait for completions.
    #[error("queue full")]
    Full,
}

/// The controller broke the queue protocol; reset it.
#[derive(Clone, Copy, Debug, Error, PartialEq, Eq)]
pub enum QueueError {
    #[error("completion for unknown command {cid:#06x}")]
    UnknownCid { cid: u16 },
    #[error("completion names submission queue {sqid}, expected {expected}")]
    WrongSqid { sqid: u16, expected: u16 },
    #[error(transparent)]
    Ring(#[from] RingError),
}

/// A submission / completion queue pair of queue identifier `qid`, with a `T` per command in
/// flight.
#[derive(Debug)]
pub struct QueuePair<T, S, C> {
    qid: u16,
    sq: SqRing<S>,
    cq: CqRing<C>,
    cmds: CmdTable<T>,
}

impl<T, S: SqMem, C: CqMem> QueuePair<T, S, C> {
    /// A queue pair over `sq` and `cq` (zeroed). At most one entry less than the smaller
    /// ring holds is in flight, so the completion queue never overflows (§4.6), and at most
    /// 4096 (the command table's limit).
    pub fn new(qid: u16, sq: S, cq: C) -> Result<Self, RingError> {
        let sq = SqRing::new(sq)?;
        let cq = CqRing::new(cq)?;
        let depth = sq.size().min(cq.size()) - 1;
        // At most 65535, and `CmdTable` clamps to 4096.
        let cmds = CmdTable::new(depth.min(u32::from(u16::MAX)) as u16);
        Ok(Self { qid, sq, cq, cmds })
    }

    pub fn qid(&self) -> u16 {
        self.qid
    }

    /// Commands that can be in flight at once.
    pub fn depth(&self) -> usize {
        self.cmds.depth()
    }

    pub fn in_flight(&self) -> usize {
        self.cmds.in_flight()
    }

    /// Writes `sqe` with data pointer `dptr` and a fresh command identifier into the
    /// submission queue; returns the identifier. Nothing reaches the controller before
    /// [`QueuePair::take_sq_doorbell`]. `dptr`'s memory (data, PRP list, SGL segment) must
    /// stay reserved for the command until it completes.
    #[inline]
    pub fn submit(&mut self, sqe: &Sqe, dptr: Dptr, value: T) -> Result<u16, (SubmitError, T)> {
        if self.sq.is_full() || self.cmds.is_full() {
            return Err((SubmitError::Full, value));
        }
        // Neither can fail after the checks above: nothing else fills the table or the SQ.
        let Some(cid) = self.cmds.insert(value) else {
            unreachable!("command table full after the check");
        };
        let mut sqe = *sqe;
        sqe.set_cid(cid);
        if self.sq.push(&dptr.apply(&sqe)).is_err() {
            unreachable!("SQ full after the check");
        }
        Ok(cid)
    }

    /// The SQ tail doorbell value if commands were submitted since the last one. Write it to
    /// [`super::sq_tail_doorbell`]`(qid, dstrd)` at once.
    pub fn take_sq_doorbell(&mut self) -> Option<u32> {
        self.sq.take_doorbell()
    }

    /// Hands up to `max` completions to `f` with the value their command was submitted with;
    /// returns how many. Takes the SQ head from each.
    #[inline]
    pub fn poll(&mut self, max: usize, mut f: impl FnMut(T, Cqe)) -> Result<usize, QueueError> {
        let mut n = 0;
        while n < max {
            let Some(cqe) = self.cq.pop() else { break };
            if cqe.sqid() != self.qid {
                return Err(QueueError::WrongSqid {
                    sqid: cqe.sqid(),
                    expected: self.qid,
                });
            }
            self.sq.update_head(cqe.sqhd())?;
            let cid = cqe.cid();
            let value = self
                .cmds
                .remove(cid)
                .ok_or(QueueError::UnknownCid { cid })?;
            f(value, cqe);
            n += 1;
        }
        Ok(n)
    }

    /// The CQ head doorbell value if completions were consumed since the last one. Write it
    /// to [`super::cq_head_doorbell`]`(qid, dstrd)`.
    pub fn take_cq_doorbell(&mut self) -> Option<u32> {
        self.cq.take_doorbell()
    }

    /// The identifiers of the commands in flight (to retry them after a reset).
    pub fn cids(&self) -> impl Iterator<Item = u16> + '_ {
        self.cmds.cids()
    }

    /// The value of command `cid`, if it is in flight.
    pub fn get(&self, cid: u16) -> Option<&T> {
        self.cmds.get(cid)
    }

    /// Takes back command `cid` without a completion (after a controller reset).
    pub fn take(&mut self, cid: u16) -> Option<T> {
        self.cmds.remove(cid)
    }

    pub fn sq(&self) -> &SqRing<S> {
        &self.sq
    }

    pub fn cq(&self) -> &CqRing<C> {
        &self.cq
    }

    /// For a controller model writing completions (tests, [`super::Loopback`]).
    pub fn cq_mut(&mut self) -> &mut CqRing<C> {
        &mut self.cq
    }
}

#[cfg(test)]
mod tests;
