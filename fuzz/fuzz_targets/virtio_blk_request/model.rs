//! The model `parse` is checked against, written from the rules (virtio 1.2 §2.7.5, §5.2.6)
//! over vm-memory's own accessors: the chain walk, the header, the translation to host
//! iovecs, and what the request must come out as.

use super::*;

pub(super) fn is_range_kind(k: RequestKind) -> bool {
    matches!(k, RequestKind::Discard | RequestKind::WriteZeroes)
}

/// A descriptor as the model reads it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct D {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

impl D {
    fn from_bytes(b: [u8; 16]) -> Self {
        let u = |r: std::ops::Range<usize>| {
            b[r].iter()
                .rev()
                .fold(0u64, |acc, &x| acc << 8 | u64::from(x))
        };
        Self {
            addr: u(0..8),
            len: u(8..12) as u32,
            flags: u(12..14) as u16,
            next: u(14..16) as u16,
        }
    }

    fn write(&self) -> bool {
        self.flags & u16::from(F_WRITE) != 0
    }

    /// The last byte, if the descriptor is device-writable and not empty.
    pub(super) fn status_byte(&self) -> Option<u64> {
        (self.write() && self.len > 0)
            .then(|| self.addr.checked_add(u64::from(self.len) - 1))
            .flatten()
    }
}

/// The chain at `head`, by the rules of virtio 1.2 §2.7.5 as vubd applies them: `next`
/// inside the table, at most as many descriptors as the table has, an indirect table of whole
/// descriptors and not nested, less than 4 GiB in all. `None`: the chain breaks a rule or
/// cannot be read.
pub(super) fn walk(g: &Guest, t: DescTable, head: u16) -> Option<Vec<D>> {
    let (mut base, mut size, mut index, mut ttl) = (t.addr, t.size, head, t.size);
    let mut indirect = false;
    let mut total = 0u32;
    let mut out = Vec::new();
    loop {
        if ttl == 0 || index >= size {
            return None;
        }
        let at = base.checked_add(16 * u64::from(index))?;
        let mut b = [0u8; 16];
        g.mem.read_slice(&mut b, GuestAddress(at)).ok()?;
        let d = D::from_bytes(b);
        if d.flags & u16::from(F_INDIRECT) != 0 {
            if indirect || d.len == 0 || !d.len.is_multiple_of(16) {
                return None;
            }
            let entries = u16::try_from(d.len / 16).ok()?;
            (base, size, index, ttl, indirect) = (d.addr, entries, 0, entries, true);
            continue;
        }
        total = total.checked_add(d.len)?;
        out.push(d);
        if d.flags & u16::from(F_NEXT) == 0 {
            return Some(out);
        }
        index = d.next;
        ttl -= 1;
    }
}

/// The 16 header bytes at the start of the readable descriptors.
fn read_header(g: &Guest, readable: &[D]) -> Option<[u8; 16]> {
    let mut h = [0u8; 16];
    if readable[0].len >= 16 {
        g.mem
            .read_slice(&mut h, GuestAddress(readable[0].addr))
            .ok()?;
        return Some(h);
    }
    let mut at = 0;
    for d in readable {
        if at == 16 {
            break;
        }
        let n = (d.len as usize).min(16 - at);
        g.mem
            .read_slice(&mut h[at..at + n], GuestAddress(d.addr))
            .ok()?;
        at += n;
    }
    (at == 16).then_some(h)
}

/// Host iovecs for data pieces, as many as `cap` at most: one per piece inside one region,
/// else one per region it crosses; `None` when a piece is not all guest memory.
fn translate(g: &Guest, pieces: &[(u64, u32)], cap: usize) -> Option<Vec<(usize, usize)>> {
    let mut out = Vec::new();
    for &(a, l) in pieces {
        if g.in_one_region(a, u64::from(l)) {
            let h = g.mem.get_host_address(GuestAddress(a)).ok()?;
            out.push((h as usize, l as usize));
        } else {
            let mut covered = 0;
            for s in g.mem.get_slices(GuestAddress(a), l as usize) {
                let s = s.ok()?;
                out.push((s.ptr_guard_mut().as_ptr() as usize, s.len()));
                covered += s.len();
            }
            if covered != l as usize {
                return None;
            }
        }
        if out.len() > cap {
            return None;
        }
    }
    Some(out)
}

/// What `parse` must answer for `chain`: the rules of virtio 1.2 §5.2.6 with vubd's limits,
/// reading guest memory through vm-memory.
pub(super) fn model(
    g: &Guest,
    chain: Option<&[D]>,
    lim: &Limits,
    scratch: usize,
    iov_cap: usize,
) -> Outcome {
    let reject = |status, unsupported| Outcome::Reject {
        status,
        unsupported,
    };
    let Some(c) = chain else {
        return reject(None, false);
    };
    let last = c[c.len() - 1];
    let status = last
        .status_byte()
        .filter(|&s| g.mem.check_address(GuestAddress(s)).is_some());
    let Some(status) = status else {
        return reject(None, false);
    };
    let ioerr = reject(Some(status), false);
    let n_readable = c.iter().take_while(|d| !d.write()).count();
    if c.len() > scratch || n_readable == 0 || c[n_readable..].iter().any(|d| !d.write()) {
        return ioerr;
    }
    let (readable, writable) = c.split_at(n_readable);
    let Some(h) = read_header(g, readable) else {
        return ioerr;
    };
    let rtype = u32::from_le_bytes([h[0], h[1], h[2], h[3]]);
    let sector = u64::from_le_bytes(h[8..].try_into().expect("8 bytes"));
    let readable_len: u32 = readable.iter().map(|d| d.len).sum();
    let writable_len: u32 = writable.iter().map(|d| d.len).sum();
    let data_in = readable_len - 16;
    // Readable data: the bytes after the header.
    let mut skip = 16u32;
    let rpieces: Vec<(u64, u32)> = readable
        .iter()
        .filter_map(|d| {
            let cut = skip.min(d.len);
            skip -= cut;
            (d.len > cut).then(|| (d.addr.wrapping_add(u64::from(cut)), d.len - cut))
        })
        .collect();
    // Writable data: the bytes before the status byte.
    let wpieces: Vec<(u64, u32)> = writable
        .iter()
        .enumerate()
        .map(|(i, d)| (d.addr, d.len - u32::from(i + 1 == writable.len())))
        .filter(|p| p.1 > 0)
        .collect();
    let accept = |kind, data_len, iovecs, ranges| Outcome::Accept {
        status,
        kind,
        data_len,
        iovecs,
        ranges,
    };
    let in_capacity = |s: u64, n: u64| s.checked_add(n).is_some_and(|e| e <= lim.capacity_sectors);
    match rtype {
        req_type::IN | req_type::OUT => {
            let write = rtype == req_type::OUT;
            if write && lim.read_only {
                return ioerr;
            }
            let pieces = match write {
                true if writable_len == 1 => rpieces,
                false if data_in == 0 => wpieces,
                _ => return ioerr,
            };
            let len: u32 = pieces.iter().map(|p| p.1).sum();
            if pieces.len() > lim.seg_max as usize
                || pieces.iter().any(|p| p.1 > lim.size_max)
                || !len.is_multiple_of(512)
                || !in_capacity(sector, u64::from(len / 512))
            {
                return ioerr;
            }
            let Some(iov) = translate(g, &pieces, iov_cap) else {
                return ioerr;
            };
            let kind = if write {
                RequestKind::Write { sector }
            } else {
                RequestKind::Read { sector }
            };
            accept(kind, len, iov, Vec::new())
        }
        req_type::FLUSH => accept(RequestKind::Flush, 0, Vec::new(), Vec::new()),
        req_type::GET_ID => {
            if data_in != 0 || writable_len < 2 {
                return ioerr;
            }
            match translate(g, &wpieces, iov_cap) {
                Some(iov) => accept(RequestKind::GetId, writable_len - 1, iov, Vec::new()),
                None => ioerr,
            }
        }
        req_type::DISCARD | req_type::WRITE_ZEROES => {
            let discard = rtype == req_type::DISCARD;
            let max = if discard {
                lim.max_discard_sectors
            } else {
                lim.max_write_zeroes_sectors
            };
            let Some(max) = max else {
                return reject(Some(status), true);
            };
            if lim.read_only || writable_len != 1 || data_in == 0 || !data_in.is_multiple_of(16) {
                return ioerr;
            }
            if data_in / 16 > 16 {
                return ioerr;
            }
            let mut raw = Vec::new();
            for &(a, l) in &rpieces {
                let mut b = vec![0u8; l as usize];
                if g.mem.read_slice(&mut b, GuestAddress(a)).is_err() {
                    return ioerr;
                }
                raw.extend(b);
            }
            let mut ranges = Vec::new();
            for s in raw.chunks_exact(16) {
                let sector = u64::from_le_bytes(s[..8].try_into().expect("8 bytes"));
                let sectors = u32::from_le_bytes(s[8..12].try_into().expect("4 bytes"));
                let flags = u32::from_le_bytes(s[12..].try_into().expect("4 bytes"));
                let allowed = if discard { 0 } else { 1 };
                if flags & !allowed != 0
                    || sectors > max
                    || !in_capacity(sector, u64::from(sectors))
                {
                    return ioerr;
                }
                ranges.push(Range {
                    sector,
                    sectors,
                    unmap: flags & 1 != 0,
                });
            }
            let kind = if discard {
                RequestKind::Discard
            } else {
                RequestKind::WriteZeroes
            };
            accept(kind, 0, Vec::new(), ranges)
        }
        _ => reject(Some(status), true),
    }
}
