//! Parse, then execute: a descriptor chain becomes either a fully validated [`Parsed`] request
//! whose data buffers are already translated to host iovecs, or a [`Rejected`] one that carries
//! the status to complete it with. Pure: reads guest memory, writes only the caller's iovec list.
//!
//! Framing follows virtio 1.2 §2.7.4 ("the device MUST NOT make assumptions about the particular
//! arrangement of descriptors"): the 16-byte header is at the start of the device-readable part,
//! the status byte is the last byte of the device-writable part, and everything in between is
//! data, however the driver split it into descriptors.

use thiserror::Error;
use vm_memory::GuestAddress;

use super::chain::{Desc, DescTable, walk};
use super::{
    HEADER_LEN, MAX_RANGE_SEGMENTS, RANGE_SEGMENT_LEN, SECTOR_SHIFT, SECTOR_SIZE, Status,
    WRITE_ZEROES_FLAG_UNMAP, req_type,
};
use crate::mem::{HostMap, IovecList, MemError};

/// What the parser checks requests against.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub capacity_sectors: u64,
    /// Most data descriptors per request (`seg_max`).
    pub seg_max: u32,
    pub read_only: bool,
    /// Discard is offered; its per-segment limit in sectors.
    pub max_discard_sectors: Option<u32>,
    /// Write-zeroes is offered; its per-segment limit in sectors.
    pub max_write_zeroes_sectors: Option<u32>,
}

/// One discard / write-zeroes segment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Range {
    pub sector: u64,
    pub sectors: u32,
    /// Write-zeroes only: the range may be deallocated.
    pub unmap: bool,
}

/// The segments of a discard / write-zeroes request, stored inline.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RangeList {
    len: u8,
    ranges: [Range; MAX_RANGE_SEGMENTS],
}

impl RangeList {
    pub fn as_slice(&self) -> &[Range] {
        &self.ranges[..usize::from(self.len)]
    }

    fn push(&mut self, r: Range) {
        self.ranges[usize::from(self.len)] = r;
        self.len += 1;
    }
}

/// A validated request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestKind {
    /// Read `data_len` bytes at `sector` into the iovecs.
    Read {
        sector: u64,
    },
    /// Write the iovecs' `data_len` bytes at `sector`.
    Write {
        sector: u64,
    },
    Flush,
    /// Write the device id into the iovecs.
    GetId,
    Discard(RangeList),
    WriteZeroes(RangeList),
}

/// The request part of a [`Parsed`] chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    pub kind: RequestKind,
    /// Bytes of data buffers (what the iovecs cover).
    pub data_len: u32,
}

/// A chain that passed validation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Parsed {
    pub head: u16,
    /// Guest address of the status byte.
    pub status: GuestAddress,
    pub request: Request,
}

/// A chain that must be completed without running.
#[derive(Debug, PartialEq, Eq)]
pub struct Rejected {
    pub head: u16,
    /// Where to write the status; `None` when the chain has no usable status byte, in which
    /// case it can only be returned to the driver with a used length of 0.
    pub status: Option<GuestAddress>,
    pub error: RequestError,
}

/// Why a request is rejected. Each maps to the status the driver sees.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum RequestError {
    #[error("descriptor chain is empty or could not be read")]
    EmptyChain,
    #[error("no device-writable status byte at the end of the chain")]
    MissingStatus,
    #[error("request header missing or shorter than {HEADER_LEN} bytes")]
    ShortHeader,
    #[error("request header is not device-readable")]
    HeaderNotReadable,
    #[error("device-readable descriptor after a device-writable one")]
    ReadableAfterWritable,
    #[error("more than {max} data segments")]
    TooManySegments { max: u32 },
    #[error("data buffers have the wrong direction for this request type")]
    WrongDirection,
    #[error("data length {0} is not a multiple of 512")]
    UnalignedLength(u32),
    #[error("sectors {sector}+{sectors} are beyond the capacity of {capacity} sectors")]
    OutOfRange {
        sector: u64,
        sectors: u64,
        capacity: u64,
    },
    #[error("write to a read-only device")]
    ReadOnly,
    #[error("range segment list malformed")]
    BadRangeList,
    #[error("range segment of {sectors} sectors exceeds the limit of {max}")]
    RangeTooLong { sectors: u32, max: u32 },
    #[error("unknown range segment flags {0:#x}")]
    BadRangeFlags(u32),
    #[error("unsupported request type {0}")]
    Unsupported(u32),
    #[error("guest memory")]
    Memory(#[source] MemError),
}

impl RequestError {
    /// The status a driver sees for this error.
    pub fn status(&self) -> Status {
        match self {
            RequestError::Unsupported(_) => Status::Unsupp,
            _ => Status::IoErr,
        }
    }
}

/// Parses and validates the chain at `head` of `table`. `descs` is scratch storage whose
/// capacity bounds the chain length accepted (it is cleared, never grown); `iov` receives the
/// data buffers, as host addresses from `map`.
pub fn parse(
    map: &HostMap,
    table: DescTable,
    head: u16,
    limits: &Limits,
    descs: &mut Vec<Desc>,
    iov: &mut IovecList,
) -> Result<Parsed, Rejected> {
    iov.clear();
    let reject = |status, error| Rejected {
        head,
        status,
        error,
    };
    // A chain that cannot be followed to its end has no known status byte.
    let Ok(walk) = walk(map, table, head, descs) else {
        return Err(reject(None, RequestError::EmptyChain));
    };
    let status =
        status_address(map, &walk.last).ok_or(reject(None, RequestError::MissingStatus))?;
    let rej = |error| reject(Some(status), error);
    if walk.overflow {
        return Err(rej(RequestError::TooManySegments {
            max: limits.seg_max,
        }));
    }

    if descs[0].is_write_only() {
        return Err(rej(RequestError::HeaderNotReadable));
    }
    // Split the chain into its readable part (header, then payload) and its writable part
    // (payload, then the status byte), checking the readable-then-writable order.
    let n_writable = descs.iter().filter(|d| d.is_write_only()).count();
    let n_readable = descs.len() - n_writable;
    if descs[..n_readable].iter().any(|d| d.is_write_only()) {
        return Err(rej(RequestError::ReadableAfterWritable));
    }
    let header = read_header(map, &descs[..n_readable]).map_err(rej)?;
    let rtype = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let sector = u64::from_le_bytes([
        header[8], header[9], header[10], header[11], header[12], header[13], header[14],
        header[15],
    ]);
    let data = Payload {
        descs: descs.as_slice(),
        n_readable,
        readable_len: descs[..n_readable].iter().map(|d| u64::from(d.len)).sum(),
        writable_len: descs[n_readable..].iter().map(|d| u64::from(d.len)).sum(),
    };

    // Each arm builds the result in place: `Request` is large (the inline range list), and
    // moving a finished one would copy all of it for every read and write.
    let done = |request| {
        Ok(Parsed {
            head,
            status,
            request,
        })
    };
    match rtype {
        req_type::IN | req_type::OUT => {
            let write = rtype == req_type::OUT;
            if write && limits.read_only {
                return Err(rej(RequestError::ReadOnly));
            }
            // One pass: count the data pieces and translate them; a translation failure is
            // reported only after the checks that do not depend on memory.
            let (seg_count, len, mem_err) = if write {
                if data.writable_len != 1 {
                    return Err(rej(RequestError::WrongDirection));
                }
                push_pieces(data.readable(), map, iov)
            } else {
                if data.readable_len() != 0 {
                    return Err(rej(RequestError::WrongDirection));
                }
                push_pieces(data.writable(), map, iov)
            };
            if seg_count > limits.seg_max as usize {
                return Err(rej(RequestError::TooManySegments {
                    max: limits.seg_max,
                }));
            }
            let Ok(len32) = u32::try_from(len) else {
                return Err(rej(RequestError::UnalignedLength(u32::MAX)));
            };
            if len % SECTOR_SIZE != 0 {
                return Err(rej(RequestError::UnalignedLength(len32)));
            }
            check_range(sector, len >> SECTOR_SHIFT, limits.capacity_sectors).map_err(rej)?;
            if let Some(e) = mem_err {
                return Err(rej(RequestError::Memory(e)));
            }
            let data_len = len32;
            if write {
                Ok(Parsed {
                    head,
                    status,
                    request: Request {
                        kind: RequestKind::Write { sector },
                        data_len,
                    },
                })
            } else {
                Ok(Parsed {
                    head,
                    status,
                    request: Request {
                        kind: RequestKind::Read { sector },
                        data_len,
                    },
                })
            }
        }
        req_type::FLUSH => {
            // Data buffers, if any, are ignored (virtio 1.2 §5.2.6.2 gives FLUSH none).
            done(Request {
                kind: RequestKind::Flush,
                data_len: 0,
            })
        }
        req_type::GET_ID => {
            if data.readable_len() != 0 || data.writable_len < 2 {
                return Err(rej(RequestError::WrongDirection));
            }
            if let (_, _, Some(e)) = push_pieces(data.writable(), map, iov) {
                return Err(rej(RequestError::Memory(e)));
            }
            let len = u32::try_from(iov.bytes()).unwrap_or(u32::MAX);
            done(Request {
                kind: RequestKind::GetId,
                data_len: len,
            })
        }
        req_type::DISCARD | req_type::WRITE_ZEROES => {
            let discard = rtype == req_type::DISCARD;
            let max = if discard {
                limits.max_discard_sectors
            } else {
                limits.max_write_zeroes_sectors
            };
            let Some(max) = max else {
                return Err(rej(RequestError::Unsupported(rtype)));
            };
            if limits.read_only {
                return Err(rej(RequestError::ReadOnly));
            }
            if data.writable_len != 1 {
                return Err(rej(RequestError::WrongDirection));
            }
            let ranges =
                read_ranges(map, &data, discard, max, limits.capacity_sectors).map_err(rej)?;
            done(Request {
                kind: if discard {
                    RequestKind::Discard(ranges)
                } else {
                    RequestKind::WriteZeroes(ranges)
                },
                data_len: 0,
            })
        }
        other => Err(rej(RequestError::Unsupported(other))),
    }
}

/// The 16-byte header from the start of the readable descriptors, however it is split.
fn read_header(map: &HostMap, readable: &[Desc]) -> Result<[u8; 16], RequestError> {
    let oob = |d: &Desc, len| RequestError::Memory(MemError::OutOfRange { addr: d.addr, len });
    match readable.first() {
        None => return Err(RequestError::ShortHeader),
        Some(d) if d.len >= HEADER_LEN => {
            return map.read16(d.addr).ok_or_else(|| oob(d, HEADER_LEN));
        }
        Some(_) => {}
    }
    let mut header = [0u8; HEADER_LEN as usize];
    let mut at = 0usize;
    for d in readable {
        if at == header.len() {
            break;
        }
        let n = (d.len as usize).min(header.len() - at);
        if !map.read(d.addr, &mut header[at..at + n]) {
            return Err(oob(d, n as u32));
        }
        at += n;
    }
    if at < header.len() {
        return Err(RequestError::ShortHeader);
    }
    Ok(header)
}

/// The last byte of the last descriptor, if it is device-writable and inside guest memory.
fn status_address(map: &HostMap, last: &Desc) -> Option<GuestAddress> {
    if !last.is_write_only() || last.len == 0 {
        return None;
    }
    let addr = last.addr.checked_add(u64::from(last.len) - 1)?;
    map.contains(addr).then_some(GuestAddress(addr))
}

fn check_range(sector: u64, sectors: u64, capacity: u64) -> Result<(), RequestError> {
    match sector.checked_add(sectors) {
        Some(end) if end <= capacity => Ok(()),
        _ => Err(RequestError::OutOfRange {
            sector,
            sectors,
            capacity,
        }),
    }
}

/// The data part of a chain: readable bytes after the header, writable bytes before the
/// status byte.
struct Payload<'a> {
    descs: &'a [Desc],
    n_readable: usize,
    /// Bytes of the readable descriptors, header included.
    readable_len: u64,
    /// Bytes of the writable descriptors, status byte included.
    writable_len: u64,
}

impl Payload<'_> {
    /// (address, length) of readable data pieces, header bytes removed.
    fn readable(&self) -> impl Iterator<Item = (u64, u32)> + '_ {
        let mut skip = HEADER_LEN;
        self.descs[..self.n_readable].iter().filter_map(move |d| {
            let cut = skip.min(d.len);
            skip -= cut;
            // The walk bounded the chain below 4 GiB, not each address: wrap like the guest.
            (d.len > cut).then(|| (d.addr.wrapping_add(u64::from(cut)), d.len - cut))
        })
    }

    /// (address, length) of writable data pieces, status byte removed.
    fn writable(&self) -> impl Iterator<Item = (u64, u32)> + '_ {
        let w = &self.descs[self.n_readable..];
        let last = w.len().saturating_sub(1);
        w.iter().enumerate().filter_map(move |(i, d)| {
            let len = if i == last { d.len - 1 } else { d.len };
            (len > 0).then_some((d.addr, len))
        })
    }

    /// Readable bytes after the header.
    fn readable_len(&self) -> u64 {
        self.readable_len.saturating_sub(u64::from(HEADER_LEN))
    }
}

/// Translates data pieces into `iov`, in order. Returns the number of pieces, their bytes, and
/// the first translation failure (after which nothing more is translated, but counting goes on).
fn push_pieces(
    pieces: impl Iterator<Item = (u64, u32)>,
    map: &HostMap,
    iov: &mut IovecList,
) -> (usize, u64, Option<MemError>) {
    let (mut n, mut bytes, mut err) = (0usize, 0u64, None);
    for (addr, len) in pieces {
        n += 1;
        bytes += u64::from(len);
        if err.is_none() {
            err = iov.push(map, addr, len).err();
        }
    }
    (n, bytes, err)
}

/// Reads the `struct virtio_blk_discard_write_zeroes` segments of a discard / write-zeroes
/// request (virtio 1.2 §5.2.6), validating each against the limits and the capacity.
fn read_ranges(
    map: &HostMap,
    data: &Payload<'_>,
    discard: bool,
    max_sectors: u32,
    capacity: u64,
) -> Result<RangeList, RequestError> {
    let total = data.readable_len();
    if total == 0 || total % u64::from(RANGE_SEGMENT_LEN) != 0 {
        return Err(RequestError::BadRangeList);
    }
    if total / u64::from(RANGE_SEGMENT_LEN) > MAX_RANGE_SEGMENTS as u64 {
        return Err(RequestError::TooManySegments {
            max: MAX_RANGE_SEGMENTS as u32,
        });
    }
    // Gather the raw bytes; a segment may straddle descriptors.
    let mut raw = [0u8; MAX_RANGE_SEGMENTS * RANGE_SEGMENT_LEN as usize];
    let mut at = 0usize;
    for (addr, len) in data.readable() {
        let dst = &mut raw[at..at + len as usize];
        if !map.read(addr, dst) {
            return Err(RequestError::Memory(MemError::OutOfRange { addr, len }));
        }
        at += len as usize;
    }
    let mut list = RangeList::default();
    for seg in raw[..at].chunks_exact(RANGE_SEGMENT_LEN as usize) {
        let sector = u64::from_le_bytes(seg[0..8].try_into().unwrap_or_default());
        let sectors = u32::from_le_bytes(seg[8..12].try_into().unwrap_or_default());
        let flags = u32::from_le_bytes(seg[12..16].try_into().unwrap_or_default());
        // Discard has no flags; write-zeroes knows only UNMAP (virtio 1.2 §5.2.6.2).
        let allowed = if discard { 0 } else { WRITE_ZEROES_FLAG_UNMAP };
        if flags & !allowed != 0 {
            return Err(RequestError::BadRangeFlags(flags));
        }
        if sectors > max_sectors {
            return Err(RequestError::RangeTooLong {
                sectors,
                max: max_sectors,
            });
        }
        check_range(sector, u64::from(sectors), capacity)?;
        list.push(Range {
            sector,
            sectors,
            unmap: flags & WRITE_ZEROES_FLAG_UNMAP != 0,
        });
    }
    Ok(list)
}

#[cfg(test)]
#[path = "request_tests/mod.rs"]
mod tests;
