//! vubd serving a block device: a loop device over an image file in a temporary directory.
//! The frontend sees the device's own geometry (logical block size, capacity), data goes
//! through the device into the backing file, and discard and write-zeroes behave as
//! advertised, and the device is locked as QEMU locks it.
//!
//! These tests create loop devices (and one mounts a ramfs), which needs root and the loop
//! driver. Where that is not possible they fail and say why; they never skip. The tests of
//! what vubd offers (block size, discard) always run vubd, whatever `VUBD_TEST_BACKEND` says.

mod common;
#[path = "common/raw.rs"]
mod raw;
#[path = "common/workload.rs"]
mod workload;

use std::fs;
use std::path::Path;
use std::process::Command;

use common::daemon::{Daemon, DaemonConfig};
use common::loopdev::{
    LoopDevice, cleanup_failed, require_loop_devices, retry_until_timeout, run_tool,
};
use common::{Image, Rng, SECTOR, assert_same, describe_ret};
use raw::RawFrontend;
use tempfile::TempDir;
use virtio_driver::VirtioBlkFeatureFlags;

const MIB: u64 = 1 << 20;

/// The virtio-blk status `VIRTIO_BLK_S_UNSUPP`, as the raw frontend reports it.
const UNSUPP: i32 = -libc::ENOTSUP;

/// A ramfs mounted on a fresh temporary directory: a file system without fallocate (and
/// without O_DIRECT), so a loop device over a file in it can neither discard nor write zeros
/// by itself. Unmounted on drop, also when the test fails.
#[derive(Debug)]
struct Ramfs {
    dir: TempDir,
}

impl Ramfs {
    fn mount() -> Self {
        require_loop_devices();
        let dir = tempfile::tempdir().expect("create mount point");
        if let Err(e) = run_tool(
            Command::new("mount")
                .args(["-t", "ramfs", "vubd-test"])
                .arg(dir.path()),
        ) {
            panic!("cannot mount a ramfs on {}: {e}", dir.path().display());
        }
        Self { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Ramfs {
    fn drop(&mut self) {
        // Busy until the kernel has released the loop device's backing file.
        let unmounted = retry_until_timeout(|| run_tool(Command::new("umount").arg(self.path())));
        if let Err(e) = unmounted {
            cleanup_failed(&format!(
                "cannot unmount the ramfs on {}: {e}",
                self.dir.path().display()
            ));
        }
    }
}

/// What a frontend that accepts every feature but `VIRTIO_BLK_F_RO` is offered: feature bits
/// and configuration space fields.
#[derive(Debug, Clone, Copy)]
struct Offer {
    discard: bool,
    write_zeroes: bool,
    blk_size: bool,
    topology: bool,
    capacity_sectors: u64,
    blk_size_bytes: u32,
    physical_block_exp: u8,
    max_discard_sectors: u32,
    max_discard_seg: u32,
    discard_sector_alignment: u32,
    max_write_zeroes_sectors: u32,
}

fn offer(daemon: &Daemon) -> Offer {
    let socket = daemon.socket().to_owned();
    common::bounded("raw config", move || {
        let raw = RawFrontend::connect(&socket, raw::features_without_ro()).expect("raw connect");
        let config = raw.config().expect("GET_CONFIG");
        Offer {
            discard: raw.has_feature(VirtioBlkFeatureFlags::DISCARD),
            write_zeroes: raw.has_feature(VirtioBlkFeatureFlags::WRITE_ZEROES),
            blk_size: raw.has_feature(VirtioBlkFeatureFlags::BLK_SIZE),
            topology: raw.has_feature(VirtioBlkFeatureFlags::TOPOLOGY),
            capacity_sectors: config.capacity.to_native(),
            blk_size_bytes: config.blk_size.to_native(),
            physical_block_exp: config.physical_block_exp,
            max_discard_sectors: config.max_discard_sectors.to_native(),
            max_discard_seg: config.max_discard_seg.to_native(),
            discard_sector_alignment: config.discard_sector_alignment.to_native(),
            max_write_zeroes_sectors: config.max_write_zeroes_sectors.to_native(),
        }
    })
}

/// Checks that the frontend sees the loop device's capacity and logical block size, in the
/// configuration space and through libblkio.
fn assert_device_geometry(daemon: &Daemon, device: &LoopDevice) {
    let size = device.size();
    let logical = device.queue_limit("logical_block_size");
    let physical = device.queue_limit("physical_block_size");
    let offer = offer(daemon);
    assert_eq!(
        offer.capacity_sectors,
        size / SECTOR,
        "config space capacity (sectors) of a {size}-byte device"
    );
    assert!(offer.blk_size, "VIRTIO_BLK_F_BLK_SIZE not offered");
    assert_eq!(
        u64::from(offer.blk_size_bytes),
        logical,
        "config space blk_size of a device with {logical}-byte logical blocks"
    );
    if offer.topology {
        let exp = offer.physical_block_exp;
        assert_eq!(
            logical << exp,
            physical,
            "config space physical_block_exp {exp} ({logical}-byte logical blocks)"
        );
    }
    let client = daemon.connect(1);
    assert_eq!(client.capacity(), size, "capacity seen through libblkio");
    assert_eq!(
        u64::from(client.block_size()),
        logical,
        "block size seen through libblkio"
    );
}

/// Serves a 16 MiB loop device with `sector_size`-byte blocks on two queues, runs the random
/// workload through it and checks the backing file on the host.
fn random_io_reaches_the_backing_file(sector_size: u32, seed: u64, daemon: fn(&Path) -> Daemon) {
    let size = 16 * MIB;
    let image = Image::new(size);
    let device = LoopDevice::attach(image.path(), sector_size, true);
    assert_eq!(device.size(), size, "loop device size");
    assert_eq!(
        device.queue_limit("logical_block_size"),
        u64::from(sector_size),
        "loop device logical block size"
    );
    let mut daemon = daemon(device.path());
    assert_device_geometry(&daemon, &device);

    let mut client = daemon.connect(2);
    let expected = workload::random_io(&mut client, seed);
    drop(client);
    let on_host = image.read_host(0, expected.len());
    assert_same(&expected, &on_host, 0, "backing file on the host");
    daemon.assert_running();
}

fn two_queues() -> DaemonConfig {
    DaemonConfig {
        num_queues: Some(2),
        ..DaemonConfig::default()
    }
}

#[test]
fn loop_device_with_512_byte_sectors_serves_random_io_on_two_queues_into_its_backing_file() {
    random_io_reaches_the_backing_file(512, 0xb10c_0512, |disk| {
        Daemon::start_disk(disk, &two_queues())
    });
}

#[test]
fn loop_device_with_4096_byte_sectors_is_seen_with_4096_byte_blocks_and_serves_aligned_io() {
    // The block size is vubd's choice: QEMU's export takes it from an option.
    random_io_reaches_the_backing_file(4096, 0xb10c_4096, |disk| {
        Daemon::vubd_disk(disk, &two_queues(), &[])
    });
}

/// Marks `[offset, offset + len)` of `expected` as zeroed.
fn zeroed(expected: &mut [u8], offset: u64, len: u64) {
    let start = usize::try_from(offset).expect("fits");
    let end = usize::try_from(offset + len).expect("fits");
    expected[start..end].fill(0);
}

/// Zeroes ranges of a loop device with `sector_size`-byte blocks filled with random data, with
/// write-zeroes (with and without unmap) and, if the device offers it, discard; checks that
/// exactly those ranges read back as zeros, through the frontend and in the backing file.
fn zeroed_ranges_read_back_as_zeros(sector_size: u32, seed: u64) {
    let (image, mut expected) = Image::with_random_contents(4 * MIB, seed);
    let device = LoopDevice::attach(image.path(), sector_size, true);
    let mut daemon = Daemon::start_disk(device.path(), &DaemonConfig::default());
    let mut client = daemon.connect(1);
    let discard = client.info().max_discard_len > 0;
    let q = client.queue(0);
    for (offset, len, unmap) in [
        (64 << 10, 128 << 10, false),
        (MIB + (12 << 10), 40 << 10, true),
    ] {
        q.write_zeroes(offset, len, unmap);
        zeroed(&mut expected, offset, len);
    }
    if discard {
        let (offset, len) = (2 * MIB + (4 << 10), 256 << 10);
        q.discard(offset, len);
        zeroed(&mut expected, offset, len);
    }
    let len = expected.len();
    let back = workload::read_back(q, 0, len, 128 << 10);
    assert_same(&expected, &back, 0, "zeroed ranges and their neighbours");
    q.flush();
    drop(client);
    assert_same(&expected, &image.read_host(0, len), 0, "backing file");
    daemon.assert_running();
}

#[test]
fn zeroed_ranges_of_a_512_byte_sector_loop_device_read_back_as_zeros() {
    zeroed_ranges_read_back_as_zeros(512, 0x2e50_0512);
}

#[test]
fn zeroed_ranges_of_a_4096_byte_sector_loop_device_read_back_as_zeros() {
    zeroed_ranges_read_back_as_zeros(4096, 0x2e50_4096);
}

/// Checks that vubd, serving `device` (which holds `expected`), offers discard exactly when the
/// device has a non-zero `discard_max_bytes`, with limits to match, and write-zeroes either way
/// (the kernel writes zeros where the device cannot). Then sends a discard whether or not it
/// was offered: it must zero the range if it was, and fail with `VIRTIO_BLK_S_UNSUPP` and
/// change nothing if not. Updates `expected` and checks the disk through the frontend.
fn assert_discard_as_the_device_supports_it(
    daemon: &Daemon,
    device: &LoopDevice,
    expected: &mut [u8],
) {
    let discard_max_bytes = device.queue_limit("discard_max_bytes");
    let device_discards = discard_max_bytes > 0;
    let offer = offer(daemon);
    assert_eq!(
        offer.discard, device_discards,
        "VIRTIO_BLK_F_DISCARD offered for a device with discard_max_bytes {discard_max_bytes}"
    );
    if device_discards {
        assert!(
            offer.max_discard_sectors > 0 && offer.max_discard_seg > 0,
            "discard offered with max_discard_sectors {} and max_discard_seg {}",
            offer.max_discard_sectors,
            offer.max_discard_seg
        );
        let alignment = u64::from(offer.discard_sector_alignment) * SECTOR;
        let logical = device.queue_limit("logical_block_size");
        assert!(
            alignment > 0 && alignment % logical == 0,
            "discard_sector_alignment of {alignment} bytes for {logical}-byte blocks"
        );
    } else {
        assert_eq!(
            offer.max_discard_sectors, 0,
            "max_discard_sectors without VIRTIO_BLK_F_DISCARD"
        );
    }
    assert!(
        offer.write_zeroes && offer.max_write_zeroes_sectors > 0,
        "write-zeroes on a writable block device: offered {}, max_write_zeroes_sectors {}",
        offer.write_zeroes,
        offer.max_write_zeroes_sectors
    );

    let (offset, len) = (MIB + (8 << 10), 192 << 10);
    let socket = daemon.socket().to_owned();
    let ret = common::bounded("raw discard", move || {
        let mut raw =
            RawFrontend::connect(&socket, raw::features_without_ro()).expect("raw connect");
        raw.discard(offset, len)
    });
    if device_discards {
        assert_eq!(ret, 0, "discard where offered: {}", describe_ret(ret));
        zeroed(expected, offset, len);
    } else {
        assert_eq!(
            ret,
            UNSUPP,
            "discard where not offered: {}",
            describe_ret(ret)
        );
    }
    let mut client = daemon.connect(1);
    let back = workload::read_back(client.queue(0), 0, expected.len(), 128 << 10);
    assert_same(expected, &back, 0, "disk after the discard");
}

#[test]
fn discard_is_offered_for_a_loop_device_that_discards_and_zeroes_the_range() {
    let (image, mut expected) = Image::with_random_contents(4 * MIB, 0xd15c_0001);
    let device = LoopDevice::attach(image.path(), 512, true);
    let dir = image.path().parent().expect("image in a directory");
    assert!(
        device.queue_limit("discard_max_bytes") > 0,
        "a loop device over a file in {} does not discard (discard_max_bytes 0): this test \
         needs a temporary directory on a file system that punches holes",
        dir.display()
    );
    let mut daemon = Daemon::vubd_disk(device.path(), &DaemonConfig::default(), &[]);
    assert_discard_as_the_device_supports_it(&daemon, &device, &mut expected);
    let mut client = daemon.connect(1);
    client.queue(0).flush();
    drop(client);
    let len = expected.len();
    assert_same(&expected, &image.read_host(0, len), 0, "backing file");
    daemon.assert_running();
}

#[test]
fn loop_device_that_cannot_discard_or_zero_gets_no_discard_and_write_zeroes_still_zero() {
    let ramfs = Ramfs::mount();
    let backing = ramfs.path().join("disk.img");
    let mut expected = Rng::new(0xd15c_0002).bytes(4 << 20);
    fs::write(&backing, &expected).expect("write the backing file");
    // A ramfs has no O_DIRECT: the loop device goes through its page cache.
    let device = LoopDevice::attach(&backing, 512, false);
    for limit in ["discard_max_bytes", "write_zeroes_max_bytes"] {
        assert_eq!(
            device.queue_limit(limit),
            0,
            "{limit} of a loop device over a ramfs file"
        );
    }
    let mut daemon = Daemon::vubd_disk(device.path(), &DaemonConfig::default(), &[]);
    assert_discard_as_the_device_supports_it(&daemon, &device, &mut expected);

    // Write-zeroes must leave zeros whether or not the driver allows unmapping (virtio 1.2,
    // 5.2.6.2): the UNMAP flag permits deallocation, it does not require it.
    let mut client = daemon.connect(1);
    let q = client.queue(0);
    for (offset, len, unmap) in [(64 << 10, 128 << 10, false), (2 * MIB, 64 << 10, true)] {
        if let Err(ret) = q.try_write_zeroes(offset, len, unmap) {
            panic!(
                "write-zeroes of {len} bytes at {offset} (unmap {unmap}) on a device without \
                 discard or write-zeroes support: {}",
                describe_ret(ret)
            );
        }
        zeroed(&mut expected, offset, len);
    }
    let back = workload::read_back(q, 0, expected.len(), 128 << 10);
    assert_same(&expected, &back, 0, "disk after write-zeroes");
    q.flush();
    drop(client);
    let on_host = fs::read(&backing).expect("read the backing file");
    assert_same(&expected, &on_host, 0, "backing file");
    daemon.assert_running();
}

#[test]
fn a_loop_device_vubd_serves_is_locked_as_qemus_host_device_driver_locks_it() {
    let image = Image::new(4 * MIB);
    let device = LoopDevice::attach(image.path(), 512, true);
    let _daemon = Daemon::vubd_disk(device.path(), &DaemonConfig::default(), &[]);
    let qemu_io = run_tool(
        Command::new("qemu-io")
            .args(["-f", "raw", "-c", "quit"])
            .arg(device.path()),
    );
    match qemu_io {
        Err(e) if e.contains("Failed to get \"write\" lock") => {}
        other => panic!("qemu-io opened the device vubd serves for writing: {other:?}"),
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("sock");
    let exit = common::daemon::run_vubd(&[
        "--socket-path".as_ref(),
        socket.as_os_str(),
        "--disk".as_ref(),
        device.path().as_os_str(),
    ]);
    assert_eq!(exit.status.code(), Some(2), "{}", exit.stderr);
    assert!(
        exit.stderr.contains(&format!(
            "image {} is in use by another process (it holds the \"write\" permission)",
            device.path().display()
        )),
        "{}",
        exit.stderr
    );
}
