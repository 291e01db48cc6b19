//! The sandbox of a running vubd, seen from outside: every thread runs under seccomp filters
//! (`/proc/PID/task/TID/status`), as many as its role stacks on the baseline, with
//! `--seccomp enforce` (the default) and `log`, and none with `off`; the guest memory it maps
//! stays out of its core dumps (`dd` in the mappings' VmFlags). That a forbidden call is
//! refused is shown on each role's filter by the unit tests of `src/sandbox`.

mod common;

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

use common::daemon::{Daemon, DaemonConfig};
use common::fake_target::{FakeTarget, Options};
use common::procfs::{ThreadSeccomp, thread_seccomp};
use common::{Image, TIMEOUT, assert_same};

const MIB: u64 = 1 << 20;

/// Filters of each role: the baseline's two, and the role's allow-list, plus the filter that
/// answers an open EACCES in the roles that open no file.
const CONTROL: u32 = 4;
const SESSION: u32 = 3;
const POLLER: u32 = 4;
const SUPERVISOR: u32 = 4;
const METRICS: u32 = 4;

/// The filters a thread of vubd named `name` runs under; `None` for a thread of the kernel's
/// (io_uring workers).
fn expected_filters(name: &str) -> Option<u32> {
    if name.starts_with("iou-") {
        return None;
    }
    Some(match name {
        "vubd" | "vubd-signals" => CONTROL,
        "vubd-vhost-user" | "vring_worker" => SESSION,
        "vubd-nvme-tcp" => SUPERVISOR,
        "vubd-metrics" => METRICS,
        n if n.starts_with("vubd-device-") => SESSION,
        n if n.starts_with("vubd-poller-") => POLLER,
        other => panic!("a thread vubd does not name: {other:?}"),
    })
}

/// vubd's threads by name (io_uring workers left out) and their filters, or what is wrong:
/// a thread without filters, or with another number than its role stacks.
fn filtered_threads(daemon: &Daemon) -> Result<BTreeMap<String, u32>, String> {
    let mut by_name = BTreeMap::new();
    for ThreadSeccomp {
        name,
        mode,
        filters,
    } in thread_seccomp(daemon.pid())
    {
        let Some(expected) = expected_filters(&name) else {
            continue;
        };
        if (mode, filters) != (2, expected) {
            return Err(format!(
                "{name}: Seccomp: {mode} (2: filtered), Seccomp_filters: {filters} \
                 (expected {expected})"
            ));
        }
        by_name.insert(name, filters);
    }
    Ok(by_name)
}

/// Waits until every thread of vubd runs under its role's filters and `names` are among
/// them: a thread takes its name, then its role's filter, once it runs, and the socket
/// listens before every thread has.
fn wait_filtered(daemon: &Daemon, names: &[&str]) -> BTreeMap<String, u32> {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let result = filtered_threads(daemon).and_then(|t| {
            match names.iter().find(|n| !t.contains_key(**n)) {
                Some(n) => Err(format!("no {n} in {t:?}")),
                None => Ok(t),
            }
        });
        match result {
            Ok(threads) => return threads,
            Err(e) if Instant::now() >= deadline => panic!("after {TIMEOUT:?}: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

/// Writes and reads back a few blocks on every queue.
fn some_io(daemon: &Daemon, queues: usize) {
    let mut client = daemon.connect(queues);
    for q in 0..queues {
        let data = vec![0x5a ^ q as u8; 64 << 10];
        let offset = q as u64 * MIB;
        let queue = client.queue(q);
        queue.write(offset, &data);
        assert_same(&data, &queue.read(offset, data.len()), offset, "read back");
    }
}

#[test]
fn every_thread_of_a_serving_vubd_runs_under_the_filters_of_its_role() {
    let image = Image::new(8 * MIB);
    let config = DaemonConfig {
        num_queues: Some(2),
        ..DaemonConfig::default()
    };
    for mode in [None, Some("log"), Some("enforce")] {
        let extra: Vec<&OsStr> = mode
            .iter()
            .flat_map(|m| [OsStr::new("--seccomp"), OsStr::new(m)])
            .collect();
        let mut daemon = Daemon::vubd(&image, &config, &extra);
        // Connected: the session's protocol and relay threads exist, and the pollers have
        // opened their rings.
        let client = daemon.connect(2);
        wait_filtered(
            &daemon,
            &[
                "vubd",
                "vubd-signals",
                "vubd-device-0",
                "vubd-vhost-user",
                "vring_worker",
                "vubd-poller-0",
            ],
        );
        drop(client);
        some_io(&daemon, 2);
        wait_filtered(&daemon, &[]);
        daemon.assert_running();
    }
}

#[test]
fn an_nvme_tcp_supervisor_runs_under_its_filters() {
    let target = FakeTarget::start(Options::default()).expect("start the fake target");
    let uri = format!("nvme-tcp://{}/{}", target.addr(), target.nqn());
    let mut daemon = Daemon::vubd_disk(Path::new(&uri), &DaemonConfig::default(), &[]);
    some_io(&daemon, 1);
    let threads = wait_filtered(&daemon, &["vubd-nvme-tcp"]);
    assert_eq!(
        threads.get("vubd-nvme-tcp"),
        Some(&SUPERVISOR),
        "{threads:?}"
    );
    daemon.assert_running();
}

#[test]
fn the_metrics_endpoint_runs_under_its_filters_and_serves() {
    let image = Image::new(8 * MIB);
    let mut daemon = Daemon::vubd(
        &image,
        &DaemonConfig::default(),
        &[OsStr::new("--metrics-listen"), OsStr::new("127.0.0.1:0")],
    );
    some_io(&daemon, 1);
    let threads = wait_filtered(&daemon, &["vubd-metrics"]);
    assert_eq!(threads.get("vubd-metrics"), Some(&METRICS), "{threads:?}");
    // The port the kernel chose, as vubd logs it.
    let out = daemon.output();
    let addr = out
        .lines()
        .find_map(|l| l.split("metrics: serving").nth(1)?.split("address=").nth(1))
        .unwrap_or_else(|| panic!("no metrics address in:\n{out}"));
    let mut s = TcpStream::connect(addr.trim()).expect("connect to the metrics endpoint");
    s.set_read_timeout(Some(TIMEOUT)).expect("timeout");
    s.write_all(b"GET /metrics HTTP/1.1\r\n\r\n").expect("send");
    let mut answer = String::new();
    s.read_to_string(&mut answer).expect("answer");
    assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
    assert!(
        answer.contains("\nvubd_device_write_ops_total{device="),
        "{answer}"
    );
    daemon.assert_running();
}

#[test]
fn with_seccomp_off_no_thread_is_filtered() {
    let image = Image::new(8 * MIB);
    let daemon = Daemon::vubd(
        &image,
        &DaemonConfig::default(),
        &[OsStr::new("--seccomp"), OsStr::new("off")],
    );
    let _client = daemon.connect(1);
    for t in thread_seccomp(daemon.pid()) {
        assert_eq!((t.mode, t.filters), (0, 0), "{t:?}");
    }
}

/// The mappings of `pid` whose path starts with `prefix`: their ranges and VmFlags.
fn mappings(pid: u32, prefix: &str) -> Vec<(String, String)> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).expect("read smaps");
    let mut found = Vec::new();
    let mut current: Option<String> = None;
    for line in smaps.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields
            .first()
            .is_some_and(|f| f.contains('-') && !f.ends_with(':'))
        {
            current = (fields.len() >= 6 && fields[5].starts_with(prefix)).then(|| line.to_owned());
        } else if let (Some(map), Some(flags)) = (&current, line.strip_prefix("VmFlags:")) {
            found.push((map.clone(), flags.trim().to_owned()));
            current = None;
        }
    }
    found
}

#[test]
fn guest_memory_stays_out_of_core_dumps() {
    let image = Image::new(8 * MIB);
    let daemon = Daemon::vubd(&image, &DaemonConfig::default(), &[]);
    let _client = daemon.connect(1);
    // libblkio's guest memory: its I/O buffers and its rings, each a memfd.
    let mut seen = 0;
    for prefix in ["/memfd:libblkio-buf", "/memfd:virtio-ring"] {
        let maps = mappings(daemon.pid(), prefix);
        assert!(!maps.is_empty(), "vubd maps no {prefix}");
        for (map, flags) in maps {
            assert!(
                flags.split(' ').any(|f| f == "dd"),
                "{map}: VmFlags {flags}"
            );
            seen += 1;
        }
    }
    assert!(seen >= 2);
}
