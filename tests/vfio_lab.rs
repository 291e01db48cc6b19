//! The lab for vubd's user-space NVMe driver: a QEMU guest (TCG) with an emulated NVMe
//! controller behind an emulated Intel IOMMU (`qemu/run-guest.sh --iommu --nvme`), running
//! `tests/guest/vfio-lab.sh`, which binds the controller to vfio-pci
//! (`tests/guest/bind-vfio.sh`), drives it from user space with `examples/vfio_probe.rs`
//! (config space, BAR0, CAP and VS, a DMA map at IOVA = virtual address, one Identify command
//! whose data the controller writes through the IOMMU), gives it back to the kernel's nvme
//! driver, and then runs vubd on a tmpfs file with `examples/blkcheck.rs` as its vhost-user
//! client, all inside the guest.
//!
//! One guest boot, in one test; the guest's programs are this build's vubd and the two
//! examples (built on first use, see `common/examples.rs`), copied into the initramfs with
//! their shared libraries. The test needs QEMU and a kernel (the lab fetches one into its
//! cache); where the lab cannot start, it fails and says why, never skips.

mod common;

use std::path::Path;
use std::time::Instant;

use common::examples::example_bin;
use common::lab::{Guest, build_initramfs, echo_lines, fields, image_file, line_with, test_dir};

/// The namespace of the emulated controller: a sparse image of this size.
const NVME_BYTES: u64 = 64 << 20;
const SERIAL: &str = "vubd-lab-0";
/// QEMU's emulated NVMe controller: Red Hat's vendor ID and the device ID of QEMU's NVMe.
const QEMU_NVME_ID: &str = "1b36:0010";
/// The guest's time limit (run-guest.sh --timeout); a run takes about 15 s.
const GUEST_TIMEOUT_S: u64 = 240;

#[test]
fn nvme_behind_the_iommu_is_usable_from_user_space_and_vhost_user_runs_in_the_guest() {
    let started = Instant::now();
    let probe = example_bin("vfio_probe");
    let blkcheck = example_bin("blkcheck");
    let vubd = Path::new(env!("CARGO_BIN_EXE_vubd"));
    let built_examples = started.elapsed();

    let dir = test_dir();
    let dir_path = dir.path();
    let t = Instant::now();
    let initrd = build_initramfs(dir_path, "vfio-lab", &[&probe, &blkcheck, vubd]);
    let built_initrd = t.elapsed();

    let image = image_file(dir_path, "nvme0.img", NVME_BYTES);
    let t = Instant::now();
    let mut guest = Guest::new(&initrd, dir_path, "console.log", GUEST_TIMEOUT_S);
    guest
        .command()
        .args(["--smp", "2", "--iommu", "--nvme"])
        .arg(format!("{},serial={SERIAL}", image.display()))
        .args(["--append", &format!("NVME_BYTES={NVME_BYTES}")]);
    let console = guest.run(dir_path);
    let guest_time = t.elapsed();

    let bound = fields(line_with(&console, "VFIO-BOUND "));
    assert_eq!(bound["id"], QEMU_NVME_ID, "{bound:?}");
    assert_eq!(
        bound["was"], "nvme",
        "the kernel's driver had it first: {bound:?}"
    );
    assert_eq!(
        bound["dev"],
        format!("/dev/vfio/{}", bound["group"]),
        "{bound:?}"
    );

    let probe_line = line_with(&console, "VFIO-PROBE ");
    let p = fields(probe_line);
    eprintln!("{probe_line}");
    assert_eq!(p["bdf"], bound["bdf"], "{probe_line}");
    assert_eq!(p["group"], bound["group"], "{probe_line}");
    assert_eq!(p["id"], QEMU_NVME_ID, "{probe_line}");
    assert_eq!(p["class"], "010802", "{probe_line}");
    // QEMU's controller (7.2 and later): NVMe 1.4, CAP.MQES 0x7ff (2048 entries), doorbell
    // stride 0, BAR0 mappable (interrupt remapping makes even the MSI-X table mappable).
    assert_eq!(p["vs"], "1.4.0", "{probe_line}");
    assert_eq!(p["mqes"], "2048", "{probe_line}");
    assert_eq!(p["dstrd"], "0", "{probe_line}");
    assert_eq!(p["bar0"], "mmap", "{probe_line}");
    assert_eq!(p["dma_map"], "ok", "{probe_line}");
    assert_eq!(p["dma_unmap"], "ok", "{probe_line}");
    // IOVA = virtual address: a user address above the 39-bit IOVA space a default VT-d gives.
    let iova = u64::from_str_radix(p["iova"].trim_start_matches("0x"), 16).expect("hex IOVA");
    assert!((1 << 39..1 << 47).contains(&iova), "{probe_line}");
    // The Identify data came through the IOMMU: the controller wrote it into the buffer.
    assert_eq!(p["identify"], "ok", "{probe_line}");
    assert_eq!(p["vid"], "1b36", "{probe_line}");
    assert_eq!(p["sn"], SERIAL, "{probe_line}");
    assert_eq!(p["mn"], "QEMU NVMe Ctrl", "{probe_line}");

    let released = fields(line_with(&console, "VFIO-RELEASED "));
    assert_eq!(released["driver"], "nvme", "{released:?}");

    for mode in ["write-verify", "write-zeroes"] {
        let tag = format!("blkcheck: PASS {mode} ");
        let line = line_with(&console, &tag);
        assert!(line.contains(" queues=2 "), "{line}");
        eprintln!("{line}");
    }
    line_with(&console, "vfio-lab: all steps passed");
    echo_lines(&console, &["vfio-lab: "]);
    eprintln!(
        "vfio lab: examples {:.1} s, initramfs {:.1} s, guest {:.1} s, total {:.1} s",
        built_examples.as_secs_f64(),
        built_initrd.as_secs_f64(),
        guest_time.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
}
