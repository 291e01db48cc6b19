//! The rate-limit methods (docs/control-api.md): `device_set_qos`, `qos_group_set`,
//! `qos_group_remove`, `qos_group_list`, and the `qos` member of `device_list`. Their
//! parameters are the keys of `--device` and `--qos-group`, parsed by `config` as those are;
//! their results use the same keys, so a result can be sent back as parameters.

use serde_json::{Map, Value, json};

use super::{Methods, no_more, object, take_string};
use crate::config::{
    DEVICE_QOS_KEYS, GROUP_KEY, QosKeyError, group_from_keys, is_device_qos_key, take_device_qos,
    unique_keys,
};
use crate::daemon::registry::DeviceError;
use crate::jsonrpc::RpcError;
use crate::qos::{BURST_KEY, GroupInfo, QosError, Rates};

impl Methods {
    /// `device_set_qos`: replaces device `name`'s limits and group as a whole.
    pub(super) fn device_set_qos(&self, params: Value) -> Result<Value, RpcError> {
        let mut p = object(params)?;
        let name = take_string(&mut p, "name")?;
        let mut keys = unique_keys(texts(p)?, is_device_qos_key, DEVICE_QOS_KEYS).map_err(bad)?;
        let (rates, group) = take_device_qos(&mut keys).map_err(bad)?;
        let (rates, group) = self
            .registry
            .set_qos(&name, rates, group.as_deref())
            .map_err(|e| match e {
                DeviceError::NoSuchDevice(_) => {
                    RpcError::invalid_params(format!("name: no device is named {name:?}"))
                }
                e => RpcError::invalid_params(e.to_string()),
            })?;
        let mut result = Map::new();
        result.insert("name".into(), json!(name));
        result.extend(device_qos(&rates, group.as_deref()));
        Ok(Value::Object(result))
    }

    /// `qos_group_set`: creates group `name` with the limits given, or gives it new ones (its
    /// devices' plans follow at once).
    pub(super) fn qos_group_set(&self, params: Value) -> Result<Value, RpcError> {
        let (name, rates) = group_from_keys(texts(object(params)?)?).map_err(bad)?;
        let groups = self.registry.groups();
        groups.set_group(&name, rates);
        // Listed again for its number of devices; a remove in between leaves it out.
        let info = groups.list().into_iter().find(|g| g.name == name);
        Ok(info.map_or(Value::Null, |g| group(&g)))
    }

    /// `qos_group_remove`: removes group `name`, refused while a device is in it.
    pub(super) fn qos_group_remove(&self, params: Value) -> Result<Value, RpcError> {
        let mut p = object(params)?;
        let name = take_string(&mut p, "name")?;
        no_more(p)?;
        self.registry
            .groups()
            .remove_group(&name)
            .map_err(|e| match e {
                QosError::NoGroup(_) => {
                    RpcError::invalid_params(format!("name: no group is named {name:?}"))
                }
                e => RpcError::invalid_params(e.to_string()),
            })?;
        Ok(json!(true))
    }

    /// `qos_group_list`: every group, by name, with its limits and its number of devices.
    pub(super) fn qos_group_list(&self, params: Value) -> Result<Value, RpcError> {
        no_more(object(params)?)?;
        let list = self.registry.groups().list();
        Ok(Value::Array(list.iter().map(group).collect()))
    }
}

/// A key's error as the method's: it names the key.
fn bad(e: QosKeyError) -> RpcError {
    RpcError::invalid_params(e.to_string())
}

/// The parameters as the text `--device` would give them: strings as they are, numbers as
/// written (a negative or fractional one is then refused by the key's parser).
fn texts(params: Map<String, Value>) -> Result<Vec<(String, String)>, RpcError> {
    params
        .into_iter()
        .map(|(key, value)| match value {
            Value::String(s) => Ok((key, s)),
            Value::Number(n) => Ok((key, n.to_string())),
            _ => Err(RpcError::invalid_params(format!(
                "{key}: must be a number or a string"
            ))),
        })
        .collect()
}

/// Limits as the methods give them: the rates that limit (0, no limit, is left out), and the
/// burst allowance.
fn limits(rates: &Rates) -> Map<String, Value> {
    let mut m: Map<String, Value> = rates
        .named()
        .filter(|&(_, rate)| rate > 0)
        .map(|(key, rate)| (key.to_owned(), json!(rate)))
        .collect();
    let ms = u64::try_from(rates.burst.as_millis()).unwrap_or(u64::MAX);
    m.insert(BURST_KEY.to_owned(), json!(ms));
    m
}

/// A device's QoS settings: its limits, and its group if it is in one.
pub(super) fn device_qos(rates: &Rates, group: Option<&str>) -> Map<String, Value> {
    let mut m = limits(rates);
    if let Some(g) = group {
        m.insert(GROUP_KEY.to_owned(), json!(g));
    }
    m
}

/// A group as `qos_group_list` gives it.
fn group(g: &GroupInfo) -> Value {
    let mut m = Map::new();
    m.insert("name".into(), json!(g.name));
    m.extend(limits(&g.rates));
    m.insert("devices".into(), json!(g.devices));
    Value::Object(m)
}

#[cfg(test)]
mod tests;
