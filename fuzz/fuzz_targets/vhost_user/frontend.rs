//! The frontend's side of a session: each input operation as vhost-user messages, through
//! vhost's `Frontend` or written raw, and the probe that follows every step.

use super::wire::{Recv, memfd, owned, recv_msg};
use super::*;

impl Session {
    pub(super) fn op(&mut self, op: &Op) -> Flow {
        let fe = &mut self.fe;
        match op {
            Op::Handshake => {
                let f = self.get_features();
                t!(self.fe.set_features(f));
                let pf = self
                    .fe
                    .get_protocol_features()
                    .map_or(self.s.offered_protocol, |p| p.bits());
                t!(self
                    .fe
                    .set_protocol_features(VhostUserProtocolFeatures::from_bits_truncate(pf)));
                t!(self.fe.set_owner());
                self.set_need_reply(true);
            }
            Op::GetFeatures => {
                self.get_features();
            }
            Op::SetFeatures(f) => {
                t!(fe.set_features(self.s.features(*f)));
            }
            Op::GetProtocolFeatures => {
                t!(fe.get_protocol_features());
            }
            Op::SetProtocolFeatures(f) => {
                let bits = match f {
                    Features::Offered => self.s.offered_protocol,
                    Features::Raw(b) => *b,
                };
                t!(fe.set_protocol_features(VhostUserProtocolFeatures::from_bits_retain(bits)));
            }
            Op::SetOwner => {
                t!(fe.set_owner());
            }
            Op::ResetOwner => {
                t!(fe.reset_owner());
            }
            Op::NeedReply(on) => self.set_need_reply(*on),
            Op::GetQueueNum => {
                t!(fe.get_queue_num());
            }
            Op::GetConfig { offset, size } => {
                // Raw: vhost's `Frontend::get_config` waits forever for the rest of an error
                // reply (a config of size 0, as the spec has it).
                let mut body = Vec::with_capacity(12 + usize::from(*size));
                body.extend_from_slice(&u32::from(*offset).to_le_bytes());
                body.extend_from_slice(&u32::from(*size).to_le_bytes());
                body.extend_from_slice(&0u32.to_le_bytes());
                body.resize(12 + usize::from(*size), 0);
                if !self.send_raw(GET_CONFIG, self.flags(), &body, &[]) {
                    return Flow::Closed;
                }
            }
            Op::SetConfig { offset, bytes } => {
                t!(fe.set_config(u32::from(*offset), VhostUserConfigFlags::WRITABLE, bytes));
            }
            Op::SetMemTable(regions) => {
                let made: Vec<_> = regions
                    .iter()
                    .take(8)
                    .filter_map(|r| self.region(r))
                    .collect();
                if made.is_empty() {
                    return Flow::Go;
                }
                let infos: Vec<_> = made.iter().map(|m| m.0).collect();
                t!(self.fe.set_mem_table(&infos));
                self.regions = made.into_iter().map(|m| m.1).collect();
            }
            Op::AddMemReg(r) => {
                if let Some((info, known)) = self.region(r) {
                    t!(self.fe.add_mem_region(&info));
                    self.regions.push(known);
                }
            }
            Op::RemMemReg(which) => {
                let (gpa, size) = match *which {
                    RegionRef::Known(i) if !self.regions.is_empty() => {
                        let k = self.regions.remove(usize::from(i) % self.regions.len());
                        (k.gpa, k.size)
                    }
                    RegionRef::Known(_) => (0, PAGE),
                    RegionRef::Raw { gpa, size } => (gpa, size),
                };
                let info = region_info(gpa, size, 0, 0, -1);
                t!(self.fe.remove_mem_region(&info));
            }
            Op::GetMaxMemSlots => {
                t!(fe.get_max_mem_slots());
            }
            Op::SetVringNum { q, num } => {
                t!(fe.set_vring_num(usize::from(*q), *num));
            }
            Op::SetVringAddr {
                q,
                desc,
                used,
                avail,
                flags,
                log,
            } => {
                let cfg = VringConfigData {
                    queue_max_size: QUEUE_SIZE,
                    queue_size: QUEUE_SIZE,
                    flags: u32::from(flags & 1),
                    desc_table_addr: self.user_addr(*desc),
                    used_ring_addr: self.user_addr(*used),
                    avail_ring_addr: self.user_addr(*avail),
                    log_addr: *log,
                };
                t!(self.fe.set_vring_addr(usize::from(*q), &cfg));
            }
            Op::SetVringBase { q, base } => {
                t!(fe.set_vring_base(usize::from(*q), *base));
            }
            Op::GetVringBase { q } => {
                t!(fe.get_vring_base(usize::from(*q)));
            }
            Op::SetVringFd { which, q, fd } => return self.set_vring_fd(*which, *q, *fd),
            Op::SetVringEnable { q, enable } => {
                t!(fe.set_vring_enable(usize::from(*q), *enable));
            }
            Op::GetInflightFd {
                num_queues,
                queue_size,
            } => {
                let msg = VhostUserInflight {
                    mmap_size: 0,
                    mmap_offset: 0,
                    num_queues: *num_queues,
                    queue_size: *queue_size,
                };
                t!(fe.get_inflight_fd(&msg).map(|r| r.1));
            }
            Op::SetInflightFd {
                num_queues,
                queue_size,
                size,
                offset,
                fill,
            } => {
                let (size, offset) = (bytes(*size), offset_bytes(*offset));
                let Some(f) = offset.checked_add(size).and_then(memfd) else {
                    return Flow::Go;
                };
                let _ = f.write_at(&fill[..fill.len().min(size as usize)], offset);
                let msg = VhostUserInflight {
                    mmap_size: size,
                    mmap_offset: offset,
                    num_queues: *num_queues,
                    queue_size: *queue_size,
                };
                t!(self.fe.set_inflight_fd(&msg, f.as_raw_fd()));
                self.files.push(f);
            }
            Op::SetLogBase { size, offset } => {
                let (size, offset) = (bytes(*size), offset_bytes(*offset));
                let Some(f) = offset.checked_add(size).and_then(memfd) else {
                    return Flow::Go;
                };
                let region = VhostUserDirtyLogRegion {
                    mmap_size: size,
                    mmap_offset: offset,
                    mmap_handle: f.as_raw_fd(),
                };
                t!(self.fe.set_log_base(0, Some(region)));
                self.files.push(f);
            }
            Op::SetupQueue { q, size } => self.setup_queue(usize::from(q % 8), 1 << (size % 9)),
            Op::Request {
                q,
                kind,
                sector,
                sectors,
                indirect,
            } => self.request(usize::from(q % 8), *kind, *sector, *sectors, *indirect),
            Op::WriteGuest { gpa, bytes } => {
                let gpa = match gpa {
                    Gpa::Page(p) => u64::from(*p) * PAGE,
                    Gpa::Raw(a) => *a,
                };
                self.guest_write(gpa, bytes);
            }
            Op::Kick(q) => {
                if let Some(queue) = &self.queues[usize::from(q % 8)] {
                    let _ = queue.kick.write(1);
                }
            }
            Op::Truncate { region, pages } => {
                if !self.files.is_empty() {
                    let f = &self.files[usize::from(*region) % self.files.len()];
                    let _ = f.set_len(u64::from(*pages) * PAGE);
                }
            }
            Op::Raw {
                code,
                flags,
                body,
                fds,
            } => {
                let mut given = Vec::new();
                for &kind in fds.iter().take(8) {
                    if let Some((f, _)) = self.make_fd(kind) {
                        given.push(f);
                    }
                }
                let raw: Vec<RawFd> = given.iter().map(|f| f.as_raw_fd()).collect();
                if !self.send_raw(u32::from(*code), u32::from(*flags), body, &raw) {
                    return Flow::Closed;
                }
                match (u32::from(*code), <[u8; 8]>::try_from(&body[..])) {
                    (GET_FEATURES, _) => self.pending_features += 1,
                    (SET_PROTOCOL_FEATURES, Ok(b)) => {
                        // The backend acks (or not) by what this said: tell the frontend the
                        // same, or it would wait for acks that never come.
                        let f = VhostUserProtocolFeatures::from_bits_retain(u64::from_le_bytes(b));
                        t!(self.fe.set_protocol_features(f));
                    }
                    _ => {}
                }
            }
            Op::Garbage(bytes) => {
                let _ = (&self.raw).write_all(bytes);
                let _ = self.raw.shutdown(std::net::Shutdown::Write);
                loop {
                    match recv_msg(&self.raw) {
                        Recv::Msg { .. } => {}
                        Recv::Eof => break,
                        Recv::Timeout => panic!(
                            "garbage then EOF: the backend did not close within {PROBE_WAIT:?}"
                        ),
                    }
                }
                return Flow::End;
            }
            Op::Disconnect => return Flow::End,
        }
        Flow::Go
    }

    /// GET_FEATURES through the frontend; a reply it did not take is left for the probe.
    fn get_features(&mut self) -> u64 {
        match self.fe.get_features() {
            Ok(f) => f,
            Err(_) => {
                self.pending_features += 1;
                self.s.offered
            }
        }
    }

    /// Header flags of the messages written raw: version 1, and NEED_REPLY if asked for.
    fn flags(&self) -> u32 {
        let need_reply = VhostUserHeaderFlag::NEED_REPLY.bits();
        1 | if self.need_reply { need_reply } else { 0 }
    }

    fn set_need_reply(&mut self, on: bool) {
        self.need_reply = on;
        let flags = if on {
            VhostUserHeaderFlag::NEED_REPLY
        } else {
            VhostUserHeaderFlag::empty()
        };
        self.fe.set_hdr_flags(flags);
    }

    /// Sends a GET_FEATURES of its own and reads up to its answer: true once it came, false
    /// when the backend closed the connection. Anything else is a hang the input caused.
    pub(super) fn probe(&mut self, after: &str) -> bool {
        if !self.send_raw(GET_FEATURES, 1, &[], &[]) {
            return false;
        }
        let mut want = 1 + std::mem::take(&mut self.pending_features);
        loop {
            match recv_msg(&self.raw) {
                Recv::Msg { code, flags } => {
                    let reply = VhostUserHeaderFlag::REPLY.bits();
                    if code == GET_FEATURES && flags & reply != 0 {
                        want -= 1;
                        if want == 0 {
                            return true;
                        }
                    }
                }
                Recv::Eof => return false,
                Recv::Timeout => panic!(
                    "after {after}: the backend neither answered nor closed within {PROBE_WAIT:?}"
                ),
            }
        }
    }

    /// Writes one message: header (`code`, `flags`, the body's length), body, descriptors.
    fn send_raw(&self, code: u32, flags: u32, body: &[u8], fds: &[RawFd]) -> bool {
        let mut msg = Vec::with_capacity(12 + body.len());
        msg.extend_from_slice(&code.to_le_bytes());
        msg.extend_from_slice(&flags.to_le_bytes());
        msg.extend_from_slice(&(body.len() as u32).to_le_bytes());
        msg.extend_from_slice(body);
        match self.raw.send_with_fds(&[&msg[..]], fds) {
            Ok(n) if n == msg.len() => true,
            Ok(n) => (&self.raw).write_all(&msg[n..]).is_ok(),
            Err(_) => false,
        }
    }

    /// A memfd for region `r` and how the frontend describes it; `None` when no file of the
    /// size needed can be made.
    fn region(&mut self, r: &Region) -> Option<(VhostUserMemoryRegionInfo, Known)> {
        let size = bytes(r.size);
        let offset = offset_bytes(r.offset);
        let gpa = match r.gpa {
            Gpa::Page(p) => u64::from(p) * PAGE,
            Gpa::Raw(a) => a,
        };
        let user = match r.user {
            User::Mapped => gpa.wrapping_add(USER_BASE),
            User::Raw(a) => a,
        };
        let file_len = u64::from(r.file_pages) * PAGE;
        // One region in four has a memfd of exactly `file_pages` pages, usually too short.
        let len = match offset.checked_add(size) {
            _ if r.file_pages % 4 == 3 => file_len,
            Some(need) => need.max(file_len),
            // The backend cannot map it at all.
            None => file_len,
        };
        let f = memfd(len)?;
        let info = region_info(gpa, size, user, offset, f.as_raw_fd());
        self.files.push(f);
        let known = Known {
            gpa,
            size,
            user,
            offset,
            file: self.files.len() - 1,
        };
        Some((info, known))
    }

    fn user_addr(&self, a: UserAddr) -> u64 {
        match a {
            UserAddr::In { region, offset } if !self.regions.is_empty() => {
                let k = self.regions[usize::from(region) % self.regions.len()];
                k.user.wrapping_add(u64::from(offset) % k.size.max(1))
            }
            UserAddr::In { offset, .. } => u64::from(offset),
            UserAddr::Raw(a) => a,
        }
    }

    /// A descriptor of `kind` to hand the backend, and the eventfd behind it if it is one.
    fn make_fd(&mut self, kind: FdKind) -> Option<(OwnedFd, Option<EventFd>)> {
        match kind {
            FdKind::EventFd => {
                let e = EventFd::new(EFD_NONBLOCK).ok()?;
                let give = owned(e.try_clone().ok()?);
                Some((give, Some(e)))
            }
            FdKind::PipeRead | FdKind::PipeWrite => {
                let mut p = [0 as RawFd; 2];
                // SAFETY: `p` has room for the two descriptors pipe2 writes.
                if unsafe { libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
                    return None;
                }
                // SAFETY: pipe2 succeeded: both are new descriptors nothing else owns.
                let (r, w) = unsafe { (OwnedFd::from_raw_fd(p[0]), OwnedFd::from_raw_fd(p[1])) };
                let (give, keep) = if kind == FdKind::PipeRead {
                    (r, w)
                } else {
                    (w, r)
                };
                self.kept.push(keep);
                Some((give, None))
            }
            FdKind::Memfd(n) => memfd((1 + u64::from(n)) * PAGE).map(|f| (OwnedFd::from(f), None)),
            FdKind::Socket => {
                let (a, b) = UnixStream::pair().ok()?;
                self.kept.push(OwnedFd::from(b));
                Some((OwnedFd::from(a), None))
            }
        }
    }

    fn set_vring_fd(&mut self, which: VringFd, q: u8, fd: Option<FdKind>) -> Flow {
        let code = match which {
            VringFd::Kick => 12,
            VringFd::Call => 13,
            VringFd::Err => 14,
        };
        let made = fd.and_then(|k| self.make_fd(k));
        let body = (u64::from(q) | if fd.is_none() { 0x100 } else { 0 }).to_le_bytes();
        let fds: Vec<RawFd> = made.iter().map(|m| m.0.as_raw_fd()).collect();
        let flags = 1 | if self.need_reply {
            VhostUserHeaderFlag::NEED_REPLY.bits()
        } else {
            0
        };
        if !self.send_raw(code, flags, &body, &fds) {
            return Flow::Closed;
        }
        if let Some((_, Some(e))) = made {
            if let Some(queue) = &mut self.queues[usize::from(q % 8)] {
                match which {
                    VringFd::Kick => queue.kick = e,
                    VringFd::Call => queue.call = e,
                    VringFd::Err => self.kept.push(owned(e)),
                }
            } else {
                self.kept.push(owned(e));
            }
        }
        Flow::Go
    }
}

impl Setup {
    fn features(&self, f: Features) -> u64 {
        match f {
            Features::Offered => self.offered,
            Features::Raw(b) => b,
        }
    }
}

fn bytes(s: Size) -> u64 {
    match s {
        Size::Pages(n) => (1 + u64::from(n)) * PAGE,
        Size::Raw(b) => b,
    }
}

fn offset_bytes(o: Offset) -> u64 {
    match o {
        Offset::Pages(n) => u64::from(n) * PAGE,
        Offset::Raw(b) => b,
    }
}

fn region_info(
    gpa: u64,
    size: u64,
    user: u64,
    offset: u64,
    fd: RawFd,
) -> VhostUserMemoryRegionInfo {
    VhostUserMemoryRegionInfo {
        guest_phys_addr: gpa,
        memory_size: size,
        userspace_addr: user,
        mmap_offset: offset,
        mmap_handle: fd,
    }
}
