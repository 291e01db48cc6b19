//! A random, self-checking I/O workload for a connected [`Client`]: every queue drives its own
//! slice of the disk with rounds of disjoint reads and writes all in flight together, checked
//! against a shadow copy of the expected contents.
//!
//! Not a submodule of `common`: declare it next to `mod common;` in the test binaries that use
//! it (see `common/mod.rs`).

// Each test binary uses a different part of this module.
#![allow(dead_code)]

use std::thread;

use crate::common::client::{Client, Queue};
use crate::common::{Rng, assert_same};

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

/// Up to `count` pairwise-disjoint extents in `0..span`, each aligned (in offset and length) to
/// `block` or to 4096 bytes, half of them small (up to 8 units of alignment), the rest up to
/// `max_len`.
fn disjoint_extents(
    rng: &mut Rng,
    span: u64,
    count: usize,
    max_len: usize,
    block: usize,
) -> Vec<Extent> {
    let mut out: Vec<Extent> = Vec::with_capacity(count);
    for _ in 0..count * 8 {
        if out.len() == count {
            break;
        }
        let align: usize = if rng.below(2) == 0 {
            block
        } else {
            block.max(4096)
        };
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

/// Splits `len` (a multiple of `block`) into 1 to `max_segments` segments of whole blocks.
fn segment_lens(rng: &mut Rng, len: usize, max_segments: usize, block: usize) -> Vec<usize> {
    let blocks = len / block;
    let count = 1 + rng.below_usize(max_segments.min(blocks).max(1));
    let mut cuts: Vec<usize> = (1..count)
        .map(|_| 1 + rng.below_usize(blocks - 1))
        .collect();
    cuts.sort_unstable();
    cuts.dedup();
    let mut lens = Vec::with_capacity(cuts.len() + 1);
    let mut prev = 0;
    for cut in cuts.into_iter().chain([blocks]) {
        lens.push((cut - prev) * block);
        prev = cut;
    }
    lens
}

/// Reads `len` bytes at `base` through `queue`, in chunks that are all in flight at once.
pub fn read_back(queue: &mut Queue, base: u64, len: usize, chunk: usize) -> Vec<u8> {
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
    /// Every offset and length is a multiple of it: the device's logical block size.
    block: usize,
}

/// Drives one queue over its own disk area `[base, base + shadow.len())` with rounds of
/// disjoint reads and writes all in flight together, checking every read against `shadow`
/// (the expected contents), which it keeps up to date. Ends with a full read-back.
fn exercise_queue(queue: &mut Queue, base: u64, shadow: &mut [u8], work: Workload) {
    let span = u64::try_from(shadow.len()).expect("usize fits u64");
    let mut rng = Rng::new(work.seed);
    for round in 0..ROUNDS {
        let extents = disjoint_extents(&mut rng, span, IN_FLIGHT, work.max_request, work.block);
        let mut writes = Vec::new();
        let mut reads = Vec::new();
        for extent in extents {
            let lens = segment_lens(&mut rng, extent.len, work.max_segments, work.block);
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

/// Runs the random workload on every queue of `client` at once, each on its own slice of a
/// disk that starts all zero, aligned to the device's logical block size; then flushes and
/// reads the whole disk back through every queue. Returns the disk's expected contents.
pub fn random_io(client: &mut Client, seed: u64) -> Vec<u8> {
    let info = client.info();
    let work = Workload {
        seed,
        max_request: info.max_request(MAX_REQUEST),
        max_segments: info.max_segments.min(4),
        block: usize::try_from(info.block_size).expect("u32 fits usize"),
    };
    assert!(
        work.max_request >= 4096 && work.max_request % work.block == 0,
        "device limits requests to {} bytes (block size {})",
        work.max_request,
        work.block
    );

    let size = usize::try_from(info.capacity).expect("disk fits in memory");
    let num_queues = client.queues_mut().len();
    let span = size / num_queues;
    assert!(
        span % work.block.max(4096) == 0,
        "a {size}-byte disk does not split into {num_queues} aligned areas"
    );
    let mut expected = vec![0u8; size];
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
    expected
}
