//! NVMe PCIe completion handling (`nvme::pcie::QueuePair` and its rings) against a
//! misbehaving controller: `pcie::Loopback` fetches commands and posts completions whose
//! command identifier, SQ head, SQ identifier and status the input chooses, and raw entries
//! land anywhere in the completion queue with either phase.
//!
//! Checked beyond "no panic", against a model of the commands in flight: a completion is
//! handed out only for a command in flight under exactly that identifier, with the value it
//! was submitted with, and no command completes twice; an unknown (or stale, or duplicate)
//! identifier, another SQ's identifier and an SQ head outside what the controller may have
//! fetched are errors, and nothing else is; a poll stops early only at an entry of the wrong
//! phase; the CQ head moves by exactly the entries consumed and its phase flips at each wrap;
//! ring heads and tails stay in range; `submit` is refused exactly when the SQ or the command
//! table is full; and after an error every command still in flight is taken back, once.

#![no_main]

use std::collections::{BTreeMap, HashSet, VecDeque};

use libfuzzer_sys::fuzz_target;
use vubd::nvme::pcie::ring::{CqMem, RingError, SqSlot};
use vubd::nvme::pcie::{Dptr, Loopback, QueueError, QueuePair, SubmitError};
use vubd::nvme::spec::{Cqe, Sqe, Status};
use vubd_fuzz::nvme_pcie::{Entries, Input, Op, Pick, SqHead};

type Qp = QueuePair<u32, Vec<SqSlot>, Vec<Cqe>>;

fuzz_target!(|input: Input| run(&input));

fn entries(e: Entries) -> usize {
    match e {
        Entries::Small(n) => 2 + usize::from(n % 31),
        Entries::Large(n) => 2 + usize::from(n % 4095),
    }
}

/// What the host has handed out and what came back.
#[derive(Default)]
struct Model {
    /// Commands in flight, by identifier, with the value they were submitted with.
    live: BTreeMap<u16, u32>,
    /// Values ever completed or taken back.
    finished: HashSet<u32>,
    /// Identifiers of finished commands, in order.
    done: Vec<u16>,
    /// Identifiers the controller fetched and has not completed.
    fetched: VecDeque<u16>,
    next_value: u32,
}

impl Model {
    fn pick(&mut self, p: Pick) -> u16 {
        let nth = |len: usize, n: u8| (len > 0).then(|| usize::from(n) % len);
        match p {
            Pick::Fetched(n) => match nth(self.fetched.len(), n) {
                Some(i) => self.fetched.remove(i).expect("in range"),
                None => 0,
            },
            Pick::Live(n) => match nth(self.live.len(), n) {
                Some(i) => *self.live.keys().nth(i).expect("in range"),
                None => 0,
            },
            Pick::Done(n) => nth(self.done.len(), n).map_or(0, |i| self.done[i]),
            Pick::Raw(cid) => cid,
        }
    }

    /// Command `cid` finished with `value`, as the host reported.
    fn finish(&mut self, cid: u16, value: u32, how: &str) {
        assert_eq!(
            self.live.remove(&cid),
            Some(value),
            "{how} for command {cid:#06x}: not in flight with that value"
        );
        assert!(
            self.finished.insert(value),
            "command {value} finished twice"
        );
        self.done.push(cid);
    }
}

fn run(input: &Input) {
    let (sq_n, cq_n) = (entries(input.sq_entries), entries(input.cq_entries));
    let sq = vec![[0u8; 64]; sq_n];
    let cq = vec![Cqe::from_bytes([0; 16]); cq_n];
    let mut qp: Qp = QueuePair::new(input.qid, sq, cq).expect("sizes in range");
    assert_eq!(qp.depth(), (sq_n.min(cq_n) - 1).min(4096));
    let mut ctrl = Loopback::new(input.ctrl_qid.unwrap_or(input.qid));
    let mut m = Model::default();
    // The SQ tail as the controller last saw it in the doorbell.
    let mut tail = 0u32;
    for op in &input.ops {
        match *op {
            Op::Submit(n) => {
                for _ in 0..=n % 8 {
                    submit(&mut qp, &mut m);
                }
            }
            Op::SqDoorbell => {
                if let Some(t) = qp.take_sq_doorbell() {
                    assert_eq!(t, u32::from(qp.sq().tail()));
                    tail = t;
                }
                assert_eq!(qp.take_sq_doorbell(), None, "one doorbell per batch");
            }
            Op::Fetch(n) => {
                for _ in 0..=n % 8 {
                    let Some((cid, head)) = ctrl.fetch(qp.sq().mem(), tail) else {
                        break;
                    };
                    assert!(usize::from(head) < sq_n);
                    m.fetched.push_back(cid);
                }
            }
            Op::Complete { cid, sqhd, status } => {
                let cid = m.pick(cid);
                let sqhd = sq_head(sqhd, &ctrl);
                let cq = qp.cq_mut().mem_mut();
                ctrl.post(cq, cid, sqhd, Status::from_field(status));
            }
            Op::Raw {
                slot,
                cid,
                sqhd,
                sqid,
                status,
                phase,
            } => {
                let cid = m.pick(cid);
                let mut raw = [0u8; 16];
                raw[8..10].copy_from_slice(&sq_head(sqhd, &ctrl).to_le_bytes());
                raw[10..12].copy_from_slice(&sqid.to_le_bytes());
                raw[12..14].copy_from_slice(&cid.to_le_bytes());
                let field = (status & !1) | u16::from(phase);
                raw[14..].copy_from_slice(&field.to_le_bytes());
                qp.cq_mut().mem_mut()[usize::from(slot) % cq_n] = Cqe::from_bytes(raw);
            }
            Op::Poll(max) => {
                if let Err(e) = poll(&mut qp, &mut m, usize::from(max % 17))
                    && !input.ignore_errors
                {
                    // The driver resets the controller and takes every command back.
                    take_all(&mut qp, &mut m, &format!("reset after {e}"));
                    return;
                }
            }
            Op::CqDoorbell => {
                if let Some(h) = qp.take_cq_doorbell() {
                    assert_eq!(h, u32::from(qp.cq().head()));
                    ctrl.cq_doorbell(h);
                }
            }
            Op::Take(p) => {
                let cid = m.pick(p);
                match qp.take(cid) {
                    Some(v) => m.finish(cid, v, "taken back"),
                    None => assert!(!m.live.contains_key(&cid), "command {cid:#06x} not taken"),
                }
            }
        }
        check_rings(&qp, &m, sq_n, cq_n);
    }
    take_all(&mut qp, &mut m, "end");
}

fn sq_head(s: SqHead, ctrl: &Loopback) -> u16 {
    match s {
        SqHead::Fetched => ctrl.sq_head(),
        SqHead::Ahead(n) => ctrl.sq_head().wrapping_add(u16::from(n)),
        SqHead::Raw(h) => h,
    }
}

fn submit(qp: &mut Qp, m: &mut Model) {
    let value = m.next_value;
    m.next_value += 1;
    let full = qp.in_flight() == qp.depth() || qp.sq().is_full();
    let sqe = Sqe::read(1, u64::from(value), 7, false);
    match qp.submit(&sqe, Dptr::NONE, value) {
        Ok(cid) => {
            assert!(!full, "submitted into a full queue");
            assert!(
                m.live.insert(cid, value).is_none(),
                "identifier {cid:#06x} given twice"
            );
            assert_eq!(qp.get(cid), Some(&value));
        }
        Err((SubmitError::Full, v)) => {
            assert!(full, "refused with room left");
            assert_eq!(v, value, "the refused command is handed back");
        }
    }
}

/// Polls up to `max` completions and checks each against the model, and the error if any.
fn poll(qp: &mut Qp, m: &mut Model, max: usize) -> Result<usize, QueueError> {
    let n = qp.cq().size();
    let (head, phase) = (u32::from(qp.cq().head()), qp.cq().phase());
    let sq_tail = qp.sq().tail();
    let qid = qp.qid();
    let mut got = Vec::new();
    let res = qp.poll(max, |v, cqe| got.push((v, cqe)));
    for (v, cqe) in &got {
        assert_eq!(cqe.sqid(), qid);
        m.finish(cqe.cid(), *v, "completion");
    }
    if trace() {
        let cids: Vec<u16> = got.iter().map(|g| g.1.cid()).collect();
        eprintln!("poll({max}): completed {cids:x?}, {res:?}");
    }
    let consumed = got.len() as u32 + u32::from(res.is_err());
    assert!(consumed as usize <= max);
    let at = head + consumed;
    assert_eq!(
        u32::from(qp.cq().head()),
        at % n,
        "CQ head moved by the entries consumed"
    );
    assert_eq!(
        qp.cq().phase(),
        phase ^ ((at / n) % 2 == 1),
        "phase flips at each wrap"
    );
    match &res {
        Ok(k) => {
            assert_eq!(*k, got.len());
            if *k < max {
                let status = qp.cq().mem().load_status(qp.cq().head());
                assert_ne!(
                    status & 1 != 0,
                    qp.cq().phase(),
                    "poll stopped at a new entry"
                );
            }
        }
        Err(QueueError::UnknownCid { cid }) => {
            assert!(
                !m.live.contains_key(cid),
                "command {cid:#06x} in flight called unknown"
            );
        }
        Err(QueueError::WrongSqid { sqid, expected }) => {
            assert_eq!(*expected, qid);
            assert_ne!(*sqid, qid);
        }
        Err(QueueError::Ring(RingError::SqHead { sqhd, head, tail })) => {
            // The head the error names is the host's before this entry.
            let size = qp.sq().size();
            let dist = |a: u16, b: u16| (u32::from(b) + size - u32::from(a)) % size;
            let in_range = u32::from(*sqhd) < size && dist(*head, *sqhd) <= dist(*head, *tail);
            assert!(!in_range, "SQ head {sqhd} refused within {head}..={tail}");
            assert_eq!(*tail, sq_tail);
        }
        Err(e) => panic!("unexpected error {e}"),
    }
    res
}

/// `VUBD_FUZZ_TRACE` set: print what each poll returned.
fn trace() -> bool {
    static TRACE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *TRACE.get_or_init(|| std::env::var_os("VUBD_FUZZ_TRACE").is_some())
}

/// The rings' indices stay in range and the table holds as many commands as the model.
fn check_rings(qp: &Qp, m: &Model, sq_n: usize, cq_n: usize) {
    assert!(usize::from(qp.cq().head()) < cq_n);
    assert!(usize::from(qp.sq().head()) < sq_n && usize::from(qp.sq().tail()) < sq_n);
    assert!((qp.sq().in_flight() as usize) < sq_n);
    assert_eq!(qp.sq().free() + qp.sq().in_flight(), sq_n as u32 - 1);
    assert_eq!(qp.in_flight(), m.live.len());
    assert!(qp.in_flight() <= qp.depth());
}

/// The table holds exactly the model's identifiers (a scan of the table: once per input).
fn check_cids(qp: &Qp, m: &Model) {
    let mut cids: Vec<u16> = qp.cids().collect();
    cids.sort_unstable();
    assert!(cids.iter().eq(m.live.keys()), "in-flight identifiers");
}

/// Takes every command still in flight back, as a reset does, and checks none is left.
fn take_all(qp: &mut Qp, m: &mut Model, why: &str) {
    check_cids(qp, m);
    let cids: Vec<u16> = qp.cids().collect();
    for cid in cids {
        let v = qp.take(cid).expect("listed as in flight");
        m.finish(cid, v, why);
    }
    assert!(m.live.is_empty(), "{why}: commands lost: {:?}", m.live);
    assert_eq!(qp.in_flight(), 0);
}
