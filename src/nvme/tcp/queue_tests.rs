//! The I/O queue against a scripted target on a loopback TCP connection: what goes on the
//! wire, where received data lands, and how faults end the connection without touching
//! memory outside a command's buffer.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use super::*;
use crate::nvme::tcp::pdu::tests::{ALL, NONE, c2h_data, capsule_resp, icreq, icresp, r2t};
use crate::nvme::tcp::pdu::{Digests, Fes, RxParser, flags, pdu_type};

const GUARD: usize = 4096;

/// A command buffer with guard bytes on both sides.
struct Buf {
    mem: Vec<u8>,
    len: usize,
    iov: [libc::iovec; 1],
}

impl Buf {
    fn new(len: usize, fill: u8) -> Box<Buf> {
        let mut b = Box::new(Buf {
            mem: vec![fill; len + 2 * GUARD],
            len,
            iov: [libc::iovec {
                iov_base: std::ptr::null_mut(),
                iov_len: 0,
            }],
        });
        b.iov[0] = libc::iovec {
            iov_base: b.mem[GUARD..].as_mut_ptr().cast(),
            iov_len: len,
        };
        for (i, x) in b.mem[GUARD..GUARD + len].iter_mut().enumerate() {
            *x = fill ^ (i as u8);
        }
        b
    }

    fn data(&self) -> DataRef {
        // SAFETY: the boxed buffer outlives the queue in every test (declared first).
        unsafe { DataRef::new(&self.iov, 0, self.len) }.expect("fits")
    }

    fn bytes(&self) -> &[u8] {
        &self.mem[GUARD..GUARD + self.len]
    }

    fn guards_intact(&self, fill: u8) -> bool {
        self.mem[..GUARD].iter().all(|&b| b == fill)
            && self.mem[GUARD + self.len..].iter().all(|&b| b == fill)
    }
}

struct Target {
    s: TcpStream,
    d: Digests,
}

impl Target {
    /// Reads one whole PDU.
    fn pdu(&mut self) -> Vec<u8> {
        let mut ch = [0u8; 8];
        self.s.read_exact(&mut ch).expect("PDU header");
        let plen = u32::from_le_bytes([ch[4], ch[5], ch[6], ch[7]]) as usize;
        let mut rest = vec![0u8; plen - 8];
        self.s.read_exact(&mut rest).expect("PDU body");
        [ch.to_vec(), rest].concat()
    }

    /// Reads a CapsuleCmd: (CID, opcode, SGL identifier byte, in-capsule data).
    fn capsule(&mut self) -> (u16, u8, u8, Vec<u8>) {
        let p = self.pdu();
        assert_eq!(p[0], pdu_type::CAPSULE_CMD);
        let sqe = &p[8..72];
        let (pdo, plen) = (usize::from(p[3]), p.len());
        let dg = if p[1] & flags::DDGSTF != 0 { 4 } else { 0 };
        let data = if pdo == 0 {
            vec![]
        } else {
            p[pdo..plen - dg].to_vec()
        };
        if dg == 4 {
            let want = crc32c::crc32c(&data).to_le_bytes();
            assert_eq!(&p[plen - 4..], &want, "data digest of the capsule");
        }
        (u16::from_le_bytes([sqe[2], sqe[3]]), sqe[0], sqe[39], data)
    }

    fn send(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).expect("target write");
    }
}

/// A queue connected to a scripted target that granted `d` and `maxh2cdata`.
fn pair(d: Digests, maxh2cdata: u32, in_capsule: u32) -> (IoQueue, Target) {
    let mut q = IoQueue::new(32, in_capsule);
    let t = connect(&mut q, d, maxh2cdata);
    (q, t)
}

fn connect(q: &mut IoQueue, d: Digests, maxh2cdata: u32) -> Target {
    let l = TcpListener::bind("127.0.0.1:0").expect("listen");
    let host = TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
    let (s, _) = l.accept().expect("accept");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let req = icreq(0, d);
    let mut rx = RxParser::new(&req, 1 << 20);
    let bits = u8::from(d.header) | (u8::from(d.data) << 1);
    let resp = icresp(0, bits, maxh2cdata);
    let mut at = 0;
    let mut last = Ok(None);
    while at < resp.len() {
        let (n, ev) = rx.feed(&resp[at..]);
        assert!(n > 0, "parser stalled: {ev:?}");
        at += n;
        last = ev;
    }
    let Ok(Some(RxEvent::IcResp(params))) = last else {
        panic!("ICResp not accepted: {last:?}")
    };
    q.reconnect(
        IoQueueConn {
            stream: host,
            rx,
            params,
        },
        0,
    )
    .expect("reconnect");
    Target { s, d }
}

/// Polls until `n` completions (or an error) or 5 s pass.
fn wait(q: &mut IoQueue, n: usize) -> Result<Vec<Completion>, QueueError> {
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    while out.len() < n && Instant::now() < deadline {
        q.poll(|c| out.push(c))?;
        q.flush()?;
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(out)
}

/// Polls and flushes (expecting no completion) until the target has bytes to read, or 5 s.
fn pump_until_target_has_data(q: &mut IoQueue, t: &Target) {
    t.s.set_nonblocking(true).expect("nonblocking");
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut probe = [0u8; 1];
    while Instant::now() < deadline && t.s.peek(&mut probe).is_err() {
        q.poll(|c| panic!("unexpected completion {c:?}"))
            .expect("poll");
        q.flush().expect("flush");
        std::thread::sleep(Duration::from_millis(1));
    }
    t.s.set_nonblocking(false).expect("blocking");
}

fn ok(user: u32, bytes: u32) -> Completion {
    Completion {
        user,
        status: Status::SUCCESS,
        bytes,
    }
}

#[test]
fn read_completed_by_a_success_flag_lands_in_its_buffer_only() {
    for d in [NONE, ALL] {
        let buf = Buf::new(4096, 0xaa);
        let (mut q, mut t) = pair(d, 65536, 8192);
        q.push(7, Sqe::read(1, 0, 7, false), Data::In(buf.data()), 0)
            .expect("room");
        q.flush().expect("flush");
        let (cid, opc, sgl, data) = t.capsule();
        assert_eq!(
            (opc, sgl, data.len()),
            (0x02, 0x5a, 0),
            "read capsule, transport SGL"
        );
        let payload: Vec<u8> = (0..4096u32).map(|i| (i * 7) as u8).collect();
        t.send(&c2h_data(
            cid,
            0,
            &payload,
            flags::LAST_PDU | flags::SUCCESS,
            d,
            0,
        ));
        assert_eq!(wait(&mut q, 1).expect("poll"), [ok(7, 4096)]);
        assert_eq!(buf.bytes(), payload.as_slice());
        assert!(buf.guards_intact(0xaa));
        assert_eq!(q.in_flight(), 0);
    }
}

#[test]
fn read_in_two_pdus_then_a_response() {
    let buf = Buf::new(8192, 0);
    let (mut q, mut t) = pair(ALL, 65536, 8192);
    q.push(1, Sqe::read(1, 0, 15, false), Data::In(buf.data()), 0)
        .expect("room");
    q.flush().expect("flush");
    let (cid, ..) = t.capsule();
    let payload: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
    let mut wire = c2h_data(cid, 0, &payload[..4096], 0, t.d, 0);
    wire.extend(c2h_data(
        cid,
        4096,
        &payload[4096..],
        flags::LAST_PDU,
        t.d,
        0,
    ));
    wire.extend(capsule_resp(cid, t.d));
    t.send(&wire);
    assert_eq!(wait(&mut q, 1).expect("poll"), [ok(1, 8192)]);
    assert_eq!(buf.bytes(), payload.as_slice());
}

/// Data that does not continue where the command's data so far ends (here the second half
/// first, then the first half twice: a gap, then an overlap) is a protocol error, not a read
/// whose byte count hides a hole.
#[test]
fn data_out_of_order_resets_the_connection() {
    let gap = |cid| c2h_data(cid, 4096, &[0xee; 4096], 0, NONE, 0);
    let overlap = |cid| {
        [
            c2h_data(cid, 0, &[0xee; 4096], 0, NONE, 0),
            c2h_data(cid, 0, &[0xee; 4096], flags::LAST_PDU, NONE, 0),
        ]
        .concat()
    };
    for wire in [&gap as &dyn Fn(u16) -> Vec<u8>, &overlap] {
        let buf = Buf::new(8192, 0x5c);
        let (mut q, mut t) = pair(NONE, 65536, 8192);
        q.push(1, Sqe::read(1, 0, 15, false), Data::In(buf.data()), 0)
            .expect("room");
        q.flush().expect("flush");
        let (cid, ..) = t.capsule();
        t.send(&wire(cid));
        let err = wait(&mut q, 1).expect_err("reset");
        assert!(
            matches!(err, QueueError::Pdu(PduError::DataOutOfOrder { cccid, .. }) if cccid == cid),
            "{err:?}"
        );
        assert!(buf.guards_intact(0x5c));
        assert!(!q.is_connected());
        assert_eq!(q.in_flight(), 1, "the command waits for a new connection");
        let term = t.pdu();
        assert_eq!(term[0], pdu_type::H2C_TERM_REQ, "the target is told why");
        let fes = u16::from_le_bytes([term[8], term[9]]);
        let fei = u32::from_le_bytes([term[10], term[11], term[12], term[13]]);
        assert_eq!(
            (fes, fei),
            (Fes::InvalidHeaderField as u16, 12),
            "FES and FEI: DATAO of the C2HData header"
        );
    }
}

#[test]
fn small_write_travels_in_the_capsule() {
    let buf = Buf::new(4096, 0x11);
    let (mut q, mut t) = pair(ALL, 65536, 8192);
    q.push(3, Sqe::write(1, 8, 7, false), Data::Out(buf.data()), 0)
        .expect("room");
    q.flush().expect("flush");
    let (cid, opc, sgl, data) = t.capsule();
    assert_eq!((opc, sgl), (0x01, 0x01), "write capsule, in-capsule SGL");
    assert_eq!(data, buf.bytes());
    t.send(&capsule_resp(cid, t.d));
    assert_eq!(wait(&mut q, 1).expect("poll"), [ok(3, 4096)]);
}

#[test]
fn large_write_answers_the_r2t_in_maxh2cdata_pieces() {
    let buf = Buf::new(3 * 4096, 0x22);
    let (mut q, mut t) = pair(ALL, 4096, 0);
    q.push(9, Sqe::write(1, 0, 23, false), Data::Out(buf.data()), 0)
        .expect("room");
    q.flush().expect("flush");
    let (cid, _, sgl, data) = t.capsule();
    assert_eq!((sgl, data.len()), (0x5a, 0));
    t.send(&r2t(cid, 0x77, 0, 3 * 4096, t.d));
    pump_until_target_has_data(&mut q, &t);
    let mut got = Vec::new();
    for i in 0..3u32 {
        let p = t.pdu();
        assert_eq!(p[0], pdu_type::H2C_DATA);
        let field = |o: usize| u32::from_le_bytes([p[o], p[o + 1], p[o + 2], p[o + 3]]);
        assert_eq!(field(8) & 0xffff, u32::from(cid));
        assert_eq!(field(8) >> 16, 0x77, "transfer tag");
        assert_eq!((field(12), field(16)), (i * 4096, 4096), "DATAO, DATAL");
        assert_eq!(p[1] & flags::LAST_PDU != 0, i == 2);
        let pdo = usize::from(p[3]);
        let data = &p[pdo..p.len() - 4];
        assert_eq!(&p[p.len() - 4..], &crc32c::crc32c(data).to_le_bytes());
        got.extend_from_slice(data);
    }
    assert_eq!(got, buf.bytes());
    t.send(&capsule_resp(cid, t.d));
    assert_eq!(wait(&mut q, 1).expect("poll"), [ok(9, 3 * 4096)]);
}

#[test]
fn h2c_pieces_and_other_pdus_sent_together_keep_their_order() {
    let a = Buf::new(3 * 4096, 0x31);
    let b = Buf::new(512, 0x32);
    let (mut q, mut t) = pair(NONE, 4096, 1024);
    q.push(1, Sqe::write(1, 0, 23, false), Data::Out(a.data()), 0)
        .expect("room");
    q.flush().expect("flush");
    let (cid_a, _, sgl, _) = t.capsule();
    assert_eq!(sgl, 0x5a, "too large for the capsule");
    t.send(&r2t(cid_a, 3, 0, 3 * 4096, NONE));
    // The R2T queues A's first piece; B's capsule queues behind it; one flush sends both and
    // then A's remaining pieces.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !q.wants_write() && Instant::now() < deadline {
        q.poll(|c| panic!("unexpected completion {c:?}"))
            .expect("poll");
    }
    q.push(2, Sqe::write(1, 100, 0, false), Data::Out(b.data()), 0)
        .expect("room");
    pump_until_target_has_data(&mut q, &t);
    let mut seen = Vec::new();
    let mut got_a = Vec::new();
    for _ in 0..4 {
        let p = t.pdu();
        match p[0] {
            pdu_type::H2C_DATA => {
                let datao = u32::from_le_bytes([p[12], p[13], p[14], p[15]]);
                seen.push(format!("A@{datao}"));
                got_a.extend_from_slice(&p[usize::from(p[3])..]);
            }
            pdu_type::CAPSULE_CMD => {
                seen.push("B".to_owned());
                assert_eq!(&p[usize::from(p[3])..], b.bytes());
            }
            other => panic!("unexpected PDU type {other:#x}"),
        }
        q.flush().expect("flush");
    }
    assert_eq!(seen, ["A@0", "B", "A@4096", "A@8192"]);
    assert_eq!(got_a, a.bytes());
}

#[test]
fn dsm_range_is_sent_from_the_command_itself() {
    let (mut q, mut t) = pair(NONE, 65536, 8192);
    let range = [5u8; 16];
    q.push(4, Sqe::dsm_deallocate(1, 0), Data::OutInline(range), 0)
        .expect("room");
    q.flush().expect("flush");
    let (cid, opc, _, data) = t.capsule();
    assert_eq!((opc, data.as_slice()), (0x09, &range[..]));
    t.send(&capsule_resp(cid, t.d));
    assert_eq!(wait(&mut q, 1).expect("poll"), [ok(4, 16)]);
}

#[test]
fn data_outside_the_command_buffer_resets_the_connection_and_writes_nothing() {
    let buf = Buf::new(4096, 0x5c);
    let before = buf.bytes().to_vec();
    let (mut q, mut t) = pair(NONE, 65536, 8192);
    q.push(1, Sqe::read(1, 0, 7, false), Data::In(buf.data()), 0)
        .expect("room");
    q.flush().expect("flush");
    let (cid, ..) = t.capsule();
    t.send(&c2h_data(cid, 4000, &[0xee; 200], flags::LAST_PDU, NONE, 0));
    let err = wait(&mut q, 1).expect_err("reset");
    assert!(
        matches!(err, QueueError::Pdu(PduError::DataOutOfRange { .. })),
        "{err:?}"
    );
    assert_eq!(buf.bytes(), before.as_slice());
    assert!(buf.guards_intact(0x5c));
    assert!(!q.is_connected());
    assert_eq!(q.in_flight(), 1, "the command waits for a new connection");
    assert_eq!(t.pdu()[0], pdu_type::H2C_TERM_REQ, "the target is told why");
}

#[test]
fn a_response_for_an_unknown_command_resets_the_connection() {
    let (mut q, mut t) = pair(NONE, 65536, 8192);
    q.push(1, Sqe::flush(1), Data::None, 0).expect("room");
    q.flush().expect("flush");
    let (cid, ..) = t.capsule();
    t.send(&capsule_resp(cid.wrapping_add(1), NONE));
    let err = wait(&mut q, 1).expect_err("reset");
    assert!(matches!(err, QueueError::Sequence { .. }), "{err:?}");
    assert!(!q.is_connected());
}

#[test]
fn a_bad_data_digest_resets_the_connection() {
    let buf = Buf::new(512, 0);
    let (mut q, mut t) = pair(ALL, 65536, 8192);
    q.push(1, Sqe::read(1, 0, 0, false), Data::In(buf.data()), 0)
        .expect("room");
    q.flush().expect("flush");
    let (cid, ..) = t.capsule();
    let mut wire = c2h_data(cid, 0, &[1; 512], flags::LAST_PDU | flags::SUCCESS, ALL, 0);
    let last = wire.len() - 1;
    wire[last] ^= 0xff;
    t.send(&wire);
    let err = wait(&mut q, 1).expect_err("reset");
    assert!(
        matches!(err, QueueError::Pdu(PduError::DataDigest { .. })),
        "{err:?}"
    );
}

#[test]
fn commands_in_flight_are_sent_again_on_a_new_connection() {
    let buf = Buf::new(4096, 0);
    let (mut q, mut t) = pair(NONE, 65536, 8192);
    q.push(5, Sqe::read(1, 0, 7, false), Data::In(buf.data()), 5)
        .expect("room");
    q.push(6, Sqe::flush(1), Data::None, 9).expect("room");
    assert_eq!(q.oldest(), Some(5));
    q.flush().expect("flush");
    let first = [t.capsule().0, t.capsule().0];
    drop(t);
    let err = wait(&mut q, 1).expect_err("connection lost");
    assert!(
        matches!(err, QueueError::Closed | QueueError::Io(_)),
        "{err:?}"
    );
    assert_eq!(q.in_flight(), 2);
    let mut t = connect(&mut q, NONE, 65536);
    assert_eq!(
        q.oldest(),
        Some(0),
        "resent commands are as old as the new connection"
    );
    q.flush().expect("flush");
    let again = [t.capsule().0, t.capsule().0];
    assert_eq!(again, first, "same commands, same identifiers");
    let payload = [9u8; 4096];
    t.send(&c2h_data(
        again[0],
        0,
        &payload,
        flags::LAST_PDU | flags::SUCCESS,
        NONE,
        0,
    ));
    t.send(&capsule_resp(again[1], NONE));
    let mut done = wait(&mut q, 2).expect("poll");
    done.sort_by_key(|c| c.user);
    assert_eq!(done, [ok(5, 4096), ok(6, 0)]);
    assert_eq!(buf.bytes(), &payload[..]);
}

#[test]
fn many_commands_and_responses_in_one_batch() {
    let bufs: Vec<Box<Buf>> = (0..32u8).map(|i| Buf::new(512, i)).collect();
    let (mut q, mut t) = pair(NONE, 65536, 8192);
    for (i, b) in bufs.iter().enumerate() {
        q.push(
            i as u32,
            Sqe::read(1, i as u64, 0, false),
            Data::In(b.data()),
            0,
        )
        .expect("room");
    }
    assert!(!q.has_room(), "32 commands fill a queue of depth 32");
    q.flush().expect("flush");
    let mut wire = Vec::new();
    for i in 0..32u8 {
        let (cid, ..) = t.capsule();
        wire.extend(c2h_data(
            cid,
            0,
            &[i ^ 0xff; 512],
            flags::LAST_PDU | flags::SUCCESS,
            NONE,
            0,
        ));
    }
    t.send(&wire);
    let done = wait(&mut q, 32).expect("poll");
    assert_eq!(done.len(), 32);
    for (i, b) in bufs.iter().enumerate() {
        assert!(
            b.bytes().iter().all(|&x| usize::from(x) == i ^ 0xff),
            "buffer {i}"
        );
    }
}

#[test]
fn the_connection_is_handed_back_only_when_idle() {
    let (mut q, mut t) = pair(NONE, 65536, 8192);
    q.push(1, Sqe::flush(1), Data::None, 0).expect("room");
    assert!(q.take_conn().is_none(), "a command is in flight");
    q.flush().expect("flush");
    let (cid, ..) = t.capsule();
    t.send(&capsule_resp(cid, NONE));
    assert_eq!(wait(&mut q, 1).expect("poll"), [ok(1, 0)]);
    assert!(q.take_conn().is_some());
    assert!(!q.is_connected());
}

#[test]
fn a_held_command_past_its_deadline_fails_and_an_answer_for_it_writes_nothing() {
    let buf = Buf::new(4096, 0x3c);
    let before = buf.bytes().to_vec();
    let (mut q, mut t) = pair(NONE, 65536, 8192);
    q.push(1, Sqe::read(1, 0, 7, false), Data::In(buf.data()), 10)
        .expect("room");
    q.push(2, Sqe::flush(1), Data::None, 20).expect("room");
    q.flush().expect("flush");
    let sent = [t.capsule().0, t.capsule().0];
    assert_eq!(
        q.set_deadlines(|user| user == 1, 100),
        Some(110),
        "the read's deadline: the timeout after it was pushed"
    );
    let status = Status::new(0, 0x08, true);
    let mut failed = Vec::new();
    assert_eq!(
        q.fail_overdue(500, status, |c| failed.push(c)),
        (0, Some(110)),
        "nothing fails while the connection lives"
    );
    q.disconnect();
    assert_eq!(
        q.fail_overdue(109, status, |c| failed.push(c)),
        (0, Some(110))
    );
    assert_eq!(q.fail_overdue(110, status, |c| failed.push(c)), (1, None));
    assert_eq!(
        failed,
        [Completion {
            user: 1,
            status,
            bytes: 0
        }]
    );
    assert_eq!(q.in_flight(), 1, "the flush, without a deadline, waits");

    // On a new connection only the flush goes again; the read's identifier is unknown, so
    // data for it ends the connection and lands nowhere.
    let mut t = connect(&mut q, NONE, 65536);
    q.flush().expect("flush");
    assert_eq!(t.capsule().0, sent[1], "the flush, sent again");
    t.send(&c2h_data(
        sent[0],
        0,
        &[0xee; 4096],
        flags::LAST_PDU | flags::SUCCESS,
        NONE,
        0,
    ));
    let err = wait(&mut q, 1).expect_err("reset");
    assert!(matches!(err, QueueError::Pdu(_)), "{err:?}");
    assert_eq!(buf.bytes(), before.as_slice());
    assert!(buf.guards_intact(0x3c));
    assert_eq!(q.in_flight(), 1);
}

#[test]
fn a_deadline_given_twice_keeps_the_first_and_commands_without_one_never_fail() {
    let (mut q, _t) = pair(NONE, 65536, 8192);
    let cid = q.push(1, Sqe::flush(1), Data::None, 0).expect("room");
    q.push(2, Sqe::flush(1), Data::None, 0).expect("room");
    q.set_deadline(cid, 50);
    assert_eq!(q.set_deadlines(|user| user == 1, 1000), Some(50));
    q.disconnect();
    let status = Status::new(0, 0x08, true);
    let (failed, next) = q.fail_overdue(u64::MAX, status, |c| assert_eq!(c.user, 1));
    assert_eq!((failed, next), (1, None));
    assert_eq!(q.in_flight(), 1);
}
