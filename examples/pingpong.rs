//! The cross-CPU floor of a request: how long one cache line takes to go from one CPU to
//! another and back.
//!
//! ```sh
//! cargo run --release --example pingpong -- --cpus 0,1 --json
//! ```
//!
//! Two threads, pinned to the two CPUs, bounce a counter through two cache lines: the first
//! stores `i` into line A and spins until line B holds `i`; the second spins on A and answers
//! on B. One round trip is the least any request between a client on one CPU and a backend
//! on the other can take (the client's avail index must reach the backend, the backend's used
//! index must come back), before either side does any work. `benches/compare.sh` runs it to
//! bound what the QD 1 rows can reach on the machine at hand.
//!
//! Every loop is bounded: each trial by `--round-trips` and by a deadline, after which the
//! partner gives up and the trial is reported as failed.

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;

/// Measures the round trip of a cache line between two CPUs.
#[derive(Debug, Parser)]
#[command(name = "pingpong")]
struct Args {
    /// The two CPUs: the first one's thread starts each round trip (the client's CPU), the
    /// second one's answers (the backend's).
    #[arg(long, value_parser = parse_pair, default_value = "0,1")]
    cpus: (usize, usize),
    /// Round trips per trial.
    #[arg(long, default_value_t = 1_000_000)]
    round_trips: u64,
    /// Trials; the fastest is reported (noise only ever adds time).
    #[arg(long, default_value_t = 5)]
    trials: usize,
    /// Seconds a trial may take before it counts as failed.
    #[arg(long, default_value_t = 10)]
    timeout: u64,
    /// Print one JSON line instead of text.
    #[arg(long)]
    json: bool,
}

/// One cache line to itself (x86's adjacent-line prefetcher pairs lines, hence 128 bytes).
#[repr(align(128))]
struct Line(AtomicU64);

struct Shared {
    ping: Line,
    pong: Line,
    give_up: AtomicBool,
}

fn parse_pair(s: &str) -> Result<(usize, usize), String> {
    let (a, b) = s
        .split_once(',')
        .ok_or_else(|| format!("{s:?}: expected two CPUs, like 0,1"))?;
    let cpu = |x: &str| {
        x.trim()
            .parse::<usize>()
            .map_err(|_| format!("{x:?}: not a CPU number"))
    };
    let (a, b) = (cpu(a)?, cpu(b)?);
    if a == b {
        return Err(format!("{s:?}: the two CPUs must differ"));
    }
    Ok((a, b))
}

/// Spins until `line` holds `want`, or the deadline passes (checked every 4096 spins).
fn wait_for(line: &Line, want: u64, deadline: Instant, give_up: &AtomicBool) -> bool {
    let mut spins = 0u32;
    while line.0.load(Ordering::Acquire) != want {
        std::hint::spin_loop();
        spins = spins.wrapping_add(1);
        if spins % 4096 == 0 && (Instant::now() > deadline || give_up.load(Ordering::Relaxed)) {
            return false;
        }
    }
    true
}

/// One trial: the mean round trip in nanoseconds, or `None` if the partner stopped answering.
fn trial(args: &Args) -> Result<Option<f64>, String> {
    let shared = Shared {
        ping: Line(AtomicU64::new(0)),
        pong: Line(AtomicU64::new(0)),
        give_up: AtomicBool::new(false),
    };
    let n = args.round_trips;
    let deadline = Instant::now() + Duration::from_secs(args.timeout);
    std::thread::scope(|s| {
        let answer = s.spawn(|| {
            let answered = (|| -> Result<bool, String> {
                vubd::poller::pin_current_thread(args.cpus.1)
                    .map_err(|e| format!("--cpus: cannot run on CPU {}: {e}", args.cpus.1))?;
                for i in 1..=n {
                    if !wait_for(&shared.ping, i, deadline, &shared.give_up) {
                        return Ok(false);
                    }
                    shared.pong.0.store(i, Ordering::Release);
                }
                Ok(true)
            })();
            // The other side must not wait out its deadline for answers that will not come.
            shared.give_up.store(true, Ordering::Relaxed);
            answered
        });
        let result = (|| -> Result<Option<f64>, String> {
            vubd::poller::pin_current_thread(args.cpus.0)
                .map_err(|e| format!("--cpus: cannot run on CPU {}: {e}", args.cpus.0))?;
            let start = Instant::now();
            for i in 1..=n {
                shared.ping.0.store(i, Ordering::Release);
                if !wait_for(&shared.pong, i, deadline, &shared.give_up) {
                    return Ok(None);
                }
            }
            Ok(Some(start.elapsed().as_nanos() as f64 / n as f64))
        })();
        // Whatever happened here, the partner must not wait out its deadline.
        shared.give_up.store(true, Ordering::Relaxed);
        let answered = answer
            .join()
            .map_err(|_| "the answering thread panicked".to_string())??;
        Ok(result?.filter(|_| answered))
    })
}

fn main() -> ExitCode {
    let args = Args::parse();
    if args.round_trips == 0 || args.trials == 0 {
        eprintln!("pingpong: --round-trips and --trials must be positive");
        return ExitCode::from(2);
    }
    let mut ns = Vec::with_capacity(args.trials);
    for _ in 0..args.trials {
        match trial(&args) {
            Ok(Some(t)) => ns.push(t),
            Ok(None) => {
                eprintln!("pingpong: a trial did not finish in time (is a CPU overloaded?)");
                return ExitCode::FAILURE;
            }
            Err(e) => {
                eprintln!("pingpong: {e}");
                return ExitCode::from(2);
            }
        }
    }
    ns.sort_by(f64::total_cmp);
    let median = ns[ns.len() / 2];
    let (min, max) = (ns[0], ns[ns.len() - 1]);
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "cpus": [args.cpus.0, args.cpus.1],
                "round_trips": args.round_trips,
                "trials_ns": ns,
                "round_trip_ns": min,
                "median_ns": median,
            })
        );
    } else {
        println!(
            "CPU {} <-> CPU {}: round trip {min:.1} ns (fastest of {} trials; median {median:.1}, slowest {max:.1})",
            args.cpus.0,
            args.cpus.1,
            ns.len()
        );
    }
    ExitCode::SUCCESS
}
