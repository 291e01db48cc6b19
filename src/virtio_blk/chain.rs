//! Walking a split-virtqueue descriptor chain (virtio 1.2 §2.7.5) through a [`HostMap`]: the
//! descriptors of one chain, direct or through an indirect table, in order.
//!
//! The same rules as virtio-queue's iterator: `next` must stay inside the table, a chain is at
//! most as long as its table, an indirect table is a multiple of 16 bytes and not nested, and a
//! chain carries less than 4 GiB. Unlike it, a chain that breaks a rule is reported as such
//! rather than ending silently.

use crate::mem::{HostMap, read_u64_pair_at};

/// `VIRTQ_DESC_F_NEXT`.
const F_NEXT: u16 = 1;
/// `VIRTQ_DESC_F_WRITE`.
const F_WRITE: u16 = 2;
/// `VIRTQ_DESC_F_INDIRECT`.
const F_INDIRECT: u16 = 4;
/// Size of one descriptor (`struct virtq_desc`).
const DESC_SIZE: u64 = 16;

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

/// Collects the descriptors of the chain at `head` into `descs` (as many as it holds; the
/// rest are only counted), following indirect tables.
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
    let mut count = 0usize;
    // Descriptors before the first writable one: follows `count` until a writable one is seen.
    let mut n_readable = 0usize;
    let mut seen_writable = false;
    let mut readable_after_writable = false;
    // Bytes of the whole chain and of its writable part; the readable part is the difference.
    let (mut total_len, mut writable_len) = (0u32, 0u32);
    // The table translated once (the common case), else descriptor by descriptor.
    let mut table_host = map.host_range(base, u64::from(size) * DESC_SIZE);
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
            (base, size, index, ttl, indirect) = (d.addr, entries, 0, entries, true);
            table_host = map.host_range(base, u64::from(size) * DESC_SIZE);
            continue;
        }
        // §2.7.5.2: a chain carries less than 2^32 bytes, so neither part's sum overflows
        // once the total is checked.
        total_len = total_len.checked_add(d.len).ok_or(BrokenChain)?;
        if d.is_write_only() {
            seen_writable = true;
            writable_len += d.len;
        } else {
            readable_after_writable |= seen_writable;
        }
        if let Some(slot) = descs.get_mut(count) {
            *slot = d;
        }
        count += 1;
        if !seen_writable {
            n_readable = count;
        }
        if !d.has_next() {
            return Ok(Walk {
                last: d,
                kept: count.min(descs.len()),
                overflow: count > descs.len(),
                n_readable,
                readable_after_writable,
                readable_len: total_len - writable_len,
                writable_len,
            });
        }
        index = d.next;
        ttl -= 1;
    }
}
