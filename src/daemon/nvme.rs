//! Turning the validated NVMe/TCP configuration into the initiator's option structs, and the
//! `vubd discover` command.

use std::net::{IpAddr, ToSocketAddrs};
use std::time::Duration;

use tracing::info;

use uuid::Uuid;

use super::DaemonError;
use crate::bdev::nvme_tcp::NvmeTcpConfig;
use crate::config::{Config, DiscoverConfig, DiskSpec, NvmeHostConfig, NvmeTcpUri};
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

/// Replaces every NVMe/TCP target's host name by its first address, once, before the sandbox
/// (as nvme-cli does before it hands an address to the kernel's initiator). Name resolution
/// reads files, asks DNS servers and a netlink socket, which no thread may do afterwards; a
/// reconnection goes to the same address.
pub(super) fn resolve_targets(cfg: &mut Config) -> Result<(), DaemonError> {
    for d in &mut cfg.devices {
        let DiskSpec::NvmeTcp(uri) = &mut d.disk else {
            continue;
        };
        if uri.host.parse::<IpAddr>().is_ok() {
            continue;
        }
        match first_address(&uri.host, uri.port) {
            Ok(ip) => {
                info!(host = %uri.host, address = %ip, "NVMe/TCP target resolved");
                uri.host = ip.to_string();
            }
            Err(e) => return Err(super::device::in_device(d, e)),
        }
    }
    Ok(())
}

fn first_address(host: &str, port: u16) -> Result<IpAddr, DaemonError> {
    let resolve = |source| DaemonError::Resolve {
        host: host.to_owned(),
        source,
    };
    (host, port)
        .to_socket_addrs()
        .map_err(resolve)?
        .next()
        .map(|a| a.ip())
        .ok_or_else(|| resolve(std::io::ErrorKind::NotFound.into()))
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::test_args::serve;

    fn host(c: &Config, i: usize) -> &str {
        match &c.devices[i].disk {
            DiskSpec::NvmeTcp(u) => &u.host,
            other => panic!("not NVMe/TCP: {other:?}"),
        }
    }

    #[test]
    fn target_names_become_addresses_before_the_sandbox() {
        let mut c = serve(&[
            "--device",
            "socket=a,disk=nvme-tcp://localhost:4420/nqn.2014-08.org.example:x",
            "--device",
            "socket=b,disk=nvme-tcp://[::1]/nqn.2014-08.org.example:x",
            "--device",
            "socket=c,disk=null:1M",
        ]);
        resolve_targets(&mut c).expect("localhost resolves");
        let ip: IpAddr = host(&c, 0).parse().expect("an address");
        assert!(ip.is_loopback(), "{ip}");
        assert_eq!(host(&c, 1), "::1", "an address stays as it is");
    }
}
