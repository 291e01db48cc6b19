//! Input of `vhost_user`: a sequence of what a frontend does to one session of vubd's
//! backend. Well-formed messages go through the vhost crate's `Frontend`; file descriptor
//! messages, arbitrary (well-framed) messages and garbage are written raw. Memory regions are
//! memfds whose sizes the input chooses; the guest side writes guest memory and kicks.
//! `SetupQueue` and `Request` do in one step what a driver does, so that short inputs reach
//! the data plane.

use arbitrary::Arbitrary;

use crate::{encode_enum, encode_struct};

#[derive(Arbitrary, Clone, Debug, PartialEq, Eq)]
pub struct Input {
    pub ops: Vec<Op>,
}
encode_struct!(Input { ops });

#[derive(Arbitrary, Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// GET_FEATURES, SET_FEATURES (those offered), GET_PROTOCOL_FEATURES,
    /// SET_PROTOCOL_FEATURES (those offered), SET_OWNER, then NEED_REPLY on every message.
    Handshake,
    GetFeatures,
    SetFeatures(Features),
    GetProtocolFeatures,
    SetProtocolFeatures(Features),
    SetOwner,
    ResetOwner,
    /// Ask (or not) for a REPLY_ACK to every message from now on.
    NeedReply(bool),
    GetQueueNum,
    GetConfig {
        offset: u16,
        size: u16,
    },
    SetConfig {
        offset: u16,
        bytes: Vec<u8>,
    },
    SetMemTable(Vec<Region>),
    AddMemReg(Region),
    RemMemReg(RegionRef),
    GetMaxMemSlots,
    SetVringNum {
        q: u8,
        num: u16,
    },
    SetVringAddr {
        q: u8,
        desc: UserAddr,
        used: UserAddr,
        avail: UserAddr,
        flags: u8,
        log: Option<u64>,
    },
    SetVringBase {
        q: u8,
        base: u16,
    },
    GetVringBase {
        q: u8,
    },
    /// SET_VRING_KICK, _CALL or _ERR with a descriptor of any kind, or none.
    SetVringFd {
        which: VringFd,
        q: u8,
        fd: Option<FdKind>,
    },
    SetVringEnable {
        q: u8,
        enable: bool,
    },
    GetInflightFd {
        num_queues: u16,
        queue_size: u16,
    },
    /// A region of our own: `size` bytes at `offset` of a memfd, holding `fill` at its start.
    SetInflightFd {
        num_queues: u16,
        queue_size: u16,
        size: Size,
        offset: Offset,
        fill: Vec<u8>,
    },
    SetLogBase {
        size: Size,
        offset: Offset,
    },
    /// A driver sets queue `q` up in region 0 with `1 << (size % 9)` entries: ring size,
    /// addresses, base, call and kick eventfds, enable.
    SetupQueue {
        q: u8,
        size: u8,
    },
    /// A driver makes one request available on queue `q` (as set up) and kicks.
    Request {
        q: u8,
        kind: ReqKind,
        sector: u16,
        sectors: u8,
        indirect: bool,
    },
    /// The guest writes its memory.
    WriteGuest {
        gpa: Gpa,
        bytes: Vec<u8>,
    },
    Kick(u8),
    /// The frontend shrinks a region's memfd under a running session.
    Truncate {
        region: u8,
        pages: u16,
    },
    /// A well-framed message of any code, flags and body, with descriptors.
    Raw {
        code: u8,
        flags: u8,
        body: Vec<u8>,
        fds: Vec<FdKind>,
    },
    /// Bytes that need not frame anything; the frontend then stops writing.
    Garbage(Vec<u8>),
    /// The frontend goes away.
    Disconnect,
}
encode_enum!(Op {
    Handshake,
    GetFeatures,
    SetFeatures(f),
    GetProtocolFeatures,
    SetProtocolFeatures(f),
    SetOwner,
    ResetOwner,
    NeedReply(b),
    GetQueueNum,
    GetConfig { offset, size },
    SetConfig { offset, bytes },
    SetMemTable(r),
    AddMemReg(r),
    RemMemReg(r),
    GetMaxMemSlots,
    SetVringNum { q, num },
    SetVringAddr { q, desc, used, avail, flags, log },
    SetVringBase { q, base },
    GetVringBase { q },
    SetVringFd { which, q, fd },
    SetVringEnable { q, enable },
    GetInflightFd { num_queues, queue_size },
    SetInflightFd { num_queues, queue_size, size, offset, fill },
    SetLogBase { size, offset },
    SetupQueue { q, size },
    Request { q, kind, sector, sectors, indirect },
    WriteGuest { gpa, bytes },
    Kick(q),
    Truncate { region, pages },
    Raw { code, flags, body, fds },
    Garbage(b),
    Disconnect,
});

/// Feature bits: those the backend offers, or raw.
#[derive(Arbitrary, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Features {
    Offered,
    Raw(u64),
}
encode_enum!(Features { Offered, Raw(f) });

/// A memory region and the memfd behind it.
#[derive(Arbitrary, Clone, Copy, Debug, PartialEq, Eq)]
pub struct Region {
    pub gpa: Gpa,
    pub size: Size,
    pub user: User,
    pub offset: Offset,
    /// When 3 modulo 4, the memfd holds exactly this many pages (usually fewer than the region
    /// needs); otherwise it covers the region.
    pub file_pages: u16,
}
encode_struct!(Region {
    gpa,
    size,
    user,
    offset,
    file_pages
});

#[derive(Arbitrary, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gpa {
    Page(u16),
    Raw(u64),
}
encode_enum!(Gpa { Page(p), Raw(a) });

/// Bytes: `1 + n` pages, or raw.
#[derive(Arbitrary, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Size {
    Pages(u8),
    Raw(u64),
}
encode_enum!(Size { Pages(p), Raw(s) });

/// Offset into the memfd: whole pages, or raw.
#[derive(Arbitrary, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Offset {
    Pages(u8),
    Raw(u64),
}
encode_enum!(Offset { Pages(p), Raw(o) });

/// The frontend's address of a region: at a fixed distance from its guest address (as a
/// VMM's mapping of guest memory is), or raw.
#[derive(Arbitrary, Clone, Copy, Debug, PartialEq, Eq)]
pub enum User {
    Mapped,
    Raw(u64),
}
encode_enum!(User { Mapped, Raw(a) });

/// A region of the current table, or any guest address and size.
#[derive(Arbitrary, Clone, Copy, Debug, PartialEq, Eq)]
pub enum RegionRef {
    Known(u8),
    Raw { gpa: u64, size: u64 },
}
encode_enum!(RegionRef { Known(i), Raw { gpa, size } });

/// A frontend address (what SET_VRING_ADDR carries): inside a known region, or raw.
#[derive(Arbitrary, Clone, Copy, Debug, PartialEq, Eq)]
pub enum UserAddr {
    In { region: u8, offset: u32 },
    Raw(u64),
}
encode_enum!(UserAddr { In { region, offset }, Raw(a) });

#[derive(Arbitrary, Clone, Copy, Debug, PartialEq, Eq)]
pub enum VringFd {
    Kick,
    Call,
    Err,
}
encode_enum!(VringFd { Kick, Call, Err });

/// What a descriptor passed to the backend is.
#[derive(Arbitrary, Clone, Copy, Debug, PartialEq, Eq)]
pub enum FdKind {
    EventFd,
    /// A pipe's read or write end.
    PipeRead,
    PipeWrite,
    /// A memfd of `1 + n` pages.
    Memfd(u8),
    /// The other end of a new socket pair.
    Socket,
}
encode_enum!(FdKind { EventFd, PipeRead, PipeWrite, Memfd(n), Socket });

#[derive(Arbitrary, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReqKind {
    In,
    Out,
    Flush,
    GetId,
    Discard,
    WriteZeroes,
}
encode_enum!(ReqKind {
    In,
    Out,
    Flush,
    GetId,
    Discard,
    WriteZeroes
});

/// Seeds: a session that serves requests, each memory-table message, and the usual ways of
/// breaking the protocol.
pub fn seeds() -> Vec<(&'static str, Input)> {
    let region = |page, pages| Region {
        gpa: Gpa::Page(page),
        size: Size::Pages(pages),
        user: User::Mapped,
        offset: Offset::Pages(0),
        file_pages: u16::from(pages) + 1,
    };
    let mem = Op::SetMemTable(vec![region(0, 255)]);
    let request = |q, kind| Op::Request {
        q,
        kind,
        sector: 8,
        sectors: 8,
        indirect: false,
    };
    let serving = [
        Op::Handshake,
        mem.clone(),
        Op::SetupQueue { q: 0, size: 4 },
        request(0, ReqKind::Out),
        request(0, ReqKind::In),
    ];
    let with = |ops: &[Op]| Input {
        ops: serving.iter().chain(ops).cloned().collect(),
    };
    let mut out = vec![("serve", with(&[]))];
    out.push((
        "every_request_kind_on_two_queues",
        with(&[
            Op::SetupQueue { q: 1, size: 8 },
            request(1, ReqKind::Flush),
            request(1, ReqKind::GetId),
            request(1, ReqKind::Discard),
            request(1, ReqKind::WriteZeroes),
            Op::Request {
                q: 0,
                kind: ReqKind::In,
                sector: 0,
                sectors: 1,
                indirect: true,
            },
        ]),
    ));
    out.push((
        "stop_and_restart_a_ring",
        with(&[
            Op::GetVringBase { q: 0 },
            Op::SetVringBase { q: 0, base: 2 },
            Op::SetVringFd {
                which: VringFd::Call,
                q: 0,
                fd: Some(FdKind::EventFd),
            },
            Op::SetVringFd {
                which: VringFd::Kick,
                q: 0,
                fd: Some(FdKind::EventFd),
            },
            Op::SetVringEnable { q: 0, enable: true },
            request(0, ReqKind::In),
        ]),
    ));
    out.push((
        "add_and_remove_regions",
        with(&[
            Op::AddMemReg(region(512, 15)),
            request(0, ReqKind::In),
            Op::RemMemReg(RegionRef::Known(1)),
            Op::RemMemReg(RegionRef::Known(0)),
            Op::Kick(0),
        ]),
    ));
    out.push((
        "replace_the_memory_table_under_a_running_queue",
        with(&[
            Op::SetMemTable(vec![region(0, 255), region(1024, 3)]),
            request(0, ReqKind::Out),
        ]),
    ));
    out.push((
        "config_space",
        with(&[
            Op::GetConfig {
                offset: 0,
                size: 60,
            },
            Op::GetConfig {
                offset: 0x100,
                size: 8,
            },
            Op::SetConfig {
                offset: 32,
                bytes: vec![0],
            },
            Op::SetConfig {
                offset: 0,
                bytes: vec![1, 2, 3],
            },
        ]),
    ));
    out.push((
        "inflight_regions",
        with(&[
            Op::GetInflightFd {
                num_queues: 2,
                queue_size: 16,
            },
            Op::SetInflightFd {
                num_queues: 2,
                queue_size: 16,
                size: Size::Pages(3),
                offset: Offset::Pages(0),
                fill: vec![1, 0, 0, 0, 0, 0, 0, 0, 1, 0],
            },
            Op::GetVringBase { q: 0 },
            Op::SetVringEnable { q: 0, enable: true },
            Op::Kick(0),
        ]),
    ));
    out.push((
        "dirty_log",
        with(&[
            Op::SetLogBase {
                size: Size::Pages(0),
                offset: Offset::Pages(0),
            },
            Op::SetFeatures(Features::Raw(1 << 30 | 1 << 32 | 1 << 26)),
            request(0, ReqKind::In),
        ]),
    ));
    out.push((
        "a_pipe_as_call_fd",
        with(&[
            Op::SetVringFd {
                which: VringFd::Call,
                q: 0,
                fd: Some(FdKind::PipeWrite),
            },
            request(0, ReqKind::In),
            request(0, ReqKind::In),
        ]),
    ));
    out.push((
        "no_kick_fd",
        with(&[
            Op::SetVringFd {
                which: VringFd::Kick,
                q: 0,
                fd: None,
            },
            request(0, ReqKind::In),
        ]),
    ));
    out.push((
        "avail_index_far_ahead",
        with(&[
            Op::WriteGuest {
                gpa: Gpa::Raw(0x1002),
                bytes: vec![0xe8, 0x03],
            },
            Op::Kick(0),
        ]),
    ));
    out.push((
        "queue_index_out_of_range",
        Input {
            ops: vec![
                Op::Handshake,
                mem.clone(),
                Op::SetVringNum { q: 7, num: 16 },
                Op::GetVringBase { q: 2 },
                Op::SetVringFd {
                    which: VringFd::Err,
                    q: 200,
                    fd: Some(FdKind::EventFd),
                },
            ],
        },
    ));
    out.push((
        "regions_overlapping_and_out_of_the_file",
        Input {
            ops: vec![
                Op::Handshake,
                Op::SetMemTable(vec![region(0, 15), region(8, 15)]),
                Op::AddMemReg(Region {
                    gpa: Gpa::Page(64),
                    size: Size::Pages(3),
                    user: User::Raw(0x1000),
                    offset: Offset::Raw(0x123),
                    file_pages: 1,
                }),
                Op::RemMemReg(RegionRef::Raw {
                    gpa: 0x4_0000,
                    size: 0x1000,
                }),
            ],
        },
    ));
    out.push((
        "raw_messages",
        Input {
            ops: vec![
                Op::Handshake,
                Op::Raw {
                    code: 5,
                    flags: 1,
                    body: vec![1, 0, 0, 0, 0, 0, 0, 0],
                    fds: vec![FdKind::Memfd(0)],
                },
                Op::Raw {
                    code: 12,
                    flags: 9,
                    body: vec![0, 0, 0, 0, 0, 0, 0, 0],
                    fds: vec![FdKind::Socket, FdKind::EventFd],
                },
                Op::Raw {
                    code: 99,
                    flags: 1,
                    body: vec![],
                    fds: vec![],
                },
            ],
        },
    ));
    out.push((
        "garbage_after_a_request",
        with(&[Op::Garbage(vec![1, 0, 0, 0, 1, 0, 0, 0, 0x40, 0, 0, 0, 7])]),
    ));
    out.push(("disconnect_with_queues_running", with(&[Op::Disconnect])));
    out.push((
        "reset_owner_while_serving",
        with(&[Op::ResetOwner, request(0, ReqKind::In), Op::SetOwner]),
    ));
    out.push((
        "many_regions",
        with(&[
            Op::GetMaxMemSlots,
            Op::AddMemReg(region(1024, 0)),
            Op::AddMemReg(region(1026, 0)),
            Op::AddMemReg(region(1028, 0)),
            Op::AddMemReg(region(1030, 0)),
            Op::RemMemReg(RegionRef::Known(2)),
            Op::AddMemReg(region(1028, 1)),
            request(0, ReqKind::Out),
            Op::SetMemTable((0..8).map(|i| region(i * 64, 31)).collect()),
            request(0, ReqKind::In),
        ]),
    ));
    out.push((
        "rings_outside_memory",
        with(&[
            Op::SetVringAddr {
                q: 0,
                desc: UserAddr::Raw(0x1000),
                used: UserAddr::In {
                    region: 0,
                    offset: 0xf_fffc,
                },
                avail: UserAddr::Raw(u64::MAX - 1),
                flags: 0,
                log: None,
            },
            Op::Kick(0),
            request(0, ReqKind::In),
        ]),
    ));
    out.push((
        "odd_and_oversized_ring_sizes",
        with(&[
            Op::GetVringBase { q: 0 },
            Op::SetVringNum { q: 0, num: 3 },
            Op::SetVringFd {
                which: VringFd::Kick,
                q: 0,
                fd: Some(FdKind::EventFd),
            },
            Op::SetVringNum { q: 1, num: 1024 },
            Op::SetupQueue { q: 1, size: 0 },
            request(1, ReqKind::In),
        ]),
    ));
    out.push((
        "no_reply_ack",
        Input {
            ops: vec![
                Op::GetFeatures,
                Op::SetFeatures(Features::Offered),
                Op::GetProtocolFeatures,
                Op::SetProtocolFeatures(Features::Raw(0x8603)),
                Op::NeedReply(true),
                mem.clone(),
                Op::SetupQueue { q: 0, size: 2 },
                request(0, ReqKind::Out),
            ],
        },
    ));
    out.push((
        "raw_protocol_features_and_get_features",
        with(&[
            Op::Raw {
                code: 16,
                flags: 9,
                body: 0x8603u64.to_le_bytes().to_vec(),
                fds: vec![],
            },
            Op::Raw {
                code: 1,
                flags: 1,
                body: vec![],
                fds: vec![],
            },
            request(0, ReqKind::Flush),
        ]),
    ));
    out.push((
        "enable_without_protocol_features",
        Input {
            ops: vec![
                Op::GetFeatures,
                Op::SetFeatures(Features::Raw(1 << 32)),
                Op::SetVringEnable { q: 0, enable: true },
            ],
        },
    ));
    out.push((
        "odd_descriptors_for_vring_fds",
        with(&[
            Op::SetVringFd {
                which: VringFd::Err,
                q: 0,
                fd: Some(FdKind::EventFd),
            },
            Op::SetVringFd {
                which: VringFd::Kick,
                q: 0,
                fd: Some(FdKind::PipeRead),
            },
            Op::SetVringFd {
                which: VringFd::Call,
                q: 1,
                fd: Some(FdKind::Socket),
            },
            Op::SetVringFd {
                which: VringFd::Kick,
                q: 1,
                fd: Some(FdKind::Memfd(0)),
            },
            request(0, ReqKind::In),
        ]),
    ));
    out.push((
        "unknown_and_unoffered_requests",
        with(&[
            Op::Raw {
                code: 34,
                flags: 1,
                body: vec![],
                fds: vec![],
            },
            Op::Raw {
                code: 0,
                flags: 1,
                body: vec![],
                fds: vec![],
            },
            Op::Raw {
                code: 44,
                flags: 1,
                body: vec![0; 8],
                fds: vec![FdKind::EventFd],
            },
        ]),
    ));
    out.push((
        "inflight_region_of_another_ring",
        with(&[
            Op::SetInflightFd {
                num_queues: 2,
                queue_size: 16,
                size: Size::Pages(1),
                offset: Offset::Pages(1),
                fill: [1u8, 0, 0, 0, 0, 0, 0, 0, 1, 0, 1, 0, 7, 0, 0, 0]
                    .into_iter()
                    .cycle()
                    .take(512)
                    .collect(),
            },
            Op::GetVringBase { q: 0 },
            Op::SetVringFd {
                which: VringFd::Kick,
                q: 0,
                fd: Some(FdKind::EventFd),
            },
            Op::Kick(0),
            request(0, ReqKind::In),
        ]),
    ));
    out.push((
        "log_all_on_and_off",
        with(&[
            Op::SetLogBase {
                size: Size::Pages(3),
                offset: Offset::Pages(1),
            },
            Op::SetFeatures(Features::Raw(1 << 32 | 1 << 26 | 1 << 29)),
            request(0, ReqKind::In),
            Op::SetFeatures(Features::Raw(1 << 32 | 1 << 29)),
            request(0, ReqKind::In),
            Op::SetLogBase {
                size: Size::Raw(0x10),
                offset: Offset::Raw(7),
            },
        ]),
    ));
    out.push((
        "region_at_an_odd_guest_address_under_a_queue",
        with(&[
            Op::SetupQueue { q: 1, size: 4 },
            Op::SetMemTable(vec![Region {
                gpa: Gpa::Raw(0x1_0105),
                size: Size::Pages(15),
                user: User::Mapped,
                offset: Offset::Pages(0),
                file_pages: 16,
            }]),
            Op::Kick(1),
            request(1, ReqKind::In),
        ]),
    ));
    out.push((
        "guest_rewrites_a_chain_under_the_device",
        with(&[
            Op::WriteGuest {
                gpa: Gpa::Raw(0),
                bytes: [
                    0u8, 0x30, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0x07, 0, 0, 0,
                ]
                .to_vec(),
            },
            Op::WriteGuest {
                gpa: Gpa::Raw(0x1004),
                bytes: vec![0, 0, 0, 0, 0, 0],
            },
            Op::WriteGuest {
                gpa: Gpa::Raw(0x1002),
                bytes: vec![5, 0],
            },
            Op::Kick(0),
        ]),
    ));
    out
}
