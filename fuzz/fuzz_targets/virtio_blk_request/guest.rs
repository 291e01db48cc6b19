//! The guest memory image of one input: laying out descriptors and headers, reading it back
//! to see what changed, making it read-only while a chain is parsed.

use super::*;

impl Guest {
    pub(super) fn new(m: &vubd_fuzz::virtio_blk::Memory) -> Option<Self> {
        let pages = |p: u8| (1 + u64::from(p % 16)) * PAGE;
        let r0 = (
            u64::from(m.base) * PAGE + u64::from(m.shift),
            pages(m.pages),
        );
        let mut regions = vec![r0];
        if let Some(s) = &m.second {
            regions.push((r0.0 + r0.1 + u64::from(s.gap) * PAGE, pages(s.pages)));
        }
        if m.top {
            regions.push((0u64.wrapping_sub(2 * PAGE), PAGE));
        }
        let ranges: Vec<(GuestAddress, usize)> = regions
            .iter()
            .map(|&(a, l)| (GuestAddress(a), l as usize))
            .collect();
        let mem = GuestMemory::from_ranges(&ranges).ok()?;
        Some(Self {
            mem: Arc::new(mem),
            regions,
        })
    }

    pub(super) fn addr(&self, a: Addr) -> u64 {
        let region = |r: u8| self.regions[usize::from(r) % self.regions.len()];
        match a {
            Addr::In { region: r, offset } => {
                let (start, len) = region(r);
                start + u64::from(offset) % len
            }
            Addr::End { region: r, back } => {
                let (start, len) = region(r);
                (start + len).wrapping_sub(u64::from(back))
            }
            Addr::Raw(a) => a,
        }
    }

    /// Writes what fits of `bytes` at `addr` (nothing past the end of the address space).
    pub(super) fn put(&self, addr: u64, bytes: &[u8]) {
        if self.mem.write_slice(bytes, GuestAddress(addr)).is_ok() {
            return;
        }
        for (i, b) in bytes.iter().enumerate() {
            if let Some(a) = addr.checked_add(i as u64) {
                let _ = self.mem.write_obj(*b, GuestAddress(a));
            }
        }
    }

    pub(super) fn put_descs(&self, at: u64, descs: &[Desc]) {
        for (i, d) in descs.iter().enumerate() {
            if let Some(a) = at.checked_add(16 * i as u64) {
                self.put(a, &self.desc_bytes(d));
            }
        }
    }

    pub(super) fn desc_bytes(&self, d: &Desc) -> [u8; 16] {
        let len = match d.len {
            Len::Sectors(n) => u32::from(n) * 512,
            Len::Bytes(n) => u32::from(n),
            Len::Raw(n) => n,
        };
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&self.addr(d.addr).to_le_bytes());
        b[8..12].copy_from_slice(&len.to_le_bytes());
        b[12..14].copy_from_slice(&u16::from(d.flags).to_le_bytes());
        b[14..].copy_from_slice(&d.next.to_le_bytes());
        b
    }

    pub(super) fn put_header(&self, at: u64, h: &Header, capacity: u64) {
        let rtype = match h.kind {
            Kind::In => req_type::IN,
            Kind::Out => req_type::OUT,
            Kind::Flush => req_type::FLUSH,
            Kind::GetId => req_type::GET_ID,
            Kind::Discard => req_type::DISCARD,
            Kind::WriteZeroes => req_type::WRITE_ZEROES,
            Kind::Raw(t) => t,
        };
        let mut b = vec![0u8; 16];
        b[..4].copy_from_slice(&rtype.to_le_bytes());
        b[4..8].copy_from_slice(&0xa5a5_a5a5u32.to_le_bytes());
        b[8..].copy_from_slice(&sector(h.sector, capacity).to_le_bytes());
        for s in &h.segments {
            b.extend_from_slice(&sector(s.sector, capacity).to_le_bytes());
            b.extend_from_slice(&s.sectors.to_le_bytes());
            b.extend_from_slice(&u32::from(s.flags).to_le_bytes());
        }
        self.put(at, &b);
    }

    /// Every byte of guest memory, to see what changed.
    pub(super) fn image(&self) -> Vec<Vec<u8>> {
        self.regions
            .iter()
            .map(|&(a, l)| {
                let mut v = vec![0u8; l as usize];
                self.mem
                    .read_slice(&mut v, GuestAddress(a))
                    .expect("a region reads whole");
                v
            })
            .collect()
    }

    /// Applies a write of `bytes` at `addr` to an image (bytes outside memory are dropped).
    pub(super) fn apply(&self, img: &mut [Vec<u8>], addr: u64, bytes: &[u8]) {
        for (i, &b) in bytes.iter().enumerate() {
            let a = addr.wrapping_add(i as u64);
            for (&(s, l), v) in self.regions.iter().zip(img.iter_mut()) {
                if a.wrapping_sub(s) < l {
                    v[(a - s) as usize] = b;
                }
            }
        }
    }

    /// The guest addresses whose bytes differ between two images (the common case, none,
    /// costs one comparison per region).
    pub(super) fn changed(&self, before: &[Vec<u8>], after: &[Vec<u8>]) -> Vec<u64> {
        let mut out = Vec::new();
        for ((&(start, _), b), a) in self.regions.iter().zip(before).zip(after) {
            if b != a {
                let diff = b.iter().zip(a).enumerate().filter(|(_, (x, y))| x != y);
                out.extend(diff.map(|(i, _)| start + i as u64));
            }
        }
        out
    }

    /// Makes guest memory read-only (`false`) or writable again (`true`): a write while it
    /// is read-only is a crash libFuzzer reports.
    pub(super) fn set_writable(&self, writable: bool) {
        let prot = if writable {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        for r in self.mem.iter() {
            let host = r
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .expect("a region has a host address");
            // SAFETY: `host..host + len` is one whole anonymous mapping that `self.mem` made
            // (from_ranges maps each region by itself, page aligned) and keeps; changing its
            // protection touches no other memory, and nothing writes it while read-only but
            // the code under test, which must not.
            let rc = unsafe { libc::mprotect(host.cast(), r.len() as usize, prot) };
            assert_eq!(rc, 0, "mprotect: {}", std::io::Error::last_os_error());
        }
    }

    /// True when `addr..addr + len` lies inside one region (what `HostMap` translates in one
    /// piece).
    pub(super) fn in_one_region(&self, addr: u64, len: u64) -> bool {
        self.regions
            .iter()
            .any(|&(s, l)| addr.wrapping_sub(s) < l && len <= l - (addr - s))
    }

    /// True when the host range lies inside the mapping of one region.
    pub(super) fn host_inside(&self, base: usize, len: usize) -> bool {
        self.mem.iter().any(|r| {
            let Ok(h) = r.get_host_address(vm_memory::MemoryRegionAddress(0)) else {
                return false;
            };
            let h = h as usize;
            base >= h
                && base
                    .checked_add(len)
                    .is_some_and(|e| e <= h + r.len() as usize)
        })
    }
}
