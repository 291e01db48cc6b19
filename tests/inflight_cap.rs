//! `max-inflight=N`: at most N requests of a device in flight, the rest left in its avail ring
//! (back-pressure, never an error), and a poller held back by the cap sleeps instead of
//! spinning.
//!
//! The device is a namespace of the fake NVMe/TCP target, stalled (it stops reading its
//! connections) while a frontend of our own publishes 16 reads at once: what vubd took from the
//! ring is what its inflight region records (vubd writes it at each pop), while nothing
//! completes. Once the target reads again every read completes, exactly once.

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

/// vubd on the fake target's namespace, one queue on one poller, adaptive polling, with
/// `extra` options (`--max-inflight`).
fn vubd(target: &FakeTarget, socket: &std::path::Path, cap: Option<&str>) -> Daemon {
    let uri = format!("nvme-tcp://{}/{}", target.addr(), target.nqn());
    let device = match cap {
        Some(n) => format!("socket={},disk={uri},max-inflight={n}", socket.display()),
        None => format!("socket={},disk={uri}", socket.display()),
    };
    Daemon::vubd_with_args(
        &[
            OsStr::new("--device"),
            OsStr::new(&device),
            OsStr::new("--cpus"),
            OsStr::new(&procfs::own_cpus()[0].to_string()),
            OsStr::new("--poll"),
            OsStr::new("adaptive"),
            OsStr::new("--io-timeout"),
            OsStr::new("60"),
        ],
        socket,
    )
}

/// Publishes `READS` reads on a stalled target and returns what vubd took, and the CPU time
/// its poller used in the second after; then lets the target go and checks that every read
/// completes once.
fn held_reads(cap: Option<&str>) -> (usize, Duration) {
    let target = FakeTarget::start(TargetOptions::default()).expect("start the fake target");
    let dir = tempfile::tempdir().expect("socket directory");
    let socket = dir.path().join("vubd.sock");
    let daemon = vubd(&target, &socket, cap);
    let mut fe = BlkFrontend::connect(&socket, Options::new(1)).expect("connect");
    assert!(fe.tracks_inflight());
    target.set_fault(Fault::Stall);
    for i in 0..READS {
        fe.submit(
            0,
            Request::Read {
                sector: i * 8,
                len: 4096,
            },
            i,
        )
        .expect("submit");
    }
    fe.notify(0).expect("kick");
    // vubd takes what it may at once; give it time to take more if it would.
    std::thread::sleep(Duration::from_millis(500));
    let taken = fe
        .inflight_area(0)
        .expect("inflight region")
        .recorded_in_flight();
    let poller = || {
        procfs::thread_cpu_times(daemon.pid())
            .into_iter()
            .find(|(name, _)| name == "vubd-poller-0")
            .map(|(_, t)| t)
            .expect("poller thread")
    };
    let before = poller();
    std::thread::sleep(Duration::from_secs(1));
    let busy = poller() - before;
    target.clear_fault(Fault::Stall);
    let mut done = Vec::new();
    let deadline = Instant::now() + TIMEOUT;
    while (done.len() as u64) < READS && Instant::now() < deadline {
        fe.wait(Duration::from_millis(50)).expect("wait");
        fe.reap(0, |c: Completion, _| done.push((c.tag, c.status)))
            .expect("reap");
    }
    done.sort_unstable();
    let want: Vec<(u64, u8)> = (0..READS).map(|i| (i, STATUS_OK)).collect();
    assert_eq!(done, want, "every read completes once, successfully");
    (taken.len(), busy)
}

#[test]
fn a_device_at_its_cap_leaves_the_rest_in_the_ring_and_its_poller_sleeps() {
    let (taken, busy) = held_reads(Some("4"));
    assert_eq!(
        taken, 4,
        "requests vubd took from the ring with max-inflight=4"
    );
    assert!(
        busy < Duration::from_millis(100),
        "the poller of a device held back by its cap used {busy:?} of an idle second"
    );
}

#[test]
fn without_a_cap_the_device_takes_everything() {
    let (taken, _) = held_reads(None);
    assert_eq!(taken, READS as usize);
}
