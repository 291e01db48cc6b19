//! The NVMe PCIe transport (NVMe Base 2.0; the PCIe transport is the memory-based one of
//! §3-4): a hardware-independent core, and the user-space driver over VFIO built on it.
//!
//! The core works on plain slices and integer addresses, so it is unit tested without a
//! device: the driver maps BAR0 and the guest's memory (IOVA = the address in vubd, so an
//! iovec's address is its IOVA), and hands the core the memory it writes.
//!
//! The driver:
//!
//! - [`sysfs`]: what the kernel says about a PCI function before VFIO is asked for it.
//! - [`vfio`]: [`VfioNvme`] (container, group, device, BAR0) and [`DmaBuf`].
//! - [`ctrl`]: [`PcieController`]: bring-up, the admin queue, namespaces, Abort, resets.
//! - [`abort`]: what an Abort's answer means and what follows a timed-out command.
//! - [`io`]: [`PcieIoQueue`], a polled I/O queue pair for one poller.
//! - [`error`]: [`PcieError`], one line per case the user can fix.
//!
//! The core:
//!
//! - [`layout`]: PRPs, an SGL or a bounce buffer for a command's data.
//! - [`prp`]: PRP entries for a command's data (§4.1.1), with PRP lists chained across pages.
//! - [`sgl`]: an SGL for controllers that support them (§4.1.2): one Data Block descriptor in
//!   the command, or a Last Segment of Data Block descriptors.
//! - [`ring`]: submission and completion queue rings over memory reached through [`SqMem`] /
//!   [`CqMem`]: slices for tests, volatile accesses for device memory ([`DmaSq`], [`DmaCq`]).
//! - [`queue`]: [`QueuePair`], the rings of one queue with its in-flight [`CmdTable`]: submit,
//!   doorbells once per batch, completions mapped back to commands.
//! - [`regs`]: BAR0 register offsets, doorbell offsets, the admin queue attributes.
//! - [`sim`]: [`Loopback`], a controller model that completes every command, for tests and
//!   instruction counts.
//!
//! # Measuring the per-I/O cost without hardware
//!
//! The submit path (an NVM Read [`Sqe`], [`prp::build`] of its buffer, [`QueuePair::submit`],
//! [`QueuePair::take_sq_doorbell`]) and the completion path ([`QueuePair::poll`],
//! [`QueuePair::take_cq_doorbell`]) are ordinary public functions over slice-backed memory;
//! [`Loopback`] plays the controller between them. A program that loops over the three under
//! `valgrind --tool=callgrind` counts the driver's instructions per I/O (`examples/pcie_cost.rs`
//! does that).
//!
//! [`CmdTable`]: super::cid::CmdTable
//! [`Sqe`]: super::spec::Sqe

pub mod abort;
pub mod ctrl;
pub mod error;
pub mod io;
pub mod layout;
pub mod prp;
mod qid_pool;
pub mod queue;
pub mod regs;
pub mod ring;
pub mod sgl;
pub mod sim;
pub mod sysfs;
pub mod vfio;

pub use ctrl::{PcieController, PcieOptions};
pub use error::PcieError;
pub use io::{PcieIoQueue, QueueFull};
pub use queue::{QueueError, QueuePair, SubmitError};
pub use regs::{cq_head_doorbell, sq_tail_doorbell};
pub use ring::{CqMem, CqRing, DmaCq, DmaSq, RingError, SqMem, SqRing};
pub use sgl::SglAlign;
pub use sim::Loopback;
pub use vfio::{DmaBuf, VfioNvme};

use super::spec::{Cap, Sqe};

/// The controller's memory page size, CC.MPS (Base 2.0 §3.1.3.5): 4 KiB to 64 KiB here.
///
/// PRP entries after the first point at whole pages of this size (§4.1.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageSize {
    shift: u32,
}

impl PageSize {
    pub const K4: PageSize = PageSize { shift: 12 };
    pub const K64: PageSize = PageSize { shift: 16 };

    /// From CC.MPS: pages of `2^(12 + mps)` bytes; `None` past 64 KiB.
    pub const fn from_mps(mps: u8) -> Option<PageSize> {
        if mps <= 4 {
            Some(PageSize {
                shift: 12 + mps as u32,
            })
        } else {
            None
        }
    }

    /// A power of two from 4096 to 65536.
    pub const fn from_bytes(bytes: usize) -> Option<PageSize> {
        if bytes.is_power_of_two() && bytes >= 4096 && bytes <= 65536 {
            Some(PageSize {
                shift: bytes.trailing_zeros(),
            })
        } else {
            None
        }
    }

    pub const fn bytes(self) -> usize {
        1 << self.shift
    }

    /// The value for CC.MPS.
    pub const fn mps(self) -> u8 {
        (self.shift - 12) as u8
    }

    /// Whether the controller accepts this size (CAP.MPSMIN ..= CAP.MPSMAX, §3.1.3.1).
    pub fn supported_by(self, cap: Cap) -> bool {
        (cap.mpsmin()..=cap.mpsmax()).contains(&self.mps())
    }

    /// The offset of `addr` within its page.
    pub const fn offset(self, addr: u64) -> u64 {
        addr & (self.bytes() as u64 - 1)
    }

    pub const fn is_aligned(self, addr: u64) -> bool {
        self.offset(addr) == 0
    }
}

/// The data pointer of a command (DPTR, Base 2.0 Figure 88), with the PSDT value that goes
/// with it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dptr {
    /// PRP Entry 1 and PRP Entry 2 (PSDT 00b).
    Prp { prp1: u64, prp2: u64 },
    /// One SGL descriptor (PSDT 01b: SGL for data, MPTR an address), in wire format.
    Sgl([u8; 16]),
}

/// Byte 1 of an SQE: PSDT in bits 7:6 (Base 2.0 Figure 88).
const SQE_FLAGS: usize = 1;
const PSDT_MASK: u8 = 0xc0;
const PSDT_SGL: u8 = 0x40;
/// DPTR: bytes 39:24 of an SQE.
const SQE_DPTR: usize = 24;

impl Dptr {
    /// No data (commands without a data buffer ignore DPTR).
    pub const NONE: Dptr = Dptr::Prp { prp1: 0, prp2: 0 };

    /// `sqe` with this data pointer, in the form it takes in a submission queue.
    ///
    /// [`Sqe::set_sgl`] only knows the descriptors of NVMe/TCP, so an SGL with addresses is
    /// written into the wire bytes here.
    pub fn apply(self, sqe: &Sqe) -> [u8; 64] {
        match self {
            Dptr::Prp { prp1, prp2 } => {
                let mut s = *sqe;
                s.set_prp(prp1, prp2);
                *s.as_bytes()
            }
            Dptr::Sgl(desc) => {
                let mut raw = *sqe.as_bytes();
                raw[SQE_FLAGS] = (raw[SQE_FLAGS] & !PSDT_MASK) | PSDT_SGL;
                raw[SQE_DPTR..SQE_DPTR + 16].copy_from_slice(&desc);
                raw
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_sizes_from_mps_and_bytes_agree_and_stop_at_64k() {
        for mps in 0..=4u8 {
            let p = PageSize::from_mps(mps).expect("4K..=64K");
            assert_eq!(p.bytes(), 4096 << mps);
            assert_eq!(p.mps(), mps);
            assert_eq!(PageSize::from_bytes(p.bytes()), Some(p));
        }
        assert_eq!(PageSize::from_mps(5), None);
        for bad in [0, 2048, 4095, 6144, 131_072] {
            assert_eq!(PageSize::from_bytes(bad), None, "{bad}");
        }
        assert_eq!(PageSize::K4.offset(0x1234), 0x234);
        assert!(PageSize::K64.is_aligned(0x3_0000));
        assert!(!PageSize::K64.is_aligned(0x3_1000));
    }

    #[test]
    fn page_size_is_checked_against_cap_mpsmin_and_mpsmax() {
        // MPSMIN 0 (4K), MPSMAX 2 (16K).
        let cap = Cap(2u64 << 52);
        assert!(PageSize::K4.supported_by(cap));
        assert!(PageSize::from_mps(2).expect("16K").supported_by(cap));
        assert!(!PageSize::K64.supported_by(cap));
    }

    #[test]
    fn dptr_writes_psdt_and_the_data_pointer_and_nothing_else() {
        let sqe = Sqe::read(1, 0x10, 7, false);
        let prp = Dptr::Prp {
            prp1: 0x1122_3344_5566_7788,
            prp2: 0x99aa_bbcc_ddee_f000,
        }
        .apply(&sqe);
        assert_eq!(prp[1] & PSDT_MASK, 0);
        assert_eq!(prp[24..32], 0x1122_3344_5566_7788u64.to_le_bytes());
        assert_eq!(prp[32..40], 0x99aa_bbcc_ddee_f000u64.to_le_bytes());

        let desc: [u8; 16] = std::array::from_fn(|i| i as u8 + 1);
        let sgl = Dptr::Sgl(desc).apply(&sqe);
        assert_eq!(sgl[1] & PSDT_MASK, PSDT_SGL);
        assert_eq!(sgl[24..40], desc);
        // Everything outside byte 1 and DPTR is the command as built.
        for (i, (a, b)) in sgl.iter().zip(sqe.as_bytes()).enumerate() {
            if i != 1 && !(24..40).contains(&i) {
                assert_eq!(a, b, "byte {i}");
            }
        }
        assert_eq!(prp[..24], sqe.as_bytes()[..24]);
        assert_eq!(prp[40..], sqe.as_bytes()[40..]);
    }
}
