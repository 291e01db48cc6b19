//! Tests of the request codec: every accepted shape and every rejection path of [`parse`], then
//! property tests over arbitrary and over well-formed chains.

use proptest::prelude::*;
use virtio_bindings::bindings::virtio_ring::{
    VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};
use virtio_queue::desc::RawDescriptor;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueOwnedT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::*;
use crate::mem::GuestMemory;
use crate::virtio_blk::chain::DescTable;
use crate::virtio_blk::req_type::{DISCARD, FLUSH, GET_ID, IN, OUT, WRITE_ZEROES};
use crate::virtio_blk::{HEADER_LEN, MAX_RANGE_SEGMENTS, Status, WRITE_ZEROES_FLAG_UNMAP};
use RequestError as E;
use RequestKind as K;

const F_WRITE: u16 = VRING_DESC_F_WRITE as u16;
const F_NEXT: u16 = VRING_DESC_F_NEXT as u16;
const F_INDIRECT: u16 = VRING_DESC_F_INDIRECT as u16;

const QUEUE_SIZE: u16 = 32;
const MEM_SIZE: u64 = 0x10_0000;
const HDR: u64 = 0x1000;
const HDR2: u64 = 0x2000;
const DATA: u64 = 0x4000;
const DATA2: u64 = 0x8000;
const DATA3: u64 = 0xc000;
const TABLE: u64 = 0x1_0000;
const STATUS: u64 = 0xf_0000;
const CAPACITY: u64 = 1024;
/// `size_max` of the tests' limits: larger than the buffers most tests use.
const SIZE_MAX: u32 = 0x4000;
const MAX_RANGE: u32 = 256;
const MAX_SEGS: u32 = MAX_RANGE_SEGMENTS as u32;
const UNMAP: u32 = WRITE_ZEROES_FLAG_UNMAP;

fn limits() -> Limits {
    Limits {
        capacity_sectors: CAPACITY,
        seg_max: 8,
        size_max: SIZE_MAX,
        read_only: false,
        max_discard_sectors: Some(MAX_RANGE),
        max_write_zeroes_sectors: Some(MAX_RANGE),
    }
}

/// A descriptor with an explicit `next`, which `build_desc_chain` would overwrite.
fn linked(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
    RawDescriptor::from(Descriptor::new(addr, len, flags, next))
}

fn desc(addr: u64, len: u32, flags: u16) -> RawDescriptor {
    linked(addr, len, flags, 0)
}

/// A device-readable descriptor.
fn r(addr: u64, len: u32) -> RawDescriptor {
    desc(addr, len, 0)
}

/// A device-writable descriptor.
fn w(addr: u64, len: u32) -> RawDescriptor {
    desc(addr, len, F_WRITE)
}

/// The usual one-byte status descriptor.
fn st() -> RawDescriptor {
    w(STATUS, 1)
}

fn header_bytes(rtype: u32, sector: u64) -> [u8; 16] {
    let mut h = [0xa5u8; 16]; // the reserved field is ignored
    h[..4].copy_from_slice(&rtype.to_le_bytes());
    h[8..].copy_from_slice(&sector.to_le_bytes());
    h
}

/// One `struct virtio_blk_discard_write_zeroes`.
fn seg(sector: u64, sectors: u32, flags: u32) -> [u8; 16] {
    let mut s = [0u8; 16];
    s[..8].copy_from_slice(&sector.to_le_bytes());
    s[8..12].copy_from_slice(&sectors.to_le_bytes());
    s[12..].copy_from_slice(&flags.to_le_bytes());
    s
}

fn put(mem: &GuestMemory, addr: u64, bytes: &[u8]) {
    mem.write_slice(bytes, GuestAddress(addr))
        .expect("write guest memory");
}

/// Writes `descs` as an indirect table at `table`, linked in order, and returns the descriptor
/// that refers to it.
fn indirect(mem: &GuestMemory, table: u64, descs: &[RawDescriptor]) -> RawDescriptor {
    for (i, d) in descs.iter().enumerate() {
        let d = Descriptor::from(*d);
        let (flags, next) = if i + 1 == descs.len() {
            (d.flags() & !F_NEXT, 0)
        } else {
            (d.flags() | F_NEXT, i as u16 + 1)
        };
        let linked = Descriptor::new(d.addr().0, d.len(), flags, next);
        mem.write_obj(linked, GuestAddress(table + 16 * i as u64))
            .expect("write table");
    }
    desc(table, 16 * descs.len() as u32, F_INDIRECT)
}

/// The parse result, the iovecs, and the discard / write-zeroes segments left in the scratch.
type Outcome = (Result<Parsed, Rejected>, IovecList, Vec<Range>);

/// Parses `descs` as chain 0 of a fresh queue, with the given scratch and iovec capacities.
fn parse_with(
    mem: &GuestMemory,
    c: &[RawDescriptor],
    lim: &Limits,
    cap: (usize, usize),
) -> Outcome {
    let q = MockSplitQueue::new(mem, QUEUE_SIZE);
    let head = q.build_desc_chain(c).expect("build chain").head_index();
    let map = HostMap::new(std::sync::Arc::new(mem.clone()));
    let table = DescTable {
        addr: q.desc_table_addr().0,
        size: QUEUE_SIZE,
    };
    let mut scratch = Scratch::new(cap.0);
    let mut iov = IovecList::with_capacity(cap.1);
    let res = parse(&map, table, head, lim, &mut scratch, &mut iov);
    assert_eq!(scratch.descs.len(), cap.0, "scratch capacity changed");
    (res, iov, scratch.ranges().to_vec())
}

/// Parses the chain at `head` of the mock queue `q` in `mem`.
fn parse_in(
    mem: &GuestMemory,
    q: &MockSplitQueue<'_, GuestMemory>,
    head: u16,
    lim: &Limits,
    scratch: &mut Scratch,
    iov: &mut IovecList,
) -> Result<Parsed, Rejected> {
    let map = HostMap::new(std::sync::Arc::new(mem.clone()));
    let table = DescTable {
        addr: q.desc_table_addr().0,
        size: QUEUE_SIZE,
    };
    parse(&map, table, head, lim, scratch, iov)
}

/// Asserts the iovecs cover exactly the guest bytes of `pieces` `(addr, len)`, in order, by
/// comparing every byte's host address with the guest memory's own translation.
fn assert_iov_covers(mem: &GuestMemory, iov: &IovecList, pieces: &[(u64, u32)]) {
    let mut expected = pieces.iter().flat_map(|&(a, l)| a..a + u64::from(l));
    let mut total = 0u64;
    for v in iov.as_slice() {
        assert_ne!(v.iov_len, 0, "empty iovec");
        for k in 0..v.iov_len {
            let g = expected.next().expect("iovecs cover more than the data");
            let want = mem.get_host_address(GuestAddress(g)).expect("in memory");
            let got = v.iov_base.cast::<u8>().wrapping_add(k);
            assert_eq!(got, want, "byte at {g:#x}");
            total += 1;
        }
    }
    assert!(expected.next().is_none(), "iovecs cover less than the data");
    assert_eq!(iov.bytes(), total);
}

/// What a rejection must carry: the error, its wire status, the status byte's address.
type Want = (E, Status, Option<u64>);

fn assert_rejected(res: Result<Parsed, Rejected>, (error, wire, status): Want) {
    let rej = res.expect_err("request rejected");
    assert_eq!(rej.error, error);
    assert_eq!(rej.error.status(), wire);
    assert_eq!(rej.status, status.map(GuestAddress));
    assert_eq!(rej.head, 0);
}

/// One guest memory of `MEM_SIZE` bytes and the limits requests are checked against.
struct Bench {
    mem: GuestMemory,
    lim: Limits,
}

impl Bench {
    fn new() -> Self {
        Self::with(|_| {})
    }

    /// A bench whose default limits are adjusted by `f`.
    fn with(f: impl FnOnce(&mut Limits)) -> Self {
        let mut lim = limits();
        f(&mut lim);
        let ranges = [(GuestAddress(0), MEM_SIZE as usize)];
        let mem = GuestMemory::from_ranges(&ranges).expect("guest memory");
        Bench { mem, lim }
    }

    fn put(&self, addr: u64, bytes: &[u8]) {
        put(&self.mem, addr, bytes);
    }

    /// Writes a header at `HDR` and parses `chain`.
    fn run(&self, rtype: u32, sector: u64, chain: &[RawDescriptor]) -> Outcome {
        self.put(HDR, &header_bytes(rtype, sector));
        parse_with(&self.mem, chain, &self.lim, (usize::from(QUEUE_SIZE), 64))
    }

    fn ok(&self, rtype: u32, sector: u64, chain: &[RawDescriptor]) -> Parsed {
        self.run(rtype, sector, chain).0.expect("request accepted")
    }

    /// Asserts the chain is accepted with its status byte at `status` and its iovecs covering
    /// exactly `pieces`, and for IN/OUT/FLUSH/GET_ID that it is that request at `sector`.
    fn accepts(
        &self,
        rtype: u32,
        sector: u64,
        chain: &[RawDescriptor],
        status: u64,
        pieces: &[(u64, u32)],
    ) -> (Parsed, IovecList, Vec<Range>) {
        let (res, iov, ranges) = self.run(rtype, sector, chain);
        let p = res.expect("request accepted");
        let kind = match rtype {
            IN => K::Read { sector },
            OUT => K::Write { sector },
            FLUSH => K::Flush,
            GET_ID => K::GetId,
            _ => p.request.kind, // the caller checks the ranges
        };
        let data_len = pieces.iter().map(|p| p.1).sum();
        assert_eq!(p.request, Request { kind, data_len });
        assert_eq!((p.head, p.status), (0, GuestAddress(status)));
        assert_iov_covers(&self.mem, &iov, pieces);
        (p, iov, ranges)
    }

    fn rejects(&self, rtype: u32, chain: &[RawDescriptor], want: Want) {
        assert_rejected(self.run(rtype, 0, chain).0, want);
    }

    /// The common case: an I/O error completed through the status byte at `STATUS`.
    fn ioerr(&self, rtype: u32, sector: u64, chain: &[RawDescriptor], error: E) {
        let res = self.run(rtype, sector, chain).0;
        assert_rejected(res, (error, Status::IoErr, Some(STATUS)));
    }
}

fn oor(sector: u64, sectors: u64, capacity: u64) -> E {
    E::OutOfRange {
        sector,
        sectors,
        capacity,
    }
}

fn mem_oor(addr: u64, len: u32) -> E {
    E::Memory(MemError::OutOfRange { addr, len })
}

fn ranges(list: &[(u64, u32, bool)]) -> Vec<Range> {
    list.iter()
        .map(|&(sector, sectors, unmap)| Range {
            sector,
            sectors,
            unmap,
        })
        .collect()
}

/// A discard / write-zeroes chain whose segment list is the `len` bytes at `DATA`.
fn range_chain(len: u32) -> [RawDescriptor; 3] {
    [r(HDR, 16), r(DATA, len), st()]
}

mod accepted;
mod props;
mod rejected;
