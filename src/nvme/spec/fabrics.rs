//! Fabrics Connect data (NVMe over Fabrics 1.1 §3.3).

use uuid::Uuid;

use super::nqn::Nqn;

/// Length of the data of a Connect command (Fabrics 1.1 Figure 20).
pub const CONNECT_DATA_LEN: usize = 1024;
/// CNTLID asking the subsystem to allocate any controller (dynamic controller model).
pub const CNTLID_DYNAMIC: u16 = 0xffff;

/// The data of a Connect command (Fabrics 1.1 Figure 20).
#[derive(Clone, Copy, Debug)]
pub struct ConnectData<'a> {
    pub hostid: &'a Uuid,
    /// [`CNTLID_DYNAMIC`] on the admin queue; the controller's CNTLID on I/O queues.
    pub cntlid: u16,
    pub subnqn: &'a Nqn,
    pub hostnqn: &'a Nqn,
}

impl ConnectData<'_> {
    pub fn encode(&self) -> [u8; CONNECT_DATA_LEN] {
        let mut b = [0; CONNECT_DATA_LEN];
        b[0..16].copy_from_slice(self.hostid.as_bytes());
        b[16..18].copy_from_slice(&self.cntlid.to_le_bytes());
        // NQNs are NUL-padded 256-byte fields; `Nqn` guarantees at most 223 bytes, so the
        // terminating NUL is always there.
        put_nqn(&mut b[256..512], self.subnqn);
        put_nqn(&mut b[512..768], self.hostnqn);
        b
    }
}

fn put_nqn(field: &mut [u8], nqn: &Nqn) {
    let s = nqn.as_str().as_bytes();
    let n = s.len().min(field.len().saturating_sub(1));
    field[..n].copy_from_slice(&s[..n]);
}
