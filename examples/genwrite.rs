//! Concurrent O_DIRECT writers on a block device, each in a region of its own, writing
//! generation-stamped blocks (`examples/genwrite/block.rs`) and reading each one back, for a
//! guest whose disk's back end is killed and restarted under it (`tests/restart_lab.rs`).
//!
//! ```sh
//! genwrite --device /dev/vda --writers 16 --region-blocks 64 --seed 7 --stop-on-stdin
//! ```
//!
//! Writer `i` owns blocks `i * region_blocks ..` of the device (after `--offset`), runs on CPU
//! `i mod ncpus` (so that with several queues every queue carries writes), and keeps one
//! request in flight: it picks a random run of 1 to `--max-extent` blocks of its region,
//! writes its next generation there in one request (requests of mixed sizes complete out of
//! order on most back ends), and reads the run back, which must hold exactly that generation.
//! It records for every block the last generation the device acknowledged and the generations
//! submitted after that one (writes in flight, or that failed): those may have landed or not.
//!
//! Writing stops after `--max-seconds`, or when a line `stop` arrives on stdin
//! (`--stop-on-stdin`). Then every writer finishes its last write and the regions are read
//! again: each block must hold its last acknowledged generation or one submitted after it.
//! Anything else is a failure:
//!
//! - **lost**: an older generation than the last acknowledged one (an acknowledged write is
//!   gone, or an older write was carried out again after a newer one completed, as a request
//!   the back end executed twice would);
//! - **unexpected**: a newer generation that was never submitted;
//! - **misplaced**: a whole block of another place; **corrupt**: neither a whole block nor
//!   zeros (a torn write); **unreadable**: the read failed.
//!
//! A read or write that does not complete within `--hang-seconds` is a hang, reported once by a
//! watchdog thread; so is every error the device returns (`EIO`, a short transfer) and every
//! read-back that does not hold what was just written.
//!
//! Output, one `TAG key=value ...` line each, on stdout:
//!
//! - `GENWRITE-START ...` the settings; `GENWRITE-RUNNING writers=N` once every writer has had
//!   a write acknowledged; `GENWRITE-PROGRESS t=S writes=N acked=N errors=N hangs=N` every
//!   10 s; `GENWRITE-STOP t=S why=stdin|time`;
//! - `GENWRITE-ERROR writer=W op=write|readback block=B blocks=N gen=G ...` (the first
//!   `--errors-shown` of each writer), `GENWRITE-HANG writer=W|verify op=... block=B blocks=N
//!   gen=G age_s=S`;
//! - after the final read: `GENWRITE-REGION id=R gens=G0,G1,...` (what each block holds: its
//!   generation, `0` for zeros, `x` for anything else, `?` when it could not be read),
//!   `GENWRITE-BAD kind=... region=R block=B found=F acked=A pending=P1/P2` (the first 32);
//! - last: `GENWRITE-RESULT verdict=PASS|FAIL writes=N acked=N errors=N mismatches=N hangs=N
//!   lost=N unexpected=N misplaced=N corrupt=N unreadable=N`.
//!
//! The lines from the final read on are the report; `--report FILE` writes them to FILE
//! instead (under another name, renamed to FILE once whole), for a caller that cannot wait for
//! this process (a thread stuck in a write that never completes keeps it from exiting) or whose
//! console the kernel's messages would cut into. Exit status 0 on PASS, 1 on FAIL, 2 on bad
//! usage.

#[path = "common/aligned.rs"]
mod aligned;
#[path = "genwrite/block.rs"]
mod block;
#[path = "../tests/common/rng.rs"]
mod rng;

use aligned::Aligned;
use rng::Rng;

use std::fs::{File, OpenOptions};
use std::io::{self, BufRead};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use clap::Parser;

/// Buffers start on this boundary, enough for O_DIRECT on any logical block size up to it.
const BUF_ALIGN: usize = 4096;
/// How many bad blocks are listed one by one.
const BAD_SHOWN: usize = 32;
/// Pause after a failed operation, so that a device that fails everything is not hammered.
const ERROR_PAUSE: Duration = Duration::from_millis(200);

/// Generation-stamped O_DIRECT writers that check every write, watch for hangs, and verify
/// their regions at the end.
#[derive(Clone, Debug, Parser)]
#[command(name = "genwrite")]
struct Args {
    /// The block device (or file) to write.
    #[arg(long, value_name = "PATH")]
    device: PathBuf,
    /// Writer threads, one region each.
    #[arg(long, value_name = "N", default_value_t = 16)]
    writers: u32,
    /// Blocks per region.
    #[arg(long, value_name = "N", default_value_t = 64)]
    region_blocks: u32,
    /// Bytes per block (a multiple of 512, at most 1 MiB).
    #[arg(long, value_name = "BYTES", default_value_t = 4096)]
    block_size: usize,
    /// Each write covers a random run of 1 to this many blocks (one request).
    #[arg(long, value_name = "N", default_value_t = 1)]
    max_extent: u32,
    /// Byte offset of the first region on the device (a multiple of the block size).
    #[arg(long, value_name = "BYTES", default_value_t = 0)]
    offset: u64,
    /// Seed of the block choices and the data (0x-prefixed hex or decimal).
    #[arg(long, value_name = "X", value_parser = parse_u64, default_value = "1")]
    seed: u64,
    /// Longest the writing may last.
    #[arg(long, value_name = "S", default_value_t = 600)]
    max_seconds: u64,
    /// Stop writing when a line `stop` arrives on stdin.
    #[arg(long)]
    stop_on_stdin: bool,
    /// An operation not completed after this long is a hang.
    #[arg(long, value_name = "S", default_value_t = 60)]
    hang_seconds: u64,
    /// Errors printed one by one per writer (all are counted).
    #[arg(long, value_name = "N", default_value_t = 3)]
    errors_shown: u64,
    /// Write the report (the final read's lines and the result line) to this file, whole,
    /// instead of stdout.
    #[arg(long, value_name = "PATH")]
    report: Option<PathBuf>,
}

fn parse_u64(s: &str) -> Result<u64, String> {
    let parsed = match s.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => s.parse(),
    };
    parsed.map_err(|e| format!("{s:?}: {e}"))
}

/// What a thread is doing, for the watchdog.
#[derive(Debug, Default)]
struct Watch {
    /// Milliseconds since the start when the current operation began; 0: none.
    since_ms: AtomicU64,
    /// Counts operations; the watchdog reports each hung one once.
    seq: AtomicU64,
    reported: AtomicU64,
    /// Operation ([`OP_NAMES`]) << 48 | blocks << 32 | first block.
    what: AtomicU64,
    generation: AtomicU64,
}

const OP_WRITE: u64 = 0;
const OP_READ: u64 = 1;
const OP_READBACK: u64 = 2;
const OP_NAMES: [&str; 3] = ["write", "read", "readback"];

impl Watch {
    fn begin(&self, clock: &Clock, op: u64, block: u32, blocks: u32, generation: u64) {
        let what = op << 48 | u64::from(blocks) << 32 | u64::from(block);
        self.what.store(what, Ordering::SeqCst);
        self.generation.store(generation, Ordering::SeqCst);
        self.seq.fetch_add(1, Ordering::SeqCst);
        self.since_ms.store(clock.ms().max(1), Ordering::SeqCst);
    }

    fn end(&self) {
        self.since_ms.store(0, Ordering::SeqCst);
    }

    /// The age of the operation in flight, if there is one.
    fn age(&self, clock: &Clock) -> Option<Duration> {
        match self.since_ms.load(Ordering::SeqCst) {
            0 => None,
            since => Some(Duration::from_millis(clock.ms().saturating_sub(since))),
        }
    }

    /// Whether the operation in flight has been reported as hung.
    fn reported_hung(&self) -> bool {
        self.since_ms.load(Ordering::SeqCst) != 0
            && self.reported.load(Ordering::SeqCst) == self.seq.load(Ordering::SeqCst)
    }
}

#[derive(Debug)]
struct Clock(Instant);

impl Clock {
    fn ms(&self) -> u64 {
        u64::try_from(self.0.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn secs(&self) -> f64 {
        self.0.elapsed().as_secs_f64()
    }
}

/// What the writer of a region knows about one of its blocks.
#[derive(Clone, Debug, Default)]
struct BlockState {
    /// The last generation the device acknowledged (0: none).
    acked: u64,
    /// Generations submitted after `acked`: in flight or failed, so they may have landed.
    pending: Vec<u64>,
}

#[derive(Debug, Default)]
struct Counters {
    writes: AtomicU64,
    acked: AtomicU64,
    errors: AtomicU64,
    mismatches: AtomicU64,
    hangs: AtomicU64,
    /// Writers that have had a write acknowledged.
    running: AtomicU64,
}

#[derive(Debug)]
struct Shared {
    args: Args,
    file: File,
    clock: Clock,
    stop: AtomicBool,
    /// One per writer, then the final verification's.
    watches: Vec<Watch>,
    regions: Vec<Mutex<Vec<BlockState>>>,
    done: Vec<AtomicBool>,
    counters: Counters,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Shared {
    fn block_offset(&self, region: u32, block: u32) -> u64 {
        let index = u64::from(region) * u64::from(self.args.region_blocks) + u64::from(block);
        self.args.offset + index * self.block_size()
    }

    fn block_size(&self) -> u64 {
        u64::try_from(self.args.block_size).expect("usize fits u64")
    }

    fn write(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let n = self.file.write_at(buf, offset)?;
        if n == buf.len() {
            Ok(())
        } else {
            Err(io::Error::other(format!("short write: {n} bytes")))
        }
    }

    fn read(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let n = self.file.read_at(buf, offset)?;
        if n == buf.len() {
            Ok(())
        } else {
            Err(io::Error::other(format!("short read: {n} bytes")))
        }
    }
}

/// A value in `0..n` (block counts and indices are `u32` here).
fn below(rng: &mut Rng, n: u32) -> u32 {
    u32::try_from(rng.below(u64::from(n))).expect("below a u32")
}

/// Prints a failed operation, up to `--errors-shown` of them per writer.
#[allow(clippy::too_many_arguments)]
fn report(
    s: &Shared,
    writer: u32,
    shown: &mut u64,
    op: &str,
    block: u32,
    blocks: u32,
    generation: u64,
    e: &str,
) {
    if *shown < s.args.errors_shown {
        *shown += 1;
        println!(
            "GENWRITE-ERROR writer={writer} op={op} block={block} blocks={blocks} gen={generation} t={:.1} error=\"{e}\"",
            s.clock.secs()
        );
    }
}

fn index(n: u32) -> usize {
    usize::try_from(n).expect("u32 fits usize")
}

fn writer(s: &Shared, region: u32, cpus: usize) {
    let r = index(region);
    // A failure is reported, not fatal: the writers still run, on whichever CPUs.
    let cpu = r % cpus;
    if let Err(e) = vubd::poller::pin_current_thread(cpu) {
        println!("GENWRITE-NOTE cannot pin a writer to CPU {cpu}: {e}");
    }
    let (watch, blocks) = (&s.watches[r], &s.regions[r]);
    let bs = s.args.block_size;
    let max_extent = s.args.max_extent.clamp(1, s.args.region_blocks);
    let mut rng =
        Rng::new(s.args.seed ^ (u64::from(region) + 1).wrapping_mul(0xa076_1d64_78bd_642f));
    let mut buf = Aligned::new(bs * index(max_extent), BUF_ALIGN);
    let mut back = Aligned::new(bs * index(max_extent), BUF_ALIGN);
    let (mut generation, mut shown, mut running) = (0u64, 0u64, false);
    while !s.stop.load(Ordering::SeqCst) {
        let n = 1 + below(&mut rng, max_extent);
        let first = below(&mut rng, s.args.region_blocks - n + 1);
        let extent = index(first)..index(first + n);
        let len = bs * index(n);
        generation += 1;
        for (i, chunk) in buf.get_mut()[..len].chunks_exact_mut(bs).enumerate() {
            let b = first + u32::try_from(i).expect("extent fits u32");
            block::fill(chunk, s.args.seed, region, b, generation);
        }
        for state in &mut lock(blocks)[extent.clone()] {
            state.pending.push(generation);
        }
        s.counters.writes.fetch_add(1, Ordering::SeqCst);
        let offset = s.block_offset(region, first);
        watch.begin(&s.clock, OP_WRITE, first, n, generation);
        let written = s.write(&buf.get()[..len], offset);
        watch.end();
        if let Err(e) = written {
            s.counters.errors.fetch_add(1, Ordering::SeqCst);
            let e = e.to_string();
            report(s, region, &mut shown, "write", first, n, generation, &e);
            thread::sleep(ERROR_PAUSE);
            continue;
        }
        for state in &mut lock(blocks)[extent] {
            state.acked = generation;
            state.pending.clear();
        }
        s.counters.acked.fetch_add(1, Ordering::SeqCst);
        if !running {
            running = true;
            let all = s.counters.running.fetch_add(1, Ordering::SeqCst) + 1;
            if all == u64::from(s.args.writers) {
                println!("GENWRITE-RUNNING writers={all} t={:.1}", s.clock.secs());
            }
        }
        watch.begin(&s.clock, OP_READBACK, first, n, generation);
        let read = s.read(&mut back.get_mut()[..len], offset);
        watch.end();
        let what = match read {
            Err(e) => {
                s.counters.errors.fetch_add(1, Ordering::SeqCst);
                e.to_string()
            }
            Ok(()) if back.get()[..len] == buf.get()[..len] => continue,
            Ok(()) => {
                s.counters.mismatches.fetch_add(1, Ordering::SeqCst);
                let chunks = back.get()[..len]
                    .chunks_exact(bs)
                    .zip(buf.get()[..len].chunks_exact(bs));
                let i = chunks.clone().position(|(x, y)| x != y).unwrap_or(0);
                let b = first + u32::try_from(i).expect("extent fits u32");
                let chunk = chunks.map(|(x, _)| x).nth(i).unwrap_or_default();
                format!(
                    "block {b} reads back as {}",
                    block::decode(chunk, s.args.seed, region, b)
                )
            }
        };
        report(
            s, region, &mut shown, "readback", first, n, generation, &what,
        );
        thread::sleep(ERROR_PAUSE);
    }
    s.done[r].store(true, Ordering::SeqCst);
}

/// Reports hung operations, and progress every 10 s, until `finished`.
fn watchdog(s: &Shared, finished: &AtomicBool) {
    let hang = Duration::from_secs(s.args.hang_seconds);
    let mut next_progress = Duration::from_secs(10);
    while !finished.load(Ordering::SeqCst) {
        thread::sleep(Duration::from_millis(250));
        for (i, w) in s.watches.iter().enumerate() {
            let Some(age) = w.age(&s.clock) else { continue };
            let seq = w.seq.load(Ordering::SeqCst);
            if age < hang || w.reported.load(Ordering::SeqCst) == seq {
                continue;
            }
            w.reported.store(seq, Ordering::SeqCst);
            s.counters.hangs.fetch_add(1, Ordering::SeqCst);
            let what = w.what.load(Ordering::SeqCst);
            let op = OP_NAMES[usize::try_from(what >> 48).unwrap_or(0).min(2)];
            let who = if i < s.regions.len() {
                format!("writer={i}")
            } else {
                "writer=verify".to_owned()
            };
            println!(
                "GENWRITE-HANG {who} op={op} block={} blocks={} gen={} age_s={} t={:.1}",
                what & 0xffff_ffff,
                what >> 32 & 0xffff,
                w.generation.load(Ordering::SeqCst),
                age.as_secs(),
                s.clock.secs()
            );
        }
        let now = s.clock.0.elapsed();
        if now >= next_progress {
            next_progress += Duration::from_secs(10);
            let c = &s.counters;
            println!(
                "GENWRITE-PROGRESS t={} writes={} acked={} errors={} hangs={}",
                now.as_secs(),
                c.writes.load(Ordering::SeqCst),
                c.acked.load(Ordering::SeqCst),
                c.errors.load(Ordering::SeqCst),
                c.hangs.load(Ordering::SeqCst)
            );
        }
    }
}

/// Waits until writing should stop: `stop` on stdin (if asked for) or the time limit.
fn wait_for_stop(s: &Shared) -> &'static str {
    let heard = Arc::new(AtomicBool::new(false));
    if s.args.stop_on_stdin {
        let heard = Arc::clone(&heard);
        thread::spawn(move || {
            for line in io::stdin().lock().lines() {
                let Ok(line) = line else { break };
                if line.trim() == "stop" {
                    heard.store(true, Ordering::SeqCst);
                    break;
                }
            }
        });
    }
    let limit = Duration::from_secs(s.args.max_seconds);
    while s.clock.0.elapsed() < limit {
        if heard.load(Ordering::SeqCst) {
            return "stdin";
        }
        thread::sleep(Duration::from_millis(50));
    }
    "time"
}

/// Waits for the threads whose `done` flags are given: until each is done or its operation
/// in flight has been reported hung.
fn wait_done_or_hung(s: &Shared, threads: &[(usize, &AtomicBool)]) {
    loop {
        let waiting = threads
            .iter()
            .any(|&(i, done)| !done.load(Ordering::SeqCst) && !s.watches[i].reported_hung());
        if !waiting {
            return;
        }
        thread::sleep(Duration::from_millis(100));
    }
}

#[derive(Debug, Default)]
struct Verdict {
    lost: u64,
    unexpected: u64,
    misplaced: u64,
    corrupt: u64,
    unreadable: u64,
}

impl Verdict {
    fn bad(&self) -> u64 {
        self.lost + self.unexpected + self.misplaced + self.corrupt + self.unreadable
    }
}

/// Reads every region back and checks each block against what its writer knows; adds the
/// report's lines to `lines`.
fn verify(s: &Shared, lines: &mut Vec<String>) -> Verdict {
    let watch = s.watches.last().expect("the verification's watch");
    let mut buf = Aligned::new(s.args.block_size, BUF_ALIGN);
    let mut v = Verdict::default();
    let mut shown = 0;
    for (r, blocks) in s.regions.iter().enumerate() {
        let region = u32::try_from(r).expect("regions fit u32");
        let states = lock(blocks).clone();
        let mut gens = Vec::with_capacity(states.len());
        for (i, state) in states.iter().enumerate() {
            let b = u32::try_from(i).expect("blocks fit u32");
            watch.begin(&s.clock, OP_READ, b, 1, 0);
            let read = s.read(buf.get_mut(), s.block_offset(region, b));
            watch.end();
            let (kind, found) = match read {
                Err(e) => (
                    Some("unreadable"),
                    format!("unreadable(errno={})", e.raw_os_error().unwrap_or(0)),
                ),
                Ok(()) => {
                    let found = block::decode(buf.get(), s.args.seed, region, b);
                    let kind = block::judge(found, state.acked, &state.pending);
                    (kind, found.to_string())
                }
            };
            gens.push(match kind {
                None | Some("lost" | "unexpected") => found.clone(),
                Some("unreadable") => "?".to_owned(),
                Some(_) => "x".to_owned(),
            });
            let Some(kind) = kind else { continue };
            match kind {
                "lost" => v.lost += 1,
                "unexpected" => v.unexpected += 1,
                "misplaced" => v.misplaced += 1,
                "corrupt" => v.corrupt += 1,
                _ => v.unreadable += 1,
            }
            if shown < BAD_SHOWN {
                shown += 1;
                let pending: Vec<String> = state.pending.iter().map(u64::to_string).collect();
                lines.push(format!(
                    "GENWRITE-BAD kind={kind} region={region} block={b} found={found} acked={} pending={}",
                    state.acked,
                    if pending.is_empty() {
                        "-".to_owned()
                    } else {
                        pending.join("/")
                    }
                ));
            }
        }
        lines.push(format!(
            "GENWRITE-REGION id={region} gens={}",
            gens.join(",")
        ));
    }
    v
}

fn check_args(a: &Args) -> Result<(), String> {
    if a.writers == 0 || a.region_blocks == 0 {
        return Err("--writers and --region-blocks must not be 0".to_owned());
    }
    if a.block_size < 512 || a.block_size % 512 != 0 || a.block_size > 1 << 20 {
        return Err(format!(
            "--block-size {}: a multiple of 512 up to 1 MiB",
            a.block_size
        ));
    }
    if a.offset % u64::try_from(a.block_size).expect("usize fits u64") != 0 {
        return Err(format!(
            "--offset {} is not a multiple of the block size",
            a.offset
        ));
    }
    Ok(())
}

fn open(a: &Args) -> Result<File, String> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(&a.device)
        .map_err(|e| format!("open {} with O_DIRECT: {e}", a.device.display()))?;
    let size = device_size(&file).map_err(|e| format!("size of {}: {e}", a.device.display()))?;
    let need = a.offset
        + u64::from(a.writers)
            * u64::from(a.region_blocks)
            * u64::try_from(a.block_size).expect("usize fits u64");
    if size < need {
        return Err(format!(
            "{} has {size} bytes, the regions need {need}",
            a.device.display()
        ));
    }
    Ok(file)
}

/// The size of a regular file, or of a block device (whose metadata says 0).
fn device_size(file: &File) -> io::Result<u64> {
    use std::io::{Seek, SeekFrom};
    let mut f = file;
    let size = f.seek(SeekFrom::End(0))?;
    f.seek(SeekFrom::Start(0))?;
    Ok(size)
}

fn main() -> ExitCode {
    let args = Args::parse();
    let file = match check_args(&args).and_then(|()| open(&args)) {
        Ok(file) => file,
        Err(e) => {
            eprintln!("genwrite: {e}");
            return ExitCode::from(2);
        }
    };
    let cpus = thread::available_parallelism().map_or(1, usize::from);
    let n = usize::try_from(args.writers).expect("u32 fits usize");
    let per_region = usize::try_from(args.region_blocks).expect("u32 fits usize");
    println!(
        "GENWRITE-START device={} writers={} region_blocks={} block_size={} max_extent={} offset={} seed={:#x} cpus={cpus} hang_s={}",
        args.device.display(),
        args.writers,
        args.region_blocks,
        args.block_size,
        args.max_extent,
        args.offset,
        args.seed,
        args.hang_seconds
    );
    let shared = Arc::new(Shared {
        args,
        file,
        clock: Clock(Instant::now()),
        stop: AtomicBool::new(false),
        watches: (0..=n).map(|_| Watch::default()).collect(),
        regions: (0..n)
            .map(|_| Mutex::new(vec![BlockState::default(); per_region]))
            .collect(),
        done: (0..n).map(|_| AtomicBool::new(false)).collect(),
        counters: Counters::default(),
    });
    let finished = Arc::new(AtomicBool::new(false));
    {
        let (s, finished) = (Arc::clone(&shared), Arc::clone(&finished));
        thread::spawn(move || watchdog(&s, &finished));
    }
    for region in 0..shared.args.writers {
        let s = Arc::clone(&shared);
        thread::spawn(move || writer(&s, region, cpus));
    }

    let why = wait_for_stop(&shared);
    shared.stop.store(true, Ordering::SeqCst);
    println!("GENWRITE-STOP t={:.1} why={why}", shared.clock.secs());
    let writers: Vec<(usize, &AtomicBool)> = shared.done.iter().enumerate().collect();
    wait_done_or_hung(&shared, &writers);

    // The final read runs on a thread of its own, so that a read that never completes is
    // reported as a hang instead of stopping this one.
    let verified = Arc::new(Mutex::new(None));
    let verify_done = Arc::new(AtomicBool::new(false));
    {
        let (s, out, done) = (
            Arc::clone(&shared),
            Arc::clone(&verified),
            Arc::clone(&verify_done),
        );
        thread::spawn(move || {
            let mut lines = Vec::new();
            let v = verify(&s, &mut lines);
            *lock(&out) = Some((v, lines));
            done.store(true, Ordering::SeqCst);
        });
    }
    wait_done_or_hung(&shared, &[(n, &verify_done)]);
    finished.store(true, Ordering::SeqCst);

    let c = &shared.counters;
    let (v, mut lines) = lock(&verified).take().unwrap_or_else(|| {
        let note = "GENWRITE-NOTE the final read did not finish: every block counts as unreadable";
        let v = Verdict {
            unreadable: u64::from(shared.args.writers) * u64::from(shared.args.region_blocks),
            ..Verdict::default()
        };
        (v, vec![note.to_owned()])
    });
    let (errors, mismatches, hangs) = (
        c.errors.load(Ordering::SeqCst),
        c.mismatches.load(Ordering::SeqCst),
        c.hangs.load(Ordering::SeqCst),
    );
    let pass = errors == 0 && mismatches == 0 && hangs == 0 && v.bad() == 0;
    let verdict = if pass { "PASS" } else { "FAIL" };
    lines.push(format!(
        "GENWRITE-RESULT verdict={verdict} writes={} acked={} errors={errors} mismatches={mismatches} hangs={hangs} lost={} unexpected={} misplaced={} corrupt={} unreadable={} t={:.1}",
        c.writes.load(Ordering::SeqCst),
        c.acked.load(Ordering::SeqCst),
        v.lost,
        v.unexpected,
        v.misplaced,
        v.corrupt,
        v.unreadable,
        shared.clock.secs()
    ));
    let mut report = lines.join("\n");
    report.push('\n');
    match &shared.args.report {
        None => print!("{report}"),
        Some(path) => {
            let part = path.with_extension("part");
            if let Err(e) =
                std::fs::write(&part, report).and_then(|()| std::fs::rename(&part, path))
            {
                eprintln!("genwrite: write {}: {e}", path.display());
            }
        }
    }
    if pass {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
