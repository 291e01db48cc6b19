//! Encoders for the PDUs a host sends. Each writes a header into a caller array and returns
//! how many bytes of it to send; data and data digests are the caller's.

use super::{
    CAPSULE_CMD_HLEN, CH_LEN, DIGEST_LEN, Digests, Fes, IC_LEN, IcResp, MAX_PDA, SHORT_HLEN,
    TERM_REQ_MAX_DATA, TERM_REQ_MAX_PLEN, TX_HEADER_MAX, flags, header_digest, pda_alignment,
    pdu_type,
};
use crate::nvme::spec::Sqe;

/// Writes a common header.
fn put_ch(out: &mut [u8], pdu_type: u8, flags: u8, hlen: usize, pdo: usize, plen: u32) {
    out[0] = pdu_type;
    out[1] = flags;
    // HLEN and PDO are at most 144 here (TX_HEADER_MAX).
    out[2] = hlen as u8;
    out[3] = pdo as u8;
    out[4..8].copy_from_slice(&plen.to_le_bytes());
}

/// Adds the header digest after `hlen` bytes, zeroes padding up to the data offset, and
/// returns the data offset (the number of header bytes to send) for a PDU with data, or the
/// header length with digest for one without.
fn finish_header(out: &mut [u8; TX_HEADER_MAX], hlen: usize, p: &IcResp, has_data: bool) -> usize {
    let mut end = hlen;
    if p.digests.header {
        let d = header_digest(&out[..hlen]);
        out[hlen..hlen + DIGEST_LEN].copy_from_slice(&d);
        end += DIGEST_LEN;
    }
    if !has_data {
        return end;
    }
    let pdo = end.next_multiple_of(pda_alignment(p.cpda));
    out[end..pdo].fill(0);
    pdo
}

/// PDO and PLEN of a PDU: data at the first `cpda`-aligned offset after the header and its
/// digest (§3.6.2.1), then the data digest.
fn layout(hlen: usize, data_len: u32, p: &IcResp) -> (usize, u32) {
    let header = hlen + p.digests.header_len();
    if data_len == 0 {
        return (0, header as u32);
    }
    let pdo = header.next_multiple_of(pda_alignment(p.cpda));
    let ddgst = if p.digests.data { DIGEST_LEN as u32 } else { 0 };
    let plen = (pdo as u32).saturating_add(data_len).saturating_add(ddgst);
    (pdo, plen)
}

/// Initialize Connection Request parameters (§3.6.2.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IcReq {
    /// Host PDU Data Alignment: the controller places C2HData data at multiples of
    /// `(hpda + 1) * 4` bytes. Values above [`MAX_PDA`] are taken as [`MAX_PDA`].
    pub hpda: u8,
    /// Digests the host asks for; the controller may grant fewer.
    pub digests: Digests,
    /// Most outstanding R2Ts per command, 0-based.
    pub maxr2t: u32,
}

impl IcReq {
    pub fn encode(&self) -> [u8; IC_LEN] {
        let mut b = [0; IC_LEN];
        put_ch(&mut b, pdu_type::ICREQ, 0, IC_LEN, 0, IC_LEN as u32);
        // PFV (bytes 9:8) is 0, the only version.
        b[10] = self.hpda.min(MAX_PDA);
        b[11] = self.digests.bits();
        b[12..16].copy_from_slice(&self.maxr2t.to_le_bytes());
        b
    }
}

/// Writes the header of a CapsuleCmd PDU (§3.6.2.5) carrying `sqe` and `data_len` bytes of
/// in-capsule data, with the parameters the controller granted in `params`. Returns the
/// number of header bytes to send: CH, SQE, header digest and padding up to PDO. The data
/// follows, then, if `params.digests.data` and `data_len > 0`, its [`super::DataDigest`].
pub fn encode_capsule_cmd(
    out: &mut [u8; TX_HEADER_MAX],
    sqe: &Sqe,
    data_len: u32,
    params: &IcResp,
) -> usize {
    let has_data = data_len > 0;
    let (pdo, plen) = layout(CAPSULE_CMD_HLEN, data_len, params);
    let f = params.digests.flags(has_data);
    put_ch(out, pdu_type::CAPSULE_CMD, f, CAPSULE_CMD_HLEN, pdo, plen);
    out[CH_LEN..CAPSULE_CMD_HLEN].copy_from_slice(sqe.as_bytes());
    finish_header(out, CAPSULE_CMD_HLEN, params, has_data)
}

/// The fields of an H2CData PDU (§3.6.2.7).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct H2cData {
    /// Command Capsule CID of the command the R2T was for.
    pub cccid: u16,
    /// Transfer tag of that R2T.
    pub ttag: u16,
    /// Offset of this data in the command's data.
    pub datao: u32,
    /// Length of this PDU's data, non-zero and at most MAXH2CDATA.
    pub datal: u32,
    /// Last PDU of the data the R2T asked for.
    pub last: bool,
}

/// Writes the header of an H2CData PDU. Returns the number of header bytes to send (up to
/// PDO); `datal` bytes of data follow, then the data digest if negotiated.
pub fn encode_h2c_data(out: &mut [u8; TX_HEADER_MAX], pdu: &H2cData, params: &IcResp) -> usize {
    let (pdo, plen) = layout(SHORT_HLEN, pdu.datal, params);
    let mut f = params.digests.flags(pdu.datal > 0);
    if pdu.last {
        f |= flags::LAST_PDU;
    }
    put_ch(out, pdu_type::H2C_DATA, f, SHORT_HLEN, pdo, plen);
    out[8..10].copy_from_slice(&pdu.cccid.to_le_bytes());
    out[10..12].copy_from_slice(&pdu.ttag.to_le_bytes());
    out[12..16].copy_from_slice(&pdu.datao.to_le_bytes());
    out[16..20].copy_from_slice(&pdu.datal.to_le_bytes());
    out[20..24].fill(0);
    finish_header(out, SHORT_HLEN, params, pdu.datal > 0)
}

/// Writes an H2CTermReq PDU (§3.6.2.4) reporting `fes` / `fei` (see
/// [`super::PduError::term_req`]) with up to 128 bytes of the header in error. Termination
/// requests carry no digests. Returns the PDU's length.
pub fn encode_h2c_term_req(
    out: &mut [u8; TERM_REQ_MAX_PLEN],
    fes: Fes,
    fei: u32,
    header: &[u8],
) -> usize {
    let header = header.get(..TERM_REQ_MAX_DATA).unwrap_or(header);
    let plen = SHORT_HLEN + header.len();
    put_ch(out, pdu_type::H2C_TERM_REQ, 0, SHORT_HLEN, 0, plen as u32);
    out[8..10].copy_from_slice(&(fes as u16).to_le_bytes());
    out[10..14].copy_from_slice(&fei.to_le_bytes());
    out[14..SHORT_HLEN].fill(0);
    out[SHORT_HLEN..plen].copy_from_slice(header);
    plen
}
