//! Several devices on one NVMe controller in the lab: a QEMU guest (TCG, two CPUs) with one
//! emulated NVMe controller (namespaces 1 and 2) behind an emulated Intel IOMMU, running
//! `tests/guest/nvme-pcie-devices.sh`. One vubd serves namespace 1 and namespace 2 as two
//! vhost-user-blk devices on two sockets (`--device`, twice); blkcheck runs write-verify on
//! both at the same time, twice (new sessions), then on device 2 while device 1's frontend
//! comes and goes three times, then writes a different pattern to each. The
//! controller is opened once and each poller shares one I/O queue pair between the two
//! devices (vubd's log says so); after the guest is gone the host finds each namespace's own
//! pattern in its image file.
//!
//! One guest boot; the guest's programs are this build's vubd and blkcheck (built on first
//! use). Where the lab cannot start, the test fails and says why.

mod common;

#[path = "../examples/blkcheck/pattern.rs"]
mod pattern;

use std::path::Path;
use std::time::Instant;

use common::examples::example_bin;
use common::lab::{
    Guest, build_initramfs, echo_lines, image_file, line_with, lines_with, read_at, test_dir,
};

const NS1_BYTES: u64 = 32 << 20;
const NS2_BYTES: u64 = 16 << 20;
const PCIE_SERIAL: &str = "vubd-devices";
const GUEST_TIMEOUT_S: u64 = 300;
/// What the guest's blkcheck `pattern` runs write, by device.
const SEEDS: [u64; 2] = [0x1d1, 0x2d2];
const PATTERN_BYTES: usize = 4 << 20;

#[test]
fn two_namespaces_of_one_controller_are_served_as_two_devices_at_once() {
    let started = Instant::now();
    let blkcheck = example_bin("blkcheck");
    let vubd = Path::new(env!("CARGO_BIN_EXE_vubd"));

    let dir = test_dir();
    let d = dir.path();
    let initrd = build_initramfs(d, "nvme-pcie-devices", &[vubd, &blkcheck]);

    let ns1 = image_file(d, "ns1.img", NS1_BYTES);
    let ns2 = image_file(d, "ns2.img", NS2_BYTES);
    let t = Instant::now();
    let mut guest = Guest::new(&initrd, d, "console.log", GUEST_TIMEOUT_S);
    guest
        .command()
        .args(["--smp", "2", "--iommu"])
        .args(["--nvme-ctrl", &format!("c1,serial={PCIE_SERIAL}")])
        .arg("--nvme-ns")
        .arg(format!("c1:{}", ns1.display()))
        .arg("--nvme-ns")
        .arg(format!("c1:{},nsid=2", ns2.display()))
        .args(["--append", &format!("PCIE_SERIAL={PCIE_SERIAL}")]);
    let console = guest.run(d);
    let guest_time = t.elapsed();
    echo_lines(&console, &["DEVICE", "VUBD-DEVICES", "nvme-pcie-"]);
    line_with(&console, "nvme-pcie-devices: all steps passed");

    // Both devices passed every run, each on its own namespace's size.
    for (tag, seeds) in [
        ("DEVICE1 ", ["0x71", "0x73"]),
        ("DEVICE2 ", ["0x72", "0x74"]),
    ] {
        for seed in seeds {
            line_with(
                &console,
                &format!("{tag}blkcheck: PASS write-verify queues=2 size=4194304 seed={seed} "),
            );
        }
    }
    // Device 1 came and went three times during one session of device 2.
    line_with(
        &console,
        "DEVICE2 blkcheck: PASS write-verify queues=2 size=4194304 seed=0x75 ",
    );
    for seed in ["0x81", "0x82", "0x83"] {
        line_with(
            &console,
            &format!("DEVICE1 blkcheck: PASS write-verify queues=2 size=1048576 seed={seed} "),
        );
    }
    let overlapped = lines_with(&console, "DEVICE2-RUNNING ").count();
    assert!(
        overlapped >= 1,
        "device 2's session did not outlast any of device 1's"
    );
    line_with(
        &console,
        "DEVICE1 blkcheck: PASS pattern queues=2 size=4194304 seed=0x1d1 ",
    );
    line_with(
        &console,
        "DEVICE2 blkcheck: PASS pattern queues=2 size=4194304 seed=0x2d2 ",
    );

    // One controller, opened once; on each of the two pollers the second device's channel
    // is the first one's (one I/O queue pair per poller for both namespaces).
    let vubd_lines: Vec<&str> = lines_with(&console, "VUBD-DEVICES: ").collect();
    let count = |what: &str| vubd_lines.iter().filter(|l| l.contains(what)).count();
    assert_eq!(count("NVMe controller opened"), 1, "{vubd_lines:#?}");
    assert_eq!(
        count("NVMe controller shared with another device"),
        1,
        "{vubd_lines:#?}"
    );
    // QEMU's controller takes namespace notices (Set Features, Asynchronous Event
    // Configuration) and keeps vubd's Asynchronous Event Request; vubd's thread that waits
    // for it runs in its sandbox throughout.
    assert_eq!(count("namespace_notices=true"), 2, "{vubd_lines:#?}");
    // In a run where both devices are attached at once (blkcheck connects both before either
    // is done, unless the guest is very slow to start one), the second device to attach a
    // queue on a poller joins the first device's channel there: both pollers, at least once.
    let shared = count("I/O channel shared with another device");
    assert!(shared >= 2, "{shared} shared channels: {vubd_lines:#?}");
    // 2 + 2 + (1 + 3) + 2 sessions.
    assert_eq!(count("frontend connected"), 10, "{vubd_lines:#?}");
    assert_eq!(count("NVMe I/O timeout"), 0, "{vubd_lines:#?}");

    // Each namespace holds its own device's pattern, not the other's.
    for (img, seed) in [(&ns1, SEEDS[0]), (&ns2, SEEDS[1])] {
        if let Err(at) = pattern::check(seed, 0, &read_at(img, 0, PATTERN_BYTES)) {
            panic!(
                "{}: the pattern of seed {seed:#x} is missing at {at}",
                img.display()
            );
        }
    }

    eprintln!(
        "nvme pcie devices lab: guest {:.1} s, total {:.1} s",
        guest_time.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
}
