//! NVM I/O commands (NVM Command Set 1.0 §3): parsed and checked against the namespace before
//! any data moves.

use vubd::nvme::spec::{DsmRange, Status, io_opc, sc, sct};

use super::ctrl::dnr;
use super::ns::Namespace;
use super::wire::Cmd;

/// A checked I/O command; offsets and lengths in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Io {
    Read {
        offset: u64,
        len: u32,
    },
    Write {
        offset: u64,
        len: u32,
    },
    Flush,
    WriteZeroes {
        offset: u64,
        len: u64,
    },
    /// `ranges` DSM ranges follow as data.
    Dsm {
        ranges: u32,
        deallocate: bool,
    },
}

impl Io {
    /// Bytes of data the command moves, which its SGL must describe.
    pub(super) fn xfer(&self) -> u32 {
        match *self {
            Io::Read { len, .. } | Io::Write { len, .. } => len,
            Io::Dsm { ranges, .. } => ranges * DsmRange::LEN as u32,
            Io::Flush | Io::WriteZeroes { .. } => 0,
        }
    }
}

fn generic(sc: u8) -> Status {
    dnr(sct::GENERIC, sc)
}

/// Parses an I/O command: namespace 1 only (Flush also to all namespaces), LBA range within
/// the namespace, transfers within MDTS (`max_xfer` bytes, 0 for no limit).
pub(super) fn parse(ns: &Namespace, cmd: &Cmd, max_xfer: u64) -> Result<Io, Status> {
    let op = cmd.opcode();
    let nsid = cmd.nsid();
    let nsid_ok = nsid == 1 || (op == io_opc::FLUSH && nsid == u32::MAX);
    let known = matches!(
        op,
        io_opc::FLUSH | io_opc::WRITE | io_opc::READ | io_opc::WRITE_ZEROES | io_opc::DSM
    );
    if !known {
        return Err(generic(sc::INVALID_OPCODE));
    }
    if !nsid_ok {
        return Err(generic(sc::INVALID_NAMESPACE));
    }
    let slba = cmd.qword(10);
    let nlb = u64::from(cmd.cdw(12) & 0xffff) + 1;
    let range = || ns.range(slba, nlb).ok_or(generic(sc::LBA_OUT_OF_RANGE));
    match op {
        io_opc::READ | io_opc::WRITE => {
            let (offset, len) = range()?;
            if max_xfer != 0 && len > max_xfer {
                return Err(generic(sc::INVALID_FIELD));
            }
            let len = u32::try_from(len).map_err(|_| generic(sc::INVALID_FIELD))?;
            Ok(if op == io_opc::READ {
                Io::Read { offset, len }
            } else {
                Io::Write { offset, len }
            })
        }
        io_opc::WRITE_ZEROES => {
            let (offset, len) = range()?;
            Ok(Io::WriteZeroes { offset, len })
        }
        io_opc::DSM => Ok(Io::Dsm {
            ranges: (cmd.cdw(10) & 0xff) + 1,
            deallocate: cmd.cdw(11) & (1 << 2) != 0,
        }),
        _ => Ok(Io::Flush),
    }
}

/// Dataset Management over the ranges in `data` (NVM Command Set 1.0 Figure 39): every range
/// is checked first; with the Deallocate attribute the ranges read as zeros afterwards.
pub(super) fn dsm(ns: &Namespace, data: &[u8], deallocate: bool) -> Status {
    let mut ranges = Vec::with_capacity(data.len() / DsmRange::LEN);
    for r in data.chunks_exact(DsmRange::LEN) {
        let nlb = u32::from_le_bytes([r[4], r[5], r[6], r[7]]);
        let mut slba = [0; 8];
        slba.copy_from_slice(&r[8..16]);
        match ns.range(u64::from_le_bytes(slba), u64::from(nlb)) {
            Some(range) => ranges.push(range),
            None => return generic(sc::LBA_OUT_OF_RANGE),
        }
    }
    if deallocate {
        for (offset, len) in ranges {
            ns.zero(offset, len);
        }
    }
    Status::SUCCESS
}
