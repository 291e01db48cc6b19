//! `--config FILE`: devices described in TOML, one `[[device]]` table each, with the keys of
//! `--device` (kebab-case, values as TOML strings, integers and booleans; a byte rate also as
//! a string such as `"200M"`), and groups of devices sharing rate limits, one `[[qos-group]]`
//! table each, with the keys of `--qos-group`. Unknown tables or keys are errors naming them
//! with their line; the devices and groups then go through the same checks as those of
//! `--device` ([`device_from_keys`]) and `--qos-group` ([`group_from_keys`]).
//!
//! ```toml
//! [[qos-group]]
//! name = "tenant-a"
//! iops-total = 20000
//! bps-total = "400M"
//!
//! [[device]]
//! name = "vm1-root"
//! socket = "/run/vubd/vm1-root.sock"
//! disk = "/var/lib/images/vm1-root.img"
//! num-queues = 2
//! iops-write = 5000
//! qos-group = "tenant-a"
//!
//! [[device]]
//! socket = "/run/vubd/scratch.sock"
//! disk = "null:16G"
//! readonly = true
//! ```

use std::path::Path;

use serde::Deserialize;

use super::ConfigError;
use super::device::{DeviceConfig, DeviceDefaults, device_from_keys};
use super::qos::{GroupConfig, group_from_keys};
use crate::qos::{BURST_KEY, RATE_KEYS};

/// The file's whole content.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    device: Vec<Device>,
    #[serde(default, rename = "qos-group")]
    qos_group: Vec<Group>,
}

/// What a configuration file describes.
#[derive(Debug)]
pub(super) struct Loaded {
    pub devices: Vec<DeviceConfig>,
    pub groups: Vec<GroupConfig>,
}

/// A limit's value, an integer or a string (a byte rate such as `"200M"`), kept as text for
/// the parser that `--device` and `--qos-group` use, so that the errors are the same.
#[derive(Debug)]
struct Text(String);

impl<'de> Deserialize<'de> for Text {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Text;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an integer or a string such as \"200M\"")
            }
            fn visit_i64<E>(self, v: i64) -> Result<Text, E> {
                Ok(Text(v.to_string()))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Text, E> {
                Ok(Text(v.to_string()))
            }
            fn visit_str<E>(self, v: &str) -> Result<Text, E> {
                Ok(Text(v.to_owned()))
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// The limit keys in the order of [`RATE_KEYS`] then [`BURST_KEY`], with their values.
fn limit_keys(values: [Option<Text>; 7]) -> impl Iterator<Item = (&'static str, Option<String>)> {
    RATE_KEYS
        .into_iter()
        .chain([BURST_KEY])
        .zip(values)
        .map(|(k, v)| (k, v.map(|t| t.0)))
}

/// One `[[qos-group]]`: the keys of `--qos-group`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct Group {
    name: Option<String>,
    iops_total: Option<Text>,
    iops_read: Option<Text>,
    iops_write: Option<Text>,
    bps_total: Option<Text>,
    bps_read: Option<Text>,
    bps_write: Option<Text>,
    qos_burst_ms: Option<Text>,
}

impl Group {
    /// The keys and values as `--qos-group` would have them.
    fn keys(self) -> Vec<(String, String)> {
        let limits = [
            self.iops_total,
            self.iops_read,
            self.iops_write,
            self.bps_total,
            self.bps_read,
            self.bps_write,
            self.qos_burst_ms,
        ];
        std::iter::once(("name", self.name))
            .chain(limit_keys(limits))
            .filter_map(|(k, v)| Some((k.to_owned(), v?)))
            .collect()
    }
}

/// One `[[device]]`: the keys of `--device`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct Device {
    name: Option<String>,
    socket: Option<String>,
    fd: Option<i32>,
    fd_name: Option<String>,
    kata_store: Option<String>,
    disk: Option<String>,
    serial: Option<String>,
    readonly: Option<bool>,
    num_queues: Option<u16>,
    queue_size: Option<u16>,
    incoming: Option<bool>,
    max_inflight: Option<u32>,
    socket_mode: Option<String>,
    socket_group: Option<String>,
    iops_total: Option<Text>,
    iops_read: Option<Text>,
    iops_write: Option<Text>,
    bps_total: Option<Text>,
    bps_read: Option<Text>,
    bps_write: Option<Text>,
    qos_burst_ms: Option<Text>,
    qos_group: Option<String>,
}

impl Device {
    /// The keys and values as `--device` would have them.
    fn keys(self) -> Vec<(String, String)> {
        let switch = |b: bool| if b { "on" } else { "off" }.to_owned();
        let limits = [
            self.iops_total,
            self.iops_read,
            self.iops_write,
            self.bps_total,
            self.bps_read,
            self.bps_write,
            self.qos_burst_ms,
        ];
        [
            ("name", self.name),
            ("socket", self.socket),
            ("fd", self.fd.map(|v| v.to_string())),
            ("fd-name", self.fd_name),
            ("kata-store", self.kata_store),
            ("disk", self.disk),
            ("serial", self.serial),
            ("readonly", self.readonly.map(switch)),
            ("num-queues", self.num_queues.map(|v| v.to_string())),
            ("queue-size", self.queue_size.map(|v| v.to_string())),
            ("incoming", self.incoming.map(switch)),
            ("max-inflight", self.max_inflight.map(|v| v.to_string())),
            ("socket-mode", self.socket_mode),
            ("socket-group", self.socket_group),
            ("qos-group", self.qos_group),
        ]
        .into_iter()
        .chain(limit_keys(limits))
        .filter_map(|(k, v)| Some((k.to_owned(), v?)))
        .collect()
    }
}

/// The devices and groups of the configuration file at `path`.
pub(super) fn load(path: &Path, defaults: DeviceDefaults) -> Result<Loaded, ConfigError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError::ConfigFile(shown.clone(), e.to_string()))?;
    parse(&shown, &text, defaults)
}

/// The devices and groups of configuration text `text`, whose errors name `file`.
fn parse(file: &str, text: &str, defaults: DeviceDefaults) -> Result<Loaded, ConfigError> {
    let parsed: File = toml::from_str(text)
        .map_err(|e| ConfigError::ConfigFile(file.to_owned(), one_line(&e, text)))?;
    let devices = parsed
        .device
        .into_iter()
        .enumerate()
        .map(|(i, d)| {
            let label = format!("--config {file}: device {}", i + 1);
            device_from_keys(&label, d.keys(), defaults.clone())
        })
        .collect::<Result<_, _>>()?;
    let groups = parsed
        .qos_group
        .into_iter()
        .enumerate()
        .map(|(i, g)| {
            let label = format!("--config {file}: qos-group {}", i + 1);
            match group_from_keys(g.keys()) {
                Ok((name, rates)) => Ok(GroupConfig { name, rates, label }),
                Err(e) => Err(ConfigError::BadQos(label, e)),
            }
        })
        .collect::<Result<_, _>>()?;
    Ok(Loaded { devices, groups })
}

/// A TOML error of `text` on one line: where (`line L, column C`, and the line itself, which
/// names the key), and its message.
fn one_line(e: &toml::de::Error, text: &str) -> String {
    let message = e.message().trim_end_matches('\n');
    match e.span() {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let start = before.rfind('\n').map_or(0, |i| i + 1);
            let column = before.len() - start + 1;
            let source = text[start..].lines().next().unwrap_or_default().trim();
            format!("line {line}, column {column} ({source}): {message}")
        }
        None => message.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{DiskSpec, SocketSpec};

    #[test]
    fn activated_and_kata_store_devices_have_their_keys() {
        let text = r#"
            [[device]]
            fd-name = "vm1"
            disk = "null:1M"

            [[device]]
            name = "vol"
            kata-store = "/run/k"
            disk = "null:1M"
        "#;
        let d = parse("v.toml", text, DeviceDefaults::default())
            .expect("valid")
            .devices;
        assert_eq!(d[0].socket, SocketSpec::Activated("vm1".into()));
        assert_eq!(
            d[1].socket,
            SocketSpec::Path("/run/k/block/sockets/vol".into())
        );
    }

    #[test]
    fn devices_read_as_their_device_arguments_would() {
        let text = r#"
            [[device]]
            name = "root"
            socket = "r.sock"
            disk = "r.img"
            num-queues = 2
            readonly = true
            max-inflight = 64

            [[device]]
            fd = 3
            disk = "null:1M"
        "#;
        let d = parse("v.toml", text, DeviceDefaults::default())
            .expect("valid")
            .devices;
        assert_eq!(d.len(), 2);
        assert_eq!(d[0].name, "root");
        assert_eq!(d[0].socket, SocketSpec::Path("r.sock".into()));
        assert_eq!(d[0].disk, DiskSpec::File("r.img".into()));
        assert_eq!((d[0].num_queues, d[0].read_only), (2, true));
        assert_eq!(d[0].max_in_flight, Some(64));
        assert_eq!(d[1].socket, SocketSpec::Fd(3));
        assert_eq!(d[1].name, "fd3");
        let empty = parse("v.toml", "", DeviceDefaults::default()).expect("empty");
        assert!(empty.devices.is_empty() && empty.groups.is_empty());
    }

    #[test]
    fn groups_and_limits_read_as_their_arguments_would() {
        let text = r#"
            [[qos-group]]
            name = "gold"
            iops-total = 20000
            bps-read = "400M"
            qos-burst-ms = 500

            [[device]]
            socket = "a.sock"
            disk = "null:1M"
            iops-write = 100
            bps-total = 1048576
            bps-write = "2G"
            qos-group = "gold"
        "#;
        let l = parse("v.toml", text, DeviceDefaults::default()).expect("valid");
        assert_eq!(l.groups.len(), 1);
        let g = &l.groups[0];
        assert_eq!(
            (g.name.as_str(), g.label.as_str()),
            ("gold", "--config v.toml: qos-group 1")
        );
        assert_eq!(
            (g.rates.iops, g.rates.bps),
            ([20000, 0, 0], [0, 400 << 20, 0])
        );
        assert_eq!(g.rates.burst, std::time::Duration::from_millis(500));
        let d = &l.devices[0];
        assert_eq!(
            (d.qos.iops, d.qos.bps),
            ([0, 0, 100], [1 << 20, 0, 2 << 30])
        );
        assert_eq!(d.qos_group.as_deref(), Some("gold"));
    }

    #[test]
    fn bad_groups_and_limits_name_the_file_the_table_and_the_key() {
        for (text, want) in [
            (
                "[[qos-group]]\nname = \"g\"\ncolor = 1\n",
                "line 3, column 1 (color = 1): unknown field `color`",
            ),
            (
                "[[qos-group]]\niops-total = 5\n",
                "--config v.toml: qos-group 1: name is required",
            ),
            (
                "[[qos-group]]\nname = \"g\"\niops-total = -1\n",
                "--config v.toml: qos-group 1: iops-total takes a number of operations per second",
            ),
            (
                "[[qos-group]]\nname = \"g\"\nbps-total = 1.5\n",
                "line 3, column 13 (bps-total = 1.5): invalid type: floating point `1.5`, \
                 expected an integer or a string such as \"200M\"",
            ),
            (
                "[[device]]\nsocket = \"a\"\ndisk = \"a.img\"\nbps-read = \"fast\"\n",
                "--config v.toml: device 1: bps-read takes a byte rate such as 200M",
            ),
            (
                "[[device]]\nsocket = \"a\"\ndisk = \"a.img\"\nqos-burst-ms = 0\n",
                "--config v.toml: device 1: qos-burst-ms takes 1 to 60000 milliseconds",
            ),
            (
                "[[device]]\nsocket = \"a\"\ndisk = \"a.img\"\nqos-group = 1\n",
                "line 4, column 13 (qos-group = 1): invalid type: integer `1`, expected a string",
            ),
        ] {
            let e = parse("v.toml", text, DeviceDefaults::default())
                .expect_err(text)
                .to_string();
            assert!(
                e.starts_with("--config v.toml: ") && e.contains(want),
                "{text:?}: {e}"
            );
        }
    }

    #[test]
    fn errors_name_the_file_the_device_and_the_key() {
        for (text, want) in [
            (
                "[[device]]\nsocket = \"a\"\ndisk = \"a.img\"\ncolor = \"red\"\n",
                "unknown field `color`",
            ),
            ("[[disk]]\n", "unknown field `disk`"),
            (
                "[[device]]\nsocket = \"a\"\ndisk = \"a.img\"\nnum-queues = \"two\"\n",
                "num-queues",
            ),
            (
                "[[device]]\nsocket = \"a\"\n",
                "--config v.toml: device 1: disk is required",
            ),
            (
                "[[device]]\nsocket = \"a\"\ndisk = \"a.img\"\nnum-queues = 0\n",
                "device 1: --num-queues 0",
            ),
            ("[[device]\n", "line 1, column"),
            ("\n\n[[device]]\nsocket = 3\n", "line 4, column 10"),
        ] {
            let e = parse("v.toml", text, DeviceDefaults::default())
                .expect_err(text)
                .to_string();
            assert!(e.contains(want), "{text:?}: {e}");
            assert!(e.contains("v.toml"), "{e}");
        }
    }
}
