//! How a command's data reaches the controller: PRPs when the layout follows their rules, an
//! SGL when it does not and the controller takes SGLs, else a bounce buffer. Pure: it works on
//! a [`DataRef`] (whose addresses are IOVAs) and a command's list area as a slice, so every
//! decision is unit tested without a device.

use super::PageSize;
use super::prp::{self, PrpError, PrpList, Prps};
use super::sgl::{self, DESCRIPTOR_LEN, SglAlign, SglError, SglPtr, SglSegment};
use crate::nvme::data::DataRef;

/// What describes a command's data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// PRP entries, with `list_slots` entries written to the command's list area.
    Prp(Prps),
    /// An SGL, its segment (if any) written to the command's list area.
    Sgl(SglPtr),
    /// Neither fits: copy the data through a bounce buffer, which PRPs describe.
    Bounce,
}

/// The data cannot be sent however it is described: the command fails with a status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unusable {
    /// More bytes than the queue accepts in one command.
    TooLarge {
        len: usize,
        max: usize,
    },
    /// The pieces do not hold the command's bytes, or wrap the address space.
    Prp(PrpError),
    Sgl(SglError),
}

/// Describes `data` (of at most `max_len` bytes) for a controller with pages of `page` and
/// SGL support `sgl`, using `area` at `area_iova` for a PRP list or an SGL segment.
pub fn describe(
    data: &DataRef,
    max_len: usize,
    page: PageSize,
    sgl: Option<SglAlign>,
    area: &mut [u64],
    area_iova: u64,
) -> Result<Layout, Unusable> {
    let len = data.len();
    if len > max_len {
        return Err(Unusable::TooLarge { len, max: max_len });
    }
    if let Some(p) = two_page_prps(data, page) {
        return Ok(Layout::Prp(p));
    }
    let prp_result = prps(data, page, area, area_iova);
    let prp_error = match prp_result {
        Ok(p) => return Ok(Layout::Prp(p)),
        Err(e) if e.needs_fallback() || matches!(e, PrpError::ListTooSmall { .. }) => e,
        Err(e) => return Err(Unusable::Prp(e)),
    };
    let Some(align) = sgl else {
        return if prp_error.needs_fallback() {
            Ok(Layout::Bounce)
        } else {
            Err(Unusable::Prp(prp_error))
        };
    };
    let descs = area.len() * 8 / DESCRIPTOR_LEN;
    // SAFETY: the same memory as `area` (exclusively borrowed, so nothing else reaches it),
    // viewed as 16-byte descriptors: `[u8; 16]` needs no alignment and `descs` of them fit
    // in the area's bytes. `area` is not used again while this view lives.
    let seg = unsafe { std::slice::from_raw_parts_mut(area.as_mut_ptr().cast(), descs) };
    match sgl_of(data, align, seg, area_iova) {
        Ok(s) => Ok(Layout::Sgl(s)),
        Err(
            SglError::Unaligned { .. }
            | SglError::SegmentFull { .. }
            | SglError::PieceTooLong { .. },
        ) if prp_error.needs_fallback() => Ok(Layout::Bounce),
        Err(e) => Err(Unusable::Sgl(e)),
    }
}

/// The common case without a list: one contiguous, dword-aligned piece within two pages
/// (NVMe Base 2.0 §4.1.1: PRP1 with any dword offset, PRP2 the next page). `None` for
/// anything else, which [`prps`] handles in general.
#[inline]
fn two_page_prps(data: &DataRef, page: PageSize) -> Option<Prps> {
    let (addr, len) = data.single_piece()?;
    let addr = addr as u64;
    let size = page.bytes() as u64;
    let offset = page.offset(addr);
    if len == 0 || addr % 4 != 0 || offset + len as u64 > 2 * size {
        return None;
    }
    let prp2 = if offset + len as u64 > size {
        addr - offset + size
    } else {
        0
    };
    Some(Prps {
        prp1: addr,
        prp2,
        list_slots: 0,
    })
}

/// PRPs for `data`, the list in `area`.
pub fn prps(
    data: &DataRef,
    page: PageSize,
    area: &mut [u64],
    area_iova: u64,
) -> Result<Prps, PrpError> {
    let mut list = PrpList::new(area, area_iova, page)?;
    let mut b = prp::PrpBuilder::new(&mut list);
    // The builder keeps the first error and `finish` returns it.
    data.for_each_piece(0, data.len(), |p, n| {
        let _ = b.push(p as u64, n);
    });
    b.finish(data.len())
}

fn sgl_of(
    data: &DataRef,
    align: SglAlign,
    seg: &mut [[u8; DESCRIPTOR_LEN]],
    seg_iova: u64,
) -> Result<SglPtr, SglError> {
    let mut seg = SglSegment::new(seg, seg_iova)?;
    let mut b = sgl::SglBuilder::new(&mut seg, align);
    data.for_each_piece(0, data.len(), |p, n| {
        let _ = b.push(p as u64, n);
    });
    b.finish(data.len())
}

#[cfg(test)]
mod tests {
    use libc::iovec;

    use super::*;

    const PAGE: PageSize = PageSize::K4;
    const AREA_IOVA: u64 = 0x7000_0000;
    const MAX: usize = 128 << 10;

    fn iov(addr: u64, len: usize) -> iovec {
        iovec {
            iov_base: addr as *mut libc::c_void,
            iov_len: len,
        }
    }

    /// Describes the iovecs `v` (addresses never dereferenced).
    fn run(v: &[iovec], sgl: Option<SglAlign>) -> Result<Layout, Unusable> {
        let len = v.iter().map(|v| v.iov_len).sum();
        // SAFETY: `describe` only computes with the addresses; `v` outlives the call.
        let data = unsafe { DataRef::new(v, 0, len) }.expect("fits");
        let mut area = vec![0u64; 512];
        describe(&data, MAX, PAGE, sgl, &mut area, AREA_IOVA)
    }

    #[test]
    fn one_piece_within_two_pages_takes_the_short_path_with_the_general_result() {
        // Offsets and lengths around the page boundary: whenever the short path answers, it
        // must give what the general builder gives.
        let mut answered = 0;
        for start in [0u64, 4, 512, 4092, 4096, 6000] {
            for len in [4usize, 512, 4096, 4097, 8192, 8200] {
                let v = [iov(0x10_0000 + start, len)];
                // SAFETY: the addresses are never dereferenced: only described.
                let d = unsafe { DataRef::new(&v, 0, len) }.expect("fits");
                let Some(fast) = two_page_prps(&d, PageSize::K4) else {
                    continue;
                };
                answered += 1;
                let mut area = [0u64; 16];
                let general = prps(&d, PageSize::K4, &mut area, 0x20_0000).expect("valid");
                assert_eq!(fast, general, "start {start} len {len}");
            }
        }
        assert!(
            answered >= 12,
            "the short path takes the common cases ({answered})"
        );
    }

    #[test]
    fn page_aligned_data_goes_in_prps_whatever_the_sgl_support() {
        let v = [iov(0x1_0000, 8192), iov(0x5_0000, 4096)];
        for sgl in [None, Some(SglAlign::Byte), Some(SglAlign::Dword)] {
            match run(&v, sgl) {
                Ok(Layout::Prp(p)) => {
                    assert_eq!((p.prp1, p.prp2, p.list_slots), (0x1_0000, AREA_IOVA, 2));
                }
                other => panic!("{sgl:?}: {other:?}"),
            }
        }
        // One buffer starting inside a page is still PRPs (PRP1 carries the offset).
        let v = [iov(0x1_0200, 4096)];
        assert!(matches!(run(&v, None), Ok(Layout::Prp(p)) if p.prp2 == 0x1_1000));
    }

    #[test]
    fn a_layout_prps_cannot_describe_takes_an_sgl_when_supported() {
        // The second piece starts inside a page.
        let v = [iov(0x1_0000, 512), iov(0x2_0200, 512)];
        match run(&v, Some(SglAlign::Byte)) {
            Ok(Layout::Sgl(s)) => assert_eq!(s.segment_descs, 2),
            other => panic!("{other:?}"),
        }
        // Dword granularity is enough for 512-byte pieces.
        assert!(matches!(run(&v, Some(SglAlign::Dword)), Ok(Layout::Sgl(_))));
    }

    #[test]
    fn without_sgls_or_with_pieces_the_sgl_refuses_the_data_is_bounced() {
        let v = [iov(0x1_0000, 512), iov(0x2_0200, 512)];
        assert_eq!(run(&v, None), Ok(Layout::Bounce));
        // Odd addresses: dword SGLs cannot take them, and PRP1 must be dword aligned.
        let odd = [iov(0x1_0001, 511), iov(0x2_0000, 1)];
        assert_eq!(run(&odd, Some(SglAlign::Dword)), Ok(Layout::Bounce));
        assert_eq!(run(&odd, None), Ok(Layout::Bounce));
        assert!(matches!(
            run(&odd, Some(SglAlign::Byte)),
            Ok(Layout::Sgl(_))
        ));
        // More pieces than the segment holds (512 qwords = 256 descriptors).
        let many: Vec<iovec> = (0..300)
            .map(|i| iov(0x10_0000 + i * 0x1000 + 8, 8))
            .collect();
        assert_eq!(run(&many, Some(SglAlign::Byte)), Ok(Layout::Bounce));
    }

    #[test]
    fn data_larger_than_the_queue_takes_fails_without_a_fallback() {
        let v = [iov(0x1_0000, MAX + 4096)];
        assert_eq!(
            run(&v, Some(SglAlign::Byte)),
            Err(Unusable::TooLarge {
                len: MAX + 4096,
                max: MAX
            })
        );
    }

    #[test]
    fn a_list_area_too_small_for_the_prps_falls_back_to_one_sgl_descriptor() {
        // 64 KiB aligned in one piece needs 16 PRP entries; give the list room for 4.
        let v = [iov(0x10_0000, 64 << 10)];
        // SAFETY: addresses only, as in `run`.
        let data = unsafe { DataRef::new(&v, 0, 64 << 10) }.expect("fits");
        let mut area = vec![0u64; 4];
        let r = describe(&data, MAX, PAGE, Some(SglAlign::Byte), &mut area, AREA_IOVA);
        assert!(
            matches!(r, Ok(Layout::Sgl(s)) if s.segment_descs == 0),
            "{r:?}"
        );
        let mut area = vec![0u64; 4];
        let r = describe(&data, MAX, PAGE, None, &mut area, AREA_IOVA);
        assert!(
            matches!(r, Err(Unusable::Prp(PrpError::ListTooSmall { .. }))),
            "{r:?}"
        );
    }
}
