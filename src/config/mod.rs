//! The command line, and its validation into a [`Config`] that nothing below the daemon
//! ever sees in clap form. Follows QEMU's "vhost-user backend program conventions"
//! (`--socket-path`, `--fd`, `--print-capabilities`, and for block devices `--blk-file` and
//! `--read-only` as spellings of `--disk` and `--readonly`).

mod capabilities;
mod device;
mod file;
mod nvme;
mod qos;
mod socket;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use clap::{Parser, Subcommand, ValueEnum};
use thiserror::Error;

pub use self::capabilities::{capabilities_json, parse_args};
pub use self::device::{DeviceConfig, DeviceDefaults, KNOWN_KEYS, check_beside, device_from_keys};
pub use self::nvme::{
    DEFAULT_DISCOVERY_PORT, NvmeHostArgs, NvmeHostConfig, NvmePcieUri, NvmeTcpUri,
};
pub use self::qos::{
    DEVICE_QOS_KEYS, GROUP_KEY, GroupConfig, QosKeyError, group_from_keys, is_device_qos_key,
    take_device_qos, unique_keys,
};
pub use self::socket::SocketPerms;

use crate::bdev::file::CacheMode;
use crate::nvme::spec::SpecError;
use crate::poller::{PollMode, allowed_cpus};
use crate::sandbox::SeccompMode;
use std::time::Duration;

/// Default socket, disk and disk size when vubd runs without arguments.
pub const DEFAULT_SOCKET: &str = "vubd.sock";
pub const DEFAULT_DISK: &str = "vubd.img";
pub const DEFAULT_DISK_SIZE: u64 = 1 << 30;
/// Where `vubd ctl` looks for the control socket without `--socket`.
pub const DEFAULT_CONTROL_SOCKET: &str = "vubd-control.sock";

/// Largest queue count (queues map onto a 64-bit worker mask).
pub const MAX_QUEUES: u16 = 64;
/// Request queues a device offers without `--num-queues`: as many as it can. QEMU (5.2 and
/// later) gives a `vhost-user-blk-pci` device without `num-queues` one queue per vCPU and
/// refuses to start when the backend's GET_QUEUE_NUM is smaller; cloud-hypervisor and
/// libblkio choose their own count (1 by default) up to what the backend offers. A queue the
/// frontend never starts costs next to nothing (docs/architecture.md, "Queues offered and
/// queues started").
pub const DEFAULT_QUEUES: u16 = MAX_QUEUES;
/// Largest virtqueue size accepted.
pub const MAX_QUEUE_SIZE: u16 = 1024;
/// GET_ID returns at most this many bytes of serial.
pub const MAX_SERIAL_LEN: usize = 20;

/// vhost-user-blk backend daemon.
#[derive(Debug, PartialEq, Eq, Parser)]
#[command(name = "vubd", version, about, long_about = None)]
#[command(args_conflicts_with_subcommands = true)]
pub struct Args {
    #[command(subcommand)]
    pub command: Option<SubCommand>,
    /// Listen for the VMM on this unix socket.
    #[arg(long, value_name = "PATH", conflicts_with = "fd")]
    pub socket_path: Option<PathBuf>,
    /// Use this already listening unix socket (inherited file descriptor).
    #[arg(long, value_name = "N")]
    pub fd: Option<i32>,
    /// The disk: PATH or file:PATH (a raw image file or a block device), null:SIZE, or
    /// `nvme-tcp://HOST[:PORT]/SUBNQN[?nsid=N&hdgst=1&ddgst=1]`, or
    /// `nvme-pcie:BDF[?nsid=N&interrupts=0]`.
    #[arg(long, value_name = "DISK", alias = "blk-file")]
    pub disk: Option<String>,
    /// Serve the disk read-only.
    #[arg(long, alias = "read-only")]
    pub readonly: bool,
    /// Most request queues the frontend may use (1 to 64; default 64, so that QEMU's default
    /// of one queue per vCPU fits); the frontend chooses how many it starts.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_QUEUES)]
    pub num_queues: u16,
    /// Largest virtqueue size the frontend may set (a power of two).
    #[arg(long, value_name = "N", default_value_t = 256)]
    pub queue_size: u16,
    /// Most requests of the device in flight at once, split evenly over the pollers of the
    /// queues the frontend starts (at least one each); more wait in the guest's rings.
    /// Default: no cap beyond the rings' sizes.
    #[arg(long, value_name = "N")]
    pub max_inflight: Option<u32>,
    /// Serial number returned by GET_ID (at most 20 bytes; default: a hash of the image's path,
    /// or an NVMe controller's own).
    #[arg(long, value_name = "STR")]
    pub serial: Option<String>,
    /// Host cache mode: none uses O_DIRECT where the file system allows it.
    #[arg(long, value_enum, default_value_t = CacheArg::None)]
    pub cache: CacheArg,
    /// Run one poller thread on each of these CPUs, pinned (e.g. `2,3` or `2-5`); default: one
    /// unpinned poller per queue, up to the number of CPUs.
    #[arg(long, value_name = "LIST")]
    pub cpus: Option<String>,
    /// How pollers wait for work: always (busy-poll), adaptive (poll, then sleep when idle),
    /// never (event-driven).
    #[arg(long, value_enum, default_value_t = PollArg::Adaptive)]
    pub poll: PollArg,
    /// Adaptive mode: how long a poller keeps polling after its last request, microseconds.
    #[arg(long, value_name = "US", default_value_t = 50)]
    pub poll_idle_us: u64,
    /// Open writable images without the write permission (QEMU's lock byte 101), beside the
    /// process that serves them (live migration destination, upgrade); it is taken when the
    /// frontend starts the device.
    #[arg(long)]
    pub incoming: bool,
    /// Mode of the sockets vubd creates, in octal (e.g. 0660; default: from the umask).
    #[arg(long, value_name = "MODE")]
    pub socket_mode: Option<String>,
    /// Group of the sockets vubd creates, a name or a number (e.g. libvirt-qemu).
    #[arg(long, value_name = "GROUP")]
    pub socket_group: Option<String>,
    /// What a system call outside a thread's allow-list does: the process is killed
    /// (enforce), or the kernel logs it (log); off installs no filter (valgrind).
    #[arg(long, value_enum, default_value_t = SeccompArg::Enforce)]
    pub seccomp: SeccompArg,
    /// Print the vhost-user backend capabilities as JSON and exit.
    #[arg(long)]
    pub print_capabilities: bool,
    /// Serve one more device (repeatable), instead of the single-device options:
    /// `socket=PATH|fd=N,disk=DISK[,serial=S][,readonly=on|off][,num-queues=N][,queue-size=N]`
    /// `[,incoming=on|off][,max-inflight=N]` (`,,` is a comma inside a value); rate limits:
    /// `[,iops-total=N][,bps-read=R]...[,qos-burst-ms=N][,qos-group=G]` as for --qos-group.
    #[arg(
        long = "device",
        value_name = "socket=PATH,disk=DISK,...",
        conflicts_with_all = ["socket_path", "fd", "disk", "readonly", "num_queues", "queue_size", "serial", "max_inflight"]
    )]
    pub devices: Vec<String>,
    /// Serve the devices of this TOML file (`[[device]]` tables with the keys of --device,
    /// `[[qos-group]]` tables with those of --qos-group), besides those of --device.
    #[arg(
        long,
        value_name = "FILE",
        conflicts_with_all = ["socket_path", "fd", "disk", "readonly", "num_queues", "queue_size", "serial", "max_inflight"]
    )]
    pub config: Option<PathBuf>,
    /// Define a group of devices that share rate limits (repeatable): `name=G` and its
    /// limits, `iops-total=N`, `iops-read=N`, `iops-write=N` (operations per second),
    /// `bps-total=R`, `bps-read=R`, `bps-write=R` (bytes per second, 200M = 200 MiB/s),
    /// `qos-burst-ms=N` (1 to 60000, default 100); 0 or absent is no limit. A device joins it
    /// with its key `qos-group=G`; its requests then count against its own limits and the
    /// group's. Writes are WRITE, DISCARD and WRITE_ZEROES (the last two count no bytes);
    /// FLUSH is not limited. A device over a limit waits (no error).
    #[arg(long = "qos-group", value_name = "name=G,iops-total=N,...")]
    pub qos_groups: Vec<String>,
    /// Take requests (JSON-RPC 2.0: add and remove devices, list them, set their rate limits,
    /// ...) on this unix socket, created with mode 0600. With it, vubd may start without a
    /// device.
    #[arg(long, value_name = "PATH")]
    pub control_socket: Option<PathBuf>,
    /// Count each device's requests, bytes, errors and latencies (`vubd ctl stats`,
    /// `device_get_stats`, `--metrics-listen`); off saves the poller a few instructions per
    /// request.
    #[arg(long, value_enum, default_value_t = OnOff::On)]
    pub metrics: OnOff,
    /// Serve the metrics to Prometheus over HTTP on this address and port (e.g.
    /// 127.0.0.1:9100; port 0 picks a free one, which vubd logs): GET /metrics.
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<SocketAddr>,
    /// The Kata Containers vhost-user store (e.g. /var/run/kata-containers/vhost-user) of the
    /// devices that give no socket, fd or fd-name: each listens on DIR/block/sockets/NAME
    /// beside a block device node DIR/block/devices/NAME (major 241) that vubd makes too.
    #[arg(
        long,
        value_name = "DIR",
        conflicts_with_all = ["socket_path", "fd", "disk", "readonly", "num_queues", "queue_size", "serial", "max_inflight"]
    )]
    pub kata_store: Option<PathBuf>,
    #[command(flatten)]
    pub nvme: NvmeHostArgs,
}

#[derive(Debug, PartialEq, Eq, Subcommand)]
pub enum SubCommand {
    /// Print the discovery log page of an NVMe/TCP discovery controller, like `nvme discover`.
    Discover {
        /// The discovery controller's address.
        #[arg(long, value_name = "HOST")]
        traddr: String,
        /// Its port.
        #[arg(long, value_name = "PORT", default_value_t = DEFAULT_DISCOVERY_PORT)]
        trsvcid: u16,
    },
    /// NVMe controllers owned from user space through VFIO.
    Nvme {
        #[command(subcommand)]
        command: NvmeSubCommand,
    },
    /// Send one request to a running vubd's control socket and print the answer.
    Ctl {
        /// The control socket (vubd's --control-socket).
        #[arg(long, short, value_name = "PATH", default_value = DEFAULT_CONTROL_SOCKET)]
        socket: PathBuf,
        /// Print the result as JSON, for scripts.
        #[arg(long)]
        json: bool,
        /// The method: device_add, device_remove, device_list, device_get_stats,
        /// device_resize, device_set_qos, qos_group_set, qos_group_remove, qos_group_list,
        /// log_set_level, version; or stats (device_get_stats twice, an interval apart: IOPS,
        /// MB/s and latency percentiles per device).
        method: String,
        /// Its parameters, KEY=VALUE each (device_add takes the keys of --device,
        /// device_set_qos name=NAME and its rate-limit keys, qos_group_set those of
        /// --qos-group; stats takes name=NAME and interval=SECONDS, default 1).
        #[arg(value_name = "KEY=VALUE")]
        params: Vec<String>,
    },
}

#[derive(Debug, PartialEq, Eq, Subcommand)]
pub enum NvmeSubCommand {
    /// Open every NVMe controller bound to vfio-pci and print it with its active namespaces.
    List {
        /// Only this controller (0000:01:00.0), whatever its driver: says why it cannot be
        /// opened.
        #[arg(long, value_name = "BDF")]
        bdf: Option<String>,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum PollArg {
    Always,
    Adaptive,
    Never,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum SeccompArg {
    Off,
    Log,
    Enforce,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum OnOff {
    On,
    Off,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum CacheArg {
    None,
    Writeback,
}

/// Where the VMM connects.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SocketSpec {
    Path(PathBuf),
    Fd(i32),
    /// `fd-name=NAME`: the listening socket systemd passed under this name (LISTEN_FDNAMES).
    Activated(String),
}

/// The disk a device serves, parsed from `--disk` as a tagged URI.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DiskSpec {
    File(PathBuf),
    /// `null:SIZE`: completes every request at once, stores nothing.
    Null(u64),
    /// A namespace of a remote NVMe/TCP subsystem.
    NvmeTcp(NvmeTcpUri),
    /// `nvme-pcie:BDF[?nsid=N&interrupts=0|1]`: a namespace of a local NVMe controller bound
    /// to vfio-pci.
    NvmePcie(NvmePcieUri),
}

/// The disk as `--disk` spells it (a canonical spelling: a file's path, `null:BYTES`,
/// `nvme-tcp://ADDRESS:PORT/SUBNQN?nsid=N[&hdgst=1][&ddgst=1]`,
/// `nvme-pcie:BDF?nsid=N[&interrupts=0]`).
impl std::fmt::Display for DiskSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DiskSpec::File(p) => write!(f, "{}", p.display()),
            DiskSpec::Null(size) => write!(f, "null:{size}"),
            DiskSpec::NvmeTcp(u) => {
                let host = if u.host.contains(':') {
                    format!("[{}]", u.host)
                } else {
                    u.host.clone()
                };
                write!(
                    f,
                    "nvme-tcp://{host}:{}/{}?nsid={}",
                    u.port, u.subnqn, u.nsid
                )?;
                if u.hdgst {
                    f.write_str("&hdgst=1")?;
                }
                if u.ddgst {
                    f.write_str("&ddgst=1")?;
                }
                Ok(())
            }
            DiskSpec::NvmePcie(u) => {
                write!(f, "nvme-pcie:{}?nsid={}", u.bdf, u.nsid)?;
                if !u.interrupts {
                    f.write_str("&interrupts=0")?;
                }
                Ok(())
            }
        }
    }
}

/// What `vubd` was asked to do.
#[derive(Debug)]
pub enum Command {
    PrintCapabilities,
    Serve(Config),
    Discover(DiscoverConfig),
    NvmeList(NvmeListConfig),
    Ctl(CtlConfig),
}

/// `vubd ctl`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CtlConfig {
    pub socket: PathBuf,
    pub json: bool,
    pub method: String,
    /// `KEY=VALUE` parameters, in order.
    pub params: Vec<(String, String)>,
}

/// `vubd nvme list`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NvmeListConfig {
    /// One controller, with its domain; `None`: every NVMe controller bound to vfio-pci.
    pub bdf: Option<String>,
    pub io_timeout: Duration,
}

/// `vubd discover`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiscoverConfig {
    pub host: String,
    pub port: u16,
    pub nvme: NvmeHostConfig,
}

/// A validated configuration: the devices, and what applies to all of them.
#[derive(Clone, Debug)]
pub struct Config {
    /// The devices to serve from the start: the single-device options make one; none only
    /// with a control socket.
    pub devices: Vec<DeviceConfig>,
    /// `--control-socket`.
    pub control_socket: Option<PathBuf>,
    /// `--metrics`: whether devices count their requests.
    pub metrics: bool,
    /// `--metrics-listen`: where Prometheus scrapes the metrics.
    pub metrics_listen: Option<SocketAddr>,
    /// What the keys of a device added later default to.
    pub device_defaults: DeviceDefaults,
    /// The groups of devices sharing rate limits (`[[qos-group]]`, then `--qos-group`).
    pub qos_groups: Vec<GroupConfig>,
    pub cache: CacheMode,
    /// One entry per poller thread: the CPU it is pinned to, if any.
    pub pollers: Vec<Option<usize>>,
    pub poll: PollMode,
    pub nvme: NvmeHostConfig,
    pub seccomp: SeccompMode,
}

impl Config {
    /// The serving configuration of the command line `vubd ARGS...`, parsed and validated as
    /// `main` does: for the programs that open devices as vubd does (the `IoChannel` checks,
    /// the fuzz targets). The error is the message vubd would print.
    pub fn from_args<S: Into<std::ffi::OsString> + Clone>(
        args: impl IntoIterator<Item = S>,
    ) -> Result<Config, String> {
        let args = Args::try_parse_from(
            std::iter::once(std::ffi::OsString::from("vubd"))
                .chain(args.into_iter().map(Into::into)),
        )
        .map_err(|e| e.to_string())?;
        match Command::try_from(args).map_err(|e| e.to_string())? {
            Command::Serve(cfg) => Ok(cfg),
            _ => Err("not a command line that serves devices".to_owned()),
        }
    }
}

/// A bad command line; the message names the argument.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("--disk is required (PATH, file:PATH, null:SIZE or nvme-tcp://HOST:PORT/SUBNQN)")]
    MissingDisk,
    #[error(
        "--disk {0:?}: unknown disk type {1:?} (expected PATH, file:PATH, null:SIZE or nvme-tcp://)"
    )]
    UnknownDiskType(String, String),
    #[error("--disk {0:?}: {1}")]
    BadNvmeUri(String, &'static str),
    #[error("--disk {0:?}: {1}")]
    BadSubNqn(String, SpecError),
    #[error("--hostnqn {0:?}: {1}")]
    BadHostNqn(String, SpecError),
    #[error("--hostid {0:?}: expected a UUID like f81d4fae-7dec-11d0-a765-00a0c91e6bf6")]
    BadHostId(String),
    #[error("{0} {1}: must be between {2} and {3} seconds")]
    BadSeconds(&'static str, u64, u64, u64),
    #[error("--disk: empty path")]
    EmptyDiskPath,
    #[error("--num-queues {0}: must be between 1 and {MAX_QUEUES}")]
    NumQueues(u16),
    #[error("--queue-size {0}: must be a power of two between 2 and {MAX_QUEUE_SIZE}")]
    QueueSize(u16),
    #[error("--max-inflight 0: a device needs at least one request in flight")]
    MaxInFlight,
    #[error("--serial {0:?}: longer than {MAX_SERIAL_LEN} bytes")]
    SerialTooLong(String),
    #[error("--socket-path {0}: directory {1} does not exist")]
    SocketDirMissing(PathBuf, PathBuf),
    #[error("--socket-mode {0:?}: expected an octal mode such as 0660 (at most 0777)")]
    SocketMode(String),
    #[error("--socket-group {0:?}: no such group (a group name or a number)")]
    SocketGroup(String),
    #[error("--socket-mode and --socket-group apply to a socket vubd creates, not to --fd")]
    PermsOnFd,
    #[error("--fd {0}: not a valid file descriptor number")]
    BadFd(i32),
    #[error("--disk {0:?}: size must be a positive multiple of 512 bytes, like 16G or 512M")]
    BadNullSize(String),
    #[error("--cpus {0:?}: expected a list like 2,3 or 2-5")]
    BadCpuList(String),
    #[error("--cpus {0:?}: CPU {1} is not available to this process")]
    CpuNotAvailable(String, usize),
    #[error("--cpus {0:?}: CPU {1} is listed twice")]
    DuplicateCpu(String, usize),
    #[error("--poll-idle-us {0}: must be at most 1000000")]
    PollIdle(u64),
    #[error("--bdf {0:?}: expected a PCI address such as 0000:01:00.0")]
    BadBdf(String),
    #[error("--metrics-listen: the metrics are off (--metrics off)")]
    MetricsOff,
    #[error("ctl parameter {0:?}: expected KEY=VALUE")]
    CtlParam(String),
    #[error("--config {0}: {1}")]
    ConfigFile(String, String),
    /// A device's keys, named by where they came from (`--device "ARG"`, or a control
    /// request's method).
    #[error("{0}: {1}")]
    BadDevice(String, &'static str),
    #[error("{0}: unknown key {1:?} (known: {KNOWN_KEYS})")]
    UnknownKey(String, String),
    #[error("{0}: {1}")]
    InDevice(String, Box<ConfigError>),
    #[error("{0}: {1}")]
    SharedDevice(String, &'static str),
    /// A rate-limit key of a device or a group, named by where it came from.
    #[error("{0}: {1}")]
    BadQos(String, QosKeyError),
    #[error(
        "{0}: qos-group: no group is named {1:?} (define it with --qos-group or [[qos-group]])"
    )]
    NoGroup(String, String),
    #[error("{0}: group {1:?} is defined twice")]
    GroupTwice(String, String),
}

impl Args {
    /// True when any single-device option (`--disk`, `--socket-path`, ...) is given.
    fn single_device_given(&self) -> bool {
        let empty = Args::try_parse_from(["vubd"]).expect("no arguments parse");
        self.disk.is_some()
            || self.socket_path.is_some()
            || self.fd.is_some()
            || self.readonly
            || self.serial.is_some()
            || self.max_inflight.is_some()
            || self.num_queues != empty.num_queues
            || self.queue_size != empty.queue_size
    }

    /// True when the command line is the empty one (every option at its default): the
    /// default run. Any option given without `--disk` is a mistake, not a request for it.
    fn is_bare(&self) -> bool {
        Args::try_parse_from(["vubd"]).is_ok_and(|empty| *self == empty)
    }
}

impl TryFrom<Args> for Command {
    type Error = ConfigError;

    fn try_from(args: Args) -> Result<Self, ConfigError> {
        if args.print_capabilities {
            return Ok(Command::PrintCapabilities);
        }
        let nvme = args.nvme.validate()?;
        if let Some(SubCommand::Discover { traddr, trsvcid }) = args.command {
            return Ok(Command::Discover(DiscoverConfig {
                host: traddr,
                port: trsvcid,
                nvme,
            }));
        }
        if let Some(SubCommand::Nvme {
            command: NvmeSubCommand::List { bdf },
        }) = args.command
        {
            let bdf = match bdf {
                Some(b) => Some(
                    crate::nvme::pcie::sysfs::normalize_bdf(&b)
                        .map_err(|_| ConfigError::BadBdf(b))?,
                ),
                None => None,
            };
            return Ok(Command::NvmeList(NvmeListConfig {
                bdf,
                io_timeout: nvme.io_timeout,
            }));
        }
        if let Some(SubCommand::Ctl {
            socket,
            json,
            method,
            params,
        }) = args.command
        {
            let params = params
                .into_iter()
                .map(|p| match p.split_once('=') {
                    Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
                    _ => Err(ConfigError::CtlParam(p)),
                })
                .collect::<Result<_, _>>()?;
            return Ok(Command::Ctl(CtlConfig {
                socket,
                json,
                method,
                params,
            }));
        }
        let bare = args.is_bare();
        let perms = SocketPerms::parse(args.socket_mode.as_deref(), args.socket_group.as_deref())?;
        let device_defaults = DeviceDefaults {
            incoming: args.incoming,
            perms,
            kata_store: args.kata_store.clone(),
        };
        // A control socket and none of the single-device options: devices come later.
        let only_control = args.control_socket.is_some() && !args.single_device_given();
        let mut qos_groups = Vec::new();
        let devices = if !args.devices.is_empty() || args.config.is_some() {
            let mut devices = match &args.config {
                Some(path) => {
                    let loaded = file::load(path, device_defaults.clone())?;
                    qos_groups = loaded.groups;
                    loaded.devices
                }
                None => Vec::new(),
            };
            for d in &args.devices {
                devices.push(device::parse_device(d, device_defaults.clone())?);
            }
            device::check_shared(&devices)?;
            devices
        } else if only_control {
            Vec::new()
        } else {
            let disk = match (&args.disk, bare) {
                (Some(d), _) => parse_disk(d)?,
                (None, true) => DiskSpec::File(PathBuf::from(DEFAULT_DISK)),
                (None, false) => return Err(ConfigError::MissingDisk),
            };
            let socket = match (args.socket_path, args.fd) {
                (_, Some(fd)) if fd < 0 => return Err(ConfigError::BadFd(fd)),
                (_, Some(_)) if perms.any() => return Err(ConfigError::PermsOnFd),
                (_, Some(fd)) => SocketSpec::Fd(fd),
                (Some(p), None) => SocketSpec::Path(p),
                (None, None) => SocketSpec::Path(PathBuf::from(DEFAULT_SOCKET)),
            };
            let values = device::DeviceValues {
                name: device::default_name(&socket),
                socket,
                disk,
                read_only: args.readonly,
                num_queues: args.num_queues,
                queue_size: args.queue_size,
                serial: args.serial,
                incoming: args.incoming,
                max_in_flight: args.max_inflight,
                socket_perms: perms,
                qos: crate::qos::Rates::default(),
                qos_group: None,
                kata_store: None,
            };
            vec![values.validate(None, bare.then_some(DEFAULT_DISK_SIZE))?]
        };
        for g in &args.qos_groups {
            qos_groups.push(qos::parse_group(g)?);
        }
        qos::check_groups(&qos_groups, &devices)?;
        let metrics = args.metrics == OnOff::On;
        if args.metrics_listen.is_some() && !metrics {
            return Err(ConfigError::MetricsOff);
        }
        if args.poll_idle_us > 1_000_000 {
            return Err(ConfigError::PollIdle(args.poll_idle_us));
        }
        let allowed = allowed_cpus();
        // By default one poller per queue of all devices together, up to the CPUs; one per
        // CPU when devices may come later.
        let queues: usize = devices.iter().map(|d| usize::from(d.num_queues)).sum();
        let queues = if args.control_socket.is_some() {
            usize::MAX
        } else {
            queues
        };
        let pollers = match &args.cpus {
            Some(list) => parse_cpus(list, &allowed)?.into_iter().map(Some).collect(),
            None => vec![None; queues.min(allowed.len().max(1))],
        };
        let poll = match args.poll {
            PollArg::Always => PollMode::Always,
            PollArg::Never => PollMode::Never,
            PollArg::Adaptive => PollMode::Adaptive {
                idle: Duration::from_micros(args.poll_idle_us),
            },
        };
        Ok(Command::Serve(Config {
            devices,
            control_socket: args.control_socket,
            metrics,
            metrics_listen: args.metrics_listen,
            device_defaults,
            qos_groups,
            cache: match args.cache {
                CacheArg::None => CacheMode::None,
                CacheArg::Writeback => CacheMode::Writeback,
            },
            pollers,
            poll,
            nvme,
            seccomp: match args.seccomp {
                SeccompArg::Off => SeccompMode::Off,
                SeccompArg::Log => SeccompMode::Log,
                SeccompArg::Enforce => SeccompMode::Enforce,
            },
        }))
    }
}

/// `PATH`, `file:PATH`; a `scheme:` prefix of another kind is refused unless a file by that
/// very name exists.
pub fn parse_disk(s: &str) -> Result<DiskSpec, ConfigError> {
    if let Some(size) = s.strip_prefix("null:") {
        return parse_size(size)
            .filter(|&n| n > 0 && n % 512 == 0)
            .map(DiskSpec::Null)
            .ok_or_else(|| ConfigError::BadNullSize(s.to_owned()));
    }
    if let Some(rest) = s.strip_prefix("nvme-tcp://") {
        return nvme::parse_uri(rest, s).map(DiskSpec::NvmeTcp);
    }
    if let Some(rest) = s.strip_prefix("nvme-pcie:") {
        return nvme::parse_pcie(rest, s).map(DiskSpec::NvmePcie);
    }
    if let Some(path) = s.strip_prefix("file:") {
        if path.is_empty() {
            return Err(ConfigError::EmptyDiskPath);
        }
        return Ok(DiskSpec::File(PathBuf::from(path)));
    }
    if s.is_empty() {
        return Err(ConfigError::EmptyDiskPath);
    }
    if let Some((scheme, _)) = s.split_once(':') {
        let looks_like_scheme = !scheme.is_empty()
            && scheme.starts_with(|c: char| c.is_ascii_alphabetic())
            && scheme
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
        if looks_like_scheme && !Path::new(s).exists() {
            return Err(ConfigError::UnknownDiskType(
                s.to_owned(),
                scheme.to_owned(),
            ));
        }
    }
    Ok(DiskSpec::File(PathBuf::from(s)))
}

/// `1024`, `4K`, `512M`, `16G`, `2T` (binary multiples).
pub fn parse_size(s: &str) -> Option<u64> {
    let (digits, shift) = match s.as_bytes().last()?.to_ascii_uppercase() {
        b'K' => (&s[..s.len() - 1], 10),
        b'M' => (&s[..s.len() - 1], 20),
        b'G' => (&s[..s.len() - 1], 30),
        b'T' => (&s[..s.len() - 1], 40),
        _ => (s, 0),
    };
    let n: u64 = digits.parse().ok()?;
    n.checked_mul(1 << shift)
}

/// `2,3`, `2-5`, `0,2-3`: distinct CPUs this process may run on, in the order given.
pub fn parse_cpus(list: &str, allowed: &[usize]) -> Result<Vec<usize>, ConfigError> {
    let bad = || ConfigError::BadCpuList(list.to_owned());
    let mut cpus = Vec::new();
    for part in list.split(',') {
        let (lo, hi) = match part.split_once('-') {
            Some((a, b)) => (
                a.trim().parse().map_err(|_| bad())?,
                b.trim().parse().map_err(|_| bad())?,
            ),
            None => {
                let c: usize = part.trim().parse().map_err(|_| bad())?;
                (c, c)
            }
        };
        if lo > hi || hi - lo > 4096 {
            return Err(bad());
        }
        for c in lo..=hi {
            if !allowed.contains(&c) {
                return Err(ConfigError::CpuNotAvailable(list.to_owned(), c));
            }
            if cpus.contains(&c) {
                return Err(ConfigError::DuplicateCpu(list.to_owned(), c));
            }
            cpus.push(c);
        }
    }
    Ok(cpus)
}

fn check_socket_dir(p: &Path) -> Result<(), ConfigError> {
    let dir = match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => return Ok(()),
    };
    if dir.is_dir() {
        Ok(())
    } else {
        Err(ConfigError::SocketDirMissing(p.to_owned(), dir.to_owned()))
    }
}

/// The serial a disk gets without `--serial`: `None` for a device that has one of its own (an
/// NVMe controller's, or for an image the hash of its path, `bdev::file::image_serial`).
fn default_serial(disk: &DiskSpec) -> Option<String> {
    match disk {
        DiskSpec::Null(_) => Some("null".to_owned()),
        DiskSpec::File(_) | DiskSpec::NvmeTcp(_) | DiskSpec::NvmePcie(_) => None,
    }
}

/// Command lines for the unit tests of the configuration and of what consumes it.
#[cfg(test)]
pub(crate) mod test_args {
    use super::{Args, Command, Config, ConfigError, Parser};

    /// `vubd ARGS...` through clap and validation.
    pub fn parse(args: &[&str]) -> Result<Command, ConfigError> {
        let a = Args::try_parse_from(std::iter::once("vubd").chain(args.iter().copied()))
            .expect("clap accepts");
        Command::try_from(a)
    }

    /// The serving configuration of `vubd ARGS...`, which must be valid.
    pub fn serve(args: &[&str]) -> Config {
        match parse(args) {
            Ok(Command::Serve(c)) => c,
            other => panic!("expected a config, got {other:?}"),
        }
    }
}

#[cfg(test)]
mod tests;
