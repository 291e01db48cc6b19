//! The namespace behind the target's subsystem: RAM in lazily allocated 1 MiB shards, each
//! behind its own lock (connections of a test target may lock), or no storage at all. Its
//! size can change while it serves ([`Namespace::resize`]), up to [`MAX_SIZE`] or the size it
//! started with if that is larger.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

/// Bytes per shard of a RAM namespace.
const SHARD: u64 = 1 << 20;
/// How far a namespace can grow: its shard slots (a lock and a pointer each) are made at
/// start for this size.
pub(super) const MAX_SIZE: u64 = 4 << 30;

#[derive(Debug)]
enum Store {
    /// Reads return zeros, writes are dropped.
    Null,
    /// `None` until a shard is first written; a shard zeroed whole is freed again.
    Ram(Vec<Mutex<Option<Box<[u8]>>>>),
}

/// Namespace 1 of the subsystem.
#[derive(Debug)]
pub(super) struct Namespace {
    block_size: u32,
    blocks: AtomicU64,
    store: Store,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// `usize` from a `u64` that is known to be below a `usize` length.
fn idx(v: u64) -> usize {
    usize::try_from(v).unwrap_or(usize::MAX)
}

impl Namespace {
    /// A namespace of `size` bytes (a multiple of `block_size`, checked by the caller).
    pub(super) fn new(size: u64, block_size: u32, null: bool) -> Namespace {
        let store = if null {
            Store::Null
        } else {
            Store::Ram(
                (0..size.max(MAX_SIZE).div_ceil(SHARD))
                    .map(|_| Mutex::new(None))
                    .collect(),
            )
        };
        Namespace {
            block_size,
            blocks: AtomicU64::new(size / u64::from(block_size)),
            store,
        }
    }

    /// The largest size [`Namespace::resize`] takes.
    pub(super) fn max_size(&self) -> u64 {
        match &self.store {
            Store::Null => MAX_SIZE,
            Store::Ram(shards) => shards.len() as u64 * SHARD,
        }
    }

    /// The namespace now has `size` bytes (a multiple of the block size, at most
    /// [`Namespace::max_size`], checked by the caller); what lies past a smaller end reads
    /// as zeros if it grows back.
    pub(super) fn resize(&self, size: u64) {
        let old = self.size();
        if size < old {
            self.zero(size, old - size);
        }
        self.blocks
            .store(size / u64::from(self.block_size), Ordering::SeqCst);
    }

    pub(super) fn block_size(&self) -> u32 {
        self.block_size
    }

    /// LBADS: log2 of the block size.
    pub(super) fn lbads(&self) -> u8 {
        u8::try_from(self.block_size.trailing_zeros()).unwrap_or(9)
    }

    pub(super) fn blocks(&self) -> u64 {
        self.blocks.load(Ordering::SeqCst)
    }

    pub(super) fn size(&self) -> u64 {
        self.blocks() * u64::from(self.block_size)
    }

    pub(super) fn is_null(&self) -> bool {
        matches!(self.store, Store::Null)
    }

    /// Byte range of blocks `slba..slba + nlb`, or `None` if it ends past the namespace.
    pub(super) fn range(&self, slba: u64, nlb: u64) -> Option<(u64, u64)> {
        let end = slba.checked_add(nlb)?;
        (end <= self.blocks()).then(|| {
            let bs = u64::from(self.block_size);
            (slba * bs, nlb * bs)
        })
    }

    /// Calls `f(shard, offset in shard, length)` for each piece of `offset..offset + len`.
    fn pieces(&self, offset: u64, len: u64, mut f: impl FnMut(usize, usize, usize)) {
        let mut pos = offset;
        let end = offset.saturating_add(len).min(self.size());
        while pos < end {
            let in_shard = pos % SHARD;
            let n = (SHARD - in_shard).min(end - pos);
            f(idx(pos / SHARD), idx(in_shard), idx(n));
            pos += n;
        }
    }

    /// Appends `len` bytes from `offset` to `out` (the range is checked by the caller).
    pub(super) fn read_append(&self, offset: u64, len: u64, out: &mut Vec<u8>) {
        let Store::Ram(shards) = &self.store else {
            out.resize(out.len() + idx(len), 0);
            return;
        };
        self.pieces(offset, len, |s, at, n| match &*lock(&shards[s]) {
            Some(data) => out.extend_from_slice(&data[at..at + n]),
            None => out.resize(out.len() + n, 0),
        });
    }

    pub(super) fn write(&self, offset: u64, data: &[u8]) {
        let Store::Ram(shards) = &self.store else {
            return;
        };
        let mut done = 0;
        self.pieces(offset, data.len() as u64, |s, at, n| {
            // Whole shards, so that one stays large enough when the namespace grows.
            let mut shard = lock(&shards[s]);
            let buf = shard.get_or_insert_with(|| vec![0; idx(SHARD)].into_boxed_slice());
            buf[at..at + n].copy_from_slice(&data[done..done + n]);
            done += n;
        });
    }

    pub(super) fn zero(&self, offset: u64, len: u64) {
        let Store::Ram(shards) = &self.store else {
            return;
        };
        self.pieces(offset, len, |s, at, n| {
            let mut shard = lock(&shards[s]);
            if let Some(buf) = shard.as_mut() {
                if at == 0 && n == buf.len() {
                    *shard = None;
                } else {
                    buf[at..at + n].fill(0);
                }
            }
        });
    }
}
