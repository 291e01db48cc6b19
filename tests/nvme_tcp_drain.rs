//! Stopping rings while the NVMe/TCP target is away: the Linux kernel target in a TCG guest
//! (`tests/common/nvmet.rs`), paused over QMP with requests in flight, and vubd serving its
//! namespace with a short `--io-timeout` and a long `--ctrl-loss-tmo`.
//!
//! - GET_VRING_BASE is answered only once every request of the ring has completed and been
//!   published; they complete with an error status once the I/O timeout has passed (long before
//!   `--ctrl-loss-tmo`), and nothing is written into the ring or the requests' buffers after the
//!   answer, neither while the target stays away nor once it is back.
//! - The end of a session (a libblkio frontend that goes with requests in flight) and SIGTERM
//!   stop rings the same way, and are as bounded: the next frontend is served, and vubd exits,
//!   within the I/O timeout and a few seconds.
//!
//! GET_VRING_BASE comes from a minimal vhost-user frontend of this file ([`RawRing`]) on the
//! `vhost` crate's `Frontend`, which keeps its ring in memory the test can watch: libblkio never
//! stops a ring on its own (it disconnects).

mod common;

use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use common::daemon::{Daemon, DaemonConfig, PollMode};
use common::nvmet::{NvmetOptions, NvmetTarget};
use common::{Rng, TIMEOUT, assert_same};
use vhost::vhost_user::Frontend;
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vmm_sys_util::eventfd::EventFd;
use vubd::mem::SharedMapping;

/// vubd's `--io-timeout`, seconds.
const IO_TIMEOUT_S: u64 = 3;
const IO_TIMEOUT: Duration = Duration::from_secs(IO_TIMEOUT_S);
/// How much later than the I/O timeout the requests may fail: the timeout check's period, the
/// poller's wake-up, the control plane, a loaded machine.
const SLACK: Duration = Duration::from_secs(5);
/// How long the test waits for the GET_VRING_BASE answer at most: longer than the 30 s a
/// detach used to give up after, so that what happens then is seen.
const REPLY_WAIT: Duration = Duration::from_secs(60);
/// How long the ring and buffers are watched after the answer, before and after the target
/// returns.
const WATCH: Duration = Duration::from_secs(3);

const KIB: usize = 1024;
const MIB: u64 = 1 << 20;

/// The shared memory of [`RawRing`]: one region at guest address 0.
const MEM_LEN: usize = 4 << 20;
const QSIZE: u16 = 64;
const DESC: usize = 0;
const AVAIL: usize = 0x1000;
const USED: usize = 0x2000;
/// Used ring bytes: flags, idx, the elements, avail_event.
const USED_LEN: usize = 4 + 8 * QSIZE as usize + 2;
const HEADERS: usize = 0x3000;
const STATUS: usize = 0x4000;
const DATA: usize = 0x10000;
/// Each request's data area: a guard, the buffer (up to `MAX_DATA`), a guard.
const GUARD: usize = 4 * KIB;
const MAX_DATA: usize = 128 * KIB;
const SLOT: usize = GUARD + MAX_DATA + GUARD;
/// Requests [`RawRing`] can make in its life: three descriptors each, never reused.
const MAX_REQUESTS: usize = QSIZE as usize / 3;
const GUARD_BYTE: u8 = 0xa5;
const UNTOUCHED_STATUS: u8 = 0xff;

const VIRTIO_BLK_T_IN: u32 = 0;
const VIRTIO_BLK_T_OUT: u32 = 1;
const VIRTIO_BLK_S_OK: u8 = 0;
const VIRTIO_BLK_S_IOERR: u8 = 1;
const VRING_DESC_F_NEXT: u16 = 1;
const VRING_DESC_F_WRITE: u16 = 2;
const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// A memfd mapped shared into this process, for the backend to map too.
struct SharedMem(SharedMapping);

impl SharedMem {
    fn new() -> Self {
        Self(SharedMapping::memfd(c"vubd-drain-test", MEM_LEN).expect("shared memory"))
    }

    /// Pointer to byte `off` of the region.
    fn at(&self, off: usize) -> *mut u8 {
        assert!(off < MEM_LEN);
        self.0.as_ptr().wrapping_add(off)
    }

    fn write(&self, off: usize, bytes: &[u8]) {
        assert!(off + bytes.len() <= MEM_LEN);
        for (i, &b) in bytes.iter().enumerate() {
            // SAFETY: inside the mapping (checked above), which lives as long as `self`; the
            // backend may access the same bytes, hence volatile.
            unsafe { self.at(off + i).write_volatile(b) };
        }
    }

    fn read(&self, off: usize, len: usize) -> Vec<u8> {
        assert!(off + len <= MEM_LEN);
        // SAFETY: as in `write`.
        (0..len)
            .map(|i| unsafe { self.at(off + i).read_volatile() })
            .collect()
    }

    fn read_u16(&self, off: usize) -> u16 {
        let b = self.read(off, 2);
        u16::from_le_bytes([b[0], b[1]])
    }
}

/// One request [`RawRing`] made.
#[derive(Clone, Copy, Debug)]
struct Req {
    id: usize,
    read: bool,
    len: usize,
}

impl Req {
    fn buffer(&self) -> usize {
        DATA + self.id * SLOT + GUARD
    }
}

/// A minimal vhost-user-blk frontend: one split ring of [`QSIZE`] entries in [`SharedMem`],
/// requests of three descriptors (header, data, status), no notifications from the backend
/// used (the test looks at the used ring).
struct RawRing {
    frontend: Frontend,
    mem: SharedMem,
    kick: EventFd,
    _call: EventFd,
    avail_idx: u16,
    made: usize,
}

impl RawRing {
    fn connect(socket: &Path) -> Self {
        let mem = SharedMem::new();
        mem.write(STATUS, &[UNTOUCHED_STATUS; MAX_REQUESTS]);
        for id in 0..MAX_REQUESTS {
            mem.write(DATA + id * SLOT, &[GUARD_BYTE; SLOT]);
        }
        let frontend = Frontend::connect(socket, 1).expect("connect the raw frontend");
        frontend.set_owner().expect("SET_OWNER");
        let offered = frontend.get_features().expect("GET_FEATURES");
        // Without VHOST_USER_F_PROTOCOL_FEATURES the ring is enabled as soon as it starts.
        frontend
            .set_features(offered & VIRTIO_F_VERSION_1)
            .expect("SET_FEATURES");
        let base = mem.0.as_ptr() as u64;
        frontend
            .set_mem_table(&[VhostUserMemoryRegionInfo {
                guest_phys_addr: 0,
                memory_size: MEM_LEN as u64,
                userspace_addr: base,
                mmap_offset: 0,
                mmap_handle: mem.0.file().as_raw_fd(),
            }])
            .expect("SET_MEM_TABLE");
        frontend.set_vring_num(0, QSIZE).expect("SET_VRING_NUM");
        frontend
            .set_vring_addr(
                0,
                &VringConfigData {
                    queue_max_size: QSIZE,
                    queue_size: QSIZE,
                    flags: 0,
                    desc_table_addr: base + DESC as u64,
                    used_ring_addr: base + USED as u64,
                    avail_ring_addr: base + AVAIL as u64,
                    log_addr: None,
                },
            )
            .expect("SET_VRING_ADDR");
        frontend.set_vring_base(0, 0).expect("SET_VRING_BASE");
        let call = EventFd::new(libc::EFD_NONBLOCK).expect("call eventfd");
        let kick = EventFd::new(libc::EFD_NONBLOCK).expect("kick eventfd");
        frontend.set_vring_call(0, &call).expect("SET_VRING_CALL");
        frontend.set_vring_kick(0, &kick).expect("SET_VRING_KICK");
        Self {
            frontend,
            mem,
            kick,
            _call: call,
            avail_idx: 0,
            made: 0,
        }
    }

    fn desc(&self, index: usize, addr: usize, len: usize, flags: u16, next: usize) {
        let mut d = [0u8; 16];
        d[0..8].copy_from_slice(&(addr as u64).to_le_bytes());
        d[8..12].copy_from_slice(&u32::try_from(len).expect("fits").to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..16].copy_from_slice(&u16::try_from(next).expect("fits").to_le_bytes());
        self.mem.write(DESC + 16 * index, &d);
    }

    /// Makes a read (`data: None`) or a write of `len` bytes at `offset` available, without
    /// a kick.
    fn submit(&mut self, offset: u64, len: usize, data: Option<&[u8]>) -> Req {
        assert!(len <= MAX_DATA && self.made < MAX_REQUESTS);
        let req = Req {
            id: self.made,
            read: data.is_none(),
            len,
        };
        self.made += 1;
        let mut header = [0u8; 16];
        let kind = if req.read {
            VIRTIO_BLK_T_IN
        } else {
            VIRTIO_BLK_T_OUT
        };
        header[0..4].copy_from_slice(&kind.to_le_bytes());
        header[8..16].copy_from_slice(&(offset / 512).to_le_bytes());
        self.mem.write(HEADERS + 16 * req.id, &header);
        if let Some(data) = data {
            assert_eq!(data.len(), len);
            self.mem.write(req.buffer(), data);
        }
        let head = 3 * req.id;
        let data_flags = VRING_DESC_F_NEXT | if req.read { VRING_DESC_F_WRITE } else { 0 };
        self.desc(head, HEADERS + 16 * req.id, 16, VRING_DESC_F_NEXT, head + 1);
        self.desc(head + 1, req.buffer(), len, data_flags, head + 2);
        self.desc(head + 2, STATUS + req.id, 1, VRING_DESC_F_WRITE, 0);
        let slot = usize::from(self.avail_idx % QSIZE);
        let head = u16::try_from(head).expect("fits");
        self.mem.write(AVAIL + 4 + 2 * slot, &head.to_le_bytes());
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.mem.write(AVAIL + 2, &self.avail_idx.to_le_bytes());
        req
    }

    fn kick(&self) {
        self.kick.write(1).expect("kick");
    }

    fn used_idx(&self) -> u16 {
        self.mem.read_u16(USED + 2)
    }

    fn status(&self, req: &Req) -> u8 {
        self.mem.read(STATUS + req.id, 1)[0]
    }

    fn data(&self, req: &Req) -> Vec<u8> {
        self.mem.read(req.buffer(), req.len)
    }

    /// The guards around the request's buffer are untouched.
    fn guards_intact(&self, req: &Req) -> bool {
        let before = self.mem.read(DATA + req.id * SLOT, GUARD);
        let after = self
            .mem
            .read(req.buffer() + req.len, SLOT - GUARD - req.len);
        before.iter().chain(&after).all(|&b| b == GUARD_BYTE)
    }

    /// Waits (bounded) until the used index is `idx`.
    #[track_caller]
    fn wait_used(&self, idx: u16) {
        let deadline = Instant::now() + TIMEOUT;
        while self.used_idx() != idx {
            assert!(
                Instant::now() < deadline,
                "used index {} after {TIMEOUT:?}, want {idx}",
                self.used_idx()
            );
            thread::sleep(Duration::from_millis(1));
        }
    }

    /// Everything the backend may write: the used ring, the status bytes, the data areas.
    fn snapshot(&self) -> Vec<u8> {
        let mut s = self.mem.read(USED, USED_LEN);
        s.extend(self.mem.read(STATUS, MAX_REQUESTS));
        s.extend(self.mem.read(DATA, self.made * SLOT));
        s
    }
}

/// What GET_VRING_BASE answered, and when.
#[derive(Debug)]
struct Answer {
    base: u32,
    /// The used index right after the answer arrived.
    used_at_answer: u16,
    /// From the GET_VRING_BASE request to its answer.
    after: Duration,
}

/// Sends GET_VRING_BASE for queue 0 and waits (up to [`REPLY_WAIT`]) for the answer,
/// meanwhile noting when the used index reached `all`. Returns the answer and that moment
/// (from the request), if it came.
fn stop_ring(ring: &RawRing, all: u16) -> (Answer, Option<Duration>) {
    let frontend = ring.frontend.clone();
    let used_idx = ring.mem.at(USED + 2) as usize;
    let (tx, rx) = mpsc::channel();
    let sent = Instant::now();
    let answering = thread::spawn(move || {
        let base = frontend.get_vring_base(0).expect("GET_VRING_BASE");
        let used = used_idx as *const [u8; 2];
        // SAFETY: the used index lies in the ring's mapping, which is unmapped only after this
        // thread is joined (or leaked, if the answer never comes); the backend may write it,
        // hence volatile.
        let used = u16::from_le_bytes(unsafe { used.read_volatile() });
        let _ = tx.send(Answer {
            base,
            used_at_answer: used,
            after: sent.elapsed(),
        });
    });
    let mut all_done = None;
    let answer = loop {
        if all_done.is_none() && ring.used_idx() == all {
            all_done = Some(sent.elapsed());
        }
        match rx.recv_timeout(Duration::from_millis(1)) {
            // The last publish and the answer may fall in one wait: the answer thread read
            // the used index only after the reply, so a full ring then was full before it.
            Ok(a) => {
                if all_done.is_none() && a.used_at_answer == all {
                    all_done = Some(a.after);
                }
                break a;
            }
            Err(mpsc::RecvTimeoutError::Timeout) if sent.elapsed() < REPLY_WAIT => {}
            Err(e) => {
                // The thread may still read the ring's memory: keep it mapped.
                std::mem::forget(answering);
                panic!(
                    "no GET_VRING_BASE answer within {REPLY_WAIT:?} ({e}); used index {} of {all}",
                    ring.used_idx()
                );
            }
        }
    };
    answering.join().expect("GET_VRING_BASE thread");
    (answer, all_done)
}

fn uri(t: &NvmetTarget) -> String {
    format!("nvme-tcp://127.0.0.1:{}/{}", t.port(), t.nqn())
}

fn serve(t: &NvmetTarget) -> Daemon {
    let config = DaemonConfig {
        num_queues: Some(1),
        // Pollers that sleep whenever they can: a drain must wake them by itself.
        poll: Some(PollMode::Never),
        ..DaemonConfig::default()
    };
    let io_timeout = IO_TIMEOUT_S.to_string();
    let args = [
        "--io-timeout",
        &io_timeout,
        "--ctrl-loss-tmo",
        "600",
        "--reconnect-delay",
        "1",
        "--keep-alive-tmo",
        "60",
    ];
    let args: Vec<&std::ffi::OsStr> = args.iter().map(std::ffi::OsStr::new).collect();
    Daemon::vubd_disk(Path::new(&uri(t)), &config, &args)
}

/// Waits (bounded) until vubd has logged `needle` at least `count` times.
#[track_caller]
fn wait_for_log(vubd: &Daemon, needle: &str, count: usize) {
    let deadline = Instant::now() + 3 * TIMEOUT;
    while vubd.output().matches(needle).count() < count {
        assert!(
            Instant::now() < deadline,
            "vubd did not log {needle:?} {count} times:\n{}",
            vubd.output()
        );
        thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn stopping_a_ring_while_the_target_is_paused_fails_its_requests_at_the_io_timeout_first() {
    let target = NvmetTarget::start(&NvmetOptions {
        namespaces: 1,
        ns_size_mib: 16,
        ..NvmetOptions::default()
    });
    let mut vubd = serve(&target);
    let mut rng = Rng::new(0xd4a1);

    // GET_VRING_BASE with the target paused.
    let mut ring = RawRing::connect(vubd.socket());
    let before = rng.bytes(64 * KIB);
    let w = ring.submit(0, before.len(), Some(&before));
    ring.kick();
    ring.wait_used(1);
    let r = ring.submit(0, before.len(), None);
    ring.kick();
    ring.wait_used(2);
    assert_eq!(
        (ring.status(&w), ring.status(&r)),
        (VIRTIO_BLK_S_OK, VIRTIO_BLK_S_OK)
    );
    assert_same(&before, &ring.data(&r), 0, "read through the raw ring");

    target.stop_guest();
    let in_flight = [
        ring.submit(0, 64 * KIB, None),
        ring.submit(256 * KIB as u64, 4 * KIB, None),
        ring.submit(MIB, 128 * KIB, None),
        ring.submit(2 * MIB, 4 * KIB, Some(&rng.bytes(4 * KIB))),
        ring.submit(3 * MIB, 64 * KIB, Some(&rng.bytes(64 * KIB))),
        ring.submit(512 * KIB as u64, 8 * KIB, None),
    ];
    let submitted = Instant::now();
    ring.kick();
    // vubd pops them all and sends them to the paused target, where they stay.
    thread::sleep(Duration::from_millis(500));
    assert_eq!(
        ring.used_idx(),
        2,
        "nothing completes while the target is paused"
    );
    let all = 2 + in_flight.len() as u16;
    let (answer, all_done) = stop_ring(&ring, all);
    let answered = submitted.elapsed();
    let statuses: Vec<u8> = in_flight.iter().map(|q| ring.status(q)).collect();
    let after_answer = ring.snapshot();
    thread::sleep(WATCH);
    let changed_while_paused = ring.snapshot() != after_answer;
    target.cont_guest();
    wait_for_log(&vubd, "controller reconnected", 1);
    thread::sleep(WATCH);
    let changed_after_return = ring.snapshot() != after_answer;
    eprintln!(
        "GET_VRING_BASE: {answer:?}; answered {answered:?} after the requests were made; \
         every request published {all_done:?} after GET_VRING_BASE; statuses {statuses:?}; \
         ring or buffers changed after the answer: {changed_while_paused} while paused, \
         {changed_after_return} once the target was back"
    );

    assert_eq!(
        answer.used_at_answer, all,
        "GET_VRING_BASE answered with requests still in flight"
    );
    assert_eq!(answer.base, u32::from(all), "the ring's next avail index");
    assert!(
        all_done.is_some_and(|d| d <= answer.after),
        "every request was published before the answer"
    );
    assert!(
        answered >= IO_TIMEOUT - Duration::from_millis(500) && answered < IO_TIMEOUT + SLACK,
        "the requests fail once the I/O timeout has passed, not before nor much later: {answered:?}"
    );
    assert!(
        statuses.iter().all(|&s| s == VIRTIO_BLK_S_IOERR),
        "requests that could not complete fail with VIRTIO_BLK_S_IOERR: {statuses:?}"
    );
    assert!(
        !changed_while_paused && !changed_after_return,
        "nothing is written into the ring or the buffers after the answer"
    );
    for q in in_flight.iter().filter(|q| q.read) {
        assert!(ring.guards_intact(q), "guards around read {q:?}");
        assert!(
            ring.data(q).iter().all(|&b| b == GUARD_BYTE),
            "the failed read {q:?} left its buffer alone"
        );
    }
    wait_for_log(&vubd, "requests failed after the I/O timeout", 1);
    drop(ring);

    // A session that ends with requests in flight: the next frontend is served in bounded
    // time, and I/O works again once the target is back.
    let mut client = vubd.connect(1);
    assert_same(
        &before,
        &client.queue(0).read(0, before.len()),
        0,
        "read after the target's return",
    );
    target.stop_guest();
    let q = client.queue(0);
    q.submit_read(0, 64 * KIB);
    q.submit_write(4 * MIB, &rng.bytes(16 * KIB));
    q.kick();
    thread::sleep(Duration::from_millis(500));
    let left = Instant::now();
    drop(client);
    let mut client = vubd.connect(1);
    let served = left.elapsed();
    eprintln!("next frontend served {served:?} after the last one left");
    assert!(
        served < IO_TIMEOUT + SLACK,
        "the session's end waited {served:?} for requests to a paused target"
    );
    target.cont_guest();
    wait_for_log(&vubd, "controller reconnected", 2);
    assert_same(
        &before,
        &client.queue(0).read(0, before.len()),
        0,
        "read by the next frontend",
    );

    // SIGTERM with requests in flight: vubd exits in bounded time.
    target.stop_guest();
    let q = client.queue(0);
    q.submit_read(0, 64 * KIB);
    q.submit_read(64 * KIB as u64, 64 * KIB);
    q.kick();
    thread::sleep(Duration::from_millis(500));
    let signalled = Instant::now();
    let status = vubd.terminate();
    let exited = signalled.elapsed();
    eprintln!("vubd exited {exited:?} after SIGTERM: {status}");
    assert!(status.success(), "vubd exit status: {status}");
    assert!(
        exited < IO_TIMEOUT + SLACK,
        "SIGTERM waited {exited:?} for requests to a paused target"
    );
    drop(client);
    target.cont_guest();
    eprintln!("{}", vubd.output());
}
