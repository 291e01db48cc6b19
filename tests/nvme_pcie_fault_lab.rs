//! Faults of vubd's user-space NVMe PCIe driver in the lab (`tests/guest/nvme-pcie-fault-lab.sh`),
//! in two QEMU guests (TCG):
//!
//! - With an emulated IOMMU: a controller whose drive the host throttles to 1 byte/s from
//!   boot (`throttling.bps-total=1`), so that its commands hang in QEMU. vubd (`--io-timeout
//!   3`) serves it to blkcheck: the oldest command times out, vubd sends Abort (which QEMU
//!   7.2's controller does not perform), then resets the controller. QEMU drains the drive
//!   during the reset, which lifts the throttle for the commands it holds; the host lifts it
//!   for good over the QEMU monitor as soon as the guest console shows the first reset. The
//!   commands submitted again complete, blkcheck verifies every block, and a second blkcheck
//!   passes on the same daemon. A second controller's drive (blkdebug) fails the first read
//!   of one sector with EIO: QEMU completes the command with an error status, blkcheck sees
//!   EIO for that read, and the next blkcheck on the same daemon passes (no reset). Then the
//!   startup errors a user fixes: no permission on `/dev/vfio/N` (vubd as user nobody), and
//!   an IOMMU group that is not viable (two controllers behind a PCIe-to-PCI bridge, one of
//!   them left on the nvme driver).
//! - Without an IOMMU: the controller has no IOMMU group and vfio-pci cannot take it; vubd
//!   says the IOMMU is off.
//! - With an emulated IOMMU and two CPUs: a controller that grants one I/O queue pair
//!   (`max_ioqpairs=1`) with two namespaces, and one with a single namespace. vubd refuses to
//!   start with two pollers on the first (one device per namespace, and the single-device form
//!   with two queues), in one line, and starts with one poller; a namespace the controller
//!   does not have is one line naming the active ones.
//!
//! The guests' programs are this build's vubd and blkcheck (built on first use). Where the lab
//! cannot start, the test fails and says why.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::examples::example_bin;
use common::lab::{
    Guest, build_initramfs, echo_lines, fields, image_file, line_with, lines_with, test_dir,
};

const HANG_BDF: &str = "0000:00:10.0";
const HANG_ADDR: &str = "0x10";
const EIO_BDF: &str = "0000:00:11.0";
const EIO_ADDR: &str = "0x11";
/// blkdebug: the first read of the drive that covers sector 1000 (inside the MiB blkcheck
/// checks; the firmware reads sector 0 at boot) fails with EIO.
const BLKDEBUG_CONF: &str =
    "[inject-error]\nevent = \"read_aio\"\nerrno = \"5\"\nsector = \"1000\"\nonce = \"on\"\n";
const GRP0_SERIAL: &str = "vubd-grp-0";
const GRP1_SERIAL: &str = "vubd-grp-1";
const IMG_BYTES: u64 = 16 << 20;
const GUEST_TIMEOUT_S: u64 = 300;
/// What the host looks for on the console before it lifts the throttle.
const RESET_LINE: &str = "NVMe controller reset";
/// The controller that grants one I/O queue pair, namespaces 1 and 2.
const QP_BDF: &str = "0000:00:12.0";
const QP_ADDR: &str = "0x12";
/// The controller with namespace 1 only.
const ONE_BDF: &str = "0000:00:13.0";
const ONE_ADDR: &str = "0x13";

/// One lab guest at a time: the tests of this file would otherwise boot theirs together.
static GUESTS: Mutex<()> = Mutex::new(());

/// Sends one HMP command to the monitor at `sock` and returns what QEMU answered (up to the
/// next prompt).
fn hmp(sock: &Path, cmd: &str) -> String {
    let mut s = UnixStream::connect(sock)
        .unwrap_or_else(|e| panic!("connect to the QEMU monitor {}: {e}", sock.display()));
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .expect("read timeout");
    let mut out = String::new();
    read_until_prompts(&mut s, &mut out, 1);
    s.write_all(format!("{cmd}\n").as_bytes())
        .expect("write to the QEMU monitor");
    read_until_prompts(&mut s, &mut out, 2);
    out
}

/// Reads from the monitor into `out` until it holds `prompts` prompts (at most 30 s).
fn read_until_prompts(s: &mut UnixStream, out: &mut String, prompts: usize) {
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(30);
    while out.matches("(qemu)").count() < prompts && Instant::now() < deadline {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.push_str(&String::from_utf8_lossy(&buf[..n])),
            Err(_) => {}
        }
    }
}

/// Watches the console log for [`RESET_LINE`] and then lifts the throttle of drive `nvme0`;
/// returns the monitor's answer, or `None` if the line never came before `stop`.
fn unthrottle_after_reset(
    console: PathBuf,
    monitor: PathBuf,
    stop: Arc<AtomicBool>,
) -> thread::JoinHandle<Option<String>> {
    thread::spawn(move || {
        while !stop.load(Ordering::Acquire) {
            let text = std::fs::read_to_string(&console).unwrap_or_default();
            if text.contains(RESET_LINE) {
                return Some(hmp(&monitor, "block_set_io_throttle nvme0 0 0 0 0 0 0"));
            }
            thread::sleep(Duration::from_millis(100));
        }
        None
    })
}

fn build_initrd(d: &Path) -> PathBuf {
    let blkcheck = example_bin("blkcheck");
    let vubd = Path::new(env!("CARGO_BIN_EXE_vubd"));
    build_initramfs(d, "nvme-pcie-fault-lab", &[vubd, &blkcheck])
}

/// The lines vubd printed for `name` (`NAME-ERROR: ...`) and its exit status (`NAME-RC`).
fn tried<'a>(console: &'a str, name: &str) -> (Vec<&'a str>, String) {
    let tag = format!("{name}-ERROR: ");
    let lines: Vec<&str> = console
        .lines()
        .filter_map(|l| l.find(&tag).map(|at| &l[at + tag.len()..]))
        .filter(|l| !l.trim().is_empty())
        .collect();
    let rc = fields(line_with(console, &format!("{name}-RC ")))["rc"].clone();
    (lines, rc)
}

#[test]
fn a_hung_command_is_aborted_then_recovered_by_a_reset_and_startup_errors_name_their_cause() {
    let _one = GUESTS.lock().unwrap_or_else(|e| e.into_inner());
    let started = Instant::now();
    let dir = test_dir();
    let d = dir.path();
    let initrd = build_initrd(d);

    // --- with an IOMMU: the hung command, permissions, the group ---
    let hang = image_file(d, "hang.img", IMG_BYTES);
    let grp0 = image_file(d, "grp0.img", IMG_BYTES);
    let grp1 = image_file(d, "grp1.img", IMG_BYTES);
    let eio = image_file(d, "eio.img", IMG_BYTES);
    let blkdebug = d.join("blkdebug.conf");
    std::fs::write(&blkdebug, BLKDEBUG_CONF).expect("write the blkdebug rules");
    let monitor = d.join("monitor.sock");
    let mut guest = Guest::new(&initrd, d, "console-iommu.log", GUEST_TIMEOUT_S);
    guest
        .command()
        .args(["--iommu", "--pci-bridge", "br0", "--monitor"])
        .arg(&monitor)
        .arg("--nvme")
        .arg(format!(
            "{},serial=vubd-hang,addr={HANG_ADDR},drive.throttling.bps-total=1",
            hang.display()
        ))
        .arg("--nvme")
        .arg(format!(
            "{},serial=vubd-eio,addr={EIO_ADDR},drive.file.driver=blkdebug,drive.file.config={}",
            eio.display(),
            blkdebug.display()
        ))
        .arg("--nvme")
        .arg(format!(
            "{},serial={GRP0_SERIAL},bus=br0,addr=1",
            grp0.display()
        ))
        .arg("--nvme")
        .arg(format!(
            "{},serial={GRP1_SERIAL},bus=br0,addr=2",
            grp1.display()
        ))
        .args([
            "--append",
            &format!(
                "FAULT_MODE=iommu HANG_BDF={HANG_BDF} EIO_BDF={EIO_BDF} GRP0_SERIAL={GRP0_SERIAL} GRP1_SERIAL={GRP1_SERIAL}"
            ),
        ]);
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = unthrottle_after_reset(guest.console_log().to_owned(), monitor, stop.clone());
    let t = Instant::now();
    let console = guest.run(d);
    let iommu_guest = t.elapsed();
    stop.store(true, Ordering::Release);
    let answer = watcher.join().expect("the monitor thread");
    echo_lines(
        &console,
        &["HANG-LOG", "PERM-", "EIO-", "GROUP", "blkcheck: "],
    );

    // The host lifted the throttle after the first reset, and QEMU took the command.
    let answer = answer.unwrap_or_else(|| panic!("no {RESET_LINE:?} on the console:\n{console}"));
    assert!(
        !answer.to_lowercase().contains("error"),
        "block_set_io_throttle: {answer}"
    );
    // A command timed out, was aborted (QEMU does not perform it), and the controller was
    // reset for that reason; the commands were submitted again.
    let log: Vec<&str> = lines_with(&console, "HANG-LOG: ").collect();
    let first = |what: &str| -> &str {
        log.iter()
            .copied()
            .find(|l| l.contains(what))
            .unwrap_or_else(|| panic!("no {what:?} in vubd's log: {log:#?}"))
    };
    let timeout = first("NVMe I/O timeout");
    let abort = first("NVMe Abort sent for the timed-out command");
    assert!(abort.contains("outcome=NotAborted"), "{abort}");
    let reset = first("NVMe controller reset");
    assert!(reset.contains("reason=\"abort not performed\""), "{reset}");
    let resubmitted = fields(first("commands resubmitted"));
    assert!(
        resubmitted["resubmitted"]
            .parse::<u64>()
            .is_ok_and(|n| n > 0),
        "{resubmitted:?}"
    );
    let order = |l: &str| log.iter().position(|x| *x == l).expect("in the log");
    assert!(
        order(timeout) < order(abort) && order(abort) < order(reset),
        "{log:#?}"
    );
    assert!(
        !log.iter().any(|l| l.contains("cannot be brought back")),
        "{log:#?}"
    );
    // Every block verified, across the recovery and after it.
    for seed in ["0x71", "0x72"] {
        line_with(
            &console,
            &format!("blkcheck: PASS write-verify queues=1 size=1048576 seed={seed} "),
        );
    }

    // The injected read error reached the client as EIO; the daemon went on serving without
    // a reset (an error status is the command's result, not a controller fault).
    let eio_first = line_with(&console, "EIO-FIRST: ");
    assert!(
        eio_first.starts_with("EIO-FIRST: blkcheck: FAIL write-verify: read ")
            && eio_first.ends_with("failed: Input/output error (os error 5)"),
        "{eio_first}"
    );
    line_with(
        &console,
        "blkcheck: PASS write-verify queues=1 size=1048576 seed=0x82 ",
    );
    assert_eq!(
        lines_with(&console, "EIO-LOG: ").count(),
        0,
        "no timeout or reset: {console}"
    );

    // No permission on the group's device node: one line that names it.
    let (perm, rc) = tried(&console, "PERM");
    assert_eq!(rc, "2", "{perm:?}");
    assert_eq!(perm.len(), 1, "one line: {perm:#?}");
    assert!(
        perm[0].starts_with("vubd: --disk: no permission on /dev/vfio/")
            && perm[0].contains(": run as root, or give this user the device"),
        "{}",
        perm[0]
    );

    // The bridged controllers share a group; the one left on nvme is named.
    let groups = fields(line_with(&console, "GROUPS "));
    let (group, rc) = tried(&console, "GROUP");
    assert_eq!(rc, "2", "{group:?}");
    assert_eq!(group.len(), 1, "one line: {group:#?}");
    assert_eq!(
        group[0],
        format!(
            "vubd: --disk: IOMMU group {} of {} is not viable: {} (nvme) still bound to host drivers \
             (bind them to vfio-pci too, or unbind them)",
            groups["group0"], groups["grp0"], groups["grp1"]
        )
    );
    line_with(&console, "nvme-pcie-fault-lab: all steps passed");

    // --- without an IOMMU ---
    let plain = image_file(d, "plain.img", IMG_BYTES);
    let mut guest = Guest::new(&initrd, d, "console-no-iommu.log", GUEST_TIMEOUT_S);
    guest
        .command()
        .arg("--nvme")
        .arg(format!("{},addr={HANG_ADDR}", plain.display()))
        .args([
            "--append",
            &format!("FAULT_MODE=no-iommu NVME_BDF={HANG_BDF}"),
        ]);
    let t = Instant::now();
    let console = guest.run(d);
    let plain_guest = t.elapsed();
    let (noiommu, rc) = tried(&console, "NOIOMMU");
    eprintln!("{noiommu:?} rc={rc}");
    assert_eq!(rc, "2", "{noiommu:?}");
    assert_eq!(
        noiommu,
        [format!(
            "vubd: --disk: {HANG_BDF} has no IOMMU group: turn the IOMMU on (intel_iommu=on or amd_iommu=on)"
        )]
    );

    eprintln!(
        "nvme pcie fault lab: guest with IOMMU {:.1} s, without {:.1} s, total {:.1} s",
        iommu_guest.as_secs_f64(),
        plain_guest.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
}

#[test]
fn too_few_io_queue_pairs_and_a_missing_namespace_stop_the_start_in_one_line() {
    let _one = GUESTS.lock().unwrap_or_else(|e| e.into_inner());
    let dir = test_dir();
    let d = dir.path();
    let initrd = build_initrd(d);
    let ns1 = image_file(d, "qp-ns1.img", IMG_BYTES);
    let ns2 = image_file(d, "qp-ns2.img", IMG_BYTES);
    let one = image_file(d, "one.img", IMG_BYTES);
    let mut guest = Guest::new(&initrd, d, "console-queues.log", GUEST_TIMEOUT_S);
    guest
        .command()
        .args(["--iommu", "--smp", "2"])
        .args([
            "--nvme-ctrl",
            &format!("qp,serial=vubd-qp,addr={QP_ADDR},max_ioqpairs=1"),
        ])
        .arg("--nvme-ns")
        .arg(format!("qp:{}", ns1.display()))
        .arg("--nvme-ns")
        .arg(format!("qp:{},nsid=2", ns2.display()))
        .arg("--nvme")
        .arg(format!("{},serial=vubd-one,addr={ONE_ADDR}", one.display()))
        .args([
            "--append",
            &format!("FAULT_MODE=queues QP_BDF={QP_BDF} ONE_BDF={ONE_BDF}"),
        ]);
    let t = Instant::now();
    let console = guest.run(d);
    for line in console
        .lines()
        .filter(|l| l.starts_with("NVME-LIST") || l.contains("-ERROR: ") || l.contains("-RC "))
    {
        eprintln!("{line}");
    }
    line_with(&console, "nvme-pcie-fault-lab: all steps passed");

    // `vubd nvme list`: the controller grants one pair; namespace 2 is there on one controller
    // and not on the other.
    let ctrl = |bdf: &str| fields(line_with(&console, &format!("NVME-LIST: {bdf} model=")));
    assert_eq!(ctrl(QP_BDF)["io_queues"], "1", "{console}");
    assert_ne!(ctrl(ONE_BDF)["io_queues"], "1", "{console}");
    let listed: Vec<&str> = lines_with(&console, "NVME-LIST: ").collect();
    let nsids_of = |bdf: &str| -> Vec<String> {
        listed
            .iter()
            .skip_while(|l| !l.starts_with(&format!("NVME-LIST: {bdf} ")))
            .skip(1)
            .take_while(|l| l.starts_with("NVME-LIST:   "))
            .map(|l| fields(&l["NVME-LIST:".len()..])["nsid"].clone())
            .collect()
    };
    assert_eq!(nsids_of(QP_BDF), ["1", "2"], "{listed:#?}");
    assert_eq!(nsids_of(ONE_BDF), ["1"], "{listed:#?}");

    // Two pollers, one queue pair: one line, exit status 2, whether the namespaces are two
    // devices or one device has two queues.
    let too_few = format!(
        "NVMe {QP_BDF}: 2 pollers would serve its namespaces, one I/O queue pair each, and the \
         controller grants 1 (fewer pollers: --cpus, or fewer queues)"
    );
    for name in ["QP-DEVICES", "QP-DISK"] {
        let (lines, rc) = tried(&console, name);
        assert_eq!(rc, "2", "{name}: {lines:?}");
        assert_eq!(lines, [format!("vubd: {too_few}")], "{name}");
    }
    // One poller is enough for both namespaces.
    line_with(&console, "nvme-pcie-fault-lab: QP-ONE-POLLER-OK");

    // A namespace the controller does not have: an inactive identifier (Identify Namespace
    // answers zeros), or one beyond the controller's count (256 in QEMU; never asked).
    for (name, bdf, nsid, active) in [
        ("NS9", QP_BDF, 9, "1, 2"),
        ("NS2", ONE_BDF, 2, "1"),
        ("NSBIG", QP_BDF, 100_000, "1, 2"),
    ] {
        let (lines, rc) = tried(&console, name);
        assert_eq!(rc, "2", "{name}: {lines:?}");
        assert_eq!(
            lines,
            [format!(
                "vubd: --disk: namespace {nsid} not found on {bdf} (active namespaces: {active})"
            )],
            "{name}"
        );
    }
    eprintln!(
        "nvme pcie fault lab, queues guest: {:.1} s",
        t.elapsed().as_secs_f64()
    );
}
