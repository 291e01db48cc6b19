//! The host's receive path: a state machine that validates every PDU header field where it
//! arrives and never touches payload bytes.
//!
//! Driving it: call [`RxParser::need`] and do what it says.
//! - [`RxNeed::Header`], [`RxNeed::Padding`], [`RxNeed::DataDigest`]: read into the buffer it
//!   lends (any number of bytes up to its length), then report them with
//!   [`RxParser::filled`]. Bytes already read elsewhere go in through [`RxParser::feed`].
//! - [`RxNeed::Accept`]: a C2HData header arrived; look its command up and call
//!   [`RxParser::accept`] with that command's buffer length, or [`RxParser::reject`].
//! - [`RxNeed::Payload`]: read at most `remaining` bytes into the command's buffer at
//!   `offset`, then pass them to [`RxParser::payload_read`] (for the count and the data
//!   digest; they are not copied).
//!
//! After ICResp every header a host receives is [`header_len_after_icresp`] bytes, so a
//! connection can read the rest of a payload, its data digest and the next header with one
//! `readv`, and hand the non-payload part to [`RxParser::feed`].

use super::{
    CH_LEN, DIGEST_LEN, DataDigest, Digests, IC_LEN, IcReq, MAX_PDA, MIN_MAXH2CDATA, PduError,
    SHORT_HLEN, TERM_REQ_MAX_PLEN, flags, header_digest, le16, le32, pda_alignment, pdu_type,
};
use crate::nvme::spec::Cqe;

/// Length of every header a host receives after ICResp: 24 bytes, plus the header digest
/// (C2HTermReq, which has no digest, is 24).
pub fn header_len_after_icresp(digests: Digests) -> usize {
    SHORT_HLEN + digests.header_len()
}

/// Initialize Connection Response (§3.6.2.3): the parameters the controller granted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IcResp {
    /// PDU format version, 0.
    pub pfv: u16,
    /// Controller PDU Data Alignment for the data of PDUs the host sends.
    pub cpda: u8,
    /// Digests in use from now on, in both directions.
    pub digests: Digests,
    /// Most data one H2CData PDU may carry.
    pub maxh2cdata: u32,
}

/// A C2HData header (§3.6.2.8).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct C2hData {
    pub cccid: u16,
    /// Offset of this data in the command's data.
    pub datao: u32,
    pub datal: u32,
    /// Last data PDU of the command.
    pub last: bool,
    /// The command succeeded and no CapsuleResp follows (only with `last`).
    pub success: bool,
}

/// A Ready to Transfer header (§3.6.2.9): the controller asks for `r2tl` bytes of the
/// command's data from offset `r2to`, to be sent in H2CData PDUs tagged `ttag`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct R2t {
    pub cccid: u16,
    pub ttag: u16,
    pub r2to: u32,
    pub r2tl: u32,
}

impl R2t {
    /// Checks that the requested range lies within the command's `buffer_len` bytes of data.
    pub fn check_range(&self, buffer_len: u32) -> Result<(), PduError> {
        let end = u64::from(self.r2to) + u64::from(self.r2tl);
        if end > u64::from(buffer_len) {
            return Err(PduError::DataOutOfRange {
                cccid: self.cccid,
                offset: self.r2to,
                len: self.r2tl,
                buffer_len,
            });
        }
        Ok(())
    }
}

/// What a completed header (or payload) means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RxEvent {
    IcResp(IcResp),
    CapsuleResp(Cqe),
    /// Must be answered with [`RxParser::accept`] or [`RxParser::reject`].
    C2hData(C2hData),
    R2t(R2t),
    /// The controller terminates the connection (§3.6.2.4); nothing more is parsed.
    C2hTermReq {
        fes: u16,
        fei: u32,
    },
    /// The payload of a C2HData PDU is in and its data digest, if any, verified.
    PayloadDone {
        cccid: u16,
        last: bool,
        success: bool,
    },
}

/// What the parser needs next.
#[derive(Debug, PartialEq, Eq)]
pub enum RxNeed<'a> {
    /// Bytes of a PDU header (and its digest): read into `buf`, then [`RxParser::filled`].
    Header { buf: &'a mut [u8] },
    /// Padding between a header and its data: read into `buf`, then [`RxParser::filled`].
    Padding { buf: &'a mut [u8] },
    /// The data digest: read into `buf`, then [`RxParser::filled`].
    DataDigest { buf: &'a mut [u8] },
    /// A C2HData header waits for [`RxParser::accept`] or [`RxParser::reject`].
    Accept { cccid: u16, datao: u32, datal: u32 },
    /// At most `remaining` payload bytes of command `cccid`, to go at `offset` in its buffer;
    /// report them with [`RxParser::payload_read`].
    Payload {
        cccid: u16,
        offset: u32,
        remaining: u32,
    },
    /// A C2HTermReq or a fatal error ended the stream.
    Closed,
}

#[derive(Clone, Copy, Debug)]
enum State {
    /// Reading a header into `buf[..want]`.
    Header,
    /// A C2HData header waits for its verdict.
    Accept(C2hData),
    /// Reading padding into `buf[..want]` (`want` is PDO).
    Padding(C2hData),
    Payload {
        pdu: C2hData,
        left: u32,
        digest: DataDigest,
    },
    DataDigest {
        pdu: C2hData,
        digest: DataDigest,
    },
    Closed,
    Failed(PduError),
}

/// The receive state machine of one host connection.
#[derive(Debug)]
pub struct RxParser {
    state: State,
    /// The current header, then its padding: the first PDO bytes of a C2HData PDU.
    buf: [u8; 256],
    /// Bytes of `buf` filled.
    have: usize,
    /// Bytes of `buf` the current step needs.
    want: usize,
    /// The common header of the current PDU has been checked and `want` set from it.
    ch_checked: bool,
    ddgst: [u8; DIGEST_LEN],
    ddgst_have: usize,
    hpda: u8,
    requested: Digests,
    max_data: u32,
    /// Set by ICResp.
    params: Option<IcResp>,
}

impl RxParser {
    /// A parser for a connection that sent `icreq` and accepts at most `max_data` bytes of
    /// data in one C2HData PDU (the largest transfer it issues).
    pub fn new(icreq: &IcReq, max_data: u32) -> RxParser {
        RxParser {
            state: State::Header,
            buf: [0; 256],
            have: 0,
            want: CH_LEN,
            ch_checked: false,
            ddgst: [0; DIGEST_LEN],
            ddgst_have: 0,
            hpda: icreq.hpda.min(MAX_PDA),
            requested: icreq.digests,
            max_data,
            params: None,
        }
    }

    /// The parameters granted by ICResp, once it arrived.
    pub fn params(&self) -> Option<&IcResp> {
        self.params.as_ref()
    }

    pub fn need(&mut self) -> RxNeed<'_> {
        let span = self.buf.get_mut(self.have..self.want).unwrap_or_default();
        match self.state {
            State::Header => RxNeed::Header { buf: span },
            State::Padding(_) => RxNeed::Padding { buf: span },
            State::Accept(p) => RxNeed::Accept {
                cccid: p.cccid,
                datao: p.datao,
                datal: p.datal,
            },
            State::Payload { pdu, left, .. } => RxNeed::Payload {
                cccid: pdu.cccid,
                offset: pdu.datao + (pdu.datal - left),
                remaining: left,
            },
            State::DataDigest { .. } => RxNeed::DataDigest {
                buf: self.ddgst.get_mut(self.ddgst_have..).unwrap_or_default(),
            },
            State::Closed | State::Failed(_) => RxNeed::Closed,
        }
    }

    /// The bytes of the header being parsed (for the H2CTermReq that reports an error in
    /// it), at most what a termination request carries.
    pub fn header_in_error(&self) -> &[u8] {
        let len = self.have.min(TERM_REQ_MAX_PLEN - SHORT_HLEN);
        self.buf.get(..len).unwrap_or_default()
    }

    /// Reports `n` bytes read into the buffer of the last [`RxNeed::Header`],
    /// [`RxNeed::Padding`] or [`RxNeed::DataDigest`].
    pub fn filled(&mut self, n: usize) -> Result<Option<RxEvent>, PduError> {
        match self.state {
            State::Failed(e) => Err(e),
            State::Header => {
                debug_assert!(self.have + n <= self.want);
                self.have = (self.have + n).min(self.want);
                self.advance_header().map_err(|e| self.fail(e))
            }
            State::Padding(pdu) => {
                debug_assert!(self.have + n <= self.want);
                self.have = (self.have + n).min(self.want);
                if self.have == self.want {
                    self.start_payload(pdu);
                }
                Ok(None)
            }
            State::DataDigest { pdu, digest } => {
                debug_assert!(self.ddgst_have + n <= DIGEST_LEN);
                self.ddgst_have = (self.ddgst_have + n).min(DIGEST_LEN);
                if self.ddgst_have < DIGEST_LEN {
                    return Ok(None);
                }
                self.next_header();
                let received = u32::from_le_bytes(self.ddgst);
                let computed = u32::from_le_bytes(digest.finish());
                if received != computed {
                    // Not fatal: the stream is still framed.
                    return Err(PduError::DataDigest {
                        cccid: pdu.cccid,
                        received,
                        computed,
                    });
                }
                Ok(Some(done(pdu)))
            }
            State::Accept(_) | State::Payload { .. } | State::Closed => Ok(None),
        }
    }

    /// Copies parser-owned bytes (header, padding, data digest) from `bytes` and processes
    /// them, stopping at the first event, at payload, or at the end of `bytes`. Returns how
    /// many bytes were taken and the outcome.
    pub fn feed(&mut self, bytes: &[u8]) -> (usize, Result<Option<RxEvent>, PduError>) {
        if let State::Failed(e) = self.state {
            return (0, Err(e));
        }
        let n = match self.need() {
            RxNeed::Header { buf } | RxNeed::Padding { buf } | RxNeed::DataDigest { buf } => {
                let n = buf.len().min(bytes.len());
                buf[..n].copy_from_slice(&bytes[..n]);
                n
            }
            _ => return (0, Ok(None)),
        };
        (n, self.filled(n))
    }

    /// Accepts the pending C2HData for a command whose buffer holds `buffer_len` bytes and
    /// which has received `received` of them: its data must lie within the buffer and start
    /// where the data received so far ends. A controller sends a command's data in order
    /// (DATAO of each PDU is the sum of DATAL of those before it; SPDK's host requires it
    /// too), so an overlap or a gap is a protocol error, never a read with a hole in it that
    /// the count of bytes received would not show.
    pub fn accept(&mut self, buffer_len: u32, received: u32) -> Result<(), PduError> {
        let State::Accept(pdu) = self.state else {
            debug_assert!(false, "accept without a pending C2HData");
            return Ok(());
        };
        let end = u64::from(pdu.datao) + u64::from(pdu.datal);
        if end > u64::from(buffer_len) {
            return Err(self.fail(PduError::DataOutOfRange {
                cccid: pdu.cccid,
                offset: pdu.datao,
                len: pdu.datal,
                buffer_len,
            }));
        }
        if pdu.datao != received {
            return Err(self.fail(PduError::DataOutOfOrder {
                cccid: pdu.cccid,
                offset: pdu.datao,
                expected: received,
            }));
        }
        // The header (with digest) is in; padding, if any, runs up to PDO.
        self.want = usize::from(self.buf[3]);
        if self.want > self.have {
            self.state = State::Padding(pdu);
        } else {
            self.start_payload(pdu);
        }
        Ok(())
    }

    /// Refuses the pending C2HData: no command with that CCCID expects data. Fatal.
    pub fn reject(&mut self) -> PduError {
        let cccid = match self.state {
            State::Accept(pdu) => pdu.cccid,
            _ => 0,
        };
        self.fail(PduError::UnknownCommand { cccid })
    }

    /// Reports payload bytes read into the command's buffer: at most the `remaining` of
    /// [`RxNeed::Payload`].
    pub fn payload_read(&mut self, data: &[u8]) -> Result<Option<RxEvent>, PduError> {
        let State::Payload {
            pdu,
            left,
            mut digest,
        } = self.state
        else {
            debug_assert!(data.is_empty(), "payload outside a C2HData payload");
            return match self.state {
                State::Failed(e) => Err(e),
                _ => Ok(None),
            };
        };
        debug_assert!(data.len() <= left as usize);
        let data = data.get(..left as usize).unwrap_or(data);
        let left = left - data.len() as u32;
        let ddgst = self.params.is_some_and(|p| p.digests.data);
        if ddgst {
            digest.update(data);
        }
        self.state = if left > 0 {
            State::Payload { pdu, left, digest }
        } else if ddgst {
            self.ddgst_have = 0;
            State::DataDigest { pdu, digest }
        } else {
            self.next_header();
            return Ok(Some(done(pdu)));
        };
        Ok(None)
    }

    fn fail(&mut self, e: PduError) -> PduError {
        if e.is_fatal() {
            self.state = State::Failed(e);
        }
        e
    }

    fn next_header(&mut self) {
        self.state = State::Header;
        self.have = 0;
        self.ch_checked = false;
        self.want = match self.params {
            Some(p) => header_len_after_icresp(p.digests),
            None => CH_LEN,
        };
    }

    fn start_payload(&mut self, pdu: C2hData) {
        self.state = State::Payload {
            pdu,
            left: pdu.datal,
            digest: DataDigest::new(),
        };
    }

    fn advance_header(&mut self) -> Result<Option<RxEvent>, PduError> {
        if self.have < CH_LEN {
            return Ok(None);
        }
        if !self.ch_checked {
            self.want = self.check_ch()?;
            self.ch_checked = true;
        }
        if self.have < self.want {
            return Ok(None);
        }
        self.complete_header().map(Some)
    }

    /// Checks what the common header alone decides (type, sequence, HLEN) and returns the
    /// length of the whole header with its digest (§3.6.2.1, §3.3.3).
    fn check_ch(&self) -> Result<usize, PduError> {
        let (t, hlen, plen) = (self.buf[0], self.buf[2], le32(&self.buf, 4));
        let hlen_is = |want: usize| {
            if usize::from(hlen) == want {
                Ok(())
            } else {
                Err(PduError::HeaderLength { pdu_type: t, hlen })
            }
        };
        match (t, self.params) {
            (pdu_type::ICRESP, None) => {
                hlen_is(IC_LEN)?;
                if plen as usize != IC_LEN {
                    return Err(PduError::PduLength { plen });
                }
                Ok(IC_LEN)
            }
            (pdu_type::ICRESP, Some(_)) => Err(PduError::IcRespAgain),
            (pdu_type::C2H_TERM_REQ, _) => {
                hlen_is(SHORT_HLEN)?;
                if !(SHORT_HLEN..=TERM_REQ_MAX_PLEN).contains(&(plen as usize)) {
                    return Err(PduError::PduLength { plen });
                }
                Ok(SHORT_HLEN)
            }
            (pdu_type::CAPSULE_RESP | pdu_type::C2H_DATA | pdu_type::R2T, None) => {
                Err(PduError::BeforeIcResp { pdu_type: t })
            }
            (pdu_type::CAPSULE_RESP | pdu_type::C2H_DATA | pdu_type::R2T, Some(p)) => {
                hlen_is(SHORT_HLEN)?;
                Ok(header_len_after_icresp(p.digests))
            }
            _ => Err(PduError::InvalidType { pdu_type: t }),
        }
    }

    fn complete_header(&mut self) -> Result<RxEvent, PduError> {
        match (self.buf[0], self.params) {
            (pdu_type::ICRESP, _) => {
                let p = self.parse_icresp()?;
                self.params = Some(p);
                self.next_header();
                Ok(RxEvent::IcResp(p))
            }
            (pdu_type::C2H_TERM_REQ, _) => {
                self.state = State::Closed;
                Ok(RxEvent::C2hTermReq {
                    fes: le16(&self.buf, 8),
                    fei: le32(&self.buf, 10),
                })
            }
            (t, Some(p)) => self.complete_short_header(t, p),
            (t, None) => Err(PduError::BeforeIcResp { pdu_type: t }),
        }
    }

    /// ICResp checks (§3.6.2.3 and what Linux enforces).
    fn parse_icresp(&self) -> Result<IcResp, PduError> {
        let b = &self.buf;
        if b[3] != 0 {
            return Err(PduError::DataOffset { pdo: b[3] });
        }
        let pfv = le16(b, 8);
        if pfv != 0 {
            return Err(PduError::UnsupportedPfv { pfv });
        }
        let cpda = b[10];
        if cpda > MAX_PDA {
            return Err(PduError::Cpda { cpda });
        }
        let dgst = b[11];
        let granted = Digests::from_bits(dgst);
        if dgst & !3 != 0
            || (granted.header && !self.requested.header)
            || (granted.data && !self.requested.data)
        {
            return Err(PduError::DigestNotRequested { dgst });
        }
        let maxh2cdata = le32(b, 12);
        if maxh2cdata < MIN_MAXH2CDATA || maxh2cdata % 4 != 0 {
            return Err(PduError::MaxH2cData { maxh2cdata });
        }
        Ok(IcResp {
            pfv,
            cpda,
            digests: granted,
            maxh2cdata,
        })
    }

    /// CapsuleResp, R2T, C2HData: digest flags, header digest, PDO, PLEN, then the fields.
    fn complete_short_header(&mut self, t: u8, p: IcResp) -> Result<RxEvent, PduError> {
        let b = &self.buf;
        let f = b[1];
        let has_data = t == pdu_type::C2H_DATA;
        if f & (flags::HDGSTF | flags::DDGSTF) != p.digests.flags(has_data) {
            return Err(PduError::DigestFlags { flags: f });
        }
        if p.digests.header {
            let computed = u32::from_le_bytes(header_digest(&b[..SHORT_HLEN]));
            let received = le32(b, SHORT_HLEN);
            if received != computed {
                return Err(PduError::HeaderDigest { received, computed });
            }
        }
        let (pdo, plen) = (b[3], le32(b, 4));
        let header = header_len_after_icresp(p.digests);
        if !has_data {
            if pdo != 0 {
                return Err(PduError::DataOffset { pdo });
            }
            if plen as usize != header {
                return Err(PduError::PduLength { plen });
            }
            let event = if t == pdu_type::CAPSULE_RESP {
                let mut cqe = [0; Cqe::LEN];
                cqe.copy_from_slice(&b[CH_LEN..SHORT_HLEN]);
                RxEvent::CapsuleResp(Cqe::from_bytes(cqe))
            } else {
                let r2t = R2t {
                    cccid: le16(b, 8),
                    ttag: le16(b, 10),
                    r2to: le32(b, 12),
                    r2tl: le32(b, 16),
                };
                if r2t.r2tl == 0 {
                    return Err(PduError::ZeroDataLength);
                }
                RxEvent::R2t(r2t)
            };
            self.next_header();
            return Ok(event);
        }
        // C2HData: data at a PDO aligned to the host's HPDA, after the header and digest.
        if usize::from(pdo) < header || usize::from(pdo) % pda_alignment(self.hpda) != 0 {
            return Err(PduError::DataOffset { pdo });
        }
        let datal = le32(b, 16);
        if datal == 0 {
            return Err(PduError::ZeroDataLength);
        }
        if datal > self.max_data {
            return Err(PduError::DataTooLong {
                datal,
                max: self.max_data,
            });
        }
        let ddgst = if p.digests.data { DIGEST_LEN as u64 } else { 0 };
        if u64::from(plen) != u64::from(pdo) + u64::from(datal) + ddgst {
            return Err(PduError::PduLength { plen });
        }
        let pdu = C2hData {
            cccid: le16(b, 8),
            datao: le32(b, 12),
            datal,
            last: f & flags::LAST_PDU != 0,
            success: f & flags::SUCCESS != 0,
        };
        if pdu.success && !pdu.last {
            return Err(PduError::SuccessWithoutLast);
        }
        self.state = State::Accept(pdu);
        Ok(RxEvent::C2hData(pdu))
    }
}

fn done(pdu: C2hData) -> RxEvent {
    RxEvent::PayloadDone {
        cccid: pdu.cccid,
        last: pdu.last,
        success: pdu.success,
    }
}
