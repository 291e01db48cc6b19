//! The supervisor thread of one NVMe/TCP controller: keep-alive on the admin queue, and
//! reconnection of the whole controller, with backoff, when anything fails.

use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use thiserror::Error;
use tracing::{info, warn};

use super::{CtrlState, NvmeTcpConfig, Shared};
use crate::nvme::tcp::ctrl::{Controller, CtrlError};

/// Why a reconnection attempt failed.
#[derive(Debug, Error)]
enum ReconnectError {
    #[error(transparent)]
    Ctrl(#[from] CtrlError),
    #[error("namespace {nsid} now has a different {what}")]
    NamespaceChanged { nsid: u32, what: &'static str },
}

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
        }
    }

    /// Sleeps until woken or `timeout` passes.
    fn wait(&self, timeout: Duration) {
        let mut fds = [libc::pollfd {
            fd: self.shared.wake.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: `fds` is a valid array of one pollfd for the duration of the call.
        unsafe { libc::poll(fds.as_mut_ptr(), 1, ms) };
        let _ = self.shared.wake.read();
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
        let block_size = ctrl.namespace().block_size();
        if block_size.trailing_zeros() != geo.lba_shift {
            return Err(ReconnectError::NamespaceChanged {
                nsid: geo.nsid,
                what: "block size",
            });
        }
        let generation = self.shared.generation.load(Ordering::Acquire);
        let mut conns = Vec::with_capacity(self.shared.queues.len());
        for q in &self.shared.queues {
            conns.push(ctrl.connect_io_queue(q.qid, self.depth)?);
        }
        for (q, conn) in self.shared.queues.iter().zip(conns) {
            q.offer(conn, generation);
        }
        self.ctrl = Some(ctrl);
        Ok(())
    }
}
