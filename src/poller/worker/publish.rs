//! Publishing finished requests: the status byte, the used ring, and one interrupt per
//! queue per batch, whichever device each belongs to.

use std::num::Wrapping;

use tracing::Level;
use vhost_user_backend::{VringState, VringT};
use virtio_queue::QueueT;
use vm_memory::Bytes;

use super::{Completion, QueueSlot, Worker, dirty, fresh_ring};
use crate::limited;
use crate::mem::{DirtyLog, GuestMemoryAtomic, HostMap, MemSnapshot};
use crate::poller::DeviceShared;
use crate::virtio_blk::Status;
use crate::virtio_blk::inflight::InflightQueue;
use crate::virtio_blk::ring::SplitRing;

impl Worker {
    /// Publishes the requests in `done`: status byte, used ring, one notification per queue.
    #[inline]
    pub(super) fn publish_done(&mut self) {
        // The batch's time, read at the first queue with metrics.
        let mut now = None;
        for i in 0..self.done.len() {
            let qi = self.slots.queue_of(self.done[i]);
            if self.done[..i].iter().any(|&t| self.slots.queue_of(t) == qi) {
                continue; // this queue's requests were published with an earlier tag
            }
            let Some(q) = self.queues.get_mut(qi).and_then(Option::as_mut) else {
                // Unreachable (a queue is forgotten only with nothing in flight); free anyway.
                for &tag in self.done[i..].iter() {
                    if self.slots.queue_of(tag) == qi {
                        self.slots.release(tag);
                    }
                }
                continue;
            };
            let Some(dev) = self.devices[q.device].as_mut() else {
                continue;
            };
            let mut state = q.vring.get_mut();
            let queue = state.get_queue_mut();
            let ring = fresh_ring(&mut q.ring, dev, queue);
            let old_used = Wrapping(queue.next_used());
            let mut used = old_used;
            let qm = q.metrics.as_deref();
            let now = match qm {
                Some(_) => *now.get_or_insert_with(|| self.clock.now()),
                None => 0,
            };
            for &tag in &self.done[i..] {
                if self.slots.queue_of(tag) != qi {
                    continue;
                }
                let head = self.slots.head_of(tag);
                let c = self.slots.finish(tag);
                if let Some(m) = qm {
                    let (started, moved) = self.slots.accounting(tag);
                    let ok = c.status == Status::Ok;
                    m.completed(ok, moved, now.saturating_sub(started), &self.clock);
                }
                if let (Some(log), Some(mem)) = (&dev.log, self.slots.mem_of(tag)) {
                    let data = self.slots.returns_data(tag).then(|| self.slots.iov(tag));
                    dirty::request(log, mem, data, c.status_addr);
                }
                let Some(mem) = self.slots.release(tag) else {
                    continue;
                };
                q.in_flight = q.in_flight.saturating_sub(1);
                dev.in_flight = dev.in_flight.saturating_sub(1);
                let len = write_status(&dev.map, &mem, c);
                match ring {
                    Some(r) => {
                        if let Some(inflight) = &mut q.inflight {
                            inflight.link(head);
                        }
                        r.put_used(used, head, len);
                        used += 1;
                    }
                    // Rings outside guest memory: nothing can be published.
                    None => limited!(
                        dev.shared.warnings,
                        Level::WARN,
                        device = dev.shared.index,
                        queue = q.index,
                        head,
                        "used ring unreachable; a completion is lost"
                    ),
                }
            }
            let delivered = match ring.filter(|_| used != old_used) {
                Some(r) => publish(
                    &r,
                    &mut state,
                    dev.log.as_deref(),
                    q.inflight.as_mut(),
                    old_used,
                    used,
                ),
                None => true,
            };
            drop(state);
            if !delivered {
                q.interrupt_lost(&dev.shared);
            }
        }
        self.done.clear();
    }
}

/// Writes the status byte (through `map` when the request ran with the map's snapshot) and
/// returns the used length to report: 0 when the status byte could not be written.
#[inline(always)]
pub(super) fn write_status(map: &HostMap, mem: &MemSnapshot, c: Completion) -> u32 {
    let written = if map.is_of(mem) {
        map.write_u8(c.status_addr.0, c.status as u8)
    } else {
        mem.write_obj(c.status as u8, c.status_addr).is_ok()
    };
    if written { c.used_len } else { 0 }
}

/// Publishes used elements `old..used` of a queue: sets the queue's next used index to `used`,
/// marks the used ring in the dirty log (while a migration runs), writes the index, clears
/// the batch in the inflight region, and interrupts the guest if it asked. Returns false when
/// the interrupt could not be delivered ([`signal`]).
#[inline(always)]
pub(super) fn publish(
    ring: &SplitRing,
    state: &mut VringState<GuestMemoryAtomic>,
    log: Option<&DirtyLog>,
    inflight: Option<&mut InflightQueue>,
    old: Wrapping<u16>,
    used: Wrapping<u16>,
) -> bool {
    state.get_queue_mut().set_next_used(used.0);
    if let Some(log) = log {
        dirty::used_ring(log, ring);
    }
    let notify = ring.publish_used(old, used);
    if let Some(inflight) = inflight {
        inflight.published(used.0);
    }
    !notify || signal(state)
}

/// Interrupts the guest (its call eventfd): once per queue per batch at most. The eventfd is
/// non-blocking (the control plane made it so when the frontend gave it), so a frontend that
/// never reads it makes the write fail with EAGAIN once its counter is full, instead of
/// stopping the poller: returns false then, and the caller counts it.
pub(super) fn signal(state: &VringState<GuestMemoryAtomic>) -> bool {
    state.signal_used_queue().is_ok()
}

impl QueueSlot {
    /// The frontend did not take an interrupt: counted, never waited for.
    #[cold]
    #[inline(never)]
    pub(super) fn interrupt_lost(&mut self, shared: &DeviceShared) {
        self.lost_interrupts += 1;
        limited!(
            shared.warnings,
            Level::WARN,
            device = shared.index,
            queue = self.index,
            lost = self.lost_interrupts,
            "the frontend does not take interrupts (its call eventfd is full); one is dropped"
        );
    }
}
