//! The null device: completes every request at once without touching data (reads leave the
//! guest buffer as it is). It measures the data path itself.

use std::collections::VecDeque;
use std::io;
use std::os::fd::RawFd;

use super::capacity::{Capacity, Resize, ResizeError};
use super::{BlockDevice, ChannelFull, DeviceInfo, IoChannel, IoOp};

/// A device of `size` bytes that stores nothing.
#[derive(Debug)]
pub struct NullDevice {
    /// What the device is, but for its capacity.
    info: DeviceInfo,
    capacity: Capacity,
}

impl NullDevice {
    /// Changes the capacity to the size asked for (which it needs: a null device has none of
    /// its own). Returns the new capacity in bytes.
    pub fn resize(&self, req: Resize) -> Result<u64, ResizeError> {
        let to = req.size.ok_or(ResizeError::NeedSize)?;
        self.capacity
            .check(to, self.info.logical_block_size, req.shrink)?;
        self.capacity.set(to);
        Ok(to)
    }

    pub fn new(size: u64, read_only: bool) -> Self {
        Self {
            capacity: Capacity::new(size),
            info: DeviceInfo {
                capacity_bytes: size,
                logical_block_size: 512,
                physical_block_size: 4096,
                read_only,
                discard: true,
                write_zeroes: true,
                write_zeroes_unmaps: true,
            },
        }
    }
}

impl BlockDevice for NullDevice {
    type Channel = NullChannel;

    fn info(&self) -> DeviceInfo {
        DeviceInfo {
            capacity_bytes: self.capacity.bytes(),
            ..self.info
        }
    }

    fn open_channel(&self, depth: u32) -> io::Result<NullChannel> {
        Ok(NullChannel {
            done: VecDeque::with_capacity(depth as usize),
            capacity: depth as usize,
        })
    }
}

/// Completions are ready as soon as they are queued.
#[derive(Debug)]
pub struct NullChannel {
    done: VecDeque<(u32, i32)>,
    capacity: usize,
}

impl IoChannel for NullChannel {
    fn has_room(&self) -> bool {
        self.done.len() < self.capacity
    }

    unsafe fn queue(&mut self, tag: u32, op: IoOp<'_>) -> Result<u32, ChannelFull> {
        if !self.has_room() {
            return Err(ChannelFull);
        }
        let result = match op {
            IoOp::Read { iov, .. } | IoOp::Write { iov, .. } => {
                i32::try_from(iov.bytes()).unwrap_or(i32::MAX)
            }
            IoOp::Flush | IoOp::Discard { .. } | IoOp::WriteZeroes { .. } => 0,
        };
        self.done.push_back((tag, result));
        Ok(1)
    }

    fn submit(&mut self) -> io::Result<()> {
        Ok(())
    }

    fn poll(&mut self, max: usize, mut f: impl FnMut(u32, i32)) -> usize {
        let n = max.min(self.done.len());
        for (tag, result) in self.done.drain(..n) {
            f(tag, result);
        }
        n
    }

    fn completion_fd(&self) -> Option<RawFd> {
        None
    }

    fn clear_completion_fd(&self) {}

    /// Nothing to do: every operation is complete when it is queued.
    fn drain(&mut self, _draining: impl FnMut(u32) -> bool) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mem::IovecList;

    #[test]
    fn every_operation_completes_at_once_with_its_length() {
        let dev = NullDevice::new(1 << 20, false);
        let mut ch = dev.open_channel(4).expect("channel");
        let iov = IovecList::with_capacity(1);
        // SAFETY: the null channel never dereferences the iovecs.
        unsafe {
            ch.queue(
                1,
                IoOp::Read {
                    offset: 0,
                    iov: &iov,
                },
            )
            .expect("room");
            ch.queue(2, IoOp::Flush).expect("room");
        }
        let mut seen = Vec::new();
        assert_eq!(ch.poll(8, |t, r| seen.push((t, r))), 2);
        assert_eq!(seen, vec![(1, 0), (2, 0)]);
        assert_eq!(ch.poll(8, |_, _| {}), 0);
    }

    #[test]
    fn channel_refuses_more_than_its_depth() {
        let dev = NullDevice::new(1 << 20, false);
        let mut ch = dev.open_channel(1).expect("channel");
        // SAFETY: as above.
        unsafe {
            ch.queue(1, IoOp::Flush).expect("room");
            assert_eq!(ch.queue(2, IoOp::Flush), Err(ChannelFull));
        }
    }
}
