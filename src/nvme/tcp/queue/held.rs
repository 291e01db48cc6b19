//! What happens to an I/O queue's commands when its connection ends: they stay in the
//! table, off any connection, until [`IoQueue::reconnect`] sends them again on a new one, or
//! they are failed once the controller is gone for good ([`IoQueue::fail_all`]).

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
}
