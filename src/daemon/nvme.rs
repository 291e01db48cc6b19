//! Turning the validated NVMe/TCP configuration into the initiator's option structs, and the
//! `vubd discover` command.

use std::time::Duration;

use uuid::Uuid;

use super::DaemonError;
use crate::bdev::nvme_tcp::NvmeTcpConfig;
use crate::config::{DiscoverConfig, NvmeHostConfig, NvmeTcpUri};
use crate::nvme::tcp::ctrl::{self, CtrlOptions, TargetAddr};
use crate::nvme::tcp::host::HostId;
use crate::nvme::tcp::pdu::Digests;

/// The host identity: the options, else `/etc/nvme`, else a generated one.
fn host_id(host: &NvmeHostConfig) -> Result<HostId, DaemonError> {
    HostId::resolve(
        host.hostnqn.as_ref().map(|n| n.as_str()),
        host.hostid.map(Uuid::from_bytes),
    )
    .map_err(DaemonError::NvmeHost)
}

fn options(host: &NvmeHostConfig, digests: Digests) -> CtrlOptions {
    CtrlOptions {
        digests,
        kato: host.keep_alive_tmo,
        io_timeout: host.io_timeout,
    }
}

/// The initiator's configuration for serving `uri` with one I/O queue per poller.
pub(super) fn tcp_config(
    uri: &NvmeTcpUri,
    host: &NvmeHostConfig,
    pollers: usize,
    read_only: bool,
) -> Result<NvmeTcpConfig, DaemonError> {
    Ok(NvmeTcpConfig {
        addr: TargetAddr {
            host: uri.host.clone(),
            port: uri.port,
        },
        subnqn: uri.subnqn.clone(),
        nsid: uri.nsid,
        host: host_id(host)?,
        ctrl: options(
            host,
            Digests {
                header: uri.hdgst,
                data: uri.ddgst,
            },
        ),
        ctrl_loss_tmo: host.ctrl_loss_tmo,
        reconnect_delay: host.reconnect_delay,
        io_queues: u16::try_from(pollers).unwrap_or(u16::MAX).max(1),
        read_only,
    })
}

/// `vubd discover`: prints the discovery log page like `nvme discover`.
pub fn discover(cfg: &DiscoverConfig) -> Result<(), DaemonError> {
    let addr = TargetAddr {
        host: cfg.host.clone(),
        port: cfg.port,
    };
    let host = host_id(&cfg.nvme)?;
    let mut opts = options(&cfg.nvme, Digests::default());
    // The discovery controller needs no keep-alive for one log page.
    opts.kato = Duration::ZERO;
    let log = ctrl::discover(&addr, &host, &opts).map_err(DaemonError::Discover)?;
    super::stdout::write(&log.to_string());
    Ok(())
}
