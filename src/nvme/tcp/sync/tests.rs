//! A scripted controller on a local socket: one thread, hand-built controller PDUs.

use std::net::TcpListener;
use std::thread::{self, JoinHandle};

use uuid::Uuid;

use super::*;
use crate::nvme::spec::{Cns, Nqn, Property};
use crate::nvme::tcp::pdu::header_digest;

const TIMEOUT: Duration = Duration::from_secs(5);

/// The controller's end of a connection.
pub(in crate::nvme::tcp) struct Peer {
    stream: TcpStream,
    digests: Digests,
}

impl Peer {
    /// Reads the ICReq, checks it and answers with `granted` digests.
    fn accept(listener: &TcpListener, granted: Digests) -> Peer {
        let (mut stream, _) = listener.accept().expect("accept");
        stream.set_read_timeout(Some(TIMEOUT)).expect("timeout");
        let mut icreq = [0; 128];
        stream.read_exact(&mut icreq).expect("ICReq");
        assert_eq!(
            (icreq[0], icreq[2], icreq[10]),
            (0, 128, 0),
            "ICReq type, HLEN, HPDA"
        );
        assert_eq!(&icreq[12..16], &[0; 4], "MAXR2T 0: one R2T outstanding");
        let mut icresp = [0; 128];
        icresp[0] = 1;
        icresp[2] = 128;
        icresp[4..8].copy_from_slice(&128u32.to_le_bytes());
        icresp[11] = u8::from(granted.header) | (u8::from(granted.data) << 1);
        icresp[12..16].copy_from_slice(&131_072u32.to_le_bytes());
        stream.write_all(&icresp).expect("ICResp");
        Peer {
            stream,
            digests: granted,
        }
    }

    /// Reads a CapsuleCmd, checking its digests; returns the SQE and the in-capsule data.
    pub(in crate::nvme::tcp) fn capsule(&mut self) -> ([u8; 64], Vec<u8>) {
        self.next_capsule().expect("a capsule, not EOF")
    }

    /// The next CapsuleCmd, `None` if the host closed the connection instead.
    pub(in crate::nvme::tcp) fn next_capsule(&mut self) -> Option<([u8; 64], Vec<u8>)> {
        let mut ch = [0; 8];
        match self.stream.read(&mut ch[..1]) {
            Ok(0) | Err(_) => return None,
            Ok(_) => {}
        }
        self.stream
            .read_exact(&mut ch[1..])
            .expect("capsule header");
        assert_eq!((ch[0], ch[2]), (4, 72), "CapsuleCmd type and HLEN");
        let plen = u32::from_le_bytes(ch[4..8].try_into().expect("4 bytes")) as usize;
        let mut rest = vec![0; plen - 8];
        self.stream.read_exact(&mut rest).expect("capsule");
        let mut header = ch.to_vec();
        header.extend_from_slice(&rest[..64]);
        let mut sqe = [0; 64];
        sqe.copy_from_slice(&rest[..64]);
        let mut at = 64;
        if self.digests.header {
            assert_eq!(rest[at..at + 4], header_digest(&header), "header digest");
            at += 4;
        }
        let pdo = usize::from(ch[3]);
        if pdo == 0 {
            assert_eq!(at, rest.len(), "no data without PDO");
            return Some((sqe, Vec::new()));
        }
        let end = if self.digests.data {
            rest.len() - 4
        } else {
            rest.len()
        };
        let data = rest[pdo - 8..end].to_vec();
        if self.digests.data {
            let mut d = DataDigest::new();
            d.update(&data);
            assert_eq!(rest[end..], d.finish(), "data digest");
        }
        Some((sqe, data))
    }

    fn send_header(&mut self, mut header: Vec<u8>, data: &[u8]) {
        if self.digests.header {
            let d = header_digest(&header);
            header.extend_from_slice(&d);
        }
        header.extend_from_slice(data);
        if self.digests.data && !data.is_empty() {
            let mut d = DataDigest::new();
            d.update(data);
            header.extend_from_slice(&d.finish());
        }
        self.stream.write_all(&header).expect("send PDU");
    }

    fn hdgst_flag(&self) -> u8 {
        u8::from(self.digests.header)
    }

    /// A CapsuleResp: `result` in DW0 and DW1, `status` as SCT << 8 | SC.
    pub(in crate::nvme::tcp) fn resp(&mut self, cid: u16, status: u16, result: u64) {
        let mut h = vec![5, self.hdgst_flag(), 24, 0];
        let plen: u32 = 24 + if self.digests.header { 4 } else { 0 };
        h.extend_from_slice(&plen.to_le_bytes());
        h.extend_from_slice(&result.to_le_bytes());
        // SQHD, SQID.
        h.extend_from_slice(&[0; 4]);
        h.extend_from_slice(&cid.to_le_bytes());
        h.extend_from_slice(&(status << 1).to_le_bytes());
        self.send_header(h, &[]);
    }

    pub(in crate::nvme::tcp) fn c2h(
        &mut self,
        cid: u16,
        datao: u32,
        data: &[u8],
        last: bool,
        success: bool,
    ) {
        let hd = if self.digests.header { 4 } else { 0 };
        let dd = if self.digests.data { 4 } else { 0 };
        let flags = self.hdgst_flag()
            | if self.digests.data { 2 } else { 0 }
            | if last { 4 } else { 0 }
            | if success { 8 } else { 0 };
        let pdo = 24 + hd;
        let mut h = vec![7, flags, 24, pdo as u8];
        h.extend_from_slice(&((pdo + data.len() + dd) as u32).to_le_bytes());
        h.extend_from_slice(&cid.to_le_bytes());
        h.extend_from_slice(&[0; 2]);
        h.extend_from_slice(&datao.to_le_bytes());
        h.extend_from_slice(&(data.len() as u32).to_le_bytes());
        h.extend_from_slice(&[0; 4]);
        self.send_header(h, data);
    }

    fn term_req(&mut self, fes: u16) {
        let mut h = vec![3, 0, 24, 0];
        h.extend_from_slice(&24u32.to_le_bytes());
        h.extend_from_slice(&fes.to_le_bytes());
        h.extend_from_slice(&[0; 14]);
        self.stream.write_all(&h).expect("C2HTermReq");
    }
}

pub(in crate::nvme::tcp) fn cid_of(sqe: &[u8; 64]) -> u16 {
    u16::from_le_bytes([sqe[2], sqe[3]])
}

/// A controller running `script` on the first connection to a fresh local port.
pub(in crate::nvme::tcp) fn controller<T: Send + 'static>(
    granted: Digests,
    script: impl FnOnce(Peer) -> T + Send + 'static,
) -> (u16, JoinHandle<T>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let handle = thread::spawn(move || script(Peer::accept(&listener, granted)));
    (port, handle)
}

fn connect(port: u16, digests: Digests) -> Result<SyncConn, ConnError> {
    SyncConn::connect("127.0.0.1", port, digests, Duration::from_millis(500))
}

const BOTH: Digests = Digests {
    header: true,
    data: true,
};

#[test]
fn data_arrives_in_place_and_success_flag_completes_the_command() {
    for digests in [Digests::default(), BOTH] {
        let (port, server) = controller(digests, |mut p| {
            let (sqe, data) = p.capsule();
            assert_eq!(
                (sqe[0], data.len()),
                (0x06, 0),
                "Identify without in-capsule data"
            );
            assert_eq!(sqe[1] & 0xc0, 0x40, "PSDT: SGL");
            assert_eq!(sqe[39], 0x5a, "Transport SGL data block");
            assert_eq!(&sqe[32..36], &4096u32.to_le_bytes(), "SGL length");
            let page: Vec<u8> = (0..4096u32).map(|i| i as u8).collect();
            p.c2h(cid_of(&sqe), 0, &page[..1000], false, false);
            p.c2h(cid_of(&sqe), 1000, &page[1000..], true, true);
            let (sqe, _) = p.capsule();
            assert_eq!(sqe[0], 0x18, "Keep Alive");
            p.resp(cid_of(&sqe), 0, 7);
        });
        let mut conn = connect(port, digests).expect("connect");
        assert_eq!(conn.params().digests, digests);
        let mut buf = vec![0; 4096];
        let cqe = conn
            .command(Sqe::identify(Cns::Controller, 0), Some(&mut buf))
            .expect("identify");
        assert!(cqe.status().is_success());
        assert!(buf.iter().enumerate().all(|(i, &b)| b == i as u8));
        let cqe = conn.command(Sqe::keep_alive(), None).expect("keep alive");
        assert_eq!(cqe.dw0(), 7);
        server.join().expect("controller");
        let (_, mut rx, params) = conn.into_parts();
        assert_eq!(params.digests, digests);
        let header = 24 + if digests.header { 4 } else { 0 };
        assert!(
            matches!(rx.need(), RxNeed::Header { buf } if buf.len() == header),
            "parser waits for a whole header"
        );
    }
}

#[test]
fn connect_sends_data_in_capsule_and_decodes_a_refusal() {
    let subnqn = Nqn::new("nqn.2014-08.org.example:sub").expect("nqn");
    let hostnqn = Nqn::new("nqn.2014-08.org.example:host").expect("nqn");
    let (port, server) = controller(BOTH, |mut p| {
        let (sqe, data) = p.capsule();
        assert_eq!((sqe[0], sqe[4]), (0x7f, 0x01), "Fabrics Connect");
        assert_eq!(sqe[39], 0x01, "in-capsule data block (offset)");
        assert_eq!(&sqe[42..44], &3u16.to_le_bytes(), "QID");
        assert_eq!(&sqe[44..46], &31u16.to_le_bytes(), "SQSIZE");
        assert_eq!(sqe[46], 1 << 2, "CATTR: SQ flow control disabled");
        assert_eq!(data.len(), 1024);
        assert!(data[256..].starts_with(b"nqn.2014-08.org.example:sub\0"));
        // Invalid parameters, IATTR 1 (data), IPO 256: SUBNQN.
        p.resp(cid_of(&sqe), (1 << 8) | 0x82, (1 << 16) | 256);
        let (sqe, _) = p.capsule();
        p.resp(cid_of(&sqe), 0, 0);
    });
    let mut conn = connect(port, BOTH).expect("connect");
    let id = Uuid::new_v4();
    let data = ConnectData {
        hostid: &id,
        cntlid: 5,
        subnqn: &subnqn,
        hostnqn: &hostnqn,
    };
    let e = conn
        .fabrics_connect(3, 31, 0, &data, true)
        .expect_err("refused");
    assert!(
        matches!(
            e,
            ConnError::ConnectRefused {
                qid: 3,
                refusal: ConnectRefusal::SubsystemNotFound,
                ..
            }
        ),
        "{e:?}"
    );
    assert!(
        e.to_string()
            .ends_with("refused to connect queue 3: subsystem NQN not found")
    );
    assert!(!e.is_retryable());
    // A refusal is a completion: the connection is still usable.
    conn.command(Sqe::property_get(Property::Cap), None)
        .expect("next command");
    server.join().expect("controller");
}

#[test]
fn connect_refusals_are_named() {
    let cqe = |sct: u16, sc: u16, dw0: u32| {
        let mut raw = [0; 16];
        raw[0..4].copy_from_slice(&dw0.to_le_bytes());
        raw[14..16].copy_from_slice(&(((sct << 8) | sc) << 1).to_le_bytes());
        ConnectRefusal::from_cqe(&Cqe::from_bytes(raw))
    };
    assert_eq!(cqe(1, 0x84, 0), ConnectRefusal::HostNotAllowed);
    assert_eq!(
        cqe(1, 0x84, 0).to_string(),
        "the target does not allow this host NQN"
    );
    assert_eq!(
        cqe(1, 0x82, (1 << 16) | 256),
        ConnectRefusal::SubsystemNotFound
    );
    assert_eq!(
        cqe(1, 0x82, (1 << 16) | 16),
        ConnectRefusal::ControllerNotFound
    );
    assert_eq!(
        cqe(1, 0x82, 44).to_string(),
        "invalid parameter at byte 44 of the connect command (SQSIZE)"
    );
    assert_eq!(cqe(1, 0x81, 0).to_string(), "connect: controller busy");
}

#[test]
fn completion_of_another_command_breaks_the_connection() {
    let (port, server) = controller(Digests::default(), |mut p| {
        let (sqe, _) = p.capsule();
        p.resp(cid_of(&sqe).wrapping_add(1), 0, 0);
    });
    let mut conn = connect(port, Digests::default()).expect("connect");
    let e = conn
        .command(Sqe::keep_alive(), None)
        .expect_err("wrong CID");
    assert!(matches!(e, ConnError::Unexpected { .. }), "{e:?}");
    assert!(e.is_retryable());
    let e = conn.command(Sqe::keep_alive(), None).expect_err("broken");
    assert!(matches!(e, ConnError::Broken { .. }), "{e:?}");
    server.join().expect("controller");
}

#[test]
fn data_for_a_command_without_buffer_is_a_protocol_error() {
    let (port, server) = controller(Digests::default(), |mut p| {
        let (sqe, _) = p.capsule();
        p.c2h(cid_of(&sqe), 0, &[0; 512], true, true);
        // The host reports the error before it closes.
        let mut term = [0; 24];
        p.stream.read_exact(&mut term).expect("H2CTermReq");
        assert_eq!(term[0], 0x02, "H2CTermReq");
    });
    let mut conn = connect(port, Digests::default()).expect("connect");
    let e = conn
        .command(Sqe::keep_alive(), None)
        .expect_err("unasked data");
    assert!(
        matches!(
            e,
            ConnError::Pdu {
                source: PduError::UnknownCommand { .. },
                ..
            }
        ),
        "{e:?}"
    );
    server.join().expect("controller");
}

#[test]
fn silence_eof_and_term_req_end_the_wait() {
    let (port, server) = controller(Digests::default(), |mut p| {
        let _ = p.capsule();
        // Silence: the host times out and closes.
        let mut rest = [0; 1];
        let _ = p.stream.read(&mut rest);
    });
    let mut conn = connect(port, Digests::default()).expect("connect");
    let start = Instant::now();
    let e = conn.command(Sqe::keep_alive(), None).expect_err("silence");
    assert!(
        matches!(
            e,
            ConnError::Timeout {
                op: "Keep Alive",
                ..
            }
        ),
        "{e:?}"
    );
    assert!((Duration::from_millis(450)..Duration::from_secs(3)).contains(&start.elapsed()));
    server.join().expect("controller");

    let (port, server) = controller(Digests::default(), |mut p| {
        let _ = p.capsule();
    });
    let mut conn = connect(port, Digests::default()).expect("connect");
    let e = conn.command(Sqe::keep_alive(), None).expect_err("EOF");
    assert!(matches!(e, ConnError::Eof { .. }), "{e:?}");
    server.join().expect("controller");

    let (port, server) = controller(Digests::default(), |mut p| {
        let _ = p.capsule();
        p.term_req(0x03);
    });
    let mut conn = connect(port, Digests::default()).expect("connect");
    let e = conn
        .command(Sqe::keep_alive(), None)
        .expect_err("terminated");
    assert!(matches!(e, ConnError::TermReq { fes: 3, .. }), "{e:?}");
    assert!(e.to_string().contains("header digest error"), "{e}");
    server.join().expect("controller");
}

#[test]
fn digests_must_be_granted_as_asked() {
    let (port, server) = controller(Digests::default(), |_| {});
    let e = connect(port, BOTH).expect_err("digests refused");
    assert!(matches!(e, ConnError::DigestsRefused { .. }), "{e:?}");
    assert!(!e.is_retryable());
    server.join().expect("controller");
}

#[test]
fn closed_port_is_connection_refused() {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    drop(listener);
    let e = connect(port, Digests::default()).expect_err("refused");
    assert!(matches!(e, ConnError::Refused { .. }), "{e:?}");
    assert_eq!(
        e.to_string(),
        format!("connection refused by 127.0.0.1:{port}")
    );
    assert!(e.is_retryable());
}

#[test]
fn unresolvable_host_is_reported() {
    let e = SyncConn::connect("no-such-host.invalid", 4420, Digests::default(), TIMEOUT)
        .expect_err("no such host");
    assert!(matches!(e, ConnError::Resolve { .. }), "{e:?}");
}

/// Reads capsules until `n` arrived; their SQEs.
fn capsules(p: &mut Peer, n: usize) -> Vec<[u8; 64]> {
    (0..n).map(|_| p.capsule().0).collect()
}

/// Polls `conn` for the asynchronous event, up to the test timeout.
fn wait_async_event(conn: &mut SyncConn) -> Result<Cqe, ConnError> {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        if let Some(cqe) = conn.async_event()? {
            return Ok(cqe);
        }
        assert!(Instant::now() < deadline, "no asynchronous event");
        thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn an_async_event_is_kept_apart_from_the_commands_around_it() {
    let (port, server) = controller(Digests::default(), |mut p| {
        let [aer, ka] = capsules(&mut p, 2).try_into().expect("two capsules");
        assert_eq!((aer[0], cid_of(&aer)), (0x0c, 0xffff), "AER, its own CID");
        assert_eq!(ka[0], 0x18, "Keep Alive");
        // The event comes first, while the host waits for the Keep Alive.
        p.resp(0xffff, 0, 0x0004_0002);
        p.resp(cid_of(&ka), 0, 0);
        let (aer, _) = p.capsule();
        assert_eq!(cid_of(&aer), 0xffff, "re-armed");
        // Now while nothing else runs.
        p.resp(0xffff, 0, 0x0004_0002);
        let (ka, _) = p.capsule();
        p.resp(cid_of(&ka), 0, 0);
    });
    let mut conn = connect(port, Digests::default()).expect("connect");
    assert!(!conn.async_event_pending());
    conn.request_async_event().expect("AER");
    conn.request_async_event()
        .expect("a second one is not sent");
    assert!(conn.async_event_pending());
    assert!(conn.async_event().expect("nothing yet").is_none());
    conn.command(Sqe::keep_alive(), None).expect("keep alive");
    let cqe = conn.async_event().expect("kept").expect("the event");
    assert_eq!((cqe.cid(), cqe.dw0()), (0xffff, 0x0004_0002));
    assert!(!conn.async_event_pending());
    assert!(conn.async_event().expect("taken").is_none());
    conn.request_async_event().expect("AER again");
    let cqe = wait_async_event(&mut conn).expect("the second event");
    assert_eq!(cqe.dw0(), 0x0004_0002);
    conn.command(Sqe::keep_alive(), None)
        .expect("the connection goes on");
    server.join().expect("controller");
}

#[test]
fn no_command_takes_the_async_event_cid() {
    let (port, server) = controller(Digests::default(), |mut p| {
        let mut cids = Vec::new();
        for _ in 0..3 {
            let (sqe, _) = p.capsule();
            cids.push(cid_of(&sqe));
            p.resp(cid_of(&sqe), 0, 0);
        }
        cids
    });
    let mut conn = connect(port, Digests::default()).expect("connect");
    conn.next_cid = 0xfffe;
    for _ in 0..3 {
        conn.command(Sqe::keep_alive(), None).expect("keep alive");
    }
    assert_eq!(server.join().expect("controller"), [0xfffe, 0, 1]);
}

#[test]
fn anything_but_the_async_event_while_idle_breaks_the_connection() {
    // A completion nobody waits for.
    let (port, server) = controller(Digests::default(), |mut p| {
        let _ = p.capsule();
        p.resp(7, 0, 0);
        let mut rest = [0; 1];
        let _ = p.stream.read(&mut rest);
    });
    let mut conn = connect(port, Digests::default()).expect("connect");
    conn.request_async_event().expect("AER");
    let e = wait_async_event(&mut conn).expect_err("a stray completion");
    assert!(matches!(e, ConnError::Unexpected { .. }), "{e:?}");
    let e = conn.async_event().expect_err("broken");
    assert!(matches!(e, ConnError::Broken { .. }), "{e:?}");
    server.join().expect("controller");

    // The controller goes away: seen at once, not at the next command.
    let (port, server) = controller(Digests::default(), |mut p| {
        let _ = p.capsule();
    });
    let mut conn = connect(port, Digests::default()).expect("connect");
    conn.request_async_event().expect("AER");
    server.join().expect("controller");
    let e = wait_async_event(&mut conn).expect_err("EOF");
    assert!(matches!(e, ConnError::Eof { .. }), "{e:?}");
}
