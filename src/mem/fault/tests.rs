//! The table (on tables of the tests' own) and the handler in this process: a memfd mapped,
//! shortened and touched is survived once registered, and still ends the process otherwise.

use std::os::unix::fs::FileExt;
use std::os::unix::process::ExitStatusExt;
use std::process::Command;

use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestRegionMmap, MmapRegion};

use super::*;
use crate::mem::{GuestMemory, SharedMapping};

const PAGE: usize = 4096;

fn owner() -> Arc<DeviceFaults> {
    Arc::new(DeviceFaults::new().expect("eventfd"))
}

/// A table of `n` entries for one test.
fn table(n: usize) -> &'static [Entry] {
    Box::leak((0..n).map(|_| Entry::free()).collect())
}

/// Addresses no mapping of this process has (above the user address space): the table only
/// compares them.
fn fake(page: usize) -> usize {
    (usize::MAX - (1 << 40)) / PAGE * PAGE + page * PAGE
}

#[test]
fn an_entry_is_found_while_registered_and_gone_once_dropped() {
    let t = table(4);
    let o = owner();
    let r = insert(t, (fake(0), 3 * PAGE, PAGE), Mapped::Inflight, &o).expect("insert");
    assert_eq!(o.registered(), 1);
    for (addr, found) in [
        (fake(0), true),
        (fake(3) - 1, true),
        (fake(3), false),
        (fake(0) - 1, false),
    ] {
        assert_eq!(lookup(t, addr).is_some(), found, "{addr:#x}");
    }
    let e = lookup(t, fake(1)).expect("found");
    assert_eq!((e.start, e.len, e.page), (fake(0), 3 * PAGE, PAGE));
    assert_eq!(e.mapped, Mapped::Inflight);
    assert_eq!(e.owner.cast_const(), Arc::as_ptr(&o));
    drop(r);
    assert!(lookup(t, fake(1)).is_none());
    assert_eq!(o.registered(), 0);
    // The freed entry is reused.
    let _r = insert(t, (fake(8), PAGE, PAGE), Mapped::DirtyLog, &o).expect("reuse");
}

#[test]
fn a_full_table_refuses_and_takes_again_once_an_entry_goes() {
    let t = table(2);
    let o = owner();
    let a = insert(t, (fake(0), PAGE, PAGE), Mapped::Inflight, &o).expect("a");
    let _b = insert(t, (fake(1), PAGE, PAGE), Mapped::Inflight, &o).expect("b");
    let full = insert(t, (fake(2), PAGE, PAGE), Mapped::Inflight, &o);
    assert_eq!(full.unwrap_err(), FaultError::Full(2));
    assert_eq!(
        o.registered(),
        2,
        "a refused registration gives its quota back"
    );
    drop(a);
    let _c = insert(t, (fake(2), PAGE, PAGE), Mapped::Inflight, &o).expect("c");
}

#[test]
fn an_overlapping_registration_is_refused_and_touching_ones_are_not() {
    let t = table(4);
    let o = owner();
    let _a = insert(t, (fake(4), 2 * PAGE, PAGE), Mapped::Guest { gpa: 0 }, &o).expect("a");
    for (start, len) in [
        (fake(4), PAGE),
        (fake(5), 4 * PAGE),
        (fake(3), 2 * PAGE),
        (fake(0), 16 * PAGE),
    ] {
        assert_eq!(
            insert(t, (start, len, PAGE), Mapped::Inflight, &o).unwrap_err(),
            FaultError::Overlap {
                start,
                len,
                other: fake(4)
            }
        );
    }
    let _below = insert(t, (fake(3), PAGE, PAGE), Mapped::Inflight, &o).expect("below");
    let _above = insert(t, (fake(6), PAGE, PAGE), Mapped::Inflight, &o).expect("above");
    assert_eq!(o.registered(), 3);
}

#[test]
fn one_device_cannot_take_more_than_its_share() {
    let t = table(PER_DEVICE + 1);
    let (greedy, other) = (owner(), owner());
    let held: Vec<Registration> = (0..PER_DEVICE)
        .map(|i| insert(t, (fake(i), PAGE, PAGE), Mapped::Inflight, &greedy).expect("insert"))
        .collect();
    let more = insert(t, (fake(PER_DEVICE), PAGE, PAGE), Mapped::Inflight, &greedy);
    assert_eq!(more.unwrap_err(), FaultError::Quota);
    let _o = insert(t, (fake(PER_DEVICE), PAGE, PAGE), Mapped::Inflight, &other).expect("other");
    drop(held);
    assert_eq!(greedy.registered(), 0);
}

#[test]
fn empty_unaligned_or_wrapping_mappings_are_refused() {
    let t = table(2);
    let o = owner();
    for (start, len, page) in [
        (fake(0), 0, PAGE),
        (fake(0) + 8, PAGE, PAGE),
        (fake(0), PAGE, 3000),
        (usize::MAX - PAGE + 1, 2 * PAGE, PAGE),
    ] {
        assert!(
            matches!(
                insert(t, (start, len, page), Mapped::Inflight, &o),
                Err(FaultError::Shape { .. })
            ),
            "{start:#x} {len} {page}"
        );
    }
    assert_eq!(o.registered(), 0);
}

#[test]
fn an_entry_being_written_is_not_read() {
    let t = table(1);
    let o = owner();
    let _r = insert(t, (fake(0), PAGE, PAGE), Mapped::Inflight, &o).expect("insert");
    let seq = t[0].seq.load(Ordering::Relaxed);
    t[0].seq.store(seq + 1, Ordering::Relaxed);
    assert!(lookup(t, fake(0)).is_none(), "odd sequence number");
    t[0].seq.store(seq, Ordering::Relaxed);
    assert!(lookup(t, fake(0)).is_some());
}

/// A memfd of `pages` pages.
fn memfd(pages: usize) -> File {
    let m = SharedMapping::memfd(c"vubd-test-fault", pages * PAGE).expect("memfd");
    m.file().try_clone().expect("dup")
}

/// Whether `fd` is readable now.
fn readable(fd: RawFd) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one live pollfd, no wait.
    unsafe { libc::poll(&raw mut p, 1, 0) == 1 }
}

#[test]
fn a_shortened_file_under_a_watched_mapping_fails_its_device_and_the_process_lives() {
    install().expect("install");
    let file = memfd(2);
    let mut map =
        SharedMapping::of_file(file.try_clone().expect("dup"), 0, 2 * PAGE as u64).expect("map");
    let o = owner();
    map.watch(Mapped::Inflight, &o).expect("watch");
    assert!(!o.failed());
    assert!(o.first().is_none());
    file.set_len(PAGE as u64).expect("truncate");
    let p = map.as_ptr();
    // SAFETY: inside the mapping; the second page is past the file's end now, so the first
    // access faults and is survived on a private zero page.
    let (before, after) = unsafe {
        let q = p.add(PAGE + 100);
        let before = q.read_volatile();
        q.write_volatile(0x5a);
        (before, q.read_volatile())
    };
    assert_eq!(
        (before, after),
        (0, 0x5a),
        "a private page of zeros, written"
    );
    assert!(o.failed());
    assert_eq!(
        o.first(),
        Some(Fault {
            mapped: Mapped::Inflight,
            len: 2 * PAGE as u64,
            offset: PAGE as u64 + 100,
        })
    );
    assert!(readable(o.event_fd()), "the session is woken");
    o.clear_event();
    assert!(!readable(o.event_fd()));
    // The first page is still the file's, both ways.
    file.write_at(&[7], 10).expect("write");
    // SAFETY: inside the mapping's first page, which the file still holds.
    assert_eq!(unsafe { p.add(10).read_volatile() }, 7);
    // SAFETY: as above.
    unsafe { p.add(11).write_volatile(9) };
    let mut b = [0u8];
    file.read_at(&mut b, 11).expect("read");
    assert_eq!(b, [9]);
    // And nothing of the private page reached the file.
    file.set_len(2 * PAGE as u64).expect("grow");
    file.read_at(&mut b, (PAGE + 100) as u64).expect("read");
    assert_eq!(b, [0]);
}

#[test]
fn a_guest_region_is_watched_until_nothing_else_holds_its_mapping() {
    install().expect("install");
    let file = memfd(4);
    let mapping =
        MmapRegion::<()>::from_file(FileOffset::new(file.try_clone().expect("dup"), 0), 4 * PAGE)
            .expect("map");
    let region = GuestRegionMmap::new(mapping, GuestAddress(0x4000_0000)).expect("region");
    let host = region.as_ptr();
    let o = owner();
    let mut regions = GuestRegions::new(o.clone());
    regions.add(&region).expect("add");
    assert_eq!((regions.len(), o.registered()), (1, 1));
    let current = GuestMemory::from_arc_regions(vec![Arc::new(region)]).expect("memory");
    assert!(!regions.sweep(&current), "in the current map: not retired");
    assert_eq!(regions.len(), 1);
    file.set_len(PAGE as u64).expect("truncate");
    // SAFETY: inside the region's mapping (held by `current`); past the file's end, so the
    // access is survived.
    let v = unsafe { host.add(3 * PAGE + 8).read_volatile() };
    assert_eq!(v, 0);
    assert_eq!(
        o.first(),
        Some(Fault {
            mapped: Mapped::Guest { gpa: 0x4000_0000 },
            len: 4 * PAGE as u64,
            offset: 3 * PAGE as u64 + 8,
        })
    );
    assert_eq!(
        o.first().expect("fault").to_string(),
        "guest address 0x40003008, in the region at 0x40000000 (16384 bytes)"
    );
    // Out of the table but still held (a request's snapshot): retired, still registered.
    let held = current.iter().next().expect("region").get_mmap();
    let empty = GuestMemory::default();
    drop(current);
    assert!(regions.sweep(&empty), "retired, still held");
    assert_eq!(regions.len(), 1);
    assert!(lookup(&TABLE, host as usize).is_some());
    drop(held);
    assert!(!regions.sweep(&empty));
    assert_eq!((regions.len(), o.registered()), (0, 0));
    assert!(lookup(&TABLE, host as usize).is_none());
}

#[test]
fn an_unwatched_fault_still_ends_the_process_with_sigbus() {
    const CHILD: &str = "VUBD_TEST_FAULT_CHILD";
    if std::env::var_os(CHILD).is_some() {
        // The child: no core file, then a fault in a mapping whose registration went.
        let none = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: a valid rlimit for this process.
        unsafe { libc::setrlimit(libc::RLIMIT_CORE, &raw const none) };
        install().expect("install");
        let file = memfd(2);
        let mut map = SharedMapping::of_file(file.try_clone().expect("dup"), 0, 2 * PAGE as u64)
            .expect("map");
        let o = owner();
        map.watch(Mapped::Inflight, &o).expect("watch");
        drop(map);
        let map = SharedMapping::of_file(file.try_clone().expect("dup"), 0, 2 * PAGE as u64)
            .expect("map again");
        file.set_len(PAGE as u64).expect("truncate");
        // SAFETY: inside the mapping, past the file's end: this must end the process.
        unsafe { map.as_ptr().add(PAGE).write_volatile(1) };
        std::process::exit(0);
    }
    let exe = std::env::current_exe().expect("test binary");
    let out = Command::new(exe)
        .args([
            "--exact",
            "mem::fault::tests::an_unwatched_fault_still_ends_the_process_with_sigbus",
            "--test-threads=1",
        ])
        .env(CHILD, "1")
        .output()
        .expect("run the child");
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGBUS),
        "{:?}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout)
    );
}
