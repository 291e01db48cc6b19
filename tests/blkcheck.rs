//! `examples/blkcheck.rs`, the self-checking vhost-user-blk client that also runs inside the
//! lab guests, against vubd serving an image file: every check passes, a wrong pattern seed
//! fails it, and the sector pattern it writes is in the image file, checked from the host with
//! the same pattern code.

mod common;

#[path = "../examples/blkcheck/pattern.rs"]
mod pattern;

use std::ffi::OsStr;
use std::fs::File;
use std::path::Path;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use common::Image;
use common::daemon::{Daemon, DaemonConfig};
use common::examples::example_bin;

/// Upper bound of one blkcheck run (a debug build on a loaded machine).
const RUN_TIMEOUT: Duration = Duration::from_secs(120);

const MIB: u64 = 1 << 20;

/// How a blkcheck run ended: its exit code and its stdout (the summary line).
#[derive(Debug)]
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

fn blkcheck(socket: &Path, args: &[&str]) -> Run {
    let dir = tempfile::tempdir().expect("create output directory");
    let out = dir.path().join("stdout");
    let err = dir.path().join("stderr");
    let mut child = Command::new(example_bin("blkcheck"))
        .arg("--socket")
        .arg(socket)
        .args(args.iter().map(OsStr::new))
        .stdin(Stdio::null())
        .stdout(File::create(&out).expect("create stdout file"))
        .stderr(File::create(&err).expect("create stderr file"))
        .spawn()
        .expect("spawn blkcheck");
    let deadline = Instant::now() + RUN_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("poll blkcheck") {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("blkcheck {args:?} still running after {RUN_TIMEOUT:?}");
        }
        thread::sleep(Duration::from_millis(10));
    };
    Run {
        code: status.code(),
        stdout: std::fs::read_to_string(&out).expect("read stdout"),
        stderr: std::fs::read_to_string(&err).expect("read stderr"),
    }
}

/// Runs blkcheck and expects it to pass, with a one-line summary.
#[track_caller]
fn passes(daemon: &mut Daemon, args: &[&str]) -> String {
    let run = blkcheck(daemon.socket(), args);
    let line = run.stdout.trim_end();
    assert!(
        run.code == Some(0) && line.starts_with("blkcheck: PASS ") && !line.contains('\n'),
        "blkcheck {args:?}: exit {:?}\nstdout: {}\nstderr: {}\nvubd:\n{}",
        run.code,
        run.stdout,
        run.stderr,
        daemon.output()
    );
    daemon.assert_running();
    eprintln!("{line}");
    line.to_owned()
}

fn two_queues() -> DaemonConfig {
    DaemonConfig {
        num_queues: Some(2),
        ..DaemonConfig::default()
    }
}

#[test]
fn write_verify_passes_on_one_and_two_queues() {
    let image = Image::new(32 * MIB);
    let mut daemon = Daemon::start_with(&image, &two_queues());
    let one = passes(
        &mut daemon,
        &["--seed", "1", "--size", "8M", "write-verify"],
    );
    assert!(one.contains(" queues=1 size=8388608 seed=0x1 "), "{one}");
    let two = passes(
        &mut daemon,
        &[
            "--queues",
            "2",
            "--seed",
            "0x2a",
            "--size",
            "32M",
            "write-verify",
        ],
    );
    assert!(two.contains(" queues=2 size=33554432 seed=0x2a "), "{two}");
    // Eight rounds of writes happened: something was written, and read back more than once.
    let field = |name: &str| -> u64 {
        two.split_whitespace()
            .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name}= in {two}"))
    };
    assert!(
        field("written") > 0 && field("read") >= 3 * 32 * MIB,
        "{two}"
    );
}

#[test]
fn write_verify_passes_while_buffers_move_to_new_regions() {
    // --remap: every 16 requests a queue maps a new region (ADD_MEM_REG) and removes its old
    // one (REM_MEM_REG) with the next batch in flight; the data still verifies end to end.
    let image = Image::new(16 * MIB);
    let mut daemon = Daemon::start_with(&image, &two_queues());
    for queues in ["1", "2"] {
        let line = passes(
            &mut daemon,
            &[
                "--queues",
                queues,
                "--seed",
                "0x3e3",
                "--size",
                "8M",
                "--remap",
                "16",
                "write-verify",
            ],
        );
        let field = |name: &str| -> u64 {
            line.split_whitespace()
                .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("no {name}= in {line}"))
        };
        // A queue moves at the first batch after 16 more requests: at least once per 32
        // (a batch holds up to 16).
        assert!(field("remaps") >= field("requests") / 32, "{line}");
    }
}

#[test]
fn discard_and_write_zeroes_pass() {
    let image = Image::new(16 * MIB);
    let mut daemon = Daemon::start_with(&image, &two_queues());
    let wz = &[
        "--queues",
        "2",
        "--seed",
        "3",
        "--size",
        "16M",
        "write-zeroes",
    ];
    passes(&mut daemon, wz);
    // vubd punches holes in a file for a discard, so the blocks read back as zeros.
    let discard = passes(
        &mut daemon,
        &[
            "--queues",
            "2",
            "--seed",
            "4",
            "--size",
            "16M",
            "--discard-zeroes",
            "discard",
        ],
    );
    assert!(discard.contains(" discarded_blocks="), "{discard}");
}

#[test]
fn pattern_lands_in_the_image_file() {
    let seed = 0x5eed_u64;
    let image = Image::new(16 * MIB);
    let mut daemon = Daemon::start_with(&image, &two_queues());
    let seed_arg = format!("{seed:#x}");
    passes(
        &mut daemon,
        &[
            "--queues", "2", "--seed", &seed_arg, "--size", "8M", "pattern",
        ],
    );
    passes(
        &mut daemon,
        &["--seed", &seed_arg, "--size", "8M", "verify-pattern"],
    );

    // A wrong seed is caught, with a one-line reason and exit status 1.
    let wrong = blkcheck(
        daemon.socket(),
        &["--seed", "0x5eee", "--size", "8M", "verify-pattern"],
    );
    assert_eq!(wrong.code, Some(1), "{wrong:?}");
    assert!(
        wrong
            .stdout
            .starts_with("blkcheck: FAIL verify-pattern: the sector at 0 "),
        "{wrong:?}"
    );

    let status = daemon.terminate();
    assert!(status.success(), "vubd exited with {status}");
    let data = image.read_host(0, 8 << 20);
    if let Err(at) = pattern::check(seed, 0, &data) {
        panic!(
            "image: the sector at {at} does not hold the pattern: {:?}",
            String::from_utf8_lossy(&data[at as usize..at as usize + pattern::HEADER])
        );
    }
    // The rest of the disk was not touched.
    assert!(
        image.read_host(8 << 20, 8 << 20).iter().all(|&b| b == 0),
        "bytes beyond --size were written"
    );
}
