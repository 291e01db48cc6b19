//! Test support: controller-side PDU builders written from the spec figures, and a driver
//! that feeds a byte stream to an [`RxParser`] the way a connection does, chunk by chunk.

mod props;
mod rx_errors;
mod splits;
mod tx;

use std::collections::BTreeMap;

use super::*;

pub(crate) const ALL: Digests = Digests {
    header: true,
    data: true,
};
pub(crate) const NONE: Digests = Digests {
    header: false,
    data: false,
};

pub(crate) fn icreq(hpda: u8, digests: Digests) -> IcReq {
    IcReq {
        hpda,
        digests,
        maxr2t: 0,
    }
}

fn ch(t: u8, flags: u8, hlen: u8, pdo: u8, plen: u32) -> Vec<u8> {
    let mut b = vec![t, flags, hlen, pdo];
    b.extend_from_slice(&plen.to_le_bytes());
    b
}

/// Appends the header digest if negotiated.
fn seal(mut h: Vec<u8>, d: Digests) -> Vec<u8> {
    if d.header {
        let dg = crc32c::crc32c(&h).to_le_bytes();
        h.extend_from_slice(&dg);
    }
    h
}

pub(crate) fn icresp(cpda: u8, dgst: u8, maxh2cdata: u32) -> Vec<u8> {
    let mut b = ch(pdu_type::ICRESP, 0, 128, 0, 128);
    b.extend_from_slice(&[0, 0, cpda, dgst]);
    b.extend_from_slice(&maxh2cdata.to_le_bytes());
    b.resize(128, 0);
    b
}

pub(crate) fn cqe_bytes(cid: u16, sc: u8) -> [u8; 16] {
    let mut c = [0u8; 16];
    c[0..4].copy_from_slice(&0xdead_beefu32.to_le_bytes());
    c[12..14].copy_from_slice(&cid.to_le_bytes());
    c[14..16].copy_from_slice(&(u16::from(sc) << 1).to_le_bytes());
    c
}

pub(crate) fn capsule_resp(cid: u16, d: Digests) -> Vec<u8> {
    let plen = 24 + if d.header { 4 } else { 0 };
    let mut b = ch(
        pdu_type::CAPSULE_RESP,
        if d.header { 1 } else { 0 },
        24,
        0,
        plen,
    );
    b.extend_from_slice(&cqe_bytes(cid, 0));
    seal(b, d)
}

pub(crate) fn r2t(cccid: u16, ttag: u16, r2to: u32, r2tl: u32, d: Digests) -> Vec<u8> {
    let plen = 24 + if d.header { 4 } else { 0 };
    let mut b = ch(pdu_type::R2T, if d.header { 1 } else { 0 }, 24, 0, plen);
    for f in [u32::from(cccid) | u32::from(ttag) << 16, r2to, r2tl, 0] {
        b.extend_from_slice(&f.to_le_bytes());
    }
    seal(b, d)
}

/// A whole C2HData PDU: header, digest, padding to a `(hpda + 1) * 4` aligned PDO, data,
/// data digest.
pub(crate) fn c2h_data(
    cccid: u16,
    datao: u32,
    data: &[u8],
    flags: u8,
    d: Digests,
    hpda: u8,
) -> Vec<u8> {
    let header: usize = 24 + if d.header { 4 } else { 0 };
    let align = (usize::from(hpda) + 1) * 4;
    let pdo = header.next_multiple_of(align);
    let ddgst = if d.data { 4 } else { 0 };
    let plen = (pdo + data.len() + ddgst) as u32;
    let f = flags | if d.header { 1 } else { 0 } | if d.data { 2 } else { 0 };
    let mut b = ch(pdu_type::C2H_DATA, f, 24, pdo as u8, plen);
    for v in [u32::from(cccid), datao, data.len() as u32, 0] {
        b.extend_from_slice(&v.to_le_bytes());
    }
    let mut b = seal(b, d);
    b.resize(pdo, 0);
    b.extend_from_slice(data);
    if d.data {
        b.extend_from_slice(&crc32c::crc32c(data).to_le_bytes());
    }
    b
}

pub(crate) fn c2h_term_req(fes: u16, fei: u32, data: &[u8]) -> Vec<u8> {
    let mut b = ch(pdu_type::C2H_TERM_REQ, 0, 24, 0, 24 + data.len() as u32);
    b.extend_from_slice(&fes.to_le_bytes());
    b.extend_from_slice(&fei.to_le_bytes());
    b.resize(24, 0);
    b.extend_from_slice(data);
    b
}

/// What a connection observes.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Trace {
    /// Events and errors in order; a fatal error is the last entry.
    pub events: Vec<Result<RxEvent, PduError>>,
    /// Payload written into each command's buffer.
    pub buffers: BTreeMap<u16, Vec<u8>>,
    /// Bytes of the stream consumed.
    pub consumed: usize,
}

/// Buffer length of command `cccid` in the driver's command table: 0..=9 exist.
pub(super) fn buffer_len(cccid: u16) -> Option<u32> {
    (cccid < 10).then_some(64 * 1024)
}

/// Feeds `stream` to `p` as reads that return at most `chunks[i]` bytes each (then one byte
/// at a time), as a connection would: parser-owned bytes straight into the buffers
/// [`RxParser::need`] lends, payload into the command's buffer. Stops at the end of the
/// stream, at a fatal error, or when the stream is closed.
pub(super) fn drive(p: &mut RxParser, stream: &[u8], chunks: &[usize]) -> Trace {
    let mut t = Trace::default();
    let mut pos = 0;
    let mut chunk = 0;
    let mut avail = 0;
    // Data range announced by the C2HData being received.
    let mut announced = (0u64, 0u64);
    // Data bytes received per command: where its next C2HData must start.
    let mut received = BTreeMap::<u16, u32>::new();
    loop {
        if avail == 0 {
            if pos == stream.len() {
                break;
            }
            avail = chunks
                .get(chunk)
                .copied()
                .unwrap_or(1)
                .clamp(1, stream.len() - pos);
            chunk += 1;
        }
        let outcome = match p.need() {
            RxNeed::Header { buf } | RxNeed::Padding { buf } | RxNeed::DataDigest { buf } => {
                let n = buf.len().min(avail);
                buf[..n].copy_from_slice(&stream[pos..pos + n]);
                pos += n;
                avail -= n;
                p.filled(n)
            }
            RxNeed::Accept {
                cccid,
                datao,
                datal,
            } => match buffer_len(cccid) {
                Some(len) => {
                    announced = (u64::from(datao), u64::from(datao) + u64::from(datal));
                    let at = received.get(&cccid).copied().unwrap_or(0);
                    p.accept(len, at).map(|()| None)
                }
                None => Err(p.reject()),
            },
            RxNeed::Payload {
                cccid,
                offset,
                remaining,
            } => {
                let n = (remaining as usize).min(avail);
                *received.entry(cccid).or_default() += n as u32;
                let range = u64::from(offset)..u64::from(offset) + n as u64;
                assert!(
                    announced.0 <= range.start && range.end <= announced.1,
                    "payload {range:?} outside the announced {announced:?}"
                );
                let data = &stream[pos..pos + n];
                let buf = t.buffers.entry(cccid).or_default();
                let end = offset as usize + n;
                assert!(
                    end <= buffer_len(cccid).unwrap() as usize,
                    "payload past the buffer"
                );
                if buf.len() < end {
                    buf.resize(end, 0);
                }
                buf[offset as usize..end].copy_from_slice(data);
                pos += n;
                avail -= n;
                p.payload_read(data)
            }
            RxNeed::Closed => break,
        };
        match outcome {
            Ok(Some(e)) => t.events.push(Ok(e)),
            Ok(None) => {}
            Err(e) => {
                t.events.push(Err(e));
                if e.is_fatal() {
                    break;
                }
            }
        }
    }
    t.consumed = pos;
    t
}
