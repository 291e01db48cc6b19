//! What GET_ID tells a guest of the host: without `--serial`, an image's serial number is a
//! hash of its canonical path (20 hex digits), the same whenever vubd serves that image again,
//! and nothing of the path itself; `--serial` still sets it.

mod common;
#[path = "common/frontend.rs"]
mod frontend;

use std::ffi::OsStr;
use std::path::Path;
use std::time::{Duration, Instant};

use common::TIMEOUT;
use common::daemon::Daemon;
use frontend::{BlkFrontend, Options, Request, STATUS_OK};
use sha2::{Digest, Sha256};

/// vubd serving `disk` on `socket`, with `extra` arguments.
fn vubd(socket: &Path, disk: &Path, extra: &[&str]) -> Daemon {
    let mut args = vec![
        OsStr::new("--socket-path"),
        socket.as_os_str(),
        OsStr::new("--disk"),
        disk.as_os_str(),
    ];
    args.extend(extra.iter().map(OsStr::new));
    Daemon::vubd_with_args(&args, socket)
}

/// The 20 bytes GET_ID answers.
fn get_id(socket: &Path) -> Vec<u8> {
    let mut fe = BlkFrontend::connect(socket, Options::new(1)).expect("connect");
    fe.submit(0, Request::GetId, 7).expect("submit");
    fe.notify(0).expect("notify");
    let deadline = Instant::now() + TIMEOUT;
    let mut id = None;
    while id.is_none() {
        assert!(Instant::now() < deadline, "GET_ID did not complete");
        fe.wait(Duration::from_millis(5)).expect("wait");
        fe.reap(0, |c, data| {
            assert_eq!((c.tag, c.status), (7, STATUS_OK), "{c:?}");
            id = Some(data[..20].to_vec());
        })
        .expect("reap");
    }
    id.expect("an answer")
}

#[test]
fn an_images_default_serial_is_a_hash_of_its_path_and_stays() {
    let dir = tempfile::tempdir().expect("temp dir");
    let image = dir.path().join("tenant-a-secret-name.img");
    std::fs::File::create(&image)
        .and_then(|f| f.set_len(1 << 20))
        .expect("image");
    let socket = dir.path().join("vubd.sock");
    // What vubd documents: SHA-256 of its prefix and the canonical path, 10 bytes in hex.
    let mut h = Sha256::new();
    h.update(b"vubd image serial\0");
    h.update(
        image
            .canonicalize()
            .expect("canonical")
            .as_os_str()
            .as_encoded_bytes(),
    );
    let expected: String = h.finalize()[..10]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();

    let first = {
        let _vubd = vubd(&socket, &image, &[]);
        get_id(&socket)
    };
    assert_eq!(String::from_utf8_lossy(&first), expected);
    let text = String::from_utf8_lossy(&first).into_owned();
    assert!(!text.contains("tenant") && !text.contains(".img"), "{text}");
    // Again, by another spelling of the path: the same serial.
    let again = {
        let other = dir.path().join(".").join("tenant-a-secret-name.img");
        let _vubd = vubd(&socket, &other, &[]);
        get_id(&socket)
    };
    assert_eq!(again, first);
    // --serial still wins.
    let given = {
        let _vubd = vubd(&socket, &image, &["--serial", "disk-0"]);
        get_id(&socket)
    };
    assert_eq!(&given[..7], b"disk-0\0");
}
