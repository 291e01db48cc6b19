//! Rate limits (docs/control-api.md, `device_set_qos`): a device over its limit keeps its
//! requests in its virtqueue and completes every one of them, no faster than the limit and
//! without an error, while its poller sleeps instead of spinning; the time held back shows in
//! its metrics; a change of limits takes effect on the running device; a limit on one
//! direction leaves the other alone; devices of a group share the group's limit.
//!
//! Only lower bounds on time are asserted (a limit that is enforced cannot be beaten, however
//! loaded the machine); the accuracy of the rates is measured by `benches/qos.sh`.

mod common;

use std::thread;
use std::time::{Duration, Instant};

use common::client::{Client, ClientOptions, Queue};
use common::node::Node;
use common::procfs;
use serde_json::{Value, json};

const KIB: usize = 1 << 10;

fn connect(socket: &std::path::Path) -> Client {
    Client::connect(socket, &ClientOptions::queues(1)).expect("connect")
}

/// Submits `n` reads (or writes) of `len` bytes at once and waits for them; returns how long
/// they took. Every one must succeed.
#[track_caller]
fn run_batch(q: &mut Queue, n: usize, len: usize, write: bool) -> Duration {
    let data = vec![0x5a; len];
    let start = Instant::now();
    for i in 0..n {
        let offset = (i * len) as u64;
        if write {
            q.submit_write(offset, &data);
        } else {
            q.submit_read(offset, len);
        }
    }
    q.kick();
    let done = q.wait_all();
    let took = start.elapsed();
    assert_eq!(done.len(), n);
    for (i, d) in done.iter().enumerate() {
        assert_eq!(d.ret, 0, "request {i} failed");
    }
    took
}

/// The device's `throttled_ns` as `device_get_stats` counts it.
fn throttled(node: &Node, name: &str) -> Duration {
    let v = node.ok("device_get_stats", json!({ "name": name }));
    Duration::from_nanos(
        v["devices"][0]["throttled_ns"]
            .as_u64()
            .expect("throttled_ns"),
    )
}

#[test]
fn a_device_over_its_limit_completes_every_request_at_the_limit_without_spinning() {
    let node = Node::start(&[]);
    // 100 operations a second, 10 ms of burst (one operation).
    let socket = node.add(
        "slow",
        "null:64M",
        json!({"iops-total": 100, "qos-burst-ms": 10}),
    );
    let mut client = connect(&socket);
    let q = client.queue(0);
    run_batch(q, 1, 4 * KIB, false);
    let cpu_before = procfs::cpu_time(node.daemon.pid());
    // 128 reads at once: at 100 a second, at least 1.26 s.
    let took = run_batch(q, 128, 4 * KIB, false);
    let cpu = procfs::cpu_time(node.daemon.pid()) - cpu_before;
    assert!(took >= Duration::from_millis(1260), "128 reads in {took:?}");
    // A poller that spun while the device was held back would have used about `took`; a
    // sleeping one a few wake-ups a second (5% of one CPU is far above that: see
    // tests/blkio_poll_idle.rs).
    assert!(
        cpu < took / 20,
        "vubd used {cpu:?} of CPU in {took:?}: {:?}",
        procfs::thread_cpu_times(node.daemon.pid())
    );
    let held = throttled(&node, "slow");
    assert!(
        held >= Duration::from_millis(1000) && held <= took,
        "throttled {held:?} of {took:?}"
    );

    // Without a limit the same batch is done at once; with a new one it is held again.
    let set = node.ok("device_set_qos", json!({"name": "slow"}));
    assert_eq!(set["iops-total"], Value::Null, "{set}");
    let took = run_batch(q, 128, 4 * KIB, false);
    assert!(took < Duration::from_millis(1000), "128 reads in {took:?}");
    node.ok(
        "device_set_qos",
        json!({"name": "slow", "iops-read": 200, "qos-burst-ms": 10}),
    );
    // New limits start with their whole burst (two reads): 62 more at 200 a second.
    let took = run_batch(q, 64, 4 * KIB, false);
    assert!(took >= Duration::from_millis(300), "64 reads in {took:?}");
}

#[test]
fn a_byte_limit_on_reads_leaves_writes_alone() {
    let node = Node::start(&[]);
    // 1 MiB/s of reads, 10 ms of burst.
    let socket = node.add(
        "reads",
        "null:64M",
        json!({"bps-read": "1M", "qos-burst-ms": 10}),
    );
    let mut client = connect(&socket);
    let q = client.queue(0);
    // 32 writes of 64 KiB (2 MiB): not limited.
    let took = run_batch(q, 32, 64 * KIB, true);
    assert!(
        took < Duration::from_millis(1000),
        "2 MiB written in {took:?}"
    );
    // 16 reads of 64 KiB: 1 MiB at 1 MiB/s, less the burst (10 ms), the lease (1 ms) and two
    // reads taken before their time is paid (the read that uses up a lease is taken whatever
    // its size, and paid with the next lease; and the last read): 860 ms at least.
    let took = run_batch(q, 16, 64 * KIB, false);
    assert!(took >= Duration::from_millis(860), "1 MiB read in {took:?}");
}

#[test]
fn devices_of_a_group_share_its_limit() {
    let node = Node::start(&[]);
    node.ok(
        "qos_group_set",
        json!({"name": "tier", "iops-total": 200, "qos-burst-ms": 10}),
    );
    let sockets: Vec<_> = ["a", "b"]
        .iter()
        .map(|name| node.add(name, "null:64M", json!({"qos-group": "tier"})))
        .collect();
    let free = node.add("free", "null:64M", json!({}));
    let mut free = connect(&free);
    // Each device alone would take 100 reads in half a second; sharing 200 a second, the
    // two take a second together.
    let start = Instant::now();
    let runs: Vec<_> = sockets
        .into_iter()
        .map(|s| {
            thread::spawn(move || {
                let mut c = connect(&s);
                run_batch(c.queue(0), 100, 4 * KIB, false)
            })
        })
        .collect();
    // A device outside the group is not held back meanwhile.
    thread::sleep(Duration::from_millis(100));
    let took = run_batch(free.queue(0), 128, 4 * KIB, false);
    assert!(
        took < Duration::from_millis(500),
        "the free device took {took:?}"
    );
    for r in runs {
        r.join().expect("a device's run");
    }
    let took = start.elapsed();
    assert!(took >= Duration::from_millis(950), "200 reads in {took:?}");
    let held = throttled(&node, "a") + throttled(&node, "b");
    assert!(held >= Duration::from_millis(500), "throttled {held:?}");
}
