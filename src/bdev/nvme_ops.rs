//! Virtio-blk operations as NVMe commands, for the channels of both NVMe transports: reads
//! and writes split at the transfer limit and the 16-bit block count, flush only where the
//! controller has a volatile write cache, one single-range Dataset Management (deallocate)
//! per discard piece, Write Zeroes split at its block count.

use super::{DeviceInfo, IoOp};
use crate::nvme::data::DataRef;
use crate::nvme::spec::{DsmRange, IdentifyController, IdentifyNamespace, Sqe};
use crate::nvme::split::split;

/// What the translation needs to know of a namespace and its controller.
#[derive(Clone, Copy, Debug)]
pub struct Namespace {
    pub nsid: u32,
    /// log2 of the block size.
    pub lba_shift: u32,
    /// Most blocks one Read or Write may move.
    pub max_rw_blocks: u32,
    /// The controller has a volatile write cache (Identify Controller VWC): flush is needed.
    pub volatile_cache: bool,
}

/// The log2 of the block size of a namespace vubd can serve, or the bytes of metadata per
/// block that make it unservable (virtio-blk has no place for them).
pub fn lba_shift_of(ns: &IdentifyNamespace) -> Result<u32, u16> {
    match ns.lba_format().ms {
        0 => Ok(ns.block_size().trailing_zeros()),
        ms => Err(ms),
    }
}

/// What the guest is told of a namespace (`lba_shift` from [`lba_shift_of`]): its size and
/// blocks; discard when the controller has Dataset Management (deallocate, one range per
/// command); write-zeroes when it has Write Zeroes, allowed to unmap when deallocated blocks
/// read as zeroes (DLFEAT).
pub fn device_info(
    id: &IdentifyController,
    ns: &IdentifyNamespace,
    lba_shift: u32,
    read_only: bool,
) -> DeviceInfo {
    let block_size = 1u32 << lba_shift;
    DeviceInfo {
        capacity_bytes: ns.nsze << lba_shift,
        logical_block_size: block_size,
        physical_block_size: block_size,
        read_only,
        discard: id.oncs.dsm(),
        write_zeroes: id.oncs.write_zeroes(),
        write_zeroes_unmaps: id.oncs.write_zeroes() && ns.write_zeroes_deallocates(),
    }
}

/// What one command carries.
#[derive(Clone, Copy, Debug)]
pub enum CmdData {
    None,
    /// Guest data read from the namespace into these bytes.
    Read(DataRef),
    /// Guest data written from these bytes.
    Write(DataRef),
    /// A Dataset Management range: the command's 16 bytes of data.
    Range([u8; 16]),
}

/// How an operation proceeds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Translated {
    /// This many commands were emitted; each completes on its own.
    Commands(u32),
    /// Nothing to send: the operation completes at once with this result (0, or a negative
    /// errno for a range the namespace's blocks cannot express).
    Complete(i32),
}

/// Emits the commands of `op` on namespace `ns` through `emit`.
///
/// # Safety
///
/// The iovec list of a read or write and the memory behind it must stay valid and unchanged
/// until every command emitted for it has completed (the [`super::IoChannel::queue`]
/// contract).
pub unsafe fn translate(
    ns: &Namespace,
    op: IoOp<'_>,
    mut emit: impl FnMut(Sqe, CmdData),
) -> Translated {
    // virtio-blk sectors are 512 bytes; a namespace's blocks may be larger.
    let unaligned = Translated::Complete(-libc::EINVAL);
    let (offset, iov, write, fua) = match op {
        IoOp::Read { offset, iov } => (offset, iov, false, false),
        IoOp::Write { offset, iov, fua } => (offset, iov, true, fua),
        IoOp::Flush if ns.volatile_cache => {
            emit(Sqe::flush(ns.nsid), CmdData::None);
            return Translated::Commands(1);
        }
        IoOp::Flush => return Translated::Complete(0),
        IoOp::Discard { offset, len } => {
            let Ok(pieces) = split(offset, len, ns.lba_shift, u32::MAX) else {
                return unaligned;
            };
            let mut n = 0;
            for p in pieces {
                let range = DsmRange {
                    context_attributes: 0,
                    nlb: p.blocks,
                    slba: p.slba,
                };
                emit(
                    Sqe::dsm_deallocate(ns.nsid, 0),
                    CmdData::Range(range.encode()),
                );
                n += 1;
            }
            return Translated::Commands(n);
        }
        IoOp::WriteZeroes { offset, len, unmap } => {
            let Ok(pieces) = split(offset, len, ns.lba_shift, 1 << 16) else {
                return unaligned;
            };
            let mut n = 0;
            for p in pieces {
                let nlb = (p.blocks - 1) as u16;
                emit(
                    Sqe::write_zeroes(ns.nsid, p.slba, nlb, unmap),
                    CmdData::None,
                );
                n += 1;
            }
            return Translated::Commands(n);
        }
    };
    let len = iov.bytes();
    let Ok(pieces) = split(offset, len, ns.lba_shift, ns.max_rw_blocks) else {
        return unaligned;
    };
    // SAFETY: the caller keeps the iovec list and the memory behind it unchanged until every
    // command emitted here completes (this function's contract).
    let Some(whole) = (unsafe { DataRef::new(iov.as_slice(), 0, len as usize) }) else {
        return unaligned;
    };
    let mut n = 0;
    for p in pieces {
        let Some(part) = whole.sub(p.offset, p.len) else {
            continue;
        };
        let nlb = (p.blocks - 1) as u16;
        if write {
            emit(Sqe::write(ns.nsid, p.slba, nlb, fua), CmdData::Write(part));
        } else {
            emit(Sqe::read(ns.nsid, p.slba, nlb, false), CmdData::Read(part));
        }
        n += 1;
    }
    Translated::Commands(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mem::IovecList;
    use crate::nvme::spec::io_opc;

    const NS: Namespace = Namespace {
        nsid: 3,
        lba_shift: 12,
        max_rw_blocks: 2,
        volatile_cache: false,
    };

    fn run(ns: &Namespace, op: IoOp<'_>) -> (Translated, Vec<(u8, u64, u32)>) {
        let mut cmds = Vec::new();
        // SAFETY: the iovecs below describe no real memory and are only described, never
        // accessed.
        let t = unsafe {
            translate(ns, op, |sqe, _| {
                let slba = u64::from(sqe.cdw(10)) | u64::from(sqe.cdw(11)) << 32;
                cmds.push((sqe.opcode(), slba, sqe.cdw(12) & 0xffff));
            })
        };
        (t, cmds)
    }

    /// Identify Namespace data: 8 blocks of 2^`lbads` bytes with `ms` bytes of metadata each.
    fn identify(lbads: u8, ms: u16) -> IdentifyNamespace {
        identify_dlfeat(lbads, ms, 0)
    }

    fn identify_dlfeat(lbads: u8, ms: u16, dlfeat: u8) -> IdentifyNamespace {
        let mut b = vec![0u8; 4096];
        b[33] = dlfeat;
        b[0..8].copy_from_slice(&8u64.to_le_bytes()); // NSZE
        b[8..16].copy_from_slice(&8u64.to_le_bytes()); // NCAP
        b[128..130].copy_from_slice(&ms.to_le_bytes()); // LBAF0.MS
        b[130] = lbads; // LBAF0.LBADS
        IdentifyNamespace::parse(&b).expect("valid Identify Namespace")
    }

    #[test]
    fn the_guest_sees_the_namespace_size_and_the_controller_s_optional_commands() {
        let ctrl = |oncs: u16| {
            let mut b = vec![0u8; 4096];
            b[520..522].copy_from_slice(&oncs.to_le_bytes()); // ONCS
            IdentifyController::parse(&b).expect("valid Identify Controller")
        };
        // DLFEAT 0x09: deallocated blocks read as zeroes, Write Zeroes may deallocate.
        let zeroing = identify_dlfeat(12, 0, 0x09);
        let info = device_info(&ctrl(0b1100), &zeroing, 12, false);
        assert_eq!(
            (
                info.capacity_bytes,
                info.logical_block_size,
                info.physical_block_size
            ),
            (8 << 12, 4096, 4096)
        );
        assert!(info.discard && info.write_zeroes && info.write_zeroes_unmaps && !info.read_only);
        // Without Write Zeroes nothing unmaps; without DLFEAT, Write Zeroes writes.
        let i = device_info(&ctrl(0b0100), &zeroing, 12, true);
        assert!(i.discard && !i.write_zeroes && !i.write_zeroes_unmaps && i.read_only);
        let i = device_info(&ctrl(0b1000), &identify(12, 0), 12, false);
        assert!(!i.discard && i.write_zeroes && !i.write_zeroes_unmaps);
    }

    #[test]
    fn namespaces_with_metadata_cannot_be_served() {
        assert_eq!(lba_shift_of(&identify(12, 0)), Ok(12));
        assert_eq!(lba_shift_of(&identify(9, 0)), Ok(9));
        assert_eq!(lba_shift_of(&identify(12, 8)), Err(8));
    }

    #[test]
    fn flush_goes_to_the_controller_only_with_a_volatile_cache() {
        assert_eq!(run(&NS, IoOp::Flush).0, Translated::Complete(0));
        let cached = Namespace {
            volatile_cache: true,
            ..NS
        };
        let (t, cmds) = run(&cached, IoOp::Flush);
        assert_eq!((t, cmds[0].0), (Translated::Commands(1), io_opc::FLUSH));
    }

    #[test]
    fn ranges_not_made_of_whole_blocks_complete_with_einval() {
        let op = IoOp::Discard {
            offset: 512,
            len: 4096,
        };
        assert_eq!(run(&NS, op).0, Translated::Complete(-libc::EINVAL));
        let iov = IovecList::with_capacity(1);
        let op = IoOp::Read {
            offset: 512,
            iov: &iov,
        };
        assert_eq!(run(&NS, op).0, Translated::Complete(-libc::EINVAL));
    }

    #[test]
    fn write_zeroes_and_discard_become_one_command_per_piece() {
        let op = IoOp::WriteZeroes {
            offset: 8192,
            len: 4096 * 3,
            unmap: true,
        };
        let (t, cmds) = run(&NS, op);
        assert_eq!(t, Translated::Commands(1));
        assert_eq!(cmds, [(io_opc::WRITE_ZEROES, 2, 2)]);
        let (t, cmds) = run(
            &NS,
            IoOp::Discard {
                offset: 0,
                len: 4096,
            },
        );
        assert_eq!((t, cmds[0].0), (Translated::Commands(1), io_opc::DSM));
    }
}
