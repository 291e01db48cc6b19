//! Bring-up and the admin queue of an NVMe controller owned through VFIO (Base 2.0 §3.5.1).
//!
//! [`PcieController::open`] disables the controller, puts the admin queues in DMA memory,
//! enables it with the host's page size, reads Identify Controller and asks for I/O queues.
//! Admin commands are blocking and run under one lock, polled (no interrupts), each bounded
//! by [`PcieOptions::io_timeout`]; I/O queues ([`PcieIoQueue`]) are created from any thread
//! and then belong to one poller.
//!
//! **Interrupts.** With [`PcieOptions::interrupts`] and a device with MSI-X, `open` enables
//! one eventfd per vector the I/O queues can use, all at once (VFIO takes a set of vectors
//! in one go; enabling a larger set later would disturb the vectors in use). I/O queue `qid`
//! gets vector `qid` while there are enough, else none (it is polled): a vector is never
//! shared, so that a poller that reads its eventfd never takes another's wake-up. Vector 0
//! belongs to the admin queue, which stays polled. MSI-X state is PCI configuration, which a
//! controller reset (CC.EN) leaves alone: the vectors stay enabled across resets.
//!
//! **Asynchronous events** (`events`): namespace notices are enabled and one Asynchronous
//! Event Request stays outstanding on the admin queue; [`PcieController::namespace_changes`]
//! answers its completion.
//!
//! **Resets.** [`PcieController::reset`] disables and re-enables the controller, which
//! deletes every I/O queue. Each reset adds one to [`PcieController::generation`]; a queue
//! created in an earlier generation reports [`PcieError::QueueLost`] from `poll`, hands its
//! commands back with [`PcieIoQueue::drain`] and is dropped (its QID goes back to the pool
//! without Delete commands); the owner then creates a new queue and resubmits.

mod events;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use super::abort::AbortOutcome;
use super::error::PcieError;
use super::io::PcieIoQueue;
use super::qid_pool::QidPool;
use super::regs::{Aqa, cq_head_doorbell, offset, sq_tail_doorbell};
use super::ring::{DmaCq, DmaSq};
use super::sgl::SglAlign;
use super::vfio::{DmaBuf, VfioNvme, host_page_size};
use super::{Dptr, PageSize, QueuePair};
use crate::nvme::spec::{
    ActiveNamespaces, Cap, Cc, Cns, Cqe, Csts, IDENTIFY_LEN, IdentifyController, IdentifyNamespace,
    Shn, Shst, SpecError, Sqe, sc, sct,
};
use vmm_sys_util::eventfd::EventFd;

/// I/O queues asked for: one per poller is plenty.
pub const MAX_IO_QUEUES: u16 = 64;
/// The largest transfer one I/O command carries, whatever MDTS allows: it sizes each
/// command's PRP list and the bounce buffers.
pub const DRIVER_MAX_TRANSFER: u64 = 1 << 20;
/// Admin queue entries.
const ADMIN_ENTRIES: u16 = 32;
/// Longest wait for a shutdown (CSTS.SHST) when the controller is closed.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(2);
/// Pause between two looks at an admin completion or CSTS.
const ADMIN_POLL: Duration = Duration::from_micros(50);

/// How the driver uses a controller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PcieOptions {
    /// Bound of every admin command; the owner of an I/O queue uses it for I/O too.
    pub io_timeout: Duration,
    /// Describe data that PRPs cannot with SGLs when the controller supports them; `false`
    /// bounces such data instead.
    pub use_sgl: bool,
    /// Enable the controller's MSI-X vectors, when it has them, and create I/O completion
    /// queues with interrupts on: [`PcieIoQueue::event_fd`] is then readable when the queue
    /// has completions. The admin queue is polled either way.
    pub interrupts: bool,
}

impl Default for PcieOptions {
    fn default() -> Self {
        PcieOptions {
            io_timeout: Duration::from_secs(30),
            use_sgl: true,
            interrupts: true,
        }
    }
}

/// The admin queue pair and its memory: ASQ at 0, ACQ one page later, a page of command
/// data after that.
#[derive(Debug)]
struct Admin {
    // Before `mem`: the rings point into it.
    qp: QueuePair<u64, DmaSq, DmaCq>,
    mem: DmaBuf,
    page: usize,
    /// Sequence number of the next command; a completion for an earlier one (that timed out)
    /// is dropped.
    seq: u64,
    /// Namespace Attribute Notices are enabled.
    notices: bool,
    aer: events::AerSlot,
}

impl Admin {
    fn new(mem: DmaBuf, page: usize) -> Result<Admin, PcieError> {
        mem.zero(0, 2 * page);
        let (Some(sq), Some(cq)) = (mem.at(0), mem.at(page)) else {
            return Err(PcieError::Alloc {
                len: mem.len(),
                source: std::io::Error::from_raw_os_error(libc::EINVAL),
            });
        };
        let n = usize::from(ADMIN_ENTRIES);
        // SAFETY: both rings lie inside `mem` (n * 64 and n * 16 bytes, each within its own
        // page), page aligned, and are used for nothing else; `mem` outlives them (field
        // order), and only the controller writes the CQ.
        let (sq, cq) = unsafe { (DmaSq::new(sq.cast(), n), DmaCq::new(cq.cast(), n)) };
        let qp = QueuePair::new(0, sq, cq).map_err(|source| PcieError::Queue {
            qid: 0,
            source: source.into(),
        })?;
        Ok(Admin {
            qp,
            mem,
            page,
            seq: 0,
            notices: false,
            aer: events::AerSlot::default(),
        })
    }

    fn data_iova(&self) -> u64 {
        self.mem.iova() + 2 * self.page as u64
    }
}

/// An NVMe controller owned by this process through VFIO. Shared as `Arc`; I/O queues hold
/// a reference.
#[derive(Debug)]
pub struct PcieController {
    // Dropped before `nvme`: DMA memory is unmapped while the container still holds the
    // device's group.
    admin: Mutex<Admin>,
    qids: Mutex<QidPool>,
    generation: AtomicU64,
    /// Commands whose data went through a bounce buffer, on all its queues so far.
    bounced: AtomicU64,
    cap: Cap,
    page: PageSize,
    identify: IdentifyController,
    granted: u16,
    max_transfer: u64,
    sgl: Option<SglAlign>,
    opts: PcieOptions,
    /// The eventfd of each enabled MSI-X vector, by vector; empty without interrupts.
    vectors: Vec<EventFd>,
    nvme: VfioNvme,
}

// Shared by the control path and every poller that owns one of its queues.
const _: () = {
    const fn shared<T: Send + Sync>() {}
    shared::<PcieController>();
};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The page size to use: the host's if the controller takes it, else the largest the
/// controller takes below it (host pages are whole multiples of it).
fn choose_page(cap: Cap, host: usize, bdf: &str) -> Result<PageSize, PcieError> {
    let too_small = || PcieError::PageSize {
        bdf: bdf.to_owned(),
        min: 4096usize << cap.mpsmin().min(4),
        host,
    };
    let wanted = PageSize::from_bytes(host).unwrap_or(PageSize::K64);
    if wanted.supported_by(cap) {
        return Ok(wanted);
    }
    let best = cap.mpsmax().min(wanted.mps()).min(4);
    PageSize::from_mps(best)
        .filter(|p| p.supported_by(cap) && p.bytes() <= host)
        .ok_or_else(too_small)
}

/// MSI-X vectors to enable for `granted` I/O queues on a device with `have`: vector 0 (the
/// admin queue's) and one per I/O queue, as far as the table goes; 0 when no I/O queue would
/// get one.
fn vectors_to_enable(have: u32, granted: u16) -> u32 {
    let n = have.min(u32::from(granted) + 1);
    if n < 2 { 0 } else { n }
}

/// The vector of I/O queue `qid` with `enabled` vectors: `qid` itself, if enabled. Never
/// shared, never vector 0.
fn vector_for(qid: u16, enabled: usize) -> Option<u16> {
    (qid != 0 && usize::from(qid) < enabled).then_some(qid)
}

impl PcieController {
    /// Opens controller `bdf` (bound to vfio-pci) and brings it up.
    pub fn open(bdf: &str, opts: &PcieOptions) -> Result<Arc<PcieController>, PcieError> {
        let nvme = VfioNvme::open(bdf)?;
        let cap = Cap(nvme.read64(offset::CAP));
        if cap.0 == u64::MAX {
            return Err(PcieError::Removed(nvme.bdf().to_owned()));
        }
        if cap.css() & 1 == 0 {
            return Err(PcieError::NoNvmCommandSet {
                bdf: nvme.bdf().to_owned(),
            });
        }
        let page = choose_page(cap, host_page_size(), nvme.bdf())?;
        let mem = DmaBuf::new(&nvme, 3 * page.bytes())?;
        let admin = Admin::new(mem, page.bytes())?;
        let mut ctrl = PcieController {
            admin: Mutex::new(admin),
            qids: Mutex::new(QidPool::new(0)),
            generation: AtomicU64::new(0),
            cap,
            page,
            identify: IdentifyController::parse(&[0; IDENTIFY_LEN]).map_err(|source| {
                PcieError::Malformed {
                    what: "Identify Controller data",
                    source,
                }
            })?,
            granted: 0,
            max_transfer: DRIVER_MAX_TRANSFER,
            bounced: AtomicU64::new(0),
            sgl: None,
            opts: *opts,
            vectors: Vec::new(),
            nvme,
        };
        {
            let mut a = lock(&ctrl.admin);
            ctrl.enable(&a)?;
            let data = ctrl.identify_locked(&mut a, Cns::Controller, 0, "Identify Controller")?;
            ctrl.identify =
                IdentifyController::parse(&data[..]).map_err(|source| PcieError::Malformed {
                    what: "Identify Controller data",
                    source,
                })?;
            ctrl.granted = ctrl.ask_queues(&mut a)?;
            ctrl.start_notices(&mut a);
        }
        ctrl.max_transfer = ctrl
            .identify
            .max_transfer_bytes(cap)
            .map_or(DRIVER_MAX_TRANSFER, |m| m.min(DRIVER_MAX_TRANSFER));
        ctrl.sgl = if opts.use_sgl {
            SglAlign::from_sgls(ctrl.identify.sgls)
        } else {
            None
        };
        ctrl.qids = Mutex::new(QidPool::new(ctrl.granted));
        if opts.interrupts {
            ctrl.vectors = ctrl.enable_vectors();
        }
        Ok(Arc::new(ctrl))
    }

    pub fn bdf(&self) -> &str {
        self.nvme.bdf()
    }

    pub fn identify(&self) -> &IdentifyController {
        &self.identify
    }

    pub fn cap(&self) -> Cap {
        self.cap
    }

    pub fn options(&self) -> &PcieOptions {
        &self.opts
    }

    /// One eventfd per MSI-X vector from 0 up to the last I/O queue's, enabled; none when the
    /// device has no MSI-X, or too few vectors to serve an I/O queue, or VFIO refuses.
    fn enable_vectors(&self) -> Vec<EventFd> {
        let have = self.nvme.msix_vectors();
        let n = vectors_to_enable(have, self.granted);
        if n == 0 {
            tracing::info!(
                "{}: {have} MSI-X vectors: I/O completions are polled",
                self.bdf()
            );
            return Vec::new();
        }
        let fds: Result<Vec<EventFd>, _> = (0..n)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC))
            .collect();
        let fds = match fds {
            Ok(fds) => fds,
            Err(e) => {
                tracing::warn!("{}: cannot create eventfds for MSI-X: {e}", self.bdf());
                return Vec::new();
            }
        };
        if let Err(e) = self.nvme.enable_msix(&fds) {
            tracing::warn!("{}: {e}: I/O completions are polled", self.bdf());
            return Vec::new();
        }
        fds
    }

    /// I/O queues can get an interrupt vector ([`PcieOptions::interrupts`], and the device
    /// has MSI-X).
    pub fn interrupts(&self) -> bool {
        self.vectors.len() > 1
    }

    /// MSI-X vectors enabled (vector 0 included); 0 without interrupts.
    pub fn vectors(&self) -> usize {
        self.vectors.len()
    }

    /// The vector of I/O queue `qid`: `qid` itself if it was enabled, else none.
    pub(super) fn vector_for(&self, qid: u16) -> Option<u16> {
        vector_for(qid, self.vectors.len())
    }

    /// The eventfd MSI-X vector `iv` signals.
    pub(super) fn vector_fd(&self, iv: u16) -> Option<&EventFd> {
        self.vectors.get(usize::from(iv))
    }

    /// I/O queues the controller granted (at most [`MAX_IO_QUEUES`]).
    pub fn io_queues_granted(&self) -> u16 {
        self.granted
    }

    /// The largest transfer of one I/O command: MDTS, at most [`DRIVER_MAX_TRANSFER`]. Always
    /// `Some` (the driver's own cap applies when MDTS sets no limit).
    pub fn max_transfer_bytes(&self) -> Option<u64> {
        Some(self.max_transfer)
    }

    pub fn page_size(&self) -> PageSize {
        self.page
    }

    /// How SGLs are used for data PRPs cannot describe; `None`: bounce buffers instead.
    pub fn sgl_align(&self) -> Option<SglAlign> {
        self.sgl
    }

    /// Starts at 0 and grows by one with every [`PcieController::reset`].
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Commands whose data went through a bounce buffer, on all its I/O queues so far: the
    /// guest's buffers broke the PRP rules and the controller has no usable SGLs.
    pub fn bounced(&self) -> u64 {
        self.bounced.load(Ordering::Relaxed)
    }

    /// Counts one bounced command of queue `qid`; the first one is logged.
    pub(super) fn note_bounce(&self, qid: u16) {
        if self.bounced.fetch_add(1, Ordering::Relaxed) == 0 {
            tracing::info!(
                bdf = self.bdf(),
                qid,
                "guest buffers break the PRP rules and the controller has no SGLs: such \
                 requests are copied through DMA bounce buffers (counted)"
            );
        }
    }

    /// CSTS.CFS is set, or the registers read as all ones (the device is gone).
    pub fn fatal(&self) -> bool {
        csts_fatal(self.nvme.read32(offset::CSTS))
    }

    /// DMA-maps `len` bytes at `addr` for the controller, at IOVA = `addr` (guest memory).
    ///
    /// # Safety
    ///
    /// As [`VfioNvme::dma_map`]: the range stays mapped until unmapped, and while the
    /// controller may use it, it is reached only through raw pointers.
    pub unsafe fn dma_map(&self, addr: *mut u8, len: usize) -> Result<(), PcieError> {
        // SAFETY: this function's contract is the one `dma_map` asks for.
        unsafe { self.nvme.dma_map(addr, len) }
    }

    pub fn dma_unmap(&self, addr: u64, len: usize) -> Result<(), PcieError> {
        self.nvme.dma_unmap(addr, len)
    }

    /// A new I/O queue pair of `depth` commands in flight, for one thread; with an interrupt
    /// vector of its own when there is one ([`PcieIoQueue::event_fd`]).
    pub fn create_io_queue(self: &Arc<Self>, depth: u16) -> Result<PcieIoQueue, PcieError> {
        PcieIoQueue::create(self.clone(), depth)
    }

    /// The Identify Namespace data of `nsid`; a missing or inactive namespace is an error
    /// that lists the active ones.
    pub fn namespace(&self, nsid: u32) -> Result<IdentifyNamespace, PcieError> {
        let not_found = |ctrl: &Self| -> PcieError {
            PcieError::NamespaceNotFound {
                nsid,
                bdf: ctrl.bdf().to_owned(),
                active: ctrl.active_namespaces().unwrap_or_default(),
            }
        };
        if nsid == 0 || nsid > self.identify.nn {
            return Err(not_found(self));
        }
        let data = {
            let mut a = lock(&self.admin);
            match self.identify_locked(&mut a, Cns::Namespace, nsid, "Identify Namespace") {
                Err(PcieError::Command { status, .. })
                    if status.sct() == sct::GENERIC && status.sc() == sc::INVALID_NAMESPACE =>
                {
                    None
                }
                r => Some(r?),
            }
        };
        match data.map(|d| IdentifyNamespace::parse(&d[..])) {
            None | Some(Err(SpecError::NamespaceInactive)) => Err(not_found(self)),
            Some(Err(source)) => Err(PcieError::Malformed {
                what: "Identify Namespace data",
                source,
            }),
            Some(Ok(ns)) => Ok(ns),
        }
    }

    /// The active namespace identifiers, in increasing order.
    pub fn active_namespaces(&self) -> Result<Vec<u32>, PcieError> {
        let mut out = Vec::new();
        let mut after = 0;
        loop {
            let data = {
                let mut a = lock(&self.admin);
                self.identify_locked(&mut a, Cns::ActiveNamespaces, after, "Identify")?
            };
            let ids =
                ActiveNamespaces::parse(&data[..]).map_err(|source| PcieError::Malformed {
                    what: "active namespace list",
                    source,
                })?;
            let full = ids.0.len() == IDENTIFY_LEN / 4;
            out.extend(ids.0.iter().filter(|&&id| id > after));
            match out.last() {
                Some(&last) if full && last > after => after = last,
                _ => return Ok(out),
            }
        }
    }

    /// Sends Abort for command `cid` of submission queue `sqid`, created in `generation`
    /// (Base 2.0 §5.1), and returns what the controller did (see [`super::abort`]). Blocking,
    /// like every admin command: it waits for the admin lock (another owner's admin command
    /// or reset) and then for the answer, at most [`PcieOptions::io_timeout`]. A queue lost in
    /// a reset meanwhile is [`PcieError::QueueLost`], and no Abort is sent. Aborts are sent
    /// one at a time (the admin lock), so never more than the Abort Command Limit (ACL,
    /// at least one).
    pub fn abort(&self, sqid: u16, cid: u16, generation: u64) -> Result<AbortOutcome, PcieError> {
        let mut a = lock(&self.admin);
        if self.generation() != generation {
            return Err(PcieError::QueueLost { qid: sqid });
        }
        let cqe = self.admin_locked(&mut a, "Abort", &Sqe::abort(sqid, cid), Dptr::NONE)?;
        Ok(AbortOutcome::from_cqe(&cqe))
    }

    /// Resets the controller (CC.EN to 0 and back), re-creates the admin queue and asks for
    /// the I/O queues again. Every I/O queue is lost (see the module documentation).
    pub fn reset(&self) -> Result<(), PcieError> {
        let mut a = lock(&self.admin);
        self.reset_locked(&mut a)
    }

    /// Resets the controller as [`PcieController::reset`] does, but only if it is still in
    /// `generation`: several owners of queues that see the same failure reset it once.
    /// Returns whether this call reset it; `false` means another reset came first (and has
    /// finished: resets hold the admin lock).
    pub fn reset_if(&self, generation: u64) -> Result<bool, PcieError> {
        let mut a = lock(&self.admin);
        if self.generation() != generation {
            return Ok(false);
        }
        self.reset_locked(&mut a).map(|()| true)
    }

    /// Stops the controller from touching memory: disabled (best effort) and no longer a bus
    /// master, so that requests failed while it is down can never see a late DMA. Every I/O
    /// queue is lost; a later [`PcieController::reset`] brings it back.
    pub fn stop_dma(&self) -> Result<(), PcieError> {
        let _a = lock(&self.admin);
        self.generation.fetch_add(1, Ordering::AcqRel);
        let _ = self.disable();
        self.nvme.set_bus_master(false)
    }

    fn reset_locked(&self, a: &mut Admin) -> Result<(), PcieError> {
        self.generation.fetch_add(1, Ordering::AcqRel);
        // After `stop_dma` the controller may not master the bus: it needs to again.
        self.nvme.set_bus_master(true)?;
        self.disable()?;
        let page = a.page;
        a.mem.zero(0, 3 * page);
        // Rebuild the rings over the same memory: head, tail and phase start again.
        let sq = a.mem.at(0);
        let cq = a.mem.at(page);
        if let (Some(sq), Some(cq)) = (sq, cq) {
            let n = usize::from(ADMIN_ENTRIES);
            // SAFETY: as in `Admin::new`: the same rings inside `a.mem`, which outlives
            // them; the old `QueuePair` over them is replaced (dropped) right here.
            let (sq, cq) = unsafe { (DmaSq::new(sq.cast(), n), DmaCq::new(cq.cast(), n)) };
            a.qp = QueuePair::new(0, sq, cq).map_err(|source| PcieError::Queue {
                qid: 0,
                source: source.into(),
            })?;
        }
        self.enable(a)?;
        let granted = self.ask_queues(a)?;
        self.start_notices(a);
        if granted < self.granted {
            tracing::warn!(
                "{}: {granted} I/O queues granted after the reset, {} before",
                self.bdf(),
                self.granted
            );
        }
        Ok(())
    }

    fn ready_timeout(&self) -> Duration {
        Duration::from_millis(u64::from(self.cap.timeout_ms().max(500)))
    }

    /// Waits for CSTS.RDY to be `ready`, at most CAP.TO. While enabling, CSTS.CFS fails.
    fn wait_ready(&self, ready: bool) -> Result<(), PcieError> {
        let start = Instant::now();
        let timeout = self.ready_timeout();
        loop {
            if ready_reached(self.bdf(), self.nvme.read32(offset::CSTS), ready)? {
                return Ok(());
            }
            if start.elapsed() >= timeout {
                return Err(PcieError::NotReady {
                    bdf: self.bdf().to_owned(),
                    ready,
                    waited_ms: start.elapsed().as_millis(),
                });
            }
            thread::sleep(Duration::from_millis(1));
        }
    }

    fn disable(&self) -> Result<(), PcieError> {
        let cc = Cc(self.nvme.read32(offset::CC));
        if cc.en() {
            self.nvme.write32(offset::CC, cc.with_en(false).0);
        }
        self.wait_ready(false)
    }

    /// Disables the controller, points it at the admin queues and enables it (§3.5.1).
    fn enable(&self, a: &Admin) -> Result<(), PcieError> {
        self.disable()?;
        let aqa = Aqa::new(ADMIN_ENTRIES.into(), ADMIN_ENTRIES.into()).map_err(|_| {
            PcieError::QueueDepth {
                depth: ADMIN_ENTRIES,
                max: 4096,
            }
        })?;
        self.nvme.write32(offset::AQA, aqa.0);
        self.nvme.write64(offset::ASQ, a.mem.iova());
        self.nvme.write64(offset::ACQ, a.mem.iova() + a.page as u64);
        self.nvme
            .write32(offset::CC, Cc::enabled(self.page.mps()).0);
        self.wait_ready(true)
    }

    /// Set Features, Number of Queues: asks for [`MAX_IO_QUEUES`] and returns what was
    /// granted, limited to the doorbells BAR0 reaches.
    fn ask_queues(&self, a: &mut Admin) -> Result<u16, PcieError> {
        let want = MAX_IO_QUEUES - 1;
        let cqe = self.admin_locked(
            a,
            "Set Features (Number of Queues)",
            &Sqe::set_num_queues(want, want),
            Dptr::NONE,
        )?;
        let (nsqa, ncqa) = (cqe.dw0() as u16, (cqe.dw0() >> 16) as u16);
        let mut granted = nsqa.min(ncqa).min(want).saturating_add(1);
        while granted > 0 && cq_head_doorbell(granted, self.cap.dstrd()) + 4 > self.nvme.bar0_len()
        {
            granted -= 1;
        }
        Ok(granted)
    }

    fn identify_locked(
        &self,
        a: &mut Admin,
        cns: Cns,
        nsid: u32,
        what: &'static str,
    ) -> Result<Box<[u8; IDENTIFY_LEN]>, PcieError> {
        let prp1 = a.data_iova();
        a.mem.zero(2 * a.page, IDENTIFY_LEN);
        self.admin_locked(
            a,
            what,
            &Sqe::identify(cns, nsid),
            Dptr::Prp { prp1, prp2: 0 },
        )?;
        let mut out = Box::new([0u8; IDENTIFY_LEN]);
        a.mem.read(2 * a.page, &mut out[..]);
        Ok(out)
    }

    /// Creates I/O CQ `qid` (interrupts on vector `iv`, if any) then SQ `qid` (rings of
    /// `entries` at the IOVAs), under one hold of the admin lock; returns the generation they
    /// belong to. If the SQ cannot be created the CQ is deleted again.
    pub(super) fn create_queue_pair(
        &self,
        qid: u16,
        entries: u16,
        sq_iova: u64,
        cq_iova: u64,
        iv: Option<u16>,
    ) -> Result<u64, PcieError> {
        let mut a = lock(&self.admin);
        let prp = |prp1| Dptr::Prp { prp1, prp2: 0 };
        self.admin_locked(
            &mut a,
            "Create I/O Completion Queue",
            &Sqe::create_io_cq(qid, entries, iv),
            prp(cq_iova),
        )?;
        if let Err(e) = self.admin_locked(
            &mut a,
            "Create I/O Submission Queue",
            &Sqe::create_io_sq(qid, entries, qid),
            prp(sq_iova),
        ) {
            let _ = self.admin_locked(
                &mut a,
                "Delete I/O Completion Queue",
                &Sqe::delete_io_cq(qid),
                Dptr::NONE,
            );
            return Err(e);
        }
        Ok(self.generation())
    }

    /// Deletes I/O SQ `qid` then CQ `qid`, unless a reset since `generation` already did or
    /// the controller failed.
    pub(super) fn delete_queue_pair(&self, qid: u16, generation: u64) -> Result<(), PcieError> {
        let mut a = lock(&self.admin);
        if self.generation() != generation || self.fatal() {
            return Ok(());
        }
        self.admin_locked(
            &mut a,
            "Delete I/O Submission Queue",
            &Sqe::delete_io_sq(qid),
            Dptr::NONE,
        )?;
        self.admin_locked(
            &mut a,
            "Delete I/O Completion Queue",
            &Sqe::delete_io_cq(qid),
            Dptr::NONE,
        )?;
        Ok(())
    }

    fn admin_locked(
        &self,
        a: &mut Admin,
        what: &'static str,
        sqe: &Sqe,
        dptr: Dptr,
    ) -> Result<Cqe, PcieError> {
        let start = Instant::now();
        let timeout = self.opts.io_timeout;
        let seq = a.seq;
        a.seq += 1;
        let dstrd = self.cap.dstrd();
        if a.qp.submit(sqe, dptr, seq).is_err() {
            // Only commands that never completed fill the admin queue.
            return Err(PcieError::AdminTimeout { what, waited_ms: 0 });
        }
        if let Some(v) = a.qp.take_sq_doorbell() {
            self.nvme.write32(sq_tail_doorbell(0, dstrd), v);
        }
        loop {
            let mut got = None;
            let aer = &mut a.aer;
            let polled = a.qp.poll(usize::from(ADMIN_ENTRIES), |s, cqe| {
                if s == seq {
                    got = Some(cqe);
                } else {
                    aer.complete(s, cqe);
                }
            });
            if let Some(v) = a.qp.take_cq_doorbell() {
                self.nvme.write32(cq_head_doorbell(0, dstrd), v);
            }
            polled.map_err(|source| PcieError::Queue { qid: 0, source })?;
            if let Some(cqe) = got {
                let status = cqe.status();
                if !status.is_success() {
                    return Err(PcieError::Command { what, status });
                }
                return Ok(cqe);
            }
            if self.fatal() {
                return Err(if self.nvme.read32(offset::CSTS) == u32::MAX {
                    PcieError::Removed(self.bdf().to_owned())
                } else {
                    PcieError::Fatal(self.bdf().to_owned())
                });
            }
            if start.elapsed() >= timeout {
                return Err(PcieError::AdminTimeout {
                    what,
                    waited_ms: start.elapsed().as_millis(),
                });
            }
            thread::sleep(ADMIN_POLL);
        }
    }

    pub(super) fn nvme(&self) -> &VfioNvme {
        &self.nvme
    }

    pub(super) fn alloc_qid(&self) -> Option<u16> {
        lock(&self.qids).alloc()
    }

    pub(super) fn free_qid(&self, qid: u16) {
        lock(&self.qids).free(qid);
    }
}

impl Drop for PcieController {
    /// A normal shutdown (CC.SHN, so a real drive flushes its cache), then the controller is
    /// disabled: it does no DMA once its memory is unmapped.
    fn drop(&mut self) {
        let cc = Cc(self.nvme.read32(offset::CC));
        if cc.0 != u32::MAX && cc.en() {
            self.nvme.write32(offset::CC, cc.with_shn(Shn::Normal).0);
            let start = Instant::now();
            while start.elapsed() < SHUTDOWN_WAIT {
                let csts = self.nvme.read32(offset::CSTS);
                if csts == u32::MAX || Csts(csts).shst() == Shst::Complete {
                    break;
                }
                thread::sleep(Duration::from_millis(1));
            }
        }
        if let Err(e) = self.disable() {
            tracing::warn!("{}: {e}", self.bdf());
        }
    }
}

/// CSTS `raw` says the controller has failed: CFS set, or all ones (the device is gone).
fn csts_fatal(raw: u32) -> bool {
    raw == u32::MAX || Csts(raw).cfs()
}

/// One reading `raw` of CSTS while waiting for RDY to be `ready` on controller `bdf`: whether
/// it is. Registers that read as all ones fail (the device is gone), and so does CFS while
/// enabling (a controller that is being disabled, by a reset, may report it until it is).
fn ready_reached(bdf: &str, raw: u32, ready: bool) -> Result<bool, PcieError> {
    if raw == u32::MAX {
        return Err(PcieError::Removed(bdf.to_owned()));
    }
    let csts = Csts(raw);
    if ready && csts.cfs() {
        return Err(PcieError::Fatal(bdf.to_owned()));
    }
    Ok(csts.rdy() == ready)
}

#[cfg(test)]
mod tests;
