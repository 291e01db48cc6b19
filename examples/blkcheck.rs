//! A self-checking client for vhost-user-blk back ends, on libblkio's `virtio-blk-vhost-user`
//! driver: runs one check against the first `--size` bytes of the disk and exits 0 or 1 after
//! printing one summary line (`blkcheck: PASS ...` or `blkcheck: FAIL ...`).
//!
//! ```sh
//! blkcheck --socket vubd.sock --queues 2 --seed 7 --size 16M write-verify
//! ```
//!
//! Checks (the disk's first `--size` bytes are split into one area per queue, and all queues
//! work at the same time, each in its own area):
//!
//! - `write-verify`: reads the area, then writes seeded pseudo-random data of random sizes at
//!   random block-aligned offsets (`--rounds` rounds of up to `--depth` disjoint requests in
//!   flight together), reads the area back and compares it with what it must hold; after a
//!   flush every queue reads the whole range back and compares it too.
//! - `discard`: fills the area with data, discards random extents, and reads back: data
//!   outside the discarded extents must be unchanged; a discarded block must read as its old
//!   data or as zeros (virtio-blk promises no more), and as zeros with `--discard-zeroes`.
//! - `write-zeroes`: fills the area with data, writes zeros over random extents (half of them
//!   with `NO_UNMAP`), and reads back: zeros there, the data everywhere else.
//! - `pattern`: writes the sector pattern of `examples/blkcheck/pattern.rs` for `--seed`
//!   (bytes derived from the offset and the seed only) and flushes, so that the disk's image
//!   can be checked later without this program.
//! - `verify-pattern`: reads the range and checks that it holds that pattern.
//!
//! Every wait is bounded: connecting by `--connect-timeout`, each batch of requests by
//! `--timeout`.
//!
//! Each queue has its buffers in a memory region of its own. With `--remap N`, a queue that
//! has completed N requests since its last move maps a new region (the back end receives
//! ADD_MEM_REG), submits its next batch with buffers there, and, while that batch is in
//! flight, unmaps and frees the previous region (REM_MEM_REG): the back end must keep serving
//! across both, and every check still compares the data end to end. The summary line then
//! counts the moves (`remaps=`), one added and one removed region each.

#[path = "blkcheck/pattern.rs"]
mod pattern;

use std::mem::MaybeUninit;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};
use std::{ptr, slice, thread};

use blkio::{Blkio, Blkioq, Completion, Errno, MemoryRegion, ReqFlags};
use clap::{Parser, ValueEnum};

/// libblkio's driver for vhost-user-blk.
const DRIVER: &str = "virtio-blk-vhost-user";
/// Largest request (further capped by the device's limits).
const MAX_REQUEST: usize = 128 << 10;
/// Buffers start on this boundary.
const BUF_ALIGN: usize = 4096;

/// Self-checking vhost-user-blk client (libblkio): one check, one summary line, exit 0 or 1.
#[derive(Clone, Debug, Parser)]
#[command(name = "blkcheck")]
struct Args {
    /// The back end's vhost-user socket.
    #[arg(long, value_name = "PATH")]
    socket: PathBuf,
    /// Queues, each driven by its own thread in its own area of the range.
    #[arg(long, value_name = "N", default_value_t = 1)]
    queues: usize,
    /// Seed of the data and of the offsets (0x-prefixed hex or decimal).
    #[arg(long, value_name = "X", value_parser = parse_u64)]
    seed: u64,
    /// Bytes of the disk to check, from its start (k, m, g: powers of 1024).
    #[arg(long, value_name = "BYTES", value_parser = parse_size)]
    size: u64,
    /// Rounds of random requests per queue.
    #[arg(long, value_name = "N", default_value_t = 8)]
    rounds: usize,
    /// Requests in flight together per queue.
    #[arg(long, value_name = "N", default_value_t = 16)]
    depth: usize,
    /// discard: discarded blocks must read as zeros.
    #[arg(long)]
    discard_zeroes: bool,
    /// How long to keep trying to connect, seconds.
    #[arg(long, value_name = "S", default_value_t = 10)]
    connect_timeout: u64,
    /// Upper bound for each batch of requests to complete, seconds.
    #[arg(long, value_name = "S", default_value_t = 30)]
    timeout: u64,
    /// Move each queue's buffers to a newly mapped memory region after every N requests,
    /// removing the old region while the next batch is in flight; and once more at the end,
    /// with no request after it.
    #[arg(long, value_name = "N")]
    remap: Option<u64>,
    /// Stay connected this long after the check, milliseconds (so that the backend can act on
    /// the last changes, such as releasing a removed region, while the session lasts).
    #[arg(long, value_name = "MS", default_value_t = 0)]
    linger_ms: u64,
    /// The check to run.
    #[arg(value_enum)]
    mode: Mode,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Mode {
    WriteVerify,
    Discard,
    WriteZeroes,
    Pattern,
    VerifyPattern,
}

fn parse_u64(s: &str) -> Result<u64, String> {
    let r = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => s.parse(),
    };
    r.map_err(|e| format!("{s:?}: {e}"))
}

/// `4096`, `4k`, `16M`, `1G`: k, m, g are powers of 1024.
fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, shift) = match t.chars().last().map(|c| c.to_ascii_lowercase()) {
        Some('k') => (&t[..t.len() - 1], 10),
        Some('m') => (&t[..t.len() - 1], 20),
        Some('g') => (&t[..t.len() - 1], 30),
        _ => (t, 0),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?}: not a size like 4096, 4k or 16M"))?;
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("{s:?}: too large"))
}

/// Why a check failed.
type Fail = String;

/// The device's limits, from libblkio's properties.
#[derive(Debug, Clone, Copy)]
struct Limits {
    capacity: u64,
    block: usize,
    max_request: usize,
    max_discard: u64,
    discard_align: u64,
    max_write_zeroes: u64,
}

/// A started device.
struct Device {
    // Declared first so the queues are dropped before the device and its regions.
    queues: Vec<Queue>,
    blkio: Arc<Mutex<Blkio>>,
}

fn blkio_err(what: &str) -> impl FnOnce(blkio::Error) -> Fail + '_ {
    move |e| format!("{what}: {e} ({})", e.errno())
}

fn int(blkio: &Blkio, name: &str) -> Result<u64, Fail> {
    let v = blkio.get_i32(name).map_err(blkio_err(name))?;
    u64::try_from(v).map_err(|_| format!("{name} = {v}"))
}

fn start_device(args: &Args) -> Result<Device, blkio::Error> {
    let mut blkio = Blkio::new(DRIVER)?;
    let path = args
        .socket
        .to_str()
        .ok_or_else(|| blkio::Error::new(Errno::INVAL, "socket path is not UTF-8"))?;
    blkio.set_str("path", path)?;
    blkio.connect()?;
    blkio.set_i32("num-queues", i32::try_from(args.queues).unwrap_or(i32::MAX))?;
    let align = usize::try_from(blkio.get_u64("mem-region-alignment")?).unwrap_or(BUF_ALIGN);
    let per_queue = (args.depth * MAX_REQUEST).next_multiple_of(BUF_ALIGN.max(align));
    let started = blkio.start()?;
    let mut regions = Vec::with_capacity(started.queues.len());
    for _ in &started.queues {
        let region = blkio.alloc_mem_region(per_queue)?;
        blkio.map_mem_region(&region)?;
        regions.push(region);
    }
    let blkio = Arc::new(Mutex::new(blkio));
    let timeout = Duration::from_secs(args.timeout);
    let queues = started
        .queues
        .into_iter()
        .zip(regions)
        .map(|(q, region)| Queue {
            q,
            base: region.addr as *mut u8,
            region,
            blkio: blkio.clone(),
            len: per_queue,
            timeout,
            requests: 0,
            remap: args.remap.map(|every| Remap {
                every: every.max(1),
                due_at: every.max(1),
                moves: 0,
            }),
        })
        .collect();
    Ok(Device { queues, blkio })
}

/// Reads the device's limits.
fn limits(b: &Blkio) -> Result<Limits, Fail> {
    let block = usize::try_from(int(b, "request-alignment")?.max(512)).unwrap_or(512);
    let mut max_request = MAX_REQUEST;
    for name in ["max-segment-len", "max-transfer"] {
        let v = usize::try_from(int(b, name)?).unwrap_or(usize::MAX);
        if v > 0 {
            max_request = max_request.min(v);
        }
    }
    max_request -= max_request % block;
    if max_request == 0 {
        return Err(format!(
            "the device's request limit is below its block size {block}"
        ));
    }
    Ok(Limits {
        capacity: b.get_u64("capacity").map_err(blkio_err("capacity"))?,
        block,
        max_request,
        max_discard: b
            .get_u64("max-discard-len")
            .map_err(blkio_err("max-discard-len"))?,
        discard_align: int(b, "discard-alignment")?,
        max_write_zeroes: b
            .get_u64("max-write-zeroes-len")
            .map_err(blkio_err("max-write-zeroes-len"))?,
    })
}

/// Connects, retrying while the socket is missing or refuses, within `--connect-timeout`. A
/// back end that accepts and never answers leaves the helper thread blocked; the caller exits.
fn connect(args: &Args) -> Result<(Device, Limits), Fail> {
    let timeout = Duration::from_secs(args.connect_timeout);
    let deadline = Instant::now() + timeout;
    let (tx, rx) = mpsc::channel();
    let a = args.clone();
    thread::spawn(move || {
        loop {
            let r = start_device(&a);
            let retry = matches!(&r, Err(e)
                if [Errno::NOENT, Errno::CONNREFUSED].contains(&e.errno()))
                && Instant::now() < deadline;
            if !retry {
                let _ = tx.send(r);
                return;
            }
            thread::sleep(Duration::from_millis(20));
        }
    });
    let dev = match rx.recv_timeout(timeout + Duration::from_secs(1)) {
        Ok(r) => r.map_err(blkio_err("connect"))?,
        Err(_) => return Err(format!("connect: no answer within {timeout:?}")),
    };
    let limits = limits(&lock(&dev.blkio))?;
    Ok((dev, limits))
}

/// One request of a batch.
#[derive(Debug, Clone)]
enum Op {
    Read { offset: u64, len: usize },
    Write { offset: u64, data: Vec<u8> },
    Discard { offset: u64, len: u64 },
    WriteZeroes { offset: u64, len: u64, unmap: bool },
    Flush,
}

impl Op {
    fn describe(&self) -> String {
        match self {
            Self::Read { offset, len } => format!("read of {len} bytes at {offset}"),
            Self::Write { offset, data } => format!("write of {} bytes at {offset}", data.len()),
            Self::Discard { offset, len } => format!("discard of {len} bytes at {offset}"),
            Self::WriteZeroes { offset, len, unmap } => {
                format!("write-zeroes of {len} bytes at {offset} (unmap {unmap})")
            }
            Self::Flush => "flush".to_owned(),
        }
    }
}

fn lock(blkio: &Mutex<Blkio>) -> std::sync::MutexGuard<'_, Blkio> {
    blkio.lock().unwrap_or_else(|e| e.into_inner())
}

/// `--remap`: when a queue moves its buffers to a new region next.
#[derive(Debug, Clone, Copy)]
struct Remap {
    every: u64,
    /// The queue's request count at which it moves.
    due_at: u64,
    moves: u64,
}

/// One libblkio queue with its buffers in a memory region of its own.
struct Queue {
    q: Blkioq,
    /// Start of `region`, `len` bytes.
    base: *mut u8,
    region: MemoryRegion,
    /// The device, shared by the queues to map and unmap their regions.
    blkio: Arc<Mutex<Blkio>>,
    len: usize,
    timeout: Duration,
    /// Requests completed so far.
    requests: u64,
    remap: Option<Remap>,
}

// SAFETY: `base` points into the memory region mapped for this queue's exclusive use; nothing
// else touches it, so moving the queue to another thread is sound. `Blkioq` is `Send`, and
// the shared `Blkio` is behind a mutex.
unsafe impl Send for Queue {}

impl Queue {
    /// With `--remap`, when due: maps a new region (ADD_MEM_REG) and moves the buffers there.
    /// Returns the old region, to unmap once the next batch is in flight. Only between
    /// batches: no request of this queue uses the old region any more.
    fn move_if_due(&mut self) -> Result<Option<MemoryRegion>, Fail> {
        let Some(remap) = self.remap.as_mut().filter(|r| self.requests >= r.due_at) else {
            return Ok(None);
        };
        let mut blkio = lock(&self.blkio);
        let new = blkio
            .alloc_mem_region(self.len)
            .map_err(blkio_err("blkio_alloc_mem_region"))?;
        if let Err(e) = blkio.map_mem_region(&new) {
            blkio.free_mem_region(&new);
            return Err(blkio_err("blkio_map_mem_region")(e));
        }
        remap.due_at = self.requests + remap.every;
        remap.moves += 1;
        self.base = new.addr as *mut u8;
        Ok(Some(std::mem::replace(&mut self.region, new)))
    }

    /// Unmaps (REM_MEM_REG) and frees a region no request uses any more.
    fn remove(&self, region: &MemoryRegion) {
        let mut blkio = lock(&self.blkio);
        blkio.unmap_mem_region(region);
        blkio.free_mem_region(region);
    }

    /// Submits `ops` together and waits (bounded) for all of them. Returns the data of each
    /// read (empty for the other requests); any failed request fails the batch.
    fn run(&mut self, ops: &[Op]) -> Result<Vec<Vec<u8>>, Fail> {
        let mut old_region = self.move_if_due()?;
        let mut used = 0usize;
        let mut bufs = Vec::with_capacity(ops.len());
        for (tag, op) in ops.iter().enumerate() {
            let mut alloc = |len: usize| -> Result<*mut u8, Fail> {
                let start = used.next_multiple_of(BUF_ALIGN);
                if start + len > self.len {
                    return Err(format!("a batch needs more than {} buffer bytes", self.len));
                }
                used = start + len;
                Ok(self.base.wrapping_add(start))
            };
            match op {
                Op::Read { offset, len } => {
                    let buf = alloc(*len)?;
                    self.q.read(*offset, buf, *len, tag, ReqFlags::empty());
                    bufs.push((buf, *len));
                }
                Op::Write { offset, data } => {
                    let buf = alloc(data.len())?;
                    // SAFETY: `alloc` gave `data.len()` bytes inside this queue's region (the
                    // current one), used by no other request of this batch; `data` is
                    // ordinary memory and cannot overlap it.
                    unsafe { ptr::copy_nonoverlapping(data.as_ptr(), buf, data.len()) };
                    self.q
                        .write(*offset, buf, data.len(), tag, ReqFlags::empty());
                    bufs.push((buf, 0));
                }
                Op::Discard { offset, len } => {
                    self.q.discard(*offset, *len, tag, ReqFlags::empty());
                    bufs.push((ptr::null_mut(), 0));
                }
                Op::WriteZeroes { offset, len, unmap } => {
                    let flags = if *unmap {
                        ReqFlags::empty()
                    } else {
                        ReqFlags::NO_UNMAP
                    };
                    self.q.write_zeroes(*offset, *len, tag, flags);
                    bufs.push((ptr::null_mut(), 0));
                }
                Op::Flush => {
                    self.q.flush(tag, ReqFlags::empty());
                    bufs.push((ptr::null_mut(), 0));
                }
            }
        }
        let mut slots: Vec<MaybeUninit<Completion>> =
            (0..ops.len()).map(|_| MaybeUninit::uninit()).collect();
        let mut remaining = ops.len();
        let mut left = self.timeout;
        let mut failed = None;
        while remaining > 0 {
            // Just after a move, only submit: the old region goes (REM_MEM_REG) while the
            // batch, all in the new region, is in flight.
            let min = if old_region.is_some() { 0 } else { remaining };
            let reaped = match self
                .q
                .do_io(&mut slots[..remaining], min, Some(&mut left), None)
            {
                Ok(n) => n,
                Err(e) if e.errno() == Errno::TIME => {
                    return Err(format!(
                        "{remaining} of {} requests incomplete after {:?}",
                        ops.len(),
                        self.timeout
                    ));
                }
                Err(e) => return Err(format!("blkioq_do_io: {e} ({})", e.errno())),
            };
            for slot in &slots[..reaped] {
                // SAFETY: do_io initialised the first `reaped` entries of the slice it was given.
                let c = unsafe { slot.assume_init_read() };
                if c.ret != 0 && failed.is_none() {
                    let op = ops.get(c.user_data).map_or("?".to_owned(), Op::describe);
                    failed = Some(format!(
                        "{op} failed: {}",
                        std::io::Error::from_raw_os_error(-c.ret)
                    ));
                }
            }
            remaining -= reaped;
            self.requests += reaped as u64;
            if let Some(old) = old_region.take() {
                self.remove(&old);
            }
        }
        if let Some(old) = old_region {
            // An empty batch: nothing to overlap with.
            self.remove(&old);
        }
        if let Some(f) = failed {
            return Err(f);
        }
        Ok(bufs
            .into_iter()
            .map(|(buf, len)| {
                if len == 0 {
                    return Vec::new();
                }
                // SAFETY: the read's buffer lies in this queue's current region, which stays
                // mapped until the next batch, and its request has completed, so the device no
                // longer writes to it.
                unsafe { slice::from_raw_parts(buf, len) }.to_vec()
            })
            .collect())
    }

    /// Reads `len` bytes at `base`, in requests of `chunk` bytes, `depth` at a time.
    fn read_range(
        &mut self,
        base: u64,
        len: usize,
        chunk: usize,
        depth: usize,
    ) -> Result<Vec<u8>, Fail> {
        let mut out = Vec::with_capacity(len);
        let ops: Vec<Op> = (0..len)
            .step_by(chunk)
            .map(|s| Op::Read {
                offset: base + s as u64,
                len: chunk.min(len - s),
            })
            .collect();
        for batch in ops.chunks(depth) {
            for data in self.run(batch)? {
                out.extend_from_slice(&data);
            }
        }
        Ok(out)
    }

    /// Writes `data` at `base`, in requests of `chunk` bytes, `depth` at a time.
    fn write_range(
        &mut self,
        base: u64,
        data: &[u8],
        chunk: usize,
        depth: usize,
    ) -> Result<(), Fail> {
        let ops: Vec<Op> = data
            .chunks(chunk)
            .enumerate()
            .map(|(i, c)| Op::Write {
                offset: base + (i * chunk) as u64,
                data: c.to_vec(),
            })
            .collect();
        for batch in ops.chunks(depth) {
            self.run(batch)?;
        }
        Ok(())
    }
}

/// SplitMix64, so that a seed reproduces a run exactly.
#[derive(Debug, Clone)]
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(len + 8);
        while out.len() < len {
            out.extend_from_slice(&self.next_u64().to_le_bytes());
        }
        out.truncate(len);
        out
    }
}

/// Up to `count` pairwise-disjoint extents `(offset, len)` in `0..span`, offsets and lengths
/// multiples of `align`, lengths up to `max_len`, sorted by offset.
fn disjoint_extents(
    rng: &mut Rng,
    span: u64,
    count: usize,
    align: u64,
    max_len: u64,
) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(count);
    let max_units = (max_len / align).clamp(1, span / align);
    for _ in 0..count * 8 {
        if out.len() == count {
            break;
        }
        // Half of them small (up to 8 units), the rest up to the largest.
        let units = 1 + if rng.below(2) == 0 {
            rng.below(max_units.min(8))
        } else {
            rng.below(max_units)
        };
        let len = units * align;
        let offset = rng.below((span - len) / align + 1) * align;
        if !out.iter().any(|&(o, l)| offset < o + l && o < offset + len) {
            out.push((offset, len));
        }
    }
    out.sort_unstable();
    out
}

/// First difference of two equal-length byte ranges read at disk offset `base`.
fn compare(want: &[u8], got: &[u8], base: u64, what: &str) -> Result<(), Fail> {
    if want.len() != got.len() {
        return Err(format!(
            "{what}: {} bytes read, {} expected",
            got.len(),
            want.len()
        ));
    }
    match want.iter().zip(got).position(|(w, g)| w != g) {
        None => Ok(()),
        Some(i) => {
            let end = (i + 8).min(want.len());
            Err(format!(
                "{what}: first difference at disk offset {}: expected {:02x?}, read {:02x?}",
                base + i as u64,
                &want[i..end],
                &got[i..end]
            ))
        }
    }
}

/// What the queues did.
#[derive(Debug, Default, Clone, Copy)]
struct Stats {
    /// Requests of every kind, reads and flushes included.
    requests: u64,
    /// `--remap`: buffer moves to a new region, over all queues.
    remaps: u64,
    written: u64,
    read: u64,
    /// discard: discarded blocks that read back as zeros, and all discarded blocks.
    zeroed_blocks: u64,
    discarded_blocks: u64,
}

impl std::ops::AddAssign for Stats {
    fn add_assign(&mut self, o: Self) {
        self.written += o.written;
        self.read += o.read;
        self.zeroed_blocks += o.zeroed_blocks;
        self.discarded_blocks += o.discarded_blocks;
    }
}

/// One queue's share of the work: its area of the range and its seed.
#[derive(Debug, Clone, Copy)]
struct Area {
    index: usize,
    base: u64,
    len: usize,
    seed: u64,
}

/// write-verify on one area; returns what the area must hold.
fn write_verify(
    q: &mut Queue,
    a: Area,
    args: &Args,
    lim: Limits,
) -> Result<(Vec<u8>, Stats), Fail> {
    let mut st = Stats::default();
    let mut rng = Rng(a.seed);
    let mut shadow = q.read_range(a.base, a.len, lim.max_request, args.depth)?;
    st.read += a.len as u64;
    for round in 0..args.rounds {
        let extents = disjoint_extents(
            &mut rng,
            a.len as u64,
            args.depth,
            lim.block as u64,
            lim.max_request as u64,
        );
        let ops: Vec<Op> = extents
            .iter()
            .map(|&(offset, len)| Op::Write {
                offset: a.base + offset,
                data: rng.bytes(len as usize),
            })
            .collect();
        q.run(&ops)
            .map_err(|e| format!("queue {} round {round}: {e}", a.index))?;
        for op in &ops {
            if let Op::Write { offset, data } = op {
                let at = (offset - a.base) as usize;
                shadow[at..at + data.len()].copy_from_slice(data);
                st.written += data.len() as u64;
            }
        }
    }
    let back = q.read_range(a.base, a.len, lim.max_request, args.depth)?;
    st.read += a.len as u64;
    compare(
        &shadow,
        &back,
        a.base,
        &format!("queue {} read-back", a.index),
    )?;
    Ok((shadow, st))
}

/// discard or write-zeroes on one area: fill it, clear random extents, read back.
fn clear_check(q: &mut Queue, a: Area, args: &Args, lim: Limits) -> Result<Stats, Fail> {
    let mut st = Stats::default();
    let mut rng = Rng(a.seed);
    let data = rng.bytes(a.len);
    q.write_range(a.base, &data, lim.max_request, args.depth)?;
    st.written += a.len as u64;
    let discard = args.mode == Mode::Discard;
    let (limit, what) = if discard {
        (lim.max_discard, "discard")
    } else {
        (lim.max_write_zeroes, "write-zeroes")
    };
    if limit == 0 {
        return Err(format!("the device does not offer {what} (its limit is 0)"));
    }
    let align = (lim.block as u64).max(if discard { lim.discard_align } else { 0 });
    if a.base % align != 0 || (a.len as u64) < align {
        return Err(format!(
            "queue {} area ({} bytes at {}) does not fit the {what} alignment {align}",
            a.index, a.len, a.base
        ));
    }
    let extents = disjoint_extents(
        &mut rng,
        a.len as u64,
        args.depth,
        align,
        limit.min(1 << 20),
    );
    let ops: Vec<Op> = extents
        .iter()
        .enumerate()
        .map(|(i, &(offset, len))| {
            let offset = a.base + offset;
            if discard {
                Op::Discard { offset, len }
            } else {
                Op::WriteZeroes {
                    offset,
                    len,
                    unmap: i % 2 == 0,
                }
            }
        })
        .collect();
    q.run(&ops).map_err(|e| format!("queue {}: {e}", a.index))?;
    q.run(&[Op::Flush])?;
    let back = q.read_range(a.base, a.len, lim.max_request, args.depth)?;
    st.read += a.len as u64;

    let mut expected = data.clone();
    let mut prev_end = 0usize;
    for &(offset, len) in &extents {
        let (start, end) = (offset as usize, (offset + len) as usize);
        compare(
            &data[prev_end..start],
            &back[prev_end..start],
            a.base + prev_end as u64,
            &format!("data beside a {what}"),
        )?;
        prev_end = end;
        if discard {
            for blk in (start..end).step_by(lim.block) {
                let got = &back[blk..blk + lim.block];
                st.discarded_blocks += 1;
                if got.iter().all(|&b| b == 0) {
                    st.zeroed_blocks += 1;
                } else if args.discard_zeroes {
                    return Err(format!(
                        "discarded block at {} does not read as zeros",
                        a.base + blk as u64
                    ));
                } else if got != &data[blk..blk + lim.block] {
                    return Err(format!(
                        "discarded block at {} reads as neither zeros nor its old data",
                        a.base + blk as u64
                    ));
                }
            }
        } else {
            expected[start..end].fill(0);
            compare(
                &expected[start..end],
                &back[start..end],
                a.base + offset,
                "write-zeroes extent",
            )?;
        }
    }
    compare(
        &data[prev_end..],
        &back[prev_end..],
        a.base + prev_end as u64,
        &format!("data beside a {what}"),
    )?;
    Ok(st)
}

/// pattern and verify-pattern on one area.
fn pattern_area(q: &mut Queue, a: Area, args: &Args, lim: Limits) -> Result<Stats, Fail> {
    let mut st = Stats::default();
    // In pieces, to keep the memory bounded on large ranges.
    let piece = (lim.max_request * args.depth).max(lim.block);
    for start in (0..a.len).step_by(piece) {
        let len = piece.min(a.len - start);
        let offset = a.base + start as u64;
        if args.mode == Mode::Pattern {
            q.write_range(
                offset,
                &pattern::bytes(args.seed, offset, len),
                lim.max_request,
                args.depth,
            )?;
            st.written += len as u64;
        } else {
            let got = q.read_range(offset, len, lim.max_request, args.depth)?;
            st.read += len as u64;
            if let Err(at) = pattern::check(args.seed, offset, &got) {
                return Err(format!(
                    "the sector at {at} does not hold the pattern for seed {:#x}",
                    args.seed
                ));
            }
        }
    }
    if args.mode == Mode::Pattern {
        q.run(&[Op::Flush])?;
    }
    Ok(st)
}

fn run(args: &Args) -> Result<(Stats, Limits), Fail> {
    if args.queues == 0 || args.queues > 64 {
        return Err(format!("--queues {}: must be 1 to 64", args.queues));
    }
    if args.depth == 0 || args.depth > 256 {
        return Err(format!("--depth {}: must be 1 to 256", args.depth));
    }
    let (mut dev, lim) = connect(args)?;
    if dev.queues.len() != args.queues {
        return Err(format!(
            "asked for {} queues, got {}",
            args.queues,
            dev.queues.len()
        ));
    }
    if args.size == 0 || args.size > lim.capacity {
        return Err(format!(
            "--size {}: the disk has {} bytes",
            args.size, lim.capacity
        ));
    }
    let unit = (args.queues * lim.block.max(pattern::SECTOR)) as u64;
    if args.size % unit != 0 {
        return Err(format!(
            "--size {}: must be a multiple of {unit} (queues x block size)",
            args.size
        ));
    }
    let span = usize::try_from(args.size / args.queues as u64)
        .map_err(|_| "--size too large".to_owned())?;
    let areas: Vec<Area> = (0..args.queues)
        .map(|i| Area {
            index: i,
            base: (i * span) as u64,
            len: span,
            seed: args.seed ^ (i as u64) << 32,
        })
        .collect();

    let mut total = Stats::default();
    let mut expected = Vec::new();
    thread::scope(|s| -> Result<(), Fail> {
        let handles: Vec<_> = dev
            .queues
            .iter_mut()
            .zip(&areas)
            .map(|(q, &a)| {
                s.spawn(move || -> Result<(Vec<u8>, Stats), Fail> {
                    match args.mode {
                        Mode::WriteVerify => write_verify(q, a, args, lim),
                        Mode::Discard | Mode::WriteZeroes => {
                            clear_check(q, a, args, lim).map(|st| (Vec::new(), st))
                        }
                        Mode::Pattern | Mode::VerifyPattern => {
                            pattern_area(q, a, args, lim).map(|st| (Vec::new(), st))
                        }
                    }
                })
            })
            .collect();
        let mut first_err = None;
        for h in handles {
            match h
                .join()
                .map_err(|_| "a queue thread panicked".to_owned())
                .and_then(|r| r)
            {
                Ok((shadow, st)) => {
                    expected.extend_from_slice(&shadow);
                    total += st;
                }
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        first_err.map_or(Ok(()), Err)
    })?;

    if args.mode == Mode::WriteVerify {
        dev.queues[0].run(&[Op::Flush])?;
        // Every queue reads the whole range, not only its own area.
        for (i, q) in dev.queues.iter_mut().enumerate() {
            let back = q.read_range(0, expected.len(), lim.max_request, args.depth)?;
            total.read += back.len() as u64;
            compare(
                &expected,
                &back,
                0,
                &format!("whole-range read-back on queue {i}"),
            )?;
        }
    }
    if args.remap.is_some() {
        // A last move with no request after it: the backend must let the old region go
        // without a request of this queue to prompt it (with `--linger-ms`, while connected).
        for q in &mut dev.queues {
            if let Some(r) = q.remap.as_mut() {
                r.due_at = q.requests;
            }
            if let Some(old) = q.move_if_due()? {
                q.remove(&old);
            }
        }
    }
    total.requests = dev.queues.iter().map(|q| q.requests).sum();
    total.remaps = dev
        .queues
        .iter()
        .filter_map(|q| q.remap)
        .map(|r| r.moves)
        .sum();
    std::thread::sleep(Duration::from_millis(args.linger_ms));
    Ok((total, lim))
}

fn main() -> ExitCode {
    let args = Args::parse();
    let mode = args.mode.to_possible_value().expect("no skipped modes");
    let mode = mode.get_name();
    let start = Instant::now();
    match run(&args) {
        Ok((st, lim)) => {
            let mut line = format!(
                "blkcheck: PASS {mode} queues={} size={} seed={:#x} block={} requests={} written={} read={}",
                args.queues, args.size, args.seed, lim.block, st.requests, st.written, st.read
            );
            if args.remap.is_some() {
                line += &format!(" remaps={}", st.remaps);
            }
            if args.mode == Mode::Discard {
                line += &format!(
                    " discarded_blocks={} zeroed={}",
                    st.discarded_blocks, st.zeroed_blocks
                );
            }
            println!("{line} secs={:.2}", start.elapsed().as_secs_f64());
            ExitCode::SUCCESS
        }
        Err(why) => {
            println!("blkcheck: FAIL {mode}: {why}");
            ExitCode::FAILURE
        }
    }
}
