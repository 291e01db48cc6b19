//! vubd killed with SIGKILL at random moments, and started again on the same socket, under a
//! QEMU guest (TCG, two CPUs) that writes all the while: the guest must see no I/O error and no
//! request that never completes, and every block must hold its writer's last acknowledged
//! write (or one it submitted later, whose completion the crash swallowed). This is what
//! vhost-user inflight I/O tracking (`VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD`) is for: without
//! it QEMU can only restart each queue at its used index, so a restarted backend executes
//! again the requests that completed out of order before the crash (the guest sees "is not a
//! head", then I/O errors) and never executes those still in flight (they hang).
//!
//! The guest's disk reconnects (`-chardev socket,...,reconnect=1`) and has two queues; in it,
//! `examples/genwrite.rs` runs 16 O_DIRECT writers, one region of 64 blocks (4 KiB) each,
//! pinned to the two CPUs so that both queues carry requests. Each writer keeps one request in
//! flight: a write of 1 to 32 blocks, then a read of them back, which must hold what was
//! written; it records per block the last generation the device acknowledged and those
//! submitted since. A watchdog reports any read or write older than 60 s. When the host has
//! killed and restarted vubd (10 times, 0.5 to 3 s after QEMU came back each time; seeded,
//! the seed printed), it tells the guest to stop; the writers finish, every region is read
//! again and checked (`lost`: older than the last acknowledged generation; `unexpected`,
//! `misplaced`, `corrupt`: see genwrite), and the guest reports what its kernel logged: "is not
//! a head" (a request completed twice) and "I/O error". The host then reads the disk itself
//! and checks it holds, block by block, what the guest read last.
//!
//! The crash matters only when it finds a queue whose requests complete out of order, and
//! under TCG the guest submits so slowly that the host would finish almost every request
//! before the next one arrives. So each case makes requests wait at the host, as a busy
//! volume does: large writes, and in the file case a write limit (`WRITE_IOPS` in
//! `tests/common/restart.rs`: vubd runs in a cgroup that may write to the image's disk 100
//! times a second; reads are not limited), so that reads pass the writes submitted before
//! them.
//!
//! Two cases, a guest boot each, run one after the other (two TCG guests at once would starve
//! each other on a small machine):
//!
//! - a file image (`--cache none`, writes limited as said). The same guest also runs the write
//!   cache case: a second disk, served by its own vubd on a loop device, is switched to
//!   write-through by the guest (`cache_type`, CONFIG_WCE) and its vubd is killed and
//!   restarted. The guest's `cache_type` cannot tell whether the new vubd knows: QEMU answers
//!   the guest's reads of the configuration space from its own copy, which it fills from the
//!   back end (GET_CONFIG) only when the device is created, not when it reconnects, and it
//!   asks again (on the back end's config-change message) only to learn a new capacity. So the
//!   host watches what reaches the loop device: a vubd that serves the disk write-through
//!   sends every write with FUA (`RWF_DSYNC`), which the loop device, having a write cache and
//!   no FUA, completes with a flush; a write-back vubd sends none, and a guest that believes
//!   the disk is write-through sends no flush either. The loop device's flush count must stay
//!   still for 16 writes before the switch (so the measure tells the modes apart), grow with 16
//!   writes after it, and grow with 16 writes after the restart.
//! - a namespace of the Linux kernel's NVMe/TCP target (`tests/common/nvmet.rs`: a null_blk
//!   device with `memory_backed=1`, in a second TCG guest), where writes beyond the target's
//!   in-capsule size wait for its R2T while reads pass them; the host reads the regions back
//!   through the last vubd once the guest is gone. vubd reaches it through a relay in the test
//!   process (`tests/common/relay.rs`): a vubd killed with unread data resets its connections,
//!   and a reset can make the target guest's QEMU abort in libslirp 4.7.
//!
//! What QEMU says when vubd goes and comes back (its stderr, in the console log) is counted
//! and printed, not judged.
//!
//! Environment:
//!
//! - `VUBD_TEST_LONG=1`: the long run (`tests/run.sh --long`): 60 kills per case, 0.2 to
//!   3 s apart, 32 writers, and a write limit of 200 a second in the file case;
//! - `VUBD_RESTART_KILLS=N`: N kills per case instead;
//! - `VUBD_RESTART_SEED=X`: the seed of the kill times and of genwrite's data (decimal or
//!   0x-prefixed hex), to repeat a run; by default it comes from the clock;
//! - `VUBD_RESTART_WRITE_IOPS=N`: the file case's write limit (0: none);
//! - `VUBD_TEST_BACKEND=qemu-storage-daemon`: the file case's writers' disk is served by QEMU's
//!   reference backend instead, to check the lab itself. With Debian 12's QEMU 7.2, QEMU sets
//!   up no inflight area with it (it never sends GET_INFLIGHT_FD), and it fails the same way.
//!
//! The tests need QEMU, a kernel (the lab fetches one), root, loop devices and the kernel's
//! block I/O throttling (cgroup v1 blkio or v2 io); where the lab cannot start they fail and
//! say why, never skip.

#[path = "../examples/genwrite/block.rs"]
mod block;
mod common;
#[path = "common/restart.rs"]
mod restart;

use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::nvmet::{NvmetOptions, NvmetTarget};
use common::relay::Relay;
use restart::{Case, Disk, Settings};

/// The two cases share the machine's CPUs: one at a time.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn lock_lab() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[test]
fn vubd_killed_and_restarted_under_guest_writers_on_a_file_loses_no_write_and_keeps_write_through()
{
    let _turn = lock_lab();
    let started = Instant::now();
    let settings = Settings::from_env();
    let dir = common::lab::test_dir();
    let image = common::lab::image_file(dir.path(), "writers.img", 64 << 20);
    let case = Case {
        name: "file",
        disk: Disk::File(image),
        wce: true,
    };
    let report = restart::run(&case, &settings, dir.path());
    report.finish(&case, started);
}

#[test]
fn vubd_killed_and_restarted_under_guest_writers_on_nvme_tcp_loses_no_write() {
    let _turn = lock_lab();
    let started = Instant::now();
    let settings = Settings::from_env();
    let target = NvmetTarget::start(&NvmetOptions {
        ns_size_mib: 64,
        lifetime: Duration::from_secs(1800),
        ..NvmetOptions::default()
    });
    eprintln!(
        "restart lab: {} in {:.1} s",
        target.ready_line(),
        target.boot_time().as_secs_f64()
    );
    let relay = Relay::start(target.addr());
    let dir = common::lab::test_dir();
    let case = Case {
        name: "nvme-tcp",
        disk: Disk::NvmeTcp(format!(
            "nvme-tcp://127.0.0.1:{}/{}",
            relay.port(),
            target.nqn()
        )),
        wce: false,
    };
    let report = restart::run(&case, &settings, dir.path());
    report.finish(&case, started);
    drop(relay);
    drop(target);
}
