//! The ring pass: heads taken from the avail ring, parsed, completed and published through
//! `SplitRing` as a poller does, checked against the guest memory image.

use super::*;

/// Takes the heads the driver made available, parses each, writes its status and used
/// element and publishes them, as a poller's pass does, and checks what `SplitRing` reads
/// and writes against the guest memory image.
pub(super) fn run_ring(p: &mut Parser<'_>, ring: &Ring) {
    let g = p.g;
    let size = p.table.size;
    let n = u64::from(size);
    let (avail, used) = (g.addr(ring.avail), g.addr(ring.used));
    let at = |base: u64, off: u64| base.checked_add(off);
    // The driver's side of the avail ring.
    if size > 0 {
        let put16 = |a: Option<u64>, v: u16| {
            if let Some(a) = a {
                g.put(a, &v.to_le_bytes());
            }
        };
        put16(at(avail, 0), ring.avail_flags);
        put16(at(avail, 2), ring.avail_idx);
        for (i, &h) in ring.heads.iter().take(usize::from(size)).enumerate() {
            let pos = u64::from(ring.next_avail.wrapping_add(i as u16) % size);
            put16(at(avail, 4 + 2 * pos), h);
        }
        put16(at(avail, 4 + 2 * n), ring.used_event);
    }
    let r = SplitRing::new(p.map, avail, used, size, ring.event_idx);
    // Aligned in guest memory and in ours (a region may start at any guest address).
    let host = |a: u64| {
        g.mem
            .get_host_address(GuestAddress(a))
            .map_or(1, |p| p as usize)
    };
    let fits = avail % 2 == 0
        && used % 4 == 0
        && size > 0
        && g.in_one_region(avail, 6 + 2 * n)
        && g.in_one_region(used, 6 + 8 * n)
        && host(avail) % 2 == 0
        && host(used) % 4 == 0;
    assert_eq!(
        r.is_some(),
        fits,
        "SplitRing made for rings at {avail:#x} / {used:#x}"
    );
    let Some(r) = r else { return };
    assert_eq!(r.size(), size);
    assert_eq!(r.used_range(), (used, 6 + 8 * n));

    let read16 = |a: u64| {
        g.mem
            .read_obj::<u16>(GuestAddress(a))
            .expect("inside the ring")
            .to_le()
    };
    let mut want = g.image();
    let next_avail = Wrapping(ring.next_avail);
    let avail_idx = r.avail_idx();
    assert_eq!(avail_idx.0, read16(avail + 2));
    let pending = (avail_idx - next_avail).0;
    if pending > size {
        // An impossible index: the queue is broken and a poller stops it.
        return;
    }
    let old = Wrapping(ring.next_used);
    let mut next_used = old;
    for i in 0..pending.min(BATCH) {
        let pos = next_avail + Wrapping(i);
        let head = r.avail_head(pos);
        assert_eq!(head, read16(avail + 4 + 2 * u64::from(pos.0 % size)));
        let (status, len) = match p.parse_and_check(head) {
            Ok(parsed) => (
                Some((parsed.status.0, Status::Ok)),
                parsed.request.data_len + 1,
            ),
            Err(rej) => match rej.status {
                Some(s) => (Some((s.0, rej.error.status())), 1),
                None => (None, 0),
            },
        };
        if let Some((addr, value)) = status {
            assert!(
                p.map.write_u8(addr, value as u8),
                "status byte not writable"
            );
            g.apply(&mut want, addr, &[value as u8]);
        }
        r.put_used(next_used, head, len);
        let mut elem = [0u8; 8];
        elem[..4].copy_from_slice(&u32::from(head).to_le_bytes());
        elem[4..].copy_from_slice(&len.to_le_bytes());
        g.apply(
            &mut want,
            used + 4 + 8 * u64::from(next_used.0 % size),
            &elem,
        );
        next_used += Wrapping(1);
    }
    let notify = r.publish_used(old, next_used);
    g.apply(&mut want, used + 2, &next_used.0.to_le_bytes());
    assert!(
        g.changed(&want, &g.image()).is_empty(),
        "used ring written elsewhere"
    );
    let expected = if ring.event_idx {
        let event = Wrapping(read16(avail + 4 + 2 * n));
        // vring_need_event(event, new, old)
        (next_used - event - Wrapping(1)).0 < (next_used - old).0
    } else {
        read16(avail) & 1 == 0
    };
    assert_eq!(notify, expected, "interrupt decision");

    let taken = next_avail + Wrapping(pending.min(BATCH));
    let more = r.enable_kicks(taken);
    if ring.event_idx {
        g.apply(&mut want, used + 4 + 8 * n, &taken.0.to_le_bytes());
    } else {
        g.apply(&mut want, used, &0u16.to_le_bytes());
    }
    assert_eq!(more, read16(avail + 2) != taken.0, "kick re-check");
    r.disable_kicks();
    if !ring.event_idx {
        g.apply(&mut want, used, &1u16.to_le_bytes());
    }
    assert!(
        g.changed(&want, &g.image()).is_empty(),
        "kick suppression written elsewhere"
    );
}
