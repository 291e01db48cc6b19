//! The supervisor thread of one NVMe/TCP controller: keep-alive on the admin queue, and
//! reconnection of the whole controller, with backoff, when anything fails.
//!
//! It also owns the namespace's size. One Asynchronous Event Request stays outstanding on the
//! admin queue (sent again after each completion and after each reconnection); it has no time
//! limit and is never mistaken for a keep-alive's completion (`nvme::tcp::sync`). When it
//! reports that namespaces changed, the Changed Namespace List is read (which clears the
//! event) and, if it names ours, Identify Namespace: a larger size becomes the capacity at
//! once (its eventfd tells the device's session), a smaller one waits for `device_resize`
//! with `force`. The control path's `device_resize` asks through `Shared::size_asks` and
//! gets the size read the same way.

use std::error::Error as StdError;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use thiserror::Error;
use tracing::{debug, info, warn};

use super::{CtrlState, NvmeTcpConfig, Shared, lock};
use crate::nvme::spec::{AsyncEvent, Cqe, IdentifyNamespace};
use crate::nvme::tcp::ctrl::{Controller, CtrlError};

/// Why a reconnection attempt, or a read of the namespace's size, failed.
#[derive(Debug, Error)]
enum ReconnectError {
    #[error(transparent)]
    Ctrl(#[from] CtrlError),
    #[error("namespace {nsid} now has a different {what}")]
    NamespaceChanged { nsid: u32, what: &'static str },
    #[error("the controller is not connected; it is being reconnected")]
    NotConnected,
}

/// The supervisor's answer to the control path: the namespace's size in bytes.
pub(super) type SizeAnswer = Result<u64, Arc<dyn StdError + Send + Sync>>;

/// The supervisor did not answer in time (a target that does not answer its admin commands).
#[derive(Debug, Error)]
#[error("the NVMe/TCP supervisor did not answer within {0:?}")]
pub(super) struct NoAnswer(pub(super) Duration);

/// Keep-alives go at this fraction of the keep-alive timeout (as Linux does: half).
const KEEP_ALIVE_DIVISOR: u32 = 2;

pub(super) struct Supervisor {
    cfg: NvmeTcpConfig,
    ctrl: Option<Controller>,
    shared: Arc<Shared>,
    depth: u16,
    /// When the controller was lost (the clock's milliseconds).
    lost_since: Option<u64>,
    next_keep_alive: u64,
}

impl Supervisor {
    pub(super) fn new(
        cfg: NvmeTcpConfig,
        ctrl: Controller,
        shared: Arc<Shared>,
        depth: u16,
    ) -> Self {
        Self {
            cfg,
            ctrl: Some(ctrl),
            shared,
            depth,
            lost_since: None,
            next_keep_alive: 0,
        }
    }

    fn keep_alive_interval(&self) -> u64 {
        (self.cfg.ctrl.kato / KEEP_ALIVE_DIVISOR)
            .as_millis()
            .max(100) as u64
    }

    pub(super) fn run(mut self) {
        crate::sandbox::enter(crate::sandbox::Role::Supervisor);
        self.next_keep_alive = self.shared.clock.now_ms() + self.keep_alive_interval();
        self.arm_async_event();
        loop {
            let now = self.shared.clock.now_ms();
            let wait = match self.shared.state() {
                CtrlState::Live => self.next_keep_alive.saturating_sub(now),
                CtrlState::Reconnecting | CtrlState::Failed => {
                    self.cfg.reconnect_delay.as_millis() as u64
                }
            };
            self.wait(Duration::from_millis(wait));
            if self.shared.stopping.load(Ordering::Acquire) {
                if let Some(ctrl) = self.ctrl.take() {
                    // Best effort: the daemon is going away either way.
                    let _ = ctrl.shutdown();
                }
                return;
            }
            match self.shared.state() {
                CtrlState::Live => {
                    if self.shared.reset_requested.swap(false, Ordering::AcqRel) {
                        self.lose("an I/O queue failed");
                    } else if self.shared.clock.now_ms() >= self.next_keep_alive {
                        self.keep_alive();
                    }
                }
                CtrlState::Reconnecting | CtrlState::Failed => self.reconnect(),
            }
            // An event may have come during a keep-alive, and a question meanwhile.
            self.async_event();
            self.answer_size_asks();
        }
    }

    /// Sleeps until woken, the admin queue has something to read (an asynchronous event, or
    /// the controller closed it), or `timeout` passes.
    fn wait(&self, timeout: Duration) {
        let pollfd = |fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        let mut fds = [pollfd(self.shared.wake.as_raw_fd()), pollfd(-1)];
        if let Some(c) = self.ctrl.as_ref().filter(|c| c.namespace_notices()) {
            fds[1].fd = c.as_raw_fd();
        }
        let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: `fds` is a valid array of two pollfds for the duration of the call (a
        // negative fd is ignored).
        unsafe { libc::poll(fds.as_mut_ptr(), 2, ms) };
        let _ = self.shared.wake.read();
    }

    /// Sends an Asynchronous Event Request unless one is outstanding; a failure loses the
    /// controller.
    fn arm_async_event(&mut self) {
        let armed = match self.ctrl.as_mut() {
            Some(c) => c.arm_async_event(),
            None => return,
        };
        if let Err(e) = armed {
            warn!(error = %crate::error_chain::error_chain(&e), "NVMe/TCP asynchronous event request failed");
            self.lose("the admin queue failed");
        }
    }

    /// Handles the asynchronous event that came, if one did. A broken admin queue loses the
    /// controller; a command of the handling that failed otherwise is logged (an admin
    /// command that broke the queue is seen here at the next turn, as the socket is closed).
    fn async_event(&mut self) {
        let Some(ctrl) = self.ctrl.as_mut() else {
            return;
        };
        match ctrl.async_event() {
            Ok(None) => {}
            Ok(Some(cqe)) => {
                if let Err(e) = self.on_async_event(cqe) {
                    warn!(
                        error = %crate::error_chain::error_chain(&e),
                        "NVMe/TCP asynchronous event not handled"
                    );
                }
            }
            Err(e) => {
                warn!(error = %crate::error_chain::error_chain(&e), "NVMe/TCP admin queue failed");
                self.lose("the admin queue failed");
            }
        }
    }

    /// An Asynchronous Event Request completed: armed again, and a namespace notice naming
    /// ours reads its size.
    fn on_async_event(&mut self, cqe: Cqe) -> Result<(), ReconnectError> {
        let status = cqe.status();
        if !status.is_success() {
            // The controller ended it (or refuses more): namespace changes are known again
            // from the next reconnection, or from device_resize.
            info!(target = %self.cfg.addr, %status, "NVMe/TCP asynchronous event request ended");
            return Ok(());
        }
        let event = AsyncEvent::from_dw0(cqe.dw0());
        let nsid = self.shared.geo.nsid;
        let Some(ctrl) = self.ctrl.as_mut() else {
            return Ok(());
        };
        ctrl.arm_async_event()?;
        if !event.namespace_changed() {
            debug!(target = %self.cfg.addr, ?event, "NVMe/TCP asynchronous event ignored");
            return Ok(());
        }
        let changed = ctrl.changed_namespaces()?;
        debug!(target = %self.cfg.addr, ?changed, "NVMe/TCP namespaces changed");
        if changed.contains(nsid) {
            let bytes = self.namespace_size()?;
            self.follow(bytes);
        }
        Ok(())
    }

    /// Identify Namespace again: the namespace's size in bytes, its block size unchanged.
    fn namespace_size(&mut self) -> Result<u64, ReconnectError> {
        let ctrl = self.ctrl.as_mut().ok_or(ReconnectError::NotConnected)?;
        let ns = ctrl.refresh_namespace()?;
        namespace_bytes(ns, self.shared.geo.nsid, self.shared.geo.lba_shift)
    }

    /// The namespace has `bytes` now: a larger capacity is taken (and told through the
    /// capacity's eventfd); a smaller one is left for `device_resize` with `force`.
    fn follow(&self, bytes: u64) {
        let before = self.shared.capacity.follow_growth(bytes);
        let nsid = self.shared.geo.nsid;
        if bytes > before {
            info!(target = %self.cfg.addr, nsid, from = before, to = bytes, "NVMe/TCP namespace grew");
        } else if bytes < before {
            warn!(
                target = %self.cfg.addr, nsid, from = before, to = bytes,
                "NVMe/TCP namespace shrank; the guest keeps its capacity until device_resize \
                 with force=true"
            );
        }
    }

    /// Answers the control path's questions for the namespace's size, all with one read.
    fn answer_size_asks(&mut self) {
        let asks = std::mem::take(&mut *lock(&self.shared.size_asks));
        if asks.is_empty() {
            return;
        }
        let live = self.shared.state() == CtrlState::Live;
        // A failure that broke the admin queue is seen by the next `async_event`.
        let size = if live {
            self.namespace_size()
        } else {
            Err(ReconnectError::NotConnected)
        };
        let answer: SizeAnswer = size.map_err(|e| Arc::new(e) as Arc<dyn StdError + Send + Sync>);
        for ask in asks {
            let _ = ask.send(answer.clone());
        }
    }

    fn keep_alive(&mut self) {
        let result = match self.ctrl.as_mut() {
            Some(c) => c.keep_alive(),
            None => return,
        };
        match result {
            Ok(()) => {
                self.next_keep_alive = self.shared.clock.now_ms() + self.keep_alive_interval();
            }
            Err(e) => {
                warn!(error = %crate::error_chain::error_chain(&e), "NVMe/TCP keep-alive failed");
                self.lose("keep-alive failed");
            }
        }
    }

    /// The controller is gone: every queue's connection is stale from now on.
    #[cold]
    fn lose(&mut self, why: &str) {
        warn!(target = %self.cfg.addr, reason = why, "NVMe/TCP controller lost; reconnecting");
        self.ctrl = None;
        self.lost_since = Some(self.shared.clock.now_ms());
        self.shared.set_state(CtrlState::Reconnecting);
        self.shared.generation.fetch_add(1, Ordering::AcqRel);
        for q in &self.shared.queues {
            drop(q.take());
            let _ = q.notify.write(1);
        }
        self.reconnect();
    }

    fn reconnect(&mut self) {
        match self.connect_all() {
            Ok(()) => {
                let was = self.shared.state();
                self.shared.set_state(CtrlState::Live);
                self.lost_since = None;
                self.shared.reset_requested.store(false, Ordering::Release);
                self.next_keep_alive = self.shared.clock.now_ms() + self.keep_alive_interval();
                info!(target = %self.cfg.addr, previously = ?was, "NVMe/TCP controller reconnected");
                self.arm_async_event();
            }
            Err(e) => {
                let lost = self.lost_since.unwrap_or_default();
                let down_ms = self.shared.clock.now_ms().saturating_sub(lost);
                if self.shared.state() == CtrlState::Reconnecting
                    && down_ms >= self.cfg.ctrl_loss_tmo.as_millis() as u64
                {
                    warn!(
                        target = %self.cfg.addr,
                        error = %crate::error_chain::error_chain(&e),
                        "NVMe/TCP controller lost for longer than --ctrl-loss-tmo: failing I/O \
                         until it returns"
                    );
                    self.shared.set_state(CtrlState::Failed);
                    for q in &self.shared.queues {
                        let _ = q.notify.write(1);
                    }
                } else {
                    warn!(
                        target = %self.cfg.addr,
                        error = %crate::error_chain::error_chain(&e),
                        down_ms,
                        "NVMe/TCP reconnection failed; retrying"
                    );
                }
            }
        }
    }

    /// A new association: admin queue, then every I/O queue, offered to the channels.
    fn connect_all(&mut self) -> Result<(), ReconnectError> {
        let cfg = &self.cfg;
        let ctrl = Controller::connect(
            &cfg.addr,
            &cfg.subnqn,
            &cfg.host,
            &cfg.ctrl,
            cfg.io_queues,
            cfg.nsid,
        )?;
        let geo = self.shared.geo;
        // The namespace may have changed size while the controller was away.
        let bytes = namespace_bytes(ctrl.namespace(), geo.nsid, geo.lba_shift)?;
        let generation = self.shared.generation.load(Ordering::Acquire);
        let mut conns = Vec::with_capacity(self.shared.queues.len());
        for q in &self.shared.queues {
            conns.push(ctrl.connect_io_queue(q.qid, self.depth)?);
        }
        for (q, conn) in self.shared.queues.iter().zip(conns) {
            q.offer(conn, generation);
        }
        self.ctrl = Some(ctrl);
        self.follow(bytes);
        Ok(())
    }
}

/// The size in bytes of namespace `nsid` as `ns` describes it, which must still have blocks
/// of `1 << lba_shift` bytes.
fn namespace_bytes(
    ns: &IdentifyNamespace,
    nsid: u32,
    lba_shift: u32,
) -> Result<u64, ReconnectError> {
    let changed = |what| ReconnectError::NamespaceChanged { nsid, what };
    if ns.block_size().trailing_zeros() != lba_shift {
        return Err(changed("block size"));
    }
    ns.nsze
        .checked_mul(1 << lba_shift)
        .ok_or_else(|| changed("size (too large)"))
}
