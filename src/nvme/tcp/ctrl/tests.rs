use std::net::{Ipv4Addr, SocketAddr};

use uuid::Uuid;

use super::*;
use crate::nvme::spec::{HostIdentity, Status};
use crate::nvme::tcp::sync::tests::{Peer, cid_of, controller};

const SUBNQN: &str = "nqn.2014-08.org.example:sub";

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// A scripted admin controller: registers as properties, Identify, Number of Queues, the
/// Discovery log. Returns the (offset, length) of every Get Log Page it served.
#[derive(Clone)]
struct Fake {
    cap: u64,
    mdts: u8,
    cfs: bool,
    never_ready: bool,
    records: u64,
    /// GENCTR is 1 for this many Get Log Page commands, 2 afterwards.
    genctr_moves_after: usize,
    /// GENCTR is the number of Get Log Page commands served so far: it never settles.
    genctr_counts_reads: bool,
    active: Vec<u32>,
}

impl Default for Fake {
    fn default() -> Self {
        Fake {
            // MQES 127 (0-based), TO 1 (500 ms), CSS NVM, MPSMIN 0 (4 KiB pages).
            cap: 127 | (1 << 24) | (1 << 37),
            mdts: 1,
            cfs: false,
            never_ready: false,
            records: 0,
            genctr_moves_after: usize::MAX,
            genctr_counts_reads: false,
            active: vec![1, 2],
        }
    }
}

impl Fake {
    fn start(self) -> (TargetAddr, thread::JoinHandle<Vec<(u64, usize)>>) {
        let (port, handle) = controller(Digests::default(), move |p| self.run(p));
        let addr = TargetAddr {
            host: "127.0.0.1".to_owned(),
            port,
        };
        (addr, handle)
    }

    fn log(&self, genctr: u64) -> Vec<u8> {
        let mut log = vec![0; DISCOVERY_HEADER_LEN + self.records as usize * DISCOVERY_ENTRY_LEN];
        log[0..8].copy_from_slice(&genctr.to_le_bytes());
        log[8..16].copy_from_slice(&self.records.to_le_bytes());
        for i in 0..self.records as usize {
            let e = &mut log[DISCOVERY_HEADER_LEN + i * DISCOVERY_ENTRY_LEN..];
            e[0] = 3;
            e[1] = 1;
            e[2] = 2;
            e[32..36].copy_from_slice(b"4420");
            let nqn = format!("{SUBNQN}{i}");
            e[256..256 + nqn.len()].copy_from_slice(nqn.as_bytes());
            e[512..521].copy_from_slice(b"127.0.0.1");
        }
        log
    }

    fn identify(&self, sqe: &[u8; 64]) -> Vec<u8> {
        let mut page = vec![0; IDENTIFY_LEN];
        match (le32(sqe, 40) & 0xff, le32(sqe, 4)) {
            (0, nsid) if self.active.contains(&nsid) => {
                page[0..8].copy_from_slice(&4096u64.to_le_bytes());
                // LBA format 0: 4096-byte blocks.
                page[128 + 2] = 12;
            }
            (0, _) => {}
            (1, _) => {
                page[77] = self.mdts;
                page[78..80].copy_from_slice(&9u16.to_le_bytes());
                page[1792..1796].copy_from_slice(&(8192u32 / 16 + 4).to_le_bytes());
            }
            (2, _) => {
                for (i, id) in self.active.iter().enumerate() {
                    page[i * 4..i * 4 + 4].copy_from_slice(&id.to_le_bytes());
                }
            }
            (cns, _) => panic!("Identify CNS {cns}"),
        }
        page
    }

    fn run(self, mut p: Peer) -> Vec<(u64, usize)> {
        let mut cc = 0u32;
        let mut reads = Vec::new();
        while let Some((sqe, _)) = p.next_capsule() {
            let cid = cid_of(&sqe);
            let data = match (sqe[0], sqe[4]) {
                (0x7f, 0x01) => {
                    p.resp(cid, 0, 9);
                    continue;
                }
                (0x7f, 0x04) => {
                    let rdy = cc & 1 != 0 && !self.never_ready;
                    let shst = if (cc >> 14) & 3 == 1 { 2 << 2 } else { 0 };
                    let value = match le32(&sqe, 44) {
                        0x00 => self.cap,
                        0x14 => u64::from(cc),
                        0x1c => u64::from(rdy) | (u64::from(self.cfs) << 1) | shst,
                        other => panic!("Property Get {other:#x}"),
                    };
                    p.resp(cid, 0, value);
                    continue;
                }
                (0x7f, 0x00) => {
                    assert_eq!(le32(&sqe, 44), 0x14, "Property Set of CC only");
                    cc = le32(&sqe, 48);
                    p.resp(cid, 0, 0);
                    continue;
                }
                (0x06, _) => self.identify(&sqe),
                (0x09, _) => {
                    // Four queue pairs, whatever was asked.
                    p.resp(cid, 0, (3 << 16) | 3);
                    continue;
                }
                (0x02, _) => {
                    assert_eq!(le32(&sqe, 40) & 0xff, 0x70, "Discovery log");
                    let numd = (le32(&sqe, 40) >> 16) | ((le32(&sqe, 44) & 0xffff) << 16);
                    let len = (numd as usize + 1) * 4;
                    let offset = le64(&sqe, 48);
                    let genctr = if self.genctr_counts_reads {
                        reads.len() as u64
                    } else if reads.len() < self.genctr_moves_after {
                        1
                    } else {
                        2
                    };
                    reads.push((offset, len));
                    let log = self.log(genctr);
                    log[offset as usize..offset as usize + len].to_vec()
                }
                (0x18, _) => {
                    p.resp(cid, 0, 0);
                    continue;
                }
                (opc, _) => panic!("opcode {opc:#x}"),
            };
            p.c2h(cid, 0, &data, true, false);
            p.resp(cid, 0, 0);
        }
        reads
    }
}

fn host() -> HostId {
    HostIdentity::generate().into()
}

fn opts() -> CtrlOptions {
    CtrlOptions {
        io_timeout: Duration::from_secs(5),
        ..CtrlOptions::default()
    }
}

fn subnqn() -> Nqn {
    Nqn::new(SUBNQN).expect("nqn")
}

#[test]
fn discovery_reads_in_mdts_chunks_and_rereads_a_changed_log() {
    let fake = Fake {
        records: 10,
        genctr_moves_after: 2,
        ..Fake::default()
    };
    let (addr, server) = fake.start();
    let log = discover(&addr, &host(), &opts()).expect("discover");
    assert_eq!(log.header.genctr, 2);
    assert_eq!(log.entries.len(), 10);
    assert_eq!(log.entries[9].subnqn, format!("{SUBNQN}9"));
    assert_eq!(log.entries[0].trsvcid, "4420");
    // MDTS 1 with 4 KiB pages: 8 KiB per command. The first pass saw GENCTR move.
    let pass = [(0, 1024), (0, 8192), (8192, 3072), (0, 1024)];
    let expected: Vec<_> = pass.iter().chain(&pass).copied().collect();
    assert_eq!(server.join().expect("controller"), expected);
}

#[test]
fn discovery_log_that_keeps_changing_is_an_error() {
    let fake = Fake {
        records: 1,
        genctr_moves_after: 0,
        genctr_counts_reads: true,
        ..Fake::default()
    };
    let (addr, server) = fake.start();
    let e = discover(&addr, &host(), &opts()).expect_err("never consistent");
    assert_eq!(
        e.to_string(),
        format!("discovery log on {addr} kept changing while read")
    );
    assert!(e.is_retryable());
    // Two passes of header, log, header.
    assert_eq!(server.join().expect("controller").len(), 6);
}

#[test]
fn controller_comes_up_with_what_the_fake_reports() {
    let (addr, server) = Fake::default().start();
    let mut ctrl = Controller::connect(&addr, &subnqn(), &host(), &opts(), 2, 1).expect("connect");
    assert_eq!(ctrl.cntlid(), 9);
    assert_eq!(ctrl.io_queues_granted(), 2, "never more than asked for");
    assert_eq!(ctrl.max_queue_entries(), 128);
    assert_eq!(ctrl.max_transfer_bytes(), Some(8192));
    assert_eq!(ctrl.in_capsule_data_max(), 8192);
    assert_eq!(ctrl.namespace().block_size(), 4096);
    assert_eq!(ctrl.namespace().nsze, 4096);
    ctrl.keep_alive().expect("keep alive");
    for (qid, depth) in [(0, 32), (3, 32), (1, 1), (1, 129)] {
        let e = ctrl.connect_io_queue(qid, depth).expect_err("out of range");
        assert!(matches!(e, CtrlError::QueueParams { .. }), "{e:?}");
        assert!(!e.is_retryable());
    }
    ctrl.shutdown().expect("shutdown");
    server.join().expect("controller");
}

#[test]
fn missing_namespace_names_the_active_ones() {
    let (addr, server) = Fake::default().start();
    let e = Controller::connect(&addr, &subnqn(), &host(), &opts(), 1, 5).expect_err("nsid 5");
    assert_eq!(
        e.to_string(),
        format!("namespace 5 not found on {SUBNQN} (active namespaces: 1, 2)")
    );
    assert!(!e.is_retryable());
    server.join().expect("controller");
}

#[test]
fn fatal_and_never_ready_controllers_are_reported() {
    let fake = Fake {
        cfs: true,
        ..Fake::default()
    };
    let (addr, server) = fake.start();
    let e = Controller::connect(&addr, &subnqn(), &host(), &opts(), 1, 1).expect_err("CFS");
    assert!(matches!(e, CtrlError::Fatal { .. }), "{e:?}");
    assert!(e.is_retryable());
    server.join().expect("controller");

    let fake = Fake {
        never_ready: true,
        ..Fake::default()
    };
    let (addr, server) = fake.start();
    let start = Instant::now();
    let e = Controller::connect(&addr, &subnqn(), &host(), &opts(), 1, 1).expect_err("not ready");
    // CAP.TO 1: (1 + 1) × 500 ms.
    assert!(start.elapsed() >= Duration::from_millis(1000));
    assert!(
        e.to_string()
            .starts_with(&format!("controller on {addr} not ready after ")),
        "{e}"
    );
    assert!(e.is_retryable());
    server.join().expect("controller");
}

#[test]
fn connect_refusals_become_user_errors() {
    let ep = Endpoint {
        addr: TargetAddr {
            host: "10.0.0.1".to_owned(),
            port: 4420,
        },
        subnqn: subnqn(),
        host: HostId {
            nqn: Nqn::new("nqn.2014-08.org.example:me").expect("nqn"),
            id: Uuid::nil(),
        },
        opts: opts(),
    };
    let refused = |refusal| ConnError::ConnectRefused {
        peer: SocketAddr::from((Ipv4Addr::new(10, 0, 0, 1), 4420)),
        qid: 0,
        status: Status::new(1, 0x82, true),
        refusal,
    };
    let e = ep.refused(refused(ConnectRefusal::SubsystemNotFound));
    assert_eq!(
        e.to_string(),
        format!("subsystem {SUBNQN} not found on 10.0.0.1:4420")
    );
    assert!(!e.is_retryable());
    let e = ep.refused(refused(ConnectRefusal::HostNotAllowed));
    assert_eq!(
        e.to_string(),
        format!("10.0.0.1:4420 refuses host NQN nqn.2014-08.org.example:me for subsystem {SUBNQN}")
    );
    assert!(!e.is_retryable());
    let e = ep.refused(refused(ConnectRefusal::ControllerNotFound));
    assert!(matches!(e, CtrlError::Conn(_)), "{e:?}");
    assert!(e.is_retryable(), "a vanished controller is connected again");
    let e = ep.refused(refused(ConnectRefusal::Other(Status::new(1, 0x81, false))));
    assert!(e.is_retryable(), "controller busy");
}

#[test]
fn connection_errors_keep_their_message_and_are_retryable() {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, 4420));
    let e = CtrlError::from(ConnError::Refused { addr });
    assert_eq!(e.to_string(), "connection refused by 127.0.0.1:4420");
    assert!(e.is_retryable());
    let e = CtrlError::from(ConnError::ConnectTimeout {
        addr,
        timeout: Duration::from_secs(3),
    });
    assert_eq!(
        e.to_string(),
        "timed out connecting to 127.0.0.1:4420 after 3s"
    );
    assert!(e.is_retryable());
    let e = CtrlError::from(ConnError::Status {
        op: "Identify",
        status: Status::new(0, 0x02, true),
    });
    assert_eq!(e.to_string(), "Identify failed: invalid field in command");
    assert!(!e.is_retryable());
}

#[test]
fn namespace_lists_are_shortened() {
    assert_eq!(NsList(&[]).to_string(), "no active namespace");
    let many: Vec<u32> = (1..=20).collect();
    assert_eq!(
        NsList(&many).to_string(),
        "active namespaces: 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, ... (20 in all)"
    );
}

#[test]
fn queue_depth_is_bounded_by_mqes_and_maxcmd() {
    let mut id = IdentifyController::parse(&[0; IDENTIFY_LEN]).expect("zero page");
    assert_eq!(max_queue_entries(Cap(0xffff), &id), u16::MAX);
    assert_eq!(max_queue_entries(Cap(127), &id), 128);
    id.maxcmd = 64;
    assert_eq!(max_queue_entries(Cap(127), &id), 64);
}

#[test]
fn target_addresses_print_as_sockets() {
    let v6 = TargetAddr {
        host: "fe80::1".to_owned(),
        port: 4420,
    };
    assert_eq!(v6.to_string(), "[fe80::1]:4420");
    assert!(Nqn::new(DISCOVERY_NQN).is_ok());
}
