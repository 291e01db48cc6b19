//! The data plane: a poller owns a set of virtqueues, one I/O channel and a preallocated
//! in-flight table, and moves requests between them in batches.
//!
//! Per batch: one guest memory snapshot, one channel submit, one used-ring notification per
//! queue. Per request: no allocation, no lock, no syscall.

mod slots;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tracing::{debug, error, warn};
use vhost_user_backend::{VringRwLock, VringT};
use virtio_queue::QueueT;
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddressSpace};

use self::slots::{SlotTable, Tag};
use crate::bdev::{IoChannel, IoOp};
use crate::mem::{GuestMemoryAtomic, MemSnapshot};
use crate::virtio_blk::request::Limits;
use crate::virtio_blk::{ID_BYTES, Parsed, RequestKind, SECTOR_SHIFT, Status, parse};

/// Virtqueue handle as the vhost-user layer shares it with the poller.
pub type Vring = VringRwLock<GuestMemoryAtomic>;

/// Most completions reaped before they are published to the guest.
const REAP_BATCH: usize = 256;

/// What all pollers of one device share, read-only or atomically.
#[derive(Debug)]
pub struct DeviceShared {
    pub limits: Limits,
    /// GET_ID answer, zero-padded.
    pub serial: [u8; ID_BYTES],
    /// Guest-visible write cache mode (CONFIG_WCE): false means every write is write-through.
    pub writeback: AtomicBool,
}

/// A poller: owns its queues' processing, its channel and its in-flight requests.
#[derive(Debug)]
pub struct Poller<C: IoChannel> {
    shared: Arc<DeviceShared>,
    mem: GuestMemoryAtomic,
    channel: C,
    slots: SlotTable,
    /// Parser scratch: its capacity bounds the descriptors of one chain (`seg_max` itself
    /// is enforced on data segments by the parser).
    descs: Vec<Descriptor>,
    /// Tags finished in the current reap.
    done: Vec<Tag>,
    /// Per local queue: popping stopped for lack of slots or channel room.
    stalled: Vec<bool>,
    /// Per local queue: used entries were added since the last notification.
    dirty: Vec<bool>,
}

impl<C: IoChannel> Poller<C> {
    /// A poller for `num_queues` queues of at most `max_queue_size` entries each.
    pub fn new(
        shared: Arc<DeviceShared>,
        mem: GuestMemoryAtomic,
        channel: C,
        num_queues: usize,
        max_queue_size: u16,
    ) -> Self {
        let seg_max = shared.limits.seg_max as usize;
        let depth = num_queues * usize::from(max_queue_size);
        Self {
            shared,
            mem,
            channel,
            // Region crossings can split a segment; leave room for a few.
            slots: SlotTable::new(depth, seg_max + 8),
            // Data segments plus header and status, which may themselves be split.
            descs: Vec::with_capacity(seg_max + 8),
            done: Vec::with_capacity(depth),
            stalled: vec![false; num_queues],
            dirty: vec![false; num_queues],
        }
    }

    /// The completion fd of the channel, to sleep on.
    pub fn completion_fd(&self) -> Option<std::os::fd::RawFd> {
        self.channel.completion_fd()
    }

    /// Requests in flight.
    pub fn in_flight(&self) -> usize {
        self.slots.in_use()
    }

    /// A kick on local queue `local`: pop, parse and submit everything available, then
    /// publish whatever already finished.
    pub fn on_kick(&mut self, vrings: &[Vring], local: usize) {
        self.process_queue(vrings, local);
        self.flush_submissions();
        self.on_completions(vrings);
    }

    /// The channel signalled completions: publish them, and resume stalled queues.
    pub fn on_completion_event(&mut self, vrings: &[Vring]) {
        self.channel.clear_completion_fd();
        self.on_completions(vrings);
    }

    /// Waits for every in-flight request and publishes it (disconnect and shutdown).
    pub fn drain(&mut self, vrings: &[Vring]) {
        while self.slots.in_use() > 0 {
            self.flush_submissions();
            if let Err(e) = self.channel.wait() {
                error!(error = %e, "waiting for in-flight I/O failed; abandoning it");
                return;
            }
            self.reap(vrings);
        }
    }

    fn on_completions(&mut self, vrings: &[Vring]) {
        loop {
            let reaped = self.reap(vrings);
            let mut resumed = false;
            for local in 0..self.stalled.len() {
                if self.stalled[local] {
                    self.stalled[local] = false;
                    self.process_queue(vrings, local);
                    resumed = true;
                }
            }
            if resumed {
                self.flush_submissions();
            }
            if reaped == 0 && !resumed {
                break;
            }
        }
    }

    fn flush_submissions(&mut self) {
        if let Err(e) = self.channel.submit() {
            // Queued operations stay queued; the next batch retries.
            warn!(error = %e, "I/O submission failed");
        }
    }

    /// Pops every available chain of one queue (re-enabling notifications with EVENT_IDX
    /// without losing a kick), and notifies the guest once for those completed at once.
    fn process_queue(&mut self, vrings: &[Vring], local: usize) {
        let Some(vring) = vrings.get(local) else {
            return;
        };
        let snapshot: MemSnapshot = self.mem.memory().into_inner();
        let mut state = vring.get_mut();
        if !state.get_queue().ready() || !state.is_enabled() {
            return;
        }
        let event_idx = state.get_queue().event_idx_enabled();
        'refill: loop {
            if event_idx {
                // A failure only means more kicks than needed.
                let _ = state.get_queue_mut().disable_notification(&*snapshot);
            }
            loop {
                if self.slots.is_full() || !self.channel.has_room() {
                    // Resumed from the completion path; keep notifications off meanwhile.
                    self.stalled[local] = true;
                    break 'refill;
                }
                let Some(chain) = state.get_queue_mut().pop_descriptor_chain(&*snapshot) else {
                    break;
                };
                let Some(tag) = self.slots.alloc() else {
                    break 'refill;
                };
                let parsed = parse(
                    chain,
                    &self.shared.limits,
                    &mut self.descs,
                    self.slots.iov_mut(tag),
                );
                match parsed {
                    Ok(p) => {
                        if let Some((head, status)) = self.start(local, tag, p, &snapshot) {
                            self.slots.free(tag);
                            publish(state.get_queue_mut(), &snapshot, head, status);
                            self.dirty[local] = true;
                        }
                    }
                    Err(rej) => {
                        debug!(queue = local, head = rej.head, error = %rej.error, "request rejected");
                        self.slots.free(tag);
                        let len = match rej.status {
                            Some(addr) => {
                                // The address was checked by the parser.
                                let _ = snapshot.write_obj(rej.error.status() as u8, addr);
                                1
                            }
                            None => 0,
                        };
                        add_used(state.get_queue_mut(), &snapshot, rej.head, len);
                        self.dirty[local] = true;
                    }
                }
            }
            if !event_idx {
                break;
            }
            match state.get_queue_mut().enable_notification(&*snapshot) {
                Ok(true) => continue,
                _ => break,
            }
        }
        if std::mem::take(&mut self.dirty[local]) {
            notify(&mut state, &snapshot);
        }
    }

    /// Starts a parsed request. Returns `Some((head, completion))` when it completed at once.
    fn start(
        &mut self,
        local: usize,
        tag: Tag,
        p: Parsed,
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
        let (used_len, expect) = match req.kind {
            RequestKind::Read { .. } => (req.data_len + 1, Some(req.data_len)),
            RequestKind::Write { .. } => (1, Some(req.data_len)),
            _ => (1, None),
        };
        match req.kind {
            RequestKind::GetId => {
                let iov = self.slots.iov_mut(tag);
                // SAFETY: the iovecs were translated from `snapshot`, which is alive here.
                let n = unsafe { iov.copy_from(&self.shared.serial) };
                return immediate(Status::Ok, n as u32 + 1);
            }
            RequestKind::Read { .. } | RequestKind::Write { .. } if req.data_len == 0 => {
                return immediate(Status::Ok, 1);
            }
            _ => {}
        }
        self.slots.begin(
            tag,
            local,
            p.head,
            p.status,
            used_len,
            expect,
            snapshot.clone(),
        );
        let fua = !self.shared.writeback.load(Ordering::Relaxed);
        let mut pending = 0u32;
        let mut failed = false;
        let (slots, channel) = (&mut self.slots, &mut self.channel);
        let iov = slots.iov(tag);
        let mut queue = |op: IoOp<'_>| {
            // SAFETY: the slot keeps the iovec list and the memory snapshot until every
            // completion for `tag` is reaped (the slot is freed only then).
            let r = unsafe { channel.queue(tag, op) };
            let r = match r {
                Ok(n) => Ok(n),
                Err(_) => {
                    // Make room by handing what is queued to the kernel, then retry once.
                    let _ = channel.submit();
                    // SAFETY: as above.
                    unsafe { channel.queue(tag, op) }
                }
            };
            match r {
                Ok(n) => pending += n,
                Err(_) => failed = true,
            }
        };
        let bytes = |sectors: u32| u64::from(sectors) << SECTOR_SHIFT;
        match req.kind {
            RequestKind::Read { sector } => queue(IoOp::Read {
                offset: sector << SECTOR_SHIFT,
                iov,
            }),
            RequestKind::Write { sector } => queue(IoOp::Write {
                offset: sector << SECTOR_SHIFT,
                iov,
                fua,
            }),
            RequestKind::Flush => queue(IoOp::Flush),
            RequestKind::Discard(ranges) => {
                for r in ranges.as_slice() {
                    queue(IoOp::Discard {
                        offset: r.sector << SECTOR_SHIFT,
                        len: bytes(r.sectors),
                    });
                }
            }
            RequestKind::WriteZeroes(ranges) => {
                for r in ranges.as_slice() {
                    queue(IoOp::WriteZeroes {
                        offset: r.sector << SECTOR_SHIFT,
                        len: bytes(r.sectors),
                        unmap: r.unmap,
                    });
                }
            }
            RequestKind::GetId => {}
        }
        if failed {
            warn!(queue = local, "I/O channel full; failing part of a request");
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

    /// Reaps finished operations and publishes finished requests, one notification per queue.
    /// Returns how many operations were reaped.
    fn reap(&mut self, vrings: &[Vring]) -> usize {
        let mut total = 0;
        loop {
            let (slots, done) = (&mut self.slots, &mut self.done);
            let n = self.channel.poll(REAP_BATCH, |tag, res| {
                if slots.complete_op(tag, res) {
                    done.push(tag);
                }
            });
            total += n;
            if self.done.is_empty() {
                if n < REAP_BATCH {
                    return total;
                }
                continue;
            }
            self.publish_done(vrings);
            if n < REAP_BATCH {
                return total;
            }
        }
    }

    /// Publishes the requests in `done`. Those of a queue without a handle (never kicked
    /// before a disconnect) are finished without a used-ring entry: nobody is left to read it.
    fn publish_done(&mut self, vrings: &[Vring]) {
        let snapshot: MemSnapshot = self.mem.memory().into_inner();
        for local in 0..self.stalled.len() {
            if !self.done.iter().any(|&t| self.slots.queue_of(t) == local) {
                continue;
            }
            let mut state = vrings.get(local).map(|v| v.get_mut());
            for i in 0..self.done.len() {
                let tag = self.done[i];
                if self.slots.queue_of(tag) != local {
                    continue;
                }
                let head = self.slots.head_of(tag);
                let c = self.slots.finish(tag);
                // The status byte is written through the snapshot the request ran with.
                let mem = self.slots.release(tag).unwrap_or_else(|| snapshot.clone());
                if let Some(state) = state.as_mut() {
                    publish(state.get_queue_mut(), &mem, head, c);
                }
            }
            if let Some(state) = state.as_mut() {
                notify(state, &snapshot);
            }
        }
        self.done.clear();
    }
}

/// How a request ends.
#[derive(Clone, Copy, Debug)]
pub struct Completion {
    pub status_addr: vm_memory::GuestAddress,
    pub status: Status,
    pub used_len: u32,
}

/// Writes the status byte and puts the chain on the used ring.
fn publish(queue: &mut virtio_queue::Queue, mem: &MemSnapshot, head: u16, c: Completion) {
    let len = if mem.write_obj(c.status as u8, c.status_addr).is_ok() {
        c.used_len
    } else {
        0
    };
    add_used(queue, mem, head, len);
}

fn add_used(queue: &mut virtio_queue::Queue, mem: &MemSnapshot, head: u16, len: u32) {
    if let Err(e) = queue.add_used(&**mem, head, len) {
        warn!(head, error = %e, "cannot add to the used ring");
    }
}

/// Signals the guest if EVENT_IDX (or the no-interrupt flag) says it wants to be.
fn notify(state: &mut vhost_user_backend::VringState<GuestMemoryAtomic>, mem: &MemSnapshot) {
    let needed = state
        .get_queue_mut()
        .needs_notification(&**mem)
        .unwrap_or(true);
    if needed {
        if let Err(e) = state.signal_used_queue() {
            debug!(error = %e, "cannot signal the guest");
        }
    }
}
