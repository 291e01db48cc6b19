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
    let base = Input {
        qid: 1,
        sq_entries: Entries::Small(6),
        cq_entries: Entries::Small(6),
        ctrl_qid: None,
        ignore_errors: false,
        ops: fetched(
            3,
            &[
                good(Pick::Fetched(0)),
                good(Pick::Fetched(0)),
                Op::Poll(16),
                good(Pick::Fetched(0)),
                Op::Poll(16),
                Op::CqDoorbell,
            ],
        ),
    };
    // Most seeds misbehave after `base`'s well-behaved run, so the driver already has
    // completed commands and a moved CQ head behind it.
    let with = |ops: Vec<Op>| {
        let mut i = base.clone();
        i.ops.extend(ops);
        i
    };
    vec![
        ("in_order", base.clone()),
        (
            "wrapping",
            Input {
                sq_entries: Entries::Small(1),
                cq_entries: Entries::Small(0),
                ..with(fetched(0, &[good(Pick::Fetched(0)), Op::Poll(1), Op::CqDoorbell]).repeat(3))
            },
        ),
        (
            "wrong_sqid",
            Input {
                ctrl_qid: Some(2),
                ..base.clone()
            },
        ),
        (
            "duplicate",
            with(fetched(0, &[good(Pick::Done(0)), Op::Poll(4)])),
        ),
        (
            "late_answer_for_a_reused_slot",
            with(fetched(
                2,
                &[good(Pick::Fetched(0)), good(Pick::Done(1)), Op::Poll(4)],
            )),
        ),
        (
            "unknown_cid",
            with(fetched(0, &[good(Pick::Raw(0x0fff)), Op::Poll(4)])),
        ),
        (
            "sq_head_ahead_of_the_tail",
            with(fetched(
                0,
                &[complete(Pick::Fetched(0), SqHead::Ahead(2), 0), Op::Poll(4)],
            )),
        ),
        (
            "wrong_phase",
            with(submitted(0, &[raw(3, Pick::Live(0), false), Op::Poll(4)])),
        ),
        (
            "error_status_then_reset",
            with(fetched(
                1,
                &[
                    complete(Pick::Fetched(0), SqHead::Fetched, 0x4004),
                    Op::Poll(4),
                    Op::Take(Pick::Live(0)),
                ],
            )),
        ),
        (
            "poll_after_an_error",
            Input {
                ignore_errors: true,
                ..with(fetched(
                    0,
                    &[
                        good(Pick::Raw(0xffff)),
                        good(Pick::Fetched(0)),
                        Op::Poll(4),
                        Op::Poll(4),
                    ],
                ))
            },
        ),
        (
            "out_of_order",
            with(fetched(
                3,
                &[
                    good(Pick::Fetched(3)),
                    good(Pick::Fetched(1)),
                    good(Pick::Fetched(0)),
                    Op::Poll(2),
                    Op::CqDoorbell,
                    good(Pick::Fetched(0)),
                    Op::Poll(16),
                ],
            )),
        ),
        (
            "late_answer_after_take_back",
            with(fetched(
                0,
                &[Op::Take(Pick::Live(0)), good(Pick::Fetched(0)), Op::Poll(4)],
            )),
        ),
        (
            "sq_head_going_back",
            with(fetched(
                1,
                &[
                    good(Pick::Fetched(0)),
                    complete(Pick::Fetched(0), SqHead::Raw(0), 0),
                    Op::Poll(4),
                ],
            )),
        ),
        (
            "sq_head_outside_the_ring",
            with(fetched(
                0,
                &[
                    complete(Pick::Fetched(0), SqHead::Raw(0xffff), 0),
                    Op::Poll(4),
                ],
            )),
        ),
        (
            "new_entry_behind_a_stale_one",
            with(submitted(1, &[raw(4, Pick::Live(1), true), Op::Poll(4)])),
        ),
        (
            "cq_full_until_the_head_doorbell",
            Input {
                qid: 3,
                sq_entries: Entries::Small(0),
                cq_entries: Entries::Small(0),
                ops: fetched(
                    1,
                    &[
                        good(Pick::Fetched(0)),
                        good(Pick::Fetched(0)),
                        Op::Poll(16),
                        good(Pick::Fetched(0)),
                        Op::CqDoorbell,
                        good(Pick::Live(0)),
                        Op::Poll(16),
                        Op::CqDoorbell,
                    ],
                ),
                ..base.clone()
            },
        ),
        (
            "large_rings",
            Input {
                sq_entries: Entries::Large(1022),
                cq_entries: Entries::Large(4094),
                ..with(
                    fetched(
                        7,
                        &[
                            good(Pick::Fetched(2)),
                            good(Pick::Fetched(0)),
                            Op::Poll(16),
                            Op::CqDoorbell,
                        ],
                    )
                    .repeat(20),
                )
            },
        ),
        (
            "submit_past_full",
            with(vec![
                Op::Submit(7),
                Op::Submit(7),
                Op::SqDoorbell,
                Op::Submit(1),
            ]),
        ),
        (
            "error_statuses",
            with(fetched(
                2,
                &[
                    complete(
                        Pick::Fetched(0),
                        SqHead::Fetched,
                        0x8000 | (1 << 9) | (0x80 << 1),
                    ),
                    complete(Pick::Fetched(0), SqHead::Fetched, 0x4000 | (7 << 9)),
                    Op::Poll(16),
                ],
            )),
        ),
    ]
}

/// The host submits `1 + n % 8` commands and rings the doorbell, then `then`.
fn submitted(n: u8, then: &[Op]) -> Vec<Op> {
    [&[Op::Submit(n), Op::SqDoorbell], then].concat()
}

/// As [`submitted`], with the controller fetching the commands before `then`: the opening
/// of every seed in which the controller completes what it was given.
fn fetched(n: u8, then: &[Op]) -> Vec<Op> {
    submitted(n, &[&[Op::Fetch(n)], then].concat())
}

fn complete(cid: Pick, sqhd: SqHead, status: u16) -> Op {
    Op::Complete { cid, sqhd, status }
}

/// A completion as a well-behaved controller posts it.
fn good(cid: Pick) -> Op {
    complete(cid, SqHead::Fetched, 0)
}

/// An entry written straight into CQ slot `slot` (see [`Op::Raw`]), with the queue's own SQ
/// id and head and a success status: what is wrong is where it stands and its phase.
fn raw(slot: u16, cid: Pick, phase: bool) -> Op {
    Op::Raw {
        slot,
        cid,
        sqhd: SqHead::Fetched,
        sqid: 1,
        status: 0,
        phase,
    }
}
