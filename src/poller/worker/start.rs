//! Starting a parsed request: GET_ID and empty transfers complete at once, the rest become
//! operations on the device's channel, counted in the request's slot.

use std::sync::atomic::Ordering;

use tracing::Level;

use super::Completion;
use crate::bdev::{Channel, IoChannel, IoOp, Target};
use crate::limited;
use crate::mem::MemSnapshot;
use crate::metrics::{OPS, Op};
use crate::poller::DeviceShared;
use crate::poller::slots::{SlotTable, Tag};
use crate::qos::Class;
use crate::virtio_blk::{Parsed, Range, RequestKind, SECTOR_SHIFT, Status};

/// Starts a parsed request of queue `qi` in slot `tag` on the device's channel, at `now` on the
/// poller's clock; `ranges` are the segments of a discard / write-zeroes request. Returns
/// `Some((head, completion))` when it completed at once.
///
/// `#[inline]`: the poller's per-request path. In a module of its own, it would otherwise
/// land in another codegen unit than the loop that calls it, and not be inlined there.
#[inline]
pub(super) fn start(
    shared: &DeviceShared,
    (channel, target): (&mut Channel, &Target),
    slots: &mut SlotTable,
    (qi, tag, now): (usize, Tag, u64),
    p: &Parsed,
    ranges: &[Range],
    snapshot: &MemSnapshot,
) -> Option<(u16, Completion)> {
    let req = p.request;
    let immediate = |status, used_len| {
        Some((
            p.head,
            Completion {
                status_addr: p.status,
                status,
                used_len,
            },
        ))
    };
    match req.kind {
        RequestKind::GetId => {
            let iov = slots.iov_mut(tag);
            // SAFETY: the iovecs were translated from `snapshot`, which is alive here.
            let n = unsafe { iov.copy_from(&shared.serial) };
            return immediate(Status::Ok, n as u32 + 1);
        }
        RequestKind::Read { .. } | RequestKind::Write { .. } if req.data_len == 0 => {
            return immediate(Status::Ok, 1);
        }
        _ => {}
    }
    let (used_len, expect) = match req.kind {
        RequestKind::Read { .. } => (req.data_len + 1, Some(req.data_len)),
        RequestKind::Write { .. } => (1, Some(req.data_len)),
        _ => (1, None),
    };
    slots.begin(
        tag,
        qi,
        p.head,
        p.status,
        used_len,
        expect,
        now,
        snapshot.clone(),
    );
    let fua = !shared.writeback.load(Ordering::Relaxed);
    let iov = slots.iov(tag);
    // Operations queued, and whether one could not be.
    let (mut pending, mut failed) = (0u32, false);
    let mut count = |r: Option<u32>| match r {
        Some(n) => pending += n,
        None => failed = true,
    };
    let bytes = |sectors: u32| u64::from(sectors) << SECTOR_SHIFT;
    match req.kind {
        RequestKind::Read { sector } => count(queue_op(
            channel,
            target,
            tag,
            IoOp::Read {
                offset: sector << SECTOR_SHIFT,
                iov,
            },
        )),
        RequestKind::Write { sector } => count(queue_op(
            channel,
            target,
            tag,
            IoOp::Write {
                offset: sector << SECTOR_SHIFT,
                iov,
                fua,
            },
        )),
        RequestKind::Flush => {
            shared.flushed();
            count(queue_op(channel, target, tag, IoOp::Flush))
        }
        RequestKind::Discard => {
            for r in ranges {
                count(queue_op(
                    channel,
                    target,
                    tag,
                    IoOp::Discard {
                        offset: r.sector << SECTOR_SHIFT,
                        len: bytes(r.sectors),
                    },
                ));
            }
        }
        RequestKind::WriteZeroes => {
            for r in ranges {
                count(queue_op(
                    channel,
                    target,
                    tag,
                    IoOp::WriteZeroes {
                        offset: r.sector << SECTOR_SHIFT,
                        len: bytes(r.sectors),
                        unmap: r.unmap,
                    },
                ));
            }
        }
        RequestKind::GetId => {}
    }
    if failed {
        limited!(
            shared.warnings,
            Level::WARN,
            device = shared.index,
            "I/O channel full; failing part of a request"
        );
        slots.set_error(tag);
    }
    slots.add_pending(tag, pending);
    if pending == 0 {
        let c = slots.finish(tag);
        slots.free(tag);
        return Some((p.head, c));
    }
    None
}

/// What a request of kind `op` is to its device's rate limits. DISCARD and WRITE_ZEROES are
/// writes that move no data; FLUSH and GET_ID are not limited. A table in [`Op`]'s order: one
/// load, no branch.
#[inline(always)]
pub(super) fn class(op: Op) -> Class {
    const CLASS: [Class; OPS] = [
        Class::Read,     // Op::Read
        Class::Write,    // Op::Write
        Class::Free,     // Op::Flush
        Class::Dataless, // Op::Discard
        Class::Dataless, // Op::WriteZeroes
        Class::Free,     // Op::Other (GET_ID)
    ];
    CLASS[op as usize]
}

/// What a request asks, as the metrics count it.
#[inline(always)]
pub(super) fn op(kind: RequestKind) -> Op {
    match kind {
        RequestKind::Read { .. } => Op::Read,
        RequestKind::Write { .. } => Op::Write,
        RequestKind::Flush => Op::Flush,
        RequestKind::Discard => Op::Discard,
        RequestKind::WriteZeroes => Op::WriteZeroes,
        RequestKind::GetId => Op::Other,
    }
}

/// Queues one operation of the request in slot `tag`; when the channel is full, hands what is
/// queued to the kernel and retries once. Returns the completions to expect, `None` when the
/// operation could not be queued.
#[inline(always)]
fn queue_op(channel: &mut Channel, target: &Target, tag: Tag, op: IoOp<'_>) -> Option<u32> {
    // SAFETY: the slot keeps the iovec list and the memory snapshot until every completion
    // for `tag` is reaped (the slot is freed only then).
    match unsafe { channel.queue_for(target, tag, op) } {
        Ok(n) => Some(n),
        Err(_) => {
            // Make room by handing what is queued to the kernel, then retry once.
            let _ = channel.submit();
            // SAFETY: as above.
            unsafe { channel.queue_for(target, tag, op) }.ok()
        }
    }
}
