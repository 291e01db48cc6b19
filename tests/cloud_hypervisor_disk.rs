//! The disk as cloud-hypervisor's command line describes it (README, "Attaching a VM":
//! `--disk vhost_user=on,socket=PATH,num_queues=2,queue_size=256`), against vubd on its
//! defaults. cloud-hypervisor itself needs KVM, which the test machines cannot nest; what it
//! does as the vhost-user frontend of that disk is replayed with the test frontend
//! (`common/frontend.rs`): at least two queues offered (GET_QUEUE_NUM), two queues of 256
//! entries started, the configuration space read at offset 0x100 (VHOST_USER_CONFIG_OFFSET,
//! where cloud-hypervisor reads it; QEMU and libblkio read at 0), no inflight region, and
//! verified reads and writes on both queues.

mod common;
#[path = "common/frontend.rs"]
mod frontend;

use std::time::Instant;

use common::daemon::Daemon;
use common::{Image, TIMEOUT};
use frontend::{BLOCK, BlkFrontend, Options, Request, SECTOR, STATUS_OK};

/// Reads a block at `sector` on queue `q`: what the read returned.
fn read(fe: &mut BlkFrontend, q: usize, sector: u64, tag: u64) -> Vec<u8> {
    fe.submit(q, Request::Read { sector, len: BLOCK }, tag)
        .expect("submit a read");
    fe.notify(q).expect("notify");
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let mut got = None;
        fe.reap(q, |c, data| {
            if c.tag == tag {
                got = Some((c.status, data.to_vec()));
            }
        })
        .expect("reap");
        if let Some((status, data)) = got {
            assert_eq!(status, STATUS_OK, "read {tag}");
            return data;
        }
        assert!(Instant::now() < deadline, "read {tag} did not complete");
        fe.wait(std::time::Duration::from_millis(20)).expect("wait");
    }
}

#[test]
fn a_disk_as_cloud_hypervisor_starts_it_serves_both_queues() {
    let (image, contents) = Image::with_random_contents(4 << 20, 7);
    let daemon = Daemon::start(&image);
    let opts = Options {
        queue_size: 256,
        inflight: false,
        config_offset: 0x100,
        ..Options::new(2)
    };
    let mut fe = BlkFrontend::connect(daemon.socket(), opts)
        .unwrap_or_else(|e| panic!("connect: {e}\n{}", daemon.output()));
    assert_eq!(fe.num_queues(), 2);
    assert_eq!(
        fe.capacity(),
        image.size() / SECTOR,
        "the capacity as read at 0x100"
    );
    for q in 0..2 {
        let sector = (q as u64 + 1) * 64;
        let at = usize::try_from(sector * SECTOR).expect("fits");
        let tag = 10 * q as u64;
        assert_eq!(read(&mut fe, q, sector, tag), &contents[at..at + BLOCK]);
        let data = vec![0xc0 + q as u8; BLOCK];
        fe.submit(
            q,
            Request::Write {
                sector,
                data: &data,
            },
            tag + 1,
        )
        .expect("submit a write");
        assert_eq!(fe.status_of(q, tag + 1, TIMEOUT), STATUS_OK);
        assert_eq!(read(&mut fe, q, sector, tag + 2), data);
        assert_eq!(
            image.read_host(sector * SECTOR, BLOCK),
            data,
            "on the image"
        );
    }
}
