//! A minimal NVMe/TCP host for the fake target's tests, made of vubd's codec: it drives an
//! `RxParser` from a socket, sends capsules with `encode_capsule_cmd`, answers R2Ts with
//! `encode_h2c_data`, and bounds every wait.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use crate::common::TIMEOUT;
use crate::common::fake_target::{FakeTarget, Options};
use vubd::nvme::spec::{
    CNTLID_DYNAMIC, Cc, ConnectData, Cqe, Csts, HostIdentity, Nqn, Property, Sgl, Sqe, Status,
};
use vubd::nvme::tcp::pdu::{
    DataDigest, Digests, H2cData, IcReq, IcResp, PduError, RxEvent, RxNeed, RxParser,
    TX_HEADER_MAX, encode_capsule_cmd, encode_h2c_data,
};

pub const NO_DIGESTS: Digests = Digests {
    header: false,
    data: false,
};
pub const DIGESTS: Digests = Digests {
    header: true,
    data: true,
};
/// Largest data the host accepts in one C2HData.
pub const MAX_DATA: u32 = 1 << 20;

/// What the host saw next.
#[derive(Debug)]
pub enum Got {
    Event(RxEvent),
    Error(PduError),
    /// The target closed the connection, or sent C2HTermReq and the parser closed.
    Closed,
    Timeout,
}

/// Data a command sends.
#[derive(Clone, Copy, Debug)]
pub enum Out<'a> {
    None,
    InCapsule(&'a [u8]),
    /// Sent in H2CData PDUs when the target asks with R2T.
    ByR2t(&'a [u8]),
}

/// The outcome of one command.
#[derive(Debug)]
pub struct Reply {
    /// `None` when the last C2HData carried SUCCESS instead.
    pub cqe: Option<Cqe>,
    pub data: Vec<u8>,
}

impl Reply {
    pub fn status(&self) -> Status {
        self.cqe.map_or(Status::SUCCESS, |c| c.status())
    }

    #[track_caller]
    pub fn ok(self) -> Reply {
        assert!(self.status().is_success(), "command failed: {self:?}");
        self
    }
}

/// One NVMe/TCP host connection, driving an `RxParser` from a socket.
pub struct Host {
    s: TcpStream,
    rx: RxParser,
    pub params: IcResp,
    inbuf: Vec<u8>,
    pos: usize,
    /// Read commands in flight: their buffer, and how much of it has come.
    reads: HashMap<u16, (Vec<u8>, u32)>,
    writes: HashMap<u16, Vec<u8>>,
    pub next_cid: u16,
}

impl Host {
    /// Connects and exchanges ICReq / ICResp.
    pub fn open(addr: SocketAddr, digests: Digests) -> Host {
        let s = TcpStream::connect_timeout(&addr, TIMEOUT).expect("connect to the target");
        s.set_nodelay(true).expect("TCP_NODELAY");
        let icreq = IcReq {
            hpda: 0,
            digests,
            maxr2t: 0,
        };
        let mut h = Host {
            s,
            rx: RxParser::new(&icreq, MAX_DATA),
            params: IcResp {
                pfv: 0,
                cpda: 0,
                digests,
                maxh2cdata: 0,
            },
            inbuf: Vec::new(),
            pos: 0,
            reads: HashMap::new(),
            writes: HashMap::new(),
            next_cid: 1,
        };
        h.send(&icreq.encode());
        match h.next(TIMEOUT) {
            Got::Event(RxEvent::IcResp(p)) => h.params = p,
            other => panic!("ICResp expected, got {other:?}"),
        }
        h
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).expect("send to the target");
    }

    pub fn send_capsule(&mut self, sqe: &Sqe, data: &[u8]) {
        let mut hdr = [0; TX_HEADER_MAX];
        let n = encode_capsule_cmd(&mut hdr, sqe, data.len() as u32, &self.params);
        let mut pdu = hdr[..n].to_vec();
        pdu.extend_from_slice(data);
        if self.params.digests.data && !data.is_empty() {
            let mut d = DataDigest::new();
            d.update(data);
            pdu.extend_from_slice(&d.finish());
        }
        self.send(&pdu);
    }

    /// Sends the H2CData PDUs an R2T asks for, at most MAXH2CDATA each.
    pub fn answer_r2t(&mut self, cccid: u16, ttag: u16, r2to: u32, r2tl: u32) {
        let data = self.writes.get(&cccid).expect("R2T for a write").clone();
        let mut off = r2to;
        let end = r2to + r2tl;
        while off < end {
            let n = (end - off).min(self.params.maxh2cdata);
            let pdu = H2cData {
                cccid,
                ttag,
                datao: off,
                datal: n,
                last: off + n == end,
            };
            let mut hdr = [0; TX_HEADER_MAX];
            let h = encode_h2c_data(&mut hdr, &pdu, &self.params);
            let chunk = &data[off as usize..(off + n) as usize];
            let mut bytes = hdr[..h].to_vec();
            bytes.extend_from_slice(chunk);
            if self.params.digests.data {
                let mut d = DataDigest::new();
                d.update(chunk);
                bytes.extend_from_slice(&d.finish());
            }
            self.send(&bytes);
            off += n;
        }
    }

    /// The next event, error or end of stream, waiting at most `wait`.
    pub fn next(&mut self, wait: Duration) -> Got {
        enum Need {
            Bytes,
            Accept(u16),
            Payload(u16, u32, u32),
            Closed,
        }
        let deadline = Instant::now() + wait;
        loop {
            let need = match self.rx.need() {
                RxNeed::Header { .. } | RxNeed::Padding { .. } | RxNeed::DataDigest { .. } => {
                    Need::Bytes
                }
                RxNeed::Accept { cccid, .. } => Need::Accept(cccid),
                RxNeed::Payload {
                    cccid,
                    offset,
                    remaining,
                } => Need::Payload(cccid, offset, remaining),
                RxNeed::Closed => Need::Closed,
            };
            let avail = self.inbuf.len() - self.pos;
            let outcome = match need {
                Need::Closed => return Got::Closed,
                Need::Accept(cccid) => match self.reads.get(&cccid) {
                    Some((buf, got)) => self.rx.accept(buf.len() as u32, *got).map(|()| None),
                    None => Err(self.rx.reject()),
                },
                Need::Bytes if avail > 0 => {
                    let (n, r) = self.rx.feed(&self.inbuf[self.pos..]);
                    self.pos += n;
                    r
                }
                Need::Payload(cccid, offset, remaining) if avail > 0 => {
                    let n = (remaining as usize).min(avail);
                    let data = &self.inbuf[self.pos..self.pos + n];
                    let (buf, got) = self.reads.get_mut(&cccid).expect("accepted command");
                    *got += n as u32;
                    buf[offset as usize..offset as usize + n].copy_from_slice(data);
                    self.pos += n;
                    self.rx.payload_read(data)
                }
                Need::Bytes | Need::Payload(..) => {
                    if let Some(got) = self.fill(deadline) {
                        return got;
                    }
                    continue;
                }
            };
            match outcome {
                Ok(Some(e)) => return Got::Event(e),
                Ok(None) => {}
                Err(e) => return Got::Error(e),
            }
        }
    }

    /// Reads more bytes; `Some` if the wait ended without any.
    pub fn fill(&mut self, deadline: Instant) -> Option<Got> {
        self.inbuf.drain(..self.pos);
        self.pos = 0;
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Some(Got::Timeout);
        }
        self.s.set_read_timeout(Some(left)).expect("read timeout");
        let mut chunk = vec![0; 256 * 1024];
        match self.s.read(&mut chunk) {
            Ok(0) => Some(Got::Closed),
            Ok(n) => {
                self.inbuf.extend_from_slice(&chunk[..n]);
                None
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                Some(Got::Timeout)
            }
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => Some(Got::Closed),
            Err(e) => panic!("read from the target: {e}"),
        }
    }

    /// Sends a command with a fresh CID and its data pointer set; returns the CID.
    pub fn submit(&mut self, mut sqe: Sqe, out: Out<'_>, read_len: usize) -> u16 {
        let cid = self.next_cid;
        self.next_cid = self.next_cid.wrapping_add(1).max(1);
        sqe.set_cid(cid);
        let (sgl, inline) = match out {
            Out::None => (
                Sgl::Transport {
                    len: read_len as u32,
                },
                &[][..],
            ),
            Out::InCapsule(d) => (
                Sgl::InCapsule {
                    len: d.len() as u32,
                },
                d,
            ),
            Out::ByR2t(d) => {
                self.writes.insert(cid, d.to_vec());
                (
                    Sgl::Transport {
                        len: d.len() as u32,
                    },
                    &[][..],
                )
            }
        };
        sqe.set_sgl(sgl);
        if read_len > 0 {
            self.reads.insert(cid, (vec![0; read_len], 0));
        }
        self.send_capsule(&sqe, inline);
        cid
    }

    /// Waits for the end of command `cid`, answering R2Ts on the way.
    #[track_caller]
    pub fn wait(&mut self, cid: u16) -> Reply {
        loop {
            match self.next(TIMEOUT) {
                Got::Event(RxEvent::CapsuleResp(cqe)) if cqe.cid() == cid => {
                    self.writes.remove(&cid);
                    let data = self.reads.remove(&cid).map(|(d, _)| d).unwrap_or_default();
                    return Reply {
                        cqe: Some(cqe),
                        data,
                    };
                }
                Got::Event(RxEvent::PayloadDone {
                    cccid,
                    success: true,
                    ..
                }) if cccid == cid => {
                    let data = self.reads.remove(&cid).map(|(d, _)| d).unwrap_or_default();
                    return Reply { cqe: None, data };
                }
                Got::Event(RxEvent::R2t(r)) => {
                    let len = self.writes.get(&r.cccid).map_or(0, Vec::len) as u32;
                    r.check_range(len).expect("R2T within the write");
                    self.answer_r2t(r.cccid, r.ttag, r.r2to, r.r2tl);
                }
                Got::Event(RxEvent::C2hData(_) | RxEvent::PayloadDone { .. }) => {}
                other => panic!("command {cid}: unexpected {other:?}"),
            }
        }
    }

    #[track_caller]
    pub fn exec(&mut self, sqe: Sqe, out: Out<'_>, read_len: usize) -> Reply {
        let cid = self.submit(sqe, out, read_len);
        self.wait(cid)
    }

    /// Fabrics Connect; returns the completion.
    pub fn connect(&mut self, qid: u16, cntlid: u16, subnqn: &str, host: &HostIdentity) -> Reply {
        self.connect_with(qid, cntlid, subnqn, host, 0, 0)
    }

    pub fn connect_with(
        &mut self,
        qid: u16,
        cntlid: u16,
        subnqn: &str,
        host: &HostIdentity,
        cattr: u8,
        kato_ms: u32,
    ) -> Reply {
        let subnqn = Nqn::new(subnqn).expect("valid NQN");
        let data = ConnectData {
            hostid: &host.id,
            cntlid,
            subnqn: &subnqn,
            hostnqn: &host.nqn,
        }
        .encode();
        self.exec(
            Sqe::connect(qid, 31, cattr, kato_ms),
            Out::InCapsule(&data),
            0,
        )
    }

    pub fn property(&mut self, p: Property) -> u64 {
        let r = self.exec(Sqe::property_get(p), Out::None, 0).ok();
        r.cqe.expect("property value").property_value()
    }

    /// CC.EN = 1, then CSTS.RDY.
    pub fn enable(&mut self) {
        self.exec(
            Sqe::property_set(Property::Cc, Cc::enabled(0).0.into()),
            Out::None,
            0,
        )
        .ok();
        assert!(Csts(self.property(Property::Csts) as u32).rdy());
    }
}

/// An enabled admin queue and its controller ID.
pub fn admin_queue(t: &FakeTarget, digests: Digests, host: &HostIdentity) -> (Host, u16) {
    let mut h = Host::open(t.addr(), digests);
    let r = h.connect(0, CNTLID_DYNAMIC, t.nqn(), host).ok();
    h.enable();
    (h, r.cqe.expect("connect completion").dw0() as u16)
}

pub fn io_queue(t: &FakeTarget, digests: Digests, host: &HostIdentity, cntlid: u16) -> Host {
    let mut h = Host::open(t.addr(), digests);
    h.connect(1, cntlid, t.nqn(), host).ok();
    h
}

pub fn start(opts: Options) -> FakeTarget {
    FakeTarget::start(opts).expect("start the fake target")
}

/// A target, an enabled controller and one I/O queue.
pub fn io_setup(opts: Options, digests: Digests) -> (FakeTarget, Host, Host) {
    let t = start(opts);
    let host = HostIdentity::generate();
    let (admin, cntlid) = admin_queue(&t, digests, &host);
    let io = io_queue(&t, digests, &host, cntlid);
    (t, admin, io)
}
