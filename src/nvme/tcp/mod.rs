//! The NVMe/TCP transport (NVMe/TCP Transport Specification 1.0).
//!
//! [`pdu`] is the pure codec: PDU encoders that write into caller buffers, CRC32C digests, and
//! a receive state machine that never touches payload bytes, so they can go straight from the
//! socket into the command's own buffers.
//!
//! The data path is non-blocking, one queue per poller:
//! - [`queue`]: [`queue::IoQueue`], an I/O queue on a non-blocking connection: batched sends
//!   with iovecs into the commands' buffers, payload received straight into them.
//!
//! The control path is blocking:
//! - [`sync`]: [`sync::SyncConn`], one connection driven one command at a time, every wait
//!   bounded; it establishes queues and carries admin commands.
//! - [`ctrl`]: controller bring-up ([`ctrl::Controller`]), I/O queue connections handed to the
//!   data path ([`ctrl::IoQueueConn`]), discovery ([`ctrl::discover`]), and [`ctrl::CtrlError`]
//!   with its retryable / permanent split.
//! - [`host`]: the host NQN and Host Identifier ([`host::HostId`]), as nvme-cli resolves them.

pub mod ctrl;
pub mod host;
pub mod pdu;
pub mod queue;
pub mod sync;
