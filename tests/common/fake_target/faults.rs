//! Fault injection: misbehaviour armed from the test thread and applied by the connection
//! threads to the next PDU or command that matches.
//!
//! The connections look at one atomic flag per PDU they send; the list of armed faults is
//! locked only while something is armed.

use std::mem;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use vubd::nvme::spec::Status;
use vubd::nvme::tcp::pdu::Digests;

/// A misbehaviour of the target. PDU faults apply to the next PDU of their kind sent on any
/// connection; armed one-shot ([`super::FakeTarget::set_fault`]) they fire once, armed
/// persistent ([`super::FakeTarget::set_fault_persistent`]) on every match until cleared.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// The next CapsuleResp, C2HData or R2T carries a wrong header digest. Waits for a
    /// connection with header digests.
    CorruptHeaderDigest,
    /// The next C2HData carries a wrong data digest. Waits for a connection with data digests.
    CorruptDataDigest,
    /// The next C2HData has DATAO + DATAL beyond the command's data (DATAO is the command's
    /// length; DATAL and the payload are unchanged, so the stream stays framed).
    C2hDataOutOfRange,
    /// The next C2HData names a command identifier that is not outstanding (the bitwise
    /// complement of the real one).
    C2hDataForUnknownCid,
    /// The next CapsuleResp names a command identifier that is not outstanding (the bitwise
    /// complement of the real one).
    CapsuleRespUnknownCid,
    /// A 24-byte PDU of reserved type 0x0a goes out before the next CapsuleResp, C2HData or
    /// R2T.
    GarbagePdu,
    /// The next R2T asks for data beyond the command's length (R2TO is the command's length).
    R2tOutOfRange,
    /// Every connection stops reading and answering (the sockets stay open) until cleared.
    /// Always persistent.
    Stall,
    /// The connection that receives the N-th command from now (counting on all connections,
    /// 1 being the next) answers it and closes. Persistent: every N-th command.
    DropConnection(u32),
    /// New connections are closed as soon as they are accepted. Always persistent.
    RefuseConnections,
    /// The next I/O command (Read, Write, Flush, DSM, Write Zeroes) completes with this status
    /// and moves no data.
    FailIo(Status),
}

/// The PDUs a controller sends that PDU faults apply to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Site {
    CapsuleResp,
    C2hData,
    R2t,
}

impl Fault {
    fn applies_to(self, site: Site, digests: Digests) -> bool {
        match self {
            Fault::CorruptHeaderDigest => digests.header,
            Fault::CorruptDataDigest => digests.data && site == Site::C2hData,
            Fault::C2hDataOutOfRange | Fault::C2hDataForUnknownCid => site == Site::C2hData,
            Fault::CapsuleRespUnknownCid => site == Site::CapsuleResp,
            Fault::R2tOutOfRange => site == Site::R2t,
            Fault::GarbagePdu => true,
            Fault::Stall
            | Fault::DropConnection(_)
            | Fault::RefuseConnections
            | Fault::FailIo(_) => false,
        }
    }

    fn same_kind(self, other: Fault) -> bool {
        mem::discriminant(&self) == mem::discriminant(&other)
    }
}

#[derive(Debug)]
struct Armed {
    fault: Fault,
    persistent: bool,
    /// Commands still to come before a [`Fault::DropConnection`] fires.
    countdown: u32,
}

/// The faults armed on one target, shared by its connections.
#[derive(Debug, Default)]
pub(super) struct Faults {
    /// Something is in `armed`: the connections' fast path checks only this.
    any: AtomicBool,
    stalled: AtomicBool,
    refusing: AtomicBool,
    armed: Mutex<Vec<Armed>>,
    /// Stalled connections wait on this; clearing the stall wakes them.
    stall_lock: Mutex<()>,
    stall_cv: Condvar,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Faults {
    pub(super) fn set(&self, fault: Fault, persistent: bool) {
        match fault {
            Fault::Stall => self.stalled.store(true, Ordering::SeqCst),
            Fault::RefuseConnections => self.refusing.store(true, Ordering::SeqCst),
            _ => {
                let countdown = match fault {
                    Fault::DropConnection(n) => n.max(1),
                    _ => 0,
                };
                lock(&self.armed).push(Armed {
                    fault,
                    persistent,
                    countdown,
                });
                self.any.store(true, Ordering::SeqCst);
            }
        }
    }

    /// Disarms every fault of the kind of `fault` (its payload is ignored), or all of them.
    pub(super) fn clear(&self, fault: Option<Fault>) {
        let matches = |f: Fault| fault.is_none_or(|c| c.same_kind(f));
        if matches(Fault::Stall) {
            self.stalled.store(false, Ordering::SeqCst);
            let _guard = lock(&self.stall_lock);
            self.stall_cv.notify_all();
        }
        if matches(Fault::RefuseConnections) {
            self.refusing.store(false, Ordering::SeqCst);
        }
        let mut armed = lock(&self.armed);
        armed.retain(|a| !matches(a.fault));
        self.any.store(!armed.is_empty(), Ordering::SeqCst);
    }

    pub(super) fn refusing(&self) -> bool {
        self.refusing.load(Ordering::Relaxed)
    }

    pub(super) fn stalled(&self) -> bool {
        self.stalled.load(Ordering::Relaxed)
    }

    /// Waits until the stall is cleared or `closed` is set (the connection is being torn
    /// down); `closed` is polled, so whoever sets it need not know about this wait.
    pub(super) fn wait_while_stalled(&self, closed: &AtomicBool) {
        let mut guard = lock(&self.stall_lock);
        while self.stalled() && !closed.load(Ordering::SeqCst) {
            guard = self
                .stall_cv
                .wait_timeout(guard, Duration::from_millis(20))
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// Wakes stalled connections so that they notice their `closed` flag.
    pub(super) fn wake_stalled(&self) {
        let _guard = lock(&self.stall_lock);
        self.stall_cv.notify_all();
    }

    /// The first armed PDU fault that applies to a PDU of kind `site` on a connection with
    /// `digests`; a one-shot fault is disarmed.
    pub(super) fn take_pdu_fault(&self, site: Site, digests: Digests) -> Option<Fault> {
        if !self.any.load(Ordering::Relaxed) {
            return None;
        }
        self.take(|f| f.applies_to(site, digests))
    }

    /// The status of an armed [`Fault::FailIo`].
    pub(super) fn take_io_failure(&self) -> Option<Status> {
        if !self.any.load(Ordering::Relaxed) {
            return None;
        }
        match self.take(|f| matches!(f, Fault::FailIo(_)))? {
            Fault::FailIo(status) => Some(status),
            _ => None,
        }
    }

    fn take(&self, pred: impl Fn(Fault) -> bool) -> Option<Fault> {
        let mut armed = lock(&self.armed);
        let i = armed.iter().position(|a| pred(a.fault))?;
        let fault = armed[i].fault;
        if !armed[i].persistent {
            armed.remove(i);
            self.any.store(!armed.is_empty(), Ordering::SeqCst);
        }
        Some(fault)
    }

    /// Counts one received command against armed [`Fault::DropConnection`]s; true if the
    /// connection that received it must close once it has answered it.
    pub(super) fn command_received(&self) -> bool {
        if !self.any.load(Ordering::Relaxed) {
            return false;
        }
        let mut armed = lock(&self.armed);
        let mut drop_now = false;
        armed.retain_mut(|a| {
            let Fault::DropConnection(n) = a.fault else {
                return true;
            };
            a.countdown = a.countdown.saturating_sub(1);
            if a.countdown > 0 {
                return true;
            }
            drop_now = true;
            a.countdown = n.max(1);
            a.persistent
        });
        self.any.store(!armed.is_empty(), Ordering::SeqCst);
        drop_now
    }
}
