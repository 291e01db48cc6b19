//! Encoders against bytes laid out by hand from the NVMe/TCP 1.0 figures.

use super::*;
use crate::nvme::spec::Sqe;

fn params(cpda: u8, digests: Digests) -> IcResp {
    IcResp {
        pfv: 0,
        cpda,
        digests,
        maxh2cdata: 8192,
    }
}

#[test]
fn icreq_is_128_bytes_with_pfv_hpda_dgst_maxr2t() {
    let b = IcReq {
        hpda: 2,
        digests: Digests {
            header: true,
            data: false,
        },
        maxr2t: 3,
    }
    .encode();
    assert_eq!(
        b[..16],
        [0x00, 0, 128, 0, 128, 0, 0, 0, 0, 0, 2, 0b01, 3, 0, 0, 0]
    );
    assert!(b[16..].iter().all(|&c| c == 0));
    let b = IcReq {
        hpda: 200,
        digests: ALL,
        maxr2t: 0,
    }
    .encode();
    assert_eq!((b[10], b[11]), (31, 0b11), "HPDA is capped at 31");
}

#[test]
fn capsule_cmd_without_data_is_ch_and_sqe() {
    let mut sqe = Sqe::flush(1);
    sqe.set_cid(7);
    let mut out = [0xaa; TX_HEADER_MAX];
    let n = encode_capsule_cmd(&mut out, &sqe, 0, &params(0, NONE));
    assert_eq!(n, 72);
    assert_eq!(out[..8], [0x04, 0, 72, 0, 72, 0, 0, 0]);
    assert_eq!(out[8..72], *sqe.as_bytes());
    // A header digest but no data: HDGSTF only, PLEN 76, PDO 0.
    let n = encode_capsule_cmd(&mut out, &sqe, 0, &params(0, ALL));
    assert_eq!(n, 76);
    assert_eq!(out[..8], [0x04, 0x01, 72, 0, 76, 0, 0, 0]);
    assert_eq!(out[72..76], crc32c::crc32c(&out[..72]).to_le_bytes());
}

#[test]
fn capsule_cmd_with_data_and_digests_places_data_after_the_header_digest() {
    let sqe = Sqe::write(1, 0, 0, false);
    let mut out = [0; TX_HEADER_MAX];
    let n = encode_capsule_cmd(&mut out, &sqe, 512, &params(0, ALL));
    // PDO 76, PLEN 76 + 512 + 4 = 592.
    assert_eq!(n, 76);
    assert_eq!(out[..8], [0x04, 0x03, 72, 76, 0x50, 0x02, 0, 0]);
    assert_eq!(out[72..76], crc32c::crc32c(&out[..72]).to_le_bytes());
}

#[test]
fn capsule_cmd_pads_data_to_cpda() {
    let sqe = Sqe::write(1, 0, 0, false);
    let mut out = [0xaa; TX_HEADER_MAX];
    // CPDA 3: 16-byte alignment, PDO 80, PLEN 180.
    let n = encode_capsule_cmd(&mut out, &sqe, 100, &params(3, NONE));
    assert_eq!(n, 80);
    assert_eq!(out[..8], [0x04, 0, 72, 80, 180, 0, 0, 0]);
    assert_eq!(out[72..80], [0; 8]);
    // CPDA 31: 128-byte alignment.
    let n = encode_capsule_cmd(&mut out, &sqe, 1, &params(31, ALL));
    assert_eq!((n, out[3]), (128, 128));
    assert_eq!(out[4..8], (128u32 + 1 + 4).to_le_bytes());
    // CPDA 17: 72-byte alignment, the longest header.
    let n = encode_capsule_cmd(&mut out, &sqe, 1, &params(17, ALL));
    assert_eq!((n, out[3]), (TX_HEADER_MAX, 144));
}

#[test]
fn h2c_data_header_layout() {
    let mut out = [0; TX_HEADER_MAX];
    let pdu = H2cData {
        cccid: 5,
        ttag: 9,
        datao: 4096,
        datal: 4096,
        last: true,
    };
    let n = encode_h2c_data(&mut out, &pdu, &params(0, NONE));
    assert_eq!(n, 24);
    #[rustfmt::skip]
    assert_eq!(out[..24], [
        0x06, 0x04, 24, 24, 0x18, 0x10, 0, 0,
        5, 0, 9, 0, 0, 0x10, 0, 0,
        0, 0x10, 0, 0, 0, 0, 0, 0,
    ]);
    let pdu = H2cData { last: false, ..pdu };
    let n = encode_h2c_data(&mut out, &pdu, &params(0, ALL));
    assert_eq!(n, 28);
    // PDO 28, PLEN 28 + 4096 + 4.
    assert_eq!(out[..8], [0x06, 0x03, 24, 28, 0x20, 0x10, 0, 0]);
    assert_eq!(out[24..28], crc32c::crc32c(&out[..24]).to_le_bytes());
}

#[test]
fn h2c_term_req_carries_fes_fei_and_at_most_128_header_bytes() {
    let mut out = [0; TERM_REQ_MAX_PLEN];
    let header: Vec<u8> = (0..24).collect();
    let n = encode_h2c_term_req(&mut out, Fes::InvalidHeaderField, 2, &header);
    assert_eq!(n, 48);
    assert_eq!(out[..14], [0x02, 0, 24, 0, 48, 0, 0, 0, 1, 0, 2, 0, 0, 0]);
    assert_eq!(out[14..24], [0; 10]);
    assert_eq!(out[24..48], header[..]);
    let n = encode_h2c_term_req(&mut out, Fes::HeaderDigestError, 0, &[0x55; 200]);
    assert_eq!(n, 152);
    assert_eq!(out[4..10], [152, 0, 0, 0, 3, 0]);
    assert!(out[24..152].iter().all(|&c| c == 0x55));
}

#[test]
fn digests_are_crc32c_little_endian_and_incremental() {
    // The CRC-32C check value (RFC 3720 B.4).
    assert_eq!(header_digest(b"123456789"), 0xe306_9283u32.to_le_bytes());
    let mut d = DataDigest::new();
    d.update(b"1234");
    d.update(b"");
    d.update(b"56789");
    assert_eq!(d.finish(), 0xe306_9283u32.to_le_bytes());
}

#[test]
fn errors_map_to_termination_requests() {
    let cases = [
        (
            PduError::InvalidType { pdu_type: 8 },
            Some((Fes::InvalidHeaderField, 0)),
        ),
        (
            PduError::BeforeIcResp { pdu_type: 5 },
            Some((Fes::PduSequenceError, 0)),
        ),
        (
            PduError::HeaderLength {
                pdu_type: 5,
                hlen: 25,
            },
            Some((Fes::InvalidHeaderField, 2)),
        ),
        (
            PduError::DataOffset { pdo: 3 },
            Some((Fes::InvalidHeaderField, 3)),
        ),
        (
            PduError::PduLength { plen: 1 },
            Some((Fes::InvalidHeaderField, 4)),
        ),
        (
            PduError::HeaderDigest {
                received: 1,
                computed: 2,
            },
            Some((Fes::HeaderDigestError, 0)),
        ),
        (
            PduError::ZeroDataLength,
            Some((Fes::InvalidHeaderField, 16)),
        ),
        (
            PduError::UnsupportedPfv { pfv: 1 },
            Some((Fes::UnsupportedParameter, 8)),
        ),
        (
            PduError::MaxH2cData { maxh2cdata: 1 },
            Some((Fes::InvalidHeaderField, 12)),
        ),
        (
            PduError::DataOutOfRange {
                cccid: 1,
                offset: 0,
                len: 9,
                buffer_len: 8,
            },
            Some((Fes::DataOutOfRange, 0)),
        ),
        (
            PduError::R2tLimitExceeded { cccid: 1 },
            Some((Fes::LimitExceeded, 0)),
        ),
        (
            PduError::DataDigest {
                cccid: 1,
                received: 1,
                computed: 2,
            },
            None,
        ),
    ];
    for (e, t) in cases {
        assert_eq!(e.term_req(), t, "{e}");
        assert_eq!(e.is_fatal(), t.is_some(), "{e}");
    }
}
