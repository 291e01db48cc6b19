//! The virtio-blk request path: a guest memory image (one or two regions, gaps, a page near
//! the top of the address space) holding an arbitrary descriptor table, indirect tables and
//! headers, walked and parsed by `virtio_blk::parse` under arbitrary limits; then an avail
//! ring whose heads are taken, parsed and completed through `SplitRing` as a poller does.
//!
//! Checked beyond "no panic": parsing writes no guest memory (it is read-only while the
//! first chain is parsed: a write is a crash), and the same chain parsed twice over the same
//! (dirty) scratch gives the same result. Every host iovec lies inside guest memory; a status
//! address is inside guest memory and is the last byte of the chain's last descriptor, which
//! is device-writable; accepted reads and writes are 512-byte aligned, inside the capacity,
//! with segments within `seg_max` and `size_max`; a rejected chain names its status byte
//! whenever the chain has one. And all of it against a model written from the rules (virtio
//! 1.2 §2.7.5, §5.2.6) over vm-memory's own accessors: whether the request is accepted, its
//! kind, data length, iovecs and segments. The ring: `SplitRing` is made exactly for rings
//! inside one region and aligned as guest and as host addresses, reads the heads the driver wrote, writes nothing but the used
//! elements, the used index and the kick suppression fields (the harness writes the status
//! bytes), and its interrupt decision is `vring_need_event`'s.

#![no_main]

use std::num::Wrapping;
use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vubd::mem::{GuestMemory, HostMap, IovecList};
use vubd::virtio_blk::request::Limits;
use vubd::virtio_blk::ring::SplitRing;
use vubd::virtio_blk::{
    DescTable, Parsed, Range, Rejected, RequestKind, Scratch, Status, parse, req_type,
};
use vubd_fuzz::virtio_blk::{
    Addr, Capacity, Desc, F_INDIRECT, F_NEXT, F_WRITE, Header, Input, Kind, Len, Ring, Sector,
    SizeMax, Write,
};

const PAGE: u64 = 4096;
/// Most heads one pass over the ring takes (a poller's batch).
const BATCH: u16 = 64;

fuzz_target!(|input: Input| run(&input));

/// The guest memory of one input and the regions' bounds, in the order `Addr` counts them.
struct Guest {
    mem: Arc<GuestMemory>,
    regions: Vec<(u64, u64)>,
}

fn sector(s: Sector, capacity: u64) -> u64 {
    match s {
        Sector::At(n) => u64::from(n),
        Sector::End(n) => capacity.wrapping_sub(u64::from(n)),
        Sector::Raw(n) => n,
    }
}

fn limits(l: &vubd_fuzz::virtio_blk::Limits) -> Limits {
    Limits {
        capacity_sectors: match l.capacity {
            Capacity::Sectors(n) => u64::from(n),
            Capacity::Raw(n) => n,
        },
        seg_max: u32::from(l.seg_max),
        size_max: match l.size_max {
            SizeMax::Unlimited => u32::MAX,
            SizeMax::Bytes(n) => u32::from(n),
            SizeMax::Raw(n) => n,
        },
        read_only: l.read_only,
        max_discard_sectors: l.discard,
        max_write_zeroes_sectors: l.write_zeroes,
    }
}

fn run(input: &Input) {
    let Some(g) = Guest::new(&input.memory) else {
        return;
    };
    let lim = limits(&input.limits);
    let table_addr = g.addr(input.table);
    g.put_descs(table_addr, &input.descs);
    if let (Some(h), Some(d)) = (&input.header, input.descs.get(usize::from(input.head))) {
        g.put_header(g.addr(d.addr), h, lim.capacity_sectors);
    }
    for w in &input.writes {
        match w {
            Write::Table { at, descs } => g.put_descs(g.addr(*at), descs),
            Write::Header { at, header } => g.put_header(g.addr(*at), header, lim.capacity_sectors),
            Write::Bytes { at, bytes } => g.put(g.addr(*at), bytes),
        }
    }
    let map = HostMap::new(g.mem.clone());
    let table = DescTable {
        addr: table_addr,
        size: input.queue_size,
    };
    let mut p = Parser {
        g: &g,
        map: &map,
        table,
        lim,
        scratch: Scratch::new(usize::from(input.scratch)),
        scratch_cap: usize::from(input.scratch),
        iov: IovecList::with_capacity(usize::from(input.iovecs)),
        iov_cap: usize::from(input.iovecs),
    };

    // Parsing is pure: guest memory is read-only meanwhile.
    g.set_writable(false);
    let _ = p.parse_and_check(input.head);
    g.set_writable(true);

    if let Some(ring) = &input.ring {
        run_ring(&mut p, ring);
    }
}

/// The parser's state, reused across chains as a poller's slot reuses it.
struct Parser<'a> {
    g: &'a Guest,
    map: &'a HostMap,
    table: DescTable,
    lim: Limits,
    scratch: Scratch,
    scratch_cap: usize,
    iov: IovecList,
    iov_cap: usize,
}

/// What `parse` answered, or must answer according to the model.
#[derive(Debug, PartialEq)]
enum Outcome {
    Accept {
        status: u64,
        kind: RequestKind,
        data_len: u32,
        iovecs: Vec<(usize, usize)>,
        ranges: Vec<Range>,
    },
    Reject {
        status: Option<u64>,
        unsupported: bool,
    },
}

fn iovecs(iov: &IovecList) -> Vec<(usize, usize)> {
    iov.as_slice()
        .iter()
        .map(|v| (v.iov_base as usize, v.iov_len))
        .collect()
}

impl Parser<'_> {
    /// Parses the chain at `head` twice (the second time over the first's leftovers), checks
    /// the result against the invariants and the model, and returns it.
    fn parse_and_check(&mut self, head: u16) -> Result<Parsed, Rejected> {
        let mut once = || {
            let r = parse(
                self.map,
                self.table,
                head,
                &self.lim,
                &mut self.scratch,
                &mut self.iov,
            );
            (r, iovecs(&self.iov), self.scratch.ranges().to_vec())
        };
        let (res, iov, ranges) = once();
        let again = once();
        assert_eq!(
            (&res, &iov, &ranges),
            (&again.0, &again.1, &again.2),
            "the same chain parsed twice gave different results"
        );

        let chain = walk(self.g, self.table, head);
        self.check_invariants(&res, chain.as_deref(), head, &iov, &ranges);
        let want = model(
            self.g,
            chain.as_deref(),
            &self.lim,
            self.scratch_cap,
            self.iov_cap,
        );
        let got = match &res {
            Ok(p) => Outcome::Accept {
                status: p.status.0,
                kind: p.request.kind,
                data_len: p.request.data_len,
                iovecs: iov,
                ranges: if is_range_kind(p.request.kind) {
                    ranges
                } else {
                    Vec::new()
                },
            },
            Err(r) => Outcome::Reject {
                status: r.status.map(|s| s.0),
                unsupported: r.error.status() == Status::Unsupp,
            },
        };
        assert_eq!(
            got, want,
            "parse disagrees with the model: {res:?}, chain {chain:x?}"
        );
        if trace() {
            eprintln!("head {head}: {res:?}");
        }
        res
    }

    /// What must hold whatever the model says.
    fn check_invariants(
        &self,
        res: &Result<Parsed, Rejected>,
        chain: Option<&[D]>,
        head: u16,
        iov: &[(usize, usize)],
        ranges: &[Range],
    ) {
        let g = self.g;
        let status = match res {
            Ok(p) => Some(p.status.0),
            Err(r) => r.status.map(|s| s.0),
        };
        assert_eq!(res.as_ref().map_or_else(|r| r.head, |p| p.head), head);
        let last = chain.and_then(|c| c.last());
        match (status, last) {
            (Some(s), Some(last)) => {
                assert!(
                    g.mem.check_address(GuestAddress(s)).is_some(),
                    "status {s:#x} outside guest memory"
                );
                assert_eq!(
                    Some(s),
                    last.status_byte(),
                    "status not the last byte of a device-writable descriptor"
                );
            }
            (Some(s), None) => panic!("status {s:#x} named for a chain that cannot be walked"),
            (None, Some(last)) => {
                let usable = last
                    .status_byte()
                    .filter(|&s| g.mem.check_address(GuestAddress(s)).is_some());
                assert_eq!(
                    usable, None,
                    "the chain has a status byte the result does not name"
                );
            }
            (None, None) => {}
        }
        for &(base, len) in iov {
            assert!(len > 0, "empty iovec");
            assert!(
                g.host_inside(base, len),
                "iovec {base:#x}+{len:#x} outside guest memory"
            );
        }
        let Ok(p) = res else { return };
        let lim = &self.lim;
        let len = p.request.data_len;
        let covered: usize = iov.iter().map(|v| v.1).sum();
        match p.request.kind {
            RequestKind::Read { sector } | RequestKind::Write { sector } => {
                let write = matches!(p.request.kind, RequestKind::Write { .. });
                assert!(
                    !(write && lim.read_only),
                    "write accepted on a read-only device"
                );
                assert_eq!(len % 512, 0, "unaligned data length accepted");
                let end = sector.checked_add(u64::from(len / 512));
                assert!(
                    end.is_some_and(|e| e <= lim.capacity_sectors),
                    "beyond the capacity"
                );
                assert_eq!(covered, len as usize);
                // An iovec is a segment or part of one (where it crosses regions).
                assert!(
                    iov.iter().all(|v| v.1 <= lim.size_max as usize),
                    "segment over size_max"
                );
            }
            RequestKind::GetId => assert_eq!(covered, len as usize),
            RequestKind::Flush => assert!(len == 0 && iov.is_empty()),
            RequestKind::Discard | RequestKind::WriteZeroes => {
                let discard = p.request.kind == RequestKind::Discard;
                let max = if discard {
                    lim.max_discard_sectors
                } else {
                    lim.max_write_zeroes_sectors
                };
                let max = max.expect("only offered operations are accepted");
                assert!(!lim.read_only && len == 0 && iov.is_empty());
                assert!((1..=16).contains(&ranges.len()));
                for r in ranges {
                    assert!(r.sectors <= max && !(discard && r.unmap));
                    let end = r.sector.checked_add(u64::from(r.sectors));
                    assert!(
                        end.is_some_and(|e| e <= lim.capacity_sectors),
                        "range beyond the capacity"
                    );
                }
            }
        }
    }
}

/// `VUBD_FUZZ_TRACE` set: print each parse result (to see what a seed or finding does).
fn trace() -> bool {
    static TRACE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *TRACE.get_or_init(|| std::env::var_os("VUBD_FUZZ_TRACE").is_some())
}

use model::{D, is_range_kind, model, walk};
use ring::run_ring;

#[path = "virtio_blk_request/guest.rs"]
mod guest;
#[path = "virtio_blk_request/model.rs"]
mod model;
#[path = "virtio_blk_request/ring.rs"]
mod ring;
