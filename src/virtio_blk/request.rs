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
use crate::mem::{HostMap, IovecList, MemError, read_u64_pair_at};

/// What the parser checks requests against.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub capacity_sectors: u64,
    /// Most data descriptors per request (`seg_max`).
    pub seg_max: u32,
    /// Largest data segment in bytes (`size_max`): with `seg_max` it bounds what one request
    /// can ask of the disk (and how many commands it becomes on a shared NVMe controller).
    pub size_max: u32,
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

/// The parser's working storage, owned by the caller and reused for every request: the
/// descriptors of the chain being parsed, and the segments of the last discard / write-zeroes
/// request (kept out of [`Request`] so that reads and writes stay small).
#[derive(Debug)]
pub struct Scratch {
    descs: Box<[Desc]>,
    ranges: [Range; MAX_RANGE_SEGMENTS],
    n_ranges: usize,
}

impl Scratch {
    /// Scratch for chains of at most `max_descs` descriptors; longer chains are rejected.
    pub fn new(max_descs: usize) -> Self {
        Self {
            descs: vec![Desc::default(); max_descs].into_boxed_slice(),
            ranges: [Range::default(); MAX_RANGE_SEGMENTS],
            n_ranges: 0,
        }
    }

    /// The segments of the last request parsed as [`RequestKind::Discard`] or
    /// [`RequestKind::WriteZeroes`].
    pub fn ranges(&self) -> &[Range] {
        &self.ranges[..self.n_ranges]
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
    /// Deallocate the segments in [`Scratch::ranges`].
    Discard,
    /// Zero the segments in [`Scratch::ranges`].
    WriteZeroes,
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
    #[error("a data segment of {len} bytes exceeds the limit of {max}")]
    SegmentTooLong { len: u32, max: u32 },
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

/// Parses and validates the chain at `head` of `table`. `scratch` holds the chain's
/// descriptors (its capacity bounds the chain length accepted) and receives the segments of a
/// discard / write-zeroes request; `iov` receives the data buffers, as host addresses from `map`.
pub fn parse(
    map: &HostMap,
    table: DescTable,
    head: u16,
    limits: &Limits,
    scratch: &mut Scratch,
    iov: &mut IovecList,
) -> Result<Parsed, Rejected> {
    iov.clear();
    let reject = |status, error| Rejected {
        head,
        status,
        error,
    };
    // A chain that cannot be followed to its end has no known status byte.
    let Ok(walk) = walk(map, table, head, &mut scratch.descs) else {
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
    let descs = &scratch.descs[..walk.kept];
    // The chain is its readable part (header, then payload), then its writable part (payload,
    // then the status byte).
    if walk.n_readable == 0 {
        return Err(rej(RequestError::HeaderNotReadable));
    }
    if walk.readable_after_writable {
        return Err(rej(RequestError::ReadableAfterWritable));
    }
    let (rtype, sector) = read_header(map, &descs[..walk.n_readable]).map_err(rej)?;
    let data = Payload {
        descs,
        n_readable: walk.n_readable,
        readable_len: walk.readable_len,
        writable_len: walk.writable_len,
    };

    match rtype {
        req_type::IN | req_type::OUT => {
            let write = rtype == req_type::OUT;
            if write && limits.read_only {
                return Err(rej(RequestError::ReadOnly));
            }
            // One pass: count the data pieces and translate them; a translation failure is
            // reported only after the checks that do not depend on memory.
            let pieces = if write {
                if data.writable_len != 1 {
                    return Err(rej(RequestError::WrongDirection));
                }
                push_pieces(data.readable(), map, iov)
            } else {
                if data.readable_len() != 0 {
                    return Err(rej(RequestError::WrongDirection));
                }
                push_writable(&descs[data.n_readable..], map, iov)
            };
            if pieces.n > limits.seg_max {
                return Err(rej(RequestError::TooManySegments {
                    max: limits.seg_max,
                }));
            }
            if pieces.longest > limits.size_max {
                return Err(rej(RequestError::SegmentTooLong {
                    len: pieces.longest,
                    max: limits.size_max,
                }));
            }
            let (len, mem_err) = (pieces.bytes, pieces.err);
            if len % SECTOR_SIZE as u32 != 0 {
                return Err(rej(RequestError::UnalignedLength(len)));
            }
            check_range(
                sector,
                u64::from(len) >> SECTOR_SHIFT,
                limits.capacity_sectors,
            )
            .map_err(rej)?;
            if let Some(e) = mem_err {
                return Err(rej(RequestError::Memory(e)));
            }
            let kind = if write {
                RequestKind::Write { sector }
            } else {
                RequestKind::Read { sector }
            };
            Ok(Parsed {
                head,
                status,
                request: Request {
                    kind,
                    data_len: len,
                },
            })
        }
        req_type::FLUSH => {
            // Data buffers, if any, are ignored (virtio 1.2 §5.2.6.2 gives FLUSH none).
            Ok(Parsed {
                head,
                status,
                request: Request {
                    kind: RequestKind::Flush,
                    data_len: 0,
                },
            })
        }
        req_type::GET_ID => {
            if data.readable_len() != 0 || data.writable_len < 2 {
                return Err(rej(RequestError::WrongDirection));
            }
            let pieces = push_writable(&descs[data.n_readable..], map, iov);
            if let Some(e) = pieces.err {
                return Err(rej(RequestError::Memory(e)));
            }
            Ok(Parsed {
                head,
                status,
                request: Request {
                    kind: RequestKind::GetId,
                    data_len: pieces.bytes,
                },
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
            scratch.n_ranges = 0;
            scratch.n_ranges = read_ranges(
                map,
                &data,
                discard,
                max,
                limits.capacity_sectors,
                &mut scratch.ranges,
            )
            .map_err(rej)?;
            let kind = if discard {
                RequestKind::Discard
            } else {
                RequestKind::WriteZeroes
            };
            Ok(Parsed {
                head,
                status,
                request: Request { kind, data_len: 0 },
            })
        }
        other => Err(rej(RequestError::Unsupported(other))),
    }
}

/// The request type and sector from the 16-byte header at the start of the readable
/// descriptors, however it is split.
fn read_header(map: &HostMap, readable: &[Desc]) -> Result<(u32, u64), RequestError> {
    let oob = |d: &Desc, len| RequestError::Memory(MemError::OutOfRange { addr: d.addr, len });
    let header = match readable.first() {
        None => return Err(RequestError::ShortHeader),
        Some(d) if d.len >= HEADER_LEN => match map.host_range(d.addr, u64::from(HEADER_LEN)) {
            Some(p) => {
                // SAFETY: 16 bytes inside one live mapping (kept by the map's snapshot).
                let (lo, hi) = unsafe { read_u64_pair_at(p) };
                // `struct virtio_blk_outhdr`: le32 type, le32 ioprio, le64 sector.
                return Ok((u64::from_le(lo) as u32, u64::from_le(hi)));
            }
            None => map.read16(d.addr).ok_or_else(|| oob(d, HEADER_LEN))?,
        },
        Some(_) => {
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
            header
        }
    };
    let rtype = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let mut sector = [0u8; 8];
    sector.copy_from_slice(&header[8..]);
    Ok((rtype, u64::from_le_bytes(sector)))
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
    readable_len: u32,
    /// Bytes of the writable descriptors, status byte included.
    writable_len: u32,
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

    /// Readable bytes after the header.
    fn readable_len(&self) -> u32 {
        self.readable_len.saturating_sub(HEADER_LEN)
    }
}

/// Translates data pieces into `iov`, in order. Returns the number of pieces, their bytes (less
/// than 4 GiB: the walk bounded the chain), and the first translation failure (after which
/// nothing more is translated, but counting goes on).
fn push_pieces(
    pieces: impl Iterator<Item = (u64, u32)>,
    map: &HostMap,
    iov: &mut IovecList,
) -> Pieces {
    let mut acc = Pieces::default();
    for (addr, len) in pieces {
        acc.push(map, iov, addr, len);
    }
    acc
}

/// [`push_pieces`] over the writable data pieces of a chain: `w` is its writable descriptors,
/// the status byte at the end of the last one. The same result, without the iterator.
#[inline(always)]
fn push_writable(w: &[Desc], map: &HostMap, iov: &mut IovecList) -> Pieces {
    let mut acc = Pieces::default();
    if let Some((last, init)) = w.split_last() {
        for d in init {
            acc.push(map, iov, d.addr, d.len);
        }
        // `status_address` accepted the last descriptor only with at least one byte.
        acc.push(map, iov, last.addr, last.len.saturating_sub(1));
    }
    acc
}

/// What [`push_pieces`] counts.
#[derive(Default)]
struct Pieces {
    n: u32,
    /// Their total length; saturates (and the request then fails `size_max` anyway).
    bytes: u32,
    longest: u32,
    err: Option<MemError>,
}

impl Pieces {
    /// Counts and translates one piece; empty pieces are skipped.
    #[inline(always)]
    fn push(&mut self, map: &HostMap, iov: &mut IovecList, addr: u64, len: u32) {
        if len == 0 {
            return;
        }
        self.n += 1;
        self.bytes = self.bytes.saturating_add(len);
        self.longest = self.longest.max(len);
        if self.err.is_none() {
            self.err = iov.push(map, addr, len).err();
        }
    }
}

/// Reads the `struct virtio_blk_discard_write_zeroes` segments of a discard / write-zeroes
/// request (virtio 1.2 §5.2.6) into `out`, validating each against the limits and the capacity;
/// returns how many there are.
fn read_ranges(
    map: &HostMap,
    data: &Payload<'_>,
    discard: bool,
    max_sectors: u32,
    capacity: u64,
    out: &mut [Range; MAX_RANGE_SEGMENTS],
) -> Result<usize, RequestError> {
    let total = data.readable_len();
    if total == 0 || total % RANGE_SEGMENT_LEN != 0 {
        return Err(RequestError::BadRangeList);
    }
    if total / RANGE_SEGMENT_LEN > MAX_RANGE_SEGMENTS as u32 {
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
    let mut n = 0;
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
        out[n] = Range {
            sector,
            sectors,
            unmap: flags & WRITE_ZEROES_FLAG_UNMAP != 0,
        };
        n += 1;
    }
    Ok(n)
}

#[cfg(test)]
#[path = "request_tests/mod.rs"]
mod tests;
