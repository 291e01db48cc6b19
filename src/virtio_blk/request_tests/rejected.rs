//! Every rejection path: the error, the status the driver sees, and whether a status byte is written.

use super::*;

#[test]
fn empty_chain_is_rejected_without_status() {
    // An indirect table of length 0 yields no descriptor at all.
    let c = [desc(TABLE, 0, F_INDIRECT)];
    Bench::new().rejects(IN, &c, (E::EmptyChain, Status::IoErr, None));
}

/// A chain the driver linked further than the device could follow (`next` outside the queue,
/// or a loop cut off by the queue-size bound) has no trustworthy last descriptor: completing
/// it would write a "status" into what the driver meant as data.
#[test]
fn chain_cut_short_by_a_bad_next_index_or_a_loop_is_rejected_without_status() {
    let b = Bench::with(|l| l.seg_max = 64);
    b.put(HDR, &header_bytes(IN, 0));
    // `next` = 200 in a queue of 32: iteration stops after the data descriptor.
    let hdr = linked(HDR, 16, F_NEXT, 1);
    let cut = [hdr, linked(DATA, 513, F_WRITE | F_NEXT, 200)];
    // A writable descriptor linked to itself: yielded 31 times, 31 * 479 - 1 = 29 sectors.
    let looped = [hdr, linked(DATA, 479, F_WRITE | F_NEXT, 1)];
    for descs in [&cut, &looped] {
        let q = MockSplitQueue::new(&b.mem, QUEUE_SIZE);
        let chain = q.build_multiple_desc_chains(descs).expect("chain");
        let (mut scratch, mut iov) = (Scratch::new(32), IovecList::with_capacity(64));
        let res = parse_in(
            &b.mem,
            &q,
            chain.head_index(),
            &b.lim,
            &mut scratch,
            &mut iov,
        );
        assert_rejected(res, (E::EmptyChain, Status::IoErr, None));
    }
}

/// An indirect table may hold 65,535 descriptors; a chain through it is followed no further
/// than the queue's size (or the parser's scratch, if longer: here both are 32), so a table
/// whose chain ends with a status byte further on is a broken chain, found after 32 reads,
/// not a request walked to its end (virtio 1.2 §2.7.5.3.1).
#[test]
fn chain_through_an_indirect_table_longer_than_the_queue_is_cut_short() {
    let b = Bench::with(|l| l.seg_max = 64);
    let hdr = r(HDR, 16);
    for len in [33, 1000] {
        let mut descs = vec![hdr];
        descs.extend((1..len - 1).map(|_| r(DATA, 512)));
        descs.push(st());
        let t = indirect(&b.mem, TABLE, &descs);
        b.rejects(OUT, &[t], (E::EmptyChain, Status::IoErr, None));
    }
    // As long as the queue: followed to its status byte; 30 segments is within this
    // bench's seg_max, and too many for the default one.
    let mut descs = vec![hdr];
    descs.extend((1..usize::from(QUEUE_SIZE) - 1).map(|_| r(DATA, 512)));
    descs.push(st());
    let t = indirect(&b.mem, TABLE, &descs);
    b.ok(OUT, 0, &[t]);
    let b = Bench::new();
    let t = indirect(&b.mem, TABLE, &descs);
    b.ioerr(OUT, 0, &[t], E::TooManySegments { max: 8 });
}

#[test]
fn last_descriptor_readable_means_no_status() {
    let c = [r(HDR, 16), r(DATA, 512)];
    Bench::new().rejects(OUT, &c, (E::MissingStatus, Status::IoErr, None));
}

#[test]
fn zero_length_last_descriptor_means_no_status() {
    let c = [r(HDR, 16), w(DATA, 512), w(STATUS, 0)];
    Bench::new().rejects(IN, &c, (E::MissingStatus, Status::IoErr, None));
}

#[test]
fn status_byte_outside_guest_memory_means_no_status() {
    let b = Bench::new();
    let m = u64::MAX;
    for (addr, len) in [(MEM_SIZE, 1), (MEM_SIZE - 1, 2), (m - 1, 3), (m, 1)] {
        let c = [r(HDR, 16), w(addr, len)];
        b.rejects(FLUSH, &c, (E::MissingStatus, Status::IoErr, None));
    }
}

#[test]
fn header_shorter_than_16_bytes_is_rejected() {
    let b = Bench::new();
    b.ioerr(FLUSH, 0, &[r(HDR, 15), st()], E::ShortHeader);
    b.ioerr(FLUSH, 0, &[r(HDR, 0), st()], E::ShortHeader);
    // Split, but still 15 bytes in all.
    b.ioerr(FLUSH, 0, &[r(HDR, 8), r(HDR + 8, 7), st()], E::ShortHeader);
}

#[test]
fn device_writable_header_descriptor_is_rejected() {
    let b = Bench::new();
    b.ioerr(
        IN,
        0,
        &[w(HDR, 16), w(DATA, 512), st()],
        E::HeaderNotReadable,
    );
    // A lone status byte has no header either.
    b.ioerr(IN, 0, &[st()], E::HeaderNotReadable);
}

#[test]
fn readable_descriptor_after_a_writable_one_is_rejected() {
    let b = Bench::new();
    for rtype in [IN, OUT, FLUSH, GET_ID, DISCARD, 77] {
        let c = [r(HDR, 16), w(DATA, 512), r(DATA2, 512), st()];
        b.ioerr(rtype, 0, &c, E::ReadableAfterWritable);
    }
}

#[test]
fn header_outside_guest_memory_is_rejected_as_memory_error() {
    let b = Bench::new();
    for addr in [MEM_SIZE, MEM_SIZE - 8, u64::MAX - 15] {
        b.ioerr(IN, 0, &[r(addr, 16), st()], mem_oor(addr, HEADER_LEN));
    }
}

#[test]
fn data_outside_guest_memory_is_rejected_as_memory_error() {
    let b = Bench::new();
    let c = [r(HDR, 16), w(DATA, 512), w(MEM_SIZE - 256, 512), st()];
    b.ioerr(IN, 0, &c, mem_oor(MEM_SIZE - 256, 512));
    let c = [r(HDR, 16), r(MEM_SIZE + 0x1000, 1024), st()];
    b.ioerr(OUT, 0, &c, mem_oor(MEM_SIZE + 0x1000, 1024));
    let c = [r(HDR, 16), w(MEM_SIZE, 20), st()];
    b.ioerr(GET_ID, 0, &c, mem_oor(MEM_SIZE, 20));
}

#[test]
fn chain_longer_than_scratch_capacity_is_rejected_with_its_status() {
    let b = Bench::new();
    b.put(HDR, &header_bytes(IN, 0));
    let mut c = vec![r(HDR, 16)];
    c.extend([DATA, DATA2, DATA3].map(|a| w(a, 512)));
    c.push(st());
    let (res, ..) = parse_with(&b.mem, &c, &b.lim, (4, 64));
    let err = E::TooManySegments { max: 8 };
    assert_rejected(res, (err, Status::IoErr, Some(STATUS)));
    // One more slot and the same chain fits.
    let (res, ..) = parse_with(&b.mem, &c, &b.lim, (5, 64));
    assert_eq!(res.expect("fits").request.data_len, 1536);
}

// ---- Rejections: IN / OUT ----

#[test]
fn out_with_device_writable_data_is_rejected() {
    let b = Bench::new();
    b.ioerr(OUT, 0, &[r(HDR, 16), w(DATA, 512), st()], E::WrongDirection);
    // Readable data, but a status descriptor longer than one byte.
    let c = [r(HDR, 16), r(DATA, 512), w(STATUS - 1, 2)];
    b.ioerr(OUT, 0, &c, E::WrongDirection);
}

#[test]
fn in_with_device_readable_data_is_rejected() {
    let b = Bench::new();
    let c = [r(HDR, 16), r(DATA, 512), w(DATA2, 512), st()];
    b.ioerr(IN, 0, &c, E::WrongDirection);
    // Readable bytes after the header in the header's own descriptor.
    let c = [r(HDR, 16 + 512), w(DATA2, 512), st()];
    b.ioerr(IN, 0, &c, E::WrongDirection);
}

#[test]
fn data_length_not_a_multiple_of_512_is_rejected() {
    let b = Bench::new();
    let c = [r(HDR, 16), w(DATA, 511), st()];
    b.ioerr(IN, 0, &c, E::UnalignedLength(511));
    let c = [r(HDR, 16), r(DATA, 512), r(DATA2, 1), st()];
    b.ioerr(OUT, 0, &c, E::UnalignedLength(513));
}

#[test]
fn request_past_capacity_is_rejected() {
    let b = Bench::new();
    let c = [r(HDR, 16), w(DATA, 1024), st()];
    b.ioerr(IN, CAPACITY - 1, &c, oor(CAPACITY - 1, 2, CAPACITY));
    let c = [r(HDR, 16), r(DATA, 512), st()];
    b.ioerr(OUT, CAPACITY, &c, oor(CAPACITY, 1, CAPACITY));
    // Zero-length I/O must still start within the disk.
    let c = [r(HDR, 16), st()];
    b.ioerr(IN, CAPACITY + 1, &c, oor(CAPACITY + 1, 0, CAPACITY));
}

#[test]
fn sector_near_u64_max_does_not_wrap_past_the_capacity_check() {
    let b = Bench::with(|l| l.capacity_sectors = u64::MAX);
    for (sector, sectors) in [(u64::MAX, 1), (u64::MAX - 1, 2), (u64::MAX - 7, 16)] {
        let c = [r(HDR, 16), w(DATA, 512 * sectors), st()];
        b.ioerr(IN, sector, &c, oor(sector, u64::from(sectors), u64::MAX));
    }
}

#[test]
fn read_only_device_rejects_out_discard_and_write_zeroes() {
    let b = Bench::with(|l| l.read_only = true);
    b.put(DATA, &seg(0, 1, 0));
    b.ioerr(OUT, 0, &[r(HDR, 16), r(DATA2, 512), st()], E::ReadOnly);
    b.ioerr(DISCARD, 0, &range_chain(16), E::ReadOnly);
    b.ioerr(WRITE_ZEROES, 0, &range_chain(16), E::ReadOnly);
}

#[test]
fn more_data_segments_than_seg_max_is_rejected() {
    let b = Bench::with(|l| l.seg_max = 2);
    let c = [r(HDR, 16), w(DATA, 512), w(DATA2, 512), w(DATA3, 513)];
    let err = || E::TooManySegments { max: 2 };
    b.rejects(IN, &c, (err(), Status::IoErr, Some(DATA3 + 512)));
    let c = [r(HDR, 16 + 512), r(DATA2, 512), r(DATA3, 512), st()];
    b.ioerr(OUT, 0, &c, err());
}

#[test]
fn a_data_segment_longer_than_size_max_is_rejected() {
    let b = Bench::new();
    let err = || E::SegmentTooLong {
        len: SIZE_MAX + 512,
        max: SIZE_MAX,
    };
    let c = [r(HDR, 16), w(DATA, 512), w(DATA2, SIZE_MAX + 512), st()];
    b.rejects(IN, &c, (err(), Status::IoErr, Some(STATUS)));
    let c = [r(HDR, 16), r(DATA, SIZE_MAX + 512), st()];
    b.ioerr(OUT, 0, &c, err());
    // The header's and the status byte's bytes do not count: a descriptor holding the header
    // and a whole segment is within the limit.
    b.ok(IN, 0, &[r(HDR, 16), w(DATA, SIZE_MAX + 1)]);
    b.ok(OUT, 0, &[r(HDR, 16 + SIZE_MAX), st()]);
}

#[test]
fn more_buffers_than_the_iovec_list_holds_is_a_memory_error() {
    let b = Bench::new();
    b.put(HDR, &header_bytes(IN, 0));
    let c = [r(HDR, 16), w(DATA, 512), w(DATA2, 512), st()];
    let (res, ..) = parse_with(&b.mem, &c, &b.lim, (8, 1));
    let err = E::Memory(MemError::TooManyIovecs(1));
    assert_rejected(res, (err, Status::IoErr, Some(STATUS)));
}

// ---- Rejections: request types ----

#[test]
fn unknown_request_type_is_unsupported() {
    let b = Bench::new();
    for rtype in [2, 3, 5, 10, 14, 0xdead, u32::MAX] {
        let c = [r(HDR, 16), w(DATA, 512), st()];
        let want = (E::Unsupported(rtype), Status::Unsupp, Some(STATUS));
        b.rejects(rtype, &c, want);
    }
}

#[test]
fn discard_and_write_zeroes_not_offered_are_unsupported_even_on_read_only_device() {
    for read_only in [false, true] {
        let b = Bench::with(|l| {
            (l.max_discard_sectors, l.max_write_zeroes_sectors) = (None, None);
            l.read_only = read_only;
        });
        b.put(DATA, &seg(0, 1, 0));
        for t in [DISCARD, WRITE_ZEROES] {
            let want = (E::Unsupported(t), Status::Unsupp, Some(STATUS));
            b.rejects(t, &range_chain(16), want);
        }
    }
}

#[test]
fn get_id_with_readable_data_is_rejected() {
    let c = [r(HDR, 16), r(DATA, 20), w(DATA2, 20), st()];
    Bench::new().ioerr(GET_ID, 0, &c, E::WrongDirection);
}

#[test]
fn get_id_without_a_data_buffer_is_rejected() {
    let b = Bench::new();
    b.ioerr(GET_ID, 0, &[r(HDR, 16), st()], E::WrongDirection);
    let c = [r(HDR, 16), w(DATA, 0), st()];
    b.ioerr(GET_ID, 0, &c, E::WrongDirection);
}

// ---- Rejections: discard / write-zeroes segment lists ----

#[test]
fn range_list_not_a_multiple_of_16_bytes_is_rejected() {
    let b = Bench::new();
    b.put(DATA, &[seg(0, 1, 0), seg(1, 1, 0)].concat());
    for len in [1, 15, 17, 31] {
        b.ioerr(DISCARD, 0, &range_chain(len), E::BadRangeList);
        b.ioerr(WRITE_ZEROES, 0, &range_chain(len), E::BadRangeList);
    }
}

#[test]
fn empty_range_list_is_rejected() {
    let b = Bench::new();
    for rtype in [DISCARD, WRITE_ZEROES] {
        b.ioerr(rtype, 0, &[r(HDR, 16), st()], E::BadRangeList);
        b.ioerr(rtype, 0, &range_chain(0), E::BadRangeList);
    }
}

#[test]
fn more_than_max_range_segments_is_rejected() {
    let b = Bench::new();
    let list: Vec<[u8; 16]> = (0..=MAX_RANGE_SEGMENTS as u64)
        .map(|i| seg(i, 1, 0))
        .collect();
    b.put(DATA, &list.concat());
    let (res, _, got) = b.run(DISCARD, 0, &range_chain(16 * MAX_SEGS));
    assert_eq!(res.expect("accepted").request.kind, K::Discard);
    assert_eq!(got.len(), MAX_RANGE_SEGMENTS);
    let err = E::TooManySegments { max: MAX_SEGS };
    b.ioerr(DISCARD, 0, &range_chain(16 * MAX_SEGS + 16), err);
}

#[test]
fn range_segment_over_the_per_segment_limit_is_rejected() {
    let b = Bench::new();
    let list = [seg(0, 1, 0), seg(0, MAX_RANGE + 1, 0)].concat();
    b.put(DATA, &list);
    for rtype in [DISCARD, WRITE_ZEROES] {
        let err = E::RangeTooLong {
            sectors: MAX_RANGE + 1,
            max: MAX_RANGE,
        };
        b.ioerr(rtype, 0, &range_chain(32), err);
    }
    // Each operation has its own limit.
    let b = Bench::with(|l| l.max_write_zeroes_sectors = Some(MAX_RANGE + 1));
    b.put(DATA, &list);
    b.ok(WRITE_ZEROES, 0, &range_chain(32));
}

#[test]
fn range_segment_beyond_capacity_is_rejected() {
    let b = Bench::new();
    let m = u64::MAX;
    for (sector, sectors) in [(CAPACITY - 1, 2), (CAPACITY + 1, 0), (m, 1), (m - 1, 200)] {
        b.put(DATA, &seg(sector, sectors, 0));
        let err = || oor(sector, u64::from(sectors), CAPACITY);
        b.ioerr(DISCARD, 0, &range_chain(16), err());
        b.ioerr(WRITE_ZEROES, 0, &range_chain(16), err());
    }
}

#[test]
fn discard_segment_with_any_flag_is_rejected() {
    let b = Bench::new();
    for flags in [UNMAP, 2, 0x8000_0000] {
        b.put(DATA, &[seg(0, 1, 0), seg(1, 1, flags)].concat());
        b.ioerr(DISCARD, 0, &range_chain(32), E::BadRangeFlags(flags));
    }
}

#[test]
fn write_zeroes_segment_with_unknown_flag_bits_is_rejected() {
    let b = Bench::new();
    for flags in [2, UNMAP | 2, u32::MAX] {
        b.put(DATA, &seg(0, 1, flags));
        b.ioerr(WRITE_ZEROES, 0, &range_chain(16), E::BadRangeFlags(flags));
    }
}

#[test]
fn range_request_with_writable_data_is_rejected() {
    let b = Bench::new();
    b.put(DATA, &seg(0, 1, 0));
    for rtype in [DISCARD, WRITE_ZEROES] {
        let c = [r(HDR, 16), r(DATA, 16), w(DATA2, 16), st()];
        b.ioerr(rtype, 0, &c, E::WrongDirection);
    }
}

#[test]
fn range_list_outside_guest_memory_is_rejected_as_memory_error() {
    let c = [r(HDR, 16), r(MEM_SIZE - 8, 16), st()];
    Bench::new().ioerr(DISCARD, 0, &c, mem_oor(MEM_SIZE - 8, 16));
}
