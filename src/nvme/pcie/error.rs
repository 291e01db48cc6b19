//! Why the PCIe driver could not open, bring up or use a controller: one line per case the
//! user can fix (binding, IOMMU group, permissions, modules), then the controller's faults.

use std::fmt;
use std::path::PathBuf;

use thiserror::Error;
use vfio_ioctls::VfioError;

use super::queue::QueueError;
use crate::nvme::spec::{SpecError, Status};

/// Most entries named in a list inside an error message.
const SHOWN: usize = 16;

/// A list of namespace identifiers in an error message.
#[derive(Debug)]
pub struct NsList<'a>(pub &'a [u32]);

impl fmt::Display for NsList<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("no active namespace");
        }
        f.write_str("active namespaces: ")?;
        for (i, id) in self.0.iter().take(SHOWN).enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{id}")?;
        }
        if self.0.len() > SHOWN {
            write!(f, ", ... ({} in all)", self.0.len())?;
        }
        Ok(())
    }
}

/// The devices of an IOMMU group that keep it from being viable: `BDF (driver)`.
#[derive(Debug)]
pub struct Blockers<'a>(pub &'a [(String, String)]);

impl fmt::Display for Blockers<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (bdf, driver)) in self.0.iter().take(SHOWN).enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{bdf} ({driver})")?;
        }
        if self.0.len() > SHOWN {
            write!(f, ", ... ({} in all)", self.0.len())?;
        }
        Ok(())
    }
}

fn driver_name(d: &Option<String>) -> &str {
    d.as_deref().unwrap_or("no driver")
}

/// Why a controller could not be opened, brought up or used.
#[derive(Debug, Error)]
pub enum PcieError {
    #[error("{0:?} is not a PCI address such as 0000:01:00.0")]
    BadBdf(String),
    #[error("no PCI device {0}")]
    NotFound(String),
    #[error("{bdf} has PCI class {class:#08x}, not an NVMe controller (0x010802)")]
    NotNvme { bdf: String, class: u32 },
    #[error(
        "{bdf} is bound to {}, not vfio-pci: bind it with `driverctl set-override {bdf} vfio-pci`, or write vfio-pci to /sys/bus/pci/devices/{bdf}/driver_override, unbind it and write {bdf} to /sys/bus/pci/drivers_probe",
        driver_name(.driver)
    )]
    NotBoundToVfio { bdf: String, driver: Option<String> },
    #[error("{0} has no IOMMU group: turn the IOMMU on (intel_iommu=on or amd_iommu=on)")]
    NoIommuGroup(String),
    #[error(
        "IOMMU group {group} of {bdf} is not viable: {} still bound to host drivers (bind them to vfio-pci too, or unbind them)",
        Blockers(.blockers)
    )]
    GroupNotViable {
        bdf: String,
        group: u32,
        blockers: Vec<(String, String)>,
    },
    #[error("no VFIO: /dev/vfio/vfio is missing (modprobe vfio-pci vfio_iommu_type1)")]
    NoVfio,
    #[error("no type1 IOMMU for VFIO: modprobe vfio_iommu_type1, and check that an IOMMU is on")]
    NoType1,
    #[error(
        "no permission on {}: run as root, or give this user the device and a RLIMIT_MEMLOCK that covers the memory it maps",
        .0.display()
    )]
    Permission(PathBuf),
    #[error("{bdf}: VFIO group {group} is in use by another process")]
    Busy { bdf: String, group: u32 },
    #[error("VFIO: {what}")]
    Vfio {
        what: &'static str,
        #[source]
        source: VfioError,
    },
    #[error("{what}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{bdf}: BAR0 of {size} bytes is too small for the NVMe registers")]
    Bar0 { bdf: String, size: u64 },
    #[error("{0}: registers read as all ones (device removed, or memory decoding off)")]
    Removed(String),
    #[error("controller {0} reports a fatal status (CSTS.CFS)")]
    Fatal(String),
    #[error("controller {bdf} not {} after {waited_ms} ms", if *.ready { "ready" } else { "disabled" })]
    NotReady {
        bdf: String,
        ready: bool,
        waited_ms: u128,
    },
    #[error("controller {bdf} does not support the NVM command set (CAP.CSS)")]
    NoNvmCommandSet { bdf: String },
    #[error(
        "controller {bdf} needs memory pages of at least {min} bytes, larger than the host's {host}"
    )]
    PageSize {
        bdf: String,
        min: usize,
        host: usize,
    },
    #[error("{what}: no completion within {waited_ms} ms")]
    AdminTimeout { what: &'static str, waited_ms: u128 },
    #[error("{what} failed: {status}")]
    Command { what: &'static str, status: Status },
    #[error("malformed {what}")]
    Malformed {
        what: &'static str,
        #[source]
        source: SpecError,
    },
    #[error("namespace {nsid} not found on {bdf} ({})", NsList(.active))]
    NamespaceNotFound {
        nsid: u32,
        bdf: String,
        active: Vec<u32>,
    },
    #[error("all {granted} I/O queues the controller granted are in use")]
    NoQueueId { granted: u16 },
    #[error("I/O queue depth {depth}: the controller allows 1..={max}")]
    QueueDepth { depth: u16, max: u32 },
    #[error("I/O queue {qid}")]
    Queue {
        qid: u16,
        #[source]
        source: QueueError,
    },
    #[error("I/O queue {qid} was lost in a controller reset: create a new one")]
    QueueLost { qid: u16 },
    #[error("DMA memory at {addr:#x} of {len} bytes is not page aligned")]
    DmaAlign { addr: u64, len: usize },
    #[error("cannot DMA-map {len} bytes at {addr:#x}")]
    DmaMap {
        addr: u64,
        len: usize,
        #[source]
        source: VfioError,
    },
    #[error("cannot DMA-unmap {len} bytes at {addr:#x}")]
    DmaUnmap {
        addr: u64,
        len: usize,
        #[source]
        source: VfioError,
    },
    #[error("cannot allocate {len} bytes of DMA memory")]
    Alloc {
        len: usize,
        #[source]
        source: std::io::Error,
    },
}

impl PcieError {
    /// Whether resetting the controller and trying again may help: the controller failed, was
    /// slow, broke the queue protocol or answered with a retryable status. Configuration
    /// (binding, group, permissions, modules, a missing namespace) and a removed device are
    /// permanent.
    pub fn is_retryable(&self) -> bool {
        match self {
            PcieError::Fatal(_)
            | PcieError::NotReady { .. }
            | PcieError::AdminTimeout { .. }
            | PcieError::Queue { .. }
            | PcieError::QueueLost { .. } => true,
            PcieError::Command { status, .. } => status.is_retryable(),
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespace_and_blocker_lists_are_bounded() {
        let many: Vec<u32> = (1..=20).collect();
        let s = NsList(&many).to_string();
        assert!(s.starts_with("active namespaces: 1, 2,"), "{s}");
        assert!(s.ends_with("16, ... (20 in all)"), "{s}");
        assert_eq!(NsList(&[]).to_string(), "no active namespace");
        let b = [
            ("0000:00:02.0".to_owned(), "e1000e".to_owned()),
            ("0000:00:02.1".to_owned(), "snd_hda_intel".to_owned()),
        ];
        assert_eq!(
            Blockers(&b).to_string(),
            "0000:00:02.0 (e1000e), 0000:00:02.1 (snd_hda_intel)"
        );
    }

    #[test]
    fn configuration_errors_are_not_retryable_and_controller_faults_are() {
        assert!(!PcieError::NoVfio.is_retryable());
        assert!(!PcieError::Removed("0000:00:04.0".into()).is_retryable());
        assert!(
            !PcieError::NamespaceNotFound {
                nsid: 2,
                bdf: "0000:00:04.0".into(),
                active: vec![1],
            }
            .is_retryable()
        );
        assert!(PcieError::Fatal("0000:00:04.0".into()).is_retryable());
        assert!(
            PcieError::AdminTimeout {
                what: "Identify",
                waited_ms: 10
            }
            .is_retryable()
        );
    }
}
