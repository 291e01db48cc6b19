//! A frontend that attacks the memory it shares with vubd (issue 11, part 3). One vubd, one
//! poller (`--cpus 0`), two devices on image files: the hostile frontend on one, and on the
//! other a libblkio frontend that writes patterns and reads them back for the whole test, so
//! that every case shows the other device served, and every byte verified, during the attack
//! and after it.
//!
//! - Refused at the door: SET_MEM_TABLE or ADD_MEM_REG with a region larger than its file (a
//!   mapping past a file's end faults when touched), an ADD_MEM_REG past the 509 slots
//!   GET_MAX_MEM_SLOTS advertises, an ADD_MEM_REG overlapping a region (vm-memory refuses it).
//!   The frontend gets an error reply, vubd one log line naming the message, the region and
//!   both sizes; the device then serves a new frontend.
//! - Survived: the guest memory file shortened after SET_MEM_TABLE under a GET_ID buffer, under
//!   the request headers and status bytes, or under the rings; the inflight region's file
//!   shortened. vubd lives, that device's connection is closed with one log line naming the
//!   faulting address, and a new frontend on it is served.
//!
//! Without the fix, each case of the first kind is accepted (the size case then dies of
//! SIGBUS at the GET_ID the test sends after it), and each of the second kills vubd with
//! SIGBUS, and every device with it.

mod common;
#[path = "common/frontend.rs"]
mod frontend;

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use common::client::{Client, ClientOptions};
use common::daemon::{Daemon, socket_listening};
use common::{Image, TIMEOUT};
use frontend::{BLOCK, BlkFrontend, GPA_BASE, Options, Request, SECTOR, STATUS_OK};
use tempfile::TempDir;
use vhost::vhost_user::message::{VhostUserHeaderFlag, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo};

const MIB: u64 = 1 << 20;
/// The log line of a survived fault (`daemon::serve_one`).
const FAULT_LINE: &str = "the frontend's shared memory faulted";
/// Most lines vubd may log in one of these tests: startup, two sessions or three, their
/// queues, the refusal or the fault.
const MAX_LINES: usize = 60;

/// vubd serving two image devices on one poller: the hostile frontend's and the victim's.
struct Lab {
    // Declared first, so stopped before its socket files and images go.
    daemon: Daemon,
    hostile: PathBuf,
    victim: PathBuf,
    _dir: TempDir,
    _images: [Image; 2],
}

impl Lab {
    fn start() -> Self {
        let dir = tempfile::tempdir().expect("socket directory");
        let images = [Image::new(8 * MIB), Image::new(8 * MIB)];
        let (hostile, victim) = (
            dir.path().join("hostile.sock"),
            dir.path().join("victim.sock"),
        );
        let mut args: Vec<OsString> = vec!["--cpus".into(), "0".into()];
        for (socket, image) in [(&hostile, &images[0]), (&victim, &images[1])] {
            let text = |p: &Path| p.to_str().expect("UTF-8 paths").replace(',', ",,");
            args.push("--device".into());
            args.push(format!("socket={},disk={}", text(socket), text(image.path())).into());
        }
        let args: Vec<&OsStr> = args.iter().map(OsString::as_os_str).collect();
        let daemon = Daemon::vubd_with_args(&args, &hostile);
        wait_for(&daemon, "the victim's socket", || socket_listening(&victim));
        let lab = Self {
            daemon,
            hostile,
            victim,
            _dir: dir,
            _images: images,
        };
        // Both devices ready, on the one poller.
        wait_for(&lab.daemon, "two devices on one poller", || {
            lab.lines(" ready ").len() == 2
        });
        assert_eq!(lab.lines("pollers=1 ").len(), 2, "{}", lab.daemon.output());
        lab
    }

    /// Lines vubd logged that contain `text`.
    fn lines(&self, text: &str) -> Vec<String> {
        let out = self.daemon.output();
        out.lines()
            .filter(|l| l.contains(text))
            .map(str::to_owned)
            .collect()
    }

    /// Waits (bounded) until vubd logs a line with `text`, failing at once if it dies.
    #[track_caller]
    fn wait_logged(&mut self, text: &str) {
        let deadline = Instant::now() + TIMEOUT;
        while self.lines(text).is_empty() {
            self.daemon.assert_running();
            assert!(
                Instant::now() < deadline,
                "no line with {text:?} after {TIMEOUT:?}:\n{}",
                self.daemon.output()
            );
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// vubd lives, logged `text` exactly once, and at most [`MAX_LINES`] lines in all.
    #[track_caller]
    fn assert_alive_and_logged_once(&mut self, text: &str) {
        self.daemon.assert_running();
        let out = self.daemon.output();
        let found = self.lines(text);
        assert_eq!(found.len(), 1, "one line with {text:?}:\n{out}");
        assert!(out.lines().count() <= MAX_LINES, "too many lines:\n{out}");
    }
}

impl Lab {
    /// vubd uses (next to) no CPU once the frontends are idle or gone: no poller spins on
    /// the failed device.
    #[track_caller]
    fn assert_idle(&self) {
        let before = self.daemon.cpu_time();
        thread::sleep(Duration::from_millis(500));
        let used = self.daemon.cpu_time() - before;
        assert!(
            used < Duration::from_millis(50),
            "{used:?} of CPU in 500 ms:\n{}",
            self.daemon.output()
        );
    }
}

/// Waits (bounded) for `done`.
#[track_caller]
fn wait_for(daemon: &Daemon, what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + TIMEOUT;
    while !done() {
        assert!(
            Instant::now() < deadline,
            "no {what} after {TIMEOUT:?}:\n{}",
            daemon.output()
        );
        thread::sleep(Duration::from_millis(10));
    }
}

/// The other tenant: writes a pattern, reads it back and compares, again and again, until
/// stopped.
struct Victim {
    stop: Arc<AtomicBool>,
    verified: Arc<AtomicU64>,
    run: JoinHandle<Result<u64, String>>,
}

impl Victim {
    fn start(socket: &Path) -> Self {
        let mut client = Client::connect(socket, &ClientOptions::queues(1)).expect("victim");
        let (stop, verified) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicU64::new(0)),
        );
        let (s, v) = (stop.clone(), verified.clone());
        let run = thread::spawn(move || {
            let mut i = 0u64;
            while !s.load(Ordering::Relaxed) {
                let offset = (i % 256) * BLOCK as u64;
                let data: Vec<u8> = (0..BLOCK as u64 / 8)
                    .flat_map(|w| (i << 20 | w).to_le_bytes())
                    .collect();
                let q = client.queue(0);
                q.try_write(offset, &data)
                    .map_err(|e| format!("write {i}: {e}"))?;
                let back = q
                    .try_read(offset, BLOCK)
                    .map_err(|e| format!("read {i}: {e}"))?;
                if back != data {
                    return Err(format!("read {i} returned other data"));
                }
                i += 1;
                v.store(i, Ordering::Relaxed);
            }
            Ok(i)
        });
        Self {
            stop,
            verified,
            run,
        }
    }

    fn verified(&self) -> u64 {
        self.verified.load(Ordering::Relaxed)
    }

    /// Waits until `n` more writes than `since` were read back.
    #[track_caller]
    fn progresses(&self, lab: &Lab, since: u64, n: u64) {
        wait_for(&lab.daemon, "progress on the other device", || {
            self.run.is_finished() || self.verified() >= since + n
        });
        assert!(
            !self.run.is_finished(),
            "the other device's frontend stopped:\n{}",
            lab.daemon.output()
        );
    }

    /// Stops and returns how many writes were read back.
    #[track_caller]
    fn finish(self, lab: &Lab) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        match self.run.join().expect("victim thread") {
            Ok(n) => n,
            Err(e) => panic!("the other device failed: {e}\n{}", lab.daemon.output()),
        }
    }
}

/// A well-behaved frontend on the hostile device's socket, once the attacker is gone: a write
/// read back.
fn serves_a_new_frontend(lab: &Lab) {
    let mut fe = BlkFrontend::connect(&lab.hostile, Options::new(1)).unwrap_or_else(|e| {
        panic!("a new frontend: {e}\n{}", lab.daemon.output());
    });
    let data = vec![0xa5u8; BLOCK];
    fe.submit(
        0,
        Request::Write {
            sector: 8,
            data: &data,
        },
        1,
    )
    .expect("submit");
    fe.notify(0).expect("notify");
    let done = reap_one(&mut fe, lab, None);
    assert_eq!(done, STATUS_OK);
    fe.submit(
        0,
        Request::Read {
            sector: 8,
            len: BLOCK,
        },
        2,
    )
    .expect("submit");
    fe.notify(0).expect("notify");
    let back = reap_one(&mut fe, lab, Some(&data));
    assert_eq!(back, STATUS_OK);
}

/// Waits for one completion on queue 0 and returns its status; checks the data against
/// `want` when given.
fn reap_one(fe: &mut BlkFrontend, lab: &Lab, want: Option<&[u8]>) -> u8 {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let mut status = None;
        fe.reap(0, |c, data| {
            if let Some(want) = want {
                assert_eq!(&data[..want.len()], want, "data read back");
            }
            status = Some(c.status);
        })
        .expect("reap");
        if let Some(s) = status {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "no completion:\n{}",
            lab.daemon.output()
        );
        fe.wait(Duration::from_millis(20)).expect("wait");
    }
}

/// The hostile frontend's connection is closed by vubd (bounded wait).
fn closed_by_vubd(fe: &BlkFrontend, lab: &Lab) {
    wait_for(&lab.daemon, "closed connection", || fe.ping().is_err());
}

/// Waits for the fault line, checks it names the device and `what`, and that vubd lives.
fn survived(lab: &mut Lab, what: &str) {
    lab.wait_logged(FAULT_LINE);
    lab.assert_alive_and_logged_once(FAULT_LINE);
    let line = lab.lines(FAULT_LINE).remove(0);
    assert!(line.contains("device=0"), "names the device: {line}");
    assert!(line.contains(what), "names {what:?}: {line}");
}

/// A raw vhost-user frontend that negotiates REPLY_ACK and CONFIGURE_MEM_SLOTS and wants an
/// answer to every message.
fn raw_frontend(socket: &Path) -> Frontend {
    let stream = UnixStream::connect(socket).expect("connect");
    stream.set_read_timeout(Some(TIMEOUT)).expect("timeout");
    let mut fe = Frontend::from_stream(stream, 1);
    fe.set_owner().expect("SET_OWNER");
    let features = fe.get_features().expect("GET_FEATURES");
    fe.set_features(features).expect("SET_FEATURES");
    let offered = fe.get_protocol_features().expect("GET_PROTOCOL_FEATURES");
    let want =
        VhostUserProtocolFeatures::REPLY_ACK | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS;
    assert!(offered.contains(want), "vubd offers {want:?}");
    fe.set_protocol_features(want)
        .expect("SET_PROTOCOL_FEATURES");
    fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    fe
}

/// A memfd of `len` bytes.
fn memfd(len: u64) -> File {
    // SAFETY: a NUL-terminated name and valid flags; the result is checked.
    let fd = unsafe { libc::memfd_create(c"hostile-region".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: a new descriptor nothing else owns.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(len).expect("size the memfd");
    f
}

fn region(gpa: u64, size: u64, file: &File) -> VhostUserMemoryRegionInfo {
    VhostUserMemoryRegionInfo {
        guest_phys_addr: gpa,
        memory_size: size,
        userspace_addr: 0x7f00_0000_0000 + gpa,
        mmap_offset: 0,
        mmap_handle: file.as_raw_fd(),
    }
}

#[test]
fn set_mem_table_with_a_region_larger_than_its_file_is_refused() {
    let mut lab = Lab::start();
    let victim = Victim::start(&lab.victim);
    let mut fe = BlkFrontend::connect(&lab.hostile, Options::new(1)).expect("connect");
    let (len, data) = (fe.memory_len(), fe.layout(0).data);
    fe.truncate_memory(data).expect("truncate");
    let before = victim.verified();
    if fe.reconnect().is_ok() {
        // Accepted: what the refusal prevents is a GET_ID into the part past the file.
        fe.submit(0, Request::GetId, 1).expect("submit");
        fe.notify(0).expect("notify");
        thread::sleep(Duration::from_millis(500));
        lab.daemon.assert_running();
        panic!("SET_MEM_TABLE with a region larger than its file was accepted");
    }
    let text = format!(
        "SET_MEM_TABLE: the region at guest address {GPA_BASE:#x}: {len} bytes at file \
         offset 0 need a file of {len} bytes; it has {data}"
    );
    lab.wait_logged(&text);
    lab.assert_alive_and_logged_once(&text);
    victim.progresses(&lab, before, 20);
    serves_a_new_frontend(&lab);
    victim.progresses(&lab, victim.verified(), 20);
    victim.finish(&lab);
    lab.assert_idle();
    lab.assert_alive_and_logged_once(&text);
}

#[test]
fn add_mem_reg_with_a_region_larger_than_its_file_is_refused() {
    let mut lab = Lab::start();
    let victim = Victim::start(&lab.victim);
    let mut fe = raw_frontend(&lab.hostile);
    let file = memfd(4096);
    let before = victim.verified();
    let added = fe.add_mem_region(&region(1 << 32, 1 << 20, &file));
    assert!(
        added.is_err(),
        "ADD_MEM_REG of 1 MiB over a 4 KiB file was accepted"
    );
    let text = "ADD_MEM_REG: the region at guest address 0x100000000: 1048576 bytes at file \
                offset 0 need a file of 1048576 bytes; it has 4096";
    lab.wait_logged(text);
    lab.assert_alive_and_logged_once(text);
    victim.progresses(&lab, before, 20);
    serves_a_new_frontend(&lab);
    victim.finish(&lab);
    lab.assert_idle();
}

#[test]
fn add_mem_reg_past_the_advertised_slots_is_refused() {
    let mut lab = Lab::start();
    let victim = Victim::start(&lab.victim);
    let mut fe = raw_frontend(&lab.hostile);
    let slots = fe.get_max_mem_slots().expect("GET_MAX_MEM_SLOTS");
    assert_eq!(slots, 509);
    let before = victim.verified();
    for i in 0..slots {
        let file = memfd(4096);
        fe.add_mem_region(&region((1 << 32) + i * 0x10000, 4096, &file))
            .unwrap_or_else(|e| panic!("ADD_MEM_REG {i}: {e}\n{}", lab.daemon.output()));
    }
    let file = memfd(4096);
    let one_more = fe.add_mem_region(&region((1 << 32) + slots * 0x10000, 4096, &file));
    assert!(
        one_more.is_err(),
        "ADD_MEM_REG number {} was accepted",
        slots + 1
    );
    let text = "ADD_MEM_REG: all 509 memory slots are in use";
    lab.wait_logged(text);
    lab.assert_alive_and_logged_once(text);
    victim.progresses(&lab, before, 20);
    serves_a_new_frontend(&lab);
    victim.finish(&lab);
    lab.assert_idle();
}

#[test]
fn add_mem_reg_overlapping_a_region_is_refused() {
    let mut lab = Lab::start();
    let victim = Victim::start(&lab.victim);
    let mut fe = raw_frontend(&lab.hostile);
    let (a, b) = (memfd(1 << 16), memfd(1 << 16));
    fe.add_mem_region(&region(1 << 32, 1 << 16, &a))
        .expect("the first region");
    let overlapping = fe.add_mem_region(&region((1 << 32) + (1 << 15), 1 << 16, &b));
    assert!(overlapping.is_err(), "an overlapping region was accepted");
    // vm-memory's GuestRegionCollectionError::MemoryRegionOverlap.
    let text = "Some of the memory regions intersect with each other";
    lab.wait_logged(text);
    lab.assert_alive_and_logged_once(text);
    serves_a_new_frontend(&lab);
    victim.progresses(&lab, victim.verified(), 20);
    victim.finish(&lab);
    lab.assert_idle();
}

/// Guest memory shortened to `cut` bytes once `prepare` has submitted what the backend is to
/// touch past the cut; then a kick. vubd must survive, fail only that device, and log one line
/// with `what`.
fn cut_guest_memory(
    cut: impl Fn(&BlkFrontend) -> usize,
    prepare: impl Fn(&mut BlkFrontend),
    what: impl Fn(&BlkFrontend) -> String,
) {
    let mut lab = Lab::start();
    let victim = Victim::start(&lab.victim);
    let mut fe = BlkFrontend::connect(&lab.hostile, Options::new(1)).expect("connect");
    prepare(&mut fe);
    fe.publish(0);
    fe.truncate_memory(cut(&fe)).expect("truncate");
    let before = victim.verified();
    fe.kick(0).expect("kick");
    survived(&mut lab, &what(&fe));
    closed_by_vubd(&fe, &lab);
    victim.progresses(&lab, before, 20);
    serves_a_new_frontend(&lab);
    victim.progresses(&lab, victim.verified(), 20);
    victim.finish(&lab);
    lab.assert_idle();
    lab.assert_alive_and_logged_once(FAULT_LINE);
}

#[test]
fn a_get_id_buffer_in_a_cut_part_of_guest_memory_fails_only_its_device() {
    cut_guest_memory(
        |fe| fe.layout(0).data,
        |fe| {
            fe.submit(0, Request::GetId, 1).expect("submit");
        },
        |fe| format!("guest address {:#x}", GPA_BASE + fe.layout(0).data as u64),
    );
}

#[test]
fn request_headers_and_status_bytes_in_a_cut_part_fail_only_their_device() {
    cut_guest_memory(
        |fe| fe.layout(0).hdrs,
        |fe| {
            fe.submit(0, Request::Flush, 1).expect("submit");
        },
        |fe| format!("guest address {:#x}", GPA_BASE + fe.layout(0).hdrs as u64),
    );
}

#[test]
fn rings_in_a_cut_part_of_guest_memory_fail_only_their_device() {
    cut_guest_memory(
        |_| 0,
        |fe| {
            fe.submit(
                0,
                Request::Read {
                    sector: 0,
                    len: BLOCK,
                },
                1,
            )
            .expect("submit");
        },
        |_| format!("in the region at {GPA_BASE:#x}"),
    );
}

#[test]
fn a_cut_inflight_region_fails_only_its_device() {
    let mut lab = Lab::start();
    let victim = Victim::start(&lab.victim);
    let mut fe = BlkFrontend::connect(&lab.hostile, Options::new(1)).expect("connect");
    assert!(fe.tracks_inflight());
    fe.truncate_inflight(0).expect("truncate");
    let before = victim.verified();
    fe.submit(
        0,
        Request::Read {
            sector: 3 * BLOCK as u64 / SECTOR,
            len: BLOCK,
        },
        1,
    )
    .expect("submit");
    fe.notify(0).expect("notify");
    survived(&mut lab, "of the inflight region");
    closed_by_vubd(&fe, &lab);
    victim.progresses(&lab, before, 20);
    serves_a_new_frontend(&lab);
    victim.finish(&lab);
    lab.assert_idle();
    lab.assert_alive_and_logged_once(FAULT_LINE);
}
