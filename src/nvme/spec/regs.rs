//! Controller registers (NVMe Base 2.0 §3.1.3), which Fabrics reaches as properties
//! (Fabrics 1.1 §3.4-3.5) and PCIe as BAR0 offsets.

use std::fmt;

/// Width of a property (ATTRIB bits 2:0 of Property Get / Set).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum PropertySize {
    Four = 0,
    Eight = 1,
}

/// The registers an initiator uses, with their offsets (Base 2.0 Figure 35).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Property {
    Cap,
    Vs,
    Cc,
    Csts,
}

impl Property {
    pub fn offset(self) -> u32 {
        match self {
            Property::Cap => 0x00,
            Property::Vs => 0x08,
            Property::Cc => 0x14,
            Property::Csts => 0x1c,
        }
    }

    pub fn size(self) -> PropertySize {
        match self {
            Property::Cap => PropertySize::Eight,
            Property::Vs | Property::Cc | Property::Csts => PropertySize::Four,
        }
    }
}

fn bits64(v: u64, lo: u32, width: u32) -> u64 {
    (v >> lo) & ((1 << width) - 1)
}

fn bits32(v: u32, lo: u32, width: u32) -> u32 {
    (v >> lo) & ((1 << width) - 1)
}

/// Controller Capabilities (Base 2.0 §3.1.3.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cap(pub u64);

impl Cap {
    /// Maximum Queue Entries Supported, 0-based.
    pub fn mqes(self) -> u16 {
        bits64(self.0, 0, 16) as u16
    }

    /// Contiguous Queues Required.
    pub fn cqr(self) -> bool {
        bits64(self.0, 16, 1) != 0
    }

    /// Timeout: worst-case time for CSTS.RDY to follow CC.EN, in 500 ms units.
    pub fn to(self) -> u8 {
        bits64(self.0, 24, 8) as u8
    }

    pub fn timeout_ms(self) -> u32 {
        u32::from(self.to()) * 500
    }

    /// Doorbell Stride: doorbells are `4 << DSTRD` bytes apart.
    pub fn dstrd(self) -> u8 {
        bits64(self.0, 32, 4) as u8
    }

    /// Command Sets Supported (bit 0: NVM command set).
    pub fn css(self) -> u8 {
        bits64(self.0, 37, 8) as u8
    }

    /// Memory Page Size Minimum: pages of `2^(12 + MPSMIN)` bytes.
    pub fn mpsmin(self) -> u8 {
        bits64(self.0, 48, 4) as u8
    }

    /// Memory Page Size Maximum: pages of `2^(12 + MPSMAX)` bytes.
    pub fn mpsmax(self) -> u8 {
        bits64(self.0, 52, 4) as u8
    }

    /// The smallest memory page size, in bytes.
    pub fn page_size_min(self) -> u32 {
        1 << (12 + u32::from(self.mpsmin()))
    }
}

/// Version (Base 2.0 §3.1.3.2), also reported by Identify Controller.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Version(pub u32);

impl Version {
    pub fn major(self) -> u16 {
        (self.0 >> 16) as u16
    }

    pub fn minor(self) -> u8 {
        (self.0 >> 8) as u8
    }

    pub fn tertiary(self) -> u8 {
        self.0 as u8
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major(), self.minor(), self.tertiary())
    }
}

/// Shutdown Notification (CC.SHN).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Shn {
    None = 0,
    Normal = 1,
    Abrupt = 2,
}

/// Controller Configuration (Base 2.0 §3.1.3.5).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cc(pub u32);

impl Cc {
    /// I/O Submission Queue Entry Size: 2^6 = 64 bytes.
    pub const IOSQES: u32 = 6;
    /// I/O Completion Queue Entry Size: 2^4 = 16 bytes.
    pub const IOCQES: u32 = 4;

    /// Enabled, NVM command set, round robin arbitration, memory pages of
    /// `2^(12 + mps)` bytes, 64-byte SQEs and 16-byte CQEs.
    pub fn enabled(mps: u8) -> Cc {
        Cc(1 | (u32::from(mps & 0xf) << 7) | (Cc::IOSQES << 16) | (Cc::IOCQES << 20))
    }

    pub fn en(self) -> bool {
        self.0 & 1 != 0
    }

    pub fn with_en(self, en: bool) -> Cc {
        Cc((self.0 & !1) | u32::from(en))
    }

    /// I/O Command Set Selected (0: NVM).
    pub fn css(self) -> u8 {
        bits32(self.0, 4, 3) as u8
    }

    pub fn mps(self) -> u8 {
        bits32(self.0, 7, 4) as u8
    }

    /// Arbitration Mechanism Selected (0: round robin).
    pub fn ams(self) -> u8 {
        bits32(self.0, 11, 3) as u8
    }

    /// Shutdown Notification, raw (0 none, 1 normal, 2 abrupt).
    pub fn shn(self) -> u8 {
        bits32(self.0, 14, 2) as u8
    }

    pub fn with_shn(self, shn: Shn) -> Cc {
        Cc((self.0 & !(3 << 14)) | (u32::from(shn as u8) << 14))
    }

    pub fn iosqes(self) -> u8 {
        bits32(self.0, 16, 4) as u8
    }

    pub fn iocqes(self) -> u8 {
        bits32(self.0, 20, 4) as u8
    }
}

/// Shutdown Status (CSTS.SHST).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shst {
    Normal,
    Occurring,
    Complete,
    Reserved,
}

/// Controller Status (Base 2.0 §3.1.3.6).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Csts(pub u32);

impl Csts {
    /// Ready.
    pub fn rdy(self) -> bool {
        self.0 & 1 != 0
    }

    /// Controller Fatal Status.
    pub fn cfs(self) -> bool {
        self.0 & 2 != 0
    }

    pub fn shst(self) -> Shst {
        match bits32(self.0, 2, 2) {
            0 => Shst::Normal,
            1 => Shst::Occurring,
            2 => Shst::Complete,
            _ => Shst::Reserved,
        }
    }
}
