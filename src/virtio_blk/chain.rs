//! Walking a split-virtqueue descriptor chain (virtio 1.2 §2.7.5) through a [`HostMap`]: the
//! descriptors of one chain, direct or through an indirect table, in order.
//!
//! The same rules as virtio-queue's iterator: `next` must stay inside the table, a chain is at
//! most as long as its table, an indirect table is a multiple of 16 bytes and not nested, and a
//! chain carries less than 4 GiB. Unlike it, a chain that breaks a rule is reported as such
//! rather than ending silently, and a chain through an indirect table is at most as long as
//! the queue (virtio 1.2 §2.7.5.3.1), or as `descs` if that is longer: no chain costs more than
//! that many descriptor reads, whatever its indirect table says (up to 65,535 entries).

use crate::mem::{HostMap, read_u64_pair_at};

/// `VIRTQ_DESC_F_NEXT`.
const F_NEXT: u16 = 1;
/// `VIRTQ_DESC_F_WRITE`.
const F_WRITE: u16 = 2;
/// `VIRTQ_DESC_F_INDIRECT`.
const F_INDIRECT: u16 = 4;
/// Size of one descriptor (`struct virtq_desc`).
pub const DESC_SIZE: u64 = 16;

/// Where a queue's descriptor table is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DescTable {
    pub addr: u64,
    /// Entries (the queue size).
    pub size: u16,
}

/// One descriptor (`struct virtq_desc`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Desc {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
    pub next: u16,
}

impl Desc {
    /// Decodes a descriptor from its two little-endian 8-byte words.
    #[inline]
    fn from_words(lo: u64, hi: u64) -> Self {
        let (lo, hi) = (u64::from_le(lo), u64::from_le(hi));
        Self {
            addr: lo,
            len: hi as u32,
            flags: (hi >> 32) as u16,
            next: (hi >> 48) as u16,
        }
    }

    fn from_le(b: [u8; 16]) -> Self {
        let word = |i: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&b[i..i + 8]);
            u64::from_ne_bytes(w)
        };
        Self::from_words(word(0), word(8))
    }

    /// The device writes this buffer (the driver reads it).
    pub fn is_write_only(&self) -> bool {
        self.flags & F_WRITE != 0
    }

    pub fn has_next(&self) -> bool {
        self.flags & F_NEXT != 0
    }

    fn is_indirect(&self) -> bool {
        self.flags & F_INDIRECT != 0
    }
}

/// The chain could not be followed to its end: a `next` outside the table, a loop, an
/// unreadable descriptor, a bad or nested indirect table, or 4 GiB or more of buffers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BrokenChain;

/// The result of a walk: the chain's shape, summed over all of it (kept or not).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Walk {
    /// The chain's last descriptor.
    pub last: Desc,
    /// Descriptors written to `descs` (the first ones of the chain).
    pub kept: usize,
    /// More descriptors than `descs` could hold: only the first ones were kept.
    pub overflow: bool,
    /// Descriptors before the first device-writable one.
    pub n_readable: usize,
    /// A device-readable descriptor follows a device-writable one.
    pub readable_after_writable: bool,
    /// Bytes of the device-readable descriptors.
    pub readable_len: u32,
    /// Bytes of the device-writable descriptors.
    pub writable_len: u32,
}

/// The running sums of a walk.
struct Shape<'a> {
    descs: &'a mut [Desc],
    count: usize,
    /// Descriptors before the first writable one: follows `count` until a writable one.
    n_readable: usize,
    seen_writable: bool,
    readable_after_writable: bool,
    /// Bytes of the whole chain; the readable part is this less `writable_len`.
    total_len: u32,
    writable_len: u32,
}

impl Shape<'_> {
    /// Accounts one (non-indirect) descriptor.
    #[inline(always)]
    fn add(&mut self, d: Desc) -> Result<(), BrokenChain> {
        // §2.7.5.2: a chain carries less than 2^32 bytes, so neither part's sum overflows
        // once the total is checked.
        self.total_len = self.total_len.checked_add(d.len).ok_or(BrokenChain)?;
        if d.is_write_only() {
            self.seen_writable = true;
            self.writable_len += d.len;
        } else {
            self.readable_after_writable |= self.seen_writable;
        }
        if let Some(slot) = self.descs.get_mut(self.count) {
            *slot = d;
        }
        self.count += 1;
        if !self.seen_writable {
            self.n_readable = self.count;
        }
        Ok(())
    }

    #[inline(always)]
    fn finish(self, last: Desc) -> Walk {
        Walk {
            last,
            kept: self.count.min(self.descs.len()),
            overflow: self.count > self.descs.len(),
            n_readable: self.n_readable,
            readable_after_writable: self.readable_after_writable,
            readable_len: self.total_len - self.writable_len,
            writable_len: self.writable_len,
        }
    }
}

/// Collects the descriptors of the chain at `head` into `descs` (as many as it holds; the
/// rest are only counted), following indirect tables. A chain longer than the queue and than
/// `descs` is broken (§2.7.5.3.1: "A driver MUST NOT create a descriptor chain longer than
/// the Queue Size of the device"; Linux does not hold its indirect tables to it, so one as
/// long as `descs`, which holds every chain a request may have, is still followed).
#[inline]
pub fn walk(
    map: &HostMap,
    table: DescTable,
    head: u16,
    descs: &mut [Desc],
) -> Result<Walk, BrokenChain> {
    let (mut base, mut size) = (table.addr, table.size);
    let mut index = head;
    let mut ttl = size;
    let mut indirect = false;
    let mut shape = Shape {
        descs,
        count: 0,
        n_readable: 0,
        seen_writable: false,
        readable_after_writable: false,
        total_len: 0,
        writable_len: 0,
    };
    // The table translated once (the common case), else descriptor by descriptor.
    let mut table_host = map.host_range(base, u64::from(size) * DESC_SIZE);
    // Fast path: the descriptors of a translated table, up to the end of the chain or to an
    // indirect descriptor, which the general loop below then reads again and follows.
    if let Some(t) = table_host {
        loop {
            if ttl == 0 || index >= size {
                return Err(BrokenChain);
            }
            // SAFETY: `index < size` and the whole table (`size` entries) was translated into
            // one live mapping.
            let (lo, hi) = unsafe { read_u64_pair_at(t.add(usize::from(index) * 16)) };
            let d = Desc::from_words(lo, hi);
            if d.is_indirect() {
                break;
            }
            shape.add(d)?;
            if !d.has_next() {
                return Ok(shape.finish(d));
            }
            index = d.next;
            ttl -= 1;
        }
    }
    loop {
        if ttl == 0 || index >= size {
            return Err(BrokenChain);
        }
        let d = match table_host {
            Some(t) => {
                // SAFETY: `index < size` and the whole table (`size` entries) was translated
                // into one live mapping.
                let (lo, hi) = unsafe { read_u64_pair_at(t.add(usize::from(index) * 16)) };
                Desc::from_words(lo, hi)
            }
            None => {
                let addr = base
                    .checked_add(u64::from(index) * DESC_SIZE)
                    .ok_or(BrokenChain)?;
                Desc::from_le(map.read16(addr).ok_or(BrokenChain)?)
            }
        };
        if d.is_indirect() {
            // §2.7.5.3.1: no nesting; the table is whole descriptors.
            if indirect || d.len == 0 || u64::from(d.len) % DESC_SIZE != 0 {
                return Err(BrokenChain);
            }
            let entries = u16::try_from(u64::from(d.len) / DESC_SIZE).map_err(|_| BrokenChain)?;
            // What the chain may still grow by: the queue's size or `descs`' length in all.
            let longest = usize::from(table.size).max(shape.descs.len());
            let left = u16::try_from(longest.saturating_sub(shape.count)).unwrap_or(u16::MAX);
            (base, size, index, ttl, indirect) = (d.addr, entries, 0, entries.min(left), true);
            table_host = map.host_range(base, u64::from(size) * DESC_SIZE);
            continue;
        }
        shape.add(d)?;
        if !d.has_next() {
            return Ok(shape.finish(d));
        }
        index = d.next;
        ttl -= 1;
    }
}
