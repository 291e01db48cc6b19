//! The command line's validation, option by option.

use super::test_args::{parse, serve};
use super::*;

/// The one device of a single-device command line.
fn one(args: &[&str]) -> DeviceConfig {
    let mut c = serve(args);
    assert_eq!(c.devices.len(), 1);
    c.devices.remove(0)
}

#[test]
fn no_arguments_serve_the_default_image_on_the_default_socket() {
    let c = one(&[]);
    assert_eq!(c.socket, SocketSpec::Path(PathBuf::from(DEFAULT_SOCKET)));
    assert_eq!(c.disk, DiskSpec::File(PathBuf::from(DEFAULT_DISK)));
    assert_eq!(c.create_size, Some(DEFAULT_DISK_SIZE));
}

#[test]
fn explicit_disk_is_never_created() {
    let c = one(&["--disk", "x.img"]);
    assert_eq!(c.create_size, None);
    assert_eq!(c.serial, None, "the image's own: a hash of its path");
}

#[test]
fn other_arguments_without_disk_are_refused() {
    assert_eq!(
        parse(&["--readonly"]).unwrap_err(),
        ConfigError::MissingDisk
    );
}

#[test]
fn disk_uri_forms() {
    assert_eq!(parse_disk("a.img"), Ok(DiskSpec::File("a.img".into())));
    assert_eq!(parse_disk("file:/x/y"), Ok(DiskSpec::File("/x/y".into())));
    assert_eq!(parse_disk("file:"), Err(ConfigError::EmptyDiskPath));
    assert!(matches!(
        parse_disk("bogus:thing"),
        Err(ConfigError::UnknownDiskType(_, s)) if s == "bogus"
    ));
    // Not a scheme: starts with a digit / contains a slash before the colon.
    assert_eq!(parse_disk("./a:b"), Ok(DiskSpec::File("./a:b".into())));
}

#[test]
fn conventions_spellings_are_accepted() {
    let c = one(&["--blk-file", "d.img", "--read-only"]);
    assert!(c.read_only);
    assert_eq!(c.disk, DiskSpec::File("d.img".into()));
}

#[test]
fn numeric_limits_name_the_argument() {
    let e = parse(&["--disk", "d", "--num-queues", "0"]).unwrap_err();
    assert!(e.to_string().starts_with("--num-queues"));
    let e = parse(&["--disk", "d", "--queue-size", "100"]).unwrap_err();
    assert!(e.to_string().starts_with("--queue-size"));
    let e = parse(&["--disk", "d", "--serial", "123456789012345678901"]).unwrap_err();
    assert!(e.to_string().starts_with("--serial"));
}

#[test]
fn socket_in_missing_directory_is_refused() {
    let e = parse(&["--disk", "d", "--socket-path", "/nonexistent-dir/s.sock"]).unwrap_err();
    assert!(matches!(e, ConfigError::SocketDirMissing(..)), "{e}");
}

#[test]
fn null_disk_sizes() {
    assert_eq!(parse_disk("null:16G"), Ok(DiskSpec::Null(16 << 30)));
    assert_eq!(parse_disk("null:512"), Ok(DiskSpec::Null(512)));
    assert_eq!(parse_disk("null:4k"), Ok(DiskSpec::Null(4096)));
    for bad in [
        "null:",
        "null:0",
        "null:1000",
        "null:x",
        "null:99999999999T",
    ] {
        assert!(
            matches!(parse_disk(bad), Err(ConfigError::BadNullSize(_))),
            "{bad}"
        );
    }
}

#[test]
fn cpu_lists() {
    let allowed = [0, 1, 2, 3, 5];
    assert_eq!(parse_cpus("2,3", &allowed), Ok(vec![2, 3]));
    assert_eq!(parse_cpus("1-3", &allowed), Ok(vec![1, 2, 3]));
    assert_eq!(parse_cpus("5,0-1", &allowed), Ok(vec![5, 0, 1]));
    assert_eq!(
        parse_cpus("3-5", &allowed),
        Err(ConfigError::CpuNotAvailable("3-5".into(), 4))
    );
    assert_eq!(
        parse_cpus("1,1", &allowed),
        Err(ConfigError::DuplicateCpu("1,1".into(), 1))
    );
    for bad in ["", "a", "3-1", "1,,2", "-1"] {
        assert!(
            matches!(parse_cpus(bad, &allowed), Err(ConfigError::BadCpuList(_))),
            "{bad}"
        );
    }
}

#[test]
fn default_pollers_are_one_per_queue_up_to_the_cpus_unpinned() {
    let c = serve(&["--disk", "d", "--num-queues", "1"]);
    assert_eq!(c.pollers, vec![None]);
    for queues in [&["--num-queues", "64"][..], &[]] {
        let c = serve(&[&["--disk", "d"], queues].concat());
        assert_eq!(c.pollers.len(), allowed_cpus().len().min(64), "{queues:?}");
        assert!(c.pollers.iter().all(Option::is_none));
    }
}

#[test]
fn the_sandbox_is_on_unless_turned_off() {
    let mode = |a: &[&str]| serve(&[&["--disk", "d"], a].concat()).seccomp;
    assert_eq!(mode(&[]), SeccompMode::Enforce);
    assert_eq!(mode(&["--seccomp", "log"]), SeccompMode::Log);
    assert_eq!(mode(&["--seccomp", "off"]), SeccompMode::Off);
}

#[test]
fn poll_modes() {
    assert_eq!(
        serve(&["--disk", "d", "--poll", "always"]).poll,
        PollMode::Always
    );
    assert_eq!(
        serve(&["--disk", "d", "--poll", "never"]).poll,
        PollMode::Never
    );
    assert_eq!(
        serve(&["--disk", "d", "--poll-idle-us", "7"]).poll,
        PollMode::Adaptive {
            idle: Duration::from_micros(7)
        }
    );
}

#[test]
fn nvme_pcie_disks() {
    let pcie = |nsid, interrupts| {
        Ok(DiskSpec::NvmePcie(NvmePcieUri {
            bdf: "0000:01:00.0".into(),
            nsid,
            interrupts,
        }))
    };
    assert_eq!(parse_disk("nvme-pcie:0000:01:00.0"), pcie(1, true));
    assert_eq!(parse_disk("nvme-pcie:01:00.0?nsid=2"), pcie(2, true));
    assert_eq!(
        parse_disk("nvme-pcie:01:00.0?nsid=2&interrupts=0"),
        pcie(2, false)
    );
    assert_eq!(parse_disk("nvme-pcie:01:00.0?interrupts=1"), pcie(1, true));
    assert_eq!(
        parse_disk("nvme-pcie:01:00.0?interrupts=2"),
        Err(ConfigError::BadNvmeUri(
            "nvme-pcie:01:00.0?interrupts=2".into(),
            "interrupts takes 0 or 1"
        ))
    );
    for bad in [
        "nvme-pcie:",
        "nvme-pcie:01:00",
        "nvme-pcie:0000:01:00.0?nsid=0",
        "nvme-pcie:zz:00.0",
        "nvme-pcie:01:00.0?x=1",
    ] {
        assert!(
            matches!(parse_disk(bad), Err(ConfigError::BadNvmeUri(..))),
            "{bad}"
        );
    }
}

#[test]
fn nvme_tcp_disk_and_host_options() {
    let c = serve(&[
        "--disk",
        "nvme-tcp://127.0.0.1:4420/nqn.2014-08.org.example:d?ddgst=1",
        "--hostnqn",
        "nqn.2014-08.org.example:host",
        "--hostid",
        "f81d4fae-7dec-11d0-a765-00a0c91e6bf6",
        "--ctrl-loss-tmo",
        "30",
        "--io-timeout",
        "5",
    ]);
    let d = &c.devices[0];
    let DiskSpec::NvmeTcp(uri) = &d.disk else {
        panic!("not an NVMe/TCP disk: {:?}", d.disk)
    };
    assert_eq!((uri.port, uri.ddgst, uri.hdgst), (4420, true, false));
    assert_eq!(d.serial, None, "the controller's serial number is used");
    assert_eq!(
        c.nvme.hostnqn.as_ref().map(|n| n.as_str()),
        Some("nqn.2014-08.org.example:host")
    );
    assert_eq!(c.nvme.hostid.map(|id| id[0]), Some(0xf8));
    assert_eq!(c.nvme.ctrl_loss_tmo, Duration::from_secs(30));
    assert_eq!(c.nvme.io_timeout, Duration::from_secs(5));
    assert_eq!(c.nvme.reconnect_delay, Duration::from_secs(10));
    assert_eq!(c.nvme.keep_alive_tmo, Duration::from_secs(5));
}

#[test]
fn bad_nvme_host_options_name_the_argument() {
    let e = parse(&["--disk", "d", "--hostnqn", "host1"]).unwrap_err();
    assert!(e.to_string().starts_with("--hostnqn"), "{e}");
    let e = parse(&["--disk", "d", "--hostid", "1234"]).unwrap_err();
    assert!(e.to_string().starts_with("--hostid"), "{e}");
    let e = parse(&["--disk", "d", "--reconnect-delay", "0"]).unwrap_err();
    assert!(e.to_string().starts_with("--reconnect-delay 0"), "{e}");
    let e = parse(&["--disk", "d", "--keep-alive-tmo", "0"]).unwrap_err();
    assert!(e.to_string().starts_with("--keep-alive-tmo"), "{e}");
}

#[test]
fn discover_subcommand() {
    match parse(&["discover", "--traddr", "127.0.0.1", "--trsvcid", "4420"]) {
        Ok(Command::Discover(d)) => {
            assert_eq!((d.host.as_str(), d.port), ("127.0.0.1", 4420));
        }
        other => panic!("expected discover, got {other:?}"),
    }
    match parse(&[
        "discover",
        "--traddr",
        "h",
        "--hostnqn",
        "nqn.2014-08.org.example:h",
    ]) {
        Ok(Command::Discover(d)) => {
            assert_eq!(d.port, DEFAULT_DISCOVERY_PORT);
            assert!(d.nvme.hostnqn.is_some());
        }
        other => panic!("expected discover, got {other:?}"),
    }
    let a = Args::try_parse_from(["vubd", "--disk", "d", "discover", "--traddr", "h"]);
    assert!(a.is_err(), "serving options do not mix with discover");
}

#[test]
fn nvme_list_subcommand() {
    match parse(&["nvme", "list"]) {
        Ok(Command::NvmeList(l)) => {
            assert_eq!(l.bdf, None);
            assert_eq!(l.io_timeout, Duration::from_secs(30));
        }
        other => panic!("expected nvme list, got {other:?}"),
    }
    match parse(&["nvme", "list", "--bdf", "01:00.0", "--io-timeout", "5"]) {
        Ok(Command::NvmeList(l)) => {
            assert_eq!(l.bdf.as_deref(), Some("0000:01:00.0"));
            assert_eq!(l.io_timeout, Duration::from_secs(5));
        }
        other => panic!("expected nvme list, got {other:?}"),
    }
    let e = parse(&["nvme", "list", "--bdf", "nvme0"]).unwrap_err();
    assert_eq!(
        e.to_string(),
        "--bdf \"nvme0\": expected a PCI address such as 0000:01:00.0"
    );
}

#[test]
fn a_control_socket_alone_serves_no_device_on_a_poller_per_cpu() {
    let c = serve(&["--control-socket", "c.sock"]);
    assert!(c.devices.is_empty());
    assert_eq!(c.control_socket, Some(PathBuf::from("c.sock")));
    assert_eq!(c.pollers.len(), allowed_cpus().len().max(1));
    let c = serve(&["--control-socket", "c.sock", "--disk", "x.img"]);
    assert_eq!(c.devices.len(), 1);
    // A single-device option without --disk is still a mistake.
    assert_eq!(
        parse(&["--control-socket", "c.sock", "--readonly"]).unwrap_err(),
        ConfigError::MissingDisk
    );
    let c = serve(&[
        "--incoming",
        "--socket-mode",
        "0660",
        "--control-socket",
        "c.sock",
    ]);
    assert!(c.device_defaults.incoming);
    assert_eq!(c.device_defaults.perms.mode, Some(0o660));
}

#[test]
fn devices_are_named_by_their_socket_unless_given_a_name() {
    let c = serve(&[
        "--device",
        "socket=a.sock,disk=null:1M",
        "--device",
        "name=fast,socket=b.sock,disk=null:1M",
        "--device",
        "fd=3,disk=null:1M",
    ]);
    let names: Vec<&str> = c.devices.iter().map(|d| d.name.as_str()).collect();
    assert_eq!(names, ["a.sock", "fast", "fd3"]);
    assert_eq!(one(&["--disk", "x.img"]).name, DEFAULT_SOCKET);
    let e = parse(&[
        "--device",
        "name=x,socket=a.sock,disk=null:1M",
        "--device",
        "name=x,socket=b.sock,disk=null:1M",
    ])
    .unwrap_err();
    assert_eq!(
        e.to_string(),
        "--device \"name=x,socket=b.sock,disk=null:1M\": its name is another's"
    );
    let e = parse(&["--device", "name=,socket=a.sock,disk=null:1M"]).unwrap_err();
    assert!(e.to_string().contains("name must be 1 to 64 bytes"), "{e}");
}

#[test]
fn a_disk_prints_as_a_disk_argument_that_parses_back() {
    for arg in [
        "x.img",
        "null:1073741824",
        "nvme-tcp://10.0.0.1:4420/nqn.2014-08.org.example:x?nsid=2&hdgst=1&ddgst=1",
        "nvme-tcp://[fd00::1]:4420/nqn.2014-08.org.example:x?nsid=1",
        "nvme-pcie:0000:01:00.0?nsid=3&interrupts=0",
    ] {
        let d = parse_disk(arg).expect(arg);
        assert_eq!(d.to_string(), arg);
        assert_eq!(parse_disk(&d.to_string()), Ok(d));
    }
}

#[test]
fn ctl_takes_a_method_and_key_value_parameters() {
    match parse(&["ctl", "device_remove", "name=a=b"]) {
        Ok(Command::Ctl(c)) => {
            assert_eq!(c.socket, PathBuf::from(DEFAULT_CONTROL_SOCKET));
            assert!(!c.json);
            assert_eq!(c.method, "device_remove");
            assert_eq!(c.params, [("name".to_owned(), "a=b".to_owned())]);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        parse(&["ctl", "device_remove", "=x"]).unwrap_err(),
        ConfigError::CtlParam("=x".into())
    );
}

#[test]
fn a_config_file_adds_its_devices_to_those_of_device() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("vubd.toml");
    std::fs::write(
        &file,
        "[[device]]\nname = \"a\"\nsocket = \"a.sock\"\ndisk = \"null:1M\"\n",
    )
    .expect("write");
    let path = file.to_str().expect("UTF-8");
    let c = serve(&["--config", path, "--device", "socket=b.sock,disk=null:1M"]);
    let names: Vec<&str> = c.devices.iter().map(|d| d.name.as_str()).collect();
    assert_eq!(names, ["a", "b.sock"]);
    let e = parse(&["--config", path, "--device", "socket=a.sock,disk=null:2M"]).unwrap_err();
    assert!(e.to_string().contains("its socket is another's"), "{e}");
    let missing = dir.path().join("missing.toml");
    let e = parse(&["--config", missing.to_str().expect("UTF-8")]).unwrap_err();
    assert!(
        e.to_string()
            .starts_with(&format!("--config {}: ", missing.display())),
        "{e}"
    );
}

#[test]
fn the_nvme_debug_reset_is_a_typed_option() {
    assert_eq!(serve(&["--disk", "x.img"]).nvme.debug_reset_after, None);
    let c = serve(&["--disk", "x.img", "--debug-nvme-reset-after", "40"]);
    assert_eq!(c.nvme.debug_reset_after, Some(40));
}

#[test]
fn metrics_are_on_by_default_and_served_over_http_only_when_asked() {
    let c = serve(&["--disk", "null:1G"]);
    assert!(c.metrics);
    assert_eq!(c.metrics_listen, None);
    let c = serve(&["--disk", "null:1G", "--metrics-listen", "127.0.0.1:9100"]);
    assert_eq!(
        c.metrics_listen,
        Some("127.0.0.1:9100".parse().expect("address"))
    );
    let c = serve(&["--disk", "null:1G", "--metrics-listen", "[::1]:0"]);
    assert_eq!(c.metrics_listen, Some("[::1]:0".parse().expect("address")));
    assert!(!serve(&["--disk", "null:1G", "--metrics", "off"]).metrics);
    let e = parse(&[
        "--disk",
        "null:1G",
        "--metrics",
        "off",
        "--metrics-listen",
        "127.0.0.1:9100",
    ])
    .unwrap_err();
    assert_eq!(
        e.to_string(),
        "--metrics-listen: the metrics are off (--metrics off)"
    );
    // An address, not a host name: vubd resolves none once it runs.
    assert!(Args::try_parse_from(["vubd", "--metrics-listen", "localhost:9100"]).is_err());
}

#[test]
fn the_kata_store_option_is_for_devices_given_by_keys_only() {
    let c = serve(&[
        "--kata-store",
        "/run/k",
        "--device",
        "name=a,disk=null:1M",
        "--device",
        "socket=b.sock,disk=null:1M",
    ]);
    assert_eq!(c.devices[0].kata_store, Some(PathBuf::from("/run/k")));
    assert_eq!(c.devices[1].kata_store, None);
    assert_eq!(c.device_defaults.kata_store, Some(PathBuf::from("/run/k")));
    let e = Args::try_parse_from(["vubd", "--kata-store", "/run/k", "--disk", "x.img"])
        .expect_err("a single device has its socket");
    let first = e.to_string();
    let first = first.lines().next().unwrap_or_default();
    assert!(
        first.contains("--kata-store") && first.contains("--disk"),
        "{first}"
    );
}
