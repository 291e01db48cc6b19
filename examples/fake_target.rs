//! The test suite's fake NVMe/TCP target as a program, for benchmarks of the NVMe/TCP
//! initiator on loopback and for poking at it by hand:
//!
//! ```sh
//! cargo run --release --example fake_target -- --listen 127.0.0.1:4420 \
//!     --nqn nqn.2014-08.org.vubd:bench --ns-size 1G --block-size 4096 --null --cpus 2-3
//! ```
//!
//! Prints `LISTENING ADDRESS:PORT` once it accepts connections, then serves until killed.
//! The target itself is `tests/common/fake_target` (see its module documentation).

#[path = "../tests/common/fake_target/mod.rs"]
// The fault knobs and counters are for tests; this program does not use them.
#[allow(dead_code)]
mod fake_target;

use std::net::SocketAddr;
use std::process::ExitCode;
use std::thread;

use clap::Parser;
use thiserror::Error;

use fake_target::{FakeTarget, Options};

/// A small NVMe/TCP target with one namespace, in RAM or null.
#[derive(Clone, Debug, Parser)]
#[command(name = "fake_target")]
struct Args {
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, value_name = "ADDR:PORT")]
    listen: SocketAddr,
    /// NQN of the NVM subsystem.
    #[arg(long)]
    nqn: String,
    /// Namespace size: bytes, or with a K, M, G or T suffix (binary multiples).
    #[arg(long, default_value = "1G", value_name = "SIZE")]
    ns_size: String,
    /// Logical block size: 512 or 4096.
    #[arg(long, default_value_t = 512, value_name = "BYTES")]
    block_size: u32,
    /// No storage: reads return zeros, writes are dropped.
    #[arg(long)]
    null: bool,
    /// MAXH2CDATA announced in ICResp.
    #[arg(long, value_name = "BYTES")]
    maxh2cdata: Option<u32>,
    /// IOCCSZ in 16-byte units (the 64-byte SQE and the in-capsule data).
    #[arg(long, value_name = "N")]
    ioccsz: Option<u32>,
    /// MDTS: largest transfer is 4096 << N bytes, 0 for no limit.
    #[arg(long, value_name = "N")]
    mdts: Option<u8>,
    /// CPUs to pin connection threads to, round-robin: `2,3`, `2-5`.
    #[arg(long, value_name = "LIST")]
    cpus: Option<String>,
}

#[derive(Debug, Error)]
enum ArgsError {
    #[error("--ns-size {0:?}: not a size")]
    Size(String),
    #[error(transparent)]
    Cpus(vubd::config::ConfigError),
    #[error("bad target options")]
    Options(#[source] std::io::Error),
}

/// `1024`, `4K`, `512M`, `16G`, `2T` (binary multiples).
fn parse_size(s: &str) -> Option<u64> {
    let shift = match s.as_bytes().last()?.to_ascii_uppercase() {
        b'K' => 10,
        b'M' => 20,
        b'G' => 30,
        b'T' => 40,
        _ => 0,
    };
    let digits = if shift == 0 { s } else { &s[..s.len() - 1] };
    digits.parse::<u64>().ok()?.checked_mul(1 << shift)
}

impl TryFrom<Args> for Options {
    type Error = ArgsError;

    fn try_from(a: Args) -> Result<Options, ArgsError> {
        let d = Options::default();
        let ns_size = parse_size(&a.ns_size).ok_or_else(|| ArgsError::Size(a.ns_size.clone()))?;
        let cpus = match &a.cpus {
            Some(list) => vubd::config::parse_cpus(list, &vubd::poller::allowed_cpus())
                .map_err(ArgsError::Cpus)?,
            None => Vec::new(),
        };
        let opts = Options {
            nqn: a.nqn,
            ns_size,
            block_size: a.block_size,
            null: a.null,
            maxh2cdata: a.maxh2cdata.unwrap_or(d.maxh2cdata),
            ioccsz: a.ioccsz.unwrap_or(d.ioccsz),
            mdts: a.mdts.unwrap_or(d.mdts),
            cpus,
            ..d
        };
        opts.check().map_err(ArgsError::Options)?;
        Ok(opts)
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    let listen = args.listen;
    let opts = match Options::try_from(args) {
        Ok(o) => o,
        Err(e) => {
            match std::error::Error::source(&e) {
                Some(cause) => eprintln!("fake_target: {e}: {cause}"),
                None => eprintln!("fake_target: {e}"),
            }
            return ExitCode::from(2);
        }
    };
    let target = match FakeTarget::start_on(listen, opts) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("fake_target: listen on {listen}: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!("LISTENING {}", target.addr());
    loop {
        thread::park();
    }
}
