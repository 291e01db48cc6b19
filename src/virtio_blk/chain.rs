//! Walking a split-virtqueue descriptor chain (virtio 1.2 §2.7.5) through a [`HostMap`]: the
//! descriptors of one chain, direct or through an indirect table, in order.
//!
//! The same rules as virtio-queue's iterator: `next` must stay inside the table, a chain is at
//! most as long as its table, an indirect table is a multiple of 16 bytes and not nested, and a
//! chain carries less than 4 GiB. Unlike it, a chain that breaks a rule is reported as such
//! rather than ending silently.

use crate::mem::{HostMap, read16_at};

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
    fn from_le(b: [u8; 16]) -> Self {
        let [
            a0,
            a1,
            a2,
            a3,
            a4,
            a5,
            a6,
            a7,
            l0,
            l1,
            l2,
            l3,
            f0,
            f1,
            n0,
            n1,
        ] = b;
        Self {
            addr: u64::from_le_bytes([a0, a1, a2, a3, a4, a5, a6, a7]),
            len: u32::from_le_bytes([l0, l1, l2, l3]),
            flags: u16::from_le_bytes([f0, f1]),
            next: u16::from_le_bytes([n0, n1]),
        }
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

/// The result of a walk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Walk {
    /// The chain's last descriptor.
    pub last: Desc,
    /// More descriptors than `descs` could hold: only the first ones were kept.
    pub overflow: bool,
}

/// Collects the descriptors of the chain at `head` into `descs` (cleared; its capacity bounds
/// what is kept, it never grows), following indirect tables.
pub fn walk(
    map: &HostMap,
    table: DescTable,
    head: u16,
    descs: &mut Vec<Desc>,
) -> Result<Walk, BrokenChain> {
    descs.clear();
    let (mut base, mut size) = (table.addr, table.size);
    let mut index = head;
    let mut ttl = size;
    let mut indirect = false;
    let mut overflow = false;
    let mut bytes = 0u32;
    // The table translated once (the common case), else descriptor by descriptor.
    let mut table_host = map.host_range(base, u64::from(size) * DESC_SIZE);
    loop {
        if ttl == 0 || index >= size {
            return Err(BrokenChain);
        }
        let d = match table_host {
            // SAFETY: `index < size` and the whole table (`size` entries) was translated into
            // one live mapping.
            Some(t) => Desc::from_le(unsafe { read16_at(t.add(usize::from(index) * 16)) }),
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
        // §2.7.5.2: a chain carries less than 2^32 bytes.
        bytes = bytes.checked_add(d.len).ok_or(BrokenChain)?;
        if descs.len() < descs.capacity() {
            descs.push(d);
        } else {
            overflow = true;
        }
        if !d.has_next() {
            return Ok(Walk { last: d, overflow });
        }
        index = d.next;
        ttl -= 1;
    }
}
