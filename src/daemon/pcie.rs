//! `vubd nvme list`: the NVMe controllers bound to vfio-pci, opened with the user-space PCIe
//! driver, and their active namespaces.

use std::io::Write;
use std::path::Path;

use crate::config::NvmeListConfig;
use crate::nvme::pcie::sysfs::{PCI_DEVICES, vfio_nvme_devices};
use crate::nvme::pcie::{PcieController, PcieOptions, SglAlign};
use crate::units::human_bytes;

/// Prints controller `bdf` and its namespaces, or why it cannot be used.
fn list_one(bdf: &str, opts: &PcieOptions, out: &mut impl Write) -> std::io::Result<bool> {
    let ctrl = match PcieController::open(bdf, opts) {
        Ok(c) => c,
        Err(e) => {
            writeln!(out, "{bdf} error: {}", super::error_chain(&e))?;
            return Ok(false);
        }
    };
    let id = ctrl.identify();
    let sgl = match ctrl.sgl_align() {
        Some(SglAlign::Byte) => "byte",
        Some(SglAlign::Dword) => "dword",
        None => "none",
    };
    writeln!(
        out,
        "{bdf} model={:?} serial={:?} firmware={:?} version={} io_queues={} max_transfer={} sgl={sgl}",
        id.mn,
        id.sn,
        id.fr,
        id.ver,
        ctrl.io_queues_granted(),
        ctrl.max_transfer_bytes().unwrap_or(0),
    )?;
    let active = match ctrl.active_namespaces() {
        Ok(a) => a,
        Err(e) => {
            writeln!(out, "  error: {}", super::error_chain(&e))?;
            return Ok(false);
        }
    };
    if active.is_empty() {
        writeln!(out, "  no active namespace")?;
    }
    let mut ok = true;
    for nsid in active {
        match ctrl.namespace(nsid) {
            Ok(ns) => {
                let block = u64::from(ns.block_size());
                let size = ns.nsze.saturating_mul(block);
                writeln!(
                    out,
                    "  nsid={nsid} size={size} ({}) blocks={} block_size={block} lbaf={} metadata={} deallocated_reads={} write_zeroes_deallocates={}",
                    human_bytes(size),
                    ns.nsze,
                    ns.format_index(),
                    ns.lba_format().ms,
                    ns.deallocated_read().as_str(),
                    ns.write_zeroes_deallocates(),
                )?;
            }
            Err(e) => {
                ok = false;
                writeln!(out, "  nsid={nsid} error: {}", super::error_chain(&e))?;
            }
        }
    }
    Ok(ok)
}

/// Lists the controllers under `devices` (or `cfg.bdf` alone) on `out`; false when one could
/// not be opened or read.
fn list_at(devices: &Path, cfg: &NvmeListConfig, out: &mut impl Write) -> std::io::Result<bool> {
    // Listing runs admin commands only: no interrupts.
    let opts = PcieOptions {
        io_timeout: cfg.io_timeout,
        interrupts: false,
        ..PcieOptions::default()
    };
    let bdfs = match &cfg.bdf {
        Some(b) => vec![b.clone()],
        None => vfio_nvme_devices(devices),
    };
    if bdfs.is_empty() {
        writeln!(out, "no NVMe controller is bound to vfio-pci")?;
        return Ok(true);
    }
    let mut ok = true;
    for bdf in &bdfs {
        ok &= list_one(bdf, &opts, out)?;
    }
    Ok(ok)
}

/// `vubd nvme list`: true when every controller listed could be opened and read.
pub fn nvme_list(cfg: &NvmeListConfig) -> bool {
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    list_at(Path::new(PCI_DEVICES), cfg, &mut out).unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn an_empty_machine_says_so_and_a_missing_device_says_why() {
        let dir = tempfile::tempdir().expect("temp dir");
        let cfg = NvmeListConfig {
            bdf: None,
            io_timeout: Duration::from_secs(1),
        };
        let mut out = Vec::new();
        assert!(list_at(dir.path(), &cfg, &mut out).expect("write"));
        assert_eq!(
            String::from_utf8_lossy(&out),
            "no NVMe controller is bound to vfio-pci\n"
        );
        // `--bdf` looks at the real sysfs: an address no machine has.
        let cfg = NvmeListConfig {
            bdf: Some("ffff:ff:1f.7".into()),
            ..cfg
        };
        let mut out = Vec::new();
        assert!(!list_at(dir.path(), &cfg, &mut out).expect("write"));
        assert_eq!(
            String::from_utf8_lossy(&out),
            "ffff:ff:1f.7 error: no PCI device ffff:ff:1f.7\n"
        );
    }
}
