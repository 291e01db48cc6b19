//! Every receive-side check, each against a stream that breaks only it.

use super::*;

const MAX_DATA: u32 = 64 * 1024;

fn run(req: IcReq, stream: &[u8]) -> Trace {
    drive(&mut RxParser::new(&req, MAX_DATA), stream, &[usize::MAX])
}

/// ICResp granting `d`, then `rest`.
fn after_icresp(d: Digests, rest: &[u8]) -> Vec<u8> {
    let mut s = icresp(0, u8::from(d.header) | u8::from(d.data) << 1, 8192);
    s.extend_from_slice(rest);
    s
}

/// `set`, then a header digest recomputed over the changed header.
fn reseal(pdu: Vec<u8>, off: usize, bytes: &[u8]) -> Vec<u8> {
    let mut pdu = set(pdu, off, bytes);
    let dg = crc32c::crc32c(&pdu[..24]).to_le_bytes();
    pdu[24..28].copy_from_slice(&dg);
    pdu
}

fn set(mut pdu: Vec<u8>, off: usize, bytes: &[u8]) -> Vec<u8> {
    pdu[off..off + bytes.len()].copy_from_slice(bytes);
    pdu
}

#[test]
fn each_malformed_pdu_is_refused_with_its_own_error() {
    use PduError::*;
    let plain = icreq(0, NONE);
    let dg = icreq(0, ALL);
    let aligned = icreq(1, NONE);
    let data = [7u8; 16];
    let c2h = |f: u8| c2h_data(1, 0, &data, f, NONE, 0);
    let cases: Vec<(&str, IcReq, Vec<u8>, PduError)> = vec![
        (
            "unknown type",
            plain,
            set(icresp(0, 0, 8192), 0, &[0x08]),
            InvalidType { pdu_type: 8 },
        ),
        (
            "host type",
            plain,
            set(icresp(0, 0, 8192), 0, &[0x04]),
            InvalidType { pdu_type: 4 },
        ),
        (
            "resp first",
            plain,
            capsule_resp(1, NONE),
            BeforeIcResp { pdu_type: 5 },
        ),
        (
            "r2t first",
            plain,
            r2t(1, 1, 0, 8, NONE),
            BeforeIcResp { pdu_type: 9 },
        ),
        (
            "icresp twice",
            plain,
            after_icresp(NONE, &icresp(0, 0, 8192)),
            IcRespAgain,
        ),
        (
            "icresp hlen",
            plain,
            set(icresp(0, 0, 8192), 2, &[127]),
            HeaderLength {
                pdu_type: 1,
                hlen: 127,
            },
        ),
        (
            "icresp plen",
            plain,
            set(icresp(0, 0, 8192), 4, &[129]),
            PduLength { plen: 129 },
        ),
        (
            "icresp pdo",
            plain,
            set(icresp(0, 0, 8192), 3, &[8]),
            DataOffset { pdo: 8 },
        ),
        (
            "pfv",
            plain,
            set(icresp(0, 0, 8192), 8, &[1]),
            UnsupportedPfv { pfv: 1 },
        ),
        ("cpda", plain, icresp(32, 0, 8192), Cpda { cpda: 32 }),
        (
            "hdgst not asked",
            plain,
            icresp(0, 1, 8192),
            DigestNotRequested { dgst: 1 },
        ),
        (
            "ddgst not asked",
            icreq(
                0,
                Digests {
                    header: true,
                    data: false,
                },
            ),
            icresp(0, 3, 8192),
            DigestNotRequested { dgst: 3 },
        ),
        (
            "dgst reserved bits",
            dg,
            icresp(0, 4, 8192),
            DigestNotRequested { dgst: 4 },
        ),
        (
            "maxh2cdata small",
            plain,
            icresp(0, 0, 4092),
            MaxH2cData { maxh2cdata: 4092 },
        ),
        (
            "maxh2cdata unaligned",
            plain,
            icresp(0, 0, 8194),
            MaxH2cData { maxh2cdata: 8194 },
        ),
        (
            "resp hlen",
            plain,
            after_icresp(NONE, &set(capsule_resp(1, NONE), 2, &[28])),
            HeaderLength {
                pdu_type: 5,
                hlen: 28,
            },
        ),
        (
            "resp pdo",
            plain,
            after_icresp(NONE, &set(capsule_resp(1, NONE), 3, &[24])),
            DataOffset { pdo: 24 },
        ),
        (
            "resp plen",
            plain,
            after_icresp(NONE, &set(capsule_resp(1, NONE), 4, &[25])),
            PduLength { plen: 25 },
        ),
        (
            "hdgstf missing",
            dg,
            after_icresp(ALL, &reseal(capsule_resp(1, ALL), 1, &[0])),
            DigestFlags { flags: 0 },
        ),
        (
            "hdgstf unexpected",
            plain,
            after_icresp(NONE, &set(capsule_resp(1, NONE), 1, &[1])),
            DigestFlags { flags: 1 },
        ),
        (
            "ddgstf on resp",
            dg,
            after_icresp(ALL, &reseal(capsule_resp(1, ALL), 1, &[3])),
            DigestFlags { flags: 3 },
        ),
        (
            "ddgstf missing",
            dg,
            after_icresp(ALL, &reseal(c2h_data(1, 0, &data, 0, ALL, 0), 1, &[1])),
            DigestFlags { flags: 1 },
        ),
        (
            "r2tl zero",
            plain,
            after_icresp(NONE, &r2t(1, 1, 0, 0, NONE)),
            ZeroDataLength,
        ),
        (
            "datal zero",
            plain,
            after_icresp(NONE, &c2h_data(1, 0, &[], 0, NONE, 0)),
            ZeroDataLength,
        ),
        (
            "datal too long",
            plain,
            after_icresp(NONE, &set(c2h(0), 16, &(MAX_DATA + 1).to_le_bytes())),
            DataTooLong {
                datal: MAX_DATA + 1,
                max: MAX_DATA,
            },
        ),
        (
            "c2h pdo below header",
            plain,
            after_icresp(NONE, &set(c2h(0), 3, &[20])),
            DataOffset { pdo: 20 },
        ),
        (
            "c2h pdo past digest",
            dg,
            after_icresp(ALL, &reseal(c2h_data(1, 0, &data, 0, ALL, 0), 3, &[24])),
            DataOffset { pdo: 24 },
        ),
        (
            "c2h pdo unaligned",
            aligned,
            after_icresp(NONE, &set(c2h_data(1, 0, &data, 0, NONE, 1), 3, &[28])),
            DataOffset { pdo: 28 },
        ),
        (
            "c2h plen",
            plain,
            after_icresp(NONE, &set(c2h(0), 4, &[24 + 15])),
            PduLength { plen: 39 },
        ),
        (
            "c2h plen without ddgst",
            dg,
            after_icresp(
                ALL,
                &reseal(c2h_data(1, 0, &data, 0, ALL, 0), 4, &[28 + 16]),
            ),
            PduLength { plen: 44 },
        ),
        (
            "success alone",
            plain,
            after_icresp(NONE, &c2h(flags::SUCCESS)),
            SuccessWithoutLast,
        ),
        (
            "term req hlen",
            plain,
            set(c2h_term_req(1, 0, &[]), 2, &[28]),
            HeaderLength {
                pdu_type: 3,
                hlen: 28,
            },
        ),
        (
            "term req plen",
            plain,
            set(c2h_term_req(1, 0, &[]), 4, &[153]),
            PduLength { plen: 153 },
        ),
        (
            "term req short",
            plain,
            set(c2h_term_req(1, 0, &[]), 4, &[23]),
            PduLength { plen: 23 },
        ),
        (
            "unknown command",
            plain,
            after_icresp(NONE, &c2h_data(10, 0, &data, 0, NONE, 0)),
            UnknownCommand { cccid: 10 },
        ),
        (
            "data not at the start of the command's buffer",
            plain,
            after_icresp(NONE, &c2h_data(1, 8, &data, 0, NONE, 0)),
            DataOutOfOrder {
                cccid: 1,
                offset: 8,
                expected: 0,
            },
        ),
        (
            "data past the buffer",
            plain,
            after_icresp(NONE, &c2h_data(1, 64 * 1024 - 8, &data, 0, NONE, 0)),
            DataOutOfRange {
                cccid: 1,
                offset: 64 * 1024 - 8,
                len: 16,
                buffer_len: 64 * 1024,
            },
        ),
    ];
    for (name, req, stream, err) in cases {
        let t = run(req, &stream);
        assert_eq!(t.events.last(), Some(&Err(err)), "{name}: {:?}", t.events);
    }
}

#[test]
fn header_digest_mismatch_is_fatal() {
    let mut resp = capsule_resp(1, ALL);
    resp[27] ^= 1;
    let received = u32::from_le_bytes(resp[24..28].try_into().unwrap());
    let computed = crc32c::crc32c(&resp[..24]);
    let t = run(icreq(0, ALL), &after_icresp(ALL, &resp));
    assert_eq!(
        t.events.last(),
        Some(&Err(PduError::HeaderDigest { received, computed }))
    );
}

#[test]
fn data_digest_mismatch_fails_the_pdu_but_the_stream_goes_on() {
    let mut pdu = c2h_data(3, 0, b"payload!", flags::LAST_PDU, ALL, 0);
    let n = pdu.len();
    pdu[n - 1] ^= 0xff;
    let received = u32::from_le_bytes(pdu[n - 4..].try_into().unwrap());
    let mut rest = pdu;
    rest.extend(capsule_resp(3, ALL));
    let stream = after_icresp(ALL, &rest);
    let t = run(icreq(0, ALL), &stream);
    let err = PduError::DataDigest {
        cccid: 3,
        received,
        computed: crc32c::crc32c(b"payload!"),
    };
    assert!(!err.is_fatal());
    assert_eq!(t.events[2], Err(err));
    assert!(matches!(t.events[3], Ok(RxEvent::CapsuleResp(c)) if c.cid() == 3));
    assert_eq!(t.consumed, stream.len());
}

#[test]
fn a_fatal_error_sticks_and_keeps_the_header_for_the_termination_request() {
    let bad = set(icresp(0, 0, 8192), 8, &[1]);
    let mut p = RxParser::new(&icreq(0, NONE), MAX_DATA);
    let t = drive(&mut p, &bad, &[usize::MAX]);
    let err = PduError::UnsupportedPfv { pfv: 1 };
    assert_eq!(t.events, vec![Err(err)]);
    assert_eq!(p.need(), RxNeed::Closed);
    assert_eq!(p.filled(0), Err(err));
    assert_eq!(p.feed(&[0; 8]), (0, Err(err)));
    assert_eq!(p.payload_read(&[]), Err(err));
    assert_eq!(p.header_in_error(), &bad[..]);
}

#[test]
fn c2h_term_req_ends_the_stream() {
    let mut s = after_icresp(ALL, &c2h_term_req(2, 0, &[1, 2, 3, 4, 5, 6]));
    s.extend(capsule_resp(1, ALL));
    let mut p = RxParser::new(&icreq(0, ALL), MAX_DATA);
    let t = drive(&mut p, &s, &[usize::MAX]);
    assert_eq!(t.events[1], Ok(RxEvent::C2hTermReq { fes: 2, fei: 0 }));
    assert_eq!(t.events.len(), 2);
    assert_eq!(p.need(), RxNeed::Closed);
    // Also before ICResp, as a reply to a refused ICReq.
    let t = run(icreq(0, NONE), &c2h_term_req(6, 11, &[0; 128]));
    assert_eq!(t.events, vec![Ok(RxEvent::C2hTermReq { fes: 6, fei: 11 })]);
}

#[test]
fn r2t_range_is_checked_against_the_command_buffer() {
    let r = R2t {
        cccid: 4,
        ttag: 1,
        r2to: 4096,
        r2tl: 4096,
    };
    assert_eq!(r.check_range(8192), Ok(()));
    assert_eq!(
        r.check_range(8191),
        Err(PduError::DataOutOfRange {
            cccid: 4,
            offset: 4096,
            len: 4096,
            buffer_len: 8191
        })
    );
    let huge = R2t {
        r2to: u32::MAX,
        ..r
    };
    assert!(huge.check_range(u32::MAX).is_err());
}
