use std::cell::Cell;

use proptest::prelude::*;

use super::*;
use crate::mem::SharedError;

thread_local! {
    /// Stores the region may still take in this thread: a crash after that many.
    static BUDGET: Cell<Option<usize>> = const { Cell::new(None) };
}

/// Whether the next store of the region happens (and counts it).
pub(super) fn store_allowed() -> bool {
    BUDGET.with(|b| match b.get() {
        None => true,
        Some(0) => false,
        Some(n) => {
            b.set(Some(n - 1));
            true
        }
    })
}

/// Runs `f` as a process that is killed after `stores` stores to the region.
fn crash_after<R>(stores: Option<usize>, f: impl FnOnce() -> R) -> R {
    BUDGET.with(|b| b.set(stores));
    let r = f();
    BUDGET.with(|b| b.set(None));
    r
}

fn stores_left() -> Option<usize> {
    BUDGET.with(Cell::get)
}

const QUEUES: u16 = 2;
const SIZE: u16 = 16;

/// A new process taking up the region in `file` (as SET_INFLIGHT_FD gives it).
fn reopen(region: &InflightRegion, q: u16, used: u16) -> (InflightQueue, Recovered) {
    let file = region.file().try_clone().expect("dup");
    let size = region.size();
    let again = Arc::new(InflightRegion::adopt(file, 0, size, QUEUES, SIZE).expect("adopt"));
    let mut queue = again.queue(q, SIZE).expect("queue");
    let rec = queue.recover(used);
    (queue, rec)
}

#[test]
fn areas_are_cache_line_multiples_as_libvhost_user_lays_them_out() {
    assert_eq!(queue_area_size(1), 64);
    assert_eq!(queue_area_size(2), 64);
    assert_eq!(queue_area_size(128), 16 * 128 + 64);
    assert_eq!(queue_area_size(256), 16 * 256 + 64);
}

#[test]
fn shapes_and_sizes_that_cannot_hold_the_queues_are_refused() {
    assert!(InflightRegion::create(0, 128).is_err());
    assert!(InflightRegion::create(1, 0).is_err());
    assert!(InflightRegion::create(1, MAX_QUEUE_SIZE + 1).is_err());
    let r = InflightRegion::create(QUEUES, SIZE).expect("create");
    let file = || r.file().try_clone().expect("dup");
    let queues = (queue_area_size(SIZE) * usize::from(QUEUES)) as u64;
    let too_small = InflightRegion::adopt(file(), 0, queues - 1, QUEUES, SIZE);
    assert!(matches!(too_small, Err(InflightError::TooSmall { .. })));
    let past_end = InflightRegion::adopt(file(), 64, r.size(), QUEUES, SIZE);
    assert!(matches!(
        past_end,
        Err(InflightError::Shared(SharedError::OutOfFile { .. }))
    ));
    let r = Arc::new(r);
    assert!(r.queue(QUEUES, SIZE).is_none(), "no area for a third queue");
    assert!(
        r.queue(0, SIZE * 2).is_none(),
        "a ring larger than the area"
    );
}

#[test]
fn the_write_cache_mode_outlives_the_process_that_recorded_it() {
    let r = InflightRegion::create(QUEUES, SIZE).expect("create");
    assert_eq!(r.write_cache(), None, "nothing recorded yet");
    assert!(r.set_write_cache(WriteCache::Through));
    let again = |size| {
        let file = r.file().try_clone().expect("dup");
        InflightRegion::adopt(file, 0, size, QUEUES, SIZE).expect("adopt")
    };
    assert_eq!(again(r.size()).write_cache(), Some(WriteCache::Through));
    assert!(again(r.size()).set_write_cache(WriteCache::Unknown));
    assert_eq!(r.write_cache(), Some(WriteCache::Unknown));
    assert!(r.set_write_cache(WriteCache::Back));
    assert_eq!(again(r.size()).write_cache(), Some(WriteCache::Back));
    // A region laid out by another backend: queue areas only.
    let queues_only = again((queue_area_size(SIZE) * usize::from(QUEUES)) as u64);
    assert_eq!(queues_only.write_cache(), None);
    assert!(!queues_only.set_write_cache(WriteCache::Through));
}

#[test]
fn a_fresh_area_is_claimed_and_has_nothing_to_resubmit() {
    let r = Arc::new(InflightRegion::create(QUEUES, SIZE).expect("create"));
    let mut q = r.queue(1, SIZE).expect("queue");
    assert_eq!(q.recover(7), Recovered::default());
    let (_, rec) = reopen(&r, 1, 7);
    assert_eq!(rec, Recovered::default());
}

#[test]
fn requests_completed_out_of_order_are_resubmitted_once_in_pop_order() {
    let r = Arc::new(InflightRegion::create(QUEUES, SIZE).expect("create"));
    let mut q = r.queue(0, SIZE).expect("queue");
    q.recover(0);
    for head in [3, 7, 1, 5] {
        q.begin(head);
    }
    q.link(7);
    q.link(5);
    q.published(2);
    let (mut q, rec) = reopen(&r, 0, 2);
    assert_eq!(rec.resubmit, vec![3, 1]);
    // The new process pops after the resubmitted ones: they stay first after another crash.
    q.begin(9);
    let (_, rec) = reopen(&r, 0, 2);
    assert_eq!(rec.resubmit, vec![3, 1, 9]);
}

#[test]
fn queues_have_areas_of_their_own() {
    let r = Arc::new(InflightRegion::create(QUEUES, SIZE).expect("create"));
    let (mut a, mut b) = (r.queue(0, SIZE).expect("q0"), r.queue(1, SIZE).expect("q1"));
    a.recover(0);
    b.recover(0);
    a.begin(4);
    b.begin(6);
    assert_eq!(reopen(&r, 0, 0).1.resubmit, vec![4]);
    assert_eq!(reopen(&r, 1, 0).1.resubmit, vec![6]);
}

#[test]
fn garbage_from_the_frontend_is_bounded() {
    let r = InflightRegion::create(QUEUES, SIZE).expect("create");
    // A "used" area full of 0xff: every index out of range, every entry in flight.
    // SAFETY: the test owns the mapping, `size()` bytes long; no queue view exists yet.
    unsafe { std::ptr::write_bytes(r.map.as_ptr(), 0xff, r.map.len()) };
    // SAFETY: as above.
    unsafe { r.map.as_ptr().add(OFF_VERSION).cast::<u16>().write(VERSION) };
    let (_, rec) = reopen(&r, 0, 3);
    assert_eq!(rec.resubmit.len(), usize::from(SIZE));
    assert!(rec.resubmit.iter().all(|&h| h < SIZE));
}

/// One step of a queue's life as the poller drives it, over a simulated used ring.
#[derive(Clone, Debug)]
enum Step {
    Pop(u16),
    /// Complete these heads (already popped) as one batch.
    Complete(Vec<u16>),
}

/// What the guest and the region see at a crash: heads fully recorded as popped, and heads
/// whose used elements the guest can see, each in order.
#[derive(Debug, Default)]
struct Seen {
    popped: Vec<u16>,
    used: Vec<u16>,
}

/// Runs `steps` until the store budget runs out (the used index store of a batch counts as
/// one store, between linking and clearing, as the poller makes it).
fn run(q: &mut InflightQueue, steps: &[Step]) -> Seen {
    let mut seen = Seen::default();
    for step in steps {
        match step {
            Step::Pop(h) => {
                q.begin(*h);
                if stores_left() == Some(0) {
                    // Killed somewhere in `begin`: popped only if its last store happened.
                    if q.read::<u8>(q.desc(*h) + DESC_INFLIGHT) != 0 {
                        seen.popped.push(*h);
                    }
                    return seen;
                }
                seen.popped.push(*h);
            }
            Step::Complete(heads) => {
                for h in heads {
                    q.link(*h);
                }
                if !store_allowed() {
                    return seen; // killed before the used index moved
                }
                seen.used.extend(heads);
                let used = u16::try_from(seen.used.len()).expect("few");
                q.published(used);
            }
        }
        if stores_left() == Some(0) {
            return seen;
        }
    }
    seen
}

/// Kills the process after every possible number of stores of `steps` and checks what the
/// next process recovers: exactly the popped heads the guest has not seen used, in pop order,
/// and a next avail index (used + resubmitted) that is the number of heads popped.
fn check_every_crash_point(steps: &[Step]) {
    let total = {
        let r = Arc::new(InflightRegion::create(QUEUES, SIZE).expect("create"));
        let mut q = r.queue(0, SIZE).expect("queue");
        q.recover(0);
        crash_after(Some(usize::MAX), || {
            run(&mut q, steps);
            usize::MAX - stores_left().expect("budget")
        })
    };
    for k in 0..=total {
        let r = Arc::new(InflightRegion::create(QUEUES, SIZE).expect("create"));
        let mut q = r.queue(0, SIZE).expect("queue");
        q.recover(0);
        let seen = crash_after(Some(k), || run(&mut q, steps));
        let used = u16::try_from(seen.used.len()).expect("few");
        let (_, rec) = reopen(&r, 0, used);
        // A head may be popped again once used: take one pop away per use.
        let mut expect = seen.popped.clone();
        for h in &seen.used {
            let at = expect
                .iter()
                .position(|p| p == h)
                .expect("used after popped");
            expect.remove(at);
        }
        assert_eq!(rec.resubmit, expect, "killed after {k} stores of {steps:?}");
        assert_eq!(
            seen.used.len() + rec.resubmit.len(),
            seen.popped.len(),
            "next avail after {k} stores"
        );
    }
}

#[test]
fn a_kill_after_any_store_recovers_exactly_the_unfinished_requests() {
    check_every_crash_point(&[
        Step::Pop(3),
        Step::Pop(7),
        Step::Pop(1),
        Step::Complete(vec![7]),
        Step::Pop(5),
        Step::Complete(vec![5, 3]),
        Step::Pop(7),
        Step::Complete(vec![1, 7]),
        Step::Pop(0),
    ]);
}

/// Random lives of a queue: heads popped while free, batches of the popped ones completed in
/// any order.
fn lives() -> impl Strategy<Value = Vec<Step>> {
    prop::collection::vec((0..SIZE, any::<bool>(), 1usize..4, any::<u64>()), 1..40).prop_map(
        |picks| {
            let mut in_flight: Vec<u16> = Vec::new();
            let mut steps = Vec::new();
            for (head, complete, n, seed) in picks {
                if complete && !in_flight.is_empty() {
                    let mut batch = Vec::new();
                    for i in 0..n.min(in_flight.len()) {
                        let at = (seed as usize).wrapping_add(i * 7) % in_flight.len();
                        batch.push(in_flight.remove(at));
                    }
                    steps.push(Step::Complete(batch));
                } else if !in_flight.contains(&head) {
                    in_flight.push(head);
                    steps.push(Step::Pop(head));
                }
            }
            steps
        },
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn random_lives_recover_at_every_crash_point(steps in lives()) {
        check_every_crash_point(&steps);
    }
}
