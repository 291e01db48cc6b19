//! Controllers (dynamic controller model, NVMe over Fabrics 1.1 §4.1): Fabrics Connect,
//! properties, and the admin commands of an NVM subsystem and of the discovery subsystem.
//!
//! Asynchronous events as the Linux target reports a namespace change: Asynchronous Event
//! Requests are held (up to [`AERL`] + 1); a change of the namespace, if the host enabled
//! namespace attribute notices, completes one with the notice, or the next one sent; no other
//! notice follows until the host reads the Changed Namespace List, which then names the
//! namespace once.

use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use vubd::nvme::spec::{
    AEC_NAMESPACE_ATTRIBUTE, AsyncEvent, CHANGED_NAMESPACES_LEN, CNTLID_DYNAMIC, CONNECT_DATA_LEN,
    DISCOVERY_ENTRY_LEN, DISCOVERY_HEADER_LEN, DISCOVERY_NQN, FID_ASYNC_EVENT_CONFIG,
    FID_KEEP_ALIVE_TIMER, FID_NUMBER_OF_QUEUES, IDENTIFY_LEN, LID_CHANGED_NAMESPACES,
    LID_DISCOVERY, Status, TRTYPE_TCP, admin_opc, fabrics_type, sc, sct,
};

use super::Shared;
use super::wire::Cmd;

/// Set / Get Features identifiers besides those in `vubd::nvme::spec`.
const FID_VOLATILE_WRITE_CACHE: u8 = 0x06;
/// Asynchronous Event Request Limit, 0-based: four held at most, as the Linux target.
const AERL: u8 = 3;
/// Status of one Asynchronous Event Request more than the limit (Base 2.0 Figure 145).
const SC_AER_LIMIT_EXCEEDED: u8 = 0x05;
/// Version 1.4.0.
const VERSION: u32 = 0x0001_0400;
/// SGLS as the Linux target reports it over TCP: SGLs supported (byte aligned) and the
/// Offset addressing of in-capsule data; neither keyed nor transport descriptor bits.
const SGLS: u32 = 1 | (1 << 20);
/// Keep Alive granularity, in 100 ms units, as Linux reports it.
const KAS: u16 = 10;
/// ONCS: Dataset Management and Write Zeroes.
const ONCS: u16 = (1 << 2) | (1 << 3);
/// CAP.CQR, CAP.TO = 1 (500 ms), CAP.CSS = NVM command set; MQES is added per target.
const CAP_FIXED: u64 = (1 << 16) | (1 << 24) | (1 << 37);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A status with Do Not Retry set, as every refusal here is final.
pub(super) fn dnr(sct: u8, sc: u8) -> Status {
    Status::new(sct, sc, true)
}

/// The result of a command: status, DW0 / DW1 and, for a command that returns data, that
/// data (sent in C2HData before the CapsuleResp).
#[derive(Debug)]
pub(super) struct Completion {
    pub status: Status,
    pub dw0: u32,
    pub dw1: u32,
    pub data: Vec<u8>,
}

impl Completion {
    pub(super) fn ok() -> Completion {
        Completion::status(Status::SUCCESS)
    }

    pub(super) fn status(status: Status) -> Completion {
        Completion {
            status,
            dw0: 0,
            dw1: 0,
            data: Vec::new(),
        }
    }

    pub(super) fn generic(sc: u8) -> Completion {
        Completion::status(dnr(sct::GENERIC, sc))
    }

    fn dw0(mut self, dw0: u32) -> Completion {
        self.dw0 = dw0;
        self
    }

    fn data(data: Vec<u8>) -> Completion {
        Completion {
            data,
            ..Completion::ok()
        }
    }

    /// Connect Invalid Parameters (Fabrics 1.1 Figure 21): IATTR bit 0 says the parameter is
    /// in the connect data, IPO is its byte offset.
    fn invalid_parameter(in_data: bool, offset: u16) -> Completion {
        Completion::status(dnr(sct::COMMAND_SPECIFIC, sc::CONNECT_INVALID_PARAMETERS))
            .dw0((u32::from(in_data) << 16) | u32::from(offset))
    }
}

/// One controller of the subsystem (or of the discovery subsystem).
#[derive(Debug)]
pub(super) struct Controller {
    pub cntlid: u16,
    pub discovery: bool,
    pub subnqn: String,
    pub hostnqn: String,
    /// Keep Alive Timeout in ms, 0 for none (Connect KATO or Set Features).
    pub kato_ms: AtomicU32,
    /// CC and CSTS.
    regs: Mutex<(u32, u32)>,
    /// I/O queues granted, at most the target's maximum.
    io_queues: AtomicU32,
    /// Set Features values kept for Get Features: Async Event Configuration, VWC enable.
    aec: AtomicU32,
    vwce: AtomicU32,
    /// The sockets of the queues connected to this controller, to close on teardown.
    queues: Mutex<Vec<(u16, TcpStream)>>,
    dead: AtomicBool,
    events: Mutex<Events>,
}

/// Asynchronous events of one controller.
#[derive(Debug, Default)]
struct Events {
    /// Command identifiers of the Asynchronous Event Requests held, oldest first.
    held: Vec<u16>,
    /// A namespace notice waits for a held request.
    pending: bool,
    /// A notice was sent (or waits) and the host has not read the log page since.
    masked: bool,
    /// The Changed Namespace List names the namespace.
    changed: bool,
}

impl Controller {
    pub(super) fn ready(&self) -> bool {
        lock(&self.regs).1 & 1 != 0
    }

    pub(super) fn is_dead(&self) -> bool {
        self.dead.load(Ordering::SeqCst)
    }

    /// Forgets the socket of queue `qid` (it closed).
    pub(super) fn queue_closed(&self, qid: u16) {
        lock(&self.queues).retain(|(q, _)| *q != qid);
    }

    /// The namespace changed: listed in the log page, and told if the host asked for such
    /// notices and has read the log since the last one.
    pub(super) fn namespace_changed(&self) {
        if self.discovery {
            return;
        }
        let mut e = lock(&self.events);
        e.changed = true;
        let enabled = self.aec.load(Ordering::SeqCst) & AEC_NAMESPACE_ATTRIBUTE != 0;
        if enabled && !e.masked {
            e.masked = true;
            e.pending = true;
        }
    }

    /// Asynchronous Event Requests are held: the admin queue's connection looks for events
    /// to send every little while.
    pub(super) fn holds_event_requests(&self) -> bool {
        !lock(&self.events).held.is_empty()
    }

    /// The command identifier of a held request to complete with the namespace notice, if
    /// one waits.
    pub(super) fn take_notice(&self) -> Option<u16> {
        let mut e = lock(&self.events);
        if !e.pending || e.held.is_empty() {
            return None;
        }
        e.pending = false;
        Some(e.held.remove(0))
    }
}

/// The completion of an Asynchronous Event Request with a namespace notice.
pub(super) fn notice() -> Completion {
    Completion::ok().dw0(AsyncEvent::NAMESPACE_CHANGED.dw0())
}

/// What a successful Connect bound the connection to.
#[derive(Debug)]
pub(super) struct Bound {
    pub ctrl: Arc<Controller>,
    pub qid: u16,
    /// 0-based.
    pub sqsize: u16,
    /// CATTR bit 2: no SQ flow control, so SQHD is not reported and successful reads end
    /// with a C2HData carrying the SUCCESS flag.
    pub sqfc_disabled: bool,
}

/// A NUL-padded NQN field of the connect data.
fn nqn_field(data: &[u8], off: usize) -> String {
    let field = data.get(off..off + 256).unwrap_or_default();
    let field = field.split(|&c| c == 0).next().unwrap_or_default();
    String::from_utf8_lossy(field).into_owned()
}

/// Fabrics Connect (Fabrics 1.1 §3.3) with its 1024 bytes of data. `stream` is a handle on
/// the connection's socket, closed if the controller is torn down.
pub(super) fn connect(
    sh: &Shared,
    cmd: &Cmd,
    data: &[u8],
    stream: TcpStream,
) -> Result<Bound, Completion> {
    if data.len() != CONNECT_DATA_LEN {
        return Err(Completion::generic(sc::SGL_LENGTH_INVALID));
    }
    if cmd.u16_at(40) != 0 {
        return Err(Completion::status(dnr(
            sct::COMMAND_SPECIFIC,
            sc::CONNECT_INCOMPATIBLE_FORMAT,
        )));
    }
    let (qid, sqsize, cattr, kato) = (cmd.u16_at(42), cmd.u16_at(44), cmd.byte(46), cmd.cdw(12));
    if sqsize == 0 || sqsize > sh.opts.mqes {
        return Err(Completion::invalid_parameter(false, 44));
    }
    let cntlid = u16::from_le_bytes([data[16], data[17]]);
    let subnqn = nqn_field(data, 256);
    let hostnqn = nqn_field(data, 512);
    let discovery = subnqn == DISCOVERY_NQN;
    if !discovery && subnqn != sh.opts.nqn {
        return Err(Completion::invalid_parameter(true, 256));
    }
    if let Some(hosts) = &sh.opts.allowed_hosts
        && !discovery
        && !hosts.contains(&hostnqn)
    {
        return Err(Completion::status(dnr(
            sct::COMMAND_SPECIFIC,
            sc::CONNECT_INVALID_HOST,
        )));
    }
    let ctrl = if qid == 0 {
        if cntlid != CNTLID_DYNAMIC {
            return Err(Completion::invalid_parameter(true, 16));
        }
        let ctrl = Arc::new(Controller {
            cntlid: sh.new_cntlid(),
            discovery,
            subnqn,
            hostnqn,
            kato_ms: AtomicU32::new(kato),
            regs: Mutex::new((0, 0)),
            io_queues: AtomicU32::new(if discovery {
                0
            } else {
                u32::from(sh.opts.max_queues)
            }),
            aec: AtomicU32::new(0),
            vwce: AtomicU32::new(1),
            queues: Mutex::new(Vec::new()),
            dead: AtomicBool::new(false),
            events: Mutex::new(Events::default()),
        });
        lock(&sh.ctrls).insert(ctrl.cntlid, Arc::clone(&ctrl));
        ctrl
    } else {
        let found = lock(&sh.ctrls).get(&cntlid).cloned();
        let ctrl = match found {
            Some(c) if c.subnqn == subnqn && c.hostnqn == hostnqn && !c.is_dead() => c,
            _ => return Err(Completion::invalid_parameter(true, 16)),
        };
        if !ctrl.ready() {
            return Err(Completion::generic(sc::COMMAND_SEQUENCE_ERROR));
        }
        let taken = lock(&ctrl.queues).iter().any(|(q, _)| *q == qid);
        if u32::from(qid) > ctrl.io_queues.load(Ordering::SeqCst) || taken {
            return Err(Completion::invalid_parameter(false, 42));
        }
        ctrl
    };
    lock(&ctrl.queues).push((qid, stream));
    Ok(Bound {
        ctrl,
        qid,
        sqsize,
        sqfc_disabled: cattr & (1 << 2) != 0,
    })
}

/// Removes a controller and closes every queue connected to it.
pub(super) fn teardown(sh: &Shared, ctrl: &Controller) {
    ctrl.dead.store(true, Ordering::SeqCst);
    lock(&sh.ctrls).remove(&ctrl.cntlid);
    for (_, s) in lock(&ctrl.queues).drain(..) {
        let _ = s.shutdown(Shutdown::Both);
    }
}

/// What an admin command leads to.
#[derive(Debug)]
pub(super) enum Admin {
    Done(Completion),
    /// Async Event Request: outstanding until the controller goes away.
    Hold,
}

/// Executes an admin command other than Connect. `xfer` is the length of its data as the
/// SGL describes it; `data` the data it brought.
pub(super) fn admin(sh: &Shared, c: &Controller, cmd: &Cmd, xfer: u32) -> Admin {
    let op = cmd.opcode();
    if op == admin_opc::FABRICS {
        return Admin::Done(fabrics(sh, c, cmd));
    }
    if !c.ready() {
        return Admin::Done(Completion::generic(sc::COMMAND_SEQUENCE_ERROR));
    }
    Admin::Done(match op {
        admin_opc::IDENTIFY => identify(sh, c, cmd, xfer),
        admin_opc::GET_LOG_PAGE => get_log_page(sh, c, cmd, xfer),
        admin_opc::SET_FEATURES => features(sh, c, cmd, true),
        admin_opc::GET_FEATURES => features(sh, c, cmd, false),
        admin_opc::KEEP_ALIVE => Completion::ok(),
        // Not aborted (Base 2.0 §5.1: DW0 bit 0 set).
        admin_opc::ABORT => Completion::ok().dw0(1),
        admin_opc::ASYNC_EVENT_REQUEST => {
            let mut e = lock(&c.events);
            if e.held.len() > usize::from(AERL) {
                Completion::status(dnr(sct::COMMAND_SPECIFIC, SC_AER_LIMIT_EXCEEDED))
            } else {
                e.held.push(cmd.cid());
                return Admin::Hold;
            }
        }
        _ => Completion::generic(sc::INVALID_OPCODE),
    })
}

/// Property Get / Set (Fabrics 1.1 §3.4-3.5); Connect again is a sequence error.
fn fabrics(sh: &Shared, c: &Controller, cmd: &Cmd) -> Completion {
    let eight = cmd.byte(40) & 7 == 1;
    let offset = cmd.cdw(11);
    match cmd.fctype() {
        fabrics_type::PROPERTY_GET => {
            let (cc, csts) = *lock(&c.regs);
            let value = match (offset, eight) {
                (0x00, true) => u64::from(sh.opts.mqes) | CAP_FIXED,
                (0x08, false) => u64::from(VERSION),
                (0x14, false) => u64::from(cc),
                (0x1c, false) => u64::from(csts),
                _ => return Completion::generic(sc::INVALID_FIELD),
            };
            Completion {
                dw1: (value >> 32) as u32,
                ..Completion::ok().dw0(value as u32)
            }
        }
        fabrics_type::PROPERTY_SET if offset == 0x14 && !eight => {
            set_cc(c, cmd.qword(12) as u32);
            Completion::ok()
        }
        fabrics_type::PROPERTY_SET => Completion::generic(sc::INVALID_FIELD),
        fabrics_type::CONNECT => Completion::generic(sc::COMMAND_SEQUENCE_ERROR),
        _ => Completion::generic(sc::INVALID_OPCODE),
    }
}

/// CC written: EN makes the controller ready at once, a shutdown completes at once
/// (Base 2.0 §3.1.3.5-6).
fn set_cc(c: &Controller, cc: u32) {
    let mut regs = lock(&c.regs);
    let (old, mut csts) = *regs;
    let (en, was_en) = (cc & 1 != 0, old & 1 != 0);
    let (shn, old_shn) = ((cc >> 14) & 3, (old >> 14) & 3);
    if en && !was_en {
        csts |= 1;
    }
    if !en && was_en {
        csts &= !(1 | (3 << 2));
    }
    if shn != 0 && old_shn == 0 {
        csts = (csts & !(3 << 2)) | (2 << 2);
    }
    if shn == 0 && old_shn != 0 {
        csts &= !(3 << 2);
    }
    *regs = (cc, csts);
}

fn put16(b: &mut [u8], off: usize, v: u16) {
    b[off..off + 2].copy_from_slice(&v.to_le_bytes());
}

fn put32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_le_bytes());
}

fn put64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_le_bytes());
}

/// A text field padded with `pad` (spaces for Identify, NULs for NQNs and addresses).
fn put_text(b: &mut [u8], off: usize, len: usize, s: &str, pad: u8) {
    let field = &mut b[off..off + len];
    field.fill(pad);
    // Leave room for a terminating NUL in NUL-padded fields.
    let room = if pad == 0 { len - 1 } else { len };
    let n = s.len().min(room);
    field[..n].copy_from_slice(&s.as_bytes()[..n]);
}

/// Identify (Base 2.0 §5.17): CNS 0, 1, 2 and 3 (an empty descriptor list).
fn identify(sh: &Shared, c: &Controller, cmd: &Cmd, xfer: u32) -> Completion {
    if xfer as usize != IDENTIFY_LEN {
        return Completion::generic(sc::SGL_LENGTH_INVALID);
    }
    let cns = cmd.cdw(10) & 0xff;
    let nsid = cmd.nsid();
    let mut b = vec![0u8; IDENTIFY_LEN];
    match (cns, c.discovery) {
        (1, _) => identify_controller(sh, c, &mut b),
        (0 | 3, false) if nsid == 1 => {
            if cns == 0 {
                identify_namespace(sh, &mut b);
            }
        }
        (0 | 3, false) => return Completion::generic(sc::INVALID_NAMESPACE),
        (2, false) if nsid >= 0xffff_fffe => {
            return Completion::generic(sc::INVALID_NAMESPACE);
        }
        (2, false) => {
            if nsid < 1 {
                put32(&mut b, 0, 1);
            }
        }
        _ => return Completion::generic(sc::INVALID_FIELD),
    }
    Completion::data(b)
}

/// Identify Controller (Base 2.0 Figure 275).
fn identify_controller(sh: &Shared, c: &Controller, b: &mut [u8]) {
    let o = &sh.opts;
    put_text(b, 4, 20, &o.serial, b' ');
    put_text(b, 24, 40, &o.model, b' ');
    put_text(b, 64, 8, &o.firmware, b' ');
    b[72] = 6; // RAB
    b[77] = o.mdts;
    put16(b, 78, c.cntlid);
    put32(b, 80, VERSION);
    if !c.discovery && o.namespace_notices {
        put32(b, 92, AEC_NAMESPACE_ATTRIBUTE); // OAES
    }
    b[111] = if c.discovery { 2 } else { 1 }; // CNTRLTYPE
    b[259] = AERL;
    put16(b, 320, KAS);
    b[512] = 0x66; // SQES: 64 bytes
    b[513] = 0x44; // CQES: 16 bytes
    put16(b, 514, o.mqes.saturating_add(1)); // MAXCMD
    put32(b, 516, u32::from(!c.discovery)); // NN
    if !c.discovery {
        put16(b, 520, ONCS);
        b[525] = 1; // VWC present
    }
    put32(b, 536, SGLS);
    put_text(b, 768, 256, &c.subnqn, 0);
    put32(b, 1792, o.ioccsz);
    put32(b, 1796, 1); // IORCSZ
    b[1803] = 1; // MSDBD
}

/// Identify Namespace (NVM Command Set 1.0 Figure 97): one LBA format, not thin provisioned;
/// deallocated blocks read as zeros (DLFEAT 001b) and Write Zeroes may deallocate.
fn identify_namespace(sh: &Shared, b: &mut [u8]) {
    let blocks = sh.ns.blocks();
    put64(b, 0, blocks);
    put64(b, 8, blocks);
    put64(b, 16, blocks);
    b[33] = 0x09; // DLFEAT
    b[130] = sh.ns.lbads(); // LBAF0: MS 0, LBADS, RP 0
}

/// Get Log Page (Base 2.0 §5.16): the discovery log on a discovery controller; Error
/// Information, SMART / Health and Firmware Slot as zeros on an I/O controller.
fn get_log_page(sh: &Shared, c: &Controller, cmd: &Cmd, xfer: u32) -> Completion {
    let (cdw10, cdw11) = (cmd.cdw(10), cmd.cdw(11));
    let lid = (cdw10 & 0xff) as u8;
    let numd = u64::from(cdw10 >> 16) | (u64::from(cdw11 & 0xffff) << 16);
    let len = (numd + 1) * 4;
    if len != u64::from(xfer) {
        return Completion::generic(sc::SGL_LENGTH_INVALID);
    }
    let offset = cmd.qword(12);
    let log = match (lid, c.discovery) {
        (LID_DISCOVERY, true) => discovery_log(sh),
        (0x01..=0x03, false) => Vec::new(),
        (LID_CHANGED_NAMESPACES, false) => changed_namespaces(c, cdw10 & (1 << 15) != 0),
        _ => return Completion::generic(sc::INVALID_FIELD),
    };
    let mut out = vec![0u8; xfer as usize];
    if let Some(src) = usize::try_from(offset).ok().and_then(|o| log.get(o..)) {
        let n = src.len().min(out.len());
        out[..n].copy_from_slice(&src[..n]);
    }
    Completion::data(out)
}

/// The Changed Namespace List (Base 2.0 §5.16.1.5): namespace 1 if it changed since the
/// last read. Without Retain Asynchronous Event (`rae`) the read clears the list and lets
/// the next change be told.
fn changed_namespaces(c: &Controller, rae: bool) -> Vec<u8> {
    let mut b = vec![0u8; CHANGED_NAMESPACES_LEN];
    let mut e = lock(&c.events);
    if e.changed {
        put32(&mut b, 0, 1);
    }
    if !rae {
        e.changed = false;
        e.masked = false;
    }
    b
}

/// The discovery log page (Base 2.0 Figures 262-263): one entry, for the subsystem.
fn discovery_log(sh: &Shared) -> Vec<u8> {
    let mut b = vec![0u8; DISCOVERY_HEADER_LEN + DISCOVERY_ENTRY_LEN];
    put64(&mut b, 0, 1); // GENCTR
    put64(&mut b, 8, 1); // NUMREC
    let e = &mut b[DISCOVERY_HEADER_LEN..];
    e[0] = TRTYPE_TCP;
    e[1] = 1; // ADRFAM: IPv4
    e[2] = 2; // SUBTYPE: NVM subsystem
    e[3] = 1 << 2; // TREQ: secure channel not specified, SQ flow control disable supported
    put16(e, 4, 1); // PORTID
    put16(e, 6, CNTLID_DYNAMIC);
    put16(e, 8, 32); // ASQSZ
    put_text(e, 32, 32, &sh.addr.port().to_string(), 0);
    put_text(e, 256, 256, &sh.opts.nqn, 0);
    put_text(e, 512, 256, &sh.addr.ip().to_string(), 0);
    // TSAS: SECTYPE 0, no security.
    b
}

/// Set Features / Get Features (Base 2.0 §5.27, §5.15) for the features a host sets up.
fn features(sh: &Shared, c: &Controller, cmd: &Cmd, set: bool) -> Completion {
    let fid = (cmd.cdw(10) & 0xff) as u8;
    let v = cmd.cdw(11);
    match fid {
        FID_NUMBER_OF_QUEUES if !c.discovery => {
            if set {
                let (nsqr, ncqr) = (v & 0xffff, v >> 16);
                if nsqr == 0xffff || ncqr == 0xffff {
                    return Completion::generic(sc::INVALID_FIELD);
                }
                let max = u32::from(sh.opts.max_queues).max(1) - 1;
                let granted = nsqr.min(ncqr).min(max);
                c.io_queues.store(granted + 1, Ordering::SeqCst);
            }
            let n = c.io_queues.load(Ordering::SeqCst).saturating_sub(1);
            Completion::ok().dw0(n | (n << 16))
        }
        FID_KEEP_ALIVE_TIMER => {
            if set {
                c.kato_ms.store(v, Ordering::SeqCst);
            }
            Completion::ok().dw0(c.kato_ms.load(Ordering::SeqCst))
        }
        FID_ASYNC_EVENT_CONFIG => {
            if set {
                c.aec.store(v, Ordering::SeqCst);
            }
            Completion::ok().dw0(c.aec.load(Ordering::SeqCst))
        }
        FID_VOLATILE_WRITE_CACHE if !c.discovery => {
            if set {
                c.vwce.store(v & 1, Ordering::SeqCst);
            }
            Completion::ok().dw0(c.vwce.load(Ordering::SeqCst))
        }
        _ => Completion::generic(sc::INVALID_FIELD),
    }
}
