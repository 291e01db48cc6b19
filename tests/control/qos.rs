//! Rate limits and their groups through the control socket: set on a running device and
//! listed, groups created, changed, listed and removed (refused while in use), devices added
//! with limits or in a group, and every kind of bad request with its exact error. Whether the
//! limits are enforced is tested in tests/qos.rs.

use serde_json::{Value, json};
use vubd::jsonrpc;

use super::common::daemon::socket_exists;
use super::common::node::Node;
use super::{MIB, connect, error_of};

/// The `qos` member of device `name` in `device_list`.
fn qos_of(node: &Node, name: &str) -> Value {
    node.ok("device_list", json!({ "name": name }))[0]["qos"].clone()
}

/// Group `name` as `qos_group_list` has it.
fn group_of(node: &Node, name: &str) -> Value {
    let list = node.ok("qos_group_list", Value::Null);
    let found = list
        .as_array()
        .expect("a list")
        .iter()
        .find(|g| g["name"] == name);
    found.cloned().unwrap_or(Value::Null)
}

#[test]
fn rate_limits_are_set_on_a_running_device_and_listed() {
    let mut node = Node::start(&["--qos-group", "name=gold,iops-total=1000"]);
    let socket = node.add(
        "vm1",
        "null:64M",
        json!({"iops-total": 5000, "bps-read": "100M", "qos-burst-ms": 50}),
    );
    assert_eq!(
        qos_of(&node, "vm1"),
        json!({"iops-total": 5000, "bps-read": 100 * MIB, "qos-burst-ms": 50})
    );
    let mut client = connect(&socket);
    client.queue(0).write(0, &[7; 4096]);

    // Replaced as a whole while the frontend runs: what is left out is no limit.
    assert_eq!(
        node.ok(
            "device_set_qos",
            json!({"name": "vm1", "iops-read": 20000, "bps-write": "1G", "qos-group": "gold"})
        ),
        json!({"name": "vm1", "iops-read": 20000, "bps-write": 1u64 << 30, "qos-burst-ms": 100,
               "qos-group": "gold"})
    );
    let list = node.ok("device_list", Value::Null);
    assert_eq!(list[0]["connected"], json!(true));
    assert_eq!(
        list[0]["qos"],
        json!({"iops-read": 20000, "bps-write": 1u64 << 30, "qos-burst-ms": 100,
               "qos-group": "gold"})
    );
    assert_eq!(
        client.queue(0).read(0, 4096),
        [7; 4096],
        "the session serves on"
    );
    assert_eq!(
        group_of(&node, "gold"),
        json!({"name": "gold", "iops-total": 1000, "qos-burst-ms": 100, "devices": 1})
    );

    // A group in use is not removed; its new rates keep its devices.
    let (code, message) = error_of(node.call("qos_group_remove", json!({"name": "gold"})));
    assert_eq!(
        (code, message.as_str()),
        (
            jsonrpc::INVALID_PARAMS,
            "qos-group: group \"gold\" still has 1 device(s)"
        )
    );
    assert_eq!(
        node.ok(
            "qos_group_set",
            json!({"name": "gold", "bps-total": 5000000})
        ),
        json!({"name": "gold", "bps-total": 5000000, "qos-burst-ms": 100, "devices": 1})
    );
    // A device added in a group counts in it, and leaves it when removed.
    node.add(
        "vm2",
        "null:1M",
        json!({"qos-group": "gold", "iops-write": 10}),
    );
    assert_eq!(group_of(&node, "gold")["devices"], json!(2));
    node.remove("vm2");
    assert_eq!(group_of(&node, "gold")["devices"], json!(1));

    // Out of the group, with no limit: the group can go.
    assert_eq!(
        node.ok("device_set_qos", json!({"name": "vm1"})),
        json!({"name": "vm1", "qos-burst-ms": 100})
    );
    assert_eq!(group_of(&node, "gold")["devices"], json!(0));
    assert_eq!(
        node.ok("qos_group_remove", json!({"name": "gold"})),
        json!(true)
    );
    assert_eq!(node.ok("qos_group_list", Value::Null), json!([]));
    assert_eq!(client.queue(0).read(0, 4096), [7; 4096]);
    drop(client);

    // A device naming a group that does not exist is not added, and leaves nothing behind.
    let (code, message) = error_of(node.call(
        "device_add",
        json!({"name": "vm3", "socket": node.socket("vm3"), "disk": "null:1M",
               "qos-group": "gold"}),
    ));
    assert_eq!(
        (code, message.as_str()),
        (
            jsonrpc::INVALID_PARAMS,
            "device \"vm3\": qos-group: no group is named \"gold\""
        )
    );
    assert!(!socket_exists(&node.socket("vm3")));
    assert_eq!(node.names(), ["vm1"]);
    node.daemon.assert_running();
}

#[test]
fn bad_rate_limit_requests_get_the_exact_error_and_change_nothing() {
    let mut node = Node::start(&["--qos-group", "name=gold,iops-total=1000"]);
    let socket = node.add(
        "vm1",
        "null:64M",
        json!({"iops-read": 300, "qos-group": "gold"}),
    );
    let mut client = connect(&socket);
    let known = "known: name, iops-total, iops-read, iops-write, bps-total, bps-read, bps-write, \
                 qos-burst-ms";
    let cases: Vec<(&str, Value, String)> = vec![
        (
            "device_set_qos",
            json!({"iops-total": 1}),
            "name: required".into(),
        ),
        (
            "device_set_qos",
            json!({"name": "vm9"}),
            "name: no device is named \"vm9\"".into(),
        ),
        (
            "device_set_qos",
            json!({"name": "vm1", "colour": 1}),
            format!("unknown key \"colour\" ({known}, qos-group)"),
        ),
        (
            "device_set_qos",
            json!({"name": "vm1", "iops-total": "lots"}),
            "iops-total takes a number of operations per second".into(),
        ),
        (
            "device_set_qos",
            json!({"name": "vm1", "iops-write": -1}),
            "iops-write takes a number of operations per second".into(),
        ),
        (
            "device_set_qos",
            json!({"name": "vm1", "bps-total": "2X"}),
            "bps-total takes a byte rate such as 200M".into(),
        ),
        (
            "device_set_qos",
            json!({"name": "vm1", "bps-read": 1.5}),
            "bps-read takes a byte rate such as 200M".into(),
        ),
        (
            "device_set_qos",
            json!({"name": "vm1", "qos-burst-ms": 60001}),
            "qos-burst-ms takes 1 to 60000 milliseconds".into(),
        ),
        (
            "device_set_qos",
            json!({"name": "vm1", "iops-total": [1]}),
            "iops-total: must be a number or a string".into(),
        ),
        (
            "device_set_qos",
            json!({"name": "vm1", "qos-group": "silver"}),
            "qos-group: no group is named \"silver\"".into(),
        ),
        (
            "qos_group_set",
            json!({"iops-total": 1}),
            "name is required".into(),
        ),
        (
            "qos_group_set",
            json!({"name": "gold", "qos-group": "x"}),
            format!("unknown key \"qos-group\" ({known})"),
        ),
        (
            "qos_group_set",
            json!({"name": "gold", "iops-read": "1k"}),
            "iops-read takes a number of operations per second".into(),
        ),
        (
            "qos_group_set",
            json!({"name": "gold", "qos-burst-ms": 0}),
            "qos-burst-ms takes 1 to 60000 milliseconds".into(),
        ),
        (
            "qos_group_remove",
            json!({"name": "none"}),
            "name: no group is named \"none\"".into(),
        ),
        (
            "qos_group_remove",
            json!({"name": "gold"}),
            "qos-group: group \"gold\" still has 1 device(s)".into(),
        ),
        (
            "qos_group_list",
            json!({"x": 1}),
            "unknown parameter \"x\"".into(),
        ),
        (
            "device_add",
            json!({"socket": node.socket("x"), "disk": "null:1M", "bps-write": "fast"}),
            "device: bps-write takes a byte rate such as 200M".into(),
        ),
    ];
    for (method, params, why) in cases {
        let (code, message) = error_of(node.call(method, params.clone()));
        assert_eq!(
            (code, message),
            (jsonrpc::INVALID_PARAMS, why),
            "{method} {params}"
        );
    }
    assert_eq!(
        qos_of(&node, "vm1"),
        json!({"iops-read": 300, "qos-burst-ms": 100, "qos-group": "gold"}),
        "nothing changed"
    );
    assert_eq!(
        node.ok("qos_group_list", Value::Null),
        json!([{"name": "gold", "iops-total": 1000, "qos-burst-ms": 100, "devices": 1}])
    );
    assert_eq!(node.names(), ["vm1"]);
    client.queue(0).write(0, &[1; 512]);
    node.daemon.assert_running();
}
