//! The queues of one session as the frontend runs them: the poller of each, whether it is
//! attached there or broke, and which the frontend has started. A device offers more queues
//! than most frontends start (by default as many as a guest may have vCPUs), so what the
//! device spends on its queues follows the started ones: its cap on requests in flight is
//! split over their pollers, each brings its own log budget, and only their pollers are told
//! of a change of memory or dirty log.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::poller::{Detaching, DeviceKey, DeviceShared, PollerHandle, QueueAttach};

/// The queues of one session; see the module documentation.
pub(super) struct Queues {
    /// `pollers[q]` serves queue `q`.
    pollers: Vec<PollerHandle>,
    /// Queue `q` is attached to its poller: kicks only need a wake-up.
    attached: Vec<AtomicBool>,
    /// Queue `q`'s poller found it broken: its kicks wake nobody until it is attached again
    /// (after the frontend stopped and restarted it).
    broken: Vec<Arc<AtomicBool>>,
    /// Queue `q` was attached at least once in the session.
    started: Vec<AtomicBool>,
}

impl Queues {
    /// The queues of a session, queue `q` served by `pollers[q]`.
    pub(super) fn new(pollers: Vec<PollerHandle>) -> Self {
        let n = pollers.len();
        Self {
            pollers,
            attached: (0..n).map(|_| AtomicBool::new(false)).collect(),
            broken: (0..n).map(|_| Arc::default()).collect(),
            started: (0..n).map(|_| AtomicBool::new(false)).collect(),
        }
    }

    /// Whether queue `q` is attached to its poller.
    pub(super) fn is_attached(&self, q: usize) -> bool {
        self.attached[q].load(Ordering::Acquire)
    }

    /// Whether any queue is attached.
    pub(super) fn any_attached(&self) -> bool {
        self.attached.iter().any(|a| a.load(Ordering::Acquire))
    }

    /// Hands queue `q` to its poller with `attach` (whose `broken` flag this sets). The device
    /// first learns what the queue adds: a log budget the first time it starts, and its cap
    /// on requests in flight split over one more poller if the queue brings one. Call with the
    /// session's transitions serialised, as [`Queues::start_detach`].
    pub(super) fn attach(
        &self,
        q: usize,
        shared: &DeviceShared,
        attach: impl FnOnce(Arc<AtomicBool>) -> QueueAttach,
    ) {
        // A queue attached again starts afresh: the frontend restarted the ring.
        self.broken[q].store(false, Ordering::Release);
        self.attached[q].store(true, Ordering::Release);
        if !self.started[q].swap(true, Ordering::Relaxed) {
            shared.queue_started();
        }
        shared.spread_in_flight(self.pollers_in_use().len());
        self.pollers[q].attach(attach(self.broken[q].clone()));
    }

    /// Asks queue `q`'s poller to give it back, if it has it. Once every such detach is
    /// waited for, [`Queues::detached`] gives the device's cap to the pollers left.
    pub(super) fn start_detach(&self, q: usize, key: DeviceKey) -> Option<Detaching> {
        self.attached[q]
            .swap(false, Ordering::AcqRel)
            .then(|| self.pollers[q].start_detach(key, q as u16))
    }

    /// Queues were detached: the cap on requests in flight is split over the pollers that
    /// still serve a started queue.
    pub(super) fn detached(&self, shared: &DeviceShared) {
        shared.spread_in_flight(self.pollers_in_use().len());
    }

    /// A kick of queue `q`: wakes its poller if the queue is attached and not broken (a
    /// broken queue's kicks wake nobody: the poller ignores it until the frontend restarts
    /// the ring, and a guest that keeps kicking must not keep it busy). Returns whether the
    /// queue is attached.
    pub(super) fn kick(&self, q: usize) -> bool {
        if !self.is_attached(q) {
            return false;
        }
        if !self.broken[q].load(Ordering::Acquire) {
            self.pollers[q].kick();
        }
        true
    }

    /// The pollers that serve an attached queue, each once: those a change of the device's
    /// memory or dirty log concerns. A queue attached later takes the change with it.
    pub(super) fn pollers_in_use(&self) -> Vec<&PollerHandle> {
        let mut in_use: Vec<&PollerHandle> = Vec::new();
        for (p, attached) in self.pollers.iter().zip(&self.attached) {
            if attached.load(Ordering::Acquire) && !in_use.iter().any(|u| u.index() == p.index()) {
                in_use.push(p);
            }
        }
        in_use
    }
}
