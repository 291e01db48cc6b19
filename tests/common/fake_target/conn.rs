//! One connection (one queue): a thread with a blocking socket that reads big chunks, handles
//! every whole PDU in them, and sends all the answers with one `writev`.
//!
//! States: waiting for ICReq (`Limits::digests` is `None`), then for Connect (`queue` is
//! `None`), then bound to a queue of a controller. Commands whose data comes by R2T wait in
//! `pending`, indexed by their transfer tag. A protocol violation sends a C2HTermReq, tears
//! the controller down (as Linux does) and closes.

use std::io::{self, Read};
use std::net::{Shutdown, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use vubd::nvme::spec::{admin_opc, fabrics_type, sc};
use vubd::nvme::tcp::pdu::{DataDigest, Digests, TERM_REQ_MAX_DATA, flags};

use super::ctrl::{self, Admin, Bound, Completion};
use super::faults::{Fault, Site};
use super::nvm::{self, Io};
use super::wire::{self, C2hHeader, Cmd, Dptr, H2c, H2cData, Limits, R2tHeader, Tx, WireError};
use super::{Shared, SharedCounters};

/// In-capsule data the admin queue takes (the Linux host sends Connect data in-capsule).
const ADMIN_CAPSULE_DATA: u32 = 8192;
/// Largest data of one C2HData PDU.
const MAX_C2H: u32 = 128 * 1024;
/// Queued output that is sent before handling more PDUs.
const TX_HIGH: usize = 1 << 20;
/// Most data gathered by R2T for a command that is not a Write.
const MAX_BUFFERED: u32 = 64 * 1024;
/// How long a closing connection keeps reading so that its last PDUs are not lost to a reset.
const LINGER: Duration = Duration::from_secs(1);
/// How often an admin queue that holds Asynchronous Event Requests looks for an event.
const EVENT_POLL: Duration = Duration::from_millis(20);

/// Why a connection ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Close {
    /// The host closed, sent H2CTermReq, or the socket failed.
    Peer,
    /// [`Fault::DropConnection`].
    Dropped,
    /// A C2HTermReq was sent.
    Fatal,
    /// No command on the admin queue within KATO.
    KeepAlive,
}

/// Where the data of a command that waits for H2CData goes.
#[derive(Debug)]
enum Sink {
    /// Straight into the namespace at this offset (Write).
    Namespace(u64),
    /// A buffer handed to the command once complete (Connect, DSM).
    Buffer(Vec<u8>),
}

#[derive(Debug)]
struct Pending {
    cmd: Cmd,
    len: u32,
    got: u32,
    sink: Sink,
}

/// Counts kept by the connection and added to the target's once per batch.
#[derive(Debug, Default)]
struct Local {
    /// (admin queue, opcode, count).
    ops: Vec<(bool, u8, u64)>,
    bytes_read: u64,
    bytes_written: u64,
    c2h_success: u64,
    r2t_sent: u64,
    term_reqs_sent: u64,
}

impl Local {
    fn command(&mut self, admin: bool, op: u8) {
        match self.ops.iter_mut().find(|e| e.0 == admin && e.1 == op) {
            Some(e) => e.2 += 1,
            None => self.ops.push((admin, op, 1)),
        }
    }

    fn publish(&mut self, c: &SharedCounters) {
        let add = |a: &std::sync::atomic::AtomicU64, v: &mut u64| {
            if *v != 0 {
                a.fetch_add(*v, Ordering::Relaxed);
                *v = 0;
            }
        };
        for (admin, op, n) in self.ops.drain(..) {
            let table = if admin { &c.admin } else { &c.io };
            table[usize::from(op)].fetch_add(n, Ordering::Relaxed);
        }
        add(&c.bytes_read, &mut self.bytes_read);
        add(&c.bytes_written, &mut self.bytes_written);
        add(&c.c2h_success, &mut self.c2h_success);
        add(&c.r2t_sent, &mut self.r2t_sent);
        add(&c.term_reqs_sent, &mut self.term_reqs_sent);
    }
}

/// Bytes read from the socket and not yet handled: `buf[start..end]`.
#[derive(Debug)]
struct RxBuf {
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

/// Everything but the receive buffer, so that a PDU borrowed from it can be handled.
#[derive(Debug)]
struct Engine {
    sh: Arc<Shared>,
    stream: TcpStream,
    closed: Arc<AtomicBool>,
    tx: Tx,
    lim: Limits,
    hpda: u8,
    queue: Option<Bound>,
    sqhd: u16,
    pending: Vec<Option<Pending>>,
    free_ttags: Vec<u16>,
    local: Local,
    close: Option<Close>,
    last_admin: Instant,
}

/// Serves one accepted connection until it ends.
pub(super) fn serve(sh: Arc<Shared>, stream: TcpStream, closed: Arc<AtomicBool>) {
    let _ = stream.set_nodelay(true);
    let o = &sh.opts;
    let io_capsule = o.ioccsz.saturating_mul(16).saturating_sub(64);
    let lim = Limits {
        digests: None,
        capsule_data: ADMIN_CAPSULE_DATA,
        maxh2cdata: o.maxh2cdata,
    };
    let max_pdu = ADMIN_CAPSULE_DATA.max(io_capsule).max(o.maxh2cdata) as usize + 256;
    let mut rx = RxBuf {
        buf: vec![0; (2 * max_pdu).max(256 * 1024)],
        start: 0,
        end: 0,
    };
    let mut eng = Engine {
        sh: Arc::clone(&sh),
        stream,
        closed,
        tx: Tx::default(),
        lim,
        hpda: 0,
        queue: None,
        sqhd: 0,
        pending: Vec::new(),
        free_ttags: Vec::new(),
        local: Local::default(),
        close: None,
        last_admin: Instant::now(),
    };
    let close = eng.run(&mut rx).unwrap_or(Close::Peer);
    eng.finish(close);
}

impl Engine {
    fn digests(&self) -> Digests {
        self.lim.digests.unwrap_or_default()
    }

    fn is_admin(&self) -> bool {
        self.queue.as_ref().is_none_or(|q| q.qid == 0)
    }

    fn run(&mut self, rx: &mut RxBuf) -> io::Result<Close> {
        loop {
            self.handle_buffered(rx);
            self.deliver_notice();
            self.send()?;
            if let Some(close) = self.close {
                return Ok(close);
            }
            if self.sh.faults.stalled() {
                self.sh.faults.wait_while_stalled(&self.closed);
            }
            if self.closed.load(Ordering::SeqCst) {
                return Ok(Close::Peer);
            }
            if !self.arm_keep_alive()? {
                return Ok(Close::KeepAlive);
            }
            if rx.start == rx.end {
                (rx.start, rx.end) = (0, 0);
            } else if rx.start > 0 {
                rx.buf.copy_within(rx.start..rx.end, 0);
                (rx.start, rx.end) = (0, rx.end - rx.start);
            }
            match self.stream.read(&mut rx.buf[rx.end..]) {
                Ok(0) => return Ok(Close::Peer),
                Ok(n) => rx.end += n,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock
                            | io::ErrorKind::TimedOut
                            | io::ErrorKind::Interrupted
                    ) => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// On a live admin queue with a keep alive timeout, bounds the next read by what is left
    /// of it; false once it expired (Fabrics 1.1 §7.4.2: no command within KATO). While
    /// Asynchronous Event Requests are held, by [`EVENT_POLL`] too.
    fn arm_keep_alive(&mut self) -> io::Result<bool> {
        let Some(q) = &self.queue else {
            return Ok(true);
        };
        let kato = q.ctrl.kato_ms.load(Ordering::SeqCst);
        if q.qid != 0 {
            return Ok(true);
        }
        let events = q.ctrl.holds_event_requests().then_some(EVENT_POLL);
        let left = if kato == 0 {
            None
        } else {
            match Duration::from_millis(kato.into()).checked_sub(self.last_admin.elapsed()) {
                Some(left) if !left.is_zero() => Some(left),
                _ => return Ok(false),
            }
        };
        let bound = match (left, events) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        if bound.is_some() {
            self.stream.set_read_timeout(bound)?;
        }
        Ok(true)
    }

    /// Completes a held Asynchronous Event Request with the namespace notice, if one waits.
    fn deliver_notice(&mut self) {
        let Some(ctrl) = self
            .queue
            .as_ref()
            .filter(|q| q.qid == 0)
            .map(|q| Arc::clone(&q.ctrl))
        else {
            return;
        };
        if let Some(cid) = ctrl.take_notice() {
            self.complete(cid, ctrl::notice());
        }
    }

    /// Handles every whole PDU in `rx`, sending early when much output is queued.
    fn handle_buffered(&mut self, rx: &mut RxBuf) {
        while self.close.is_none() {
            let avail = &rx.buf[rx.start..rx.end];
            let len = match wire::frame(avail, &self.lim) {
                Ok(Some(len)) => len,
                Ok(None) => return,
                Err(e) => {
                    let n = avail.len().min(usize::from(avail[2]).max(8));
                    self.fatal(e, &rx.buf[rx.start..rx.start + n]);
                    return;
                }
            };
            if self.sh.faults.stalled() {
                if self.send().is_err() {
                    self.close = Some(Close::Peer);
                    return;
                }
                self.sh.faults.wait_while_stalled(&self.closed);
                if self.closed.load(Ordering::SeqCst) {
                    self.close = Some(Close::Peer);
                    return;
                }
            }
            self.handle(&rx.buf[rx.start..rx.start + len]);
            rx.start += len;
            if self.tx.len() > TX_HIGH && self.send().is_err() {
                self.close = Some(Close::Peer);
            }
        }
    }

    /// Publishes the counters, then sends the queued output.
    fn send(&mut self) -> io::Result<()> {
        self.local.publish(&self.sh.counters);
        if self.tx.is_empty() {
            return Ok(());
        }
        self.tx.flush(&mut self.stream)
    }

    fn fatal(&mut self, e: WireError, header: &[u8]) {
        let (fes, fei) = e.term_req();
        let header = header.get(..TERM_REQ_MAX_DATA).unwrap_or(header);
        self.tx.term_req(fes, fei, header);
        self.local.term_reqs_sent += 1;
        self.close = Some(Close::Fatal);
    }

    fn handle(&mut self, pdu: &[u8]) {
        let hlen = usize::from(pdu[2]).min(pdu.len());
        match wire::decode(pdu, &self.lim) {
            Err(e) => self.fatal(e, &pdu[..hlen]),
            Ok(H2c::IcReq { hpda, digests }) => {
                let o = &self.sh.opts;
                let granted = Digests {
                    header: digests.header && o.grant_header_digest,
                    data: digests.data && o.grant_data_digest,
                };
                self.tx.icresp(granted, o.maxh2cdata);
                self.lim.digests = Some(granted);
                self.hpda = hpda;
            }
            Ok(H2c::TermReq { .. }) => self.close = Some(Close::Peer),
            Ok(H2c::Capsule { cmd, data }) => self.capsule(cmd, data),
            Ok(H2c::Data(d)) => {
                if let Err(e) = self.h2c_data(&d) {
                    self.fatal(e, &pdu[..hlen]);
                }
            }
        }
    }

    /// A command capsule: counted, its data pointer checked against the direction of its
    /// opcode, then executed, or its data requested with an R2T.
    fn capsule(&mut self, cmd: Cmd, data: &[u8]) {
        let op = cmd.opcode();
        let admin = self.is_admin();
        self.local.command(admin, op);
        if self.sh.faults.command_received() {
            self.close = Some(Close::Dropped);
        }
        if admin {
            self.last_admin = Instant::now();
        }
        let depth = self.queue.as_ref().map_or(u32::from(u16::MAX), |q| {
            if q.sqfc_disabled {
                0
            } else {
                u32::from(q.sqsize)
            }
        });
        if depth != 0 {
            self.sqhd = ((u32::from(self.sqhd) + 1) % (depth + 1)) as u16;
        }
        let cid = cmd.cid();
        let fabrics = op == admin_opc::FABRICS;
        let connect = fabrics && cmd.fctype() == fabrics_type::CONNECT;
        // Data transfer direction: opcode bits 1:0 (Base 2.0 §5), Connect host to controller.
        let dir = if connect {
            1
        } else if fabrics {
            0
        } else {
            op & 3
        };
        let (xfer, in_capsule) = match cmd.dptr() {
            Dptr::None if data.is_empty() => (0, false),
            Dptr::InCapsule { offset: 0, len } if len as usize == data.len() && dir == 1 => {
                (len, true)
            }
            Dptr::Transport { len } if data.is_empty() && dir != 0 => (len, false),
            Dptr::Other => return self.fail(cid, sc::SGL_TYPE_INVALID),
            _ => return self.fail(cid, sc::INVALID_FIELD),
        };
        if cmd.flags() & 3 != 0 {
            return self.fail(cid, sc::INVALID_FIELD);
        }
        if self.queue.is_none() && !connect {
            return self.fail(cid, sc::COMMAND_SEQUENCE_ERROR);
        }
        if !admin {
            return self.io_command(cmd, xfer, in_capsule, data);
        }
        if dir != 1 || xfer == 0 || in_capsule {
            return self.execute(&cmd, xfer, data);
        }
        if xfer > MAX_BUFFERED {
            return self.fail(cid, sc::SGL_LENGTH_INVALID);
        }
        self.request_data(cmd, xfer, Sink::Buffer(vec![0; xfer as usize]));
    }

    /// Executes a command other than I/O whose data, if it brings any, is all in `data`.
    fn execute(&mut self, cmd: &Cmd, xfer: u32, data: &[u8]) {
        let Some(q) = &self.queue else {
            return self.connect(cmd, data);
        };
        let ctrl = Arc::clone(&q.ctrl);
        match ctrl::admin(&self.sh, &ctrl, cmd, xfer) {
            Admin::Done(c) => self.complete(cmd.cid(), c),
            Admin::Hold => {}
        }
    }

    fn connect(&mut self, cmd: &Cmd, data: &[u8]) {
        let stream = match self.stream.try_clone() {
            Ok(s) => s,
            Err(_) => return self.fail(cmd.cid(), sc::INTERNAL_ERROR),
        };
        match ctrl::connect(&self.sh, cmd, data, stream) {
            Ok(bound) => {
                if bound.qid != 0 {
                    let o = &self.sh.opts;
                    self.lim.capsule_data = o.ioccsz.saturating_mul(16).saturating_sub(64);
                }
                let cntlid = bound.ctrl.cntlid;
                // Connect was entry 0 of the queue; without flow control SQHD stays 0.
                self.sqhd = u16::from(!bound.sqfc_disabled);
                self.last_admin = Instant::now();
                self.queue = Some(bound);
                let mut c = Completion::ok();
                c.dw0 = u32::from(cntlid);
                self.complete(cmd.cid(), c);
            }
            Err(c) => self.complete(cmd.cid(), c),
        }
    }

    fn io_command(&mut self, cmd: Cmd, xfer: u32, in_capsule: bool, data: &[u8]) {
        let cid = cmd.cid();
        // Connect is the only Fabrics command an I/O queue takes, and only first.
        if cmd.opcode() == admin_opc::FABRICS {
            return self.fail(cid, sc::INVALID_OPCODE);
        }
        let max_xfer = match self.sh.opts.mdts {
            0 => 0,
            m => 4096u64 << m.min(40),
        };
        let io = match nvm::parse(&self.sh.ns, &cmd, max_xfer) {
            Ok(io) => io,
            Err(st) => return self.complete(cid, Completion::status(st)),
        };
        if let Some(st) = self.sh.faults.take_io_failure() {
            return self.complete(cid, Completion::status(st));
        }
        if io.xfer() != xfer {
            return self.fail(cid, sc::SGL_LENGTH_INVALID);
        }
        let ns = &self.sh.ns;
        match io {
            Io::Read { offset, len } => {
                self.local.bytes_read += u64::from(len);
                if !self.send_c2h(cid, len, None, Some(offset)) {
                    self.capsule_resp(cid, &Completion::ok());
                }
            }
            Io::Write { offset, len } if in_capsule => {
                ns.write(offset, data);
                self.local.bytes_written += u64::from(len);
                self.complete(cid, Completion::ok());
            }
            Io::Write { offset, len } => self.request_data(cmd, len, Sink::Namespace(offset)),
            Io::Flush => self.complete(cid, Completion::ok()),
            Io::WriteZeroes { offset, len } => {
                ns.zero(offset, len);
                self.complete(cid, Completion::ok());
            }
            Io::Dsm { deallocate, .. } if in_capsule => {
                let st = nvm::dsm(ns, data, deallocate);
                self.complete(cid, Completion::status(st));
            }
            Io::Dsm { .. } => self.request_data(cmd, xfer, Sink::Buffer(vec![0; xfer as usize])),
        }
    }

    /// Completes command `cid` with a generic status and Do Not Retry.
    fn fail(&mut self, cid: u16, sc: u8) {
        self.complete(cid, Completion::generic(sc));
    }

    /// Asks for the command's data with one R2T for all of it (as Linux does).
    fn request_data(&mut self, cmd: Cmd, len: u32, sink: Sink) {
        let ttag = match self.free_ttags.pop() {
            Some(t) => t,
            None if self.pending.len() < usize::from(u16::MAX) => {
                self.pending.push(None);
                (self.pending.len() - 1) as u16
            }
            None => return self.fail(cmd.cid(), sc::INTERNAL_ERROR),
        };
        self.pending[usize::from(ttag)] = Some(Pending {
            cmd,
            len,
            got: 0,
            sink,
        });
        let dg = self.digests();
        let fault = self.sh.faults.take_pdu_fault(Site::R2t, dg);
        if fault == Some(Fault::GarbagePdu) {
            self.tx.garbage();
        }
        let r2t = R2tHeader {
            cccid: cmd.cid(),
            ttag,
            r2to: if fault == Some(Fault::R2tOutOfRange) {
                len
            } else {
                0
            },
            r2tl: len,
        };
        self.tx
            .r2t(&r2t, dg, fault == Some(Fault::CorruptHeaderDigest));
        self.local.r2t_sent += 1;
    }

    /// H2CData (NVMe/TCP 1.0 §3.6.2.7): for a pending R2T, in order, within it, LAST_PDU on
    /// the last one.
    fn h2c_data(&mut self, d: &H2cData<'_>) -> Result<(), WireError> {
        let datal = d.data.len() as u32;
        if datal > self.lim.maxh2cdata {
            return Err(WireError::DataLimit(datal));
        }
        let p = self
            .pending
            .get_mut(usize::from(d.ttag))
            .and_then(Option::as_mut)
            .ok_or(WireError::Ttag(d.ttag))?;
        if p.cmd.cid() != d.cccid {
            return Err(WireError::Cccid(d.cccid));
        }
        let end = u64::from(d.datao) + u64::from(datal);
        if end > u64::from(p.len) {
            return Err(WireError::DataRange {
                datao: d.datao,
                datal,
                r2tl: p.len,
            });
        }
        if d.datao != p.got {
            return Err(WireError::DataOrder(d.datao));
        }
        let end = end as u32;
        if d.last != (end == p.len) {
            return Err(WireError::LastFlag);
        }
        match &mut p.sink {
            Sink::Namespace(offset) => {
                self.sh.ns.write(*offset + u64::from(d.datao), d.data);
                self.local.bytes_written += u64::from(datal);
            }
            Sink::Buffer(buf) => buf[d.datao as usize..end as usize].copy_from_slice(d.data),
        }
        p.got = end;
        if end < p.len {
            return Ok(());
        }
        let Some(p) = self.pending[usize::from(d.ttag)].take() else {
            return Ok(());
        };
        self.free_ttags.push(d.ttag);
        match p.sink {
            Sink::Namespace(_) => self.complete(p.cmd.cid(), Completion::ok()),
            Sink::Buffer(buf) if self.is_admin() => self.execute(&p.cmd, p.len, &buf),
            Sink::Buffer(buf) => {
                let st = nvm::dsm(&self.sh.ns, &buf, p.cmd.cdw(11) & (1 << 2) != 0);
                self.complete(p.cmd.cid(), Completion::status(st));
            }
        }
        Ok(())
    }

    /// Sends a command's result: its data, if any, in C2HData, then a CapsuleResp, unless SQ
    /// flow control is off and the command succeeded, when the last C2HData says SUCCESS.
    fn complete(&mut self, cid: u16, c: Completion) {
        if !c.data.is_empty() && c.status.is_success() {
            let len = c.data.len() as u32;
            if self.send_c2h(cid, len, Some(&c.data), None) {
                return;
            }
        }
        self.capsule_resp(cid, &c);
    }

    /// C2HData PDUs for `len` bytes of `bytes`, or of the namespace at `ns_offset`. Returns
    /// true if the last carried SUCCESS (no CapsuleResp follows).
    fn send_c2h(
        &mut self,
        cid: u16,
        len: u32,
        bytes: Option<&[u8]>,
        ns_offset: Option<u64>,
    ) -> bool {
        let dg = self.digests();
        let success = self.queue.as_ref().is_some_and(|q| q.sqfc_disabled);
        let mut off = 0;
        while off < len {
            let n = (len - off).min(MAX_C2H);
            let last = off + n == len;
            let fault = if off == 0 {
                self.sh.faults.take_pdu_fault(Site::C2hData, dg)
            } else {
                None
            };
            if fault == Some(Fault::GarbagePdu) {
                self.tx.garbage();
            }
            let h = C2hHeader {
                cccid: if fault == Some(Fault::C2hDataForUnknownCid) {
                    !cid
                } else {
                    cid
                },
                datao: if fault == Some(Fault::C2hDataOutOfRange) {
                    len
                } else {
                    off
                },
                datal: n,
                flags: match (last, success) {
                    (true, true) => flags::LAST_PDU | flags::SUCCESS,
                    (true, false) => flags::LAST_PDU,
                    _ => 0,
                },
                corrupt_hd: fault == Some(Fault::CorruptHeaderDigest),
            };
            self.tx.c2h_data(&h, dg, self.hpda);
            let digest = match (bytes, ns_offset) {
                (Some(b), _) => {
                    let chunk = &b[off as usize..(off + n) as usize];
                    self.tx.buf().extend_from_slice(chunk);
                    dg.data.then(|| digest_of(chunk))
                }
                (None, Some(_)) if self.sh.ns.is_null() => {
                    self.tx.zeros(n as usize);
                    dg.data.then(|| wire::zeros_digest(n as usize))
                }
                (None, o) => {
                    let buf = self.tx.buf();
                    let start = buf.len();
                    self.sh
                        .ns
                        .read_append(o.unwrap_or(0) + u64::from(off), n.into(), buf);
                    dg.data.then(|| digest_of(&buf[start..]))
                }
            };
            if let Some(d) = digest {
                self.tx
                    .data_digest(d, fault == Some(Fault::CorruptDataDigest));
            }
            if last && success {
                self.local.c2h_success += 1;
            }
            off += n;
        }
        success
    }

    fn capsule_resp(&mut self, cid: u16, c: &Completion) {
        let dg = self.digests();
        let fault = self.sh.faults.take_pdu_fault(Site::CapsuleResp, dg);
        if fault == Some(Fault::GarbagePdu) {
            self.tx.garbage();
        }
        let cid = if fault == Some(Fault::CapsuleRespUnknownCid) {
            !cid
        } else {
            cid
        };
        let sqid = self.queue.as_ref().map_or(0, |q| q.qid);
        let mut cqe = [0u8; 16];
        cqe[0..4].copy_from_slice(&c.dw0.to_le_bytes());
        cqe[4..8].copy_from_slice(&c.dw1.to_le_bytes());
        cqe[8..10].copy_from_slice(&self.sqhd.to_le_bytes());
        cqe[10..12].copy_from_slice(&sqid.to_le_bytes());
        cqe[12..14].copy_from_slice(&cid.to_le_bytes());
        cqe[14..16].copy_from_slice(&c.status.field().to_le_bytes());
        self.tx
            .capsule_resp(&cqe, dg, fault == Some(Fault::CorruptHeaderDigest));
    }

    /// Ends the connection: after a C2HTermReq or a dropped connection, sends what is queued
    /// and reads until the host closes (for at most [`LINGER`]) so that it sees the last PDUs;
    /// on a fatal error, an expired keep alive or the end of the admin queue, tears the
    /// controller down.
    fn finish(&mut self, close: Close) {
        if matches!(close, Close::Fatal | Close::Dropped) {
            let _ = self.send();
            let _ = self.stream.shutdown(Shutdown::Write);
            let deadline = Instant::now() + LINGER;
            let mut scratch = [0u8; 4096];
            let _ = self
                .stream
                .set_read_timeout(Some(Duration::from_millis(50)));
            while Instant::now() < deadline && !self.closed.load(Ordering::SeqCst) {
                match self.stream.read(&mut scratch) {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(e)
                        if matches!(
                            e.kind(),
                            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                        ) => {}
                    Err(_) => break,
                }
            }
        }
        self.local.publish(&self.sh.counters);
        if close == Close::KeepAlive {
            self.sh
                .counters
                .kato_expired
                .fetch_add(1, Ordering::Relaxed);
        }
        if let Some(q) = self.queue.take() {
            if q.qid == 0 || matches!(close, Close::Fatal | Close::KeepAlive) {
                ctrl::teardown(&self.sh, &q.ctrl);
            } else {
                q.ctrl.queue_closed(q.qid);
            }
        }
        let _ = self.stream.shutdown(Shutdown::Both);
    }
}

fn digest_of(data: &[u8]) -> DataDigest {
    let mut d = DataDigest::new();
    d.update(data);
    d
}
