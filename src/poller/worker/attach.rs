//! The poller's control path: commands from the control plane, attaching a queue (and its
//! device, and the device's channel, which devices of one NVMe controller share) and
//! forgetting it once its detach is acknowledged. Allocates; never on the I/O path.

use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::atomic::Ordering;

use std::time::Duration;

use tracing::{Level, error};
use vhost_user_backend::VringT;
use vm_memory::GuestAddressSpace;
use vmm_sys_util::epoll::{ControlOperation, EpollEvent, EventSet};

use super::{Device, KICK_EVENT, QueueSlot, SharedChannel, Worker};
use crate::bdev::{BlockDevice, IoChannel};
use crate::limited;
use crate::log_limit::LogLimit;
use crate::mem::HostMap;
use crate::poller::warm::Warm;
use crate::poller::{Command, DetachWait, QueueAttach, WARNINGS_PER_SECOND};
use crate::qos::Lease;
use crate::virtio_blk::MAX_RANGE_SEGMENTS;
use crate::virtio_blk::request::Limits;

impl Worker {
    pub(super) fn handle_commands(&mut self) {
        self.shared.has_commands.store(false, Ordering::Release);
        {
            let mut pending = self
                .shared
                .commands
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            std::mem::swap(&mut *pending, &mut self.commands);
        }
        let mut commands = std::mem::take(&mut self.commands);
        for cmd in commands.drain(..) {
            match cmd {
                Command::Attach(a) => self.attach(*a),
                Command::Detach {
                    device,
                    queue,
                    wait,
                } => {
                    let devices = &self.devices;
                    let found = self.queues.iter().position(|q| {
                        q.as_ref().is_some_and(|q| {
                            q.index == queue
                                && devices[q.device].as_ref().is_some_and(|d| d.key == device)
                        })
                    });
                    match found {
                        Some(qi) => self.start_detach(qi, wait),
                        None => {
                            let _ = wait.done.send(());
                        }
                    }
                }
                Command::MemoryChanged(device) => {
                    // Not waiting for the device's next request: an idle queue would keep
                    // the old map, and with it memory the frontend gave back.
                    if let Some(d) = self.devices.iter_mut().flatten().find(|d| d.key == device) {
                        d.refresh();
                    }
                }
                Command::SetLog { device, log, done } => {
                    if let Some(d) = self.devices.iter_mut().flatten().find(|d| d.key == device) {
                        d.log = log;
                    }
                    let _ = done.send(());
                }
                Command::Stop => {
                    self.stopping = true;
                    for qi in 0..self.queues.len() {
                        if self.queues[qi].as_ref().is_some_and(|q| q.detach.is_none()) {
                            self.start_detach(qi, DetachWait::unwatched());
                        }
                    }
                }
            }
        }
        self.commands = commands;
    }

    /// The channel a new device of this poller uses: the one of a device it shares channels
    /// with ([`crate::bdev::Disk::channel_key`]), else a new one. `None` when it cannot be
    /// opened.
    fn channel_for(&mut self, a: &QueueAttach) -> Option<usize> {
        let key = a.disk.channel_key();
        if key.is_some()
            && let Some(i) = self
                .channels
                .iter()
                .position(|c| c.as_ref().is_some_and(|c| c.key == key))
            && let Some(c) = self.channels[i].as_mut()
        {
            c.devices += 1;
            limited!(
                a.shared.events,
                Level::INFO,
                device = a.shared.index,
                queue = a.queue,
                channel = i,
                "I/O channel shared with another device"
            );
            return Some(i);
        }
        let depth = u32::from(a.max_queue_size) * MAX_RANGE_SEGMENTS as u32;
        let channel = match a.disk.open_channel(depth) {
            Ok(c) => c,
            Err(e) => {
                limited!(
                    a.shared.events,
                    Level::ERROR,
                    device = a.shared.index,
                    queue = a.queue,
                    error = %e,
                    "cannot open an I/O channel"
                );
                return None;
            }
        };
        let i = free_index(&mut self.channels);
        if let Some(fd) = channel.completion_fd() {
            let ev = EpollEvent::new(EventSet::IN, i as u64);
            if let Err(e) = self.epoll.ctl(ControlOperation::Add, fd, ev) {
                error!(error = %e, "cannot watch I/O completions");
                return None;
            }
        }
        self.channels[i] = Some(SharedChannel {
            key,
            channel,
            devices: 1,
            warnings: LogLimit::new(WARNINGS_PER_SECOND, Duration::from_secs(1)),
        });
        Some(i)
    }

    /// A device that used channel `i` is gone: the channel goes with its last device.
    fn release_channel(&mut self, i: usize) {
        let last = self.channels[i].as_mut().is_some_and(|c| {
            c.devices -= 1;
            c.devices == 0
        });
        if last
            && let Some(c) = self.channels[i].take()
            && let Some(fd) = c.channel.completion_fd()
        {
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                fd,
                EpollEvent::new(EventSet::IN, i as u64),
            );
        }
    }

    fn attach(&mut self, a: QueueAttach) {
        let device = match self
            .devices
            .iter()
            .position(|d| d.as_ref().is_some_and(|d| d.key == a.device))
        {
            Some(i) => i,
            None => {
                let Some(channel) = self.channel_for(&a) else {
                    // The queue stays unserved; the guest sees a stuck queue, not a crash.
                    return;
                };
                let i = free_index(&mut self.devices);
                // The generation first: a change after it is seen on the next check.
                let seen = a.shared.qos.generation();
                let plan = a.shared.qos.plan();
                self.devices[i] = Some(Device {
                    key: a.device,
                    shared: a.shared.clone(),
                    seen,
                    map: HostMap::new(a.mem.memory().into_inner()),
                    map_gen: 0,
                    mem: a.mem.clone(),
                    channel,
                    target: a.disk.target(),
                    queues: 0,
                    log: a.log.clone(),
                    in_flight: 0,
                    limits: Limits {
                        capacity_sectors: a.shared.capacity_sectors.load(Ordering::Relaxed),
                        ..a.shared.limits
                    },
                    lease: plan.map(Lease::new),
                    held: Default::default(),
                });
                i
            }
        };
        if let Some(d) = self.devices[device].as_mut() {
            d.queues += 1;
        }
        // Enough free slots for a full ring of every queue.
        let reserve = usize::from(a.max_queue_size);
        let want = self
            .queues
            .iter()
            .flatten()
            .map(|q| q.reserve)
            .sum::<usize>()
            + reserve;
        if self.slots.capacity() < want {
            self.slots.grow(want - self.slots.capacity());
            self.done.reserve(want.saturating_sub(self.done.capacity()));
        }
        let kick = a.vring.get_ref().get_kick().as_ref().and_then(|k| {
            // SAFETY: the kick eventfd stays open while the vring state that owns it is
            // borrowed here; it is only duplicated.
            let fd = unsafe { BorrowedFd::borrow_raw(k.as_raw_fd()) };
            let own = fd.try_clone_to_owned().ok()?;
            let ev = EpollEvent::new(EventSet::IN | EventSet::EDGE_TRIGGERED, KICK_EVENT);
            self.epoll
                .ctl(ControlOperation::Add, own.as_raw_fd(), ev)
                .ok()
                .map(|()| own)
        });
        let q = free_index(&mut self.queues);
        limited!(
            a.shared.events,
            Level::INFO,
            device = a.shared.index,
            queue = a.queue,
            poller_queue = q,
            "queue attached"
        );
        self.queues[q] = Some(QueueSlot {
            device,
            index: a.queue,
            vring: a.vring,
            reserve,
            in_flight: 0,
            detach: None,
            kick,
            ring: None,
            warm: Warm::default(),
            inflight: a.inflight,
            resubmit: a.resubmit,
            broken: false,
            broken_flag: a.broken,
            lost_interrupts: 0,
            metrics: a.shared.metrics.as_ref().and_then(|m| m.queue(a.queue)),
        });
        self.set_notifications(q, false);
        // The guest may hold completions it was never interrupted for: the process that had
        // the queue before (the old vubd of an upgrade, stopped as its frontend went away)
        // published them while the frontend was taking its interrupts back. One interrupt
        // costs nothing, and the driver looks at its used ring.
        if let Some(slot) = self.queues[q].as_ref() {
            super::publish::signal(&slot.vring.get_ref());
        }
    }

    /// Stops popping from queue `qi` (its detach is acknowledged once nothing of it is in
    /// flight), and tells its device's channel which requests are draining, so that none of
    /// them waits on a device beyond its I/O timeout.
    fn start_detach(&mut self, qi: usize, wait: DetachWait) {
        let Some(q) = self.queues[qi].as_mut() else {
            let _ = wait.done.send(());
            return;
        };
        wait.in_flight.store(q.in_flight, Ordering::Relaxed);
        if q.in_flight > 0
            && let Some(d) = self.devices[q.device].as_ref()
        {
            limited!(
                d.shared.events,
                Level::INFO,
                device = d.shared.index,
                queue = q.index,
                in_flight = q.in_flight,
                "queue stopping: waiting for its requests in flight"
            );
        }
        q.detach = Some(wait);
        if q.in_flight == 0 {
            return;
        }
        let slots = &self.slots;
        if let Some(d) = self.devices[q.device].as_ref()
            && let Some(c) = self.channels[d.channel].as_mut()
        {
            // A request in flight has its slot, and the slot knows its queue.
            c.channel.drain(|tag| slots.queue_of(tag) == qi);
        }
    }

    /// Acknowledges detach requests of queues with nothing in flight, and forgets them.
    pub(super) fn finish_detaches(&mut self) {
        for qi in 0..self.queues.len() {
            let ready = match &self.queues[qi] {
                Some(QueueSlot {
                    detach: Some(wait),
                    in_flight,
                    resubmit,
                    ..
                }) => {
                    // For the waiter's warnings.
                    wait.in_flight.store(*in_flight, Ordering::Relaxed);
                    *in_flight == 0 && resubmit.is_empty()
                }
                _ => false,
            };
            if !ready {
                continue;
            }
            let Some(q) = self.queues[qi].take() else {
                continue;
            };
            if let Some(d) = self.devices[q.device].as_ref() {
                limited!(
                    d.shared.events,
                    Level::INFO,
                    device = d.shared.index,
                    queue = q.index,
                    broken = q.broken,
                    "queue detached"
                );
            }
            if let Some(kick) = &q.kick {
                let ev = EpollEvent::new(EventSet::IN, KICK_EVENT);
                let _ = self
                    .epoll
                    .ctl(ControlOperation::Delete, kick.as_raw_fd(), ev);
            }
            let last = match self.devices[q.device].as_mut() {
                Some(d) => {
                    d.queues -= 1;
                    d.queues == 0
                }
                None => false,
            };
            if last && let Some(d) = self.devices[q.device].take() {
                self.release_channel(d.channel);
            }
            if let Some(wait) = q.detach {
                let _ = wait.done.send(());
            }
        }
    }
}

/// Index of a free entry of `v`, growing it if none is free (control path only).
fn free_index<T>(v: &mut Vec<Option<T>>) -> usize {
    match v.iter().position(Option::is_none) {
        Some(i) => i,
        None => {
            v.push(None);
            v.len() - 1
        }
    }
}
