use super::*;
use crate::nvme::pcie::ring::SqSlot;
use crate::nvme::pcie::{Dptr, Loopback, QueuePair};
use crate::nvme::spec::Sqe;

type Qp = QueuePair<u32, Vec<SqSlot>, Vec<Cqe>>;

fn qp(qid: u16) -> Qp {
    QueuePair::new(qid, vec![[0; 64]; 8], vec![Cqe::from_bytes([0; 16]); 8]).expect("queue")
}

/// Every completion `q` has, as `(value, status, dw0)`.
fn completions(q: &mut Qp) -> Vec<(u32, Status, u32)> {
    let mut out = Vec::new();
    q.poll(usize::MAX, |v, cqe| out.push((v, cqe.status(), cqe.dw0())))
        .expect("poll");
    let _ = q.take_cq_doorbell();
    out
}

/// An I/O queue (QID 1) with two reads submitted; the controller completes the first and
/// holds the second, whose CID is returned.
fn one_command_held(io: &mut Qp, dev: &mut Loopback) -> u16 {
    io.submit(&Sqe::read(1, 0, 7, false), Dptr::NONE, 10)
        .map_err(|(e, _)| e)
        .expect("room");
    let held = io
        .submit(&Sqe::read(1, 8, 7, false), Dptr::NONE, 11)
        .map_err(|(e, _)| e)
        .expect("room");
    let tail = io.take_sq_doorbell().expect("doorbell");
    let (first, head) = dev.fetch(io.sq().mem(), tail).expect("first");
    assert!(dev.post(io.cq_mut().mem_mut(), first, head, Status::SUCCESS));
    let (cid, _) = dev.fetch(io.sq().mem(), tail).expect("second");
    assert_eq!(cid, held);
    assert_eq!(completions(io), [(10, Status::SUCCESS, 0)]);
    held
}

/// The controller's side of an Abort on the admin queue: fetches it, reads SQID and CID from
/// CDW10 and answers with `dw0`; returns them.
fn controller_takes_abort(admin: &mut Qp, dev: &mut Loopback, dw0: u32) -> (u16, u16) {
    let tail = admin.take_sq_doorbell().expect("doorbell");
    let e = admin.sq().mem()[0];
    assert_eq!(e[0], 0x08, "Abort opcode");
    let cdw10 = u32::from_le_bytes([e[40], e[41], e[42], e[43]]);
    let (cid, head) = dev.fetch(admin.sq().mem(), tail).expect("the Abort");
    assert!(dev.post_dw0(admin.cq_mut().mem_mut(), cid, head, Status::SUCCESS, dw0));
    ((cdw10 & 0xffff) as u16, (cdw10 >> 16) as u16)
}

#[test]
fn a_timed_out_command_the_controller_aborts_completes_with_abort_requested_and_is_resubmitted() {
    let (mut io, mut dev) = (qp(1), Loopback::new(1));
    let held = one_command_held(&mut io, &mut dev);
    let since = Instant::now();
    assert_eq!(on_timeout(false), OnTimeout::Abort);

    let (mut admin, mut adev) = (qp(0), Loopback::new(0));
    admin
        .submit(&Sqe::abort(io.qid(), held), Dptr::NONE, 99)
        .map_err(|(e, _)| e)
        .expect("room");
    assert_eq!(
        controller_takes_abort(&mut admin, &mut adev, 0),
        (1, held),
        "CDW10 = SQID | CID << 16"
    );
    // The controller performs it: the command completes with Command Abort Requested.
    let status = Status::new(sct::GENERIC, sc::ABORT_REQUESTED, false);
    assert!(dev.post(io.cq_mut().mem_mut(), held, 2, status));

    let answer = completions(&mut admin);
    assert_eq!(answer.len(), 1);
    let (_, st, dw0) = answer[0];
    assert!(st.is_success());
    let mut raw = [0u8; 16];
    raw[..4].copy_from_slice(&dw0.to_le_bytes());
    let outcome = AbortOutcome::from_cqe(&Cqe::from_bytes(raw));
    assert_eq!(outcome, AbortOutcome::Aborted);
    let now = Instant::now();
    let aborting = after_abort::<()>(&Ok(outcome), held, since, now).expect("wait for it");
    assert_eq!((aborting.cid, aborting.since), (held, since));
    assert_eq!(aborting.deadline, now + ABORT_GRACE);

    let done = completions(&mut io);
    assert_eq!(done.len(), 1);
    let (value, status, _) = done[0];
    assert_eq!(value, 11);
    assert!(resubmit_after(status, true), "{status}");
    // Once completed it is no longer in flight: never overdue.
    assert!(!aborting.overdue(false, now + 2 * ABORT_GRACE));

    // Submitted again, it completes normally.
    io.submit(&Sqe::read(1, 8, 7, false), Dptr::NONE, 11)
        .map_err(|(e, _)| e)
        .expect("room");
    let tail = io.take_sq_doorbell().expect("doorbell");
    assert_eq!(dev.sq_doorbell(&mut io, tail), 1);
    assert_eq!(completions(&mut io), [(11, Status::SUCCESS, 0)]);
}

#[test]
fn an_abort_not_performed_or_failed_resets_the_controller() {
    let (mut io, mut dev) = (qp(1), Loopback::new(1));
    let held = one_command_held(&mut io, &mut dev);
    let (mut admin, mut adev) = (qp(0), Loopback::new(0));
    admin
        .submit(&Sqe::abort(1, held), Dptr::NONE, 99)
        .map_err(|(e, _)| e)
        .expect("room");
    // Dword 0 bit 0 set: not aborted (what QEMU's controller answers for I/O commands).
    controller_takes_abort(&mut admin, &mut adev, 1);
    let (_, _, dw0) = completions(&mut admin)[0];
    let mut raw = [0u8; 16];
    raw[..4].copy_from_slice(&dw0.to_le_bytes());
    let outcome = AbortOutcome::from_cqe(&Cqe::from_bytes(raw));
    assert_eq!(outcome, AbortOutcome::NotAborted);
    let now = Instant::now();
    assert_eq!(
        after_abort::<()>(&Ok(outcome), held, now, now),
        Err("abort not performed")
    );
    // The Abort itself failed (an error status, or no completion in time).
    assert_eq!(
        after_abort(&Err("admin timeout"), held, now, now),
        Err("abort failed")
    );
    // Nothing of the held command came back.
    assert!(completions(&mut io).is_empty());
}

#[test]
fn an_aborted_command_still_in_flight_after_the_grace_period_resets_the_controller() {
    let now = Instant::now();
    let a = after_abort::<()>(&Ok(AbortOutcome::Aborted), 3, now, now).expect("aborted");
    assert!(!a.overdue(true, now), "within the grace period");
    assert!(!a.overdue(true, now + ABORT_GRACE / 2));
    assert!(a.overdue(true, now + ABORT_GRACE));
    assert!(!a.overdue(false, now + ABORT_GRACE), "it completed");
}

#[test]
fn a_command_is_aborted_once_and_only_what_this_host_aborted_is_resubmitted() {
    assert_eq!(on_timeout(false), OnTimeout::Abort);
    assert_eq!(on_timeout(true), OnTimeout::Reset, "second timeout");
    let requested = Status::new(sct::GENERIC, sc::ABORT_REQUESTED, false);
    assert!(is_abort_requested(requested));
    assert!(
        !resubmit_after(requested, false),
        "not aborted by this host"
    );
    for other in [
        Status::SUCCESS,
        Status::new(sct::GENERIC, sc::ABORTED_SQ_DELETION, false),
        Status::new(sct::MEDIA, sc::ABORT_REQUESTED, false),
        Status::new(sct::GENERIC, sc::INTERNAL_ERROR, false),
    ] {
        assert!(!resubmit_after(other, true), "{other}");
    }
}

#[test]
fn a_fatal_controller_is_reset_at_once_and_never_sent_an_abort() {
    for aborted_in_flight in [None, Some(false), Some(true)] {
        for timed_out in [false, true] {
            let h = Health {
                fatal: true,
                aborted_in_flight,
                timed_out,
            };
            assert_eq!(check(h), Check::ResetFatal, "{h:?}");
        }
    }
}

#[test]
fn without_a_fatal_status_a_pending_abort_comes_before_the_oldest_commands_age() {
    let check_of = |aborted_in_flight, timed_out| {
        check(Health {
            fatal: false,
            aborted_in_flight,
            timed_out,
        })
    };
    assert_eq!(check_of(None, false), Check::Fine);
    assert_eq!(check_of(None, true), Check::TimedOut);
    // Within the grace period nothing else is looked at; past it, the controller is reset.
    assert_eq!(check_of(Some(false), true), Check::WaitForAbort);
    assert_eq!(check_of(Some(false), false), Check::WaitForAbort);
    assert_eq!(check_of(Some(true), false), Check::ResetAbortOverdue);
    assert_eq!(check_of(Some(true), true), Check::ResetAbortOverdue);
}
