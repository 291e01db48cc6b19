//! vubd serving namespaces of the Linux kernel's NVMe/TCP target (nvmet-tcp in a TCG guest,
//! `tests/common/nvmet.rs`) through its own initiator, with libblkio as the frontend: data
//! written through vubd reads back, on one and two queues, with and without digests; discard
//! and write-zeroes; `vubd discover`; the startup errors a user can fix; and a target that
//! stops and comes back.
//!
//! One guest serves every step (a boot costs seconds, and a target belongs to the thread that
//! started it), so each test function boots its own and runs its steps in order.

mod common;
#[path = "common/workload.rs"]
mod workload;

use std::ffi::OsStr;
use std::path::Path;
use std::time::{Duration, Instant};

use common::client::ClientOptions;
use common::daemon::{Daemon, DaemonConfig, run_vubd};
use common::nvmet::{NvmetOptions, NvmetTarget};
use common::{Rng, assert_same};

const MIB: u64 = 1 << 20;

fn uri(t: &NvmetTarget, query: &str) -> String {
    format!("nvme-tcp://127.0.0.1:{}/{}{}", t.port(), t.nqn(), query)
}

fn serve(t: &NvmetTarget, query: &str, queues: u16, extra: &[&str]) -> Daemon {
    let config = DaemonConfig {
        num_queues: Some(queues),
        ..DaemonConfig::default()
    };
    let extra: Vec<&OsStr> = extra.iter().map(OsStr::new).collect();
    Daemon::vubd_disk(Path::new(&uri(t, query)), &config, &extra)
}

#[test]
fn data_path_against_the_kernel_target() {
    let target = NvmetTarget::start(&NvmetOptions {
        namespaces: 2,
        ns_size_mib: 8,
        block_size: 512,
        ..NvmetOptions::default()
    });

    // One queue, no digests: the random workload (in-capsule and R2T writes up to 64 KiB,
    // reads, flushes) verified by reading everything back.
    {
        let mut vubd = serve(&target, "?nsid=1", 1, &[]);
        let mut client = vubd.connect(1);
        assert_eq!(client.capacity(), 8 * MIB);
        let expected = workload::random_io(&mut client, 0x7c9_0001);
        // A frontend that goes and comes back gets the same I/O queue's connection.
        drop(client);
        let mut client = vubd.connect(1);
        let q = client.queue(0);
        assert_same(
            &expected[..MIB as usize],
            &q.read(0, MIB as usize),
            0,
            "after reconnect",
        );
        vubd.assert_running();
    }

    // Two queues (two pollers, two I/O queues), header and data digests, namespace 2.
    {
        let mut vubd = serve(&target, "?nsid=2&hdgst=1&ddgst=1", 2, &[]);
        let mut client = vubd.connect(2);
        workload::random_io(&mut client, 0x7c9_0002);

        // Write-zeroes and discard on what the workload left behind.
        let q = client.queue(0);
        q.try_write_zeroes(0, 64 * 1024, false)
            .expect("write-zeroes succeeds");
        assert_same(&[0u8; 64 * 1024], &q.read(0, 64 * 1024), 0, "zeroed range");
        q.try_discard(MIB, 256 * 1024).expect("discard succeeds");
        let mut rng = Rng::new(7);
        let data = rng.bytes(128 * 1024);
        q.write(2 * MIB, &data);
        assert_same(
            &data,
            &q.read(2 * MIB, data.len()),
            2 * MIB,
            "after discard",
        );
        vubd.assert_running();
    }

    // The namespace 1 data written by the first daemon is still there for a new one.
    {
        let mut vubd = serve(&target, "", 1, &[]);
        let mut client = vubd.connect_with(&ClientOptions::queues(1));
        let q = client.queue(0);
        let mut rng = Rng::new(11);
        let data = rng.bytes(1 << 20);
        q.write(MIB, &data);
        assert_same(&data, &q.read(MIB, data.len()), MIB, "1 MiB write (R2T)");
        vubd.assert_running();
    }

    // `vubd discover` lists the subsystem.
    let port = target.port().to_string();
    let out = run_vubd(&[
        "discover".as_ref(),
        "--traddr".as_ref(),
        "127.0.0.1".as_ref(),
        "--trsvcid".as_ref(),
        port.as_ref(),
    ]);
    assert!(out.status.success(), "discover failed: {}", out.stderr);
    assert!(out.stdout.contains(target.nqn()), "{}", out.stdout);
    assert!(out.stdout.contains("4420"), "{}", out.stdout);

    // Mistakes the user can fix: one line, exit status 2.
    for (disk, what) in [
        (
            format!("nvme-tcp://127.0.0.1:{port}/nqn.2014-08.org.example:nothere"),
            "not found",
        ),
        (uri(&target, "?nsid=9"), "namespace 9"),
    ] {
        let dir = tempfile::tempdir().expect("socket directory");
        let socket = dir.path().join("unused.sock");
        let out = run_vubd(&[
            "--socket-path".as_ref(),
            socket.as_os_str(),
            "--disk".as_ref(),
            disk.as_ref(),
        ]);
        assert_eq!(out.status.code(), Some(2), "{disk}: {}", out.stderr);
        let line = out.stderr.trim_end();
        assert_eq!(line.lines().count(), 1, "{disk}: one line: {line}");
        assert!(line.contains(what), "{disk}: {line}");
    }
}

#[test]
fn a_target_that_stops_and_returns() {
    let target = NvmetTarget::start(&NvmetOptions {
        namespaces: 1,
        ns_size_mib: 8,
        ..NvmetOptions::default()
    });
    let timeouts = [
        "--keep-alive-tmo",
        "2",
        "--io-timeout",
        "2",
        "--reconnect-delay",
        "1",
    ];

    // Stopped for less than --ctrl-loss-tmo: every request completes, data verifies.
    {
        let mut args = timeouts.to_vec();
        args.extend(["--ctrl-loss-tmo", "60"]);
        let mut vubd = serve(&target, "", 1, &args);
        let mut client = vubd.connect(1);
        let q = client.queue(0);
        let mut rng = Rng::new(21);
        let before = rng.bytes(256 * 1024);
        q.write(0, &before);
        target.stop_guest();
        let during = rng.bytes(256 * 1024);
        q.submit_write(MIB, &during);
        q.submit_read(0, before.len());
        q.kick();
        std::thread::sleep(Duration::from_secs(4));
        target.cont_guest();
        let done = q.wait_all();
        assert!(done.iter().all(|d| d.ret == 0), "{done:?}");
        assert_same(&before, &done[1].data, 0, "read issued while stopped");
        assert_same(
            &during,
            &q.read(MIB, during.len()),
            MIB,
            "write issued while stopped",
        );
        vubd.assert_running();
        let log = vubd.output();
        assert!(
            log.contains("controller lost"),
            "the stop was noticed:\n{log}"
        );
        assert!(
            log.contains("controller reconnected"),
            "and recovered from:\n{log}"
        );
        eprintln!("{log}");
    }

    // Stopped for longer: requests fail with an error, vubd keeps running and recovers.
    {
        let mut args = timeouts.to_vec();
        args.extend(["--ctrl-loss-tmo", "2"]);
        let mut vubd = serve(&target, "", 1, &args);
        let mut client = vubd.connect(1);
        let q = client.queue(0);
        q.write(0, &[5u8; 4096]);
        target.stop_guest();
        let started = Instant::now();
        let failed = q.try_read(0, 4096);
        assert!(failed.is_err(), "a read while the target is gone fails");
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "and fails in bounded time"
        );
        target.cont_guest();
        // Reconnection happens every --reconnect-delay; I/O works again once it did.
        let deadline = Instant::now() + Duration::from_secs(60);
        let back = loop {
            match q.try_read(0, 4096) {
                Ok(data) => break data,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(500));
                }
                Err(e) => panic!("no recovery after the target returned: {e}"),
            }
        };
        assert_eq!(back, vec![5u8; 4096]);
        vubd.assert_running();
    }
}
