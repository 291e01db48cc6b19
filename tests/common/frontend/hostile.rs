//! What a guest, or a frontend a guest has taken over, can do to a backend that a driver never
//! does: avail indices and heads out of range, chains of the test's own making, raw messages,
//! the error eventfd watched, and a ring stopped and started again as after a reset.

use std::time::Duration;

use vhost::vhost_user::Frontend;
use vmm_sys_util::eventfd::EventFd;

use super::{BlkFrontend, FrontendError, STATUS_OFF, STATUS_UNSET, T_IN};

/// A request slot taken for a chain the test builds itself ([`BlkFrontend::take_slot`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawSlot {
    /// The slot's first descriptor; it owns this one and the next two.
    pub head: u16,
    /// Guest address of its 16-byte header, which says "read sector 0".
    pub hdr: u64,
    /// Guest address of its [`super::BLOCK`]-byte data buffer.
    pub data: u64,
    /// Guest address of its status byte (unset: [`STATUS_UNSET`]).
    pub status: u64,
}

impl BlkFrontend {
    /// The connection, for messages of the test's own.
    pub fn vhost(&mut self) -> Result<&mut Frontend, FrontendError> {
        self.conn.as_mut().ok_or(FrontendError::Disconnected)
    }

    /// Writes descriptor `i` of queue `q`'s table: `(addr, len, flags, next)`, whatever they
    /// say.
    pub fn put_desc(&self, q: usize, i: u16, d: (u64, u32, u16, u16)) {
        assert!(
            i < self.queues[q].size,
            "descriptor {i} is outside the table"
        );
        self.set_desc(q, i, d);
    }

    /// Takes a free request slot of queue `q` for a chain the test builds: it counts as in
    /// flight with `tag` (a used element for it is reaped as usual), its header says "read
    /// sector 0" and its status byte is unset. No descriptor is written.
    pub fn take_slot(&mut self, q: usize, tag: u64) -> Result<RawSlot, FrontendError> {
        let slot = self.queues[q]
            .free
            .pop_front()
            .ok_or(FrontendError::Full { queue: q })?;
        let s = usize::from(slot);
        let (hdr, data) = (self.hdr(q, s), self.data(q, s));
        self.mem.set_u32(hdr, T_IN);
        self.mem.set_u32(hdr + 4, 0);
        self.mem.set_u64(hdr + 8, 0);
        self.mem.write(hdr + STATUS_OFF, STATUS_UNSET);
        self.queues[q].slots[s] = Some(tag);
        Ok(RawSlot {
            head: super::head_of(s),
            hdr: Self::gpa(hdr),
            data: Self::gpa(data),
            status: Self::gpa(hdr + STATUS_OFF),
        })
    }

    /// Writes an avail entry of queue `q` naming `head`, whatever it is, at the driver's avail
    /// index (made visible by the next [`BlkFrontend::publish`] or [`BlkFrontend::notify`]).
    pub fn push_head(&mut self, q: usize, head: u16) {
        let vq = &mut self.queues[q];
        let pos = vq.avail + 4 + 2 * usize::from(vq.avail_idx % vq.size);
        self.mem.set_u16(pos, head);
        vq.avail_idx = vq.avail_idx.wrapping_add(1);
    }

    /// Stores `idx` as queue `q`'s avail index, as a driver publishing that many chains
    /// would, and kicks. The frontend's own idea of its index does not change.
    pub fn force_avail_idx(&mut self, q: usize, idx: u16) -> Result<(), FrontendError> {
        std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
        self.mem.set_u16(self.queues[q].avail + 2, idx);
        self.kick(q)
    }

    /// Whether queue `q`'s call fd is non-blocking: its open file description, which the
    /// backend shares.
    pub fn call_fd_nonblocking(&self, q: usize) -> bool {
        let fd = std::os::fd::AsRawFd::as_raw_fd(&self.queues[q].call);
        // SAFETY: F_GETFL on a descriptor the queue owns; no memory is passed.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
        flags >= 0 && flags & libc::O_NONBLOCK != 0
    }

    /// A second handle on queue `q`'s kick fd, to kick it from another thread.
    pub fn kick_fd(&self, q: usize) -> EventFd {
        self.queues[q]
            .kick
            .try_clone()
            .expect("duplicate the kick fd")
    }

    /// Guest address of [`super::Options::extra_memory`].
    pub fn extra_gpa(&self) -> u64 {
        Self::gpa(self.extra)
    }

    /// Writes descriptor `i` of a table at the start of the extra memory (an indirect table).
    pub fn put_extra_desc(&self, i: usize, (addr, len, flags, next): (u64, u32, u16, u16)) {
        let d = self.extra + 16 * i;
        assert!(
            d + 16 <= self.mem.len(),
            "descriptor {i} is outside the extra memory"
        );
        self.mem.set_u64(d, addr);
        self.mem.set_u32(d + 8, len);
        self.mem.set_u16(d + 12, flags);
        self.mem.set_u16(d + 14, next);
    }

    /// Whether queue `q`'s error eventfd ([`super::Options::err_fd`]) is signalled, waiting up
    /// to `timeout`; clears it.
    pub fn error_signalled(&self, q: usize, timeout: Duration) -> bool {
        let err = &self.queues[q].err;
        let mut fd = libc::pollfd {
            fd: std::os::fd::AsRawFd::as_raw_fd(err),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
        // SAFETY: `fd` is one live pollfd structure.
        let n = unsafe { libc::poll(&mut fd, 1, ms) };
        n > 0 && err.read().is_ok()
    }

    /// Starts queue `q` again after the backend stopped it ([`BlkFrontend::stop_queue`]), as
    /// a driver that reset it would: empty rings and nothing in flight (whatever was), then
    /// SET_VRING_NUM, BASE 0, ADDR, KICK, CALL, ERR, ENABLE, and a kick.
    pub fn restart_ring(&mut self, q: usize) -> Result<(), FrontendError> {
        let (avail, used, size) = {
            let vq = &self.queues[q];
            (vq.avail, vq.used, usize::from(vq.size))
        };
        for off in (avail..avail + 6 + 2 * size).step_by(2) {
            self.mem.set_u16(off, 0);
        }
        for off in (used..used + 6 + 8 * size).step_by(2) {
            self.mem.set_u16(off, 0);
        }
        let vq = &mut self.queues[q];
        vq.avail_idx = 0;
        vq.published = 0;
        vq.last_used = 0;
        let slots = vq.slots.len();
        vq.slots = vec![None; slots];
        vq.free = (0..u16::try_from(slots).expect("slots fit u16")).collect();
        let mut conn = self.conn.take().ok_or(FrontendError::Disconnected)?;
        let started = self.set_up_ring(&mut conn, q, 0);
        self.conn = Some(conn);
        started?;
        self.ask_interrupts(q);
        self.kick(q)
    }
}
