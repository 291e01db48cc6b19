//! What the poller marks in a live migration's dirty log (vhost-user "Migration"): every
//! guest page it or a device writes for a request, before the used index that publishes the
//! request. Called only while the frontend has logging on; nothing of it runs otherwise.

use crate::mem::{DirtyLog, GuestMemory, IovecList};
use crate::virtio_blk::ring::SplitRing;
use vm_memory::GuestAddress;

/// A finished request: the buffers it returned data in (a read's, GET_ID's, written by the
/// kernel, a device's DMA or the NVMe/TCP receive path, partly so if it failed), and its
/// status byte.
#[inline(never)]
pub(super) fn request(
    log: &DirtyLog,
    mem: &GuestMemory,
    data: Option<&IovecList>,
    status: GuestAddress,
) {
    if let Some(iov) = data {
        for v in iov.as_slice() {
            log.mark_host(mem, v.iov_base.cast_const().cast(), v.iov_len);
        }
    }
    log.mark(status.0, 1);
}

/// The queue's used ring (elements, index, flags and avail_event): marked whole, a page or
/// two, whenever the poller writes to it.
#[inline(never)]
pub(super) fn used_ring(log: &DirtyLog, ring: &SplitRing) {
    let (gpa, len) = ring.used_range();
    log.mark(gpa, len);
}
