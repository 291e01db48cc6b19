//! Asynchronous events of a controller owned through VFIO (Base 2.0 §5.2): Namespace
//! Attribute Notices are enabled when the controller offers them (OAES), at bring-up and after
//! every reset, and one Asynchronous Event Request stays outstanding on the admin queue. It
//! has no time limit and its completion is never taken for another admin command's: whoever
//! polls the admin queue (a command waiting for its own completion, or
//! [`PcieController::namespace_changes`]) keeps it in the [`AerSlot`]. A reset loses the
//! request (the controller forgets it with its queues); the next one is sent when the
//! controller is enabled again.

use vmm_sys_util::eventfd::EventFd;

use super::{ADMIN_ENTRIES, Admin, PcieController, lock};
use crate::nvme::pcie::Dptr;
use crate::nvme::pcie::error::PcieError;
use crate::nvme::pcie::regs::{cq_head_doorbell, sq_tail_doorbell};
use crate::nvme::spec::{
    AEC_NAMESPACE_ATTRIBUTE, AsyncEvent, CHANGED_NAMESPACES_LEN, ChangedNamespaces, Cqe, Sqe,
};

/// The admin queue's Asynchronous Event Request.
#[derive(Debug, Default)]
pub(super) struct AerSlot {
    /// The admin sequence number it was submitted with, while outstanding.
    outstanding: Option<u64>,
    /// Its completion, until taken.
    done: Option<Cqe>,
}

impl AerSlot {
    /// Neither outstanding nor waiting to be taken: a new one may be sent.
    fn idle(&self) -> bool {
        self.outstanding.is_none() && self.done.is_none()
    }

    fn sent(&mut self, seq: u64) {
        self.outstanding = Some(seq);
    }

    /// A completion the admin queue gave for `seq`: kept if it is the request's (true).
    pub(super) fn complete(&mut self, seq: u64, cqe: Cqe) -> bool {
        if self.outstanding != Some(seq) {
            return false;
        }
        self.outstanding = None;
        self.done = Some(cqe);
        true
    }

    fn take(&mut self) -> Option<Cqe> {
        self.done.take()
    }

    /// The controller was reset: the request is gone.
    pub(super) fn lost(&mut self) {
        *self = AerSlot::default();
    }
}

impl PcieController {
    /// Enables Namespace Attribute Notices if the controller offers them, and sends an
    /// Asynchronous Event Request. A controller that refuses the feature is used without.
    pub(super) fn start_notices(&self, a: &mut Admin) {
        a.aer.lost();
        a.notices = self.identify.oaes & AEC_NAMESPACE_ATTRIBUTE != 0
            && self
                .admin_locked(
                    a,
                    "Set Features (Asynchronous Event Configuration)",
                    &Sqe::set_async_event_config(AEC_NAMESPACE_ATTRIBUTE),
                    Dptr::NONE,
                )
                .map_err(|e| tracing::debug!(bdf = self.bdf(), error = %e, "namespace notices not enabled"))
                .is_ok();
        self.arm_locked(a);
    }

    /// Sends an Asynchronous Event Request unless one is outstanding or notices are off.
    fn arm_locked(&self, a: &mut Admin) {
        if !a.notices || !a.aer.idle() {
            return;
        }
        let seq = a.seq;
        a.seq += 1;
        if a.qp
            .submit(&Sqe::async_event_request(), Dptr::NONE, seq)
            .is_err()
        {
            // Only commands that never completed fill the admin queue.
            tracing::warn!(
                bdf = self.bdf(),
                "admin queue full: no asynchronous event request"
            );
            return;
        }
        if let Some(v) = a.qp.take_sq_doorbell() {
            self.nvme.write32(sq_tail_doorbell(0, self.cap.dstrd()), v);
        }
        a.aer.sent(seq);
    }

    /// What the controller reported since the last call, looked for without waiting: when
    /// the Asynchronous Event Request completed, it is sent again and, for a namespace
    /// notice, the Changed Namespace List is read (which clears the notice) and returned.
    /// `None`: no namespace notice. An error means the admin queue failed (a reset of the
    /// pollers' brings it back).
    pub fn namespace_changes(&self) -> Result<Option<ChangedNamespaces>, PcieError> {
        let mut guard = lock(&self.admin);
        let a = &mut *guard;
        let aer = &mut a.aer;
        let polled = a.qp.poll(usize::from(ADMIN_ENTRIES), |s, cqe| {
            aer.complete(s, cqe);
        });
        if let Some(v) = a.qp.take_cq_doorbell() {
            self.nvme.write32(cq_head_doorbell(0, self.cap.dstrd()), v);
        }
        polled.map_err(|source| PcieError::Queue { qid: 0, source })?;
        let Some(cqe) = a.aer.take() else {
            return Ok(None);
        };
        let status = cqe.status();
        if !status.is_success() {
            // Ended by the controller (or one too many): namespace changes are known again
            // after the next reset, or through device_resize.
            tracing::info!(bdf = self.bdf(), %status, "asynchronous event request ended");
            return Ok(None);
        }
        self.arm_locked(a);
        let event = AsyncEvent::from_dw0(cqe.dw0());
        if !event.namespace_changed() {
            tracing::debug!(bdf = self.bdf(), ?event, "asynchronous event ignored");
            return Ok(None);
        }
        let prp1 = a.data_iova();
        let at = 2 * a.page;
        a.mem.zero(at, CHANGED_NAMESPACES_LEN);
        self.admin_locked(
            a,
            "Get Log Page (Changed Namespace List)",
            &Sqe::changed_namespaces_log(),
            Dptr::Prp { prp1, prp2: 0 },
        )?;
        let mut buf = vec![0; CHANGED_NAMESPACES_LEN];
        a.mem.read(at, &mut buf);
        ChangedNamespaces::parse(&buf)
            .map(Some)
            .map_err(|source| PcieError::Malformed {
                what: "changed namespace list",
                source,
            })
    }

    /// The controller reports namespace changes (Namespace Attribute Notices are enabled).
    pub fn namespace_notices(&self) -> bool {
        lock(&self.admin).notices
    }

    /// The eventfd of MSI-X vector 0, the admin queue's, when interrupts are on: readable
    /// after admin completions (an asynchronous event among them).
    pub fn admin_event_fd(&self) -> Option<&EventFd> {
        self.vectors.first()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cqe(cid: u16, dw0: u32) -> Cqe {
        let mut raw = [0; 16];
        raw[0..4].copy_from_slice(&dw0.to_le_bytes());
        raw[12..14].copy_from_slice(&cid.to_le_bytes());
        Cqe::from_bytes(raw)
    }

    #[test]
    fn the_request_keeps_its_completion_apart_from_other_commands() {
        let mut slot = AerSlot::default();
        assert!(slot.idle());
        slot.sent(7);
        assert!(!slot.idle(), "outstanding");
        assert!(!slot.complete(8, cqe(8, 0)), "another command's");
        assert!(
            !slot.complete(6, cqe(6, 0)),
            "an older command's, timed out"
        );
        assert_eq!(slot.take(), None);
        assert!(slot.complete(7, cqe(7, 0x0004_0002)));
        assert!(!slot.idle(), "not sent again before it is taken");
        assert!(!slot.complete(7, cqe(7, 0)), "completed once");
        assert_eq!(slot.take().map(|c| c.dw0()), Some(0x0004_0002));
        assert!(slot.idle());
        slot.sent(9);
        slot.lost();
        assert!(slot.idle(), "a reset forgets it");
        assert!(
            !slot.complete(9, cqe(9, 0)),
            "and a late completion with it"
        );
    }
}
