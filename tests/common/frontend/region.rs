//! The inflight region as the frontend keeps it (vhost-user, "Inflight I/O tracking"): the
//! file GET_INFLIGHT_FD returned, sent again with every SET_INFLIGHT_FD, and mapped here so
//! that a test can read or write a queue's area.

use std::fs::File;
use std::marker::PhantomData;
use std::os::fd::{AsRawFd, RawFd};

use vhost::vhost_user::message::VhostUserInflight;

use super::shm::Mapping;
use super::{FrontendError, Options};

/// Bytes of an inflight area's header and of one of its `desc[]` entries (vhost-user,
/// "Inflight I/O tracking", split virtqueues).
const AREA_HEADER: usize = 16;
const AREA_DESC: usize = 16;
/// What vubd aligns each queue's area to; its own device area follows the last one
/// (docs/architecture.md, "Inflight I/O tracking").
const AREA_ALIGN: usize = 64;

/// The inflight region as GET_INFLIGHT_FD returned it, kept across backend restarts.
pub(super) struct KeptRegion {
    file: File,
    msg: VhostUserInflight,
    map: Mapping,
    area_size: usize,
}

impl std::fmt::Debug for KeptRegion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (size, queues, entries) =
            (self.msg.mmap_size, self.msg.num_queues, self.msg.queue_size);
        f.debug_struct("KeptRegion")
            .field("mmap_size", &size)
            .field("num_queues", &queues)
            .field("queue_size", &entries)
            .finish_non_exhaustive()
    }
}

impl KeptRegion {
    pub(super) fn new(
        msg: VhostUserInflight,
        file: File,
        opts: Options,
    ) -> Result<Self, FrontendError> {
        let bad = || FrontendError::BadRegion {
            size: msg.mmap_size,
            queues: opts.num_queues,
            entries: opts.queue_size,
        };
        let len = usize::try_from(msg.mmap_size).map_err(|_| bad())?;
        let area_size =
            (AREA_HEADER + AREA_DESC * usize::from(opts.queue_size)).next_multiple_of(AREA_ALIGN);
        if msg.num_queues != opts.num_queues || area_size * usize::from(opts.num_queues) > len {
            return Err(bad());
        }
        let map = Mapping::new(&file, msg.mmap_offset, len)?;
        Ok(Self {
            file,
            msg,
            map,
            area_size,
        })
    }

    pub(super) fn msg(&self) -> &VhostUserInflight {
        &self.msg
    }

    pub(super) fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// Queue `q`'s area.
    pub(super) fn area(&mut self, q: usize) -> Area<'_> {
        Area {
            map: &self.map,
            base: self.area_size * q,
            entries: self.msg.queue_size,
            _exclusive: PhantomData,
        }
    }
}

/// One queue's area of the inflight region (vhost-user, "Inflight I/O tracking", split
/// virtqueues): `u64 features; u16 version; u16 desc_num; u16 last_batch_head; u16 used_idx;`
/// then `desc_num` entries of `{ u8 inflight; u8 padding[5]; u16 next; u64 counter; }`.
/// Borrowed mutably from the frontend: read it after a backend died, write it before the next
/// one starts.
#[derive(Debug)]
pub struct Area<'a> {
    map: &'a Mapping,
    base: usize,
    /// Entries the region was asked for (GET_INFLIGHT_FD's queue size).
    entries: u16,
    _exclusive: PhantomData<&'a mut ()>,
}

impl Area<'_> {
    fn desc(&self, head: u16) -> usize {
        assert!(head < self.entries, "head {head} beyond the area");
        self.base + AREA_HEADER + AREA_DESC * usize::from(head)
    }

    pub fn version(&self) -> u16 {
        self.map.u16_at(self.base + 8)
    }

    pub fn set_version(&self, v: u16) {
        self.map.set_u16(self.base + 8, v);
    }

    pub fn desc_num(&self) -> u16 {
        self.map.u16_at(self.base + 10)
    }

    pub fn set_desc_num(&self, v: u16) {
        self.map.set_u16(self.base + 10, v);
    }

    pub fn last_batch_head(&self) -> u16 {
        self.map.u16_at(self.base + 12)
    }

    pub fn set_last_batch_head(&self, v: u16) {
        self.map.set_u16(self.base + 12, v);
    }

    pub fn used_idx(&self) -> u16 {
        self.map.u16_at(self.base + 14)
    }

    pub fn set_used_idx(&self, v: u16) {
        self.map.set_u16(self.base + 14, v);
    }

    pub fn inflight(&self, head: u16) -> u8 {
        self.map.read(self.desc(head))
    }

    pub fn set_inflight(&self, head: u16, v: u8) {
        self.map.write(self.desc(head), v);
    }

    pub fn next(&self, head: u16) -> u16 {
        self.map.u16_at(self.desc(head) + 6)
    }

    pub fn set_next(&self, head: u16, v: u16) {
        self.map.set_u16(self.desc(head) + 6, v);
    }

    pub fn counter(&self, head: u16) -> u64 {
        self.map.u64_at(self.desc(head) + 8)
    }

    pub fn set_counter(&self, head: u16, v: u64) {
        self.map.set_u64(self.desc(head) + 8, v);
    }

    /// Heads recorded in flight (`inflight != 0`), in the order of their counters.
    pub fn recorded_in_flight(&self) -> Vec<u16> {
        let mut heads: Vec<(u64, u16)> = (0..self.entries)
            .filter(|&h| self.inflight(h) != 0)
            .map(|h| (self.counter(h), h))
            .collect();
        heads.sort_unstable();
        heads.into_iter().map(|(_, h)| h).collect()
    }
}
