//! What happens to an I/O queue's commands when its connection ends: they stay in the
//! table, off any connection, until [`IoQueue::reconnect`] sends them again on a new one, or
//! they are failed: all of them once the controller is gone for good ([`IoQueue::fail_all`]),
//! or those whose owner gave them a deadline once it has passed
//! ([`IoQueue::fail_overdue`]). A command is only ever failed off a connection, and its
//! identifier is unknown from then on: nothing about it can reach its buffer later.

use std::io::{self, Write};
use std::net::Shutdown;

use super::{Completion, Conn, IoQueue, IoQueueConn, QueueError, queue_capsule};
use crate::nvme::spec::Status;
use crate::nvme::tcp::pdu::{TERM_REQ_MAX_PLEN, encode_h2c_term_req, header_len_after_icresp};

impl IoQueue {
    /// Ends the connection after `e`: tells the target why when the protocol allows it,
    /// and keeps every command for [`IoQueue::reconnect`].
    #[cold]
    pub(super) fn fail(&mut self, e: QueueError) -> QueueError {
        if let Some(mut conn) = self.conn.take() {
            if let QueueError::Pdu(p) = &e
                && let Some((fes, fei)) = p.term_req()
            {
                let mut buf = [0u8; TERM_REQ_MAX_PLEN];
                let n = encode_h2c_term_req(&mut buf, fes, fei, conn.rx.header_in_error());
                let _ = conn.stream.write(&buf[..n]);
            }
            let _ = conn.stream.shutdown(Shutdown::Both);
        }
        self.reset_transfers();
        e
    }

    /// Drops the connection (a controller reset, a timeout), keeping the commands.
    pub fn disconnect(&mut self) {
        if let Some(conn) = self.conn.take() {
            let _ = conn.stream.shutdown(Shutdown::Both);
        }
        self.reset_transfers();
    }

    fn reset_transfers(&mut self) {
        self.txq.clear();
        self.tx_off = 0;
        let cids: Vec<u16> = self.cmds.cids().collect();
        for cid in cids {
            if let Some(c) = self.cmds.get_mut(cid) {
                c.queued = false;
                c.r2t = None;
                c.received = 0;
            }
        }
    }

    /// Takes a new connection and queues every command in flight on it again; their age for
    /// [`IoQueue::oldest`] starts over at `now`.
    pub fn reconnect(&mut self, conn: IoQueueConn, now: u64) -> io::Result<()> {
        self.disconnect();
        conn.stream.set_nonblocking(true)?;
        let params = conn.params;
        self.conn = Some(Conn {
            hlen: header_len_after_icresp(params.digests),
            stream: conn.stream,
            rx: conn.rx,
            params,
        });
        let cids: Vec<u16> = self.cmds.cids().collect();
        for cid in cids {
            if let Some(c) = self.cmds.get_mut(cid) {
                c.since = now;
            }
            queue_capsule(&mut self.cmds, &mut self.txq, cid, &params);
        }
        Ok(())
    }

    /// Gives up the connection, if it is live and idle (nothing in flight or being sent), so
    /// that it can serve another owner.
    pub fn take_conn(&mut self) -> Option<IoQueueConn> {
        if !self.cmds.is_empty() || !self.txq.is_empty() {
            return None;
        }
        let conn = self.conn.take()?;
        conn.stream.set_nonblocking(false).ok()?;
        Some(IoQueueConn {
            stream: conn.stream,
            rx: conn.rx,
            params: conn.params,
        })
    }

    /// Ends every command in flight with `status` (the controller is gone for good).
    pub fn fail_all(&mut self, status: Status, mut f: impl FnMut(Completion)) -> usize {
        self.txq.clear();
        self.tx_off = 0;
        let cids: Vec<u16> = self.cmds.cids().collect();
        let mut done = 0;
        for cid in cids {
            self.complete(cid, status, &mut f, &mut done);
        }
        done
    }

    /// Gives the commands whose owner's `user` value `pick` accepts a deadline, `timeout`
    /// after each was pushed, unless they have one: off a connection past it, they are failed
    /// by [`IoQueue::fail_overdue`] instead of being sent again. Returns the earliest deadline
    /// of the commands in the table.
    pub fn set_deadlines(
        &mut self,
        mut pick: impl FnMut(u32) -> bool,
        timeout: u64,
    ) -> Option<u64> {
        let cids: Vec<u16> = self.cmds.cids().collect();
        let mut earliest = None;
        for cid in cids {
            if let Some(c) = self.cmds.get_mut(cid) {
                if c.deadline.is_none() && pick(c.user) {
                    c.deadline = Some(c.pushed.saturating_add(timeout));
                }
                earliest = earliest.into_iter().chain(c.deadline).min();
            }
        }
        earliest
    }

    /// Gives command `cid` the deadline it had before it got an identifier (in its owner's
    /// backlog), unless it has one.
    pub fn set_deadline(&mut self, cid: u16, deadline: u64) {
        if let Some(c) = self.cmds.get_mut(cid) {
            c.deadline.get_or_insert(deadline);
        }
    }

    /// While the queue has no connection: ends, with `status`, every command whose deadline
    /// is `now` or earlier (none is on a connection, none will be sent again). Its identifier
    /// is unknown from then on, so an answer for it on a later connection is a protocol error,
    /// never a write into its buffer. Returns how many ended, and the earliest deadline of
    /// the commands left. On a live connection nothing ends: its commands may still be
    /// answered (the I/O timeout ends the connection first).
    pub fn fail_overdue(
        &mut self,
        now: u64,
        status: Status,
        mut f: impl FnMut(Completion),
    ) -> (usize, Option<u64>) {
        let cids: Vec<u16> = self.cmds.cids().collect();
        let mut done = 0;
        let mut earliest = None;
        for cid in cids {
            let Some(deadline) = self.cmds.get(cid).and_then(|c| c.deadline) else {
                continue;
            };
            if self.conn.is_none() && deadline <= now {
                self.complete(cid, status, &mut f, &mut done);
            } else {
                earliest = Some(earliest.map_or(deadline, |e: u64| e.min(deadline)));
            }
        }
        (done, earliest)
    }
}
