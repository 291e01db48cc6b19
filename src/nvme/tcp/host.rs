//! The host's identity on the fabric, resolved as nvme-cli does: given values first, then
//! `/etc/nvme/hostnqn` and `/etc/nvme/hostid`, else a generated UUID.

use std::fs;
use std::io;
use std::path::Path;

use uuid::Uuid;

use super::ctrl::CtrlError;
use crate::nvme::spec::{HostIdentity, Nqn};

/// Where nvme-cli and the Linux host keep the host NQN.
pub const HOSTNQN_FILE: &str = "/etc/nvme/hostnqn";
/// Where nvme-cli and the Linux host keep the Host Identifier.
pub const HOSTID_FILE: &str = "/etc/nvme/hostid";

/// Prefix of a UUID-based NQN (Base 2.0 §4.5).
const UUID_NQN_PREFIX: &str = "nqn.2014-08.org.nvmexpress:uuid:";

/// The host NQN and the Host Identifier sent in every Connect.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostId {
    pub nqn: Nqn,
    pub id: Uuid,
}

impl From<HostIdentity> for HostId {
    fn from(h: HostIdentity) -> HostId {
        HostId {
            nqn: h.nqn,
            id: h.id,
        }
    }
}

impl HostId {
    /// The identity to use: `nqn` and `id` when given, else the contents of
    /// [`HOSTNQN_FILE`] and [`HOSTID_FILE`] when present. Without a Host Identifier, a
    /// UUID-based host NQN gives its UUID; without a host NQN, the UUID-based NQN of the Host
    /// Identifier is used. With neither, both come from one new random UUID, which changes
    /// at every start: a target that allows only some hosts needs the files or the options.
    ///
    /// A file that cannot be read is ignored (with a warning); one that holds something
    /// invalid is an error, as is an invalid `nqn`.
    pub fn resolve(nqn: Option<&str>, id: Option<Uuid>) -> Result<HostId, CtrlError> {
        HostId::resolve_from(nqn, id, Path::new(HOSTNQN_FILE), Path::new(HOSTID_FILE))
    }

    fn resolve_from(
        nqn: Option<&str>,
        id: Option<Uuid>,
        nqn_file: &Path,
        id_file: &Path,
    ) -> Result<HostId, CtrlError> {
        let nqn = match nqn {
            Some(s) => Some(Nqn::new(s.trim()).map_err(CtrlError::HostNqn)?),
            None => match read_file(nqn_file)? {
                Some(s) => Some(Nqn::new(&s).map_err(|source| CtrlError::HostNqnFile {
                    path: nqn_file.to_owned(),
                    source,
                })?),
                None => None,
            },
        };
        let id = match id {
            Some(id) => Some(id),
            None => match read_file(id_file)? {
                Some(s) => Some(Uuid::try_parse(&s).map_err(|source| CtrlError::HostIdFile {
                    path: id_file.to_owned(),
                    source,
                })?),
                None => None,
            },
        };
        Ok(match (nqn, id) {
            (Some(nqn), Some(id)) => HostId { nqn, id },
            (Some(nqn), None) => {
                let id = uuid_of(&nqn).unwrap_or_else(Uuid::new_v4);
                HostId { nqn, id }
            }
            (None, Some(id)) => HostId {
                nqn: Nqn::from_uuid(&id),
                id,
            },
            (None, None) => HostIdentity::generate().into(),
        })
    }
}

/// The UUID of a UUID-based NQN.
fn uuid_of(nqn: &Nqn) -> Option<Uuid> {
    nqn.as_str()
        .strip_prefix(UUID_NQN_PREFIX)
        .and_then(|s| Uuid::try_parse(s).ok())
}

/// The trimmed contents of `path`; `None` if it is missing, empty or unreadable.
fn read_file(path: &Path) -> Result<Option<String>, CtrlError> {
    match fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8(bytes).map_err(|e| CtrlError::HostFileRead {
                path: path.to_owned(),
                source: io::Error::new(io::ErrorKind::InvalidData, e),
            })?;
            let text = text.trim();
            Ok((!text.is_empty()).then(|| text.to_owned()))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "host identity file ignored");
            Ok(None)
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    const UUID: &str = "6a1b5e3c-0f64-4c1e-9d3a-2b7c8e9f0a1b";
    const OTHER: &str = "0d7f4c2a-5b3e-4a19-8c6d-1e2f3a4b5c6d";

    struct Files {
        dir: tempfile::TempDir,
    }

    impl Files {
        fn new(nqn: Option<&str>, id: Option<&str>) -> Files {
            let dir = tempfile::tempdir().expect("temp dir");
            if let Some(s) = nqn {
                fs::write(dir.path().join("hostnqn"), s).expect("write hostnqn");
            }
            if let Some(s) = id {
                fs::write(dir.path().join("hostid"), s).expect("write hostid");
            }
            Files { dir }
        }

        fn nqn(&self) -> PathBuf {
            self.dir.path().join("hostnqn")
        }

        fn id(&self) -> PathBuf {
            self.dir.path().join("hostid")
        }

        fn resolve(&self, nqn: Option<&str>, id: Option<Uuid>) -> Result<HostId, CtrlError> {
            HostId::resolve_from(nqn, id, &self.nqn(), &self.id())
        }
    }

    fn uuid(s: &str) -> Uuid {
        Uuid::try_parse(s).expect("test UUID")
    }

    #[test]
    fn given_values_win_over_files() {
        let f = Files::new(Some("nqn.2014-08.org.example:file\n"), Some(OTHER));
        let h = f
            .resolve(Some("nqn.2014-08.org.example:given"), Some(uuid(UUID)))
            .expect("resolve");
        assert_eq!(h.nqn.as_str(), "nqn.2014-08.org.example:given");
        assert_eq!(h.id, uuid(UUID));
    }

    #[test]
    fn files_are_read_and_trimmed() {
        let f = Files::new(
            Some("  nqn.2014-08.org.example:host1 \n"),
            Some(&format!("{OTHER}\n")),
        );
        let h = f.resolve(None, None).expect("resolve");
        assert_eq!(h.nqn.as_str(), "nqn.2014-08.org.example:host1");
        assert_eq!(h.id, uuid(OTHER));
    }

    #[test]
    fn uuid_nqn_without_hostid_gives_its_uuid() {
        let f = Files::new(
            Some(&format!("nqn.2014-08.org.nvmexpress:uuid:{UUID}")),
            None,
        );
        let h = f.resolve(None, None).expect("resolve");
        assert_eq!(h.id, uuid(UUID));
    }

    #[test]
    fn hostid_file_wins_over_the_uuid_of_the_nqn() {
        let f = Files::new(
            Some(&format!("nqn.2014-08.org.nvmexpress:uuid:{UUID}")),
            Some(OTHER),
        );
        assert_eq!(f.resolve(None, None).expect("resolve").id, uuid(OTHER));
    }

    #[test]
    fn hostid_alone_gives_the_uuid_nqn() {
        let f = Files::new(None, Some(UUID));
        let h = f.resolve(None, None).expect("resolve");
        assert_eq!(
            h.nqn.as_str(),
            format!("nqn.2014-08.org.nvmexpress:uuid:{UUID}")
        );
        assert_eq!(h.id, uuid(UUID));
    }

    #[test]
    fn nothing_generates_one_consistent_uuid_identity() {
        let f = Files::new(None, Some("  \n"));
        let h = f.resolve(None, None).expect("resolve");
        assert_eq!(uuid_of(&h.nqn), Some(h.id));
        assert_eq!(h.id.get_version_num(), 4);
        assert_ne!(f.resolve(None, None).expect("resolve").id, h.id);
    }

    #[test]
    fn non_uuid_nqn_without_hostid_gets_a_random_id() {
        let f = Files::new(None, None);
        let h = f
            .resolve(Some("nqn.2014-08.org.example:h"), None)
            .expect("resolve");
        assert_eq!(h.id.get_version_num(), 4);
    }

    #[test]
    fn malformed_files_are_errors_naming_the_file() {
        let f = Files::new(Some("not-an-nqn"), None);
        let e = f.resolve(None, None).expect_err("bad hostnqn");
        assert!(matches!(e, CtrlError::HostNqnFile { .. }), "{e:?}");
        assert_eq!(
            e.to_string(),
            format!("{}: not a valid host NQN", f.nqn().display())
        );
        assert!(!e.is_retryable());

        let f = Files::new(None, Some("1234"));
        let e = f.resolve(None, None).expect_err("bad hostid");
        assert!(matches!(e, CtrlError::HostIdFile { .. }), "{e:?}");
        assert!(e.to_string().contains("not a valid host identifier"), "{e}");
    }

    #[test]
    fn invalid_given_nqn_is_an_error() {
        let f = Files::new(None, None);
        let e = f.resolve(Some("nqn.bad"), None).expect_err("bad nqn");
        assert!(matches!(e, CtrlError::HostNqn(_)), "{e:?}");
    }

    #[test]
    fn unreadable_file_is_ignored() {
        // A directory where the file should be: reading it fails with something other than
        // NotFound.
        let f = Files::new(None, None);
        fs::create_dir(f.nqn()).expect("mkdir");
        let h = f.resolve(None, Some(uuid(UUID))).expect("resolve");
        assert_eq!(
            h.nqn.as_str(),
            format!("nqn.2014-08.org.nvmexpress:uuid:{UUID}")
        );
    }
}
