//! NVMe wire types shared by the PCIe and TCP transports.
//!
//! All multi-byte fields are little-endian (NVMe Base 2.0 §1.4.2). Fixed-size structures are
//! byte arrays with typed accessors, pinned by compile-time size asserts, so they can be copied
//! to a submission queue or a capsule as they are and need no `unsafe`. Larger data structures
//! (Identify, discovery log) are parsed into plain structs of what an initiator needs; every
//! parser takes `&[u8]`, checks lengths first and returns [`SpecError`] rather than panicking.

mod cmd;
mod cqe;
mod discovery;
mod events;
mod fabrics;
mod identify;
mod nqn;
mod regs;

#[cfg(test)]
mod tests;

pub use cmd::{
    Cns, DsmRange, FID_ASYNC_EVENT_CONFIG, FID_KEEP_ALIVE_TIMER, FID_NUMBER_OF_QUEUES,
    LID_CHANGED_NAMESPACES, LID_DISCOVERY, Sgl, Sqe, admin_opc, fabrics_type, io_opc,
};
pub use cqe::{Cqe, InvalidParameter, Status, sc, sct};
pub use discovery::{
    DISCOVERY_ENTRY_LEN, DISCOVERY_HEADER_LEN, DiscoveryEntry, DiscoveryHeader, DiscoveryLog,
    TRTYPE_TCP,
};
pub use events::{
    AEC_NAMESPACE_ATTRIBUTE, AsyncEvent, AsyncEventType, CHANGED_NAMESPACES_LEN, ChangedNamespaces,
};
pub use fabrics::{CNTLID_DYNAMIC, CONNECT_DATA_LEN, ConnectData};
pub use identify::{
    ActiveNamespaces, ControllerType, DeallocatedRead, IDENTIFY_LEN, IdentifyController,
    IdentifyNamespace, LbaFormat, Oncs, Sgls,
};
pub use nqn::{DISCOVERY_NQN, HostIdentity, NQN_MAX_LEN, Nqn};
pub use regs::{Cap, Cc, Csts, Property, PropertySize, Shn, Shst, Version};

use thiserror::Error;

/// Why a structure received from a controller (or an NQN given by the user) was refused.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum SpecError {
    #[error("{what}: {got} bytes, need {need}")]
    Short {
        what: &'static str,
        need: usize,
        got: usize,
    },
    #[error("namespace is not active (NSZE 0)")]
    NamespaceInactive,
    #[error("FLBAS selects LBA format {index}, NLBAF allows 0..={nlbaf}")]
    LbaFormatIndex { index: u8, nlbaf: u8 },
    #[error("LBA format {index}: LBADS {lbads} outside 9..=16")]
    LbaDataSize { index: u8, lbads: u8 },
    #[error("active namespace list not in increasing order at entry {index}")]
    NamespaceListOrder { index: usize },
    #[error("discovery log: {numrec} records announced, {available} present")]
    DiscoveryTruncated { numrec: u64, available: usize },
    #[error("NQN of {len} bytes, at most {NQN_MAX_LEN}")]
    NqnTooLong { len: usize },
    #[error("malformed NQN {0:?} (expected nqn.YYYY-MM.reverse.domain[:name])")]
    NqnFormat(String),
}

/// Checks that `buf` holds at least `need` bytes and returns exactly those.
fn take<'a>(buf: &'a [u8], need: usize, what: &'static str) -> Result<&'a [u8], SpecError> {
    buf.get(..need).ok_or(SpecError::Short {
        what,
        need,
        got: buf.len(),
    })
}

/// `N` bytes at `off`; zeros if out of range (callers check lengths with [`take`] first).
fn bytes<const N: usize>(b: &[u8], off: usize) -> [u8; N] {
    off.checked_add(N)
        .and_then(|end| b.get(off..end))
        .and_then(|s| s.try_into().ok())
        .unwrap_or([0; N])
}

fn le16(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes(bytes(b, off))
}

fn le32(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(bytes(b, off))
}

fn le64(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(bytes(b, off))
}

fn byte(b: &[u8], off: usize) -> u8 {
    b.get(off).copied().unwrap_or(0)
}

/// A fixed-width text field: ASCII padded with spaces (Identify, Base 2.0 §1.4.2) or NULs
/// (NQNs, discovery log). Stops at the first NUL, drops trailing spaces; bytes that are not
/// UTF-8 become U+FFFD.
fn text(b: &[u8], off: usize, len: usize) -> String {
    let field = off
        .checked_add(len)
        .and_then(|end| b.get(off..end))
        .unwrap_or(&[]);
    let field = field.split(|&c| c == 0).next().unwrap_or(&[]);
    String::from_utf8_lossy(field)
        .trim_end_matches(' ')
        .to_owned()
}
