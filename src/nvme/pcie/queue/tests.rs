use super::*;
use crate::nvme::pcie::ring::SqSlot;
use crate::nvme::pcie::{Loopback, PageSize, prp};
use crate::nvme::spec::{Status, sc, sct};

type Qp<T> = QueuePair<T, Vec<SqSlot>, Vec<Cqe>>;

fn qp<T>(sq: usize, cq: usize) -> Qp<T> {
    QueuePair::new(1, vec![[0; 64]; sq], vec![Cqe::from_bytes([0; 16]); cq]).expect("sizes")
}

fn read_4k(buf: u64) -> (Sqe, Dptr) {
    let mut no_list = [];
    let mut list = prp::PrpList::new(&mut no_list, 0, PageSize::K4).expect("empty list");
    let p = prp::build([(buf, 4096)], 4096, &mut list).expect("one page");
    (Sqe::read(1, 8, 7, false), p.dptr())
}

/// Everything the completion path hands out, in order.
fn drain<T>(q: &mut Qp<T>, dev: &mut Loopback) -> Result<Vec<(T, u16)>, QueueError> {
    let mut out = Vec::new();
    q.poll(usize::MAX, |v, cqe| out.push((v, cqe.cid())))?;
    if let Some(head) = q.take_cq_doorbell() {
        dev.cq_doorbell(head);
    }
    Ok(out)
}

#[test]
fn submit_writes_the_command_with_its_identifier_and_data_pointer() {
    let mut q = qp::<&str>(8, 8);
    let (sqe, dptr) = read_4k(0x4000_1000);
    let cid = q.submit(&sqe, dptr, "a").expect("room");
    let e = q.sq().mem()[0];
    assert_eq!(e[0], 0x02, "read opcode");
    assert_eq!(u16::from_le_bytes([e[2], e[3]]), cid);
    assert_eq!(e[1] & 0xc0, 0, "PSDT: PRPs");
    assert_eq!(e[24..32], 0x4000_1000u64.to_le_bytes());
    assert_eq!(e[32..40], [0; 8]);
    assert_eq!(e[40..48], 8u64.to_le_bytes(), "SLBA as built");
    assert_eq!(q.in_flight(), 1);
}

#[test]
fn the_sq_doorbell_covers_a_whole_batch() {
    let mut q = qp::<u32>(8, 8);
    let (sqe, dptr) = read_4k(0x1000);
    assert_eq!(q.take_sq_doorbell(), None);
    for i in 0..3 {
        q.submit(&sqe, dptr, i).expect("room");
    }
    assert_eq!(q.take_sq_doorbell(), Some(3));
    assert_eq!(q.take_sq_doorbell(), None);
}

#[test]
fn a_full_queue_hands_the_command_back() {
    // 4 SQ entries: 3 in flight at most.
    let mut q = qp::<String>(4, 16);
    assert_eq!(q.depth(), 3);
    let (sqe, dptr) = read_4k(0x1000);
    for i in 0..3 {
        q.submit(&sqe, dptr, i.to_string()).expect("room");
    }
    let (err, back) = q.submit(&sqe, dptr, "mine".into()).unwrap_err();
    assert_eq!((err, back.as_str()), (SubmitError::Full, "mine"));
    // A completion queue smaller than the SQ bounds the depth: it must never overflow.
    let q = qp::<()>(64, 8);
    assert_eq!(q.depth(), 7);
}

#[test]
fn completions_return_each_command_and_free_its_sq_slot() {
    let mut q = qp::<u32>(4, 4);
    let mut dev = Loopback::new(1);
    let (sqe, dptr) = read_4k(0x1000);
    for i in 0..3 {
        q.submit(&sqe, dptr, i).expect("room");
    }
    assert!(q.submit(&sqe, dptr, 3).is_err());
    let tail = q.take_sq_doorbell().expect("pushed");
    assert_eq!(dev.sq_doorbell(&mut q, tail), 3);
    let done = drain(&mut q, &mut dev).expect("valid");
    assert_eq!(done.iter().map(|d| d.0).collect::<Vec<_>>(), [0, 1, 2]);
    assert_eq!(q.sq().head(), 3, "SQHD of the last completion");
    assert_eq!(q.in_flight(), 0);
    q.submit(&sqe, dptr, 3).expect("room again");
}

#[test]
fn a_reused_identifier_does_not_accept_a_late_completion_for_its_old_command() {
    let mut q = qp::<&str>(8, 8);
    let mut dev = Loopback::new(1);
    let (sqe, dptr) = read_4k(0x1000);
    let first = q.submit(&sqe, dptr, "first").expect("room");
    let tail = q.take_sq_doorbell().expect("pushed");
    dev.sq_doorbell(&mut q, tail);
    assert_eq!(drain(&mut q, &mut dev).expect("valid"), [("first", first)]);
    // The slot is reused under a new generation.
    let second = q.submit(&sqe, dptr, "second").expect("room");
    assert_ne!(first, second);
    assert_eq!(
        first & 7,
        second & 7,
        "same table slot (depth 7: 3 index bits)"
    );
    // The controller answers the old identifier again.
    assert!(dev.post(q.cq_mut().mem_mut(), first, 1, Status::SUCCESS));
    assert_eq!(
        drain(&mut q, &mut dev),
        Err(QueueError::UnknownCid { cid: first })
    );
    // The live command is untouched, ready to be retried after a reset.
    assert_eq!(q.cids().collect::<Vec<_>>(), [second]);
    assert_eq!(q.take(second), Some("second"));
}

#[test]
fn a_completion_for_another_queue_or_with_a_bad_sq_head_is_a_controller_fault() {
    let mut q = qp::<u8>(8, 8);
    let (sqe, dptr) = read_4k(0x1000);
    let cid = q.submit(&sqe, dptr, 1).expect("room");
    let mut other = Loopback::new(2);
    assert!(other.post(q.cq_mut().mem_mut(), cid, 1, Status::SUCCESS));
    let mut n = 0;
    assert_eq!(
        q.poll(8, |_, _| n += 1),
        Err(QueueError::WrongSqid {
            sqid: 2,
            expected: 1
        })
    );

    let mut q = qp::<u8>(8, 8);
    let cid = q.submit(&sqe, dptr, 1).expect("room");
    let mut dev = Loopback::new(1);
    assert!(dev.post(q.cq_mut().mem_mut(), cid, 5, Status::SUCCESS));
    assert_eq!(
        q.poll(8, |_, _| n += 1),
        Err(QueueError::Ring(RingError::SqHead {
            sqhd: 5,
            head: 0,
            tail: 1
        }))
    );
    assert_eq!(n, 0);
}

#[test]
fn the_status_travels_with_the_completion() {
    let mut q = qp::<u8>(8, 8);
    let (sqe, dptr) = read_4k(0x1000);
    let cid = q.submit(&sqe, dptr, 1).expect("room");
    let mut dev = Loopback::new(1);
    let st = Status::new(sct::MEDIA, sc::UNRECOVERED_READ_ERROR, true);
    assert!(dev.post(q.cq_mut().mem_mut(), cid, 1, st));
    let mut got = None;
    q.poll(8, |v, cqe| got = Some((v, cqe.status())))
        .expect("valid");
    assert_eq!(got, Some((1, st)));
}

#[test]
fn out_of_order_completions_map_to_their_commands() {
    let mut q = qp::<u32>(16, 16);
    let mut dev = Loopback::new(1);
    let (sqe, dptr) = read_4k(0x1000);
    let cids: Vec<u16> = (0..5)
        .map(|i| q.submit(&sqe, dptr, i).expect("room"))
        .collect();
    let tail = q.take_sq_doorbell().expect("pushed");
    let mut fetched = Vec::new();
    while let Some((cid, head)) = dev.fetch(q.sq().mem(), tail) {
        fetched.push((cid, head));
    }
    assert_eq!(fetched.iter().map(|f| f.0).collect::<Vec<_>>(), cids);
    for &i in &[3usize, 0, 4, 1, 2] {
        assert!(dev.post(q.cq_mut().mem_mut(), cids[i], 5, Status::SUCCESS));
    }
    let done = drain(&mut q, &mut dev).expect("valid");
    assert_eq!(
        done.iter().map(|d| d.0).collect::<Vec<_>>(),
        [3, 0, 4, 1, 2]
    );
    assert_eq!(q.in_flight(), 0);
}

#[test]
fn thousands_of_commands_wrap_both_rings_many_times() {
    // Ring sizes that do not divide each other, batches of varying size.
    let mut q = qp::<u64>(5, 7);
    let mut dev = Loopback::new(1);
    let (sqe, dptr) = read_4k(0x1000);
    let (mut next, mut done) = (0u64, 0u64);
    for round in 0..5000u64 {
        let batch = round % 5;
        for _ in 0..batch {
            match q.submit(&sqe, dptr, next) {
                Ok(_) => next += 1,
                Err((SubmitError::Full, v)) => assert_eq!(v, next),
            }
        }
        if let Some(tail) = q.take_sq_doorbell() {
            dev.sq_doorbell(&mut q, tail);
        }
        for (v, _) in drain(&mut q, &mut dev).expect("valid") {
            assert_eq!(v, done, "completions in submission order");
            done += 1;
        }
    }
    assert_eq!(done, next);
    assert!(done > 5000, "{done}");
    assert_eq!(q.in_flight(), 0);
}
