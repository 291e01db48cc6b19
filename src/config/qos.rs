//! The rate-limit keys, parsed here once for every place that takes them: a device's own
//! limits and group (`--device`, `[[device]]`, `device_add`, `device_set_qos`) and a group's
//! limits (`--qos-group`, `[[qos-group]]`, `qos_group_set`).
//!
//! `iops-total`, `iops-read`, `iops-write` are operations per second (plain numbers);
//! `bps-total`, `bps-read`, `bps-write` bytes per second (a number, or one with a binary
//! suffix as `--disk null:SIZE` takes: `200M` is 200 MiB/s); 0 is no limit. `qos-burst-ms`
//! (1 to 60000, default 100) is how much of its rates a device below them saves up.
//! `qos-group` names a group whose limits the device shares with the group's other devices.

use std::collections::HashMap;
use std::time::Duration;

use thiserror::Error;

use super::{ConfigError, device::is_valid_name, parse_size};
use crate::qos::{BURST_KEY, MAX_BURST, RATE_KEYS, Rates};

/// The key naming a device's group.
pub const GROUP_KEY: &str = "qos-group";

/// The keys of a group: its name and its limits.
pub const GROUP_KEYS: &str =
    "name, iops-total, iops-read, iops-write, bps-total, bps-read, bps-write, qos-burst-ms";

/// The keys of a device's QoS settings (`device_set_qos`, besides `name`).
pub const DEVICE_QOS_KEYS: &str = "name, iops-total, iops-read, iops-write, bps-total, bps-read, \
                                   bps-write, qos-burst-ms, qos-group";

/// A QoS key or value that is wrong; the message names the key. Where it came from (the
/// `--device` or `--qos-group` argument, a control request) is said by the caller.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum QosKeyError {
    #[error("{0} takes a number of operations per second")]
    Iops(&'static str),
    #[error("{0} takes a byte rate such as 200M")]
    Bps(&'static str),
    #[error("qos-burst-ms takes 1 to 60000 milliseconds")]
    Burst,
    #[error("qos-group must be 1 to 64 bytes without control characters")]
    GroupName,
    #[error("name must be 1 to 64 bytes without control characters")]
    Name,
    #[error("name is required")]
    NameRequired,
    #[error("{0} is given twice")]
    Twice(String),
    #[error("unknown key {0:?} (known: {1})")]
    Unknown(String, &'static str),
}

/// A group of devices sharing limits, as configured (`--qos-group`, `[[qos-group]]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupConfig {
    /// Its name (as device names: 1 to 64 bytes, no control characters). Unique.
    pub name: String,
    /// Its limits, which its devices' requests count against together.
    pub rates: Rates,
    /// Where it was configured (`--qos-group "ARG"`, `--config FILE: qos-group N`), to name
    /// it in errors.
    pub label: String,
}

/// Whether `key` is a limit key: a rate or the burst allowance.
pub fn is_limit_key(key: &str) -> bool {
    key == BURST_KEY || RATE_KEYS.contains(&key)
}

/// Whether `key` is a device's QoS key: a limit key or `qos-group`.
pub fn is_device_qos_key(key: &str) -> bool {
    key == GROUP_KEY || is_limit_key(key)
}

/// Sets the limit `key` (one of [`RATE_KEYS`] or [`BURST_KEY`]) of `rates` to `value` as
/// given.
pub fn set_limit(rates: &mut Rates, key: &str, value: &str) -> Result<(), QosKeyError> {
    if key == BURST_KEY {
        let ms: u64 = value.parse().map_err(|_| QosKeyError::Burst)?;
        let burst = Duration::from_millis(ms);
        if ms == 0 || burst > MAX_BURST {
            return Err(QosKeyError::Burst);
        }
        rates.burst = burst;
        return Ok(());
    }
    let (i, &name) = RATE_KEYS
        .iter()
        .enumerate()
        .find(|&(_, &k)| k == key)
        .ok_or_else(|| QosKeyError::Unknown(key.to_owned(), GROUP_KEYS))?;
    let rate = if i < 3 {
        // Plain digits only: a suffix would read as bytes.
        value.parse().map_err(|_| QosKeyError::Iops(name))?
    } else {
        parse_size(value).ok_or(QosKeyError::Bps(name))?
    };
    *rates.rate_mut(name).expect("a rate key") = rate;
    Ok(())
}

/// A group's name, or a device's `qos-group` value: the rules of device names.
fn group_name(value: String, bad: QosKeyError) -> Result<String, QosKeyError> {
    if is_valid_name(&value) {
        Ok(value)
    } else {
        Err(bad)
    }
}

/// Takes a device's QoS keys out of `keys` (whose keys are known and given once): its own
/// limits (none given: no limit, the default burst) and its group.
pub fn take_device_qos(
    keys: &mut HashMap<String, String>,
) -> Result<(Rates, Option<String>), QosKeyError> {
    let mut rates = Rates::default();
    for key in RATE_KEYS.iter().chain(&[BURST_KEY]) {
        if let Some(value) = keys.remove(*key) {
            set_limit(&mut rates, key, &value)?;
        }
    }
    let group = keys
        .remove(GROUP_KEY)
        .map(|g| group_name(g, QosKeyError::GroupName))
        .transpose()?;
    Ok((rates, group))
}

/// Key/value pairs as a map of keys each given once, among those `known` accepts (`list`
/// names them in the error).
pub fn unique_keys(
    items: impl IntoIterator<Item = (String, String)>,
    known: impl Fn(&str) -> bool,
    list: &'static str,
) -> Result<HashMap<String, String>, QosKeyError> {
    let mut keys = HashMap::new();
    for (key, value) in items {
        if !known(&key) {
            return Err(QosKeyError::Unknown(key, list));
        }
        if keys.contains_key(&key) {
            return Err(QosKeyError::Twice(key));
        }
        keys.insert(key, value);
    }
    Ok(keys)
}

/// A group from its keys ([`GROUP_KEYS`]): `name`, required, and its limits (none given: no
/// limit, the default burst).
pub fn group_from_keys(
    items: impl IntoIterator<Item = (String, String)>,
) -> Result<(String, Rates), QosKeyError> {
    let mut keys = unique_keys(items, |k| k == "name" || is_limit_key(k), GROUP_KEYS)?;
    let name = group_name(
        keys.remove("name").ok_or(QosKeyError::NameRequired)?,
        QosKeyError::Name,
    )?;
    let mut rates = Rates::default();
    for (key, value) in keys {
        set_limit(&mut rates, &key, &value)?;
    }
    Ok((name, rates))
}

/// Parses one `--qos-group name=G,KEY=VALUE,...` argument; errors name it whole.
pub(super) fn parse_group(arg: &str) -> Result<GroupConfig, ConfigError> {
    let label = format!("--qos-group {arg:?}");
    let items = super::device::key_values(&label, arg)?;
    let (name, rates) =
        group_from_keys(items).map_err(|e| ConfigError::BadQos(label.clone(), e))?;
    Ok(GroupConfig { name, rates, label })
}

/// The groups of the configuration file and then those of `--qos-group`, checked: no name
/// twice, and every group a device names is one of them.
pub(super) fn check_groups<'a>(
    groups: &[GroupConfig],
    devices: impl IntoIterator<Item = &'a super::DeviceConfig>,
) -> Result<(), ConfigError> {
    for (i, g) in groups.iter().enumerate() {
        if groups[..i].iter().any(|o| o.name == g.name) {
            return Err(ConfigError::GroupTwice(g.label.clone(), g.name.clone()));
        }
    }
    for d in devices {
        if let Some(name) = &d.qos_group
            && !groups.iter().any(|g| &g.name == name)
        {
            return Err(ConfigError::NoGroup(d.label(), name.clone()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
