//! The NVMe/TCP lab itself, without any initiator of this project: the Linux kernel target in
//! a QEMU guest ([`common::nvmet::NvmetTarget`]) comes up, answers a hand-built NVMe/TCP
//! connection request and Fabrics Connect commands (to the discovery subsystem, to its own
//! subsystem and, refused, to an unknown NQN), stalls while its guest is paused over QMP and
//! answers again once it is resumed.
//!
//! One guest boot serves all steps, in one test. The test needs QEMU and a kernel (the lab
//! fetches one into its cache); where the lab cannot start, it fails and says why, never skips.

mod common;

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::TIMEOUT;
use common::nvmet::{DISCOVERY_NQN, NvmetOptions, NvmetTarget};

/// NVMe/TCP PDU types (NVMe/TCP transport specification, 3.3).
const PDU_ICREQ: u8 = 0x00;
const PDU_ICRESP: u8 = 0x01;
const PDU_CAPSULE_CMD: u8 = 0x04;
const PDU_CAPSULE_RESP: u8 = 0x05;

/// Length of the ICReq and ICResp PDUs.
const IC_LEN: usize = 128;
/// Common header, then the 64-byte submission queue entry.
const CAPSULE_CMD_HLEN: usize = 8 + 64;
/// Common header, then the 16-byte completion queue entry.
const CAPSULE_RESP_LEN: usize = 8 + 16;
/// The data of a Fabrics Connect command.
const CONNECT_DATA_LEN: usize = 1024;

/// How long a paused target must stay silent.
const SILENCE: Duration = Duration::from_secs(2);

const HOST_NQN: &str = "nqn.2014-08.org.vubd:host-lab-test";

/// An ICReq: PFV 0, HPDA 0, no digests, MAXR2T 0.
fn icreq() -> [u8; IC_LEN] {
    let mut pdu = [0u8; IC_LEN];
    pdu[0] = PDU_ICREQ;
    pdu[1] = 0; // flags
    pdu[2] = u8::try_from(IC_LEN).expect("HLEN fits u8");
    pdu[3] = 0; // PDO
    pdu[4..8].copy_from_slice(&u32::try_from(IC_LEN).expect("PLEN fits").to_le_bytes());
    // PFV (8..10), HPDA (10), DGST (11), MAXR2T (12..16): all zero.
    pdu
}

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes(b[at..at + 2].try_into().expect("2 bytes"))
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

/// Checks an ICResp and returns its MAXH2CDATA.
#[track_caller]
fn check_icresp(pdu: &[u8; IC_LEN]) -> u32 {
    assert_eq!(pdu[0], PDU_ICRESP, "ICResp type in {pdu:02x?}");
    assert_eq!(usize::from(pdu[2]), IC_LEN, "ICResp HLEN in {pdu:02x?}");
    assert_eq!(pdu[3], 0, "ICResp PDO in {pdu:02x?}");
    assert_eq!(le32(pdu, 4), 128, "ICResp PLEN in {pdu:02x?}");
    assert_eq!(le16(pdu, 8), 0, "ICResp PFV in {pdu:02x?}");
    assert_eq!(pdu[11], 0, "ICResp DGST (none was asked for) in {pdu:02x?}");
    let maxh2cdata = le32(pdu, 12);
    assert!(
        maxh2cdata >= 4096 && maxh2cdata % 4 == 0,
        "ICResp MAXH2CDATA {maxh2cdata}: want >= 4096 and a multiple of 4"
    );
    maxh2cdata
}

/// A TCP connection to the target, all reads and writes bounded by `timeout`.
fn connect(target: &NvmetTarget, timeout: Duration) -> TcpStream {
    let stream = TcpStream::connect_timeout(&target.addr(), TIMEOUT)
        .unwrap_or_else(|e| panic!("connect to {}: {e}", target.addr()));
    stream
        .set_read_timeout(Some(timeout))
        .and_then(|()| stream.set_write_timeout(Some(TIMEOUT)))
        .expect("set socket timeouts");
    stream.set_nodelay(true).expect("TCP_NODELAY");
    stream
}

/// Sends an ICReq on `stream` and returns the ICResp, failing the test if there is none.
#[track_caller]
fn initialize(stream: &mut TcpStream) -> [u8; IC_LEN] {
    stream.write_all(&icreq()).expect("send ICReq");
    let mut resp = [0u8; IC_LEN];
    stream
        .read_exact(&mut resp)
        .unwrap_or_else(|e| panic!("read ICResp: {e}"));
    resp
}

/// A Fabrics Connect command capsule for the admin queue of `subnqn`, data in the capsule.
fn connect_capsule(subnqn: &str, hostnqn: &str, cid: u16) -> Vec<u8> {
    let plen = CAPSULE_CMD_HLEN + CONNECT_DATA_LEN;
    let mut pdu = vec![0u8; plen];
    pdu[0] = PDU_CAPSULE_CMD;
    pdu[2] = u8::try_from(CAPSULE_CMD_HLEN).expect("HLEN fits u8");
    pdu[3] = u8::try_from(CAPSULE_CMD_HLEN).expect("PDO fits u8"); // data right after the SQE
    pdu[4..8].copy_from_slice(&u32::try_from(plen).expect("PLEN fits").to_le_bytes());
    let sqe = &mut pdu[8..CAPSULE_CMD_HLEN];
    sqe[0] = 0x7f; // Fabrics command
    sqe[1] = 0x40; // PSDT: SGL
    sqe[2..4].copy_from_slice(&cid.to_le_bytes());
    sqe[4] = 0x01; // FCTYPE: Connect
    // SGL1: data block descriptor, offset 0 in the capsule, 1024 bytes; type 0, subtype 1.
    sqe[32..36].copy_from_slice(&u32::try_from(CONNECT_DATA_LEN).expect("fits").to_le_bytes());
    sqe[39] = 0x01;
    // RECFMT 0, QID 0 (admin), SQSIZE 31 (0's based), CATTR 0, KATO 0.
    sqe[44..46].copy_from_slice(&31u16.to_le_bytes());
    let data = &mut pdu[CAPSULE_CMD_HLEN..];
    data[0..16].copy_from_slice(b"vubd-lab-hostid!");
    data[16..18].copy_from_slice(&0xffffu16.to_le_bytes()); // CNTLID: any controller
    data[256..256 + subnqn.len()].copy_from_slice(subnqn.as_bytes());
    data[512..512 + hostnqn.len()].copy_from_slice(hostnqn.as_bytes());
    pdu
}

/// The completion of a Fabrics Connect.
#[derive(Debug)]
struct ConnectResult {
    /// Dword 0: the controller ID on success, the offending field on an invalid parameter.
    dw0: u32,
    /// Status code type and status code, 0 for success.
    sct: u16,
    sc: u16,
}

/// Connects a new queue pair to `subnqn` and sends a Fabrics Connect for its admin queue.
fn fabrics_connect(target: &NvmetTarget, subnqn: &str) -> ConnectResult {
    let mut stream = connect(target, TIMEOUT);
    check_icresp(&initialize(&mut stream));
    let cid = 0x1234;
    stream
        .write_all(&connect_capsule(subnqn, HOST_NQN, cid))
        .expect("send Connect");
    let mut resp = [0u8; CAPSULE_RESP_LEN];
    stream
        .read_exact(&mut resp)
        .unwrap_or_else(|e| panic!("read the Connect response for {subnqn}: {e}"));
    assert_eq!(resp[0], PDU_CAPSULE_RESP, "response type in {resp:02x?}");
    assert_eq!(
        usize::from(resp[2]),
        CAPSULE_RESP_LEN,
        "response HLEN in {resp:02x?}"
    );
    assert_eq!(
        le32(&resp, 4),
        u32::try_from(CAPSULE_RESP_LEN).expect("fits"),
        "response PLEN in {resp:02x?}"
    );
    let cqe = &resp[8..];
    assert_eq!(le16(cqe, 12), cid, "CID in the completion {cqe:02x?}");
    let status = le16(cqe, 14) >> 1;
    ConnectResult {
        dw0: le32(cqe, 0),
        sct: (status >> 8) & 0x7,
        sc: status & 0xff,
    }
}

#[test]
fn kernel_target_answers_stalls_when_paused_and_resumes() {
    let options = NvmetOptions {
        namespaces: 2,
        ns_size_mib: 16,
        block_size: 4096,
        ..NvmetOptions::default()
    };
    let started = Instant::now();
    let mut target = NvmetTarget::start(&options);
    eprintln!(
        "nvmet target ready at {} in {:.1} s: {}",
        target.addr(),
        target.boot_time().as_secs_f64(),
        target.ready_line()
    );

    // Connection setup.
    let mut stream = connect(&target, TIMEOUT);
    let maxh2cdata = check_icresp(&initialize(&mut stream));
    eprintln!("ICResp: MAXH2CDATA {maxh2cdata}");
    drop(stream);

    // Fabrics Connect: the discovery subsystem and ours accept it, an unknown NQN does not.
    let discovery = fabrics_connect(&target, DISCOVERY_NQN);
    assert_eq!(
        (discovery.sct, discovery.sc),
        (0, 0),
        "Connect to {DISCOVERY_NQN}: {discovery:?}"
    );
    let ours = fabrics_connect(&target, target.nqn());
    assert_eq!(
        (ours.sct, ours.sc),
        (0, 0),
        "Connect to {}: {ours:?}",
        target.nqn()
    );
    assert!(
        ours.dw0 & 0xffff < 0xfff0,
        "Connect to {}: controller ID {:#x}",
        target.nqn(),
        ours.dw0 & 0xffff
    );
    let unknown = fabrics_connect(&target, "nqn.2014-08.org.vubd:no-such-subsystem");
    // Command specific status 0x82: Connect Invalid Parameters (here: SUBNQN).
    assert_eq!(
        (unknown.sct, unknown.sc),
        (1, 0x82),
        "Connect to an unknown NQN: {unknown:?}"
    );

    // A paused guest: QEMU still accepts the TCP connection, but nothing answers.
    target.stop_guest();
    let mut stalled = connect(&target, SILENCE);
    stalled
        .write_all(&icreq())
        .expect("send ICReq to the paused target");
    let mut resp = [0u8; IC_LEN];
    let waited = Instant::now();
    match stalled.read_exact(&mut resp) {
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) => {}
        other => panic!("paused target: expected no answer within {SILENCE:?}, got {other:?}"),
    }
    assert!(waited.elapsed() >= SILENCE - Duration::from_millis(100));

    // Resumed: new connections are served, and so is the one made while it was paused.
    target.cont_guest();
    let mut fresh = connect(&target, TIMEOUT);
    check_icresp(&initialize(&mut fresh));
    stalled
        .set_read_timeout(Some(TIMEOUT))
        .expect("set read timeout");
    stalled
        .read_exact(&mut resp)
        .unwrap_or_else(|e| panic!("ICResp on the connection made while paused: {e}"));
    check_icresp(&resp);

    target.assert_running();
    drop(target);
    eprintln!(
        "nvmet lab test: {:.1} s from start to the guest's end",
        started.elapsed().as_secs_f64()
    );
}
