use super::*;

#[test]
fn queue_ids_are_handed_out_lowest_first_and_reused_after_free() {
    let mut p = QidPool::new(3);
    assert_eq!(
        (p.alloc(), p.alloc(), p.alloc()),
        (Some(1), Some(2), Some(3))
    );
    assert_eq!(p.alloc(), None, "only three granted");
    p.free(2);
    assert_eq!(p.alloc(), Some(2));
    // QID 0 is the admin queue, and QIDs past the grant were never handed out.
    p.free(0);
    p.free(9);
    assert_eq!(p.alloc(), None);
    p.free(1);
    p.free(3);
    assert_eq!((p.alloc(), p.alloc()), (Some(1), Some(3)));
    assert_eq!(QidPool::new(0).alloc(), None);
}

/// CAP with MPSMIN and MPSMAX.
fn cap(mpsmin: u64, mpsmax: u64) -> Cap {
    Cap((mpsmin << 48) | (mpsmax << 52))
}

#[test]
fn the_host_page_size_is_used_when_the_controller_takes_it() {
    let p = choose_page(cap(0, 4), 4096, "0000:00:04.0").expect("4K");
    assert_eq!(p, PageSize::K4);
    let p = choose_page(cap(0, 4), 65536, "0000:00:04.0").expect("64K");
    assert_eq!(p, PageSize::K64);
}

#[test]
fn a_host_page_larger_than_the_controller_takes_uses_its_largest() {
    // 64 KiB host pages (arm64), a controller of 4 KiB to 16 KiB: 16 KiB.
    let p = choose_page(cap(0, 2), 65536, "0000:00:04.0").expect("16K");
    assert_eq!(p.bytes(), 16384);
}

#[test]
fn a_controller_that_needs_larger_pages_than_the_host_has_is_refused() {
    let e = choose_page(cap(1, 2), 4096, "0000:00:04.0").expect_err("8K minimum");
    assert_eq!(
        e.to_string(),
        "controller 0000:00:04.0 needs memory pages of at least 8192 bytes, larger than the host's 4096"
    );
}
