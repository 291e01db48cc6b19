//! Rate limits as `vubd ctl` prints them: in the `KEY=VALUE` form they are given in
//! (`iops-total=5000,bps-read=200M,qos-group=gold`), so that what `device_list` or
//! `qos_group_list` shows can be typed back.

use serde_json::Value;

use super::table;
use crate::config::GROUP_KEY;
use crate::qos::{BURST_KEY, DEFAULT_BURST, RATE_KEYS};

/// The limits (and group) of a result as `KEY=VALUE` items joined by commas, rates of bytes
/// with a binary suffix when they have one; the burst only when it is not the default. `-`
/// when nothing limits.
pub(super) fn settings(v: &Value) -> String {
    let mut items = Vec::new();
    for key in RATE_KEYS {
        match v.get(key).and_then(Value::as_u64) {
            Some(rate) if key.starts_with("bps") => items.push(format!("{key}={}", size(rate))),
            Some(rate) => items.push(format!("{key}={rate}")),
            None => {}
        }
    }
    let default_ms = u64::try_from(DEFAULT_BURST.as_millis()).unwrap_or(0);
    if let Some(ms) = v.get(BURST_KEY).and_then(Value::as_u64)
        && ms != default_ms
    {
        items.push(format!("{BURST_KEY}={ms}"));
    }
    if let Some(g) = v.get(GROUP_KEY).and_then(Value::as_str) {
        items.push(format!("{GROUP_KEY}={g}"));
    }
    if items.is_empty() {
        "-".to_owned()
    } else {
        items.join(",")
    }
}

/// `bytes` as `--device` takes it: with the largest binary suffix that divides it.
fn size(bytes: u64) -> String {
    for (shift, suffix) in [(40, 'T'), (30, 'G'), (20, 'M'), (10, 'K')] {
        if bytes >= 1 << shift && bytes % (1 << shift) == 0 {
            return format!("{}{suffix}", bytes >> shift);
        }
    }
    bytes.to_string()
}

/// `qos_group_list` as a table, a group per line.
pub(super) fn group_table(result: &Value) -> String {
    let groups = result.as_array().map(Vec::as_slice).unwrap_or_default();
    let mut rows = vec![["NAME", "DEVICES", "LIMITS"].map(str::to_owned).to_vec()];
    for g in groups {
        rows.push(vec![
            g.get("name")
                .and_then(Value::as_str)
                .unwrap_or("?")
                .to_owned(),
            g.get("devices")
                .and_then(Value::as_u64)
                .unwrap_or(0)
                .to_string(),
            settings(g),
        ]);
    }
    table(&rows)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn settings_read_as_the_keys_that_set_them() {
        let v = json!({"name": "vm1", "iops-total": 5000, "bps-read": 200u64 << 20,
                       "bps-write": 1000, "qos-burst-ms": 100, "qos-group": "gold"});
        assert_eq!(
            settings(&v),
            "iops-total=5000,bps-read=200M,bps-write=1000,qos-group=gold"
        );
        assert_eq!(settings(&json!({"qos-burst-ms": 100})), "-");
        assert_eq!(
            settings(&json!({"bps-total": 3u64 << 40, "qos-burst-ms": 5})),
            "bps-total=3T,qos-burst-ms=5"
        );
    }

    #[test]
    fn groups_read_as_a_table() {
        let list = json!([
            {"name": "gold", "iops-total": 20000, "qos-burst-ms": 100, "devices": 2},
            {"name": "open", "qos-burst-ms": 100, "devices": 0},
        ]);
        assert_eq!(
            group_table(&list),
            "NAME  DEVICES  LIMITS\n\
             gold  2        iops-total=20000\n\
             open  0        -\n"
        );
    }
}
