//! Frontends come and go (a VMM restarts, a guest reboots): the daemon keeps serving the same
//! disk to the next one, whatever the previous one left behind, in every vubd poll mode (the
//! `poll_*` modules): busy-polling queues, too, are detached when their frontend goes.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::thread;
use std::time::{Duration, Instant};

use common::daemon::{Daemon, DaemonConfig, PollMode};
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

/// A session sequence on a 4 MiB image, four queues, pollers in `poll`: the first frontend
/// writes `[0, 1 MiB)` and waits for it, then leaves with 64 KiB writes of a stale pattern in
/// flight on every queue over `[2 MiB, 4 MiB)`. The second sees the completed data, and each
/// stale block either whole or not at all (a request the backend took is finished before the
/// next session starts, one it did not take is never run); it overwrites the stale area, and
/// nothing of the first session lands after that. A third frontend sees the second's data.
fn sessions_follow_one_another_consistently(poll: PollMode) {
    let image = Image::new(4 * MIB);
    let config = DaemonConfig {
        poll: Some(poll),
        ..four_queues()
    };
    let mut daemon = Daemon::vubd(&image, &config, &[]);
    let block = 64 << 10;
    let (done_len, stale_at) = (MIB as usize, 2 * MIB);
    let completed = Rng::new(0x5e55).bytes(done_len);
    let stale = vec![0xde; block];

    let mut first = daemon.connect(4);
    first.queue(1).write(0, &completed);
    for (i, q) in (0u64..).zip(first.queues_mut()) {
        for j in 0..8u64 {
            q.submit_write(stale_at + (i * 8 + j) * block as u64, &stale);
        }
        q.kick();
    }
    drop(first);

    let mut second = daemon.connect(4);
    let q = second.queue(2);
    assert_same(&completed, &q.read(0, done_len), 0, "completed writes");
    let area = q.read(stale_at, 2 * MIB as usize);
    for (i, got) in (0u64..).zip(area.chunks(block)) {
        assert!(
            got.iter().all(|&b| b == 0) || got == stale.as_slice(),
            "{poll}: 64 KiB block at {} is partly written by the vanished frontend",
            stale_at + i * block as u64
        );
    }
    let fresh = Rng::new(0xf5e5).bytes(2 * MIB as usize);
    q.write(stale_at, &fresh);
    q.flush();
    // Writes of the vanished frontend must not land after the new one's.
    thread::sleep(Duration::from_millis(50));
    assert_same(
        &fresh,
        &q.read(stale_at, fresh.len()),
        stale_at,
        "second frontend",
    );
    drop(second);

    let mut third = daemon.connect(1);
    let q = third.queue(0);
    assert_same(
        &completed,
        &q.read(0, done_len),
        0,
        "third frontend: first's data",
    );
    let back = q.read(stale_at, fresh.len());
    assert_same(&fresh, &back, stale_at, "third frontend: second's data");
    let on_host = image.read_host(stale_at, fresh.len());
    assert_same(&fresh, &on_host, stale_at, "image file");
    daemon.assert_running();
}

common::per_poll_mode! {
    #[test]
    fn sessions_follow_one_another_after_a_frontend_vanishes_with_requests_in_flight() {
        sessions_follow_one_another_consistently(POLL);
    }
}
