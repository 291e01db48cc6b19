//! More queues than pollers: four queues on two poller threads (queue q on poller q mod 2),
//! pinned with `--cpus` or unpinned by default on a two-CPU machine, all driven at once with
//! many requests in flight each, every byte checked. These always run vubd, whatever
//! `VUBD_TEST_BACKEND` says.

mod common;
#[path = "common/workload.rs"]
mod workload;

use common::daemon::{Daemon, DaemonConfig};
use common::{Image, assert_same, procfs};

const MIB: u64 = 1 << 20;

/// Two CPUs this test process may use. Fails (never skips) on a one-CPU machine, where two
/// pollers could not get a CPU each.
fn two_cpus() -> Vec<usize> {
    let cpus = procfs::own_cpus();
    assert!(
        cpus.len() >= 2,
        "these tests need two CPUs and may only use {cpus:?}"
    );
    cpus[..2].to_vec()
}

/// Serves an 8 MiB image with four queues as `config` says, runs the random workload (every
/// queue at once, 32 requests in flight each) and checks the image through the frontend and on
/// the host. Returns the daemon for further checks.
fn four_queues_verify_random_io(config: &DaemonConfig, seed: u64) -> Daemon {
    let image = Image::new(8 * MIB);
    let config = DaemonConfig {
        num_queues: Some(4),
        ..config.clone()
    };
    let mut daemon = Daemon::vubd(&image, &config, &[]);
    let mut client = daemon.connect(4);
    let expected = workload::random_io(&mut client, seed);
    drop(client);
    let on_host = image.read_host(0, expected.len());
    assert_same(&expected, &on_host, 0, "image file on the host");
    daemon.assert_running();
    daemon
}

/// The daemon's own threads pinned to exactly one CPU, by CPU. The kernel's io_uring workers
/// (`iou-wrk-*`, `iou-sqp-*`), which the kernel starts on demand with the affinity of the
/// thread that submitted, are left out.
fn pinned_threads(daemon: &Daemon) -> Vec<(usize, String)> {
    let mut pinned: Vec<(usize, String)> = procfs::thread_affinities(daemon.pid())
        .into_iter()
        .filter(|(name, _)| !name.starts_with("iou-wrk-") && !name.starts_with("iou-sqp-"))
        .filter_map(|(name, cpus)| match cpus[..] {
            [cpu] => Some((cpu, name)),
            _ => None,
        })
        .collect();
    pinned.sort();
    pinned
}

#[test]
fn four_queues_on_two_pinned_pollers_verify_random_io() {
    let cpus = two_cpus();
    let config = DaemonConfig {
        cpus: Some(cpus.clone()),
        ..DaemonConfig::default()
    };
    let daemon = four_queues_verify_random_io(&config, 0x0002_0004);
    // One poller per listed CPU, pinned to it; nothing else pinned.
    let pinned = pinned_threads(&daemon);
    let pinned_cpus: Vec<usize> = pinned.iter().map(|&(cpu, _)| cpu).collect();
    assert_eq!(
        pinned_cpus, cpus,
        "threads pinned to a single CPU with --cpus {cpus:?}: {pinned:?}"
    );
}

#[test]
fn four_queues_on_two_unpinned_default_pollers_verify_random_io() {
    // vubd runs on two CPUs, so by default it starts two unpinned pollers for the 4 queues.
    let config = DaemonConfig {
        affinity: Some(two_cpus()),
        ..DaemonConfig::default()
    };
    let daemon = four_queues_verify_random_io(&config, 0x0002_0104);
    let pinned = pinned_threads(&daemon);
    assert!(
        pinned.is_empty(),
        "threads pinned without --cpus: {pinned:?}"
    );
    let mut pollers: Vec<String> = procfs::thread_affinities(daemon.pid())
        .into_iter()
        .map(|(name, _)| name)
        .filter(|name| name.starts_with("vubd-poller-"))
        .collect();
    pollers.sort();
    assert_eq!(
        pollers,
        ["vubd-poller-0", "vubd-poller-1"],
        "poller threads of a vubd that may use two CPUs"
    );
}

#[test]
fn cpu_range_starts_one_pinned_poller_per_cpu_of_the_range() {
    let cpus = procfs::own_cpus();
    let (first, second) = cpus
        .windows(2)
        .find_map(|pair| (pair[1] == pair[0] + 1).then_some((pair[0], pair[1])))
        .unwrap_or_else(|| panic!("this test needs two consecutive CPUs, and may use {cpus:?}"));
    let image = Image::new(MIB);
    let config = DaemonConfig {
        num_queues: Some(2),
        ..DaemonConfig::default()
    };
    let range = format!("{first}-{second}");
    let mut daemon = Daemon::vubd(&image, &config, &["--cpus".as_ref(), range.as_ref()]);
    let mut client = daemon.connect(2);
    for (i, q) in (0u8..).zip(client.queues_mut()) {
        let offset = u64::from(i) * 4096;
        q.write(offset, &[i + 1; 4096]);
        assert_eq!(q.read(offset, 4096), [i + 1; 4096], "queue {i}");
    }
    let pinned = pinned_threads(&daemon);
    let pinned_cpus: Vec<usize> = pinned.iter().map(|&(cpu, _)| cpu).collect();
    assert_eq!(
        pinned_cpus,
        [first, second],
        "threads pinned to a single CPU with --cpus {range}: {pinned:?}"
    );
    drop(client);
    daemon.assert_running();
}
