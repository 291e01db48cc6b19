//! The Discovery log page (NVMe Base 2.0 §5.16.1.23).

use std::fmt;

use super::{SpecError, byte, le16, le64, take, text};

/// Length of the log page header; entries follow it.
pub const DISCOVERY_HEADER_LEN: usize = 1024;
/// Length of one Discovery Log Page Entry.
pub const DISCOVERY_ENTRY_LEN: usize = 1024;

/// Transport type of an entry: TCP (Base 2.0 Figure 263).
pub const TRTYPE_TCP: u8 = 3;

/// The header of the Discovery log page (Base 2.0 Figure 262).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiscoveryHeader {
    /// Generation counter: changes whenever the log changes; read it again after the entries
    /// to detect a log that changed between reads.
    pub genctr: u64,
    /// Number of records.
    pub numrec: u64,
    /// Record format, 0.
    pub recfmt: u16,
}

impl DiscoveryHeader {
    pub fn parse(buf: &[u8]) -> Result<DiscoveryHeader, SpecError> {
        let b = take(buf, DISCOVERY_HEADER_LEN, "discovery log header")?;
        Ok(DiscoveryHeader {
            genctr: le64(b, 0),
            numrec: le64(b, 8),
            recfmt: le16(b, 16),
        })
    }
}

/// One Discovery Log Page Entry (Base 2.0 Figure 263).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiscoveryEntry {
    pub trtype: u8,
    pub adrfam: u8,
    pub subtype: u8,
    /// Transport requirements: secure channel in bits 1:0, SQ flow control disable in bit 2.
    pub treq: u8,
    pub portid: u16,
    pub cntlid: u16,
    /// Admin max SQ size.
    pub asqsz: u16,
    pub trsvcid: String,
    pub subnqn: String,
    pub traddr: String,
    /// Security type of a TCP entry (TSAS byte 0, NVMe/TCP 1.0 Figure 5); 0 otherwise.
    pub sectype: u8,
}

impl DiscoveryEntry {
    pub fn parse(buf: &[u8]) -> Result<DiscoveryEntry, SpecError> {
        let b = take(buf, DISCOVERY_ENTRY_LEN, "discovery log entry")?;
        let trtype = byte(b, 0);
        Ok(DiscoveryEntry {
            trtype,
            adrfam: byte(b, 1),
            subtype: byte(b, 2),
            treq: byte(b, 3),
            portid: le16(b, 4),
            cntlid: le16(b, 6),
            asqsz: le16(b, 8),
            trsvcid: text(b, 32, 32),
            subnqn: text(b, 256, 256),
            traddr: text(b, 512, 256),
            sectype: if trtype == TRTYPE_TCP {
                byte(b, 768)
            } else {
                0
            },
        })
    }

    pub fn is_tcp(&self) -> bool {
        self.trtype == TRTYPE_TCP
    }
}

/// A whole Discovery log page.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiscoveryLog {
    pub header: DiscoveryHeader,
    pub entries: Vec<DiscoveryEntry>,
}

impl DiscoveryLog {
    /// Parses the header and all NUMREC entries, which `buf` must hold.
    pub fn parse(buf: &[u8]) -> Result<DiscoveryLog, SpecError> {
        let header = DiscoveryHeader::parse(buf)?;
        let body = buf.get(DISCOVERY_HEADER_LEN..).unwrap_or(&[]);
        let available = body.len() / DISCOVERY_ENTRY_LEN;
        let count = usize::try_from(header.numrec)
            .ok()
            .filter(|&n| n <= available)
            .ok_or(SpecError::DiscoveryTruncated {
                numrec: header.numrec,
                available,
            })?;
        let entries = body
            .chunks_exact(DISCOVERY_ENTRY_LEN)
            .take(count)
            .map(DiscoveryEntry::parse)
            .collect::<Result<_, _>>()?;
        Ok(DiscoveryLog { header, entries })
    }
}

fn trtype_name(v: u8) -> &'static str {
    match v {
        1 => "rdma",
        2 => "fc",
        TRTYPE_TCP => "tcp",
        254 => "loop",
        _ => "unrecognized",
    }
}

fn adrfam_name(v: u8) -> &'static str {
    match v {
        1 => "ipv4",
        2 => "ipv6",
        3 => "infiniband",
        4 => "fibre-channel",
        254 => "loop",
        _ => "unrecognized",
    }
}

fn subtype_name(v: u8) -> &'static str {
    match v {
        1 => "discovery subsystem referral",
        2 => "nvme subsystem",
        3 => "current discovery subsystem",
        _ => "unrecognized",
    }
}

fn treq_name(v: u8) -> &'static str {
    match (v & 3, v & 4 != 0) {
        (0, false) => "not specified",
        (1, false) => "required",
        (2, false) => "not required",
        (0, true) => "not specified, sq flow control disable supported",
        (1, true) => "required, sq flow control disable supported",
        (2, true) => "not required, sq flow control disable supported",
        _ => "reserved",
    }
}

fn sectype_name(v: u8) -> &'static str {
    match v {
        0 => "none",
        1 => "tls1.2",
        2 => "tls1.3",
        _ => "reserved",
    }
}

/// Prints the log as `nvme discover` does.
impl fmt::Display for DiscoveryLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "Discovery Log Number of Records {}, Generation counter {}",
            self.header.numrec, self.header.genctr
        )?;
        for (i, e) in self.entries.iter().enumerate() {
            writeln!(f, "=====Discovery Log Entry {i}======")?;
            writeln!(f, "trtype:  {}", trtype_name(e.trtype))?;
            writeln!(f, "adrfam:  {}", adrfam_name(e.adrfam))?;
            writeln!(f, "subtype: {}", subtype_name(e.subtype))?;
            writeln!(f, "treq:    {}", treq_name(e.treq))?;
            writeln!(f, "portid:  {}", e.portid)?;
            writeln!(f, "trsvcid: {}", e.trsvcid)?;
            writeln!(f, "subnqn:  {}", e.subnqn)?;
            writeln!(f, "traddr:  {}", e.traddr)?;
            if e.is_tcp() {
                writeln!(f, "sectype: {}", sectype_name(e.sectype))?;
            }
        }
        Ok(())
    }
}
