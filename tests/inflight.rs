//! Inflight I/O tracking end to end (vhost-user protocol feature INFLIGHT_SHMFD): a frontend
//! that keeps the region (`common/frontend.rs`) drives vubd on two queues; vubd is killed with
//! SIGKILL and a new one started on the same socket, and the frontend reconnects the way QEMU
//! does (GET_INFLIGHT_FD once, SET_INFLIGHT_FD on every start, next avail index rewound to the
//! used index). Every request the frontend submitted must complete exactly once, whatever
//! instruction the kill landed on.
//!
//! - Kills during a write workload on an image file, whose io_uring completes requests out of
//!   order, and the image ends with the last version of every block. A third of the kills
//!   land at a random instant; the others are aimed at the windows around a batch's
//!   publication (vubd is stopped at random instants until the region and the used ring show
//!   it inside one), and the test reports how many landed where.
//! - The states a kill leaves around a batch's publication, built in the region by the
//!   frontend itself, since a random kill rarely lands in a window a few stores wide: a batch
//!   published in the used ring but not cleared in the region is not run again; a batch linked
//!   but not yet published is, with everything else in flight, in pop order.
//! - The requests to resubmit run even if the frontend never kicks after reconnecting, and a
//!   stop (GET_VRING_BASE) that reaches the poller together with the queue waits for them.
//! - A frontend that does not negotiate INFLIGHT_SHMFD is served as before.

mod common;
#[path = "common/frontend.rs"]
mod frontend;

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::daemon::Daemon;
use common::{Image, Rng, TIMEOUT};
use frontend::{BLOCK, BlkFrontend, Completion, Options, Request, SECTOR, STATUS_OK};
use tempfile::TempDir;

const QUEUES: u16 = 2;
const MIB: u64 = 1 << 20;

/// vubd serving `disk` with two queues on `socket` (replacing a dead vubd's socket file).
fn vubd(socket: &Path, disk: &OsStr) -> Daemon {
    Daemon::vubd_with_args(
        &[
            OsStr::new("--socket-path"),
            socket.as_os_str(),
            OsStr::new("--disk"),
            disk,
            OsStr::new("--num-queues"),
            OsStr::new("2"),
        ],
        socket,
    )
}

/// A socket path in a directory of its own, kept across vubd restarts.
fn socket_dir() -> (TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("socket directory");
    let socket = dir.path().join("vubd.sock");
    (dir, socket)
}

/// The 4 KiB that version `version` of block `block` holds: 8-byte words that each name the
/// block, the version and their own position, so that any other version or block (or a
/// misplaced part of this one) reads differently.
fn pattern(block: u64, version: u32) -> Vec<u8> {
    (0..BLOCK as u64 / 8)
        .flat_map(|i| (block << 40 | u64::from(version) << 9 | i).to_le_bytes())
        .collect()
}

fn sector_of(block: u64) -> u64 {
    block * BLOCK as u64 / SECTOR
}

/// The tag of a write: its block and version.
fn tag(block: u64, version: u32) -> u64 {
    block << 32 | u64::from(version)
}

fn untag(tag: u64) -> (u64, u32) {
    (
        tag >> 32,
        u32::try_from(tag & 0xffff_ffff).expect("32 bits"),
    )
}

/// Reaps every queue of `fe`, failing the test on a completion of a head not in flight.
fn reap_all(fe: &mut BlkFrontend, what: &str) -> Vec<Completion> {
    let mut done = Vec::new();
    for q in 0..fe.num_queues() {
        fe.reap(q, |c, _| done.push(c))
            .unwrap_or_else(|e| panic!("{what}: {e}"));
    }
    done
}

/// Where a kill stopped vubd in the life of one batch of completions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Window {
    /// After the batch was linked (`next`, `last_batch_head`) and its used elements written,
    /// before the used index moved.
    LinkedNotPublished,
    /// After the used index was published, before the batch's inflight flags were all
    /// cleared (and the region's `used_idx` moved).
    PublishedNotCleared,
    /// Anywhere else (between batches, inside a pop, while taking the region up).
    Elsewhere,
}

/// Which window a stopped (or dead) vubd is in, from the region and the used rings: a region
/// `used_idx` behind the ring's with an inflight flag of that batch still set, or a
/// `last_batch_head` that is not the last used element published. `started[q]` is queue
/// `q`'s used index when this vubd took the region over: until it publishes a batch of its
/// own, `last_batch_head` may still name a batch the previous one linked, so that second
/// state is only judged after that.
fn window_of(fe: &mut BlkFrontend, started: &[u16]) -> Window {
    for (q, &start) in started.iter().enumerate() {
        let used = fe.used_idx(q);
        let last_published = fe.used_id(q, used.wrapping_sub(1));
        let area = fe.inflight_area(q).expect("region kept");
        if area.version() == 0 {
            continue;
        }
        // The published batch, walked as recovery walks it: is a flag of it still set?
        let mut head = area.last_batch_head();
        for _ in 0..used.wrapping_sub(area.used_idx()).min(area.desc_num()) {
            if head >= area.desc_num() {
                break;
            }
            if area.inflight(head) != 0 {
                return Window::PublishedNotCleared;
            }
            head = area.next(head);
        }
        if used != start && u32::from(area.last_batch_head()) != last_published {
            return Window::LinkedNotPublished;
        }
    }
    Window::Elsewhere
}

/// Keeps `DEPTH` writes in flight on every queue and completes what the backend finished.
struct Writer {
    /// Last version written of each block, and whether a write of it is in flight: one at a
    /// time per block, so the last version is what the image must end with.
    version: Vec<u32>,
    busy: Vec<bool>,
    submitted: u64,
    completed: u64,
}

impl Writer {
    const DEPTH: usize = 48;

    fn new(blocks: u64) -> Self {
        let n = usize::try_from(blocks).expect("few blocks");
        Self {
            version: vec![0; n],
            busy: vec![false; n],
            submitted: 0,
            completed: 0,
        }
    }

    fn refill(&mut self, fe: &mut BlkFrontend, rng: &mut Rng) {
        for q in 0..fe.num_queues() {
            while fe.slots() - fe.free_slots(q) < Self::DEPTH {
                let block = loop {
                    let b = rng.below_usize(self.busy.len());
                    if !self.busy[b] {
                        break b;
                    }
                };
                self.busy[block] = true;
                self.version[block] += 1;
                let (b, v) = (block as u64, self.version[block]);
                let data = pattern(b, v);
                let write = Request::Write {
                    sector: sector_of(b),
                    data: &data,
                };
                fe.submit(q, write, tag(b, v)).expect("submit");
                self.submitted += 1;
            }
            fe.notify(q).expect("notify");
        }
    }

    /// Reaps every queue; a head completed while not in flight fails the test.
    fn reap(&mut self, fe: &mut BlkFrontend, what: &str) -> usize {
        let done = reap_all(fe, what);
        for c in &done {
            let (block, v) = untag(c.tag);
            assert_eq!(
                c.status, STATUS_OK,
                "{what}: write of block {block} version {v}"
            );
            self.busy[usize::try_from(block).expect("few")] = false;
            self.completed += 1;
        }
        done.len()
    }
}

#[test]
fn writes_in_flight_across_kill_9_complete_exactly_once_and_the_last_versions_reach_the_image() {
    const BLOCKS: u64 = 1024;
    const KILLS: usize = 50;
    // How long an aimed kill looks for its window before it kills anyway.
    const AIM_FOR: Duration = Duration::from_millis(500);
    let seed = std::env::var("VUBD_INFLIGHT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
            now.map_or(1, |d| d.as_secs())
        });
    eprintln!("seed {seed} (VUBD_INFLIGHT_SEED={seed} repeats the workload, not the timing)");
    let mut rng = Rng::new(seed);
    let image = Image::new(BLOCKS * BLOCK as u64);
    let (_dir, socket) = socket_dir();
    let mut daemon = vubd(&socket, image.path().as_os_str());
    let mut fe = BlkFrontend::connect(&socket, Options::new(QUEUES)).expect("connect");
    assert!(fe.tracks_inflight());
    let mut w = Writer::new(BLOCKS);
    let mut started = vec![0; usize::from(QUEUES)];
    // Kills by the window they landed in, and requests in flight at them.
    let mut landed: BTreeMap<Window, usize> = BTreeMap::new();
    let (mut recorded, mut frontend_in_flight) = (0, 0);
    for kill in 1..=KILLS {
        // A third of the kills land at a random instant. The others are aimed at a window a
        // few stores wide, which a random instant rarely hits: vubd is stopped (SIGSTOP) at
        // random instants while the writes go on, until the frozen state is in the window.
        let aim = match kill % 3 {
            0 => None,
            1 => Some(Window::PublishedNotCleared),
            _ => Some(Window::LinkedNotPublished),
        };
        let until = Instant::now() + Duration::from_micros(rng.below(20_000));
        let give_up = until + AIM_FOR;
        loop {
            w.refill(&mut fe, &mut rng);
            w.reap(&mut fe, &format!("before kill {kill}"));
            if Instant::now() < until {
                fe.wait(Duration::from_millis(1)).expect("wait");
                continue;
            }
            let Some(aim) = aim else { break };
            // vubd works on what was just submitted and completed for a random while.
            std::thread::sleep(Duration::from_micros(rng.below(300)));
            daemon.freeze();
            if window_of(&mut fe, &started) == aim || Instant::now() >= give_up {
                break;
            }
            daemon.thaw();
        }
        daemon.kill();
        *landed.entry(window_of(&mut fe, &started)).or_default() += 1;
        for q in 0..usize::from(QUEUES) {
            frontend_in_flight += fe.slots() - fe.free_slots(q);
            recorded += fe
                .inflight_area(q)
                .expect("region kept")
                .recorded_in_flight()
                .len();
        }
        // What the dead process published before it died.
        w.reap(&mut fe, &format!("after kill {kill}"));
        started = (0..fe.num_queues()).map(|q| fe.used_idx(q)).collect();
        daemon = vubd(&socket, image.path().as_os_str());
        fe.reconnect().expect("reconnect");
    }
    // Nothing lost: everything in flight completes within the bound.
    let deadline = Instant::now() + TIMEOUT;
    while w.completed < w.submitted {
        assert!(
            Instant::now() < deadline,
            "{} requests never completed: {:?} / {:?}",
            w.submitted - w.completed,
            fe.in_flight(0),
            fe.in_flight(1)
        );
        fe.wait(Duration::from_millis(5)).expect("wait");
        w.reap(&mut fe, "draining");
    }
    // Nor run again after it completed (a late duplicate would show here).
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(
        w.reap(&mut fe, "after draining"),
        0,
        "completions after the drain"
    );
    eprintln!(
        "{KILLS} kills, by window: {landed:?}; {recorded} requests recorded in flight at them \
         ({frontend_in_flight} in flight for the frontend, popped or not); {} writes, each \
         completed once",
        w.submitted
    );
    fe.disconnect();
    daemon.terminate();
    for (block, &v) in w.version.iter().enumerate() {
        let b = block as u64;
        let expect = if v == 0 {
            vec![0; BLOCK]
        } else {
            pattern(b, v)
        };
        let got = image.read_host(b * BLOCK as u64, BLOCK);
        assert!(
            got == expect,
            "block {block}: expected version {v}, found word {:#x}",
            u64::from_le_bytes(got[..8].try_into().expect("8")),
        );
    }
}

/// Requests of the constructed crash, on queue 0.
const REQUESTS: usize = 8;
/// Positions (in pop order) of the requests of a batch completed in full before the kill, in
/// the order they completed: out of order, so that rewinding the avail index alone would run
/// them again.
const EARLIER: [usize; 2] = [4, 2];
/// Positions of the requests in the batch the kill interrupted, in the order they completed.
const BATCH: [usize; 3] = [5, 1, 6];
/// First block the constructed requests write.
const FIRST_BLOCK: u64 = 100;

/// What vubd did after the constructed crash.
#[derive(Debug)]
struct AfterCrash {
    /// Heads in pop order (avail order, and the order of the counters written).
    popped: Vec<u16>,
    /// Heads of the batch completed before the kill.
    earlier: Vec<u16>,
    /// Heads of the interrupted batch.
    batch: Vec<u16>,
    /// Heads the new vubd completed, in used-ring order.
    completed: Vec<u16>,
}

/// Completes `heads` of queue 0 as the dead vubd did: `link` for each (before its used
/// element), used elements from `at`; the used index is not moved.
fn link_and_put_used(fe: &mut BlkFrontend, heads: &[u16], at: u16) {
    {
        let area = fe.inflight_area(0).expect("region kept");
        for &head in heads {
            area.set_next(head, area.last_batch_head());
            area.set_last_batch_head(head);
        }
    }
    for (k, &head) in heads.iter().enumerate() {
        fe.set_status(0, head, STATUS_OK);
        fe.put_used(0, at.wrapping_add(k as u16), head, 1);
    }
}

/// Publishes used elements up to `idx` of queue 0, and lets the frontend see them: `heads`
/// complete, for good.
fn publish_used(fe: &mut BlkFrontend, idx: u16, heads: &[u16]) {
    fe.set_used_idx(0, idx);
    let seen: Vec<u16> = reap_all(fe, "published batch")
        .iter()
        .map(|c| c.head)
        .collect();
    assert_eq!(seen, heads);
}

/// Kills a vubd serving `disk` and builds in the region and the used ring the state it would
/// have left after popping REQUESTS writes, completing the EARLIER ones in full and being
/// killed in `window` of the BATCH ones; then starts a new vubd, reconnects, and returns what
/// the new one completed once nothing is in flight (a head completed twice fails the test).
fn after_constructed_crash(disk: &OsStr, window: Window, opts: Options) -> AfterCrash {
    after_constructed_crash_with(disk, window, opts, |fe, _| {
        fe.reconnect().expect("reconnect");
    })
}

/// [`after_constructed_crash`], with `restart` reconnecting the frontend to the new vubd.
fn after_constructed_crash_with(
    disk: &OsStr,
    window: Window,
    opts: Options,
    restart: impl FnOnce(&mut BlkFrontend, &Daemon),
) -> AfterCrash {
    let (_dir, socket) = socket_dir();
    let mut daemon = vubd(&socket, disk);
    let mut fe = BlkFrontend::connect(&socket, opts).expect("connect");
    // A few requests first, so that the area is in use and the indices are not 0.
    for i in 0..5 {
        fe.submit(0, Request::Flush, i).expect("submit");
    }
    fe.notify(0).expect("notify");
    let deadline = Instant::now() + TIMEOUT;
    let mut warm = 0;
    while warm < 5 {
        assert!(Instant::now() < deadline, "first requests incomplete");
        fe.wait(Duration::from_millis(5)).expect("wait");
        warm += reap_all(&mut fe, "first requests").len();
    }
    daemon.kill();

    // The frontend makes REQUESTS writes available (heads not in ascending order, so that
    // pop order is not head order); the dead vubd "popped" them all.
    fe.scramble_free_slots(0);
    let mut popped = Vec::new();
    for i in 0..REQUESTS {
        let block = FIRST_BLOCK + i as u64;
        let data = pattern(block, 1);
        let write = Request::Write {
            sector: sector_of(block),
            data: &data,
        };
        popped.push(fe.submit(0, write, tag(block, 1)).expect("submit"));
    }
    fe.publish(0);
    let used = fe.used_idx(0);
    let earlier: Vec<u16> = EARLIER.iter().map(|&i| popped[i]).collect();
    let batch: Vec<u16> = BATCH.iter().map(|&i| popped[i]).collect();
    {
        let area = fe.inflight_area(0).expect("region kept");
        assert_eq!(area.version(), 1, "the area was taken up");
        assert_eq!(area.used_idx(), used, "the area followed the used ring");
        let counter = (0..area.desc_num())
            .map(|h| area.counter(h))
            .max()
            .unwrap_or(0)
            + 1;
        // begin(): counter, then inflight = 1, in pop order.
        for (i, &head) in popped.iter().enumerate() {
            area.set_counter(head, counter + i as u64);
            area.set_inflight(head, 1);
        }
    }
    // The earlier batch, all the way: linked, published, cleared, recorded.
    let after_earlier = used.wrapping_add(earlier.len() as u16);
    link_and_put_used(&mut fe, &earlier, used);
    publish_used(&mut fe, after_earlier, &earlier);
    {
        let area = fe.inflight_area(0).expect("region kept");
        for &head in &earlier {
            area.set_inflight(head, 0);
        }
        area.set_used_idx(after_earlier);
    }
    // The interrupted batch, up to the window.
    link_and_put_used(&mut fe, &batch, after_earlier);
    if window == Window::PublishedNotCleared {
        publish_used(
            &mut fe,
            after_earlier.wrapping_add(batch.len() as u16),
            &batch,
        );
    }

    let daemon = vubd(&socket, disk);
    restart(&mut fe, &daemon);
    let mut completed = Vec::new();
    let deadline = Instant::now() + TIMEOUT;
    while fe.slots() != fe.free_slots(0) {
        assert!(
            Instant::now() < deadline,
            "never completed after the restart: {:?} (completed {completed:?}, popped \
             {popped:?}, batch {batch:?})",
            fe.in_flight(0)
        );
        fe.wait(Duration::from_millis(5)).expect("wait");
        for c in reap_all(&mut fe, "after the restart") {
            assert_eq!(c.status, STATUS_OK, "{c:?}");
            completed.push(c.head);
        }
    }
    // Give a wrongly resubmitted request time to complete a second time.
    std::thread::sleep(Duration::from_millis(100));
    let late = reap_all(&mut fe, "after everything completed");
    assert!(late.is_empty(), "completed again: {late:?}");
    AfterCrash {
        popped,
        earlier,
        batch,
        completed,
    }
}

impl AfterCrash {
    /// The popped heads, in pop order, less the ones completed before the kill (those of the
    /// interrupted batch too if `batch_done`).
    fn unfinished(&self, batch_done: bool) -> Vec<u16> {
        let done = |h: &u16| self.earlier.contains(h) || batch_done && self.batch.contains(h);
        self.popped.iter().copied().filter(|h| !done(h)).collect()
    }

    fn completed_sorted(&self) -> Vec<u16> {
        let mut c = self.completed.clone();
        c.sort_unstable();
        c
    }
}

/// Positions (in pop order) of the requests that completed before the kill.
fn done_before(batch_done: bool) -> Vec<usize> {
    let mut done = EARLIER.to_vec();
    if batch_done {
        done.extend(BATCH);
    }
    done
}

/// The blocks of the constructed requests as the image holds them: version 1 or untouched.
fn written_blocks(image: &Image) -> BTreeMap<u64, bool> {
    (0..REQUESTS as u64)
        .map(|i| {
            let block = FIRST_BLOCK + i;
            let got = image.read_host(block * BLOCK as u64, BLOCK);
            let written = got == pattern(block, 1);
            assert!(
                written || got == vec![0; BLOCK],
                "block {block} holds neither"
            );
            (block, written)
        })
        .collect()
}

#[test]
fn a_batch_published_but_not_cleared_is_not_run_again_and_the_rest_resubmit_in_pop_order() {
    // The null device completes in submission order: the used ring shows the resubmit order.
    let run = after_constructed_crash(
        OsStr::new("null:64M"),
        Window::PublishedNotCleared,
        Options::new(QUEUES),
    );
    assert_eq!(run.completed, run.unfinished(true), "{run:?}");
}

#[test]
fn a_batch_published_but_not_cleared_leaves_its_writes_unmade_on_the_image() {
    let image = Image::new(4 * MIB);
    let run = after_constructed_crash(
        image.path().as_os_str(),
        Window::PublishedNotCleared,
        Options::new(QUEUES),
    );
    let mut expect = run.unfinished(true);
    expect.sort_unstable();
    assert_eq!(run.completed_sorted(), expect, "{run:?}");
    // The requests completed before the kill never ran (the dead vubd "completed" them): had
    // the new one run them, their blocks would hold the data.
    let done = done_before(true);
    for (i, (block, written)) in written_blocks(&image).into_iter().enumerate() {
        assert_eq!(written, !done.contains(&i), "block {block}, {run:?}");
    }
}

#[test]
fn a_batch_linked_but_not_published_is_resubmitted_with_the_rest_in_pop_order() {
    let run = after_constructed_crash(
        OsStr::new("null:64M"),
        Window::LinkedNotPublished,
        Options::new(QUEUES),
    );
    assert_eq!(run.completed, run.unfinished(false), "{run:?}");
}

#[test]
fn a_batch_linked_but_not_published_is_written_to_the_image() {
    let image = Image::new(4 * MIB);
    let run = after_constructed_crash(
        image.path().as_os_str(),
        Window::LinkedNotPublished,
        Options::new(QUEUES),
    );
    let mut expect = run.unfinished(false);
    expect.sort_unstable();
    assert_eq!(run.completed_sorted(), expect, "{run:?}");
    let done = done_before(false);
    for (i, (block, written)) in written_blocks(&image).into_iter().enumerate() {
        assert_eq!(written, !done.contains(&i), "block {block}, {run:?}");
    }
}

#[test]
fn requests_left_in_flight_are_resubmitted_without_a_kick_after_reconnecting() {
    // QEMU does not kick a queue it sets up again, and the guest kicked these requests long
    // ago: the backend must start the queue by itself (libvhost-user kicks itself at
    // SET_VRING_KICK; vhost-user-backend 0.24 hands the backend an event for every queue it
    // starts watching).
    let opts = Options {
        kick_after_start: false,
        ..Options::new(QUEUES)
    };
    let run = after_constructed_crash(OsStr::new("null:64M"), Window::LinkedNotPublished, opts);
    assert_eq!(run.completed, run.unfinished(false), "{run:?}");
}

/// The thread of process `pid` named `name`, once it exists (vubd listens on its socket
/// before it has started every thread).
fn thread_named(pid: u32, name: &str) -> libc::pid_t {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("list threads");
        let found = tasks
            .flatten()
            .find(|t| {
                std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim_end() == name)
            })
            .and_then(|t| t.file_name().to_str()?.parse().ok());
        if let Some(tid) = found {
            return tid;
        }
        assert!(
            Instant::now() < deadline,
            "no thread {name} in process {pid}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// One thread of another process held stopped (ptrace: PTRACE_SEIZE, then PTRACE_INTERRUPT)
/// while the rest of the process runs on, until `resume_after`: a ptrace tracer is a thread,
/// so a thread of its own attaches, waits, and detaches.
struct HeldThread {
    resume: mpsc::Sender<Duration>,
    tracer: std::thread::JoinHandle<()>,
}

impl HeldThread {
    fn hold(tid: libc::pid_t) -> Self {
        let (stopped_tx, stopped_rx) = mpsc::channel();
        let (resume, resume_rx) = mpsc::channel::<Duration>();
        let tracer = std::thread::spawn(move || {
            let null = std::ptr::null_mut::<libc::c_void>();
            // SAFETY: ptrace(2) on a thread of our child process, with no addresses passed
            // (null address and data), so no memory of this process is read or written.
            let seized = unsafe { libc::ptrace(libc::PTRACE_SEIZE, tid, null, null) } == 0
                // SAFETY: as above.
                && unsafe { libc::ptrace(libc::PTRACE_INTERRUPT, tid, null, null) } == 0;
            let mut status = 0;
            // SAFETY: waitpid(2) for the ptrace stop of our tracee, into a live local.
            let stopped = seized && unsafe { libc::waitpid(tid, &mut status, libc::__WALL) } == tid;
            let _ = stopped_tx.send(
                stopped
                    .then_some(())
                    .ok_or_else(std::io::Error::last_os_error),
            );
            // A dropped sender resumes at once.
            std::thread::sleep(resume_rx.recv().unwrap_or_default());
            // SAFETY: as above; detaching resumes the thread.
            unsafe { libc::ptrace(libc::PTRACE_DETACH, tid, null, null) };
        });
        stopped_rx
            .recv()
            .expect("tracer thread")
            .unwrap_or_else(|e| panic!("cannot stop thread {tid}: {e}"));
        Self { resume, tracer }
    }

    /// Lets the thread run again after `delay` (from now, on the tracer thread).
    fn resume_after(self, delay: Duration) -> std::thread::JoinHandle<()> {
        let _ = self.resume.send(delay);
        self.tracer
    }
}

#[test]
fn a_queue_stopped_before_its_resubmitted_requests_started_completes_them_first() {
    // GET_VRING_BASE returns the next avail index as final: everything below it that the
    // backend took must have completed (vhost-user, "Starting and stopping rings"). The
    // requests a new vubd took over from the region count (next avail = used + in flight),
    // even if the stop reaches the poller together with the queue, before it ran any.
    let disk = OsStr::new("null:64M");
    let run = after_constructed_crash_with(
        disk,
        Window::LinkedNotPublished,
        Options::new(QUEUES),
        |fe, daemon| {
            let poller = HeldThread::hold(thread_named(daemon.pid(), "vubd-poller-0"));
            fe.reconnect().expect("reconnect");
            // Once the relay thread has taken the region up, the queue is attached (its
            // Attach waits in the poller's commands); the stop queues a Detach behind it, and
            // the poller sees both at once.
            let deadline = Instant::now() + TIMEOUT;
            while !daemon
                .output()
                .contains("resubmitting requests left in flight")
            {
                assert!(Instant::now() < deadline, "queue 0 not taken up");
                std::thread::sleep(Duration::from_millis(5));
            }
            let tracer = poller.resume_after(Duration::from_millis(200));
            let base = fe.stop_queue(0).expect("GET_VRING_BASE");
            tracer.join().expect("tracer thread");
            assert_eq!(
                base,
                fe.used_idx(0),
                "GET_VRING_BASE counts requests that never completed"
            );
        },
    );
    assert_eq!(run.completed, run.unfinished(false), "{run:?}");
}

#[test]
fn a_frontend_without_inflight_tracking_reads_back_what_it_wrote() {
    let image = Image::new(4 * MIB);
    let (_dir, socket) = socket_dir();
    let _daemon = vubd(&socket, image.path().as_os_str());
    let opts = Options {
        inflight: false,
        event_idx: false,
        ..Options::new(QUEUES)
    };
    let mut fe = BlkFrontend::connect(&socket, opts).expect("connect");
    assert!(!fe.tracks_inflight());
    assert_eq!(fe.capacity(), 4 * MIB / SECTOR);
    let roundtrip = |fe: &mut BlkFrontend, q: usize, req: Request<'_>| -> (Completion, Vec<u8>) {
        fe.submit(q, req, 0).expect("submit");
        fe.notify(q).expect("notify");
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let mut got = None;
            fe.reap(q, |c, data| got = Some((c, data.to_vec())))
                .expect("reap");
            if let Some(got) = got {
                return got;
            }
            assert!(Instant::now() < deadline, "{req:?} incomplete");
            fe.wait(Duration::from_millis(5)).expect("wait");
        }
    };
    for q in 0..usize::from(QUEUES) {
        let block = 7 + q as u64;
        let data = pattern(block, 3);
        let write = Request::Write {
            sector: sector_of(block),
            data: &data,
        };
        assert_eq!(roundtrip(&mut fe, q, write).0.status, STATUS_OK);
        let read = Request::Read {
            sector: sector_of(block),
            len: BLOCK,
        };
        let (c, back) = roundtrip(&mut fe, q, read);
        assert_eq!((c.status, c.len), (STATUS_OK, BLOCK as u32 + 1));
        assert!(back == data, "queue {q}: read back differs");
    }
    assert_eq!(image.read_host(7 * BLOCK as u64, BLOCK), pattern(7, 3));
}

/// A region that records more requests in flight than the driver made available past the
/// used index cannot be this ring's (a frontend's bug, or tampering): running its heads would
/// put the backend's avail index past the driver's and leave the queue stuck. vubd drops the
/// record and serves the queue from the index the frontend gave.
#[test]
fn a_region_claiming_more_in_flight_than_the_ring_holds_is_dropped_and_the_queue_serves_on() {
    let image = Image::new(4 * MIB);
    let (_dir, socket) = socket_dir();
    let mut daemon = vubd(&socket, image.path().as_os_str());
    let mut fe = BlkFrontend::connect(&socket, Options::new(QUEUES)).expect("connect");
    fe.submit(0, Request::Flush, 0).expect("submit");
    fe.notify(0).expect("notify");
    let deadline = Instant::now() + TIMEOUT;
    while reap_all(&mut fe, "a flush").is_empty() {
        assert!(Instant::now() < deadline, "flush incomplete");
        fe.wait(Duration::from_millis(5)).expect("wait");
    }
    daemon.kill();
    {
        // Nothing is available past the used index, yet every entry claims to be in flight.
        let area = fe.inflight_area(0).expect("region kept");
        for head in 0..area.desc_num() {
            area.set_inflight(head, 1);
            area.set_counter(head, u64::from(head));
        }
    }
    let daemon = vubd(&socket, image.path().as_os_str());
    fe.reconnect().expect("reconnect");
    let data = pattern(3, 1);
    let write = Request::Write {
        sector: sector_of(3),
        data: &data,
    };
    fe.submit(0, write, tag(3, 1)).expect("submit");
    fe.notify(0).expect("notify");
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let done = reap_all(&mut fe, "a write after the restart");
        if let Some(c) = done.first() {
            assert_eq!(c.status, STATUS_OK);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the queue is stuck:\n{}",
            daemon.output()
        );
        fe.wait(Duration::from_millis(5)).expect("wait");
    }
    assert!(
        daemon
            .output()
            .contains("the inflight region does not match the ring"),
        "{}",
        daemon.output()
    );
    assert_eq!(image.read_host(3 * BLOCK as u64, BLOCK), data);
}
