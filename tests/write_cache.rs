//! The guest's write cache mode (CONFIG_WCE) as vubd reports it: write-back by default, and
//! on a device taken over from another process (`--incoming`, which cannot know what the
//! guest chose), write-through until the guest's first FLUSH shows it has a write cache.

mod common;
#[path = "common/raw.rs"]
mod raw;

use common::Image;
use common::daemon::{Daemon, DaemonConfig};
use raw::RawFrontend;

const MIB: u64 = 1 << 20;

fn writeback(raw: &RawFrontend) -> u8 {
    raw.config().expect("GET_CONFIG").writeback
}

#[test]
fn a_device_reports_a_write_back_cache_by_default() {
    let image = Image::new(MIB);
    let daemon = Daemon::vubd(&image, &DaemonConfig::default(), &[]);
    let socket = daemon.socket().to_owned();
    let mode = common::bounded("raw frontend", move || {
        let raw = RawFrontend::connect(&socket, raw::features_without_ro()).expect("connect");
        writeback(&raw)
    });
    assert_eq!(mode, 1);
}

#[test]
fn a_device_taken_over_serves_write_through_until_the_guest_flushes() {
    let image = Image::new(MIB);
    let daemon = Daemon::vubd(&image, &DaemonConfig::default(), &["--incoming".as_ref()]);
    let socket = daemon.socket().to_owned();
    let modes = common::bounded("raw frontend", move || {
        let mut raw = RawFrontend::connect(&socket, raw::features_without_ro()).expect("connect");
        let before = writeback(&raw);
        assert_eq!(raw.write(0, &[7; 512]), 0, "a write");
        let after_write = writeback(&raw);
        assert_eq!(raw.flush(), 0, "a flush");
        (before, after_write, writeback(&raw))
    });
    assert_eq!(
        modes,
        (0, 0, 1),
        "write-through, still after a write, write-back after a flush"
    );
    assert_eq!(image.read_host(0, 512), [7; 512]);
}
