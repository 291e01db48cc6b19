//! Input of `nvme_pcie_cq`: a queue pair and a misbehaving controller. The host submits
//! commands, rings doorbells and polls; the controller fetches commands and posts completions
//! through `pcie::Loopback` with command identifiers, SQ heads and statuses of the input's
//! choosing, or writes raw entries anywhere in the completion queue (wrong phase, wrong SQ
//! id, duplicates, stale identifiers).

use arbitrary::Arbitrary;

use crate::{encode_enum, encode_struct};

#[derive(Arbitrary, Clone, Debug, PartialEq, Eq)]
pub struct Input {
    pub qid: u16,
    pub sq_entries: Entries,
    pub cq_entries: Entries,
    /// The SQ identifier the controller puts in its completions (`None`: the queue's).
    pub ctrl_qid: Option<u16>,
    /// Keep polling after a queue error, where the driver would reset the controller and
    /// take every command back.
    pub ignore_errors: bool,
    pub ops: Vec<Op>,
}
encode_struct!(Input {
    qid,
    sq_entries,
    cq_entries,
    ctrl_qid,
    ignore_errors,
    ops
});

/// A ring size: `2 + n % 31` or `2 + n % 4095` entries.
#[derive(Arbitrary, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Entries {
    Small(u8),
    Large(u16),
}
encode_enum!(Entries { Small(n), Large(n) });

#[derive(Arbitrary, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// The host submits `1 + n % 8` commands.
    Submit(u8),
    /// The host writes the SQ tail doorbell (if it has pushed entries since the last one).
    SqDoorbell,
    /// The controller fetches up to `1 + n % 8` entries the doorbell covers.
    Fetch(u8),
    /// The controller posts a completion at its CQ tail (if the CQ is not full).
    Complete {
        cid: Pick,
        sqhd: SqHead,
        status: u16,
    },
    /// An entry written at CQ slot `slot` (modulo the size), bypassing the controller model.
    Raw {
        slot: u16,
        cid: Pick,
        sqhd: SqHead,
        sqid: u16,
        status: u16,
        phase: bool,
    },
    /// The host polls up to `n % 17` completions.
    Poll(u8),
    /// The host writes the CQ head doorbell (if it has consumed entries since the last one).
    CqDoorbell,
    /// The host takes a command back without a completion (as after a reset).
    Take(Pick),
}
encode_enum!(Op {
    Submit(n),
    SqDoorbell,
    Fetch(n),
    Complete { cid, sqhd, status },
    Raw { slot, cid, sqhd, sqid, status, phase },
    Poll(n),
    CqDoorbell,
    Take(cid),
});

/// A command identifier: of a command the controller fetched and has not completed, of any
/// command in flight, of one already completed (a duplicate or a late answer), or raw.
#[derive(Arbitrary, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pick {
    Fetched(u8),
    Live(u8),
    Done(u8),
    Raw(u16),
}
encode_enum!(Pick { Fetched(n), Live(n), Done(n), Raw(n) });

/// The SQ head a completion reports: the controller's, `n` past it, or raw.
#[derive(Arbitrary, Clone, Copy, Debug, PartialEq, Eq)]
pub enum SqHead {
    Fetched,
    Ahead(u8),
    Raw(u16),
}
encode_enum!(SqHead { Fetched, Ahead(n), Raw(n) });

/// Seeds: a well-behaved controller, and each way of misbehaving once.
pub fn seeds() -> Vec<(&'static str, Input)> {
    let good = |cid| Op::Complete {
        cid,
        sqhd: SqHead::Fetched,
        status: 0,
    };
    let base = Input {
        qid: 1,
        sq_entries: Entries::Small(6),
        cq_entries: Entries::Small(6),
        ctrl_qid: None,
        ignore_errors: false,
        ops: vec![
            Op::Submit(3),
            Op::SqDoorbell,
            Op::Fetch(3),
            good(Pick::Fetched(0)),
            good(Pick::Fetched(0)),
            Op::Poll(16),
            good(Pick::Fetched(0)),
            Op::Poll(16),
            Op::CqDoorbell,
        ],
    };
    let with = |ops: &[Op]| {
        let mut i = base.clone();
        i.ops.extend_from_slice(ops);
        i
    };
    let mut out = vec![("in_order", base.clone())];
    let mut wrap = base.clone();
    wrap.sq_entries = Entries::Small(1);
    wrap.cq_entries = Entries::Small(0);
    for _ in 0..3 {
        wrap.ops.extend([
            Op::Submit(0),
            Op::SqDoorbell,
            Op::Fetch(0),
            good(Pick::Fetched(0)),
            Op::Poll(1),
            Op::CqDoorbell,
        ]);
    }
    out.push(("wrapping", wrap));
    let mut two_q = base.clone();
    two_q.ctrl_qid = Some(2);
    out.push(("wrong_sqid", two_q));
    out.push((
        "duplicate",
        with(&[
            Op::Submit(0),
            Op::SqDoorbell,
            Op::Fetch(0),
            good(Pick::Done(0)),
            Op::Poll(4),
        ]),
    ));
    out.push((
        "late_answer_for_a_reused_slot",
        with(&[
            Op::Submit(2),
            Op::SqDoorbell,
            Op::Fetch(2),
            good(Pick::Fetched(0)),
            good(Pick::Done(1)),
            Op::Poll(4),
        ]),
    ));
    out.push((
        "unknown_cid",
        with(&[
            Op::Submit(0),
            Op::SqDoorbell,
            Op::Fetch(0),
            good(Pick::Raw(0x0fff)),
            Op::Poll(4),
        ]),
    ));
    out.push((
        "sq_head_ahead_of_the_tail",
        with(&[
            Op::Submit(0),
            Op::SqDoorbell,
            Op::Fetch(0),
            Op::Complete {
                cid: Pick::Fetched(0),
                sqhd: SqHead::Ahead(2),
                status: 0,
            },
            Op::Poll(4),
        ]),
    ));
    out.push((
        "wrong_phase",
        with(&[
            Op::Submit(0),
            Op::SqDoorbell,
            Op::Raw {
                slot: 3,
                cid: Pick::Live(0),
                sqhd: SqHead::Fetched,
                sqid: 1,
                status: 0,
                phase: false,
            },
            Op::Poll(4),
        ]),
    ));
    out.push((
        "error_status_then_reset",
        with(&[
            Op::Submit(1),
            Op::SqDoorbell,
            Op::Fetch(1),
            Op::Complete {
                cid: Pick::Fetched(0),
                sqhd: SqHead::Fetched,
                status: 0x4004,
            },
            Op::Poll(4),
            Op::Take(Pick::Live(0)),
        ]),
    ));
    let mut keep_going = with(&[
        Op::Submit(0),
        Op::SqDoorbell,
        Op::Fetch(0),
        good(Pick::Raw(0xffff)),
        good(Pick::Fetched(0)),
        Op::Poll(4),
        Op::Poll(4),
    ]);
    keep_going.ignore_errors = true;
    out.push(("poll_after_an_error", keep_going));
    out.push((
        "out_of_order",
        with(&[
            Op::Submit(3),
            Op::SqDoorbell,
            Op::Fetch(3),
            good(Pick::Fetched(3)),
            good(Pick::Fetched(1)),
            good(Pick::Fetched(0)),
            Op::Poll(2),
            Op::CqDoorbell,
            good(Pick::Fetched(0)),
            Op::Poll(16),
        ]),
    ));
    out.push((
        "late_answer_after_take_back",
        with(&[
            Op::Submit(0),
            Op::SqDoorbell,
            Op::Fetch(0),
            Op::Take(Pick::Live(0)),
            good(Pick::Fetched(0)),
            Op::Poll(4),
        ]),
    ));
    out.push((
        "sq_head_going_back",
        with(&[
            Op::Submit(1),
            Op::SqDoorbell,
            Op::Fetch(1),
            good(Pick::Fetched(0)),
            Op::Complete {
                cid: Pick::Fetched(0),
                sqhd: SqHead::Raw(0),
                status: 0,
            },
            Op::Poll(4),
        ]),
    ));
    out.push((
        "sq_head_outside_the_ring",
        with(&[
            Op::Submit(0),
            Op::SqDoorbell,
            Op::Fetch(0),
            Op::Complete {
                cid: Pick::Fetched(0),
                sqhd: SqHead::Raw(0xffff),
                status: 0,
            },
            Op::Poll(4),
        ]),
    ));
    out.push((
        "new_entry_behind_a_stale_one",
        with(&[
            Op::Submit(1),
            Op::SqDoorbell,
            Op::Raw {
                slot: 4,
                cid: Pick::Live(1),
                sqhd: SqHead::Fetched,
                sqid: 1,
                status: 0,
                phase: true,
            },
            Op::Poll(4),
        ]),
    ));
    let mut tiny = Input {
        qid: 3,
        sq_entries: Entries::Small(0),
        cq_entries: Entries::Small(0),
        ctrl_qid: None,
        ignore_errors: false,
        ops: vec![],
    };
    tiny.ops = vec![
        Op::Submit(1),
        Op::SqDoorbell,
        Op::Fetch(1),
        good(Pick::Fetched(0)),
        good(Pick::Fetched(0)),
        Op::Poll(16),
        good(Pick::Fetched(0)),
        Op::CqDoorbell,
        good(Pick::Live(0)),
        Op::Poll(16),
        Op::CqDoorbell,
    ];
    out.push(("cq_full_until_the_head_doorbell", tiny));
    let mut large = base.clone();
    large.sq_entries = Entries::Large(1022);
    large.cq_entries = Entries::Large(4094);
    for _ in 0..20 {
        large.ops.extend([
            Op::Submit(7),
            Op::SqDoorbell,
            Op::Fetch(7),
            good(Pick::Fetched(2)),
            good(Pick::Fetched(0)),
            Op::Poll(16),
            Op::CqDoorbell,
        ]);
    }
    out.push(("large_rings", large));
    out.push((
        "submit_past_full",
        with(&[Op::Submit(7), Op::Submit(7), Op::SqDoorbell, Op::Submit(1)]),
    ));
    out.push((
        "error_statuses",
        with(&[
            Op::Submit(2),
            Op::SqDoorbell,
            Op::Fetch(2),
            Op::Complete {
                cid: Pick::Fetched(0),
                sqhd: SqHead::Fetched,
                status: 0x8000 | (1 << 9) | (0x80 << 1),
            },
            Op::Complete {
                cid: Pick::Fetched(0),
                sqhd: SqHead::Fetched,
                status: 0x4000 | (7 << 9),
            },
            Op::Poll(16),
        ]),
    ));
    out
}
