//! A fixed count of 4 KiB reads on one queue of a vhost-user-blk backend, through the tests'
//! own frontend (`tests/common/frontend.rs`), with inflight I/O tracking (INFLIGHT_SHMFD: the
//! region, and the backend's stores into it) on or off, and with dirty page logging (a
//! migration's log: LOG_SHMFD, SET_LOG_BASE, VHOST_F_LOG_ALL) on or off.
//! `benches/inflight_callgrind.sh` runs it against vubd's null device under callgrind to price
//! what tracking and logging add per I/O.
//!
//! ```sh
//! cargo run --release --example vhost_frontend_load -- --socket vubd.sock --qd 32 \
//!     --ios 200000 --inflight on --dirty-log off --cpu 0
//! ```
//!
//! It keeps `--qd` reads in flight, spins on the used ring (it asks for no interrupts, like
//! loadgen's `--mode poll`), submits one read per completion and publishes them once per pass,
//! kicking only when the backend wants kicks. `--idle SECS` reads a burst of 1000, then stays
//! connected and idle for SECS: what the backend's empty polls cost. Reports the count, the
//! time and the kicks on one line. With `--dirty-log on` it fails unless the log has the
//! pages of the used ring and of every read's buffer and status byte marked at the end.

#[path = "../tests/common/frontend.rs"]
mod frontend;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use thiserror::Error;

use frontend::{BLOCK, BlkFrontend, FrontendError, Options, Request, SECTOR, STATUS_OK};

/// Reads of the burst that attaches the queue before an `--idle` wait.
const IDLE_BURST: u64 = 1000;

/// 4 KiB reads at a fixed queue depth through a frontend that may track inflight I/O.
#[derive(Clone, Debug, Parser)]
#[command(name = "vhost_frontend_load")]
struct Args {
    /// The backend's vhost-user socket.
    #[arg(long)]
    socket: PathBuf,
    /// Reads in flight.
    #[arg(long, default_value_t = 32)]
    qd: usize,
    /// Reads to complete.
    #[arg(long, default_value_t = 200_000)]
    ios: u64,
    /// Negotiate INFLIGHT_SHMFD (`on`) or not (`off`).
    #[arg(long, value_parser = ["on", "off"], default_value = "on")]
    inflight: String,
    /// Turn dirty page logging on (`on`: LOG_SHMFD, SET_LOG_BASE, VHOST_F_LOG_ALL) or not.
    #[arg(long, value_parser = ["on", "off"], default_value = "off")]
    dirty_log: String,
    /// Negotiate VIRTIO_F_RING_EVENT_IDX (`on`) or not (`off`).
    #[arg(long, value_parser = ["on", "off"], default_value = "on")]
    event_idx: String,
    /// Entries of the queue.
    #[arg(long, default_value_t = 256)]
    queue_size: u16,
    /// Pin this thread to a CPU.
    #[arg(long)]
    cpu: Option<usize>,
    /// After a burst of 1000 reads, stay idle this many seconds instead of reading `--ios`.
    #[arg(long)]
    idle: Option<f64>,
    /// Seconds to wait for the socket (a backend under valgrind starts slowly); also bounds
    /// each reply of the backend.
    #[arg(long, default_value_t = 60.0)]
    connect_timeout: f64,
}

#[derive(Debug, Error)]
enum Error {
    #[error("{0}")]
    Usage(&'static str),
    #[error("cannot pin to CPU {0}")]
    Pin(usize, #[source] std::io::Error),
    #[error("no backend on the socket within {0:?}")]
    ConnectTimeout(Duration),
    #[error("frontend")]
    Frontend(#[from] FrontendError),
    #[error("{0} reads failed")]
    Failed(u64),
    #[error("no completion for {0:?}")]
    Stalled(Duration),
    #[error("{} pages the backend wrote are not marked in the dirty log, first {:#x}", .0.len(), .0[0])]
    Unlogged(Vec<u64>),
}

/// Connects, retrying while the socket is missing or refuses, within `timeout`.
fn connect(args: &Args, timeout: Duration) -> Result<BlkFrontend, Error> {
    let opts = Options {
        queue_size: args.queue_size,
        inflight: args.inflight == "on",
        event_idx: args.event_idx == "on",
        dirty_log: args.dirty_log == "on",
        interrupts: false,
        reply_timeout: timeout,
        ..Options::new(1)
    };
    let deadline = Instant::now() + timeout;
    loop {
        match BlkFrontend::connect(&args.socket, opts) {
            Err(FrontendError::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                ) && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(FrontendError::Io(_)) if Instant::now() >= deadline => {
                return Err(Error::ConnectTimeout(timeout));
            }
            r => return Ok(r?),
        }
    }
}

/// A small deterministic generator (xorshift64) for the read offsets.
struct Offsets(u64, u64);

impl Offsets {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % self.1 * (BLOCK as u64 / SECTOR)
    }
}

/// Completes `ios` reads with `qd` in flight; returns the kicks it made.
fn run(fe: &mut BlkFrontend, qd: usize, ios: u64, stall: Duration) -> Result<u64, Error> {
    let blocks = (fe.capacity() / (BLOCK as u64 / SECTOR)).max(1);
    let mut offsets = Offsets(0x9e37_79b9_7f4a_7c15, blocks);
    let (mut issued, mut done, mut failed, mut kicks) = (0u64, 0u64, 0u64, 0u64);
    let (mut last, mut empty) = (Instant::now(), 0u32);
    let mut want = qd;
    loop {
        let mut submitted = false;
        while want > 0 && issued < ios {
            let read = Request::Read {
                sector: offsets.next(),
                len: BLOCK,
            };
            fe.submit(0, read, issued)?;
            issued += 1;
            want -= 1;
            submitted = true;
        }
        if submitted {
            kicks += u64::from(fe.notify(0)?);
        }
        if done == ios {
            break;
        }
        let n = fe.reap(0, |c, _| failed += u64::from(c.status != STATUS_OK))?;
        if n == 0 {
            // The clock once per wait, and then only now and then: the client must answer
            // the backend at once.
            if empty == 0 {
                last = Instant::now();
            }
            empty = empty.wrapping_add(1);
            if empty % 4096 == 0 && last.elapsed() > stall {
                return Err(Error::Stalled(stall));
            }
            std::hint::spin_loop();
            continue;
        }
        empty = 0;
        done += n as u64;
        want += n;
    }
    if failed > 0 {
        return Err(Error::Failed(failed));
    }
    Ok(kicks)
}

fn main_result() -> Result<(), Error> {
    let args = Args::parse();
    if args.qd == 0 || args.ios == 0 {
        return Err(Error::Usage("--qd and --ios must be positive"));
    }
    if args.connect_timeout <= 0.0 || args.connect_timeout > 600.0 {
        return Err(Error::Usage("--connect-timeout must be in (0, 600]"));
    }
    if let Some(cpu) = args.cpu {
        vubd::poller::pin_current_thread(cpu).map_err(|e| Error::Pin(cpu, e))?;
    }
    let timeout = Duration::from_secs_f64(args.connect_timeout);
    let mut fe = connect(&args, timeout)?;
    if usize::from(args.queue_size / 3) < args.qd {
        return Err(Error::Usage(
            "--qd needs 3 descriptors per read within --queue-size",
        ));
    }
    let tracked = if fe.tracks_inflight() { "on" } else { "off" };
    let start = Instant::now();
    let (ios, kicks) = match args.idle {
        Some(secs) => {
            let kicks = run(&mut fe, args.qd, IDLE_BURST, timeout)?;
            std::thread::sleep(Duration::from_secs_f64(secs));
            (IDLE_BURST, kicks)
        }
        None => (args.ios, run(&mut fe, args.qd, args.ios, timeout)?),
    };
    let secs = start.elapsed().as_secs_f64();
    // A cheap check that the backend really logged: every page it wrote is marked.
    let logged = if args.dirty_log == "on" {
        let missing = fe.unlogged_pages(0, ios);
        if !missing.is_empty() {
            return Err(Error::Unlogged(missing));
        }
        "on"
    } else {
        "off"
    };
    println!(
        "reads={ios} qd={} inflight={tracked} dirty_log={logged} event_idx={} secs={secs:.3} \
         iops={:.0} kicks={kicks}",
        args.qd,
        fe.event_idx(),
        ios as f64 / secs,
    );
    Ok(())
}

fn main() -> ExitCode {
    match main_result() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let mut msg = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                msg.push_str(&format!(": {s}"));
                source = s.source();
            }
            eprintln!("vhost_frontend_load: {msg}");
            ExitCode::FAILURE
        }
    }
}
