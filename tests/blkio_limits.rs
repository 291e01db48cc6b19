//! What the frontend sees of the device (capacity, block size, queue count, read-only), and
//! how the device treats requests it must refuse: beyond the end of the disk (with the default
//! settings and in every vubd poll mode), or writes to a read-only disk.

mod common;
#[path = "common/raw.rs"]
mod raw;

use blkio::Errno;
use common::client::ClientOptions;
use common::daemon::{Daemon, DaemonConfig};
use common::{Image, Rng, SECTOR, assert_same, describe_ret};
use raw::RawFrontend;
use virtio_driver::VirtioBlkFeatureFlags;

const MIB: u64 = 1 << 20;
const TIB: u64 = 1 << 40;

/// The virtio-blk status `VIRTIO_BLK_S_IOERR`, as libblkio reports it.
const IOERR: i32 = -libc::EIO;
/// The virtio-blk status `VIRTIO_BLK_S_UNSUPP`, as libblkio reports it.
const UNSUPP: i32 = -libc::ENOTSUP;

/// Serves an image of `size` bytes whose last sector holds a marker, and checks what the
/// frontend sees: capacity and block size through libblkio and in the raw configuration
/// space, the last sector readable and writable in place, the next one refused.
fn frontend_sees_the_image_geometry(size: u64) {
    let image = Image::new(size);
    let last = size - SECTOR;
    let marker = Rng::new(size).bytes(512);
    image.write_host(last, &marker);
    let mut daemon = Daemon::start(&image);

    let socket = daemon.socket().to_owned();
    let (capacity_sectors, blk_size) = common::bounded("raw config", move || {
        let raw = RawFrontend::connect(&socket, raw::features_without_ro()).expect("raw connect");
        let config = raw.config().expect("GET_CONFIG");
        let blk_size = raw
            .has_feature(VirtioBlkFeatureFlags::BLK_SIZE)
            .then(|| config.blk_size.to_native());
        (config.capacity.to_native(), blk_size)
    });
    assert_eq!(capacity_sectors, size / SECTOR, "config space capacity");
    if let Some(blk_size) = blk_size {
        assert_eq!(blk_size, 512, "config space blk_size");
    }

    let mut client = daemon.connect(1);
    assert_eq!(client.capacity(), size, "capacity seen through libblkio");
    assert_eq!(client.block_size(), 512, "block size seen through libblkio");
    let q = client.queue(0);
    assert_eq!(q.read(last, 512), marker, "last sector");
    let new_last = Rng::new(!size).bytes(512);
    q.write(last, &new_last);
    q.flush();
    assert_eq!(
        image.read_host(last, 512),
        new_last,
        "last sector on the host"
    );
    assert_eq!(
        q.try_read(size, 512),
        Err(IOERR),
        "first sector past the end"
    );
    daemon.assert_running();
}

#[test]
fn single_sector_image_is_one_sector_of_512_bytes() {
    frontend_sees_the_image_geometry(SECTOR);
}

#[test]
fn image_not_a_multiple_of_4096_keeps_its_exact_size() {
    frontend_sees_the_image_geometry(8 * MIB + 3 * SECTOR);
}

#[test]
fn image_larger_than_u32_max_sectors_keeps_its_exact_size() {
    // 2 TiB + 512 bytes is 2^32 + 1 sectors: a capacity truncated to 32 bits would be 1.
    frontend_sees_the_image_geometry(2 * TIB + SECTOR);
}

#[test]
fn num_queues_option_is_the_queue_count_the_frontend_sees() {
    let image = Image::new(MIB);
    for n in [1u16, 3] {
        let config = DaemonConfig {
            num_queues: Some(n),
            ..DaemonConfig::default()
        };
        let daemon = Daemon::start_with(&image, &config);
        let mut client = daemon.connect(usize::from(n));
        assert_eq!(client.info().max_queues, usize::from(n), "--num-queues {n}");
        for i in 0..usize::from(n) {
            client.queue(i).write(0, &[0xc3; 512]);
            assert_eq!(client.queue(i).read(0, 512), [0xc3; 512]);
        }
    }
}

#[test]
fn out_of_range_requests_fail_with_ioerr_and_the_daemon_keeps_serving() {
    out_of_range_requests_fail(Daemon::start_with);
}

common::per_poll_mode! {
    #[test]
    fn out_of_range_requests_fail_with_ioerr_and_the_daemon_keeps_serving() {
        out_of_range_requests_fail(|image, config| Daemon::vubd_polling(POLL, image, config));
    }
}

/// Sends reads, writes, discards and write-zeroes that reach past the end of a 1 MiB image
/// served by the daemon `start` returns: each fails, none writes anything, and the daemon keeps
/// serving the same connection and the next.
fn out_of_range_requests_fail(start: impl FnOnce(&Image, &DaemonConfig) -> Daemon) {
    let size = MIB;
    let (image, contents) = Image::with_random_contents(size, 0x0e0e);
    let mut daemon = start(&image, &DaemonConfig::default());
    let mut client = daemon.connect(1);
    let q = client.queue(0);
    // The largest 512-aligned offset: sector × 512 + length overflows a u64.
    let huge = !(SECTOR - 1);

    let reads: [(u64, usize); 4] = [
        (size, 512),
        (size - 512, 1024),
        (size + 64 * MIB, 4096),
        (huge, 1024),
    ];
    for (offset, len) in reads {
        assert_eq!(
            q.try_read(offset, len),
            Err(IOERR),
            "read of {len} bytes at {offset}"
        );
    }
    let writes: [(u64, usize); 4] = [
        (size, 512),
        (size - 512, 1024),
        (size - 4096, 64 << 10),
        (huge, 1024),
    ];
    for (offset, len) in writes {
        let ret = q.try_write(offset, &vec![0xee; len]);
        assert_eq!(ret, Err(IOERR), "write of {len} bytes at {offset}");
    }
    // Ranges that reach past the end, including ones that would wipe the whole disk if the
    // device clipped them instead of refusing them.
    let ranges: [(u64, u64); 3] = [(size, 4096), (size - 4096, 8192), (0, 2 * size)];
    for (offset, len) in ranges {
        let discard = q.try_discard(offset, len);
        assert!(
            matches!(discard, Err(IOERR | UNSUPP)),
            "discard of {len} bytes at {offset}: {discard:?}"
        );
        let zeroes = q.try_write_zeroes(offset, len, false);
        assert!(
            matches!(zeroes, Err(IOERR | UNSUPP)),
            "write-zeroes of {len} bytes at {offset}: {zeroes:?}"
        );
    }

    // Nothing was written, not even the in-range part of a straddling request.
    let len = contents.len();
    assert_same(&contents, &q.read(0, len), 0, "disk after refused requests");
    q.flush();
    assert_same(&contents, &image.read_host(0, len), 0, "image file");

    // The same connection and a new one still work.
    q.write(0, &[0x11; 4096]);
    assert_eq!(q.read(0, 4096), [0x11; 4096]);
    drop(client);
    let mut client = daemon.connect(1);
    assert_eq!(client.queue(0).read(0, 4096), [0x11; 4096]);
    daemon.assert_running();
}

fn readonly_config() -> DaemonConfig {
    DaemonConfig {
        readonly: true,
        ..DaemonConfig::default()
    }
}

#[test]
fn readonly_device_is_advertised_and_serves_reads() {
    let (image, contents) = Image::with_random_contents(MIB, 0x0a0a);
    let mut daemon = Daemon::start_with(&image, &readonly_config());

    // libblkio refuses to start a device that offers VIRTIO_BLK_F_RO unless opened read-only.
    let refused = daemon.try_connect(&ClientOptions::queues(1));
    let errno = refused.as_ref().err().map(blkio::Error::errno);
    assert_eq!(
        errno,
        Some(Errno::ROFS),
        "a read-write frontend was not told the device is read-only"
    );

    let mut options = ClientOptions::queues(1);
    options.read_only = true;
    let mut client = daemon.connect_with(&options);
    let q = client.queue(0);
    let len = contents.len();
    assert_same(&contents, &q.read(0, len), 0, "read-only disk");
    q.flush();
    drop(client);
    assert_same(&contents, &image.read_host(0, len), 0, "image file");
    daemon.assert_running();
}

#[test]
fn readonly_device_refuses_writes_discards_and_write_zeroes_it_receives() {
    let (image, contents) = Image::with_random_contents(MIB, 0x0b0b);
    let mut daemon = Daemon::start_with(&image, &readonly_config());
    let socket = daemon.socket().to_owned();
    let outcome = common::bounded("raw read-only checks", move || {
        // A frontend that leaves VIRTIO_BLK_F_RO unacknowledged and writes anyway: the device
        // must fail the write with VIRTIO_BLK_S_IOERR and write nothing (virtio 1.2, 5.2.6.2).
        let mut raw =
            RawFrontend::connect(&socket, raw::features_without_ro()).expect("raw connect");
        let read = raw.read(0, 4096);
        let write = raw.write(0, &[0xff; 4096]);
        let discard = raw.discard(0, 4096);
        let zeroes = raw.write_zeroes(4096, 4096, false);
        let zeroes_unmap = raw.write_zeroes(8192, 4096, true);
        let read_after = raw.read(0, 4096);
        (read, write, discard, zeroes, zeroes_unmap, read_after)
    });
    let (read, write, discard, zeroes, zeroes_unmap, read_after) = outcome;
    assert_eq!(read.as_deref(), Ok(&contents[..4096]), "read");
    assert_eq!(write, IOERR, "write: {}", describe_ret(write));
    for (what, ret) in [
        ("discard", discard),
        ("write-zeroes", zeroes),
        ("write-zeroes with unmap", zeroes_unmap),
    ] {
        assert!(
            ret == IOERR || ret == UNSUPP,
            "{what} on a read-only disk: {}",
            describe_ret(ret)
        );
    }
    assert_eq!(read_after.as_deref(), Ok(&contents[..4096]), "read after");
    let len = contents.len();
    assert_same(&contents, &image.read_host(0, len), 0, "image file");
    daemon.assert_running();
}
