//! The control socket (`--control-socket`) against a running vubd: devices added and removed
//! while it runs and served to libblkio, a removal under another device's load, add/remove
//! cycles that must leak nothing, every kind of bad request, several clients at once, rate
//! limits and their groups set and listed (whether they are enforced: tests/qos.rs), and
//! `vubd ctl`.

mod common;

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use common::client::{Client, ClientOptions};
use common::daemon::{Daemon, socket_exists, vubd_command};
use common::node::Node;
use common::{Image, TIMEOUT, procfs};
use serde_json::{Value, json};
use vubd::jsonrpc::{self, ClientError};

// The rate-limit methods, in a file of their own.
#[path = "control/qos.rs"]
mod qos;

const MIB: u64 = 1 << 20;

/// The JSON-RPC error of a call that must fail: its code and message.
#[track_caller]
fn error_of(r: Result<Value, ClientError>) -> (i64, String) {
    match r {
        Err(ClientError::Rpc(e)) => (e.code, e.message),
        other => panic!("expected a JSON-RPC error, got {other:?}"),
    }
}

fn connect(socket: &Path) -> Client {
    Client::connect(socket, &ClientOptions::queues(1)).expect("libblkio connects")
}

#[test]
fn devices_added_at_runtime_serve_and_go_when_removed() {
    let mut node = Node::start(&[]);
    let mode = std::fs::metadata(&node.control)
        .expect("control socket")
        .permissions();
    assert_eq!(
        mode.mode() & 0o777,
        0o600,
        "the control socket is its owner's alone"
    );
    assert_eq!(
        node.ok("version", Value::Null),
        json!({"version": env!("CARGO_PKG_VERSION")})
    );
    assert_eq!(node.ok("device_list", json!({})), json!([]));

    let image = Image::new(16 * MIB);
    let a = node.add(
        "a",
        image.path().to_str().expect("UTF-8"),
        json!({"num-queues": 2}),
    );
    let b = node.add("b", "null:1G", json!({"readonly": true}));
    let mut client = connect(&a);
    let pattern: Vec<u8> = (0..8192u32).map(|i| (i * 7) as u8).collect();
    client.queue(0).write(4096, &pattern);
    assert_eq!(client.queue(0).read(4096, 8192), pattern);

    let list = node.ok("device_list", Value::Null);
    assert_eq!(
        list,
        json!([
            {"name": "a", "socket": a, "disk": image.path(), "readonly": false,
             "num_queues": 2, "queue_size": 256, "capacity": 16 * MIB, "block_size": 512,
             "connected": true, "qos": {"qos-burst-ms": 100}},
            {"name": "b", "socket": b, "disk": "null:1073741824", "readonly": true,
             "num_queues": 64, "queue_size": 256, "capacity": 1u64 << 30, "block_size": 512,
             "connected": false, "qos": {"qos-burst-ms": 100}},
        ])
    );
    let one = node.ok("device_list", json!({"name": "b"}));
    assert_eq!(one.as_array().map(Vec::len), Some(1));

    // Removed while its frontend is connected: the session ends, the socket goes, the
    // image is let go (another device can take it for writing).
    node.remove("a");
    assert!(!socket_exists(&a), "the socket file is removed");
    drop(client);
    assert_eq!(node.names(), ["b"]);
    let a2 = node.add("a2", image.path().to_str().expect("UTF-8"), json!({}));
    let mut client = connect(&a2);
    assert_eq!(client.queue(0).read(4096, 8192), pattern, "the data stayed");
    drop(client);
    node.remove("a2");
    node.remove("b");
    assert!(node.names().is_empty());
    node.daemon.assert_running();
}

#[test]
fn devices_of_the_command_line_are_listed_and_removable() {
    let dir = tempfile::tempdir().expect("temp dir");
    let control = dir.path().join("control.sock");
    let sock = dir.path().join("first.sock");
    let device = format!("name=first,socket={},disk=null:64M", sock.display());
    let mut node = Node {
        daemon: Daemon::vubd_with_args(
            &[
                "--control-socket".as_ref(),
                control.as_os_str(),
                "--device".as_ref(),
                device.as_ref(),
            ],
            &sock,
        ),
        control,
        dir,
    };
    assert_eq!(node.names(), ["first"]);
    let mut client = connect(&sock);
    client.queue(0).write(0, &[1; 512]);
    drop(client);
    node.remove("first");
    assert!(node.names().is_empty());
    node.daemon.assert_running();
    // SIGTERM ends a vubd whose devices came and went like any other.
    let status = node.daemon.terminate();
    assert!(status.success(), "{status}\n{}", node.daemon.output());
    assert!(
        !socket_exists(&node.control),
        "the control socket is removed"
    );
}

/// Device `quiet` is removed, with its frontend connected and busy, while device `busy` runs
/// reads and writes on the same poller: `busy` sees no error, and no request of it waits
/// longer than 100 ms.
#[test]
fn removing_a_device_leaves_the_other_on_its_poller_unharmed() {
    let cpu = procfs::own_cpus()[0].to_string();
    let node = Node::start(&["--cpus", &cpu, "--poll", "adaptive"]);
    let (img_busy, img_quiet) = (Image::new(64 * MIB), Image::new(64 * MIB));
    let busy = node.add("busy", img_busy.path().to_str().expect("UTF-8"), json!({}));
    let quiet = node.add(
        "quiet",
        img_quiet.path().to_str().expect("UTF-8"),
        json!({}),
    );
    let mut busy_client = connect(&busy);
    let mut quiet_client = connect(&quiet);
    let stop = AtomicBool::new(false);
    let (worst, ops) = thread::scope(|s| {
        let quiet_io = s.spawn(|| {
            // The removed device's frontend keeps requests coming until its session ends:
            // then its last batch never completes.
            let data = vec![0x5a; 4096];
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let q = quiet_client.queue(0);
                for k in 0..4 {
                    q.submit_write((i + k) % 1024 * 4096, &data);
                }
                q.kick();
                if q.wait_all_within(Duration::from_millis(500)).is_err() {
                    return;
                }
                i += 4;
            }
        });
        let load = s.spawn(|| {
            let data = vec![0xa5; 4096];
            let mut worst = Duration::ZERO;
            let mut ops = 0u64;
            let end = Instant::now() + Duration::from_secs(3);
            while Instant::now() < end {
                let t = Instant::now();
                let offset = ops % 4096 * 4096;
                let q = busy_client.queue(0);
                if ops % 2 == 0 {
                    q.write(offset, &data);
                } else {
                    assert_eq!(q.read(offset - 4096, 4096), data);
                }
                worst = worst.max(t.elapsed());
                ops += 1;
            }
            (worst, ops)
        });
        thread::sleep(Duration::from_secs(1));
        node.remove("quiet");
        let r = load.join().expect("the busy device's load");
        stop.store(true, Ordering::Relaxed);
        quiet_io.join().expect("the removed device's frontend");
        r
    });
    assert!(ops > 100, "the busy device made progress: {ops} requests");
    assert!(
        worst < Duration::from_millis(100),
        "a request of the busy device waited {worst:?} while the other was removed"
    );
    assert_eq!(node.names(), ["busy"]);
}

/// Descriptors, threads and memory mappings of vubd's process.
fn resources(pid: u32) -> (usize, usize, usize) {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("fds")
        .count();
    let threads = procfs::thread_cpu_times(pid).len();
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .expect("maps")
        .lines()
        .count();
    (fds, threads, maps)
}

/// [`resources`] once they stay the same for 200 ms (session threads end a little after
/// their frontend goes), within [`TIMEOUT`].
fn settled(pid: u32) -> (usize, usize, usize) {
    let deadline = Instant::now() + TIMEOUT;
    let mut last = resources(pid);
    loop {
        thread::sleep(Duration::from_millis(200));
        let now = resources(pid);
        if now == last || Instant::now() > deadline {
            return now;
        }
        last = now;
    }
}

#[test]
fn a_hundred_adds_and_removes_leak_no_descriptor_thread_or_mapping() {
    let node = Node::start(&[]);
    let image = Image::new(16 * MIB);
    let path = image.path().to_str().expect("UTF-8");
    let cycle = |i: u64| {
        let socket = node.add("cycled", path, json!({}));
        let mut client = connect(&socket);
        client.queue(0).write(i * 4096, &[i as u8; 4096]);
        drop(client);
        node.remove("cycled");
    };
    // Ten cycles first: what the first devices set up once stays (the pollers' rings, the
    // allocator's per-thread arenas).
    for i in 0..10 {
        cycle(i);
    }
    let before = settled(node.daemon.pid());
    for i in 10..110 {
        cycle(i);
    }
    let after = settled(node.daemon.pid());
    assert_eq!(
        after, before,
        "(descriptors, threads, mappings) after 100 more cycles vs after the first ten"
    );
}

#[test]
fn bad_requests_get_an_error_naming_what_is_wrong_and_change_nothing() {
    let mut node = Node::start(&[]);
    let kept = node.add("kept", "null:1M", json!({}));
    let image = Image::new(MIB);
    let img = image.path().to_str().expect("UTF-8");
    let missing = node.dir.path().join("missing.img");
    let sock = |n: &str| node.socket(n);
    let cases: Vec<(&str, Value, i64, String)> = vec![
        (
            "nope",
            Value::Null,
            jsonrpc::METHOD_NOT_FOUND,
            "unknown method \"nope\"".into(),
        ),
        (
            "version",
            json!([1]),
            jsonrpc::INVALID_PARAMS,
            "by name".into(),
        ),
        (
            "version",
            json!({"x": 1}),
            jsonrpc::INVALID_PARAMS,
            "unknown parameter \"x\"".into(),
        ),
        (
            "device_add",
            json!({"socket": sock("x")}),
            jsonrpc::INVALID_PARAMS,
            "disk is required".into(),
        ),
        (
            "device_add",
            json!({"disk": img}),
            jsonrpc::INVALID_PARAMS,
            "socket (or fd) is required".into(),
        ),
        (
            "device_add",
            json!({"socket": sock("x"), "disk": img, "color": "red"}),
            jsonrpc::INVALID_PARAMS,
            "unknown key \"color\"".into(),
        ),
        (
            "device_add",
            json!({"socket": sock("x"), "disk": img, "num-queues": 0}),
            jsonrpc::INVALID_PARAMS,
            "--num-queues 0".into(),
        ),
        (
            "device_add",
            json!({"socket": sock("x"), "disk": img, "readonly": [true]}),
            jsonrpc::INVALID_PARAMS,
            "readonly: must be a string, a number or a boolean".into(),
        ),
        (
            "device_add",
            json!({"socket": kept, "disk": img}),
            jsonrpc::INVALID_PARAMS,
            "its socket is another's".into(),
        ),
        (
            "device_add",
            json!({"name": "kept", "socket": sock("x"), "disk": img}),
            jsonrpc::INVALID_PARAMS,
            "its name is another's".into(),
        ),
        (
            "device_add",
            json!({"socket": sock("x"), "disk": missing}),
            jsonrpc::FAILED,
            format!("cannot open {}", missing.display()),
        ),
        (
            "device_add",
            json!({"socket": sock("x"), "disk": "nvme-tcp://localhost/nqn.2014-08.org.example:x"}),
            jsonrpc::INVALID_PARAMS,
            "give an address".into(),
        ),
        (
            "device_add",
            json!({"fd": 3, "disk": img}),
            jsonrpc::INVALID_PARAMS,
            "fd: only for a socket vubd inherits".into(),
        ),
        (
            "device_add",
            json!({"socket": node.dir.path().join("no/such/dir.sock"), "disk": img}),
            jsonrpc::INVALID_PARAMS,
            "does not exist".into(),
        ),
        (
            "device_remove",
            json!({}),
            jsonrpc::INVALID_PARAMS,
            "name: required".into(),
        ),
        (
            "device_remove",
            json!({"name": 5}),
            jsonrpc::INVALID_PARAMS,
            "name: must be a string".into(),
        ),
        (
            "device_remove",
            json!({"name": "gone"}),
            jsonrpc::INVALID_PARAMS,
            "no device is named \"gone\"".into(),
        ),
        (
            "device_list",
            json!({"name": "gone"}),
            jsonrpc::INVALID_PARAMS,
            "no device is named".into(),
        ),
        (
            "log_set_level",
            json!({"level": "[[["}),
            jsonrpc::INVALID_PARAMS,
            "level:".into(),
        ),
    ];
    for (method, params, code, why) in cases {
        let (c, m) = error_of(node.call(method, params.clone()));
        assert_eq!(c, code, "{method} {params}: {m}");
        assert!(
            m.contains(&why),
            "{method} {params}: {m:?} should say {why:?}"
        );
    }
    assert_eq!(node.names(), ["kept"], "nothing changed");
    assert!(!socket_exists(&sock("x")), "no socket was left behind");

    // Text that is not JSON: a parse error, and the connection ends; nothing else changes.
    let mut raw = UnixStream::connect(&node.control).expect("connect");
    raw.set_read_timeout(Some(TIMEOUT)).expect("timeout");
    raw.write_all(b"{\"jsonrpc\": \"2.0\", oops}")
        .expect("send");
    let mut answer = String::new();
    raw.read_to_string(&mut answer)
        .expect("the answer, then the end");
    let answer: Value = serde_json::from_str(answer.trim()).expect("JSON");
    assert_eq!(
        answer["error"]["code"],
        json!(jsonrpc::PARSE_ERROR),
        "{answer}"
    );
    assert_eq!(answer["id"], Value::Null);
    // A valid request still works, on a new connection and after all of the above.
    node.add("fine", "null:1M", json!({}));
    assert_eq!(node.names(), ["fine", "kept"]);
    node.daemon.assert_running();
}

#[test]
fn several_clients_at_once_and_one_too_many() {
    let node = Node::start(&[]);
    thread::scope(|s| {
        for i in 0..8 {
            let node = &node;
            s.spawn(move || {
                let mut c = node.client();
                let name = format!("d{i}");
                let socket = node.socket(&name);
                let params = json!({"name": name, "socket": socket, "disk": "null:1M"});
                c.call("device_add", params).expect("add");
                for _ in 0..20 {
                    c.call("device_list", Value::Null).expect("list");
                }
                c.call("device_remove", json!({"name": name}))
                    .expect("remove");
            });
        }
    });
    assert!(node.names().is_empty());
    // Clients that hold their connections open use up the slots; one more is told why.
    let held: Vec<UnixStream> = (0..16)
        .map(|_| UnixStream::connect(&node.control).expect("connect"))
        .collect();
    // The accept loop takes the 16 connections in order before the next one.
    let mut extra = UnixStream::connect(&node.control).expect("connect");
    extra.set_read_timeout(Some(TIMEOUT)).expect("timeout");
    let mut answer = String::new();
    extra
        .read_to_string(&mut answer)
        .expect("an answer, then the end");
    assert!(answer.contains("too many clients"), "{answer}");
    drop(held);
    // Once they have gone, requests are served again.
    let deadline = Instant::now() + TIMEOUT;
    loop {
        match node.call("version", Value::Null) {
            Ok(_) => break,
            Err(e) => assert!(Instant::now() < deadline, "{e}"),
        }
        thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn vubd_ctl_prints_tables_and_json_and_names_errors() {
    let node = Node::start(&[]);
    let ctl = |args: &[&str]| {
        let mut cmd: Command = vubd_command();
        cmd.arg("ctl").arg("--socket").arg(&node.control).args(args);
        let out = cmd.output().expect("run vubd ctl");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let socket = node.socket("t");
    let socket_arg = format!("socket={}", socket.display());
    let (code, out, err) = ctl(&[
        "device_add",
        "name=t",
        &socket_arg,
        "disk=null:1G",
        "num-queues=2",
    ]);
    assert_eq!((code, out.as_str()), (Some(0), "added t\n"), "{err}");
    let (code, out, _) = ctl(&["device_list"]);
    assert_eq!(code, Some(0));
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    assert!(
        lines[0].starts_with("NAME") && lines[0].contains("SIZE"),
        "{out}"
    );
    assert!(
        lines[1].starts_with("t ") && lines[1].contains("1 GiB"),
        "{out}"
    );
    let (code, out, _) = ctl(&["--json", "device_list", "name=t"]);
    assert_eq!(code, Some(0));
    let v: Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(v[0]["num_queues"], json!(2));
    // Rate limits: KEY=VALUE words as for --device, printed as such.
    let (code, out, err) = ctl(&[
        "qos_group_set",
        "name=gold",
        "iops-total=20000",
        "bps-read=400M",
    ]);
    assert_eq!(
        (code, out.as_str()),
        (
            Some(0),
            "group gold: iops-total=20000,bps-read=400M (devices: 0)\n"
        ),
        "{err}"
    );
    let (code, out, err) = ctl(&[
        "device_set_qos",
        "name=t",
        "iops-total=5000",
        "qos-group=gold",
    ]);
    assert_eq!(
        (code, out.as_str()),
        (Some(0), "t: iops-total=5000,qos-group=gold\n"),
        "{err}"
    );
    let (_, out, _) = ctl(&["device_list"]);
    assert!(
        out.lines().next().unwrap_or_default().contains(" QOS "),
        "{out}"
    );
    assert!(out.contains(" iops-total=5000,qos-group=gold "), "{out}");
    let (_, out, _) = ctl(&["qos_group_list"]);
    assert_eq!(
        out,
        "NAME  DEVICES  LIMITS\ngold  1        iops-total=20000,bps-read=400M\n"
    );
    let (_, out, _) = ctl(&["--json", "qos_group_list"]);
    let v: Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(v[0]["bps-read"], json!(400 * MIB));
    let (code, _, err) = ctl(&["device_set_qos", "name=t", "iops-total=5k"]);
    assert_eq!(
        (code, err.as_str()),
        (
            Some(1),
            "vubd ctl: device_set_qos: iops-total takes a number of operations per second\n"
        )
    );
    let (_, out, _) = ctl(&["device_set_qos", "name=t"]);
    assert_eq!(out, "t: no limit\n");
    let (code, out, _) = ctl(&["qos_group_remove", "name=gold"]);
    assert_eq!((code, out.as_str()), (Some(0), "removed group gold\n"));
    let (code, out, err) = ctl(&["device_remove", "name=nope"]);
    assert_eq!(code, Some(1));
    assert_eq!(out, "");
    assert_eq!(
        err,
        "vubd ctl: device_remove: no device is named \"nope\"\n"
    );
    let (code, _, err) = ctl(&["device_remove", "nope"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("\"nope\": expected KEY=VALUE"), "{err}");
    let (code, out, _) = ctl(&["device_remove", "name=t"]);
    assert_eq!((code, out.as_str()), (Some(0), "removed t\n"));
    let (code, out, _) = ctl(&["version"]);
    assert_eq!(
        (code, out),
        (Some(0), format!("vubd {}\n", env!("CARGO_PKG_VERSION")))
    );
    let gone = node.dir.path().join("gone.sock");
    let mut cmd = vubd_command();
    cmd.args(["ctl", "--socket"]).arg(&gone).arg("version");
    let out = cmd.output().expect("run vubd ctl");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("cannot connect to {}", gone.display())),
        "{err}"
    );
}
