//! Completion queue entries and their status field (NVMe Base 2.0 §4.6).

use std::fmt;

/// Status code types (Base 2.0 Figure 93).
pub mod sct {
    pub const GENERIC: u8 = 0;
    pub const COMMAND_SPECIFIC: u8 = 1;
    pub const MEDIA: u8 = 2;
    pub const PATH: u8 = 3;
    pub const VENDOR: u8 = 7;
}

/// Status codes an initiator acts on or names (Base 2.0 Figures 94-97, Fabrics 1.1 Figure 21).
pub mod sc {
    // Generic command status.
    pub const SUCCESS: u8 = 0x00;
    pub const INVALID_OPCODE: u8 = 0x01;
    pub const INVALID_FIELD: u8 = 0x02;
    pub const CID_CONFLICT: u8 = 0x03;
    pub const DATA_TRANSFER_ERROR: u8 = 0x04;
    pub const ABORTED_POWER_LOSS: u8 = 0x05;
    pub const INTERNAL_ERROR: u8 = 0x06;
    pub const ABORT_REQUESTED: u8 = 0x07;
    pub const ABORTED_SQ_DELETION: u8 = 0x08;
    pub const INVALID_NAMESPACE: u8 = 0x0b;
    pub const COMMAND_SEQUENCE_ERROR: u8 = 0x0c;
    pub const SGL_LENGTH_INVALID: u8 = 0x0f;
    pub const SGL_TYPE_INVALID: u8 = 0x11;
    pub const COMMAND_INTERRUPTED: u8 = 0x21;
    pub const TRANSIENT_TRANSPORT_ERROR: u8 = 0x22;
    pub const LBA_OUT_OF_RANGE: u8 = 0x80;
    pub const CAPACITY_EXCEEDED: u8 = 0x81;
    pub const NAMESPACE_NOT_READY: u8 = 0x82;
    pub const RESERVATION_CONFLICT: u8 = 0x83;
    // Command specific, Fabrics Connect.
    pub const CONNECT_INCOMPATIBLE_FORMAT: u8 = 0x80;
    pub const CONNECT_CONTROLLER_BUSY: u8 = 0x81;
    pub const CONNECT_INVALID_PARAMETERS: u8 = 0x82;
    pub const CONNECT_RESTART_DISCOVERY: u8 = 0x83;
    pub const CONNECT_INVALID_HOST: u8 = 0x84;
    // Media and data integrity errors.
    pub const WRITE_FAULT: u8 = 0x80;
    pub const UNRECOVERED_READ_ERROR: u8 = 0x81;
    pub const GUARD_CHECK_ERROR: u8 = 0x82;
    pub const APPLICATION_TAG_CHECK_ERROR: u8 = 0x83;
    pub const REFERENCE_TAG_CHECK_ERROR: u8 = 0x84;
    pub const ACCESS_DENIED: u8 = 0x86;
    pub const DEALLOCATED_OR_UNWRITTEN: u8 = 0x87;
}

/// A 16-byte completion queue entry (Base 2.0 §4.6, Figure 89), kept in wire format.
#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(C, align(4))]
pub struct Cqe {
    raw: [u8; 16],
}

const _: () = assert!(size_of::<Cqe>() == 16);

impl fmt::Debug for Cqe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cqe")
            .field("dw0", &self.dw0())
            .field("dw1", &self.dw1())
            .field("sqhd", &self.sqhd())
            .field("sqid", &self.sqid())
            .field("cid", &self.cid())
            .field("status", &self.status())
            .field("phase", &self.phase())
            .finish()
    }
}

impl Cqe {
    pub const LEN: usize = 16;

    pub fn from_bytes(raw: [u8; 16]) -> Cqe {
        Cqe { raw }
    }

    pub fn as_bytes(&self) -> &[u8; 16] {
        &self.raw
    }

    /// Command specific result.
    pub fn dw0(&self) -> u32 {
        super::le32(&self.raw, 0)
    }

    pub fn dw1(&self) -> u32 {
        super::le32(&self.raw, 4)
    }

    /// The value of a Property Get (Fabrics 1.1 §3.4): DW0 and DW1.
    pub fn property_value(&self) -> u64 {
        super::le64(&self.raw, 0)
    }

    /// Submission queue head pointer.
    pub fn sqhd(&self) -> u16 {
        super::le16(&self.raw, 8)
    }

    pub fn sqid(&self) -> u16 {
        super::le16(&self.raw, 10)
    }

    pub fn cid(&self) -> u16 {
        super::le16(&self.raw, 12)
    }

    /// Phase tag (PCIe queues; not meaningful over fabrics).
    pub fn phase(&self) -> bool {
        self.raw[14] & 1 != 0
    }

    pub fn status(&self) -> Status {
        Status::from_field(super::le16(&self.raw, 14))
    }

    /// For a Connect that failed with Invalid Parameters, which parameter (Fabrics 1.1
    /// Figure 21: IATTR in DW0 bits 23:16, IPO in bits 15:0).
    pub fn connect_invalid_parameter(&self) -> Option<InvalidParameter> {
        let st = self.status();
        (st.sct() == sct::COMMAND_SPECIFIC && st.sc() == sc::CONNECT_INVALID_PARAMETERS).then(
            || InvalidParameter {
                in_data: (self.dw0() >> 16) & 1 != 0,
                offset: (self.dw0() & 0xffff) as u16,
            },
        )
    }
}

/// The parameter a controller refused in a Connect command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InvalidParameter {
    /// In the Connect data (else in the SQE).
    pub in_data: bool,
    /// Byte offset of the parameter.
    pub offset: u16,
}

impl fmt::Display for InvalidParameter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (place, name) = if self.in_data {
            let name = match self.offset {
                0 => " (HOSTID)",
                16 => " (CNTLID)",
                256 => " (SUBNQN)",
                512 => " (HOSTNQN)",
                _ => "",
            };
            ("connect data", name)
        } else {
            let name = match self.offset {
                42 => " (QID)",
                44 => " (SQSIZE)",
                46 => " (CATTR)",
                48 => " (KATO)",
                _ => "",
            };
            ("connect command", name)
        };
        write!(
            f,
            "invalid parameter at byte {} of the {place}{name}",
            self.offset
        )
    }
}

/// The status field of a completion (Base 2.0 Figure 92) without the phase tag.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Status(u16);

impl fmt::Debug for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Status({self}")?;
        if self.dnr() {
            write!(f, ", dnr")?;
        }
        if self.more() {
            write!(f, ", more")?;
        }
        if self.crd() != 0 {
            write!(f, ", crd {}", self.crd())?;
        }
        write!(f, ")")
    }
}

impl Status {
    pub const SUCCESS: Status = Status(0);
    const DNR: u16 = 1 << 15;
    const MORE: u16 = 1 << 14;

    /// From the 16-bit status field of a CQE (bit 0, the phase tag, is dropped).
    pub fn from_field(field: u16) -> Status {
        Status(field & !1)
    }

    /// Status code type and status code, with the Do Not Retry bit.
    pub fn new(sct: u8, sc: u8, dnr: bool) -> Status {
        let dnr = if dnr { Status::DNR } else { 0 };
        Status((u16::from(sct & 7) << 9) | (u16::from(sc) << 1) | dnr)
    }

    /// The 16-bit status field, phase tag clear.
    pub fn field(self) -> u16 {
        self.0
    }

    pub fn sc(self) -> u8 {
        (self.0 >> 1) as u8
    }

    pub fn sct(self) -> u8 {
        ((self.0 >> 9) & 7) as u8
    }

    /// Command Retry Delay: index into the controller's CRDT values, 0 for none.
    pub fn crd(self) -> u8 {
        ((self.0 >> 12) & 3) as u8
    }

    /// More status information in the Error Information log page.
    pub fn more(self) -> bool {
        self.0 & Status::MORE != 0
    }

    /// Do Not Retry.
    pub fn dnr(self) -> bool {
        self.0 & Status::DNR != 0
    }

    pub fn is_success(self) -> bool {
        self.sct() == sct::GENERIC && self.sc() == sc::SUCCESS
    }

    /// The same command may succeed if sent again, possibly on another path: DNR clear and a
    /// path error or a transient condition (Base 2.0 §4.6.1.2.1, §8.13.2).
    pub fn is_retryable(self) -> bool {
        if self.is_success() || self.dnr() {
            return false;
        }
        match self.sct() {
            sct::PATH => true,
            sct::GENERIC => matches!(
                self.sc(),
                sc::NAMESPACE_NOT_READY
                    | sc::ABORTED_SQ_DELETION
                    | sc::COMMAND_INTERRUPTED
                    | sc::TRANSIENT_TRANSPORT_ERROR
            ),
            _ => false,
        }
    }

    fn name(self) -> Option<&'static str> {
        Some(match (self.sct(), self.sc()) {
            (sct::GENERIC, sc::SUCCESS) => "success",
            (sct::GENERIC, sc::INVALID_OPCODE) => "invalid opcode",
            (sct::GENERIC, sc::INVALID_FIELD) => "invalid field in command",
            (sct::GENERIC, sc::CID_CONFLICT) => "command id conflict",
            (sct::GENERIC, sc::DATA_TRANSFER_ERROR) => "data transfer error",
            (sct::GENERIC, sc::ABORTED_POWER_LOSS) => "aborted: power loss",
            (sct::GENERIC, sc::INTERNAL_ERROR) => "internal error",
            (sct::GENERIC, sc::ABORT_REQUESTED) => "aborted: abort requested",
            (sct::GENERIC, sc::ABORTED_SQ_DELETION) => "aborted: queue deleted",
            (sct::GENERIC, sc::INVALID_NAMESPACE) => "invalid namespace or format",
            (sct::GENERIC, sc::COMMAND_SEQUENCE_ERROR) => "command sequence error",
            (sct::GENERIC, sc::SGL_LENGTH_INVALID) => "data SGL length invalid",
            (sct::GENERIC, sc::SGL_TYPE_INVALID) => "SGL descriptor type invalid",
            (sct::GENERIC, sc::COMMAND_INTERRUPTED) => "command interrupted",
            (sct::GENERIC, sc::TRANSIENT_TRANSPORT_ERROR) => "transient transport error",
            (sct::GENERIC, sc::LBA_OUT_OF_RANGE) => "LBA out of range",
            (sct::GENERIC, sc::CAPACITY_EXCEEDED) => "capacity exceeded",
            (sct::GENERIC, sc::NAMESPACE_NOT_READY) => "namespace not ready",
            (sct::GENERIC, sc::RESERVATION_CONFLICT) => "reservation conflict",
            // 80h-84h of this type are the Fabrics Connect codes (Fabrics 1.1 Figure 21);
            // no command an initiator sends reuses them.
            (sct::COMMAND_SPECIFIC, sc::CONNECT_INCOMPATIBLE_FORMAT) => {
                "connect: incompatible format"
            }
            (sct::COMMAND_SPECIFIC, sc::CONNECT_CONTROLLER_BUSY) => "connect: controller busy",
            (sct::COMMAND_SPECIFIC, sc::CONNECT_INVALID_PARAMETERS) => {
                "connect: invalid parameters"
            }
            (sct::COMMAND_SPECIFIC, sc::CONNECT_RESTART_DISCOVERY) => "connect: restart discovery",
            (sct::COMMAND_SPECIFIC, sc::CONNECT_INVALID_HOST) => "connect: invalid host",
            (sct::MEDIA, sc::WRITE_FAULT) => "write fault",
            (sct::MEDIA, sc::UNRECOVERED_READ_ERROR) => "unrecovered read error",
            (sct::MEDIA, sc::GUARD_CHECK_ERROR) => "end-to-end guard check error",
            (sct::MEDIA, sc::APPLICATION_TAG_CHECK_ERROR) => {
                "end-to-end application tag check error"
            }
            (sct::MEDIA, sc::REFERENCE_TAG_CHECK_ERROR) => "end-to-end reference tag check error",
            (sct::MEDIA, sc::ACCESS_DENIED) => "access denied",
            (sct::MEDIA, sc::DEALLOCATED_OR_UNWRITTEN) => "deallocated or unwritten block",
            _ => return None,
        })
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(name) => f.write_str(name),
            None => write!(f, "sct {:#x} sc {:#04x}", self.sct(), self.sc()),
        }
    }
}
