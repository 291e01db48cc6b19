//! Submission queue entries (NVMe Base 2.0 §4.2) and the commands an initiator issues.

use super::regs::Property;

/// NVM command set opcodes (NVM Command Set 1.0 §3).
pub mod io_opc {
    pub const FLUSH: u8 = 0x00;
    pub const WRITE: u8 = 0x01;
    pub const READ: u8 = 0x02;
    pub const WRITE_ZEROES: u8 = 0x08;
    pub const DSM: u8 = 0x09;
}

/// Admin command opcodes (Base 2.0 §5, Figure 139).
pub mod admin_opc {
    pub const DELETE_IO_SQ: u8 = 0x00;
    pub const CREATE_IO_SQ: u8 = 0x01;
    pub const GET_LOG_PAGE: u8 = 0x02;
    pub const DELETE_IO_CQ: u8 = 0x04;
    pub const CREATE_IO_CQ: u8 = 0x05;
    pub const IDENTIFY: u8 = 0x06;
    pub const ABORT: u8 = 0x08;
    pub const SET_FEATURES: u8 = 0x09;
    pub const GET_FEATURES: u8 = 0x0a;
    pub const ASYNC_EVENT_REQUEST: u8 = 0x0c;
    pub const KEEP_ALIVE: u8 = 0x18;
    /// Fabrics commands share one opcode and differ by FCTYPE (Fabrics 1.1 §6).
    pub const FABRICS: u8 = 0x7f;
}

/// Fabrics command types (Fabrics 1.1 Figure 16).
pub mod fabrics_type {
    pub const PROPERTY_SET: u8 = 0x00;
    pub const CONNECT: u8 = 0x01;
    pub const PROPERTY_GET: u8 = 0x04;
}

/// Feature identifier: Number of Queues (Base 2.0 §5.27.1.5).
pub const FID_NUMBER_OF_QUEUES: u8 = 0x07;
/// Feature identifier: Asynchronous Event Configuration (Base 2.0 §5.27.1.7).
pub const FID_ASYNC_EVENT_CONFIG: u8 = 0x0b;
/// Feature identifier: Keep Alive Timer (Base 2.0 §5.27.1.12).
pub const FID_KEEP_ALIVE_TIMER: u8 = 0x0f;
/// Log page identifier: Changed Namespace List (Base 2.0 §5.16.1.5).
pub const LID_CHANGED_NAMESPACES: u8 = 0x04;
/// Log page identifier: Discovery (Base 2.0 §5.16.1.23).
pub const LID_DISCOVERY: u8 = 0x70;

/// Controller or Namespace Structure of an Identify command (Base 2.0 Figure 273).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Cns {
    Namespace = 0x00,
    Controller = 0x01,
    ActiveNamespaces = 0x02,
}

// Byte offsets inside an SQE (Base 2.0 Figure 88).
const OPC: usize = 0;
const FLAGS: usize = 1;
const CID: usize = 2;
const NSID: usize = 4;
const FCTYPE: usize = 4;
const DPTR: usize = 24;
const PRP2: usize = 32;
const CDW10: usize = 40;
const CDW11: usize = 44;
const CDW12: usize = 48;

/// PSDT (bits 7:6 of byte 1): 00b PRPs, 01b SGLs with MPTR as a buffer address.
const PSDT_MASK: u8 = 0xc0;
const PSDT_SGL: u8 = 0x40;

/// A 64-byte submission queue entry (Base 2.0 §4.2), kept in wire format.
#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(C, align(8))]
pub struct Sqe {
    raw: [u8; 64],
}

const _: () = assert!(size_of::<Sqe>() == 64);

impl std::fmt::Debug for Sqe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sqe")
            .field("opcode", &self.opcode())
            .field("cid", &self.cid())
            .field("nsid", &self.nsid())
            .field("cdw10", &self.cdw(10))
            .finish_non_exhaustive()
    }
}

/// A data pointer as an SGL descriptor (Base 2.0 §4.1.2), in the form NVMe/TCP uses
/// (NVMe/TCP 1.0 §3.3.3 "Data transfer").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sgl {
    /// Data Block descriptor, Offset subtype (identifier 01h): data in the command capsule at
    /// offset 0 (ICDOFF is 0 for NVMe/TCP).
    InCapsule { len: u32 },
    /// Transport SGL Data Block descriptor (identifier 5Ah): data moved by C2HData / R2T and
    /// H2CData PDUs. Length 0 for commands without data.
    Transport { len: u32 },
}

impl Sgl {
    /// SGL identifier byte: descriptor type in bits 7:4, subtype in bits 3:0 (Figure 117).
    const fn id(self) -> u8 {
        match self {
            Sgl::InCapsule { .. } => 0x01,
            Sgl::Transport { .. } => 0x5a,
        }
    }

    fn encode(self) -> [u8; 16] {
        let (Sgl::InCapsule { len } | Sgl::Transport { len }) = self;
        let mut d = [0; 16];
        // Address (bytes 7:0) is the offset 0, or unused.
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[15] = self.id();
        d
    }
}

impl Sqe {
    fn new(opcode: u8) -> Sqe {
        let mut raw = [0; 64];
        raw[OPC] = opcode;
        Sqe { raw }
    }

    fn fabrics(fctype: u8) -> Sqe {
        let mut s = Sqe::new(admin_opc::FABRICS);
        s.raw[FCTYPE] = fctype;
        // Fabrics commands always describe data with SGLs (Fabrics 1.1 §2.1).
        s.raw[FLAGS] = PSDT_SGL;
        s
    }

    fn put32(&mut self, off: usize, v: u32) {
        self.raw[off..off + 4].copy_from_slice(&v.to_le_bytes());
    }

    fn put64(&mut self, off: usize, v: u64) {
        self.raw[off..off + 8].copy_from_slice(&v.to_le_bytes());
    }

    fn get32(&self, off: usize) -> u32 {
        super::le32(&self.raw, off)
    }

    fn with_nsid(mut self, nsid: u32) -> Sqe {
        self.put32(NSID, nsid);
        self
    }

    /// The entry as it goes on the wire or into a submission queue.
    pub fn as_bytes(&self) -> &[u8; 64] {
        &self.raw
    }

    pub fn opcode(&self) -> u8 {
        self.raw[OPC]
    }

    /// Command identifier, unique among the commands outstanding on a queue.
    pub fn cid(&self) -> u16 {
        super::le16(&self.raw, CID)
    }

    pub fn set_cid(&mut self, cid: u16) {
        self.raw[CID..CID + 2].copy_from_slice(&cid.to_le_bytes());
    }

    pub fn nsid(&self) -> u32 {
        self.get32(NSID)
    }

    /// Command dword `n` (0..=15; 0 beyond).
    pub fn cdw(&self, n: usize) -> u32 {
        self.get32(n.saturating_mul(4))
    }

    /// Points DPTR at an SGL descriptor and sets PSDT to SGL.
    pub fn set_sgl(&mut self, sgl: Sgl) {
        self.raw[FLAGS] = (self.raw[FLAGS] & !PSDT_MASK) | PSDT_SGL;
        self.raw[DPTR..DPTR + 16].copy_from_slice(&sgl.encode());
    }

    /// Points DPTR at PRP entries (PCIe only) and sets PSDT to PRP.
    pub fn set_prp(&mut self, prp1: u64, prp2: u64) {
        self.raw[FLAGS] &= !PSDT_MASK;
        self.put64(DPTR, prp1);
        self.put64(PRP2, prp2);
    }

    fn rw(opcode: u8, nsid: u32, slba: u64, nlb: u16, fua: bool) -> Sqe {
        let mut s = Sqe::new(opcode).with_nsid(nsid);
        s.put64(CDW10, slba);
        s.put32(CDW12, u32::from(nlb) | (u32::from(fua) << 30));
        s
    }

    /// NVM Read (NVM Command Set 1.0 §3.3.4): `nlb` is the block count minus one.
    pub fn read(nsid: u32, slba: u64, nlb: u16, fua: bool) -> Sqe {
        Sqe::rw(io_opc::READ, nsid, slba, nlb, fua)
    }

    /// NVM Write (NVM Command Set 1.0 §3.3.6): `nlb` is the block count minus one.
    pub fn write(nsid: u32, slba: u64, nlb: u16, fua: bool) -> Sqe {
        Sqe::rw(io_opc::WRITE, nsid, slba, nlb, fua)
    }

    /// Flush (Base 2.0 §7.1).
    pub fn flush(nsid: u32) -> Sqe {
        Sqe::new(io_opc::FLUSH).with_nsid(nsid)
    }

    /// Dataset Management with the Deallocate attribute (NVM Command Set 1.0 §3.2.1) over
    /// `nr + 1` [`DsmRange`]s carried as data.
    pub fn dsm_deallocate(nsid: u32, nr: u8) -> Sqe {
        let mut s = Sqe::new(io_opc::DSM).with_nsid(nsid);
        s.put32(CDW10, u32::from(nr));
        s.put32(CDW11, 1 << 2);
        s
    }

    /// Write Zeroes (NVM Command Set 1.0 §3.2.8); `deac` lets the controller deallocate.
    pub fn write_zeroes(nsid: u32, slba: u64, nlb: u16, deac: bool) -> Sqe {
        let mut s = Sqe::new(io_opc::WRITE_ZEROES).with_nsid(nsid);
        s.put64(CDW10, slba);
        s.put32(CDW12, u32::from(nlb) | (u32::from(deac) << 25));
        s
    }

    /// Identify (Base 2.0 §5.17): 4096 bytes of data. For [`Cns::ActiveNamespaces`] the list
    /// starts after `nsid`.
    pub fn identify(cns: Cns, nsid: u32) -> Sqe {
        let mut s = Sqe::new(admin_opc::IDENTIFY).with_nsid(nsid);
        s.put32(CDW10, cns as u32);
        s
    }

    /// Set Features, Number of Queues (Base 2.0 §5.27.1.5): counts are 0-based.
    pub fn set_num_queues(nsqr: u16, ncqr: u16) -> Sqe {
        let mut s = Sqe::new(admin_opc::SET_FEATURES);
        s.put32(CDW10, u32::from(FID_NUMBER_OF_QUEUES));
        s.put32(CDW11, u32::from(nsqr) | (u32::from(ncqr) << 16));
        s
    }

    /// Create I/O Completion Queue (Base 2.0 §5.4), physically contiguous (PC = 1). With
    /// `Some(iv)` interrupts are enabled (IEN = 1) on MSI-X vector `iv`; with `None` they are
    /// not (IEN = 0) and the host polls the queue. `entries` is the queue size (1-based here,
    /// as the other builders take counts; CDW10 holds it 0-based). The queue's address goes
    /// in PRP1.
    pub fn create_io_cq(qid: u16, entries: u16, iv: Option<u16>) -> Sqe {
        let mut s = Sqe::new(admin_opc::CREATE_IO_CQ);
        s.put32(
            CDW10,
            u32::from(qid) | (u32::from(entries.saturating_sub(1)) << 16),
        );
        let irq = iv.map_or(0, |iv| (1 << 1) | (u32::from(iv) << 16));
        s.put32(CDW11, 1 | irq);
        s
    }

    /// Create I/O Submission Queue (Base 2.0 §5.5), physically contiguous (PC = 1), completing
    /// into CQ `cqid`, priority urgent (ignored under round robin). The address goes in PRP1.
    pub fn create_io_sq(qid: u16, entries: u16, cqid: u16) -> Sqe {
        let mut s = Sqe::new(admin_opc::CREATE_IO_SQ);
        s.put32(
            CDW10,
            u32::from(qid) | (u32::from(entries.saturating_sub(1)) << 16),
        );
        s.put32(CDW11, 1 | (u32::from(cqid) << 16));
        s
    }

    /// Delete I/O Submission Queue (Base 2.0 §5.7).
    pub fn delete_io_sq(qid: u16) -> Sqe {
        let mut s = Sqe::new(admin_opc::DELETE_IO_SQ);
        s.put32(CDW10, u32::from(qid));
        s
    }

    /// Delete I/O Completion Queue (Base 2.0 §5.6); its submission queues go first.
    pub fn delete_io_cq(qid: u16) -> Sqe {
        let mut s = Sqe::new(admin_opc::DELETE_IO_CQ);
        s.put32(CDW10, u32::from(qid));
        s
    }

    /// Get Features of the current value (Base 2.0 §5.15).
    pub fn get_features(fid: u8) -> Sqe {
        let mut s = Sqe::new(admin_opc::GET_FEATURES);
        s.put32(CDW10, u32::from(fid));
        s
    }

    /// Set Features, Asynchronous Event Configuration (Base 2.0 §5.27.1.7): `aec` is CDW11,
    /// one bit per kind of event the controller may report.
    pub fn set_async_event_config(aec: u32) -> Sqe {
        let mut s = Sqe::new(admin_opc::SET_FEATURES);
        s.put32(CDW10, u32::from(FID_ASYNC_EVENT_CONFIG));
        s.put32(CDW11, aec);
        s
    }

    /// Asynchronous Event Request (Base 2.0 §5.2): no data, no time limit; it completes when
    /// the controller has an event to report.
    pub fn async_event_request() -> Sqe {
        Sqe::new(admin_opc::ASYNC_EVENT_REQUEST)
    }

    /// Get Log Page, Changed Namespace List (Base 2.0 §5.16.1.5): the whole 4096-byte list,
    /// for every namespace, Retain Asynchronous Event clear, so that reading it also clears
    /// the event that pointed to it.
    pub fn changed_namespaces_log() -> Sqe {
        Sqe::get_log_page(LID_CHANGED_NAMESPACES, 1023, 0).with_nsid(u32::MAX)
    }

    /// Keep Alive (Base 2.0 §5.25).
    pub fn keep_alive() -> Sqe {
        Sqe::new(admin_opc::KEEP_ALIVE)
    }

    /// Abort command `cid` on submission queue `sqid` (Base 2.0 §5.1).
    pub fn abort(sqid: u16, cid: u16) -> Sqe {
        let mut s = Sqe::new(admin_opc::ABORT);
        s.put32(CDW10, u32::from(sqid) | (u32::from(cid) << 16));
        s
    }

    /// Get Log Page (Base 2.0 §5.16): `numd` is the dword count minus one, split into NUMDL
    /// (CDW10 31:16) and NUMDU (CDW11 15:0); `offset` in bytes, dword aligned.
    pub fn get_log_page(lid: u8, numd: u32, offset: u64) -> Sqe {
        let mut s = Sqe::new(admin_opc::GET_LOG_PAGE);
        s.put32(CDW10, u32::from(lid) | ((numd & 0xffff) << 16));
        s.put32(CDW11, numd >> 16);
        s.put64(CDW12, offset);
        s
    }

    /// Fabrics Connect (Fabrics 1.1 §3.3): `sqsize` is 0-based, `kato_ms` 0 disables the keep
    /// alive timer. The 1024-byte [`super::ConnectData`] goes as data.
    pub fn connect(qid: u16, sqsize: u16, cattr: u8, kato_ms: u32) -> Sqe {
        let mut s = Sqe::fabrics(fabrics_type::CONNECT);
        // RECFMT (bytes 41:40) is 0.
        s.raw[42..44].copy_from_slice(&qid.to_le_bytes());
        s.raw[44..46].copy_from_slice(&sqsize.to_le_bytes());
        s.raw[46] = cattr;
        s.put32(48, kato_ms);
        s
    }

    /// Fabrics Property Get (Fabrics 1.1 §3.4); the value comes back in CQE DW0 and DW1.
    pub fn property_get(prop: Property) -> Sqe {
        let mut s = Sqe::fabrics(fabrics_type::PROPERTY_GET);
        s.raw[CDW10] = prop.size() as u8;
        s.put32(CDW11, prop.offset());
        s
    }

    /// Fabrics Property Set (Fabrics 1.1 §3.5).
    pub fn property_set(prop: Property, value: u64) -> Sqe {
        let mut s = Sqe::fabrics(fabrics_type::PROPERTY_SET);
        s.raw[CDW10] = prop.size() as u8;
        s.put32(CDW11, prop.offset());
        s.put64(CDW12, value);
        s
    }
}

/// One Dataset Management range (NVM Command Set 1.0 Figure 39).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DsmRange {
    pub context_attributes: u32,
    /// Length in logical blocks (1-based, unlike the NLB of reads and writes).
    pub nlb: u32,
    pub slba: u64,
}

impl DsmRange {
    pub const LEN: usize = 16;

    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut b = [0; Self::LEN];
        b[0..4].copy_from_slice(&self.context_attributes.to_le_bytes());
        b[4..8].copy_from_slice(&self.nlb.to_le_bytes());
        b[8..16].copy_from_slice(&self.slba.to_le_bytes());
        b
    }
}
