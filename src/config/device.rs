//! One served device: its socket, disk and guest-visible shape. The single-device options
//! (`--socket-path`/`--fd`, `--disk`, `--readonly`, ...) describe one; each repeatable
//! `--device socket=PATH,disk=DISK[,name=N][,serial=S][,readonly=on|off][,num-queues=N]
//! [,queue-size=N][,incoming=on|off][,max-inflight=N][,iops-total=N,...][,qos-group=G]`
//! (QEMU's key=value list, `,,` for a comma in a value) describes another, and so do the same
//! keys in a control request (`device_add`); the rate-limit keys are parsed by
//! [`super::qos`]. Where a device listens is one of `socket=PATH`, `fd=N` (inherited),
//! `fd-name=NAME` (inherited from systemd's socket activation, named by LISTEN_FDNAMES) and
//! `kata-store=DIR` (the socket in a Kata Containers vhost-user store, beside the block device
//! node Kata finds it by). What several devices may not share is refused here: a name, a
//! socket, a writable image file, an NVMe namespace.

use std::collections::HashMap;
use std::path::PathBuf;

use super::{
    ConfigError, DEFAULT_QUEUES, DiskSpec, MAX_QUEUE_SIZE, MAX_QUEUES, MAX_SERIAL_LEN, SocketPerms,
    SocketSpec, check_socket_dir, default_serial, parse_disk, qos,
};
use crate::qos::Rates;

/// A validated device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceConfig {
    /// How the control socket names it (`name=`; default: its socket as given). Unique.
    pub name: String,
    /// The `--device` argument as given, to name the device in errors; `None` for the device
    /// of the single-device options and for one a control request added.
    pub arg: Option<String>,
    pub socket: SocketSpec,
    pub disk: DiskSpec,
    pub read_only: bool,
    pub num_queues: u16,
    pub queue_size: u16,
    /// `serial=` / `--serial`, or the default of a null disk; `None`: the device's own serial
    /// number (an NVMe controller's, or a hash of an image's path).
    pub serial: Option<String>,
    /// Create the disk as a sparse file of this size if it does not exist (the no-argument
    /// default run).
    pub create_size: Option<u64>,
    /// `incoming=` / `--incoming`: open a writable image without the write permission, which
    /// is taken when the frontend starts the device.
    pub incoming: bool,
    /// `max-inflight=` / `--max-inflight`: most requests of the device in flight at once
    /// (split evenly over the pollers of the queues the frontend starts, at least one each);
    /// `None`: no cap beyond the rings' sizes.
    pub max_in_flight: Option<u32>,
    /// `socket-mode=` / `socket-group=`, else `--socket-mode` / `--socket-group`: the mode and
    /// group of a socket vubd creates (none for an inherited one).
    pub socket_perms: SocketPerms,
    /// `iops-total=`, ..., `qos-burst-ms=`: the device's own rate limits as it starts
    /// (`device_set_qos` changes them later; the daemon keeps the ones in force).
    pub qos: Rates,
    /// `qos-group=`: the group whose limits it shares as it starts.
    pub qos_group: Option<String>,
    /// `kata-store=` / `--kata-store`: the Kata Containers vhost-user store the device is in;
    /// its socket is then `DIR/block/sockets/NAME` and vubd also makes the block device node
    /// `DIR/block/devices/NAME` Kata finds the socket by.
    pub kata_store: Option<PathBuf>,
}

impl DeviceConfig {
    /// How errors name the device: its `--device` argument, else its name.
    pub fn label(&self) -> String {
        match &self.arg {
            Some(arg) => format!("--device {arg:?}"),
            None => format!("device {:?}", self.name),
        }
    }

    /// Whether the device opens its image inactive: holding consistent reads only and sharing
    /// everything, so that it can start beside the process serving the image. A read-only
    /// device never holds write, so `incoming` changes nothing for it; neither does it for a
    /// disk vubd does not lock (null, NVMe).
    pub fn starts_inactive(&self) -> bool {
        self.incoming && !self.read_only
    }
}

/// The values of one device, before validation.
#[derive(Debug)]
pub(super) struct DeviceValues {
    pub name: String,
    pub socket: SocketSpec,
    pub disk: DiskSpec,
    pub read_only: bool,
    pub num_queues: u16,
    pub queue_size: u16,
    pub serial: Option<String>,
    pub incoming: bool,
    pub max_in_flight: Option<u32>,
    pub socket_perms: SocketPerms,
    pub qos: Rates,
    pub qos_group: Option<String>,
    pub kata_store: Option<PathBuf>,
}

impl DeviceValues {
    /// Checks the numbers and the serial; errors name the single-device option.
    pub(super) fn validate(
        self,
        arg: Option<String>,
        create_size: Option<u64>,
    ) -> Result<DeviceConfig, ConfigError> {
        if self.num_queues == 0 || self.num_queues > MAX_QUEUES {
            return Err(ConfigError::NumQueues(self.num_queues));
        }
        if !self.queue_size.is_power_of_two()
            || self.queue_size < 2
            || self.queue_size > MAX_QUEUE_SIZE
        {
            return Err(ConfigError::QueueSize(self.queue_size));
        }
        if self.max_in_flight == Some(0) {
            return Err(ConfigError::MaxInFlight);
        }
        // A store's directories are made with the device.
        if let (SocketSpec::Path(p), None) = (&self.socket, &self.kata_store) {
            check_socket_dir(p)?;
        }
        let serial = match self.serial {
            Some(s) if s.len() > MAX_SERIAL_LEN => return Err(ConfigError::SerialTooLong(s)),
            Some(s) => Some(s),
            None => default_serial(&self.disk),
        };
        Ok(DeviceConfig {
            name: self.name,
            arg,
            socket: self.socket,
            disk: self.disk,
            read_only: self.read_only,
            num_queues: self.num_queues,
            queue_size: self.queue_size,
            serial,
            create_size,
            incoming: self.incoming,
            max_in_flight: self.max_in_flight,
            socket_perms: self.socket_perms,
            qos: self.qos,
            qos_group: self.qos_group,
            kata_store: self.kata_store,
        })
    }
}

/// The `KEY=VALUE` items of a QEMU-style option list ([`split_list`]); an item without `=` is
/// an error naming `label` (the option and its argument).
pub(super) fn key_values(label: &str, arg: &str) -> Result<Vec<(String, String)>, ConfigError> {
    split_list(arg)
        .into_iter()
        .map(|item| {
            item.split_once('=')
                .map(|(key, value)| (key.to_owned(), value.to_owned()))
                .ok_or_else(|| {
                    ConfigError::BadDevice(
                        label.to_owned(),
                        "expected KEY=VALUE items separated by commas",
                    )
                })
        })
        .collect()
}

/// Splits a QEMU-style option list: items separated by `,`, where `,,` is a comma inside a
/// value.
fn split_list(s: &str) -> Vec<String> {
    let mut items = Vec::new();
    let mut item = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            ',' if chars.peek() == Some(&',') => {
                chars.next();
                item.push(',');
            }
            ',' => items.push(std::mem::take(&mut item)),
            c => item.push(c),
        }
    }
    items.push(item);
    items
}

/// The keys of a device (`--device` and the control socket's `device_add`).
pub const KNOWN_KEYS: &str = "name, socket, fd, fd-name, kata-store, disk, serial, readonly, \
                              num-queues, queue-size, incoming, max-inflight, socket-mode, \
                              socket-group, iops-total, iops-read, iops-write, bps-total, \
                              bps-read, bps-write, qos-burst-ms, qos-group";

/// What a device's keys default to beside their own defaults: the global `--incoming`,
/// `--socket-mode`, `--socket-group` and `--kata-store`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeviceDefaults {
    pub incoming: bool,
    pub perms: SocketPerms,
    /// Where a device that says nowhere else to listen goes (`--kata-store`).
    pub kata_store: Option<PathBuf>,
}

/// Longest name LISTEN_FDNAMES may give a socket (systemd's `FileDescriptorName=`).
const MAX_FD_NAME_LEN: usize = 255;

/// Where a device listens, from its keys: one of `socket`, `fd`, `fd-name` and `kata-store`,
/// else the store of `--kata-store`. With a store, the device's name is the socket's file
/// name, so it is taken here.
fn socket_keys(
    keys: &mut HashMap<String, String>,
    defaults: &DeviceDefaults,
    bad: impl Fn(&'static str) -> ConfigError,
) -> Result<(SocketSpec, Option<PathBuf>), ConfigError> {
    let given = ["socket", "fd", "fd-name", "kata-store"]
        .into_iter()
        .filter(|k| keys.contains_key(*k))
        .count();
    if given > 1 {
        return Err(bad(
            "socket, fd, fd-name and kata-store exclude each other (each says where the device \
             listens)",
        ));
    }
    if let Some(p) = keys.remove("socket") {
        if p.is_empty() {
            return Err(bad("socket is empty"));
        }
        return Ok((SocketSpec::Path(PathBuf::from(p)), None));
    }
    if let Some(fd) = keys.remove("fd") {
        let fd = fd
            .parse()
            .ok()
            .filter(|&n: &i32| n >= 0)
            .ok_or(bad("fd must be a file descriptor number"))?;
        return Ok((SocketSpec::Fd(fd), None));
    }
    if let Some(n) = keys.remove("fd-name") {
        if n.is_empty()
            || n.len() > MAX_FD_NAME_LEN
            || n.contains(':')
            || n.chars().any(|c| c.is_control() || !c.is_ascii())
        {
            return Err(bad(
                "fd-name must be 1 to 255 ASCII characters without ':' or control characters \
                 (a name of LISTEN_FDNAMES)",
            ));
        }
        return Ok((SocketSpec::Activated(n), None));
    }
    let store = match keys.remove("kata-store") {
        Some(s) if s.is_empty() => return Err(bad("kata-store is empty")),
        Some(s) => PathBuf::from(s),
        None => defaults.kata_store.clone().ok_or(bad(
            "socket (or fd) is required, or fd-name, or kata-store: where the device listens",
        ))?,
    };
    let name = keys.get("name").ok_or(bad(
        "name is required with kata-store: it names the socket and the block device node",
    ))?;
    if name.contains('/') || name == "." || name == ".." || !is_valid_name(name) {
        return Err(bad(
            "name must be a file name with kata-store (1 to 64 bytes, no '/', \
             not . or ..)",
        ));
    }
    let socket = store.join("block/sockets").join(name);
    Ok((SocketSpec::Path(socket), Some(store)))
}

/// Parses one `--device` argument; errors name it whole.
pub(super) fn parse_device(
    arg: &str,
    defaults: DeviceDefaults,
) -> Result<DeviceConfig, ConfigError> {
    let label = format!("--device {arg:?}");
    let items = key_values(&label, arg)?;
    let mut d = device_from_keys(&label, items, defaults)?;
    d.arg = Some(arg.to_owned());
    Ok(d)
}

/// A device from its keys ([`KNOWN_KEYS`]) and values; `label` names where they came from in
/// errors (`--device "ARG"`, or a control request's method).
pub fn device_from_keys(
    label: &str,
    items: impl IntoIterator<Item = (String, String)>,
    defaults: DeviceDefaults,
) -> Result<DeviceConfig, ConfigError> {
    let bad = |why: &'static str| ConfigError::BadDevice(label.to_owned(), why);
    let mut keys: HashMap<String, String> = HashMap::new();
    for (key, value) in items {
        if !KNOWN_KEYS.split(", ").any(|k| k == key) {
            return Err(ConfigError::UnknownKey(label.to_owned(), key));
        }
        if keys.insert(key, value).is_some() {
            return Err(bad("a key is given twice"));
        }
    }
    let (socket, kata_store) = socket_keys(&mut keys, &defaults, bad)?;
    let name = match keys.remove("name") {
        Some(n) if !is_valid_name(&n) => {
            return Err(bad("name must be 1 to 64 bytes without control characters"));
        }
        Some(n) => n,
        None => default_name(&socket),
    };
    let (qos, qos_group) =
        qos::take_device_qos(&mut keys).map_err(|e| ConfigError::BadQos(label.to_owned(), e))?;
    let in_device = |e| ConfigError::InDevice(label.to_owned(), Box::new(e));
    let disk =
        parse_disk(&keys.remove("disk").ok_or(bad("disk is required"))?).map_err(in_device)?;
    let own_perms = SocketPerms::parse(
        keys.remove("socket-mode").as_deref(),
        keys.remove("socket-group").as_deref(),
    )
    .map_err(in_device)?;
    let socket_perms = match socket {
        SocketSpec::Fd(_) | SocketSpec::Activated(_) if own_perms.any() => {
            return Err(in_device(ConfigError::PermsOnFd));
        }
        // The global options are for the sockets vubd creates.
        SocketSpec::Fd(_) | SocketSpec::Activated(_) => SocketPerms::default(),
        SocketSpec::Path(_) => own_perms.or(defaults.perms),
    };
    let switch =
        |key: &str, default: bool, why: &'static str| match keys.get(key).map(String::as_str) {
            None => Ok(default),
            Some("off" | "0" | "false") => Ok(false),
            Some("on" | "1" | "true") => Ok(true),
            Some(_) => Err(bad(why)),
        };
    let read_only = switch("readonly", false, "readonly takes on or off")?;
    let incoming = switch("incoming", defaults.incoming, "incoming takes on or off")?;
    let number = |key: &str, default: u16| match keys.get(key) {
        None => Ok(default),
        Some(v) => v
            .parse::<u16>()
            .map_err(|_| bad("num-queues and queue-size take numbers")),
    };
    let values = DeviceValues {
        name,
        socket,
        disk,
        read_only,
        num_queues: number("num-queues", DEFAULT_QUEUES)?,
        queue_size: number("queue-size", 256)?,
        serial: keys.remove("serial"),
        incoming,
        max_in_flight: match keys.get("max-inflight") {
            None => None,
            Some(v) => Some(v.parse().map_err(|_| bad("max-inflight takes a number"))?),
        },
        socket_perms,
        qos,
        qos_group,
        kata_store,
    };
    values.validate(None, None).map_err(in_device)
}

/// Longest device (and QoS group) name, bytes.
const MAX_NAME_LEN: usize = 64;

/// Whether `n` is a valid device or group name: 1 to [`MAX_NAME_LEN`] bytes, no control
/// characters (it shows in log lines and tables).
pub(super) fn is_valid_name(n: &str) -> bool {
    !n.is_empty() && n.len() <= MAX_NAME_LEN && !n.chars().any(char::is_control)
}

/// The name of a device without `name=`: its socket as given (unique among the devices).
pub(super) fn default_name(socket: &SocketSpec) -> String {
    match socket {
        SocketSpec::Path(p) => p.display().to_string(),
        SocketSpec::Fd(fd) => format!("fd{fd}"),
        SocketSpec::Activated(name) => name.clone(),
    }
}

/// Refuses what several devices cannot share: a socket, an image file any of them writes, an
/// NVMe namespace; and one NVMe controller asked for with and without interrupts.
pub(super) fn check_shared(devices: &[DeviceConfig]) -> Result<(), ConfigError> {
    for (i, d) in devices.iter().enumerate() {
        check_beside(d, &devices[..i])?;
    }
    Ok(())
}

/// Refuses device `d` beside `others` for what [`check_shared`] refuses, and for a name one
/// of them has.
pub fn check_beside<'a>(
    d: &DeviceConfig,
    others: impl IntoIterator<Item = &'a DeviceConfig>,
) -> Result<(), ConfigError> {
    for e in others {
        if d.socket == e.socket {
            return Err(ConfigError::SharedDevice(
                d.label(),
                "its socket is another's",
            ));
        }
        if d.name == e.name {
            return Err(ConfigError::SharedDevice(
                d.label(),
                "its name is another's",
            ));
        }
        match (&d.disk, &e.disk) {
            (DiskSpec::File(a), DiskSpec::File(b))
                if (!d.read_only || !e.read_only) && same_file(a, b) =>
            {
                return Err(ConfigError::SharedDevice(
                    d.label(),
                    "its image is another's and one of them writes it (readonly=on on both)",
                ));
            }
            (DiskSpec::NvmePcie(a), DiskSpec::NvmePcie(b)) if a.bdf == b.bdf => {
                if a.nsid == b.nsid {
                    return Err(ConfigError::SharedDevice(
                        d.label(),
                        "its NVMe namespace is another's",
                    ));
                }
                if a.interrupts != b.interrupts {
                    return Err(ConfigError::SharedDevice(
                        d.label(),
                        "devices of one NVMe controller take the same interrupts= value",
                    ));
                }
            }
            _ => {}
        }
    }
    Ok(())
}

/// The same file, by its resolved path when it exists, else as written.
fn same_file(a: &std::path::Path, b: &std::path::Path) -> bool {
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::config::test_args::{parse, serve};
    use crate::config::{Args, NvmePcieUri};
    use crate::poller::{PollMode, allowed_cpus};

    #[test]
    fn lists_split_at_single_commas_and_keep_doubled_ones() {
        assert_eq!(split_list("a=1,b=2"), ["a=1", "b=2"]);
        assert_eq!(split_list("disk=a,,b.img,x=y"), ["disk=a,b.img", "x=y"]);
        assert_eq!(split_list("a=1,,,b=2"), ["a=1,", "b=2"]);
        assert_eq!(split_list("a=1,"), ["a=1", ""]);
    }

    #[test]
    fn a_device_with_every_key() {
        let d = parse_device(
            "socket=d.sock,disk=null:1G,serial=s1,readonly=on,num-queues=4,queue-size=128,\
             incoming=on",
            DeviceDefaults::default(),
        )
        .expect("valid");
        assert!(d.incoming);
        assert_eq!(d.socket, SocketSpec::Path("d.sock".into()));
        assert_eq!(d.disk, DiskSpec::Null(1 << 30));
        assert_eq!(d.serial.as_deref(), Some("s1"));
        assert!(d.read_only);
        assert_eq!((d.num_queues, d.queue_size), (4, 128));
        assert_eq!(d.create_size, None);
    }

    #[test]
    fn defaults_match_the_single_device_options() {
        let d = parse_device("fd=3,disk=file:a,,b.img", DeviceDefaults::default()).expect("valid");
        assert_eq!(d.socket, SocketSpec::Fd(3));
        assert_eq!(d.disk, DiskSpec::File("a,b.img".into()));
        assert_eq!(d.serial, None);
        assert!(!d.read_only);
        let single = &serve(&["--disk", "x.img"]).devices[0];
        assert_eq!(
            (d.num_queues, d.queue_size),
            (single.num_queues, single.queue_size)
        );
        assert_eq!(
            (d.num_queues, d.queue_size),
            (MAX_QUEUES, 256),
            "as many queues as a frontend may ask for"
        );
        assert!(!d.incoming && !d.starts_inactive());
    }

    #[test]
    fn incoming_is_global_with_a_per_device_override_and_leaves_readers_alone() {
        let c = serve(&["--disk", "x.img", "--incoming"]);
        assert!(c.devices[0].incoming && c.devices[0].starts_inactive());
        let c = serve(&["--disk", "x.img", "--readonly", "--incoming"]);
        assert!(
            !c.devices[0].starts_inactive(),
            "a read-only device never holds write: nothing to take over"
        );
        let c = serve(&[
            "--incoming",
            "--device",
            "socket=a,disk=a.img",
            "--device",
            "socket=b,disk=b.img,incoming=off",
            "--device",
            "socket=c,disk=c.img,readonly=on",
        ]);
        let inactive: Vec<bool> = c.devices.iter().map(|d| d.starts_inactive()).collect();
        assert_eq!(inactive, [true, false, false]);
        let c = serve(&[
            "--device",
            "socket=a,disk=a.img,incoming=on",
            "--device",
            "socket=b,disk=b.img",
        ]);
        let inactive: Vec<bool> = c.devices.iter().map(|d| d.starts_inactive()).collect();
        assert_eq!(inactive, [true, false]);
        assert!(!serve(&["--disk", "x.img"]).devices[0].starts_inactive());
    }

    #[test]
    fn bad_devices_are_named_whole() {
        for (arg, why) in [
            ("disk=a.img", "socket (or fd) is required"),
            ("socket=s", "disk is required"),
            ("socket=s,disk=a,color=red", "unknown key"),
            ("socket=s,disk=a,disk=b", "a key is given twice"),
            (
                "socket=s,fd=3,disk=a",
                "socket, fd, fd-name and kata-store exclude",
            ),
            (
                "fd-name=a,kata-store=/k,name=n,disk=a",
                "exclude each other",
            ),
            ("fd-name=a:b,disk=a", "fd-name must be"),
            ("fd-name=,disk=a", "fd-name must be"),
            ("kata-store=/k,disk=a", "name is required with kata-store"),
            ("kata-store=/k,name=a/b,disk=a", "name must be a file name"),
            ("kata-store=/k,name=..,disk=a", "name must be a file name"),
            ("kata-store=,name=n,disk=a", "kata-store is empty"),
            ("socket=s,disk=a,readonly=yes", "readonly takes on or off"),
            ("socket=s,disk=a,incoming=yes", "incoming takes on or off"),
            ("socket=s,disk=a,num-queues=x", "take numbers"),
            (
                "socket=s,disk=a,max-inflight=-1",
                "max-inflight takes a number",
            ),
            (
                "socket=s,disk=a,max-inflight=0",
                "at least one request in flight",
            ),
            ("socket=s,disk", "expected KEY=VALUE"),
        ] {
            let e = parse_device(arg, DeviceDefaults::default())
                .expect_err(arg)
                .to_string();
            assert!(e.starts_with(&format!("--device {arg:?}: ")), "{e}");
            assert!(e.contains(why), "{arg}: {e}");
        }
        let e =
            parse_device("socket=s,disk=a,num-queues=0", DeviceDefaults::default()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "--device \"socket=s,disk=a,num-queues=0\": --num-queues 0: must be between 1 and 64"
        );
        let e = parse_device("socket=s,disk=bogus:x", DeviceDefaults::default()).unwrap_err();
        assert!(
            matches!(e, ConfigError::InDevice(_, ref inner)
            if matches!(**inner, ConfigError::UnknownDiskType(..))),
            "{e}"
        );
    }

    #[test]
    fn a_kata_store_holds_the_socket_under_the_devices_name() {
        let d = dev("kata-store=/run/k,name=vol1,disk=null:1M,socket-mode=0660");
        assert_eq!(d.kata_store, Some(PathBuf::from("/run/k")));
        assert_eq!(
            d.socket,
            SocketSpec::Path("/run/k/block/sockets/vol1".into())
        );
        assert_eq!(d.socket_perms.mode, Some(0o660));
        let defaults = DeviceDefaults {
            kata_store: Some("/store".into()),
            ..DeviceDefaults::default()
        };
        let d = parse_device("name=v,disk=null:1M", defaults.clone()).expect("valid");
        assert_eq!(d.socket, SocketSpec::Path("/store/block/sockets/v".into()));
        let d = parse_device("socket=s.sock,disk=null:1M", defaults).expect("valid");
        assert_eq!(
            (d.socket, d.kata_store),
            (SocketSpec::Path("s.sock".into()), None),
            "--kata-store is the default of a device that says nowhere else to listen"
        );
    }

    #[test]
    fn an_activated_socket_is_named_and_names_its_device() {
        let d = dev("fd-name=vm1.socket,disk=null:1M");
        assert_eq!(d.socket, SocketSpec::Activated("vm1.socket".into()));
        assert_eq!(d.name, "vm1.socket");
        let e = parse_device(
            "fd-name=a,disk=null:1M,socket-group=0",
            DeviceDefaults::default(),
        )
        .unwrap_err();
        assert!(
            matches!(e, ConfigError::InDevice(_, ref inner) if **inner == ConfigError::PermsOnFd)
        );
    }

    fn dev(arg: &str) -> DeviceConfig {
        parse_device(arg, DeviceDefaults::default()).expect(arg)
    }

    #[test]
    fn devices_share_no_socket_no_written_file_and_no_namespace() {
        let ok = [dev("socket=a,disk=x.img"), dev("socket=b,disk=y.img")];
        assert_eq!(check_shared(&ok), Ok(()));
        let e = check_shared(&[dev("socket=a,disk=x.img"), dev("socket=a,disk=y.img")]);
        assert_eq!(
            e.unwrap_err().to_string(),
            "--device \"socket=a,disk=y.img\": its socket is another's"
        );
        let e = check_shared(&[
            dev("socket=a,disk=x.img,readonly=on"),
            dev("socket=b,disk=file:x.img"),
        ]);
        assert!(
            e.unwrap_err()
                .to_string()
                .contains("its image is another's")
        );
        let readers = [
            dev("socket=a,disk=x.img,readonly=on"),
            dev("socket=b,disk=x.img,readonly=on"),
        ];
        assert_eq!(check_shared(&readers), Ok(()));
        let two_ns = [
            dev("socket=a,disk=nvme-pcie:01:00.0"),
            dev("socket=b,disk=nvme-pcie:0000:01:00.0?nsid=2"),
        ];
        assert_eq!(check_shared(&two_ns), Ok(()));
        let e = check_shared(&[
            dev("socket=a,disk=nvme-pcie:01:00.0?nsid=2"),
            dev("socket=b,disk=nvme-pcie:0000:01:00.0?nsid=2"),
        ]);
        assert!(
            e.unwrap_err()
                .to_string()
                .contains("namespace is another's")
        );
        let e = check_shared(&[
            dev("socket=a,disk=nvme-pcie:01:00.0"),
            dev("socket=b,disk=nvme-pcie:01:00.0?nsid=2&interrupts=0"),
        ]);
        assert!(e.unwrap_err().to_string().contains("interrupts="));
        let d = dev("socket=b,disk=nvme-pcie:01:00.0?nsid=2&interrupts=0");
        assert_eq!(
            d.disk,
            DiskSpec::NvmePcie(NvmePcieUri {
                bdf: "0000:01:00.0".into(),
                nsid: 2,
                interrupts: false
            })
        );
    }

    #[test]
    fn several_devices_share_the_global_options() {
        let c = serve(&[
            "--device",
            "socket=a.sock,disk=null:1G,num-queues=2",
            "--device",
            "socket=b.sock,disk=b.img,readonly=on,num-queues=1",
            "--poll",
            "never",
        ]);
        assert_eq!(c.devices.len(), 2);
        assert_eq!(c.devices[0].disk, DiskSpec::Null(1 << 30));
        assert_eq!(c.devices[1].socket, SocketSpec::Path("b.sock".into()));
        assert!(c.devices[1].read_only && !c.devices[0].read_only);
        assert_eq!(c.poll, PollMode::Never);
        // Default pollers: one per queue of all devices, up to the CPUs.
        assert_eq!(c.pollers.len(), allowed_cpus().len().min(3));
        assert!(c.devices.iter().all(|d| d.create_size.is_none()));
    }

    #[test]
    fn device_excludes_the_single_device_options() {
        for opt in [
            &["--disk", "d"][..],
            &["--socket-path", "s"],
            &["--fd", "3"],
            &["--readonly"],
            &["--num-queues", "1"],
            &["--queue-size", "256"],
            &["--serial", "x"],
        ] {
            let args = ["vubd", "--device", "socket=a,disk=b"]
                .into_iter()
                .chain(opt.iter().copied());
            let e = Args::try_parse_from(args).expect_err("mixed");
            let first = e.to_string();
            let first = first.lines().next().unwrap_or_default();
            assert!(
                first.contains("--device") && first.contains(opt[0]),
                "{opt:?}: {first}"
            );
        }
        let e = parse(&[
            "--device",
            "socket=a,disk=x.img",
            "--device",
            "socket=a,disk=y.img",
        ])
        .unwrap_err();
        assert!(matches!(e, ConfigError::SharedDevice(..)), "{e}");
    }
}
