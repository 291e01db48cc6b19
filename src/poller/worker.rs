//! One poller thread: its loop, the queues and device channels it owns, and the life of a
//! request from pop to used ring.
//!
//! Per loop iteration: every queue is checked for available chains (no syscall when there are
//! none), each channel gets at most one submit, and completions are reaped in bounded batches
//! and published with one guest notification per queue, whichever device of the channel each
//! belongs to.

mod attach;
mod broken;
mod publish;
mod start;
mod throttle;

use std::num::Wrapping;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tracing::{Level, debug, error};
use vhost_user_backend::VringT;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddressSpace;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::timerfd::TimerFd;

use super::dirty;
use super::slots::{SlotTable, Tag};
use super::warm::Warm;
use super::{Command, DetachWait, DeviceKey, DeviceShared, PollMode, Shared, Vring};
use crate::bdev::{Channel, IoChannel, Target};
use crate::clock::Clock;
use crate::limited;
use crate::log_limit::LogLimit;
use crate::mem::{DirtyLog, GuestMemoryAtomic, HostMap};
use crate::metrics::{ErrorKind, QueueMetrics};
use crate::qos::Lease;
use crate::virtio_blk::chain::DESC_SIZE;
use crate::virtio_blk::inflight::InflightQueue;
use crate::virtio_blk::request::Limits;
use crate::virtio_blk::ring::SplitRing;
use crate::virtio_blk::{DescTable, MAX_SEGMENTS, RequestError, Scratch, Status, parse};
use broken::Breakage;
use publish::{publish, write_status};
use throttle::Held;

/// Most completions reaped from one channel before they are published.
const REAP_BATCH: usize = 256;
/// Iovecs per slot: every data segment, plus a few for buffers that cross memory regions.
const IOV_PER_SLOT: usize = MAX_SEGMENTS as usize + 8;
/// Epoll data of the wake eventfd; device channels use their index.
const WAKE_EVENT: u64 = u64::MAX;
/// Epoll data of the queues' kick eventfds.
const KICK_EVENT: u64 = u64::MAX - 1;
/// Epoll data of the timer of rate-limited queues.
const TIMER_EVENT: u64 = u64::MAX - 2;
/// Requests one queue takes in a pass at most: queues that share a poller take turns, so that
/// one with hundreds of requests waiting delays another's by one batch only.
const TURN: u32 = 32;
/// Longest sleep of a poller whose queues rate limits hold back: a change of limits (which
/// does not wake the pollers) takes effect within it.
const MAX_THROTTLED_SLEEP: Duration = Duration::from_millis(50);

/// A device with at least one queue on this poller.
struct Device {
    key: DeviceKey,
    shared: Arc<DeviceShared>,
    mem: GuestMemoryAtomic,
    /// Host addresses of the current guest memory map (rebuilt when the map changes).
    map: HostMap,
    /// Incremented whenever `map` is rebuilt: ring pointers of an older one are stale.
    map_gen: u64,
    /// The device's generation ([`DeviceShared::changed`]) when `map`, `limits` and `lease`
    /// were last brought up to date.
    seen: u64,
    /// Index of the device's channel in the worker's `channels`.
    channel: usize,
    /// What the device's operations tell a channel shared with other devices.
    target: Target,
    queues: usize,
    /// The dirty log of a live migration, while the frontend has logging on.
    log: Option<Arc<DirtyLog>>,
    /// The device's requests in flight on this poller, and at most how many it may have
    /// ([`DeviceShared::max_in_flight`]): past that its queues keep their chains in the
    /// avail ring until completions make room.
    in_flight: u32,
    /// The request limits, with the capacity in force ([`DeviceShared::capacity_sectors`]).
    limits: Limits,
    /// This poller's leases of the device's rate limits (`None`: no limit).
    lease: Option<Lease>,
    /// Whether, and until when, the device's limits hold it back.
    held: Held,
}

/// An I/O channel of this poller, serving one device or several (namespaces of one NVMe
/// controller share a channel, so the controller has one I/O queue pair per poller).
struct SharedChannel {
    /// [`crate::bdev::Disk::channel_key`] of its devices.
    key: Option<usize>,
    channel: Channel,
    /// Devices using it.
    devices: usize,
    /// Rate limit of its submission failures, which a pass can meet every time.
    warnings: LogLimit,
}

/// A queue this poller serves.
struct QueueSlot {
    device: usize,
    index: u16,
    vring: Vring,
    /// In-flight slots reserved for this queue (its largest ring).
    reserve: usize,
    in_flight: u32,
    /// Set by a detach request: stop popping, acknowledge once `in_flight` is zero and
    /// `resubmit` is empty.
    detach: Option<DetachWait>,
    /// This poller's own reference to the queue's kick eventfd, watched edge-triggered (and
    /// never read) while the poller sleeps, so that a kick wakes it directly; the relay thread
    /// reads the counter and wakes the poller itself if it got there first.
    kick: Option<OwnedFd>,
    /// Host pointers to the rings, with the `map_gen` they were translated under.
    ring: Option<(u64, SplitRing)>,
    /// The lines of the queue's next request, prefetched while the poller waits for it.
    warm: Warm,
    /// The queue's area of the inflight region: pops and completions are recorded in it.
    inflight: Option<InflightQueue>,
    /// Heads an earlier process left in flight, run before anything new, last first.
    resubmit: Vec<u16>,
    /// The driver broke the ring's rules: nothing more is popped (see `broken`).
    broken: bool,
    /// `broken`, as the control plane sees it (it then stops forwarding the queue's kicks).
    broken_flag: Arc<AtomicBool>,
    /// Interrupts the frontend did not take: its call eventfd was full.
    lost_interrupts: u64,
    /// The queue's counters, unless metrics are off: this poller alone writes them.
    metrics: Option<Arc<QueueMetrics>>,
}

/// How a request ends.
#[derive(Clone, Copy, Debug)]
pub(super) struct Completion {
    pub status_addr: vm_memory::GuestAddress,
    pub status: Status,
    pub used_len: u32,
}

pub(super) struct Worker {
    shared: Arc<Shared>,
    mode: PollMode,
    devices: Vec<Option<Device>>,
    channels: Vec<Option<SharedChannel>>,
    queues: Vec<Option<QueueSlot>>,
    slots: SlotTable,
    /// Parser scratch: bounds the descriptors of one chain, holds discard segments.
    scratch: Scratch,
    /// Tags finished in the current reap.
    done: Vec<Tag>,
    commands: Vec<Command>,
    epoll: Epoll,
    events: Vec<EpollEvent>,
    stopping: bool,
    /// Read once per pass that takes requests and once per batch of completions, for the
    /// latencies of queues with metrics and for rate limits.
    clock: Clock,
    /// A device may be held back by its rate limits (set when one is; cleared by the sleep
    /// that finds none is): only then does the sleep look at the devices.
    maybe_held: bool,
    /// Wakes the poller when a held-back device may go on.
    timer: TimerFd,
}

/// In adaptive mode, empty passes between two looks at the clock: about a microsecond here,
/// against tens of microseconds of `--poll-idle-us`. A clock read on every empty pass cost a
/// polling client 8 % of its QD 1 IOPS (A/B, six pairs of runs).
const CLOCK_EVERY_PASSES: u32 = 32;

impl Device {
    /// Brings the device's memory map, capacity and rate limits up to date if the device
    /// changed since the last look (its generation moved); returns whether the map was
    /// rebuilt. The old map's snapshot is let go here, so that its retired regions can be
    /// released (and, for a DMA device, unmapped). Inlined: on every pass with work it is one
    /// load and a compare (a call cost it 20 instructions a batch).
    #[inline(always)]
    fn refresh(&mut self) -> bool {
        let generation = self.shared.qos.generation();
        if generation == self.seen {
            return false;
        }
        self.reload(generation)
    }

    #[cold]
    #[inline(never)]
    fn reload(&mut self, generation: u64) -> bool {
        self.seen = generation;
        self.limits.capacity_sectors = self.shared.capacity_sectors.load(Ordering::Relaxed);
        // Leases of a plan still in force are kept: a change of the map or the capacity does
        // not give the device a new step of its limits.
        let plan = self.shared.qos.plan();
        match (plan, &self.lease) {
            (Some(p), Some(l)) if l.is_of(&p) => {}
            (plan, _) => {
                self.lease = plan.map(Lease::new);
                // New limits (or none): what held the device back no longer does.
                self.held = Held::default();
            }
        }
        let mem = self.mem.memory();
        if self.map.is_of(&mem) {
            return false;
        }
        self.map = HostMap::new(mem.into_inner());
        self.map_gen += 1;
        true
    }
}

impl Worker {
    pub(super) fn new(shared: Arc<Shared>, mode: PollMode) -> std::io::Result<Self> {
        let epoll = Epoll::new()?;
        epoll.ctl(
            ControlOperation::Add,
            shared.wake.as_raw_fd(),
            EpollEvent::new(EventSet::IN, WAKE_EVENT),
        )?;
        let timer = TimerFd::new()?;
        epoll.ctl(
            ControlOperation::Add,
            timer.as_raw_fd(),
            EpollEvent::new(EventSet::IN, TIMER_EVENT),
        )?;
        Ok(Self {
            shared,
            mode,
            devices: Vec::new(),
            channels: Vec::new(),
            queues: Vec::new(),
            slots: SlotTable::new(0, IOV_PER_SLOT),
            // Data segments plus header and status, which may themselves be split.
            scratch: Scratch::new(MAX_SEGMENTS as usize + 8),
            done: Vec::new(),
            commands: Vec::new(),
            epoll,
            events: vec![EpollEvent::default(); 16],
            stopping: false,
            clock: Clock::get(),
            maybe_held: false,
            timer,
        })
    }

    pub(super) fn run(mut self) {
        let mut idle_since: Option<Instant> = None;
        // Empty passes since the last work: adaptive mode reads the clock only every
        // `CLOCK_EVERY_PASSES` of them.
        let mut empty_passes: u32 = 0;
        loop {
            if self.shared.has_commands.load(Ordering::Acquire) {
                self.handle_commands();
            }
            let work = self.poll_once();
            self.finish_detaches();
            if self.stopping && self.queues.iter().all(Option::is_none) {
                return;
            }
            if work > 0 {
                idle_since = None;
                empty_passes = 0;
                continue;
            }
            empty_passes = empty_passes.wrapping_add(1);
            let sleep = match self.mode {
                _ if self.queues.iter().all(Option::is_none) => true,
                PollMode::Always => false,
                PollMode::Never => true,
                PollMode::Adaptive { idle } => {
                    empty_passes % CLOCK_EVERY_PASSES == 0 && {
                        let now = Instant::now();
                        now.duration_since(*idle_since.get_or_insert(now)) >= idle
                    }
                }
            };
            // A channel without a completion event (a polled device with commands in flight)
            // keeps its poller awake.
            let sleep = sleep
                && !self
                    .channels
                    .iter()
                    .flatten()
                    .any(|c| c.channel.must_poll());
            if sleep {
                self.sleep();
                idle_since = None;
            } else {
                std::hint::spin_loop();
            }
        }
    }

    /// One pass over every queue and channel; returns how much work it found.
    #[inline(always)]
    fn poll_once(&mut self) -> usize {
        let mut work = 0;
        for qi in 0..self.queues.len() {
            work += self.process_queue(qi);
        }
        for ci in 0..self.channels.len() {
            let Some(c) = self.channels[ci].as_mut() else {
                continue;
            };
            if let Err(e) = c.channel.submit() {
                // Queued operations stay queued; the next iteration retries.
                limited!(
                    c.warnings,
                    Level::WARN,
                    channel = ci,
                    error = %e,
                    "I/O submission failed"
                );
            }
            work += self.reap(ci);
        }
        work
    }

    /// Pops, parses and starts every available chain of one queue. Returns how many.
    fn process_queue(&mut self, qi: usize) -> usize {
        let Worker {
            queues,
            devices,
            channels,
            slots,
            scratch,
            epoll,
            clock,
            maybe_held,
            ..
        } = self;
        let Some(q) = queues[qi].as_mut() else {
            return 0;
        };
        // A broken queue is not looked at again. A queue being detached takes nothing new;
        // what an earlier process left in flight was popped already (next avail counts it), so
        // it still runs before the detach ends.
        if q.is_broken() || (q.detach.is_some() && q.resubmit.is_empty()) {
            return 0;
        }
        let Some(dev) = devices[q.device].as_mut() else {
            return 0;
        };
        let Some(channel) = channels[dev.channel].as_mut().map(|c| &mut c.channel) else {
            return 0;
        };
        let mut state = q.vring.get_mut();
        let queue = state.get_queue_mut();
        // GET_VRING_BASE marks the queue not ready before it detaches it; the rings stay where
        // they are until the frontend has the reply.
        if !queue.ready() && q.detach.is_none() {
            return 0;
        }
        let Some(mut ring) = fresh_ring(&mut q.ring, dev, queue) else {
            return 0;
        };
        // The common idle case: nothing new, nothing loaded, no syscall.
        let mut next = Wrapping(queue.next_avail());
        let avail = ring.avail_idx();
        if avail == next && q.resubmit.is_empty() {
            let _ = q.warm.idle_pass(ring.avail_entry_addr(next));
            return 0;
        }
        // A fault survived in the device's memory (a file its frontend shortened: see
        // `mem::fault`) fails the device: its session closes, and nothing more is taken.
        if dev.shared.faults.failed() {
            return stop_faulted(&mut q.resubmit, queue);
        }
        // Check the device's generation only now: a frontend adds a region (ADD_MEM_REG,
        // acknowledged after the map is replaced and the generation bumped), or learns of a
        // larger capacity, before it publishes requests that use it, so the generation read
        // after the avail index covers what that index announces.
        if dev.refresh() {
            match fresh_ring(&mut q.ring, dev, queue) {
                Some(r) => ring = r,
                None => return 0,
            }
        }
        // What an earlier process left in flight was admitted by it: not held back again.
        if let Some(lease) = dev.lease.as_mut()
            && lease.spent()
            && q.resubmit.is_empty()
            && !throttle::renew(
                lease,
                &mut dev.held,
                q.metrics.as_deref(),
                clock,
                maybe_held,
            )
        {
            return 0;
        }
        // The pass's time: every request it takes starts then.
        let qm = q.metrics.as_deref();
        let now = if qm.is_some() { clock.now() } else { 0 };
        if (avail - next).0 > ring.size() {
            // virtio 1.2 §2.7.6: the driver never makes more than a ring's worth available.
            let why = Breakage::AvailIndex {
                next: next.0,
                avail: avail.0,
            };
            drop(state);
            q.break_queue(&dev.shared, epoll, why);
            return 0;
        }
        let table = DescTable {
            addr: queue.desc_table(),
            size: queue.size(),
        };
        let map = &dev.map;
        let snapshot = map.snapshot();
        let old_used = Wrapping(queue.next_used());
        let mut used = old_used;
        let mut popped = 0;
        // The last request's descriptor head and status byte, for `warm`.
        let mut last = None;
        // Set when the driver broke the ring's rules: the pass ends there, the chain that
        // broke it is not taken (next avail stays on it), and what completed is published.
        let mut breakage = None;
        let limits = &dev.limits;
        // Requests this pass may still take: a turn, cut short by a used-up lease.
        let mut turn = TURN;
        loop {
            if turn == 0
                || slots.is_full()
                || !channel.has_room()
                || dev.in_flight >= dev.shared.max_in_flight.load(Ordering::Relaxed)
            {
                // Retried on the next iteration, once completions have freed room.
                break;
            }
            // What an earlier process left in flight runs first (it was popped already).
            let (head, fresh) = match q.resubmit.pop() {
                Some(head) => {
                    popped += 1;
                    if head >= table.size {
                        breakage = Some(Breakage::InflightHead { head });
                        break;
                    }
                    (head, false)
                }
                None if next == avail || q.detach.is_some() => break,
                None => {
                    // Chains in use: in flight, or completed in this pass and not yet published.
                    let in_use = q.in_flight + u32::from((used - old_used).0);
                    if in_use >= u32::from(table.size) {
                        breakage = Some(Breakage::InUse {
                            in_use,
                            size: table.size,
                        });
                        break;
                    }
                    let head = ring.avail_head(next);
                    if head >= table.size {
                        breakage = Some(Breakage::Head { pos: next.0, head });
                        break;
                    }
                    next += 1;
                    popped += 1;
                    (head, true)
                }
            };
            let Some(tag) = slots.alloc() else {
                break;
            };
            turn -= 1;
            let parsed = parse(map, table, head, limits, scratch, slots.iov_mut(tag));
            if let Err(rej) = &parsed
                && rej.status.is_none()
            {
                // No status byte to complete the chain with: the ring is broken, not just
                // this request.
                slots.free(tag);
                breakage = Some(match rej.error {
                    RequestError::EmptyChain => Breakage::Chain { head },
                    _ => Breakage::NoStatus { head },
                });
                if fresh {
                    next -= 1;
                    popped -= 1;
                }
                break;
            }
            if fresh && let Some(inflight) = &mut q.inflight {
                inflight.begin(head);
            }
            last = Some((
                head,
                match &parsed {
                    Ok(p) => Some(p.status),
                    Err(rej) => rej.status,
                },
            ));
            if let Ok(p) = &parsed {
                let op = start::op(p.request.kind);
                if let Some(m) = qm {
                    m.started(op);
                }
                if let Some(lease) = dev.lease.as_mut()
                    && lease.take(start::class(op), p.request.data_len)
                {
                    turn = 0;
                }
            }
            let done = match &parsed {
                Ok(p) => match start::start(
                    &dev.shared,
                    (&mut *channel, &dev.target),
                    slots,
                    (qi, tag, now),
                    p,
                    scratch.ranges(),
                    snapshot,
                ) {
                    Some((head, c)) => {
                        if let Some(m) = qm {
                            // Completed within the pass (GET_ID, no data, or nothing
                            // could be queued): no time, and nothing moved to or from the disk.
                            m.completed(c.status == Status::Ok, (false, 0), 0, clock);
                        }
                        if let Some(log) = &dev.log {
                            let data = (c.used_len > 1).then(|| slots.iov(tag));
                            dirty::request(log, snapshot, data, c.status_addr);
                        }
                        slots.free(tag);
                        Some((head, write_status(map, snapshot, c)))
                    }
                    None => {
                        q.in_flight += 1;
                        dev.in_flight += 1;
                        None
                    }
                },
                Err(rej) => {
                    debug!(queue = q.index, head = rej.head, error = %rej.error, "request rejected");
                    if let Some(m) = qm {
                        m.refused(match rej.error.status() {
                            Status::Unsupp => ErrorKind::Unsupported,
                            _ => ErrorKind::Invalid,
                        });
                    }
                    slots.free(tag);
                    // The status address was checked by the parser (a chain without one broke
                    // the queue above).
                    let len = match rej.status {
                        Some(addr) => {
                            if let Some(log) = &dev.log {
                                dirty::request(log, snapshot, None, addr);
                            }
                            u32::from(map.write_u8(addr.0, rej.error.status() as u8))
                        }
                        None => 0,
                    };
                    Some((rej.head, len))
                }
            };
            if let Some((head, len)) = done {
                if let Some(inflight) = &mut q.inflight {
                    inflight.link(head);
                }
                ring.put_used(used, head, len);
                used += 1;
            }
        }
        if let Some((head, status)) = last {
            let desc = map
                .host_range(table.addr, u64::from(table.size) * DESC_SIZE)
                .map(|t| t.wrapping_add(usize::from(head) * DESC_SIZE as usize));
            q.warm
                .worked(desc, status.and_then(|s| map.host_range(s.0, 1)));
        }
        queue.set_next_avail(next.0);
        let delivered = used == old_used
            || publish(
                &ring,
                &mut state,
                dev.log.as_deref(),
                q.inflight.as_mut(),
                old_used,
                used,
            );
        drop(state);
        if !delivered {
            q.interrupt_lost(&dev.shared);
        }
        if let Some(why) = breakage {
            q.break_queue(&dev.shared, epoll, why);
        }
        popped
    }

    /// Reaps one channel's finished operations and publishes the finished requests (of
    /// whichever device each belongs to: the slot knows its queue, the queue its device).
    fn reap(&mut self, ci: usize) -> usize {
        let mut total = 0;
        loop {
            let Some(c) = self.channels[ci].as_mut() else {
                return total;
            };
            let (slots, done) = (&mut self.slots, &mut self.done);
            let n = c.channel.poll(REAP_BATCH, |tag, res| {
                if slots.complete_op(tag, res) {
                    done.push(tag);
                }
            });
            total += n;
            if !self.done.is_empty() {
                self.publish_done();
            }
            if n < REAP_BATCH {
                return total;
            }
        }
    }

    /// Re-enables guest notifications, re-checks every ring so that no kick is lost, and
    /// sleeps until a kick, a completion or a command.
    fn sleep(&mut self) {
        self.shared.sleeping.store(true, Ordering::SeqCst);
        let mut more = self.shared.has_commands.load(Ordering::SeqCst);
        // The earliest moment a device rate limits hold back may go on, if one is held.
        let held = self.held_until();
        let now = if held.is_some() { self.clock.now() } else { 0 };
        for qi in 0..self.queues.len() {
            // A held-back device's queues keep their kicks off: the timer wakes the poller.
            if held.is_some() && self.queue_held(qi, now) {
                continue;
            }
            more |= self.set_notifications(qi, true) && !self.held_back(qi);
        }
        let timeout = if more {
            None
        } else if let Some(until) = held {
            Some(self.arm_throttle_timer(until))
        } else {
            Some(-1)
        };
        if let Some(timeout) = timeout {
            match self.epoll.wait(timeout, &mut self.events) {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => error!(error = %e, "poller epoll_wait failed"),
            }
        }
        self.shared.sleeping.store(false, Ordering::SeqCst);
        if timeout.is_some_and(|t| t >= 0) {
            self.disarm_throttle_timer();
        }
        let _ = self.shared.wake.read();
        for c in self.channels.iter().flatten() {
            c.channel.clear_completion_fd();
        }
        for qi in 0..self.queues.len() {
            self.set_notifications(qi, false);
        }
    }

    /// The queue's device is at its cap of requests in flight on this poller: chains in its
    /// avail ring wait for a completion of the device, which wakes the poller (or keeps a
    /// polled channel awake), so they are no reason not to sleep.
    fn held_back(&self, qi: usize) -> bool {
        self.queues[qi]
            .as_ref()
            .and_then(|q| self.devices[q.device].as_ref())
            .is_some_and(|d| {
                d.in_flight > 0 && d.in_flight >= d.shared.max_in_flight.load(Ordering::Relaxed)
            })
    }

    /// Turns guest kicks for one queue on or off; when turning them on, returns whether
    /// chains became available meanwhile (virtio 1.2 §2.7.10: re-check after enabling).
    fn set_notifications(&mut self, qi: usize, enable: bool) -> bool {
        let Some(q) = self.queues[qi].as_mut() else {
            return false;
        };
        // A broken queue's kicks stay off: the poller sleeps whatever its avail index says.
        if q.detach.is_some() || q.is_broken() {
            return false;
        }
        let Some(d) = self.devices[q.device].as_ref() else {
            return false;
        };
        let mut state = q.vring.get_mut();
        let queue = state.get_queue_mut();
        if !queue.ready() {
            return false;
        }
        let Some(ring) = fresh_ring(&mut q.ring, d, queue) else {
            return false;
        };
        if let Some(log) = &d.log {
            dirty::used_ring(log, &ring); // avail_event or the flags
        }
        if enable {
            ring.enable_kicks(Wrapping(queue.next_avail()))
        } else {
            ring.disable_kicks();
            false
        }
    }
}

/// Stops serving a queue of a device whose memory faulted: what an earlier process left in
/// flight is dropped (the inflight region keeps it for the next session), and the queue is
/// marked not ready, so that it is neither polled nor slept on again until its frontend
/// starts it anew (its session is closing). Requests in flight still complete.
#[cold]
#[inline(never)]
fn stop_faulted(resubmit: &mut Vec<u16>, queue: &mut Queue) -> usize {
    resubmit.clear();
    queue.set_ready(false);
    0
}

/// The queue's ring pointers, re-translated when the queue was reconfigured or the device's
/// memory map rebuilt since they were computed.
///
/// `#[inline(always)]`: a few comparisons on every pass of every queue and every batch;
/// left to itself the compiler stopped inlining it (and `poll_once`) once the batch's publish
/// step grew, which cost 25-50 instructions per request at queue depth 1.
#[inline(always)]
fn fresh_ring(
    cache: &mut Option<(u64, SplitRing)>,
    dev: &Device,
    queue: &Queue,
) -> Option<SplitRing> {
    let (avail, used, size, ev) = (
        queue.avail_ring(),
        queue.used_ring(),
        queue.size(),
        queue.event_idx_enabled(),
    );
    if let Some((built, r)) = cache {
        if *built == dev.map_gen && r.is_at(avail, used, size, ev) {
            return Some(*r);
        }
    }
    translate_ring(cache, dev, (avail, used, size, ev))
}

/// The slow part of [`fresh_ring`]: translates the rings anew.
#[cold]
#[inline(never)]
fn translate_ring(
    cache: &mut Option<(u64, SplitRing)>,
    dev: &Device,
    (avail, used, size, ev): (u64, u64, u16, bool),
) -> Option<SplitRing> {
    let r = SplitRing::new(&dev.map, avail, used, size, ev);
    *cache = r.map(|r| (dev.map_gen, r));
    r
}
