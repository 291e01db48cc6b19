//! A private libvirt daemon for the libvirt lab ([`Libvirtd`]: `tests/libvirt/libvirtd.sh`,
//! Debian's libvirtd with its directories in the test's own and QEMU running as
//! `libvirt-qemu`), the `virsh` calls a test makes to it, each under `timeout(1)`, and the QEMU
//! process it starts ([`qemu_with`]). A failing test gets the daemon's and QEMU's logs.

use std::ffi::OsStr;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use super::lab::wait_limited;

/// How long the daemon may take to answer its first `virsh` call.
const START_LIMIT: Duration = Duration::from_secs(60);
/// How long it may take to stop once told to.
const STOP_LIMIT: Duration = Duration::from_secs(30);
/// Lines of each log a failing test shows.
const LOG_LINES: usize = 60;

/// The daemon, running until dropped. Its directories are in the one [`Libvirtd::start`] was
/// given; dropping it stops libvirtd and whatever QEMU it still runs.
#[derive(Debug)]
pub struct Libvirtd {
    /// `libvirtd.sh`, which runs libvirtd in namespaces of its own and stops it when its
    /// standard input ends.
    child: Child,
    stdin: Option<ChildStdin>,
    dir: PathBuf,
}

impl Libvirtd {
    /// Starts the daemon with its configuration, state, logs and sockets in `dir` and waits
    /// until it answers.
    pub fn start(dir: &Path) -> Self {
        fs::create_dir_all(dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/libvirt/libvirtd.sh");
        let out = File::create(dir.join("libvirtd.sh.log")).expect("create libvirtd.sh's log");
        let err = out.try_clone().expect("clone libvirtd.sh's log");
        let mut child = Command::new("sh")
            .arg(&script)
            .arg(dir)
            .stdin(Stdio::piped())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", script.display()));
        let stdin = child.stdin.take();
        let mut daemon = Self {
            child,
            stdin,
            dir: dir.to_owned(),
        };
        daemon.wait_ready();
        daemon
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + START_LIMIT;
        loop {
            let socket = self.dir.join("run/libvirt-sock");
            if socket.exists() && self.virsh(&["version"], START_LIMIT).is_ok() {
                return;
            }
            if let Some(status) = self.child.try_wait().expect("poll libvirtd.sh") {
                panic!("libvirtd.sh ended ({status}) before libvirtd answered");
            }
            assert!(
                Instant::now() < deadline,
                "libvirtd did not answer within {START_LIMIT:?}"
            );
            thread::sleep(Duration::from_millis(200));
        }
    }

    /// The connection URI of the daemon (`qemu:///system` on its own socket).
    pub fn uri(&self) -> String {
        format!(
            "qemu:///system?socket={}",
            self.dir.join("run/libvirt-sock").display()
        )
    }

    /// Runs `virsh -c URI ARGS...`, stopped by `timeout(1)` after `limit` (a `virsh start` on a
    /// socket QEMU cannot reach waits for good): its standard output, or on failure what it
    /// printed and how it ended.
    pub fn virsh<S: AsRef<OsStr>>(&self, args: &[S], limit: Duration) -> Result<String, String> {
        let out = Command::new("timeout")
            .args([
                "-k",
                "5",
                &limit.as_secs().max(1).to_string(),
                "virsh",
                "-c",
            ])
            .arg(self.uri())
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("run virsh: {e}"));
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() {
            return Ok(stdout);
        }
        // timeout(1) exits with 124 when it stopped the command.
        let how = if out.status.code() == Some(124) {
            format!("still running after {limit:?}")
        } else {
            out.status.to_string()
        };
        Err(format!(
            "{how}: {}{stdout}",
            String::from_utf8_lossy(&out.stderr)
        ))
    }

    /// [`Libvirtd::virsh`] that must succeed.
    #[track_caller]
    pub fn virsh_ok<S: AsRef<OsStr> + std::fmt::Debug>(
        &self,
        args: &[S],
        limit: Duration,
    ) -> String {
        self.virsh(args, limit)
            .unwrap_or_else(|e| panic!("virsh {args:?}: {e}"))
    }

    /// The last lines of the script's output, of the daemon's log and of every QEMU's log.
    pub fn logs(&self) -> String {
        let mut files = vec![
            self.dir.join("libvirtd.sh.log"),
            self.dir.join("log/libvirtd.log"),
        ];
        if let Ok(qemu_logs) = fs::read_dir(self.dir.join("log/qemu")) {
            files.extend(qemu_logs.filter_map(Result::ok).map(|e| e.path()));
        }
        let mut out = String::new();
        for file in files {
            let text = fs::read_to_string(&file).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(LOG_LINES)..];
            out += &format!("---- {} ----\n{}\n", file.display(), tail.join("\n"));
        }
        out
    }
}

impl Drop for Libvirtd {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!("{}---- end of libvirt's logs ----", self.logs());
        }
        // The end of its standard input stops libvirtd; the end of the script, init of the
        // daemon's PID namespace, ends every process left in it.
        drop(self.stdin.take());
        wait_limited(&mut self.child, STOP_LIMIT);
    }
}

/// A QEMU process, found by a string in its command line.
#[derive(Debug, Clone, Copy)]
pub struct Qemu {
    pub pid: u32,
    /// Its real user and group ids.
    pub uid: u32,
    pub gid: u32,
}

/// The running `qemu-system-*` process whose command line contains `marker` (a path of the
/// test's own, unique to it), if there is one.
pub fn qemu_with(marker: &str) -> Option<Qemu> {
    let proc = fs::read_dir("/proc").expect("read /proc");
    proc.filter_map(Result::ok).find_map(|entry| {
        let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
        let cmdline = fs::read(entry.path().join("cmdline")).ok()?;
        let cmdline = String::from_utf8_lossy(&cmdline);
        let program = cmdline.split('\0').next()?;
        if !program.contains("qemu-system") || !cmdline.contains(marker) {
            return None;
        }
        let status = fs::read_to_string(entry.path().join("status")).ok()?;
        // `Uid:` and `Gid:` list the real, effective, saved and file system ids.
        let real = |key: &str| -> Option<u32> {
            let ids = status.lines().find_map(|l| l.strip_prefix(key))?;
            ids.split_whitespace().next()?.parse().ok()
        };
        Some(Qemu {
            pid,
            uid: real("Uid:")?,
            gid: real("Gid:")?,
        })
    })
}

/// The user id of `name` in `/etc/passwd`.
pub fn user_id(name: &str) -> u32 {
    let passwd = fs::read_to_string("/etc/passwd").expect("read /etc/passwd");
    passwd
        .lines()
        .find_map(|l| {
            let mut fields = l.split(':');
            (fields.next() == Some(name)).then(|| fields.nth(1))?
        })
        .and_then(|uid| uid.parse().ok())
        .unwrap_or_else(|| {
            panic!("no user {name} in /etc/passwd (is libvirt-daemon-system installed?)")
        })
}
