//! A controller model over slice-backed queues, for tests and instruction counts: it fetches
//! submitted entries when the SQ tail doorbell is written and posts their completions with
//! the phase tag the host expects. It reads no data and checks nothing in the commands.

use super::queue::QueuePair;
use super::ring::SqSlot;
use crate::nvme::spec::{Cqe, Status};

/// The controller's side of one queue pair.
#[derive(Debug)]
pub struct Loopback {
    qid: u16,
    sq_head: u16,
    cq_tail: u16,
    /// The CQ head as the host last wrote it to the doorbell.
    cq_head: u16,
    phase: bool,
}

impl Loopback {
    pub fn new(qid: u16) -> Self {
        Self {
            qid,
            sq_head: 0,
            cq_tail: 0,
            cq_head: 0,
            phase: true,
        }
    }

    pub fn sq_head(&self) -> u16 {
        self.sq_head
    }

    /// The host wrote the CQ head doorbell: entries before `head` may be reused.
    pub fn cq_doorbell(&mut self, head: u32) {
        self.cq_head = head as u16;
    }

    /// Posts a completion for `cid` with `status`, reporting SQ head `sqhd`, at the CQ tail.
    /// False (nothing written) when the CQ is full.
    pub fn post(&mut self, cq: &mut [Cqe], cid: u16, sqhd: u16, status: Status) -> bool {
        self.post_dw0(cq, cid, sqhd, status, 0)
    }

    /// [`Loopback::post`] with command specific Dword 0 `dw0` (an Abort's answer, say).
    pub fn post_dw0(
        &mut self,
        cq: &mut [Cqe],
        cid: u16,
        sqhd: u16,
        status: Status,
        dw0: u32,
    ) -> bool {
        let next = (usize::from(self.cq_tail) + 1) % cq.len();
        if next == usize::from(self.cq_head) {
            return false;
        }
        let mut raw = [0u8; 16];
        raw[0..4].copy_from_slice(&dw0.to_le_bytes());
        raw[8..10].copy_from_slice(&sqhd.to_le_bytes());
        raw[10..12].copy_from_slice(&self.qid.to_le_bytes());
        raw[12..14].copy_from_slice(&cid.to_le_bytes());
        let field = status.field() | u16::from(self.phase);
        raw[14..16].copy_from_slice(&field.to_le_bytes());
        cq[usize::from(self.cq_tail)] = Cqe::from_bytes(raw);
        if next == 0 {
            self.phase = !self.phase;
        }
        self.cq_tail = next as u16;
        true
    }

    /// Fetches the entry at the SQ head, if the head has not reached `tail`: returns its
    /// command identifier and the new head.
    pub fn fetch(&mut self, sq: &[SqSlot], tail: u32) -> Option<(u16, u16)> {
        if u32::from(self.sq_head) == tail {
            return None;
        }
        let e = &sq[usize::from(self.sq_head)];
        let cid = u16::from_le_bytes([e[2], e[3]]);
        self.sq_head = ((usize::from(self.sq_head) + 1) % sq.len()) as u16;
        Some((cid, self.sq_head))
    }

    /// The SQ tail doorbell was written with `tail`: fetches every entry up to it and
    /// completes each successfully, in order. Returns how many.
    pub fn sq_doorbell<T>(
        &mut self,
        qp: &mut QueuePair<T, Vec<SqSlot>, Vec<Cqe>>,
        tail: u32,
    ) -> usize {
        let mut n = 0;
        while let Some((cid, head)) = self.fetch(qp.sq().mem(), tail) {
            let posted = self.post(qp.cq_mut().mem_mut(), cid, head, Status::SUCCESS);
            assert!(
                posted,
                "CQ full: the host did not write the CQ head doorbell"
            );
            n += 1;
        }
        n
    }
}
