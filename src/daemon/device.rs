//! The devices of the configuration: their disks (devices on namespaces of one NVMe PCIe
//! controller share the opened controller), the check that such a controller has an I/O queue
//! pair for every poller that will serve it, and each device's guest-visible model.

use std::collections::{BTreeSet, HashMap};
use std::fmt::Write as _;
use std::fs::OpenOptions;
use std::io;
use std::path::Path;
use std::sync::Arc;

use tracing::info;

use super::{DaemonError, nvme};
use crate::bdev::file::{FileDevice, FileOptions};
use crate::bdev::null::NullDevice;
use crate::bdev::nvme_pcie::{Controllers, NvmePcieConfig, NvmePcieDevice};
use crate::bdev::nvme_tcp::NvmeTcpDevice;
use crate::bdev::{DeviceInfo, Disk};
use crate::config::{Config, DEFAULT_QUEUES, DeviceConfig, DiskSpec, SocketSpec};
use crate::mem::fault::DeviceFaults;
use crate::poller::DeviceShared;
use crate::vhost_user::BlkShape;
use crate::virtio_blk::config::WriteCache;
use crate::virtio_blk::request::Limits;
use crate::virtio_blk::{BlkConfig, DeviceFeatures, ID_BYTES, MAX_SEGMENTS, SECTOR_SHIFT};

/// Largest data segment a driver may use, bytes (`size_max`).
const SIZE_MAX: u32 = 4 << 20;
/// Largest discard / write-zeroes segment, sectors.
const MAX_RANGE_SECTORS: u32 = 1 << 22;

/// An error of the device `d`: named by its `--device` argument when it has one.
pub(super) fn in_device(d: &DeviceConfig, e: DaemonError) -> DaemonError {
    match &d.arg {
        Some(arg) => DaemonError::Device {
            arg: arg.clone(),
            source: Box::new(e),
        },
        None => e,
    }
}

/// The first poller of each device: device `d`'s queue `q` goes to poller
/// `(first[d] + q) mod pollers`, so that the devices' queues spread over the pollers.
pub(super) fn first_pollers(cfg: &Config) -> Vec<usize> {
    let pollers = cfg.pollers.len();
    cfg.devices
        .iter()
        .scan(0usize, |next, d| {
            let first = *next;
            *next = next_first_poller(first, d.num_queues, pollers);
            Some(first)
        })
        .collect()
}

/// The first poller of the device after one whose `queues` queues start on poller `first`,
/// of `pollers`: the one after its last queue's; or, when its queues go round every poller,
/// the one after its first. A frontend starts a device's first queues (one per vCPU of a
/// QEMU guest), so each device's queue 0, the busiest, goes to a poller of its own in turn
/// rather than to wherever the count of queues a device offers happens to end.
pub(super) fn next_first_poller(first: usize, queues: u16, pollers: usize) -> usize {
    let pollers = pollers.max(1);
    let queues = usize::from(queues);
    (first + if queues < pollers { queues } else { 1 }) % pollers
}

/// Opens every device's disk, in order; the first failure names its device. Also how the
/// `IoChannel` conformance checks (`examples/channel_check.rs`) open theirs.
pub fn open_disks(cfg: &Config) -> Result<Vec<Arc<Disk>>, DaemonError> {
    open_disks_with(cfg, &mut Controllers::default())
}

/// [`open_disks`], with the NVMe PCIe controllers they open recorded in `ctrls` (for the
/// devices added later).
pub(super) fn open_disks_with(
    cfg: &Config,
    ctrls: &mut Controllers,
) -> Result<Vec<Arc<Disk>>, DaemonError> {
    let disks = cfg
        .devices
        .iter()
        .map(|d| {
            open_disk(cfg, d, ctrls)
                .map(Arc::new)
                .map_err(|e| in_device(d, e))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let placed = cfg.devices.iter().zip(first_pollers(cfg));
    check_pcie_queues(placed, cfg.pollers.len(), ctrls)?;
    Ok(disks)
}

/// Opens device `d`'s disk with the options of `cfg` (its devices are not looked at); a
/// namespace of an NVMe PCIe controller in `ctrls` shares it.
pub(super) fn open_disk(
    cfg: &Config,
    d: &DeviceConfig,
    ctrls: &mut Controllers,
) -> Result<Disk, DaemonError> {
    Ok(match &d.disk {
        DiskSpec::File(path) => {
            if let Some(size) = d.create_size {
                create_sparse(path, size)?;
            }
            Disk::File(
                FileDevice::open(&FileOptions {
                    path: path.clone(),
                    read_only: d.read_only,
                    cache: cfg.cache,
                    inactive: d.starts_inactive(),
                })
                .map_err(DaemonError::Disk)?,
            )
        }
        DiskSpec::Null(size) => Disk::Null(NullDevice::new(*size, d.read_only)),
        DiskSpec::NvmeTcp(uri) => {
            // Each device has a controller (and connections) of its own, even on a subsystem
            // another device uses.
            let tcp = nvme::tcp_config(uri, &cfg.nvme, cfg.pollers.len(), d.read_only)?;
            Disk::NvmeTcp(NvmeTcpDevice::open(tcp).map_err(DaemonError::NvmeTcp)?)
        }
        DiskSpec::NvmePcie(uri) => Disk::NvmePcie(
            NvmePcieDevice::open(
                &NvmePcieConfig {
                    bdf: uri.bdf.clone(),
                    nsid: uri.nsid,
                    interrupts: uri.interrupts,
                    io_timeout: cfg.nvme.io_timeout,
                    read_only: d.read_only,
                    debug_reset_after: cfg.nvme.debug_reset_after,
                },
                ctrls,
            )
            .map_err(DaemonError::NvmePcie)?,
        ),
    })
}

/// Each poller that serves a queue of a device on an NVMe PCIe controller creates one I/O
/// queue pair on it, shared by that controller's devices: the controller must grant that
/// many (Set Features Number of Queues). `devices` are every device with its first poller,
/// of `pollers`.
pub(super) fn check_pcie_queues<'a>(
    devices: impl Iterator<Item = (&'a DeviceConfig, usize)>,
    pollers: usize,
    ctrls: &Controllers,
) -> Result<(), DaemonError> {
    let pollers = pcie_pollers(devices, pollers);
    for (bdf, ctrl) in ctrls.iter() {
        let needed = pollers.get(bdf).map_or(0, BTreeSet::len);
        let granted = usize::from(ctrl.io_queues_granted());
        if needed > granted {
            return Err(DaemonError::PcieQueues {
                bdf: bdf.to_owned(),
                granted,
                needed,
            });
        }
        info!(
            bdf = %bdf,
            io_queue_pairs = needed,
            granted,
            "NVMe I/O queue pairs: one per poller serving the controller"
        );
    }
    Ok(())
}

/// The pollers that will serve each NVMe PCIe controller (by BDF): those of every queue of
/// every device on one of its namespaces.
fn pcie_pollers<'a>(
    devices: impl Iterator<Item = (&'a DeviceConfig, usize)>,
    pollers: usize,
) -> HashMap<&'a str, BTreeSet<usize>> {
    let n = pollers.max(1);
    let mut pollers: HashMap<&str, BTreeSet<usize>> = HashMap::new();
    for (d, first) in devices {
        if let DiskSpec::NvmePcie(uri) = &d.disk {
            let set = pollers.entry(uri.bdf.as_str()).or_default();
            set.extend((0..usize::from(d.num_queues)).map(|q| (first + q) % n));
        }
    }
    pollers
}

/// The guest-visible model of a device: features, configuration space, request limits, and
/// `device_serial` as the GET_ID answer; `faults` records the session's memory faults.
pub fn device_model(
    d: &DeviceConfig,
    info: &DeviceInfo,
    device_serial: &str,
    faults: Arc<DeviceFaults>,
) -> (BlkShape, DeviceShared) {
    let seg_max = (u32::from(d.queue_size) - 2).clamp(1, MAX_SEGMENTS);
    let capacity_sectors = info.capacity_bytes >> SECTOR_SHIFT;
    let features = DeviceFeatures {
        read_only: info.read_only,
        discard: info.discard,
        write_zeroes: info.write_zeroes,
        multi_queue: d.num_queues > 1,
    };
    let logical = info.logical_block_size;
    let physical_exp = (info.physical_block_size / logical).max(1).ilog2();
    let range_align = info.physical_block_size.max(4096) >> SECTOR_SHIFT;
    let config = BlkConfig {
        capacity_sectors,
        size_max: SIZE_MAX,
        seg_max,
        blk_size: logical,
        physical_block_exp: u8::try_from(physical_exp).unwrap_or(0),
        min_io_size: 1,
        opt_io_size: 0,
        writeback: 1,
        num_queues: d.num_queues,
        max_discard_sectors: if features.discard {
            MAX_RANGE_SECTORS
        } else {
            0
        },
        discard_sector_alignment: if features.discard { range_align } else { 0 },
        max_write_zeroes_sectors: if features.write_zeroes {
            MAX_RANGE_SECTORS
        } else {
            0
        },
        write_zeroes_may_unmap: features.write_zeroes && info.write_zeroes_unmaps,
    };
    let mut serial = [0u8; ID_BYTES];
    let n = device_serial.len().min(ID_BYTES);
    serial[..n].copy_from_slice(&device_serial.as_bytes()[..n]);
    let shape = BlkShape {
        num_queues: usize::from(d.num_queues),
        max_queue_size: d.queue_size,
        features: features.bits(),
        config,
    };
    let limits = Limits {
        capacity_sectors,
        seg_max,
        size_max: SIZE_MAX,
        read_only: info.read_only,
        max_discard_sectors: (info.discard && !info.read_only).then_some(MAX_RANGE_SECTORS),
        max_write_zeroes_sectors: (info.write_zeroes && !info.read_only)
            .then_some(MAX_RANGE_SECTORS),
    };
    // A device taken over from another process (`--incoming`) cannot know the mode the guest
    // chose unless the frontend's inflight region says (QEMU keeps it across reconnects, but a
    // migration destination starts with a new one).
    let write_cache = if d.starts_inactive() {
        WriteCache::Unknown
    } else {
        WriteCache::Back
    };
    // Split over the pollers of the queues the frontend starts, as it starts them.
    let shared = DeviceShared::new(limits, serial, write_cache, faults, d.max_in_flight);
    (shape, shared)
}

fn create_sparse(path: &Path, size: u64) -> Result<(), DaemonError> {
    let err = |source| DaemonError::CreateDisk {
        path: path.to_owned(),
        source,
    };
    match OpenOptions::new().write(true).create_new(true).open(path) {
        Ok(f) => {
            f.set_len(size).map_err(err)?;
            info!(path = %path.display(), size, "created a sparse disk image");
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(err(e)),
    }
}

/// Tells the user how to attach a QEMU VM to the devices served on socket paths.
pub(super) fn print_attach_hint(cfg: &Config, infos: &[DeviceInfo]) {
    super::stdout::write(&attach_hint(cfg, infos));
}

/// What [`print_attach_hint`] prints.
fn attach_hint(cfg: &Config, infos: &[DeviceInfo]) -> String {
    let mut options = Vec::new();
    let mut banner = String::new();
    for (i, (d, info)) in cfg.devices.iter().zip(infos).enumerate() {
        let SocketSpec::Path(sock) = &d.socket else {
            continue;
        };
        let abs = std::path::absolute(sock).unwrap_or_else(|_| sock.clone());
        let size = match info.capacity_bytes {
            b if b % (1 << 30) == 0 => format!("{} GiB", b >> 30),
            b if b % (1 << 20) == 0 => format!("{} MiB", b >> 20),
            b => format!("{b} bytes"),
        };
        writeln!(
            banner,
            "vubd: serving {} ({size}{}) on {}",
            match &d.disk {
                DiskSpec::File(p) => p.display().to_string(),
                DiskSpec::Null(_) => "a null device".to_owned(),
                DiskSpec::NvmeTcp(u) => format!(
                    "namespace {} of {} at {}:{}",
                    u.nsid, u.subnqn, u.host, u.port
                ),
                DiskSpec::NvmePcie(uri) => {
                    format!("namespace {} of NVMe {}", uri.nsid, uri.bdf)
                }
            },
            if info.read_only { ", read-only" } else { "" },
            abs.display()
        )
        .expect("write to String");
        // reconnect=1: QEMU reconnects when vubd restarts (README, "Restart, upgrade,
        // migration").
        options.push(format!(
            "-chardev socket,id=vubd{i},path={},reconnect=1",
            abs.display()
        ));
        // Without num-queues QEMU asks for one queue per vCPU, which the default offer
        // covers; a smaller offer must be named, or a guest with more vCPUs fails to start.
        let queues = if d.num_queues == DEFAULT_QUEUES {
            String::new()
        } else {
            format!(",num-queues={}", d.num_queues)
        };
        options.push(format!(
            "-device vhost-user-blk-pci,chardev=vubd{i}{queues}"
        ));
    }
    if !options.is_empty() {
        banner.push_str(if options.len() > 2 {
            "Attach QEMU VMs (guest RAM must be shared), each device to one of them, with:\n"
        } else {
            "Attach a QEMU VM (guest RAM must be shared) with:\n"
        });
        banner.push_str(
            "  -object memory-backend-memfd,id=mem,size=1G,share=on -numa node,memdev=mem \\\n",
        );
        writeln!(banner, "  {}", options.join(" \\\n  ")).expect("write to String");
    }
    banner
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bdev::nvme_pcie::NvmePcieError;
    use crate::config::test_args::serve as config;
    use crate::nvme::pcie::PcieError;

    #[test]
    fn each_device_starts_on_the_poller_after_the_previous_devices_queues() {
        let mut c = config(&[
            "--device",
            "socket=a,disk=null:1M,num-queues=3",
            "--device",
            "socket=b,disk=null:1M,num-queues=1",
            "--device",
            "socket=c,disk=null:1M,num-queues=2",
        ]);
        c.pollers = vec![None; 8];
        assert_eq!(first_pollers(&c), [0, 3, 4]);
        c.pollers = vec![None; 4];
        assert_eq!(first_pollers(&c), [0, 3, 0], "round the pollers");
        let c = config(&["--disk", "null:1M", "--num-queues", "4"]);
        assert_eq!(first_pollers(&c), [0]);
    }

    #[test]
    fn devices_whose_queues_go_round_the_pollers_start_one_poller_apart() {
        // Every device has at least as many queues as there are pollers.
        let dev = |s: &'static str| ["--device", s];
        let mut c = config(
            &[
                dev("socket=a,disk=null:1M,num-queues=64"),
                dev("socket=b,disk=null:1M,num-queues=8"),
                dev("socket=c,disk=null:1M,num-queues=4"),
                dev("socket=d,disk=null:1M,num-queues=64"),
                dev("socket=e,disk=null:1M,num-queues=64"),
            ]
            .concat(),
        );
        c.pollers = vec![None; 4];
        assert_eq!(first_pollers(&c), [0, 1, 2, 3, 0]);
        c.pollers = vec![None; 3];
        assert_eq!(first_pollers(&c), [0, 1, 2, 0, 1]);
        c.pollers = vec![None];
        assert_eq!(first_pollers(&c), [0; 5]);
    }

    #[test]
    fn the_attach_hint_leaves_the_queue_count_to_qemu_unless_it_is_capped() {
        let c = config(&[
            "--device",
            "socket=a.sock,disk=null:1M",
            "--device",
            "socket=b.sock,disk=null:1M,num-queues=2",
        ]);
        let hint = attach_hint(&c, &[info(false, false), info(false, false)]);
        assert!(
            hint.contains("chardev=vubd0 \\\n") && hint.contains("chardev=vubd1,num-queues=2\n"),
            "{hint}"
        );
    }

    #[test]
    fn errors_of_a_device_given_with_device_name_it() {
        let c = config(&["--device", "socket=a,disk=null:1M"]);
        let e = in_device(&c.devices[0], DaemonError::BadFd(3));
        assert_eq!(
            super::super::error_chain(&e),
            "--device \"socket=a,disk=null:1M\": --fd 3: not a listening unix socket"
        );
        assert_eq!(e.exit_code(), 2);
        let c = config(&["--disk", "null:1M"]);
        let e = in_device(&c.devices[0], DaemonError::BadFd(3));
        assert_eq!(e.to_string(), "--fd 3: not a listening unix socket");
    }

    #[test]
    fn a_controller_needs_a_queue_pair_for_each_poller_serving_any_of_its_namespaces() {
        const A: &str = "0000:01:00.0";
        const B: &str = "0000:02:00.0";
        let mut c = config(&[
            "--device",
            "socket=a,disk=nvme-pcie:0000:01:00.0?nsid=1,num-queues=2",
            "--device",
            "socket=b,disk=null:1M,num-queues=1",
            "--device",
            "socket=c,disk=nvme-pcie:0000:01:00.0?nsid=2,num-queues=1",
            "--device",
            "socket=d,disk=nvme-pcie:0000:02:00.0,num-queues=3",
        ]);
        let set = |p: &[usize]| p.iter().copied().collect::<BTreeSet<usize>>();
        fn of(c: &Config) -> HashMap<&str, BTreeSet<usize>> {
            pcie_pollers(c.devices.iter().zip(first_pollers(c)), c.pollers.len())
        }
        // Queues start at pollers 0, 2, 3 and 4; with 4 pollers, poller 4 is poller 0.
        c.pollers = vec![None; 4];
        let p = of(&c);
        assert_eq!(p.len(), 2, "{p:?}");
        assert_eq!(p[A], set(&[0, 1, 3]), "namespaces 1 and 2 together");
        assert_eq!(p[B], set(&[0, 1, 2]));
        // One poller serves everything: one queue pair per controller.
        c.pollers = vec![None];
        let p = of(&c);
        assert_eq!((p[A].len(), p[B].len()), (1, 1));
        // The single-device form counts the same way.
        let mut c = config(&["--disk", "nvme-pcie:0000:01:00.0", "--num-queues", "2"]);
        c.pollers = vec![None; 2];
        assert_eq!(of(&c)[A], set(&[0, 1]));
    }

    #[test]
    fn too_few_queue_pairs_is_one_line_naming_the_controller_and_exit_status_2() {
        let e = DaemonError::PcieQueues {
            bdf: "0000:01:00.0".into(),
            granted: 1,
            needed: 2,
        };
        assert_eq!(
            super::super::error_chain(&e),
            "NVMe 0000:01:00.0: 2 pollers would serve its namespaces, one I/O queue pair each, \
             and the controller grants 1 (fewer pollers: --cpus, or fewer queues)"
        );
        assert_eq!(e.exit_code(), 2);
    }

    #[test]
    fn a_controller_fatal_at_startup_is_one_line_naming_it_and_exit_status_2() {
        let fatal =
            || DaemonError::NvmePcie(NvmePcieError::Pcie(PcieError::Fatal("0000:01:00.0".into())));
        let e = fatal();
        assert_eq!(
            super::super::error_chain(&e),
            "--disk: controller 0000:01:00.0 reports a fatal status (CSTS.CFS)"
        );
        assert_eq!(e.exit_code(), 2);
        let c = config(&["--device", "socket=a,disk=nvme-pcie:0000:01:00.0"]);
        let e = in_device(&c.devices[0], fatal());
        assert_eq!(
            super::super::error_chain(&e),
            "--device \"socket=a,disk=nvme-pcie:0000:01:00.0\": --disk: controller \
             0000:01:00.0 reports a fatal status (CSTS.CFS)"
        );
        assert_eq!(e.exit_code(), 2);
    }

    fn info(write_zeroes: bool, write_zeroes_unmaps: bool) -> DeviceInfo {
        DeviceInfo {
            capacity_bytes: 1 << 30,
            logical_block_size: 512,
            physical_block_size: 512,
            read_only: false,
            discard: false,
            write_zeroes,
            write_zeroes_unmaps,
        }
    }

    #[test]
    fn the_cap_on_requests_in_flight_is_split_over_the_pollers_of_started_queues() {
        let faults = Arc::new(DeviceFaults::new().expect("eventfd"));
        let shared = |args: &[&str]| {
            let c = config(args);
            device_model(&c.devices[0], &info(true, true), "s", faults.clone()).1
        };
        let share = |s: &DeviceShared| s.max_in_flight.load(std::sync::atomic::Ordering::Relaxed);
        let capped = shared(&["--disk", "null:1G", "--max-inflight", "10"]);
        assert_eq!(share(&capped), 10, "all of it before any queue starts");
        // As many pollers as the started queues run on; each gets at least one.
        for (pollers, each) in [(1, 10), (2, 5), (3, 4), (8, 2), (16, 1), (0, 10)] {
            capped.spread_in_flight(pollers);
            assert_eq!(share(&capped), each, "{pollers} pollers");
        }
        let one = shared(&["--disk", "null:1G", "--max-inflight", "1"]);
        one.spread_in_flight(4);
        assert_eq!(share(&one), 1);
        let uncapped = shared(&["--disk", "null:1G"]);
        uncapped.spread_in_flight(4);
        assert_eq!(share(&uncapped), u32::MAX, "no cap by default");
    }

    #[test]
    fn write_zeroes_may_unmap_only_where_the_device_says_unmapped_blocks_read_as_zeroes() {
        let c = config(&["--disk", "null:1G"]);
        // virtio-blk configuration space: write_zeroes_may_unmap at byte 56.
        let faults = Arc::new(DeviceFaults::new().expect("eventfd"));
        let unmap = |i: &DeviceInfo| {
            device_model(&c.devices[0], i, "s", faults.clone())
                .0
                .config
                .to_bytes()[56]
        };
        assert_eq!(unmap(&info(true, true)), 1);
        assert_eq!(
            unmap(&info(true, false)),
            0,
            "an NVMe namespace without DLFEAT"
        );
        assert_eq!(unmap(&info(false, true)), 0, "no write-zeroes at all");
    }
}
