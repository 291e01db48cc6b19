//! A load generator for vhost-user-blk backends, on libblkio's `virtio-blk-vhost-user` driver.
//!
//! ```sh
//! cargo run --release --example loadgen -- --socket vubd.sock --rw randread --bs 4k --qd 32 \
//!     --queues 1 --secs 10 --mode poll --backend-pid "$(pidof vubd)" --cpu 0 --json
//! ```
//!
//! One thread per queue keeps `--qd` requests in flight. `--mode poll` asks for poll queues
//! (the device never interrupts; the thread spins on the used ring); `--mode eventfd` sleeps
//! on each queue's completion eventfd. Reports IOPS, MB/s (10^6 bytes), latency percentiles
//! and, with `--backend-pid`, the backend's CPU time (utime + stime from `/proc`, per process
//! and per thread) per million I/Os; `--backend-thread NAME` adds the CPU µs per I/O of the
//! backend's threads of that name (`vubd-poller-0`). `--watch-pid` reports the CPU time of
//! another process over the same interval (an NVMe/TCP target behind the backend), so that it
//! does not count as other work on the machine. `--ios N` ends the run after N requests
//! instead of after `--secs` (which then only bounds it); `--idle` issues a short burst to
//! attach the queues, then submits nothing for `--secs` and reports what the backend burns
//! meanwhile.
//!
//! Every loop is bounded: connecting by `--connect-timeout`, the run by `--secs` (plus
//! `--warmup`), draining by a stall timeout.

#[path = "loadgen/hist.rs"]
mod hist;
#[path = "loadgen/procstat.rs"]
mod procstat;
#[path = "loadgen/worker.rs"]
mod worker;

use std::io;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Barrier, mpsc};
use std::time::{Duration, Instant};

use blkio::{Blkio, Blkioq, Errno, MemoryRegion};
use clap::Parser;
use serde_json::json;
use thiserror::Error;

use hist::Histogram;
use worker::{Mode, Plan, QueueStats, Rw, Window};

/// libblkio's driver for vhost-user-blk.
const DRIVER: &str = "virtio-blk-vhost-user";
/// I/Os per queue of the burst that attaches the queues before an `--idle` measurement.
const IDLE_BURST: u64 = 1000;
/// Percentiles reported, in parts per million.
const PERCENTILES: [(&str, u32); 4] = [
    ("p50", 500_000),
    ("p95", 950_000),
    ("p99", 990_000),
    ("p99.9", 999_000),
];

/// Load generator for vhost-user-blk backends (libblkio client).
#[derive(Clone, Debug, Parser)]
#[command(name = "loadgen")]
struct Args {
    /// The backend's vhost-user socket.
    #[arg(long, value_name = "PATH")]
    socket: PathBuf,
    /// Access pattern.
    #[arg(long, value_enum, default_value_t = Rw::Randread)]
    rw: Rw,
    /// Reads in percent for randrw.
    #[arg(long, value_name = "PCT", default_value_t = 50)]
    rwmixread: u64,
    /// Request size (bytes; k, m, g suffixes are powers of 1024).
    #[arg(long, value_name = "BYTES", default_value = "4k", value_parser = parse_size)]
    bs: u64,
    /// Requests kept in flight per queue.
    #[arg(long, value_name = "N", default_value_t = 32)]
    qd: usize,
    /// Queues, each driven by its own thread.
    #[arg(long, value_name = "N", default_value_t = 1)]
    queues: usize,
    /// Virtqueue size.
    #[arg(long, value_name = "N", default_value_t = 256)]
    queue_size: u16,
    /// Measured run time, seconds (with --ios: an upper bound).
    #[arg(long, value_name = "S", default_value_t = 10.0)]
    secs: f64,
    /// Unmeasured run time before the measurement, seconds.
    #[arg(long, value_name = "S", default_value_t = 0.0)]
    warmup: f64,
    /// Stop after this many requests in total (no warmup).
    #[arg(long, value_name = "N", conflicts_with = "warmup")]
    ios: Option<u64>,
    /// How completions are reaped.
    #[arg(long, value_enum, default_value_t = Mode::Poll)]
    mode: Mode,
    /// Size of the region of the disk to use, from its start (default: the whole disk).
    #[arg(long, value_name = "BYTES", value_parser = parse_size)]
    size: Option<u64>,
    /// Report the CPU time this process (and each of its threads) used during the run.
    #[arg(long, value_name = "PID")]
    backend_pid: Option<u32>,
    /// With --backend-pid: report the CPU time per I/O of the backend's threads of this name.
    #[arg(long, value_name = "NAME", requires = "backend_pid")]
    backend_thread: Option<String>,
    /// Also report the CPU time of this process over the same interval (may be repeated).
    #[arg(long, value_name = "PID")]
    watch_pid: Vec<u32>,
    /// Pin the load generator: queue thread i runs on the (i mod n)-th CPU of this list.
    #[arg(long, value_name = "LIST")]
    cpu: Option<String>,
    /// Attach the queues with a short burst, then stay idle for --secs.
    #[arg(long, conflicts_with = "ios")]
    idle: bool,
    /// Seed of the offset generator.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// How long to keep trying to connect, seconds.
    #[arg(long, value_name = "S", default_value_t = 10.0)]
    connect_timeout: f64,
    /// Print one JSON line on stdout (the table goes to stderr).
    #[arg(long)]
    json: bool,
    /// A label copied into the JSON line.
    #[arg(long)]
    label: Option<String>,
}

#[derive(Debug, Error)]
pub enum Error {
    #[error("{0}")]
    Usage(String),
    #[error("{what}")]
    Blkio {
        what: &'static str,
        #[source]
        source: blkio::Error,
    },
    #[error("no answer from the backend within {0:?}")]
    ConnectTimeout(Duration),
    #[error("no completion for {0:?} with {1} requests in flight")]
    Stalled(Duration, usize),
    #[error("reading /proc/{0}")]
    Proc(u32, #[source] io::Error),
    #[error("pinning to CPU {0}")]
    Pin(usize, #[source] io::Error),
    #[error("a queue thread panicked")]
    Panicked,
}

fn blkio_err(what: &'static str) -> impl FnOnce(blkio::Error) -> Error {
    move |source| Error::Blkio { what, source }
}

/// `4096`, `4k`, `4K`, `4KiB`, `16G`: k, m, g, t are powers of 1024.
fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (num, shift) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_lowercase() {
                'k' => 10,
                'm' => 20,
                'g' => 30,
                't' => 40,
                _ => return Err(format!("{s:?}: unknown size suffix")),
            };
            (&t[..i], shift)
        }
        _ => (t, 0),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?}: not a size like 4096, 4k or 16G"))?;
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("{s:?}: too large"))
}

/// `--cpu` as vubd reads `--cpus`: distinct CPUs this process may run on.
fn parse_cpus(s: &str) -> Result<Vec<usize>, Error> {
    vubd::config::parse_cpus(s, &vubd::poller::allowed_cpus())
        .map_err(|e| Error::Usage(e.to_string().replacen("--cpus", "--cpu", 1)))
}

fn pin_current_thread(cpu: usize) -> Result<(), Error> {
    vubd::poller::pin_current_thread(cpu).map_err(|e| Error::Pin(cpu, e))
}

/// A started device: its queues and the memory region that holds every queue's buffers.
struct Device {
    // Declared first so the queues are dropped before the device and its region.
    queues: Vec<Blkioq>,
    /// Kept alive for the queues: dropping it disconnects from the backend.
    _blkio: Blkio,
    region: MemoryRegion,
    capacity: u64,
    request_alignment: u64,
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device")
            .field("queues", &self.queues.len())
            .field("capacity", &self.capacity)
            .finish_non_exhaustive()
    }
}

/// Connects, sets up `queues` queues of the kind `mode` needs, and maps `buf_per_queue`
/// bytes of buffers for each.
fn start_device(args: &Args, buf_per_queue: usize) -> Result<Device, blkio::Error> {
    let mut blkio = Blkio::new(DRIVER)?;
    let path = args
        .socket
        .to_str()
        .ok_or_else(|| blkio::Error::new(Errno::INVAL, "socket path is not UTF-8"))?;
    blkio.set_str("path", path)?;
    blkio.connect()?;
    let queues = i32::try_from(args.queues).unwrap_or(i32::MAX);
    let (interrupt, poll) = match args.mode {
        Mode::Poll => (0, queues),
        Mode::Eventfd => (queues, 0),
    };
    blkio.set_i32("num-queues", interrupt)?;
    blkio.set_i32("num-poll-queues", poll)?;
    blkio.set_i32("queue-size", i32::from(args.queue_size))?;
    let capacity = blkio.get_u64("capacity")?;
    let request_alignment = u64::try_from(blkio.get_i32("request-alignment")?).unwrap_or(512);
    let align = usize::try_from(blkio.get_u64("mem-region-alignment")?)
        .unwrap_or(4096)
        .max(4096);
    let len = (buf_per_queue * args.queues).next_multiple_of(align);
    let region = blkio.alloc_mem_region(len)?;
    let started = blkio.start()?;
    blkio.map_mem_region(&region)?;
    let queues = match args.mode {
        Mode::Poll => started.poll_queues,
        Mode::Eventfd => started.queues,
    };
    Ok(Device {
        queues,
        _blkio: blkio,
        region,
        capacity,
        request_alignment,
    })
}

/// [`start_device`], retried while the socket is missing or refuses, within the timeout. A
/// backend that accepts and never answers leaves the helper thread blocked; the caller exits.
fn connect(args: &Args, buf_per_queue: usize) -> Result<Device, Error> {
    let timeout = Duration::from_secs_f64(args.connect_timeout);
    let deadline = Instant::now() + timeout;
    let (tx, rx) = mpsc::channel();
    let args = args.clone();
    std::thread::spawn(move || {
        loop {
            let r = start_device(&args, buf_per_queue);
            let retry = matches!(&r, Err(e)
                if [Errno::NOENT, Errno::CONNREFUSED].contains(&e.errno()))
                && Instant::now() < deadline;
            if !retry {
                let _ = tx.send(r);
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    match rx.recv_timeout(timeout + Duration::from_secs(1)) {
        Ok(r) => r.map_err(blkio_err("connecting")),
        Err(_) => Err(Error::ConnectTimeout(timeout)),
    }
}

/// The whole run's results.
#[derive(Debug)]
struct Report {
    secs: f64,
    hist: Histogram,
    bytes: u64,
    reads: u64,
    writes: u64,
    errors: u64,
    first_error: Option<i32>,
    backend: Option<(u32, procstat::Delta)>,
    /// Each `--watch-pid` process: pid, command name, CPU seconds.
    watched: Vec<(u32, String, f64)>,
    client_cpu: f64,
    /// Busy CPU seconds of the whole machine during the measurement.
    machine_cpu: f64,
}

/// Takes CPU samples of the backend (when asked for) and of this process.
#[derive(Debug)]
struct Sampler {
    backend: Option<u32>,
    watched: Vec<u32>,
}

/// One sample of each.
#[derive(Debug)]
struct Samples {
    backend: Option<procstat::Sample>,
    watched: Vec<procstat::Sample>,
    client: procstat::Sample,
}

impl Sampler {
    fn take(&self) -> Result<Samples, Error> {
        let sample = |pid: u32| procstat::sample(pid).map_err(|e| Error::Proc(pid, e));
        Ok(Samples {
            backend: self.backend.map(sample).transpose()?,
            watched: self
                .watched
                .iter()
                .map(|&pid| sample(pid))
                .collect::<Result<_, _>>()?,
            client: sample(std::process::id())?,
        })
    }
}

/// What the queue threads measured, merged, and the CPU samples around the measurement.
#[derive(Debug)]
struct Measured {
    stats: QueueStats,
    /// The last recorded completion.
    last: Option<Instant>,
    before: Samples,
    after: Samples,
}

/// Runs one thread per queue, each with its plan. A timed run samples CPU at the window's
/// `measure` and `end` instants; a count-bounded one before the threads start and after the
/// last of them finished.
fn drive(
    dev: &mut Device,
    sampler: &Sampler,
    cpus: &[usize],
    plans: Vec<Plan>,
    timed: bool,
) -> Result<Measured, Error> {
    let go = Barrier::new(plans.len() + 1);
    let window = plans[0].window;
    std::thread::scope(|s| {
        let mut handles = Vec::new();
        for (i, (q, plan)) in dev.queues.iter_mut().zip(plans).enumerate() {
            let cpu = (!cpus.is_empty()).then(|| cpus[i % cpus.len()]);
            let go = &go;
            handles.push(s.spawn(move || {
                // Reach the barrier even if pinning fails, or the other threads wait forever.
                let pinned = cpu.map_or(Ok(()), pin_current_thread);
                let stats = worker::run(q, &plan, go);
                pinned.and(stats)
            }));
        }
        let mut before = if timed { None } else { Some(sampler.take()?) };
        go.wait();
        let mut after = None;
        if timed {
            std::thread::sleep(window.measure.saturating_duration_since(Instant::now()));
            before = Some(sampler.take()?);
            std::thread::sleep(window.end.saturating_duration_since(Instant::now()));
            after = Some(sampler.take()?);
        }
        let mut stats = QueueStats::default();
        let mut last: Option<Instant> = None;
        for h in handles {
            let st = h.join().map_err(|_| Error::Panicked)??;
            stats.hist.merge(&st.hist);
            stats.bytes += st.bytes;
            stats.reads += st.reads;
            stats.writes += st.writes;
            stats.errors += st.errors;
            stats.first_error = stats.first_error.or(st.first_error);
            last = last.max(st.last);
        }
        let after = match after {
            Some(a) => a,
            None => sampler.take()?,
        };
        let before = match before {
            Some(b) => b,
            None => sampler.take()?,
        };
        Ok(Measured {
            stats,
            last,
            before,
            after,
        })
    })
}

/// Checks what can be checked before connecting.
fn validate(args: &Args) -> Result<(), Error> {
    let usage = |m: String| Err(Error::Usage(m));
    if args.bs == 0 || args.bs % 512 != 0 {
        return usage(format!(
            "--bs {}: must be a positive multiple of 512",
            args.bs
        ));
    }
    if !(1..=4096).contains(&args.qd) {
        return usage(format!("--qd {}: must be between 1 and 4096", args.qd));
    }
    if !(1..=64).contains(&args.queues) {
        return usage(format!(
            "--queues {}: must be between 1 and 64",
            args.queues
        ));
    }
    if !(args.secs > 0.0 && args.secs <= 86_400.0) {
        return usage(format!("--secs {}: must be in (0, 86400]", args.secs));
    }
    if !(0.0..=3600.0).contains(&args.warmup) {
        return usage(format!("--warmup {}: must be in [0, 3600]", args.warmup));
    }
    if !(args.connect_timeout > 0.0 && args.connect_timeout <= 600.0) {
        let t = args.connect_timeout;
        return usage(format!("--connect-timeout {t}: must be in (0, 600]"));
    }
    if args.rwmixread > 100 {
        return usage(format!(
            "--rwmixread {}: must be at most 100",
            args.rwmixread
        ));
    }
    if args.ios == Some(0) {
        return usage("--ios 0: must be positive".to_owned());
    }
    Ok(())
}

fn run(args: &Args) -> Result<Report, Error> {
    validate(args)?;
    let usage = |m: String| Err(Error::Usage(m));
    let cpus = match &args.cpu {
        Some(list) => parse_cpus(list)?,
        None => Vec::new(),
    };
    if let Some(&cpu) = cpus.first() {
        pin_current_thread(cpu)?;
    }
    let bs = usize::try_from(args.bs).map_err(|_| Error::Usage(format!("--bs {}", args.bs)))?;
    let buf_per_queue = (bs * args.qd).next_multiple_of(4096);
    let mut dev = connect(args, buf_per_queue)?;
    if args.bs % dev.request_alignment != 0 {
        return usage(format!(
            "--bs {}: not a multiple of the device's block size {}",
            args.bs, dev.request_alignment
        ));
    }
    let region_len = args.size.unwrap_or(dev.capacity);
    if region_len > dev.capacity || region_len < args.bs {
        return usage(format!(
            "--size {region_len}: must be between --bs and the disk's capacity {}",
            dev.capacity
        ));
    }
    let region_len = region_len / args.bs * args.bs;
    if dev.queues.len() != args.queues {
        return usage(format!("the device started {} queues", dev.queues.len()));
    }

    let base = dev.region.addr;
    let queues = args.queues as u64;
    let plans = |window: Window| -> Vec<Plan> {
        (0..args.queues)
            .map(|i| {
                let q = i as u64;
                // Queue i's share of the count: an even split, the remainder to the first.
                let max_ios = window.max_ios / queues + u64::from(q < window.max_ios % queues);
                Plan {
                    rw: args.rw,
                    read_pct: args.rwmixread,
                    bs: args.bs,
                    qd: args.qd,
                    region_start: 0,
                    region_len,
                    seq_start: (region_len / args.bs) * q / queues * args.bs,
                    mode: args.mode,
                    buf: base + i * buf_per_queue,
                    seed: args.seed ^ q.wrapping_mul(0x9e37_79b9_7f4a_7c15),
                    window: Window { max_ios, ..window },
                }
            })
            .collect()
    };
    let sampler = Sampler {
        backend: args.backend_pid,
        watched: args.watch_pid.clone(),
    };
    let secs = Duration::from_secs_f64(args.secs);
    let now = Instant::now();
    let (m, measured) = if args.idle {
        let burst = Window {
            measure: now,
            end: now + secs,
            max_ios: IDLE_BURST * queues,
        };
        drive(&mut dev, &sampler, &cpus, plans(burst), false)?;
        let before = sampler.take()?;
        std::thread::sleep(secs);
        let after = sampler.take()?;
        let m = Measured {
            stats: QueueStats::default(),
            last: None,
            before,
            after,
        };
        (m, secs)
    } else if let Some(ios) = args.ios {
        let window = Window {
            measure: now,
            end: now + secs,
            max_ios: ios,
        };
        let m = drive(&mut dev, &sampler, &cpus, plans(window), false)?;
        let measured = m.last.map_or(Duration::ZERO, |l| l.duration_since(now));
        (m, measured)
    } else {
        let measure = now + Duration::from_millis(20) + Duration::from_secs_f64(args.warmup);
        let window = Window {
            measure,
            end: measure + secs,
            max_ios: u64::MAX,
        };
        (drive(&mut dev, &sampler, &cpus, plans(window), true)?, secs)
    };
    drop(dev);
    let backend = match (args.backend_pid, &m.before.backend, &m.after.backend) {
        (Some(pid), Some(b0), Some(b1)) => Some((pid, procstat::delta(b0, b1))),
        _ => None,
    };
    let client = procstat::delta(&m.before.client, &m.after.client);
    let watched = (args.watch_pid.iter())
        .zip(m.before.watched.iter().zip(&m.after.watched))
        .map(|(&pid, (b0, b1))| (pid, procstat::comm(pid), procstat::delta(b0, b1).total))
        .collect();
    Ok(Report {
        secs: measured.as_secs_f64(),
        hist: m.stats.hist,
        bytes: m.stats.bytes,
        reads: m.stats.reads,
        writes: m.stats.writes,
        errors: m.stats.errors,
        first_error: m.stats.first_error,
        backend,
        watched,
        client_cpu: client.total,
        machine_cpu: client.machine,
    })
}

/// CPU seconds of the backend's threads named `name`.
fn thread_secs(d: &procstat::Delta, name: &str) -> f64 {
    d.threads
        .iter()
        .filter(|t| t.name == name)
        .map(|t| t.secs)
        .sum()
}

fn per_sec(n: f64, secs: f64) -> f64 {
    if secs > 0.0 { n / secs } else { 0.0 }
}

fn print_table(args: &Args, r: &Report, out: &mut dyn io::Write) -> io::Result<()> {
    let ios = r.hist.count();
    let us = |ns: u64| ns as f64 / 1000.0;
    writeln!(
        out,
        "{} bs={} qd={} queues={} mode={}{}: {} I/Os in {:.2} s, {} errors{}",
        format!("{:?}", args.rw).to_lowercase(),
        args.bs,
        args.qd,
        args.queues,
        format!("{:?}", args.mode).to_lowercase(),
        if args.idle { " (idle)" } else { "" },
        ios,
        r.secs,
        r.errors,
        r.first_error
            .map_or(String::new(), |e| format!(" (first: {e})")),
    )?;
    writeln!(
        out,
        "{:>12} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "IOPS", "MB/s", "mean us", "min us", "p50 us", "p95 us", "p99 us", "p99.9 us", "max us"
    )?;
    write!(
        out,
        "{:>12.0} {:>9.1} {:>9.2} {:>9.2}",
        per_sec(ios as f64, r.secs),
        per_sec(r.bytes as f64 / 1e6, r.secs),
        r.hist.mean() / 1000.0,
        us(r.hist.min()),
    )?;
    for (_, ppm) in PERCENTILES {
        write!(out, " {:>9.2}", us(r.hist.quantile_ppm(ppm)))?;
    }
    writeln!(out, " {:>9.2}", us(r.hist.max()))?;
    let mut other = r.machine_cpu - r.client_cpu;
    if let Some((pid, d)) = &r.backend {
        let (total, threads) = (d.total, &d.threads);
        other -= total;
        let per_mio = if ios > 0 {
            format!("{:.3} CPU s per million I/Os", total / (ios as f64 / 1e6))
        } else {
            "no I/O".to_owned()
        };
        writeln!(
            out,
            "backend {pid}: {total:.2} CPU s ({:.1} % of one CPU), {per_mio}",
            per_sec(total * 100.0, r.secs)
        )?;
        for t in threads.iter().filter(|t| t.secs > 0.0) {
            writeln!(out, "  {:>8} {:<16} {:.2} CPU s", t.tid, t.name, t.secs)?;
        }
        if let Some(name) = &args.backend_thread {
            let secs = thread_secs(d, name);
            let per_io = if ios > 0 {
                format!("{:.3} CPU us per I/O", secs * 1e6 / ios as f64)
            } else {
                "no I/O".to_owned()
            };
            writeln!(out, "  thread {name}: {secs:.2} CPU s, {per_io}")?;
        }
    }
    for (pid, name, secs) in &r.watched {
        other -= secs;
        writeln!(
            out,
            "watched {pid} ({name}): {secs:.2} CPU s ({:.1} % of one CPU)",
            per_sec(secs * 100.0, r.secs)
        )?;
    }
    writeln!(
        out,
        "load generator: {:.2} CPU s ({:.1} % of one CPU); rest of the machine: {:.2} CPU s",
        r.client_cpu,
        per_sec(r.client_cpu * 100.0, r.secs),
        other.max(0.0),
    )
}

fn to_json(args: &Args, r: &Report) -> serde_json::Value {
    let ios = r.hist.count();
    let mut lat = serde_json::Map::new();
    lat.insert("mean".into(), json!(r.hist.mean().round()));
    lat.insert("min".into(), json!(r.hist.min()));
    for (name, ppm) in PERCENTILES {
        lat.insert(name.into(), json!(r.hist.quantile_ppm(ppm)));
    }
    lat.insert("max".into(), json!(r.hist.max()));
    let backend = r.backend.as_ref().map(|(pid, d)| {
        let (total, threads) = (d.total, &d.threads);
        let thread = args.backend_thread.as_ref().map(|name| {
            let secs = thread_secs(d, name);
            json!({
                "name": name,
                "cpu_s": secs,
                "cpu_pct": per_sec(secs * 100.0, r.secs),
                "cpu_us_per_io": if ios > 0 { Some(secs * 1e6 / ios as f64) } else { None },
            })
        });
        json!({
            "pid": pid,
            "cpu_s": total,
            "cpu_pct": per_sec(total * 100.0, r.secs),
            "cpu_s_per_mio": if ios > 0 { Some(total / (ios as f64 / 1e6)) } else { None },
            "threads": threads.iter().map(|t| json!({
                "tid": t.tid, "name": t.name, "cpu_s": t.secs,
            })).collect::<Vec<_>>(),
            "thread": thread,
        })
    });
    json!({
        "label": args.label,
        "rw": format!("{:?}", args.rw).to_lowercase(),
        "bs": args.bs,
        "qd": args.qd,
        "queues": args.queues,
        "mode": format!("{:?}", args.mode).to_lowercase(),
        "idle": args.idle,
        "secs": r.secs,
        "ios": ios,
        "reads": r.reads,
        "writes": r.writes,
        "errors": r.errors,
        "iops": per_sec(ios as f64, r.secs),
        "mbps": per_sec(r.bytes as f64 / 1e6, r.secs),
        "lat_ns": lat,
        "backend": backend,
        "watched": r.watched.iter().map(|(pid, name, secs)| json!({
            "pid": pid, "name": name, "cpu_s": secs,
            "cpu_pct": per_sec(secs * 100.0, r.secs),
        })).collect::<Vec<_>>(),
        "client_cpu_s": r.client_cpu,
        "machine_cpu_s": r.machine_cpu,
    })
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(report) => {
            let table = if args.json {
                print_table(&args, &report, &mut io::stderr())
            } else {
                print_table(&args, &report, &mut io::stdout())
            };
            if args.json {
                println!("{}", to_json(&args, &report));
            }
            if table.is_err() || report.errors > 0 {
                return ExitCode::FAILURE;
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            let mut msg = format!("loadgen: {e}");
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                msg.push_str(&format!(": {s}"));
                source = s.source();
            }
            eprintln!("{msg}");
            // A helper thread may still be blocked on an unresponsive backend.
            std::process::exit(1);
        }
    }
}
