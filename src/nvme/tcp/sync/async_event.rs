//! The Asynchronous Event Request an admin connection keeps outstanding (Base 2.0 §5.2): it
//! has a command identifier of its own, which no other command takes, and no time limit. Its
//! completion may arrive while another command waits for its own (it is kept, see
//! [`AerState::completes`]) or while nothing runs (the socket becomes readable:
//! [`SyncConn::async_event`] reads it).

use std::net::Shutdown;
use std::os::fd::{AsRawFd, RawFd};
use std::time::Instant;

use super::{ConnError, RxEvent, SyncConn, next_event};
use crate::nvme::spec::{Cqe, Sgl, Sqe};

/// The command identifier of the Asynchronous Event Request; other commands skip it.
pub(super) const AER_CID: u16 = u16::MAX;

const OP: &str = "Asynchronous Event Request";

/// Where the connection's Asynchronous Event Request is.
#[derive(Clone, Copy, Debug)]
pub(super) enum AerState {
    /// None sent, or the last one's completion was taken.
    Idle,
    Outstanding,
    /// Completed while another command waited; not yet taken.
    Done(Cqe),
}

impl AerState {
    /// `cqe` is the completion of the outstanding request.
    pub(super) fn completes(&self, cqe: &Cqe) -> bool {
        matches!(self, AerState::Outstanding) && cqe.cid() == AER_CID
    }
}

impl SyncConn {
    /// Sends an Asynchronous Event Request, unless one is outstanding or its completion has
    /// not been taken yet. It does not wait: [`SyncConn::async_event`] gives the completion.
    pub fn request_async_event(&mut self) -> Result<(), ConnError> {
        if self.broken {
            return Err(ConnError::Broken {
                peer: self.link.peer,
            });
        }
        if !matches!(self.aer, AerState::Idle) {
            return Ok(());
        }
        let mut sqe = Sqe::async_event_request();
        sqe.set_cid(AER_CID);
        sqe.set_sgl(Sgl::Transport { len: 0 });
        if let Err(e) = self.send_capsule(&sqe, OP, &[]) {
            self.break_connection();
            return Err(e);
        }
        self.aer = AerState::Outstanding;
        Ok(())
    }

    /// The completion of the Asynchronous Event Request, if it came: during an earlier
    /// command, or now (the socket is readable: the PDU is read whole, within the timeout).
    /// `None` at once when nothing is there. Anything else on the socket (another PDU, the
    /// controller closing the connection) is an error that breaks the connection.
    pub fn async_event(&mut self) -> Result<Option<Cqe>, ConnError> {
        if self.broken {
            return Err(ConnError::Broken {
                peer: self.link.peer,
            });
        }
        if let AerState::Done(cqe) = self.aer {
            self.aer = AerState::Idle;
            return Ok(Some(cqe));
        }
        if !self.readable() {
            return Ok(None);
        }
        let peer = self.link.peer;
        let deadline = Instant::now() + self.link.timeout;
        let event = next_event(
            &mut self.link,
            &mut self.rx,
            None,
            &mut [],
            &mut 0,
            deadline,
            OP,
        );
        let result = match event {
            Ok(RxEvent::CapsuleResp(cqe)) if self.aer.completes(&cqe) => {
                self.aer = AerState::Idle;
                return Ok(Some(cqe));
            }
            Ok(RxEvent::C2hTermReq { fes, fei }) => ConnError::TermReq {
                op: OP,
                peer,
                fes,
                fei,
            },
            Ok(_) => ConnError::Unexpected {
                op: OP,
                peer,
                what: "PDU while no other command was outstanding",
            },
            Err(e) => e,
        };
        self.break_connection();
        Err(result)
    }

    /// An Asynchronous Event Request is outstanding, or its completion waits to be taken.
    pub fn async_event_pending(&self) -> bool {
        !matches!(self.aer, AerState::Idle)
    }

    /// Whether the socket has something to read (or was closed), without waiting.
    fn readable(&self) -> bool {
        let mut fds = [libc::pollfd {
            fd: self.link.stream.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        // SAFETY: `fds` is a valid array of one pollfd for the duration of the call; a zero
        // timeout does not block.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 1, 0) };
        n > 0 && fds[0].revents != 0
    }

    fn break_connection(&mut self) {
        self.broken = true;
        let _ = self.link.stream.shutdown(Shutdown::Both);
    }
}

/// The socket, for an owner that sleeps until an asynchronous event (or a closed connection)
/// makes it readable.
impl AsRawFd for SyncConn {
    fn as_raw_fd(&self) -> RawFd {
        self.link.stream.as_raw_fd()
    }
}
