//! One NVMe/TCP I/O queue on a non-blocking connection, owned and driven by one poller.
//!
//! Commands wait in a preallocated table (by command identifier) from [`IoQueue::push`] until
//! their completion is reported by [`IoQueue::poll`]. Sending is batched: [`IoQueue::flush`]
//! gathers the PDUs of every queued command (capsules, then H2CData answering R2Ts) into one
//! `sendmsg`, the data iovecs pointing straight at the commands' buffers. Receiving reads
//! exactly what the [`RxParser`] asks for, so payload goes from the socket straight into the
//! commands' buffers: while a C2HData payload is read, the same `readv` takes its data digest
//! and the next PDU's header (every header after ICResp has the same length) into small
//! arrays of the queue's own.
//!
//! A connection-level fault (EOF, reset, a malformed PDU, a digest error, a termination
//! request) ends the connection: the queue keeps its commands, and
//! [`IoQueue::reconnect`] sends all of them again on a new connection (`held`: what happens
//! to commands off a connection).

mod held;

use std::collections::VecDeque;
use std::io;
use std::net::TcpStream;
use std::os::fd::{AsRawFd, RawFd};

use thiserror::Error;

pub use super::ctrl::IoQueueConn;
use super::pdu::{
    DIGEST_LEN, DataDigest, H2cData, IcResp, PduError, RxEvent, RxNeed, RxParser, TX_HEADER_MAX,
    encode_capsule_cmd, encode_h2c_data,
};
use crate::nvme::cid::CmdTable;
use crate::nvme::data::{DataRef, IovBuf};
use crate::nvme::spec::{Sgl, Sqe, Status};

/// Most iovecs one `sendmsg` or `readv` gathers.
const MAX_IOVECS: usize = 256;
/// Most `read`s one [`IoQueue::poll`] makes before returning, so that a fast target cannot
/// keep the poller from its other queues.
const READS_PER_POLL: usize = 64;

/// The data a command moves.
#[derive(Clone, Copy, Debug)]
pub enum Data {
    None,
    /// Host to controller, from these bytes.
    Out(DataRef),
    /// Controller to host, into these bytes.
    In(DataRef),
    /// Host to controller, a few bytes kept with the command (a DSM range).
    OutInline([u8; 16]),
}

impl Data {
    fn len(&self) -> usize {
        match self {
            Data::None => 0,
            Data::Out(d) | Data::In(d) => d.len(),
            Data::OutInline(b) => b.len(),
        }
    }
}

/// How a command ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Completion {
    pub user: u32,
    pub status: Status,
    /// Bytes moved: the command's data length on success, else 0.
    pub bytes: u32,
}

/// The queue has no free command identifier.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueFull;

/// Why a connection ended. The commands in flight stay queued for [`IoQueue::reconnect`].
#[derive(Debug, Error)]
pub enum QueueError {
    #[error("connection closed by the target")]
    Closed,
    #[error("connection")]
    Io(#[source] io::Error),
    #[error("malformed PDU from the target")]
    Pdu(#[source] PduError),
    #[error("the target terminated the connection (FES {fes:#x}, FEI {fei:#x})")]
    Terminated { fes: u16, fei: u32 },
    #[error("the target answered command {cid} out of sequence")]
    Sequence { cid: u16 },
}

/// One command in flight.
#[derive(Debug)]
struct Cmd {
    user: u32,
    sqe: Sqe,
    data: Data,
    /// Write data travels in the capsule (else through R2T / H2CData).
    in_capsule: bool,
    /// The PDU being sent (or waiting to be): its header, data range and data digest.
    hdr: [u8; TX_HEADER_MAX],
    hdr_len: usize,
    pdu_data: (usize, usize),
    ddgst: [u8; DIGEST_LEN],
    /// In the send queue.
    queued: bool,
    /// An R2T being answered: its transfer tag and the end of the range it asked for.
    r2t: Option<(u16, usize)>,
    /// C2HData bytes received.
    received: usize,
    /// When the command was last sent on a connection (pushed, or queued again on a new
    /// one), in the caller's clock (milliseconds): what the I/O timeout is measured from.
    since: u64,
    /// When the command was pushed: it keeps this across connections.
    pushed: u64,
    /// Off a connection past this moment, the command is failed instead of being sent again
    /// ([`IoQueue::set_deadlines`]).
    deadline: Option<u64>,
}

/// The live part of a queue.
#[derive(Debug)]
struct Conn {
    stream: TcpStream,
    rx: RxParser,
    params: IcResp,
    /// Length of every PDU header after ICResp.
    hlen: usize,
}

/// An NVMe/TCP I/O queue.
#[derive(Debug)]
pub struct IoQueue {
    conn: Option<Conn>,
    cmds: CmdTable<Cmd>,
    /// Commands whose current PDU waits to be sent, in order.
    txq: VecDeque<u16>,
    /// Bytes of the first queued PDU already sent.
    tx_off: usize,
    /// Largest write sent in the capsule (the controller's IOCCSZ less the SQE).
    in_capsule_max: usize,
    iov: IovBuf,
    /// The next PDU's header, read behind a payload.
    stage: [u8; 32],
    /// A C2HData digest, read behind its payload.
    ddgst: [u8; DIGEST_LEN],
}

impl IoQueue {
    /// A queue for `depth` commands at once, not connected yet.
    pub fn new(depth: u16, in_capsule_max: u32) -> Self {
        let cmds = CmdTable::new(depth);
        let depth = cmds.depth();
        Self {
            conn: None,
            cmds,
            // A command has at most one PDU queued at a time.
            txq: VecDeque::with_capacity(depth),
            tx_off: 0,
            in_capsule_max: in_capsule_max as usize,
            iov: IovBuf::with_capacity(MAX_IOVECS),
            stage: [0; 32],
            ddgst: [0; DIGEST_LEN],
        }
    }

    /// Commands the queue holds at most.
    pub fn depth(&self) -> usize {
        self.cmds.depth()
    }

    pub fn has_room(&self) -> bool {
        !self.cmds.is_full()
    }

    pub fn in_flight(&self) -> usize {
        self.cmds.in_flight()
    }

    pub fn is_connected(&self) -> bool {
        self.conn.is_some()
    }

    /// The connection's socket, while connected.
    pub fn fd(&self) -> Option<RawFd> {
        self.conn.as_ref().map(|c| c.stream.as_raw_fd())
    }

    /// Bytes wait to be sent: the socket was full.
    pub fn wants_write(&self) -> bool {
        self.conn.is_some() && !self.txq.is_empty()
    }

    /// The push time of the oldest command in flight.
    pub fn oldest(&self) -> Option<u64> {
        self.cmds
            .cids()
            .filter_map(|cid| self.cmds.get(cid))
            .map(|c| c.since)
            .min()
    }

    /// Queues a command (its CID and data pointer are set here) and returns its CID; the next
    /// [`IoQueue::flush`] sends it. `now` is the caller's clock in milliseconds, for
    /// [`IoQueue::oldest`].
    pub fn push(&mut self, user: u32, sqe: Sqe, data: Data, now: u64) -> Result<u16, QueueFull> {
        let in_capsule = match data {
            Data::Out(_) | Data::OutInline(_) => data.len() <= self.in_capsule_max,
            Data::None | Data::In(_) => false,
        };
        let cid = self
            .cmds
            .insert(Cmd {
                user,
                sqe,
                data,
                in_capsule,
                hdr: [0; TX_HEADER_MAX],
                hdr_len: 0,
                pdu_data: (0, 0),
                ddgst: [0; DIGEST_LEN],
                queued: false,
                r2t: None,
                received: 0,
                since: now,
                pushed: now,
                deadline: None,
            })
            .ok_or(QueueFull)?;
        if let Some(cmd) = self.cmds.get_mut(cid) {
            let len = cmd.data.len() as u32;
            cmd.sqe.set_cid(cid);
            cmd.sqe.set_sgl(if cmd.in_capsule {
                Sgl::InCapsule { len }
            } else {
                Sgl::Transport { len }
            });
        }
        if let Some(conn) = &self.conn {
            queue_capsule(&mut self.cmds, &mut self.txq, cid, &conn.params);
        }
        Ok(cid)
    }

    /// Sends every queued PDU the socket takes now.
    pub fn flush(&mut self) -> Result<(), QueueError> {
        let Some(conn) = &self.conn else {
            return Ok(());
        };
        let params = conn.params;
        while !self.txq.is_empty() {
            self.iov.clear();
            let mut skip = self.tx_off;
            for &cid in &self.txq {
                let Some(cmd) = self.cmds.get(cid) else {
                    continue;
                };
                if !gather(cmd, &mut skip, &mut self.iov) {
                    break;
                }
            }
            if self.iov.is_empty() {
                return Ok(());
            }
            let Some(conn) = &self.conn else {
                return Ok(());
            };
            let n = match send(&conn.stream, self.iov.as_slice()) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(self.fail(QueueError::Io(e))),
            };
            let all = n == self.iov.bytes();
            self.consume(n, &params);
            if !all {
                return Ok(());
            }
        }
        Ok(())
    }

    /// Takes `n` sent bytes off the front of the send queue.
    fn consume(&mut self, mut n: usize, params: &IcResp) {
        while n > 0 {
            let Some(&cid) = self.txq.front() else {
                return;
            };
            let Some(cmd) = self.cmds.get_mut(cid) else {
                self.txq.pop_front();
                self.tx_off = 0;
                continue;
            };
            let left = pdu_len(cmd) - self.tx_off;
            if n < left {
                self.tx_off += n;
                return;
            }
            n -= left;
            self.tx_off = 0;
            // The PDU is out: the next chunk of an R2T's data, or nothing.
            let next = cmd.r2t.and_then(|(ttag, end)| {
                let from = cmd.pdu_data.0 + cmd.pdu_data.1;
                (from < end).then_some((ttag, from, end))
            });
            self.txq.pop_front();
            match next {
                // The next chunk goes behind what the same send already carried of the
                // PDUs queued after this one.
                Some((ttag, from, end)) => {
                    build_h2c(cmd, ttag, from, end, params);
                    self.txq.push_back(cid);
                }
                None => {
                    cmd.queued = false;
                    cmd.r2t = None;
                }
            }
        }
    }

    /// Receives what the target sent, reporting each finished command to `f`. Returns how
    /// many finished.
    pub fn poll(&mut self, mut f: impl FnMut(Completion)) -> Result<usize, QueueError> {
        let mut done = 0;
        for _ in 0..READS_PER_POLL {
            match self.read_once(&mut f, &mut done) {
                Ok(true) => {}
                Ok(false) => break,
                Err(e) => return Err(self.fail(e)),
            }
        }
        Ok(done)
    }

    /// One read from the socket and what follows from it; false when nothing was there.
    fn read_once(
        &mut self,
        f: &mut impl FnMut(Completion),
        done: &mut usize,
    ) -> Result<bool, QueueError> {
        let Some(conn) = self.conn.as_mut() else {
            return Ok(false);
        };
        let ddgst = conn.params.digests.data;
        let hlen = conn.hlen;
        match conn.rx.need() {
            RxNeed::Header { buf } | RxNeed::Padding { buf } | RxNeed::DataDigest { buf } => {
                let n = match read_into(&conn.stream, buf)? {
                    Some(n) => n,
                    None => return Ok(false),
                };
                let event = conn.rx.filled(n).map_err(QueueError::Pdu)?;
                self.handle(event, f, done)?;
                Ok(true)
            }
            RxNeed::Accept { cccid, .. } => {
                let (len, received) = match self.cmds.get(cccid) {
                    Some(Cmd {
                        data: Data::In(d),
                        queued: false,
                        received,
                        ..
                    }) => (d.len(), *received),
                    _ => return Err(QueueError::Pdu(conn.rx.reject())),
                };
                let u32_of = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
                conn.rx
                    .accept(u32_of(len), u32_of(received))
                    .map_err(QueueError::Pdu)?;
                Ok(true)
            }
            RxNeed::Payload {
                cccid,
                offset,
                remaining,
            } => {
                let Some(Cmd {
                    data: Data::In(d), ..
                }) = self.cmds.get(cccid)
                else {
                    return Err(QueueError::Sequence { cid: cccid });
                };
                let d = *d;
                let (offset, remaining) = (offset as usize, remaining as usize);
                self.iov.clear();
                let payload = d.append_to(offset, remaining, &mut self.iov);
                // Behind the whole payload: its digest and the next header.
                if payload == remaining {
                    let dg = if ddgst { DIGEST_LEN } else { 0 };
                    self.iov.push(self.ddgst.as_mut_ptr(), dg);
                    self.iov.push(self.stage.as_mut_ptr(), hlen);
                }
                let n = match readv(&conn.stream, self.iov.as_slice())? {
                    Some(n) => n,
                    None => return Ok(false),
                };
                let got = n.min(payload);
                let mut event = None;
                let mut err = None;
                d.for_each_piece(offset, got, |p, len| {
                    // SAFETY: the piece lies in the command's buffer, which the caller of
                    // `push` keeps mapped until the command completes; the kernel just wrote
                    // these bytes. The guest may change them concurrently; they are only
                    // digested.
                    let bytes = unsafe { std::slice::from_raw_parts(p.cast_const(), len) };
                    match conn.rx.payload_read(bytes) {
                        Ok(Some(e)) => event = Some(e),
                        Ok(None) => {}
                        Err(e) => err = Some(e),
                    }
                });
                if let Some(e) = err {
                    return Err(QueueError::Pdu(e));
                }
                if let Some(cmd) = self.cmds.get_mut(cccid) {
                    cmd.received += got;
                }
                self.handle(event, f, done)?;
                let mut rest = n - got;
                if rest > 0 && ddgst {
                    let k = rest.min(DIGEST_LEN);
                    let digest = self.ddgst;
                    self.feed_staged(&digest[..k], f, done)?;
                    rest -= k;
                }
                if rest > 0 {
                    let stage = self.stage;
                    self.feed_staged(&stage[..rest], f, done)?;
                }
                Ok(true)
            }
            RxNeed::Closed => Err(QueueError::Closed),
        }
    }

    /// Hands bytes read ahead (a digest, a header) to the parser.
    fn feed_staged(
        &mut self,
        mut bytes: &[u8],
        f: &mut impl FnMut(Completion),
        done: &mut usize,
    ) -> Result<(), QueueError> {
        while !bytes.is_empty() {
            let Some(conn) = self.conn.as_mut() else {
                return Ok(());
            };
            let (used, result) = conn.rx.feed(bytes);
            let event = result.map_err(QueueError::Pdu)?;
            bytes = &bytes[used..];
            self.handle(event, f, done)?;
            if used == 0 {
                // Only a payload or a verdict can stop the parser mid-way, and the staged
                // bytes never hold payload: the target broke the framing.
                return Err(QueueError::Sequence { cid: 0 });
            }
        }
        Ok(())
    }

    fn handle(
        &mut self,
        event: Option<RxEvent>,
        f: &mut impl FnMut(Completion),
        done: &mut usize,
    ) -> Result<(), QueueError> {
        let Some(event) = event else {
            return Ok(());
        };
        match event {
            RxEvent::CapsuleResp(cqe) => {
                let cid = cqe.cid();
                let cmd = match self.cmds.get(cid) {
                    Some(c) if !c.queued => c,
                    _ => return Err(QueueError::Sequence { cid }),
                };
                let status = cqe.status();
                if status.is_success() && matches!(cmd.data, Data::In(d) if cmd.received != d.len())
                {
                    return Err(QueueError::Sequence { cid });
                }
                self.complete(cid, status, f, done);
            }
            RxEvent::PayloadDone {
                cccid,
                success: true,
                ..
            } => {
                match self.cmds.get(cccid) {
                    Some(c) if c.received == c.data.len() => {}
                    _ => return Err(QueueError::Sequence { cid: cccid }),
                }
                self.complete(cccid, Status::SUCCESS, f, done);
            }
            RxEvent::PayloadDone { .. } | RxEvent::C2hData(_) => {}
            RxEvent::R2t(r) => {
                let params = match &self.conn {
                    Some(c) => c.params,
                    None => return Ok(()),
                };
                let cmd = match self.cmds.get_mut(r.cccid) {
                    Some(c)
                        if !c.queued
                            && !c.in_capsule
                            && c.r2t.is_none()
                            && matches!(c.data, Data::Out(_) | Data::OutInline(_)) =>
                    {
                        c
                    }
                    _ => return Err(QueueError::Sequence { cid: r.cccid }),
                };
                let len = u32::try_from(cmd.data.len()).unwrap_or(u32::MAX);
                r.check_range(len).map_err(QueueError::Pdu)?;
                let (from, end) = (r.r2to as usize, r.r2to as usize + r.r2tl as usize);
                cmd.r2t = Some((r.ttag, end));
                build_h2c(cmd, r.ttag, from, end, &params);
                cmd.queued = true;
                self.txq.push_back(r.cccid);
            }
            RxEvent::C2hTermReq { fes, fei } => return Err(QueueError::Terminated { fes, fei }),
            RxEvent::IcResp(_) => return Err(QueueError::Sequence { cid: 0 }),
        }
        Ok(())
    }

    fn complete(
        &mut self,
        cid: u16,
        status: Status,
        f: &mut impl FnMut(Completion),
        done: &mut usize,
    ) {
        if let Some(cmd) = self.cmds.remove(cid) {
            let bytes = if status.is_success() {
                u32::try_from(cmd.data.len()).unwrap_or(u32::MAX)
            } else {
                0
            };
            f(Completion {
                user: cmd.user,
                status,
                bytes,
            });
            *done += 1;
        }
    }
}

/// Builds the capsule of command `cid` and queues it.
fn queue_capsule(cmds: &mut CmdTable<Cmd>, txq: &mut VecDeque<u16>, cid: u16, params: &IcResp) {
    let Some(cmd) = cmds.get_mut(cid) else {
        return;
    };
    let len = if cmd.in_capsule { cmd.data.len() } else { 0 };
    cmd.hdr_len = encode_capsule_cmd(&mut cmd.hdr, &cmd.sqe, len as u32, params);
    cmd.pdu_data = (0, len);
    cmd.ddgst = data_digest(cmd, params);
    cmd.queued = true;
    cmd.received = 0;
    txq.push_back(cid);
}

/// Builds the next H2CData PDU answering an R2T for `from..end`.
fn build_h2c(cmd: &mut Cmd, ttag: u16, from: usize, end: usize, params: &IcResp) {
    let len = (end - from).min(params.maxh2cdata as usize);
    let pdu = H2cData {
        cccid: cmd.sqe.cid(),
        ttag,
        datao: from as u32,
        datal: len as u32,
        last: from + len == end,
    };
    cmd.hdr_len = encode_h2c_data(&mut cmd.hdr, &pdu, params);
    cmd.pdu_data = (from, len);
    cmd.ddgst = data_digest(cmd, params);
}

/// The data digest of the command's current PDU, if digests are on and it carries data.
fn data_digest(cmd: &Cmd, params: &IcResp) -> [u8; DIGEST_LEN] {
    let (from, len) = cmd.pdu_data;
    if !params.digests.data || len == 0 {
        return [0; DIGEST_LEN];
    }
    match &cmd.data {
        Data::Out(d) => d.crc32c_append(0, from, len).to_le_bytes(),
        Data::OutInline(b) => {
            let mut dg = DataDigest::new();
            dg.update(b.get(from..from + len).unwrap_or_default());
            dg.finish()
        }
        Data::None | Data::In(_) => [0; DIGEST_LEN],
    }
}

/// Bytes of the command's current PDU: header, data, data digest.
fn pdu_len(cmd: &Cmd) -> usize {
    let data = cmd.pdu_data.1;
    let dg = if data > 0 && cmd.ddgst_on() {
        DIGEST_LEN
    } else {
        0
    };
    cmd.hdr_len + data + dg
}

impl Cmd {
    /// The current PDU carries a data digest (its header says so).
    fn ddgst_on(&self) -> bool {
        // FLAGS byte of the common header, DDGSTF bit.
        self.hdr[1] & super::pdu::flags::DDGSTF != 0
    }
}

/// Appends the iovecs of the command's current PDU to `iov`, less its first `*skip` bytes
/// (which are consumed). False when `iov` filled up before the whole PDU was in.
fn gather(cmd: &Cmd, skip: &mut usize, iov: &mut IovBuf) -> bool {
    // The header and digest live in the command table, which never moves while the command
    // is queued; the kernel only reads through these pointers.
    if !push_skipping(iov, cmd.hdr.as_ptr(), cmd.hdr_len, skip) {
        return false;
    }
    let (from, len) = cmd.pdu_data;
    if len > 0 {
        match &cmd.data {
            Data::Out(d) => {
                let cut = (*skip).min(len);
                *skip -= cut;
                if d.append_to(from + cut, len - cut, iov) < len - cut {
                    return false;
                }
            }
            Data::OutInline(b) => {
                let bytes = b.get(from..from + len).unwrap_or_default();
                if !push_skipping(iov, bytes.as_ptr(), bytes.len(), skip) {
                    return false;
                }
            }
            Data::None | Data::In(_) => {}
        }
        if cmd.ddgst_on() && !push_skipping(iov, cmd.ddgst.as_ptr(), DIGEST_LEN, skip) {
            return false;
        }
    }
    iov.has_room(1)
}

/// Appends `base..base + len` less its first `*skip` bytes (which are consumed).
fn push_skipping(iov: &mut IovBuf, base: *const u8, len: usize, skip: &mut usize) -> bool {
    let cut = (*skip).min(len);
    *skip -= cut;
    iov.push(base.wrapping_add(cut).cast_mut(), len - cut)
}

/// `sendmsg` without blocking or SIGPIPE.
fn send(stream: &TcpStream, iov: &[libc::iovec]) -> io::Result<usize> {
    let mut msg: libc::msghdr = empty_msghdr();
    msg.msg_iov = iov.as_ptr().cast_mut();
    msg.msg_iovlen = iov.len();
    loop {
        // SAFETY: `msg` points at `iov`, whose entries describe memory that stays valid for
        // the call (command headers and digests in the table, command data the caller keeps
        // mapped); the kernel only reads it.
        let n = unsafe {
            libc::sendmsg(
                stream.as_raw_fd(),
                &msg,
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        if let Ok(n) = usize::try_from(n) {
            return Ok(n);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

fn empty_msghdr() -> libc::msghdr {
    // SAFETY: `msghdr` is plain old data for which all-zero bytes are a valid (empty) value.
    unsafe { std::mem::zeroed() }
}

/// `readv` into `iov`: `Some(n)` bytes, `None` when nothing is there, an error for EOF.
fn readv(stream: &TcpStream, iov: &[libc::iovec]) -> Result<Option<usize>, QueueError> {
    loop {
        let count = i32::try_from(iov.len()).unwrap_or(i32::MAX);
        // SAFETY: every iovec describes writable memory that stays valid for the call: the
        // command's buffer (kept mapped by the caller of `push`) and the queue's own arrays.
        let n = unsafe { libc::readv(stream.as_raw_fd(), iov.as_ptr(), count) };
        match usize::try_from(n) {
            Ok(0) => return Err(QueueError::Closed),
            Ok(n) => return Ok(Some(n)),
            Err(_) => {
                let e = io::Error::last_os_error();
                match e.kind() {
                    io::ErrorKind::Interrupted => continue,
                    io::ErrorKind::WouldBlock => return Ok(None),
                    _ => return Err(QueueError::Io(e)),
                }
            }
        }
    }
}

/// `read` into `buf`, with [`readv`]'s conventions.
fn read_into(stream: &TcpStream, buf: &mut [u8]) -> Result<Option<usize>, QueueError> {
    if buf.is_empty() {
        return Ok(Some(0));
    }
    let iov = [libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    }];
    readv(stream, &iov)
}

#[cfg(test)]
#[path = "queue_tests.rs"]
mod tests;
