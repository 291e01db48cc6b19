//! Controller registers in BAR0 (NVMe Base 2.0 §3.1.3, Figure 35) and the doorbells after
//! them (§3.1.3.15-16). The register values themselves are [`Cap`], [`Cc`] and [`Csts`] of
//! `spec`.
//!
//! [`Cap`]: crate::nvme::spec::Cap
//! [`Cc`]: crate::nvme::spec::Cc
//! [`Csts`]: crate::nvme::spec::Csts

use thiserror::Error;

/// Byte offsets of the registers in BAR0.
pub mod offset {
    /// Controller Capabilities, 64 bits.
    pub const CAP: usize = 0x00;
    /// Version.
    pub const VS: usize = 0x08;
    /// Interrupt Mask Set.
    pub const INTMS: usize = 0x0c;
    /// Interrupt Mask Clear.
    pub const INTMC: usize = 0x10;
    /// Controller Configuration.
    pub const CC: usize = 0x14;
    /// Controller Status.
    pub const CSTS: usize = 0x1c;
    /// NVM Subsystem Reset.
    pub const NSSR: usize = 0x20;
    /// Admin Queue Attributes.
    pub const AQA: usize = 0x24;
    /// Admin Submission Queue Base Address, 64 bits.
    pub const ASQ: usize = 0x28;
    /// Admin Completion Queue Base Address, 64 bits.
    pub const ACQ: usize = 0x30;
    /// The first doorbell (admin SQ tail).
    pub const DOORBELLS: usize = 0x1000;
}

/// Written to NSSR, starts an NVM subsystem reset ("NVMe" in ASCII, §3.1.3.7).
pub const NSSR_RESET: u32 = 0x4e56_4d65;

/// Offset in BAR0 of the Submission Queue `qid` Tail Doorbell; doorbells are
/// `4 << CAP.DSTRD` bytes apart.
pub const fn sq_tail_doorbell(qid: u16, dstrd: u8) -> usize {
    offset::DOORBELLS + (2 * qid as usize) * (4 << dstrd)
}

/// Offset in BAR0 of the Completion Queue `qid` Head Doorbell.
pub const fn cq_head_doorbell(qid: u16, dstrd: u8) -> usize {
    offset::DOORBELLS + (2 * qid as usize + 1) * (4 << dstrd)
}

/// BAR0 bytes that hold the registers and the doorbells of queues `0..=max_qid`.
pub const fn bar0_len(max_qid: u16, dstrd: u8) -> usize {
    cq_head_doorbell(max_qid, dstrd) + 4
}

#[derive(Clone, Copy, Debug, Error, PartialEq, Eq)]
pub enum RegsError {
    /// Admin queues hold 2 to 4096 entries (§3.1.3.8).
    #[error("admin queue of {0} entries, need 2..=4096")]
    AdminQueueSize(u32),
    /// ASQ and ACQ are 4 KiB aligned (bits 11:0 reserved, §3.1.3.9-10).
    #[error("admin queue at {0:#x} is not 4 KiB aligned")]
    AdminQueueBase(u64),
}

/// Admin Queue Attributes (§3.1.3.8): queue sizes, 0-based.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Aqa(pub u32);

impl Aqa {
    /// For an admin submission queue of `sq_entries` and a completion queue of
    /// `cq_entries`.
    pub fn new(sq_entries: u32, cq_entries: u32) -> Result<Aqa, RegsError> {
        for n in [sq_entries, cq_entries] {
            if !(2..=4096).contains(&n) {
                return Err(RegsError::AdminQueueSize(n));
            }
        }
        Ok(Aqa((sq_entries - 1) | ((cq_entries - 1) << 16)))
    }

    /// Admin Submission Queue Size, entries.
    pub fn sq_entries(self) -> u32 {
        (self.0 & 0xfff) + 1
    }

    /// Admin Completion Queue Size, entries.
    pub fn cq_entries(self) -> u32 {
        ((self.0 >> 16) & 0xfff) + 1
    }
}

/// Checks an admin queue base address for ASQ / ACQ.
pub fn admin_queue_base(iova: u64) -> Result<u64, RegsError> {
    if iova & 0xfff == 0 {
        Ok(iova)
    } else {
        Err(RegsError::AdminQueueBase(iova))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nvme::spec::{Cap, Property};

    #[test]
    fn register_offsets_match_the_ones_fabrics_uses() {
        assert_eq!(offset::CAP, Property::Cap.offset() as usize);
        assert_eq!(offset::VS, Property::Vs.offset() as usize);
        assert_eq!(offset::CC, Property::Cc.offset() as usize);
        assert_eq!(offset::CSTS, Property::Csts.offset() as usize);
    }

    #[test]
    fn doorbells_follow_the_stride() {
        assert_eq!(sq_tail_doorbell(0, 0), 0x1000);
        assert_eq!(cq_head_doorbell(0, 0), 0x1004);
        assert_eq!(sq_tail_doorbell(1, 0), 0x1008);
        assert_eq!(cq_head_doorbell(1, 0), 0x100c);
        // DSTRD 2: 16 bytes apart.
        assert_eq!(sq_tail_doorbell(3, 2), 0x1000 + 6 * 16);
        assert_eq!(cq_head_doorbell(3, 2), 0x1000 + 7 * 16);
        assert_eq!(cq_head_doorbell(u16::MAX, 15), 0x1000 + 131_071 * (4 << 15));
        assert_eq!(bar0_len(4, 0), 0x1000 + 10 * 4);
        let cap = Cap(3u64 << 32);
        assert_eq!(sq_tail_doorbell(2, cap.dstrd()), 0x1000 + 4 * 32);
    }

    #[test]
    fn aqa_holds_0_based_sizes() {
        let aqa = Aqa::new(32, 64).expect("valid");
        assert_eq!(aqa.0, 31 | (63 << 16));
        assert_eq!((aqa.sq_entries(), aqa.cq_entries()), (32, 64));
        assert_eq!(Aqa::new(4096, 2).expect("bounds").0, 0xfff | (1 << 16));
        assert_eq!(Aqa::new(1, 2), Err(RegsError::AdminQueueSize(1)));
        assert_eq!(Aqa::new(2, 4097), Err(RegsError::AdminQueueSize(4097)));
    }

    #[test]
    fn admin_queues_are_4k_aligned() {
        assert_eq!(admin_queue_base(0x1_0000_0000), Ok(0x1_0000_0000));
        assert_eq!(
            admin_queue_base(0x1_0000_0800),
            Err(RegsError::AdminQueueBase(0x1_0000_0800))
        );
    }
}
