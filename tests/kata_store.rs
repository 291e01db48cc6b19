//! Devices in a Kata Containers vhost-user store (`kata-store=DIR`, `--kata-store`), as Kata's
//! Go runtime (`enable_vhost_user_store`) finds them: a block device node of major 241 in
//! `DIR/block/devices/`, whose major:minor the container's device carries, and the socket of
//! the same name in `DIR/block/sockets/`. Checked here: the layout, the numbers (block
//! devices, major 241, minors distinct and clear of nodes already there), Kata's own lookup
//! reaching a socket that serves verified I/O, and the clean-up: on `device_remove`, at exit,
//! and after a crash, whose stale node and socket the next vubd replaces, keeping the node's
//! minor. vubd runs with its sandbox enforced (the default) and as root (mknod needs
//! CAP_MKNOD), as the suite does.

mod common;
#[path = "common/service.rs"]
mod service;

use std::collections::BTreeSet;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use common::client::{Client, ClientOptions};
use common::daemon::{Daemon, vubd_command};
use common::node::Node;
use common::{Image, assert_same};
use serde_json::json;
use service::{next_notification, notify_socket, verified_io};

const MIB: u64 = 1 << 20;
const KATA_MAJOR: u32 = 241;

fn node_path(store: &Path, name: &str) -> PathBuf {
    store.join("block/devices").join(name)
}

fn socket_path(store: &Path, name: &str) -> PathBuf {
    store.join("block/sockets").join(name)
}

/// The major and minor of the block device node at `path`, failing the test if it is not
/// one.
fn numbers(path: &Path) -> (u32, u32) {
    let meta = std::fs::metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(
        meta.file_type().is_block_device(),
        "{} is not a block device node",
        path.display()
    );
    (libc::major(meta.rdev()), libc::minor(meta.rdev()))
}

/// Makes a block device node of major 241 and `minor` at `path`, as another tool (or an
/// earlier vubd) would have.
fn mknod(path: &Path, minor: u32) {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).expect("no NUL");
    // SAFETY: a NUL-terminated path that lives across the call.
    let rc = unsafe {
        libc::mknod(
            c.as_ptr(),
            libc::S_IFBLK | 0o600,
            libc::makedev(KATA_MAJOR, minor),
        )
    };
    assert_eq!(
        rc,
        0,
        "mknod {}: {} (the test runs as root)",
        path.display(),
        std::io::Error::last_os_error()
    );
}

/// What Kata's Go runtime does with a container's device `241:minor` (`getVhostUserHostPath`):
/// the first entry of `DIR/block/devices` whose stat has those numbers, then the socket of
/// that name, which must exist.
fn kata_lookup(store: &Path, minor: u32) -> PathBuf {
    let dir = store.join("block/devices");
    for entry in std::fs::read_dir(&dir).expect("read the devices directory") {
        let entry = entry.expect("an entry");
        let meta = std::fs::metadata(entry.path()).expect("Kata stats every entry");
        if libc::major(meta.rdev()) == KATA_MAJOR && libc::minor(meta.rdev()) == minor {
            let socket = store.join("block/sockets").join(entry.file_name());
            assert!(socket.exists(), "{} is missing", socket.display());
            return socket;
        }
    }
    panic!("no node {KATA_MAJOR}:{minor} in {}", dir.display());
}

/// vubd with `--kata-store store` and one `--device` per entry of `devices`, once it is
/// ready: it notifies READY=1 (to a NOTIFY_SOCKET of the test's) once every device listens
/// and has its node, which may replace one left there.
fn vubd_in_store(store: &Path, devices: &[String]) -> Daemon {
    let notify_dir = tempfile::tempdir().expect("temp dir");
    let (notify, notify_path) = notify_socket(notify_dir.path());
    let mut cmd = vubd_command();
    cmd.arg("--kata-store")
        .arg(store)
        .env("NOTIFY_SOCKET", &notify_path);
    for d in devices {
        cmd.arg("--device").arg(d);
    }
    let first = devices[0]
        .split(',')
        .find_map(|kv| kv.strip_prefix("name="))
        .expect("a name");
    let daemon = Daemon::vubd_from(cmd, &socket_path(store, first));
    assert_eq!(next_notification(&notify, &daemon), "READY=1");
    daemon
}

#[test]
fn devices_get_a_socket_and_a_node_of_major_241_kata_finds_them_by() {
    let dir = tempfile::tempdir().expect("temp dir");
    // The store does not exist yet: vubd makes its directories.
    let store = dir.path().join("vhost-user");
    let (a, b) = (Image::new(16 * MIB), Image::new(16 * MIB));
    let mut daemon = vubd_in_store(
        &store,
        &[
            format!("name=vol-a,disk={}", a.path().display()),
            format!("name=vol-b,disk={}", b.path().display()),
        ],
    );
    let mut minors = BTreeSet::new();
    for (name, image, seed) in [("vol-a", &a, 1), ("vol-b", &b, 2)] {
        let (major, minor) = numbers(&node_path(&store, name));
        assert_eq!(major, KATA_MAJOR, "{name}");
        assert!(minors.insert(minor), "{name}: minor {minor} is another's");
        let socket = kata_lookup(&store, minor);
        assert_eq!(socket, socket_path(&store, name));
        verified_io(&socket, image, seed);
    }
    assert!(daemon.terminate().success(), "{}", daemon.output());
    for name in ["vol-a", "vol-b"] {
        assert!(!node_path(&store, name).exists(), "{name}'s node at exit");
        assert!(
            !socket_path(&store, name).exists(),
            "{name}'s socket at exit"
        );
    }
}

#[test]
fn a_minor_is_never_one_a_node_in_the_store_already_has() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = dir.path().to_owned();
    std::fs::create_dir_all(store.join("block/devices")).expect("mkdir");
    // Another backend's volumes (SPDK's, made with mknod as Kata's guide says).
    mknod(&node_path(&store, "spdk0"), 0);
    mknod(&node_path(&store, "spdk1"), 1);
    let _daemon = vubd_in_store(&store, &["name=vol,disk=null:16M".to_owned()]);
    assert_eq!(numbers(&node_path(&store, "vol")), (KATA_MAJOR, 2));
    assert_eq!(numbers(&node_path(&store, "spdk0")), (KATA_MAJOR, 0));
}

#[test]
fn device_add_and_device_remove_make_and_remove_the_node_and_the_socket() {
    let node = Node::start(&[]);
    let store = node.dir.path().join("store");
    let image = Image::new(16 * MIB);
    for name in ["one", "two"] {
        let params = json!({
            "name": name,
            "kata-store": store,
            "disk": image.path(),
            "readonly": true,
        });
        assert_eq!(node.ok("device_add", params), json!({"name": name}));
    }
    let one = numbers(&node_path(&store, "one"));
    let two = numbers(&node_path(&store, "two"));
    assert_eq!((one.0, two.0), (KATA_MAJOR, KATA_MAJOR));
    assert_ne!(one.1, two.1, "distinct minors");
    assert!(socket_path(&store, "one").exists() && socket_path(&store, "two").exists());

    node.remove("one");
    // The device's thread removes them as it ends, before device_remove answers.
    assert!(
        !node_path(&store, "one").exists(),
        "the node of a removed device"
    );
    assert!(
        !socket_path(&store, "one").exists(),
        "the socket of a removed device"
    );
    assert_eq!(numbers(&node_path(&store, "two")), two);

    // The freed minor is the next device's.
    let params = json!({"name": "three", "kata-store": store, "disk": image.path(),
        "readonly": true});
    node.ok("device_add", params);
    assert_eq!(numbers(&node_path(&store, "three")), one);
    verified_read(&socket_path(&store, "three"), &image);
}

/// Reads the first MiB of a read-only device and checks it against the image.
fn verified_read(socket: &Path, image: &Image) {
    let options = ClientOptions {
        read_only: true,
        ..ClientOptions::queues(1)
    };
    let mut client = Client::connect(socket, &options)
        .unwrap_or_else(|e| panic!("connect to {}: {e}", socket.display()));
    let got = client.queue(0).read(0, MIB as usize);
    assert_same(&image.read_host(0, MIB as usize), &got, 0, "read");
}

#[test]
fn after_a_crash_the_next_vubd_replaces_the_stale_node_and_socket_keeping_the_minor() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = dir.path().to_owned();
    let image = Image::new(16 * MIB);
    let device = format!("name=vol,disk={}", image.path().display());
    // A node another tool made, gone by the restart: the lowest free minor is then not the
    // one the device had.
    std::fs::create_dir_all(store.join("block/devices")).expect("mkdir");
    mknod(&node_path(&store, "other"), 0);
    let mut first = vubd_in_store(&store, std::slice::from_ref(&device));
    let node = node_path(&store, "vol");
    let (_, minor) = numbers(&node);
    assert_eq!(minor, 1);
    let inode = std::fs::metadata(&node).expect("node").ino();
    first.kill();
    // Left behind, as a crash leaves them.
    assert!(node.exists() && socket_path(&store, "vol").exists());
    std::fs::remove_file(node_path(&store, "other")).expect("remove");

    let _second = vubd_in_store(&store, &[device]);
    assert_ne!(
        std::fs::metadata(&node).expect("node").ino(),
        inode,
        "a node of its own"
    );
    assert_eq!(numbers(&node), (KATA_MAJOR, minor), "the numbers it had");
    verified_io(&kata_lookup(&store, minor), &image, 3);
}

#[test]
fn a_stale_node_whose_minor_another_node_has_gets_a_free_one() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = dir.path().to_owned();
    std::fs::create_dir_all(store.join("block/devices")).expect("mkdir");
    mknod(&node_path(&store, "vol"), 0);
    mknod(&node_path(&store, "other"), 0);
    let _daemon = vubd_in_store(&store, &["name=vol,disk=null:16M".to_owned()]);
    assert_eq!(numbers(&node_path(&store, "vol")), (KATA_MAJOR, 1));
    // Kata now finds each number once.
    assert_eq!(kata_lookup(&store, 1), socket_path(&store, "vol"));
}
