//! Chains the parser accepts, and what it makes of them.

use super::*;

#[test]
fn in_maps_writable_data_to_iovecs_and_status_to_last_byte() {
    let b = Bench::new();
    let c = [r(HDR, 16), w(DATA, 1024), st()];
    let (_, iov, _) = b.accepts(IN, 7, &c, STATUS, &[(DATA, 1024)]);
    assert_eq!(iov.len(), 1);
    // Writing through the iovecs lands in the guest's buffer.
    let src: Vec<u8> = (0..1024u32).map(|i| (i % 251) as u8).collect();
    // SAFETY: `iov` was filled from `b.mem`, which stays mapped until the end of this test.
    assert_eq!(unsafe { iov.copy_from(&src) }, 1024);
    let mut back = vec![0u8; 1024];
    b.mem
        .read_slice(&mut back, GuestAddress(DATA))
        .expect("read");
    assert_eq!(back, src);
}

#[test]
fn in_data_split_over_descriptors_is_mapped_in_chain_order() {
    let c = [r(HDR, 16), w(DATA2, 100), w(DATA, 612), w(DATA3, 312), st()];
    let pieces = [(DATA2, 100), (DATA, 612), (DATA3, 312)];
    let (_, iov, _) = Bench::new().accepts(IN, 0, &c, STATUS, &pieces);
    assert_eq!(iov.len(), 3);
}

#[test]
fn in_status_sharing_last_data_descriptor_is_excluded_from_iovecs() {
    let c = [r(HDR, 16), w(DATA, 512), w(DATA2, 513)];
    Bench::new().accepts(IN, 3, &c, DATA2 + 512, &[(DATA, 512), (DATA2, 512)]);
}

#[test]
fn out_maps_readable_data_to_iovecs() {
    let c = [r(HDR, 16), r(DATA, 1536), r(DATA2, 512), st()];
    Bench::new().accepts(OUT, 9, &c, STATUS, &[(DATA, 1536), (DATA2, 512)]);
}

#[test]
fn out_header_descriptor_carrying_data_skips_the_header_bytes() {
    let c = [r(HDR, 16 + 1024), st()];
    Bench::new().accepts(OUT, 1, &c, STATUS, &[(HDR + 16, 1024)]);
}

/// virtio 1.2 §2.7.4: the header may be split over descriptors like any other part.
#[test]
fn in_header_split_across_descriptors_is_accepted() {
    let b = Bench::new();
    b.put(HDR2, &header_bytes(IN, 5)[8..]);
    let c = [r(HDR, 8), r(HDR2, 8), w(DATA, 512), st()];
    b.accepts(IN, 5, &c, STATUS, &[(DATA, 512)]);
}

#[test]
fn out_header_split_with_data_after_it_in_the_same_descriptor_is_accepted() {
    let b = Bench::new();
    b.put(HDR2, &header_bytes(OUT, 6)[4..]);
    let c = [r(HDR, 4), r(HDR2, 12 + 512), st()];
    b.accepts(OUT, 6, &c, STATUS, &[(HDR2 + 12, 512)]);
}

#[test]
fn flush_without_data_has_no_iovecs() {
    Bench::new().accepts(FLUSH, 0, &[r(HDR, 16), st()], STATUS, &[]);
}

#[test]
fn flush_ignores_data_buffers_and_sector() {
    let c = [r(HDR, 16), w(DATA, 512), st()];
    let (p, ..) = Bench::new().accepts(FLUSH, u64::MAX, &c, STATUS, &[]);
    assert_eq!(p.request.data_len, 0);
}

#[test]
fn get_id_maps_the_writable_buffer() {
    let c = [r(HDR, 16), w(DATA, 20), st()];
    Bench::new().accepts(GET_ID, 0, &c, STATUS, &[(DATA, 20)]);
}

#[test]
fn get_id_buffer_sharing_the_status_descriptor_excludes_the_status_byte() {
    let c = [r(HDR, 16), w(DATA, 21)];
    Bench::new().accepts(GET_ID, 0, &c, DATA + 20, &[(DATA, 20)]);
}

#[test]
fn discard_returns_segments_in_order_without_iovecs() {
    let b = Bench::new();
    let list = [seg(8, 16, 0), seg(0, MAX_RANGE, 0), seg(CAPACITY, 0, 0)];
    b.put(DATA, &list.concat());
    // The header's sector is not used by discard.
    let (p, _, got) = b.accepts(DISCARD, 12345, &range_chain(48), STATUS, &[]);
    let want = ranges(&[(8, 16, false), (0, MAX_RANGE, false), (CAPACITY, 0, false)]);
    assert_eq!((p.request.kind, got), (K::Discard, want));
}

#[test]
fn range_segment_straddling_descriptors_and_header_descriptor_is_reassembled() {
    let b = Bench::new();
    let raw = [seg(1, 2, 0), seg(100, 200, 0)].concat();
    // 16 header bytes + 5 segment bytes in the first descriptor, then 20 + 7.
    b.put(HDR + 16, &raw[..5]);
    b.put(DATA, &raw[5..25]);
    b.put(DATA2, &raw[25..]);
    let c = [r(HDR, 21), r(DATA, 20), r(DATA2, 7), st()];
    let (p, _, got) = b.accepts(DISCARD, 0, &c, STATUS, &[]);
    let want = ranges(&[(1, 2, false), (100, 200, false)]);
    assert_eq!((p.request.kind, got), (K::Discard, want));
}

#[test]
fn write_zeroes_without_unmap_flag_keeps_allocation() {
    let b = Bench::new();
    b.put(DATA, &seg(10, 20, 0));
    let (p, _, got) = b.accepts(WRITE_ZEROES, 0, &range_chain(16), STATUS, &[]);
    assert_eq!(
        (p.request.kind, got),
        (K::WriteZeroes, ranges(&[(10, 20, false)]))
    );
}

#[test]
fn write_zeroes_with_unmap_flag_allows_deallocation() {
    let b = Bench::new();
    b.put(DATA, &[seg(10, 20, UNMAP), seg(40, 1, 0)].concat());
    let (p, _, got) = b.accepts(WRITE_ZEROES, 0, &range_chain(32), STATUS, &[]);
    let want = ranges(&[(10, 20, true), (40, 1, false)]);
    assert_eq!((p.request.kind, got), (K::WriteZeroes, want));
}

#[test]
fn indirect_in_chain_is_parsed_like_a_direct_one() {
    let b = Bench::new();
    let t = indirect(&b.mem, TABLE, &[r(HDR, 16), w(DATA, 512), w(DATA2, 1025)]);
    b.accepts(IN, 2, &[t], DATA2 + 1024, &[(DATA, 512), (DATA2, 1024)]);
}

#[test]
fn indirect_out_chain_is_parsed_like_a_direct_one() {
    let b = Bench::new();
    let t = indirect(&b.mem, TABLE, &[r(HDR, 16 + 512), r(DATA, 512), st()]);
    b.accepts(OUT, 4, &[t], STATUS, &[(HDR + 16, 512), (DATA, 512)]);
}

#[test]
fn parsed_and_rejected_requests_carry_the_chain_head_index() {
    let b = Bench::new();
    let q = MockSplitQueue::new(&b.mem, QUEUE_SIZE);
    b.put(HDR, &header_bytes(IN, 0));
    b.put(HDR2, &header_bytes(77, 0));
    // An IN chain at descriptor 5, then an unsupported request at descriptor 9.
    q.add_desc_chains(&[linked(HDR, 16, F_NEXT, 6), st()], 5)
        .expect("chain 1");
    q.add_desc_chains(&[linked(HDR2, 16, F_NEXT, 10), st()], 9)
        .expect("chain 2");
    let mut queue: Queue = q.create_queue().expect("queue");
    let mut chains = queue.iter(&b.mem).expect("iter");
    let (mut scratch, mut iov) = (Scratch::new(8), IovecList::with_capacity(8));
    let first = chains.next().expect("chain 1");
    let p = parse_in(
        &b.mem,
        &q,
        first.head_index(),
        &b.lim,
        &mut scratch,
        &mut iov,
    )
    .expect("accepted");
    assert_eq!(p.head, 5);
    let second = chains.next().expect("chain 2");
    let rej = parse_in(
        &b.mem,
        &q,
        second.head_index(),
        &b.lim,
        &mut scratch,
        &mut iov,
    )
    .expect_err("rejected");
    assert_eq!((rej.head, rej.error), (9, E::Unsupported(77)));
}

#[test]
fn reused_scratch_and_iovec_list_are_cleared_between_parses() {
    let b = Bench::new();
    let q = MockSplitQueue::new(&b.mem, QUEUE_SIZE);
    let (mut scratch, mut iov) = (Scratch::new(8), IovecList::with_capacity(8));
    b.put(HDR, &header_bytes(IN, 0));
    let c = q.build_desc_chain(&[r(HDR, 16), w(DATA, 512), w(DATA2, 512), st()]);
    parse_in(
        &b.mem,
        &q,
        c.expect("chain").head_index(),
        &b.lim,
        &mut scratch,
        &mut iov,
    )
    .expect("first");
    assert_eq!(iov.len(), 2);
    b.put(HDR2, &header_bytes(OUT, 0));
    let c = q.build_desc_chain(&[r(HDR2, 16), r(DATA3, 512), st()]);
    let p = parse_in(
        &b.mem,
        &q,
        c.expect("chain").head_index(),
        &b.lim,
        &mut scratch,
        &mut iov,
    )
    .expect("second");
    assert_eq!(p.request.kind, K::Write { sector: 0 });
    assert_iov_covers(&b.mem, &iov, &[(DATA3, 512)]);
    assert_eq!(scratch.descs.len(), 8, "scratch must never grow");
}

#[test]
fn request_ending_exactly_at_capacity_is_accepted() {
    let c = [r(HDR, 16), w(DATA, 1024), st()];
    Bench::new().accepts(IN, CAPACITY - 2, &c, STATUS, &[(DATA, 1024)]);
}

#[test]
fn read_only_device_accepts_in_and_flush() {
    let b = Bench::with(|l| l.read_only = true);
    let c = [r(HDR, 16), w(DATA, 512), st()];
    b.accepts(IN, 0, &c, STATUS, &[(DATA, 512)]);
    b.accepts(FLUSH, 0, &[r(HDR, 16), st()], STATUS, &[]);
}

#[test]
fn data_segments_up_to_seg_max_are_accepted_and_header_and_status_do_not_count() {
    let b = Bench::with(|l| l.seg_max = 2);
    b.ok(IN, 0, &[r(HDR, 16), w(DATA, 512), w(DATA2, 512), st()]);
    b.ok(OUT, 0, &[r(HDR, 16 + 512), r(DATA2, 512), st()]);
}
