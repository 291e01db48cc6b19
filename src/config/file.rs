//! `--config FILE`: devices described in TOML, one `[[device]]` table each, with the keys of
//! `--device` (kebab-case, values as TOML strings, integers and booleans). Unknown tables or
//! keys are errors naming them with their line; the devices then go through the same checks as
//! those of `--device` ([`device_from_keys`]).
//!
//! ```toml
//! [[device]]
//! name = "vm1-root"
//! socket = "/run/vubd/vm1-root.sock"
//! disk = "/var/lib/images/vm1-root.img"
//! num-queues = 2
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

/// The file's whole content.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    device: Vec<Device>,
}

/// One `[[device]]`: the keys of `--device`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct Device {
    name: Option<String>,
    socket: Option<String>,
    fd: Option<i32>,
    disk: Option<String>,
    serial: Option<String>,
    readonly: Option<bool>,
    num_queues: Option<u16>,
    queue_size: Option<u16>,
    incoming: Option<bool>,
    max_inflight: Option<u32>,
    socket_mode: Option<String>,
    socket_group: Option<String>,
}

impl Device {
    /// The keys and values as `--device` would have them.
    fn keys(self) -> Vec<(String, String)> {
        let switch = |b: bool| if b { "on" } else { "off" }.to_owned();
        [
            ("name", self.name),
            ("socket", self.socket),
            ("fd", self.fd.map(|v| v.to_string())),
            ("disk", self.disk),
            ("serial", self.serial),
            ("readonly", self.readonly.map(switch)),
            ("num-queues", self.num_queues.map(|v| v.to_string())),
            ("queue-size", self.queue_size.map(|v| v.to_string())),
            ("incoming", self.incoming.map(switch)),
            ("max-inflight", self.max_inflight.map(|v| v.to_string())),
            ("socket-mode", self.socket_mode),
            ("socket-group", self.socket_group),
        ]
        .into_iter()
        .filter_map(|(k, v)| Some((k.to_owned(), v?)))
        .collect()
    }
}

/// The devices of the configuration file at `path`.
pub(super) fn load(
    path: &Path,
    defaults: DeviceDefaults,
) -> Result<Vec<DeviceConfig>, ConfigError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError::ConfigFile(shown.clone(), e.to_string()))?;
    parse(&shown, &text, defaults)
}

/// The devices of configuration text `text`, whose errors name `file`.
fn parse(
    file: &str,
    text: &str,
    defaults: DeviceDefaults,
) -> Result<Vec<DeviceConfig>, ConfigError> {
    let parsed: File = toml::from_str(text)
        .map_err(|e| ConfigError::ConfigFile(file.to_owned(), one_line(&e, text)))?;
    parsed
        .device
        .into_iter()
        .enumerate()
        .map(|(i, d)| {
            let label = format!("--config {file}: device {}", i + 1);
            device_from_keys(&label, d.keys(), defaults)
        })
        .collect()
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
        let d = parse("v.toml", text, DeviceDefaults::default()).expect("valid");
        assert_eq!(d.len(), 2);
        assert_eq!(d[0].name, "root");
        assert_eq!(d[0].socket, SocketSpec::Path("r.sock".into()));
        assert_eq!(d[0].disk, DiskSpec::File("r.img".into()));
        assert_eq!((d[0].num_queues, d[0].read_only), (2, true));
        assert_eq!(d[0].max_in_flight, Some(64));
        assert_eq!(d[1].socket, SocketSpec::Fd(3));
        assert_eq!(d[1].name, "fd3");
        assert!(
            parse("v.toml", "", DeviceDefaults::default())
                .expect("empty")
                .is_empty()
        );
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
