//! The restart lab (`tests/restart_lab.rs`): a guest running `genwrite` on a disk whose vubd
//! the host kills with SIGKILL and starts again, and the write cache case beside it. [`run`]
//! runs one case and returns a [`Report`] of what it saw; [`Report::finish`] prints it and
//! fails the test if anything failed.
//!
//! Not a submodule of `common`: `tests/restart_lab.rs` declares it (and
//! `examples/genwrite/block.rs` as `block`) next to `mod common;`.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::block::{self, Found};
use crate::common::client::{Client, ClientOptions};
use crate::common::daemon::{
    Daemon, reference_backend_selected, socket_connected, socket_exists, vubd_command,
};
use crate::common::examples::example_bin;
use crate::common::lab::{self, Guest, RunningGuest, fields, lines_with};
use crate::common::loopdev::LoopDevice;
use crate::common::throttle::WriteThrottle;
use crate::common::{Rng, bounded};

/// genwrite's block size.
const BLOCK: u64 = 4096;
/// Serial numbers the guest finds its disks by.
const WRITERS_SERIAL: &str = "writers";
const WCE_SERIAL: &str = "wce";
/// What qemu-storage-daemon answers to GET_ID.
const QSD_SERIAL: &str = "vhost_user_blk";
/// From spawning the guest to its control line, boot included.
const BOOT_LIMIT: Duration = Duration::from_secs(180);
/// For one step of the guest's write cache case.
const STEP_LIMIT: Duration = Duration::from_secs(60);
/// From starting a vubd to QEMU's connection (QEMU retries every second).
const RECONNECT_LIMIT: Duration = Duration::from_secs(30);
/// The writers go on this long after the last restart before the host says stop.
const SETTLE: Duration = Duration::from_secs(3);
/// The file case's limit on vubd's writes to the image's disk, below what the guest's writers
/// ask for: most of their writes wait at the host at any moment, while reads pass them. The
/// held writes of a killed vubd (one per writer at most) drain within a fraction of a second,
/// before QEMU connects to the new one (it retries once a second), so none lands after the
/// new vubd has resumed the queues.
const WRITE_IOPS: u32 = 100;
/// What a guest line that reports a failed or stuck request contains.
const GUEST_ERRORS: [&str; 4] = [
    "GENWRITE-ERROR",
    "GENWRITE-HANG",
    "is not a head",
    "I/O error",
];

/// How a run is set up, from the environment (see `tests/restart_lab.rs`).
#[derive(Debug, Clone)]
pub struct Settings {
    pub kills: u32,
    pub writers: u32,
    pub region_blocks: u32,
    /// Largest write, in 4 KiB blocks.
    pub max_extent: u32,
    /// The file case's writes per second to the image's disk.
    pub write_iops: u32,
    /// Shortest and longest pause between QEMU's reconnection and the next kill.
    pub delay_ms: (u64, u64),
    /// An operation in the guest older than this is a hang.
    pub hang_s: u64,
    pub seed: u64,
}

impl Settings {
    pub fn from_env() -> Self {
        let long = std::env::var("VUBD_TEST_LONG").is_ok_and(|v| v == "1");
        let kills = match std::env::var("VUBD_RESTART_KILLS") {
            Ok(v) => v
                .parse()
                .unwrap_or_else(|e| panic!("VUBD_RESTART_KILLS={v:?}: {e}")),
            Err(_) if long => 60,
            Err(_) => 10,
        };
        let seed = match std::env::var("VUBD_RESTART_SEED") {
            Ok(v) => match v.strip_prefix("0x") {
                Some(hex) => u64::from_str_radix(hex, 16),
                None => v.parse(),
            }
            .unwrap_or_else(|e| panic!("VUBD_RESTART_SEED={v:?}: {e}")),
            Err(_) => {
                let now = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .expect("clock after 1970");
                u64::try_from(now.as_nanos() & u128::from(u64::MAX)).expect("masked to u64")
            }
        };
        Self {
            kills,
            writers: if long { 32 } else { 16 },
            region_blocks: 64,
            max_extent: 32,
            write_iops: match std::env::var("VUBD_RESTART_WRITE_IOPS") {
                Ok(v) => v
                    .parse()
                    .unwrap_or_else(|e| panic!("VUBD_RESTART_WRITE_IOPS={v:?}: {e}")),
                // Twice the writers, twice the limit: the held writes still drain as fast.
                Err(_) if long => 2 * WRITE_IOPS,
                Err(_) => WRITE_IOPS,
            },
            delay_ms: (if long { 200 } else { 500 }, 3000),
            hang_s: 60,
            seed,
        }
    }

    /// How long genwrite may write: every kill at its longest, and more.
    fn max_writing(&self) -> Duration {
        let per_kill = Duration::from_millis(self.delay_ms.1) + RECONNECT_LIMIT;
        per_kill * self.kills + Duration::from_secs(120)
    }
}

/// What the writers' vubd serves.
#[derive(Debug)]
pub enum Disk {
    File(PathBuf),
    /// An `nvme-tcp://` URI.
    NvmeTcp(String),
}

#[derive(Debug)]
pub struct Case {
    pub name: &'static str,
    pub disk: Disk,
    /// Also run the write cache case, in the same guest.
    pub wce: bool,
}

/// A backend that is killed and started again on the same socket, with the same command (and
/// in the same cgroup, if it has one).
struct Restartable {
    name: &'static str,
    command: Box<dyn Fn() -> Command>,
    socket: PathBuf,
    /// The name the current backend's socket was bound under, which its connections show in
    /// /proc/net/unix: `socket`, or after an upgrade the name beside it that the new vubd
    /// bound and renamed over `socket`.
    bound: PathBuf,
    // Dropped (stopped) before the cgroup it is in.
    daemon: Option<Daemon>,
    throttle: Option<WriteThrottle>,
}

impl Restartable {
    fn start(
        name: &'static str,
        command: impl Fn() -> Command + 'static,
        socket: &Path,
        throttle: Option<WriteThrottle>,
    ) -> Self {
        let mut r = Self {
            name,
            command: Box::new(command),
            socket: socket.to_owned(),
            bound: socket.to_owned(),
            daemon: None,
            throttle,
        };
        r.restart();
        r
    }

    fn vubd(args: Vec<OsString>, socket: &Path, throttle: Option<WriteThrottle>) -> Self {
        let command = move || {
            let mut cmd = vubd_command();
            cmd.args(&args);
            cmd
        };
        Self::start("vubd", command, socket, throttle)
    }

    /// Starts the backend again (after [`Self::kill`]) and waits until it listens.
    fn restart(&mut self) {
        let mut cmd = (self.command)();
        if let Some(t) = &self.throttle {
            t.add(&mut cmd);
        }
        self.daemon = Some(Daemon::backend_from(cmd, self.name, &self.socket));
        self.bound = self.socket.clone();
    }

    fn daemon(&self) -> &Daemon {
        self.daemon.as_ref().expect("a backend runs")
    }

    fn kill(&mut self) -> ExitStatus {
        self.daemon.as_mut().expect("a backend runs").kill()
    }

    /// The upgrade procedure (README, "Restart, upgrade, migration"): a new vubd started
    /// `--incoming` on the same socket takes it over; the old one is stopped with SIGTERM and
    /// must exit cleanly, leaving the socket to the new one.
    fn upgrade(&mut self) -> Result<(), String> {
        let mut cmd = (self.command)();
        cmd.arg("--incoming");
        if let Some(t) = &self.throttle {
            t.add(&mut cmd);
        }
        let new = Daemon::taking_over(cmd, self.name, &self.socket);
        self.bound = Daemon::bound_beside(&self.socket, new.pid());
        let mut old = self.daemon.replace(new).expect("a backend runs");
        let status = old.terminate();
        if !status.success() {
            return Err(format!(
                "the old {} exited with {status}:\n{}",
                self.name,
                old.output()
            ));
        }
        if !socket_exists(&self.socket) {
            return Err("the old vubd removed the new one's socket".to_owned());
        }
        Ok(())
    }

    /// Waits until a frontend (QEMU) has connected to the current backend.
    fn wait_connected(&self, limit: Duration) -> Result<Duration, String> {
        let t = Instant::now();
        while !socket_connected(&self.bound) {
            if t.elapsed() > limit {
                return Err(format!(
                    "QEMU did not connect to the new {} within {limit:?}; its output:\n{}",
                    self.name,
                    self.daemon().output()
                ));
            }
            thread::sleep(Duration::from_millis(20));
        }
        Ok(t.elapsed())
    }
}

fn vubd_args(socket: &Path, disk: &str, queues: u16, serial: &str) -> Vec<OsString> {
    vec![
        "--socket-path".into(),
        socket.into(),
        "--disk".into(),
        disk.into(),
        "--num-queues".into(),
        queues.to_string().into(),
        "--serial".into(),
        serial.into(),
    ]
}

/// The host's side of the guest's control port (`run-guest.sh --control`): one word a line.
struct Control(UnixStream);

impl Control {
    /// Connects to the socket QEMU listens on, once QEMU has created it.
    fn connect(path: &Path, guest: &mut RunningGuest) -> Self {
        let deadline = Instant::now() + BOOT_LIMIT;
        loop {
            if let Ok(stream) = UnixStream::connect(path) {
                return Self(stream);
            }
            guest.assert_running();
            assert!(
                Instant::now() < deadline,
                "QEMU did not listen on {} within {BOOT_LIMIT:?}",
                path.display()
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    fn say(&mut self, word: &str) {
        self.0
            .write_all(format!("{word}\n").as_bytes())
            .unwrap_or_else(|e| panic!("tell the guest {word:?}: {e}"));
    }
}

/// What a case saw: lines for the test's output and the failures among them.
#[derive(Debug, Default)]
pub struct Report {
    lines: Vec<String>,
    failures: Vec<String>,
    /// The console lines worth showing: the guest's tagged lines and QEMU's messages.
    console: Vec<String>,
}

impl Report {
    fn note(&mut self, line: String) {
        eprintln!("{line}");
        self.lines.push(line);
    }

    fn fail(&mut self, why: String) {
        eprintln!("FAILED: {why}");
        self.failures.push(why);
    }

    /// Prints the report and fails the test if the case failed.
    pub fn finish(self, case: &Case, started: Instant) {
        let took = started.elapsed().as_secs_f64();
        if self.failures.is_empty() {
            eprintln!("restart lab {}: passed in {took:.0} s", case.name);
            return;
        }
        panic!(
            "restart lab {} failed in {took:.0} s:\n - {}\n---- what it saw ----\n{}\n---- guest and QEMU lines ----\n{}",
            case.name,
            self.failures.join("\n - "),
            self.lines.join("\n"),
            self.console.join("\n")
        );
    }
}

/// The writers' backend, on `socket` (vubd, or the reference if `VUBD_TEST_BACKEND` says so),
/// and the serial number the guest finds its disk by.
fn writers_backend(
    case: &Case,
    s: &Settings,
    socket: &Path,
    report: &mut Report,
) -> (Restartable, &'static str) {
    let (disk, throttle) = match &case.disk {
        Disk::File(path) if s.write_iops == 0 => {
            report.note("vubd's writes are not throttled".to_owned());
            (path.to_str().expect("image path").to_owned(), None)
        }
        Disk::File(path) => {
            let throttle = WriteThrottle::for_file(path, s.write_iops)
                .unwrap_or_else(|e| panic!("cannot throttle vubd's writes: {e}"));
            report.note(format!(
                "vubd's writes to the image's disk ({}) are limited to {} a second; reads are not",
                throttle.device(),
                s.write_iops
            ));
            (
                path.to_str().expect("image path").to_owned(),
                Some(throttle),
            )
        }
        Disk::NvmeTcp(uri) => (uri.clone(), None),
    };
    if reference_backend_selected() {
        let Disk::File(image) = &case.disk else {
            panic!("VUBD_TEST_BACKEND=qemu-storage-daemon: the reference serves no NVMe/TCP")
        };
        // O_DIRECT like vubd's `--cache none`, so that the throttle holds its writes too.
        let blockdev = format!(
            "driver=file,filename={},node-name=disk0,cache.direct=on",
            image.display()
        );
        let export = format!(
            "type=vhost-user-blk,id=export0,node-name=disk0,addr.type=unix,addr.path={},writable=on,num-queues=2",
            socket.display()
        );
        let command = move || {
            let mut cmd = Command::new("qemu-storage-daemon");
            cmd.args(["--blockdev", &blockdev, "--export", &export]);
            cmd
        };
        let backend = Restartable::start("qemu-storage-daemon", command, socket, throttle);
        (backend, QSD_SERIAL)
    } else {
        let args = vubd_args(socket, &disk, 2, WRITERS_SERIAL);
        (Restartable::vubd(args, socket, throttle), WRITERS_SERIAL)
    }
}

/// The write cache disk: a loop device, served by a vubd of its own.
struct WceDisk {
    // Dropped first: vubd lets go of the loop device before it is detached.
    vubd: Restartable,
    device: LoopDevice,
}

impl WceDisk {
    fn new(dir: &Path) -> Self {
        let backing = lab::image_file(dir, "wce.img", 16 << 20);
        let device = LoopDevice::attach(&backing, 512, true);
        let socket = dir.join("wce.sock");
        let disk = device.path().to_str().expect("loop device path").to_owned();
        let vubd = Restartable::vubd(vubd_args(&socket, &disk, 1, WCE_SERIAL), &socket, None);
        Self { vubd, device }
    }
}

/// Runs one case: boots the guest, runs the write cache case if asked, kills and restarts the
/// writers' vubd while genwrite runs, and judges what the guest and the disk say.
pub fn run(case: &Case, s: &Settings, dir: &Path) -> Report {
    let mut report = Report::default();
    report.note(format!(
        "restart lab {}: seed {:#x} (VUBD_RESTART_SEED), {} kills {}-{} ms after each reconnection, {} writers of {} blocks",
        case.name, s.seed, s.kills, s.delay_ms.0, s.delay_ms.1, s.writers, s.region_blocks
    ));
    let genwrite = example_bin("genwrite");
    let initrd = lab::build_initramfs(dir, "restart-lab", &[&genwrite]);

    let socket = dir.join("writers.sock");
    let (mut writers, serial) = writers_backend(case, s, &socket, &mut report);
    let mut wce = case.wce.then(|| WceDisk::new(dir));
    let flushes_at_start = wce.as_ref().map(|w| w.device.flushes());

    let control_socket = dir.join("control.sock");
    let timeout = Duration::from_secs(600) + s.max_writing() + Duration::from_secs(2 * s.hang_s);
    let mut guest = Guest::new(&initrd, dir, "console.log", timeout.as_secs());
    let mut append = format!(
        "WRITERS_SERIAL={serial} WRITERS={} REGION_BLOCKS={} MAX_EXTENT={} MAX_S={} HANG_S={} SEED={:#x}",
        s.writers,
        s.region_blocks,
        s.max_extent,
        s.max_writing().as_secs(),
        s.hang_s,
        s.seed
    );
    guest
        .command()
        .args(["--smp", "2"])
        .arg("--vhost-user-blk")
        .arg(format!("{},num-queues=2,reconnect=1", socket.display()))
        .arg("--control")
        .arg(&control_socket);
    if let Some(w) = &wce {
        append.push_str(&format!(" WCE_SERIAL={WCE_SERIAL}"));
        guest
            .command()
            .arg("--vhost-user-blk")
            .arg(format!("{},reconnect=1", w.vubd.socket.display()));
    }
    guest.command().args(["--append", &append]);
    let mut guest = guest.spawn(dir);
    let mut control = Control::connect(&control_socket, &mut guest);
    guest.wait_line("CONTROL-READY", BOOT_LIMIT);

    if let (Some(w), Some(f0)) = (&mut wce, flushes_at_start) {
        write_cache_case(w, f0, &mut guest, &mut control, &mut report);
    }

    let kills = kill_while_writing(&mut writers, s, &mut guest, &mut control, &mut report);
    let (status, console) = guest.finish();
    judge_guest(s, kills, status, &console, &mut report);
    if let Some(t) = &writers.throttle {
        match t.writes() {
            Ok(0) => report.fail(
                "the throttle saw no write of vubd's: the lab could not hold writes at the host"
                    .to_owned(),
            ),
            Ok(n) => report.note(format!(
                "vubd made {n} throttled writes to the image's disk"
            )),
            Err(e) => report.fail(format!("cannot read the throttle's counters: {e}")),
        }
    }
    check_disk(case, s, &writers, &console, &mut report);
    report.console = console
        .lines()
        .filter(|l| {
            [
                "GENWRITE-",
                "DMESG",
                "WCE-",
                "restart-lab:",
                "qemu-system",
                "GUEST-RESULT",
            ]
            .iter()
            .any(|t| l.contains(t))
                && !l.contains("GENWRITE-REGION")
        })
        .map(str::to_owned)
        .collect();
    drop(wce);
    report
}

/// The guest switches the loop-backed disk to write-through and the host restarts its vubd;
/// the loop device's flush count tells how vubd serves the disk (see `tests/restart_lab.rs`).
fn write_cache_case(
    w: &mut WceDisk,
    f0: u64,
    guest: &mut RunningGuest,
    control: &mut Control,
    report: &mut Report,
) {
    let wb_line = guest.wait_line("WCE-WRITTEN step=write-back", STEP_LIMIT);
    let f1 = w.device.flushes();
    control.say("next");
    let wt_line = guest.wait_line("WCE-WRITTEN step=write-through", STEP_LIMIT);
    let f2 = w.device.flushes();
    w.vubd.kill();
    w.vubd.restart();
    if let Err(e) = w.vubd.wait_connected(RECONNECT_LIMIT) {
        panic!("write cache case: {e}");
    }
    let f3 = w.device.flushes();
    control.say("restarted");
    let after_line = guest.wait_line("WCE-WRITTEN step=after-restart", STEP_LIMIT);
    let f4 = w.device.flushes();
    control.say("next");

    let cache_type = |line: &str| fields(line).get("cache_type").cloned().unwrap_or_default();
    let (wb, wt, after) = (f1 - f0, f2 - f1, f4 - f3);
    report.note(format!(
        "write cache: loop device flushes for 16 writes: write-back {wb}, write-through {wt}, after the restart {after}; the guest's cache_type: {:?}, {:?}, {:?} (QEMU's copy)",
        cache_type(&wb_line),
        cache_type(&wt_line),
        cache_type(&after_line)
    ));
    if wb != 0 {
        report.fail(format!(
            "write cache: 16 write-back writes already made {wb} flushes: the flush count does not tell the modes apart, so the check cannot judge"
        ));
    } else if wt == 0 {
        report.fail(
            "write cache: after the guest switched the disk to write-through, its writes reached the disk without FUA: vubd did not take CONFIG_WCE=0"
                .to_owned(),
        );
    } else if after == 0 {
        report.fail(
            "write cache: after vubd was killed and restarted, the guest's writes reached the disk without FUA: the new vubd serves the disk write-back while the guest was told write-through (CONFIG_WCE=0 did not survive the restart)"
                .to_owned(),
        );
    }
    for (step, line) in [("write-through", &wt_line), ("after-restart", &after_line)] {
        if cache_type(line) != "write through" {
            report.fail(format!(
                "write cache: the guest's cache_type at {step}: {line}"
            ));
        }
    }
}

/// Whether the console has a line that reports a failed or stuck request; the first one.
fn first_guest_error(console: &str) -> Option<String> {
    console
        .lines()
        .find(|l| GUEST_ERRORS.iter().any(|e| l.contains(e)))
        .map(str::to_owned)
}

/// Kills the writers' vubd `s.kills` times while genwrite runs, then tells genwrite to stop.
/// Returns how many kills were done.
/// Upgrades (a new vubd `--incoming`, the old one stopped) after the kills.
const UPGRADES: u32 = 2;

fn kill_while_writing(
    writers: &mut Restartable,
    s: &Settings,
    guest: &mut RunningGuest,
    control: &mut Control,
    report: &mut Report,
) -> u32 {
    guest.wait_line("GENWRITE-RUNNING", BOOT_LIMIT);
    let mut rng = Rng::new(s.seed);
    let (lo, hi) = s.delay_ms;
    let mut first_error: Option<(u32, String)> = None;
    let mut done = 0;
    for k in 1..=s.kills {
        let delay = Duration::from_millis(lo + rng.below(hi - lo + 1));
        thread::sleep(delay);
        guest.assert_running();
        if first_error.is_none() {
            first_error = first_guest_error(&guest.console()).map(|l| (k - 1, l));
        }
        let t = Instant::now();
        writers.kill();
        writers.restart();
        let listening = t.elapsed();
        match writers.wait_connected(RECONNECT_LIMIT) {
            Ok(_) => {}
            Err(e) => {
                report.fail(format!("kill {k}: {e}"));
                break;
            }
        }
        done = k;
        eprintln!(
            "restart lab: kill {k}/{} {} ms after the last reconnection; vubd listening again after {} ms, QEMU connected after {} ms",
            s.kills,
            delay.as_millis(),
            listening.as_millis(),
            t.elapsed().as_millis()
        );
    }
    // Then upgrades, as an operator makes them, while the writers go on.
    for u in 1..=UPGRADES {
        if done < s.kills || writers.name != "vubd" {
            break; // a kill already failed, or the reference backend has no upgrade
        }
        let delay = Duration::from_millis(lo + rng.below(hi - lo + 1));
        thread::sleep(delay);
        guest.assert_running();
        let t = Instant::now();
        if let Err(e) = writers.upgrade() {
            report.fail(format!("upgrade {u}: {e}"));
            break;
        }
        if let Err(e) = writers.wait_connected(RECONNECT_LIMIT) {
            report.fail(format!("upgrade {u}: {e}"));
            break;
        }
        eprintln!(
            "restart lab: upgrade {u}/{UPGRADES}: QEMU connected to the new vubd after {} ms",
            t.elapsed().as_millis()
        );
    }
    thread::sleep(SETTLE);
    if first_error.is_none() {
        first_error = first_guest_error(&guest.console()).map(|l| (done, l));
    }
    control.say("stop");
    report.note(match first_error {
        Some((k, line)) => format!("first guest error seen after kill {k} of {done}: {line}"),
        None => format!("no guest error line while vubd was killed {done} times"),
    });
    done
}

/// Judges what the guest reported: genwrite's result, the kernel log, the guest's status.
fn judge_guest(
    s: &Settings,
    kills: u32,
    status: Option<ExitStatus>,
    console: &str,
    report: &mut Report,
) {
    if kills < s.kills {
        report.fail(format!("vubd was killed {kills} times, not {}", s.kills));
    }
    match lines_with(console, "WRITERS-DISK ").next() {
        None => report.fail("the guest did not find the writers' disk".to_owned()),
        Some(line) => {
            if fields(line).get("hw_queues").map(String::as_str) != Some("2") {
                report.fail(format!("the writers' disk should have 2 queues: {line}"));
            }
        }
    }
    match lines_with(console, "GENWRITE-RESULT ").next() {
        None => report.fail("genwrite printed no result".to_owned()),
        Some(line) => {
            report.note(line.to_owned());
            if fields(line).get("verdict").map(String::as_str) != Some("PASS") {
                report.fail(format!("genwrite: {line}"));
            }
        }
    }
    for tag in ["GENWRITE-HANG ", "GENWRITE-ERROR ", "GENWRITE-BAD "] {
        let all: Vec<&str> = lines_with(console, tag).collect();
        for line in all.iter().take(5) {
            report.note(format!("  {line}"));
        }
        if all.len() > 5 {
            report.note(format!("  ... {} {tag}lines in all", all.len()));
        }
    }
    match lines_with(console, "DMESG-SUMMARY ").next() {
        None => report.fail("the guest did not report its kernel log".to_owned()),
        Some(line) => {
            let f = fields(line);
            let count = |k: &str| f.get(k).and_then(|v| v.parse::<u64>().ok());
            match (count("not_a_head"), count("io_errors")) {
                (Some(0), Some(0)) => report.note(line.to_owned()),
                (Some(heads), Some(io)) => report.fail(format!(
                    "the guest kernel logged {heads} \"is not a head\" (a request completed twice) and {io} \"I/O error\" lines"
                )),
                _ => report.fail(format!("unreadable kernel log summary: {line}")),
            }
        }
    }
    for line in lines_with(console, "DMESG: ").take(6) {
        report.note(format!("  {line}"));
    }
    match status {
        Some(st) if st.success() => {}
        Some(st) => report.fail(format!(
            "the guest failed ({st}): {}",
            lines_with(console, "GUEST-RESULT")
                .last()
                .unwrap_or("no result line")
        )),
        None => report.fail("the guest did not end within its time limit".to_owned()),
    }
    let mut qemu: BTreeMap<&str, usize> = BTreeMap::new();
    for line in console.lines().filter(|l| l.starts_with("qemu-system")) {
        *qemu.entry(line).or_default() += 1;
    }
    for (line, n) in qemu {
        report.note(format!("QEMU, {n} times: {line}"));
    }
}

/// The host reads the writers' regions itself and checks that every block holds what the
/// guest read last (its `GENWRITE-REGION` lines).
fn check_disk(
    case: &Case,
    s: &Settings,
    writers: &Restartable,
    console: &str,
    report: &mut Report,
) {
    let guest: Vec<Vec<String>> = lines_with(console, "GENWRITE-REGION ")
        .map(|l| {
            fields(l)
                .get("gens")
                .map_or(Vec::new(), |g| g.split(',').map(str::to_owned).collect())
        })
        .collect();
    let per_region = usize::try_from(s.region_blocks).expect("u32 fits usize");
    if guest.len() != usize::try_from(s.writers).expect("u32 fits usize")
        || guest.iter().any(|r| r.len() != per_region)
    {
        report.fail(format!(
            "the guest listed {} complete regions of {}: the host's check of the disk could not run",
            guest.iter().filter(|r| r.len() == per_region).count(),
            s.writers
        ));
        return;
    }
    let region_bytes = u64::from(s.region_blocks) * BLOCK;
    let read = |region: u32| -> Result<Vec<u8>, String> {
        let offset = u64::from(region) * region_bytes;
        let len = usize::try_from(region_bytes).expect("region fits usize");
        match &case.disk {
            Disk::File(path) => Ok(lab::read_at(path, offset, len)),
            Disk::NvmeTcp(_) => {
                let socket = writers.daemon().socket().to_owned();
                bounded("read a region through vubd", move || {
                    let mut client = Client::connect(&socket, &ClientOptions::queues(1))
                        .map_err(|e| format!("connect: {e}"))?;
                    client
                        .queue(0)
                        .try_read(offset, len)
                        .map_err(|ret| format!("read: {}", crate::common::describe_ret(ret)))
                })
            }
        }
    };
    let mut differ = Vec::new();
    let mut unread = 0;
    for (r, gens) in guest.iter().enumerate() {
        let region = u32::try_from(r).expect("regions fit u32");
        let data = match read(region) {
            Ok(data) => data,
            Err(e) => {
                report.fail(format!("the host cannot read region {region}: {e}"));
                return;
            }
        };
        for (b, chunk) in data
            .chunks_exact(usize::try_from(BLOCK).expect("fits"))
            .enumerate()
        {
            let index = u32::try_from(b).expect("blocks fit u32");
            let found = block::decode(chunk, s.seed, region, index);
            let host = match found {
                Found::Zero | Found::Gen(_) => found.to_string(),
                Found::Misplaced { .. } | Found::Corrupt { .. } => "x".to_owned(),
            };
            if gens[b] == "?" {
                unread += 1;
            } else if host != gens[b] {
                differ.push(format!(
                    "region {region} block {b}: the guest read {}, the host finds {found}",
                    gens[b]
                ));
            }
        }
    }
    if differ.is_empty() {
        report.note(format!(
            "the host finds on the disk what the guest read, in all {} blocks the guest could read ({unread} it could not)",
            s.writers * s.region_blocks - unread
        ));
    } else {
        report.fail(format!(
            "the disk differs from what the guest read in {} blocks: {}",
            differ.len(),
            differ
                .iter()
                .take(5)
                .cloned()
                .collect::<Vec<_>>()
                .join("; ")
        ));
    }
}
