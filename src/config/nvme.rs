//! The NVMe/TCP parts of the command line: the `nvme-tcp://` disk URI and the host's identity
//! and timeouts, validated here; resolving the identity's defaults (files under `/etc/nvme`)
//! is left to the daemon.

use std::time::Duration;

use clap::Args as ClapArgs;
use uuid::Uuid;

use super::ConfigError;
use crate::nvme::spec::Nqn;

/// The NVMe/TCP port a URI without one means (the IANA port for NVMe/TCP I/O controllers).
pub const DEFAULT_PORT: u16 = 4420;
/// The discovery controller's port (NVMe/TCP 1.0 §7.4.9.2 reserves 8009; targets commonly
/// serve discovery on 4420 too, as Linux nvmet does).
pub const DEFAULT_DISCOVERY_PORT: u16 = 8009;

/// `nvme-tcp://HOST[:PORT]/SUBNQN[?nsid=N&hdgst=0|1&ddgst=0|1]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NvmeTcpUri {
    /// Host name or address, as given (brackets removed from an IPv6 address).
    pub host: String,
    pub port: u16,
    pub subnqn: Nqn,
    pub nsid: u32,
    /// Ask for header digests (CRC32C over every PDU header).
    pub hdgst: bool,
    /// Ask for data digests (CRC32C over every PDU's data).
    pub ddgst: bool,
}

/// The host's identity and the controller timeouts; shared by every NVMe/TCP controller the
/// process connects to (the I/O timeout and the debug reset by NVMe PCIe controllers too).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NvmeHostConfig {
    /// `--hostnqn`, else the daemon's default.
    pub hostnqn: Option<Nqn>,
    /// `--hostid`, else the daemon's default.
    pub hostid: Option<[u8; 16]>,
    pub ctrl_loss_tmo: Duration,
    pub reconnect_delay: Duration,
    pub keep_alive_tmo: Duration,
    pub io_timeout: Duration,
    /// Debugging only: reset an NVMe PCIe controller once, with commands in flight, after
    /// this many commands on a channel.
    pub debug_reset_after: Option<u64>,
}

/// Options of NVMe/TCP controllers (serving and `discover`).
#[derive(Debug, Clone, PartialEq, Eq, ClapArgs)]
pub struct NvmeHostArgs {
    /// NVMe host NQN (default: /etc/nvme/hostnqn, else one generated from the host id).
    #[arg(long, global = true, value_name = "NQN")]
    pub hostnqn: Option<String>,
    /// NVMe host identifier, a UUID (default: /etc/nvme/hostid, else a random one).
    #[arg(long, global = true, value_name = "UUID")]
    pub hostid: Option<String>,
    /// NVMe/TCP: seconds to keep retrying a lost controller before failing its I/O.
    #[arg(long, global = true, value_name = "SECS", default_value_t = 600)]
    pub ctrl_loss_tmo: u64,
    /// NVMe/TCP: seconds between reconnection attempts.
    #[arg(long, global = true, value_name = "SECS", default_value_t = 10)]
    pub reconnect_delay: u64,
    /// NVMe/TCP: keep-alive timeout asked of the controller, seconds (keep-alives go at half).
    #[arg(long, global = true, value_name = "SECS", default_value_t = 5)]
    pub keep_alive_tmo: u64,
    /// NVMe: seconds after which an unanswered command counts as a lost controller.
    #[arg(long, global = true, value_name = "SECS", default_value_t = 30)]
    pub io_timeout: u64,
    /// Debugging only (the NVMe PCIe lab): after N commands on a channel, reset the NVMe PCIe
    /// controller once with commands in flight, to exercise recovery.
    #[arg(
        long,
        global = true,
        hide = true,
        value_name = "N",
        env = "VUBD_DEBUG_NVME_RESET_AFTER"
    )]
    pub debug_nvme_reset_after: Option<u64>,
}

impl NvmeHostArgs {
    pub fn validate(&self) -> Result<NvmeHostConfig, ConfigError> {
        let hostnqn = match &self.hostnqn {
            Some(s) => Some(Nqn::new(s).map_err(|e| ConfigError::BadHostNqn(s.clone(), e))?),
            None => None,
        };
        let hostid = match &self.hostid {
            Some(s) => Some(
                Uuid::try_parse(s)
                    .map_err(|_| ConfigError::BadHostId(s.clone()))?
                    .into_bytes(),
            ),
            None => None,
        };
        let secs = |arg: &'static str, v: u64, min: u64, max: u64| {
            if (min..=max).contains(&v) {
                Ok(Duration::from_secs(v))
            } else {
                Err(ConfigError::BadSeconds(arg, v, min, max))
            }
        };
        let reconnect_delay = secs("--reconnect-delay", self.reconnect_delay, 1, 3600)?;
        let ctrl_loss_tmo = secs("--ctrl-loss-tmo", self.ctrl_loss_tmo, 0, 86_400 * 365)?;
        // KATO travels in milliseconds in a 32-bit field; keep it within a sane hour.
        let keep_alive_tmo = secs("--keep-alive-tmo", self.keep_alive_tmo, 1, 3600)?;
        let io_timeout = secs("--io-timeout", self.io_timeout, 1, 3600)?;
        Ok(NvmeHostConfig {
            hostnqn,
            hostid,
            ctrl_loss_tmo,
            reconnect_delay,
            keep_alive_tmo,
            io_timeout,
            debug_reset_after: self.debug_nvme_reset_after,
        })
    }
}

/// Parses the part of `--disk` after `nvme-tcp://`; `full` is the whole argument, for errors.
pub fn parse_uri(rest: &str, full: &str) -> Result<NvmeTcpUri, ConfigError> {
    let bad = |why: &'static str| ConfigError::BadNvmeUri(full.to_owned(), why);
    let (authority, path) = rest
        .split_once('/')
        .ok_or(bad("expected nvme-tcp://HOST:PORT/SUBNQN"))?;
    let (host, port) = parse_authority(authority).ok_or(bad("bad HOST:PORT"))?;
    let (subnqn, query) = match path.split_once('?') {
        Some((n, q)) => (n, Some(q)),
        None => (path, None),
    };
    if subnqn.is_empty() {
        return Err(bad("the subsystem NQN is missing"));
    }
    let subnqn = Nqn::new(subnqn).map_err(|e| ConfigError::BadSubNqn(full.to_owned(), e))?;
    let mut uri = NvmeTcpUri {
        host,
        port,
        subnqn,
        nsid: 1,
        hdgst: false,
        ddgst: false,
    };
    for pair in query.into_iter().flat_map(|q| q.split('&')) {
        let (key, value) = pair
            .split_once('=')
            .ok_or(bad("expected KEY=VALUE options"))?;
        let flag = || match value {
            "1" | "on" | "true" => Ok(true),
            "0" | "off" | "false" => Ok(false),
            _ => Err(bad("digest options take 0 or 1")),
        };
        match key {
            "nsid" => {
                uri.nsid = value
                    .parse()
                    .ok()
                    .filter(|&n| n != 0 && n != u32::MAX)
                    .ok_or(bad("nsid must be between 1 and 4294967294"))?;
            }
            "hdgst" => uri.hdgst = flag()?,
            "ddgst" => uri.ddgst = flag()?,
            _ => return Err(bad("unknown option (known: nsid, hdgst, ddgst)")),
        }
    }
    Ok(uri)
}

/// `nvme-pcie:BDF[?nsid=N&interrupts=0|1]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NvmePcieUri {
    /// `DDDD:BB:DD.F`.
    pub bdf: String,
    pub nsid: u32,
    /// Use the controller's MSI-X interrupts for I/O completions when it has them, so that an
    /// adaptive poller can sleep with commands in flight; off, completions are only polled.
    pub interrupts: bool,
}

/// Parses the part of `--disk` after `nvme-pcie:`: a PCI address (`0000:01:00.0`, or
/// `01:00.0` in domain 0), an optional `nsid=N` (1) and `interrupts=0|1` (1). `full` is the
/// whole argument, for errors.
pub fn parse_pcie(rest: &str, full: &str) -> Result<NvmePcieUri, ConfigError> {
    let bad = |why: &'static str| ConfigError::BadNvmeUri(full.to_owned(), why);
    let (addr, query) = match rest.split_once('?') {
        Some((a, q)) => (a, Some(q)),
        None => (rest, None),
    };
    let bdf = normalize_bdf(addr).ok_or(bad(
        "expected nvme-pcie:DDDD:BB:DD.F[?nsid=N&interrupts=0|1]",
    ))?;
    let mut uri = NvmePcieUri {
        bdf,
        nsid: 1,
        interrupts: true,
    };
    for pair in query.into_iter().flat_map(|q| q.split('&')) {
        match pair.split_once('=') {
            Some(("nsid", v)) => {
                uri.nsid = v
                    .parse()
                    .ok()
                    .filter(|&n| n != 0 && n != u32::MAX)
                    .ok_or(bad("nsid must be between 1 and 4294967294"))?;
            }
            Some(("interrupts", v)) => {
                uri.interrupts = match v {
                    "1" | "on" | "true" => true,
                    "0" | "off" | "false" => false,
                    _ => return Err(bad("interrupts takes 0 or 1")),
                };
            }
            _ => return Err(bad("unknown option (known: nsid, interrupts)")),
        }
    }
    Ok(uri)
}

/// `DDDD:BB:DD.F` with lower-case hex digits, from that or `BB:DD.F`.
fn normalize_bdf(s: &str) -> Option<String> {
    let parts: Vec<&str> = s.split([':', '.']).collect();
    let (domain, bus, dev, func) = match parts.as_slice() {
        [d, b, v, f] => (*d, *b, *v, *f),
        [b, v, f] => ("0000", *b, *v, *f),
        _ => return None,
    };
    let hex = |x: &str, max_len: usize| {
        (!x.is_empty() && x.len() <= max_len && x.bytes().all(|c| c.is_ascii_hexdigit()))
            .then(|| u32::from_str_radix(x, 16).ok())
            .flatten()
    };
    let (d, b, v, f) = (hex(domain, 4)?, hex(bus, 2)?, hex(dev, 2)?, hex(func, 1)?);
    (v < 32 && f < 8).then(|| format!("{d:04x}:{b:02x}:{v:02x}.{f:x}"))
}

/// `HOST`, `HOST:PORT`, `[V6]`, `[V6]:PORT`.
fn parse_authority(s: &str) -> Option<(String, u16)> {
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (h, after) = rest.split_once(']')?;
        match after {
            "" => (h, None),
            p => (h, Some(p.strip_prefix(':')?)),
        }
    } else {
        match s.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (s, None),
        }
    };
    if host.is_empty() || host.contains(|c: char| c.is_whitespace() || c == '/') {
        return None;
    }
    let port = match port {
        Some(p) => p.parse().ok().filter(|&p| p != 0)?,
        None => DEFAULT_PORT,
    };
    Some((host.to_owned(), port))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uri(s: &str) -> Result<NvmeTcpUri, ConfigError> {
        parse_uri(s.strip_prefix("nvme-tcp://").expect("prefix"), s)
    }

    #[test]
    fn uri_with_every_part() {
        let u =
            uri("nvme-tcp://10.0.0.1:4421/nqn.2014-08.org.example:disk1?nsid=3&hdgst=1&ddgst=on")
                .expect("valid");
        assert_eq!(
            u,
            NvmeTcpUri {
                host: "10.0.0.1".into(),
                port: 4421,
                subnqn: Nqn::new("nqn.2014-08.org.example:disk1").expect("valid"),
                nsid: 3,
                hdgst: true,
                ddgst: true,
            }
        );
    }

    #[test]
    fn uri_defaults_port_nsid_and_digests() {
        let u = uri("nvme-tcp://target.example/nqn.2014-08.org.example:d").expect("valid");
        assert_eq!(
            (u.port, u.nsid, u.hdgst, u.ddgst),
            (DEFAULT_PORT, 1, false, false)
        );
        let u = uri("nvme-tcp://[::1]:4420/nqn.2014-08.org.example:d").expect("valid");
        assert_eq!(u.host, "::1");
    }

    #[test]
    fn bad_uris_say_what_is_wrong() {
        for (s, why) in [
            ("nvme-tcp://host", "expected nvme-tcp://HOST:PORT/SUBNQN"),
            (
                "nvme-tcp://host:0/nqn.2014-08.org.example:d",
                "bad HOST:PORT",
            ),
            (
                "nvme-tcp://host:x/nqn.2014-08.org.example:d",
                "bad HOST:PORT",
            ),
            (
                "nvme-tcp://:4420/nqn.2014-08.org.example:d",
                "bad HOST:PORT",
            ),
            ("nvme-tcp://host/", "the subsystem NQN is missing"),
            (
                "nvme-tcp://h/nqn.2014-08.org.example:d?nsid=0",
                "nsid must be between 1 and 4294967294",
            ),
            (
                "nvme-tcp://h/nqn.2014-08.org.example:d?hdgst=2",
                "digest options take 0 or 1",
            ),
            (
                "nvme-tcp://h/nqn.2014-08.org.example:d?x=1",
                "unknown option (known: nsid, hdgst, ddgst)",
            ),
            (
                "nvme-tcp://h/nqn.2014-08.org.example:d?nsid",
                "expected KEY=VALUE options",
            ),
        ] {
            assert_eq!(uri(s), Err(ConfigError::BadNvmeUri(s.into(), why)), "{s}");
        }
        for bad in ["disk1", "nqn.2014-08.org.example:", "nqn.x"] {
            let s = format!("nvme-tcp://h/{bad}");
            assert!(matches!(uri(&s), Err(ConfigError::BadSubNqn(..))), "{bad}");
        }
        let long = format!("nvme-tcp://h/nqn.2014-08.org.example:{}", "x".repeat(220));
        let e = uri(&long).expect_err("too long");
        assert!(e.to_string().contains("at most 223"), "{e}");
    }
}
