//! Input of `nvme_tcp_rx`: what the host asked for at connection (HPDA, digests), the
//! commands' buffer lengths, and a byte stream from a controller cut into reads of arbitrary
//! sizes.

use arbitrary::Arbitrary;

use crate::encode_struct;

#[derive(Arbitrary, Clone, Debug, PartialEq, Eq)]
pub struct Input {
    pub hpda: u8,
    pub header_digest: bool,
    pub data_digest: bool,
    /// Start with a well-formed ICResp granting the requested digests, so that most runs
    /// reach the data path.
    pub valid_icresp: bool,
    /// Hand parser-owned bytes over with `feed` instead of `need` + `filled`.
    pub use_feed: bool,
    /// Buffer lengths of commands 0..4; other CCCIDs are unknown.
    pub buffers: [u16; 4],
    /// Sizes of successive reads (0 counts as 1); the rest is read whole.
    pub reads: Vec<u16>,
    pub stream: Vec<u8>,
}
encode_struct!(Input {
    hpda,
    header_digest,
    data_digest,
    valid_icresp,
    use_feed,
    buffers,
    reads,
    stream
});

const CAPSULE_RESP: u8 = 0x05;
const C2H_DATA: u8 = 0x07;
const R2T: u8 = 0x09;
const C2H_TERM_REQ: u8 = 0x03;
const LAST_PDU: u8 = 0x04;
const SUCCESS: u8 = 0x08;

/// PDUs a controller sends, built from the spec's figures (NVMe/TCP 1.0 §3.6).
struct Pdus {
    header: bool,
    data: bool,
    hpda: u8,
}

impl Pdus {
    fn common(&self, t: u8, flags: u8, pdo: u8, plen: u32) -> Vec<u8> {
        let f = flags | u8::from(self.header);
        let mut b = vec![t, f, 24, pdo];
        b.extend_from_slice(&plen.to_le_bytes());
        b
    }

    fn seal(&self, mut h: Vec<u8>) -> Vec<u8> {
        if self.header {
            let d = crc32c::crc32c(&h).to_le_bytes();
            h.extend_from_slice(&d);
        }
        h
    }

    fn hlen(&self) -> u32 {
        24 + if self.header { 4 } else { 0 }
    }

    fn capsule_resp(&self, cid: u16, sc: u8) -> Vec<u8> {
        let mut b = self.common(CAPSULE_RESP, 0, 0, self.hlen());
        let mut cqe = [0u8; 16];
        cqe[12..14].copy_from_slice(&cid.to_le_bytes());
        cqe[14..].copy_from_slice(&(u16::from(sc) << 1).to_le_bytes());
        b.extend_from_slice(&cqe);
        self.seal(b)
    }

    fn r2t(&self, cccid: u16, offset: u32, len: u32) -> Vec<u8> {
        let mut b = self.common(R2T, 0, 0, self.hlen());
        for f in [u32::from(cccid), offset, len, 0] {
            b.extend_from_slice(&f.to_le_bytes());
        }
        self.seal(b)
    }

    fn c2h_data(&self, cccid: u16, datao: u32, data: &[u8], flags: u8) -> Vec<u8> {
        let align = (u32::from(self.hpda) + 1) * 4;
        let pdo = self.hlen().next_multiple_of(align);
        let ddgst = if self.data { 4 } else { 0 };
        let plen = pdo + data.len() as u32 + ddgst;
        let flags = flags | if self.data { 2 } else { 0 };
        let mut b = self.common(C2H_DATA, flags, pdo as u8, plen);
        for v in [u32::from(cccid), datao, data.len() as u32, 0] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        let mut b = self.seal(b);
        b.resize(pdo as usize, 0);
        b.extend_from_slice(data);
        if self.data {
            b.extend_from_slice(&crc32c::crc32c(data).to_le_bytes());
        }
        b
    }

    fn term_req(&self, fes: u16) -> Vec<u8> {
        let mut b = vec![C2H_TERM_REQ, 0, 24, 0];
        b.extend_from_slice(&24u32.to_le_bytes());
        b.extend_from_slice(&fes.to_le_bytes());
        b.resize(24, 0);
        b
    }
}

/// Seeds: each PDU a controller sends, with and without digests and padding, whole or in
/// small reads, and the usual violations.
pub fn seeds() -> Vec<(&'static str, Input)> {
    let input = |hpda, header, data, stream: Vec<u8>| Input {
        hpda,
        header_digest: header,
        data_digest: data,
        valid_icresp: true,
        use_feed: false,
        buffers: [4096, 4096, 512, 0],
        reads: vec![],
        stream,
    };
    let plain = Pdus {
        header: false,
        data: false,
        hpda: 0,
    };
    let digests = Pdus {
        header: true,
        data: true,
        hpda: 3,
    };
    let block: Vec<u8> = (0..=255u8).cycle().take(512).collect();
    let read = |p: &Pdus| {
        [
            p.c2h_data(0, 0, &block, 0),
            p.c2h_data(0, 512, &block, LAST_PDU),
            p.capsule_resp(0, 0),
            p.c2h_data(1, 0, &block, LAST_PDU | SUCCESS),
        ]
        .concat()
    };
    let mut out = vec![
        (
            "capsule_resp",
            input(0, false, false, plain.capsule_resp(0, 0)),
        ),
        ("reads", input(0, false, false, read(&plain))),
        (
            "reads_with_digests_and_padding",
            input(3, true, true, read(&digests)),
        ),
        (
            "r2t_then_resp",
            input(
                0,
                false,
                false,
                [plain.r2t(1, 0, 4096), plain.capsule_resp(1, 0)].concat(),
            ),
        ),
        ("term_req", input(0, false, false, plain.term_req(1))),
        (
            "data_past_the_buffer",
            input(0, false, false, plain.c2h_data(2, 256, &block, LAST_PDU)),
        ),
        (
            "unknown_command",
            input(0, false, false, plain.c2h_data(7, 0, &block, LAST_PDU)),
        ),
        (
            "error_status",
            input(0, false, false, plain.capsule_resp(1, 0x80)),
        ),
    ];
    let mut bad = read(&digests);
    let last = bad.len() - 1;
    bad[last] ^= 1;
    out.push(("bad_data_digest", input(3, true, true, bad)));
    let mut split = input(3, true, true, read(&digests));
    split.reads = vec![1, 7, 3, 24, 1, 1, 500, 13];
    out.push(("small_reads", split.clone()));
    split.use_feed = true;
    out.push(("small_reads_fed", split));
    let mut no_ic = input(0, false, false, plain.capsule_resp(0, 0));
    no_ic.valid_icresp = false;
    out.push(("no_icresp", no_ic));
    let header_only = Pdus {
        header: true,
        data: false,
        hpda: 1,
    };
    out.push((
        "header_digest_only",
        input(
            1,
            true,
            false,
            [read(&header_only), header_only.r2t(0, 512, 512)].concat(),
        ),
    ));
    let mut bad_header = header_only.capsule_resp(0, 0);
    bad_header[24] ^= 0x80;
    out.push(("bad_header_digest", input(1, true, false, bad_header)));
    let many: Vec<u8> = (0..8u32)
        .flat_map(|i| plain.c2h_data(0, 512 * i, &block, if i == 7 { LAST_PDU } else { 0 }))
        .collect();
    out.push(("one_read_in_eight_pdus", input(0, false, false, many)));
    let mut pdo_off = plain.c2h_data(0, 0, &block, LAST_PDU);
    pdo_off[3] = 20;
    out.push(("pdo_inside_the_header", input(0, false, false, pdo_off)));
    let mut plen_short = plain.capsule_resp(0, 0);
    plen_short[4] = 16;
    out.push((
        "plen_shorter_than_the_header",
        input(0, false, false, plen_short),
    ));
    let mut overlap = [
        plain.c2h_data(1, 0, &block, 0),
        plain.c2h_data(1, 256, &block, LAST_PDU),
    ]
    .concat();
    overlap.extend(plain.capsule_resp(1, 0));
    out.push(("overlapping_data", input(0, false, false, overlap)));
    out
}
