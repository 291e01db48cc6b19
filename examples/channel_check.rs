//! The `IoChannel` conformance suite: what the poller relies on from every backend's channel
//! (io_uring on a file or block device, null, NVMe/TCP, NVMe PCIe), checked the same way on
//! each. The disk is opened exactly as vubd opens it, from a vubd command line:
//!
//! ```sh
//! channel_check -- --disk nvme-tcp://127.0.0.1:4420/NQN --io-timeout 5
//! ```
//!
//! Buffers live in one guest memory of this process (DMA-mapped for an NVMe PCIe disk, as a
//! session's memory is). Each case prints `CHANNEL-CHECK case=NAME ok` or `... FAIL why`; the
//! last line is `CHANNEL-CHECK-RESULT disk=... passed=N failed=M`, and the exit status is 0
//! only when nothing failed. The cases overwrite 8 MiB from `--base` (default 0) and the
//! disk's last 64 KiB.
//!
//! What every channel must do:
//!
//! - geometry: a capacity that is a whole number of logical blocks, block sizes that are powers
//!   of two, the physical at least the logical;
//! - every queued operation completes, each of its parts exactly once (`queue` says how many),
//!   with the bytes transferred (summed over the parts) or an errno, and no tag is reported that
//!   was not queued;
//! - data written reads back, at the first (from `--base`) and last blocks, through iovecs of
//!   any count, size, and alignment a guest may use (down to byte-aligned buffers), across
//!   requests larger than the device's transfer limit, and with many operations in flight;
//! - while `has_room` is true `queue` succeeds, and the room comes back once everything
//!   queued has completed;
//! - flush succeeds; write-zeroes reads back as zeros (also when unmapping is allowed), where
//!   offered; discard succeeds where offered, and the range is writable afterwards;
//! - a channel that is waited on can be slept on: with a completion fd, the fd becomes readable
//!   when completions are ready; without one, either `must_poll` is set while operations are in
//!   flight, or every operation is complete by the first poll after submit;
//! - `drain` of operations in flight still lets each of them complete (with data or an error).
//!
//! A null disk stores nothing: data cases check results only. Every wait is bounded.

use std::collections::HashMap;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use vm_memory::{Bytes, GuestAddress};
use vubd::bdev::GuestMemoryHook;
use vubd::bdev::{BlockDevice, Channel, DeviceInfo, Disk, IoChannel, IoOp, Target};
use vubd::config::Config;
use vubd::mem::{GuestMemory, HostMap, IovecList, MemSnapshot};

/// Guest memory of the checks: room for every case's buffers.
const MEM_SIZE: usize = 32 << 20;
/// Channel depth asked for.
const DEPTH: u32 = 64;
/// Longest wait for one batch of completions.
const BATCH_TIMEOUT: Duration = Duration::from_secs(60);
/// Iovecs one operation may carry here.
const MAX_IOV: usize = 300;

#[derive(Parser, Debug)]
#[command(about = "IoChannel conformance checks on one disk, opened as vubd opens it")]
struct Cli {
    /// Where on the disk the checks' 8 MiB start (a multiple of 4096).
    #[arg(long, default_value_t = 0)]
    base: u64,
    /// vubd's own options (`--disk`, `--readonly`, `--cache`, NVMe options...).
    #[arg(last = true, required = true)]
    vubd: Vec<String>,
}

struct Rig {
    disk: Arc<Disk>,
    ch: Channel,
    target: Target,
    mem: MemSnapshot,
    map: HostMap,
    /// An NVMe PCIe disk's DMA mapping of `mem`, kept while the checks run.
    _dma: Option<Box<dyn GuestMemoryHook>>,
    /// The disk keeps data (everything but null).
    keeps_data: bool,
    /// `--base`: disk offsets of the cases are relative to it (but for the last blocks).
    base: u64,
    next_tag: u32,
}

/// One finished operation: its parts' results summed, or the first error.
type Outcome = Result<u64, i32>;

impl Rig {
    fn info(&self) -> DeviceInfo {
        self.disk.info()
    }

    fn buf(&self, gpa: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem
            .read_slice(&mut v, GuestAddress(gpa))
            .expect("buffer in guest memory");
        v
    }

    fn fill(&self, gpa: u64, data: &[u8]) {
        self.mem
            .write_slice(data, GuestAddress(gpa))
            .expect("buffer in guest memory");
    }

    fn iov(&self, pieces: &[(u64, u32)]) -> IovecList {
        let mut iov = IovecList::with_capacity(MAX_IOV);
        for &(gpa, len) in pieces {
            iov.push(&self.map, gpa, len)
                .expect("buffer in guest memory");
        }
        iov
    }

    /// Queues `ops` (as many as fit; the rest after completions), submits, and waits for all
    /// of them; returns each one's outcome, in order.
    fn run(&mut self, ops: &[IoOp<'_>]) -> Result<Vec<Outcome>, String> {
        let mut parts: HashMap<u32, (usize, u32)> = HashMap::new();
        let mut out: Vec<Option<Outcome>> = vec![None; ops.len()];
        let mut sums = vec![Ok(0u64); ops.len()];
        let mut next = 0;
        let deadline = Instant::now() + BATCH_TIMEOUT;
        while out.iter().any(Option::is_none) {
            while next < ops.len() && self.ch.has_room() {
                let tag = self.next_tag;
                self.next_tag = self.next_tag.wrapping_add(1);
                // SAFETY: the iovecs and the guest memory they point into outlive this call,
                // which returns only once every part of every operation has completed.
                let n = unsafe { self.ch.queue_for(&self.target, tag, ops[next]) }
                    .map_err(|_| format!("queue refused operation {next} while has_room"))?;
                if n == 0 {
                    return Err(format!(
                        "operation {next} queued with no completion to come"
                    ));
                }
                parts.insert(tag, (next, n));
                next += 1;
            }
            self.ch.submit().map_err(|e| format!("submit: {e}"))?;
            let mut unknown = None;
            let reported = self.ch.poll(usize::MAX, |tag, res| {
                let Some((i, left)) = parts.get_mut(&tag) else {
                    unknown = Some(tag);
                    return;
                };
                let i = *i;
                sums[i] = match (sums[i], u64::try_from(res)) {
                    (Ok(s), Ok(r)) => Ok(s + r),
                    (Ok(_), Err(_)) => Err(res),
                    (e, _) => e,
                };
                *left -= 1;
                if *left == 0 {
                    parts.remove(&tag);
                    out[i] = Some(sums[i]);
                }
            });
            if let Some(tag) = unknown {
                return Err(format!("completion for tag {tag}, not in flight"));
            }
            if reported > 0 || out.iter().all(Option::is_some) {
                continue;
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "{} operations not complete after {BATCH_TIMEOUT:?}",
                    parts.len()
                ));
            }
            self.wait_completion(Duration::from_millis(50));
        }
        Ok(out.into_iter().map(Option::unwrap).collect())
    }

    /// Sleeps on the completion fd (up to `limit`) if the channel has one.
    fn wait_completion(&self, limit: Duration) -> bool {
        let Some(fd) = self.ch.completion_fd() else {
            std::thread::yield_now();
            return false;
        };
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = i32::try_from(limit.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: one valid pollfd, for the duration of the call.
        let ready = unsafe { libc::poll(&mut pfd, 1, ms) } == 1;
        self.ch.clear_completion_fd();
        ready
    }

    fn run_one(&mut self, op: IoOp<'_>) -> Result<Outcome, String> {
        Ok(self.run(&[op])?[0])
    }

    /// The disk offset of `rel` in the checks' area (from `--base`).
    fn at(&self, rel: u64) -> u64 {
        self.base + rel
    }

    fn write(&mut self, offset: u64, pieces: &[(u64, u32)]) -> Result<(), String> {
        let iov = self.iov(pieces);
        let want = iov.bytes();
        expect_bytes(
            "write",
            self.run_one(IoOp::Write {
                offset,
                iov: &iov,
                fua: false,
            })?,
            want,
        )
    }

    fn read(&mut self, offset: u64, pieces: &[(u64, u32)]) -> Result<(), String> {
        let iov = self.iov(pieces);
        let want = iov.bytes();
        expect_bytes(
            "read",
            self.run_one(IoOp::Read { offset, iov: &iov })?,
            want,
        )
    }

    /// Writes `data` through `wpieces`, reads it back through `rpieces`, compares.
    fn round_trip(
        &mut self,
        offset: u64,
        data: &[u8],
        wpieces: &[(u64, u32)],
        rpieces: &[(u64, u32)],
    ) -> Result<(), String> {
        scatter(self, data, wpieces);
        for &(gpa, len) in rpieces {
            self.fill(gpa, &vec![0xee; len as usize]);
        }
        self.write(offset, wpieces)?;
        self.read(offset, rpieces)?;
        if self.keeps_data {
            let back = gather(self, rpieces);
            if back != data {
                let at = back.iter().zip(data).position(|(a, b)| a != b).unwrap_or(0);
                return Err(format!(
                    "data read back at {offset} differs from byte {at} on ({} bytes)",
                    data.len()
                ));
            }
        }
        Ok(())
    }
}

fn expect_bytes(what: &str, got: Outcome, want: u64) -> Result<(), String> {
    match got {
        Ok(n) if n == want => Ok(()),
        Ok(n) => Err(format!("{what} of {want} bytes reported {n}")),
        Err(e) => Err(format!("{what} of {want} bytes failed with {e}")),
    }
}

fn scatter(rig: &Rig, data: &[u8], pieces: &[(u64, u32)]) {
    let mut at = 0;
    for &(gpa, len) in pieces {
        rig.fill(gpa, &data[at..at + len as usize]);
        at += len as usize;
    }
}

fn gather(rig: &Rig, pieces: &[(u64, u32)]) -> Vec<u8> {
    pieces
        .iter()
        .flat_map(|&(gpa, len)| rig.buf(gpa, len as usize))
        .collect()
}

/// Bytes that differ from offset to offset and from case to case.
fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ ((i >> 9) as u8) ^ seed)
        .collect()
}

/// `len` bytes as pieces of the given sizes, placed one after the other from `gpa`, each
/// `gap` bytes past the end of the one before.
fn pieces(gpa: u64, sizes: &[u32], gap: u64) -> Vec<(u64, u32)> {
    let mut at = gpa;
    sizes
        .iter()
        .map(|&len| {
            let p = (at, len);
            at += u64::from(len) + gap;
            p
        })
        .collect()
}

fn case_geometry(rig: &mut Rig) -> Result<(), String> {
    let i = rig.info();
    let lbs = u64::from(i.logical_block_size);
    if !(lbs.is_power_of_two() && lbs >= 512) {
        return Err(format!("logical block size {lbs}"));
    }
    if !(i.physical_block_size.is_power_of_two() && i.physical_block_size >= i.logical_block_size) {
        return Err(format!("physical block size {}", i.physical_block_size));
    }
    if i.capacity_bytes == 0 || i.capacity_bytes % lbs != 0 {
        return Err(format!("capacity {} bytes", i.capacity_bytes));
    }
    if i.capacity_bytes < rig.base + (8 << 20) + (64 << 10) {
        return Err(format!(
            "capacity {} is too small for the checks",
            i.capacity_bytes
        ));
    }
    Ok(())
}

fn case_first_and_last_blocks(rig: &mut Rig) -> Result<(), String> {
    let len = 64 << 10;
    let last = rig.info().capacity_bytes - len as u64;
    let first = rig.at(0);
    rig.round_trip(
        first,
        &pattern(1, len),
        &[(0, len as u32)],
        &[(1 << 20, len as u32)],
    )?;
    rig.round_trip(
        last,
        &pattern(2, len),
        &[(0, len as u32)],
        &[(1 << 20, len as u32)],
    )
}

fn case_vectored(rig: &mut Rig) -> Result<(), String> {
    let w = pieces(0, &[512, 1536, 4096, 512, 8192, 1024, 512], 512);
    let r = pieces(1 << 20, &[8192, 4096, 4096], 4096);
    rig.round_trip(rig.at(64 << 10), &pattern(3, 16384), &w, &r)?;
    // 256 pieces of one block each, scattered.
    let w = pieces(2 << 20, &[512; 256], 512);
    let r = pieces(4 << 20, &[4096; 32], 0);
    rig.round_trip(rig.at(128 << 10), &pattern(4, 128 << 10), &w, &r)
}

fn case_unaligned_buffers(rig: &mut Rig) -> Result<(), String> {
    // Guests may use buffers at any address; lengths stay whole sectors in total.
    let w = pieces(3, &[1000, 24, 3072], 5);
    let r = pieces((1 << 20) + 1, &[4096], 0);
    rig.round_trip(rig.at(256 << 10), &pattern(5, 4096), &w, &r)?;
    let w = pieces(4093, &[8192], 0);
    let r = pieces((2 << 20) + 7, &[511, 4097, 3584], 9);
    rig.round_trip(rig.at(320 << 10), &pattern(6, 8192), &w, &r)
}

fn case_large(rig: &mut Rig) -> Result<(), String> {
    // Larger than any transfer limit in the lab: the channel splits it.
    let len = (4 << 20) + 4096;
    let w = pieces(0, &[1 << 20, 1 << 20, 1 << 20, 1 << 20, 4096], 0);
    let r = pieces(8 << 20, &[(4 << 20) + 4096], 0);
    rig.round_trip(rig.at(1 << 20), &pattern(7, len), &w, &r)
}

fn case_many_in_flight(rig: &mut Rig) -> Result<(), String> {
    let n = 3 * DEPTH as usize;
    let block = 4096u32;
    let data = pattern(8, n * block as usize);
    let wp: Vec<(u64, u32)> = (0..n).map(|i| (i as u64 * 8192, block)).collect();
    let rp: Vec<(u64, u32)> = (0..n)
        .map(|i| ((8 << 20) + i as u64 * 8192 + 512, block))
        .collect();
    scatter(rig, &data, &wp);
    let base = rig.at(6 << 20);
    let wiov: Vec<IovecList> = wp.iter().map(|&p| rig.iov(&[p])).collect();
    let writes: Vec<IoOp<'_>> = wiov
        .iter()
        .enumerate()
        .map(|(i, iov)| IoOp::Write {
            offset: base + i as u64 * u64::from(block),
            iov,
            fua: i % 2 == 0,
        })
        .collect();
    for (i, r) in rig.run(&writes)?.into_iter().enumerate() {
        expect_bytes(&format!("write {i}"), r, u64::from(block))?;
    }
    let riov: Vec<IovecList> = rp.iter().map(|&p| rig.iov(&[p])).collect();
    let reads: Vec<IoOp<'_>> = riov
        .iter()
        .enumerate()
        .rev()
        .map(|(i, iov)| IoOp::Read {
            offset: base + i as u64 * u64::from(block),
            iov,
        })
        .collect();
    for (i, r) in rig.run(&reads)?.into_iter().enumerate() {
        expect_bytes(&format!("read {i}"), r, u64::from(block))?;
    }
    if rig.keeps_data && gather(rig, &rp) != data {
        return Err("data of concurrent writes read back wrong".into());
    }
    Ok(())
}

fn case_has_room(rig: &mut Rig) -> Result<(), String> {
    // Queue reads without submitting until the channel says it is full (or 8 x depth).
    let iov = rig.iov(&[(0, 512)]);
    let mut queued = HashMap::new();
    let limit = 8 * DEPTH as usize;
    while rig.ch.has_room() && queued.len() < limit {
        let tag = rig.next_tag;
        rig.next_tag = rig.next_tag.wrapping_add(1);
        let offset = rig.at((queued.len() as u64 % 1024) * 512);
        // SAFETY: `iov` and the memory outlive every completion, waited for below.
        let n = unsafe {
            rig.ch
                .queue_for(&rig.target, tag, IoOp::Read { offset, iov: &iov })
        }
        .map_err(|_| format!("queue refused while has_room, after {}", queued.len()))?;
        queued.insert(tag, n);
    }
    let deadline = Instant::now() + BATCH_TIMEOUT;
    while !queued.is_empty() {
        rig.ch.submit().map_err(|e| format!("submit: {e}"))?;
        let mut bad = None;
        let n = rig
            .ch
            .poll(usize::MAX, |tag, res| match queued.get_mut(&tag) {
                Some(left) if res == 512 => {
                    *left -= 1;
                    if *left == 0 {
                        queued.remove(&tag);
                    }
                }
                Some(_) => bad = Some(format!("read of 512 bytes reported {res}")),
                None => bad = Some(format!("completion for tag {tag}, not in flight")),
            });
        if let Some(why) = bad {
            return Err(why);
        }
        if n == 0 {
            if Instant::now() >= deadline {
                return Err(format!("{} reads never completed", queued.len()));
            }
            rig.wait_completion(Duration::from_millis(50));
        }
    }
    if !rig.ch.has_room() {
        return Err("no room with nothing in flight".into());
    }
    Ok(())
}

fn case_flush(rig: &mut Rig) -> Result<(), String> {
    match rig.run_one(IoOp::Flush)? {
        Ok(_) => Ok(()),
        Err(e) => Err(format!("flush failed with {e}")),
    }
}

fn case_write_zeroes(rig: &mut Rig) -> Result<(), String> {
    if !rig.info().write_zeroes {
        return Ok(());
    }
    let base = rig.at(2 << 20);
    let len = 64 << 10;
    for unmap in [false, true] {
        let data = pattern(9, len);
        rig.round_trip(base, &data, &[(0, len as u32)], &[(1 << 20, len as u32)])?;
        let zeroed = rig.run_one(IoOp::WriteZeroes {
            offset: base + 16384,
            len: 32768,
            unmap,
        })?;
        if let Err(e) = zeroed {
            return Err(format!("write-zeroes (unmap {unmap}) failed with {e}"));
        }
        rig.read(base, &[(1 << 20, len as u32)])?;
        let mut want = data.clone();
        want[16384..49152].fill(0);
        if rig.keeps_data && rig.buf(1 << 20, len) != want {
            return Err(format!(
                "write-zeroes (unmap {unmap}) did not read back as zeros"
            ));
        }
    }
    Ok(())
}

fn case_discard(rig: &mut Rig) -> Result<(), String> {
    if !rig.info().discard {
        return Ok(());
    }
    let base = rig.at(3 << 20);
    if let Err(e) = rig.run_one(IoOp::Discard {
        offset: base,
        len: 1 << 20,
    })? {
        return Err(format!("discard failed with {e}"));
    }
    rig.round_trip(
        base + 4096,
        &pattern(10, 8192),
        &[(0, 8192)],
        &[(1 << 20, 8192)],
    )
}

fn case_wakeup(rig: &mut Rig) -> Result<(), String> {
    let iov = rig.iov(&[(0, 4096)]);
    let tag = rig.next_tag;
    rig.next_tag = rig.next_tag.wrapping_add(1);
    let offset = rig.at(0);
    // SAFETY: `iov` and the memory outlive the completion, waited for below.
    let parts = unsafe {
        rig.ch
            .queue_for(&rig.target, tag, IoOp::Read { offset, iov: &iov })
    }
    .map_err(|_| "queue refused a read on an idle channel".to_owned())?;
    rig.ch.submit().map_err(|e| format!("submit: {e}"))?;
    let fd = rig.ch.completion_fd();
    let must_poll = rig.ch.must_poll();
    if fd.is_some() && !rig.wait_completion(Duration::from_secs(30)) {
        return Err("completion fd not readable within 30 s of a read".into());
    }
    let mut left = parts;
    let deadline = Instant::now() + BATCH_TIMEOUT;
    let mut first = true;
    while left > 0 {
        let n = rig.ch.poll(usize::MAX, |t, _| {
            if t == tag {
                left -= 1;
            }
        });
        if first && fd.is_none() && !must_poll && left > 0 {
            return Err(
                "no completion fd, must_poll false, and the read not complete at the first poll"
                    .into(),
            );
        }
        first = false;
        if n == 0 {
            if Instant::now() >= deadline {
                return Err("read never completed".into());
            }
            rig.wait_completion(Duration::from_millis(50));
        }
    }
    Ok(())
}

fn case_drain(rig: &mut Rig) -> Result<(), String> {
    let iovs: Vec<IovecList> = (0..8).map(|i| rig.iov(&[(i * 8192, 4096)])).collect();
    let ops: Vec<IoOp<'_>> = iovs
        .iter()
        .enumerate()
        .map(|(i, iov)| IoOp::Read {
            offset: rig.at(i as u64 * 4096),
            iov,
        })
        .collect();
    // `run` queues and submits first; drain is told about every tag before the wait.
    let first = rig.next_tag;
    let mut parts = Vec::new();
    for op in &ops {
        let tag = rig.next_tag;
        rig.next_tag = rig.next_tag.wrapping_add(1);
        // SAFETY: the iovecs and the memory outlive every completion, waited for below.
        let n = unsafe { rig.ch.queue_for(&rig.target, tag, *op) }
            .map_err(|_| "queue refused a read on an idle channel".to_owned())?;
        parts.push(n);
    }
    rig.ch.submit().map_err(|e| format!("submit: {e}"))?;
    let end = rig.next_tag;
    rig.ch
        .drain(|t| t.wrapping_sub(first) < end.wrapping_sub(first));
    let mut left: u32 = parts.iter().sum();
    let deadline = Instant::now() + BATCH_TIMEOUT;
    while left > 0 {
        rig.ch.submit().map_err(|e| format!("submit: {e}"))?;
        let mut stray = None;
        let n = rig.ch.poll(usize::MAX, |t, _| {
            if t.wrapping_sub(first) < end.wrapping_sub(first) {
                left -= 1;
            } else {
                stray = Some(t);
            }
        });
        if let Some(t) = stray {
            return Err(format!("completion for tag {t}, not in flight"));
        }
        if n == 0 {
            if Instant::now() >= deadline {
                return Err(format!("{left} drained reads never completed"));
            }
            rig.wait_completion(Duration::from_millis(50));
        }
    }
    Ok(())
}

type Case = fn(&mut Rig) -> Result<(), String>;

const CASES: &[(&str, Case)] = &[
    ("geometry", case_geometry),
    ("first-and-last-blocks", case_first_and_last_blocks),
    ("vectored", case_vectored),
    ("unaligned-buffers", case_unaligned_buffers),
    ("large", case_large),
    ("many-in-flight", case_many_in_flight),
    ("has-room", case_has_room),
    ("flush", case_flush),
    ("write-zeroes", case_write_zeroes),
    ("discard", case_discard),
    ("wakeup", case_wakeup),
    ("drain", case_drain),
];

fn open(vubd_args: &[String], base: u64) -> Result<Rig, String> {
    if base % 4096 != 0 {
        return Err(format!("--base {base} is not a multiple of 4096"));
    }
    let cfg = Config::from_args(
        ["--socket-path", "channel-check.sock"]
            .into_iter()
            .map(str::to_owned)
            .chain(vubd_args.iter().cloned()),
    )?;
    let disk = vubd::daemon::open_disks(&cfg)
        .map_err(|e| vubd::daemon::error_chain(&e))?
        .pop()
        .ok_or("no disk")?;
    let mem: MemSnapshot = Arc::new(
        GuestMemory::from_ranges(&[(GuestAddress(0), MEM_SIZE)])
            .map_err(|e| format!("guest memory: {e}"))?,
    );
    let dma = match disk.guest_memory_hook() {
        Some(mut hook) => {
            hook.memory_changed(Arc::clone(&mem))
                .map_err(|e| format!("DMA-map guest memory: {e}"))?;
            Some(hook)
        }
        None => None,
    };
    let ch = disk
        .open_channel(DEPTH)
        .map_err(|e| format!("open a channel: {e}"))?;
    Ok(Rig {
        _dma: dma,
        base,
        keeps_data: !matches!(*disk, Disk::Null(_)),
        target: disk.target(),
        map: HostMap::new(Arc::clone(&mem)),
        mem,
        ch,
        disk,
        next_tag: 1,
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut rig = match open(&cli.vubd, cli.base) {
        Ok(rig) => rig,
        Err(e) => {
            println!("CHANNEL-CHECK-FAILED cannot open the disk: {e}");
            return ExitCode::FAILURE;
        }
    };
    let (mut passed, mut failed) = (0, 0);
    for (name, case) in CASES {
        match case(&mut rig) {
            Ok(()) => {
                passed += 1;
                println!("CHANNEL-CHECK case={name} ok");
            }
            Err(why) => {
                failed += 1;
                println!("CHANNEL-CHECK case={name} FAIL {why}");
                if *name == "geometry" {
                    // The other cases would write where they have no business.
                    break;
                }
            }
        }
    }
    println!(
        "CHANNEL-CHECK-RESULT disk={} passed={passed} failed={failed}",
        cli.vubd.join(" ")
    );
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
