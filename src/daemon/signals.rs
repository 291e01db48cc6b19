//! SIGINT and SIGTERM: blocked in every thread before any starts, received by one thread.
//! The first asks vubd to stop (requests in flight finish), a second ends it at once.

use std::io;

use tracing::{info, warn};

use crate::sandbox::{self, Role};

/// SIGINT and SIGTERM, blocked in every thread and received by one waiter thread.
pub(super) struct Signals {
    set: libc::sigset_t,
}

impl Signals {
    pub(super) fn block() -> io::Result<Self> {
        // SAFETY: sigset_t is plain data; sigemptyset initialises it before use.
        let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: `set` is a live sigset_t; the calls only write to it and to this thread's
        // signal mask.
        let rc = unsafe {
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGINT);
            libc::sigaddset(&mut set, libc::SIGTERM);
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut())
        };
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        Ok(Self { set })
    }

    pub(super) fn spawn_waiter(self, stop: impl Fn() + Send + 'static) -> io::Result<()> {
        std::thread::Builder::new()
            .name("vubd-signals".into())
            .spawn(move || {
                sandbox::enter(Role::Control);
                let mut first = true;
                loop {
                    let mut sig: libc::c_int = 0;
                    // SAFETY: `self.set` is an initialised sigset_t and `sig` a live c_int.
                    if unsafe { libc::sigwait(&self.set, &mut sig) } != 0 {
                        continue;
                    }
                    if first {
                        info!(signal = sig, "stopping: finishing in-flight I/O");
                        stop();
                        first = false;
                    } else {
                        warn!(signal = sig, "second signal: exiting at once");
                        std::process::exit(1);
                    }
                }
            })
            .map(|_| ())
    }
}
