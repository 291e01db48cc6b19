//! `--socket-mode` and `--socket-group` (and the `--device` keys `socket-mode=` and
//! `socket-group=`): who may connect to a socket vubd creates. libvirt runs QEMU as its own
//! user (Debian: `libvirt-qemu`), which needs the socket's group and mode 0660.

use std::ffi::CString;

use super::ConfigError;

/// The mode and group a created socket gets; `None` leaves what binding gives (the umask's
/// mode, vubd's group).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SocketPerms {
    /// Permission bits, at most 0o777.
    pub mode: Option<u32>,
    /// A group id.
    pub group: Option<u32>,
}

impl SocketPerms {
    /// Whether either is set.
    pub fn any(&self) -> bool {
        self.mode.is_some() || self.group.is_some()
    }

    /// `self`, with what it leaves unset taken from `defaults`.
    pub(super) fn or(self, defaults: SocketPerms) -> SocketPerms {
        SocketPerms {
            mode: self.mode.or(defaults.mode),
            group: self.group.or(defaults.group),
        }
    }

    /// Parses the two option values as given.
    pub(super) fn parse(mode: Option<&str>, group: Option<&str>) -> Result<Self, ConfigError> {
        Ok(SocketPerms {
            mode: mode.map(parse_mode).transpose()?,
            group: group.map(parse_group).transpose()?,
        })
    }
}

/// An octal mode: `660`, `0660`, `0o660`.
fn parse_mode(s: &str) -> Result<u32, ConfigError> {
    let digits = s.strip_prefix("0o").unwrap_or(s);
    u32::from_str_radix(digits, 8)
        .ok()
        .filter(|&m| m <= 0o777 && !digits.is_empty() && !digits.starts_with('+'))
        .ok_or_else(|| ConfigError::SocketMode(s.to_owned()))
}

/// A group name, or a numeric group id.
fn parse_group(s: &str) -> Result<u32, ConfigError> {
    if let Ok(gid) = s.parse::<u32>() {
        // (gid_t)-1 means "leave the group" to chown.
        return (gid != u32::MAX)
            .then_some(gid)
            .ok_or_else(|| ConfigError::SocketGroup(s.to_owned()));
    }
    group_id(s).ok_or_else(|| ConfigError::SocketGroup(s.to_owned()))
}

/// The id of the group named `name`, from the system's group database.
fn group_id(name: &str) -> Option<u32> {
    let cname = CString::new(name).ok()?;
    let mut buf = vec![0u8; 4096];
    loop {
        // SAFETY: group is plain data that getgrnam_r fills in.
        let mut group: libc::group = unsafe { std::mem::zeroed() };
        let mut found: *mut libc::group = std::ptr::null_mut();
        // SAFETY: every pointer is to a live local or to `buf`, whose length is passed;
        // getgrnam_r writes the strings of the entry into `buf` and nothing else.
        let rc = unsafe {
            libc::getgrnam_r(
                cname.as_ptr(),
                &mut group,
                buf.as_mut_ptr().cast(),
                buf.len(),
                &mut found,
            )
        };
        if rc == libc::ERANGE && buf.len() < 1 << 20 {
            buf.resize(buf.len() * 2, 0);
            continue;
        }
        return (rc == 0 && !found.is_null()).then_some(group.gr_gid);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::test_args::{parse, serve};

    #[test]
    fn modes_are_octal_permission_bits() {
        assert_eq!(parse_mode("660"), Ok(0o660));
        assert_eq!(parse_mode("0660"), Ok(0o660));
        assert_eq!(parse_mode("0o600"), Ok(0o600));
        assert_eq!(parse_mode("0"), Ok(0));
        for bad in ["", "0o", "888", "1777", "rw-rw----", "+660", "-1"] {
            assert_eq!(parse_mode(bad), Err(ConfigError::SocketMode(bad.into())));
        }
    }

    #[test]
    fn groups_by_name_or_number() {
        assert_eq!(parse_group("0"), Ok(0));
        assert_eq!(parse_group("root"), Ok(0), "root is group 0");
        assert_eq!(parse_group("4242"), Ok(4242), "a number needs no entry");
        for bad in ["no-such-group-vubd", "4294967295", ""] {
            assert_eq!(parse_group(bad), Err(ConfigError::SocketGroup(bad.into())));
        }
    }

    #[test]
    fn global_values_are_defaults_that_each_device_may_override() {
        let c = serve(&[
            "--socket-mode",
            "0660",
            "--socket-group",
            "0",
            "--device",
            "socket=a,disk=null:1M",
            "--device",
            "socket=b,disk=null:1M,socket-mode=600,socket-group=4242",
        ]);
        let perms: Vec<SocketPerms> = c.devices.iter().map(|d| d.socket_perms).collect();
        assert_eq!(
            perms,
            [
                SocketPerms {
                    mode: Some(0o660),
                    group: Some(0)
                },
                SocketPerms {
                    mode: Some(0o600),
                    group: Some(4242)
                }
            ]
        );
        let c = serve(&["--disk", "null:1M", "--socket-mode", "660"]);
        assert_eq!(c.devices[0].socket_perms.mode, Some(0o660));
        assert_eq!(c.devices[0].socket_perms.group, None);
        assert!(!serve(&["--disk", "null:1M"]).devices[0].socket_perms.any());
    }

    #[test]
    fn bad_values_name_the_option() {
        let e = parse(&["--disk", "null:1M", "--socket-mode", "rw"]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "--socket-mode \"rw\": expected an octal mode such as 0660 (at most 0777)"
        );
        let e = parse(&["--disk", "null:1M", "--socket-group", "no-such-group-vubd"]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "--socket-group \"no-such-group-vubd\": no such group (a group name or a number)"
        );
        let e = parse(&["--disk", "null:1M", "--fd", "3", "--socket-mode", "660"]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "--socket-mode and --socket-group apply to a socket vubd creates, not to --fd"
        );
        let arg = "fd=3,disk=null:1M,socket-group=0";
        let e = parse(&["--device", arg]).unwrap_err();
        assert!(
            e.to_string().starts_with(&format!("--device {arg:?}: ")),
            "{e}"
        );
        let arg = "socket=a,disk=null:1M,socket-mode=999";
        let e = parse(&["--device", arg]).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "--device {arg:?}: --socket-mode \"999\": expected an octal mode such as 0660 \
                 (at most 0777)"
            )
        );
    }
}
