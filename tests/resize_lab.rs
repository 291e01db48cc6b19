//! Online resize seen by a real guest: a QEMU guest (TCG) on a vhost-user-blk disk that vubd
//! serves; `device_resize` grows the image while the guest runs, and the guest's kernel sees
//! the new size in /sys/block/vda/size without a reboot and writes past the old end
//! (`tests/guest/resize.sh`). QEMU gets VHOST_USER_BACKEND_CONFIG_CHANGE_MSG, reads the
//! configuration space and interrupts the guest.

mod common;

use std::ffi::OsStr;
use std::time::Duration;

use common::TIMEOUT;
use common::daemon::Daemon;
use common::lab::{Guest, build_initramfs, fields, image_file, line_with, read_at, test_dir};
use serde_json::json;
use vubd::jsonrpc;

const MIB: u64 = 1 << 20;
const OLD_BYTES: u64 = 64 * MIB;
const NEW_BYTES: u64 = 96 * MIB;
/// The guest's time limit, seconds: a TCG boot, the wait for the resize, a 64 KiB write.
const GUEST_LIFETIME_S: u64 = 300;
/// How long the guest may take to boot and report the disk's first size.
const BOOT_LIMIT: Duration = Duration::from_secs(200);

#[test]
fn a_guest_sees_its_disk_grow_without_a_reboot_and_uses_the_new_space() {
    let dir = test_dir();
    let d = dir.path();
    let initrd = build_initramfs(d, "resize", &[]);
    let image = image_file(d, "disk.img", OLD_BYTES);
    let control = d.join("control.sock");
    let socket = d.join("disk.sock");
    let device = format!(
        "name=vm,socket={},disk={}",
        socket.display(),
        image.display()
    );
    let daemon = Daemon::vubd_with_args(
        &[
            "--control-socket".as_ref(),
            control.as_os_str(),
            "--device".as_ref(),
            OsStr::new(&device),
        ],
        &socket,
    );
    let append = format!("OLD_BYTES={OLD_BYTES} NEW_BYTES={NEW_BYTES}");
    let mut guest = Guest::new(&initrd, d, "console.log", GUEST_LIFETIME_S);
    guest
        .command()
        .arg("--vhost-user-blk")
        .arg(&socket)
        .args(["--append", &append]);
    let mut guest = guest.spawn(d);
    guest.wait_line("resize: size old=", BOOT_LIMIT);

    let resized = jsonrpc::Client::connect(&control, TIMEOUT)
        .expect("control socket")
        .call("device_resize", json!({"name": "vm", "size": NEW_BYTES}))
        .unwrap_or_else(|e| panic!("device_resize: {e}\n{}", daemon.output()));
    assert_eq!(resized["capacity"], json!(NEW_BYTES));

    let (status, console) = guest.finish();
    assert!(
        status.is_some_and(|s| s.success()),
        "the guest failed ({status:?}):\n{console}\n---- vubd ----\n{}",
        daemon.output()
    );
    let seen = fields(line_with(&console, "resize: size new="));
    assert_eq!(seen["new"], NEW_BYTES.to_string(), "{console}");
    eprintln!(
        "resize lab: the guest saw the new size {} s after it reported the old one",
        seen["seconds"]
    );
    line_with(&console, "resize: ok new space written and read back");
    assert_eq!(
        read_at(&image, OLD_BYTES, 65536),
        vec![b'Z'; 65536],
        "the guest's write past the old end is in the image"
    );
}
