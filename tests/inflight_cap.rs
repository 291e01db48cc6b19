//! `max-inflight=N`: at most N requests of a device in flight, the rest left in its avail ring
//! (back-pressure, never an error), and a poller held back by the cap sleeps instead of
//! spinning. The cap is split over the pollers of the queues the frontend started, not of
//! every queue the device offers.
//!
//! The device is a namespace of the fake NVMe/TCP target, stalled (it stops reading its
//! connections) while a frontend of our own publishes 16 reads at once on each of its queues:
//! what vubd took from a ring is what its inflight region records (vubd writes it at each
//! pop), while nothing completes. Once the target reads again every read completes, exactly
//! once.

mod common;
#[path = "common/frontend.rs"]
mod frontend;

use std::ffi::OsStr;
use std::time::{Duration, Instant};

use common::daemon::Daemon;
use common::fake_target::{FakeTarget, Fault, Options as TargetOptions};
use common::{TIMEOUT, procfs};
use frontend::{BlkFrontend, Completion, Options, Request, STATUS_OK};

const READS: u64 = 16;

/// vubd on the fake target's namespace as a device offering four queues, one poller on each of
/// this process's first `pollers` CPUs, adaptive polling, and `max-inflight=cap` if given.
fn vubd(
    target: &FakeTarget,
    socket: &std::path::Path,
    cap: Option<&str>,
    pollers: usize,
) -> Daemon {
    let uri = format!("nvme-tcp://{}/{}", target.addr(), target.nqn());
    let device = match cap {
        Some(n) => format!(
            "socket={},disk={uri},num-queues=4,max-inflight={n}",
            socket.display()
        ),
        None => format!("socket={},disk={uri},num-queues=4", socket.display()),
    };
    let cpus = procfs::own_cpus();
    assert!(
        cpus.len() >= pollers,
        "this test needs {pollers} CPUs and may only use {cpus:?}"
    );
    let cpus: Vec<String> = cpus[..pollers].iter().map(ToString::to_string).collect();
    Daemon::vubd_with_args(
        &[
            OsStr::new("--device"),
            OsStr::new(&device),
            OsStr::new("--cpus"),
            OsStr::new(&cpus.join(",")),
            OsStr::new("--poll"),
            OsStr::new("adaptive"),
            OsStr::new("--io-timeout"),
            OsStr::new("60"),
        ],
        socket,
    )
}

/// What vubd did with the reads of [`held_reads`].
struct Held {
    /// Requests it took from each queue's ring while the target was stalled.
    taken: Vec<usize>,
    /// CPU time its pollers used in a second of that.
    busy: Duration,
}

/// Publishes `READS` reads on each of `queues` queues of a device on `pollers` pollers, on a
/// stalled target, and returns what vubd took, and the CPU time its pollers used in the
/// second after; then lets the target go and checks that every read completes once.
fn held_reads(cap: Option<&str>, pollers: usize, queues: u16) -> Held {
    let target = FakeTarget::start(TargetOptions::default()).expect("start the fake target");
    let dir = tempfile::tempdir().expect("socket directory");
    let socket = dir.path().join("vubd.sock");
    let daemon = vubd(&target, &socket, cap, pollers);
    let mut fe = BlkFrontend::connect(&socket, Options::new(queues)).expect("connect");
    assert!(fe.tracks_inflight());
    // Every queue on its poller before any request: a poller's share of the cap is set as
    // the queues start.
    let deadline = Instant::now() + TIMEOUT;
    let attached = || daemon.output().matches("queue attached").count();
    while attached() < usize::from(queues) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(attached(), usize::from(queues), "{}", daemon.output());
    target.set_fault(Fault::Stall);
    let tag = |q: u16, i: u64| u64::from(q) * READS + i;
    for q in 0..queues {
        for i in 0..READS {
            let sector = tag(q, i) * 8;
            fe.submit(
                usize::from(q),
                Request::Read { sector, len: 4096 },
                tag(q, i),
            )
            .expect("submit");
        }
        fe.notify(usize::from(q)).expect("kick");
    }
    // vubd takes what it may at once; give it time to take more if it would.
    std::thread::sleep(Duration::from_millis(500));
    let taken = (0..usize::from(queues))
        .map(|q| {
            fe.inflight_area(q)
                .expect("inflight region")
                .recorded_in_flight()
                .len()
        })
        .collect();
    let pollers_time = || -> Duration {
        procfs::thread_cpu_times(daemon.pid())
            .into_iter()
            .filter(|(name, _)| name.starts_with("vubd-poller-"))
            .map(|(_, t)| t)
            .sum()
    };
    let before = pollers_time();
    std::thread::sleep(Duration::from_secs(1));
    let busy = pollers_time() - before;
    target.clear_fault(Fault::Stall);
    let mut done = Vec::new();
    let all = READS * u64::from(queues);
    let deadline = Instant::now() + TIMEOUT;
    while (done.len() as u64) < all && Instant::now() < deadline {
        fe.wait(Duration::from_millis(50)).expect("wait");
        for q in 0..usize::from(queues) {
            fe.reap(q, |c: Completion, _| done.push((c.tag, c.status)))
                .expect("reap");
        }
    }
    done.sort_unstable();
    let want: Vec<(u64, u8)> = (0..all).map(|t| (t, STATUS_OK)).collect();
    assert_eq!(done, want, "every read completes once, successfully");
    Held { taken, busy }
}

#[test]
fn a_device_at_its_cap_leaves_the_rest_in_the_ring_and_its_poller_sleeps() {
    let held = held_reads(Some("4"), 1, 1);
    assert_eq!(
        held.taken,
        [4],
        "requests vubd took from the ring with max-inflight=4"
    );
    assert!(
        held.busy < Duration::from_millis(100),
        "the poller of a device held back by its cap used {:?} of an idle second",
        held.busy
    );
}

#[test]
fn without_a_cap_the_device_takes_everything() {
    let held = held_reads(None, 1, 1);
    assert_eq!(held.taken, [READS as usize]);
}

#[test]
fn the_whole_cap_goes_to_the_one_poller_a_frontend_uses() {
    // The device offers two queues on each poller; the frontend starts one.
    let held = held_reads(Some("4"), 2, 1);
    assert_eq!(held.taken, [4], "max-inflight=4, one queue started");
}

#[test]
fn the_cap_is_split_over_the_pollers_of_the_started_queues() {
    let held = held_reads(Some("4"), 2, 2);
    assert_eq!(
        held.taken,
        [2, 2],
        "max-inflight=4, two queues started on two pollers"
    );
}
