//! Asynchronous events of an NVMe/TCP controller (Base 2.0 §5.2): Namespace Attribute
//! Notices are enabled at bring-up when the controller offers them (OAES), its owner keeps one
//! Asynchronous Event Request outstanding on the admin queue, and a notice is answered by
//! reading the Changed Namespace List (which clears it) and the namespace's Identify data.

use std::os::fd::{AsRawFd, RawFd};

use super::{Admin, Controller, CtrlError};
use crate::nvme::spec::{
    AEC_NAMESPACE_ATTRIBUTE, CHANGED_NAMESPACES_LEN, ChangedNamespaces, Cqe, IdentifyController,
    IdentifyNamespace, Sqe,
};

impl Admin {
    /// Set Features, Asynchronous Event Configuration: Namespace Attribute Notices, if the
    /// controller offers them. Whether they are on; a controller that refuses the feature is
    /// used without them.
    pub(super) fn enable_namespace_notices(&mut self, id: &IdentifyController) -> bool {
        if id.oaes & AEC_NAMESPACE_ATTRIBUTE == 0 {
            return false;
        }
        match self
            .conn
            .command(Sqe::set_async_event_config(AEC_NAMESPACE_ATTRIBUTE), None)
        {
            Ok(_) => true,
            Err(e) => {
                tracing::debug!(error = %e, "namespace attribute notices not enabled");
                false
            }
        }
    }
}

impl Controller {
    /// The controller reports namespace changes (enabled by [`Controller::connect`]).
    pub fn namespace_notices(&self) -> bool {
        self.notices
    }

    /// Sends an Asynchronous Event Request unless one is outstanding (or namespace notices
    /// are off): keep one outstanding, and send the next once [`Controller::async_event`]
    /// gave the last one's completion.
    pub fn arm_async_event(&mut self) -> Result<(), CtrlError> {
        if self.notices {
            self.admin.conn.request_async_event()?;
        }
        Ok(())
    }

    /// The completion of the outstanding Asynchronous Event Request, if it came (also while
    /// another admin command ran); `None` at once otherwise. An error means the admin queue
    /// is lost.
    pub fn async_event(&mut self) -> Result<Option<Cqe>, CtrlError> {
        Ok(self.admin.conn.async_event()?)
    }

    /// Reads the Changed Namespace List log page, which clears the namespace notice.
    pub fn changed_namespaces(&mut self) -> Result<ChangedNamespaces, CtrlError> {
        let mut buf = vec![0; CHANGED_NAMESPACES_LEN];
        self.admin
            .conn
            .command(Sqe::changed_namespaces_log(), Some(&mut buf))?;
        ChangedNamespaces::parse(&buf)
            .map_err(|e| self.queues.ep.malformed("changed namespace list", e))
    }

    /// Identify Namespace again for the namespace given to [`Controller::connect`]: what
    /// [`Controller::namespace`] says from now on.
    pub fn refresh_namespace(&mut self) -> Result<&IdentifyNamespace, CtrlError> {
        self.namespace = self.admin.identify_namespace(&self.queues.ep, self.nsid)?;
        Ok(&self.namespace)
    }
}

/// The admin queue's socket: readable when an asynchronous event came, or the controller
/// closed the connection.
impl AsRawFd for Controller {
    fn as_raw_fd(&self) -> RawFd {
        self.admin.conn.as_raw_fd()
    }
}
