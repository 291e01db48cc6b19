//! vubd's null disk (`--disk null:SIZE`): the frontend sees the size given and 512-byte
//! blocks; every request in range completes successfully at once and touches no data (a read
//! leaves the guest's buffer as it was); requests out of range still fail. On one and four
//! queues, in every poll mode. These always run vubd, whatever `VUBD_TEST_BACKEND` says.

mod common;
#[path = "common/raw.rs"]
mod raw;

use std::thread;

use common::client::{Done, Queue};
use common::daemon::{Daemon, DaemonConfig, PollMode};
use common::{Rng, SECTOR, assert_same, describe_ret};
use raw::RawFrontend;
use virtio_driver::VirtioBlkFeatureFlags;

const MIB: u64 = 1 << 20;

/// The virtio-blk status `VIRTIO_BLK_S_IOERR`, as libblkio reports it.
const IOERR: i32 = -libc::EIO;
/// The virtio-blk status `VIRTIO_BLK_S_UNSUPP`, as libblkio reports it.
const UNSUPP: i32 = -libc::ENOTSUP;

/// What the raw configuration space and feature bits of a device say.
#[derive(Debug, PartialEq, Eq)]
struct RawView {
    capacity_sectors: u64,
    blk_size: Option<u32>,
    flush: bool,
    discard: bool,
    write_zeroes: bool,
}

fn raw_view(daemon: &Daemon) -> RawView {
    let socket = daemon.socket().to_owned();
    common::bounded("raw config", move || {
        let raw = RawFrontend::connect(&socket, raw::features_without_ro()).expect("raw connect");
        let config = raw.config().expect("GET_CONFIG");
        RawView {
            capacity_sectors: config.capacity.to_native(),
            blk_size: raw
                .has_feature(VirtioBlkFeatureFlags::BLK_SIZE)
                .then(|| config.blk_size.to_native()),
            flush: raw.has_feature(VirtioBlkFeatureFlags::FLUSH),
            discard: raw.has_feature(VirtioBlkFeatureFlags::DISCARD),
            write_zeroes: raw.has_feature(VirtioBlkFeatureFlags::WRITE_ZEROES),
        }
    })
}

#[test]
fn null_disk_has_the_size_given_and_512_byte_blocks() {
    // 2 TiB is 2^32 sectors: a capacity truncated to 32 bits would be 0.
    let sizes: [(&str, u64); 5] = [
        ("4k", 4096),
        ("1536", 3 * SECTOR),
        ("512M", 512 * MIB),
        ("16G", 16 << 30),
        ("2T", 2 << 40),
    ];
    for (arg, size) in sizes {
        let mut daemon = Daemon::vubd_null(arg, &DaemonConfig::default());
        let view = raw_view(&daemon);
        let expected = RawView {
            capacity_sectors: size / SECTOR,
            blk_size: Some(512),
            flush: true,
            discard: true,
            write_zeroes: true,
        };
        assert_eq!(
            view, expected,
            "null:{arg}: configuration space and features"
        );

        let mut client = daemon.connect(1);
        assert_eq!(
            client.capacity(),
            size,
            "null:{arg}: capacity seen by libblkio"
        );
        assert_eq!(client.block_size(), 512, "null:{arg}: block size");
        let q = client.queue(0);
        let last = size - SECTOR;
        let marker = [0x3c; 512];
        let back = q.try_read_over(last, &marker);
        assert_eq!(back.as_deref(), Ok(&marker[..]), "null:{arg}: last sector");
        assert_eq!(q.try_write(last, &[0xc3; 512]), Ok(()), "null:{arg}: write");
        assert_eq!(
            q.try_read_over(size, &marker),
            Err(IOERR),
            "null:{arg}: first sector past the end"
        );
        drop(client);
        daemon.assert_running();
    }
}

/// One request of a random batch on the null disk.
#[derive(Debug)]
enum Op {
    /// A read into buffers that held `prefill`.
    Read {
        offset: u64,
        prefill: Vec<u8>,
    },
    Write {
        offset: u64,
        len: usize,
    },
    Flush,
    Discard {
        offset: u64,
        len: u64,
    },
    WriteZeroes {
        offset: u64,
        len: u64,
        unmap: bool,
    },
}

const ROUNDS: usize = 4;
const IN_FLIGHT: usize = 48;

/// Sends rounds of random requests on one queue, all of a round in flight together, over
/// `[0, span)`: every one must complete successfully, and every read must leave its buffers
/// as they were, even where earlier writes went.
fn exercise_queue(q: &mut Queue, span: u64, max_segments: usize, seed: u64) {
    let mut rng = Rng::new(seed);
    for round in 0..ROUNDS {
        let mut ops = Vec::with_capacity(IN_FLIGHT);
        for _ in 0..IN_FLIGHT {
            let sectors = 1 + rng.below(64);
            let len = sectors * SECTOR;
            let offset = rng.below(span / SECTOR - sectors + 1) * SECTOR;
            let len_usize = usize::try_from(len).expect("fits");
            let op = match rng.below(6) {
                0 | 1 => Op::Read {
                    offset,
                    prefill: rng.bytes(len_usize),
                },
                2 => Op::Write {
                    offset,
                    len: len_usize,
                },
                3 => Op::Flush,
                4 => Op::Discard { offset, len },
                _ => Op::WriteZeroes {
                    offset,
                    len,
                    unmap: rng.below(2) == 0,
                },
            };
            match &op {
                Op::Read { offset, prefill } => {
                    // Split over up to `max_segments` descriptors at sector boundaries.
                    let count = 1 + rng.below_usize(max_segments.min(prefill.len() / 512));
                    let cut = prefill.len() / 512 / count * 512;
                    let mut segments: Vec<&[u8]> =
                        prefill[..cut * (count - 1)].chunks(cut.max(1)).collect();
                    segments.push(&prefill[cut * (count - 1)..]);
                    q.submit_readv_over(*offset, &segments);
                }
                Op::Write { offset, len } => {
                    q.submit_write(*offset, &rng.bytes(*len));
                }
                Op::Flush => {
                    q.submit_flush();
                }
                Op::Discard { offset, len } => {
                    q.submit_discard(*offset, *len);
                }
                Op::WriteZeroes { offset, len, unmap } => {
                    q.submit_write_zeroes(*offset, *len, *unmap);
                }
            }
            ops.push(op);
        }
        let done: Vec<Done> = q.wait_all();
        for (tag, (op, done)) in ops.iter().zip(&done).enumerate() {
            let what = format!("seed {seed:#x} round {round} request {tag}: {op:?}");
            assert_eq!(done.ret, 0, "{what}: {}", describe_ret(done.ret));
            if let Op::Read { offset, prefill } = op {
                assert_same(prefill, &done.data, *offset, &what);
            }
        }
    }
}

/// Serves a 16 MiB null disk with `num_queues` queues, pollers in `poll`, and drives every
/// queue at once with random batches; then checks that out-of-range requests still fail and
/// that the daemon keeps serving.
fn null_disk_completes_everything_and_touches_nothing(poll: PollMode, num_queues: u16) {
    let size = 16 * MIB;
    let config = DaemonConfig {
        num_queues: Some(num_queues),
        poll: Some(poll),
        ..DaemonConfig::default()
    };
    let mut daemon = Daemon::vubd_null("16M", &config);
    let mut client = daemon.connect(usize::from(num_queues));
    assert_eq!(client.capacity(), size, "capacity");
    let max_segments = client.info().max_segments.min(4);
    thread::scope(|s| {
        for (i, q) in (0u64..).zip(client.queues_mut()) {
            s.spawn(move || exercise_queue(q, size, max_segments, 0x2e11 ^ i << 32));
        }
    });

    for (i, q) in client.queues_mut().iter_mut().enumerate() {
        let what = |op: &str| format!("queue {i}: {op} past the end");
        assert_eq!(
            q.try_read_over(size, &[7; 512]),
            Err(IOERR),
            "{}",
            what("read")
        );
        let straddling = q.try_read_over(size - 512, &[7; 1024]);
        assert_eq!(straddling, Err(IOERR), "{}", what("straddling read"));
        assert_eq!(
            q.try_write(size, &[7; 512]),
            Err(IOERR),
            "{}",
            what("write")
        );
        let discard = q.try_discard(size - 4096, 8192);
        assert!(
            matches!(discard, Err(IOERR | UNSUPP)),
            "{}: {discard:?}",
            what("discard")
        );
        let zeroes = q.try_write_zeroes(size, 4096, false);
        assert!(
            matches!(zeroes, Err(IOERR | UNSUPP)),
            "{}: {zeroes:?}",
            what("write-zeroes")
        );
        let after = q.try_read_over(0, &[9; 4096]);
        assert_eq!(
            after.as_deref(),
            Ok(&[9; 4096][..]),
            "queue {i}: read after"
        );
    }
    drop(client);
    let mut client = daemon.connect(1);
    let again = client.queue(0).try_read_over(MIB, &[5; 4096]);
    assert_eq!(again.as_deref(), Ok(&[5; 4096][..]), "next connection");
    daemon.assert_running();
}

common::per_poll_mode! {
    #[test]
    fn null_disk_on_one_queue_completes_every_request_and_touches_no_data() {
        null_disk_completes_everything_and_touches_nothing(POLL, 1);
    }

    #[test]
    fn null_disk_on_four_queues_completes_every_request_and_touches_no_data() {
        null_disk_completes_everything_and_touches_nothing(POLL, 4);
    }
}
