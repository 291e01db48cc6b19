//! The control socket's methods (docs/control-api.md): each checks its parameters, names the
//! one that is wrong, and calls the registry. Parameters are by name (a JSON object); a method
//! without parameters takes none or an empty object. The rate-limit methods are in [`qos`].

mod qos;

use std::sync::Arc;

use serde_json::{Map, Value, json};

use super::registry::{DeviceError, Registry};
use super::{DaemonError, error_chain};
use crate::bdev::capacity::{Resize, ResizeError};
use crate::config::{DeviceDefaults, SocketSpec, device_from_keys, parse_size};
use crate::jsonrpc::{METHOD_NOT_FOUND, RpcError};
use crate::metrics;

/// Changes what vubd logs: a `tracing` filter (`info`, `debug`, `vubd=debug,warn`, ...).
pub struct LogControl(Box<SetFilter>);

/// Sets the log filter, or says why it cannot.
type SetFilter = dyn Fn(&str) -> Result<(), String> + Send + Sync;

impl LogControl {
    pub fn new(set: impl Fn(&str) -> Result<(), String> + Send + Sync + 'static) -> Self {
        Self(Box::new(set))
    }
}

impl std::fmt::Debug for LogControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LogControl")
    }
}

/// The methods, in the order docs/control-api.md has them.
const METHODS: &str = "device_add, device_remove, device_list, device_get_stats, device_resize, \
                       device_set_qos, qos_group_set, qos_group_remove, qos_group_list, \
                       log_set_level, version";

/// What the methods act on.
#[derive(Debug)]
pub(super) struct Methods {
    pub registry: Arc<Registry>,
    /// What `device_add`'s keys default to (the global `--incoming`, `--socket-mode`, ...).
    pub defaults: DeviceDefaults,
    pub log: LogControl,
}

impl Methods {
    /// Calls `method` with `params` (`Value::Null` when the request had none).
    pub(super) fn call(&self, method: &str, params: Value) -> Result<Value, RpcError> {
        match method {
            "device_add" => self.device_add(object(params)?),
            "device_remove" => {
                let mut p = object(params)?;
                let name = take_string(&mut p, "name")?;
                no_more(p)?;
                self.registry
                    .remove(&name)
                    .map_err(|e| RpcError::invalid_params(e.to_string()))?;
                Ok(json!(true))
            }
            "device_resize" => {
                let mut p = object(params)?;
                let name = take_string(&mut p, "name")?;
                let size = match p.remove("size") {
                    None => None,
                    Some(Value::Number(n)) => Some(n.as_u64().ok_or_else(|| {
                        RpcError::invalid_params("size: must be a whole number of bytes")
                    })?),
                    Some(Value::String(s)) => Some(parse_size(&s).ok_or_else(|| {
                        RpcError::invalid_params(format!(
                            "size: {s:?} is not a size (bytes, or 512M, 16G, ...)"
                        ))
                    })?),
                    Some(_) => {
                        return Err(RpcError::invalid_params(
                            "size: must be a number of bytes or a string such as 16G",
                        ));
                    }
                };
                let shrink = match p.remove("force") {
                    None => false,
                    Some(Value::Bool(b)) => b,
                    Some(Value::String(s)) if s == "true" || s == "false" => s == "true",
                    Some(_) => return Err(RpcError::invalid_params("force: must be a boolean")),
                };
                no_more(p)?;
                let capacity = self
                    .registry
                    .resize(&name, Resize { size, shrink })
                    .map_err(|e| match e {
                        DeviceError::Resize(
                            ResizeError::Io { .. }
                            | ResizeError::Lock(_)
                            | ResizeError::Namespace(_),
                        ) => RpcError::failed(error_chain(&e)),
                        e => RpcError::invalid_params(error_chain(&e)),
                    })?;
                Ok(json!({"name": name, "capacity": capacity}))
            }
            "device_list" => {
                let mut p = object(params)?;
                let name = take_optional_string(&mut p, "name")?;
                no_more(p)?;
                self.device_list(name.as_deref())
            }
            "device_get_stats" => {
                let mut p = object(params)?;
                let name = take_optional_string(&mut p, "name")?;
                no_more(p)?;
                self.device_get_stats(name.as_deref())
            }
            "device_set_qos" => self.device_set_qos(params),
            "qos_group_set" => self.qos_group_set(params),
            "qos_group_remove" => self.qos_group_remove(params),
            "qos_group_list" => self.qos_group_list(params),
            "log_set_level" => {
                let mut p = object(params)?;
                let level = take_string(&mut p, "level")?;
                no_more(p)?;
                (self.log.0)(&level)
                    .map_err(|e| RpcError::invalid_params(format!("level: {e}")))?;
                Ok(json!(true))
            }
            "version" => {
                no_more(object(params)?)?;
                Ok(json!({"version": env!("CARGO_PKG_VERSION")}))
            }
            m => Err(RpcError::new(
                METHOD_NOT_FOUND,
                format!("unknown method {m:?} (known: {METHODS})"),
            )),
        }
    }

    /// `device_add`: the keys of `--device`, their values strings, numbers or booleans.
    fn device_add(&self, params: Map<String, Value>) -> Result<Value, RpcError> {
        let mut keys = Vec::with_capacity(params.len());
        for (key, value) in params {
            let text = match value {
                Value::String(s) => s,
                Value::Number(n) => n.to_string(),
                Value::Bool(b) => if b { "on" } else { "off" }.to_owned(),
                _ => {
                    return Err(RpcError::invalid_params(format!(
                        "{key}: must be a string, a number or a boolean"
                    )));
                }
            };
            keys.push((key, text));
        }
        let cfg = device_from_keys("device", keys, self.defaults.clone())
            .map_err(|e| RpcError::invalid_params(e.to_string()))?;
        match cfg.socket {
            SocketSpec::Fd(_) => {
                return Err(RpcError::invalid_params(
                    "fd: only for a socket vubd inherits at startup; give socket=PATH",
                ));
            }
            SocketSpec::Activated(_) => {
                return Err(RpcError::invalid_params(
                    "fd-name: only for a socket systemd passes at startup; give socket=PATH \
                     or kata-store=DIR",
                ));
            }
            SocketSpec::Path(_) => {}
        }
        let name = cfg.name.clone();
        self.registry.add(cfg).map_err(|e| match e {
            DaemonError::Config(_) | DaemonError::HostName(_) | DaemonError::Qos { .. } => {
                RpcError::invalid_params(error_chain(&e))
            }
            e => RpcError::failed(error_chain(&e)),
        })?;
        Ok(json!({"name": name}))
    }

    /// `device_list`: every device (or the one named), as a list.
    fn device_list(&self, name: Option<&str>) -> Result<Value, RpcError> {
        let devices = self.registry.list();
        if let Some(n) = name
            && !devices.iter().any(|d| d.cfg.name == n)
        {
            return Err(RpcError::invalid_params(format!(
                "name: no device is named {n:?}"
            )));
        }
        let list: Vec<Value> = devices
            .iter()
            .filter(|d| name.is_none_or(|n| d.cfg.name == n))
            .map(|d| {
                let socket = match &d.cfg.socket {
                    SocketSpec::Path(p) => json!(p.display().to_string()),
                    SocketSpec::Fd(fd) => json!(format!("fd:{fd}")),
                    SocketSpec::Activated(name) => json!(format!("fd-name:{name}")),
                };
                json!({
                    "name": d.cfg.name,
                    "socket": socket,
                    "disk": d.cfg.disk.to_string(),
                    "readonly": d.info.read_only,
                    "num_queues": d.cfg.num_queues,
                    "queue_size": d.cfg.queue_size,
                    "capacity": d.info.capacity_bytes,
                    "block_size": d.info.logical_block_size,
                    "connected": d.connected,
                    "qos": qos::device_qos(&d.qos, d.qos_group.as_deref()),
                })
            })
            .collect();
        Ok(Value::Array(list))
    }

    /// `device_get_stats`: the metrics of every device (or the one named), docs/metrics.md.
    fn device_get_stats(&self, name: Option<&str>) -> Result<Value, RpcError> {
        let Some(readings) = self.registry.read_metrics(name) else {
            return Err(RpcError::failed("vubd counts nothing (--metrics off)"));
        };
        if let Some(n) = name
            && readings.is_empty()
        {
            return Err(RpcError::invalid_params(format!(
                "name: no device is named {n:?}"
            )));
        }
        Ok(metrics::json::stats(&readings))
    }
}

/// The parameters as an object: none is an empty one; by position is refused.
fn object(params: Value) -> Result<Map<String, Value>, RpcError> {
    match params {
        Value::Null => Ok(Map::new()),
        Value::Object(m) => Ok(m),
        _ => Err(RpcError::invalid_params(
            "parameters are given by name (a JSON object)",
        )),
    }
}

fn take_optional_string(p: &mut Map<String, Value>, key: &str) -> Result<Option<String>, RpcError> {
    match p.remove(key) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(RpcError::invalid_params(format!("{key}: must be a string"))),
    }
}

fn take_string(p: &mut Map<String, Value>, key: &str) -> Result<String, RpcError> {
    take_optional_string(p, key)?
        .ok_or_else(|| RpcError::invalid_params(format!("{key}: required")))
}

/// Refuses parameters the method does not know.
fn no_more(p: Map<String, Value>) -> Result<(), RpcError> {
    match p.keys().next() {
        None => Ok(()),
        Some(k) => Err(RpcError::invalid_params(format!("unknown parameter {k:?}"))),
    }
}
