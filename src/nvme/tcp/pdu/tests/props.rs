//! Property tests: random splits, round trips through the encoders, arbitrary input.

use proptest::prelude::*;

use super::splits::session;
use super::*;

fn digests() -> impl Strategy<Value = Digests> {
    (any::<bool>(), any::<bool>()).prop_map(|(header, data)| Digests { header, data })
}

proptest! {
    #[test]
    fn random_splits_parse_like_the_whole_stream(
        hpda in 0u8..8,
        d in digests(),
        chunks in prop::collection::vec(1usize..64, 0..200),
    ) {
        let (mut p, s) = session(hpda, d);
        let reference = drive(&mut p, &s, &[usize::MAX]);
        let (mut p, s) = session(hpda, d);
        prop_assert_eq!(drive(&mut p, &s, &chunks), reference);
    }

    /// H2CData and C2HData share a layout (§3.6.2.7-8): an H2CData header built by the
    /// encoder, retyped, must parse back to the same fields, digests and padding included.
    #[test]
    fn h2c_data_encoding_round_trips_through_the_parser(
        pda in 0u8..=31,
        d in digests(),
        cccid in 0u16..10,
        datao in 0u32..1024,
        data in prop::collection::vec(any::<u8>(), 1..600),
        last: bool,
    ) {
        let granted = IcResp { pfv: 0, cpda: pda, digests: d, maxh2cdata: 8192 };
        let pdu = H2cData { cccid, ttag: 0, datao, datal: data.len() as u32, last };
        let mut hdr = [0; TX_HEADER_MAX];
        let n = encode_h2c_data(&mut hdr, &pdu, &granted);
        hdr[0] = pdu_type::C2H_DATA;
        if d.header {
            let dg = header_digest(&hdr[..SHORT_HLEN]);
            hdr[SHORT_HLEN..SHORT_HLEN + 4].copy_from_slice(&dg);
        }
        let mut stream = icresp(pda, u8::from(d.header) | u8::from(d.data) << 1, 8192);
        // The data before DATAO comes first: a command's data arrives in order.
        if datao > 0 {
            stream.extend(c2h_data(cccid, 0, &vec![0; datao as usize], 0, d, pda));
        }
        stream.extend_from_slice(&hdr[..n]);
        stream.extend_from_slice(&data);
        if d.data {
            let mut dd = DataDigest::new();
            dd.update(&data);
            stream.extend_from_slice(&dd.finish());
        }
        let mut p = RxParser::new(&icreq(pda, d), 4096);
        let t = drive(&mut p, &stream, &[usize::MAX]);
        let c2h = C2hData { cccid, datao, datal: data.len() as u32, last, success: false };
        prop_assert_eq!(t.events.len(), if datao > 0 { 5 } else { 3 });
        prop_assert_eq!(&t.events[t.events.len() - 2..], &[
            Ok(RxEvent::C2hData(c2h)),
            Ok(RxEvent::PayloadDone { cccid, last, success: false }),
        ]);
        prop_assert_eq!(&t.buffers[&cccid][datao as usize..], &data[..]);
        prop_assert_eq!(t.consumed, stream.len());
    }

    #[test]
    fn capsule_cmd_plen_counts_header_padding_data_and_digest(
        pda in 0u8..=31,
        d in digests(),
        data_len in 0u32..100_000,
    ) {
        let granted = IcResp { pfv: 0, cpda: pda, digests: d, maxh2cdata: 8192 };
        let mut hdr = [0; TX_HEADER_MAX];
        let sqe = crate::nvme::spec::Sqe::write(1, 0, 0, false);
        let n = encode_capsule_cmd(&mut hdr, &sqe, data_len, &granted);
        let plen = u32::from_le_bytes(hdr[4..8].try_into().unwrap());
        let ddgst = if d.data && data_len > 0 { 4 } else { 0 };
        prop_assert_eq!(plen as usize, n + data_len as usize + ddgst);
        if data_len > 0 {
            prop_assert_eq!(usize::from(hdr[3]), n);
            prop_assert_eq!(n % ((usize::from(pda) + 1) * 4), 0);
        } else {
            prop_assert_eq!(hdr[3], 0);
        }
        prop_assert_eq!(hdr[1] & flags::HDGSTF != 0, d.header);
        prop_assert_eq!(hdr[1] & flags::DDGSTF != 0, ddgst > 0);
    }

    /// Garbage never panics, payload never exceeds what a header announced, and only
    /// accepted C2HData carries payload.
    #[test]
    fn arbitrary_bytes_yield_only_errors_or_consistent_events(
        hpda in 0u8..=31,
        d in digests(),
        prefix_icresp: bool,
        body in prop::collection::vec(any::<u8>(), 0..2048),
        chunks in prop::collection::vec(1usize..300, 0..20),
    ) {
        let mut stream = Vec::new();
        if prefix_icresp {
            stream = icresp(0, u8::from(d.header) | u8::from(d.data) << 1, 8192);
        }
        stream.extend_from_slice(&body);
        let mut p = RxParser::new(&icreq(hpda, d), 4096);
        let t = drive(&mut p, &stream, &chunks);
        prop_assert!(t.consumed <= stream.len());
        let mut announced: Option<C2hData> = None;
        for e in &t.events {
            match e {
                Ok(RxEvent::C2hData(c)) => {
                    prop_assert!(c.datal > 0 && c.datal <= 4096);
                    prop_assert!(!c.success || c.last);
                    announced = Some(*c);
                }
                Ok(RxEvent::PayloadDone { cccid, .. }) => {
                    prop_assert_eq!(announced.take().map(|c| c.cccid), Some(*cccid));
                }
                Ok(RxEvent::IcResp(r)) => {
                    prop_assert!(r.maxh2cdata >= 4096 && r.maxh2cdata % 4 == 0 && r.cpda <= 31);
                }
                _ => {}
            }
        }
        for (cccid, buf) in &t.buffers {
            prop_assert!(buf.len() <= buffer_len(*cccid).unwrap() as usize);
        }
    }
}
