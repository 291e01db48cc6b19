//! Online resize (`device_resize`): the image changes size, the session's bounds and
//! configuration space follow, and the frontend is told on the backend channel
//! (VHOST_USER_BACKEND_CONFIG_CHANGE_MSG) as QEMU expects it: acknowledged, then GET_CONFIG.
//! The frontend is our own (`common/frontend.rs`), which keeps the backend channel; libblkio
//! offers none.
//!
//! An NVMe/TCP namespace (the fake target's, `common/fake_target`) follows its controller:
//! `device_resize` reads its size again, and the controller's namespace notice (an
//! Asynchronous Event Request's completion) resizes the device alone, also after a
//! reconnection.

mod common;
#[path = "common/frontend.rs"]
mod frontend;

use std::time::{Duration, Instant};

use common::fake_target::{FakeTarget, Options as TargetOptions};
use common::node::Node;
use common::{Image, TIMEOUT};
use frontend::{BLOCK, BlkFrontend, Options, Request, SECTOR, STATUS_OK};
use serde_json::{Value, json};
use vubd::jsonrpc::{self, ClientError};

const MIB: u64 = 1 << 20;
/// How long a notice may take to come.
const NOTICE_WAIT: Duration = Duration::from_secs(5);

/// `device_resize` with `params`: the new capacity, or the error.
fn resize(node: &Node, params: Value) -> Result<u64, ClientError> {
    node.call("device_resize", params)
        .map(|r| r["capacity"].as_u64().expect("a capacity"))
}

fn options() -> Options {
    Options {
        backend_channel: true,
        inflight: false,
        ..Options::new(1)
    }
}

/// Writes a block at `sector` and reads it back: the status of each.
fn write_read(fe: &mut BlkFrontend, sector: u64, tag: u64) -> (u8, u8) {
    let data = vec![tag as u8; BLOCK];
    fe.submit(
        0,
        Request::Write {
            sector,
            data: &data,
        },
        tag,
    )
    .expect("submit write");
    let w = wait(fe, tag);
    fe.submit(0, Request::Read { sector, len: BLOCK }, tag + 1)
        .expect("submit read");
    let r = wait(fe, tag + 1);
    (w, r)
}

/// Kicks and waits for request `tag`: its status.
fn wait(fe: &mut BlkFrontend, tag: u64) -> u8 {
    fe.status_of(0, tag, TIMEOUT)
}

#[test]
fn an_image_grown_and_shrunk_at_runtime_is_seen_by_the_frontend_at_once() {
    let node = Node::start(&[]);
    let image = Image::new(16 * MIB);
    let path = image.path().to_str().expect("UTF-8").to_owned();
    let socket = node.add("r", &path, json!({}));
    let mut fe = BlkFrontend::connect(&socket, options()).expect("connect");
    assert_eq!(fe.capacity(), 16 * MIB / SECTOR);
    let past_old_end = 16 * MIB / SECTOR + 8;
    let (w, _) = write_read(&mut fe, past_old_end, 10);
    assert_ne!(w, STATUS_OK, "a write past the end fails");

    assert_eq!(
        resize(&node, json!({"name": "r", "size": "32M"})).expect("grow"),
        32 * MIB
    );
    assert!(
        fe.config_notice(NOTICE_WAIT).expect("notice"),
        "the frontend is told"
    );
    assert_eq!(fe.config_capacity().expect("GET_CONFIG"), 32 * MIB / SECTOR);
    assert_eq!(
        std::fs::metadata(image.path()).expect("stat").len(),
        32 * MIB
    );
    assert_eq!(
        write_read(&mut fe, past_old_end, 20),
        (STATUS_OK, STATUS_OK)
    );

    // Shrinking is refused unless forced, and then the guest loses the end.
    let refused = resize(&node, json!({"name": "r", "size": 8 * MIB}));
    match refused {
        Err(ClientError::Rpc(e)) => {
            assert_eq!(e.code, jsonrpc::INVALID_PARAMS);
            assert!(e.message.contains("force=true"), "{}", e.message);
        }
        other => panic!("shrinking without force: {other:?}"),
    }
    assert_eq!(
        std::fs::metadata(image.path()).expect("stat").len(),
        32 * MIB
    );
    assert!(
        !fe.config_notice(Duration::from_millis(300)).expect("read"),
        "no notice"
    );
    let shrunk = resize(&node, json!({"name": "r", "size": "8M", "force": true}));
    assert_eq!(shrunk.expect("forced"), 8 * MIB);
    assert!(fe.config_notice(NOTICE_WAIT).expect("notice"));
    assert_eq!(fe.config_capacity().expect("GET_CONFIG"), 8 * MIB / SECTOR);
    let (w, r) = write_read(&mut fe, 8 * MIB / SECTOR, 30);
    assert!(
        w != STATUS_OK && r != STATUS_OK,
        "past the new end: {w}, {r}"
    );
    assert_eq!(write_read(&mut fe, 0, 40), (STATUS_OK, STATUS_OK));

    // The image grown from outside: the capacity follows without a size.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(image.path())
        .expect("open");
    f.set_len(12 * MIB).expect("grow from outside");
    assert_eq!(
        resize(&node, json!({"name": "r"})).expect("follow"),
        12 * MIB
    );
    assert!(fe.config_notice(NOTICE_WAIT).expect("notice"));
    assert_eq!(fe.config_capacity().expect("GET_CONFIG"), 12 * MIB / SECTOR);
    let list = node
        .call("device_list", json!({"name": "r"}))
        .expect("list");
    assert_eq!(list[0]["capacity"], json!(12 * MIB));
}

/// A device resized while no frontend is connected starts its next session at the new size
/// (a notice, if the frontend gets one once its queues start, repeats what GET_CONFIG said).
/// When the notice waits for the device to run is `vhost_user::notice`'s unit test.
#[test]
fn a_device_resized_between_frontends_starts_at_its_new_size() {
    let node = Node::start(&[]);
    let socket = node.add("n", "null:64M", json!({}));
    let mut fe = BlkFrontend::connect(&socket, options()).expect("connect");
    assert_eq!(fe.capacity(), 64 * MIB / SECTOR);
    fe.disconnect();
    assert_eq!(
        resize(&node, json!({"name": "n", "size": "96M"})).expect("resize"),
        96 * MIB
    );
    let mut fe = BlkFrontend::connect(&socket, options()).expect("connect again");
    assert_eq!(
        fe.capacity(),
        96 * MIB / SECTOR,
        "the new session starts at the new size"
    );
    assert_eq!(fe.config_capacity().expect("GET_CONFIG"), 96 * MIB / SECTOR);
    let past_old_end = 64 * MIB / SECTOR + 8;
    assert_eq!(write_read(&mut fe, past_old_end, 1), (STATUS_OK, STATUS_OK));

    // A null device has no size of its own; the errors name the parameter.
    for (params, why) in [
        (json!({"name": "n"}), "give one"),
        (json!({"name": "n", "size": "lots"}), "size: \"lots\""),
        (
            json!({"name": "n", "size": 1000}),
            "multiple of the 512-byte block",
        ),
        (
            json!({"name": "n", "size": "1G", "force": 1}),
            "force: must be a boolean",
        ),
        (
            json!({"name": "gone", "size": "1G"}),
            "no device is named \"gone\"",
        ),
    ] {
        match resize(&node, params.clone()) {
            Err(ClientError::Rpc(e)) => {
                assert_eq!(e.code, jsonrpc::INVALID_PARAMS, "{params}");
                assert!(e.message.contains(why), "{params}: {}", e.message);
            }
            other => panic!("{params}: {other:?}"),
        }
    }
}

/// The fake target with a namespace of `size` bytes.
fn target(size: u64, namespace_notices: bool) -> FakeTarget {
    FakeTarget::start(TargetOptions {
        ns_size: size,
        namespace_notices,
        ..TargetOptions::default()
    })
    .expect("fake target")
}

fn nvme_disk(t: &FakeTarget) -> String {
    format!("nvme-tcp://{}/{}", t.addr(), t.nqn())
}

/// `device_resize` fails with an invalid-parameters error that says `why`.
fn refused(node: &Node, params: Value, why: &str) {
    match resize(node, params.clone()) {
        Err(ClientError::Rpc(e)) => {
            assert_eq!(e.code, jsonrpc::INVALID_PARAMS, "{params}");
            assert!(e.message.contains(why), "{params}: {}", e.message);
        }
        other => panic!("{params}: {other:?}"),
    }
}

/// The capacity `device_list` shows.
fn listed(node: &Node, name: &str) -> Value {
    node.call("device_list", json!({"name": name}))
        .expect("list")[0]["capacity"]
        .clone()
}

/// A controller that reports no namespace change: `device_resize` reads the size itself,
/// takes growth, and shrinking only with `force`; a size of the caller's is refused.
#[test]
fn device_resize_reads_an_nvme_tcp_namespace_size_from_its_controller() {
    let target = target(16 * MIB, false);
    let node = Node::start(&[]);
    let socket = node.add("t", &nvme_disk(&target), json!({}));
    let mut fe = BlkFrontend::connect(&socket, options()).expect("connect");
    assert_eq!(fe.capacity(), 16 * MIB / SECTOR);
    refused(
        &node,
        json!({"name": "t", "size": "32M"}),
        "resize the namespace, then resize the device without a size",
    );

    target.resize_namespace(32 * MIB);
    assert!(
        !fe.config_notice(Duration::from_millis(300)).expect("read"),
        "nothing told before device_resize"
    );
    assert_eq!(listed(&node, "t"), json!(16 * MIB));
    assert_eq!(
        resize(&node, json!({"name": "t"})).expect("follow"),
        32 * MIB
    );
    assert!(fe.config_notice(NOTICE_WAIT).expect("notice"));
    assert_eq!(fe.config_capacity().expect("GET_CONFIG"), 32 * MIB / SECTOR);
    let past_old_end = 16 * MIB / SECTOR + 8;
    assert_eq!(
        write_read(&mut fe, past_old_end, 10),
        (STATUS_OK, STATUS_OK)
    );

    target.resize_namespace(8 * MIB);
    refused(&node, json!({"name": "t"}), "force=true");
    assert_eq!(listed(&node, "t"), json!(32 * MIB), "nothing changed");
    let shrunk = resize(&node, json!({"name": "t", "force": true}));
    assert_eq!(shrunk.expect("forced"), 8 * MIB);
    assert!(fe.config_notice(NOTICE_WAIT).expect("notice"));
    assert_eq!(fe.config_capacity().expect("GET_CONFIG"), 8 * MIB / SECTOR);
    assert_eq!(listed(&node, "t"), json!(8 * MIB));
    let c = target.counters();
    assert_eq!(
        c.admin(0x0c),
        0,
        "no Asynchronous Event Request without notices"
    );
}

/// A controller that reports namespace changes: growth reaches the frontend with no call
/// (once per change: the request is sent again and the log page read, which lets the next
/// notice come), also after the controller was lost and reconnected; a namespace that
/// shrank waits for `device_resize` with `force`.
#[test]
fn an_nvme_tcp_namespace_notice_alone_resizes_the_device() {
    let target = target(16 * MIB, true);
    let node = Node::start(&["--reconnect-delay", "1", "--ctrl-loss-tmo", "60"]);
    let socket = node.add("t", &nvme_disk(&target), json!({}));
    let mut fe = BlkFrontend::connect(&socket, options()).expect("connect");
    assert_eq!(fe.capacity(), 16 * MIB / SECTOR);

    let mut lba = 16 * MIB / SECTOR + 8;
    for (step, size) in [48 * MIB, 64 * MIB].into_iter().enumerate() {
        target.resize_namespace(size);
        assert!(
            fe.config_notice(NOTICE_WAIT).expect("notice"),
            "growth to {size} told\n{}",
            node.daemon.output()
        );
        assert_eq!(fe.config_capacity().expect("GET_CONFIG"), size / SECTOR);
        assert_eq!(listed(&node, "t"), json!(size));
        let tag = 10 * (step as u64 + 1);
        assert_eq!(write_read(&mut fe, lba, tag), (STATUS_OK, STATUS_OK));
        lba = size / SECTOR - 8;
    }
    let c = target.counters();
    assert_eq!(
        c.admin(0x0c),
        3,
        "one request outstanding, sent again after each"
    );
    assert_eq!(
        c.admin(0x02),
        2,
        "the Changed Namespace List read once per notice"
    );

    // Shrinking is never taken without force: no notice to the frontend.
    target.resize_namespace(32 * MIB);
    assert!(
        !fe.config_notice(Duration::from_millis(500)).expect("read"),
        "a smaller namespace is not told"
    );
    assert_eq!(listed(&node, "t"), json!(64 * MIB));
    let forced = resize(&node, json!({"name": "t", "force": true}));
    assert_eq!(forced.expect("forced"), 32 * MIB);
    assert!(fe.config_notice(NOTICE_WAIT).expect("notice"));
    assert_eq!(fe.config_capacity().expect("GET_CONFIG"), 32 * MIB / SECTOR);

    // The controller goes and comes back: notices are enabled and requested again.
    target.pause();
    target.resume().expect("resume");
    let deadline = Instant::now() + TIMEOUT;
    while target.counters().admin(0x0c) < 5 {
        assert!(
            Instant::now() < deadline,
            "no Asynchronous Event Request after the reconnection\n{}",
            node.daemon.output()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    target.resize_namespace(40 * MIB);
    assert!(
        fe.config_notice(NOTICE_WAIT).expect("notice"),
        "growth after the reconnection told\n{}",
        node.daemon.output()
    );
    assert_eq!(fe.config_capacity().expect("GET_CONFIG"), 40 * MIB / SECTOR);
    assert_eq!(
        write_read(&mut fe, 40 * MIB / SECTOR - 8, 50),
        (STATUS_OK, STATUS_OK)
    );
}
