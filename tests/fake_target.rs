//! The fake NVMe/TCP target (`common::fake_target`) against a minimal host built from vubd's
//! own codec: `nvme::tcp::pdu` encoders and `RxParser`, `nvme::spec` builders and parsers.
//!
//! Each test starts its own target on an ephemeral 127.0.0.1 port. Every wait is bounded: the
//! host's reads have a deadline, and a test that would wait longer fails.

mod common;

#[path = "fake_target/host.rs"]
mod host;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::fake_target::{Fault, Options};
use common::{Rng, TIMEOUT};
use host::{DIGESTS, Got, Host, NO_DIGESTS, Out, Reply, admin_queue, io_queue, io_setup, start};
use vubd::nvme::spec::{
    ActiveNamespaces, CNTLID_DYNAMIC, Cc, Cns, ConnectData, Csts, DISCOVERY_NQN, DsmRange,
    HostIdentity, IdentifyController, IdentifyNamespace, LID_DISCOVERY, Nqn, Property, Sgl, Sqe,
    Status, admin_opc, io_opc, sc, sct,
};
use vubd::nvme::tcp::pdu::{
    DataDigest, Digests, IcReq, IcResp, PduError, RxEvent, TX_HEADER_MAX, encode_capsule_cmd,
};

#[test]
fn icresp_grants_what_the_host_asks() {
    let t = start(Options::default());
    for digests in [NO_DIGESTS, DIGESTS] {
        let h = Host::open(t.addr(), digests);
        assert_eq!(h.params.pfv, 0);
        assert_eq!(h.params.cpda, 0);
        assert_eq!(h.params.digests, digests);
        assert_eq!(h.params.maxh2cdata, 128 * 1024);
    }
    let t = start(Options {
        grant_data_digest: false,
        maxh2cdata: 8192,
        ..Options::default()
    });
    let h = Host::open(t.addr(), DIGESTS);
    assert_eq!(
        h.params.digests,
        Digests {
            header: true,
            data: false
        }
    );
    assert_eq!(h.params.maxh2cdata, 8192);
}

#[test]
fn admin_queue_brings_up_and_identifies_the_controller() {
    let t = start(Options::default());
    let host = HostIdentity::generate();
    let mut h = Host::open(t.addr(), DIGESTS);
    let r = h.connect(0, CNTLID_DYNAMIC, t.nqn(), &host).ok();
    let cntlid = r.cqe.expect("completion").dw0() as u16;
    assert_ne!(cntlid, CNTLID_DYNAMIC);

    let cap = vubd::nvme::spec::Cap(h.property(Property::Cap));
    assert_eq!(
        (cap.mqes(), cap.to(), cap.dstrd(), cap.css() & 1),
        (127, 1, 0, 1)
    );
    assert_eq!(h.property(Property::Vs), 0x0001_0400);
    assert!(!Csts(h.property(Property::Csts) as u32).rdy());
    let early = h.exec(Sqe::identify(Cns::Controller, 0), Out::None, 4096);
    assert_eq!(
        early.status().sc(),
        sc::COMMAND_SEQUENCE_ERROR,
        "before CC.EN"
    );
    h.enable();

    let id = h
        .exec(Sqe::identify(Cns::Controller, 0), Out::None, 4096)
        .ok();
    let id = IdentifyController::parse(&id.data).expect("identify controller");
    assert_eq!(id.cntlid, cntlid);
    assert_eq!(id.mdts, 5);
    assert_eq!(id.ver.0, 0x0001_0400);
    assert_eq!(id.nn, 1);
    assert!(id.oncs.dsm() && id.oncs.write_zeroes() && id.vwc);
    assert!(id.sgls.supported() && id.sgls.offset_addressing());
    assert_eq!(id.subnqn, t.nqn());
    assert_eq!(id.in_capsule_data_max(), 8192);
    assert_eq!((id.iorcsz, id.maxcmd), (1, 128));
    assert_eq!(id.max_transfer_bytes(cap), Some(128 * 1024));

    let ns = h
        .exec(Sqe::identify(Cns::Namespace, 1), Out::None, 4096)
        .ok();
    let ns = IdentifyNamespace::parse(&ns.data).expect("identify namespace");
    assert_eq!((ns.nsze, ns.block_size()), (64 << 20 >> 9, 512));
    let list = h
        .exec(Sqe::identify(Cns::ActiveNamespaces, 0), Out::None, 4096)
        .ok();
    assert_eq!(ActiveNamespaces::parse(&list.data).expect("list").0, [1]);
    let bad_ns = h.exec(Sqe::identify(Cns::Namespace, 2), Out::None, 4096);
    assert_eq!(bad_ns.status().sc(), sc::INVALID_NAMESPACE);

    let q = h.exec(Sqe::set_num_queues(15, 15), Out::None, 0).ok();
    assert_eq!(
        q.cqe.expect("completion").dw0(),
        7 | (7 << 16),
        "8 queues at most"
    );
    h.exec(Sqe::keep_alive(), Out::None, 0).ok();
    let abort = h.exec(Sqe::abort(1, 9), Out::None, 0).ok();
    assert_eq!(abort.cqe.expect("completion").dw0() & 1, 1, "not aborted");
    let unknown = h.exec(Sqe::get_features(0x7e), Out::None, 0);
    assert_eq!(unknown.status().sc(), sc::INVALID_FIELD);

    let cc = Cc::enabled(0).with_shn(vubd::nvme::spec::Shn::Normal);
    h.exec(Sqe::property_set(Property::Cc, cc.0.into()), Out::None, 0)
        .ok();
    let csts = Csts(h.property(Property::Csts) as u32);
    assert_eq!(csts.shst(), vubd::nvme::spec::Shst::Complete);
    let c = t.counters();
    assert_eq!(c.admin(admin_opc::IDENTIFY), 5);
    assert_eq!(c.connections_accepted, 1);
}

fn write_read_back(digests: Digests) {
    let opts = Options {
        maxh2cdata: 16 * 1024,
        ..Options::default()
    };
    let (t, _admin, mut io) = io_setup(opts, digests);
    let mut rng = Rng::new(7);
    let small = rng.bytes(4096);
    let big = rng.bytes(64 * 1024);
    io.exec(Sqe::write(1, 8, 7, false), Out::InCapsule(&small), 0)
        .ok();
    io.exec(Sqe::write(1, 64, 127, false), Out::ByR2t(&big), 0)
        .ok();
    let r = io.exec(Sqe::read(1, 8, 7, false), Out::None, 4096).ok();
    assert!(r.data == small, "in-capsule write reads back");
    let r = io
        .exec(Sqe::read(1, 64, 127, false), Out::None, 64 * 1024)
        .ok();
    assert!(r.data == big, "R2T write reads back");
    assert!(t.read_namespace(64 * 512, big.len()) == big);
    let c = t.counters();
    assert_eq!((c.io(io_opc::WRITE), c.io(io_opc::READ)), (2, 2));
    assert_eq!(c.r2ts_sent, 1);
    assert_eq!(c.bytes_written, (4096 + 64 * 1024) as u64);
    assert_eq!(c.bytes_read, (4096 + 64 * 1024) as u64);
}

#[test]
fn writes_in_capsule_and_by_r2t_read_back() {
    write_read_back(NO_DIGESTS);
}

#[test]
fn writes_in_capsule_and_by_r2t_read_back_with_digests() {
    write_read_back(DIGESTS);
}

#[test]
fn write_zeroes_dsm_flush_and_range_checks() {
    let (t, _admin, mut io) = io_setup(Options::default(), DIGESTS);
    t.write_namespace(0, &[0xab; 64 * 512]);
    io.exec(Sqe::write_zeroes(1, 0, 7, false), Out::None, 0)
        .ok();
    let ranges: Vec<u8> = [(16, 8), (40, 4)]
        .iter()
        .flat_map(|&(slba, nlb)| {
            DsmRange {
                context_attributes: 0,
                nlb,
                slba,
            }
            .encode()
        })
        .collect();
    io.exec(Sqe::dsm_deallocate(1, 1), Out::InCapsule(&ranges), 0)
        .ok();
    io.exec(Sqe::dsm_deallocate(1, 1), Out::ByR2t(&ranges), 0)
        .ok();
    io.exec(Sqe::flush(1), Out::None, 0).ok();
    let data = t.read_namespace(0, 64 * 512);
    for (block, chunk) in data.chunks(512).enumerate() {
        let zero = block < 8 || (16..24).contains(&block) || (40..44).contains(&block);
        let want = if zero { 0 } else { 0xab };
        assert!(chunk.iter().all(|&b| b == want), "block {block}");
    }
    let blocks = (64 << 20) / 512;
    let r = io.exec(Sqe::read(1, blocks - 1, 1, false), Out::None, 1024);
    assert_eq!(
        (r.status().sct(), r.status().sc()),
        (sct::GENERIC, sc::LBA_OUT_OF_RANGE)
    );
    assert!(r.status().dnr());
    let r = io.exec(Sqe::read(1, 0, 0, false), Out::None, 1024);
    assert_eq!(
        r.status().sc(),
        sc::SGL_LENGTH_INVALID,
        "SGL longer than the blocks"
    );
    let r = io.exec(Sqe::read(1, 0, 511, false), Out::None, 512 * 512);
    assert_eq!(r.status().sc(), sc::INVALID_FIELD, "beyond MDTS");
}

#[test]
fn discovery_log_lists_the_subsystem() {
    let t = start(Options::default());
    let host = HostIdentity::generate();
    let mut h = Host::open(t.addr(), NO_DIGESTS);
    h.connect(0, CNTLID_DYNAMIC, DISCOVERY_NQN, &host).ok();
    h.enable();
    let id = h
        .exec(Sqe::identify(Cns::Controller, 0), Out::None, 4096)
        .ok();
    let id = IdentifyController::parse(&id.data).expect("identify");
    assert_eq!(id.cntrltype, vubd::nvme::spec::ControllerType::Discovery);
    assert_eq!(id.subnqn, DISCOVERY_NQN);
    let len = 2048;
    let numd = (len / 4 - 1) as u32;
    let log = h
        .exec(Sqe::get_log_page(LID_DISCOVERY, numd, 0), Out::None, len)
        .ok();
    let log = vubd::nvme::spec::DiscoveryLog::parse(&log.data).expect("discovery log");
    assert_eq!(log.entries.len(), 1);
    let e = &log.entries[0];
    assert!(e.is_tcp());
    assert_eq!((e.adrfam, e.subtype), (1, 2));
    assert_eq!(e.traddr, "127.0.0.1");
    assert_eq!(e.trsvcid, t.addr().port().to_string());
    assert_eq!(e.subnqn, t.nqn());
}

#[test]
fn unknown_subsystem_and_foreign_host_are_refused() {
    let allowed = HostIdentity::generate();
    let t = start(Options {
        allowed_hosts: Some(vec![allowed.nqn.as_str().to_owned()]),
        ..Options::default()
    });
    let mut h = Host::open(t.addr(), NO_DIGESTS);
    let r = h.connect(0, CNTLID_DYNAMIC, "nqn.2014-08.org.vubd:nobody", &allowed);
    let cqe = r.cqe.expect("completion");
    assert_eq!((cqe.status().sct(), cqe.status().sc()), (1, 0x82));
    let p = cqe.connect_invalid_parameter().expect("invalid parameter");
    assert!(p.in_data && p.offset == 256, "{p}");
    let stranger = HostIdentity::generate();
    let r = h.connect(0, CNTLID_DYNAMIC, t.nqn(), &stranger);
    assert_eq!(
        (r.status().sct(), r.status().sc()),
        (1, sc::CONNECT_INVALID_HOST)
    );
    h.connect(0, CNTLID_DYNAMIC, t.nqn(), &allowed).ok();
    // An I/O queue of a controller that does not exist.
    let mut io = Host::open(t.addr(), NO_DIGESTS);
    let r = io.connect(1, 0x1234, t.nqn(), &allowed);
    let p = r.cqe.and_then(|c| c.connect_invalid_parameter());
    assert_eq!(p.map(|p| (p.in_data, p.offset)), Some((true, 16)));
}

#[test]
fn sq_flow_control_disabled_reads_end_with_a_success_flag() {
    let t = start(Options::default());
    let host = HostIdentity::generate();
    let (_admin, cntlid) = admin_queue(&t, NO_DIGESTS, &host);
    let mut io = Host::open(t.addr(), DIGESTS);
    io.connect_with(1, cntlid, t.nqn(), &host, 1 << 2, 0).ok();
    t.write_namespace(0, &[0x5a; 4096]);
    let r = io.exec(Sqe::read(1, 0, 7, false), Out::None, 4096);
    assert!(r.cqe.is_none(), "no CapsuleResp after a SUCCESS C2HData");
    assert!(r.data.iter().all(|&b| b == 0x5a));
    let w = io.exec(Sqe::write(1, 0, 0, false), Out::InCapsule(&[1; 512]), 0);
    assert!(
        w.cqe.is_some_and(|c| c.status().is_success()),
        "writes still complete"
    );
    assert_eq!(t.counters().c2h_success, 1);
}

#[test]
fn corrupt_data_digest_is_caught_by_the_parser() {
    let (t, _admin, mut io) = io_setup(Options::default(), DIGESTS);
    t.set_fault(Fault::CorruptDataDigest);
    let cid = io.submit(Sqe::read(1, 0, 0, false), Out::None, 512);
    loop {
        match io.next(TIMEOUT) {
            Got::Event(RxEvent::C2hData(_)) => {}
            Got::Error(PduError::DataDigest { cccid, .. }) => {
                assert_eq!(cccid, cid);
                break;
            }
            other => panic!("data digest error expected, got {other:?}"),
        }
    }
    // Not fatal: the CapsuleResp follows, and the fault was one-shot.
    assert!(matches!(io.next(TIMEOUT), Got::Event(RxEvent::CapsuleResp(c)) if c.cid() == cid));
    io.exec(Sqe::read(1, 0, 0, false), Out::None, 512).ok();
}

#[test]
fn c2h_data_out_of_range_exceeds_the_command() {
    let (t, _admin, mut io) = io_setup(Options::default(), NO_DIGESTS);
    t.set_fault(Fault::C2hDataOutOfRange);
    io.submit(Sqe::read(1, 0, 1, false), Out::None, 1024);
    match io.next(TIMEOUT) {
        Got::Event(RxEvent::C2hData(d)) => {
            assert!(d.datao + d.datal > 1024, "{d:?}");
        }
        other => panic!("C2HData expected, got {other:?}"),
    }
    assert!(matches!(
        io.next(TIMEOUT),
        Got::Error(PduError::DataOutOfRange { .. })
    ));
}

#[test]
fn faulty_cids_digests_and_garbage_are_refused_by_the_parser() {
    type Check = fn(&Got) -> bool;
    let cases: [(Fault, Digests, Check); 5] = [
        (Fault::C2hDataForUnknownCid, NO_DIGESTS, |g| {
            matches!(g, Got::Error(PduError::UnknownCommand { .. }))
        }),
        (
            Fault::CapsuleRespUnknownCid,
            NO_DIGESTS,
            |g| matches!(g, Got::Event(RxEvent::CapsuleResp(c)) if c.cid() > 0xff00),
        ),
        (Fault::CorruptHeaderDigest, DIGESTS, |g| {
            matches!(g, Got::Error(PduError::HeaderDigest { .. }))
        }),
        (Fault::GarbagePdu, NO_DIGESTS, |g| {
            matches!(g, Got::Error(PduError::InvalidType { pdu_type: 0x0a }))
        }),
        (
            Fault::R2tOutOfRange,
            NO_DIGESTS,
            |g| matches!(g, Got::Event(RxEvent::R2t(r)) if r.check_range(512).is_err()),
        ),
    ];
    for (fault, digests, check) in cases {
        let (t, _admin, mut io) = io_setup(Options::default(), digests);
        t.set_fault(fault);
        if fault == Fault::R2tOutOfRange || fault == Fault::CapsuleRespUnknownCid {
            io.submit(Sqe::write(1, 0, 0, false), Out::ByR2t(&[0; 512]), 0);
        } else {
            io.submit(Sqe::read(1, 0, 0, false), Out::None, 512);
        }
        let mut seen = Vec::new();
        loop {
            let g = io.next(TIMEOUT);
            if check(&g) {
                break;
            }
            assert!(
                matches!(g, Got::Event(RxEvent::C2hData(_) | RxEvent::R2t(_))),
                "{fault:?}: unexpected {g:?} after {seen:?}"
            );
            if let Got::Event(RxEvent::R2t(r)) = g {
                io.answer_r2t(r.cccid, r.ttag, r.r2to, r.r2tl);
            }
            seen.push(g);
        }
    }
}

#[test]
fn stall_withholds_answers_until_cleared() {
    let (t, _admin, mut io) = io_setup(Options::default(), NO_DIGESTS);
    t.set_fault(Fault::Stall);
    let cid = io.submit(Sqe::flush(1), Out::None, 0);
    assert!(matches!(io.next(Duration::from_secs(1)), Got::Timeout));
    t.clear_fault(Fault::Stall);
    assert!(io.wait(cid).status().is_success());
}

#[test]
fn fail_io_drop_and_refuse_connections() {
    let (t, _admin, mut io) = io_setup(Options::default(), NO_DIGESTS);
    let busy = Status::new(sct::GENERIC, sc::NAMESPACE_NOT_READY, false);
    t.set_fault(Fault::FailIo(busy));
    let r = io.exec(Sqe::read(1, 0, 0, false), Out::None, 512);
    assert_eq!(r.status(), busy);
    assert!(r.status().is_retryable());
    io.exec(Sqe::read(1, 0, 0, false), Out::None, 512).ok();

    t.set_fault(Fault::DropConnection(2));
    io.exec(Sqe::flush(1), Out::None, 0).ok();
    io.exec(Sqe::flush(1), Out::None, 0).ok();
    assert!(
        matches!(io.next(TIMEOUT), Got::Closed),
        "closed after the 2nd"
    );

    t.set_fault(Fault::RefuseConnections);
    let mut s = TcpStream::connect_timeout(&t.addr(), TIMEOUT).expect("connect");
    s.set_read_timeout(Some(TIMEOUT)).expect("timeout");
    assert!(
        matches!(s.read(&mut [0; 8]), Ok(0) | Err(_)),
        "closed at once"
    );
    t.clear_faults();
    Host::open(t.addr(), NO_DIGESTS);
    let c = t.counters();
    assert_eq!(c.connections_refused, 1);
}

#[test]
fn bad_header_digest_from_the_host_ends_with_c2h_term_req() {
    let (t, _admin, mut io) = io_setup(Options::default(), DIGESTS);
    let mut hdr = [0; TX_HEADER_MAX];
    let mut sqe = Sqe::flush(1);
    sqe.set_sgl(Sgl::Transport { len: 0 });
    let n = encode_capsule_cmd(&mut hdr, &sqe, 0, &io.params);
    hdr[n - 1] ^= 1;
    io.send(&hdr[..n]);
    match io.next(TIMEOUT) {
        Got::Event(RxEvent::C2hTermReq { fes, .. }) => assert_eq!(fes, 0x03),
        other => panic!("C2HTermReq expected, got {other:?}"),
    }
    assert_eq!(t.counters().term_reqs_sent, 1);
}

#[test]
fn pause_and_resume_keep_the_namespace() {
    let (t, mut admin, mut io) = io_setup(Options::default(), NO_DIGESTS);
    io.exec(Sqe::write(1, 3, 0, false), Out::InCapsule(&[0x77; 512]), 0)
        .ok();
    t.pause();
    assert!(matches!(io.next(TIMEOUT), Got::Closed));
    assert!(matches!(admin.next(TIMEOUT), Got::Closed));
    assert!(TcpStream::connect_timeout(&t.addr(), Duration::from_secs(1)).is_err());
    assert_eq!(t.controllers(), 0);
    t.resume().expect("resume");
    let host = HostIdentity::generate();
    let (_admin, cntlid) = admin_queue(&t, NO_DIGESTS, &host);
    let mut io = io_queue(&t, NO_DIGESTS, &host, cntlid);
    let r = io.exec(Sqe::read(1, 3, 0, false), Out::None, 512).ok();
    assert!(r.data.iter().all(|&b| b == 0x77));
}

#[test]
fn keep_alive_timeout_tears_the_controller_down() {
    let t = start(Options::default());
    let host = HostIdentity::generate();
    let mut admin = Host::open(t.addr(), NO_DIGESTS);
    let r = admin
        .connect_with(0, CNTLID_DYNAMIC, t.nqn(), &host, 0, 1000)
        .ok();
    let cntlid = r.cqe.expect("completion").dw0() as u16;
    admin.enable();
    let mut io = io_queue(&t, NO_DIGESTS, &host, cntlid);
    // Keep alives well within KATO keep the controller, whatever the load of the machine.
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(200));
        admin.exec(Sqe::keep_alive(), Out::None, 0).ok();
    }
    assert_eq!(t.controllers(), 1, "kept alive");
    assert!(matches!(admin.next(TIMEOUT), Got::Closed));
    assert!(matches!(io.next(TIMEOUT), Got::Closed));
    assert_eq!(t.counters().keep_alive_expired, 1);
    assert_eq!(t.controllers(), 0);
}

#[test]
fn null_namespace_reads_zeros_and_pipelines() {
    let opts = Options {
        null: true,
        ns_size: 1 << 30,
        block_size: 4096,
        ..Options::default()
    };
    let (t, _admin, mut io) = io_setup(opts, DIGESTS);
    io.exec(Sqe::write(1, 0, 0, false), Out::InCapsule(&[9; 4096]), 0)
        .ok();
    let r = io
        .exec(Sqe::read(1, 0, 31, false), Out::None, 128 * 1024)
        .ok();
    assert!(r.data.iter().all(|&b| b == 0));
    // 32 reads in flight at a time.
    let n = 4000;
    let start = Instant::now();
    let mut inflight = std::collections::VecDeque::new();
    for i in 0..n {
        inflight.push_back(io.submit(Sqe::read(1, i % 1000, 0, false), Out::None, 4096));
        if inflight.len() == 32 || i == n - 1 {
            while let Some(cid) = inflight.pop_front() {
                io.wait(cid).ok();
            }
        }
    }
    let rate = f64::from(n as u32) / start.elapsed().as_secs_f64();
    eprintln!("null 4 KiB reads with digests: {rate:.0}/s through the test host");
    assert_eq!(t.counters().io(io_opc::READ), n + 1);
}

/// Sends `sqe` with its opcode replaced (no builder makes unknown opcodes); the connection
/// must not use header digests.
fn exec_with_opcode(h: &mut Host, mut sqe: Sqe, opcode: u8) -> Reply {
    let cid = h.next_cid;
    h.next_cid += 1;
    sqe.set_cid(cid);
    sqe.set_sgl(Sgl::Transport { len: 0 });
    let mut hdr = [0; TX_HEADER_MAX];
    let n = encode_capsule_cmd(&mut hdr, &sqe, 0, &h.params);
    hdr[8] = opcode;
    h.send(&hdr[..n]);
    h.wait(cid)
}

#[test]
fn unknown_opcodes_are_invalid() {
    let (t, mut admin, mut io) = io_setup(Options::default(), NO_DIGESTS);
    let r = exec_with_opcode(&mut admin, Sqe::keep_alive(), 0x55);
    assert_eq!(
        (r.status().sc(), r.status().dnr()),
        (sc::INVALID_OPCODE, true)
    );
    let r = exec_with_opcode(&mut io, Sqe::flush(1), 0x7c);
    assert_eq!(r.status().sc(), sc::INVALID_OPCODE);
    let c = t.counters();
    assert_eq!((c.admin(0x55), c.io(0x7c)), (1, 1));
}

/// A valid admin queue stream from ICReq to Identify, then a command with in-capsule data
/// that the admin queue refuses (opcode 01h is not an admin command here).
fn valid_stream(nqn: &str) -> Vec<u8> {
    let icreq = IcReq {
        hpda: 0,
        digests: DIGESTS,
        maxr2t: 0,
    };
    let params = IcResp {
        pfv: 0,
        cpda: 0,
        digests: DIGESTS,
        maxh2cdata: 128 * 1024,
    };
    let host = HostIdentity::from_random_bytes([7; 16]);
    let subnqn = Nqn::new(nqn).expect("NQN");
    let connect = ConnectData {
        hostid: &host.id,
        cntlid: CNTLID_DYNAMIC,
        subnqn: &subnqn,
        hostnqn: &host.nqn,
    }
    .encode();
    let mut out = icreq.encode().to_vec();
    let mut capsule = |sqe: Sqe, data: &[u8], cid: u16| {
        let mut sqe = sqe;
        sqe.set_cid(cid);
        sqe.set_sgl(if data.is_empty() {
            Sgl::Transport { len: 0 }
        } else {
            Sgl::InCapsule {
                len: data.len() as u32,
            }
        });
        let mut hdr = [0; TX_HEADER_MAX];
        let n = encode_capsule_cmd(&mut hdr, &sqe, data.len() as u32, &params);
        out.extend_from_slice(&hdr[..n]);
        out.extend_from_slice(data);
        if !data.is_empty() {
            let mut d = DataDigest::new();
            d.update(data);
            out.extend_from_slice(&d.finish());
        }
    };
    capsule(Sqe::connect(0, 31, 0, 0), &connect, 1);
    capsule(
        Sqe::property_set(Property::Cc, Cc::enabled(0).0.into()),
        &[],
        2,
    );
    capsule(Sqe::identify(Cns::Controller, 0), &[], 3);
    capsule(Sqe::write(1, 0, 0, false), &[0x33; 512], 4);
    out
}

/// Sends `bytes`, closes the sending side, and reads until the target closes.
fn throw(addr: SocketAddr, bytes: &[u8]) {
    let mut s = TcpStream::connect_timeout(&addr, TIMEOUT).expect("connect");
    // The target may close before taking everything: a failed write is fine.
    let _ = s.write_all(bytes);
    let _ = s.shutdown(std::net::Shutdown::Write);
    s.set_read_timeout(Some(TIMEOUT)).expect("timeout");
    let deadline = Instant::now() + TIMEOUT;
    let mut sink = [0; 4096];
    loop {
        assert!(Instant::now() < deadline, "the target did not close");
        match s.read(&mut sink) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
}

#[test]
fn random_and_mutated_input_never_panics_the_target() {
    let t = start(Options::default());
    let valid = valid_stream(t.nqn());
    let mut rng = Rng::new(99);
    for round in 0..300 {
        let bytes = match round % 3 {
            // Random bytes, before or after a valid ICReq.
            0 => {
                let len = rng.below_usize(600);
                rng.bytes(len)
            }
            1 => {
                let len = rng.below_usize(600);
                let mut b = valid[..128].to_vec();
                b.extend(rng.bytes(len));
                b
            }
            // A valid stream with a few bytes changed or cut short.
            _ => {
                let mut b = valid.clone();
                for _ in 0..1 + rng.below_usize(4) {
                    let i = rng.below_usize(b.len());
                    b[i] ^= 1 << rng.below(8);
                }
                b.truncate(1 + rng.below_usize(b.len()));
                b
            }
        };
        throw(t.addr(), &bytes);
    }
    // The unmodified stream still works, and nothing panicked.
    throw(t.addr(), &valid);
    let c = t.counters();
    assert_eq!(c.panics, 0);
    assert!(c.term_reqs_sent > 0);
    assert!(c.admin(admin_opc::IDENTIFY) > 0);
    assert!(c.admin(io_opc::WRITE) > 0);
}
