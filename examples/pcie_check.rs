//! Checks vubd's user-space NVMe PCIe driver on one controller bound to vfio-pci: opens it
//! with `nvme::pcie::PcieController`, creates an I/O queue, writes the `blkcheck` sector
//! pattern and reads it back twice, and deletes the queue:
//!
//! 1. at byte `--offset`: 64 KiB from a page-aligned buffer (PRP1 and a PRP list), read back
//!    into another aligned buffer;
//! 2. at `--offset` + 1 MiB: 8 KiB from three buffers that break the PRP rules (pieces that
//!    start and end inside pages), so the driver uses an SGL, or with `--no-sgl` (or a
//!    controller without SGLs) a bounce buffer; read back through another such layout.
//!
//! The data buffers are one anonymous mapping DMA-mapped like guest memory (IOVA = address).
//! With `--reset` it then resets the controller, sees the queue report itself lost, and reads
//! the first write back through a new queue.
//!
//! It prints one line and exits with status 0, or `PCIE-CHECK-FAILED <error>` and status 1:
//!
//! ```text
//! PCIE-CHECK bdf=0000:00:04.0 nsid=1 block=512 qid=1 queues=64 max_transfer=524288 sgl=byte aligned=65536 misaligned=8192 via=sgl bounces=0 verify=ok deleted=ok
//! ```
//!
//! With `--bench N` it checks nothing and times nothing: it submits N 4 KiB reads from
//! `--offset` on, in batches of `--qd` (submit the batch, ring the doorbell once, poll until
//! the whole batch completed), for counting instructions under callgrind
//! (`benches/pcie_callgrind.sh`). The driver's calls go through `bench_submit`,
//! `bench_doorbell` and `bench_poll`, never inlined, so their inclusive counts are the
//! driver's share; polls that find nothing are counted (`empty_polls=`), and then priced by
//! `--idle-polls M` polls of the empty queue through `bench_idle_poll`:
//!
//! ```text
//! PCIE-BENCH bdf=0000:00:04.0 nsid=1 block=512 qd=32 ios=3200 batches=100 polls=412 empty_polls=312 idle_polls=1000
//! ```

#[path = "blkcheck/pattern.rs"]
mod pattern;

use std::process::ExitCode;
use std::ptr::{self, NonNull};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use clap::Parser;
use vubd::nvme::data::DataRef;
use vubd::nvme::pcie::{PcieController, PcieError, PcieIoQueue, PcieOptions, SglAlign};
use vubd::nvme::spec::{Sqe, Status};

/// Bytes of the mapping holding the data buffers.
const ARENA: usize = 4 << 20;
/// Where in the arena the buffers of each case start.
const WRITE_ALIGNED: usize = 0;
const READ_ALIGNED: usize = 1 << 20;
const WRITE_MISALIGNED: usize = 2 << 20;
const READ_MISALIGNED: usize = 3 << 20;
const ALIGNED_LEN: usize = 64 << 10;
const MISALIGNED_LEN: usize = 8 << 10;
/// The second case's distance from `--offset`.
const MISALIGNED_AT: u64 = 1 << 20;

/// Checks the NVMe PCIe driver on one controller bound to vfio-pci.
#[derive(Debug, Parser)]
#[command(name = "pcie_check")]
struct Args {
    /// PCI address of the controller: 0000:01:00.0.
    bdf: String,
    /// Namespace to write.
    #[arg(long, default_value_t = 1)]
    nsid: u32,
    /// Byte offset of the first write (a multiple of the block size).
    #[arg(long, default_value_t = 0)]
    offset: u64,
    /// Seed of the sector pattern; 0x-prefixed hex or decimal.
    #[arg(long, default_value = "0x1ab", value_parser = parse_u64)]
    seed: u64,
    /// Describe misaligned data with bounce buffers, not SGLs.
    #[arg(long)]
    no_sgl: bool,
    /// Then reset the controller: the queue reports itself lost, a new one reads the first
    /// write back.
    #[arg(long)]
    reset: bool,
    /// Bound of each command, seconds.
    #[arg(long, default_value_t = 10)]
    timeout: u64,
    /// Instead of the check: submit this many 4 KiB reads, in batches of `--qd`.
    #[arg(long)]
    bench: Option<u64>,
    /// Batch size of `--bench` (1 to 32).
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u16).range(1..=32))]
    qd: u16,
    /// After `--bench`: this many polls of the empty queue.
    #[arg(long, default_value_t = 1000)]
    idle_polls: u64,
}

fn parse_u64(s: &str) -> Result<u64, String> {
    let r = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => s.parse(),
    };
    r.map_err(|e| format!("{s:?}: {e}"))
}

/// An anonymous mapping, DMA-mapped for the controller while it lives.
struct Arena {
    ptr: NonNull<u8>,
    ctrl: Arc<PcieController>,
}

impl Arena {
    fn new(ctrl: &Arc<PcieController>) -> Result<Arena, String> {
        // SAFETY: a new private anonymous mapping at an address the kernel picks.
        let p = unsafe {
            libc::mmap(
                ptr::null_mut(),
                ARENA,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(format!("mmap: {}", std::io::Error::last_os_error()));
        }
        let ptr = NonNull::new(p.cast::<u8>()).ok_or("mmap returned NULL")?;
        // SAFETY: the mapping stays until `drop`, which unmaps it from the IOMMU first; it is
        // reached only through raw pointers (copies in `put` / `get`).
        if let Err(e) = unsafe { ctrl.dma_map(ptr.as_ptr(), ARENA) } {
            // SAFETY: the mapping made above, never handed out.
            unsafe { libc::munmap(p, ARENA) };
            return Err(format!("dma_map: {e}"));
        }
        Ok(Arena {
            ptr,
            ctrl: ctrl.clone(),
        })
    }

    fn at(&self, off: usize) -> *mut u8 {
        assert!(off < ARENA);
        self.ptr.as_ptr().wrapping_add(off)
    }

    /// Copies `bytes` into the arena at `off`; the controller is not using that part.
    fn put(&self, off: usize, bytes: &[u8]) {
        assert!(off + bytes.len() <= ARENA);
        // SAFETY: inside the mapping (checked); no command uses this part now.
        unsafe { ptr::copy_nonoverlapping(bytes.as_ptr(), self.at(off), bytes.len()) }
    }

    fn get(&self, off: usize, len: usize) -> Vec<u8> {
        assert!(off + len <= ARENA);
        let mut out = vec![0u8; len];
        // SAFETY: inside the mapping (checked); the command that wrote it has completed.
        unsafe { ptr::copy_nonoverlapping(self.at(off), out.as_mut_ptr(), len) }
        out
    }

    fn iov(&self, off: usize, len: usize) -> libc::iovec {
        libc::iovec {
            iov_base: self.at(off).cast(),
            iov_len: len,
        }
    }
}

impl Drop for Arena {
    fn drop(&mut self) {
        if self.ctrl.dma_unmap(self.ptr.as_ptr() as u64, ARENA).is_ok() {
            // SAFETY: no longer mapped for the device; the mapping is ours, of this length.
            unsafe { libc::munmap(self.ptr.as_ptr().cast(), ARENA) };
        }
    }
}

/// Runs one command to completion.
fn run(
    q: &mut PcieIoQueue,
    sqe: Sqe,
    iov: &[libc::iovec],
    to_device: bool,
    timeout: Duration,
) -> Result<(), String> {
    let len = iov.iter().map(|v| v.iov_len).sum();
    // SAFETY: the iovecs point into the arena, mapped and DMA-mapped until after this
    // function returns; `iov` outlives the command (it completes or times out here).
    let data = unsafe { DataRef::new(iov, 0, len) }.ok_or("iovecs shorter than the data")?;
    q.submit(7, sqe, Some((data, to_device)))
        .map_err(|e| e.to_string())?;
    q.ring_doorbell();
    let start = Instant::now();
    let mut status: Option<Status> = None;
    while status.is_none() {
        q.poll(|user, s| {
            if user == 7 {
                status = Some(s);
            }
        })
        .map_err(|e| e.to_string())?;
        if start.elapsed() > timeout {
            return Err(format!("no completion within {timeout:?}"));
        }
        if status.is_none() {
            thread::sleep(Duration::from_micros(20));
        }
    }
    match status {
        Some(s) if s.is_success() => Ok(()),
        Some(s) => Err(format!("command failed: {s}")),
        None => Err("no status".into()),
    }
}

/// Bytes of each read of `--bench`.
const BENCH_IO: usize = 4096;

/// Queues one read of `--bench`; never inlined, so callgrind counts the driver's submit
/// (PRP build included) under this name.
#[inline(never)]
fn bench_submit(q: &mut PcieIoQueue, user: u32, sqe: Sqe, iov: &[libc::iovec]) -> bool {
    // SAFETY: the iovec points into the arena, mapped and DMA-mapped until the bench has
    // polled every read it submitted.
    let Some(data) = (unsafe { DataRef::new(iov, 0, BENCH_IO) }) else {
        return false;
    };
    q.submit(user, sqe, Some((data, false))).is_ok()
}

#[inline(never)]
fn bench_doorbell(q: &mut PcieIoQueue) {
    q.ring_doorbell();
}

/// One poll of the bench's queue: how many completed, and how many of them failed.
#[inline(never)]
fn bench_poll(q: &mut PcieIoQueue, failed: &mut u64) -> Result<usize, PcieError> {
    q.poll(|_, s| {
        if !s.is_success() {
            *failed += 1;
        }
    })
}

/// A poll of the empty queue, counted apart.
#[inline(never)]
fn bench_idle_poll(q: &mut PcieIoQueue, failed: &mut u64) -> Result<usize, PcieError> {
    q.poll(|_, s| {
        if !s.is_success() {
            *failed += 1;
        }
    })
}

/// `--bench`: N reads of 4 KiB in batches of `--qd`.
fn bench(args: &Args, ios: u64) -> Result<String, String> {
    let opts = PcieOptions {
        io_timeout: Duration::from_secs(args.timeout),
        use_sgl: !args.no_sgl,
        ..PcieOptions::default()
    };
    let ctrl = PcieController::open(&args.bdf, &opts).map_err(|e| e.to_string())?;
    let ns = ctrl.namespace(args.nsid).map_err(|e| e.to_string())?;
    let block = u64::from(ns.block_size());
    let qd = usize::from(args.qd);
    // The reads cycle through 256 blocks of 4 KiB from --offset.
    let span = 256 * BENCH_IO as u64;
    if args.offset % block != 0 || args.offset + span > ns.nsze * block {
        return Err(format!(
            "--offset {} is not a multiple of {block} or leaves less than {span} bytes",
            args.offset
        ));
    }
    let arena = Arena::new(&ctrl)?;
    let mut q = ctrl.create_io_queue(64).map_err(|e| e.to_string())?;
    let nlb = u16::try_from(BENCH_IO as u64 / block - 1).map_err(|e| e.to_string())?;
    // One page of the arena per command of a batch.
    let iovs: Vec<libc::iovec> = (0..qd).map(|i| arena.iov(i * BENCH_IO, BENCH_IO)).collect();
    let timeout = opts.io_timeout;
    let (mut done, mut batches, mut polls, mut empty, mut failed) = (0u64, 0u64, 0u64, 0u64, 0u64);
    while done < ios {
        let n = usize::try_from((ios - done).min(qd as u64)).unwrap_or(qd);
        for (i, iov) in iovs[..n].iter().enumerate() {
            let k = done + i as u64;
            let slba = (args.offset + k % 256 * BENCH_IO as u64) / block;
            let user = u32::try_from(i).unwrap_or(u32::MAX);
            if !bench_submit(
                &mut q,
                user,
                Sqe::read(args.nsid, slba, nlb, false),
                std::slice::from_ref(iov),
            ) {
                return Err(format!("submit of read {k} failed"));
            }
        }
        bench_doorbell(&mut q);
        let start = Instant::now();
        let mut got = 0;
        while got < n {
            let c = bench_poll(&mut q, &mut failed).map_err(|e| e.to_string())?;
            polls += 1;
            if c == 0 {
                empty += 1;
                if start.elapsed() > timeout {
                    return Err(format!(
                        "batch {batches}: {got} of {n} completed within {timeout:?}"
                    ));
                }
            }
            got += c;
        }
        done += n as u64;
        batches += 1;
    }
    for _ in 0..args.idle_polls {
        if bench_idle_poll(&mut q, &mut failed).map_err(|e| e.to_string())? != 0 {
            return Err("a completion on the empty queue".into());
        }
    }
    if failed > 0 {
        return Err(format!("{failed} reads failed"));
    }
    q.delete().map_err(|e| format!("delete the queue: {e}"))?;
    drop(arena);
    Ok(format!(
        "PCIE-BENCH bdf={} nsid={} block={block} qd={qd} ios={done} batches={batches} \
         polls={polls} empty_polls={empty} idle_polls={}",
        ctrl.bdf(),
        args.nsid,
        args.idle_polls,
    ))
}

fn check(args: &Args) -> Result<String, String> {
    let opts = PcieOptions {
        io_timeout: Duration::from_secs(args.timeout),
        use_sgl: !args.no_sgl,
        ..PcieOptions::default()
    };
    let ctrl = PcieController::open(&args.bdf, &opts).map_err(|e| e.to_string())?;
    let ns = ctrl.namespace(args.nsid).map_err(|e| e.to_string())?;
    let block = u64::from(ns.block_size());
    if args.offset % block != 0 {
        return Err(format!(
            "--offset {} is not a multiple of {block}",
            args.offset
        ));
    }
    let end = args.offset + MISALIGNED_AT + MISALIGNED_LEN as u64;
    if end > ns.nsze * block {
        return Err(format!(
            "namespace of {} bytes is too small",
            ns.nsze * block
        ));
    }
    let timeout = opts.io_timeout;
    let arena = Arena::new(&ctrl)?;
    let mut q = ctrl.create_io_queue(32).map_err(|e| e.to_string())?;
    let qid = q.qid();
    let nlb = |len: usize| u16::try_from(len as u64 / block - 1).unwrap_or(u16::MAX);

    // 1. Aligned: PRP1 and a PRP list.
    let slba = args.offset / block;
    arena.put(
        WRITE_ALIGNED,
        &pattern::bytes(args.seed, args.offset, ALIGNED_LEN),
    );
    let w = [arena.iov(WRITE_ALIGNED, ALIGNED_LEN)];
    run(
        &mut q,
        Sqe::write(args.nsid, slba, nlb(ALIGNED_LEN), false),
        &w,
        true,
        timeout,
    )
    .map_err(|e| format!("aligned write: {e}"))?;
    let r = [arena.iov(READ_ALIGNED, ALIGNED_LEN)];
    run(
        &mut q,
        Sqe::read(args.nsid, slba, nlb(ALIGNED_LEN), false),
        &r,
        false,
        timeout,
    )
    .map_err(|e| format!("aligned read: {e}"))?;
    if arena.get(READ_ALIGNED, ALIGNED_LEN) != arena.get(WRITE_ALIGNED, ALIGNED_LEN) {
        return Err("aligned: read back differs from what was written".into());
    }

    // 2. Misaligned: pieces that start and end inside pages.
    let at = args.offset + MISALIGNED_AT;
    let want = pattern::bytes(args.seed, at, MISALIGNED_LEN);
    let pieces = [
        (0x10usize, 1000usize),
        (0x2000 + 0x204, 5000),
        (0x5000 + 0x30, 0),
    ];
    let last = MISALIGNED_LEN - pieces[0].1 - pieces[1].1;
    let mut w = Vec::new();
    let mut pos = 0;
    for (i, &(off, len)) in pieces.iter().enumerate() {
        let len = if i == 2 { last } else { len };
        arena.put(WRITE_MISALIGNED + off, &want[pos..pos + len]);
        w.push(arena.iov(WRITE_MISALIGNED + off, len));
        pos += len;
    }
    let slba = at / block;
    run(
        &mut q,
        Sqe::write(args.nsid, slba, nlb(MISALIGNED_LEN), false),
        &w,
        true,
        timeout,
    )
    .map_err(|e| format!("misaligned write: {e}"))?;
    let reads = [(0x8usize, 3000usize), (0x3000 + 0x10, 5192)];
    let r: Vec<libc::iovec> = reads
        .iter()
        .map(|&(off, len)| arena.iov(READ_MISALIGNED + off, len))
        .collect();
    run(
        &mut q,
        Sqe::read(args.nsid, slba, nlb(MISALIGNED_LEN), false),
        &r,
        false,
        timeout,
    )
    .map_err(|e| format!("misaligned read: {e}"))?;
    let mut got = Vec::new();
    for &(off, len) in &reads {
        got.extend(arena.get(READ_MISALIGNED + off, len));
    }
    if got != want {
        return Err("misaligned: read back differs from what was written".into());
    }
    let bounces = q.bounces();
    if ctrl.bounced() != bounces {
        return Err(format!(
            "the controller counts {} bounced commands, its only queue {bounces}",
            ctrl.bounced()
        ));
    }
    let sgl = match ctrl.sgl_align() {
        Some(SglAlign::Byte) => "byte",
        Some(SglAlign::Dword) => "dword",
        None => "none",
    };
    let via = if bounces > 0 { "bounce" } else { "sgl" };
    let mut reset = String::new();
    if args.reset {
        ctrl.reset().map_err(|e| format!("reset: {e}"))?;
        match q.poll(|_, _| {}) {
            Err(PcieError::QueueLost { .. }) => {}
            other => return Err(format!("old queue after the reset: {other:?}")),
        }
        let mut lost = 0;
        q.drain(|_| lost += 1);
        drop(q);
        q = ctrl.create_io_queue(32).map_err(|e| e.to_string())?;
        let r = [arena.iov(READ_ALIGNED, ALIGNED_LEN)];
        arena.put(READ_ALIGNED, &vec![0u8; ALIGNED_LEN]);
        run(
            &mut q,
            Sqe::read(args.nsid, args.offset / block, nlb(ALIGNED_LEN), false),
            &r,
            false,
            timeout,
        )
        .map_err(|e| format!("read after the reset: {e}"))?;
        if arena.get(READ_ALIGNED, ALIGNED_LEN) != arena.get(WRITE_ALIGNED, ALIGNED_LEN) {
            return Err("after the reset: read back differs from what was written".into());
        }
        reset = format!(
            " reset=ok generation={} lost={lost} new_qid={}",
            ctrl.generation(),
            q.qid()
        );
    }
    q.delete().map_err(|e| format!("delete the queue: {e}"))?;
    drop(arena);
    Ok(format!(
        "PCIE-CHECK bdf={} nsid={} block={block} qid={qid} queues={} max_transfer={} sgl={sgl} \
         aligned={ALIGNED_LEN} misaligned={MISALIGNED_LEN} via={via} bounces={bounces} \
         verify=ok deleted=ok{reset}",
        ctrl.bdf(),
        args.nsid,
        ctrl.io_queues_granted(),
        ctrl.max_transfer_bytes().unwrap_or(0),
    ))
}

fn main() -> ExitCode {
    let args = Args::parse();
    let result = match args.bench {
        Some(ios) => bench(&args, ios),
        None => check(&args),
    };
    match result {
        Ok(line) => {
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!("PCIE-CHECK-FAILED {e}");
            ExitCode::FAILURE
        }
    }
}
