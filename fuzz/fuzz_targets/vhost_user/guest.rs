//! The guest's side of a session: it writes guest memory through the regions' memfds and
//! drives a queue as a virtio-blk driver does (ring set-up, requests, kicks).

use super::wire::wait_readable;
use super::*;

impl Session {
    /// Writes guest memory through the memfd of the region holding `gpa` (what fits in the
    /// region and in its file).
    pub(super) fn guest_write(&self, gpa: u64, data: &[u8]) {
        let Some(k) = self
            .regions
            .iter()
            .find(|k| gpa.wrapping_sub(k.gpa) < k.size)
        else {
            return;
        };
        let f = &self.files[k.file];
        let file_len = f.metadata().map_or(0, |m| m.len());
        // `rel < k.size`, however the region wraps around the address space.
        let rel = gpa.wrapping_sub(k.gpa);
        let Some(off) = k.offset.checked_add(rel) else {
            return;
        };
        let room = (k.size - rel).min(file_len.saturating_sub(off));
        let n = data.len().min(usize::try_from(room).unwrap_or(usize::MAX));
        if n > 0 {
            let _ = f.write_at(&data[..n], off);
        }
    }

    /// Reads guest memory through the memfd of the region holding `gpa` (zeros where it has
    /// none).
    fn guest_read(&self, gpa: u64, out: &mut [u8]) {
        let Some(k) = self
            .regions
            .iter()
            .find(|k| gpa.wrapping_sub(k.gpa) < k.size)
        else {
            return;
        };
        let _ = self.files[k.file].read_at(out, k.offset.wrapping_add(gpa.wrapping_sub(k.gpa)));
    }
    /// What a driver does to start queue `q` with `n` entries in region 0.
    pub(super) fn setup_queue(&mut self, q: usize, n: u16) {
        let Some(r0) = self.regions.first().copied() else {
            return;
        };
        let base = r0.gpa.wrapping_add(q as u64 * 0x1_0000);
        self.guest_write(base, &[0u8; 0x3000]);
        let user = |gpa: u64| gpa.wrapping_sub(r0.gpa).wrapping_add(r0.user);
        let (Ok(kick), Ok(call)) = (EventFd::new(EFD_NONBLOCK), EventFd::new(EFD_NONBLOCK)) else {
            return;
        };
        let fe = &mut self.fe;
        t!(fe.set_vring_num(q, n));
        let cfg = VringConfigData {
            queue_max_size: QUEUE_SIZE,
            queue_size: n,
            flags: 0,
            desc_table_addr: user(base),
            used_ring_addr: user(base + 0x2000),
            avail_ring_addr: user(base + 0x1000),
            log_addr: None,
        };
        t!(fe.set_vring_addr(q, &cfg));
        t!(fe.set_vring_base(q, 0));
        t!(fe.set_vring_call(q, &call));
        t!(fe.set_vring_kick(q, &kick));
        t!(fe.set_vring_enable(q, true));
        self.queues[q] = Some(Queue {
            base,
            size: n,
            next_avail: 0,
            next_desc: 0,
            kick,
            call,
        });
    }

    /// What a driver does to send one request on queue `q`: header, data and status
    /// descriptors (direct, or in an indirect table), the avail entry and index, a kick; then
    /// it waits a little for the completion.
    pub(super) fn request(
        &mut self,
        q: usize,
        kind: ReqKind,
        sector: u16,
        sectors: u8,
        indirect: bool,
    ) {
        let Some(queue) = &self.queues[q] else {
            return;
        };
        let (base, size, slot) = (queue.base, queue.size, queue.next_avail);
        let hdr = base + 0x3000 + 32 * u64::from(slot % 64);
        let data = base + 0x8000 + 0x2000 * u64::from(slot % 4);
        let len = 512 * (u32::from(sectors) % 17);
        let (rtype, payload) = match kind {
            ReqKind::In => (req_type::IN, (len > 0).then_some((len, F_WRITE))),
            ReqKind::Out => (req_type::OUT, (len > 0).then_some((len, 0))),
            ReqKind::Flush => (req_type::FLUSH, None),
            ReqKind::GetId => (req_type::GET_ID, Some((20, F_WRITE))),
            ReqKind::Discard | ReqKind::WriteZeroes => {
                let mut seg = [0u8; 16];
                seg[..8].copy_from_slice(&u64::from(sector).to_le_bytes());
                seg[8..12].copy_from_slice(&u32::from(sectors).to_le_bytes());
                seg[12] = u8::from(kind == ReqKind::WriteZeroes);
                self.guest_write(data, &seg);
                let t = if kind == ReqKind::Discard {
                    req_type::DISCARD
                } else {
                    req_type::WRITE_ZEROES
                };
                (t, Some((16, 0)))
            }
        };
        let mut header = [0u8; 16];
        header[..4].copy_from_slice(&rtype.to_le_bytes());
        header[8..].copy_from_slice(&u64::from(sector).to_le_bytes());
        self.guest_write(hdr, &header);
        let mut chain = vec![(hdr, 16u32, 0u16)];
        chain.extend(payload.map(|(l, f)| (data, l, f)));
        chain.push((hdr + 16, 1, F_WRITE));

        let desc = |addr: u64, len: u32, flags: u16, next: u16| {
            let mut b = [0u8; 16];
            b[..8].copy_from_slice(&addr.to_le_bytes());
            b[8..12].copy_from_slice(&len.to_le_bytes());
            b[12..14].copy_from_slice(&flags.to_le_bytes());
            b[14..].copy_from_slice(&next.to_le_bytes());
            b
        };
        let queue = self.queues[q].as_mut().expect("checked above");
        let mut writes = Vec::new();
        let head = queue.next_desc % size;
        if indirect || usize::from(size) < chain.len() {
            let table = base + 0x4000 + 64 * u64::from(slot % 64);
            for (i, &(a, l, f)) in chain.iter().enumerate() {
                let last = i + 1 == chain.len();
                let flags = if last { f } else { f | F_NEXT };
                writes.push((table + 16 * i as u64, desc(a, l, flags, i as u16 + 1)));
            }
            let entry = desc(table, 16 * chain.len() as u32, F_INDIRECT, 0);
            writes.push((base + 16 * u64::from(head), entry));
            queue.next_desc = queue.next_desc.wrapping_add(1);
        } else {
            for (i, &(a, l, f)) in chain.iter().enumerate() {
                let at = (queue.next_desc.wrapping_add(i as u16)) % size;
                let next = (queue.next_desc.wrapping_add(i as u16 + 1)) % size;
                let last = i + 1 == chain.len();
                let flags = if last { f } else { f | F_NEXT };
                writes.push((base + 16 * u64::from(at), desc(a, l, flags, next)));
            }
            queue.next_desc = queue.next_desc.wrapping_add(chain.len() as u16);
        }
        let avail = base + 0x1000;
        let pos = u64::from(queue.next_avail % size);
        queue.next_avail = queue.next_avail.wrapping_add(1);
        let idx = queue.next_avail;
        for (at, d) in writes {
            self.guest_write(at, &d);
        }
        self.guest_write(avail + 4 + 2 * pos, &head.to_le_bytes());
        // used_event: an interrupt once this request is used (with EVENT_IDX).
        self.guest_write(avail + 4 + 2 * u64::from(size), &slot.to_le_bytes());
        self.guest_write(avail + 2, &idx.to_le_bytes());
        let queue = self.queues[q].as_ref().expect("checked above");
        let _ = queue.kick.write(1);
        wait_readable(queue.call.as_raw_fd(), COMPLETION_WAIT);
        let called = queue.call.read();
        if trace() {
            let mut used = [0u8; 2];
            let mut status = [0xffu8];
            self.guest_read(base + 0x2002, &mut used);
            self.guest_read(hdr + 16, &mut status);
            let used = u16::from_le_bytes(used);
            eprintln!("  call {called:?}, used index {used}, status {}", status[0]);
        }
    }
}
