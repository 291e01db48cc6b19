//! The unit files of `dist/systemd/`: systemd's own `systemd-analyze verify` finds nothing
//! to say of them, and their command lines, run as systemd would run them (the unit's
//! `ExecStart`, its variables and specifiers filled in, under its `CapabilityBoundingSet`
//! through setpriv, with its socket passed by `systemd-socket-activate` for the template)
//! serve verified I/O on what each capability is there for: an image another user owns, a
//! socket given a group, a Kata store's block device node. What needs systemd as PID 1 (the
//! mount namespaces of ProtectSystem and friends) cannot run here: the unit's comments say
//! why each is harmless to vubd.

mod common;
#[path = "common/service.rs"]
mod service;

use std::ffi::OsString;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use common::Image;
use common::daemon::Daemon;
use common::node::Node;
use serde_json::json;
use service::{next_notification, notify_socket, verified_io};

const MIB: u64 = 1 << 20;
/// The user and group that own the test's images and sockets: not root's.
const NOBODY: u32 = 65534;

fn unit_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("dist/systemd")
}

/// The value of `key=` in `unit` (the first such line).
fn setting(unit: &str, key: &str) -> String {
    let text = std::fs::read_to_string(unit_dir().join(unit)).expect("read the unit");
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("{unit} has no {key}="))
        .to_owned()
}

#[test]
fn systemd_analyze_verify_says_nothing_of_the_units() {
    let dir = tempfile::tempdir().expect("temp dir");
    // verify checks that ExecStart's program exists: the one under test stands in.
    let units = ["vubd.service", "vubd@.service", "vubd@.socket"];
    for unit in units {
        let text = std::fs::read_to_string(unit_dir().join(unit)).expect("read the unit");
        let text = text.replace("/usr/local/bin/vubd", env!("CARGO_BIN_EXE_vubd"));
        std::fs::write(dir.path().join(unit), &text).expect("write");
        // An instance of each template, as `systemctl start vubd@disk0.socket` loads it.
        if let Some(instance) = unit.strip_prefix("vubd@") {
            std::fs::write(dir.path().join(format!("vubd@disk0{instance}")), &text).expect("write");
        }
    }
    for unit in ["vubd.service", "vubd@disk0.service", "vubd@disk0.socket"] {
        let out = Command::new("systemd-analyze")
            .args(["verify", "--man=no"])
            .arg(dir.path().join(unit))
            .output()
            .expect("run systemd-analyze");
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success() && said.is_empty(), "{unit}: {said}");
    }
}

/// `setpriv` limiting the capabilities of what it runs to the unit's
/// `CapabilityBoundingSet`, as systemd does: root's capabilities after exec are those.
fn with_unit_capabilities(unit: &str) -> Vec<String> {
    let caps: Vec<String> = setting(unit, "CapabilityBoundingSet")
        .split_whitespace()
        .map(|c| format!("+{}", c.trim_start_matches("CAP_").to_lowercase()))
        .collect();
    vec![
        "setpriv".to_owned(),
        format!("--bounding-set=-all,{}", caps.join(",")),
        "--inh-caps=-all".to_owned(),
        "--".to_owned(),
    ]
}

/// The words of the unit's ExecStart, with `%i` the instance, `${NAME}` (inside a word) and
/// `$NAME` (a word of its own, split at spaces) from `env`, and the binary under test.
fn exec_start(unit: &str, instance: &str, env: &[(&str, &str)], run: &Path) -> Vec<String> {
    let line = setting(unit, "ExecStart")
        .replace("%i", instance)
        .replace("/run/vubd", &run.display().to_string())
        .replace("/usr/local/bin/vubd", env!("CARGO_BIN_EXE_vubd"));
    let mut words = Vec::new();
    for word in line.split_whitespace() {
        if let Some(name) = word.strip_prefix('$').filter(|n| !n.starts_with('{')) {
            let value = env.iter().find(|(n, _)| *n == name).map_or("", |(_, v)| v);
            words.extend(value.split_whitespace().map(str::to_owned));
            continue;
        }
        let mut w = word.to_owned();
        for (name, value) in env {
            w = w.replace(&format!("${{{name}}}"), value);
        }
        words.push(w);
    }
    words
}

/// An image of `size` bytes owned by nobody, mode 0600: only CAP_DAC_OVERRIDE lets root open
/// it, as it does an image libvirt gave to libvirt-qemu.
fn image_of_another_user() -> Image {
    let image = Image::new(16 * MIB);
    std::os::unix::fs::chown(image.path(), Some(NOBODY), Some(NOBODY)).expect("chown");
    std::fs::set_permissions(image.path(), std::fs::Permissions::from_mode(0o600)).expect("chmod");
    image
}

#[test]
fn the_template_serves_its_activated_socket_with_the_units_capabilities() {
    let run = tempfile::tempdir().expect("temp dir");
    let socket = run.path().join("disk0.sock");
    let image = image_of_another_user();
    let device = format!("disk={}", image.path().display());
    let (notify, notify_path) = notify_socket(run.path());
    let mut set_notify = OsString::from("NOTIFY_SOCKET=");
    set_notify.push(&notify_path);
    // What vubd@disk0.socket does: bind, name the descriptor (FileDescriptorName=%i).
    let mut cmd = Command::new("systemd-socket-activate");
    cmd.arg("-l").arg(&socket).arg("--fdname=disk0");
    cmd.arg("-E").arg(set_notify).arg("--");
    cmd.args(with_unit_capabilities("vubd@.service"));
    cmd.args(exec_start(
        "vubd@.service",
        "disk0",
        &[("VUBD_DEVICE", &device), ("VUBD_OPTIONS", "--poll never")],
        run.path(),
    ));
    let daemon = Daemon::vubd_from(cmd, &socket);
    // The first connection starts vubd.
    verified_io(&socket, &image, 1);
    assert_eq!(next_notification(&notify, &daemon), "READY=1");
}

#[test]
fn the_node_daemon_serves_a_kata_store_and_socket_groups_with_the_units_capabilities() {
    let run = tempfile::tempdir().expect("temp dir");
    let store = run.path().join("kata");
    let config = run.path().join("vubd.toml");
    std::fs::write(&config, "").expect("an empty configuration");
    let (notify, notify_path) = notify_socket(run.path());
    let options = format!(
        "--kata-store {} --socket-group {NOBODY} --socket-mode 0660",
        store.display()
    );
    let mut words = with_unit_capabilities("vubd.service");
    words.extend(exec_start(
        "vubd.service",
        "",
        &[("VUBD_OPTIONS", &options)],
        run.path(),
    ));
    let words: Vec<String> = words
        .into_iter()
        .map(|w| w.replace("/etc/vubd/vubd.toml", &config.display().to_string()))
        .collect();
    let mut cmd = Command::new(&words[0]);
    cmd.args(&words[1..]).env("NOTIFY_SOCKET", &notify_path);
    let control = run.path().join("control.sock");
    let node = Node {
        daemon: Daemon::vubd_from(cmd, &control),
        control,
        dir: run,
    };
    assert_eq!(next_notification(&notify, &node.daemon), "READY=1");
    let image = image_of_another_user();
    let params = json!({"name": "vol", "disk": image.path()});
    assert_eq!(node.ok("device_add", params), json!({"name": "vol"}));
    let socket = store.join("block/sockets/vol");
    let meta = std::fs::metadata(&socket).expect("the socket");
    assert_eq!(
        (meta.gid(), meta.mode() & 0o777),
        (NOBODY, 0o660),
        "--socket-group"
    );
    let node_meta = std::fs::metadata(store.join("block/devices/vol")).expect("the node");
    assert_eq!(libc::major(node_meta.rdev()), 241);
    verified_io(&socket, &image, 2);
}
