//! The backend's own messages on the channel the frontend gave it
//! ([`Options::backend_channel`](super::Options)): what QEMU does on a configuration change
//! (acknowledge it, read the configuration space again).

use std::io::{Read, Write};
use std::time::Duration;

use vhost::vhost_user::VhostUserFrontend;
use vhost::vhost_user::message::VhostUserConfigFlags;

use super::{BlkFrontend, FrontendError};

/// VHOST_USER_BACKEND_CONFIG_CHANGE_MSG.
const CONFIG_CHANGE_MSG: u32 = 2;
const FLAG_VERSION: u32 = 1;
const FLAG_REPLY: u32 = 1 << 2;
const FLAG_NEED_REPLY: u32 = 1 << 3;

impl BlkFrontend {
    /// Waits up to `timeout` for a message on the backend's channel: true for a
    /// configuration change notice (acknowledged if the backend asked), false for nothing;
    /// anything else is an error.
    pub fn config_notice(&mut self, timeout: Duration) -> Result<bool, FrontendError> {
        let chan = self.backend_channel.as_mut().ok_or(FrontendError::Missing(
            "a backend channel (Options::backend_channel)",
        ))?;
        chan.set_read_timeout(Some(timeout))?;
        let mut hdr = [0u8; 12];
        match chan.read_exact(&mut hdr) {
            Ok(()) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Ok(false);
            }
            Err(e) => return Err(e.into()),
        }
        let word = |i: usize| u32::from_le_bytes(hdr[i..i + 4].try_into().expect("4 bytes"));
        let (code, flags, size) = (word(0), word(4), word(8));
        if code != CONFIG_CHANGE_MSG || size != 0 {
            return Err(FrontendError::Missing(
                "a config change notice (code 2, no payload)",
            ));
        }
        if flags & FLAG_NEED_REPLY != 0 {
            let mut reply = Vec::with_capacity(20);
            reply.extend_from_slice(&CONFIG_CHANGE_MSG.to_le_bytes());
            reply.extend_from_slice(&(FLAG_VERSION | FLAG_REPLY).to_le_bytes());
            reply.extend_from_slice(&8u32.to_le_bytes());
            reply.extend_from_slice(&0u64.to_le_bytes());
            chan.write_all(&reply)?;
        }
        Ok(true)
    }

    /// The capacity in the device's configuration space now (GET_CONFIG), in sectors.
    pub fn config_capacity(&mut self) -> Result<u64, FrontendError> {
        let conn = self.conn.as_mut().ok_or(FrontendError::Disconnected)?;
        let (_, cfg) = conn.get_config(0, 8, VhostUserConfigFlags::empty(), &[0; 8])?;
        Ok(u64::from_le_bytes(cfg[..8].try_into().expect("8 bytes")))
    }
}

impl BlkFrontend {
    /// Kicks queue `q` and waits up to `timeout` for request `tag` to complete: its status.
    /// Panics when it does not.
    #[track_caller]
    pub fn status_of(&mut self, q: usize, tag: u64, timeout: Duration) -> u8 {
        self.notify(q).expect("notify");
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let mut status = None;
            self.reap(q, |c, _| {
                if c.tag == tag {
                    status = Some(c.status);
                }
            })
            .expect("reap");
            if let Some(s) = status {
                return s;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "request {tag} did not complete within {timeout:?}"
            );
            self.wait(Duration::from_millis(20)).expect("wait");
        }
    }
}
