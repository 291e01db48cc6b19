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

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::examples::example_bin;
use common::lab::{bin_arg, lab_dir, line_with, lines_with, run_guest, run_script};

const NS1_BYTES: u64 = 32 << 20;
const NS2_BYTES: u64 = 16 << 20;
const PCIE_SERIAL: &str = "vubd-devices";
const BUILD_TIMEOUT: Duration = Duration::from_secs(600);
const GUEST_TIMEOUT_S: u64 = 300;
/// What the guest's blkcheck `pattern` runs write, by device.
const SEEDS: [u64; 2] = [0x1d1, 0x2d2];
const PATTERN_BYTES: usize = 4 << 20;

fn image(dir: &Path, name: &str, len: u64) -> PathBuf {
    let p = dir.join(name);
    File::create(&p)
        .and_then(|f| f.set_len(len))
        .expect("create an image");
    p
}

#[test]
fn two_namespaces_of_one_controller_are_served_as_two_devices_at_once() {
    let started = Instant::now();
    let blkcheck = example_bin("blkcheck");
    let vubd = Path::new(env!("CARGO_BIN_EXE_vubd"));

    let dir = tempfile::tempdir().expect("create test directory");
    let d = dir.path();
    assert!(
        !d.to_string_lossy().contains(','),
        "QEMU options cannot take the path {}",
        d.display()
    );
    let initrd = d.join("nvme-pcie-devices.cpio.gz");
    run_script(
        Command::new(lab_dir().join("build-initramfs.sh"))
            .arg("--output")
            .arg(&initrd)
            .arg("--script")
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/guest/nvme-pcie-devices.sh"))
            .args(["--bin", &bin_arg(vubd), "--bin", &bin_arg(&blkcheck)])
            .arg("--add")
            .arg(format!(
                "{}:/usr/bin/bind-vfio.sh",
                lab_dir().join("guest/bind-vfio.sh").display()
            )),
        &d.join("build.log"),
        BUILD_TIMEOUT,
        "build-initramfs.sh",
    );

    let ns1 = image(d, "ns1.img", NS1_BYTES);
    let ns2 = image(d, "ns2.img", NS2_BYTES);
    let console_log = d.join("console.log");
    let t = Instant::now();
    let mut guest = Command::new(lab_dir().join("run-guest.sh"));
    guest
        .arg("--initrd")
        .arg(&initrd)
        .args(["--smp", "2", "--iommu"])
        .args(["--nvme-ctrl", &format!("c1,serial={PCIE_SERIAL}")])
        .arg("--nvme-ns")
        .arg(format!("c1:{}", ns1.display()))
        .arg("--nvme-ns")
        .arg(format!("c1:{},nsid=2", ns2.display()))
        .args(["--append", &format!("PCIE_SERIAL={PCIE_SERIAL}")])
        .args([
            "--timeout",
            &GUEST_TIMEOUT_S.to_string(),
            "--no-echo",
            "--log",
        ])
        .arg(&console_log);
    let console = run_guest(
        &mut guest,
        &console_log,
        d,
        Duration::from_secs(GUEST_TIMEOUT_S + 30),
    );
    let guest_time = t.elapsed();
    for line in console.lines().filter(|l| {
        l.starts_with("DEVICE") || l.starts_with("VUBD-DEVICES") || l.starts_with("nvme-pcie-")
    }) {
        eprintln!("{line}");
    }
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
        let f = File::open(img).expect("open image");
        let mut got = vec![0u8; PATTERN_BYTES];
        f.read_exact_at(&mut got, 0).expect("read image");
        if let Err(at) = pattern::check(seed, 0, &got) {
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
