//! `vubd ctl`: one request to a running vubd's control socket, its answer printed as a table
//! (or as JSON with `--json`). Parameters are `KEY=VALUE` words, sent as strings. `vubd ctl
//! stats` is two requests and the rates between them (`ctl::stats`); rate limits print as
//! the keys that set them (`ctl::qos`).
//!
//! The daemon resolves no host name once it runs (its sandbox allows no DNS), so `device_add`
//! resolves an NVMe/TCP target's name here and sends the address.

use std::fmt::Write as _;
use std::net::{IpAddr, ToSocketAddrs};
use std::time::Duration;

use serde_json::{Map, Value};

use crate::config::{CtlConfig, DiskSpec, parse_disk};
use crate::jsonrpc::{Client, ClientError};
use crate::units::human_bytes;

mod qos;
mod stats;

/// How long an answer may take: adding a device may wait for an NVMe/TCP target.
const ANSWER_WAIT: Duration = Duration::from_secs(120);

/// Why `vubd ctl` failed.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("disk {disk:?}: cannot resolve {host}")]
    Resolve {
        disk: String,
        host: String,
        #[source]
        source: std::io::Error,
    },
    #[error("unknown parameter {0:?} (stats takes name and interval)")]
    UnknownParam(String),
    #[error("interval={0:?}: a number of seconds, more than 0 and at most 3600")]
    Interval(String),
    #[error("the answer to device_get_stats is not the one vubd gives")]
    BadStats,
}

/// Sends the request of `cfg` and returns what to print.
pub fn run(cfg: &CtlConfig) -> Result<String, CtlError> {
    if cfg.method == "stats" {
        return stats::run(cfg);
    }
    let mut params = Map::new();
    for (key, value) in &cfg.params {
        let value = if cfg.method == "device_add" && key == "disk" {
            resolve_disk(value)?
        } else {
            value.clone()
        };
        params.insert(key.clone(), Value::String(value));
    }
    let params = if params.is_empty() {
        Value::Null
    } else {
        Value::Object(params)
    };
    let mut client = Client::connect(&cfg.socket, ANSWER_WAIT)?;
    let result = client.call(&cfg.method, params)?;
    if cfg.json {
        let mut text = serde_json::to_string_pretty(&result).unwrap_or_default();
        text.push('\n');
        return Ok(text);
    }
    Ok(human(&cfg.method, &cfg.params, &result))
}

/// `disk` with an NVMe/TCP target's host name replaced by its first address.
fn resolve_disk(disk: &str) -> Result<String, CtlError> {
    let Ok(DiskSpec::NvmeTcp(mut uri)) = parse_disk(disk) else {
        // Anything else goes as it is; the daemon says what is wrong with it.
        return Ok(disk.to_owned());
    };
    if uri.host.parse::<IpAddr>().is_ok() {
        return Ok(disk.to_owned());
    }
    let resolve = |source| CtlError::Resolve {
        disk: disk.to_owned(),
        host: uri.host.clone(),
        source,
    };
    let ip = (uri.host.as_str(), uri.port)
        .to_socket_addrs()
        .map_err(resolve)?
        .next()
        .ok_or_else(|| resolve(std::io::ErrorKind::NotFound.into()))?
        .ip();
    uri.host = ip.to_string();
    Ok(DiskSpec::NvmeTcp(uri).to_string())
}

/// The answer as a person reads it.
fn human(method: &str, params: &[(String, String)], result: &Value) -> String {
    let param = |k: &str| {
        params
            .iter()
            .find(|(key, _)| key == k)
            .map_or("", |(_, v)| v.as_str())
    };
    match method {
        "device_add" => format!(
            "added {}\n",
            result
                .get("name")
                .and_then(Value::as_str)
                .unwrap_or_default()
        ),
        "device_remove" => format!("removed {}\n", param("name")),
        "device_resize" => format!(
            "{}: {}\n",
            param("name"),
            human_bytes(result.get("capacity").and_then(Value::as_u64).unwrap_or(0))
        ),
        "log_set_level" => format!("log level: {}\n", param("level")),
        "version" => format!(
            "vubd {}\n",
            result.get("version").and_then(Value::as_str).unwrap_or("?")
        ),
        "device_list" => device_table(result),
        "device_set_qos" => match qos::settings(result).as_str() {
            "-" => format!("{}: no limit\n", param("name")),
            s => format!("{}: {s}\n", param("name")),
        },
        "qos_group_set" => format!(
            "group {}: {} (devices: {})\n",
            param("name"),
            qos::settings(result),
            result.get("devices").and_then(Value::as_u64).unwrap_or(0)
        ),
        "qos_group_remove" => format!("removed group {}\n", param("name")),
        "qos_group_list" => qos::group_table(result),
        _ => format!(
            "{}\n",
            serde_json::to_string_pretty(result).unwrap_or_default()
        ),
    }
}

/// `device_list` as a table, a device per line.
fn device_table(result: &Value) -> String {
    let devices = result.as_array().map(Vec::as_slice).unwrap_or_default();
    let mut rows = vec![
        [
            "NAME", "SIZE", "QUEUES", "MODE", "FRONTEND", "QOS", "DISK", "SOCKET",
        ]
        .map(str::to_owned)
        .to_vec(),
    ];
    for d in devices {
        let s = |k: &str| d.get(k).and_then(Value::as_str).unwrap_or("?").to_owned();
        let n = |k: &str| d.get(k).and_then(Value::as_u64).unwrap_or(0);
        let flag = |k: &str| d.get(k).and_then(Value::as_bool).unwrap_or(false);
        rows.push(vec![
            s("name"),
            human_bytes(n("capacity")),
            n("num_queues").to_string(),
            if flag("readonly") { "ro" } else { "rw" }.to_owned(),
            if flag("connected") {
                "connected"
            } else {
                "waiting"
            }
            .to_owned(),
            d.get("qos").map_or_else(|| "-".to_owned(), qos::settings),
            s("disk"),
            s("socket"),
        ]);
    }
    table(&rows)
}

/// Rows of cells as columns, each as wide as its widest cell, two spaces apart; the first row
/// is the header.
fn table(rows: &[Vec<String>]) -> String {
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for r in rows {
        let mut line = String::new();
        for (c, cell) in r.iter().enumerate() {
            if c + 1 == r.len() {
                line.push_str(cell);
            } else {
                let _ = write!(line, "{cell:<w$}  ", w = widths[c]);
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn device_lists_read_as_a_table() {
        let list = json!([
            {"name": "a", "capacity": 1u64 << 30, "num_queues": 2, "readonly": false,
             "connected": true, "disk": "a.img", "socket": "/run/a.sock",
             "qos": {"iops-total": 5000, "qos-burst-ms": 100, "qos-group": "gold"}},
            {"name": "longer-name", "capacity": 4096, "num_queues": 1, "readonly": true,
             "connected": false, "disk": "null:4096", "socket": "/run/b.sock",
             "qos": {"qos-burst-ms": 100}},
        ]);
        assert_eq!(
            device_table(&list),
            "NAME         SIZE   QUEUES  MODE  FRONTEND   QOS                             DISK       SOCKET\n\
             a            1 GiB  2       rw    connected  iops-total=5000,qos-group=gold  a.img      /run/a.sock\n\
             longer-name  4 KiB  1       ro    waiting    -                               null:4096  /run/b.sock\n"
        );
    }

    #[test]
    fn a_target_name_becomes_its_address_and_other_disks_pass_unchanged() {
        let d = resolve_disk("nvme-tcp://localhost:4420/nqn.2014-08.org.example:x")
            .expect("localhost resolves");
        assert!(
            d == "nvme-tcp://127.0.0.1:4420/nqn.2014-08.org.example:x?nsid=1"
                || d == "nvme-tcp://[::1]:4420/nqn.2014-08.org.example:x?nsid=1",
            "{d}"
        );
        for same in [
            "a.img",
            "null:1M",
            "nvme-tcp://10.0.0.1/nqn.2014-08.org.example:x",
            "bogus:x",
        ] {
            assert_eq!(resolve_disk(same).expect("unchanged"), same);
        }
    }
}
