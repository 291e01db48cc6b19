//! What `/proc` says about a running backend: the CPU time it has used (all threads together,
//! or thread by thread), the CPUs each of its threads may run on, and the seccomp filters each
//! runs under.

use std::fs;
use std::time::Duration;

/// CPU time a process has used so far, all its threads together, dead ones included: `utime +
/// stime` of `/proc/PID/stat`. Its resolution is one clock tick (10 ms with the usual
/// `USER_HZ` of 100).
pub fn cpu_time(pid: u32) -> Duration {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))
        .unwrap_or_else(|e| panic!("read /proc/{pid}/stat: {e}"));
    stat_cpu_time(&stat).unwrap_or_else(|| panic!("unexpected /proc/{pid}/stat: {stat}"))
}

/// Each live thread of a process: its name and the CPU time it has used, busiest first. For
/// failure messages: which thread burnt the time.
pub fn thread_cpu_times(pid: u32) -> Vec<(String, Duration)> {
    let mut threads: Vec<(String, Duration)> = tasks(pid)
        .into_iter()
        .filter_map(|tid| {
            // A thread may end between the listing and the read: leave it out.
            let stat = fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")).ok()?;
            let name = stat.split_once(" (")?.1.rsplit_once(')')?.0.to_owned();
            Some((name, stat_cpu_time(&stat)?))
        })
        .collect();
    threads.sort_by_key(|&(_, time)| std::cmp::Reverse(time));
    threads
}

/// Each live thread of a process: its name and the CPUs it may run on
/// (`Cpus_allowed_list` of `/proc/PID/task/TID/status`).
pub fn thread_affinities(pid: u32) -> Vec<(String, Vec<usize>)> {
    thread_statuses(pid, |status| {
        let name = field(status, "Name:")?.to_owned();
        Some((name, parse_cpu_list(field(status, "Cpus_allowed_list:")?)?))
    })
}

/// A thread's seccomp state: `Seccomp:` (0 none, 2 filters) and `Seccomp_filters:` (how many
/// are stacked) of `/proc/PID/task/TID/status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThreadSeccomp {
    pub name: String,
    pub mode: u32,
    pub filters: u32,
}

/// Each live thread of a process and its seccomp state.
pub fn thread_seccomp(pid: u32) -> Vec<ThreadSeccomp> {
    thread_statuses(pid, |status| {
        Some(ThreadSeccomp {
            name: field(status, "Name:")?.to_owned(),
            mode: field(status, "Seccomp:")?.parse().ok()?,
            filters: field(status, "Seccomp_filters:")?.parse().ok()?,
        })
    })
}

/// `read` of each live thread's `/proc/PID/task/TID/status`; a thread that ends meanwhile, or
/// whose status `read` finds nothing in, is left out.
fn thread_statuses<T>(pid: u32, read: impl Fn(&str) -> Option<T>) -> Vec<T> {
    tasks(pid)
        .into_iter()
        .filter_map(|tid| read(&fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")).ok()?))
        .collect()
}

/// The value of the `key` line (`"Name:"`) of a `status` file.
fn field<'a>(status: &'a str, key: &str) -> Option<&'a str> {
    status
        .lines()
        .find_map(|line| line.strip_prefix(key))
        .map(str::trim)
}

/// The CPUs this test process may run on.
pub fn own_cpus() -> Vec<usize> {
    let status = fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    field(&status, "Cpus_allowed_list:")
        .and_then(parse_cpu_list)
        .unwrap_or_else(|| panic!("no Cpus_allowed_list in /proc/self/status:\n{status}"))
}

/// The thread ids of a process.
fn tasks(pid: u32) -> Vec<String> {
    fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap_or_else(|e| panic!("list /proc/{pid}/task: {e}"))
        .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
        .collect()
}

/// `utime + stime` of a `stat` line. The name field may hold spaces and parentheses, so the
/// fields are counted from its closing parenthesis: state is the first after it, utime the
/// 12th, stime the 13th (fields 3, 14 and 15 of proc(5)).
fn stat_cpu_time(stat: &str) -> Option<Duration> {
    let mut fields = stat.rsplit_once(')')?.1.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(ticks(utime + stime))
}

fn ticks(n: u64) -> Duration {
    // SAFETY: sysconf(3) only reads a system constant; it has no memory-safety preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = u64::try_from(hz)
        .ok()
        .filter(|&hz| hz > 0)
        .expect("sysconf(_SC_CLK_TCK) is positive");
    Duration::from_nanos(n.saturating_mul(1_000_000_000) / hz)
}

/// `0-1,4`, as the kernel prints CPU lists.
pub fn parse_cpu_list(list: &str) -> Option<Vec<usize>> {
    let mut cpus = Vec::new();
    for part in list.split(',').filter(|part| !part.is_empty()) {
        let (lo, hi): (usize, usize) = match part.split_once('-') {
            Some((lo, hi)) => (lo.parse().ok()?, hi.parse().ok()?),
            None => {
                let cpu = part.parse().ok()?;
                (cpu, cpu)
            }
        };
        cpus.extend(lo..=hi);
    }
    Some(cpus)
}
