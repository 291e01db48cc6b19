//! Property tests of the parser over arbitrary and well-formed chains.

use super::*;

/// Two adjacent regions (separate host mappings), a hole, and a small high region.
fn prop_mem() -> GuestMemory {
    let ranges = [
        (GuestAddress(0), 0x8_0000),
        (GuestAddress(0x8_0000), 0x8_0000),
        (GuestAddress(0x20_0000), 0x1000),
    ];
    GuestMemory::from_ranges(&ranges).expect("guest memory")
}

fn any_addr() -> impl Strategy<Value = u64> {
    prop_oneof![
        4 => Just(HDR),
        2 => Just(DATA),
        4 => 0x4000u64..0x2_0000,
        1 => 0x7_f000u64..0x8_1000,
        1 => 0xf_f000u64..0x10_1000,
        1 => 0x1f_ff00u64..0x20_1100,
        1 => any::<u64>(),
        1 => u64::MAX - 0x1000..=u64::MAX,
    ]
}

fn any_len() -> impl Strategy<Value = u32> {
    prop_oneof![
        16 => prop::sample::select(vec![0u32, 1, 15, 16, 17, 20, 32, 512, 513, 1024, 4096]),
        8 => 0u32..0x3000,
        1 => Just(u32::MAX),
        1 => any::<u32>(),
    ]
}

fn any_desc() -> impl Strategy<Value = (u64, u32, u16)> {
    let flags = prop_oneof![8 => Just(0u16), 8 => Just(F_WRITE), 1 => any::<u16>()];
    (any_addr(), any_len(), flags)
}

/// A data descriptor: mostly whole sectors.
fn data_desc() -> impl Strategy<Value = (u64, u32, u16)> {
    let len = prop_oneof![4 => (1u32..=8).prop_map(|n| n * 512), 1 => any_len()];
    (
        any_addr(),
        len,
        prop_oneof![8 => Just(0u16), 8 => Just(F_WRITE), 1 => any::<u16>()],
    )
}

/// Mostly chain-shaped: a header first, data descriptors all readable, all writable or in
/// any order, a status byte last; the header and status may be arbitrary descriptors.
fn any_chain() -> impl Strategy<Value = Vec<(u64, u32, u16)>> {
    let hlen = prop_oneof![3 => Just(16u32), 1 => 16u32..80];
    let head = prop_oneof![4 => (Just(HDR), hlen, Just(0u16)), 1 => any_desc()];
    let tail = prop_oneof![5 => Just((STATUS, 1, F_WRITE)), 1 => any_desc()];
    let body = prop::collection::vec(data_desc(), 0..9);
    let direction = prop::option::weighted(0.8, prop_oneof![Just(0u16), Just(F_WRITE)]);
    (head, body, tail, direction).prop_map(|(head, mut body, tail, direction)| {
        if let Some(flags) = direction {
            body.iter_mut().for_each(|d| d.2 = flags);
        }
        [vec![head], body, vec![tail]].concat()
    })
}

fn any_limits() -> impl Strategy<Value = Limits> {
    let capacity = prop_oneof![3 => 0u64..4096, 1 => Just(u64::MAX), 1 => any::<u64>()];
    let seg_max = prop_oneof![3 => 8u32..16, 1 => 0u32..8];
    let read_only = prop::bool::weighted(0.2);
    let max = prop::option::weighted(0.8, prop_oneof![3 => 0u32..512, 1 => any::<u32>()]);
    let size_max = prop_oneof![3 => Just(u32::MAX), 1 => 512u32..0x4000];
    let segs = (seg_max, size_max);
    (capacity, segs, read_only, max.clone(), max).prop_map(|(c, (s, m), ro, d, z)| Limits {
        capacity_sectors: c,
        seg_max: s,
        size_max: m,
        read_only: ro,
        max_discard_sectors: d,
        max_write_zeroes_sectors: z,
    })
}

/// The status byte of a chain of `descs` linked in order, `None` when not modelled: the chain
/// asks for indirection, or `DescriptorChain` cuts it short because it is longer than 2^32
/// bytes.
fn modelled_status(mem: &GuestMemory, descs: &[(u64, u32, u16)]) -> Option<Option<GuestAddress>> {
    let mut total = 0u32;
    for &(_, l, f) in descs {
        total = total.checked_add(l).filter(|_| f & F_INDIRECT == 0)?;
    }
    let &(a, l, f) = descs.last()?;
    let byte = (f & F_WRITE != 0 && l > 0).then(|| a.checked_add(u64::from(l) - 1));
    let byte = byte.flatten().map(GuestAddress);
    Some(byte.and_then(|s| mem.check_address(s)))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2048))]

    #[test]
    fn arbitrary_chains_never_panic_and_results_obey_invariants(
        mut descs in any_chain(),
        fit in prop::bool::weighted(0.6),
        rtype in prop_oneof![
            6 => prop::sample::select(vec![IN, OUT, FLUSH, GET_ID, DISCARD, WRITE_ZEROES]),
            1 => any::<u32>(),
        ],
        sector in prop_oneof![3 => 0u64..1100, 1 => u64::MAX - 16..=u64::MAX, 1 => any::<u64>()],
        segs in prop::collection::vec(
            (0u64..1100, 0u32..300, prop_oneof![4 => Just(0u32), 1 => Just(1), 1 => any::<u32>()]),
            0..20,
        ),
        lim in any_limits(),
        via_indirect in any::<bool>(),
        scratch in prop_oneof![3 => Just(32usize), 1 => 0usize..14],
        iov_cap in prop_oneof![3 => Just(64usize), 1 => 0usize..20],
    ) {
        let mem = prop_mem();
        if fit {
            // Data descriptors in the direction the request type needs.
            let flags = if matches!(rtype, IN | GET_ID) { F_WRITE } else { 0 };
            let n = descs.len();
            descs[1..n - 1].iter_mut().for_each(|d| d.2 = flags);
        }
        put(&mem, HDR, &header_bytes(rtype, sector));
        let raw: Vec<u8> = segs.iter().flat_map(|&(s, n, f)| seg(s, n, f)).collect();
        put(&mem, HDR + 16, &raw);
        put(&mem, DATA, &raw);
        let chain: Vec<RawDescriptor> = descs.iter().map(|&(a, l, f)| desc(a, l, f)).collect();
        let chain = if via_indirect { vec![indirect(&mem, 0x6_0000, &chain)] } else { chain };
        let (res, iov, list) = parse_with(&mem, &chain, &lim, (scratch, iov_cap));

        let status = res.as_ref().map_or_else(|rej| rej.status, |p| Some(p.status));
        if let Some(s) = status {
            prop_assert!(mem.check_address(s).is_some(), "status {s:?} outside memory");
        }
        // Where the chain is modelled, the status byte is exactly its last byte.
        if let Some(want) = modelled_status(&mem, &descs) {
            prop_assert_eq!(status, want);
        }
        let p = match res {
            Ok(p) => p,
            Err(rej) => {
                let no_status = matches!(rej.error, E::EmptyChain | E::MissingStatus);
                prop_assert_eq!(rej.status.is_none(), no_status);
                let unsupp = matches!(rej.error, E::Unsupported(_));
                prop_assert_eq!(rej.error.status() == Status::Unsupp, unsupp);
                return Ok(());
            }
        };
        prop_assert_eq!(p.head, 0);
        let len = u64::from(p.request.data_len);
        match p.request.kind {
            K::Read { sector: s } | K::Write { sector: s } => {
                let write = matches!(p.request.kind, K::Write { .. });
                prop_assert!(!(lim.read_only && write));
                prop_assert_eq!(len % 512, 0);
                prop_assert_eq!(iov.bytes(), len);
                // An iovec is a segment or part of one (where it crosses memory regions).
                prop_assert!(iov.as_slice().iter().all(|v| v.iov_len <= lim.size_max as usize));
                prop_assert!(s.checked_add(len / 512).is_some_and(|e| e <= lim.capacity_sectors));
            }
            K::GetId => prop_assert!(len > 0 && iov.bytes() == len),
            K::Flush => prop_assert!(len == 0 && iov.is_empty()),
            K::Discard | K::WriteZeroes => {
                let discard = p.request.kind == K::Discard;
                let max = if discard { lim.max_discard_sectors } else { lim.max_write_zeroes_sectors };
                let max = max.expect("only offered operations are accepted");
                prop_assert!(!lim.read_only && len == 0 && iov.is_empty());
                prop_assert!((1..=MAX_RANGE_SEGMENTS).contains(&list.len()));
                for r in &list {
                    prop_assert!(r.sectors <= max && !(discard && r.unmap));
                    let end = r.sector.checked_add(u64::from(r.sectors));
                    prop_assert!(end.is_some_and(|e| e <= lim.capacity_sectors));
                }
            }
        }
    }

    #[test]
    fn well_formed_in_out_chains_map_exactly_the_data_bytes_in_order(
        write in any::<bool>(),
        sectors in 1u32..=8,
        cuts in prop::collection::vec(1u32..4096, 0..8),
        offsets in prop::collection::vec(0u64..0x3000, 8),
        merge_edge in any::<bool>(),
        sector_frac in 0u64..=1000,
        via_indirect in any::<bool>(),
    ) {
        // Pieces at scattered addresses; those near 0x40000 cross into the second mapping.
        let ranges = [(GuestAddress(0), 0x4_0000), (GuestAddress(0x4_0000), 0xc_0000)];
        let mem = GuestMemory::from_ranges(&ranges).expect("guest memory");
        let total = sectors * 512;
        let mut cuts: Vec<u32> = cuts.into_iter().map(|c| c % total).filter(|&c| c > 0).collect();
        cuts.extend([0, total]);
        cuts.sort_unstable();
        cuts.dedup();
        let mut pieces: Vec<(u64, u32)> = cuts
            .windows(2)
            .enumerate()
            .map(|(i, c)| (0x2_0000 + 0x4000 * i as u64 + offsets[i], c[1] - c[0]))
            .collect();
        let sector = (CAPACITY - u64::from(sectors)) * sector_frac / 1000;
        put(&mem, HDR, &header_bytes(if write { OUT } else { IN }, sector));

        let mut chain = vec![r(HDR, 16)];
        let mut status = STATUS;
        if write && merge_edge {
            // The first piece travels in the header's descriptor.
            pieces[0].0 = HDR + 16;
            chain[0] = r(HDR, 16 + pieces[0].1);
            chain.extend(pieces[1..].iter().map(|&(a, l)| r(a, l)));
        } else {
            chain.extend(pieces.iter().map(|&(a, l)| if write { r(a, l) } else { w(a, l) }));
        }
        if !write && merge_edge {
            // The status byte follows the last piece in its descriptor.
            let (a, l) = pieces[pieces.len() - 1];
            *chain.last_mut().expect("piece") = w(a, l + 1);
            status = a + u64::from(l);
        } else {
            chain.push(st());
        }
        let chain = if via_indirect { vec![indirect(&mem, 0x6_0000, &chain)] } else { chain };
        let (res, iov, _) = parse_with(&mem, &chain, &limits(), (16, 32));
        let p = res.expect("well-formed request accepted");
        let kind = if write { K::Write { sector } } else { K::Read { sector } };
        prop_assert_eq!(p.request, Request { kind, data_len: total });
        prop_assert_eq!(p.status, GuestAddress(status));
        assert_iov_covers(&mem, &iov, &pieces);
    }
}
