use proptest::prelude::*;

use super::*;

const K4: PageSize = PageSize::K4;
const LIST_IOVA: u64 = 0x7f00_0000;

/// How a controller reads PRPs (Base 2.0 §4.1.1): the bytes of the transfer as runs of
/// `(iova, len)`, each within one page. The last entry of a list page is a pointer to the
/// next list page when more than one page of data remains. `list` is the memory at
/// `list_iova`; reading outside it panics.
fn controller_walk(
    p: Prps,
    len: usize,
    page: PageSize,
    list_iova: u64,
    list: &[u64],
) -> Vec<(u64, usize)> {
    let pb = page.bytes();
    let read = |at: u64| {
        assert_eq!(at % 8, 0, "list entry at {at:#x}");
        list[usize::try_from((at - list_iova) / 8).expect("index")]
    };
    let mut out = Vec::new();
    if len == 0 {
        return out;
    }
    let first = len.min(pb - page.offset(p.prp1) as usize);
    out.push((p.prp1, first));
    let mut rem = len - first;
    if rem == 0 {
        return out;
    }
    if rem <= pb {
        assert!(page.is_aligned(p.prp2), "PRP2 {:#x}", p.prp2);
        out.push((p.prp2, rem));
        return out;
    }
    let mut at = p.prp2;
    while rem > 0 {
        let e = read(at);
        if page.offset(at) == pb as u64 - 8 && rem > pb {
            assert!(page.is_aligned(e), "chain pointer {e:#x}");
            at = e;
            continue;
        }
        assert!(page.is_aligned(e), "list entry {e:#x}");
        let n = rem.min(pb);
        out.push((e, n));
        rem -= n;
        at += 8;
    }
    out
}

/// How QEMU's controller reads a PRP list: a page's worth of entries counted from PRP2,
/// the last of them a chain pointer.
fn qemu_walk(
    p: Prps,
    len: usize,
    page: PageSize,
    list_iova: u64,
    list: &[u64],
) -> Vec<(u64, usize)> {
    let pb = page.bytes();
    let per_page = pb / 8;
    let first = len.min(pb - page.offset(p.prp1) as usize);
    let mut out = vec![(p.prp1, first)];
    let mut rem = len - first;
    if rem == 0 {
        return out;
    }
    if rem <= pb {
        out.push((p.prp2, rem));
        return out;
    }
    let mut base = p.prp2;
    let mut i = 0;
    while rem > 0 {
        let e = list[usize::try_from((base - list_iova) / 8).expect("index") + i];
        if i == per_page - 1 && rem > pb {
            base = e;
            i = 0;
            continue;
        }
        let n = rem.min(pb);
        out.push((e, n));
        rem -= n;
        i += 1;
    }
    out
}

/// Adjacent runs joined, empty ones dropped: the same bytes in the same order compare equal
/// whatever the cut.
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
    page: PageSize,
    slots: usize,
) -> (Result<Prps, PrpError>, Vec<u64>) {
    let mut mem = vec![0u64; slots];
    let len = pieces.iter().map(|p| p.1).sum();
    let r = {
        let mut list = PrpList::new(&mut mem, LIST_IOVA, page).expect("list");
        build(pieces.iter().copied(), len, &mut list)
    };
    (r, mem)
}

/// Builds, then checks that a controller reads back exactly the pieces' bytes.
fn round_trip(pieces: &[(u64, usize)], page: PageSize, slots: usize) -> (Prps, Vec<u64>) {
    let (r, mem) = run(pieces, page, slots);
    let p = r.expect("valid layout");
    let len = pieces.iter().map(|p| p.1).sum();
    let walked = controller_walk(p, len, page, LIST_IOVA, &mem);
    assert_eq!(merged(walked), merged(pieces.iter().copied()));
    (p, mem)
}

#[test]
fn zero_length_transfer_has_no_entries_and_ignores_empty_pieces() {
    let (p, _) = round_trip(&[], K4, 0);
    assert_eq!(
        p,
        Prps {
            prp1: 0,
            prp2: 0,
            list_slots: 0
        }
    );
    // Empty pieces are skipped, whatever their address.
    let (p, _) = round_trip(&[(0x1003, 0), (0x5555, 0)], K4, 0);
    assert_eq!(
        p,
        Prps {
            prp1: 0,
            prp2: 0,
            list_slots: 0
        }
    );
}

#[test]
fn one_page_uses_prp1_only() {
    let (p, _) = round_trip(&[(0x10_0000, 4096)], K4, 0);
    assert_eq!((p.prp1, p.prp2, p.list_slots), (0x10_0000, 0, 0));
    // Less than a page, at a dword offset.
    let (p, _) = round_trip(&[(0x10_0204, 512)], K4, 0);
    assert_eq!((p.prp1, p.prp2, p.list_slots), (0x10_0204, 0, 0));
}

#[test]
fn two_pages_put_the_second_in_prp2() {
    let (p, _) = round_trip(&[(0x10_0000, 8192)], K4, 0);
    assert_eq!((p.prp1, p.prp2, p.list_slots), (0x10_0000, 0x10_1000, 0));
    // Two pieces of a page each.
    let (p, _) = round_trip(&[(0x10_0000, 4096), (0x30_0000, 4096)], K4, 0);
    assert_eq!((p.prp1, p.prp2), (0x10_0000, 0x30_0000));
}

#[test]
fn a_first_piece_crossing_a_page_boundary_takes_two_entries() {
    let (p, _) = round_trip(&[(0x10_0e00, 0x400)], K4, 0);
    assert_eq!((p.prp1, p.prp2, p.list_slots), (0x10_0e00, 0x10_1000, 0));
    // 4 KiB at an offset: still two entries, no list.
    let (p, _) = round_trip(&[(0x10_0200, 4096)], K4, 0);
    assert_eq!((p.prp1, p.prp2), (0x10_0200, 0x10_1000));
}

#[test]
fn three_pages_use_a_list() {
    let (p, mem) = round_trip(
        &[(0x10_0800, 0x800), (0x20_0000, 0x1000), (0x30_0000, 0x200)],
        K4,
        4,
    );
    assert_eq!((p.prp1, p.prp2, p.list_slots), (0x10_0800, LIST_IOVA, 2));
    assert_eq!(mem[..2], [0x20_0000, 0x30_0000]);
}

#[test]
fn exactly_one_list_page_needs_no_chain_pointer() {
    // 513 pages: PRP1 and 512 list entries, the last one data in the page's last slot.
    let (p, mem) = round_trip(&[(0x100_0000, 513 * 4096)], K4, 600);
    assert_eq!(p.list_slots, 512);
    assert_eq!(mem[511], 0x100_0000 + 512 * 4096);
    assert_eq!(list_slots_for(512 * 4096, K4), 512);
}

#[test]
fn more_than_a_list_page_chains_to_the_next_page() {
    // 600 pages: 599 list entries, 511 in the first list page, then the chain pointer.
    let (p, mem) = round_trip(&[(0x100_0000, 600 * 4096)], K4, 1024);
    assert_eq!(p.list_slots, 600);
    assert_eq!(mem[510], 0x100_0000 + 511 * 4096);
    assert_eq!(
        mem[511],
        LIST_IOVA + 4096,
        "chain pointer to the next list page"
    );
    assert_eq!(mem[512], 0x100_0000 + 512 * 4096);
    // QEMU reads the same list the same way.
    let walked = qemu_walk(p, 600 * 4096, K4, LIST_IOVA, &mem);
    assert_eq!(merged(walked), [(0x100_0000, 600 * 4096)]);
    // And three list pages.
    let (p, _) = round_trip(&[(0x100_0804, 1100 * 4096)], K4, 1200);
    assert_eq!(p.list_slots, 1100 + 2);
}

#[test]
fn sixty_four_k_pages() {
    let p64 = PageSize::K64;
    let (p, _) = round_trip(&[(0x10_0100, 0xff00)], p64, 0);
    assert_eq!((p.prp1, p.prp2), (0x10_0100, 0));
    let (p, _) = round_trip(&[(0x10_0100, 0x1_0000)], p64, 0);
    assert_eq!((p.prp1, p.prp2), (0x10_0100, 0x11_0000));
    let (p, mem) = round_trip(&[(0x10_0000, 0x1_0000), (0x40_0000, 0x2_0000)], p64, 8);
    assert_eq!((p.prp2, p.list_slots), (LIST_IOVA, 2));
    assert_eq!(mem[..2], [0x40_0000, 0x41_0000]);
    // 4 KiB-aligned but not 64 KiB-aligned middle piece.
    let (r, _) = run(&[(0x10_0000, 0x1_0000), (0x40_1000, 0x1_0000)], p64, 8);
    assert_eq!(
        r,
        Err(PrpError::PieceStartUnaligned {
            index: 1,
            iova: 0x40_1000
        })
    );
}

#[test]
fn a_list_inside_one_page_may_start_at_an_offset() {
    let mut mem = [0u64; 8];
    let mut list = PrpList::new(&mut mem, LIST_IOVA + 0x100, K4).expect("within a page");
    let p = build([(0x10_0000, 4 * 4096)], 4 * 4096, &mut list).expect("fits");
    assert_eq!((p.prp2, p.list_slots), (LIST_IOVA + 0x100, 3));
    let walked = controller_walk(p, 4 * 4096, K4, LIST_IOVA + 0x100, &mem);
    assert_eq!(merged(walked), [(0x10_0000, 4 * 4096)]);
}

#[test]
fn a_list_area_must_be_qword_aligned_and_not_straddle_a_page_from_an_offset() {
    let mut mem = [0u64; 16];
    assert_eq!(
        PrpList::new(&mut mem, LIST_IOVA + 4, K4).err(),
        Some(PrpError::ListMisplaced {
            iova: LIST_IOVA + 4,
            slots: 16
        })
    );
    // 16 entries from 0xf88 cross into the next page.
    let iova = LIST_IOVA + 0xf88;
    assert_eq!(
        PrpList::new(&mut mem, iova, K4).err(),
        Some(PrpError::ListMisplaced { iova, slots: 16 })
    );
    // Up to the page's end exactly is fine, and an empty area anywhere qword aligned.
    assert!(PrpList::new(&mut mem, LIST_IOVA + 0xf80, K4).is_ok());
    assert!(PrpList::new(&mut [], LIST_IOVA + 0xff8, K4).is_ok());
    assert!(PrpList::new(&mut mem, u64::MAX - 7, K4).is_err());
}

#[test]
fn a_first_byte_off_a_dword_boundary_is_refused() {
    for iova in [0x10_0001, 0x10_0002, 0x10_0003, 0x10_0ffe] {
        let (r, _) = run(&[(iova, 512)], K4, 0);
        assert_eq!(r, Err(PrpError::FirstUnaligned { iova }));
        assert!(r.unwrap_err().needs_fallback());
    }
}

#[test]
fn a_later_piece_must_start_a_page() {
    let (r, _) = run(&[(0x10_0000, 4096), (0x20_0200, 512)], K4, 4);
    let e = r.unwrap_err();
    assert_eq!(
        e,
        PrpError::PieceStartUnaligned {
            index: 1,
            iova: 0x20_0200
        }
    );
    assert!(e.needs_fallback());
    // Dword aligned is not enough after the first piece.
    let (r, _) = run(
        &[(0x10_0000, 4096), (0x20_0000, 4096), (0x30_0004, 512)],
        K4,
        4,
    );
    assert_eq!(
        r,
        Err(PrpError::PieceStartUnaligned {
            index: 2,
            iova: 0x30_0004
        })
    );
}

#[test]
fn a_piece_before_the_last_must_end_a_page() {
    let (r, _) = run(&[(0x10_0000, 512), (0x20_0000, 4096)], K4, 4);
    let e = r.unwrap_err();
    assert_eq!(
        e,
        PrpError::PieceEndUnaligned {
            index: 0,
            end: 0x10_0200
        }
    );
    assert!(e.needs_fallback());
    let (r, _) = run(
        &[
            (0x10_0000, 4096),
            (0x20_0000, 4096 + 512),
            (0x30_0000, 4096),
        ],
        K4,
        4,
    );
    assert_eq!(
        r,
        Err(PrpError::PieceEndUnaligned {
            index: 1,
            end: 0x20_1200
        })
    );
    // An empty piece in between changes nothing.
    let (r, _) = run(
        &[(0x10_0000, 512), (0x20_0000, 0), (0x30_0000, 4096)],
        K4,
        4,
    );
    assert_eq!(
        r,
        Err(PrpError::PieceEndUnaligned {
            index: 0,
            end: 0x10_0200
        })
    );
}

#[test]
fn the_pieces_must_hold_the_transfer_length() {
    let mut mem = [0u64; 4];
    for (have, want) in [(8192, 8704), (8192, 4096), (0, 512)] {
        let mut list = PrpList::new(&mut mem, LIST_IOVA, K4).expect("list");
        let pieces = [(0x10_0000, have)];
        let e = build(pieces, want, &mut list).unwrap_err();
        assert_eq!(
            e,
            PrpError::LengthMismatch {
                expected: want,
                got: have
            }
        );
        assert!(!e.needs_fallback());
    }
}

#[test]
fn a_list_area_too_small_says_how_much_is_needed() {
    // Five pages: four list entries.
    let (r, _) = run(&[(0x10_0000, 5 * 4096)], K4, 3);
    let e = r.unwrap_err();
    assert_eq!(
        e,
        PrpError::ListTooSmall {
            needed: 4,
            capacity: 3
        }
    );
    assert!(!e.needs_fallback());
    // Two pages need no list at all.
    let (r, _) = run(&[(0x10_0000, 2 * 4096)], K4, 0);
    assert!(r.is_ok());
    // 600 pages in 512 entries: 599 data entries and a chain pointer.
    let (r, _) = run(&[(0x100_0000, 600 * 4096)], K4, 512);
    assert_eq!(
        r,
        Err(PrpError::ListTooSmall {
            needed: 600,
            capacity: 512
        })
    );
}

#[test]
fn a_layout_error_wins_over_a_full_list() {
    // The list overflows first, then a piece breaks the rules: the caller must fall back,
    // not retry with a bigger list.
    let (r, _) = run(&[(0x10_0000, 8 * 4096), (0x20_0100, 512)], K4, 2);
    assert_eq!(
        r,
        Err(PrpError::PieceStartUnaligned {
            index: 1,
            iova: 0x20_0100
        })
    );
}

#[test]
fn a_piece_wrapping_the_address_space_is_refused() {
    let (r, _) = run(&[(u64::MAX - 4095, 8192)], K4, 4);
    assert_eq!(r, Err(PrpError::AddressOverflow { index: 0 }));
}

#[test]
fn the_builder_keeps_the_first_error() {
    let mut mem = [0u64; 4];
    let mut list = PrpList::new(&mut mem, LIST_IOVA, K4).expect("list");
    let mut b = PrpBuilder::new(&mut list);
    assert!(b.push(0x10_0000, 512).is_ok());
    let first = b.push(0x20_0000, 4096).unwrap_err();
    // A later push that would be fine on its own still reports the first error.
    assert_eq!(b.push(0x30_0000, 4096), Err(first));
    assert_eq!(b.finish(512 + 8192), Err(first));
}

#[test]
fn list_slots_for_covers_the_worst_placement() {
    for page in [K4, PageSize::from_bytes(16384).expect("16K"), PageSize::K64] {
        let pb = page.bytes();
        for len in [
            0,
            512,
            pb,
            pb + 512,
            2 * pb,
            3 * pb,
            128 << 10,
            2 << 20,
            4 << 20,
            8 << 20,
        ] {
            let need = list_slots_for(len, page);
            for off in [0, 4, pb as u64 / 2, pb as u64 - 4] {
                let (r, _) = run(&[(0x1_0000_0000 + off, len)], page, need);
                let p = r.unwrap_or_else(|e| panic!("{pb} {len} {off}: {e}"));
                assert!(p.list_slots <= need);
            }
        }
    }
}

/// The rules of §4.1.1, stated independently of the builder.
fn expected_error(pieces: &[(u64, usize)], page: PageSize) -> Option<PrpError> {
    let nonempty: Vec<_> = pieces.iter().filter(|p| p.1 > 0).collect();
    for (i, &&(a, n)) in nonempty.iter().enumerate() {
        if i == 0 && a % 4 != 0 {
            return Some(PrpError::FirstUnaligned { iova: a });
        }
        if i > 0 {
            let (pa, pn) = *nonempty[i - 1];
            let end = pa + pn as u64;
            if !page.is_aligned(end) {
                return Some(PrpError::PieceEndUnaligned { index: i - 1, end });
            }
            if !page.is_aligned(a) {
                return Some(PrpError::PieceStartUnaligned { index: i, iova: a });
            }
        }
        let _ = n;
    }
    None
}

/// List slots a page-aligned list needs for a valid layout: one per data entry after the
/// first, plus a chain pointer per full list page before the last.
fn expected_slots(pieces: &[(u64, usize)], page: PageSize) -> usize {
    let pb = page.bytes() as u64;
    let pages: u64 = pieces
        .iter()
        .filter(|p| p.1 > 0)
        .map(|&(a, n)| (a + n as u64).div_ceil(pb) - a / pb)
        .sum();
    if pages <= 2 {
        return 0;
    }
    let e = usize::try_from(pages - 1).expect("small");
    let per = page.bytes() / 8;
    // Every full list page but the last gives its last slot to a chain pointer.
    e + (e - 1).div_ceil(per - 1) - 1
}

fn first_piece(page: u64) -> impl Strategy<Value = (u64, usize)> {
    (
        1u64..1 << 24,
        0u64..page,
        0..3u8,
        0usize..48,
        prop::bool::weighted(0.8),
        1usize..page as usize,
    )
        .prop_map(move |(pn, off, kind, pages, whole, tail)| {
            let off = match kind {
                0 => 0,
                1 => off & !3,
                _ => off,
            };
            (
                pn * page + off,
                pages * page as usize + if whole { 0 } else { tail },
            )
        })
}

fn later_piece(page: u64) -> impl Strategy<Value = (u64, usize)> {
    (
        1u64..1 << 24,
        prop::bool::weighted(0.9),
        1u64..page,
        0usize..300,
        prop::bool::weighted(0.85),
        1usize..page as usize,
    )
        .prop_map(move |(pn, aligned, off, pages, whole, tail)| {
            let start = pn * page + if aligned { 0 } else { off };
            (start, pages * page as usize + if whole { 0 } else { tail })
        })
}

fn layout() -> impl Strategy<Value = (PageSize, Vec<(u64, usize)>)> {
    (12u32..=16).prop_flat_map(|shift| {
        let page = 1u64 << shift;
        let ps = PageSize::from_bytes(1 << shift).expect("4K..=64K");
        (
            first_piece(page),
            prop::collection::vec(later_piece(page), 0..6),
        )
            .prop_map(move |(f, rest)| {
                let mut v = vec![f];
                v.extend(rest);
                (ps, v)
            })
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]

    /// Either the PRPs, read as a controller (and QEMU) reads them, give back exactly the
    /// pieces' bytes in order, or the builder names the rule that the pieces break, the
    /// length that does not match, or the list room that is missing.
    #[test]
    fn prps_reproduce_the_pieces_or_name_the_broken_rule(
        (page, pieces) in layout(),
        slack in -2isize..=2,
        len_delta in prop_oneof![8 => Just(0isize), 1 => -512isize..512],
    ) {
        let sum: usize = pieces.iter().map(|p| p.1).sum();
        let transfer = sum.saturating_add_signed(len_delta);
        let needed = expected_slots(&pieces, page);
        let slots = needed.saturating_add_signed(slack);
        let mut mem = vec![0u64; slots];
        let r = {
            let mut list = PrpList::new(&mut mem, LIST_IOVA, page).expect("page aligned");
            build(pieces.iter().copied(), transfer, &mut list)
        };
        let want = expected_error(&pieces, page)
            .or((transfer != sum).then_some(PrpError::LengthMismatch { expected: transfer, got: sum }))
            .or((slots < needed).then_some(PrpError::ListTooSmall { needed, capacity: slots }));
        match (r, want) {
            (Ok(p), None) => {
                prop_assert_eq!(p.list_slots, needed);
                let input = merged(pieces.iter().copied());
                let walked = controller_walk(p, sum, page, LIST_IOVA, &mem);
                prop_assert_eq!(merged(walked), input.clone());
                let walked = qemu_walk(p, sum, page, LIST_IOVA, &mem);
                prop_assert_eq!(merged(walked), input);
                let max = pieces.iter().map(|p| p.1).sum();
                prop_assert!(pieces.len() > 1 || needed <= list_slots_for(max, page));
            }
            (r, want) => prop_assert_eq!(r.err(), want),
        }
    }
}
