//! Input of `virtio_blk_request`: a guest memory image (one or two regions, gaps, a page near
//! the top of the address space) holding a descriptor table, indirect tables, request headers
//! and range segments, the parser's limits, and optionally an avail ring whose heads are
//! parsed the way a poller takes them.
//!
//! Addresses and lengths are structured (inside a region, at a region's end, or raw) so that
//! most inputs land in memory, at its edges, or just past them.

use arbitrary::Arbitrary;

use crate::{encode_enum, encode_struct};

#[derive(Arbitrary, Clone, Debug, PartialEq, Eq)]
pub struct Input {
    pub memory: Memory,
    pub limits: Limits,
    /// Where the descriptor table is; its size is the queue size.
    pub table: Addr,
    pub queue_size: u16,
    /// The chain parsed directly (the ring's heads are parsed too).
    pub head: u16,
    /// Capacity of the parser's scratch, in descriptors (longer chains are rejected).
    pub scratch: u8,
    /// Capacity of the iovec list.
    pub iovecs: u8,
    /// Written at the address of table entry `head`, if the table has one.
    pub header: Option<Header>,
    /// The table's entries, from index 0.
    pub descs: Vec<Desc>,
    /// Further guest memory contents, written in order after the table.
    pub writes: Vec<Write>,
    pub ring: Option<Ring>,
}
encode_struct!(Input {
    memory,
    limits,
    table,
    queue_size,
    head,
    scratch,
    iovecs,
    header,
    descs,
    writes,
    ring
});

/// Region 0 at page `base` plus `shift` bytes (a region may start at any guest address, its
/// mapping at a page), of `1 + pages % 16` pages; an optional second region after a gap; an
/// optional page just below the top of the address space.
#[derive(Arbitrary, Clone, Debug, PartialEq, Eq)]
pub struct Memory {
    pub base: u16,
    pub shift: u8,
    pub pages: u8,
    pub second: Option<Second>,
    pub top: bool,
}
encode_struct!(Memory {
    base,
    shift,
    pages,
    second,
    top
});

/// A region `gap` pages after region 0 (0: adjacent, yet a mapping of its own), of
/// `1 + pages % 16` pages.
#[derive(Arbitrary, Clone, Debug, PartialEq, Eq)]
pub struct Second {
    pub gap: u8,
    pub pages: u8,
}
encode_struct!(Second { gap, pages });

/// A guest address.
#[derive(Arbitrary, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Addr {
    /// `offset` (modulo the region's size) into region `region` (modulo their number).
    In {
        region: u8,
        offset: u16,
    },
    /// `back` bytes before the end of region `region` (0: the first byte past it).
    End {
        region: u8,
        back: u8,
    },
    Raw(u64),
}
encode_enum!(Addr { In { region, offset }, End { region, back }, Raw(a) });

/// A descriptor length.
#[derive(Arbitrary, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Len {
    Sectors(u8),
    Bytes(u16),
    Raw(u32),
}
encode_enum!(Len { Sectors(n), Bytes(n), Raw(n) });

/// A descriptor; `flags` bits 0..3 are NEXT, WRITE and INDIRECT, the others unknown flags.
#[derive(Arbitrary, Clone, Copy, Debug, PartialEq, Eq)]
pub struct Desc {
    pub addr: Addr,
    pub len: Len,
    pub flags: u8,
    pub next: u16,
}
encode_struct!(Desc {
    addr,
    len,
    flags,
    next
});

pub const F_NEXT: u8 = 1;
pub const F_WRITE: u8 = 2;
pub const F_INDIRECT: u8 = 4;

/// A request header (`struct virtio_blk_outhdr`), then discard / write-zeroes segments.
#[derive(Arbitrary, Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub kind: Kind,
    pub sector: Sector,
    pub segments: Vec<Segment>,
}
encode_struct!(Header {
    kind,
    sector,
    segments
});

#[derive(Arbitrary, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    In,
    Out,
    Flush,
    GetId,
    Discard,
    WriteZeroes,
    Raw(u32),
}
encode_enum!(Kind { In, Out, Flush, GetId, Discard, WriteZeroes, Raw(t) });

/// A sector number: from the start, from the end of the capacity, or raw.
#[derive(Arbitrary, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sector {
    At(u16),
    End(u8),
    Raw(u64),
}
encode_enum!(Sector { At(s), End(s), Raw(s) });

/// One `struct virtio_blk_discard_write_zeroes`; `flags` 1 is UNMAP.
#[derive(Arbitrary, Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub sector: Sector,
    pub sectors: u32,
    pub flags: u8,
}
encode_struct!(Segment {
    sector,
    sectors,
    flags
});

#[derive(Arbitrary, Clone, Debug, PartialEq, Eq)]
pub enum Write {
    /// Descriptors from `at` (an indirect table).
    Table {
        at: Addr,
        descs: Vec<Desc>,
    },
    Header {
        at: Addr,
        header: Header,
    },
    Bytes {
        at: Addr,
        bytes: Vec<u8>,
    },
}
encode_enum!(Write { Table { at, descs }, Header { at, header }, Bytes { at, bytes } });

#[derive(Arbitrary, Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub capacity: Capacity,
    pub seg_max: u8,
    pub size_max: SizeMax,
    pub read_only: bool,
    pub discard: Option<u32>,
    pub write_zeroes: Option<u32>,
}
encode_struct!(Limits {
    capacity,
    seg_max,
    size_max,
    read_only,
    discard,
    write_zeroes
});

/// Capacity in sectors.
#[derive(Arbitrary, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Capacity {
    Sectors(u16),
    Raw(u64),
}
encode_enum!(Capacity { Sectors(n), Raw(n) });

#[derive(Arbitrary, Clone, Copy, Debug, PartialEq, Eq)]
pub enum SizeMax {
    Unlimited,
    Bytes(u16),
    Raw(u32),
}
encode_enum!(SizeMax { Unlimited, Bytes(n), Raw(n) });

/// The rings of the queue (its size is the table's): what the driver wrote in the avail
/// ring, and where the device stands.
#[derive(Arbitrary, Clone, Debug, PartialEq, Eq)]
pub struct Ring {
    pub avail: Addr,
    pub used: Addr,
    pub event_idx: bool,
    pub avail_flags: u16,
    pub avail_idx: u16,
    pub used_event: u16,
    /// The device's next avail and used positions.
    pub next_avail: u16,
    pub next_used: u16,
    /// Avail ring entries from position `next_avail` on.
    pub heads: Vec<u16>,
}
encode_struct!(Ring {
    avail,
    used,
    event_idx,
    avail_flags,
    avail_idx,
    used_event,
    next_avail,
    next_used,
    heads
});

/// Seeds: well-formed requests of each type (direct, indirect, across regions, through the
/// ring) and a few classic malformations.
pub fn seeds() -> Vec<(&'static str, Input)> {
    let r0 = |offset| Addr::In { region: 0, offset };
    let d = |addr, len, flags, next| Desc {
        addr,
        len,
        flags,
        next,
    };
    let limits = Limits {
        capacity: Capacity::Sectors(4096),
        seg_max: 8,
        size_max: SizeMax::Bytes(0x4000),
        read_only: false,
        discard: Some(1024),
        write_zeroes: Some(1024),
    };
    let header = |kind, sector| Header {
        kind,
        sector,
        segments: vec![],
    };
    let one = Memory {
        base: 0,
        shift: 0,
        pages: 15,
        second: None,
        top: false,
    };
    let base = Input {
        memory: one.clone(),
        limits,
        table: r0(0),
        queue_size: 16,
        head: 0,
        scratch: 32,
        iovecs: 32,
        header: Some(header(Kind::In, Sector::At(8))),
        descs: vec![
            d(r0(0x1000), Len::Bytes(16), F_NEXT, 1),
            d(r0(0x2000), Len::Sectors(2), F_NEXT | F_WRITE, 2),
            d(r0(0xf000), Len::Bytes(1), F_WRITE, 0),
        ],
        writes: vec![],
        ring: None,
    };
    let with = |f: &dyn Fn(&mut Input)| {
        let mut i = base.clone();
        f(&mut i);
        i
    };
    let mut out = vec![("read", base.clone())];
    out.push((
        "write",
        with(&|i| {
            i.header = Some(header(Kind::Out, Sector::At(0)));
            i.descs[1].flags = F_NEXT;
        }),
    ));
    out.push((
        "write_in_header_descriptor",
        with(&|i| {
            i.header = Some(header(Kind::Out, Sector::End(8)));
            i.descs[0].len = Len::Bytes(16 + 4096);
            i.descs[0].next = 2;
        }),
    ));
    out.push((
        "read_status_in_data_descriptor",
        with(&|i| {
            i.descs[1] = d(r0(0x2000), Len::Bytes(1025), F_WRITE, 0);
        }),
    ));
    out.push((
        "flush",
        with(&|i| {
            i.header = Some(header(Kind::Flush, Sector::At(0)));
            i.descs[0].next = 2;
        }),
    ));
    out.push((
        "get_id",
        with(&|i| {
            i.header = Some(header(Kind::GetId, Sector::At(0)));
            i.descs[1].len = Len::Bytes(20);
        }),
    ));
    for (name, kind) in [
        ("discard", Kind::Discard),
        ("write_zeroes", Kind::WriteZeroes),
    ] {
        out.push((
            name,
            with(&|i| {
                let seg = |s, n, f| Segment {
                    sector: Sector::At(s),
                    sectors: n,
                    flags: f,
                };
                i.header = Some(Header {
                    kind,
                    sector: Sector::At(0),
                    segments: vec![
                        seg(0, 8, 0),
                        seg(100, 64, u8::from(kind == Kind::WriteZeroes)),
                    ],
                });
                i.descs[0].len = Len::Bytes(48);
                i.descs[0].next = 2;
            }),
        ));
    }
    out.push((
        "indirect_read",
        with(&|i| {
            let chain = i.descs.clone();
            i.descs = vec![d(r0(0x3000), Len::Bytes(48), F_INDIRECT, 0)];
            i.writes = vec![Write::Table {
                at: r0(0x3000),
                descs: chain,
            }];
        }),
    ));
    out.push((
        "read_across_regions",
        with(&|i| {
            i.memory.pages = 3;
            i.memory.second = Some(Second { gap: 0, pages: 3 });
            i.descs[1].addr = Addr::End {
                region: 0,
                back: 200,
            };
            i.descs[2].addr = Addr::In {
                region: 1,
                offset: 0x3000,
            };
        }),
    ));
    out.push((
        "table_across_a_gap",
        with(&|i| {
            i.memory.pages = 1;
            i.memory.second = Some(Second { gap: 2, pages: 3 });
            i.table = Addr::End {
                region: 0,
                back: 32,
            };
            for x in &mut i.descs {
                x.addr = Addr::In {
                    region: 1,
                    offset: 0x100,
                };
            }
        }),
    ));
    out.push((
        "status_at_the_top",
        with(&|i| {
            i.memory.top = true;
            i.descs[2].addr = Addr::End { region: 1, back: 1 };
        }),
    ));
    out.push((
        "loop",
        with(&|i| {
            i.descs[2] = d(r0(0xf000), Len::Bytes(1), F_WRITE | F_NEXT, 0);
        }),
    ));
    out.push((
        "nested_indirect",
        with(&|i| {
            i.descs = vec![d(r0(0x3000), Len::Bytes(16), F_INDIRECT, 0)];
            i.writes = vec![Write::Table {
                at: r0(0x3000),
                descs: vec![d(r0(0x3000), Len::Bytes(16), F_INDIRECT, 0)],
            }];
        }),
    ));
    out.push((
        "huge_lengths",
        with(&|i| {
            i.descs[1].len = Len::Raw(u32::MAX - 8);
            i.descs[2].len = Len::Raw(16);
        }),
    ));
    out.push((
        "too_many_segments",
        with(&|i| {
            i.limits.seg_max = 1;
            i.descs[1].len = Len::Sectors(1);
            i.descs[1].next = 3;
            i.descs
                .push(d(r0(0x5000), Len::Sectors(1), F_NEXT | F_WRITE, 2));
        }),
    ));
    out.push((
        "size_max",
        with(&|i| {
            i.limits.size_max = SizeMax::Bytes(512);
        }),
    ));
    out.push((
        "beyond_capacity",
        with(&|i| {
            i.header = Some(header(Kind::In, Sector::End(1)));
        }),
    ));
    out.push((
        "unsupported",
        with(&|i| {
            i.header = Some(header(Kind::Raw(99), Sector::At(0)));
        }),
    ));
    out.push((
        "ring_two_heads",
        with(&|i| {
            i.descs.push(d(r0(0x6000), Len::Bytes(16), F_NEXT, 4));
            i.descs.push(d(r0(0xf001), Len::Bytes(1), F_WRITE, 0));
            i.writes.push(Write::Header {
                at: r0(0x6000),
                header: header(Kind::Flush, Sector::At(0)),
            });
            i.ring = Some(Ring {
                avail: r0(0x8000),
                used: r0(0x9000),
                event_idx: true,
                avail_flags: 0,
                avail_idx: 2,
                used_event: 0,
                next_avail: 0,
                next_used: 0,
                heads: vec![0, 3],
            });
        }),
    ));
    out.push((
        "ring_index_out_of_range",
        with(&|i| {
            i.ring = Some(Ring {
                avail: r0(0x8000),
                used: r0(0x9000),
                event_idx: false,
                avail_flags: 1,
                avail_idx: 1000,
                used_event: 0,
                next_avail: 0,
                next_used: 0,
                heads: vec![0],
            });
        }),
    ));
    out.push((
        "ring_aligned_in_the_guest_not_in_the_host",
        with(&|i| {
            i.memory.shift = 1;
            i.ring = Some(Ring {
                avail: Addr::Raw(0x8000),
                used: Addr::Raw(0x9000),
                event_idx: true,
                avail_flags: 0,
                avail_idx: 1,
                used_event: 0,
                next_avail: 0,
                next_used: 0,
                heads: vec![0],
            });
        }),
    ));
    out.push((
        "ring_wrapping",
        with(&|i| {
            i.ring = Some(Ring {
                avail: r0(0x8000),
                used: r0(0x9000),
                event_idx: true,
                avail_flags: 0,
                avail_idx: 1,
                used_event: 0xffff,
                next_avail: 0xffff,
                next_used: 0xfff0,
                heads: vec![0, 0],
            });
        }),
    ));
    out
}
