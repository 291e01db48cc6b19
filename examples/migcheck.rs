//! The guest side of `tests/migration_lab.rs`: a self-checking O_DIRECT workload on a block
//! device that runs until told to stop, built so that a page of guest memory that the disk's
//! backend wrote and a live migration did not copy is found.
//!
//! ```sh
//! migcheck --device /dev/vda --blocks 2048 --block-size 16k --threads 2 --slots 256 \
//!     --stop-file /tmp/migcheck.stop
//! ```
//!
//! Each thread (pinned to a CPU of its own when there are enough, so that every request queue
//! of the device carries I/O) owns the blocks `b` with `b % threads == thread`. It first writes
//! all of them (generation 1; the contents are `examples/migcheck/pattern.rs`), then, in a
//! loop, reads random blocks of its own with O_DIRECT into a pool of `--slots` page-aligned
//! buffers, one after the other, and writes random blocks of its own with the next
//! generation:
//!
//! - every read is checked whole as soon as it completes;
//! - after each pass over the pool, every buffer is checked again against what its last read
//!   brought ("hold check", the page headers). The processor never writes these buffers: the
//!   backend's reads put data there behind the guest's back, and only the dirty log the
//!   backend keeps tells a migration to copy those pages again. A page the migration copied
//!   before a read filled it, and never again, holds its previous contents on the destination,
//!   and every read brings other contents than the buffer's previous one (another block, or
//!   a newer generation), so that page is seen. No poison is written before a read: that would
//!   make the page dirty through the processor and hide the backend's missing mark.
//!
//! When `--stop-file` exists, the threads finish their pass (and its hold check); then every
//! block is read back and checked, the device is flushed, and the last line is
//! `MIGCHECK-DONE ... digest=0x...`: a digest of every block's last generation, which the host
//! recomputes from the disk image. Every failure prints a `MIGCHECK-FAIL` line (the first
//! [`MAX_DETAILS`] in detail) and the exit status is 1; `MIGCHECK-PROGRESS` lines come every
//! `--report-ms`.

#[path = "common/aligned.rs"]
mod aligned;
#[path = "migcheck/pattern.rs"]
mod pattern;
#[path = "../tests/common/rng.rs"]
mod rng;

use aligned::Aligned;
use rng::Rng;

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use clap::Parser;
use pattern::{PAGE, first_bad_page, header, stale_pages};

/// Failure lines printed in full; the others are only counted.
const MAX_DETAILS: u64 = 24;

/// Self-checking O_DIRECT read/write workload that finds pages a migration lost.
#[derive(Clone, Debug, Parser)]
#[command(name = "migcheck")]
struct Args {
    /// The block device.
    #[arg(long, value_name = "PATH", default_value = "/dev/vda")]
    device: PathBuf,
    /// Blocks used, from the start of the device.
    #[arg(long, value_name = "N", default_value_t = 2048)]
    blocks: u64,
    /// Bytes per block and per request (k, m: powers of 1024; a multiple of 4 KiB).
    #[arg(long, value_name = "BYTES", value_parser = parse_size, default_value = "16k")]
    block_size: u64,
    /// Threads, each with its own blocks and buffers.
    #[arg(long, value_name = "N", default_value_t = 2)]
    threads: u64,
    /// Read buffers per thread.
    #[arg(long, value_name = "N", default_value_t = 256)]
    slots: usize,
    /// Seed of the random choices.
    #[arg(long, value_name = "N", default_value_t = 1)]
    seed: u64,
    /// Stop once this file exists.
    #[arg(long, value_name = "PATH", default_value = "/tmp/migcheck.stop")]
    stop_file: PathBuf,
    /// Milliseconds between progress lines.
    #[arg(long, value_name = "MS", default_value_t = 1000)]
    report_ms: u64,
}

/// `4096`, `16k`, `1m`: k and m are powers of 1024.
fn parse_size(s: &str) -> Result<u64, String> {
    let (num, shift) = match s.chars().last().map(|c| c.to_ascii_lowercase()) {
        Some('k') => (&s[..s.len() - 1], 10),
        Some('m') => (&s[..s.len() - 1], 20),
        _ => (s, 0),
    };
    let n: u64 = num.parse().map_err(|_| format!("{s:?}: not a size"))?;
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("{s:?}: too large"))
}

/// Counters shared by the threads.
#[derive(Debug, Default)]
struct Shared {
    stop: AtomicBool,
    reads: AtomicU64,
    writes: AtomicU64,
    cycles: AtomicU64,
    failures: AtomicU64,
}

impl Shared {
    /// Counts a failure and prints `line` unless [`MAX_DETAILS`] were printed already.
    fn fail(&self, line: impl FnOnce() -> String) {
        if self.failures.fetch_add(1, Ordering::Relaxed) < MAX_DETAILS {
            println!("MIGCHECK-FAIL {}", line());
        }
    }
}

fn describe(page: &[u8]) -> String {
    match header(page) {
        Some(h) => format!("found {h}"),
        None => "found no header".to_owned(),
    }
}

fn to_usize(n: u64) -> usize {
    usize::try_from(n).expect("u64 fits usize")
}

fn to_u64(n: usize) -> u64 {
    u64::try_from(n).expect("usize fits u64")
}

/// One thread's blocks, generations and read buffers.
struct Worker {
    id: u64,
    threads: u64,
    block_size: u64,
    device: Arc<File>,
    shared: Arc<Shared>,
    /// The generation of each of this thread's blocks: block `i * threads + id` at `i`.
    generations: Vec<u64>,
    pool: Aligned,
    /// The block and generation each buffer of the pool holds (its last read).
    held: Vec<(u64, u64)>,
    write_buf: Aligned,
    rng: Rng,
}

impl Worker {
    fn block(&self, index: usize) -> u64 {
        to_u64(index) * self.threads + self.id
    }

    fn write(&mut self, index: usize) {
        let block = self.block(index);
        self.generations[index] += 1;
        let generation = self.generations[index];
        pattern::fill(self.write_buf.get_mut(), block, generation);
        if let Err(e) = self
            .device
            .write_all_at(self.write_buf.get(), block * self.block_size)
        {
            self.shared.fail(|| format!("io write block={block}: {e}"));
        }
    }

    /// Reads a random block of this thread into buffer `slot` and checks it.
    fn read(&mut self, slot: usize) {
        let index = to_usize(self.rng.below(to_u64(self.generations.len())));
        let block = self.block(index);
        let generation = self.generations[index];
        let bs = to_usize(self.block_size);
        let buf = &mut self.pool.get_mut()[slot * bs..(slot + 1) * bs];
        if let Err(e) = self.device.read_exact_at(buf, block * self.block_size) {
            self.shared.fail(|| format!("io read block={block}: {e}"));
        } else if let Some(p) = first_bad_page(buf, block, generation) {
            let (id, page) = (self.id, &buf[p * PAGE..(p + 1) * PAGE]);
            self.shared.fail(|| {
                format!(
                    "read thread={id} slot={slot} page={p} expected block={block} gen={generation} {}",
                    describe(page)
                )
            });
        }
        self.held[slot] = (block, generation);
    }

    /// Checks that every buffer of the pool still holds what its last read brought.
    fn hold_check(&self) {
        let bs = to_usize(self.block_size);
        let mut stale = 0u64;
        for (slot, &(block, generation)) in self.held.iter().enumerate() {
            let buf = &self.pool.get()[slot * bs..(slot + 1) * bs];
            for p in stale_pages(buf, block, generation) {
                stale += 1;
                let page = &buf[p * PAGE..(p + 1) * PAGE];
                self.shared.fail(|| {
                    format!(
                        "hold thread={} slot={slot} page={p} expected block={block} gen={generation} {}",
                        self.id,
                        describe(page)
                    )
                });
            }
        }
        if stale > 0 {
            let pages = self.held.len() * bs / PAGE;
            println!(
                "MIGCHECK-FAIL hold thread={} stale_pages={stale} of {pages}",
                self.id
            );
        }
    }

    fn run(mut self, ready: &Barrier) -> Vec<u64> {
        for index in 0..self.generations.len() {
            self.write(index);
        }
        for slot in 0..self.held.len() {
            self.read(slot);
        }
        ready.wait();
        while !self.shared.stop.load(Ordering::Relaxed) {
            for slot in 0..self.held.len() {
                if self.shared.stop.load(Ordering::Relaxed) {
                    break;
                }
                if self.rng.below(3) == 0 {
                    let index = to_usize(self.rng.below(to_u64(self.generations.len())));
                    self.write(index);
                    self.shared.writes.fetch_add(1, Ordering::Relaxed);
                }
                self.read(slot);
                self.shared.reads.fetch_add(1, Ordering::Relaxed);
            }
            self.hold_check();
            self.shared.cycles.fetch_add(1, Ordering::Relaxed);
        }
        self.generations
    }
}

/// Pins the calling thread to `cpu`.
fn pin(cpu: usize) {
    // SAFETY: cpu_set_t is plain data, for which all zeros is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a live cpu_set_t and the callers pass a CPU below the online count,
    // far below cpu_set_t's 1024.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: sched_setaffinity reads `size_of::<cpu_set_t>()` bytes of `set`, a live local.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if rc != 0 {
        println!(
            "migcheck: cannot pin to CPU {cpu}: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// Reads every block back and checks it against its last generation; returns how many did
/// not hold it.
fn final_check(device: &File, block_size: u64, generations: &[u64], shared: &Shared) -> u64 {
    let mut buf = Aligned::new(to_usize(block_size), PAGE);
    let mut bad = 0;
    for (block, &generation) in (0u64..).zip(generations) {
        let buf = buf.get_mut();
        if let Err(e) = device.read_exact_at(buf, block * block_size) {
            bad += 1;
            shared.fail(|| format!("io final read block={block}: {e}"));
        } else if let Some(p) = first_bad_page(buf, block, generation) {
            bad += 1;
            let page = &buf[p * PAGE..(p + 1) * PAGE];
            shared.fail(|| {
                format!(
                    "final block={block} page={p} expected gen={generation} {}",
                    describe(page)
                )
            });
        }
    }
    bad
}

fn main() -> ExitCode {
    let args = Args::parse();
    if args.block_size == 0 || args.block_size % to_u64(PAGE) != 0 || args.threads == 0 {
        eprintln!("migcheck: --block-size must be a multiple of {PAGE}, --threads at least 1");
        return ExitCode::from(2);
    }
    let device = match OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(&args.device)
    {
        Ok(f) => Arc::new(f),
        Err(e) => {
            println!("MIGCHECK-FAIL open {}: {e}", args.device.display());
            return ExitCode::FAILURE;
        }
    };
    let shared = Arc::new(Shared::default());
    let cpus = thread::available_parallelism().map_or(1, |n| n.get());
    let ready = Arc::new(Barrier::new(to_usize(args.threads) + 1));
    let started = Instant::now();
    let workers: Vec<_> = (0..args.threads)
        .map(|id| {
            let own = (args.blocks + args.threads - 1 - id) / args.threads;
            let worker = Worker {
                id,
                threads: args.threads,
                block_size: args.block_size,
                device: device.clone(),
                shared: shared.clone(),
                generations: vec![0; to_usize(own)],
                pool: Aligned::new(args.slots * to_usize(args.block_size), PAGE),
                held: vec![(0, 0); args.slots],
                write_buf: Aligned::new(to_usize(args.block_size), PAGE),
                rng: Rng::new(args.seed ^ (id << 32)),
            };
            let ready = ready.clone();
            thread::spawn(move || {
                if cpus >= 2 {
                    pin(to_usize(id) % cpus);
                }
                worker.run(&ready)
            })
        })
        .collect();
    ready.wait();
    println!(
        "MIGCHECK-RUNNING threads={} blocks={} block_size={} slots={} fill_ms={}",
        args.threads,
        args.blocks,
        args.block_size,
        args.slots,
        started.elapsed().as_millis()
    );

    let report = Duration::from_millis(args.report_ms);
    let mut last_report = Instant::now();
    while !args.stop_file.exists() {
        thread::sleep(Duration::from_millis(100));
        if last_report.elapsed() >= report {
            last_report = Instant::now();
            println!(
                "MIGCHECK-PROGRESS reads={} writes={} cycles={} failures={}",
                shared.reads.load(Ordering::Relaxed),
                shared.writes.load(Ordering::Relaxed),
                shared.cycles.load(Ordering::Relaxed),
                shared.failures.load(Ordering::Relaxed)
            );
        }
    }
    shared.stop.store(true, Ordering::Relaxed);

    let mut generations = vec![0; to_usize(args.blocks)];
    for (id, worker) in (0u64..).zip(workers) {
        let Ok(own) = worker.join() else {
            println!("MIGCHECK-FAIL thread {id} panicked");
            return ExitCode::FAILURE;
        };
        for (i, generation) in (0u64..).zip(own) {
            generations[to_usize(i * args.threads + id)] = generation;
        }
    }
    let bad = final_check(&device, args.block_size, &generations, &shared);
    if let Err(e) = device.sync_all() {
        shared.fail(|| format!("io flush: {e}"));
    }
    let failures = shared.failures.load(Ordering::Relaxed);
    let summary = format!(
        "blocks={} reads={} writes={} cycles={}",
        args.blocks,
        shared.reads.load(Ordering::Relaxed),
        shared.writes.load(Ordering::Relaxed),
        shared.cycles.load(Ordering::Relaxed)
    );
    if failures > 0 {
        println!("MIGCHECK-FAILED failures={failures} bad_blocks={bad} {summary}");
        return ExitCode::FAILURE;
    }
    let digest = pattern::digest((0u64..).zip(generations));
    println!("MIGCHECK-DONE {summary} digest={digest:#018x}");
    ExitCode::SUCCESS
}
