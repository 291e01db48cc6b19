//! Layouts against bytes computed by hand from the spec figures.

use super::*;

fn dw(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
}

#[test]
fn read_and_write_put_slba_nlb_and_fua_where_figure_88_says() {
    let s = Sqe::read(1, 0x1122_3344_5566_7788, 7, true);
    let b = s.as_bytes();
    assert_eq!(b[0], io_opc::READ);
    assert_eq!(dw(b, 4), 1);
    assert_eq!(b[40..48], 0x1122_3344_5566_7788u64.to_le_bytes());
    assert_eq!(dw(b, 48), 0x4000_0007);
    let w = Sqe::write(2, 5, 0xffff, false);
    assert_eq!(w.opcode(), io_opc::WRITE);
    assert_eq!(
        (w.nsid(), w.cdw(10), w.cdw(11), w.cdw(12)),
        (2, 5, 0, 0xffff)
    );
}

#[test]
fn flush_dsm_and_write_zeroes_encode_their_dwords() {
    let f = Sqe::flush(3);
    assert_eq!((f.opcode(), f.nsid(), f.cdw(10)), (io_opc::FLUSH, 3, 0));
    let d = Sqe::dsm_deallocate(1, 15);
    assert_eq!((d.opcode(), d.cdw(10), d.cdw(11)), (io_opc::DSM, 15, 0b100));
    let z = Sqe::write_zeroes(1, 0x10, 3, true);
    assert_eq!(
        (z.opcode(), z.cdw(10), z.cdw(12)),
        (io_opc::WRITE_ZEROES, 0x10, 3 | 1 << 25)
    );
    assert_eq!(Sqe::write_zeroes(1, 0, 3, false).cdw(12), 3);
}

#[test]
fn admin_commands_encode_their_dwords() {
    let i = Sqe::identify(Cns::ActiveNamespaces, 4);
    assert_eq!(
        (i.opcode(), i.nsid(), i.cdw(10)),
        (admin_opc::IDENTIFY, 4, 2)
    );
    assert_eq!(Sqe::identify(Cns::Controller, 0).cdw(10), 1);
    let q = Sqe::set_num_queues(3, 7);
    assert_eq!(
        (q.opcode(), q.cdw(10), q.cdw(11)),
        (admin_opc::SET_FEATURES, 7, 0x0007_0003)
    );
    let g = Sqe::get_features(FID_KEEP_ALIVE_TIMER);
    assert_eq!((g.opcode(), g.cdw(10)), (admin_opc::GET_FEATURES, 0x0f));
    assert_eq!(Sqe::keep_alive().as_bytes()[0], 0x18);
    let a = Sqe::abort(2, 0x1234);
    assert_eq!((a.opcode(), a.cdw(10)), (admin_opc::ABORT, 0x1234_0002));
}

#[test]
fn io_queue_commands_are_polled_contiguous_queues() {
    // CDW10: QID in 15:0, size 0-based in 31:16; CDW11: PC in bit 0, IEN (bit 1) clear.
    let cq = Sqe::create_io_cq(3, 64, None);
    assert_eq!(
        (cq.opcode(), cq.cdw(10), cq.cdw(11)),
        (admin_opc::CREATE_IO_CQ, 0x003f_0003, 1)
    );
    // With interrupts: IEN (bit 1) and the vector in CDW11 31:16, PC still set.
    let cq = Sqe::create_io_cq(3, 64, Some(5));
    assert_eq!(
        (cq.opcode(), cq.cdw(10), cq.cdw(11)),
        (admin_opc::CREATE_IO_CQ, 0x003f_0003, 0x0005_0003)
    );
    assert_eq!(Sqe::create_io_cq(1, 2, Some(0)).cdw(11), 0x0000_0003);
    // The SQ names its CQ in CDW11 31:16.
    let sq = Sqe::create_io_sq(3, 64, 3);
    assert_eq!(
        (sq.opcode(), sq.cdw(10), sq.cdw(11)),
        (admin_opc::CREATE_IO_SQ, 0x003f_0003, 0x0003_0001)
    );
    assert_eq!(
        (Sqe::delete_io_sq(5).opcode(), Sqe::delete_io_sq(5).cdw(10)),
        (admin_opc::DELETE_IO_SQ, 5)
    );
    assert_eq!(
        (Sqe::delete_io_cq(5).opcode(), Sqe::delete_io_cq(5).cdw(10)),
        (admin_opc::DELETE_IO_CQ, 5)
    );
}

#[test]
fn get_log_page_splits_numd_and_offset() {
    let s = Sqe::get_log_page(LID_DISCOVERY, 0x0003_00ff, 0x1_0000_0400);
    assert_eq!(s.opcode(), admin_opc::GET_LOG_PAGE);
    assert_eq!(s.cdw(10), 0x00ff_0070);
    assert_eq!(s.cdw(11), 3);
    assert_eq!((s.cdw(12), s.cdw(13)), (0x400, 1));
}

#[test]
fn async_event_commands_follow_figures_144_and_322() {
    let r = Sqe::async_event_request();
    assert_eq!(r.opcode(), 0x0c);
    assert!((1..16).all(|n| r.cdw(n) == 0), "no parameters");
    let c = Sqe::set_async_event_config(AEC_NAMESPACE_ATTRIBUTE);
    assert_eq!(
        (c.opcode(), c.cdw(10), c.cdw(11)),
        (admin_opc::SET_FEATURES, 0x0b, 0x100)
    );
    let l = Sqe::changed_namespaces_log();
    assert_eq!(l.opcode(), admin_opc::GET_LOG_PAGE);
    // LID 04h, NUMDL 1023 (4096 bytes), RAE (bit 15) clear: the read clears the event.
    assert_eq!((l.cdw(10), l.cdw(11), l.cdw(12)), (0x03ff_0004, 0, 0));
    assert_eq!(l.nsid(), 0xffff_ffff);
}

#[test]
fn async_event_completions_decode_figure_146() {
    // Notice (2), Namespace Attribute Changed (0), log page 04h: what nvmet sends.
    let ns = AsyncEvent::from_dw0(0x0004_0002);
    assert_eq!(ns, AsyncEvent::NAMESPACE_CHANGED);
    assert!(ns.namespace_changed());
    assert_eq!(ns.dw0(), 0x0004_0002);
    // A firmware activation notice and a SMART event are not namespace changes.
    let fw = AsyncEvent::from_dw0(0x0003_0102);
    assert_eq!(
        (fw.kind, fw.info, fw.log_page),
        (AsyncEventType::Notice, 1, 3)
    );
    assert!(!fw.namespace_changed());
    let health = AsyncEvent::from_dw0(0x0002_0001);
    assert_eq!(health.kind, AsyncEventType::Health);
    assert!(!health.namespace_changed());
    assert_eq!(
        AsyncEvent::from_dw0(0xffff_ff05).kind,
        AsyncEventType::Reserved(5)
    );
    for dw0 in [0x0004_0002, 0x0003_0102, 0x00ca_fe07, 0x0000_0006] {
        assert_eq!(AsyncEvent::from_dw0(dw0).dw0(), dw0, "{dw0:#x}");
    }
}

#[test]
fn changed_namespace_list_stops_at_zero_and_knows_overflow() {
    let mut b = vec![0u8; CHANGED_NAMESPACES_LEN];
    assert_eq!(
        ChangedNamespaces::parse(&b),
        Ok(ChangedNamespaces::Listed(vec![]))
    );
    put(&mut b, 0, &3u32.to_le_bytes());
    put(&mut b, 4, &1u32.to_le_bytes());
    put(&mut b, 12, &9u32.to_le_bytes());
    let list = ChangedNamespaces::parse(&b).unwrap();
    assert_eq!(list, ChangedNamespaces::Listed(vec![3, 1]));
    assert!(list.contains(1) && list.contains(3));
    assert!(!list.contains(9), "after the terminating zero");
    let mut full = vec![0u8; CHANGED_NAMESPACES_LEN];
    for (i, id) in full.chunks_mut(4).enumerate() {
        id.copy_from_slice(&(i as u32 + 1).to_le_bytes());
    }
    let all = ChangedNamespaces::parse(&full).unwrap();
    assert!(all.contains(1024) && !all.contains(1025), "1024 entries");
    put(&mut b, 0, &u32::MAX.to_le_bytes());
    let over = ChangedNamespaces::parse(&b).unwrap();
    assert_eq!(over, ChangedNamespaces::Overflow);
    assert!(over.contains(77), "any namespace may have changed");
    assert_eq!(
        ChangedNamespaces::parse(&b[..4092]),
        Err(SpecError::Short {
            what: "changed namespace list",
            need: 4096,
            got: 4092
        })
    );
}

#[test]
fn fabrics_commands_follow_figures_19_to_23() {
    let c = Sqe::connect(1, 127, 0, 15_000);
    let b = c.as_bytes();
    assert_eq!((b[0], b[1], b[4]), (0x7f, 0x40, fabrics_type::CONNECT));
    assert_eq!(b[40..42], [0, 0]);
    assert_eq!(b[42..44], 1u16.to_le_bytes());
    assert_eq!(b[44..46], 127u16.to_le_bytes());
    assert_eq!(dw(b, 48), 15_000);
    let g = Sqe::property_get(Property::Cap);
    let b = g.as_bytes();
    assert_eq!((b[4], b[40], dw(b, 44)), (fabrics_type::PROPERTY_GET, 1, 0));
    let s = Sqe::property_set(Property::Cc, 0x0046_0001);
    let b = s.as_bytes();
    assert_eq!(
        (b[4], b[40], dw(b, 44)),
        (fabrics_type::PROPERTY_SET, 0, 0x14)
    );
    assert_eq!(b[48..56], 0x0046_0001u64.to_le_bytes());
    assert_eq!(Property::Csts.offset(), 0x1c);
    assert_eq!(Property::Vs.offset(), 0x08);
}

#[test]
fn data_pointers_set_dptr_and_psdt() {
    let mut s = Sqe::write(1, 0, 0, false);
    s.set_cid(0xbeef);
    s.set_sgl(Sgl::InCapsule { len: 4096 });
    let b = *s.as_bytes();
    assert_eq!(b[2..4], [0xef, 0xbe]);
    assert_eq!(b[1] & 0xc0, 0x40);
    assert_eq!(
        b[24..40],
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0, 0, 0, 0x01]
    );
    s.set_sgl(Sgl::Transport { len: 0x0102_0304 });
    assert_eq!(
        s.as_bytes()[24..40],
        [0, 0, 0, 0, 0, 0, 0, 0, 4, 3, 2, 1, 0, 0, 0, 0x5a]
    );
    s.set_prp(0x1000, 0x2000);
    let b = s.as_bytes();
    assert_eq!(b[1] & 0xc0, 0);
    assert_eq!(b[24..32], 0x1000u64.to_le_bytes());
    assert_eq!(b[32..40], 0x2000u64.to_le_bytes());
    assert_eq!(s.cid(), 0xbeef);
}

#[test]
fn dsm_range_is_attributes_nlb_slba() {
    let r = DsmRange {
        context_attributes: 1,
        nlb: 8,
        slba: 0x0102_0304_0506_0708,
    };
    assert_eq!(r.encode(), [1, 0, 0, 0, 8, 0, 0, 0, 8, 7, 6, 5, 4, 3, 2, 1]);
}

#[test]
fn cqe_fields_and_status_bits() {
    let mut raw = [0u8; 16];
    raw[0..4].copy_from_slice(&0x0001_0200u32.to_le_bytes());
    raw[4..8].copy_from_slice(&7u32.to_le_bytes());
    raw[8..10].copy_from_slice(&5u16.to_le_bytes());
    raw[10..12].copy_from_slice(&1u16.to_le_bytes());
    raw[12..14].copy_from_slice(&0x42u16.to_le_bytes());
    // DNR, More, CRD 2, SCT 1, SC 82h, phase 1.
    raw[14..16]
        .copy_from_slice(&(0x8000u16 | 0x4000 | 0x2000 | 0x200 | 0x82 << 1 | 1).to_le_bytes());
    let c = Cqe::from_bytes(raw);
    assert_eq!(
        (c.dw0(), c.dw1(), c.sqhd(), c.sqid(), c.cid()),
        (0x0001_0200, 7, 5, 1, 0x42)
    );
    assert_eq!(c.property_value(), 0x0000_0007_0001_0200);
    assert!(c.phase());
    let st = c.status();
    assert_eq!(
        (st.sct(), st.sc(), st.crd(), st.more(), st.dnr()),
        (1, 0x82, 2, true, true)
    );
    assert_eq!(st.to_string(), "connect: invalid parameters");
    let p = c.connect_invalid_parameter().unwrap();
    assert_eq!(
        p,
        InvalidParameter {
            in_data: true,
            offset: 512
        }
    );
    assert_eq!(
        p.to_string(),
        "invalid parameter at byte 512 of the connect data (HOSTNQN)"
    );
    assert_eq!(Cqe::from_bytes([0; 16]).connect_invalid_parameter(), None);
}

#[test]
fn status_display_names_common_codes_and_falls_back_to_numbers() {
    let cases = [
        (Status::SUCCESS, "success"),
        (
            Status::new(sct::GENERIC, sc::INVALID_FIELD, true),
            "invalid field in command",
        ),
        (
            Status::new(sct::GENERIC, sc::LBA_OUT_OF_RANGE, false),
            "LBA out of range",
        ),
        (
            Status::new(sct::GENERIC, sc::NAMESPACE_NOT_READY, false),
            "namespace not ready",
        ),
        (
            Status::new(sct::COMMAND_SPECIFIC, 0x84, true),
            "connect: invalid host",
        ),
        (
            Status::new(sct::MEDIA, 0x81, false),
            "unrecovered read error",
        ),
        (Status::new(sct::MEDIA, 0x99, false), "sct 0x2 sc 0x99"),
        (Status::new(sct::VENDOR, 0x01, false), "sct 0x7 sc 0x01"),
    ];
    for (st, text) in cases {
        assert_eq!(st.to_string(), text);
    }
    assert_eq!(
        Status::from_field(1),
        Status::SUCCESS,
        "the phase tag is not status"
    );
    assert!(Status::SUCCESS.is_success());
}

#[test]
fn only_transient_statuses_without_dnr_are_retryable() {
    let cases = [
        (Status::SUCCESS, false),
        (Status::new(sct::PATH, 0x00, false), true),
        (Status::new(sct::PATH, 0x00, true), false),
        (
            Status::new(sct::GENERIC, sc::NAMESPACE_NOT_READY, false),
            true,
        ),
        (
            Status::new(sct::GENERIC, sc::TRANSIENT_TRANSPORT_ERROR, false),
            true,
        ),
        (Status::new(sct::GENERIC, sc::INVALID_FIELD, false), false),
        (
            Status::new(sct::MEDIA, sc::UNRECOVERED_READ_ERROR, false),
            false,
        ),
    ];
    for (st, retry) in cases {
        assert_eq!(st.is_retryable(), retry, "{st:?}");
    }
}

fn put(b: &mut [u8], off: usize, v: &[u8]) {
    b[off..off + v.len()].copy_from_slice(v);
}

#[test]
fn identify_controller_fields_come_from_figure_275_offsets() {
    let mut b = vec![0u8; IDENTIFY_LEN];
    put(&mut b, 0, &0x1b36u16.to_le_bytes());
    put(&mut b, 4, b"SN123               ");
    put(&mut b, 24, b"Linux                                   ");
    put(&mut b, 64, b"6.1     ");
    b[77] = 5;
    put(&mut b, 78, &0x11u16.to_le_bytes());
    put(&mut b, 80, &0x0002_0000u32.to_le_bytes());
    put(&mut b, 92, &0x0000_0900u32.to_le_bytes());
    b[111] = 1;
    put(&mut b, 320, &100u16.to_le_bytes());
    put(&mut b, 514, &128u16.to_le_bytes());
    put(&mut b, 516, &1024u32.to_le_bytes());
    put(&mut b, 520, &0b1100u16.to_le_bytes());
    b[525] = 1;
    put(&mut b, 536, &(1u32 | 1 << 20 | 1 << 21).to_le_bytes());
    put(&mut b, 768, b"nqn.2014-08.org.example:sub");
    put(&mut b, 1792, &260u32.to_le_bytes());
    put(&mut b, 1796, &1u32.to_le_bytes());
    b[1803] = 1;
    let c = IdentifyController::parse(&b).unwrap();
    assert_eq!(
        (c.vid, c.sn.as_str(), c.mn.as_str(), c.fr.as_str()),
        (0x1b36, "SN123", "Linux", "6.1")
    );
    assert_eq!(
        (c.mdts, c.cntlid, c.ver.to_string()),
        (5, 0x11, "2.0.0".to_owned())
    );
    assert_eq!(
        (c.cntrltype, c.kas, c.maxcmd, c.nn),
        (ControllerType::Io, 100, 128, 1024)
    );
    assert!(c.oncs.dsm() && c.oncs.write_zeroes() && c.vwc);
    assert_eq!(c.oaes, 0x900);
    assert_ne!(c.oaes & AEC_NAMESPACE_ATTRIBUTE, 0);
    assert!(c.sgls.supported() && c.sgls.offset_addressing() && c.sgls.transport_data_block());
    assert_eq!(c.subnqn, "nqn.2014-08.org.example:sub");
    assert_eq!((c.ioccsz, c.iorcsz, c.icdoff, c.msdbd), (260, 1, 0, 1));
    assert_eq!(c.in_capsule_data_max(), 260 * 16 - 64);
    assert_eq!(c.max_transfer_bytes(Cap(0)), Some(4096 << 5));
    assert_eq!(
        IdentifyController::parse(&b[..4095]),
        Err(SpecError::Short {
            what: "identify controller",
            need: 4096,
            got: 4095
        })
    );
}

fn namespace(nlbaf: u8, flbas: u8, index: usize, lbads: u8) -> Vec<u8> {
    let mut b = vec![0u8; IDENTIFY_LEN];
    put(&mut b, 0, &1000u64.to_le_bytes());
    put(&mut b, 8, &900u64.to_le_bytes());
    put(&mut b, 16, &800u64.to_le_bytes());
    b[24] = 0x10;
    b[25] = nlbaf;
    b[26] = flbas;
    put(&mut b, 46, &64u16.to_le_bytes());
    put(&mut b, 128 + 4 * index, &[8, 0, lbads, 2]);
    b
}

#[test]
fn identify_namespace_selects_the_flbas_format() {
    let ns = IdentifyNamespace::parse(&namespace(1, 1, 1, 12)).unwrap();
    assert_eq!(
        (ns.nsze, ns.ncap, ns.nuse, ns.nsfeat, ns.noiob),
        (1000, 900, 800, 0x10, 64)
    );
    assert_eq!(ns.lba_formats().len(), 2);
    assert_eq!(
        ns.lba_format(),
        LbaFormat {
            ms: 8,
            lbads: 12,
            rp: 2
        }
    );
    assert_eq!(ns.block_size(), 4096);
    assert!(!ns.extended_metadata());
    // Index 37 = 0b10_0101: bits 3:0 in FLBAS 3:0, bits 5:4 in FLBAS 6:5; bit 4 is metadata.
    let ns = IdentifyNamespace::parse(&namespace(40, 0b101_0101, 37, 9)).unwrap();
    assert_eq!((ns.format_index(), ns.block_size()), (37, 512));
    assert!(ns.extended_metadata());
}

#[test]
fn dlfeat_says_what_deallocated_blocks_read_as_and_whether_write_zeroes_may_deallocate() {
    let with = |dlfeat: u8| {
        let mut b = namespace(0, 0, 0, 9);
        b[33] = dlfeat;
        IdentifyNamespace::parse(&b).expect("namespace")
    };
    let cases = [
        // (DLFEAT, read of a deallocated block, Write Zeroes may deallocate)
        (0x00, DeallocatedRead::Unreported, false),
        (0x01, DeallocatedRead::Zeroes, false),
        (0x09, DeallocatedRead::Zeroes, true),
        (0x19, DeallocatedRead::Zeroes, true),
        (0x0a, DeallocatedRead::Ones, false),
        (0x08, DeallocatedRead::Unreported, false),
        (0x0b, DeallocatedRead::Unreported, false),
        (0x0f, DeallocatedRead::Unreported, false),
    ];
    for (dlfeat, read, deallocates) in cases {
        let ns = with(dlfeat);
        assert_eq!(ns.dlfeat, dlfeat);
        assert_eq!(ns.deallocated_read(), read, "{dlfeat:#x}");
        assert_eq!(ns.write_zeroes_deallocates(), deallocates, "{dlfeat:#x}");
    }
    assert_eq!(DeallocatedRead::Zeroes.as_str(), "zeroes");
}

#[test]
fn identify_namespace_refuses_unusable_formats() {
    let cases = [
        (
            namespace(0, 0, 0, 8),
            SpecError::LbaDataSize { index: 0, lbads: 8 },
        ),
        (
            namespace(0, 0, 0, 17),
            SpecError::LbaDataSize {
                index: 0,
                lbads: 17,
            },
        ),
        (
            namespace(0, 1, 1, 12),
            SpecError::LbaFormatIndex { index: 1, nlbaf: 0 },
        ),
        (vec![0; IDENTIFY_LEN], SpecError::NamespaceInactive),
    ];
    for (buf, err) in cases {
        assert_eq!(IdentifyNamespace::parse(&buf), Err(err));
    }
}

#[test]
fn active_namespace_list_stops_at_zero_and_must_increase() {
    let mut b = vec![0u8; IDENTIFY_LEN];
    for (i, id) in [1u32, 2, 7].iter().enumerate() {
        put(&mut b, 4 * i, &id.to_le_bytes());
    }
    assert_eq!(ActiveNamespaces::parse(&b).unwrap().0, vec![1, 2, 7]);
    put(&mut b, 12, &7u32.to_le_bytes());
    assert_eq!(
        ActiveNamespaces::parse(&b),
        Err(SpecError::NamespaceListOrder { index: 3 })
    );
    let full: Vec<u8> = (1..=1024u32).flat_map(u32::to_le_bytes).collect();
    assert_eq!(ActiveNamespaces::parse(&full).unwrap().0.len(), 1024);
}

#[test]
fn registers_decode_and_compose_bits() {
    // MQES 1023, CQR, TO 30, DSTRD 0, CSS NVM, MPSMIN 0, MPSMAX 4.
    let cap = Cap(1023 | 1 << 16 | 30 << 24 | 1 << 37 | 4 << 52);
    assert_eq!(
        (cap.mqes(), cap.cqr(), cap.to(), cap.timeout_ms()),
        (1023, true, 30, 15_000)
    );
    assert_eq!(
        (cap.dstrd(), cap.css(), cap.mpsmin(), cap.mpsmax()),
        (0, 1, 0, 4)
    );
    assert_eq!(cap.page_size_min(), 4096);
    let cc = Cc::enabled(0);
    assert_eq!(cc.0, 0x0046_0001);
    assert_eq!(
        (
            cc.en(),
            cc.css(),
            cc.mps(),
            cc.ams(),
            cc.iosqes(),
            cc.iocqes()
        ),
        (true, 0, 0, 0, 6, 4)
    );
    let off = cc.with_shn(Shn::Normal).with_en(false);
    assert_eq!((off.0, off.shn(), off.en()), (0x0046_4000, 1, false));
    let csts = Csts(0b1001);
    assert_eq!(
        (csts.rdy(), csts.cfs(), csts.shst()),
        (true, false, Shst::Complete)
    );
    assert_eq!(Version(0x0001_0400).to_string(), "1.4.0");
}

#[test]
fn connect_data_follows_figure_20() {
    let host = HostIdentity::from_random_bytes([0xab; 16]);
    let sub = Nqn::new("nqn.2014-08.org.example:sub").unwrap();
    let d = ConnectData {
        hostid: &host.id,
        cntlid: CNTLID_DYNAMIC,
        subnqn: &sub,
        hostnqn: &host.nqn,
    }
    .encode();
    assert_eq!(d[0..16], *host.id.as_bytes());
    assert_eq!(d[16..18], [0xff, 0xff]);
    assert!(d[18..256].iter().all(|&c| c == 0));
    assert_eq!(&d[256..256 + 27], b"nqn.2014-08.org.example:sub");
    assert!(d[256 + 27..512].iter().all(|&c| c == 0));
    assert_eq!(
        &d[512..512 + host.nqn.as_str().len()],
        host.nqn.as_str().as_bytes()
    );
    assert!(d[768..].iter().all(|&c| c == 0));
}

#[test]
fn nqn_validation() {
    let good = [
        "nqn.2014-08.org.nvmexpress.discovery",
        "nqn.2014-08.com.example:nvme:nvm-subsystem-sn-d78432",
        "nqn.2024-12.io.vubd:disk1",
        "nqn.2014-08.org.nvmexpress:uuid:f81d4fae-7dec-11d0-a765-00a0c91e6bf6",
    ];
    for s in good {
        assert_eq!(Nqn::new(s).map(|n| n.to_string()), Ok(s.to_owned()));
    }
    let bad = [
        "",
        "nqn.",
        "iqn.2014-08.com.example:x",
        "nqn.14-08.com.example:x",
        "nqn.2014-13.com.example:x",
        "nqn.2014-00.com.example:x",
        "nqn.2014-08:com.example",
        "nqn.2014-08..com:x",
        "nqn.2014-08.com.example:",
        "nqn.2014-08.com.exa mple:x",
        "nqn.2014-08.com.example:a\0b",
        "nqn.2014-08.org.nvmexpress:uuid:not-a-uuid",
        "nqn.2014-08.org.nvmexpress:uuid:f81d4fae7dec11d0a76500a0c91e6bf6",
    ];
    for s in bad {
        assert_eq!(
            Nqn::new(s),
            Err(SpecError::NqnFormat(s.to_owned())),
            "{s:?}"
        );
    }
    let long = format!("nqn.2014-08.com.example:{}", "x".repeat(200));
    assert_eq!(
        Nqn::new(&long),
        Err(SpecError::NqnTooLong { len: long.len() })
    );
    assert!(Nqn::new(&long[..NQN_MAX_LEN]).is_ok());
}

#[test]
fn host_identity_is_a_v4_uuid_and_its_nqn() {
    let h = HostIdentity::from_random_bytes([0; 16]);
    assert_eq!(h.id.to_string(), "00000000-0000-4000-8000-000000000000");
    assert_eq!(
        h.nqn.as_str(),
        "nqn.2014-08.org.nvmexpress:uuid:00000000-0000-4000-8000-000000000000"
    );
    assert_eq!(Nqn::new(h.nqn.as_str()), Ok(h.nqn));
    let a = HostIdentity::generate();
    assert_eq!(a.id.get_version_num(), 4);
    assert_ne!(a, HostIdentity::generate());
}

fn discovery_entry(b: &mut [u8], trtype: u8, subtype: u8, treq: u8, subnqn: &[u8], traddr: &[u8]) {
    b[0] = trtype;
    b[1] = 1;
    b[2] = subtype;
    b[3] = treq;
    put(b, 4, &1u16.to_le_bytes());
    put(b, 6, &0xffffu16.to_le_bytes());
    put(b, 8, &32u16.to_le_bytes());
    put(b, 32, b"4420");
    put(b, 256, subnqn);
    put(b, 512, traddr);
}

#[test]
fn discovery_log_parses_and_prints_like_nvme_discover() {
    let mut b = vec![0u8; DISCOVERY_HEADER_LEN + 2 * DISCOVERY_ENTRY_LEN];
    put(&mut b, 0, &9u64.to_le_bytes());
    put(&mut b, 8, &2u64.to_le_bytes());
    discovery_entry(
        &mut b[1024..2048],
        3,
        3,
        4,
        DISCOVERY_NQN.as_bytes(),
        b"127.0.0.1",
    );
    discovery_entry(
        &mut b[2048..],
        3,
        2,
        0,
        b"nqn.2014-08.org.example:sub",
        b"127.0.0.1",
    );
    let log = DiscoveryLog::parse(&b).unwrap();
    assert_eq!(
        log.header,
        DiscoveryHeader {
            genctr: 9,
            numrec: 2,
            recfmt: 0
        }
    );
    let e = &log.entries[1];
    assert_eq!(
        (e.portid, e.cntlid, e.asqsz, e.trsvcid.as_str()),
        (1, 0xffff, 32, "4420")
    );
    assert!(e.is_tcp());
    let expect = "\
Discovery Log Number of Records 2, Generation counter 9
=====Discovery Log Entry 0======
trtype:  tcp
adrfam:  ipv4
subtype: current discovery subsystem
treq:    not specified, sq flow control disable supported
portid:  1
trsvcid: 4420
subnqn:  nqn.2014-08.org.nvmexpress.discovery
traddr:  127.0.0.1
sectype: none
=====Discovery Log Entry 1======
trtype:  tcp
adrfam:  ipv4
subtype: nvme subsystem
treq:    not specified
portid:  1
trsvcid: 4420
subnqn:  nqn.2014-08.org.example:sub
traddr:  127.0.0.1
sectype: none
";
    assert_eq!(log.to_string(), expect);
    assert_eq!(
        DiscoveryLog::parse(&b[..2047]),
        Err(SpecError::DiscoveryTruncated {
            numrec: 2,
            available: 0
        })
    );
    put(&mut b, 8, &u64::MAX.to_le_bytes());
    assert_eq!(
        DiscoveryLog::parse(&b),
        Err(SpecError::DiscoveryTruncated {
            numrec: u64::MAX,
            available: 2
        })
    );
}

proptest::proptest! {
    #[test]
    fn parsers_never_panic_on_arbitrary_bytes(buf in proptest::collection::vec(proptest::num::u8::ANY, 0..5000)) {
        let _ = IdentifyController::parse(&buf);
        let _ = IdentifyNamespace::parse(&buf);
        let _ = ActiveNamespaces::parse(&buf);
        let _ = ChangedNamespaces::parse(&buf);
        let _ = DiscoveryLog::parse(&buf).map(|l| l.to_string());
        let _ = Nqn::new(&String::from_utf8_lossy(&buf));
    }

    #[test]
    fn a_parsed_namespace_always_has_a_usable_block_size(
        nlbaf in 0u8..64, flbas: u8, lbads: u8, index in 0usize..64,
    ) {
        let buf = namespace(nlbaf, flbas, index, lbads);
        if let Ok(ns) = IdentifyNamespace::parse(&buf) {
            proptest::prop_assert!((512..=65536).contains(&ns.block_size()));
            proptest::prop_assert!(ns.format_index() <= ns.nlbaf);
        }
    }
}
