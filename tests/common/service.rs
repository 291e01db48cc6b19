//! What the tests of vubd as a service share (`tests/systemd.rs`, `tests/systemd_units.rs`,
//! `tests/kata_store.rs`): a notification socket as systemd binds one for a Type=notify
//! service, the notifications it receives, and verified I/O through a device's socket. Not a
//! submodule of `common`: those test binaries declare it next to `mod common;`.

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};

use crate::common::client::{Client, ClientOptions};
use crate::common::daemon::Daemon;
use crate::common::{Image, Rng, TIMEOUT, assert_same};

const MIB: usize = 1 << 20;

/// A notification socket at `dir/notify`: vubd's NOTIFY_SOCKET.
pub fn notify_socket(dir: &Path) -> (UnixDatagram, PathBuf) {
    let path = dir.join("notify");
    let socket = UnixDatagram::bind(&path).expect("bind the notification socket");
    socket
        .set_read_timeout(Some(TIMEOUT))
        .expect("receive timeout");
    (socket, path)
}

/// The next notification `daemon` sends, failing the test if none comes within [`TIMEOUT`].
pub fn next_notification(socket: &UnixDatagram, daemon: &Daemon) -> String {
    let mut buf = [0u8; 4096];
    let len = socket.recv(&mut buf).unwrap_or_else(|e| {
        panic!(
            "no notification within {TIMEOUT:?}: {e}\n{}",
            daemon.output()
        )
    });
    String::from_utf8_lossy(&buf[..len]).into_owned()
}

/// Writes a random pattern over the first MiB of the device behind `socket` and reads it
/// back, checking it against the image file too.
pub fn verified_io(socket: &Path, image: &Image, seed: u64) {
    let mut client = Client::connect(socket, &ClientOptions::queues(1))
        .unwrap_or_else(|e| panic!("connect to {}: {e}", socket.display()));
    let data = Rng::new(seed).bytes(MIB);
    let q = client.queue(0);
    q.write(0, &data);
    q.flush();
    assert_same(&data, &q.read(0, data.len()), 0, "read back");
    assert_same(&data, &image.read_host(0, data.len()), 0, "the image");
}
