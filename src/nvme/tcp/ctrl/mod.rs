//! NVMe/TCP controller bring-up, I/O queue connections and discovery, on blocking
//! [`SyncConn`]s.
//!
//! [`Controller::connect`] connects the admin queue, enables the controller (Base 2.0 §3.5.1,
//! through Fabrics properties), reads Identify Controller and the namespace to serve, asks
//! for I/O queues and enables namespace notices (`events`). [`QueueConnector`] (from [`Controller::queue_connector`], or
//! [`Controller::connect_io_queue`] directly) then connects I/O queues from any thread: it
//! holds only immutable data. [`discover`] reads the Discovery log page of a target.
//!
//! Every failure is a [`CtrlError`] with one line for what the user can fix, and
//! [`CtrlError::is_retryable`] tells the reconnect logic whether trying again makes sense.

mod events;

use std::fmt;
use std::net::TcpStream;
use std::path::PathBuf;
use std::thread;
use std::time::{Duration, Instant};

use thiserror::Error;

use super::host::HostId;
use super::pdu::{Digests, IcResp, RxParser};
use super::sync::{ConnError, ConnectRefusal, SyncConn};
use crate::nvme::spec::{
    ActiveNamespaces, CNTLID_DYNAMIC, Cap, Cc, Cns, ConnectData, Csts, DISCOVERY_ENTRY_LEN,
    DISCOVERY_HEADER_LEN, DISCOVERY_NQN, DiscoveryHeader, DiscoveryLog, IDENTIFY_LEN,
    IdentifyController, IdentifyNamespace, LID_DISCOVERY, Nqn, Property, Shn, Shst, SpecError, Sqe,
    sc, sct,
};

/// Admin submission queue size, 0-based: 32 entries, as Linux uses over fabrics.
const ADMIN_SQSIZE: u16 = 31;
/// Interval between two reads of CSTS while waiting for the controller.
const CSTS_POLL: Duration = Duration::from_millis(10);
/// Longest wait for a shutdown to complete (CSTS.SHST) before closing anyway.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(2);
/// Most discovery log records read: 4 MiB of log.
const MAX_DISCOVERY_RECORDS: u64 = 4096;
/// Most active namespaces named in an error message.
const NAMESPACES_SHOWN: usize = 16;

/// Where a subsystem is reached: a host name or address, and a TCP port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TargetAddr {
    pub host: String,
    pub port: u16,
}

impl fmt::Display for TargetAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// How connections to a controller are made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CtrlOptions {
    /// Header and data digests, on every queue; the controller must grant them.
    pub digests: Digests,
    /// Keep Alive Timeout asked of the controller (whole milliseconds; 0 disables it). Someone
    /// must then call [`Controller::keep_alive`] well within it.
    pub kato: Duration,
    /// Bound of every connect, send and command wait.
    pub io_timeout: Duration,
}

impl Default for CtrlOptions {
    /// No digests, Linux's default keep alive timeout (5 s), 30 s per command.
    fn default() -> Self {
        CtrlOptions {
            digests: Digests::default(),
            kato: Duration::from_secs(5),
            io_timeout: Duration::from_secs(30),
        }
    }
}

impl CtrlOptions {
    fn kato_ms(&self) -> u32 {
        u32::try_from(self.kato.as_millis()).unwrap_or(u32::MAX)
    }
}

/// An established I/O queue connection: after ICResp and a successful Fabrics Connect, the
/// parser at a PDU boundary, the stream still blocking.
#[derive(Debug)]
pub struct IoQueueConn {
    pub stream: TcpStream,
    pub rx: RxParser,
    pub params: IcResp,
}

/// The list of active namespaces in an error message.
struct NsList<'a>(&'a [u32]);

impl fmt::Display for NsList<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("no active namespace");
        }
        f.write_str("active namespaces: ")?;
        for (i, id) in self.0.iter().take(NAMESPACES_SHOWN).enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{id}")?;
        }
        if self.0.len() > NAMESPACES_SHOWN {
            write!(f, ", ... ({} in all)", self.0.len())?;
        }
        Ok(())
    }
}

/// Why a controller could not be brought up, used, or discovered.
#[derive(Debug, Error)]
pub enum CtrlError {
    /// Connection-level: refused, unreachable, timed out, reset, protocol errors, statuses.
    #[error(transparent)]
    Conn(#[from] ConnError),
    #[error("subsystem {subnqn} not found on {target}")]
    SubsystemNotFound { subnqn: Nqn, target: TargetAddr },
    #[error("{target} refuses host NQN {hostnqn} for subsystem {subnqn}")]
    HostRefused {
        hostnqn: Nqn,
        subnqn: Nqn,
        target: TargetAddr,
    },
    #[error("namespace {nsid} not found on {subnqn} ({})", NsList(.active))]
    NamespaceNotFound {
        nsid: u32,
        subnqn: Nqn,
        active: Vec<u32>,
    },
    #[error("controller fatal status (CSTS.CFS) on {target}")]
    Fatal { target: TargetAddr },
    #[error("controller on {target} not ready after {waited_ms} ms")]
    NotReady { target: TargetAddr, waited_ms: u128 },
    #[error("controller on {target} did not complete its shutdown within {waited_ms} ms")]
    ShutdownIncomplete { target: TargetAddr, waited_ms: u128 },
    #[error("malformed {what} from {target}")]
    Malformed {
        what: &'static str,
        target: TargetAddr,
        #[source]
        source: SpecError,
    },
    #[error(
        "I/O queue {qid} of depth {depth}: the controller allows queues 1..={granted} of depth 2..={max_depth}"
    )]
    QueueParams {
        qid: u16,
        depth: u16,
        granted: u16,
        max_depth: u16,
    },
    #[error(
        "discovery log on {target} announces {numrec} records, more than {MAX_DISCOVERY_RECORDS}"
    )]
    DiscoveryTooLarge { target: TargetAddr, numrec: u64 },
    #[error("discovery log on {target} kept changing while read")]
    DiscoveryChanging { target: TargetAddr },
    #[error("invalid host NQN")]
    HostNqn(#[source] SpecError),
    #[error("{}: not a valid host NQN", .path.display())]
    HostNqnFile {
        path: PathBuf,
        #[source]
        source: SpecError,
    },
    #[error("{}: not a valid host identifier (a UUID)", .path.display())]
    HostIdFile {
        path: PathBuf,
        #[source]
        source: uuid::Error,
    },
    #[error("cannot read {}", .path.display())]
    HostFileRead {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl CtrlError {
    /// Whether connecting again may help: connection-level faults (refused, reset, timeout,
    /// protocol errors), a controller that failed or was slow, a retryable status. Wrong
    /// configuration (unknown subsystem, host refused, missing namespace, bad host identity,
    /// refused digests or queue parameters) is permanent.
    pub fn is_retryable(&self) -> bool {
        match self {
            CtrlError::Conn(e) => e.is_retryable(),
            CtrlError::Fatal { .. }
            | CtrlError::NotReady { .. }
            | CtrlError::ShutdownIncomplete { .. }
            | CtrlError::DiscoveryChanging { .. } => true,
            CtrlError::SubsystemNotFound { .. }
            | CtrlError::HostRefused { .. }
            | CtrlError::NamespaceNotFound { .. }
            | CtrlError::Malformed { .. }
            | CtrlError::QueueParams { .. }
            | CtrlError::DiscoveryTooLarge { .. }
            | CtrlError::HostNqn(_)
            | CtrlError::HostNqnFile { .. }
            | CtrlError::HostIdFile { .. }
            | CtrlError::HostFileRead { .. } => false,
        }
    }
}

/// What connections to one subsystem share.
#[derive(Clone, Debug)]
struct Endpoint {
    addr: TargetAddr,
    subnqn: Nqn,
    host: HostId,
    opts: CtrlOptions,
}

impl Endpoint {
    /// A new connection and its Fabrics Connect for queue `qid` of controller `cntlid`.
    fn connect_queue(
        &self,
        qid: u16,
        sqsize: u16,
        kato_ms: u32,
        cntlid: u16,
        max_data: u32,
    ) -> Result<(SyncConn, u16), CtrlError> {
        let o = &self.opts;
        let mut conn = SyncConn::open(
            &self.addr.host,
            self.addr.port,
            o.digests,
            o.io_timeout,
            max_data,
        )?;
        let data = ConnectData {
            hostid: &self.host.id,
            cntlid,
            subnqn: &self.subnqn,
            hostnqn: &self.host.nqn,
        };
        // SQ flow control stays on for the admin queue, as Linux does by default.
        let cqe = conn
            .fabrics_connect(qid, sqsize, kato_ms, &data, qid != 0)
            .map_err(|e| self.refused(e))?;
        // CNTLID in DW0 bits 15:0 (Fabrics 1.1 Figure 21).
        Ok((conn, cqe.dw0() as u16))
    }

    /// Names the user-fixable Connect refusals.
    fn refused(&self, e: ConnError) -> CtrlError {
        match e {
            ConnError::ConnectRefused {
                refusal: ConnectRefusal::SubsystemNotFound,
                ..
            } => CtrlError::SubsystemNotFound {
                subnqn: self.subnqn.clone(),
                target: self.addr.clone(),
            },
            ConnError::ConnectRefused {
                refusal: ConnectRefusal::HostNotAllowed,
                ..
            } => CtrlError::HostRefused {
                hostnqn: self.host.nqn.clone(),
                subnqn: self.subnqn.clone(),
                target: self.addr.clone(),
            },
            other => CtrlError::Conn(other),
        }
    }

    fn malformed(&self, what: &'static str, source: SpecError) -> CtrlError {
        CtrlError::Malformed {
            what,
            target: self.addr.clone(),
            source,
        }
    }
}

/// The admin queue of a controller, with what bring-up learned.
#[derive(Debug)]
struct Admin {
    conn: SyncConn,
    cntlid: u16,
    cap: Cap,
}

impl Admin {
    /// Connects the admin queue, reads CAP and enables the controller.
    fn bring_up(ep: &Endpoint, kato_ms: u32) -> Result<Admin, CtrlError> {
        let (mut conn, cntlid) =
            ep.connect_queue(0, ADMIN_SQSIZE, kato_ms, CNTLID_DYNAMIC, u32::MAX)?;
        let cap = Cap(conn
            .command(Sqe::property_get(Property::Cap), None)?
            .property_value());
        let mut admin = Admin { conn, cntlid, cap };
        admin.enable(ep)?;
        Ok(admin)
    }

    fn cc(&mut self) -> Result<Cc, CtrlError> {
        Ok(Cc(self
            .conn
            .command(Sqe::property_get(Property::Cc), None)?
            .dw0()))
    }

    fn set_cc(&mut self, cc: Cc) -> Result<(), CtrlError> {
        self.conn
            .command(Sqe::property_set(Property::Cc, u64::from(cc.0)), None)?;
        Ok(())
    }

    /// Enables the controller unless it already is (Base 2.0 §3.5.1): NVM command set, the
    /// smallest memory page size, 64-byte SQEs, 16-byte CQEs; then waits for CSTS.RDY.
    fn enable(&mut self, ep: &Endpoint) -> Result<(), CtrlError> {
        if !self.cc()?.en() {
            // A controller still going down must report RDY 0 before it is enabled again.
            self.wait_csts(ep, |c| !c.rdy())?;
            self.set_cc(Cc::enabled(self.cap.mpsmin()))?;
        }
        self.wait_csts(ep, Csts::rdy)
    }

    /// Polls CSTS until `done`, up to CAP.TO (taken as (TO + 1) × 500 ms, as Linux does, so
    /// that a TO of 0 still allows a moment). CSTS.CFS ends the wait.
    fn wait_csts(&mut self, ep: &Endpoint, done: impl Fn(Csts) -> bool) -> Result<(), CtrlError> {
        let limit = Duration::from_millis((u64::from(self.cap.to()) + 1) * 500);
        let start = Instant::now();
        loop {
            let csts = Csts(
                self.conn
                    .command(Sqe::property_get(Property::Csts), None)?
                    .dw0(),
            );
            if csts.cfs() {
                return Err(CtrlError::Fatal {
                    target: ep.addr.clone(),
                });
            }
            if done(csts) {
                return Ok(());
            }
            if start.elapsed() >= limit {
                return Err(CtrlError::NotReady {
                    target: ep.addr.clone(),
                    waited_ms: start.elapsed().as_millis(),
                });
            }
            thread::sleep(CSTS_POLL);
        }
    }

    /// Identify into a fresh 4096-byte buffer.
    fn identify(&mut self, cns: Cns, nsid: u32) -> Result<Vec<u8>, ConnError> {
        let mut buf = vec![0; IDENTIFY_LEN];
        self.conn
            .command(Sqe::identify(cns, nsid), Some(&mut buf))?;
        Ok(buf)
    }

    fn identify_controller(&mut self, ep: &Endpoint) -> Result<IdentifyController, CtrlError> {
        let buf = self.identify(Cns::Controller, 0)?;
        IdentifyController::parse(&buf).map_err(|e| ep.malformed("Identify Controller", e))
    }

    /// Identify Namespace `nsid`; a namespace that is not there (an error status, or the
    /// zeroed data of an inactive NSID) is [`CtrlError::NamespaceNotFound`], with the active
    /// namespace list.
    fn identify_namespace(
        &mut self,
        ep: &Endpoint,
        nsid: u32,
    ) -> Result<IdentifyNamespace, CtrlError> {
        if nsid != 0 && nsid != u32::MAX {
            match self.identify(Cns::Namespace, nsid) {
                Ok(buf) => match IdentifyNamespace::parse(&buf) {
                    Ok(ns) => return Ok(ns),
                    Err(SpecError::NamespaceInactive) => {}
                    Err(e) => return Err(ep.malformed("Identify Namespace", e)),
                },
                Err(ConnError::Status { status, .. })
                    if status.sct() == sct::GENERIC
                        && matches!(status.sc(), sc::INVALID_NAMESPACE | sc::INVALID_FIELD) => {}
                Err(e) => return Err(e.into()),
            }
        }
        let buf = self.identify(Cns::ActiveNamespaces, 0)?;
        let active =
            ActiveNamespaces::parse(&buf).map_err(|e| ep.malformed("active namespace list", e))?;
        Err(CtrlError::NamespaceNotFound {
            nsid,
            subnqn: ep.subnqn.clone(),
            active: active.0,
        })
    }

    /// Set Features, Number of Queues: asks for `wanted` I/O queue pairs and returns how many
    /// may be used (the controller may report more than asked; never more than `wanted`).
    fn set_io_queues(&mut self, wanted: u16) -> Result<u16, CtrlError> {
        let Some(n) = wanted.checked_sub(1) else {
            return Ok(0);
        };
        // 0-based counts; 65535 is not a valid request (Base 2.0 §5.27.1.5).
        let n = n.min(0xfffe);
        let dw0 = self.conn.command(Sqe::set_num_queues(n, n), None)?.dw0();
        let (nsqa, ncqa) = (dw0 as u16, (dw0 >> 16) as u16);
        Ok(nsqa.min(ncqa).saturating_add(1).min(wanted))
    }

    /// Normal shutdown (CC.SHN), waiting briefly for CSTS.SHST to report it complete.
    fn shutdown(&mut self, ep: &Endpoint) -> Result<(), CtrlError> {
        let cc = self.cc()?;
        self.set_cc(cc.with_shn(Shn::Normal))?;
        let start = Instant::now();
        loop {
            let csts = Csts(
                self.conn
                    .command(Sqe::property_get(Property::Csts), None)?
                    .dw0(),
            );
            if csts.shst() == Shst::Complete {
                return Ok(());
            }
            if start.elapsed() >= SHUTDOWN_WAIT {
                return Err(CtrlError::ShutdownIncomplete {
                    target: ep.addr.clone(),
                    waited_ms: start.elapsed().as_millis(),
                });
            }
            thread::sleep(CSTS_POLL);
        }
    }
}

/// Connects I/O queues of one controller. Cheap to clone, immutable: usable from any thread
/// while the controller's admin queue is busy elsewhere.
#[derive(Clone, Debug)]
pub struct QueueConnector {
    ep: Endpoint,
    cntlid: u16,
    io_queues: u16,
    max_depth: u16,
    /// Largest C2HData payload the data path accepts: the controller's transfer limit.
    max_data: u32,
}

impl QueueConnector {
    pub fn cntlid(&self) -> u16 {
        self.cntlid
    }

    /// A new connection for I/O queue `qid` (1 to the granted count) of `depth` entries (2 to
    /// [`Controller::max_queue_entries`]): ICReq, then Fabrics Connect with this controller's
    /// CNTLID and SQ flow control disabled.
    pub fn connect(&self, qid: u16, depth: u16) -> Result<IoQueueConn, CtrlError> {
        if qid == 0 || qid > self.io_queues || depth < 2 || depth > self.max_depth {
            return Err(CtrlError::QueueParams {
                qid,
                depth,
                granted: self.io_queues,
                max_depth: self.max_depth,
            });
        }
        // KATO is reserved for I/O queues (Fabrics 1.1 Figure 19).
        let (conn, _) = self
            .ep
            .connect_queue(qid, depth - 1, 0, self.cntlid, self.max_data)?;
        let (stream, rx, params) = conn.into_parts();
        Ok(IoQueueConn { stream, rx, params })
    }
}

/// An enabled NVMe/TCP controller, its admin queue, and the namespace it is used for.
#[derive(Debug)]
pub struct Controller {
    admin: Admin,
    queues: QueueConnector,
    identify: IdentifyController,
    namespace: IdentifyNamespace,
    nsid: u32,
    /// Namespace Attribute Notices are enabled.
    notices: bool,
}

impl Controller {
    /// Brings up a controller of `subnqn` at `addr` (dynamic controller model) and checks that
    /// namespace `nsid` is there; asks for `nr_io_queues_wanted` I/O queues.
    pub fn connect(
        addr: &TargetAddr,
        subnqn: &Nqn,
        host: &HostId,
        opts: &CtrlOptions,
        nr_io_queues_wanted: u16,
        nsid: u32,
    ) -> Result<Controller, CtrlError> {
        let ep = Endpoint {
            addr: addr.clone(),
            subnqn: subnqn.clone(),
            host: host.clone(),
            opts: *opts,
        };
        let mut admin = Admin::bring_up(&ep, opts.kato_ms())?;
        let identify = admin.identify_controller(&ep)?;
        let namespace = admin.identify_namespace(&ep, nsid)?;
        let io_queues = admin.set_io_queues(nr_io_queues_wanted)?;
        let notices = admin.enable_namespace_notices(&identify);
        let max_data = identify
            .max_transfer_bytes(admin.cap)
            .map_or(u32::MAX, |b| u32::try_from(b).unwrap_or(u32::MAX));
        let max_depth = max_queue_entries(admin.cap, &identify);
        tracing::debug!(
            target = %addr, subnqn = %subnqn, cntlid = admin.cntlid, nsid, io_queues,
            max_depth, notices, "NVMe/TCP controller ready"
        );
        let queues = QueueConnector {
            ep,
            cntlid: admin.cntlid,
            io_queues,
            max_depth,
            max_data,
        };
        Ok(Controller {
            admin,
            queues,
            identify,
            namespace,
            nsid,
            notices,
        })
    }

    pub fn cntlid(&self) -> u16 {
        self.admin.cntlid
    }

    pub fn identify(&self) -> &IdentifyController {
        &self.identify
    }

    /// Identify Namespace of the namespace given to [`Controller::connect`].
    pub fn namespace(&self) -> &IdentifyNamespace {
        &self.namespace
    }

    pub fn nsid(&self) -> u32 {
        self.nsid
    }

    pub fn cap(&self) -> Cap {
        self.admin.cap
    }

    /// I/O queues that may be connected: QIDs 1 to this.
    pub fn io_queues_granted(&self) -> u16 {
        self.queues.io_queues
    }

    /// Deepest I/O queue: CAP.MQES + 1, bounded by MAXCMD when reported.
    pub fn max_queue_entries(&self) -> u16 {
        self.queues.max_depth
    }

    /// Most data an I/O command may carry in its capsule (IOCCSZ less the SQE).
    pub fn in_capsule_data_max(&self) -> u32 {
        self.identify.in_capsule_data_max()
    }

    /// Largest transfer of one command (MDTS); `None` for no limit.
    pub fn max_transfer_bytes(&self) -> Option<u64> {
        self.identify.max_transfer_bytes(self.admin.cap)
    }

    /// What connects this controller's I/O queues, to hand to other threads.
    pub fn queue_connector(&self) -> QueueConnector {
        self.queues.clone()
    }

    /// See [`QueueConnector::connect`].
    pub fn connect_io_queue(&self, qid: u16, depth: u16) -> Result<IoQueueConn, CtrlError> {
        self.queues.connect(qid, depth)
    }

    /// Keep Alive on the admin queue (Base 2.0 §5.25).
    pub fn keep_alive(&mut self) -> Result<(), CtrlError> {
        self.admin.conn.command(Sqe::keep_alive(), None)?;
        Ok(())
    }

    /// Best-effort normal shutdown, then the admin connection is closed. I/O queue connections
    /// should be closed first.
    pub fn shutdown(mut self) -> Result<(), CtrlError> {
        self.admin.shutdown(&self.queues.ep)
    }
}

/// CAP.MQES + 1, bounded by MAXCMD when the controller reports it.
fn max_queue_entries(cap: Cap, id: &IdentifyController) -> u16 {
    let mqes = u32::from(cap.mqes()) + 1;
    let bound = match id.maxcmd {
        0 => mqes,
        maxcmd => mqes.min(u32::from(maxcmd)),
    };
    u16::try_from(bound).unwrap_or(u16::MAX)
}

/// Reads the Discovery log page of the discovery controller at `addr` (keep alive off), then
/// shuts that controller down.
pub fn discover(
    addr: &TargetAddr,
    host: &HostId,
    opts: &CtrlOptions,
) -> Result<DiscoveryLog, CtrlError> {
    // A constant, checked by a unit test.
    let subnqn = Nqn::new(DISCOVERY_NQN).expect("the discovery NQN is valid");
    let ep = Endpoint {
        addr: addr.clone(),
        subnqn,
        host: host.clone(),
        opts: *opts,
    };
    let mut admin = Admin::bring_up(&ep, 0)?;
    let identify = admin.identify_controller(&ep)?;
    let chunk = identify.max_transfer_bytes(admin.cap);
    let log = read_discovery_log(&mut admin, &ep, chunk)?;
    // The log is in hand; a controller slow to shut down does not matter.
    let _ = admin.shutdown(&ep);
    Ok(log)
}

/// Header, whole log, header again: the log is consistent if GENCTR did not move (Base 2.0
/// §5.16.1.23). One more attempt if it did.
fn read_discovery_log(
    admin: &mut Admin,
    ep: &Endpoint,
    chunk: Option<u64>,
) -> Result<DiscoveryLog, CtrlError> {
    let header = |admin: &mut Admin| -> Result<DiscoveryHeader, CtrlError> {
        let mut buf = vec![0; DISCOVERY_HEADER_LEN];
        get_log(admin, &mut buf, chunk)?;
        DiscoveryHeader::parse(&buf).map_err(|e| ep.malformed("discovery log header", e))
    };
    for _ in 0..2 {
        let first = header(admin)?;
        if first.numrec > MAX_DISCOVERY_RECORDS {
            return Err(CtrlError::DiscoveryTooLarge {
                target: ep.addr.clone(),
                numrec: first.numrec,
            });
        }
        // At most 4096 records: no overflow.
        let len = DISCOVERY_HEADER_LEN + first.numrec as usize * DISCOVERY_ENTRY_LEN;
        let mut buf = vec![0; len];
        get_log(admin, &mut buf, chunk)?;
        let last = header(admin)?;
        if first.genctr == last.genctr && first.numrec == last.numrec {
            return DiscoveryLog::parse(&buf).map_err(|e| ep.malformed("discovery log", e));
        }
        tracing::debug!(target = %ep.addr, "discovery log changed while read; reading it again");
    }
    Err(CtrlError::DiscoveryChanging {
        target: ep.addr.clone(),
    })
}

/// Get Log Page (Discovery) for `buf.len()` bytes from offset 0, in commands of at most `chunk`
/// bytes. Lengths are multiples of 1024 and chunks of 4 KiB or more, so every piece is whole
/// dwords.
fn get_log(admin: &mut Admin, buf: &mut [u8], chunk: Option<u64>) -> Result<(), CtrlError> {
    let step = chunk
        .and_then(|c| usize::try_from(c).ok())
        .filter(|&c| c >= 4)
        .map_or(buf.len().max(1), |c| c & !3);
    let mut offset = 0u64;
    for piece in buf.chunks_mut(step) {
        let numd = u32::try_from(piece.len() / 4)
            .unwrap_or(u32::MAX)
            .saturating_sub(1);
        admin
            .conn
            .command(Sqe::get_log_page(LID_DISCOVERY, numd, offset), Some(piece))?;
        offset += piece.len() as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests;
