//! What a frontend maps into vubd stays out of its core dumps (MADV_DONTDUMP): guest memory
//! holds tenants' data, and a dump of a daemon serving many of them must not. The inflight
//! region and the dirty log hold none, but are sized by the frontend, so they are left out
//! too: a core file holds vubd's own state, whatever a frontend did.

use std::io;

use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

use super::GuestMemory;

/// Leaves the mapping of `len` bytes at `addr` (rounded out to whole pages) out of core dumps.
pub(super) fn exclude(addr: *mut u8, len: usize) -> io::Result<()> {
    // SAFETY: sysconf has no memory-safety preconditions.
    let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) })
        .ok()
        .filter(|p| p.is_power_of_two())
        .unwrap_or(4096);
    let start = addr as usize & !(page - 1);
    let len = len + (addr as usize - start);
    // SAFETY: MADV_DONTDUMP only sets a flag on the mappings of the range (the pages of a
    // mapping the caller owns): no memory is freed, moved or changed.
    let rc = unsafe { libc::madvise(start as *mut libc::c_void, len, libc::MADV_DONTDUMP) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Leaves every region of `mem` out of core dumps (done again for each new memory table: the
/// regions a previous one had are marked already, which changes nothing).
pub fn exclude_from_core_dumps(mem: &GuestMemory) -> io::Result<()> {
    for r in mem.iter() {
        let Ok(host) = r.get_host_address(MemoryRegionAddress(0)) else {
            continue;
        };
        let len = usize::try_from(r.len()).map_err(|_| io::ErrorKind::InvalidInput)?;
        exclude(host, len)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::mem::SharedMapping;

    /// The VmFlags of the mapping that holds `addr`, from /proc/self/smaps.
    fn vm_flags(addr: usize) -> String {
        let smaps = std::fs::read_to_string("/proc/self/smaps").expect("smaps");
        let mut inside = false;
        for line in smaps.lines() {
            if let Some((range, _)) = line.split_once(' ')
                && let Some((lo, hi)) = range.split_once('-')
                && let (Ok(lo), Ok(hi)) =
                    (usize::from_str_radix(lo, 16), usize::from_str_radix(hi, 16))
            {
                inside = (lo..hi).contains(&addr);
            } else if inside && let Some(flags) = line.strip_prefix("VmFlags:") {
                return flags.trim().to_owned();
            }
        }
        panic!("no mapping holds {addr:#x}");
    }

    #[test]
    fn shared_mappings_stay_out_of_core_dumps() {
        let m = SharedMapping::memfd(c"vubd-test-dump", 8192).expect("memfd");
        let flags = vm_flags(m.as_ptr() as usize);
        assert!(flags.split(' ').any(|f| f == "dd"), "VmFlags: {flags}");
    }
}
