//! The rate-limit keys: each key's good and bad forms, with the exact message, through
//! `--device`, `--qos-group` and the configuration file.

use std::time::Duration;

use super::*;
use crate::config::device::{DeviceDefaults, parse_device};
use crate::config::test_args::{parse, serve};

/// The limits `key=value` gives, alone.
fn limit(key: &str, value: &str) -> Result<Rates, QosKeyError> {
    let mut r = Rates::default();
    set_limit(&mut r, key, value).map(|()| r)
}

#[test]
fn every_rate_key_sets_its_rate() {
    for (i, key) in RATE_KEYS.into_iter().enumerate() {
        let r = limit(key, "5000").expect(key);
        let mut want = Rates::default();
        if i < 3 {
            want.iops[i] = 5000;
        } else {
            want.bps[i - 3] = 5000;
        }
        assert_eq!(r, want, "{key}");
        assert!(
            limit(key, "0").expect(key).unlimited(),
            "{key}: 0 is no limit"
        );
        assert_eq!(
            limit(key, "18446744073709551615")
                .expect(key)
                .named()
                .find(|&(k, _)| k == key),
            Some((key, u64::MAX))
        );
    }
}

#[test]
fn byte_rates_take_binary_suffixes() {
    for (value, bytes) in [
        ("1024", 1024),
        ("4K", 4 << 10),
        ("4k", 4 << 10),
        ("200M", 200 << 20),
        ("1G", 1 << 30),
        ("2T", 2 << 40),
    ] {
        for key in ["bps-total", "bps-read", "bps-write"] {
            let r = limit(key, value).expect(value);
            assert_eq!(r.named().find(|&(k, _)| k == key), Some((key, bytes)));
        }
    }
}

#[test]
fn bad_rates_name_their_key() {
    for key in ["iops-total", "iops-read", "iops-write"] {
        for value in ["", "x", "-1", "1.5", "1K", "5 ", "18446744073709551616"] {
            assert_eq!(
                limit(key, value).unwrap_err().to_string(),
                format!("{key} takes a number of operations per second"),
                "{key}={value:?}"
            );
        }
    }
    for key in ["bps-total", "bps-read", "bps-write"] {
        for value in ["", "x", "-1", "1.5M", "1P", "M", "200MiB", "99999999999T"] {
            assert_eq!(
                limit(key, value).unwrap_err().to_string(),
                format!("{key} takes a byte rate such as 200M"),
                "{key}={value:?}"
            );
        }
    }
}

#[test]
fn the_burst_is_1_to_60000_milliseconds() {
    assert_eq!(Rates::default().burst, Duration::from_millis(100));
    assert_eq!(
        limit(BURST_KEY, "1").unwrap().burst,
        Duration::from_millis(1)
    );
    assert_eq!(limit(BURST_KEY, "60000").unwrap().burst, MAX_BURST);
    for value in ["0", "60001", "", "x", "-5", "1.5", "100ms"] {
        assert_eq!(
            limit(BURST_KEY, value).unwrap_err().to_string(),
            "qos-burst-ms takes 1 to 60000 milliseconds",
            "{value:?}"
        );
    }
}

#[test]
fn a_device_takes_every_key_and_defaults_to_no_limit() {
    let d = parse_device("socket=s,disk=null:1M", DeviceDefaults::default()).expect("valid");
    assert_eq!((d.qos, d.qos_group), (Rates::default(), None));
    let c = serve(&[
        "--qos-group",
        "name=gold",
        "--device",
        "socket=s,disk=null:1M,iops-total=5000,iops-read=4000,iops-write=3000,\
         bps-total=200M,bps-read=100M,bps-write=1G,qos-burst-ms=250,qos-group=gold",
    ]);
    let d = &c.devices[0];
    assert_eq!(d.qos.iops, [5000, 4000, 3000]);
    assert_eq!(d.qos.bps, [200 << 20, 100 << 20, 1 << 30]);
    assert_eq!(d.qos.burst, Duration::from_millis(250));
    assert_eq!(d.qos_group.as_deref(), Some("gold"));
}

#[test]
fn a_device_with_a_bad_qos_key_is_named_whole() {
    let long = "g".repeat(65);
    for (keys, why) in [
        (
            "iops-read=x",
            "iops-read takes a number of operations per second",
        ),
        (
            "iops-total=-1",
            "iops-total takes a number of operations per second",
        ),
        ("bps-total=fast", "bps-total takes a byte rate such as 200M"),
        ("bps-write=1.5G", "bps-write takes a byte rate such as 200M"),
        (
            "qos-burst-ms=0",
            "qos-burst-ms takes 1 to 60000 milliseconds",
        ),
        (
            "qos-burst-ms=60001",
            "qos-burst-ms takes 1 to 60000 milliseconds",
        ),
        (
            "qos-group=",
            "qos-group must be 1 to 64 bytes without control characters",
        ),
        (
            &format!("qos-group={long}"),
            "qos-group must be 1 to 64 bytes without control characters",
        ),
        (
            "qos-group=a\u{7}b",
            "qos-group must be 1 to 64 bytes without control characters",
        ),
        ("iops-total=1,iops-total=2", "a key is given twice"),
    ] {
        let arg = format!("socket=s,disk=null:1M,{keys}");
        let e = parse_device(&arg, DeviceDefaults::default()).expect_err(keys);
        assert_eq!(e.to_string(), format!("--device {arg:?}: {why}"));
    }
    let e = parse_device("socket=s,disk=null:1M,iops=5", DeviceDefaults::default()).unwrap_err();
    assert!(
        e.to_string().contains(
            "unknown key \"iops\" (known: name, socket, fd, fd-name, kata-store, disk, serial, \
             readonly, num-queues, queue-size, incoming, max-inflight, socket-mode, \
             socket-group, iops-total, iops-read, iops-write, bps-total, bps-read, bps-write, \
             qos-burst-ms, qos-group)"
        ),
        "{e}"
    );
}

#[test]
fn groups_of_the_command_line() {
    let c = serve(&[
        "--control-socket",
        "c.sock",
        "--qos-group",
        "name=gold,iops-total=20000,bps-read=400M",
        "--qos-group",
        "name=bronze,iops-write=100,qos-burst-ms=1000",
    ]);
    assert_eq!(c.qos_groups.len(), 2);
    let gold = &c.qos_groups[0];
    assert_eq!(gold.name, "gold");
    assert_eq!(gold.rates.iops, [20000, 0, 0]);
    assert_eq!(gold.rates.bps, [0, 400 << 20, 0]);
    assert_eq!(gold.rates.burst, Duration::from_millis(100));
    assert_eq!(c.qos_groups[1].rates.burst, Duration::from_secs(1));
    // A group without limits is allowed: its devices are then limited by their own only.
    let c = serve(&["--control-socket", "c.sock", "--qos-group", "name=empty"]);
    assert!(c.qos_groups[0].rates.unlimited());
}

#[test]
fn bad_groups_are_named_whole() {
    for (arg, why) in [
        ("iops-total=5", "name is required"),
        (
            "name=",
            "name must be 1 to 64 bytes without control characters",
        ),
        (
            "name=a\nb",
            "name must be 1 to 64 bytes without control characters",
        ),
        (
            "name=g,iops-total=x",
            "iops-total takes a number of operations per second",
        ),
        (
            "name=g,bps-read=1Q",
            "bps-read takes a byte rate such as 200M",
        ),
        (
            "name=g,qos-burst-ms=0",
            "qos-burst-ms takes 1 to 60000 milliseconds",
        ),
        ("name=g,name=h", "name is given twice"),
        ("name=g,bps-read=1,bps-read=1", "bps-read is given twice"),
        (
            "name=g,qos-group=h",
            "unknown key \"qos-group\" (known: name, iops-total, iops-read, iops-write, \
             bps-total, bps-read, bps-write, qos-burst-ms)",
        ),
        (
            "name=g,iops",
            "expected KEY=VALUE items separated by commas",
        ),
    ] {
        let e = parse(&["--control-socket", "c.sock", "--qos-group", arg]).expect_err(arg);
        assert_eq!(e.to_string(), format!("--qos-group {arg:?}: {why}"));
    }
    let e = parse(&[
        "--control-socket",
        "c.sock",
        "--qos-group",
        "name=g,iops-total=1",
        "--qos-group",
        "name=g",
    ])
    .unwrap_err();
    assert_eq!(
        e.to_string(),
        "--qos-group \"name=g\": group \"g\" is defined twice"
    );
}

#[test]
fn a_device_naming_an_unknown_group_is_refused_naming_it() {
    let e = parse(&[
        "--qos-group",
        "name=gold",
        "--device",
        "socket=s,disk=null:1M,qos-group=silver",
    ])
    .unwrap_err();
    assert_eq!(
        e.to_string(),
        "--device \"socket=s,disk=null:1M,qos-group=silver\": qos-group: no group is named \
         \"silver\" (define it with --qos-group or [[qos-group]])"
    );
    assert!(matches!(e, ConfigError::NoGroup(_, ref g) if g == "silver"));
}

#[test]
fn groups_and_devices_of_a_config_file_share_the_checks() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("vubd.toml");
    let path = file.to_str().expect("UTF-8");
    std::fs::write(
        &file,
        "[[qos-group]]\nname = \"gold\"\niops-total = 20000\nbps-total = \"400M\"\n\n\
         [[device]]\nname = \"a\"\nsocket = \"a.sock\"\ndisk = \"null:1M\"\n\
         qos-group = \"gold\"\nbps-read = 1048576\nqos-burst-ms = 10\n",
    )
    .expect("write");
    let c = serve(&[
        "--config",
        path,
        "--device",
        "socket=b.sock,disk=null:1M,qos-group=silver",
        "--qos-group",
        "name=silver",
    ]);
    assert_eq!(c.qos_groups.len(), 2);
    assert_eq!(c.qos_groups[0].name, "gold");
    assert_eq!(c.qos_groups[0].rates.iops[0], 20000);
    assert_eq!(c.qos_groups[0].rates.bps[0], 400 << 20);
    let a = &c.devices[0];
    assert_eq!(a.qos_group.as_deref(), Some("gold"));
    assert_eq!(a.qos.bps, [0, 1 << 20, 0]);
    assert_eq!(a.qos.burst, Duration::from_millis(10));
    // A group of the file given again on the command line.
    let e = parse(&["--config", path, "--qos-group", "name=gold"]).unwrap_err();
    assert_eq!(
        e.to_string(),
        "--qos-group \"name=gold\": group \"gold\" is defined twice"
    );
    // A device of the file naming a group nobody defined.
    std::fs::write(
        &file,
        "[[device]]\nname = \"a\"\nsocket = \"a.sock\"\ndisk = \"null:1M\"\n\
         qos-group = \"gold\"\n",
    )
    .expect("write");
    let e = parse(&["--config", path]).unwrap_err();
    assert_eq!(
        e.to_string(),
        "device \"a\": qos-group: no group is named \"gold\" (define it with --qos-group or \
         [[qos-group]])"
    );
}
