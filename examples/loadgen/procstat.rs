//! CPU time of a process and of each of its threads, from `/proc/PID/stat` and
//! `/proc/PID/task/TID/stat` (utime + stime, in clock ticks).

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::Path;

/// One sample of a process: its total and each live thread's CPU ticks, and the machine's
/// busy ticks at about the same time.
#[derive(Clone, Debug, Default)]
pub struct Sample {
    pub total_ticks: u64,
    pub machine_ticks: u64,
    /// tid → (name, ticks)
    pub threads: BTreeMap<u32, (String, u64)>,
}

/// A thread's CPU time over an interval.
#[derive(Clone, Debug)]
pub struct ThreadCpu {
    pub tid: u32,
    pub name: String,
    pub secs: f64,
}

/// utime + stime of one `stat` file. The command name (field 2) may contain spaces and
/// parentheses, so fields are counted after its last `)`.
fn stat_ticks(path: &Path) -> io::Result<u64> {
    let text = fs::read_to_string(path)?;
    let bad = || io::Error::new(io::ErrorKind::InvalidData, format!("{}", path.display()));
    let rest = &text[text.rfind(')').ok_or_else(bad)? + 1..];
    // After the name: state is field 3, utime field 14, stime field 15.
    let mut fields = rest.split_ascii_whitespace().skip(11);
    let mut next =
        || -> io::Result<u64> { fields.next().and_then(|f| f.parse().ok()).ok_or_else(bad) };
    Ok(next()? + next()?)
}

pub fn sample(pid: u32) -> io::Result<Sample> {
    let dir = format!("/proc/{pid}");
    let total_ticks = stat_ticks(Path::new(&format!("{dir}/stat")))?;
    let mut threads = BTreeMap::new();
    for entry in fs::read_dir(format!("{dir}/task"))? {
        let entry = entry?;
        let Some(tid) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
            continue;
        };
        // A thread may exit between the listing and the read: skip it.
        let Ok(ticks) = stat_ticks(&entry.path().join("stat")) else {
            continue;
        };
        let name = fs::read_to_string(entry.path().join("comm"))
            .map(|s| s.trim_end().to_owned())
            .unwrap_or_default();
        threads.insert(tid, (name, ticks));
    }
    Ok(Sample {
        total_ticks,
        machine_ticks: machine_busy_ticks()?,
        threads,
    })
}

/// The command name of a process (`/proc/PID/comm`), empty if it cannot be read.
pub fn comm(pid: u32) -> String {
    fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|s| s.trim_end().to_owned())
        .unwrap_or_default()
}

/// Clock ticks per second (`_SC_CLK_TCK`).
pub fn ticks_per_sec() -> f64 {
    // SAFETY: sysconf only reads a configuration value.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// CPU seconds between two samples.
#[derive(Clone, Debug)]
pub struct Delta {
    /// The process.
    pub total: f64,
    /// Each thread alive at the end (one started in between counts from zero; one that exited
    /// in between is lost).
    pub threads: Vec<ThreadCpu>,
    /// The whole machine.
    pub machine: f64,
}

pub fn delta(before: &Sample, after: &Sample) -> Delta {
    let hz = ticks_per_sec();
    let secs = |a: u64, b: u64| b.saturating_sub(a) as f64 / hz;
    let total = secs(before.total_ticks, after.total_ticks);
    let machine = secs(before.machine_ticks, after.machine_ticks);
    let threads = after
        .threads
        .iter()
        .map(|(&tid, (name, ticks))| {
            let start = before.threads.get(&tid).map_or(0, |(_, t)| *t);
            ThreadCpu {
                tid,
                name: name.clone(),
                secs: ticks.saturating_sub(start) as f64 / hz,
            }
        })
        .collect();
    Delta {
        total,
        threads,
        machine,
    }
}

/// Busy clock ticks of the whole machine (every CPU, from the `cpu` line of `/proc/stat`):
/// everything but idle and iowait.
pub fn machine_busy_ticks() -> io::Result<u64> {
    let text = fs::read_to_string("/proc/stat")?;
    let line = text
        .lines()
        .find(|l| l.starts_with("cpu "))
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "/proc/stat"))?;
    // user nice system idle iowait irq softirq steal (guest time is included in user).
    let f: Vec<u64> = line
        .split_ascii_whitespace()
        .skip(1)
        .take(8)
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    Ok(f.iter().sum::<u64>() - f.get(3).copied().unwrap_or(0) - f.get(4).copied().unwrap_or(0))
}
