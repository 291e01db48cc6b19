//! Instructions per I/O of the NVMe PCIe core's submit and completion paths, without
//! hardware: 4 KiB reads with a one-page PRP, queued in batches, the SQ doorbell value taken
//! once per batch, a controller model ([`Loopback`]) completing them, and the completions
//! polled and mapped back to their commands.
//!
//! ```sh
//! cargo build --release --example pcie_cost
//! valgrind --tool=callgrind --callgrind-out-file=cg.pcie target/release/examples/pcie_cost 1000000 32
//! callgrind_annotate --inclusive=yes cg.pcie | grep -E 'pcie_cost::(submit|complete)_batch'
//! ```
//!
//! The inclusive counts of `submit_batch` and `complete_batch`, divided by the number of
//! I/Os, are the driver's share; `Loopback::sq_doorbell` is the model's and does not count.

use std::hint::black_box;
use std::process::ExitCode;

use vubd::nvme::pcie::prp::{self, PrpList};
use vubd::nvme::pcie::ring::SqSlot;
use vubd::nvme::pcie::{Loopback, PageSize, QueuePair};
use vubd::nvme::spec::{Cqe, Sqe};

type Queue = QueuePair<u64, Vec<SqSlot>, Vec<Cqe>>;

/// Builds and queues `n` 4 KiB reads; returns the SQ tail for the doorbell.
#[inline(never)]
fn submit_batch(q: &mut Queue, first: u64, n: u64) -> Option<u32> {
    for tag in first..first + n {
        // A guest buffer: page aligned, so PRP1 alone describes it.
        let iova = 0x1_0000_0000 + (tag % 1024) * 4096;
        let sqe = Sqe::read(1, tag % (1 << 20) * 8, 7, false);
        let mut list = PrpList::new(&mut [], 0, PageSize::K4).ok()?;
        let prps = prp::build([(iova, 4096)], 4096, &mut list).ok()?;
        q.submit(&sqe, prps.dptr(), tag).ok()?;
    }
    q.take_sq_doorbell()
}

/// Polls the batch's completions; returns the CQ head for the doorbell.
#[inline(never)]
fn complete_batch(q: &mut Queue, done: &mut u64) -> Option<u32> {
    let polled = q.poll(64, |tag, cqe| {
        black_box((tag, cqe.status()));
        *done += 1;
    });
    black_box(polled.ok()?);
    q.take_cq_doorbell()
}

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let ios: u64 = args
        .next()
        .and_then(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    let batch: u64 = args
        .next()
        .and_then(|a| a.parse().ok())
        .unwrap_or(32)
        .clamp(1, 64);
    let Ok(mut q) = Queue::new(1, vec![[0; 64]; 128], vec![Cqe::from_bytes([0; 16]); 128]) else {
        return ExitCode::FAILURE;
    };
    let mut dev = Loopback::new(1);
    let mut done = 0;
    let mut tag = 0;
    while tag < ios {
        let n = batch.min(ios - tag);
        let Some(tail) = submit_batch(&mut q, tag, n) else {
            eprintln!("submit failed at {tag}");
            return ExitCode::FAILURE;
        };
        tag += n;
        dev.sq_doorbell(&mut q, tail);
        let Some(head) = complete_batch(&mut q, &mut done) else {
            eprintln!("no completions at {tag}");
            return ExitCode::FAILURE;
        };
        dev.cq_doorbell(head);
    }
    println!("{done} I/Os in batches of {batch}");
    if done == ios {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
