//! [`WriteThrottle`]: a cgroup whose processes may write to one block device only so many
//! times a second (`blkio.throttle.write_iops_device` with cgroup v1, `io.max wiops=` with
//! cgroup v2), reads unlimited. A backend in it holds its writes at the host while the reads
//! submitted after them complete: its requests complete out of order, as on a busy volume
//! with an IOPS limit, even when its frontend submits them slowly.
//!
//! Needs root and the kernel's I/O throttling; a test that cannot have it fails and says why.

use std::ffi::CString;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use super::loopdev::{cleanup_failed, retry_until_timeout};

/// Which cgroup interface throttles.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Version {
    V1,
    V2,
}

/// A cgroup that throttles its members' writes to one block device; removed on drop (once its
/// members are gone).
#[derive(Debug)]
pub struct WriteThrottle {
    dir: PathBuf,
    /// `dir/cgroup.procs`, for the child processes to join through.
    procs: CString,
    version: Version,
    /// `MAJOR:MINOR` of the throttled disk.
    device: String,
}

impl WriteThrottle {
    /// A cgroup whose members write at most `iops` times a second to the disk that holds
    /// `file` (the whole disk, for a file on a partition).
    pub fn for_file(file: &Path, iops: u32) -> Result<Self, String> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let device = disk_of(file)?;
        let (root, version) = hierarchy()?;
        let name = format!(
            "vubd-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let dir = root.join(name);
        if version == Version::V2 {
            // The root cgroup hands the io controller down (it may already).
            let _ = fs::write(root.join("cgroup.subtree_control"), "+io");
        }
        fs::create_dir(&dir).map_err(|e| format!("create cgroup {}: {e}", dir.display()))?;
        let procs = CString::new(dir.join("cgroup.procs").as_os_str().as_bytes())
            .map_err(|e| format!("cgroup path {}: {e}", dir.display()))?;
        let throttle = Self {
            dir,
            procs,
            version,
            device,
        };
        let (file, value) = match version {
            Version::V1 => (
                "blkio.throttle.write_iops_device",
                format!("{} {iops}", throttle.device),
            ),
            Version::V2 => ("io.max", format!("{} wiops={iops}", throttle.device)),
        };
        let path = throttle.dir.join(file);
        fs::write(&path, &value)
            .map_err(|e| format!("write {value:?} to {}: {e}", path.display()))?;
        Ok(throttle)
    }

    /// The throttled disk, `MAJOR:MINOR`.
    pub fn device(&self) -> &str {
        &self.device
    }

    /// Makes the process `cmd` starts join the cgroup before it runs anything.
    pub fn add(&self, cmd: &mut Command) {
        let procs = self.procs.clone();
        // SAFETY: the hook runs in the child between fork and exec, where only
        // async-signal-safe calls are allowed: open, write and close on a path built before the
        // fork (moved into the closure); it neither allocates nor takes a lock. Writing 0 to
        // cgroup.procs moves the writing process.
        unsafe {
            cmd.pre_exec(move || {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return Err(io::Error::last_os_error());
                }
                let written = libc::write(fd, c"0".as_ptr().cast(), 1);
                let err = io::Error::last_os_error();
                libc::close(fd);
                if written == 1 { Ok(()) } else { Err(err) }
            });
        }
    }

    /// Writes the cgroup's members have made to the throttled disk so far.
    pub fn writes(&self) -> Result<u64, String> {
        let (file, wanted) = match self.version {
            Version::V1 => ("blkio.throttle.io_serviced", "Write"),
            Version::V2 => ("io.stat", "wios"),
        };
        let path = self.dir.join(file);
        let text =
            fs::read_to_string(&path).map_err(|e| format!("read {}: {e}", path.display()))?;
        // v1: "MAJ:MIN Write N" lines; v2: "MAJ:MIN rbytes=.. wbytes=.. rios=.. wios=N ...".
        let count = text
            .lines()
            .filter(|l| l.starts_with(&format!("{} ", self.device)))
            .flat_map(|l| {
                let words: Vec<&str> = l.split_whitespace().collect();
                let v1 = words
                    .windows(2)
                    .filter(|w| w[0] == wanted)
                    .map(|w| w[1].to_owned())
                    .collect::<Vec<_>>();
                let v2 = words
                    .iter()
                    .filter_map(|w| w.strip_prefix(&format!("{wanted}=")).map(str::to_owned))
                    .collect::<Vec<_>>();
                v1.into_iter().chain(v2)
            })
            .filter_map(|n| n.parse::<u64>().ok())
            .sum();
        Ok(count)
    }
}

impl Drop for WriteThrottle {
    fn drop(&mut self) {
        // A cgroup goes only once its last member has exited and been reaped.
        if let Err(e) = retry_until_timeout(|| {
            fs::remove_dir(&self.dir).map_err(|e| format!("remove {}: {e}", self.dir.display()))
        }) {
            cleanup_failed(&e);
        }
    }
}

/// `MAJOR:MINOR` of the whole disk that holds `file`.
fn disk_of(file: &Path) -> Result<String, String> {
    let meta = fs::metadata(file).map_err(|e| format!("{}: {e}", file.display()))?;
    let (major, minor) = (libc::major(meta.dev()), libc::minor(meta.dev()));
    let sys = PathBuf::from(format!("/sys/dev/block/{major}:{minor}"));
    let sys = fs::canonicalize(&sys).map_err(|e| {
        format!(
            "{} is on a file system without a block device ({major}:{minor}: {e}), whose writes \
             cannot be throttled; give the test a TMPDIR on a disk file system",
            file.display()
        )
    })?;
    let whole = if sys.join("partition").exists() {
        sys.parent().map(Path::to_path_buf).unwrap_or_default()
    } else {
        sys
    };
    let dev = whole.join("dev");
    fs::read_to_string(&dev)
        .map(|s| s.trim().to_owned())
        .map_err(|e| format!("read {}: {e}", dev.display()))
}

/// The cgroup hierarchy that throttles block I/O: a v1 hierarchy with the blkio controller, else
/// the v2 one if it has the io controller.
fn hierarchy() -> Result<(PathBuf, Version), String> {
    let info = fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| format!("read /proc/self/mountinfo: {e}"))?;
    let mut v2 = None;
    for line in info.lines() {
        // ID PARENT MAJ:MIN ROOT MOUNT_POINT OPTIONS [OPTIONAL...] - TYPE SOURCE SUPER_OPTIONS
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let Some(mount_point) = left.split_whitespace().nth(4) else {
            continue;
        };
        let right: Vec<&str> = right.split_whitespace().collect();
        match right.as_slice() {
            ["cgroup", _, opts, ..] if opts.split(',').any(|o| o == "blkio") => {
                return Ok((PathBuf::from(mount_point), Version::V1));
            }
            ["cgroup2", ..] => v2 = Some(PathBuf::from(mount_point)),
            _ => {}
        }
    }
    let root = v2.ok_or("no cgroup hierarchy with the blkio or io controller is mounted")?;
    let controllers = fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default();
    if controllers.split_whitespace().any(|c| c == "io") {
        Ok((root, Version::V2))
    } else {
        Err(format!(
            "the cgroup v2 hierarchy at {} has no io controller ({controllers:?}) and no v1 \
             hierarchy has blkio",
            root.display()
        ))
    }
}
