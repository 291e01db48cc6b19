//! A blocking NVMe/TCP connection: one command at a time, every wait bounded by a timeout.
//!
//! It serves the admin queue (controller bring-up, keep alive, discovery) and establishes I/O
//! queue connections, which [`SyncConn::into_parts`] then hands to the non-blocking data path
//! at a PDU boundary. Received payload goes from the socket straight into the command's
//! buffer, read exactly as the [`RxParser`] asks, so nothing past the current PDU is consumed.
//!
//! Any transport fault (timeout, EOF, a malformed or unexpected PDU, a termination request)
//! leaves the connection unusable: later commands fail with [`ConnError::Broken`]. A command
//! that completes with an error status does not.

mod async_event;

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use thiserror::Error;

use self::async_event::{AER_CID, AerState};
use super::pdu::{
    DataDigest, Digests, IcReq, IcResp, PduError, RxEvent, RxNeed, RxParser, TERM_REQ_MAX_PLEN,
    TX_HEADER_MAX, encode_capsule_cmd, encode_h2c_term_req,
};
use crate::nvme::spec::{
    CONNECT_DATA_LEN, ConnectData, Cqe, InvalidParameter, Sgl, Sqe, Status, admin_opc,
    fabrics_type, io_opc, sc, sct,
};

/// Connect CATTR bit 2: SQ flow control disabled (Fabrics 1.1 Figure 19). The controller then
/// does not report SQHD, and NVMe/TCP controllers may end a successful read with a C2HData
/// PDU carrying SUCCESS instead of a CapsuleResp (NVMe/TCP 1.0 §3.6.2.8).
const CATTR_DISABLE_SQ_FLOW: u8 = 1 << 2;

// Offsets of Connect data fields (Fabrics 1.1 Figure 20), as Invalid Parameters reports them.
const CONNECT_DATA_CNTLID: u16 = 16;
const CONNECT_DATA_SUBNQN: u16 = 256;

/// Why a Fabrics Connect was refused, decoded from its status and, for Invalid Parameters,
/// from IATTR / IPO (Fabrics 1.1 §3.3, Figure 21).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnectRefusal {
    /// Invalid parameter SUBNQN: the target has no such subsystem (or hides it from us).
    SubsystemNotFound,
    /// Invalid parameter CNTLID on an I/O queue: the controller is gone.
    ControllerNotFound,
    /// Connect Invalid Host: the subsystem does not allow this host NQN.
    HostNotAllowed,
    /// Another parameter was refused.
    InvalidParameter(InvalidParameter),
    /// Any other status (controller busy, restart discovery, ...).
    Other(Status),
}

impl ConnectRefusal {
    /// Decodes the completion of a Connect that did not succeed.
    pub fn from_cqe(cqe: &Cqe) -> ConnectRefusal {
        let status = cqe.status();
        if status.sct() == sct::COMMAND_SPECIFIC && status.sc() == sc::CONNECT_INVALID_HOST {
            return ConnectRefusal::HostNotAllowed;
        }
        match cqe.connect_invalid_parameter() {
            Some(InvalidParameter {
                in_data: true,
                offset: CONNECT_DATA_SUBNQN,
            }) => ConnectRefusal::SubsystemNotFound,
            Some(InvalidParameter {
                in_data: true,
                offset: CONNECT_DATA_CNTLID,
            }) => ConnectRefusal::ControllerNotFound,
            Some(p) => ConnectRefusal::InvalidParameter(p),
            None => ConnectRefusal::Other(status),
        }
    }
}

impl fmt::Display for ConnectRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConnectRefusal::SubsystemNotFound => f.write_str("subsystem NQN not found"),
            ConnectRefusal::ControllerNotFound => {
                f.write_str("controller ID not found (the controller is gone)")
            }
            ConnectRefusal::HostNotAllowed => {
                f.write_str("the target does not allow this host NQN")
            }
            ConnectRefusal::InvalidParameter(p) => write!(f, "{p}"),
            ConnectRefusal::Other(status) => write!(f, "{status}"),
        }
    }
}

/// Name of a Fatal Error Status of a termination request (NVMe/TCP 1.0 Figure 20).
fn fes_name(fes: u16) -> &'static str {
    match fes {
        0x01 => "invalid PDU header field",
        0x02 => "PDU sequence error",
        0x03 => "header digest error",
        0x04 => "data transfer out of range",
        0x05 => "R2T or data transfer limit exceeded",
        0x06 => "unsupported parameter",
        _ => "reserved status",
    }
}

/// What went wrong on a [`SyncConn`]. `op` names the exchange (`ICReq`, `Identify`, ...).
#[derive(Debug, Error)]
pub enum ConnError {
    #[error("cannot resolve {host}")]
    Resolve {
        host: String,
        #[source]
        source: io::Error,
    },
    #[error("{host} resolves to no address")]
    NoAddress { host: String },
    #[error("connection refused by {addr}")]
    Refused { addr: SocketAddr },
    #[error("timed out connecting to {addr} after {timeout:?}")]
    ConnectTimeout { addr: SocketAddr, timeout: Duration },
    #[error("no route to {addr}")]
    NoRoute {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("cannot connect to {addr}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("cannot set up the socket to {peer}")]
    Socket {
        peer: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("{op}: cannot send to {peer}")]
    Send {
        op: &'static str,
        peer: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("{op}: cannot receive from {peer}")]
    Recv {
        op: &'static str,
        peer: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("{op}: {peer} closed the connection")]
    Eof { op: &'static str, peer: SocketAddr },
    #[error("{op}: no answer from {peer} within {timeout:?}")]
    Timeout {
        op: &'static str,
        peer: SocketAddr,
        timeout: Duration,
    },
    #[error("{op}: protocol error from {peer}")]
    Pdu {
        op: &'static str,
        peer: SocketAddr,
        #[source]
        source: PduError,
    },
    #[error("{op}: {peer} terminated the connection: {} (FES {fes:#x}, FEI {fei:#x})", fes_name(*.fes))]
    TermReq {
        op: &'static str,
        peer: SocketAddr,
        fes: u16,
        fei: u32,
    },
    #[error("{op}: unexpected {what} from {peer}")]
    Unexpected {
        op: &'static str,
        peer: SocketAddr,
        what: &'static str,
    },
    #[error(
        "{peer} does not grant the digests asked for (header {}, data {}; granted header {}, data {})",
        .requested.header, .requested.data, .granted.header, .granted.data
    )]
    DigestsRefused {
        peer: SocketAddr,
        requested: Digests,
        granted: Digests,
    },
    #[error("{op}: {len}-byte data buffer is too large")]
    DataLength { op: &'static str, len: usize },
    #[error("connection to {peer} is unusable after an earlier error")]
    Broken { peer: SocketAddr },
    #[error("{op} failed: {status}")]
    Status { op: &'static str, status: Status },
    #[error("{peer} refused to connect queue {qid}: {refusal}")]
    ConnectRefused {
        peer: SocketAddr,
        qid: u16,
        status: Status,
        refusal: ConnectRefusal,
    },
}

impl ConnError {
    /// Whether trying again (a new connection, the same command later) may succeed: connection
    /// and protocol faults yes; a refused configuration (unknown subsystem, host not allowed,
    /// digests refused, an invalid parameter) or a status with DNR set no.
    pub fn is_retryable(&self) -> bool {
        match self {
            ConnError::NoAddress { .. }
            | ConnError::DigestsRefused { .. }
            | ConnError::DataLength { .. } => false,
            ConnError::Status { status, .. } => status.is_retryable(),
            ConnError::ConnectRefused { refusal, .. } => match refusal {
                ConnectRefusal::SubsystemNotFound
                | ConnectRefusal::HostNotAllowed
                | ConnectRefusal::InvalidParameter(_) => false,
                ConnectRefusal::ControllerNotFound => true,
                ConnectRefusal::Other(status) => !status.dnr(),
            },
            // The name service may come back; every other fault is of this connection.
            _ => true,
        }
    }

    /// The fault leaves the connection unusable (everything but a completion status).
    fn breaks_connection(&self) -> bool {
        !matches!(
            self,
            ConnError::Status { .. }
                | ConnError::ConnectRefused { .. }
                | ConnError::DataLength { .. }
        )
    }
}

/// The socket with what every read and write needs.
#[derive(Debug)]
struct Link {
    stream: TcpStream,
    peer: SocketAddr,
    timeout: Duration,
}

impl Link {
    /// Reads at least one byte into `buf` (which is not empty) before `deadline`.
    fn read_some(
        &mut self,
        buf: &mut [u8],
        deadline: Instant,
        op: &'static str,
    ) -> Result<usize, ConnError> {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(self.timeout(op));
            }
            self.stream
                .set_read_timeout(Some(left))
                .map_err(|source| ConnError::Socket {
                    peer: self.peer,
                    source,
                })?;
            match self.stream.read(buf) {
                Ok(0) => {
                    return Err(ConnError::Eof {
                        op,
                        peer: self.peer,
                    });
                }
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if is_timeout(&e) => return Err(self.timeout(op)),
                Err(source) => {
                    return Err(ConnError::Recv {
                        op,
                        peer: self.peer,
                        source,
                    });
                }
            }
        }
    }

    /// Sends `bytes` whole (the write timeout bounds each write).
    fn send(&mut self, bytes: &[u8], op: &'static str) -> Result<(), ConnError> {
        self.stream.write_all(bytes).map_err(|source| {
            if is_timeout(&source) {
                self.timeout(op)
            } else {
                ConnError::Send {
                    op,
                    peer: self.peer,
                    source,
                }
            }
        })
    }

    fn timeout(&self, op: &'static str) -> ConnError {
        ConnError::Timeout {
            op,
            peer: self.peer,
            timeout: self.timeout,
        }
    }

    /// Tells the controller why the connection ends (best effort, NVMe/TCP 1.0 §3.6.2.4) and
    /// closes it.
    fn terminate(&mut self, error: &PduError, header: &[u8]) {
        if let Some((fes, fei)) = error.term_req() {
            let mut pdu = [0; TERM_REQ_MAX_PLEN];
            let len = encode_h2c_term_req(&mut pdu, fes, fei, header);
            let _ = self.stream.write_all(&pdu[..len]);
        }
        let _ = self.stream.shutdown(Shutdown::Both);
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// Drives `rx` until it reports an event other than a C2HData header, reading exactly what it
/// asks for. C2HData for command `cid` goes into `data`, of which `received` bytes have come
/// (the next C2HData must start there); data for any other command, or for a command without
/// a buffer, is refused.
fn next_event(
    link: &mut Link,
    rx: &mut RxParser,
    cid: Option<u16>,
    data: &mut [u8],
    received: &mut u32,
    deadline: Instant,
    op: &'static str,
) -> Result<RxEvent, ConnError> {
    loop {
        let step = match rx.need() {
            RxNeed::Header { buf } | RxNeed::Padding { buf } | RxNeed::DataDigest { buf } => {
                let n = link.read_some(buf, deadline, op)?;
                rx.filled(n)
            }
            RxNeed::Accept { cccid, .. } => match u32::try_from(data.len()) {
                Ok(len) if Some(cccid) == cid && len > 0 => {
                    rx.accept(len, *received).map(|()| None)
                }
                _ => Err(rx.reject()),
            },
            RxNeed::Payload {
                offset, remaining, ..
            } => {
                // `accept` checked that the payload lies within `data`.
                let start = offset as usize;
                let Some(dst) = data.get_mut(start..start + remaining as usize) else {
                    return Err(ConnError::Unexpected {
                        op,
                        peer: link.peer,
                        what: "data outside the command's buffer",
                    });
                };
                let n = link.read_some(dst, deadline, op)?;
                // `n` is at most `remaining`, a u32.
                *received += n as u32;
                rx.payload_read(&dst[..n])
            }
            RxNeed::Closed => return Err(ConnError::Broken { peer: link.peer }),
        };
        match step {
            Ok(None | Some(RxEvent::C2hData(_))) => {}
            Ok(Some(event)) => return Ok(event),
            Err(source) => {
                link.terminate(&source, rx.header_in_error());
                return Err(ConnError::Pdu {
                    op,
                    peer: link.peer,
                    source,
                });
            }
        }
    }
}

/// Opens a TCP connection to the first address of `host:port` that answers.
fn connect_tcp(
    host: &str,
    port: u16,
    timeout: Duration,
) -> Result<(TcpStream, SocketAddr), ConnError> {
    let addrs = (host, port)
        .to_socket_addrs()
        .map_err(|source| ConnError::Resolve {
            host: host.to_owned(),
            source,
        })?;
    let mut last = None;
    for addr in addrs {
        match TcpStream::connect_timeout(&addr, timeout) {
            Ok(stream) => return Ok((stream, addr)),
            Err(e) => last = Some(connect_error(addr, timeout, e)),
        }
    }
    Err(last.unwrap_or_else(|| ConnError::NoAddress {
        host: host.to_owned(),
    }))
}

fn connect_error(addr: SocketAddr, timeout: Duration, source: io::Error) -> ConnError {
    match source.kind() {
        io::ErrorKind::ConnectionRefused => ConnError::Refused { addr },
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => {
            ConnError::ConnectTimeout { addr, timeout }
        }
        io::ErrorKind::HostUnreachable | io::ErrorKind::NetworkUnreachable => {
            ConnError::NoRoute { addr, source }
        }
        _ => ConnError::Connect { addr, source },
    }
}

/// The name of a command, for error messages.
fn op_name(sqe: &Sqe, admin: bool) -> &'static str {
    if sqe.opcode() == admin_opc::FABRICS {
        // FCTYPE is byte 4, the low byte of the NSID field.
        return match (sqe.nsid() & 0xff) as u8 {
            fabrics_type::PROPERTY_GET => "Property Get",
            fabrics_type::PROPERTY_SET => "Property Set",
            fabrics_type::CONNECT => "Connect",
            _ => "Fabrics command",
        };
    }
    if admin {
        match sqe.opcode() {
            admin_opc::GET_LOG_PAGE => "Get Log Page",
            admin_opc::IDENTIFY => "Identify",
            admin_opc::ABORT => "Abort",
            admin_opc::SET_FEATURES => "Set Features",
            admin_opc::GET_FEATURES => "Get Features",
            admin_opc::KEEP_ALIVE => "Keep Alive",
            admin_opc::ASYNC_EVENT_REQUEST => "Asynchronous Event Request",
            _ => "admin command",
        }
    } else {
        match sqe.opcode() {
            io_opc::READ => "Read",
            io_opc::WRITE => "Write",
            io_opc::FLUSH => "Flush",
            io_opc::WRITE_ZEROES => "Write Zeroes",
            io_opc::DSM => "Dataset Management",
            _ => "I/O command",
        }
    }
}

/// A connection after ICResp: commands go one at a time, each bounded by the timeout.
#[derive(Debug)]
pub struct SyncConn {
    link: Link,
    rx: RxParser,
    params: IcResp,
    /// The queue connected by [`SyncConn::fabrics_connect`], once it succeeded.
    qid: Option<u16>,
    /// Never [`AER_CID`], which an Asynchronous Event Request keeps.
    next_cid: u16,
    broken: bool,
    aer: AerState,
}

impl SyncConn {
    /// Connects to `addr:port` (trying each address it resolves to; name resolution itself is
    /// not bounded by `timeout`), and initializes the connection: ICReq with HPDA 0 and one
    /// outstanding R2T, asking for `digests`, which the controller must grant.
    pub fn connect(
        addr: &str,
        port: u16,
        digests: Digests,
        timeout: Duration,
    ) -> Result<SyncConn, ConnError> {
        SyncConn::open(addr, port, digests, timeout, u32::MAX)
    }

    /// As [`SyncConn::connect`], for a connection whose C2HData PDUs carry at most `max_data`
    /// bytes each (what the parser handed on by [`SyncConn::into_parts`] accepts).
    pub(super) fn open(
        addr: &str,
        port: u16,
        digests: Digests,
        timeout: Duration,
        max_data: u32,
    ) -> Result<SyncConn, ConnError> {
        let (stream, peer) = connect_tcp(addr, port, timeout)?;
        let socket = |source| ConnError::Socket { peer, source };
        stream.set_nodelay(true).map_err(socket)?;
        stream.set_write_timeout(Some(timeout)).map_err(socket)?;
        let mut link = Link {
            stream,
            peer,
            timeout,
        };
        let icreq = IcReq {
            hpda: 0,
            digests,
            maxr2t: 0,
        };
        let mut rx = RxParser::new(&icreq, max_data);
        let deadline = Instant::now() + timeout;
        link.send(&icreq.encode(), "ICReq")?;
        let params = match next_event(&mut link, &mut rx, None, &mut [], &mut 0, deadline, "ICReq")?
        {
            RxEvent::IcResp(params) => params,
            RxEvent::C2hTermReq { fes, fei } => {
                return Err(ConnError::TermReq {
                    op: "ICReq",
                    peer,
                    fes,
                    fei,
                });
            }
            _ => {
                return Err(ConnError::Unexpected {
                    op: "ICReq",
                    peer,
                    what: "PDU instead of ICResp",
                });
            }
        };
        if params.digests != digests {
            return Err(ConnError::DigestsRefused {
                peer,
                requested: digests,
                granted: params.digests,
            });
        }
        Ok(SyncConn {
            link,
            rx,
            params,
            qid: None,
            next_cid: 0,
            broken: false,
            aer: AerState::Idle,
        })
    }

    /// The parameters the controller granted in ICResp.
    pub fn params(&self) -> &IcResp {
        &self.params
    }

    pub fn peer(&self) -> SocketAddr {
        self.link.peer
    }

    /// Fabrics Connect (Fabrics 1.1 §3.3) for queue `qid` of `sqsize + 1` entries, the
    /// 1024-byte Connect data in the capsule, as NVMe/TCP requires (NVMe/TCP 1.0 §3.3.3).
    /// A refusal is [`ConnError::ConnectRefused`], decoded.
    pub fn fabrics_connect(
        &mut self,
        qid: u16,
        sqsize: u16,
        kato_ms: u32,
        data: &ConnectData,
        sq_flow_control_disable: bool,
    ) -> Result<Cqe, ConnError> {
        let cattr = if sq_flow_control_disable {
            CATTR_DISABLE_SQ_FLOW
        } else {
            0
        };
        let mut sqe = Sqe::connect(qid, sqsize, cattr, kato_ms);
        sqe.set_sgl(Sgl::InCapsule {
            len: CONNECT_DATA_LEN as u32,
        });
        let cqe = self.exchange(sqe, "Connect", &data.encode(), &mut [])?;
        let status = cqe.status();
        if !status.is_success() {
            return Err(ConnError::ConnectRefused {
                peer: self.link.peer,
                qid,
                status,
                refusal: ConnectRefusal::from_cqe(&cqe),
            });
        }
        self.qid = Some(qid);
        Ok(cqe)
    }

    /// Runs one command without data or with data from the controller into `data_in`
    /// (a Transport SGL of its length; the controller sends C2HData). The CID is assigned
    /// here. A status other than success is [`ConnError::Status`].
    pub fn command(&mut self, mut sqe: Sqe, data_in: Option<&mut [u8]>) -> Result<Cqe, ConnError> {
        let op = op_name(&sqe, self.qid.is_none_or(|q| q == 0));
        let data = data_in.unwrap_or_default();
        let Ok(len) = u32::try_from(data.len()) else {
            return Err(ConnError::DataLength {
                op,
                len: data.len(),
            });
        };
        sqe.set_sgl(Sgl::Transport { len });
        let cqe = self.exchange(sqe, op, &[], data)?;
        let status = cqe.status();
        if !status.is_success() {
            return Err(ConnError::Status { op, status });
        }
        Ok(cqe)
    }

    /// The stream, the parser (at a PDU boundary, waiting for a header) and the ICResp
    /// parameters, for the data path. The stream is still blocking, with the last timeouts.
    pub fn into_parts(self) -> (TcpStream, RxParser, IcResp) {
        (self.link.stream, self.rx, self.params)
    }

    /// Sends `sqe` with `data_out` in the capsule and waits for its completion, marking the
    /// connection unusable on a transport fault.
    fn exchange(
        &mut self,
        mut sqe: Sqe,
        op: &'static str,
        data_out: &[u8],
        data_in: &mut [u8],
    ) -> Result<Cqe, ConnError> {
        if self.broken {
            return Err(ConnError::Broken {
                peer: self.link.peer,
            });
        }
        let cid = self.next_cid;
        self.next_cid = match self.next_cid.wrapping_add(1) {
            AER_CID => 0,
            next => next,
        };
        sqe.set_cid(cid);
        let result = self.send_capsule(&sqe, op, data_out).and_then(|()| {
            let deadline = Instant::now() + self.link.timeout;
            self.completion(cid, op, data_in, deadline)
        });
        if let Err(e) = &result
            && e.breaks_connection()
        {
            self.broken = true;
            let _ = self.link.stream.shutdown(Shutdown::Both);
        }
        result
    }

    /// One CapsuleCmd PDU: header (with digest and padding), in-capsule data, data digest.
    fn send_capsule(&mut self, sqe: &Sqe, op: &'static str, data: &[u8]) -> Result<(), ConnError> {
        let Ok(len) = u32::try_from(data.len()) else {
            return Err(ConnError::DataLength {
                op,
                len: data.len(),
            });
        };
        let mut header = [0; TX_HEADER_MAX];
        let hlen = encode_capsule_cmd(&mut header, sqe, len, &self.params);
        let mut pdu = Vec::with_capacity(hlen + data.len() + 4);
        pdu.extend_from_slice(&header[..hlen]);
        pdu.extend_from_slice(data);
        if self.params.digests.data && !data.is_empty() {
            let mut digest = DataDigest::new();
            digest.update(data);
            pdu.extend_from_slice(&digest.finish());
        }
        self.link.send(&pdu, op)
    }

    /// Waits for the completion of command `cid`: its CapsuleResp, or its last C2HData with
    /// SUCCESS (a successful completion without CapsuleResp).
    fn completion(
        &mut self,
        cid: u16,
        op: &'static str,
        data: &mut [u8],
        deadline: Instant,
    ) -> Result<Cqe, ConnError> {
        let peer = self.link.peer;
        let mut received = 0;
        loop {
            match next_event(
                &mut self.link,
                &mut self.rx,
                Some(cid),
                data,
                &mut received,
                deadline,
                op,
            )? {
                RxEvent::CapsuleResp(cqe) if cqe.cid() == cid => return Ok(cqe),
                RxEvent::CapsuleResp(cqe) if self.aer.completes(&cqe) => {
                    self.aer = AerState::Done(cqe);
                }
                RxEvent::CapsuleResp(_) => {
                    return Err(ConnError::Unexpected {
                        op,
                        peer,
                        what: "completion of another command",
                    });
                }
                RxEvent::PayloadDone { success: true, .. } => return Ok(success_cqe(cid)),
                RxEvent::PayloadDone { .. } | RxEvent::C2hData(_) => {}
                RxEvent::C2hTermReq { fes, fei } => {
                    return Err(ConnError::TermReq { op, peer, fes, fei });
                }
                RxEvent::R2t(_) => {
                    return Err(ConnError::Unexpected {
                        op,
                        peer,
                        what: "R2T (the command has no data to send)",
                    });
                }
                RxEvent::IcResp(_) => {
                    return Err(ConnError::Unexpected {
                        op,
                        peer,
                        what: "ICResp",
                    });
                }
            }
        }
    }
}

/// The completion a C2HData PDU with SUCCESS stands for: status 0, result 0.
fn success_cqe(cid: u16) -> Cqe {
    let mut raw = [0; Cqe::LEN];
    raw[12..14].copy_from_slice(&cid.to_le_bytes());
    Cqe::from_bytes(raw)
}

#[cfg(test)]
pub(super) mod tests;
