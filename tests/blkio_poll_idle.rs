//! What an idle disk costs: with a frontend connected but quiet, adaptive and event-driven
//! pollers sleep (vubd's CPU time barely grows) and wake as soon as the next request comes;
//! busy-polling ones keep a CPU busy, which shows that the measurement can tell the two apart,
//! until their frontend leaves. These always run vubd, whatever `VUBD_TEST_BACKEND` says.
//!
//! CPU time is `utime + stime` of `/proc/PID/stat`, all threads together, in clock ticks
//! (10 ms with the usual `USER_HZ`), charged by sampling: a thread that runs briefly may be
//! charged a whole tick. The idle budget, 5% of one CPU over [`IDLE`] (100 ms, ten ticks), is
//! far above what sleeping threads and the odd wake-up are charged and far below what a poller
//! costs that does not sleep (the busy-polling control uses more than half a CPU), or that
//! spins even a twentieth of the time.

mod common;

use std::thread;
use std::time::{Duration, Instant};

use common::client::{Client, Queue};
use common::daemon::{Daemon, DaemonConfig, PollMode};
use common::{Image, Rng, assert_same, procfs};

const MIB: u64 = 1 << 20;

/// How long the frontends stay quiet while vubd's CPU time is measured.
const IDLE: Duration = Duration::from_secs(2);
/// Most CPU time an idle-connected vubd may use over [`IDLE`]: 5% of one CPU (see the module
/// documentation).
const IDLE_BUDGET: Duration = IDLE.saturating_mul(5).checked_div(100).expect("nonzero");
/// How long a busy-polling vubd is measured once its frontend has gone, and the most CPU time
/// it may use meanwhile: the same 5% of one CPU.
const GONE: Duration = Duration::from_secs(1);
const GONE_BUDGET: Duration = GONE.saturating_mul(5).checked_div(100).expect("nonzero");
/// How long a busy-polling vubd is measured with its frontend connected but quiet (shorter
/// than [`IDLE`]: a spinning poller shows at once), and the least CPU time it must use
/// meanwhile: half of one CPU, although its poller spins on a whole one, so that a loaded
/// machine does not fail the control.
const BUSY: Duration = Duration::from_secs(1);
const BUSY_FLOOR: Duration = BUSY.saturating_mul(50).checked_div(100).expect("nonzero");
/// Longest a request after an idle period may take. A kick lost while the poller sleeps is
/// never noticed (the poller waits without a timeout), so such a request would hang until the
/// harness's TIMEOUT; this bound also catches a poller that only wakes on some slow timer,
/// while staying far above the scheduling delays of a loaded machine.
const WAKE_BOUND: Duration = Duration::from_millis(500);

/// Requests per queue in the burst of I/O before the idle period.
const BURST: u64 = 32;
const BLOCK: usize = 4096;
/// Requests sent one at a time at random gaps of up to [`MAX_GAP`], to catch a kick lost
/// while a poller goes to sleep.
const SCATTERED: u64 = 300;
const MAX_GAP: Duration = Duration::from_micros(200);

/// A vubd with a connected frontend, its queues already used once.
struct Subject {
    what: String,
    // Declared first: dropped before the daemon, which outlives its frontend.
    client: Client,
    daemon: Daemon,
    /// Whether reads of each queue's area return the data written there (a file), or leave
    /// the buffer as it was (a null disk).
    stores_data: bool,
    // Declared last: the image outlives the daemon serving it.
    _image: Option<Image>,
}

/// Each queue's area of the disk.
fn area(queue: usize) -> u64 {
    u64::try_from(queue).expect("fits") * MIB
}

fn block_data(queue: usize, block: u64) -> Vec<u8> {
    Rng::new(area(queue) ^ block).bytes(BLOCK)
}

fn prefill(block: u64) -> Vec<u8> {
    vec![u8::try_from(block % 251).expect("fits"); BLOCK]
}

/// Reads block `block` of `queue`'s area over a prefilled buffer and checks it.
#[track_caller]
fn read_block(q: &mut Queue, queue: usize, block: u64, stores_data: bool, what: &str) {
    let offset = area(queue) + block * BLOCK as u64;
    let old = prefill(block);
    let back = q
        .try_read_over(offset, &old)
        .unwrap_or_else(|ret| panic!("{what}: read at {offset} failed with {ret}"));
    let expected = if stores_data {
        block_data(queue, block)
    } else {
        old
    };
    assert_same(&expected, &back, offset, what);
}

impl Subject {
    /// Starts vubd on a 4 MiB disk (a null disk if `null`, else an image file) with
    /// `num_queues` queues and pollers in `poll`, connects, and sends a burst of writes and
    /// reads on every queue.
    fn start(poll: PollMode, null: bool, num_queues: u16) -> Self {
        let what = format!(
            "{} disk, {num_queues} queue(s), {poll}",
            if null { "null" } else { "file" }
        );
        let config = DaemonConfig {
            num_queues: Some(num_queues),
            poll: Some(poll),
            ..DaemonConfig::default()
        };
        let (daemon, image) = if null {
            (Daemon::vubd_null("4M", &config), None)
        } else {
            let image = Image::new(4 * MIB);
            (Daemon::vubd(&image, &config, &[]), Some(image))
        };
        let client = daemon.connect(usize::from(num_queues));
        let mut subject = Self {
            what,
            client,
            daemon,
            stores_data: !null,
            _image: image,
        };
        subject.burst();
        subject
    }

    fn burst(&mut self) {
        for (i, q) in self.client.queues_mut().iter_mut().enumerate() {
            for block in 0..BURST {
                q.submit_write(area(i) + block * BLOCK as u64, &block_data(i, block));
            }
            for (tag, done) in q.wait_all().iter().enumerate() {
                assert_eq!(done.ret, 0, "{}: queue {i}: write {tag} failed", self.what);
            }
            for block in 0..BURST {
                read_block(q, i, block, self.stores_data, &self.what);
            }
        }
    }

    /// One read on every queue, each timed: the pollers must wake for it.
    fn wakes_promptly(&mut self, round: u64) {
        for (i, q) in self.client.queues_mut().iter_mut().enumerate() {
            let what = format!("{}: queue {i}: read after idling, round {round}", self.what);
            let start = Instant::now();
            read_block(q, i, round % BURST, self.stores_data, &what);
            let took = start.elapsed();
            assert!(
                took < WAKE_BOUND,
                "{what}: took {took:?} (at most {WAKE_BOUND:?} expected)"
            );
        }
    }

    /// Single requests at random gaps, some shorter and some longer than the time a poller
    /// takes to decide to sleep, spread over the queues.
    fn scattered_requests_all_complete(&mut self, seed: u64) {
        let mut rng = Rng::new(seed);
        let num_queues = self.client.queues_mut().len();
        let max_gap = u64::try_from(MAX_GAP.as_nanos()).expect("fits");
        for n in 0..SCATTERED {
            thread::sleep(Duration::from_nanos(rng.below(max_gap)));
            let i = rng.below_usize(num_queues);
            let what = format!("{}: queue {i}: scattered read {n}", self.what);
            let q = self.client.queue(i);
            let start = Instant::now();
            read_block(q, i, rng.below(BURST), self.stores_data, &what);
            let took = start.elapsed();
            assert!(
                took < WAKE_BOUND,
                "{what}: took {took:?} (at most {WAKE_BOUND:?} expected)"
            );
        }
    }

    fn cpu_report(&self) -> String {
        cpu_report(&self.daemon)
    }
}

fn cpu_report(daemon: &Daemon) -> String {
    procfs::thread_cpu_times(daemon.pid())
        .iter()
        .map(|(name, time)| format!("  {name}: {time:?}\n"))
        .collect()
}

/// The CPU time `daemon` uses while the test sleeps for `window`, and how long the test
/// really slept.
fn cpu_used_over(daemon: &Daemon, window: Duration) -> (Duration, Duration) {
    let before = daemon.cpu_time();
    let start = Instant::now();
    thread::sleep(window);
    let used = daemon.cpu_time().saturating_sub(before);
    (used, start.elapsed())
}

#[test]
fn idle_connected_daemon_uses_almost_no_cpu_and_wakes_for_the_next_request() {
    let never = PollMode::Never;
    let adaptive = PollMode::Adaptive { idle_us: None };
    let adaptive_0 = PollMode::Adaptive { idle_us: Some(0) };
    // Several daemons measured over the same idle period (like `cpu_used_over` does for one),
    // to keep the suite short.
    let mut subjects = [
        Subject::start(adaptive, false, 1),
        Subject::start(adaptive, true, 4),
        Subject::start(adaptive_0, false, 2),
        Subject::start(never, false, 1),
        Subject::start(never, true, 4),
    ];

    let before: Vec<Duration> = subjects.iter().map(|s| s.daemon.cpu_time()).collect();
    let start = Instant::now();
    thread::sleep(IDLE);
    let after: Vec<Duration> = subjects.iter().map(|s| s.daemon.cpu_time()).collect();
    let window = start.elapsed();
    for ((subject, before), after) in subjects.iter().zip(before).zip(after) {
        let used = after.saturating_sub(before);
        assert!(
            used < IDLE_BUDGET,
            "{}: idle for {window:?} with a frontend connected, vubd used {used:?} of CPU \
             (budget {IDLE_BUDGET:?}); CPU time by thread:\n{}",
            subject.what,
            subject.cpu_report()
        );
    }

    for subject in &mut subjects {
        subject.wakes_promptly(0);
    }
    // Short idle periods, each ending with a kick that must wake a poller about to sleep,
    // asleep, or still polling.
    for round in 1..=10 {
        thread::sleep(Duration::from_millis(round * 3));
        for subject in &mut subjects {
            subject.wakes_promptly(round);
        }
    }
    // The daemons one beside the other, each on its own thread.
    thread::scope(|s| {
        for (seed, subject) in (0..).zip(&mut subjects) {
            s.spawn(move || subject.scattered_requests_all_complete(seed));
        }
    });
    for subject in &mut subjects {
        subject.daemon.assert_running();
    }
}

#[test]
fn busy_polling_daemon_keeps_a_cpu_busy_while_connected_and_idles_once_the_frontend_leaves() {
    let mut subject = Subject::start(PollMode::Always, false, 1);
    let (used, window) = cpu_used_over(&subject.daemon, BUSY);
    assert!(
        used > BUSY_FLOOR,
        "{}: idle for {window:?} with a frontend connected, vubd used only {used:?} of CPU \
         (a busy-polling poller should use more than {BUSY_FLOOR:?}); CPU time by thread:\n{}",
        subject.what,
        subject.cpu_report()
    );
    subject.wakes_promptly(0);

    // Without a frontend the queues are detached and the pollers have nothing to poll.
    let Subject {
        what,
        client,
        mut daemon,
        _image,
        ..
    } = subject;
    drop(client);
    // Let the session end (detach, relay thread joined) before measuring.
    thread::sleep(Duration::from_millis(100));
    let (used, window) = cpu_used_over(&daemon, GONE);
    assert!(
        used < GONE_BUDGET,
        "{what}: {window:?} after the frontend left, vubd used {used:?} of CPU (budget \
         {GONE_BUDGET:?}); CPU time by thread:\n{}",
        cpu_report(&daemon)
    );
    daemon.assert_running();
}
