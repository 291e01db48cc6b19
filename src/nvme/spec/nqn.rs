//! NVMe Qualified Names (NVMe Base 2.0 §4.5).

use std::fmt;

use uuid::Uuid;

use super::SpecError;

/// Longest NQN in bytes, without the terminating NUL (Base 2.0 §4.5).
pub const NQN_MAX_LEN: usize = 223;
/// The well-known NQN of a discovery controller (Base 2.0 §4.5).
pub const DISCOVERY_NQN: &str = "nqn.2014-08.org.nvmexpress.discovery";
/// Prefix of the UUID-based form, for hosts and subsystems without a domain of their own.
const UUID_PREFIX: &str = "nqn.2014-08.org.nvmexpress:uuid:";

/// A validated NQN: `nqn.YYYY-MM.reverse.domain[:anything]`, or the UUID-based form
/// `nqn.2014-08.org.nvmexpress:uuid:` followed by a UUID in its 36-character form.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Nqn(String);

impl Nqn {
    pub fn new(s: &str) -> Result<Nqn, SpecError> {
        if s.len() > NQN_MAX_LEN {
            return Err(SpecError::NqnTooLong { len: s.len() });
        }
        let bad = || SpecError::NqnFormat(s.to_owned());
        // NQNs travel NUL-terminated in fixed-size fields: no NUL, no control characters.
        if s.chars().any(char::is_control) {
            return Err(bad());
        }
        if let Some(id) = s.strip_prefix(UUID_PREFIX) {
            return match Uuid::try_parse(id) {
                Ok(_) if id.len() == 36 => Ok(Nqn(s.to_owned())),
                _ => Err(bad()),
            };
        }
        let rest = s.strip_prefix("nqn.").ok_or_else(bad)?;
        let (date, rest) = rest.split_at_checked(7).ok_or_else(bad)?;
        if !valid_date(date.as_bytes()) {
            return Err(bad());
        }
        let rest = rest.strip_prefix('.').ok_or_else(bad)?;
        let (domain, user) = match rest.split_once(':') {
            Some((domain, user)) => (domain, Some(user)),
            None => (rest, None),
        };
        let domain_ok = !domain.is_empty()
            && !domain.starts_with('.')
            && !domain.ends_with('.')
            && !domain.contains("..")
            && domain
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'.');
        if !domain_ok || user.is_some_and(str::is_empty) {
            return Err(bad());
        }
        Ok(Nqn(s.to_owned()))
    }

    /// The UUID-based NQN of `id`.
    pub fn from_uuid(id: &Uuid) -> Nqn {
        Nqn(format!("{UUID_PREFIX}{}", id.hyphenated()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// `YYYY-MM` with a month of 01 to 12.
fn valid_date(d: &[u8]) -> bool {
    let [y0, y1, y2, y3, b'-', m0, m1] = *d else {
        return false;
    };
    [y0, y1, y2, y3].iter().all(u8::is_ascii_digit)
        && matches!((m0, m1), (b'0', b'1'..=b'9') | (b'1', b'0'..=b'2'))
}

impl fmt::Display for Nqn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A host's identity on the fabric: the Host Identifier sent in Connect and the UUID-based
/// host NQN made from the same UUID, as Linux does for a generated host NQN.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostIdentity {
    pub id: Uuid,
    pub nqn: Nqn,
}

impl HostIdentity {
    /// A new identity from a random (version 4) UUID.
    pub fn generate() -> HostIdentity {
        HostIdentity::from_uuid(Uuid::new_v4())
    }

    /// The identity of a version 4 UUID made from 16 random bytes.
    pub fn from_random_bytes(bytes: [u8; 16]) -> HostIdentity {
        HostIdentity::from_uuid(uuid::Builder::from_random_bytes(bytes).into_uuid())
    }

    fn from_uuid(id: Uuid) -> HostIdentity {
        HostIdentity {
            nqn: Nqn::from_uuid(&id),
            id,
        }
    }
}
