//! vubd's NVMe/TCP initiator against a target that misbehaves: the fake target of
//! `tests/common/fake_target` on a local port, vubd serving its namespace, libblkio driving
//! I/O through vubd.
//!
//! For every fault the proof is in the data and the completion statuses: requests in flight
//! when a connection breaks complete successfully (sent again on the new connection) and read
//! back what was written, no byte outside a request's buffers changes (guard areas around the
//! read buffers, neighbouring ranges written beforehand, the namespace itself), and vubd keeps
//! running. vubd's log and the target's counters show which path was taken (the reset, the
//! new connections), never alone.
//!
//! Each test starts its own target and vubd; every wait is bounded.

mod common;

use std::ffi::OsStr;
use std::net::TcpListener;
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use common::client::{Client, Done};
use common::daemon::{Daemon, DaemonConfig, PollMode, run_vubd};
use common::fake_target::{FakeTarget, Fault, Options};
use common::{Rng, TIMEOUT, assert_same, describe_ret};
use vubd::nvme::spec::{Status, io_opc, sc, sct};

const KIB: u64 = 1024;
/// The part of the namespace the tests write and check: the namespace itself is larger.
const REGION: u64 = 1 << 20;
/// What the guard areas around read buffers hold.
const GUARD_BYTE: u8 = 0xa5;
const GUARD_LEN: usize = 8 * 1024;

/// Timeouts for tests that must not see a keep-alive on the admin queue (a one-shot PDU
/// fault must fire on the I/O queue) nor a timeout: only the fault resets the controller.
const QUIET: &[&str] = &[
    "--keep-alive-tmo",
    "60",
    "--io-timeout",
    "10",
    "--reconnect-delay",
    "1",
    "--ctrl-loss-tmo",
    "60",
];

/// A fake target, vubd serving its namespace, and a client of vubd; dropped in that
/// order's reverse (client, vubd, target).
struct Rig {
    client: Client,
    vubd: Daemon,
    target: FakeTarget,
}

impl Rig {
    /// A target with `opts`, and vubd with `queues` queues (a poller and an I/O queue each,
    /// up to the CPUs vubd may use) connected to it with the URI options `query`
    /// (`?hdgst=1`, ...) and `extra` arguments.
    fn start(opts: Options, query: &str, queues: u16, extra: &[&str]) -> Rig {
        let config = DaemonConfig {
            num_queues: Some(queues),
            ..DaemonConfig::default()
        };
        Rig::start_with(opts, query, &config, extra)
    }

    /// Like [`Rig::start`], with vubd's settings in `config`.
    fn start_with(opts: Options, query: &str, config: &DaemonConfig, extra: &[&str]) -> Rig {
        let target = FakeTarget::start(opts).expect("start the fake target");
        let queues = config.num_queues.unwrap_or(1);
        let extra: Vec<&OsStr> = extra.iter().map(OsStr::new).collect();
        let vubd = Daemon::vubd_disk(Path::new(&uri(&target, query)), config, &extra);
        let client = vubd.connect(usize::from(queues));
        Rig {
            client,
            vubd,
            target,
        }
    }

    /// The I/O queues vubd connected, from its log.
    fn io_queues(&self) -> u64 {
        let log = self.vubd.output();
        log.split_once("io_queues=")
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("vubd logged no I/O queue count:\n{log}"))
    }

    fn accepted(&self) -> u64 {
        self.target.counters().connections_accepted
    }

    /// Reads and writes the target received, on every connection so far.
    fn reads_and_writes(&self) -> u64 {
        let c = self.target.counters();
        c.io(io_opc::READ) + c.io(io_opc::WRITE)
    }

    /// Fills the region with random data through vubd and returns it; the namespace holds it.
    fn fill_region(&mut self, seed: u64) -> Vec<u8> {
        let data = Rng::new(seed).bytes(REGION as usize);
        self.client.queue(0).write(0, &data);
        assert_same(
            &data,
            &self.target.read_namespace(0, data.len()),
            0,
            "the namespace after the first write",
        );
        data
    }

    /// The region, through vubd and in the namespace, is `model`.
    #[track_caller]
    fn assert_region(&mut self, model: &[u8], what: &str) {
        let through_vubd = self.client.queue(0).read(0, model.len());
        assert_same(
            model,
            &through_vubd,
            0,
            &format!("{what}: read through vubd"),
        );
        let namespace = self.target.read_namespace(0, model.len());
        assert_same(model, &namespace, 0, &format!("{what}: the namespace"));
    }

    /// vubd is still running, and the target never tripped over what vubd sent.
    #[track_caller]
    fn assert_healthy(&mut self) {
        self.vubd.assert_running();
        assert_eq!(self.target.counters().panics, 0, "the fake target panicked");
    }
}

fn uri(target: &FakeTarget, query: &str) -> String {
    format!("nvme-tcp://{}/{}{query}", target.addr(), target.nqn())
}

/// Waits (bounded by [`TIMEOUT`]) until `cond` holds.
#[track_caller]
fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + TIMEOUT;
    while !cond() {
        assert!(Instant::now() < deadline, "{what}: not within {TIMEOUT:?}");
        thread::sleep(Duration::from_millis(10));
    }
}

/// Waits (bounded) until vubd has logged `needle`.
#[track_caller]
fn wait_for_log(vubd: &Daemon, needle: &str) {
    let deadline = Instant::now() + TIMEOUT;
    while !vubd.output().contains(needle) {
        assert!(
            Instant::now() < deadline,
            "vubd did not log {needle:?} within {TIMEOUT:?}:\n{}",
            vubd.output()
        );
        thread::sleep(Duration::from_millis(10));
    }
}

/// Waits (bounded) until vubd has logged each of `needles`: what it logs about a
/// reconnection may follow the completions the reconnection allowed.
#[track_caller]
fn assert_log(vubd: &Daemon, needles: &[&str]) {
    for needle in needles {
        wait_for_log(vubd, needle);
    }
}

#[track_caller]
fn assert_all_succeeded(done: &[Done], what: &str) {
    for (tag, d) in done.iter().enumerate() {
        assert_eq!(
            d.ret,
            0,
            "{what}: request {tag} failed with {}",
            describe_ret(d.ret)
        );
    }
}

/// The guard areas around a guarded read's buffer are untouched.
#[track_caller]
fn assert_guards_intact(d: &Done, what: &str) {
    assert_eq!(d.guards.len(), 2, "{what}: a guarded read");
    for (guard, side) in d.guards.iter().zip(["before", "after"]) {
        if let Some(i) = guard.iter().position(|&b| b != GUARD_BYTE) {
            panic!("{what}: byte {i} of the guard {side} the read buffer was overwritten");
        }
    }
}

fn region_slice(model: &[u8], offset: u64, len: u64) -> &[u8] {
    &model[offset as usize..(offset + len) as usize]
}

/// Commands [`mixed_batch`] sends when nothing goes wrong.
const MIXED_BATCH_COMMANDS: u64 = 4;

/// One of each kind of request in flight at once, on disjoint ranges of a region filled
/// beforehand: two reads into guarded buffers (C2HData), a write larger than the in-capsule
/// limit (R2T, H2CData, CapsuleResp) and one within it (CapsuleResp). Every one of them must
/// complete successfully with the right data, whichever the fault hit; the model takes the
/// writes.
fn mixed_batch(rig: &mut Rig, model: &mut [u8], rng: &mut Rng, what: &str) {
    let guard = [GUARD_BYTE; GUARD_LEN];
    let (read_a, read_a_len) = (64 * KIB, 64 * KIB);
    let (big_write, big_len) = (256 * KIB, 64 * KIB);
    let (read_b, read_b_len) = (512 * KIB, 8 * KIB);
    let (small_write, small_len) = (768 * KIB, 4 * KIB);
    let big = rng.bytes(big_len as usize);
    let small = rng.bytes(small_len as usize);

    let q = rig.client.queue(0);
    q.submit_read_guarded(read_a, read_a_len as usize, &guard);
    q.submit_write(big_write, &big);
    q.submit_read_guarded(read_b, read_b_len as usize, &guard);
    q.submit_write(small_write, &small);
    let done = q.wait_all();
    assert_all_succeeded(&done, what);
    assert_same(
        region_slice(model, read_a, read_a_len),
        &done[0].data,
        read_a,
        &format!("{what}: first read"),
    );
    assert_guards_intact(&done[0], &format!("{what}: first read"));
    assert_same(
        region_slice(model, read_b, read_b_len),
        &done[2].data,
        read_b,
        &format!("{what}: second read"),
    );
    assert_guards_intact(&done[2], &format!("{what}: second read"));
    model[big_write as usize..(big_write + big_len) as usize].copy_from_slice(&big);
    model[small_write as usize..(small_write + small_len) as usize].copy_from_slice(&small);
}

/// A one-shot PDU `fault` hits a batch of requests in flight: vubd ends the connection,
/// reconnects the controller, sends the requests again and they all complete successfully
/// with the right data; nothing outside their buffers changes. `cause` is what vubd logs for
/// the broken connection.
fn recovers_from(fault: Fault, query: &str, cause: &str) {
    let mut rig = Rig::start(Options::default(), query, 1, QUIET);
    let mut model = rig.fill_region(0xfa_0001);
    let mut rng = Rng::new(0xfa_0002);
    let before = rig.accepted();
    let commands_before = rig.reads_and_writes();

    rig.target.set_fault(fault);
    mixed_batch(&mut rig, &mut model, &mut rng, &format!("{fault:?}"));

    // The fault fired and broke the connection: a new admin queue and I/O queue connection.
    assert!(
        rig.accepted() >= before + 2,
        "{fault:?}: no new connections ({before} accepted before, {} now)",
        rig.accepted()
    );
    // The batch is four commands (none above MDTS); the one the fault hit went twice.
    let commands = rig.reads_and_writes() - commands_before;
    assert!(
        commands > MIXED_BATCH_COMMANDS,
        "{fault:?}: nothing was sent again ({commands} commands for the batch)"
    );
    assert_log(
        &rig.vubd,
        &[
            "NVMe/TCP connection lost",
            cause,
            "controller lost",
            "controller reconnected",
        ],
    );
    rig.assert_region(&model, &format!("after {fault:?}"));
    // And the new connection serves the next batch as usual.
    mixed_batch(&mut rig, &mut model, &mut rng, &format!("after {fault:?}"));
    rig.assert_region(&model, &format!("after {fault:?}, second batch"));
    rig.assert_healthy();
}

#[test]
fn corrupt_data_digest_on_a_read_resets_the_connection_and_the_read_is_resent() {
    recovers_from(Fault::CorruptDataDigest, "?ddgst=1", "malformed PDU");
}

#[test]
fn corrupt_header_digest_resets_the_connection_and_requests_are_resent() {
    recovers_from(Fault::CorruptHeaderDigest, "?hdgst=1", "malformed PDU");
}

#[test]
fn c2h_data_beyond_the_read_buffer_writes_nothing_outside_it_and_the_read_is_resent() {
    recovers_from(Fault::C2hDataOutOfRange, "", "malformed PDU");
}

#[test]
fn c2h_data_for_an_unknown_command_resets_the_connection_and_requests_are_resent() {
    recovers_from(Fault::C2hDataForUnknownCid, "", "malformed PDU");
}

#[test]
fn capsule_resp_for_an_unknown_command_resets_the_connection_and_requests_are_resent() {
    recovers_from(Fault::CapsuleRespUnknownCid, "", "out of sequence");
}

#[test]
fn garbage_pdu_resets_the_connection_and_requests_are_resent() {
    recovers_from(Fault::GarbagePdu, "?hdgst=1&ddgst=1", "malformed PDU");
}

#[test]
fn r2t_beyond_the_write_buffer_is_refused_and_the_write_is_resent() {
    recovers_from(Fault::R2tOutOfRange, "", "malformed PDU");
}

/// A target that stops answering with requests in flight: the I/O timeout notices, whether
/// the poller busy-polls or sleeps, and resets the controller; the requests complete once the
/// target answers again.
fn stall_times_out_and_recovers(poll: PollMode) {
    let config = DaemonConfig {
        num_queues: Some(1),
        poll: Some(poll),
        ..DaemonConfig::default()
    };
    // Keep-alives every 5 s: the I/O timeout, not a keep-alive, notices the stall.
    let mut rig = Rig::start_with(
        Options::default(),
        "",
        &config,
        &[
            "--io-timeout",
            "1",
            "--keep-alive-tmo",
            "10",
            "--reconnect-delay",
            "1",
            "--ctrl-loss-tmo",
            "60",
        ],
    );
    let mut model = rig.fill_region(0xfa_0101);
    let mut rng = Rng::new(0xfa_0102);
    let before = rig.accepted();

    rig.target.set_fault(Fault::Stall);
    let write = rng.bytes(64 * 1024);
    let q = rig.client.queue(0);
    q.submit_write(128 * KIB, &write);
    q.submit_read(512 * KIB, 32 * 1024);
    q.kick();
    wait_for_log(&rig.vubd, "I/O timeout: resetting the controller");
    wait_for_log(&rig.vubd, "controller lost");
    // A reconnection was tried against the stalled target (its ICReq goes unanswered).
    wait_for_log(&rig.vubd, "reconnection failed; retrying");
    assert!(
        rig.accepted() > before,
        "the reset made a new connection to the stalled target"
    );

    rig.target.clear_fault(Fault::Stall);
    let done = rig.client.queue(0).wait_all();
    assert_all_succeeded(&done, "requests in flight across the stall");
    assert_same(
        region_slice(&model, 512 * KIB, 32 * KIB),
        &done[1].data,
        512 * KIB,
        "read in flight across the stall",
    );
    model[128 * KIB as usize..][..write.len()].copy_from_slice(&write);
    assert_log(&rig.vubd, &["controller reconnected"]);
    rig.assert_region(&model, "after the stall");
    rig.assert_healthy();
}

common::per_poll_mode! {
    #[test]
    fn stalled_target_times_out_resets_the_controller_and_completes_after_the_stall() {
        stall_times_out_and_recovers(POLL);
    }
}

#[test]
fn dropped_connection_recovers_and_requests_on_every_queue_complete() {
    let mut rig = Rig::start(Options::default(), "", 2, QUIET);
    let mut model = rig.fill_region(0xfa_0201);
    let mut rng = Rng::new(0xfa_0202);
    let before = rig.accepted();
    let commands_before = rig.reads_and_writes();

    // The third command from now, on whichever queue gets it, is answered and its connection
    // closed: the other commands in flight on that connection lose their answers, and the
    // other queue's connection goes with the controller.
    rig.target.set_fault(Fault::DropConnection(3));
    let mut writes = Vec::new();
    let mut reads = Vec::new();
    for (i, q) in rig.client.queues_mut().iter_mut().enumerate() {
        let base = i as u64 * (REGION / 2);
        for j in 0..4u64 {
            let offset = base + j * 64 * KIB;
            let data = rng.bytes(16 * 1024);
            q.submit_write(offset, &data);
            writes.push((offset, data));
        }
        for j in 0..4u64 {
            let offset = base + 256 * KIB + j * 32 * KIB;
            q.submit_read(offset, 16 * 1024);
            reads.push(offset);
        }
        q.kick();
    }
    let mut done = Vec::new();
    for (i, q) in rig.client.queues_mut().iter_mut().enumerate() {
        let batch = q.wait_all();
        assert_all_succeeded(&batch, &format!("queue {i}"));
        done.extend(batch.into_iter().skip(4));
    }
    for (d, offset) in done.iter().zip(&reads) {
        assert_same(
            region_slice(&model, *offset, 16 * KIB),
            &d.data,
            *offset,
            "read in flight when the connection dropped",
        );
    }
    for (offset, data) in &writes {
        model[*offset as usize..][..data.len()].copy_from_slice(data);
    }
    let io_queues = rig.io_queues();
    assert!(
        rig.accepted() >= before + 1 + io_queues,
        "a new controller: an admin queue and {io_queues} I/O queues"
    );
    assert!(
        rig.reads_and_writes() - commands_before > 16,
        "commands whose answers were lost were sent again"
    );
    assert_log(
        &rig.vubd,
        &[
            "NVMe/TCP connection lost",
            "controller lost",
            "controller reconnected",
        ],
    );
    rig.assert_region(&model, "after the dropped connection");
    rig.assert_healthy();
}

#[test]
fn target_gone_longer_than_ctrl_loss_tmo_fails_requests_then_serves_again_on_its_return() {
    let mut rig = Rig::start(
        Options::default(),
        "",
        1,
        &[
            "--ctrl-loss-tmo",
            "1",
            "--reconnect-delay",
            "1",
            "--keep-alive-tmo",
            "60",
            "--io-timeout",
            "2",
        ],
    );
    let model = rig.fill_region(0xfa_0301);

    rig.target.pause();
    let started = Instant::now();
    let q = rig.client.queue(0);
    q.submit_read(0, 4096);
    q.submit_write(64 * KIB, &[0x5a; 4096]);
    let done = q.wait_all();
    for (d, what) in done.iter().zip(["read", "write"]) {
        assert_eq!(
            d.ret,
            -libc::EIO,
            "a {what} while the target is gone for good fails: {}",
            describe_ret(d.ret)
        );
    }
    // Held while the controller was being reconnected, failed once --ctrl-loss-tmo (1 s,
    // counted from the loss, a moment before `started`) had passed.
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(500),
        "requests failed after {waited:?}, before --ctrl-loss-tmo"
    );
    wait_for_log(&rig.vubd, "longer than --ctrl-loss-tmo");
    // New requests fail at once while the controller stays lost.
    assert_eq!(rig.client.queue(0).try_read(0, 4096), Err(-libc::EIO));
    rig.assert_healthy();

    rig.target.resume().expect("resume the target");
    // Reconnection is tried every --reconnect-delay; I/O works again once it succeeded.
    let deadline = Instant::now() + TIMEOUT;
    let back = loop {
        match rig.client.queue(0).try_read(0, 64 * 1024) {
            Ok(data) => break data,
            Err(e) => {
                assert!(
                    Instant::now() < deadline,
                    "no recovery within {TIMEOUT:?} of the target's return: {}",
                    describe_ret(e)
                );
                thread::sleep(Duration::from_millis(50));
            }
        }
    };
    assert_same(&model[..64 * 1024], &back, 0, "read after the return");
    assert_log(&rig.vubd, &["controller reconnected"]);
    // The failed write moved nothing.
    rig.assert_region(&model, "after the return");
    rig.assert_healthy();
}

#[test]
fn target_gone_shorter_than_ctrl_loss_tmo_completes_requests_after_its_return() {
    let mut rig = Rig::start(
        Options::default(),
        "",
        1,
        &[
            "--ctrl-loss-tmo",
            "30",
            "--reconnect-delay",
            "1",
            "--keep-alive-tmo",
            "60",
            "--io-timeout",
            "2",
        ],
    );
    let mut model = rig.fill_region(0xfa_0401);
    let mut rng = Rng::new(0xfa_0402);
    let before = rig.accepted();

    rig.target.pause();
    let write = rng.bytes(96 * 1024);
    let q = rig.client.queue(0);
    q.submit_write(256 * KIB, &write);
    q.submit_read(0, 64 * 1024);
    q.kick();
    wait_for_log(&rig.vubd, "controller lost");
    // At least one reconnection failed while the target was gone: the requests waited.
    wait_for_log(&rig.vubd, "reconnection failed; retrying");
    rig.target.resume().expect("resume the target");

    let done = rig.client.queue(0).wait_all();
    assert_all_succeeded(&done, "requests issued while the target was gone");
    assert!(
        rig.accepted() >= before + 2,
        "a new controller on the returned target"
    );
    assert_same(
        &model[..64 * 1024],
        &done[1].data,
        0,
        "read issued while gone",
    );
    model[256 * KIB as usize..][..write.len()].copy_from_slice(&write);
    assert_log(&rig.vubd, &["controller reconnected"]);
    let log = rig.vubd.output();
    assert!(
        !log.contains("longer than --ctrl-loss-tmo"),
        "the controller was never given up:\n{log}"
    );
    rig.assert_region(&model, "after the return");
    rig.assert_healthy();
}

#[test]
fn refused_reconnections_are_retried_until_the_target_accepts_again() {
    let mut rig = Rig::start(Options::default(), "", 1, QUIET);
    let mut model = rig.fill_region(0xfa_0501);
    let mut rng = Rng::new(0xfa_0502);

    rig.target.set_fault(Fault::RefuseConnections);
    // The next command breaks the connection; every reconnection is refused.
    rig.target.set_fault(Fault::DropConnection(1));
    let write = rng.bytes(32 * 1024);
    let q = rig.client.queue(0);
    q.submit_write(512 * KIB, &write);
    q.submit_read(0, 32 * 1024);
    q.kick();
    wait_until("two refused reconnections", || {
        rig.target.counters().connections_refused >= 2
    });
    wait_for_log(&rig.vubd, "reconnection failed; retrying");
    rig.target.clear_fault(Fault::RefuseConnections);

    let done = rig.client.queue(0).wait_all();
    assert_all_succeeded(&done, "requests in flight while connections were refused");
    assert_same(&model[..32 * 1024], &done[1].data, 0, "read");
    model[512 * KIB as usize..][..write.len()].copy_from_slice(&write);
    assert_log(&rig.vubd, &["controller lost", "controller reconnected"]);
    rig.assert_region(&model, "after the refusals");
    rig.assert_healthy();
}

#[test]
fn a_failed_command_fails_only_its_request_and_resets_nothing() {
    let mut rig = Rig::start(Options::default(), "", 1, QUIET);
    let model = rig.fill_region(0xfa_0601);
    let before = rig.accepted();

    for (status, what) in [
        (
            Status::new(sct::MEDIA, sc::UNRECOVERED_READ_ERROR, true),
            "read",
        ),
        (Status::new(sct::MEDIA, sc::WRITE_FAULT, true), "write"),
    ] {
        rig.target.set_fault(Fault::FailIo(status));
        let q = rig.client.queue(0);
        let failed = match what {
            "read" => q.try_read(0, 4096).map(drop),
            _ => q.try_write(0, &[0x33; 4096]),
        };
        assert_eq!(
            failed,
            Err(-libc::EIO),
            "the {what} fails with an I/O error"
        );
        // The next request succeeds, on the same connection.
        assert_same(&model[..4096], &q.read(0, 4096), 0, "the next read");
    }
    assert_eq!(rig.accepted(), before, "no new connection");
    let log = rig.vubd.output();
    assert!(!log.contains("controller lost"), "no reset:\n{log}");
    // The failed write moved nothing.
    rig.assert_region(&model, "after the failed commands");
    rig.assert_healthy();
}

/// Runs vubd on `disk` (plus `extra` arguments) expecting it to fail at startup: exit status
/// 2 and one line on stderr, which contains `what`.
#[track_caller]
fn assert_startup_error(disk: &str, extra: &[&str], what: &str) {
    let dir = tempfile::tempdir().expect("socket directory");
    let socket = dir.path().join("unused.sock");
    let mut args: Vec<&OsStr> = vec![
        "--socket-path".as_ref(),
        socket.as_os_str(),
        "--disk".as_ref(),
        disk.as_ref(),
    ];
    args.extend(extra.iter().map(OsStr::new));
    let out = run_vubd(&args);
    assert_eq!(out.status.code(), Some(2), "{disk}: {}", out.stderr);
    let line = out.stderr.trim_end();
    assert_eq!(line.lines().count(), 1, "{disk}: one line: {line}");
    assert!(line.contains(what), "{disk}: {what:?} expected in: {line}");
}

#[test]
fn startup_errors_are_one_line_and_exit_status_2() {
    // Nothing listens on a port just freed.
    let port = {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
        l.local_addr().expect("local address").port()
    };
    assert_startup_error(
        &format!("nvme-tcp://127.0.0.1:{port}/nqn.2014-08.org.example:none"),
        &[],
        "connection refused",
    );

    let host = "nqn.2014-08.org.vubd:allowed-host";
    let target = FakeTarget::start(Options {
        allowed_hosts: Some(vec![host.to_owned()]),
        ..Options::default()
    })
    .expect("start the fake target");
    assert_startup_error(
        &format!(
            "nvme-tcp://{}/nqn.2014-08.org.example:not-there",
            target.addr()
        ),
        &["--hostnqn", host],
        "not found",
    );
    assert_startup_error(
        &uri(&target, ""),
        &["--hostnqn", "nqn.2014-08.org.vubd:another-host"],
        "refuses host NQN nqn.2014-08.org.vubd:another-host",
    );
    assert_startup_error(
        &uri(&target, "?nsid=9"),
        &["--hostnqn", host],
        "namespace 9 not found",
    );
    assert_eq!(target.counters().panics, 0);
}

/// Each of `faults` in turn, persistent, while requests are in flight: every connection
/// breaks, every reconnection too, and vubd keeps trying without crashing; once the fault is
/// cleared, the requests complete with the right data.
fn survives_persistent(faults: &[Fault], seed: u64) {
    let mut rig = Rig::start(Options::default(), "?hdgst=1&ddgst=1", 1, QUIET);
    let mut model = rig.fill_region(seed);
    let mut rng = Rng::new(seed + 1);
    let failures = |rig: &Rig| rig.vubd.output().matches("reconnection failed").count();

    for &fault in faults {
        let before = rig.accepted();
        let failed_before = failures(&rig);
        rig.target.set_fault_persistent(fault);
        let write = rng.bytes(16 * 1024);
        let q = rig.client.queue(0);
        q.submit_write(768 * KIB, &write);
        q.submit_read(0, 16 * 1024);
        q.kick();
        // Two reconnection attempts (the first at once, the next --reconnect-delay later).
        wait_until(&format!("{fault:?}: two new connections"), || {
            rig.target.counters().connections_accepted >= before + 2
        });
        assert!(
            failures(&rig) > failed_before,
            "{fault:?}: a reconnection failed:\n{}",
            rig.vubd.output()
        );
        rig.assert_healthy();

        rig.target.clear_fault(fault);
        let done = rig.client.queue(0).wait_all();
        assert_all_succeeded(&done, &format!("requests in flight under {fault:?}"));
        assert_same(&model[..16 * 1024], &done[1].data, 0, &format!("{fault:?}"));
        model[768 * KIB as usize..][..write.len()].copy_from_slice(&write);
        rig.assert_region(&model, &format!("after {fault:?}"));
    }
    rig.assert_healthy();
}

#[test]
fn repeated_garbage_or_bad_digests_never_crash_vubd_and_io_resumes_once_they_stop() {
    survives_persistent(
        &[
            Fault::GarbagePdu,
            Fault::CorruptHeaderDigest,
            Fault::CorruptDataDigest,
        ],
        0xfa_0701,
    );
}

#[test]
fn repeated_out_of_range_or_unknown_command_answers_never_crash_vubd_and_io_resumes() {
    survives_persistent(
        &[
            Fault::C2hDataOutOfRange,
            Fault::C2hDataForUnknownCid,
            Fault::CapsuleRespUnknownCid,
        ],
        0xfa_0801,
    );
}

/// Not a fault: the baseline the fault tests stand on. A write larger than MDTS (128 KiB
/// here) is split into several commands, and with no in-capsule data and a 4 KiB MAXH2CDATA
/// each command's data goes as one R2T answered by many H2CData PDUs (the target refuses
/// any PDU over MAXH2CDATA); with both digests on, the data lands whole.
#[test]
fn large_writes_split_at_mdts_and_go_in_maxh2cdata_pieces() {
    let opts = Options {
        maxh2cdata: 4096,
        ioccsz: 4,
        ..Options::default()
    };
    let mut rig = Rig::start(opts, "?hdgst=1&ddgst=1", 1, QUIET);
    let data = Rng::new(0x4d75).bytes(512 * 1024);
    rig.client.queue(0).write(0, &data);
    assert_same(
        &data,
        &rig.target.read_namespace(0, data.len()),
        0,
        "namespace",
    );
    let back = rig.client.queue(0).read(0, data.len());
    assert_same(&data, &back, 0, "read back through vubd");
    let c = rig.target.counters();
    assert_eq!(
        c.io(io_opc::WRITE),
        4,
        "512 KiB in commands of at most 128 KiB"
    );
    assert_eq!(c.r2ts_sent, 4, "every write's data by R2T");
    assert_eq!(c.io(io_opc::READ), 4);
    assert_eq!(c.bytes_written, data.len() as u64);
    rig.vubd.assert_running();
}
