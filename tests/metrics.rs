//! The metrics of a running vubd (docs/metrics.md): the counts and bytes of
//! `device_get_stats` and of the Prometheus endpoint (`--metrics-listen`) equal what a
//! libblkio client sent, request for request, per device and per queue; they survive the
//! client's reconnection and go with the device; a request an NVMe/TCP target fails counts as
//! an I/O error; `vubd ctl stats` shows the rates of an interval; `--metrics off` counts
//! nothing.

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use common::TIMEOUT;
use common::client::{Client, ClientOptions};
use common::daemon::vubd_command;
use common::fake_target::{FakeTarget, Fault, Options};
use common::node::Node;
use serde_json::{Value, json};
use vubd::jsonrpc::{ClientError, FAILED, INVALID_PARAMS};
use vubd::nvme::spec::{Status, sc, sct};

const KIB: usize = 1 << 10;

/// Adds device `name` on a null disk with `queues` queues; returns its socket.
fn add(node: &Node, name: &str, queues: u16) -> PathBuf {
    add_disk(node, name, "null:64M", queues)
}

/// Adds device `name` on `disk` with `queues` queues; returns its socket.
fn add_disk(node: &Node, name: &str, disk: &str, queues: u16) -> PathBuf {
    node.add(name, disk, json!({ "num-queues": queues }))
}

/// The one device of `device_get_stats name=NAME`.
#[track_caller]
fn stats(node: &Node, name: &str) -> Value {
    let v = node.ok("device_get_stats", json!({ "name": name }));
    let devices = v["devices"].as_array().expect("devices");
    assert_eq!(devices.len(), 1, "{v}");
    devices[0].clone()
}

/// The address of the metrics endpoint, as vubd logs it (it listens on a port the kernel
/// chose).
fn metrics_addr(node: &Node) -> SocketAddr {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let out = node.daemon.output();
        if let Some(addr) = out
            .lines()
            .filter(|l| l.contains("metrics: serving"))
            .find_map(|l| l.split("address=").nth(1))
        {
            return addr.trim().parse().expect("an address");
        }
        assert!(Instant::now() < deadline, "no metrics address:\n{out}");
        thread::sleep(Duration::from_millis(10));
    }
}

/// `GET /metrics` on `addr`: the answer's head and the samples of its body, by name and
/// labels as written.
fn scrape(addr: SocketAddr) -> (String, BTreeMap<String, String>) {
    let mut s = TcpStream::connect(addr).expect("connect to the metrics endpoint");
    s.set_read_timeout(Some(TIMEOUT)).expect("timeout");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: vubd\r\n\r\n")
        .expect("send");
    let mut answer = String::new();
    s.read_to_string(&mut answer).expect("answer");
    let (head, body) = answer.split_once("\r\n\r\n").expect("a head and a body");
    let samples = body
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| {
            let (name, value) = l.rsplit_once(' ').expect("NAME VALUE");
            (name.to_owned(), value.to_owned())
        })
        .collect();
    (head.to_owned(), samples)
}

/// What a test client sends on one queue, request for request.
#[derive(Default)]
struct Sent {
    reads: u64,
    read_bytes: u64,
    writes: u64,
    written_bytes: u64,
    flushes: u64,
    discards: u64,
    write_zeroes: u64,
    /// Reads beyond the disk's end, which vubd refuses.
    refused: u64,
}

impl Sent {
    fn ops(&self) -> u64 {
        self.reads + self.writes + self.flushes + self.discards + self.write_zeroes
    }
}

/// Sends `reads` reads of `read_len` bytes and `writes` writes of `write_len` bytes on queue
/// `q` of `client`, in batches, and waits for them; all must succeed.
fn reads_and_writes(
    client: &mut Client,
    q: usize,
    (reads, read_len): (u64, usize),
    (writes, write_len): (u64, usize),
    sent: &mut Sent,
) {
    let queue = client.queue(q);
    let data = vec![0x3c; write_len];
    for batch in 0..reads.max(writes).div_ceil(8) {
        for i in batch * 8..(batch + 1) * 8 {
            let offset = i * 64 * KIB as u64;
            if i < reads {
                queue.submit_read(offset, read_len);
            }
            if i < writes {
                queue.submit_write(offset, &data);
            }
        }
        queue.kick();
        for done in queue.wait_all() {
            assert_eq!(done.ret, 0, "a read or a write failed");
        }
    }
    sent.reads += reads;
    sent.read_bytes += reads * read_len as u64;
    sent.writes += writes;
    sent.written_bytes += writes * write_len as u64;
}

/// Checks the counters of a device or queue (as `device_get_stats` has them) against `sent`.
#[track_caller]
fn assert_counts(v: &Value, sent: &Sent, what: &str) {
    let got = |k: &str| {
        v[k].as_u64()
            .unwrap_or_else(|| panic!("{what}: no {k} in {v}"))
    };
    assert_eq!(got("read_ops"), sent.reads, "{what}: reads");
    assert_eq!(got("read_bytes"), sent.read_bytes, "{what}: bytes read");
    assert_eq!(got("write_ops"), sent.writes, "{what}: writes");
    assert_eq!(
        got("written_bytes"),
        sent.written_bytes,
        "{what}: bytes written"
    );
    assert_eq!(got("flush_ops"), sent.flushes, "{what}: flushes");
    assert_eq!(got("discard_ops"), sent.discards, "{what}: discards");
    assert_eq!(
        got("write_zeroes_ops"),
        sent.write_zeroes,
        "{what}: write-zeroes"
    );
    assert_eq!(got("other_ops"), 0, "{what}: GET_ID");
    assert_eq!(
        v["errors"],
        json!({"io": 0, "unsupported": 0, "invalid": sent.refused}),
        "{what}: errors"
    );
    assert_eq!(got("in_flight"), 0, "{what}: in flight");
    let counts = v["latency"]["counts"].as_array().expect("latency counts");
    let latencies: u64 = counts.iter().map(|c| c.as_u64().expect("a count")).sum();
    assert_eq!(latencies, sent.ops(), "{what}: one latency per request");
}

fn connect(socket: &Path, queues: usize) -> Client {
    Client::connect(socket, &ClientOptions::queues(queues)).expect("libblkio connects")
}

#[test]
fn counts_and_bytes_equal_what_the_client_sent_and_survive_a_reconnection() {
    let node = Node::start(&["--metrics-listen", "127.0.0.1:0"]);
    let addr = metrics_addr(&node);
    let socket = add(&node, "a", 2);
    add(&node, "idle", 1);
    let mut sent = [Sent::default(), Sent::default()];
    let mut client = connect(&socket, 2);
    reads_and_writes(&mut client, 0, (40, 4 * KIB), (12, 8 * KIB), &mut sent[0]);
    reads_and_writes(&mut client, 1, (25, 512), (6, 64 * KIB), &mut sent[1]);
    let q1 = client.queue(1);
    for _ in 0..4 {
        q1.flush();
    }
    for i in 0..3 {
        q1.discard(i << 20, 1 << 20);
    }
    for i in 0..2 {
        q1.write_zeroes(i << 16, 1 << 16, false);
    }
    (sent[1].flushes, sent[1].discards, sent[1].write_zeroes) = (4, 3, 2);
    // Beyond the end of the 64 MiB disk: refused as invalid, never started.
    let q0 = client.queue(0);
    for i in 0..3 {
        assert_eq!(q0.try_read((64 << 20) + i * 4096, 4096), Err(-libc::EIO));
    }
    sent[0].refused = 3;

    let total = |sent: &[Sent; 2]| Sent {
        reads: sent[0].reads + sent[1].reads,
        read_bytes: sent[0].read_bytes + sent[1].read_bytes,
        writes: sent[0].writes + sent[1].writes,
        written_bytes: sent[0].written_bytes + sent[1].written_bytes,
        flushes: sent[0].flushes + sent[1].flushes,
        discards: sent[0].discards + sent[1].discards,
        write_zeroes: sent[0].write_zeroes + sent[1].write_zeroes,
        refused: sent[0].refused + sent[1].refused,
    };
    let check = |sent: &[Sent; 2]| {
        let d = stats(&node, "a");
        assert_eq!(d["name"], "a");
        assert_counts(&d, &total(sent), "device a");
        for (q, s) in sent.iter().enumerate() {
            assert_eq!(d["queues"][q]["queue"], q);
            assert_counts(&d["queues"][q], s, &format!("queue {q}"));
        }
    };
    check(&sent);
    let all = node.ok("device_get_stats", Value::Null);
    let names: Vec<&str> = all["devices"]
        .as_array()
        .expect("devices")
        .iter()
        .map(|d| d["name"].as_str().expect("a name"))
        .collect();
    assert_eq!(names, ["a", "idle"]);
    assert_eq!(
        all["latency_bounds_ns"].as_array().map(Vec::len),
        Some(109),
        "the finite bounds"
    );
    assert_counts(&all["devices"][1], &Sent::default(), "device idle");

    // The same numbers over HTTP, named as Prometheus names them.
    let (head, samples) = scrape(addr);
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert!(
        head.contains("\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n"),
        "{head}"
    );
    let t = total(&sent);
    for (name, want) in [
        ("vubd_device_read_ops_total{device=\"a\"}", t.reads),
        ("vubd_device_write_ops_total{device=\"a\"}", t.writes),
        ("vubd_device_flush_ops_total{device=\"a\"}", t.flushes),
        ("vubd_device_discard_ops_total{device=\"a\"}", t.discards),
        (
            "vubd_device_write_zeroes_ops_total{device=\"a\"}",
            t.write_zeroes,
        ),
        ("vubd_device_other_ops_total{device=\"a\"}", 0),
        ("vubd_device_read_bytes_total{device=\"a\"}", t.read_bytes),
        (
            "vubd_device_written_bytes_total{device=\"a\"}",
            t.written_bytes,
        ),
        ("vubd_device_errors_total{device=\"a\",kind=\"invalid\"}", 3),
        ("vubd_device_errors_total{device=\"a\",kind=\"io\"}", 0),
        ("vubd_device_in_flight_requests{device=\"a\"}", 0),
        ("vubd_device_latency_seconds_count{device=\"a\"}", t.ops()),
        (
            "vubd_device_latency_seconds_bucket{device=\"a\",le=\"+Inf\"}",
            t.ops(),
        ),
        (
            "vubd_queue_read_ops_total{device=\"a\",queue=\"0\"}",
            sent[0].reads,
        ),
        (
            "vubd_queue_read_ops_total{device=\"a\",queue=\"1\"}",
            sent[1].reads,
        ),
        (
            "vubd_queue_written_bytes_total{device=\"a\",queue=\"1\"}",
            sent[1].written_bytes,
        ),
        ("vubd_device_read_ops_total{device=\"idle\"}", 0),
    ] {
        assert_eq!(
            samples.get(name).map(String::as_str),
            Some(want.to_string().as_str()),
            "{name}"
        );
    }

    // The client goes and comes back: the device's counts go on from where they were.
    drop(client);
    let mut client = connect(&socket, 2);
    reads_and_writes(&mut client, 1, (7, 4 * KIB), (0, 0), &mut sent[1]);
    check(&sent);

    // A removed device's metrics go with it.
    drop(client);
    node.ok("device_remove", json!({"name": "a"}));
    match node.call("device_get_stats", json!({"name": "a"})) {
        Err(ClientError::Rpc(e)) => {
            assert_eq!(e.code, INVALID_PARAMS);
            assert_eq!(e.message, "name: no device is named \"a\"");
        }
        other => panic!("stats of a removed device: {other:?}"),
    }
    let all = node.ok("device_get_stats", Value::Null);
    assert_eq!(all["devices"].as_array().map(Vec::len), Some(1));
    let (_, samples) = scrape(addr);
    assert!(
        samples.keys().all(|k| !k.contains("device=\"a\"")),
        "{samples:?}"
    );
    assert!(samples.contains_key("vubd_device_read_ops_total{device=\"idle\"}"));
}

/// Runs `vubd ctl --socket CONTROL ARGS...`: exit status, standard output and error.
fn ctl(node: &Node, args: &[&str]) -> (Option<i32>, String, String) {
    let mut cmd: Command = vubd_command();
    cmd.arg("ctl").arg("--socket").arg(&node.control).args(args);
    let out = cmd.output().expect("run vubd ctl");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn ctl_stats_shows_the_rates_of_an_interval() {
    let node = Node::start(&[]);
    let socket = add(&node, "busy", 1);
    add(&node, "quiet", 1);
    let mut client = connect(&socket, 1);
    let stop = AtomicBool::new(false);
    let (json_out, table) = thread::scope(|s| {
        let load = s.spawn(|| {
            // At most 10 s and 200,000 reads: the two ctl runs below take about 1.5 s.
            let end = Instant::now() + Duration::from_secs(10);
            let q = client.queue(0);
            for i in 0..200_000u64 {
                if stop.load(Ordering::Relaxed) || Instant::now() > end {
                    return i;
                }
                q.read(i % 1024 * 4096, 4096);
            }
            200_000
        });
        let json_out = ctl(&node, &["--json", "stats", "interval=0.5"]);
        let table = ctl(&node, &["stats", "interval=1", "name=busy"]);
        stop.store(true, Ordering::Relaxed);
        assert!(load.join().expect("the load") > 0, "the load ran");
        (json_out, table)
    });
    let (code, out, err) = json_out;
    assert_eq!(code, Some(0), "{err}");
    let v: Value = serde_json::from_str(&out).expect("JSON");
    let rows = v.as_array().expect("a list");
    assert_eq!(rows.len(), 2, "{out}");
    let (busy, quiet) = (&rows[0], &rows[1]);
    assert_eq!(
        (&busy["name"], &quiet["name"]),
        (&json!("busy"), &json!("quiet"))
    );
    let ops = busy["ops"].as_u64().expect("ops");
    assert!(ops > 0, "{out}");
    assert_eq!(busy["bytes"].as_u64(), Some(ops * 4096), "{out}");
    let seconds = busy["seconds"].as_f64().expect("seconds");
    assert!((0.5..5.0).contains(&seconds), "{out}");
    let p50 = busy["latency"]["p50_ns"].as_f64().expect("a p50");
    let p99 = busy["latency"]["p99_ns"].as_f64().expect("a p99");
    assert!(0.0 < p50 && p50 <= p99, "{out}");
    assert_eq!(quiet["ops"], 0);
    assert_eq!(quiet["latency"]["p50_ns"], Value::Null);

    let (code, out, err) = table;
    assert_eq!(code, Some(0), "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "only the device named:\n{out}");
    let header: Vec<&str> = lines[0].split_whitespace().collect();
    assert_eq!(header, ["NAME", "IOPS", "MB/S", "P50", "P95", "P99"]);
    let row: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(row[0], "busy");
    assert!(row[1].parse::<u64>().expect("IOPS") > 0, "{out}");
    assert!(row[3].ends_with('s'), "a latency with its unit: {out}");

    let (code, _, err) = ctl(&node, &["stats", "interval=0"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("interval=\"0\""), "{err}");
    let (code, _, err) = ctl(&node, &["stats", "name=nope", "interval=0.1"]);
    assert_eq!(code, Some(1));
    assert_eq!(err, "vubd ctl: stats: name: no device is named \"nope\"\n");
}

#[test]
fn a_request_the_disk_fails_counts_as_an_io_error() {
    let target = FakeTarget::start(Options::default()).expect("start the fake target");
    let node = Node::start(&[]);
    let disk = format!("nvme-tcp://{}/{}", target.addr(), target.nqn());
    let socket = add_disk(&node, "t", &disk, 1);
    let mut client = connect(&socket, 1);
    let q = client.queue(0);
    q.write(0, &[0x5a; 4096]);
    // The target fails the next command with a media error: vubd completes the read with
    // IOERR.
    target.set_fault(Fault::FailIo(Status::new(
        sct::MEDIA,
        sc::UNRECOVERED_READ_ERROR,
        true,
    )));
    assert_eq!(q.try_read(0, 4096), Err(-libc::EIO));
    assert_eq!(q.read(0, 4096), [0x5a; 4096]);
    let sent = Sent {
        reads: 2,
        read_bytes: 4096,
        writes: 1,
        written_bytes: 4096,
        ..Sent::default()
    };
    let d = stats(&node, "t");
    assert_eq!(d["errors"]["io"], 1, "{d}");
    let mut without_io_error = d.clone();
    without_io_error["errors"]["io"] = json!(0);
    assert_counts(&without_io_error, &sent, "device t");
}

#[test]
fn with_metrics_off_nothing_is_counted_and_the_method_says_so() {
    let node = Node::start(&["--metrics", "off"]);
    let socket = add(&node, "a", 1);
    let mut client = connect(&socket, 1);
    client.queue(0).write(0, &[1; 4096]);
    match node.call("device_get_stats", Value::Null) {
        Err(ClientError::Rpc(e)) => {
            assert_eq!(e.code, FAILED);
            assert_eq!(e.message, "vubd counts nothing (--metrics off)");
        }
        other => panic!("device_get_stats with --metrics off: {other:?}"),
    }
}
