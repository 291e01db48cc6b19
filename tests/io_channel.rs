//! The `IoChannel` conformance suite (`examples/channel_check.rs`) against every backend the
//! host can give it: io_uring on an image file (O_DIRECT and buffered) and on a loop device of
//! 512- and 4096-byte blocks, the null device, and NVMe/TCP against the fake target (with and
//! without digests, with a small MDTS and MAXH2CDATA so that requests split). The NVMe PCIe
//! driver runs the same suite in its lab guest (`tests/nvme_pcie_lab.rs`).

mod common;

use std::path::Path;
use std::process::{Command, Stdio};

use common::examples::example_bin;
use common::fake_target::{FakeTarget, Options};
use common::loopdev::{LoopDevice, require_loop_devices};

const IMAGE_BYTES: u64 = 64 << 20;

/// Runs the suite on the disk vubd's `args` name; fails the test with its output unless
/// every case passed.
fn channel_check(args: &[&str]) {
    let bin = example_bin("channel_check");
    let mut child = Command::new(&bin)
        .arg("--")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn channel_check");
    let status = common::daemon::wait_bounded(&mut child);
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    let output = child.wait_with_output().expect("channel_check output");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let result = stdout
        .lines()
        .find(|l| l.starts_with("CHANNEL-CHECK-RESULT "))
        .unwrap_or("");
    assert!(
        status.is_some_and(|s| s.success()) && result.ends_with(" failed=0"),
        "channel_check {args:?}: {status:?}\n{stdout}\n{stderr}"
    );
    // Every case of `CASES` in examples/channel_check.rs ran.
    assert!(
        result.contains(" passed=12 "),
        "channel_check {args:?} ran other cases than expected: {result}"
    );
}

fn image(dir: &Path) -> String {
    let path = dir.join("disk.img");
    let f = std::fs::File::create(&path).expect("create image");
    f.set_len(IMAGE_BYTES).expect("size image");
    path.to_str().expect("UTF-8 temporary path").to_owned()
}

#[test]
fn a_file_conforms_with_direct_and_buffered_io() {
    let dir = tempfile::tempdir().expect("create test directory");
    let img = image(dir.path());
    channel_check(&["--disk", &img]);
    channel_check(&["--disk", &img, "--cache", "writeback"]);
}

#[test]
fn a_block_device_conforms_at_512_and_4096_byte_blocks() {
    require_loop_devices();
    let dir = tempfile::tempdir().expect("create test directory");
    let img = image(dir.path());
    for block in [512, 4096] {
        let dev = LoopDevice::attach(Path::new(&img), block, true);
        channel_check(&["--disk", dev.path().to_str().expect("UTF-8 device path")]);
    }
}

#[test]
fn the_null_device_conforms() {
    channel_check(&["--disk", "null:64M"]);
}

#[test]
fn nvme_tcp_conforms_with_and_without_digests_and_with_split_requests() {
    let target = FakeTarget::start(Options {
        ns_size: IMAGE_BYTES,
        mdts: 1,
        maxh2cdata: 8192,
        ..Options::default()
    })
    .expect("start the fake target");
    let uri = format!("nvme-tcp://{}/{}", target.addr(), target.nqn());
    channel_check(&["--disk", &uri]);
    channel_check(&["--disk", &format!("{uri}?hdgst=1&ddgst=1")]);
}
