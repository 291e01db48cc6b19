//! The rate-limit methods on a registry without devices: their parameters, each kind of bad
//! one with its exact message, and the groups' whole life. A device's own limits on a running
//! device are tested against the daemon (tests/control.rs).

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};

use super::*;
use crate::bdev::nvme_pcie::Controllers;
use crate::config::{Config, DeviceDefaults};
use crate::daemon::methods::LogControl;
use crate::daemon::registry::Registry;
use crate::jsonrpc::INVALID_PARAMS;
use crate::poller::{PollMode, PollerSet};

/// The methods of a vubd started with `args` and a control socket, without pollers (no
/// device is added).
fn methods(args: &[&str]) -> Methods {
    let cfg = Config::from_args(["--control-socket", "c.sock"].iter().chain(args)).expect("valid");
    let pollers = Arc::new(PollerSet::start(&[], PollMode::Never).expect("no pollers"));
    Methods {
        registry: Arc::new(Registry::new(cfg, pollers, Controllers::default())),
        defaults: DeviceDefaults::default(),
        log: LogControl::new(|_| Ok(())),
    }
}

/// The message of a call that must be refused as invalid parameters.
#[track_caller]
fn refused(m: &Methods, method: &str, params: Value) -> String {
    let e = m.call(method, params).expect_err(method);
    assert_eq!(e.code, INVALID_PARAMS, "{}", e.message);
    e.message
}

#[test]
fn groups_are_created_changed_listed_and_removed() {
    let m = methods(&["--qos-group", "name=gold,iops-total=20000,bps-read=400M"]);
    assert_eq!(
        m.call("qos_group_list", Value::Null).unwrap(),
        json!([{"name": "gold", "iops-total": 20000, "bps-read": 400u64 << 20,
                "qos-burst-ms": 100, "devices": 0}])
    );
    // Numbers, and strings as `vubd ctl` sends them.
    assert_eq!(
        m.call(
            "qos_group_set",
            json!({"name": "bronze", "iops-write": "100", "bps-total": "1M", "qos-burst-ms": 20})
        )
        .unwrap(),
        json!({"name": "bronze", "iops-write": 100, "bps-total": 1 << 20, "qos-burst-ms": 20,
               "devices": 0})
    );
    // New rates replace the old ones as a whole.
    assert_eq!(
        m.call("qos_group_set", json!({"name": "gold", "iops-read": 5}))
            .unwrap(),
        json!({"name": "gold", "iops-read": 5, "qos-burst-ms": 100, "devices": 0})
    );
    let names: Vec<Value> = m
        .call("qos_group_list", json!({}))
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["name"].clone())
        .collect();
    assert_eq!(names, [json!("bronze"), json!("gold")]);
    assert_eq!(
        m.call("qos_group_remove", json!({"name": "gold"})).unwrap(),
        json!(true)
    );
    assert_eq!(
        refused(&m, "qos_group_remove", json!({"name": "gold"})),
        "name: no group is named \"gold\""
    );
    assert_eq!(
        m.call("qos_group_list", Value::Null)
            .unwrap()
            .as_array()
            .unwrap()
            .len(),
        1
    );
}

#[test]
fn bad_group_parameters_name_the_field_and_change_nothing() {
    let m = methods(&[]);
    for (params, why) in [
        (json!({"iops-total": 5}), "name is required"),
        (
            json!({"name": ""}),
            "name must be 1 to 64 bytes without control characters",
        ),
        (
            json!({"name": "g", "iops-total": -1}),
            "iops-total takes a number of operations per second",
        ),
        (
            json!({"name": "g", "iops-read": 1.5}),
            "iops-read takes a number of operations per second",
        ),
        (
            json!({"name": "g", "bps-write": "1X"}),
            "bps-write takes a byte rate such as 200M",
        ),
        (
            json!({"name": "g", "qos-burst-ms": 60001}),
            "qos-burst-ms takes 1 to 60000 milliseconds",
        ),
        (
            json!({"name": "g", "iops-total": true}),
            "iops-total: must be a number or a string",
        ),
        (
            json!({"name": "g", "qos-group": "h"}),
            "unknown key \"qos-group\" (known: name, iops-total, iops-read, iops-write, \
             bps-total, bps-read, bps-write, qos-burst-ms)",
        ),
        (json!([1]), "parameters are given by name (a JSON object)"),
    ] {
        assert_eq!(
            refused(&m, "qos_group_set", params.clone()),
            why,
            "{params}"
        );
    }
    assert_eq!(refused(&m, "qos_group_remove", json!({})), "name: required");
    assert_eq!(
        refused(&m, "qos_group_remove", json!({"name": "g", "x": 1})),
        "unknown parameter \"x\""
    );
    assert_eq!(
        refused(&m, "qos_group_list", json!({"name": "g"})),
        "unknown parameter \"name\""
    );
    assert_eq!(m.call("qos_group_list", Value::Null).unwrap(), json!([]));
}

#[test]
fn bad_device_parameters_name_the_field() {
    let m = methods(&["--qos-group", "name=gold"]);
    for (params, why) in [
        (json!({"iops-total": 5}), "name: required"),
        (json!({"name": 5}), "name: must be a string"),
        (
            json!({"name": "vm1", "color": "red"}),
            "unknown key \"color\" (known: name, \
         iops-total, iops-read, iops-write, bps-total, bps-read, bps-write, qos-burst-ms, \
         qos-group)",
        ),
        (
            json!({"name": "vm1", "iops-write": "5k"}),
            "iops-write takes a number of operations per second",
        ),
        (
            json!({"name": "vm1", "bps-read": -5}),
            "bps-read takes a byte rate such as 200M",
        ),
        (
            json!({"name": "vm1", "qos-burst-ms": 0}),
            "qos-burst-ms takes 1 to 60000 milliseconds",
        ),
        (
            json!({"name": "vm1", "qos-group": ""}),
            "qos-group must be 1 to 64 bytes without control characters",
        ),
        (
            json!({"name": "vm1", "qos-group": null}),
            "qos-group: must be a number or a string",
        ),
        (
            json!({"name": "vm1", "iops-total": 5}),
            "name: no device is named \"vm1\"",
        ),
    ] {
        assert_eq!(
            refused(&m, "device_set_qos", params.clone()),
            why,
            "{params}"
        );
    }
}

#[test]
fn limits_show_the_rates_that_limit_and_the_burst() {
    let rates = Rates {
        iops: [0, 7, 0],
        bps: [1 << 20, 0, 0],
        burst: Duration::from_millis(250),
    };
    assert_eq!(
        Value::Object(device_qos(&rates, Some("gold"))),
        json!({"iops-read": 7, "bps-total": 1 << 20, "qos-burst-ms": 250, "qos-group": "gold"})
    );
    assert_eq!(
        Value::Object(device_qos(&Rates::default(), None)),
        json!({"qos-burst-ms": 100})
    );
}
