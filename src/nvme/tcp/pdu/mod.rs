//! The NVMe/TCP PDU codec (NVMe/TCP Transport Specification 1.0 §3.6), host side.
//!
//! Pure: no sockets, no allocation. Encoders (`tx`) write the headers of the PDUs a host
//! sends into caller arrays; payloads are never copied: the caller sends a header, then its
//! own data buffers, then the [`DataDigest`]. The receive side ([`RxParser`]) owns only a
//! small header buffer and tells the caller what to read next, so payload bytes go from the
//! socket straight into the command's buffers.
//!
//! Every PDU starts with an 8-byte common header (CH, §3.6.1): PDU-Type, FLAGS, HLEN (CH plus
//! PDU specific header), PDO (offset of the data) and PLEN (total length). A header digest
//! follows the header and a data digest the data when negotiated in ICReq / ICResp; both are
//! CRC32C, stored little-endian (§3.6.1.2 and Linux `nvme-tcp`).

mod rx;
mod tx;

#[cfg(test)]
pub(crate) mod tests;

pub use rx::{C2hData, IcResp, R2t, RxEvent, RxNeed, RxParser, header_len_after_icresp};
pub use tx::{H2cData, IcReq, encode_capsule_cmd, encode_h2c_data, encode_h2c_term_req};

use thiserror::Error;

/// PDU types (§3.6.2, Figure 14).
pub mod pdu_type {
    pub const ICREQ: u8 = 0x00;
    pub const ICRESP: u8 = 0x01;
    pub const H2C_TERM_REQ: u8 = 0x02;
    pub const C2H_TERM_REQ: u8 = 0x03;
    pub const CAPSULE_CMD: u8 = 0x04;
    pub const CAPSULE_RESP: u8 = 0x05;
    pub const H2C_DATA: u8 = 0x06;
    pub const C2H_DATA: u8 = 0x07;
    pub const R2T: u8 = 0x09;
}

/// Common header FLAGS (§3.6.1, Figure 13).
pub mod flags {
    /// A header digest follows the PDU header.
    pub const HDGSTF: u8 = 0x01;
    /// A data digest follows the PDU data.
    pub const DDGSTF: u8 = 0x02;
    /// Last data PDU of a transfer (H2CData, C2HData).
    pub const LAST_PDU: u8 = 0x04;
    /// C2HData: the command completed successfully, no CapsuleResp follows.
    pub const SUCCESS: u8 = 0x08;
}

/// Length of the common header.
pub const CH_LEN: usize = 8;
/// Length of a header or data digest.
pub const DIGEST_LEN: usize = 4;
/// ICReq and ICResp are 128 bytes, without digests (§3.6.2.2-3).
pub const IC_LEN: usize = 128;
/// HLEN of CapsuleCmd: CH and a 64-byte SQE (NVMe/TCP has no SGL extension).
pub const CAPSULE_CMD_HLEN: usize = 72;
/// HLEN of every other PDU but ICReq / ICResp (§3.6.2): CapsuleResp (CH and a CQE), H2CData,
/// C2HData, R2T, H2CTermReq, C2HTermReq.
pub const SHORT_HLEN: usize = 24;
/// Most bytes of the header in error a termination request carries; its PLEN is at most
/// 152 (§3.6.2.4).
pub const TERM_REQ_MAX_DATA: usize = 128;
/// Largest PLEN of a termination request.
pub const TERM_REQ_MAX_PLEN: usize = SHORT_HLEN + TERM_REQ_MAX_DATA;
/// Smallest MAXH2CDATA a controller may announce (§3.6.2.3).
pub const MIN_MAXH2CDATA: u32 = 4096;
/// Largest HPDA / CPDA: data aligned to `(PDA + 1) * 4` bytes, at most 128.
pub const MAX_PDA: u8 = 31;
/// Room for any header the host sends with its digest and padding: the largest PDO is a
/// 76-byte CapsuleCmd header padded to twice a 72-byte alignment (CPDA 17).
pub const TX_HEADER_MAX: usize = 144;

/// Which digests are in use (or requested).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Digests {
    pub header: bool,
    pub data: bool,
}

impl Digests {
    /// DGST field of ICReq / ICResp: bit 0 header digest, bit 1 data digest.
    fn bits(self) -> u8 {
        u8::from(self.header) | (u8::from(self.data) << 1)
    }

    fn from_bits(bits: u8) -> Digests {
        Digests {
            header: bits & 1 != 0,
            data: bits & 2 != 0,
        }
    }

    fn header_len(self) -> usize {
        if self.header { DIGEST_LEN } else { 0 }
    }

    /// FLAGS bits this PDU must carry: HDGSTF always when negotiated, DDGSTF only on PDUs
    /// with data.
    fn flags(self, has_data: bool) -> u8 {
        let h = if self.header { flags::HDGSTF } else { 0 };
        let d = if self.data && has_data {
            flags::DDGSTF
        } else {
            0
        };
        h | d
    }
}

/// Alignment in bytes of data placed at a PDU Data Offset for a PDA value (§3.6.2.2).
fn pda_alignment(pda: u8) -> usize {
    (usize::from(pda.min(MAX_PDA)) + 1) * 4
}

/// CRC32C of a PDU header (CH and PDU specific header), as sent after it.
pub fn header_digest(header: &[u8]) -> [u8; DIGEST_LEN] {
    crc32c::crc32c(header).to_le_bytes()
}

/// A data digest computed over the data of one PDU, however it is split into buffers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DataDigest(u32);

impl DataDigest {
    pub fn new() -> DataDigest {
        DataDigest(0)
    }

    pub fn update(&mut self, data: &[u8]) {
        self.0 = crc32c::crc32c_append(self.0, data);
    }

    /// The digest as it goes on the wire.
    pub fn finish(self) -> [u8; DIGEST_LEN] {
        self.0.to_le_bytes()
    }
}

/// Fatal Error Status of a termination request (§3.6.2.4, Figure 20).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum Fes {
    InvalidHeaderField = 0x01,
    PduSequenceError = 0x02,
    HeaderDigestError = 0x03,
    DataOutOfRange = 0x04,
    /// R2T Limit Exceeded (sent by controllers) and Data Transfer Limit Exceeded share 05h.
    LimitExceeded = 0x05,
    UnsupportedParameter = 0x06,
}

// Byte offsets of header fields, for the Fatal Error Information of a termination request.
const FEI_TYPE: u32 = 0;
const FEI_FLAGS: u32 = 1;
const FEI_HLEN: u32 = 2;
const FEI_PDO: u32 = 3;
const FEI_PLEN: u32 = 4;
const FEI_PFV: u32 = 8;
const FEI_CCCID: u32 = 8;
const FEI_CPDA: u32 = 10;
const FEI_DGST: u32 = 11;
const FEI_MAXH2CDATA: u32 = 12;
const FEI_DATAO: u32 = 12;
const FEI_DATAL: u32 = 16;

/// A received PDU the host refuses. All but [`PduError::DataDigest`] are fatal: the
/// connection must be terminated ([`PduError::term_req`] says with what) and reset.
#[derive(Clone, Copy, Debug, Error, PartialEq, Eq)]
pub enum PduError {
    #[error("PDU type {pdu_type:#04x} is not one a host receives")]
    InvalidType { pdu_type: u8 },
    #[error("PDU type {pdu_type:#04x} before ICResp")]
    BeforeIcResp { pdu_type: u8 },
    #[error("second ICResp")]
    IcRespAgain,
    #[error("HLEN {hlen} wrong for PDU type {pdu_type:#04x}")]
    HeaderLength { pdu_type: u8, hlen: u8 },
    #[error("PDO {pdo} inconsistent with the header and its alignment")]
    DataOffset { pdo: u8 },
    #[error("PLEN {plen} inconsistent with the header")]
    PduLength { plen: u32 },
    #[error("digest flags {flags:#04x} differ from those negotiated")]
    DigestFlags { flags: u8 },
    #[error("SUCCESS flag without LAST_PDU")]
    SuccessWithoutLast,
    #[error("header digest {received:#010x}, computed {computed:#010x}")]
    HeaderDigest { received: u32, computed: u32 },
    #[error("data digest of command {cccid}: {received:#010x}, computed {computed:#010x}")]
    DataDigest {
        cccid: u16,
        received: u32,
        computed: u32,
    },
    #[error("zero-length data transfer")]
    ZeroDataLength,
    #[error("{datal} bytes of data exceed the {max}-byte limit")]
    DataTooLong { datal: u32, max: u32 },
    #[error("PDU format version {pfv}")]
    UnsupportedPfv { pfv: u16 },
    #[error("CPDA {cpda} out of range")]
    Cpda { cpda: u8 },
    #[error("ICResp enables digests {dgst:#04x} the host did not request")]
    DigestNotRequested { dgst: u8 },
    #[error("MAXH2CDATA {maxh2cdata} below 4096 or not a multiple of 4")]
    MaxH2cData { maxh2cdata: u32 },
    #[error("PDU for command {cccid}, which is not waiting for it")]
    UnknownCommand { cccid: u16 },
    #[error("data {offset}+{len} of command {cccid} outside its {buffer_len}-byte buffer")]
    DataOutOfRange {
        cccid: u16,
        offset: u32,
        len: u32,
        buffer_len: u32,
    },
    #[error("data of command {cccid} at offset {offset}, where {expected} was next")]
    DataOutOfOrder {
        cccid: u16,
        offset: u32,
        expected: u32,
    },
    #[error("more R2Ts outstanding for command {cccid} than MAXR2T allows")]
    R2tLimitExceeded { cccid: u16 },
}

impl PduError {
    /// The connection must be terminated (all but a data digest error, after which the
    /// stream is still framed: Linux fails only that command).
    pub fn is_fatal(&self) -> bool {
        !matches!(self, PduError::DataDigest { .. })
    }

    /// FES and FEI of the H2CTermReq that reports this error (§3.6.2.4, Figure 20), or
    /// `None` if none is sent.
    pub fn term_req(&self) -> Option<(Fes, u32)> {
        use PduError::*;
        Some(match *self {
            InvalidType { .. } => (Fes::InvalidHeaderField, FEI_TYPE),
            BeforeIcResp { .. } | IcRespAgain => (Fes::PduSequenceError, 0),
            HeaderLength { .. } => (Fes::InvalidHeaderField, FEI_HLEN),
            DataOffset { .. } => (Fes::InvalidHeaderField, FEI_PDO),
            PduLength { .. } => (Fes::InvalidHeaderField, FEI_PLEN),
            DigestFlags { .. } | SuccessWithoutLast => (Fes::InvalidHeaderField, FEI_FLAGS),
            HeaderDigest { .. } => (Fes::HeaderDigestError, 0),
            DataDigest { .. } => return None,
            ZeroDataLength | DataTooLong { .. } => (Fes::InvalidHeaderField, FEI_DATAL),
            UnsupportedPfv { .. } => (Fes::UnsupportedParameter, FEI_PFV),
            Cpda { .. } => (Fes::InvalidHeaderField, FEI_CPDA),
            DigestNotRequested { .. } => (Fes::InvalidHeaderField, FEI_DGST),
            MaxH2cData { .. } => (Fes::InvalidHeaderField, FEI_MAXH2CDATA),
            UnknownCommand { .. } => (Fes::InvalidHeaderField, FEI_CCCID),
            DataOutOfRange { .. } => (Fes::DataOutOfRange, 0),
            DataOutOfOrder { .. } => (Fes::InvalidHeaderField, FEI_DATAO),
            R2tLimitExceeded { .. } => (Fes::LimitExceeded, 0),
        })
    }
}

/// Little-endian field readers over a header already known to be long enough.
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
