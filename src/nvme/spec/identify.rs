//! Identify data structures (NVMe Base 2.0 §5.17.2, NVM Command Set 1.0 §4.1.5).

use super::regs::{Cap, Version};
use super::{SpecError, byte, le16, le32, le64, take, text};

/// Every Identify data structure is 4096 bytes.
pub const IDENTIFY_LEN: usize = 4096;

/// Controller type (Identify Controller CNTRLTYPE, Base 2.0 Figure 275 byte 111).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ControllerType {
    /// Reported as 0 by controllers older than NVMe 1.4.
    NotReported,
    Io,
    Discovery,
    Admin,
    Reserved(u8),
}

impl ControllerType {
    fn from_raw(v: u8) -> ControllerType {
        match v {
            0 => ControllerType::NotReported,
            1 => ControllerType::Io,
            2 => ControllerType::Discovery,
            3 => ControllerType::Admin,
            other => ControllerType::Reserved(other),
        }
    }
}

/// Optional NVM Command Support (ONCS).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Oncs(pub u16);

impl Oncs {
    pub fn dsm(self) -> bool {
        self.0 & (1 << 2) != 0
    }

    pub fn write_zeroes(self) -> bool {
        self.0 & (1 << 3) != 0
    }
}

/// SGL Support (SGLS).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sgls(pub u32);

impl Sgls {
    /// SGLs are supported for the NVM command set (bits 1:0 non-zero).
    pub fn supported(self) -> bool {
        self.0 & 3 != 0
    }

    /// The Address field of a Data Block descriptor may be an offset (bit 20).
    pub fn offset_addressing(self) -> bool {
        self.0 & (1 << 20) != 0
    }

    /// Transport SGL Data Block descriptors are supported (bit 21).
    pub fn transport_data_block(self) -> bool {
        self.0 & (1 << 21) != 0
    }
}

/// What an initiator needs from Identify Controller (Base 2.0 Figure 275).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdentifyController {
    pub vid: u16,
    pub sn: String,
    pub mn: String,
    pub fr: String,
    /// Maximum Data Transfer Size: `2^MDTS` minimum-size pages; 0 for no limit.
    pub mdts: u8,
    pub cntlid: u16,
    pub ver: Version,
    pub cntrltype: ControllerType,
    /// Optional Asynchronous Events Supported (bit 8: Namespace Attribute Notices).
    pub oaes: u32,
    /// Keep Alive Support: granularity in 100 ms units, 0 if keep alive is not supported.
    pub kas: u16,
    /// Maximum outstanding commands (fabrics); 0 if not reported.
    pub maxcmd: u16,
    /// Number of Namespaces: the largest valid NSID.
    pub nn: u32,
    pub oncs: Oncs,
    /// A volatile write cache is present (VWC bit 0).
    pub vwc: bool,
    pub sgls: Sgls,
    pub subnqn: String,
    /// I/O Queue Command Capsule Supported Size, in 16-byte units (fabrics).
    pub ioccsz: u32,
    /// I/O Queue Response Capsule Supported Size, in 16-byte units (fabrics).
    pub iorcsz: u32,
    /// In Capsule Data Offset, in 16-byte units (fabrics).
    pub icdoff: u16,
    /// Maximum SGL Data Block Descriptors per command (fabrics); 0 for no limit.
    pub msdbd: u8,
}

impl IdentifyController {
    pub fn parse(buf: &[u8]) -> Result<IdentifyController, SpecError> {
        let b = take(buf, IDENTIFY_LEN, "identify controller")?;
        Ok(IdentifyController {
            vid: le16(b, 0),
            sn: text(b, 4, 20),
            mn: text(b, 24, 40),
            fr: text(b, 64, 8),
            mdts: byte(b, 77),
            cntlid: le16(b, 78),
            ver: Version(le32(b, 80)),
            cntrltype: ControllerType::from_raw(byte(b, 111)),
            oaes: le32(b, 92),
            kas: le16(b, 320),
            maxcmd: le16(b, 514),
            nn: le32(b, 516),
            oncs: Oncs(le16(b, 520)),
            vwc: byte(b, 525) & 1 != 0,
            sgls: Sgls(le32(b, 536)),
            subnqn: text(b, 768, 256),
            ioccsz: le32(b, 1792),
            iorcsz: le32(b, 1796),
            icdoff: le16(b, 1800),
            msdbd: byte(b, 1803),
        })
    }

    /// Largest data transfer in bytes, from MDTS and CAP.MPSMIN; `None` for no limit.
    pub fn max_transfer_bytes(&self, cap: Cap) -> Option<u64> {
        (self.mdts != 0).then(|| {
            u64::from(cap.page_size_min())
                .checked_shl(u32::from(self.mdts))
                .unwrap_or(u64::MAX)
        })
    }

    /// Most in-capsule data an I/O command may carry: the capsule size less the 64-byte SQE
    /// (Fabrics 1.1 §2.2).
    pub fn in_capsule_data_max(&self) -> u32 {
        self.ioccsz.saturating_mul(16).saturating_sub(64)
    }
}

/// One LBA format (NVM Command Set 1.0 Figure 98).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LbaFormat {
    /// Metadata bytes per logical block.
    pub ms: u16,
    /// LBA data size: blocks of `2^LBADS` bytes; 0 if the format is not available.
    pub lbads: u8,
    /// Relative performance, 0 (best) to 3.
    pub rp: u8,
}

/// What a read of a deallocated logical block returns (DLFEAT bits 2:0, NVM Command Set 1.0
/// Figure 97).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeallocatedRead {
    /// Not reported (000b), or a reserved value.
    Unreported,
    /// Every byte 00h (001b).
    Zeroes,
    /// Every byte FFh (010b).
    Ones,
}

impl DeallocatedRead {
    pub fn as_str(self) -> &'static str {
        match self {
            DeallocatedRead::Unreported => "unreported",
            DeallocatedRead::Zeroes => "zeroes",
            DeallocatedRead::Ones => "ones",
        }
    }
}

/// Most LBA formats a namespace reports (NLBAF is 0-based, at most 63).
const MAX_LBAF: usize = 64;

/// What an initiator needs from Identify Namespace (NVM Command Set 1.0 Figure 97).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdentifyNamespace {
    /// Namespace size in logical blocks.
    pub nsze: u64,
    pub ncap: u64,
    pub nuse: u64,
    pub nsfeat: u8,
    /// Deallocate Logical Block Features (byte 33): see [`IdentifyNamespace::deallocated_read`]
    /// and [`IdentifyNamespace::write_zeroes_deallocates`].
    pub dlfeat: u8,
    /// Number of LBA formats, 0-based.
    pub nlbaf: u8,
    pub flbas: u8,
    /// Namespace Optimal I/O Boundary in logical blocks; 0 if not reported.
    pub noiob: u16,
    lbaf: [LbaFormat; MAX_LBAF],
}

impl IdentifyNamespace {
    /// Parses and checks that the namespace is active and its selected format usable: the
    /// format index within NLBAF and a block size of 512 bytes to 64 KiB.
    pub fn parse(buf: &[u8]) -> Result<IdentifyNamespace, SpecError> {
        let b = take(buf, IDENTIFY_LEN, "identify namespace")?;
        let mut lbaf = [LbaFormat::default(); MAX_LBAF];
        for (i, f) in lbaf.iter_mut().enumerate() {
            let off = 128 + 4 * i;
            *f = LbaFormat {
                ms: le16(b, off),
                lbads: byte(b, off + 2),
                rp: byte(b, off + 3) & 3,
            };
        }
        let ns = IdentifyNamespace {
            nsze: le64(b, 0),
            ncap: le64(b, 8),
            nuse: le64(b, 16),
            nsfeat: byte(b, 24),
            dlfeat: byte(b, 33),
            nlbaf: byte(b, 25),
            flbas: byte(b, 26),
            noiob: le16(b, 46),
            lbaf,
        };
        if ns.nsze == 0 {
            return Err(SpecError::NamespaceInactive);
        }
        let index = ns.format_index();
        if index > ns.nlbaf || usize::from(index) >= MAX_LBAF {
            return Err(SpecError::LbaFormatIndex {
                index,
                nlbaf: ns.nlbaf,
            });
        }
        let lbads = ns.lba_format().lbads;
        if !(9..=16).contains(&lbads) {
            return Err(SpecError::LbaDataSize { index, lbads });
        }
        Ok(ns)
    }

    /// The formats the namespace reports (NLBAF + 1 of them).
    pub fn lba_formats(&self) -> &[LbaFormat] {
        let n = (usize::from(self.nlbaf) + 1).min(MAX_LBAF);
        &self.lbaf[..n]
    }

    /// The selected format: FLBAS bits 3:0, and bits 6:5 as bits 5:4 (they are 0 unless more
    /// than 16 formats are reported).
    pub fn format_index(&self) -> u8 {
        (self.flbas & 0xf) | ((self.flbas & 0x60) >> 1)
    }

    /// Metadata is transferred at the end of each block (FLBAS bit 4).
    pub fn extended_metadata(&self) -> bool {
        self.flbas & (1 << 4) != 0
    }

    pub fn lba_format(&self) -> LbaFormat {
        self.lbaf
            .get(usize::from(self.format_index()))
            .copied()
            .unwrap_or_default()
    }

    /// What reading a deallocated block returns (DLFEAT bits 2:0).
    pub fn deallocated_read(&self) -> DeallocatedRead {
        match self.dlfeat & 0x7 {
            0b001 => DeallocatedRead::Zeroes,
            0b010 => DeallocatedRead::Ones,
            _ => DeallocatedRead::Unreported,
        }
    }

    /// A Write Zeroes with the Deallocate bit may deallocate the blocks instead of writing
    /// them, and they still read as zeroes: the controller supports DEAC in Write Zeroes
    /// (DLFEAT bit 3) and deallocated blocks read as 00h (NVM Command Set 1.0 §3.2.8).
    pub fn write_zeroes_deallocates(&self) -> bool {
        self.dlfeat & (1 << 3) != 0 && self.deallocated_read() == DeallocatedRead::Zeroes
    }

    /// Logical block size in bytes.
    pub fn block_size(&self) -> u32 {
        1 << self.lba_format().lbads.min(16)
    }
}

/// The Active Namespace ID list (Base 2.0 §5.17.2.2): up to 1024 NSIDs in increasing order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ActiveNamespaces(pub Vec<u32>);

impl ActiveNamespaces {
    pub fn parse(buf: &[u8]) -> Result<ActiveNamespaces, SpecError> {
        let b = take(buf, IDENTIFY_LEN, "active namespace list")?;
        let mut ids: Vec<u32> = Vec::new();
        for (index, chunk) in b.chunks_exact(4).enumerate() {
            let id = le32(chunk, 0);
            if id == 0 {
                break;
            }
            if ids.last().is_some_and(|&prev| prev >= id) {
                return Err(SpecError::NamespaceListOrder { index });
            }
            ids.push(id);
        }
        Ok(ActiveNamespaces(ids))
    }
}
