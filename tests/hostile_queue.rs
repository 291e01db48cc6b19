//! A hostile guest, or a frontend a guest has taken over, against one device of a vubd that
//! serves two on one poller (`--cpus` with one CPU, `--poll never`): device 0 is the victim,
//! device 1 the attacker, both through our own frontend (`common/frontend.rs`).
//!
//! Each case breaks a rule of the ring or of the protocol and checks that the attack is
//! contained: vubd keeps running, the victim's writes read back the same while the attack goes
//! on and after it, the attack causes a bounded number of log lines, the poller uses no CPU
//! once it is over (a broken queue is not spun on, and its kicks wake nobody), and where a
//! queue broke, its error eventfd (SET_VRING_ERR) was signalled. What breaks a queue, and
//! what only fails a request, is in docs/security.md ("A broken queue").

mod common;
#[path = "common/frontend.rs"]
mod frontend;

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use common::daemon::{Daemon, socket_listening};
use common::fake_target::{FakeTarget, Fault, Options as TargetOptions};
use common::{Image, TIMEOUT, procfs};
use frontend::{
    BLOCK, BlkFrontend, Completion, DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE, FdKind,
    FrontendError, Options, Request, STATUS_OK,
};
use tempfile::TempDir;
use vhost::VhostBackend;
use vmm_sys_util::eventfd::EventFd;

const MIB: u64 = 1 << 20;
/// How long an attack lasts while the victim does I/O.
const ATTACK: Duration = Duration::from_secs(3);
/// Log lines an attack may cause in that time (the break itself is one).
const MAX_ATTACK_LINES: usize = 10;
/// CPU time the poller may use in an idle second after an attack (a few wake-ups at most;
/// a poller that spins on a broken queue uses the whole second).
const MAX_IDLE_CPU: Duration = Duration::from_millis(50);
/// The attacker's device.
const ATTACKER: usize = 1;

/// vubd serving a victim and an attacker device on one poller, with their images.
struct Lab {
    daemon: Daemon,
    sockets: [PathBuf; 2],
    _images: [Image; 2],
    _dir: TempDir,
}

impl Lab {
    /// Both devices on image files.
    fn start() -> Self {
        Self::start_with(None)
    }

    /// The attacker's device on `attacker_disk` (a `disk=` value) if given, else on an image
    /// file; the victim's on an image file.
    fn start_with(attacker_disk: Option<&str>) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let images = [Image::new(8 * MIB), Image::new(8 * MIB)];
        let sockets = [0, 1].map(|i| dir.path().join(format!("dev{i}.sock")));
        let cpu = procfs::own_cpus()[0];
        let mut args: Vec<OsString> = vec![
            "--poll".into(),
            "never".into(),
            "--cpus".into(),
            cpu.to_string().into(),
            // Requests a stalled target holds stay in flight for the whole test.
            "--io-timeout".into(),
            "60".into(),
        ];
        for (i, (socket, image)) in sockets.iter().zip(&images).enumerate() {
            let text = |p: &Path| p.to_str().expect("UTF-8 temporary path").replace(',', ",,");
            let disk = match attacker_disk {
                Some(d) if i == ATTACKER => d.to_owned(),
                _ => text(image.path()),
            };
            args.push("--device".into());
            args.push(format!("socket={},disk={disk}", text(socket)).into());
        }
        let args: Vec<&OsStr> = args.iter().map(OsString::as_os_str).collect();
        let daemon = Daemon::vubd_with_args(&args, &sockets[0]);
        let deadline = Instant::now() + TIMEOUT;
        while !socket_listening(&sockets[1]) {
            assert!(Instant::now() < deadline, "{}", daemon.output());
            thread::sleep(Duration::from_millis(5));
        }
        Self {
            daemon,
            sockets,
            _images: images,
            _dir: dir,
        }
    }

    fn victim(&self) -> BlkFrontend {
        let opts = Options {
            inflight: false,
            ..Options::new(1)
        };
        BlkFrontend::connect(&self.sockets[0], opts)
            .unwrap_or_else(|e| panic!("victim connect: {e}\n{}", self.daemon.output()))
    }

    /// The attacker's frontend with `opts` (an error eventfd by default), or why it could
    /// not start.
    fn try_attacker(&self, opts: Options) -> Result<BlkFrontend, FrontendError> {
        BlkFrontend::connect(&self.sockets[ATTACKER], opts)
    }

    fn attacker(&self) -> BlkFrontend {
        self.try_attacker(attacker_options())
            .unwrap_or_else(|e| panic!("attacker connect: {e}\n{}", self.daemon.output()))
    }

    /// Waits until the log says `needle` (the session thread logs a refusal after the
    /// frontend has its answer); panics after [`TIMEOUT`].
    fn wait_for_log(&self, needle: &str) {
        let deadline = Instant::now() + TIMEOUT;
        while !self.daemon.output().contains(needle) {
            assert!(
                Instant::now() < deadline,
                "the log never said {needle:?}\n{}",
                tail(&self.daemon.output())
            );
            thread::sleep(Duration::from_millis(10));
        }
    }

    fn lines(&self) -> usize {
        self.daemon.output().lines().count()
    }

    /// CPU time of the poller thread so far.
    fn poller_cpu(&self) -> Duration {
        procfs::thread_cpu_times(self.daemon.pid())
            .into_iter()
            .find(|(name, _)| name.starts_with("vubd-poller"))
            .map(|(_, t)| t)
            .unwrap_or_else(|| panic!("no poller thread\n{}", self.daemon.output()))
    }
}

fn attacker_options() -> Options {
    Options {
        inflight: false,
        err_fd: true,
        ..Options::new(1)
    }
}

/// Waits for the request `tag` of queue 0 to complete, up to `timeout`; the completion and
/// what its buffer held.
fn wait_for(
    fe: &mut BlkFrontend,
    tag: u64,
    timeout: Duration,
) -> Result<(Completion, Vec<u8>), String> {
    let deadline = Instant::now() + timeout;
    loop {
        let mut found = None;
        fe.reap(0, |c, data| {
            if c.tag == tag {
                found = Some((c, data.to_vec()));
            }
        })
        .map_err(|e| format!("reap: {e}"))?;
        if let Some(f) = found {
            return Ok(f);
        }
        if Instant::now() >= deadline {
            return Err(format!("request {tag} not completed within {timeout:?}"));
        }
        fe.wait(Duration::from_millis(20))
            .map_err(|e| format!("wait: {e}"))?;
    }
}

/// Writes a pattern of `round` at a sector of its own and reads it back.
fn verified_round(fe: &mut BlkFrontend, round: u64, timeout: Duration) -> Result<(), String> {
    let sector = (round % 1024) * (BLOCK as u64 / 512);
    let pattern: Vec<u8> = (0..BLOCK)
        .map(|i| (i as u64 ^ round.wrapping_mul(0x9e37_79b9)) as u8)
        .collect();
    let tag = round * 2;
    let write = Request::Write {
        sector,
        data: &pattern,
    };
    fe.submit(0, write, tag).map_err(|e| e.to_string())?;
    fe.notify(0).map_err(|e| e.to_string())?;
    let (c, _) = wait_for(fe, tag, timeout)?;
    if c.status != STATUS_OK {
        return Err(format!("write of round {round}: status {}", c.status));
    }
    let read = Request::Read { sector, len: BLOCK };
    fe.submit(0, read, tag + 1).map_err(|e| e.to_string())?;
    fe.notify(0).map_err(|e| e.to_string())?;
    let (c, data) = wait_for(fe, tag + 1, timeout)?;
    if c.status != STATUS_OK || data != pattern {
        return Err(format!(
            "read of round {round}: status {}, same data: {}",
            c.status,
            data == pattern
        ));
    }
    Ok(())
}

/// What an attack did, as [`contain`] measured it.
#[derive(Debug)]
struct Contained {
    /// Verified rounds of the victim during the attack.
    victim_rounds: u64,
    /// Log lines from the start of the attack to its end.
    lines: usize,
    /// The poller's CPU time in an idle second after it (the attacker still kicking).
    idle_cpu: Duration,
}

/// Runs the victim's I/O for [`ATTACK`] while `kick` (the attacker's kick eventfd, if any) is
/// kicked every millisecond, then measures an idle second; `lines_before` is the log's length
/// when the attack started. Panics if the victim fails or vubd is gone.
fn contain(
    lab: &mut Lab,
    victim: &mut BlkFrontend,
    kick: Option<EventFd>,
    lines_before: usize,
) -> Contained {
    let stop = AtomicBool::new(false);
    let (victim_rounds, idle_cpu) = thread::scope(|s| {
        if let Some(kick) = &kick {
            s.spawn(|| {
                while !stop.load(Ordering::Relaxed) {
                    let _ = kick.write(1);
                    thread::sleep(Duration::from_millis(1));
                }
            });
        }
        let end = Instant::now() + ATTACK;
        let mut rounds = 0;
        while Instant::now() < end {
            if let Err(e) = verified_round(victim, 1000 + rounds, TIMEOUT) {
                stop.store(true, Ordering::Relaxed);
                panic!(
                    "the victim failed during the attack: {e}\n{}",
                    tail(&lab.daemon.output())
                );
            }
            rounds += 1;
        }
        let before = lab.poller_cpu();
        thread::sleep(Duration::from_secs(1));
        let idle_cpu = lab.poller_cpu().saturating_sub(before);
        stop.store(true, Ordering::Relaxed);
        (rounds, idle_cpu)
    });
    let lines = lab.lines().saturating_sub(lines_before);
    lab.daemon.assert_running();
    verified_round(victim, 5000, TIMEOUT)
        .unwrap_or_else(|e| panic!("the victim after the attack: {e}"));
    Contained {
        victim_rounds,
        lines,
        idle_cpu,
    }
}

/// The last lines of a log, for failure messages (a spinning poller writes millions).
fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    let from = lines.len().saturating_sub(40);
    format!(
        "({} lines of vubd output; the last ones:)\n{}",
        lines.len(),
        lines[from..].join("\n")
    )
}

/// What an attack that breaks a queue must not do, given whether the error eventfd was
/// signalled: every rule it broke.
fn uncontained(c: &Contained, signalled: bool) -> Vec<String> {
    let mut problems = Vec::new();
    if !signalled {
        problems.push("the error eventfd was not signalled".to_owned());
    }
    if c.victim_rounds == 0 {
        problems.push("the victim made no progress".to_owned());
    }
    if c.lines > MAX_ATTACK_LINES {
        problems.push(format!("{} log lines in {ATTACK:?}", c.lines));
    }
    if c.idle_cpu > MAX_IDLE_CPU {
        problems.push(format!(
            "the poller used {:?} of an idle second",
            c.idle_cpu
        ));
    }
    problems
}

/// Panics with `problems`, if there are any.
fn assert_none(lab: &Lab, what: &str, problems: &[String]) {
    assert!(
        problems.is_empty(),
        "{what}: {}\n{}",
        problems.join("; "),
        tail(&lab.daemon.output())
    );
}

/// Breaks the attacker's queue with `inject`, checks that its error eventfd is signalled and
/// that the attack is contained, and returns the log.
fn break_queue(what: &str, opts: Options, inject: impl FnOnce(&mut BlkFrontend)) -> String {
    let mut lab = Lab::start();
    let mut victim = lab.victim();
    verified_round(&mut victim, 1, TIMEOUT).expect("victim before the attack");
    let mut attacker = lab
        .try_attacker(opts)
        .unwrap_or_else(|e| panic!("attacker connect: {e}\n{}", lab.daemon.output()));
    // The attacker's queue works before it is broken.
    verified_round(&mut attacker, 1, TIMEOUT).expect("attacker before the attack");
    let lines_before = lab.lines();
    inject(&mut attacker);
    broken_and_contained(&mut lab, &mut victim, &attacker, what, lines_before)
}

/// Checks that the attacker's queue 0 broke (its error eventfd signalled, one log line) and
/// that the attack is contained ([`contain`], [`uncontained`]) since the log had
/// `lines_before` lines; returns the log.
fn broken_and_contained(
    lab: &mut Lab,
    victim: &mut BlkFrontend,
    attacker: &BlkFrontend,
    what: &str,
    lines_before: usize,
) -> String {
    let signalled = attacker.error_signalled(0, Duration::from_secs(2));
    let kick = attacker.kick_fd(0);
    let c = contain(lab, victim, Some(kick), lines_before);
    assert_none(lab, what, &uncontained(&c, signalled));
    let log = lab.daemon.output();
    assert_eq!(
        log.matches("queue broken").count(),
        1,
        "{what}: one line says the queue broke\n{}",
        tail(&log)
    );
    log
}

#[test]
fn avail_index_out_of_range_breaks_the_queue_with_one_line() {
    let log = break_queue("avail index + 1000", attacker_options(), |fe| {
        let idx = fe.avail_idx(0).wrapping_add(1000);
        fe.force_avail_idx(0, idx).expect("publish");
    });
    assert!(log.contains("more than the ring holds"), "{}", tail(&log));
}

#[test]
fn avail_entry_naming_a_head_past_the_table_breaks_the_queue() {
    let log = break_queue("head 300 of 256", attacker_options(), |fe| {
        fe.push_head(0, 300);
        fe.notify(0).expect("notify");
    });
    assert!(
        log.contains("names head 300, outside the table"),
        "{}",
        tail(&log)
    );
}

#[test]
fn descriptor_loop_without_a_status_byte_breaks_the_queue() {
    let log = break_queue("descriptor loop", attacker_options(), |fe| {
        let s = fe.take_slot(0, 77).expect("slot");
        // Header, then a writable data buffer whose `next` goes back to the header.
        fe.put_desc(0, s.head, (s.hdr, 16, DESC_F_NEXT, s.head + 1));
        let data = (s.data, BLOCK as u32, DESC_F_WRITE | DESC_F_NEXT, s.head);
        fe.put_desc(0, s.head + 1, data);
        fe.push_head(0, s.head);
        fe.notify(0).expect("notify");
    });
    assert!(
        log.contains("cannot be followed to its end"),
        "{}",
        tail(&log)
    );
}

/// 65,535 entries, the most an indirect descriptor can describe, chained into a read that
/// ends with a proper status byte: a chain longer than the queue, cut short after the
/// queue's worth of reads (or the parser's 262, the larger), and the queue broken, instead of
/// 65,535 descriptors walked for each such request.
#[test]
fn indirect_table_of_65535_entries_breaks_the_queue_quickly() {
    const ENTRIES: usize = 65_535;
    let opts = Options {
        extra_memory: ENTRIES * 16,
        ..attacker_options()
    };
    let log = break_queue("65,535-entry indirect table", opts, |fe| {
        let s = fe.take_slot(0, 77).expect("slot");
        fe.put_extra_desc(0, (s.hdr, 16, DESC_F_NEXT, 1));
        for i in 1..ENTRIES - 1 {
            let next = u16::try_from(i + 1).expect("fits");
            fe.put_extra_desc(i, (s.data, 512, DESC_F_WRITE | DESC_F_NEXT, next));
        }
        fe.put_extra_desc(ENTRIES - 1, (s.status, 1, DESC_F_WRITE, 0));
        let table_len = u32::try_from(ENTRIES * 16).expect("fits");
        fe.put_desc(0, s.head, (fe.extra_gpa(), table_len, DESC_F_INDIRECT, 0));
        fe.push_head(0, s.head);
        fe.notify(0).expect("notify");
    });
    assert!(
        log.contains("cannot be followed to its end"),
        "{}",
        tail(&log)
    );
}

/// A head made available again while its request is still in flight (QEMU's "Virtqueue size
/// exceeded"): the attacker's disk is an NVMe/TCP namespace whose target stops answering, so
/// its two reads stay in flight while the driver makes the first one's head available seven
/// more times. The chains in use reach the ring's 8 entries after six, and the seventh
/// breaks the queue (a file disk completes too fast for chains to pile up).
#[test]
fn a_head_made_available_again_while_in_flight_breaks_the_queue() {
    let target = FakeTarget::start(TargetOptions::default()).expect("start the fake target");
    let uri = format!("nvme-tcp://{}/{}", target.addr(), target.nqn());
    let mut lab = Lab::start_with(Some(&uri));
    let mut victim = lab.victim();
    verified_round(&mut victim, 1, TIMEOUT).expect("victim before the attack");
    let opts = Options {
        queue_size: 8,
        ..attacker_options()
    };
    let mut fe = lab
        .try_attacker(opts)
        .unwrap_or_else(|e| panic!("attacker connect: {e}\n{}", lab.daemon.output()));
    verified_round(&mut fe, 1, TIMEOUT).expect("attacker before the attack");
    target.set_fault(Fault::Stall);
    let first = fe
        .submit(
            0,
            Request::Read {
                sector: 0,
                len: BLOCK,
            },
            10,
        )
        .expect("submit");
    fe.submit(
        0,
        Request::Read {
            sector: 8,
            len: BLOCK,
        },
        11,
    )
    .expect("submit");
    fe.notify(0).expect("notify");
    // Both reads taken (and held by the target) before the duplicates come.
    thread::sleep(Duration::from_millis(300));
    let lines_before = lab.lines();
    for _ in 0..7 {
        fe.push_head(0, first);
    }
    fe.notify(0).expect("notify");
    let what = "a head made available again while in flight";
    let log = broken_and_contained(&mut lab, &mut victim, &fe, what, lines_before);
    assert!(
        log.contains("8 chains in use on a ring of 8"),
        "{}",
        tail(&log)
    );
    target.clear_fault(Fault::Stall);
    lab.daemon.assert_running();
}

/// A frontend stops a broken ring (GET_VRING_BASE answers, after the requests it made
/// available before the bad entry have completed, and says where the ring stopped: at the
/// bad entry), starts it again with a sane state, and the device serves it again.
#[test]
fn a_broken_queue_with_requests_in_flight_stops_and_starts_again() {
    let mut lab = Lab::start();
    let mut victim = lab.victim();
    let mut fe = lab.attacker();
    // Eight writes, then an entry naming no descriptor, all made available at once: the
    // poller starts the writes and breaks the queue in one pass, with the writes in flight.
    let data = vec![0x5a; BLOCK];
    for i in 0..8u64 {
        let write = Request::Write {
            sector: i * 8,
            data: &data,
        };
        fe.submit(0, write, i).expect("submit");
    }
    fe.push_head(0, 1000);
    let lines_before = lab.lines();
    fe.notify(0).expect("notify");
    let signalled = fe.error_signalled(0, Duration::from_secs(2));
    // Stopped at once: the writes may still be in flight, and the answer waits for them.
    let base = fe.stop_queue(0).expect("GET_VRING_BASE answers");
    let kick = fe.kick_fd(0);
    let c = contain(&mut lab, &mut victim, Some(kick), lines_before);
    let what = "a bad entry after eight writes";
    assert_none(&lab, what, &uncontained(&c, signalled));
    assert_eq!(base, 8, "the ring stopped at the bad entry");
    let mut done = Vec::new();
    fe.reap(0, |c, _| done.push((c.tag, c.status)))
        .expect("reap");
    done.sort_unstable();
    let want: Vec<(u64, u8)> = (0..8).map(|i| (i, STATUS_OK)).collect();
    assert_eq!(done, want, "every write before the bad entry completed");
    let log = lab.daemon.output();
    // The channel submits after the pass that popped them: all eight were in flight.
    assert!(
        log.lines()
            .any(|l| l.contains("queue broken") && l.contains("in_flight=8")),
        "{}",
        tail(&log)
    );
    fe.restart_ring(0).expect("restart the ring");
    for round in 0..4 {
        verified_round(&mut fe, round, TIMEOUT)
            .unwrap_or_else(|e| panic!("after the restart: {e}\n{}", tail(&lab.daemon.output())));
    }
    let log = lab.daemon.output();
    assert!(
        log.contains("queue detached device=1 queue=0 broken=true"),
        "{}",
        tail(&log)
    );
    lab.daemon.assert_running();
}

/// Ring sizes a split ring cannot have: refused at SET_VRING_NUM (the session ends), vubd
/// unharmed, and the device serves a sane frontend afterwards.
#[test]
fn odd_ring_sizes_are_refused_at_set_vring_num() {
    let mut lab = Lab::start();
    let mut victim = lab.victim();
    let lines_before = lab.lines();
    for size in [100, 200, 512] {
        let opts = Options {
            queue_size: size,
            ..attacker_options()
        };
        match lab.try_attacker(opts) {
            Err(FrontendError::Vhost(_)) => {}
            Err(e) => panic!("size {size}: {e}"),
            Ok(_) => panic!(
                "a ring of {size} entries was accepted\n{}",
                tail(&lab.daemon.output())
            ),
        }
        verified_round(&mut victim, u64::from(size), TIMEOUT).expect("victim");
    }
    // Size 0 on an otherwise sane connection.
    let mut fe = lab.attacker();
    let refused = fe.vhost().expect("connected").set_vring_num(0, 0);
    assert!(refused.is_err(), "a ring of 0 entries was accepted");
    let c = contain(&mut lab, &mut victim, None, lines_before);
    assert!(c.victim_rounds > 0);
    // Each refused session: its start, its refusal and its end, and for the last one its
    // queue and the image's lock coming and going: a few lines per connection.
    assert!(
        c.lines <= 4 * 5,
        "{} lines\n{}",
        c.lines,
        tail(&lab.daemon.output())
    );
    assert!(c.idle_cpu <= MAX_IDLE_CPU, "{:?}", c.idle_cpu);
    let mut fe = lab.attacker();
    verified_round(&mut fe, 1, TIMEOUT).expect("a sane frontend afterwards");
}

/// A pipe as the call fd: refused at SET_VRING_CALL, with a line that says so. Accepted, it
/// would block the poller (and the victim with it) once ~8,000 interrupts filled the pipe.
#[test]
fn pipe_as_call_fd_is_refused_and_cannot_stall_the_poller() {
    let mut lab = Lab::start();
    let mut victim = lab.victim();
    let opts = Options {
        call_fd: FdKind::Pipe,
        ..attacker_options()
    };
    let accepted = lab.try_attacker(opts);
    if let Ok(mut fe) = accepted {
        // What the refusal prevents: interrupts written to a pipe nobody reads.
        for round in 0..9000 {
            let read = Request::Read {
                sector: 0,
                len: 512,
            };
            fe.submit(0, read, round).expect("submit");
            fe.notify(0).expect("notify");
            if wait_for_polling(&mut fe, round).is_err() {
                break;
            }
        }
        let victim_ok = verified_round(&mut victim, 1, Duration::from_secs(5));
        panic!(
            "a pipe was accepted as the call fd; the victim after ~9,000 attacker requests: \
             {victim_ok:?}\n{}",
            tail(&lab.daemon.output())
        );
    }
    lab.wait_for_log("SET_VRING_CALL refused for vring 0: the fd is a pipe, not an eventfd");
    let c = contain(&mut lab, &mut victim, None, 0);
    assert!(c.victim_rounds > 0);
    assert!(c.idle_cpu <= MAX_IDLE_CPU, "{:?}", c.idle_cpu);
    let mut fe = lab.attacker();
    verified_round(&mut fe, 1, TIMEOUT).expect("a sane frontend afterwards");
}

/// A blocking call eventfd at its maximum count, which the frontend never reads: vubd made it
/// non-blocking when it arrived, so each interrupt it cannot deliver is counted (one warning
/// line, rate-limited) instead of blocking the poller, and the attacker's own requests still
/// complete in its used ring.
#[test]
fn a_full_blocking_call_eventfd_costs_interrupts_not_the_poller() {
    let mut lab = Lab::start();
    let mut victim = lab.victim();
    let opts = Options {
        call_fd: FdKind::FullEventfd,
        ..attacker_options()
    };
    let mut fe = lab
        .try_attacker(opts)
        .unwrap_or_else(|e| panic!("attacker connect: {e}\n{}", lab.daemon.output()));
    let nonblocking = fe.call_fd_nonblocking(0);
    let lines_before = lab.lines();
    let mut completed = 0;
    for round in 0..200 {
        let read = Request::Read {
            sector: 0,
            len: 512,
        };
        fe.submit(0, read, round).expect("submit");
        fe.notify(0).expect("notify");
        if wait_for_polling(&mut fe, round).is_err() {
            break;
        }
        completed += 1;
    }
    let c = contain(&mut lab, &mut victim, None, lines_before);
    let mut problems = uncontained(&c, true);
    if completed < 200 {
        problems.push(format!(
            "the attacker's request {completed} never completed"
        ));
    }
    if !nonblocking {
        problems.push("the call fd is still blocking".to_owned());
    }
    assert_none(&lab, "a full call eventfd", &problems);
    let log = lab.daemon.output();
    assert!(log.contains("does not take interrupts"), "{}", tail(&log));
}

/// A pipe as the kick fd: refused at SET_VRING_KICK.
#[test]
fn pipe_as_kick_fd_is_refused() {
    let mut lab = Lab::start();
    let mut victim = lab.victim();
    let opts = Options {
        kick_fd: FdKind::Pipe,
        ..attacker_options()
    };
    assert!(
        lab.try_attacker(opts).is_err(),
        "a pipe was accepted as the kick fd\n{}",
        tail(&lab.daemon.output())
    );
    lab.wait_for_log("SET_VRING_KICK refused for vring 0: the fd is a pipe, not an eventfd");
    let c = contain(&mut lab, &mut victim, None, 0);
    assert!(c.victim_rounds > 0);
    let mut fe = lab.attacker();
    verified_round(&mut fe, 1, TIMEOUT).expect("a sane frontend afterwards");
}

/// Waits up to 1 s for request `tag` of a frontend whose call fd is a pipe: polls the used
/// ring (reading the pipe would drain what the attack fills).
fn wait_for_polling(fe: &mut BlkFrontend, tag: u64) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(1);
    loop {
        let mut found = false;
        fe.reap(0, |c, _| found |= c.tag == tag)
            .map_err(|e| e.to_string())?;
        if found {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!("request {tag} not completed"));
        }
        thread::sleep(Duration::from_micros(50));
    }
}
