//! The backend's own channel to the frontend (protocol feature BACKEND_REQ), on which vubd
//! tells the frontend that the configuration space changed (the device was resized):
//! VHOST_USER_BACKEND_CONFIG_CHANGE_MSG, after which the frontend reads it again with
//! GET_CONFIG and, if the capacity changed, interrupts the guest.
//!
//! QEMU handles the notice with a GET_CONFIG on the main channel from within its handler, and
//! answers the notice (REPLY_ACK) only after that: so the notice never goes from the session's
//! protocol thread, which must be free to answer the GET_CONFIG, and nothing GET_CONFIG needs
//! is held while it waits. It goes from a thread of its own (`vubd-config-notice`). A frontend
//! that keeps the channel open and never answers holds that thread (the socket timeouts do not
//! bound it: the vhost crate receives again after a receive that timed out) until the session
//! ends, which shuts the channel down first. QEMU also ignores the notice
//! while the device has not started (the guest driver has not set it up), so a change made
//! before then is told when a queue of the session starts.

use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use tracing::{debug, warn};
use vhost::vhost_user::{Backend, VhostUserFrontendReqHandler};

/// How long the frontend may take to read the notice, and to answer it.
const NOTICE_TIMEOUT: Duration = Duration::from_secs(5);

/// The notices of one session.
#[derive(Default)]
pub(super) struct ConfigNotice {
    /// The channel, once the frontend gave it (SET_BACKEND_REQ_FD).
    channel: Mutex<Option<Backend>>,
    /// A descriptor of the channel's socket of its own, to shut it down while a notice holds
    /// the channel's lock.
    socket: Mutex<Option<OwnedFd>>,
    /// A queue of the session has started: the frontend acts on a notice.
    started: AtomicBool,
    state: Mutex<Sender>,
}

impl std::fmt::Debug for ConfigNotice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConfigNotice")
            .field("channel", &self.has_channel())
            .field("started", &self.started.load(Ordering::Relaxed))
            .field("state", &*lock(&self.state))
            .finish()
    }
}

/// The sending thread and what it has to send.
#[derive(Debug, Default)]
struct Sender {
    /// A change the frontend has not been told of.
    pending: bool,
    /// The thread runs (and will look at `pending` before it ends).
    running: bool,
    thread: Option<JoinHandle<()>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl ConfigNotice {
    /// SET_BACKEND_REQ_FD: the channel, its socket given the send and receive timeouts.
    pub(super) fn set_channel(&self, channel: Backend) {
        let fd = channel.as_raw_fd();
        for opt in [libc::SO_SNDTIMEO, libc::SO_RCVTIMEO] {
            let tv = libc::timeval {
                tv_sec: libc::time_t::try_from(NOTICE_TIMEOUT.as_secs())
                    .unwrap_or(libc::time_t::MAX),
                tv_usec: 0,
            };
            // SAFETY: `tv` is a live timeval and the length says so; `fd` is the channel's
            // open socket for the whole call.
            let rc = unsafe {
                libc::setsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    opt,
                    (&raw const tv).cast(),
                    std::mem::size_of::<libc::timeval>() as libc::socklen_t,
                )
            };
            if rc != 0 {
                warn!(error = %std::io::Error::last_os_error(), "cannot bound the backend channel's waits");
            }
        }
        // SAFETY: `fd` is the channel's socket, open for this call (`channel` owns it).
        let own = unsafe { BorrowedFd::borrow_raw(fd) }.try_clone_to_owned();
        match own {
            Ok(own) => *lock(&self.socket) = Some(own),
            Err(e) => warn!(error = %e, "cannot keep a descriptor of the backend channel"),
        }
        *lock(&self.channel) = Some(channel);
    }

    /// Whether the frontend gave a channel: it can be told of changes.
    pub(super) fn has_channel(&self) -> bool {
        lock(&self.channel).is_some()
    }

    /// The configuration space changed: the frontend is told now if the device has started,
    /// else when it does.
    pub(super) fn changed(self: &Arc<Self>, device: usize) {
        lock(&self.state).pending = true;
        if self.started.load(Ordering::Acquire) {
            self.send(device);
        }
    }

    /// A queue of the session started: a change made before is told now.
    pub(super) fn started(self: &Arc<Self>, device: usize) {
        if !self.started.swap(true, Ordering::AcqRel) && lock(&self.state).pending {
            self.send(device);
        }
    }

    /// Starts the sending thread unless it runs (it then sends what is pending before it
    /// ends).
    fn send(self: &Arc<Self>, device: usize) {
        let Some(channel) = lock(&self.channel).clone() else {
            return;
        };
        let mut state = lock(&self.state);
        if state.running || !state.pending {
            return;
        }
        if let Some(t) = state.thread.take() {
            // It has ended: `running` is false.
            let _ = t.join();
        }
        state.running = true;
        let this = self.clone();
        let spawned = std::thread::Builder::new()
            .name("vubd-config-notice".into())
            .spawn(move || {
                // Started by the session's relay thread or by the control socket's (a
                // resize): either way it needs no more than a session's thread.
                crate::sandbox::enter(crate::sandbox::Role::Session);
                this.sender_loop(&channel, device);
            });
        match spawned {
            Ok(t) => state.thread = Some(t),
            Err(e) => {
                state.running = false;
                warn!(device, error = %e, "cannot start the thread that tells the frontend of a resize");
            }
        }
    }

    fn sender_loop(&self, channel: &Backend, device: usize) {
        loop {
            {
                let mut state = lock(&self.state);
                if !state.pending {
                    state.running = false;
                    return;
                }
                state.pending = false;
            }
            match channel.handle_config_change() {
                Ok(_) => debug!(device, "the frontend was told of the new configuration"),
                Err(e) => warn!(
                    device,
                    error = %e,
                    "the frontend did not take the notice of the new configuration"
                ),
            }
        }
    }

    /// The session ends: a notice still being sent is abandoned (the channel is shut down, so
    /// its send or the wait for its acknowledgement fails at once), then the sending thread is
    /// joined.
    pub(super) fn finish(&self) {
        if let Some(socket) = lock(&self.socket).as_ref() {
            // SAFETY: shutdown(2) on a descriptor this owns; no memory is passed.
            unsafe { libc::shutdown(socket.as_raw_fd(), libc::SHUT_RDWR) };
        }
        let thread = lock(&self.state).thread.take();
        if let Some(t) = thread {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;
    use std::os::unix::net::UnixStream;

    use super::*;

    /// Reads one message header from the frontend's end within `wait`: its code.
    fn next_code(frontend: &mut UnixStream, wait: Duration) -> Option<u32> {
        frontend.set_read_timeout(Some(wait)).expect("timeout");
        let mut hdr = [0u8; 12];
        frontend.read_exact(&mut hdr).ok()?;
        Some(u32::from_le_bytes(hdr[..4].try_into().expect("4 bytes")))
    }

    #[test]
    fn a_change_is_told_once_the_device_runs_and_each_change_after_at_once() {
        let (ours, mut frontend) = UnixStream::pair().expect("pair");
        let notice = Arc::new(ConfigNotice::default());
        notice.changed(0);
        notice.set_channel(Backend::from_stream(ours));
        notice.changed(0);
        assert_eq!(
            next_code(&mut frontend, Duration::from_millis(300)),
            None,
            "nothing before the device runs"
        );
        notice.started(0);
        assert_eq!(
            next_code(&mut frontend, NOTICE_TIMEOUT),
            Some(2),
            "one notice"
        );
        assert_eq!(next_code(&mut frontend, Duration::from_millis(300)), None);
        notice.changed(0);
        assert_eq!(
            next_code(&mut frontend, NOTICE_TIMEOUT),
            Some(2),
            "told at once"
        );
        notice.finish();
    }

    #[test]
    fn the_session_ends_without_waiting_for_a_frontend_that_never_answers() {
        let (ours, mut frontend) = UnixStream::pair().expect("pair");
        let notice = Arc::new(ConfigNotice::default());
        let channel = Backend::from_stream(ours);
        // As with QEMU: each notice waits for the frontend's acknowledgement.
        channel.set_reply_ack_flag(true);
        notice.set_channel(channel);
        notice.started(0);
        notice.changed(0);
        assert_eq!(next_code(&mut frontend, NOTICE_TIMEOUT), Some(2));
        // The frontend keeps its end open and never answers.
        let start = std::time::Instant::now();
        notice.finish();
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "the end waited {:?}",
            start.elapsed()
        );
    }
}
