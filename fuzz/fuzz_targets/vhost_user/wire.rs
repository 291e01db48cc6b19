//! Descriptors and raw socket reads the harness needs: memfds, readiness waits, and reading
//! the backend's messages off the socket.

use super::*;

/// A new memfd of `len` bytes (sparse); `None` when the kernel refuses the size.
pub(super) fn memfd(len: u64) -> Option<File> {
    const NAME: &CStr = c"vubd-fuzz";
    // SAFETY: a NUL-terminated name and valid flags; the result is checked.
    let fd = unsafe { libc::memfd_create(NAME.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return None;
    }
    // SAFETY: `fd` was just created and nothing else owns it.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(len).ok()?;
    Some(f)
}

/// Waits until `fd` is readable or `timeout` has passed.
pub(super) fn wait_readable(fd: RawFd, timeout: Duration) {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: one live pollfd, and the count says one.
    unsafe { libc::poll(&mut p, 1, ms) };
}

pub(super) enum Recv {
    /// A message (its body read and its descriptors closed).
    Msg {
        code: u32,
        flags: u32,
    },
    Eof,
    Timeout,
}

/// Reads one message from the backend.
pub(super) fn recv_msg(sock: &UnixStream) -> Recv {
    let mut hdr = [0u8; 12];
    match recv_exact(sock, &mut hdr) {
        Ok(true) => {}
        Ok(false) => return Recv::Eof,
        Err(()) => return Recv::Timeout,
    }
    let word = |i: usize| u32::from_le_bytes(hdr[i..i + 4].try_into().expect("4 bytes"));
    let (code, flags, size) = (word(0), word(4), word(8));
    assert!(
        size <= 0x1000,
        "the backend sent a message of {size} bytes (code {code})"
    );
    let mut body = vec![0u8; size as usize];
    match recv_exact(sock, &mut body) {
        Ok(true) => Recv::Msg { code, flags },
        Ok(false) => Recv::Eof,
        Err(()) => Recv::Timeout,
    }
}

/// Fills `buf` from the socket, closing any descriptors that come with it: `Ok(false)` at
/// EOF (or a reset), `Err` when the read timeout passed.
fn recv_exact(sock: &UnixStream, buf: &mut [u8]) -> Result<bool, ()> {
    let mut at = 0;
    while at < buf.len() {
        let rest = &mut buf[at..];
        let mut iov = [libc::iovec {
            iov_base: rest.as_mut_ptr().cast(),
            iov_len: rest.len(),
        }];
        let mut fds = [0 as RawFd; 8];
        // SAFETY: the iovec covers the unfilled part of `buf`, which lives across the call.
        match unsafe { sock.recv_with_fds(&mut iov, &mut fds) } {
            Ok((0, _)) => return Ok(false),
            Ok((n, nfds)) => {
                for &fd in &fds[..nfds] {
                    // SAFETY: the descriptors just received are ours and owned by nothing else.
                    drop(unsafe { OwnedFd::from_raw_fd(fd) });
                }
                at += n;
            }
            Err(e) if e.errno() == libc::EINTR => {}
            Err(e) if e.errno() == libc::EAGAIN => return Err(()),
            Err(_) => return Ok(false),
        }
    }
    Ok(true)
}

pub(super) fn owned(e: EventFd) -> OwnedFd {
    // SAFETY: `into_raw_fd` hands over the descriptor the eventfd owned, to no one else.
    unsafe { OwnedFd::from_raw_fd(e.into_raw_fd()) }
}
