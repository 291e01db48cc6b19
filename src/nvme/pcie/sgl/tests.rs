use proptest::prelude::*;

use super::*;

const SEG_IOVA: u64 = 0x7f00_0000;

/// How a controller reads the SGL (Base 2.0 §4.1.2): the data as `(iova, len)` runs.
fn controller_walk(p: &SglPtr, seg: &[[u8; 16]]) -> Vec<(u64, usize)> {
    let (id, addr, len) = decode(&p.desc);
    match id {
        DATA_BLOCK => vec![(addr, len as usize)],
        LAST_SEGMENT => {
            assert_eq!(addr % 8, 0, "segment address");
            assert_eq!(len % 16, 0, "segment length");
            let first = usize::try_from((addr - SEG_IOVA) / 16).expect("index");
            seg[first..first + len as usize / 16]
                .iter()
                .map(|d| {
                    let (id, a, n) = decode(d);
                    assert_eq!(id, DATA_BLOCK, "only Data Blocks in the last segment");
                    (a, n as usize)
                })
                .collect()
        }
        other => panic!("descriptor type {other:#x} in DPTR"),
    }
}

fn merged(runs: impl IntoIterator<Item = (u64, usize)>) -> Vec<(u64, usize)> {
    let mut out: Vec<(u64, usize)> = Vec::new();
    for (a, n) in runs {
        if n == 0 {
            continue;
        }
        match out.last_mut() {
            Some((b, m)) if *b + *m as u64 == a => *m += n,
            _ => out.push((a, n)),
        }
    }
    out
}

fn run(
    pieces: &[(u64, usize)],
    align: SglAlign,
    capacity: usize,
) -> (Result<SglPtr, SglError>, Vec<[u8; 16]>) {
    let mut mem = vec![[0u8; 16]; capacity];
    let len = pieces.iter().map(|p| p.1).sum();
    let r = {
        let mut seg = SglSegment::new(&mut mem, SEG_IOVA).expect("segment");
        build(pieces.iter().copied(), len, align, &mut seg)
    };
    (r, mem)
}

#[test]
fn sgls_bits_1_0_select_the_alignment() {
    assert_eq!(SglAlign::from_sgls(Sgls(0)), None);
    assert_eq!(SglAlign::from_sgls(Sgls(1)), Some(SglAlign::Byte));
    assert_eq!(SglAlign::from_sgls(Sgls(2)), Some(SglAlign::Dword));
    assert_eq!(SglAlign::from_sgls(Sgls(3)), None, "reserved");
    assert_eq!(
        SglAlign::from_sgls(Sgls(1 << 20 | 2)),
        Some(SglAlign::Dword)
    );
}

#[test]
fn one_piece_is_a_data_block_in_the_command() {
    let (r, _) = run(&[(0x12_3457, 777)], SglAlign::Byte, 0);
    let p = r.expect("no segment needed");
    assert_eq!(p.segment_descs, 0);
    assert_eq!(decode(&p.desc), (DATA_BLOCK, 0x12_3457, 777));
    assert_eq!(p.desc[12..15], [0, 0, 0], "reserved bytes");
    assert_eq!(p.dptr(), Dptr::Sgl(p.desc));
}

#[test]
fn zero_length_transfer_is_an_empty_data_block() {
    let (r, _) = run(&[], SglAlign::Dword, 0);
    assert_eq!(decode(&r.expect("empty").desc), (DATA_BLOCK, 0, 0));
    let (r, _) = run(&[(0x1001, 0)], SglAlign::Dword, 0);
    assert_eq!(
        decode(&r.expect("empty pieces are skipped").desc),
        (DATA_BLOCK, 0, 0)
    );
}

#[test]
fn several_pieces_go_into_a_last_segment() {
    let pieces = [(0x10_0200, 0x200), (0x20_0000, 0x1000), (0x30_0004, 0x10)];
    let (r, mem) = run(&pieces, SglAlign::Dword, 4);
    let p = r.expect("fits");
    assert_eq!(p.segment_descs, 3);
    assert_eq!(decode(&p.desc), (LAST_SEGMENT, SEG_IOVA, 48));
    for (d, &(a, n)) in mem.iter().zip(&pieces) {
        assert_eq!(decode(d), (DATA_BLOCK, a, n as u32));
    }
    assert_eq!(controller_walk(&p, &mem), pieces);
}

#[test]
fn touching_pieces_share_a_descriptor() {
    let (r, _) = run(
        &[(0x10_0000, 0x800), (0x10_0800, 0x800), (0x10_1000, 3)],
        SglAlign::Byte,
        0,
    );
    assert_eq!(
        decode(&r.expect("one run").desc),
        (DATA_BLOCK, 0x10_0000, 0x1003)
    );
    let (r, mem) = run(
        &[(0x10_0000, 0x800), (0x10_0800, 0x800), (0x40_0000, 8)],
        SglAlign::Byte,
        2,
    );
    let p = r.expect("two runs");
    assert_eq!(p.segment_descs, 2);
    assert_eq!(
        controller_walk(&p, &mem),
        [(0x10_0000, 0x1000), (0x40_0000, 8)]
    );
}

#[test]
fn a_run_longer_than_a_descriptor_holds_is_cut() {
    let big = 0xc000_0000usize;
    let (r, mem) = run(
        &[(0x1_0000_0000, big), (0x1_c000_0000, big)],
        SglAlign::Byte,
        2,
    );
    let p = r.expect("two descriptors");
    assert_eq!(p.segment_descs, 2);
    assert_eq!(
        controller_walk(&p, &mem),
        [(0x1_0000_0000, big), (0x1_c000_0000, big)]
    );
    let (r, _) = run(&[(0x1000, 1 << 32)], SglAlign::Byte, 2);
    assert_eq!(
        r,
        Err(SglError::PieceTooLong {
            index: 0,
            len: 1 << 32
        })
    );
}

#[test]
fn dword_granularity_refuses_odd_addresses_and_lengths_byte_granularity_takes_them() {
    for (pieces, bad) in [
        (vec![(0x1001u64, 512usize)], (0, 0x1001, 512)),
        (vec![(0x1000, 510)], (0, 0x1000, 510)),
        (vec![(0x1000, 512), (0x3002, 512)], (1, 0x3002, 512)),
    ] {
        let (r, _) = run(&pieces, SglAlign::Dword, 4);
        let (index, iova, len) = bad;
        assert_eq!(r, Err(SglError::Unaligned { index, iova, len }));
        let (r, mem) = run(&pieces, SglAlign::Byte, 4);
        assert_eq!(
            merged(controller_walk(&r.expect("byte granularity"), &mem)),
            merged(pieces)
        );
    }
}

#[test]
fn a_segment_too_small_says_how_many_descriptors_are_needed() {
    let pieces: Vec<_> = (0..5u64).map(|i| (0x10_0000 * (i + 1), 512)).collect();
    let (r, _) = run(&pieces, SglAlign::Dword, 3);
    assert_eq!(
        r,
        Err(SglError::SegmentFull {
            needed: 5,
            capacity: 3
        })
    );
    let (r, _) = run(&pieces, SglAlign::Dword, 5);
    assert_eq!(r.expect("exactly full").segment_descs, 5);
}

#[test]
fn the_pieces_must_hold_the_transfer_length() {
    let mut mem = [[0u8; 16]; 2];
    let mut seg = SglSegment::new(&mut mem, SEG_IOVA).expect("segment");
    assert_eq!(
        build([(0x1000, 512)], 1024, SglAlign::Byte, &mut seg),
        Err(SglError::LengthMismatch {
            expected: 1024,
            got: 512
        })
    );
}

#[test]
fn a_piece_wrapping_the_address_space_is_refused() {
    let (r, _) = run(&[(0x1000, 16), (u64::MAX - 3, 16)], SglAlign::Byte, 2);
    assert_eq!(r, Err(SglError::AddressOverflow { index: 1 }));
}

#[test]
fn a_segment_must_be_qword_aligned() {
    let mut mem = [[0u8; 16]; 2];
    assert_eq!(
        SglSegment::new(&mut mem, SEG_IOVA + 4).err(),
        Some(SglError::SegmentMisplaced { iova: SEG_IOVA + 4 })
    );
    assert!(SglSegment::new(&mut mem, u64::MAX - 15).is_err());
    assert!(SglSegment::new(&mut mem, SEG_IOVA + 8).is_ok());
}

#[test]
fn the_builder_keeps_the_first_error() {
    let mut mem = [[0u8; 16]; 2];
    let mut seg = SglSegment::new(&mut mem, SEG_IOVA).expect("segment");
    let mut b = SglBuilder::new(&mut seg, SglAlign::Dword);
    let first = b.push(0x1002, 4).unwrap_err();
    assert_eq!(b.push(0x2000, 4), Err(first));
    assert_eq!(b.finish(8), Err(first));
}

fn piece() -> impl Strategy<Value = (u64, usize)> {
    (
        1u64..1 << 32,
        prop::bool::weighted(0.8),
        0usize..20_000,
        prop::bool::weighted(0.8),
    )
        .prop_map(|(a, a4, n, n4)| (if a4 { a & !3 } else { a }, if n4 { n & !3 } else { n }))
}

/// Pieces, some of them starting where the one before ends.
fn pieces() -> impl Strategy<Value = Vec<(u64, usize)>> {
    prop::collection::vec((piece(), prop::bool::weighted(0.3)), 0..12).prop_map(|v| {
        let mut out: Vec<(u64, usize)> = Vec::new();
        for ((a, n), touch) in v {
            let a = match out.last() {
                Some(&(pa, pn)) if touch => pa + pn as u64,
                _ => a,
            };
            out.push((a, n));
        }
        out
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]

    /// Either the SGL, read as a controller reads it, gives back exactly the pieces' bytes
    /// in order, in as few descriptors as there are separate runs, or the builder names the
    /// misaligned piece, the length that does not match, or the room that is missing.
    #[test]
    fn sgls_reproduce_the_pieces_or_name_the_broken_rule(
        pieces in pieces(),
        dword: bool,
        slack in -2isize..=2,
        len_delta in prop_oneof![8 => Just(0isize), 1 => -64isize..64],
    ) {
        let align = if dword { SglAlign::Dword } else { SglAlign::Byte };
        let sum: usize = pieces.iter().map(|p| p.1).sum();
        let transfer = sum.saturating_add_signed(len_delta);
        let runs = merged(pieces.iter().copied());
        let needed = if runs.len() > 1 { runs.len() } else { 0 };
        let capacity = needed.saturating_add_signed(slack);
        let mut mem = vec![[0u8; 16]; capacity];
        let r = {
            let mut seg = SglSegment::new(&mut mem, SEG_IOVA).expect("segment");
            build(pieces.iter().copied(), transfer, align, &mut seg)
        };
        let unaligned = pieces
            .iter()
            .filter(|p| p.1 > 0)
            .enumerate()
            .find(|(_, p)| dword && (p.0 | p.1 as u64) & 3 != 0)
            .map(|(index, &(iova, len))| SglError::Unaligned { index, iova, len });
        let want = unaligned
            .or((transfer != sum).then_some(SglError::LengthMismatch { expected: transfer, got: sum }))
            .or((capacity < needed).then_some(SglError::SegmentFull { needed, capacity }));
        match (r, want) {
            (Ok(p), None) => {
                prop_assert_eq!(p.segment_descs, needed);
                let walked = controller_walk(&p, &mem);
                prop_assert_eq!(walked.len(), runs.len().max(1));
                if dword {
                    prop_assert!(walked.iter().all(|&(a, n)| (a | n as u64) & 3 == 0));
                }
                prop_assert_eq!(merged(walked), runs);
            }
            (r, want) => prop_assert_eq!(r.err(), want),
        }
    }
}
