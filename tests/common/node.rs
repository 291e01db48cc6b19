//! vubd as a node daemon in a test: a control socket (`--control-socket`) and no device at
//! first, in a directory of its own that also holds the devices' sockets, and the calls a
//! control plane makes to it.

use std::ffi::OsStr;
use std::path::PathBuf;

use serde_json::{Value, json};
use tempfile::TempDir;
use vubd::jsonrpc::{self, ClientError};

use super::TIMEOUT;
use super::daemon::Daemon;

#[derive(Debug)]
pub struct Node {
    pub daemon: Daemon,
    pub control: PathBuf,
    pub dir: TempDir,
}

impl Node {
    /// vubd with a control socket and `extra` arguments after it.
    pub fn start(extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let control = dir.path().join("control.sock");
        let mut args: Vec<&OsStr> = vec!["--control-socket".as_ref(), control.as_os_str()];
        args.extend(extra.iter().map(OsStr::new));
        let daemon = Daemon::vubd_with_args(&args, &control);
        Self {
            daemon,
            control,
            dir,
        }
    }

    /// The socket path of device `name`.
    pub fn socket(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.sock"))
    }

    pub fn client(&self) -> jsonrpc::Client {
        jsonrpc::Client::connect(&self.control, TIMEOUT).expect("connect to the control socket")
    }

    /// One call on a connection of its own.
    pub fn call(&self, method: &str, params: Value) -> Result<Value, ClientError> {
        self.client().call(method, params)
    }

    /// A call that must succeed.
    #[track_caller]
    pub fn ok(&self, method: &str, params: Value) -> Value {
        self.call(method, params)
            .unwrap_or_else(|e| panic!("{method}: {e}\n{}", self.daemon.output()))
    }

    /// Adds device `name` on `disk` with the keys of `more` (an object); returns its socket.
    #[track_caller]
    pub fn add(&self, name: &str, disk: &str, more: Value) -> PathBuf {
        let socket = self.socket(name);
        let mut params = json!({"name": name, "socket": socket, "disk": disk});
        if let Value::Object(m) = more {
            params.as_object_mut().expect("object").extend(m);
        }
        assert_eq!(self.ok("device_add", params), json!({"name": name}));
        socket
    }

    #[track_caller]
    pub fn remove(&self, name: &str) {
        assert_eq!(self.ok("device_remove", json!({"name": name})), json!(true));
    }

    /// The devices' names, as `device_list` gives them.
    pub fn names(&self) -> Vec<String> {
        let list = self.ok("device_list", Value::Null);
        list.as_array()
            .expect("a list")
            .iter()
            .map(|d| d["name"].as_str().expect("a name").to_owned())
            .collect()
    }
}
