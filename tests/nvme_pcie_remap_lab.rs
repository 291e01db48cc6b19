//! Guest memory regions that come and go while vubd's NVMe PCIe driver has I/O in flight, in
//! the lab: a QEMU guest (TCG, two CPUs) with one emulated NVMe controller behind an emulated
//! Intel IOMMU, running `tests/guest/nvme-pcie-remap.sh`. vubd serves the controller's
//! namespace on one and then two queues; blkcheck runs write-verify (and, on two queues, a
//! sector pattern) with `--remap`, so each queue keeps mapping a new memory region
//! (ADD_MEM_REG) and removing its old one (REM_MEM_REG) while its next batch is in flight.
//!
//! Every request verifies (a region unmapped from the IOMMU too early, or never mapped, makes
//! the controller's DMA fault and the request fail), and vubd's log accounts for every region:
//! each one it DMA-mapped was unmapped exactly once, either after the frontend removed it (as
//! many as blkcheck removed, each while the session still lasted: released by vubd's sweep
//! once no request and no poller map held it, not kept until the session's end) or when the
//! session ended. After the guest is gone the host finds the pattern in the image.
//!
//! One guest boot; the guest's programs are this build's vubd and blkcheck (built on first
//! use). Where the lab cannot start, the test fails and says why.

mod common;

#[path = "../examples/blkcheck/pattern.rs"]
mod pattern;

use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

use common::examples::example_bin;
use common::lab::{
    Guest, build_initramfs, echo_lines, fields, image_file, line_with, lines_with, read_at,
    test_dir,
};

const NS_BYTES: u64 = 16 << 20;
const PCIE_SERIAL: &str = "vubd-remap";
const GUEST_TIMEOUT_S: u64 = 300;
/// The pattern the two-queue run writes over the first 4 MiB.
const PATTERN_SEED: u64 = 0x2e;
const PATTERN_BYTES: usize = 4 << 20;

/// A `key=value` field of a blkcheck summary line, as a number.
fn number(line: &str, key: &str) -> u64 {
    fields(line)
        .get(key)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key}= in {line}"))
}

#[test]
fn regions_added_and_removed_during_io_are_mapped_and_unmapped_once_each() {
    let started = Instant::now();
    let blkcheck = example_bin("blkcheck");
    let vubd = Path::new(env!("CARGO_BIN_EXE_vubd"));

    let dir = test_dir();
    let d = dir.path();
    let initrd = build_initramfs(d, "nvme-pcie-remap", &[vubd, &blkcheck]);

    let ns = image_file(d, "ns.img", NS_BYTES);
    let t = Instant::now();
    let mut guest = Guest::new(&initrd, d, "console.log", GUEST_TIMEOUT_S);
    guest
        .command()
        .args(["--smp", "2", "--iommu", "--nvme"])
        .arg(format!("{},serial={PCIE_SERIAL}", ns.display()))
        .args(["--append", &format!("PCIE_SERIAL={PCIE_SERIAL}")]);
    let console = guest.run(d);
    let guest_time = t.elapsed();
    echo_lines(&console, &["blkcheck: ", "REMAP", "nvme-pcie-"]);
    line_with(&console, "nvme-pcie-remap: all steps passed");

    for (queues, runs) in [
        (1, &["write-verify"][..]),
        (2, &["write-verify", "pattern"]),
    ] {
        // Every request of every run verified, and buffers moved to new regions.
        let remaps: u64 = runs
            .iter()
            .map(|mode| {
                let pass = line_with(
                    &console,
                    &format!(
                        "blkcheck: PASS {mode} queues={queues} size=4194304 seed=0x{queues}e "
                    ),
                );
                let remaps = number(pass, "remaps");
                // Each queue moves more than once (every 8 requests in batches of up to 16
                // for write-verify, every 4 in batches of 4 for the pattern).
                assert!(remaps >= 2 * queues, "too few moves: {pass}");
                remaps
            })
            .sum();

        let tag = format!("REMAP{queues}: ");
        let log: Vec<&str> = lines_with(&console, &tag).collect();
        // A frontend that exits just closes its socket (vubd warns that the peer went).
        let complaints: Vec<_> = log
            .iter()
            .filter(|l| l.contains("WARN") || l.contains("ERROR"))
            .filter(|l| !l.contains("frontend connection ended"))
            .collect();
        assert!(complaints.is_empty(), "vubd complained: {complaints:#?}");
        // One session per run.
        let sessions = log
            .iter()
            .filter(|l| l.contains("frontend connected"))
            .count();
        assert_eq!(sessions, runs.len(), "{log:#?}");

        // Each region DMA-mapped is unmapped once: as many after the frontend removed them as
        // blkcheck removed, the others when their session ended. (An address may come back
        // for a later region once its first one is gone: spans are counted, not collected.)
        let span = |l: &str| {
            let f = fields(l);
            (f["addr"].clone(), f["len"].clone())
        };
        let mut balance: HashMap<(String, String), i64> = HashMap::new();
        let (mut mapped, mut removed, mut at_end) = (0u64, 0u64, 0u64);
        for l in &log {
            if l.contains("guest memory region DMA-mapped") {
                mapped += 1;
                *balance.entry(span(l)).or_default() += 1;
            } else if l.contains("guest memory region DMA-unmapped") {
                let s = span(l);
                let open = balance.entry(s.clone()).or_default();
                assert!(*open > 0, "{s:?} unmapped while not mapped: {log:#?}");
                *open -= 1;
                // A removed region is unmapped by the sweep once nothing uses it, while the
                // session lasts (blkcheck stays connected 300 ms after its last move); not
                // at the session's end ("removed, still held at session end").
                match fields(l)["why"].as_str() {
                    "removed" => removed += 1,
                    "session end" => at_end += 1,
                    why => panic!("unmapped because {why:?}: {l}"),
                }
            }
        }
        assert_eq!(removed, remaps, "one unmap per region removed: {log:#?}");
        assert_eq!(mapped, removed + at_end, "{log:#?}");
        assert!(balance.values().all(|&n| n == 0), "{balance:?}");
        // blkcheck maps one region per queue and each move adds one.
        assert!(mapped >= remaps + queues, "{log:#?}");
    }

    // The two-queue pattern, written from buffers that kept moving, is in the image.
    if let Err(at) = pattern::check(PATTERN_SEED, 0, &read_at(&ns, 0, PATTERN_BYTES)) {
        panic!("{}: the pattern is missing at {at}", ns.display());
    }

    eprintln!(
        "nvme pcie remap lab: guest {:.1} s, total {:.1} s",
        guest_time.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
}
