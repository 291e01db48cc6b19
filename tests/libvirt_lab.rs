//! vubd behind a libvirt domain, as Debian's libvirt runs one: the test starts a private
//! libvirtd (`tests/libvirt/libvirtd.sh`: Debian's daemon, privileged, QEMU running as
//! `libvirt-qemu`, its directories in the test's own) and one TCG domain,
//! `tests/libvirt/vm1.xml`, whose memory is a shared memfd and whose root disk is a
//! `<disk type='vhostuser'>` with `<reconnect>` on vubd's socket. That file and the hot-plugged
//! disk's, `tests/libvirt/vm1-data.xml`, are what docs/libvirt.md and docs/kubevirt.md show
//! (the second test checks the docs quote them); the test only moves their paths into its own
//! directory (`/run/vubd/` and `/var/lib/vubd-lab/`).
//!
//! vubd serves both disks as docs/libvirt.md says: its sockets in a directory QEMU may enter,
//! owned by group `libvirt-qemu` with mode 0660 (`--socket-group`, `--socket-mode`): QEMU's
//! user must be able to connect. In one boot (the guest: `tests/guest/libvirt.sh`; the test
//! tells it when it has done its part on the domain's second serial port):
//!
//! 1. the guest writes and reads back data on the root disk, from both CPUs;
//! 2. the test kills vubd (SIGKILL) and starts it again; QEMU reconnects (the `<reconnect>`
//!    element); the test attaches the data disk with `virsh attach-device --live`; the guest
//!    sees it, reads back what it wrote before the restart and writes and checks more on both
//!    disks;
//! 3. the test detaches the data disk (`virsh detach-device --live`); the guest sees it go,
//!    libvirt no longer lists it, QEMU leaves its socket; then the guest writes and checks more
//!    on the root disk and powers off.
//!
//! Then libvirt's block statistics are unsupported for a vhostuser disk (`domblkinfo`, as
//! docs/libvirt.md says) and vubd's own count the guest's writes since the restart exactly,
//! and the images hold, range by range, what the guest wrote.
//!
//! It needs root, `unshare` and Debian's libvirt-daemon-system and libvirt-clients
//! (`tests/run.sh` installs them), QEMU, and a kernel (the lab fetches one); where one is
//! missing it fails and says why, never skips.

mod common;

use std::fs;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use common::TIMEOUT;
use common::daemon::{Daemon, socket_connected, socket_listening, vubd_command};
use common::lab::{build_initramfs, fields, image_file, kernel_image, lines_with, test_dir};
use common::libvirtd::{Libvirtd, qemu_with, user_id};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use vubd::jsonrpc;

/// The domain and the disk the test attaches to it, as the docs show them.
const DOMAIN_XML: &str = "tests/libvirt/vm1.xml";
const DATA_DISK_XML: &str = "tests/libvirt/vm1-data.xml";
const DOMAIN: &str = "vm1";
/// The docs whose XML must be what the lab runs.
const DOCS: [&str; 2] = ["docs/libvirt.md", "docs/kubevirt.md"];
/// Where the XML files have vubd's sockets and the guest's files, as on a host.
const SOCKET_DIR: &str = "/run/vubd/";
const LAB_DIR: &str = "/var/lib/vubd-lab/";
const IMAGE_BYTES: u64 = 64 << 20;
/// What the guest writes at a time, and how much to each disk after vubd's restart.
const MIB: u64 = 1 << 20;
const ROOT_WRITTEN_AFTER_RESTART: u64 = 4 * MIB;
const DATA_WRITTEN: u64 = 2 * MIB;

/// From `virsh start` to the guest's first line of I/O: a TCG boot.
const BOOT_LIMIT: Duration = Duration::from_secs(300);
/// For one step of the guest once the test has done its part.
const STEP_LIMIT: Duration = Duration::from_secs(120);
/// For one `virsh` call (`virsh start` waits for QEMU's connection to vubd).
const VIRSH_LIMIT: Duration = Duration::from_secs(120);
/// From a new vubd to QEMU's connection (`<reconnect timeout='1'/>`: once a second).
const RECONNECT_LIMIT: Duration = Duration::from_secs(30);

/// The vubd serving the domain's two disks, and what it takes to start it again.
struct Vubd {
    daemon: Daemon,
    socket_dir: PathBuf,
    images: PathBuf,
}

impl Vubd {
    /// Starts vubd as docs/libvirt.md does: one device per disk, their sockets group
    /// `libvirt-qemu` and mode 0660, and a control socket; waits until both disks listen.
    fn start(socket_dir: &Path, images: &Path) -> Self {
        let device = |name: &str| {
            format!(
                "name={name},socket={},disk={},num-queues=2,serial={name}",
                socket_dir.join(format!("{name}.sock")).display(),
                images.join(format!("{name}.img")).display()
            )
        };
        let mut cmd = vubd_command();
        cmd.args(["--socket-group", "libvirt-qemu", "--socket-mode", "0660"])
            .arg("--control-socket")
            .arg(socket_dir.join("control.sock"))
            .args([
                "--device",
                &device("vm1-root"),
                "--device",
                &device("vm1-data"),
            ]);
        // A socket with a group and mode is bound beside its path, then renamed into place.
        let daemon = Daemon::taking_over(cmd, "vubd", &socket_dir.join("vm1-root.sock"));
        // (The killed vubd's socket file may still be there: the new one's is bound beside.)
        let data = Daemon::bound_beside(&socket_dir.join("vm1-data.sock"), daemon.pid());
        wait_until(TIMEOUT, "vubd listening for the data disk", || {
            socket_listening(&data)
        });
        Self {
            daemon,
            socket_dir: socket_dir.to_owned(),
            images: images.to_owned(),
        }
    }

    /// The socket of disk `name`, where QEMU connects.
    fn socket(&self, name: &str) -> PathBuf {
        self.socket_dir.join(format!("{name}.sock"))
    }

    /// Whether QEMU is connected to disk `name` (its socket as this vubd bound it).
    fn connected(&self, name: &str) -> bool {
        socket_connected(&Daemon::bound_beside(&self.socket(name), self.daemon.pid()))
    }

    /// Kills vubd as a crash would and starts it again with the same arguments.
    fn kill_and_restart(&mut self) {
        self.daemon.kill();
        *self = Self::start(&self.socket_dir, &self.images);
    }

    /// The counters of device `name` (`device_get_stats`).
    fn stats(&self, name: &str) -> Value {
        let v = jsonrpc::Client::connect(&self.socket_dir.join("control.sock"), TIMEOUT)
            .expect("vubd's control socket")
            .call("device_get_stats", json!({ "name": name }))
            .unwrap_or_else(|e| panic!("device_get_stats {name}: {e}"));
        v["devices"][0].clone()
    }
}

/// The running domain: its console, and its QEMU found by the test's directory in its command
/// line.
struct Vm<'a> {
    libvirtd: &'a Libvirtd,
    console: PathBuf,
    marker: String,
}

impl Vm<'_> {
    fn console(&self) -> String {
        let bytes = fs::read(&self.console).unwrap_or_default();
        String::from_utf8_lossy(&bytes).replace('\r', "")
    }

    /// Waits up to `limit` for a console line containing `text` and returns it from `text` on;
    /// fails the test if QEMU ends or the time runs out first.
    #[track_caller]
    fn wait_line(&self, text: &str, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(line) = lines_with(&self.console(), text).next() {
                return line.to_owned();
            }
            assert!(
                qemu_with(&self.marker).is_some(),
                "QEMU ended before the guest printed {text:?}"
            );
            assert!(
                Instant::now() < deadline,
                "no console line with {text:?} within {limit:?}"
            );
            thread::sleep(Duration::from_millis(200));
        }
    }

    #[track_caller]
    fn virsh(&self, args: &[&str]) -> String {
        self.libvirtd.virsh_ok(args, VIRSH_LIMIT)
    }
}

impl Drop for Vm<'_> {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!(
                "---- console ----\n{}---- end of console ----",
                self.console()
            );
        }
    }
}

/// Polls `done` every 100 ms until it holds; fails the test after `limit`.
#[track_caller]
fn wait_until(limit: Duration, what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
        thread::sleep(Duration::from_millis(100));
    }
}

/// `file` (relative to the repository) with its host paths moved to the test's directories.
fn lab_xml(file: &str, socket_dir: &Path, lab: &Path) -> String {
    let xml = fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(file))
        .unwrap_or_else(|e| panic!("read {file}: {e}"));
    xml.replace(SOCKET_DIR, &format!("{}/", socket_dir.display()))
        .replace(LAB_DIR, &format!("{}/", lab.display()))
}

/// A directory others may enter (QEMU runs as `libvirt-qemu`), as `/run/vubd` is.
fn open_dir(path: &Path) -> PathBuf {
    fs::create_dir_all(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    fs::set_permissions(path, fs::Permissions::from_mode(0o755))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", path.display()));
    path.to_owned()
}

/// The SHA-256 of `len` bytes of `image` from `offset`, in hex.
fn image_sha256(image: &Path, offset: u64, len: u64) -> String {
    let data = common::lab::read_at(image, offset, usize::try_from(len).expect("fits usize"));
    Sha256::digest(&data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[test]
fn a_libvirt_domain_boots_on_vubd_survives_its_restart_and_takes_a_disk_live() {
    let dir = test_dir();
    let top = open_dir(dir.path());
    let socket_dir = open_dir(&top.join("run-vubd"));
    let lab = open_dir(&top.join("lab"));
    // Only vubd opens the images.
    let images = top.join("images");
    fs::create_dir(&images).expect("create the images' directory");
    fs::set_permissions(&images, fs::Permissions::from_mode(0o700)).expect("chmod the images'");
    let root_image = image_file(&images, "vm1-root.img", IMAGE_BYTES);
    let data_image = image_file(&images, "vm1-data.img", IMAGE_BYTES);

    let initrd = build_initramfs(&lab, "libvirt", &[]);
    fs::rename(&initrd, lab.join("initramfs.cpio.gz")).expect("name the initramfs");
    fs::copy(kernel_image(&lab), lab.join("vmlinuz")).expect("copy the kernel");
    let domain_xml = top.join("vm1.xml");
    fs::write(&domain_xml, lab_xml(DOMAIN_XML, &socket_dir, &lab)).expect("write vm1.xml");
    let data_xml = top.join("vm1-data.xml");
    fs::write(&data_xml, lab_xml(DATA_DISK_XML, &socket_dir, &lab)).expect("write vm1-data.xml");

    let mut vubd = Vubd::start(&socket_dir, &images);
    let libvirtd = Libvirtd::start(&top.join("libvirt"));
    let vm = Vm {
        libvirtd: &libvirtd,
        console: lab.join("vm1-console.log"),
        marker: lab.display().to_string(),
    };
    let started = Instant::now();
    vm.virsh(&["define", &domain_xml.display().to_string()]);
    vm.virsh(&["start", DOMAIN]);

    // QEMU runs as libvirt-qemu and reaches vubd through the socket's group.
    let qemu = qemu_with(&vm.marker).expect("a QEMU running the domain");
    assert_eq!(qemu.uid, user_id("libvirt-qemu"), "QEMU's user");
    let socket = fs::metadata(vubd.socket("vm1-root")).expect("stat the root disk's socket");
    assert_eq!(
        socket.uid(),
        0,
        "libvirt changed the root disk socket's owner"
    );
    assert_eq!(socket.mode() & 0o777, 0o660, "the root disk socket's mode");
    assert_eq!(
        socket.gid(),
        qemu.gid,
        "the root disk socket's group is QEMU's"
    );

    // 1. Boot, and I/O on the root disk.
    vm.wait_line("libvirt: CONTROL-READY", BOOT_LIMIT);
    let mut control = UnixStream::connect(lab.join("vm1-control.sock"))
        .unwrap_or_else(|e| panic!("connect to the guest's control port: {e}"));
    let mut tell = |word: &str| {
        writeln!(control, "{word}").unwrap_or_else(|e| panic!("tell the guest {word:?}: {e}"));
    };
    let disk = fields(&vm.wait_line("libvirt: DISK ", BOOT_LIMIT)["libvirt: DISK ".len()..]);
    assert_eq!(
        disk["bytes"],
        IMAGE_BYTES.to_string(),
        "the root disk's size"
    );
    assert_eq!(disk["hw_queues"], "2", "the root disk's queues");
    vm.wait_line("libvirt: WAITING for=attached", STEP_LIMIT);
    eprintln!(
        "libvirt lab: booted and wrote in {:.0} s",
        started.elapsed().as_secs_f64()
    );

    // 2. vubd killed and started again; QEMU reconnects; the data disk comes.
    assert!(vubd.connected("vm1-root"), "QEMU is not connected to vubd");
    vubd.kill_and_restart();
    wait_until(
        RECONNECT_LIMIT,
        "QEMU's reconnection to the new vubd",
        || vubd.connected("vm1-root"),
    );
    vm.virsh(&[
        "attach-device",
        DOMAIN,
        &data_xml.display().to_string(),
        "--live",
    ]);
    tell("attached");
    vm.wait_line("libvirt: REREAD disk=root step=boot", STEP_LIMIT);
    vm.wait_line("libvirt: WAITING for=detach", STEP_LIMIT);
    assert!(
        vubd.connected("vm1-data"),
        "QEMU is not connected to the data disk"
    );

    // 3. The data disk goes.
    vm.virsh(&[
        "detach-device",
        DOMAIN,
        &data_xml.display().to_string(),
        "--live",
    ]);
    vm.wait_line("libvirt: DETACHED", STEP_LIMIT);
    wait_until(STEP_LIMIT, "libvirt dropping vdb from the domain", || {
        !vm.virsh(&["domblklist", DOMAIN]).contains("vdb")
    });
    wait_until(STEP_LIMIT, "QEMU leaving the data disk's socket", || {
        !vubd.connected("vm1-data")
    });
    tell("finish");

    // The guest's last step, then it powers off.
    let result = vm.wait_line("GUEST-RESULT:", STEP_LIMIT);
    assert_eq!(result, "GUEST-RESULT: PASS");
    wait_until(STEP_LIMIT, "QEMU's end after the guest's power-off", || {
        qemu_with(&vm.marker).is_none()
    });
    assert_eq!(vm.virsh(&["domstate", DOMAIN]).trim(), "shut off");
    eprintln!(
        "libvirt lab: done in {:.0} s",
        started.elapsed().as_secs_f64()
    );

    // libvirt has no block statistics for a vhostuser disk; vubd counts the guest's writes
    // since the restart, every one of them.
    let blkinfo = libvirtd.virsh(&["domblkinfo", DOMAIN, "vda"], VIRSH_LIMIT);
    assert!(
        blkinfo.as_ref().is_err_and(|e| e.contains("vhostuser")),
        "domblkinfo on a vhostuser disk: {blkinfo:?}"
    );
    for (name, written) in [
        ("vm1-root", ROOT_WRITTEN_AFTER_RESTART),
        ("vm1-data", DATA_WRITTEN),
    ] {
        let stats = vubd.stats(name);
        assert_eq!(stats["written_bytes"], json!(written), "{name}: {stats}");
        assert!(
            stats["read_ops"].as_u64().is_some_and(|n| n > 0),
            "{name}: {stats}"
        );
    }

    // The images hold what the guest wrote.
    let console = vm.console();
    let verified: Vec<_> = lines_with(&console, "libvirt: VERIFIED ").collect();
    assert_eq!(verified.len(), 4, "the guest's VERIFIED lines");
    for line in verified {
        let f = fields(&line["libvirt: VERIFIED ".len()..]);
        let image = if f["disk"] == "root" {
            &root_image
        } else {
            &data_image
        };
        let (offset, len) = (f["offset"].parse().unwrap(), f["bytes"].parse().unwrap());
        assert_eq!(
            image_sha256(image, offset, len),
            f["sha256"],
            "{} at {offset}, written at step {}",
            image.display(),
            f["step"]
        );
    }
    assert!(
        vubd.daemon.terminate().success(),
        "vubd's exit:\n{}",
        vubd.daemon.output()
    );
}

/// Whether `block`'s lines, each trimmed, follow one another in `file`'s, each trimmed.
fn quotes(file: &str, block: &str) -> bool {
    let file: Vec<&str> = file.lines().map(str::trim).collect();
    let block: Vec<&str> = block.lines().map(str::trim).collect();
    !block.is_empty() && file.windows(block.len()).any(|w| w == block.as_slice())
}

/// The XML a Markdown text shows: its ```xml blocks, and the XML strings (`"""` to `"""`,
/// starting with `<`) of its other code blocks, such as a hook script's.
fn xml_blocks(markdown: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    // The kind of block the line is in, and the XML gathered so far.
    let mut fence: Option<&str> = None;
    let mut current: Option<String> = None;
    for line in markdown.lines() {
        let trimmed = line.trim();
        match fence {
            None => fence = trimmed.strip_prefix("```"),
            Some(_) if trimmed == "```" => {
                blocks.extend(current.take());
                fence = None;
            }
            Some("xml") => current
                .get_or_insert_default()
                .push_str(&format!("{line}\n")),
            Some(_)
                if trimmed.ends_with(r#"""""#)
                    && !trimmed.starts_with(r#"""""#)
                    && current.is_none() =>
            {
                current = Some(String::new());
            }
            Some(_) if trimmed.starts_with(r#"""""#) => blocks.extend(current.take()),
            Some(_) => {
                if let Some(block) = &mut current {
                    block.push_str(&format!("{line}\n"));
                }
            }
        }
    }
    blocks.retain(|b| b.trim_start().starts_with('<'));
    blocks
}

#[test]
fn the_docs_show_the_xml_the_libvirt_lab_runs() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let read =
        |f: &str| fs::read_to_string(repo.join(f)).unwrap_or_else(|e| panic!("read {f}: {e}"));
    let files = [read(DOMAIN_XML), read(DATA_DISK_XML)];
    for doc in DOCS {
        let blocks = xml_blocks(&read(doc));
        assert!(!blocks.is_empty(), "{doc} shows no XML");
        for block in blocks {
            assert!(
                files.iter().any(|f| quotes(f, &block)),
                "{doc} shows XML that neither {DOMAIN_XML} nor {DATA_DISK_XML} holds (the \
                 libvirt lab runs those):\n{block}"
            );
        }
    }
}
