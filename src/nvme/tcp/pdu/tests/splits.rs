//! A recorded exchange delivered in every way a socket could split it parses the same.

use super::*;

/// The controller's side of a short session: ICResp, a CapsuleResp, a read answered with two
/// C2HData PDUs (the second with SUCCESS, no CapsuleResp), an R2T, and a read whose data is
/// followed by a CapsuleResp. Returns the parser for the host side and the stream.
pub(in super::super) fn session(hpda: u8, d: Digests) -> (RxParser, Vec<u8>) {
    let dgst = u8::from(d.header) | u8::from(d.data) << 1;
    let first: Vec<u8> = (0..=255).collect();
    let second: Vec<u8> = (0..100u8).map(|i| i.wrapping_mul(3)).collect();
    let mut s = icresp(0, dgst, 8192);
    s.extend(capsule_resp(1, d));
    s.extend(c2h_data(2, 0, &first, 0, d, hpda));
    s.extend(c2h_data(
        2,
        256,
        &second,
        flags::LAST_PDU | flags::SUCCESS,
        d,
        hpda,
    ));
    s.extend(r2t(3, 0x77, 0, 4096, d));
    s.extend(c2h_data(4, 0, b"x", flags::LAST_PDU, d, hpda));
    s.extend(capsule_resp(4, d));
    (RxParser::new(&icreq(hpda, d), 64 * 1024), s)
}

fn whole(hpda: u8, d: Digests) -> Trace {
    let (mut p, s) = session(hpda, d);
    drive(&mut p, &s, &[usize::MAX])
}

fn expected_events(d: Digests) -> Vec<Result<RxEvent, PduError>> {
    let done = |cccid, last, success| {
        Ok(RxEvent::PayloadDone {
            cccid,
            last,
            success,
        })
    };
    let c2h = |cccid, datao, datal, last, success| {
        Ok(RxEvent::C2hData(C2hData {
            cccid,
            datao,
            datal,
            last,
            success,
        }))
    };
    vec![
        Ok(RxEvent::IcResp(IcResp {
            pfv: 0,
            cpda: 0,
            digests: d,
            maxh2cdata: 8192,
        })),
        Ok(RxEvent::CapsuleResp(crate::nvme::spec::Cqe::from_bytes(
            cqe_bytes(1, 0),
        ))),
        c2h(2, 0, 256, false, false),
        done(2, false, false),
        c2h(2, 256, 100, true, true),
        done(2, true, true),
        Ok(RxEvent::R2t(R2t {
            cccid: 3,
            ttag: 0x77,
            r2to: 0,
            r2tl: 4096,
        })),
        c2h(4, 0, 1, true, false),
        done(4, true, false),
        Ok(RxEvent::CapsuleResp(crate::nvme::spec::Cqe::from_bytes(
            cqe_bytes(4, 0),
        ))),
    ]
}

const VARIANTS: [(u8, Digests); 4] = [
    (0, NONE),
    (0, ALL),
    // HPDA 1: data 8-byte aligned, 4 bytes of padding after a digested header.
    (1, ALL),
    (
        7,
        Digests {
            header: false,
            data: true,
        },
    ),
];

#[test]
fn the_session_parses_to_the_expected_events_and_payload() {
    for (hpda, d) in VARIANTS {
        let t = whole(hpda, d);
        assert_eq!(t.events, expected_events(d), "hpda {hpda} {d:?}");
        let first: Vec<u8> = (0..=255).collect();
        let second: Vec<u8> = (0..100u8).map(|i| i.wrapping_mul(3)).collect();
        assert_eq!(t.buffers[&2], [first, second].concat());
        assert_eq!(t.buffers[&4], b"x");
        assert_eq!(t.consumed, session(hpda, d).1.len());
    }
}

#[test]
fn every_two_piece_split_and_byte_at_a_time_parse_the_same() {
    for (hpda, d) in VARIANTS {
        let reference = whole(hpda, d);
        let len = session(hpda, d).1.len();
        for cut in 1..len {
            let (mut p, s) = session(hpda, d);
            assert_eq!(
                drive(&mut p, &s, &[cut, usize::MAX]),
                reference,
                "cut at {cut}"
            );
        }
        let (mut p, s) = session(hpda, d);
        assert_eq!(drive(&mut p, &s, &[]), reference, "one byte at a time");
    }
}

/// The zero-copy pattern of a connection: after the payload, one read brings the data digest
/// and the next fixed-size header into a small array, which goes in through `feed`.
#[test]
fn feed_takes_trailing_digest_and_next_header_in_one_go() {
    let (mut p, s) = session(1, ALL);
    let mut pos = 0;
    let mut events = Vec::new();
    // Data bytes received per command: where its next C2HData must start.
    let mut received = BTreeMap::<u16, u32>::new();
    while pos < s.len() {
        if let RxNeed::Payload {
            cccid, remaining, ..
        } = p.need()
        {
            *received.entry(cccid).or_default() += remaining;
            let n = remaining as usize;
            if let Some(e) = p.payload_read(&s[pos..pos + n]).unwrap() {
                events.push(Ok(e));
            }
            pos += n;
            continue;
        }
        if let RxNeed::Accept { cccid, .. } = p.need() {
            let at = received.get(&cccid).copied().unwrap_or(0);
            p.accept(64 * 1024, at).unwrap();
            continue;
        }
        let tail = 4 + header_len_after_icresp(ALL);
        let end = (pos + tail).min(s.len());
        let mut small = &s[pos..end];
        while !small.is_empty() {
            let (n, r) = p.feed(small);
            if let Some(e) = r.unwrap() {
                events.push(Ok(e));
            }
            if n == 0 {
                break;
            }
            small = &small[n..];
            pos += n;
        }
    }
    assert_eq!(events, expected_events(ALL));
}
