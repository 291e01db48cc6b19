//! Data-path tests through a real vhost-user frontend (libblkio): what is written reads back,
//! lands in the image file, and survives many requests in flight on several queues at once.
//! The conformance core (random I/O, flush, discard and write-zeroes) runs with the default
//! settings and again in every vubd poll mode (the `poll_*` modules).

mod common;
#[path = "common/raw.rs"]
mod raw;
#[path = "common/workload.rs"]
mod workload;

use common::client::{ClientOptions, Queue};
use common::daemon::{Daemon, DaemonConfig};
use common::{Image, Rng, SECTOR, assert_same};
use raw::RawFrontend;
use virtio_driver::VirtioBlkFeatureFlags;

const MIB: u64 = 1 << 20;

/// Runs the random workload on `num_queues` queues at once, each on its own slice of an image
/// of `size` bytes served by the daemon `start` returns, then checks the whole image through
/// the frontend and on the host.
fn random_io_verifies(
    size: u64,
    num_queues: u16,
    seed: u64,
    start: impl FnOnce(&Image, &DaemonConfig) -> Daemon,
) {
    let image = Image::new(size);
    let config = DaemonConfig {
        num_queues: Some(num_queues),
        ..DaemonConfig::default()
    };
    let mut daemon = start(&image, &config);
    let mut client = daemon.connect(usize::from(num_queues));
    assert_eq!(client.capacity(), size, "capacity seen by the frontend");
    let expected = workload::random_io(&mut client, seed);
    let on_host = image.read_host(0, expected.len());
    assert_same(&expected, &on_host, 0, "image file on the host");
    daemon.assert_running();
}

#[test]
fn random_io_on_one_queue_reads_back_and_reaches_image_file() {
    random_io_verifies(16 * MIB, 1, 0x5eed_0001, Daemon::start_with);
}

#[test]
fn random_io_on_four_concurrent_queues_reads_back_and_reaches_image_file() {
    random_io_verifies(16 * MIB, 4, 0x5eed_0004, Daemon::start_with);
}

#[test]
fn buffers_in_a_region_mapped_after_io_started_are_served() {
    // The poller has translated guest memory before the frontend adds a region; requests
    // whose buffers lie only in the new region must still be served.
    let image = Image::new(4 * MIB);
    let mut daemon = Daemon::start(&image);
    let mut client = daemon.connect(1);
    let mut rng = Rng::new(0x5eed_0a11);
    let first = rng.bytes(64 * 1024);
    client.queue(0).write(0, &first);
    assert_same(
        &first,
        &client.queue(0).read(0, first.len()),
        0,
        "before the new region",
    );
    client
        .move_buffers_to_new_region()
        .expect("map a second memory region");
    let second = rng.bytes(64 * 1024);
    client.queue(0).write(MIB, &second);
    let back = client.queue(0).read(MIB, second.len());
    assert_same(&second, &back, MIB, "buffers in the new region");
    assert_same(
        &first,
        &client.queue(0).read(0, first.len()),
        0,
        "old data, new buffers",
    );
    daemon.assert_running();
}

#[test]
fn random_io_with_writeback_cache_reads_back_and_reaches_image_file() {
    // A vubd option: runs vubd whatever VUBD_TEST_BACKEND says.
    random_io_verifies(16 * MIB, 2, 0x5eed_00cb, |image, config| {
        Daemon::vubd(image, config, &["--cache".as_ref(), "writeback".as_ref()])
    });
}

#[test]
fn frontend_may_start_fewer_queues_than_the_device_offers() {
    let image = Image::new(4 * MIB);
    let config = DaemonConfig {
        num_queues: Some(4),
        ..DaemonConfig::default()
    };
    let daemon = Daemon::start_with(&image, &config);
    let mut client = daemon.connect(2);
    assert_eq!(client.info().max_queues, 4);
    let data = Rng::new(7).bytes(8192);
    client.queue(1).write(MIB, &data);
    assert_same(
        &data,
        &client.queue(0).read(MIB, 8192),
        MIB,
        "read on queue 0",
    );
    assert_same(&data, &image.read_host(MIB, 8192), MIB, "image file");
}

#[test]
fn flush_is_offered_and_completes_successfully() {
    let image = Image::new(4 * MIB);
    let mut daemon = Daemon::start(&image);
    let offers_flush = common::bounded("raw connect", {
        let socket = daemon.socket().to_owned();
        move || {
            let raw =
                RawFrontend::connect(&socket, raw::features_without_ro()).expect("raw connect");
            raw.has_feature(VirtioBlkFeatureFlags::FLUSH)
        }
    });
    // Without VIRTIO_BLK_F_FLUSH libblkio would complete a flush without sending it.
    assert!(offers_flush, "device does not offer VIRTIO_BLK_F_FLUSH");

    flushes_complete_alone_and_among_writes(&image, &mut daemon);
}

fn flushes_complete_alone_and_among_writes(image: &Image, daemon: &mut Daemon) {
    let mut client = daemon.connect(1);
    client.queue(0).flush();
    client.queue(0).write(0, &[0xa5; 4096]);
    client.queue(0).flush();
    // Flushes queued behind writes, several in flight at once.
    let q = client.queue(0);
    for i in 0..8u64 {
        q.submit_write(i * 4096, &[0x5a; 4096]);
        q.submit_flush();
    }
    for (tag, done) in q.wait_all().iter().enumerate() {
        assert_eq!(done.ret, 0, "request {tag} of the write/flush batch failed");
    }
    assert_eq!(image.read_host(0, 4096 * 8), vec![0x5a; 4096 * 8]);
    daemon.assert_running();
}

/// Fills a 1 MiB image with random data, serves it with the daemon `start` returns, zeroes
/// `[offset, offset + len)` with `zero`, and checks that exactly that range reads back as
/// zeros, through the frontend and on the host.
fn zeroing_leaves_neighbours_intact(
    start: impl FnOnce(&Image, &DaemonConfig) -> Daemon,
    zero: impl FnOnce(&mut Queue, u64, u64),
) {
    let (image, mut expected) = Image::with_random_contents(MIB, 0xd15c);
    let mut daemon = start(&image, &DaemonConfig::default());
    let mut client = daemon.connect(1);
    let (offset, len) = (64 << 10, 128 << 10);
    let q = client.queue(0);
    zero(q, offset, len);
    let range =
        usize::try_from(offset).expect("fits")..usize::try_from(offset + len).expect("fits");
    expected[range].fill(0);

    let window = 32 << 10;
    let from = offset - window;
    let window_len = usize::try_from(len + 2 * window).expect("fits");
    let back = q.read(from, window_len);
    let from_usize = usize::try_from(from).expect("fits");
    let expected_window = &expected[from_usize..from_usize + window_len];
    assert_same(expected_window, &back, from, "zeroed range and neighbours");
    q.flush();
    assert_same(
        &expected,
        &image.read_host(0, expected.len()),
        0,
        "image file",
    );
    daemon.assert_running();
}

#[test]
fn discarded_range_reads_back_as_zeros_and_neighbours_are_untouched() {
    zeroing_leaves_neighbours_intact(Daemon::start_with, |q, offset, len| {
        q.discard(offset, len);
    });
}

#[test]
fn write_zeroes_with_unmap_reads_back_as_zeros_and_neighbours_are_untouched() {
    zeroing_leaves_neighbours_intact(Daemon::start_with, |q, offset, len| {
        q.write_zeroes(offset, len, true);
    });
}

#[test]
fn write_zeroes_without_unmap_reads_back_as_zeros_and_neighbours_are_untouched() {
    zeroing_leaves_neighbours_intact(Daemon::start_with, |q, offset, len| {
        q.write_zeroes(offset, len, false);
    });
}

#[test]
fn sector_granular_write_zeroes_zero_exactly_their_sectors() {
    let (image, mut expected) = Image::with_random_contents(MIB, 0x5ec7);
    let daemon = Daemon::start(&image);
    let mut client = daemon.connect(1);
    let q = client.queue(0);
    // Ranges that start and end inside a 4 KiB block.
    q.write_zeroes(3 * SECTOR, 3 * SECTOR, false);
    q.write_zeroes(17 * SECTOR, 5 * SECTOR, true);
    expected[3 * 512..6 * 512].fill(0);
    expected[17 * 512..22 * 512].fill(0);
    let back = q.read(0, 32 << 10);
    assert_same(
        &expected[..32 << 10],
        &back,
        0,
        "sector-granular write-zeroes",
    );
}

#[test]
fn unaligned_discard_leaves_neighbouring_sectors_intact() {
    let (image, contents) = Image::with_random_contents(MIB, 0xd1d1);
    let daemon = Daemon::start(&image);
    let mut client = daemon.connect(1);
    let q = client.queue(0);
    // Smaller than and straddling the 4 KiB blocks a device is likely to deallocate in. A
    // discard is a hint, so each discarded sector may keep its data or read as zeros; the
    // sectors around it must keep theirs.
    let (first, count) = (7, 11);
    q.discard(first * SECTOR, count * SECTOR);
    let back = q.read(0, 32 << 10);
    for (sector, (old, new)) in (0u64..).zip(contents.chunks(512).zip(back.chunks(512))) {
        if (first..first + count).contains(&sector) {
            assert!(
                new == old || new.iter().all(|&b| b == 0),
                "discarded sector {sector} holds neither its data nor zeros"
            );
        } else {
            assert_same(old, new, sector * SECTOR, "sector next to a discard");
        }
    }
}

#[test]
fn small_ring_with_a_deep_backlog_completes_every_request() {
    let image = Image::new(4 * MIB);
    let daemon = Daemon::start(&image);
    let mut options = ClientOptions::queues(1);
    options.queue_size = Some(8);
    let mut client = daemon.connect_with(&options);
    let q = client.queue(0);
    let mut rng = Rng::new(8);
    // 200 writes against an 8-entry ring: libblkio keeps most of them in its backlog and
    // refills the ring as completions arrive.
    let blocks: Vec<Vec<u8>> = (0..200).map(|_| rng.bytes(4096)).collect();
    for (i, block) in (0u64..).zip(&blocks) {
        q.submit_write(i * 4096, block);
    }
    for (tag, done) in q.wait_all().iter().enumerate() {
        assert_eq!(done.ret, 0, "write {tag} failed");
    }
    let expected = blocks.concat();
    let back = workload::read_back(q, 0, expected.len(), 4096);
    assert_same(&expected, &back, 0, "read-back through the small ring");
}

#[test]
fn ring_indices_wrap_past_u16_max_without_losing_requests() {
    let image = Image::new(MIB);
    let daemon = Daemon::start(&image);
    let mut client = daemon.connect(1);
    let q = client.queue(0);
    q.write(0, &[0x77; 4096]);
    // The avail and used indices are free-running u16 counters; push them past 65535.
    let total = 70_000;
    let batch = 100;
    for first in (0..total).step_by(batch) {
        for i in first..first + batch {
            let offset = u64::try_from(i % 8).expect("fits") * SECTOR;
            q.submit_read(offset, 512);
        }
        for (i, done) in q.wait_all().iter().enumerate() {
            assert_eq!(done.ret, 0, "read {} failed", first + i);
            assert_eq!(
                done.data,
                [0x77; 512],
                "read {} returned wrong data",
                first + i
            );
        }
    }
}

common::per_poll_mode! {
    /// vubd with its pollers in this module's mode.
    fn start(image: &Image, config: &DaemonConfig) -> Daemon {
        Daemon::vubd_polling(POLL, image, config)
    }

    // A smaller image than the default-mode tests use, to keep the four modes fast.
    #[test]
    fn random_io_on_one_queue_reads_back_and_reaches_image_file() {
        random_io_verifies(2 * MIB, 1, 0x5eed_0101, start);
    }

    #[test]
    fn random_io_on_four_concurrent_queues_reads_back_and_reaches_image_file() {
        random_io_verifies(2 * MIB, 4, 0x5eed_0104, start);
    }

    #[test]
    fn flushes_complete_successfully() {
        let image = Image::new(MIB);
        let mut daemon = start(&image, &DaemonConfig::default());
        flushes_complete_alone_and_among_writes(&image, &mut daemon);
    }

    #[test]
    fn discarded_range_reads_back_as_zeros_and_neighbours_are_untouched() {
        zeroing_leaves_neighbours_intact(start, |q, offset, len| q.discard(offset, len));
    }

    #[test]
    fn write_zeroes_with_unmap_reads_back_as_zeros_and_neighbours_are_untouched() {
        zeroing_leaves_neighbours_intact(start, |q, offset, len| {
            q.write_zeroes(offset, len, true);
        });
    }

    #[test]
    fn write_zeroes_without_unmap_reads_back_as_zeros_and_neighbours_are_untouched() {
        zeroing_leaves_neighbours_intact(start, |q, offset, len| {
            q.write_zeroes(offset, len, false);
        });
    }
}
