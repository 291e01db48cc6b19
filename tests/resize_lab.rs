//! Online resize seen by a real guest: a QEMU guest (TCG) on a vhost-user-blk disk that vubd
//! serves; `device_resize` grows the image while the guest runs, and the guest's kernel sees
//! the new size in /sys/block/vda/size without a reboot and writes past the old end
//! (`tests/guest/resize.sh`). QEMU gets VHOST_USER_BACKEND_CONFIG_CHANGE_MSG, reads the
//! configuration space and interrupts the guest.
//!
//! An NVMe/TCP namespace of the Linux kernel target (nvmet-tcp in a TCG guest,
//! `common/nvmet.rs`, a loop device over a file) grown in the target's guest: nvmet sends its
//! namespace attribute notice (`revalidate_size`), and vubd, serving the namespace to our raw
//! frontend (`common/frontend.rs`), takes the new capacity and tells the frontend without any
//! call; `device_resize` then reads the same size from the controller.

mod common;
#[path = "common/frontend.rs"]
mod frontend;

use std::ffi::OsStr;
use std::time::{Duration, Instant};

use common::TIMEOUT;
use common::daemon::Daemon;
use common::lab::{Guest, build_initramfs, fields, image_file, line_with, read_at, test_dir};
use common::nvmet::{NvmetOptions, NvmetTarget};
use frontend::{BLOCK, BlkFrontend, Options, Request, SECTOR, STATUS_OK};
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

/// How long vubd may take to tell the frontend of a namespace the target grew: the notice,
/// the log page and Identify on the admin queue, then the backend channel.
const NVMET_NOTICE_WAIT: Duration = Duration::from_secs(20);

/// Writes a block at `sector` and reads it back on queue 0: both statuses.
fn write_read(fe: &mut BlkFrontend, sector: u64, tag: u64) -> (u8, u8) {
    let data = vec![tag as u8; BLOCK];
    let mut statuses = [0; 2];
    for (i, req) in [
        Request::Write {
            sector,
            data: &data,
        },
        Request::Read { sector, len: BLOCK },
    ]
    .into_iter()
    .enumerate()
    {
        let tag = tag + i as u64;
        fe.submit(0, req, tag).expect("submit");
        statuses[i] = fe.status_of(0, tag, TIMEOUT);
    }
    (statuses[0], statuses[1])
}

#[test]
fn a_namespace_grown_in_the_kernel_target_reaches_the_frontend_by_its_notice() {
    let mut target = NvmetTarget::start(&NvmetOptions {
        ns_size_mib: 16,
        resizable: true,
        lifetime: Duration::from_secs(GUEST_LIFETIME_S),
        ..NvmetOptions::default()
    });
    let dir = test_dir();
    let control = dir.path().join("control.sock");
    let daemon = Daemon::vubd_with_args(
        &["--control-socket".as_ref(), control.as_os_str()] as &[&OsStr],
        &control,
    );
    let call = |method: &str, params| {
        jsonrpc::Client::connect(&control, TIMEOUT)
            .expect("control socket")
            .call(method, params)
            .unwrap_or_else(|e| panic!("{method}: {e}\n{}", daemon.output()))
    };
    let socket = dir.path().join("ns.sock");
    let disk = format!(
        "nvme-tcp://127.0.0.1:{}/{}?nsid=1",
        target.port(),
        target.nqn()
    );
    call(
        "device_add",
        json!({"name": "ns", "socket": socket, "disk": disk}),
    );
    let mut fe = BlkFrontend::connect(
        &socket,
        Options {
            backend_channel: true,
            inflight: false,
            ..Options::new(1)
        },
    )
    .expect("connect");
    assert_eq!(fe.capacity(), 16 * MIB / SECTOR);

    let mut old = 16;
    for (step, mib) in [48u64, 64].into_iter().enumerate() {
        let start = Instant::now();
        target.resize_namespace(1, mib);
        let resized = start.elapsed();
        assert!(
            fe.config_notice(NVMET_NOTICE_WAIT).expect("notice"),
            "no notice within {NVMET_NOTICE_WAIT:?} of growing to {mib} MiB\n{}",
            daemon.output()
        );
        eprintln!(
            "resize lab: nvmet namespace grown to {mib} MiB in {:.1} s, the frontend told {:.1} s after",
            resized.as_secs_f64(),
            (start.elapsed() - resized).as_secs_f64()
        );
        assert_eq!(
            fe.config_capacity().expect("GET_CONFIG"),
            mib * MIB / SECTOR
        );
        let past_old_end = old * MIB / SECTOR + 8;
        let tag = 10 * (step as u64 + 1);
        assert_eq!(
            write_read(&mut fe, past_old_end, tag),
            (STATUS_OK, STATUS_OK),
            "past the old end"
        );
        old = mib;
    }
    let resized = call("device_resize", json!({"name": "ns"}));
    assert_eq!(
        resized["capacity"],
        json!(64 * MIB),
        "read from the controller"
    );
    let listed = call("device_list", json!({"name": "ns"}));
    assert_eq!(listed[0]["capacity"], json!(64 * MIB));
    target.assert_running();
}
