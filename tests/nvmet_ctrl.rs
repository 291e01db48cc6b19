//! The NVMe/TCP control path against the Linux kernel target ([`common::nvmet::NvmetTarget`]):
//! controller bring-up, I/O queue connections (with and without digests) carrying a real write
//! and read, discovery, keep alive, a stalled target, shutdown, and the errors a user meets:
//! unknown subsystem, missing namespace, refused host, closed port.
//!
//! Two guests in all: one serves every step of the main test; the other, restricted to one
//! host NQN, runs in parallel in its own test. Where the lab cannot start, the tests fail and
//! say why, never skip.

mod common;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener};
use std::thread;
use std::time::{Duration, Instant};

use common::TIMEOUT;
use common::nvmet::{NvmetOptions, NvmetTarget};
use vubd::nvme::spec::{HostIdentity, Nqn, Sgl, Sqe, Status};
use vubd::nvme::tcp::ctrl::{
    Controller, CtrlError, CtrlOptions, IoQueueConn, TargetAddr, discover,
};
use vubd::nvme::tcp::host::HostId;
use vubd::nvme::tcp::pdu::{
    DataDigest, Digests, RxEvent, RxNeed, TX_HEADER_MAX, encode_capsule_cmd,
};
use vubd::nvme::tcp::sync::ConnError;

const BLOCK: usize = 4096;
const NS_MIB: u64 = 16;

fn addr_of(target: &NvmetTarget) -> TargetAddr {
    TargetAddr {
        host: "127.0.0.1".to_owned(),
        port: target.port(),
    }
}

fn nqn(s: &str) -> Nqn {
    Nqn::new(s).unwrap_or_else(|e| panic!("{s}: {e}"))
}

fn options(digests: Digests) -> CtrlOptions {
    CtrlOptions {
        digests,
        // Longer than the test: no keep alive is needed between the steps.
        kato: Duration::from_secs(60),
        io_timeout: TIMEOUT,
    }
}

fn pattern(seed: u8) -> Vec<u8> {
    (0..BLOCK)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// Blocking I/O on an established queue connection, one command at a time: just enough of a
/// data path to check what the control path hands over.
struct BlockingQueue {
    conn: IoQueueConn,
    next_cid: u16,
}

/// How a command ended.
#[derive(Debug, PartialEq, Eq)]
enum Ending {
    /// A CapsuleResp with this status.
    Capsule(Status),
    /// The last C2HData carried SUCCESS: no CapsuleResp.
    SuccessFlag,
}

impl BlockingQueue {
    fn new(conn: IoQueueConn) -> Self {
        conn.stream
            .set_nonblocking(false)
            .and_then(|()| conn.stream.set_read_timeout(Some(TIMEOUT)))
            .expect("blocking stream");
        Self { conn, next_cid: 0 }
    }

    /// Sends `sqe` with `data` in the capsule: header, data, data digest.
    fn send(&mut self, mut sqe: Sqe, data: &[u8], sgl: Sgl) -> u16 {
        let cid = self.next_cid;
        self.next_cid += 1;
        sqe.set_cid(cid);
        sqe.set_sgl(sgl);
        let mut header = [0; TX_HEADER_MAX];
        let len = u32::try_from(data.len()).expect("small data");
        let n = encode_capsule_cmd(&mut header, &sqe, len, &self.conn.params);
        self.conn
            .stream
            .write_all(&header[..n])
            .expect("send header");
        if !data.is_empty() {
            self.conn.stream.write_all(data).expect("send data");
            if self.conn.params.digests.data {
                let mut d = DataDigest::new();
                d.update(data);
                self.conn
                    .stream
                    .write_all(&d.finish())
                    .expect("send digest");
            }
        }
        cid
    }

    /// Reads PDUs until command `cid` completes, C2HData going into `buf`.
    fn complete(&mut self, cid: u16, buf: &mut [u8]) -> Ending {
        let conn = &mut self.conn;
        let mut received = 0;
        loop {
            let event = match conn.rx.need() {
                RxNeed::Header { buf: b }
                | RxNeed::Padding { buf: b }
                | RxNeed::DataDigest { buf: b } => {
                    let n = conn.stream.read(b).expect("read PDU");
                    assert!(n > 0, "target closed the I/O queue");
                    conn.rx.filled(n).expect("valid PDU")
                }
                RxNeed::Accept { cccid, .. } => {
                    assert_eq!(cccid, cid, "data for the command in flight");
                    let len = u32::try_from(buf.len()).expect("small buffer");
                    conn.rx
                        .accept(len, received)
                        .expect("data within the buffer, in order");
                    None
                }
                RxNeed::Payload {
                    offset, remaining, ..
                } => {
                    let start = offset as usize;
                    let dst = &mut buf[start..start + remaining as usize];
                    let n = conn.stream.read(dst).expect("read payload");
                    assert!(n > 0, "target closed the I/O queue");
                    received += n as u32;
                    conn.rx.payload_read(&dst[..n]).expect("valid payload")
                }
                RxNeed::Closed => panic!("I/O queue closed"),
            };
            match event {
                Some(RxEvent::CapsuleResp(cqe)) => {
                    assert_eq!(cqe.cid(), cid);
                    return Ending::Capsule(cqe.status());
                }
                Some(RxEvent::PayloadDone { success: true, .. }) => return Ending::SuccessFlag,
                None | Some(RxEvent::C2hData(_) | RxEvent::PayloadDone { .. }) => {}
                Some(other) => panic!("unexpected {other:?}"),
            }
        }
    }

    /// Writes one block at `lba`, in the capsule.
    fn write(&mut self, nsid: u32, lba: u64, data: &[u8]) -> Ending {
        let len = u32::try_from(data.len()).expect("one block");
        let cid = self.send(
            Sqe::write(nsid, lba, 0, false),
            data,
            Sgl::InCapsule { len },
        );
        self.complete(cid, &mut [])
    }

    /// Reads one block at `lba`.
    fn read(&mut self, nsid: u32, lba: u64) -> (Ending, Vec<u8>) {
        let mut buf = vec![0; BLOCK];
        let len = u32::try_from(BLOCK).expect("one block");
        let cid = self.send(Sqe::read(nsid, lba, 0, false), &[], Sgl::Transport { len });
        let ending = self.complete(cid, &mut buf);
        (ending, buf)
    }
}

const BOTH: Digests = Digests {
    header: true,
    data: true,
};

#[test]
fn controller_queues_discovery_and_errors_against_the_kernel_target() {
    let started = Instant::now();
    let options_nvmet = NvmetOptions {
        namespaces: 2,
        ns_size_mib: NS_MIB,
        block_size: 4096,
        ..NvmetOptions::default()
    };
    let mut target = NvmetTarget::start(&options_nvmet);
    eprintln!(
        "nvmet target ready in {:.1} s: {}",
        target.boot_time().as_secs_f64(),
        target.ready_line()
    );
    let addr = addr_of(&target);
    let subnqn = nqn(target.nqn());
    let host: HostId = HostIdentity::generate().into();

    // Bring-up.
    let t = Instant::now();
    let mut ctrl = Controller::connect(&addr, &subnqn, &host, &options(Digests::default()), 4, 1)
        .expect("controller");
    eprintln!(
        "controller {} up in {} ms: {} {} fw {}, MDTS {} (max transfer {:?}), IOCCSZ {} \
         (in-capsule {} B), MAXCMD {}, CAP.MQES+1 {}, queues granted {}, max depth {}",
        ctrl.cntlid(),
        t.elapsed().as_millis(),
        ctrl.identify().mn,
        ctrl.identify().sn,
        ctrl.identify().fr,
        ctrl.identify().mdts,
        ctrl.max_transfer_bytes(),
        ctrl.identify().ioccsz,
        ctrl.in_capsule_data_max(),
        ctrl.identify().maxcmd,
        u32::from(ctrl.cap().mqes()) + 1,
        ctrl.io_queues_granted(),
        ctrl.max_queue_entries(),
    );
    let ns = ctrl.namespace();
    assert_eq!(ns.block_size() as usize, BLOCK);
    assert_eq!(ns.nsze * BLOCK as u64, NS_MIB << 20);
    assert_eq!(ctrl.identify().subnqn, target.nqn());
    assert!(ctrl.io_queues_granted() >= 1 && ctrl.io_queues_granted() <= 4);
    assert!(ctrl.max_queue_entries() >= 32);
    assert!(
        ctrl.in_capsule_data_max() as usize >= BLOCK,
        "a block fits in the capsule"
    );
    if let Some(max) = ctrl.max_transfer_bytes() {
        assert!(max >= BLOCK as u64);
    }

    // An I/O queue without digests: a write in the capsule, a read ending with SUCCESS.
    let t = Instant::now();
    let conn = ctrl.connect_io_queue(1, 32).expect("I/O queue 1");
    eprintln!("I/O queue 1 connected in {} ms", t.elapsed().as_millis());
    assert_eq!(conn.params.digests, Digests::default());
    let mut q1 = BlockingQueue::new(conn);
    let first = pattern(1);
    assert_eq!(q1.write(1, 3, &first), Ending::Capsule(Status::SUCCESS));
    let (ending, data) = q1.read(1, 3);
    assert_eq!(ending, Ending::SuccessFlag, "SQ flow control is disabled");
    assert!(data == first, "read back what was written");

    // Another thread connects a queue while the admin queue is used here.
    let connector = ctrl.queue_connector();
    let other = thread::spawn(move || connector.connect(2, 16));
    ctrl.keep_alive().expect("keep alive");
    let q2 = other
        .join()
        .expect("thread")
        .expect("I/O queue 2 from another thread");
    drop(q2);

    // A second controller with header and data digests on every queue.
    let mut ctrl_d = Controller::connect(&addr, &subnqn, &host, &options(BOTH), 2, 1)
        .expect("controller with digests");
    assert_ne!(ctrl_d.cntlid(), ctrl.cntlid());
    let conn = ctrl_d
        .connect_io_queue(1, 16)
        .expect("I/O queue with digests");
    assert_eq!(conn.params.digests, BOTH);
    let mut qd = BlockingQueue::new(conn);
    let (ending, data) = qd.read(1, 3);
    eprintln!("read with digests ended by {ending:?}");
    assert!(matches!(
        ending,
        Ending::SuccessFlag | Ending::Capsule(Status::SUCCESS)
    ));
    assert!(data == first, "the other controller's write");
    let second = pattern(2);
    assert_eq!(qd.write(1, 4, &second), Ending::Capsule(Status::SUCCESS));
    let (_, data) = q1.read(1, 4);
    assert!(data == second, "written with digests, read without");
    ctrl_d.keep_alive().expect("keep alive with digests");

    // Discovery.
    let t = Instant::now();
    let log = discover(&addr, &host, &options(Digests::default())).expect("discover");
    eprintln!("discovery in {} ms:\n{log}", t.elapsed().as_millis());
    assert!(
        log.entries
            .iter()
            .any(|e| e.subnqn == target.nqn() && e.trsvcid == "4420" && e.is_tcp()),
        "{log}"
    );

    // What a user gets wrong.
    let unknown = nqn("nqn.2014-08.org.vubd:no-such-subsystem");
    let e = Controller::connect(&addr, &unknown, &host, &options(Digests::default()), 1, 1)
        .expect_err("unknown subsystem");
    eprintln!("unknown subsystem: {e}");
    assert!(matches!(e, CtrlError::SubsystemNotFound { .. }), "{e:?}");
    assert_eq!(
        e.to_string(),
        format!("subsystem {unknown} not found on {addr}")
    );
    assert!(!e.is_retryable());
    let e = Controller::connect(&addr, &subnqn, &host, &options(Digests::default()), 1, 9)
        .expect_err("namespace 9");
    eprintln!("namespace 9: {e}");
    assert_eq!(
        e.to_string(),
        format!("namespace 9 not found on {subnqn} (active namespaces: 1, 2)")
    );
    assert!(!e.is_retryable());

    // A stalled target: the wait ends after the timeout, and the error is retryable.
    let mut ctrl_s = Controller::connect(
        &addr,
        &subnqn,
        &host,
        &CtrlOptions {
            io_timeout: Duration::from_secs(1),
            ..options(Digests::default())
        },
        1,
        2,
    )
    .expect("controller for namespace 2");
    target.stop_guest();
    let t = Instant::now();
    let e = ctrl_s
        .keep_alive()
        .expect_err("no answer from a paused target");
    let waited = t.elapsed();
    target.cont_guest();
    eprintln!("paused target: {e} (after {} ms)", waited.as_millis());
    assert!(
        matches!(e, CtrlError::Conn(ConnError::Timeout { .. })),
        "{e:?}"
    );
    assert!(e.is_retryable());
    assert!(waited >= Duration::from_millis(900) && waited < Duration::from_secs(5));
    let e = ctrl_s.keep_alive().expect_err("unusable after a timeout");
    assert!(
        matches!(e, CtrlError::Conn(ConnError::Broken { .. })),
        "{e:?}"
    );
    drop(ctrl_s);

    // The first controller still serves, then everything shuts down.
    ctrl.keep_alive().expect("keep alive after the pause");
    let (_, data) = q1.read(1, 3);
    assert!(data == first);
    drop(q1);
    drop(qd);
    ctrl_d.shutdown().expect("shutdown with digests");
    ctrl.shutdown().expect("shutdown");
    target.assert_running();
    drop(target);
    eprintln!(
        "nvmet control path test: {:.1} s from start to the guest's end",
        started.elapsed().as_secs_f64()
    );
}

#[test]
fn target_restricted_to_one_host_refuses_the_others() {
    let allowed = "nqn.2014-08.org.vubd:allowed-host";
    let options_nvmet = NvmetOptions {
        namespaces: 1,
        ns_size_mib: NS_MIB,
        allow_host: Some(allowed.to_owned()),
        ..NvmetOptions::default()
    };
    let target = NvmetTarget::start(&options_nvmet);
    let addr = addr_of(&target);
    let subnqn = nqn(target.nqn());
    let stranger: HostId = HostIdentity::generate().into();
    let e = Controller::connect(
        &addr,
        &subnqn,
        &stranger,
        &options(Digests::default()),
        1,
        1,
    )
    .expect_err("host not allowed");
    eprintln!("refused host: {e}");
    assert!(matches!(e, CtrlError::HostRefused { .. }), "{e:?}");
    assert_eq!(
        e.to_string(),
        format!(
            "{addr} refuses host NQN {} for subsystem {subnqn}",
            stranger.nqn
        )
    );
    assert!(!e.is_retryable());
    let host = HostId {
        nqn: nqn(allowed),
        id: HostIdentity::generate().id,
    };
    let ctrl = Controller::connect(&addr, &subnqn, &host, &options(Digests::default()), 1, 1)
        .expect("the allowed host");
    ctrl.shutdown().expect("shutdown");
}

#[test]
fn closed_port_is_refused_and_worth_retrying() {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
    let port = listener.local_addr().expect("address").port();
    drop(listener);
    let addr = TargetAddr {
        host: "127.0.0.1".to_owned(),
        port,
    };
    let host: HostId = HostIdentity::generate().into();
    let e = Controller::connect(
        &addr,
        &nqn("nqn.2014-08.org.vubd:test"),
        &host,
        &options(Digests::default()),
        1,
        1,
    )
    .expect_err("nothing listens");
    assert_eq!(e.to_string(), format!("connection refused by {addr}"));
    assert!(e.is_retryable());
    let e = discover(&addr, &host, &options(Digests::default())).expect_err("nothing listens");
    assert!(
        matches!(e, CtrlError::Conn(ConnError::Refused { .. })),
        "{e:?}"
    );
}
