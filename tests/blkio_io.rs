//! Data-path tests through a real vhost-user frontend (libblkio): what is written reads back,
//! lands in the image file, and survives many requests in flight on several queues at once.

mod common;

use std::thread;

use common::{Daemon, DaemonConfig, Image, Queue, Rng, SECTOR, assert_same};

const MIB: u64 = 1 << 20;

/// Requests in flight per queue in each round of the random workload.
const IN_FLIGHT: usize = 32;
const ROUNDS: usize = 8;
/// Largest request of the random workload (further capped by the device's limits).
const MAX_REQUEST: usize = 64 << 10;

/// A byte range of the disk, relative to the start of one queue's area.
#[derive(Debug, Clone, Copy)]
struct Extent {
    offset: u64,
    len: usize,
}

impl Extent {
    fn end(&self) -> u64 {
        self.offset + u64::try_from(self.len).expect("usize fits u64")
    }

    fn overlaps(&self, other: &Self) -> bool {
        self.offset < other.end() && other.offset < self.end()
    }

    fn range(&self) -> std::ops::Range<usize> {
        let start = usize::try_from(self.offset).expect("area fits in memory");
        start..start + self.len
    }
}

/// Up to `count` pairwise-disjoint extents in `0..span`, each aligned to 512 or 4096 bytes (in
/// offset and length), half of them small (up to 8 blocks), the rest up to `max_len`.
fn disjoint_extents(rng: &mut Rng, span: u64, count: usize, max_len: usize) -> Vec<Extent> {
    let mut out: Vec<Extent> = Vec::with_capacity(count);
    for _ in 0..count * 8 {
        if out.len() == count {
            break;
        }
        let align: usize = if rng.below(2) == 0 { 512 } else { 4096 };
        let max_blocks = (max_len / align).max(1);
        let blocks = if rng.below(2) == 0 {
            1 + rng.below_usize(max_blocks.min(8))
        } else {
            1 + rng.below_usize(max_blocks)
        };
        let len = blocks * align;
        let align64 = u64::try_from(align).expect("usize fits u64");
        let slots = (span - u64::try_from(len).expect("usize fits u64")) / align64;
        let extent = Extent {
            offset: rng.below(slots + 1) * align64,
            len,
        };
        if !out.iter().any(|e| e.overlaps(&extent)) {
            out.push(extent);
        }
    }
    out
}

/// Splits `len` (a multiple of 512) into 1 to `max_segments` segments of whole sectors.
fn segment_lens(rng: &mut Rng, len: usize, max_segments: usize) -> Vec<usize> {
    let sectors = len / 512;
    let count = 1 + rng.below_usize(max_segments.min(sectors).max(1));
    let mut cuts: Vec<usize> = (1..count)
        .map(|_| 1 + rng.below_usize(sectors - 1))
        .collect();
    cuts.sort_unstable();
    cuts.dedup();
    let mut lens = Vec::with_capacity(cuts.len() + 1);
    let mut prev = 0;
    for cut in cuts.into_iter().chain([sectors]) {
        lens.push((cut - prev) * 512);
        prev = cut;
    }
    lens
}

/// Reads `len` bytes at `base` through `queue`, in chunks that are all in flight at once.
fn read_back(queue: &mut Queue, base: u64, len: usize, chunk: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    let per_batch = (queue.buffer_len() / chunk).max(1);
    let chunks: Vec<(u64, usize)> = (0..len)
        .step_by(chunk)
        .map(|start| {
            let offset = base + u64::try_from(start).expect("usize fits u64");
            (offset, chunk.min(len - start))
        })
        .collect();
    for batch in chunks.chunks(per_batch) {
        for &(offset, len) in batch {
            queue.submit_read(offset, len);
        }
        for (done, &(offset, _)) in queue.wait_all().into_iter().zip(batch) {
            assert_eq!(done.ret, 0, "read-back at {offset} failed: {}", done.ret);
            out.extend_from_slice(&done.data);
        }
    }
    out
}

#[derive(Debug, Clone, Copy)]
struct Workload {
    seed: u64,
    max_request: usize,
    max_segments: usize,
}

/// Drives one queue over its own disk area `[base, base + shadow.len())` with rounds of
/// disjoint reads and writes all in flight together, checking every read against `shadow`
/// (the expected contents), which it keeps up to date. Ends with a full read-back.
fn exercise_queue(queue: &mut Queue, base: u64, shadow: &mut [u8], work: Workload) {
    let span = u64::try_from(shadow.len()).expect("usize fits u64");
    let mut rng = Rng::new(work.seed);
    for round in 0..ROUNDS {
        let extents = disjoint_extents(&mut rng, span, IN_FLIGHT, work.max_request);
        let mut writes = Vec::new();
        let mut reads = Vec::new();
        for extent in extents {
            let lens = segment_lens(&mut rng, extent.len, work.max_segments);
            if rng.below(3) == 0 {
                let tag = queue.submit_readv(base + extent.offset, &lens);
                reads.push((tag, extent));
            } else {
                let data = rng.bytes(extent.len);
                let mut segments = Vec::with_capacity(lens.len());
                let mut rest = data.as_slice();
                for len in lens {
                    let (head, tail) = rest.split_at(len);
                    segments.push(head);
                    rest = tail;
                }
                let tag = queue.submit_writev(base + extent.offset, &segments);
                writes.push((tag, extent, data));
            }
        }
        let done = queue.wait_all();
        for (tag, extent) in reads {
            let offset = base + extent.offset;
            assert_eq!(
                done[tag].ret, 0,
                "seed {:#x} round {round}: read of {} at {offset} failed",
                work.seed, extent.len
            );
            let what = format!("seed {:#x} round {round}: read at {offset}", work.seed);
            assert_same(&shadow[extent.range()], &done[tag].data, offset, &what);
        }
        for (tag, extent, data) in writes {
            assert_eq!(
                done[tag].ret,
                0,
                "seed {:#x} round {round}: write of {} at {} failed",
                work.seed,
                extent.len,
                base + extent.offset
            );
            shadow[extent.range()].copy_from_slice(&data);
        }
    }
    let back = read_back(queue, base, shadow.len(), 64 << 10);
    let what = format!("seed {:#x}: read-back", work.seed);
    assert_same(shadow, &back, base, &what);
}

/// Runs the random workload on `num_queues` queues at once, each on its own slice of a 16 MiB
/// image served by the daemon `start` returns, then checks the whole image through the
/// frontend and on the host.
fn random_io_verifies(
    num_queues: u16,
    seed: u64,
    start: impl FnOnce(&Image, &DaemonConfig) -> Daemon,
) {
    let size = 16 * MIB;
    let image = Image::new(size);
    let config = DaemonConfig {
        num_queues: Some(num_queues),
        ..DaemonConfig::default()
    };
    let mut daemon = start(&image, &config);
    let mut client = daemon.connect(usize::from(num_queues));
    let info = client.info();
    assert_eq!(info.capacity, size, "capacity seen by the frontend");
    let work = Workload {
        seed,
        max_request: info.max_request(MAX_REQUEST),
        max_segments: info.max_segments.min(4),
    };
    assert!(
        work.max_request >= 4096,
        "device limits requests to {} bytes",
        work.max_request
    );

    let span = usize::try_from(size).expect("image fits in memory") / usize::from(num_queues);
    let mut expected = vec![0u8; usize::try_from(size).expect("image fits in memory")];
    thread::scope(|s| {
        let areas = expected.chunks_mut(span);
        for (i, (queue, shadow)) in client.queues_mut().iter_mut().zip(areas).enumerate() {
            let base = u64::try_from(i * span).expect("usize fits u64");
            let work = Workload {
                seed: work.seed ^ u64::try_from(i).expect("usize fits u64") << 32,
                ..work
            };
            s.spawn(move || exercise_queue(queue, base, shadow, work));
        }
    });

    client.queue(0).flush();
    // Every queue reads the whole disk, not just its own area.
    for queue in client.queues_mut() {
        let back = read_back(queue, 0, expected.len(), 128 << 10);
        assert_same(&expected, &back, 0, "whole-disk read-back");
    }
    let on_host = image.read_host(0, expected.len());
    assert_same(&expected, &on_host, 0, "image file on the host");
    daemon.assert_running();
}

#[test]
fn random_io_on_one_queue_reads_back_and_reaches_image_file() {
    random_io_verifies(1, 0x5eed_0001, Daemon::start_with);
}

#[test]
fn random_io_on_four_concurrent_queues_reads_back_and_reaches_image_file() {
    random_io_verifies(4, 0x5eed_0004, Daemon::start_with);
}

#[test]
fn random_io_with_writeback_cache_reads_back_and_reaches_image_file() {
    // A vubd option: runs vubd whatever VUBD_TEST_BACKEND says.
    random_io_verifies(2, 0x5eed_00cb, |image, config| {
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
            let raw = common::RawFrontend::connect(&socket, common::raw_features_without_ro())
                .expect("raw connect");
            raw.has_feature(virtio_driver::VirtioBlkFeatureFlags::FLUSH)
        }
    });
    // Without VIRTIO_BLK_F_FLUSH libblkio would complete a flush without sending it.
    assert!(offers_flush, "device does not offer VIRTIO_BLK_F_FLUSH");

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

/// Fills a 1 MiB image with random data, zeroes `[offset, offset + len)` with `zero`, and
/// checks that exactly that range reads back as zeros, through the frontend and on the host.
fn zeroing_leaves_neighbours_intact(zero: impl FnOnce(&mut Queue, u64, u64)) {
    let (image, mut expected) = Image::with_random_contents(MIB, 0xd15c);
    let mut daemon = Daemon::start(&image);
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
    zeroing_leaves_neighbours_intact(|q, offset, len| q.discard(offset, len));
}

#[test]
fn write_zeroes_with_unmap_reads_back_as_zeros_and_neighbours_are_untouched() {
    zeroing_leaves_neighbours_intact(|q, offset, len| q.write_zeroes(offset, len, true));
}

#[test]
fn write_zeroes_without_unmap_reads_back_as_zeros_and_neighbours_are_untouched() {
    zeroing_leaves_neighbours_intact(|q, offset, len| q.write_zeroes(offset, len, false));
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
    let mut options = common::ClientOptions::queues(1);
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
    let back = read_back(q, 0, expected.len(), 4096);
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
