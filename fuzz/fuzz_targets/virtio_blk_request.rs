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

impl Guest {
    fn new(m: &vubd_fuzz::virtio_blk::Memory) -> Option<Self> {
        let pages = |p: u8| (1 + u64::from(p % 16)) * PAGE;
        let r0 = (
            u64::from(m.base) * PAGE + u64::from(m.shift),
            pages(m.pages),
        );
        let mut regions = vec![r0];
        if let Some(s) = &m.second {
            regions.push((r0.0 + r0.1 + u64::from(s.gap) * PAGE, pages(s.pages)));
        }
        if m.top {
            regions.push((0u64.wrapping_sub(2 * PAGE), PAGE));
        }
        let ranges: Vec<(GuestAddress, usize)> = regions
            .iter()
            .map(|&(a, l)| (GuestAddress(a), l as usize))
            .collect();
        let mem = GuestMemory::from_ranges(&ranges).ok()?;
        Some(Self {
            mem: Arc::new(mem),
            regions,
        })
    }

    fn addr(&self, a: Addr) -> u64 {
        let region = |r: u8| self.regions[usize::from(r) % self.regions.len()];
        match a {
            Addr::In { region: r, offset } => {
                let (start, len) = region(r);
                start + u64::from(offset) % len
            }
            Addr::End { region: r, back } => {
                let (start, len) = region(r);
                (start + len).wrapping_sub(u64::from(back))
            }
            Addr::Raw(a) => a,
        }
    }

    /// Writes what fits of `bytes` at `addr` (nothing past the end of the address space).
    fn put(&self, addr: u64, bytes: &[u8]) {
        if self.mem.write_slice(bytes, GuestAddress(addr)).is_ok() {
            return;
        }
        for (i, b) in bytes.iter().enumerate() {
            if let Some(a) = addr.checked_add(i as u64) {
                let _ = self.mem.write_obj(*b, GuestAddress(a));
            }
        }
    }

    fn put_descs(&self, at: u64, descs: &[Desc]) {
        for (i, d) in descs.iter().enumerate() {
            if let Some(a) = at.checked_add(16 * i as u64) {
                self.put(a, &self.desc_bytes(d));
            }
        }
    }

    fn desc_bytes(&self, d: &Desc) -> [u8; 16] {
        let len = match d.len {
            Len::Sectors(n) => u32::from(n) * 512,
            Len::Bytes(n) => u32::from(n),
            Len::Raw(n) => n,
        };
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&self.addr(d.addr).to_le_bytes());
        b[8..12].copy_from_slice(&len.to_le_bytes());
        b[12..14].copy_from_slice(&u16::from(d.flags).to_le_bytes());
        b[14..].copy_from_slice(&d.next.to_le_bytes());
        b
    }

    fn put_header(&self, at: u64, h: &Header, capacity: u64) {
        let rtype = match h.kind {
            Kind::In => req_type::IN,
            Kind::Out => req_type::OUT,
            Kind::Flush => req_type::FLUSH,
            Kind::GetId => req_type::GET_ID,
            Kind::Discard => req_type::DISCARD,
            Kind::WriteZeroes => req_type::WRITE_ZEROES,
            Kind::Raw(t) => t,
        };
        let mut b = vec![0u8; 16];
        b[..4].copy_from_slice(&rtype.to_le_bytes());
        b[4..8].copy_from_slice(&0xa5a5_a5a5u32.to_le_bytes());
        b[8..].copy_from_slice(&sector(h.sector, capacity).to_le_bytes());
        for s in &h.segments {
            b.extend_from_slice(&sector(s.sector, capacity).to_le_bytes());
            b.extend_from_slice(&s.sectors.to_le_bytes());
            b.extend_from_slice(&u32::from(s.flags).to_le_bytes());
        }
        self.put(at, &b);
    }

    /// Every byte of guest memory, to see what changed.
    fn image(&self) -> Vec<Vec<u8>> {
        self.regions
            .iter()
            .map(|&(a, l)| {
                let mut v = vec![0u8; l as usize];
                self.mem
                    .read_slice(&mut v, GuestAddress(a))
                    .expect("a region reads whole");
                v
            })
            .collect()
    }

    /// Applies a write of `bytes` at `addr` to an image (bytes outside memory are dropped).
    fn apply(&self, img: &mut [Vec<u8>], addr: u64, bytes: &[u8]) {
        for (i, &b) in bytes.iter().enumerate() {
            let a = addr.wrapping_add(i as u64);
            for (&(s, l), v) in self.regions.iter().zip(img.iter_mut()) {
                if a.wrapping_sub(s) < l {
                    v[(a - s) as usize] = b;
                }
            }
        }
    }

    /// The guest addresses whose bytes differ between two images (the common case, none,
    /// costs one comparison per region).
    fn changed(&self, before: &[Vec<u8>], after: &[Vec<u8>]) -> Vec<u64> {
        let mut out = Vec::new();
        for ((&(start, _), b), a) in self.regions.iter().zip(before).zip(after) {
            if b != a {
                let diff = b.iter().zip(a).enumerate().filter(|(_, (x, y))| x != y);
                out.extend(diff.map(|(i, _)| start + i as u64));
            }
        }
        out
    }

    /// Makes guest memory read-only (`false`) or writable again (`true`): a write while it
    /// is read-only is a crash libFuzzer reports.
    fn set_writable(&self, writable: bool) {
        let prot = if writable {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        for r in self.mem.iter() {
            let host = r
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .expect("a region has a host address");
            // SAFETY: `host..host + len` is one whole anonymous mapping that `self.mem` made
            // (from_ranges maps each region by itself, page aligned) and keeps; changing its
            // protection touches no other memory, and nothing writes it while read-only but
            // the code under test, which must not.
            let rc = unsafe { libc::mprotect(host.cast(), r.len() as usize, prot) };
            assert_eq!(rc, 0, "mprotect: {}", std::io::Error::last_os_error());
        }
    }

    /// True when `addr..addr + len` lies inside one region (what `HostMap` translates in one
    /// piece).
    fn in_one_region(&self, addr: u64, len: u64) -> bool {
        self.regions
            .iter()
            .any(|&(s, l)| addr.wrapping_sub(s) < l && len <= l - (addr - s))
    }

    /// True when the host range lies inside the mapping of one region.
    fn host_inside(&self, base: usize, len: usize) -> bool {
        self.mem.iter().any(|r| {
            let Ok(h) = r.get_host_address(vm_memory::MemoryRegionAddress(0)) else {
                return false;
            };
            let h = h as usize;
            base >= h
                && base
                    .checked_add(len)
                    .is_some_and(|e| e <= h + r.len() as usize)
        })
    }
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

fn is_range_kind(k: RequestKind) -> bool {
    matches!(k, RequestKind::Discard | RequestKind::WriteZeroes)
}

/// A descriptor as the model reads it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct D {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

impl D {
    fn from_bytes(b: [u8; 16]) -> Self {
        let u = |r: std::ops::Range<usize>| {
            b[r].iter()
                .rev()
                .fold(0u64, |acc, &x| acc << 8 | u64::from(x))
        };
        Self {
            addr: u(0..8),
            len: u(8..12) as u32,
            flags: u(12..14) as u16,
            next: u(14..16) as u16,
        }
    }

    fn write(&self) -> bool {
        self.flags & u16::from(F_WRITE) != 0
    }

    /// The last byte, if the descriptor is device-writable and not empty.
    fn status_byte(&self) -> Option<u64> {
        (self.write() && self.len > 0)
            .then(|| self.addr.checked_add(u64::from(self.len) - 1))
            .flatten()
    }
}

/// The chain at `head`, by the rules of virtio 1.2 §2.7.5 as vubd applies them: `next`
/// inside the table, at most as many descriptors as the table has, an indirect table of whole
/// descriptors and not nested, less than 4 GiB in all. `None`: the chain breaks a rule or
/// cannot be read.
fn walk(g: &Guest, t: DescTable, head: u16) -> Option<Vec<D>> {
    let (mut base, mut size, mut index, mut ttl) = (t.addr, t.size, head, t.size);
    let mut indirect = false;
    let mut total = 0u32;
    let mut out = Vec::new();
    loop {
        if ttl == 0 || index >= size {
            return None;
        }
        let at = base.checked_add(16 * u64::from(index))?;
        let mut b = [0u8; 16];
        g.mem.read_slice(&mut b, GuestAddress(at)).ok()?;
        let d = D::from_bytes(b);
        if d.flags & u16::from(F_INDIRECT) != 0 {
            if indirect || d.len == 0 || !d.len.is_multiple_of(16) {
                return None;
            }
            let entries = u16::try_from(d.len / 16).ok()?;
            (base, size, index, ttl, indirect) = (d.addr, entries, 0, entries, true);
            continue;
        }
        total = total.checked_add(d.len)?;
        out.push(d);
        if d.flags & u16::from(F_NEXT) == 0 {
            return Some(out);
        }
        index = d.next;
        ttl -= 1;
    }
}

/// The 16 header bytes at the start of the readable descriptors.
fn read_header(g: &Guest, readable: &[D]) -> Option<[u8; 16]> {
    let mut h = [0u8; 16];
    if readable[0].len >= 16 {
        g.mem
            .read_slice(&mut h, GuestAddress(readable[0].addr))
            .ok()?;
        return Some(h);
    }
    let mut at = 0;
    for d in readable {
        if at == 16 {
            break;
        }
        let n = (d.len as usize).min(16 - at);
        g.mem
            .read_slice(&mut h[at..at + n], GuestAddress(d.addr))
            .ok()?;
        at += n;
    }
    (at == 16).then_some(h)
}

/// Host iovecs for data pieces, as many as `cap` at most: one per piece inside one region,
/// else one per region it crosses; `None` when a piece is not all guest memory.
fn translate(g: &Guest, pieces: &[(u64, u32)], cap: usize) -> Option<Vec<(usize, usize)>> {
    let mut out = Vec::new();
    for &(a, l) in pieces {
        if g.in_one_region(a, u64::from(l)) {
            let h = g.mem.get_host_address(GuestAddress(a)).ok()?;
            out.push((h as usize, l as usize));
        } else {
            let mut covered = 0;
            for s in g.mem.get_slices(GuestAddress(a), l as usize) {
                let s = s.ok()?;
                out.push((s.ptr_guard_mut().as_ptr() as usize, s.len()));
                covered += s.len();
            }
            if covered != l as usize {
                return None;
            }
        }
        if out.len() > cap {
            return None;
        }
    }
    Some(out)
}

/// What `parse` must answer for `chain`: the rules of virtio 1.2 §5.2.6 with vubd's limits,
/// reading guest memory through vm-memory.
fn model(g: &Guest, chain: Option<&[D]>, lim: &Limits, scratch: usize, iov_cap: usize) -> Outcome {
    let reject = |status, unsupported| Outcome::Reject {
        status,
        unsupported,
    };
    let Some(c) = chain else {
        return reject(None, false);
    };
    let last = c[c.len() - 1];
    let status = last
        .status_byte()
        .filter(|&s| g.mem.check_address(GuestAddress(s)).is_some());
    let Some(status) = status else {
        return reject(None, false);
    };
    let ioerr = reject(Some(status), false);
    let n_readable = c.iter().take_while(|d| !d.write()).count();
    if c.len() > scratch || n_readable == 0 || c[n_readable..].iter().any(|d| !d.write()) {
        return ioerr;
    }
    let (readable, writable) = c.split_at(n_readable);
    let Some(h) = read_header(g, readable) else {
        return ioerr;
    };
    let rtype = u32::from_le_bytes([h[0], h[1], h[2], h[3]]);
    let sector = u64::from_le_bytes(h[8..].try_into().expect("8 bytes"));
    let readable_len: u32 = readable.iter().map(|d| d.len).sum();
    let writable_len: u32 = writable.iter().map(|d| d.len).sum();
    let data_in = readable_len - 16;
    // Readable data: the bytes after the header.
    let mut skip = 16u32;
    let rpieces: Vec<(u64, u32)> = readable
        .iter()
        .filter_map(|d| {
            let cut = skip.min(d.len);
            skip -= cut;
            (d.len > cut).then(|| (d.addr.wrapping_add(u64::from(cut)), d.len - cut))
        })
        .collect();
    // Writable data: the bytes before the status byte.
    let wpieces: Vec<(u64, u32)> = writable
        .iter()
        .enumerate()
        .map(|(i, d)| (d.addr, d.len - u32::from(i + 1 == writable.len())))
        .filter(|p| p.1 > 0)
        .collect();
    let accept = |kind, data_len, iovecs, ranges| Outcome::Accept {
        status,
        kind,
        data_len,
        iovecs,
        ranges,
    };
    let in_capacity = |s: u64, n: u64| s.checked_add(n).is_some_and(|e| e <= lim.capacity_sectors);
    match rtype {
        req_type::IN | req_type::OUT => {
            let write = rtype == req_type::OUT;
            if write && lim.read_only {
                return ioerr;
            }
            let pieces = match write {
                true if writable_len == 1 => rpieces,
                false if data_in == 0 => wpieces,
                _ => return ioerr,
            };
            let len: u32 = pieces.iter().map(|p| p.1).sum();
            if pieces.len() > lim.seg_max as usize
                || pieces.iter().any(|p| p.1 > lim.size_max)
                || !len.is_multiple_of(512)
                || !in_capacity(sector, u64::from(len / 512))
            {
                return ioerr;
            }
            let Some(iov) = translate(g, &pieces, iov_cap) else {
                return ioerr;
            };
            let kind = if write {
                RequestKind::Write { sector }
            } else {
                RequestKind::Read { sector }
            };
            accept(kind, len, iov, Vec::new())
        }
        req_type::FLUSH => accept(RequestKind::Flush, 0, Vec::new(), Vec::new()),
        req_type::GET_ID => {
            if data_in != 0 || writable_len < 2 {
                return ioerr;
            }
            match translate(g, &wpieces, iov_cap) {
                Some(iov) => accept(RequestKind::GetId, writable_len - 1, iov, Vec::new()),
                None => ioerr,
            }
        }
        req_type::DISCARD | req_type::WRITE_ZEROES => {
            let discard = rtype == req_type::DISCARD;
            let max = if discard {
                lim.max_discard_sectors
            } else {
                lim.max_write_zeroes_sectors
            };
            let Some(max) = max else {
                return reject(Some(status), true);
            };
            if lim.read_only || writable_len != 1 || data_in == 0 || !data_in.is_multiple_of(16) {
                return ioerr;
            }
            if data_in / 16 > 16 {
                return ioerr;
            }
            let mut raw = Vec::new();
            for &(a, l) in &rpieces {
                let mut b = vec![0u8; l as usize];
                if g.mem.read_slice(&mut b, GuestAddress(a)).is_err() {
                    return ioerr;
                }
                raw.extend(b);
            }
            let mut ranges = Vec::new();
            for s in raw.chunks_exact(16) {
                let sector = u64::from_le_bytes(s[..8].try_into().expect("8 bytes"));
                let sectors = u32::from_le_bytes(s[8..12].try_into().expect("4 bytes"));
                let flags = u32::from_le_bytes(s[12..].try_into().expect("4 bytes"));
                let allowed = if discard { 0 } else { 1 };
                if flags & !allowed != 0
                    || sectors > max
                    || !in_capacity(sector, u64::from(sectors))
                {
                    return ioerr;
                }
                ranges.push(Range {
                    sector,
                    sectors,
                    unmap: flags & 1 != 0,
                });
            }
            let kind = if discard {
                RequestKind::Discard
            } else {
                RequestKind::WriteZeroes
            };
            accept(kind, 0, Vec::new(), ranges)
        }
        _ => reject(Some(status), true),
    }
}

/// Takes the heads the driver made available, parses each, writes its status and used
/// element and publishes them, as a poller's pass does, and checks what `SplitRing` reads
/// and writes against the guest memory image.
fn run_ring(p: &mut Parser<'_>, ring: &Ring) {
    let g = p.g;
    let size = p.table.size;
    let n = u64::from(size);
    let (avail, used) = (g.addr(ring.avail), g.addr(ring.used));
    let at = |base: u64, off: u64| base.checked_add(off);
    // The driver's side of the avail ring.
    if size > 0 {
        let put16 = |a: Option<u64>, v: u16| {
            if let Some(a) = a {
                g.put(a, &v.to_le_bytes());
            }
        };
        put16(at(avail, 0), ring.avail_flags);
        put16(at(avail, 2), ring.avail_idx);
        for (i, &h) in ring.heads.iter().take(usize::from(size)).enumerate() {
            let pos = u64::from(ring.next_avail.wrapping_add(i as u16) % size);
            put16(at(avail, 4 + 2 * pos), h);
        }
        put16(at(avail, 4 + 2 * n), ring.used_event);
    }
    let r = SplitRing::new(p.map, avail, used, size, ring.event_idx);
    // Aligned in guest memory and in ours (a region may start at any guest address).
    let host = |a: u64| {
        g.mem
            .get_host_address(GuestAddress(a))
            .map_or(1, |p| p as usize)
    };
    let fits = avail % 2 == 0
        && used % 4 == 0
        && size > 0
        && g.in_one_region(avail, 6 + 2 * n)
        && g.in_one_region(used, 6 + 8 * n)
        && host(avail) % 2 == 0
        && host(used) % 4 == 0;
    assert_eq!(
        r.is_some(),
        fits,
        "SplitRing made for rings at {avail:#x} / {used:#x}"
    );
    let Some(r) = r else { return };
    assert_eq!(r.size(), size);
    assert_eq!(r.used_range(), (used, 6 + 8 * n));

    let read16 = |a: u64| {
        g.mem
            .read_obj::<u16>(GuestAddress(a))
            .expect("inside the ring")
            .to_le()
    };
    let mut want = g.image();
    let next_avail = Wrapping(ring.next_avail);
    let avail_idx = r.avail_idx();
    assert_eq!(avail_idx.0, read16(avail + 2));
    let pending = (avail_idx - next_avail).0;
    if pending > size {
        // An impossible index: the queue is broken and a poller stops it.
        return;
    }
    let old = Wrapping(ring.next_used);
    let mut next_used = old;
    for i in 0..pending.min(BATCH) {
        let pos = next_avail + Wrapping(i);
        let head = r.avail_head(pos);
        assert_eq!(head, read16(avail + 4 + 2 * u64::from(pos.0 % size)));
        let (status, len) = match p.parse_and_check(head) {
            Ok(parsed) => (
                Some((parsed.status.0, Status::Ok)),
                parsed.request.data_len + 1,
            ),
            Err(rej) => match rej.status {
                Some(s) => (Some((s.0, rej.error.status())), 1),
                None => (None, 0),
            },
        };
        if let Some((addr, value)) = status {
            assert!(
                p.map.write_u8(addr, value as u8),
                "status byte not writable"
            );
            g.apply(&mut want, addr, &[value as u8]);
        }
        r.put_used(next_used, head, len);
        let mut elem = [0u8; 8];
        elem[..4].copy_from_slice(&u32::from(head).to_le_bytes());
        elem[4..].copy_from_slice(&len.to_le_bytes());
        g.apply(
            &mut want,
            used + 4 + 8 * u64::from(next_used.0 % size),
            &elem,
        );
        next_used += Wrapping(1);
    }
    let notify = r.publish_used(old, next_used);
    g.apply(&mut want, used + 2, &next_used.0.to_le_bytes());
    assert!(
        g.changed(&want, &g.image()).is_empty(),
        "used ring written elsewhere"
    );
    let expected = if ring.event_idx {
        let event = Wrapping(read16(avail + 4 + 2 * n));
        // vring_need_event(event, new, old)
        (next_used - event - Wrapping(1)).0 < (next_used - old).0
    } else {
        read16(avail) & 1 == 0
    };
    assert_eq!(notify, expected, "interrupt decision");

    let taken = next_avail + Wrapping(pending.min(BATCH));
    let more = r.enable_kicks(taken);
    if ring.event_idx {
        g.apply(&mut want, used + 4 + 8 * n, &taken.0.to_le_bytes());
    } else {
        g.apply(&mut want, used, &0u16.to_le_bytes());
    }
    assert_eq!(more, read16(avail + 2) != taken.0, "kick re-check");
    r.disable_kicks();
    if !ring.event_idx {
        g.apply(&mut want, used, &1u16.to_le_bytes());
    }
    assert!(
        g.changed(&want, &g.image()).is_empty(),
        "kick suppression written elsewhere"
    );
}
