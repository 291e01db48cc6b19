//! The controller's side of the NVMe/TCP wire (NVMe/TCP 1.0 §3.6): framing and checking the
//! PDUs a host sends, encoding those a controller sends, and the batch of bytes that one
//! `writev` sends.
//!
//! Everything a host sends is checked here before it reaches the connection's state machine:
//! PDU type against the connection's state, HLEN, PLEN against the negotiated limits, digest
//! flags, header and data digests, PDO alignment. Each violation is a [`WireError`] that knows
//! the FES / FEI of the C2HTermReq reporting it.

use std::io::{self, IoSlice, Write};

use thiserror::Error;
use vubd::nvme::tcp::pdu::{
    CAPSULE_CMD_HLEN, CH_LEN, DIGEST_LEN, DataDigest, Digests, Fes, IC_LEN, SHORT_HLEN,
    TERM_REQ_MAX_DATA, TERM_REQ_MAX_PLEN, flags, header_digest, pdu_type,
};

/// Zeros sent for the reads of a null namespace, without copying them.
static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];

/// A PDU type no version of the transport defines, for [`super::Fault::GarbagePdu`].
const GARBAGE_TYPE: u8 = 0x0a;

/// Why a PDU from the host was refused. All are fatal: the connection sends a C2HTermReq
/// ([`WireError::term_req`]) and closes.
#[derive(Clone, Copy, Debug, Error, PartialEq, Eq)]
pub(super) enum WireError {
    #[error("PDU type {0:#04x} is not one a controller receives")]
    Type(u8),
    #[error("PDU type {0:#04x} out of sequence")]
    Sequence(u8),
    #[error("HLEN {hlen} wrong for PDU type {pdu_type:#04x}")]
    HeaderLength { pdu_type: u8, hlen: u8 },
    #[error("PDO {0} inconsistent with the header and CPDA")]
    DataOffset(u8),
    #[error("PLEN {0} inconsistent with the header")]
    PduLength(u32),
    #[error("PLEN {0} exceeds what the connection accepts")]
    TooLong(u32),
    #[error("digest flags {0:#04x} differ from those negotiated")]
    DigestFlags(u8),
    #[error("header digest mismatch")]
    HeaderDigest,
    #[error("data digest mismatch")]
    DataDigest,
    #[error("PDU format version {0}")]
    Pfv(u16),
    #[error("HPDA {0} out of range")]
    Hpda(u8),
    #[error("H2CData DATAL {0} differs from its payload")]
    DataLength(u32),
    #[error("H2CData with TTAG {0} that no R2T gave")]
    Ttag(u16),
    #[error("H2CData for command {0}, not the one its R2T was for")]
    Cccid(u16),
    #[error("H2CData at offset {0}, not where the previous one ended")]
    DataOrder(u32),
    #[error("H2CData {datao}+{datal} beyond the R2T's {r2tl} bytes")]
    DataRange { datao: u32, datal: u32, r2tl: u32 },
    #[error("H2CData of {0} bytes exceeds MAXH2CDATA")]
    DataLimit(u32),
    #[error("LAST_PDU flag inconsistent with the data still expected")]
    LastFlag,
}

impl WireError {
    /// FES and FEI of the C2HTermReq reporting this error (NVMe/TCP 1.0 Figure 20).
    pub(super) fn term_req(&self) -> (Fes, u32) {
        match *self {
            WireError::Type(_) => (Fes::InvalidHeaderField, 0),
            WireError::Sequence(_) => (Fes::PduSequenceError, 0),
            WireError::HeaderLength { .. } => (Fes::InvalidHeaderField, 2),
            WireError::DataOffset(_) => (Fes::InvalidHeaderField, 3),
            WireError::PduLength(_) => (Fes::InvalidHeaderField, 4),
            WireError::TooLong(_) | WireError::DataLimit(_) => (Fes::LimitExceeded, 0),
            WireError::DigestFlags(_) | WireError::LastFlag => (Fes::InvalidHeaderField, 1),
            WireError::HeaderDigest | WireError::DataDigest => (Fes::HeaderDigestError, 0),
            WireError::Pfv(_) => (Fes::UnsupportedParameter, 8),
            WireError::Hpda(_) => (Fes::InvalidHeaderField, 10),
            WireError::DataLength(_) => (Fes::InvalidHeaderField, 16),
            WireError::Ttag(_) => (Fes::InvalidHeaderField, 10),
            WireError::Cccid(_) => (Fes::InvalidHeaderField, 8),
            WireError::DataOrder(_) => (Fes::PduSequenceError, 12),
            WireError::DataRange { .. } => (Fes::DataOutOfRange, 0),
        }
    }
}

fn le16(b: &[u8], off: usize) -> u16 {
    b.get(off..off + 2)
        .and_then(|s| s.try_into().ok())
        .map_or(0, u16::from_le_bytes)
}

fn le32(b: &[u8], off: usize) -> u32 {
    b.get(off..off + 4)
        .and_then(|s| s.try_into().ok())
        .map_or(0, u32::from_le_bytes)
}

fn le64(b: &[u8], off: usize) -> u64 {
    b.get(off..off + 8)
        .and_then(|s| s.try_into().ok())
        .map_or(0, u64::from_le_bytes)
}

/// A submission queue entry as received (NVMe Base 2.0 Figure 88).
#[derive(Clone, Copy, Debug)]
pub(super) struct Cmd(pub [u8; 64]);

/// The data pointer of a command as NVMe/TCP uses it (SGL, NVMe/TCP 1.0 §3.3.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Dptr {
    /// No data: a length of 0, whatever the descriptor type (as Linux reads it).
    None,
    /// Data Block, Offset subtype: in-capsule data.
    InCapsule { offset: u64, len: u32 },
    /// Transport SGL Data Block: C2HData, or R2T and H2CData.
    Transport { len: u32 },
    /// PRPs, keyed SGLs or anything else a TCP controller does not take.
    Other,
}

impl Cmd {
    pub(super) fn opcode(&self) -> u8 {
        self.0[0]
    }

    /// FUSE (bits 1:0) and PSDT (bits 7:6).
    pub(super) fn flags(&self) -> u8 {
        self.0[1]
    }

    pub(super) fn cid(&self) -> u16 {
        le16(&self.0, 2)
    }

    pub(super) fn nsid(&self) -> u32 {
        le32(&self.0, 4)
    }

    /// Fabrics command type.
    pub(super) fn fctype(&self) -> u8 {
        self.0[4]
    }

    pub(super) fn cdw(&self, n: usize) -> u32 {
        le32(&self.0, n * 4)
    }

    /// CDW10 and CDW11 as one value (SLBA), or CDW12 and CDW13 (log page offset, property
    /// value).
    pub(super) fn qword(&self, first_dw: usize) -> u64 {
        le64(&self.0, first_dw * 4)
    }

    pub(super) fn u16_at(&self, off: usize) -> u16 {
        le16(&self.0, off)
    }

    pub(super) fn byte(&self, off: usize) -> u8 {
        self.0.get(off).copied().unwrap_or(0)
    }

    pub(super) fn dptr(&self) -> Dptr {
        let len = le32(&self.0, 32);
        if len == 0 {
            return Dptr::None;
        }
        if self.flags() & 0xc0 != 0x40 {
            return Dptr::Other;
        }
        match self.0[39] {
            0x01 => Dptr::InCapsule {
                offset: le64(&self.0, 24),
                len,
            },
            0x5a => Dptr::Transport { len },
            _ => Dptr::Other,
        }
    }
}

/// A checked PDU from the host.
#[derive(Debug)]
pub(super) enum H2c<'a> {
    IcReq { hpda: u8, digests: Digests },
    Capsule { cmd: Cmd, data: &'a [u8] },
    Data(H2cData<'a>),
    TermReq { fes: u16 },
}

#[derive(Debug)]
pub(super) struct H2cData<'a> {
    pub cccid: u16,
    pub ttag: u16,
    pub datao: u32,
    pub last: bool,
    pub data: &'a [u8],
}

/// What the connection negotiated and accepts.
#[derive(Clone, Copy, Debug)]
pub(super) struct Limits {
    /// `None` until ICReq has been answered.
    pub digests: Option<Digests>,
    /// Most in-capsule data on this queue (the admin queue's until Connect says otherwise).
    pub capsule_data: u32,
    pub maxh2cdata: u32,
}

/// Length of the PDU at the front of `b` once all of it is buffered; `None` while more bytes
/// are needed. Only the common header is checked, enough to refuse a PLEN the connection will
/// never buffer.
pub(super) fn frame(b: &[u8], lim: &Limits) -> Result<Option<usize>, WireError> {
    if b.len() < CH_LEN {
        return Ok(None);
    }
    let (t, hlen, plen) = (b[0], b[2], le32(b, 4));
    let hlen_is = |want: usize| {
        if usize::from(hlen) == want {
            Ok(())
        } else {
            Err(WireError::HeaderLength { pdu_type: t, hlen })
        }
    };
    // Header, digest and padding (CPDA 0: 4-byte alignment) before any data.
    let max = |data: u32| (CAPSULE_CMD_HLEN + 2 * DIGEST_LEN) as u32 + data;
    let limit = match (t, lim.digests) {
        (pdu_type::ICREQ, None) => {
            hlen_is(IC_LEN)?;
            IC_LEN as u32
        }
        (_, None) | (pdu_type::ICREQ, Some(_)) => return Err(WireError::Sequence(t)),
        (pdu_type::CAPSULE_CMD, Some(_)) => {
            hlen_is(CAPSULE_CMD_HLEN)?;
            max(lim.capsule_data)
        }
        (pdu_type::H2C_DATA, Some(_)) => {
            hlen_is(SHORT_HLEN)?;
            max(lim.maxh2cdata)
        }
        (pdu_type::H2C_TERM_REQ, Some(_)) => {
            hlen_is(SHORT_HLEN)?;
            TERM_REQ_MAX_PLEN as u32
        }
        _ => return Err(WireError::Type(t)),
    };
    if plen < u32::from(hlen) {
        return Err(WireError::PduLength(plen));
    }
    if plen > limit {
        return Err(WireError::TooLong(plen));
    }
    let plen = plen as usize;
    Ok((b.len() >= plen).then_some(plen))
}

/// Checks a whole PDU (as [`frame`] delimited it) and returns its fields.
pub(super) fn decode<'a>(pdu: &'a [u8], lim: &Limits) -> Result<H2c<'a>, WireError> {
    let t = pdu[0];
    let Some(dg) = lim.digests else {
        // ICReq (§3.6.2.2): PFV 0, HPDA at most 31.
        let pfv = le16(pdu, 8);
        if pfv != 0 {
            return Err(WireError::Pfv(pfv));
        }
        let hpda = pdu[10];
        if hpda > 31 {
            return Err(WireError::Hpda(hpda));
        }
        let digests = Digests {
            header: pdu[11] & 1 != 0,
            data: pdu[11] & 2 != 0,
        };
        return Ok(H2c::IcReq { hpda, digests });
    };
    if t == pdu_type::H2C_TERM_REQ {
        return Ok(H2c::TermReq { fes: le16(pdu, 8) });
    }
    let hlen = usize::from(pdu[2]);
    let (f, pdo, plen) = (pdu[1], pdu[3], pdu.len());
    let header = hlen + if dg.header { DIGEST_LEN } else { 0 };
    let has_data = plen > header;
    let want = (if dg.header { flags::HDGSTF } else { 0 })
        | (if dg.data && has_data {
            flags::DDGSTF
        } else {
            0
        });
    if f & (flags::HDGSTF | flags::DDGSTF) != want {
        return Err(WireError::DigestFlags(f));
    }
    if plen < header {
        return Err(WireError::PduLength(plen as u32));
    }
    if dg.header && header_digest(&pdu[..hlen]) != pdu[hlen..header] {
        return Err(WireError::HeaderDigest);
    }
    let data = if has_data {
        let pdo = usize::from(pdo);
        let ddgst = if dg.data { DIGEST_LEN } else { 0 };
        if pdo < header || pdo % 4 != 0 || pdo + ddgst >= plen {
            return Err(WireError::DataOffset(pdu[3]));
        }
        let data = &pdu[pdo..plen - ddgst];
        if dg.data {
            let mut d = DataDigest::new();
            d.update(data);
            if d.finish() != pdu[plen - ddgst..] {
                return Err(WireError::DataDigest);
            }
        }
        data
    } else {
        &[]
    };
    if t == pdu_type::CAPSULE_CMD {
        let mut sqe = [0; 64];
        sqe.copy_from_slice(&pdu[CH_LEN..CAPSULE_CMD_HLEN]);
        return Ok(H2c::Capsule {
            cmd: Cmd(sqe),
            data,
        });
    }
    // H2CData (§3.6.2.7).
    let datal = le32(pdu, 16);
    if datal as usize != data.len() || data.is_empty() {
        return Err(WireError::DataLength(datal));
    }
    Ok(H2c::Data(H2cData {
        cccid: le16(pdu, 8),
        ttag: le16(pdu, 10),
        datao: le32(pdu, 12),
        last: f & flags::LAST_PDU != 0,
        data,
    }))
}

#[derive(Clone, Copy, Debug)]
enum Seg {
    /// `buf[start..end]`.
    Buf(usize, usize),
    Zeros(usize),
}

/// The bytes a connection sends after handling what it read: headers and data in one buffer,
/// runs of zeros by reference, all sent with `writev`.
#[derive(Debug, Default)]
pub(super) struct Tx {
    buf: Vec<u8>,
    segs: Vec<Seg>,
    /// Start of the part of `buf` not yet in `segs`.
    open: usize,
    /// Bytes of zeros in `segs`.
    zero_bytes: usize,
}

impl Tx {
    pub(super) fn is_empty(&self) -> bool {
        self.buf.is_empty() && self.segs.is_empty()
    }

    /// Bytes queued, zeros included.
    pub(super) fn len(&self) -> usize {
        self.buf.len() + self.zero_bytes
    }

    /// The buffer, for appending data read from the namespace.
    pub(super) fn buf(&mut self) -> &mut Vec<u8> {
        &mut self.buf
    }

    pub(super) fn zeros(&mut self, mut len: usize) {
        if self.open < self.buf.len() {
            self.segs.push(Seg::Buf(self.open, self.buf.len()));
            self.open = self.buf.len();
        }
        self.zero_bytes += len;
        while len > 0 {
            let n = len.min(ZEROS.len());
            self.segs.push(Seg::Zeros(n));
            len -= n;
        }
    }

    fn ch(&mut self, t: u8, f: u8, hlen: usize, pdo: usize, plen: usize) -> usize {
        let start = self.buf.len();
        self.buf.extend_from_slice(&[t, f, hlen as u8, pdo as u8]);
        self.buf.extend_from_slice(&(plen as u32).to_le_bytes());
        start
    }

    /// Appends the header digest of the header that began at `start`, spoiled if `corrupt`.
    fn seal(&mut self, start: usize, digests: Digests, corrupt: bool) {
        if digests.header {
            let mut d = header_digest(&self.buf[start..]);
            if corrupt {
                d[0] ^= 0xff;
            }
            self.buf.extend_from_slice(&d);
        }
    }

    /// ICResp (§3.6.2.3): PFV 0, CPDA 0.
    pub(super) fn icresp(&mut self, digests: Digests, maxh2cdata: u32) {
        let start = self.ch(pdu_type::ICRESP, 0, IC_LEN, 0, IC_LEN);
        let dgst = u8::from(digests.header) | (u8::from(digests.data) << 1);
        self.buf.extend_from_slice(&[0, 0, 0, dgst]);
        self.buf.extend_from_slice(&maxh2cdata.to_le_bytes());
        self.buf.resize(start + IC_LEN, 0);
    }

    /// CapsuleResp (§3.6.2.6).
    pub(super) fn capsule_resp(&mut self, cqe: &[u8; 16], digests: Digests, corrupt_hd: bool) {
        let plen = SHORT_HLEN + if digests.header { DIGEST_LEN } else { 0 };
        let f = if digests.header { flags::HDGSTF } else { 0 };
        let start = self.ch(pdu_type::CAPSULE_RESP, f, SHORT_HLEN, 0, plen);
        self.buf.extend_from_slice(cqe);
        self.seal(start, digests, corrupt_hd);
    }

    /// R2T (§3.6.2.9).
    pub(super) fn r2t(&mut self, r2t: &R2tHeader, digests: Digests, corrupt_hd: bool) {
        let R2tHeader {
            cccid,
            ttag,
            r2to,
            r2tl,
        } = *r2t;
        let plen = SHORT_HLEN + if digests.header { DIGEST_LEN } else { 0 };
        let f = if digests.header { flags::HDGSTF } else { 0 };
        let start = self.ch(pdu_type::R2T, f, SHORT_HLEN, 0, plen);
        self.buf.extend_from_slice(&cccid.to_le_bytes());
        self.buf.extend_from_slice(&ttag.to_le_bytes());
        self.buf.extend_from_slice(&r2to.to_le_bytes());
        self.buf.extend_from_slice(&r2tl.to_le_bytes());
        self.buf.extend_from_slice(&[0; 4]);
        self.seal(start, digests, corrupt_hd);
    }

    /// The header of a C2HData PDU (§3.6.2.8) and its padding up to a PDO aligned as the
    /// host's HPDA asks; `datal` bytes of data must follow, then [`Tx::data_digest`].
    pub(super) fn c2h_data(&mut self, h: &C2hHeader, digests: Digests, hpda: u8) {
        let header = SHORT_HLEN + if digests.header { DIGEST_LEN } else { 0 };
        let pdo = header.next_multiple_of((usize::from(hpda) + 1) * 4);
        let ddgst = if digests.data { DIGEST_LEN } else { 0 };
        let plen = pdo + h.datal as usize + ddgst;
        let f = h.flags
            | (if digests.header { flags::HDGSTF } else { 0 })
            | (if digests.data { flags::DDGSTF } else { 0 });
        let start = self.ch(pdu_type::C2H_DATA, f, SHORT_HLEN, pdo, plen);
        self.buf.extend_from_slice(&h.cccid.to_le_bytes());
        self.buf.extend_from_slice(&[0, 0]);
        self.buf.extend_from_slice(&h.datao.to_le_bytes());
        self.buf.extend_from_slice(&h.datal.to_le_bytes());
        self.buf.extend_from_slice(&[0; 4]);
        self.seal(start, digests, h.corrupt_hd);
        self.buf.resize(start + pdo, 0);
    }

    pub(super) fn data_digest(&mut self, digest: DataDigest, corrupt: bool) {
        let mut d = digest.finish();
        if corrupt {
            d[0] ^= 0xff;
        }
        self.buf.extend_from_slice(&d);
    }

    /// C2HTermReq (§3.6.2.4) carrying up to 128 bytes of the header in error.
    pub(super) fn term_req(&mut self, fes: Fes, fei: u32, header: &[u8]) {
        let header = header.get(..TERM_REQ_MAX_DATA).unwrap_or(header);
        let plen = SHORT_HLEN + header.len();
        self.ch(pdu_type::C2H_TERM_REQ, 0, SHORT_HLEN, 0, plen);
        self.buf.extend_from_slice(&(fes as u16).to_le_bytes());
        self.buf.extend_from_slice(&fei.to_le_bytes());
        self.buf.extend_from_slice(&[0; 10]);
        self.buf.extend_from_slice(header);
    }

    /// A 24-byte PDU of a type no host accepts.
    pub(super) fn garbage(&mut self) {
        self.ch(GARBAGE_TYPE, 0, SHORT_HLEN, 0, SHORT_HLEN);
        self.buf.extend_from_slice(&[0xa5; SHORT_HLEN - CH_LEN]);
    }

    /// Sends everything queued with as few `writev` calls as the socket allows.
    pub(super) fn flush(&mut self, w: &mut impl Write) -> io::Result<()> {
        if self.segs.is_empty() {
            let r = w.write_all(&self.buf);
            self.buf.clear();
            self.open = 0;
            return r;
        }
        if self.open < self.buf.len() {
            self.segs.push(Seg::Buf(self.open, self.buf.len()));
        }
        let mut slices: Vec<IoSlice<'_>> = self
            .segs
            .iter()
            .map(|s| match *s {
                Seg::Buf(a, b) => IoSlice::new(&self.buf[a..b]),
                Seg::Zeros(n) => IoSlice::new(&ZEROS[..n]),
            })
            .collect();
        let mut rest = &mut slices[..];
        let r = loop {
            if rest.is_empty() {
                break Ok(());
            }
            match w.write_vectored(rest) {
                Ok(0) => break Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => IoSlice::advance_slices(&mut rest, n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => break Err(e),
            }
        };
        drop(slices);
        self.buf.clear();
        self.segs.clear();
        self.open = 0;
        self.zero_bytes = 0;
        r
    }
}

/// The fields of a C2HData header.
#[derive(Clone, Copy, Debug)]
pub(super) struct C2hHeader {
    pub cccid: u16,
    pub datao: u32,
    pub datal: u32,
    /// LAST_PDU, SUCCESS.
    pub flags: u8,
    pub corrupt_hd: bool,
}

/// The fields of an R2T.
#[derive(Clone, Copy, Debug)]
pub(super) struct R2tHeader {
    pub cccid: u16,
    pub ttag: u16,
    pub r2to: u32,
    pub r2tl: u32,
}

/// The data digest of `len` zeros.
pub(super) fn zeros_digest(mut len: usize) -> DataDigest {
    let mut d = DataDigest::new();
    while len > 0 {
        let n = len.min(ZEROS.len());
        d.update(&ZEROS[..n]);
        len -= n;
    }
    d
}
