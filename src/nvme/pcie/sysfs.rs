//! What sysfs says about a PCI function before VFIO is asked for it: that it exists, is an
//! NVMe controller, is bound to vfio-pci, and has a viable IOMMU group. Every function takes
//! the devices directory (`/sys/bus/pci/devices` on a running system) as a parameter, so the
//! error messages are tested against fixture directories.

use std::fs;
use std::path::{Path, PathBuf};

use super::error::PcieError;

/// Where the kernel lists PCI functions.
pub const PCI_DEVICES: &str = "/sys/bus/pci/devices";
/// PCI class code of an NVMe controller: mass storage, non-volatile memory, NVM Express.
pub const NVME_CLASS: u32 = 0x01_08_02;
/// The driver a controller must be bound to.
pub const VFIO_PCI: &str = "vfio-pci";

/// Drivers that leave an IOMMU group viable for VFIO (besides vfio-pci itself): pci-stub holds
/// a device without using it, pcieport drives bridges, which do no DMA of their own.
const HARMLESS: [&str; 3] = [VFIO_PCI, "pci-stub", "pcieport"];

/// `BDF` with its PCI domain (`01:00.0` → `0000:01:00.0`), checked for the
/// `DDDD:BB:DD.F` form.
pub fn normalize_bdf(s: &str) -> Result<String, PcieError> {
    let bad = || PcieError::BadBdf(s.to_owned());
    let full = if s.matches(':').count() == 1 {
        format!("0000:{s}")
    } else {
        s.to_owned()
    };
    let (rest, function) = full.rsplit_once('.').ok_or_else(bad)?;
    let parts: Vec<&str> = rest.split(':').collect();
    let hex = |p: &str, n: usize| p.len() == n && p.chars().all(|c| c.is_ascii_hexdigit());
    let ok = matches!(parts.as_slice(), [d, b, s] if hex(d, 4) && hex(b, 2) && hex(s, 2))
        && function.len() == 1
        && matches!(function.as_bytes()[0], b'0'..=b'7');
    if ok {
        Ok(full.to_ascii_lowercase())
    } else {
        Err(bad())
    }
}

/// The name of the driver bound to the device in `dir`, if any.
pub fn driver_of(dir: &Path) -> Option<String> {
    let link = fs::read_link(dir.join("driver")).ok()?;
    Some(link.file_name()?.to_string_lossy().into_owned())
}

/// The PCI class code of the device in `dir` (`0x010802` in its `class` file).
pub fn class_of(dir: &Path) -> Option<u32> {
    let s = fs::read_to_string(dir.join("class")).ok()?;
    u32::from_str_radix(s.trim().trim_start_matches("0x"), 16).ok()
}

/// The IOMMU group number of the device in `dir`.
pub fn group_of(dir: &Path) -> Option<u32> {
    let link = fs::read_link(dir.join("iommu_group")).ok()?;
    link.file_name()?.to_str()?.parse().ok()
}

/// The other devices of `dir`'s IOMMU group that keep it from being viable: bound to a driver
/// that is not vfio-pci, pci-stub or pcieport, and not a bridge. As `(BDF, driver)`.
pub fn group_blockers(dir: &Path) -> Vec<(String, String)> {
    let me = dir.file_name();
    let Ok(entries) = fs::read_dir(dir.join("iommu_group").join("devices")) else {
        return Vec::new();
    };
    let mut out: Vec<(String, String)> = entries
        .filter_map(Result::ok)
        .filter(|e| Some(e.file_name().as_os_str()) != me)
        .filter_map(|e| {
            let path = e.path();
            let driver = driver_of(&path)?;
            let bridge = class_of(&path).is_some_and(|c| c >> 8 == 0x0604);
            (!HARMLESS.contains(&driver.as_str()) && !bridge)
                .then(|| (e.file_name().to_string_lossy().into_owned(), driver))
        })
        .collect();
    out.sort();
    out
}

/// A PCI function ready for VFIO, as sysfs describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VfioCandidate {
    pub bdf: String,
    /// Its directory under the devices directory.
    pub dir: PathBuf,
    pub group: u32,
}

/// Checks, in this order, that `bdf` exists under `devices`, is an NVMe controller, has an
/// IOMMU group, is bound to vfio-pci, and that the group is viable.
pub fn check(devices: &Path, bdf: &str) -> Result<VfioCandidate, PcieError> {
    let bdf = normalize_bdf(bdf)?;
    let dir = devices.join(&bdf);
    if !dir.is_dir() {
        return Err(PcieError::NotFound(bdf));
    }
    match class_of(&dir) {
        Some(NVME_CLASS) => {}
        class => {
            return Err(PcieError::NotNvme {
                bdf,
                class: class.unwrap_or(0),
            });
        }
    }
    // The group first: without an IOMMU vfio-pci cannot take the device (its probe fails and
    // leaves it unbound), so "not bound to vfio-pci" would hide the cause.
    let group = group_of(&dir).ok_or_else(|| PcieError::NoIommuGroup(bdf.clone()))?;
    let driver = driver_of(&dir);
    if driver.as_deref() != Some(VFIO_PCI) {
        return Err(PcieError::NotBoundToVfio { bdf, driver });
    }
    let blockers = group_blockers(&dir);
    if !blockers.is_empty() {
        return Err(PcieError::GroupNotViable {
            bdf,
            group,
            blockers,
        });
    }
    Ok(VfioCandidate { bdf, dir, group })
}

/// The NVMe controllers under `devices` bound to vfio-pci, in address order.
pub fn vfio_nvme_devices(devices: &Path) -> Vec<String> {
    let Ok(entries) = fs::read_dir(devices) else {
        return Vec::new();
    };
    let mut out: Vec<String> = entries
        .filter_map(Result::ok)
        .filter(|e| {
            let p = e.path();
            class_of(&p) == Some(NVME_CLASS) && driver_of(&p).as_deref() == Some(VFIO_PCI)
        })
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    out.sort();
    out
}

#[cfg(test)]
mod tests;
