use std::os::unix::fs::symlink;

use super::*;

/// A fake sysfs: `devices/BDF` with `class`, a `driver` link and an `iommu_group` link into
/// `groups/N`, whose `devices` directory links back to its members, as the kernel lays it out.
struct Sysfs {
    dir: tempfile::TempDir,
}

impl Sysfs {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        for d in ["devices", "drivers", "groups"] {
            fs::create_dir(dir.path().join(d)).expect("mkdir");
        }
        Self { dir }
    }

    fn devices(&self) -> PathBuf {
        self.dir.path().join("devices")
    }

    fn add(&self, bdf: &str, class: u32, driver: Option<&str>, group: Option<u32>) {
        let dev = self.devices().join(bdf);
        fs::create_dir(&dev).expect("mkdir device");
        fs::write(dev.join("class"), format!("{class:#08x}\n")).expect("class");
        if let Some(d) = driver {
            let drv = self.dir.path().join("drivers").join(d);
            fs::create_dir_all(&drv).expect("mkdir driver");
            symlink(&drv, dev.join("driver")).expect("driver link");
        }
        if let Some(g) = group {
            let gdir = self.dir.path().join("groups").join(g.to_string());
            fs::create_dir_all(gdir.join("devices")).expect("mkdir group");
            symlink(&gdir, dev.join("iommu_group")).expect("group link");
            symlink(&dev, gdir.join("devices").join(bdf)).expect("member link");
        }
    }
}

#[test]
fn addresses_get_their_domain_and_garbage_is_refused() {
    assert_eq!(normalize_bdf("01:00.0").expect("short"), "0000:01:00.0");
    assert_eq!(normalize_bdf("0000:AB:1f.7").expect("full"), "0000:ab:1f.7");
    for bad in [
        "",
        "01:00",
        "1:00.0",
        "0000:01:00.8",
        "x000:01:00.0",
        "0000:01:00.0.1",
    ] {
        let e = normalize_bdf(bad).expect_err(bad);
        assert_eq!(
            e.to_string(),
            format!("{bad:?} is not a PCI address such as 0000:01:00.0")
        );
    }
}

#[test]
fn a_ready_controller_passes_with_its_group() {
    let s = Sysfs::new();
    s.add("0000:00:04.0", NVME_CLASS, Some("vfio-pci"), Some(3));
    // A bridge and a pci-stub device in the group do not matter.
    s.add("0000:00:1c.0", 0x060400, Some("pcieport"), Some(3));
    s.add("0000:00:05.0", 0x020000, Some("pci-stub"), Some(3));
    let c = check(&s.devices(), "00:04.0").expect("ready");
    assert_eq!((c.bdf.as_str(), c.group), ("0000:00:04.0", 3));
    assert_eq!(vfio_nvme_devices(&s.devices()), ["0000:00:04.0"]);
}

#[test]
fn a_missing_device_or_another_class_is_named() {
    let s = Sysfs::new();
    s.add("0000:00:02.0", 0x030000, Some("bochs-drm"), Some(1));
    let e = check(&s.devices(), "0000:00:09.0").expect_err("missing");
    assert_eq!(e.to_string(), "no PCI device 0000:00:09.0");
    let e = check(&s.devices(), "0000:00:02.0").expect_err("a display");
    assert_eq!(
        e.to_string(),
        "0000:00:02.0 has PCI class 0x030000, not an NVMe controller (0x010802)"
    );
}

#[test]
fn a_controller_on_another_driver_says_which_and_how_to_bind_it() {
    let s = Sysfs::new();
    s.add("0000:00:04.0", NVME_CLASS, Some("nvme"), Some(3));
    s.add("0000:00:05.0", NVME_CLASS, None, Some(4));
    let e = check(&s.devices(), "0000:00:04.0").expect_err("on nvme");
    let msg = e.to_string();
    assert!(
        msg.starts_with("0000:00:04.0 is bound to nvme, not vfio-pci: bind it with"),
        "{msg}"
    );
    assert!(
        msg.contains("driverctl set-override 0000:00:04.0 vfio-pci"),
        "{msg}"
    );
    assert!(!msg.contains('\n'), "one line: {msg}");
    let e = check(&s.devices(), "0000:00:05.0").expect_err("unbound");
    assert!(
        e.to_string()
            .starts_with("0000:00:05.0 is bound to no driver, not vfio-pci"),
        "{e}"
    );
    assert!(vfio_nvme_devices(&s.devices()).is_empty());
}

#[test]
fn no_iommu_group_means_no_iommu_whatever_the_driver() {
    let s = Sysfs::new();
    // Without an IOMMU vfio-pci's probe fails and leaves the device unbound; or it stays
    // with nvme. Either way the cause is the IOMMU, not the binding.
    s.add("0000:00:04.0", NVME_CLASS, Some("vfio-pci"), None);
    s.add("0000:00:05.0", NVME_CLASS, None, None);
    s.add("0000:00:06.0", NVME_CLASS, Some("nvme"), None);
    for bdf in ["0000:00:04.0", "0000:00:05.0", "0000:00:06.0"] {
        let e = check(&s.devices(), bdf).expect_err("no group");
        assert_eq!(
            e.to_string(),
            format!("{bdf} has no IOMMU group: turn the IOMMU on (intel_iommu=on or amd_iommu=on)")
        );
    }
}

#[test]
fn a_group_shared_with_host_drivers_lists_them() {
    let s = Sysfs::new();
    s.add("0000:01:00.0", NVME_CLASS, Some("vfio-pci"), Some(7));
    s.add("0000:01:00.1", 0x020000, Some("e1000e"), Some(7));
    s.add("0000:01:00.2", 0x0c0330, Some("xhci_hcd"), Some(7));
    s.add("0000:01:00.3", 0x010802, None, Some(7));
    let e = check(&s.devices(), "0000:01:00.0").expect_err("not viable");
    assert_eq!(
        e.to_string(),
        "IOMMU group 7 of 0000:01:00.0 is not viable: 0000:01:00.1 (e1000e), \
         0000:01:00.2 (xhci_hcd) still bound to host drivers (bind them to vfio-pci too, or \
         unbind them)"
    );
}

#[test]
fn only_nvme_controllers_on_vfio_pci_are_listed_in_order() {
    let s = Sysfs::new();
    s.add("0000:00:05.0", NVME_CLASS, Some("vfio-pci"), Some(5));
    s.add("0000:00:04.0", NVME_CLASS, Some("vfio-pci"), Some(4));
    s.add("0000:00:03.0", NVME_CLASS, Some("nvme"), Some(3));
    s.add("0000:00:06.0", 0x020000, Some("vfio-pci"), Some(6));
    assert_eq!(
        vfio_nvme_devices(&s.devices()),
        ["0000:00:04.0", "0000:00:05.0"]
    );
    assert!(vfio_nvme_devices(&s.dir.path().join("nowhere")).is_empty());
}
