//! Asynchronous events (NVMe Base 2.0 §5.2): what the completion of an Asynchronous Event
//! Request reports, the configuration that enables namespace notices, and the Changed
//! Namespace List log page such a notice points to.

use super::{SpecError, le32, take};

/// Asynchronous Event Configuration bit 8 (Base 2.0 Figure 322), also Identify Controller
/// OAES bit 8: Namespace Attribute Notices (a namespace's attributes, its size among them,
/// changed).
pub const AEC_NAMESPACE_ATTRIBUTE: u32 = 1 << 8;

/// The Changed Namespace List log page: 1024 namespace identifiers.
pub const CHANGED_NAMESPACES_LEN: usize = 4096;

/// Asynchronous Event Type (Base 2.0 Figure 146, DW0 bits 2:0).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AsyncEventType {
    Error,
    Health,
    Notice,
    CommandSet,
    Vendor,
    Reserved(u8),
}

impl AsyncEventType {
    fn from_raw(v: u8) -> AsyncEventType {
        match v {
            0 => AsyncEventType::Error,
            1 => AsyncEventType::Health,
            2 => AsyncEventType::Notice,
            6 => AsyncEventType::CommandSet,
            7 => AsyncEventType::Vendor,
            other => AsyncEventType::Reserved(other),
        }
    }

    fn raw(self) -> u8 {
        match self {
            AsyncEventType::Error => 0,
            AsyncEventType::Health => 1,
            AsyncEventType::Notice => 2,
            AsyncEventType::CommandSet => 6,
            AsyncEventType::Vendor => 7,
            AsyncEventType::Reserved(v) => v & 7,
        }
    }
}

/// Notice information: Namespace Attribute Changed (Base 2.0 Figure 150).
const NOTICE_NAMESPACE_ATTRIBUTE: u8 = 0x00;

/// The event an Asynchronous Event Request completed with (Base 2.0 Figure 146).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AsyncEvent {
    pub kind: AsyncEventType,
    /// Asynchronous Event Information: which event of its type.
    pub info: u8,
    /// The log page that tells more, and whose reading clears the event.
    pub log_page: u8,
}

impl AsyncEvent {
    /// The Namespace Attribute Changed notice: read the Changed Namespace List.
    pub const NAMESPACE_CHANGED: AsyncEvent = AsyncEvent {
        kind: AsyncEventType::Notice,
        info: NOTICE_NAMESPACE_ATTRIBUTE,
        log_page: super::LID_CHANGED_NAMESPACES,
    };

    /// Decodes DW0 of the completion.
    pub fn from_dw0(dw0: u32) -> AsyncEvent {
        AsyncEvent {
            kind: AsyncEventType::from_raw((dw0 & 7) as u8),
            info: (dw0 >> 8) as u8,
            log_page: (dw0 >> 16) as u8,
        }
    }

    /// DW0 of a completion reporting this event.
    pub fn dw0(self) -> u32 {
        u32::from(self.kind.raw()) | (u32::from(self.info) << 8) | (u32::from(self.log_page) << 16)
    }

    /// Some namespace's attributes changed (its size, among others).
    pub fn namespace_changed(self) -> bool {
        self.kind == AsyncEventType::Notice && self.info == NOTICE_NAMESPACE_ATTRIBUTE
    }
}

/// The Changed Namespace List log page (Base 2.0 §5.16.1.5).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChangedNamespaces {
    /// These namespaces changed since the page was last read (in the controller's order).
    Listed(Vec<u32>),
    /// More than 1024 changed (the first entry is FFFFFFFFh): any of them may have.
    Overflow,
}

impl ChangedNamespaces {
    /// Parses the 4096-byte page: identifiers up to the first zero.
    pub fn parse(buf: &[u8]) -> Result<ChangedNamespaces, SpecError> {
        let b = take(buf, CHANGED_NAMESPACES_LEN, "changed namespace list")?;
        let ids: Vec<u32> = (0..CHANGED_NAMESPACES_LEN / 4)
            .map(|i| le32(b, i * 4))
            .take_while(|&id| id != 0)
            .collect();
        if ids.first() == Some(&u32::MAX) {
            return Ok(ChangedNamespaces::Overflow);
        }
        Ok(ChangedNamespaces::Listed(ids))
    }

    /// Namespace `nsid` may have changed.
    pub fn contains(&self, nsid: u32) -> bool {
        match self {
            ChangedNamespaces::Listed(ids) => ids.contains(&nsid),
            ChangedNamespaces::Overflow => true,
        }
    }
}
