use super::*;
use crate::nvme::pcie::Loopback;
use crate::nvme::spec::Status;

fn sq(n: usize) -> SqRing<Vec<SqSlot>> {
    SqRing::new(vec![[0; 64]; n]).expect("size")
}

fn cq(n: usize) -> CqRing<Vec<Cqe>> {
    CqRing::new(vec![Cqe::from_bytes([0; 16]); n]).expect("size")
}

fn entry(tag: u8) -> SqSlot {
    let mut e = [0; 64];
    e[0] = tag;
    e
}

#[test]
fn ring_sizes_are_2_to_65536() {
    for bad in [0, 1, 65_537] {
        assert_eq!(
            SqRing::new(vec![[0; 64]; bad]).err(),
            Some(RingError::Size(bad))
        );
        let mem = vec![Cqe::from_bytes([0; 16]); bad];
        assert_eq!(CqRing::new(mem).err(), Some(RingError::Size(bad)));
    }
    assert_eq!(sq(2).size(), 2);
    assert_eq!(cq(65_536).size(), 65_536);
}

#[test]
fn a_submission_queue_is_full_with_one_entry_less_than_its_size() {
    let mut r = sq(4);
    assert_eq!((r.free(), r.in_flight()), (3, 0));
    for (i, tail) in [1, 2, 3].into_iter().enumerate() {
        assert_eq!(r.push(&entry(i as u8)), Ok(tail));
    }
    assert!(r.is_full());
    assert_eq!(r.push(&entry(9)), Err(SqFull));
    assert_eq!((r.free(), r.in_flight()), (0, 3));
    assert_eq!(r.mem()[..3], [entry(0), entry(1), entry(2)]);
    assert_eq!(r.mem()[3], [0; 64], "the refused entry was not written");
}

#[test]
fn the_sq_head_from_completions_frees_slots_and_the_tail_wraps() {
    let mut r = sq(4);
    for i in 0..3 {
        r.push(&entry(i)).expect("room");
    }
    r.update_head(2).expect("consumed two");
    assert_eq!((r.head(), r.free()), (2, 2));
    assert_eq!(r.push(&entry(3)), Ok(0), "the tail wraps to 0");
    assert_eq!(r.push(&entry(4)), Ok(1));
    assert_eq!(r.push(&entry(5)), Err(SqFull));
    assert_eq!(r.mem()[3], entry(3));
    assert_eq!(r.mem()[0], entry(4));
    // A head equal to the last one reported changes nothing; equal to the tail empties it.
    r.update_head(2).expect("same head");
    r.update_head(1).expect("up to the tail, across the wrap");
    assert_eq!((r.in_flight(), r.free()), (0, 3));
}

#[test]
fn an_sq_head_outside_what_the_controller_may_have_consumed_is_refused() {
    let mut r = sq(8);
    for i in 0..5 {
        r.push(&entry(i)).expect("room");
    }
    r.update_head(2).expect("fine");
    // Beyond the tail, behind the last head, or outside the ring.
    for sqhd in [6, 7, 1, 8, u16::MAX] {
        assert_eq!(
            r.update_head(sqhd),
            Err(RingError::SqHead {
                sqhd,
                head: 2,
                tail: 5
            })
        );
    }
    assert_eq!(r.head(), 2, "a refused head is not taken");
}

#[test]
fn the_sq_doorbell_is_rung_once_per_batch() {
    let mut r = sq(8);
    assert_eq!(r.take_doorbell(), None, "nothing pushed");
    r.push(&entry(0)).expect("room");
    r.push(&entry(1)).expect("room");
    assert!(r.needs_doorbell());
    assert_eq!(r.take_doorbell(), Some(2));
    assert!(!r.needs_doorbell());
    assert_eq!(r.take_doorbell(), None);
    assert_eq!(r.doorbell_value(), 2);
    // A refused push does not dirty the ring.
    let mut r = sq(2);
    r.push(&entry(0)).expect("room");
    r.take_doorbell();
    assert!(r.push(&entry(1)).is_err());
    assert_eq!(r.take_doorbell(), None);
}

#[test]
fn a_65536_entry_ring_wraps_its_16_bit_indices() {
    let mut r = sq(65_536);
    for i in 0..65_535u32 {
        r.push(&entry(i as u8)).expect("room");
    }
    assert!(r.is_full());
    assert_eq!(r.tail(), 65_535);
    r.update_head(65_535).expect("all consumed");
    assert_eq!(r.push(&entry(1)), Ok(0));
    assert_eq!(r.in_flight(), 1);
}

#[test]
fn completions_with_the_old_phase_are_not_consumed() {
    let mut c = cq(4);
    // Zeroed memory has phase 0; the host expects 1 on the first pass.
    assert_eq!(c.pop(), None);
    assert_eq!(c.take_doorbell(), None);
    let mut dev = Loopback::new(1);
    assert!(dev.post(c.mem_mut(), 7, 1, Status::SUCCESS));
    assert_eq!(c.pop().map(|e| e.cid()), Some(7));
    assert_eq!(c.pop(), None, "the next slot is still stale");
    // A stale entry that looks complete in every other way is still stale.
    let mut raw = [0u8; 16];
    raw[12] = 9;
    c.mem_mut()[1] = Cqe::from_bytes(raw);
    assert_eq!(c.pop(), None);
    assert_eq!(c.take_doorbell(), Some(1));
}

#[test]
fn the_completion_queue_wraps_many_times_flipping_the_phase() {
    let mut c = cq(4);
    let mut dev = Loopback::new(1);
    let mut seen = Vec::new();
    for i in 0..1000u16 {
        assert!(dev.post(c.mem_mut(), i, 0, Status::SUCCESS));
        let phase_before = c.phase();
        assert_eq!(c.poll(8, |e| seen.push(e.cid())), 1);
        // The phase flips exactly when the head wraps to 0.
        assert_eq!(c.phase() != phase_before, c.head() == 0);
        let head = c.take_doorbell().expect("consumed");
        assert_eq!(head, u32::from((i + 1) % 4));
        dev.cq_doorbell(head);
    }
    assert_eq!(seen, (0..1000).collect::<Vec<_>>());
    // 1000 entries = 250 passes: back on the first pass's phase.
    assert!(c.phase());
}

#[test]
fn poll_stops_at_max_and_at_the_first_stale_entry() {
    let mut c = cq(8);
    let mut dev = Loopback::new(1);
    for cid in 0..5 {
        assert!(dev.post(c.mem_mut(), cid, 0, Status::SUCCESS));
    }
    let mut seen = Vec::new();
    assert_eq!(c.poll(3, |e| seen.push(e.cid())), 3);
    assert_eq!(c.poll(8, |e| seen.push(e.cid())), 2);
    assert_eq!(c.poll(8, |e| seen.push(e.cid())), 0);
    assert_eq!(seen, [0, 1, 2, 3, 4]);
    assert_eq!(c.take_doorbell(), Some(5));
}

#[test]
fn the_controller_model_does_not_overrun_an_unreleased_completion_queue() {
    let mut c = cq(4);
    let mut dev = Loopback::new(1);
    for cid in 0..3 {
        assert!(dev.post(c.mem_mut(), cid, 0, Status::SUCCESS));
    }
    assert!(!dev.post(c.mem_mut(), 3, 0, Status::SUCCESS), "CQ full");
    assert_eq!(c.poll(8, |_| {}), 3);
    assert!(
        !dev.post(c.mem_mut(), 3, 0, Status::SUCCESS),
        "head doorbell not written yet"
    );
    dev.cq_doorbell(c.take_doorbell().expect("consumed"));
    assert!(dev.post(c.mem_mut(), 3, 0, Status::SUCCESS));
}

#[test]
fn dma_memory_reads_and_writes_like_slices() {
    let mut cq_mem = vec![Cqe::from_bytes([0; 16]); 4];
    let mut sq_mem = vec![[0u8; 64]; 4];
    let cq_base = NonNull::new(cq_mem.as_mut_ptr()).expect("non-null");
    let sq_base = NonNull::new(sq_mem.as_mut_ptr()).expect("non-null");
    // SAFETY: both vectors outlive the rings (dropped after them), are not resized, and are
    // touched only through the rings and the model's write below, which happens while no
    // ring access is in progress (one thread).
    let (dsq, dcq) = unsafe { (DmaSq::new(sq_base, 4), DmaCq::new(cq_base, 4)) };
    let mut s = SqRing::new(dsq).expect("size");
    let mut c = CqRing::new(dcq).expect("size");
    s.push(&entry(5)).expect("room");
    assert_eq!(c.pop(), None);
    let mut raw = [0u8; 16];
    raw[12..14].copy_from_slice(&0x1234u16.to_le_bytes());
    raw[14] = 1;
    // SAFETY: index 0 of the 4 entries; the ring reads only after this write (one thread).
    unsafe { cq_base.write_volatile(Cqe::from_bytes(raw)) };
    assert_eq!(c.pop().map(|e| e.cid()), Some(0x1234));
    assert_eq!(c.pop(), None);
    assert_eq!(sq_mem[0], entry(5));
}
