use super::*;

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

#[test]
fn each_io_queue_gets_its_own_vector_while_the_msix_table_lasts() {
    // 65 vectors, 64 queues granted: vector 0 and one per queue.
    assert_eq!(vectors_to_enable(65, 64), 65);
    // A small table: as many as it has; fewer queues granted: no more than they need.
    assert_eq!(vectors_to_enable(8, 64), 8);
    assert_eq!(vectors_to_enable(65, 2), 3);
    // No MSI-X, only the admin vector, or no I/O queue: none.
    for (have, granted) in [(0, 64), (1, 64), (65, 0)] {
        assert_eq!(vectors_to_enable(have, granted), 0, "{have} {granted}");
    }
    assert_eq!(vector_for(1, 8), Some(1));
    assert_eq!(vector_for(7, 8), Some(7));
    // Past the table, without vectors, and the admin queue: polled.
    assert_eq!(vector_for(8, 8), None);
    assert_eq!(vector_for(1, 0), None);
    assert_eq!(vector_for(0, 8), None);
}

const BDF: &str = "0000:01:00.0";

#[test]
fn a_fatal_status_while_enabling_fails_at_once_in_one_line_naming_the_controller() {
    // CFS with RDY clear or set: no wait for CAP.TO.
    for raw in [0b10, 0b11] {
        let e = ready_reached(BDF, raw, true).expect_err("CFS while enabling");
        assert!(matches!(&e, PcieError::Fatal(b) if b == BDF), "{e:?}");
        assert_eq!(
            e.to_string(),
            "controller 0000:01:00.0 reports a fatal status (CSTS.CFS)"
        );
    }
    assert_eq!(ready_reached(BDF, 0b01, true).ok(), Some(true), "ready");
    assert_eq!(ready_reached(BDF, 0, true).ok(), Some(false), "not yet");
}

#[test]
fn while_disabling_a_fatal_status_is_waited_out_and_only_rdy_counts() {
    // A reset disables a failed controller: CFS may stay set until RDY clears.
    assert_eq!(ready_reached(BDF, 0b11, false).ok(), Some(false));
    assert_eq!(ready_reached(BDF, 0b10, false).ok(), Some(true));
}

#[test]
fn registers_that_read_as_all_ones_are_a_removed_device_enabling_or_not() {
    for ready in [true, false] {
        let e = ready_reached(BDF, u32::MAX, ready).expect_err("all ones");
        assert!(matches!(&e, PcieError::Removed(b) if b == BDF), "{e:?}");
    }
}

#[test]
fn the_controller_has_failed_when_csts_has_cfs_or_reads_as_all_ones() {
    assert!(csts_fatal(0b10));
    assert!(csts_fatal(0b11));
    assert!(csts_fatal(u32::MAX));
    assert!(!csts_fatal(0));
    assert!(!csts_fatal(0b01));
    // SHST (bits 3:2) = shutdown complete: not a failure.
    assert!(!csts_fatal(0b1001));
}
