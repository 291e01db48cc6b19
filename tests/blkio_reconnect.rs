//! Frontends come and go (a VMM restarts, a guest reboots): the daemon keeps serving the same
//! disk to the next one, whatever the previous one left behind.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::thread;
use std::time::{Duration, Instant};

use common::daemon::{Daemon, DaemonConfig};
use common::{Image, Rng, TIMEOUT, assert_same};

const MIB: u64 = 1 << 20;

fn four_queues() -> DaemonConfig {
    DaemonConfig {
        num_queues: Some(4),
        ..DaemonConfig::default()
    }
}

#[test]
fn second_frontend_sees_data_written_by_the_first() {
    let image = Image::new(4 * MIB);
    let mut daemon = Daemon::start(&image);
    let data = Rng::new(1).bytes(256 << 10);

    let mut first = daemon.connect(1);
    first.queue(0).write(MIB, &data);
    drop(first);

    let mut second = daemon.connect(1);
    assert_same(
        &data,
        &second.queue(0).read(MIB, data.len()),
        MIB,
        "second frontend",
    );
    daemon.assert_running();
}

#[test]
fn frontends_with_different_queue_counts_follow_one_another() {
    let image = Image::new(4 * MIB);
    let mut daemon = Daemon::start_with(&image, &four_queues());
    let mut rng = Rng::new(2);
    let mut expected = vec![0u8; 64 << 10];
    for (round, num_queues) in [4usize, 1, 2, 4, 3].into_iter().enumerate() {
        let mut client = daemon.connect(num_queues);
        for i in 0..num_queues {
            let q = client.queue(i);
            let what = format!("connection {round}, queue {i}: previous data");
            assert_same(&expected, &q.read(0, expected.len()), 0, &what);
            expected = rng.bytes(expected.len());
            q.write(0, &expected);
        }
    }
    assert_same(
        &expected,
        &image.read_host(0, expected.len()),
        0,
        "image file",
    );
    daemon.assert_running();
}

#[test]
fn next_frontend_is_served_after_one_vanishes_with_requests_in_flight() {
    let image = Image::new(4 * MIB);
    let mut daemon = Daemon::start_with(&image, &four_queues());
    let stale = vec![0xde; 64 << 10];
    let mut first = daemon.connect(4);
    for q in first.queues_mut() {
        for i in 0..32u64 {
            q.submit_write(i * (64 << 10), &stale);
        }
        q.kick();
    }
    // Gone without waiting for a single completion.
    drop(first);

    let fresh = Rng::new(3).bytes(2 * MIB as usize);
    let mut second = daemon.connect(4);
    let q = second.queue(0);
    q.write(0, &fresh);
    q.flush();
    assert_same(&fresh, &q.read(0, fresh.len()), 0, "second frontend");
    // Writes of the vanished frontend must not land after the new one's.
    thread::sleep(Duration::from_millis(100));
    assert_same(&fresh, &q.read(0, fresh.len()), 0, "second frontend, later");
    assert_same(&fresh, &image.read_host(0, fresh.len()), 0, "image file");
    daemon.assert_running();
}

/// Counts the daemon's open file descriptors once the count has stopped changing.
fn settled_fd_count(pid: u32) -> usize {
    let count = || {
        fs::read_dir(format!("/proc/{pid}/fd"))
            .expect("list daemon file descriptors")
            .count()
    };
    let deadline = Instant::now() + TIMEOUT;
    let mut last = count();
    loop {
        thread::sleep(Duration::from_millis(50));
        let now = count();
        if now == last {
            return now;
        }
        assert!(
            Instant::now() < deadline,
            "file descriptor count never settled"
        );
        last = now;
    }
}

/// What the daemon's file descriptors point at, with counts.
fn fd_summary(pid: u32) -> String {
    let mut targets = BTreeMap::<String, usize>::new();
    for entry in fs::read_dir(format!("/proc/{pid}/fd")).expect("list daemon file descriptors") {
        let target = entry
            .and_then(|e| fs::read_link(e.path()))
            .map_or_else(|e| format!("<{e}>"), |t| t.display().to_string());
        // Sockets and pipes differ only by inode number: count them together.
        let kind = match target.split_once(":[") {
            Some((kind, inode))
                if inode
                    .trim_end_matches(']')
                    .bytes()
                    .all(|b| b.is_ascii_digit()) =>
            {
                kind.to_owned()
            }
            _ => target,
        };
        *targets.entry(kind).or_default() += 1;
    }
    targets
        .iter()
        .map(|(target, n)| format!("{n:5} {target}\n"))
        .collect()
}

#[test]
fn many_short_connections_leak_no_file_descriptors() {
    let image = Image::new(MIB);
    let mut daemon = Daemon::start_with(&image, &four_queues());
    let connect_once = |i: u8| {
        let mut client = daemon.connect(4);
        for q in client.queues_mut() {
            q.write(0, &[i; 4096]);
            assert_eq!(q.read(0, 4096), [i; 4096], "connection {i}");
        }
    };
    connect_once(0);
    let baseline = settled_fd_count(daemon.pid());
    for i in 1..=20 {
        connect_once(i);
    }
    let after = settled_fd_count(daemon.pid());
    assert!(
        after <= baseline,
        "the daemon holds {after} file descriptors after 21 connections, {baseline} after one:\n{}",
        fd_summary(daemon.pid())
    );
    daemon.assert_running();
}
