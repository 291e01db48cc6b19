//! Devices' metrics in the Prometheus text exposition format, version 0.0.4: a family of
//! samples per counter, named `vubd_device_*` (labelled by device) and `vubd_queue_*`
//! (labelled by device and queue), with the unit and `_total` suffixes of Prometheus's naming
//! conventions. The latency histogram is exported per device only: per queue it would be
//! [`BUCKETS`] more series for every queue of every device, and the queues' latencies are in
//! the control socket's `device_get_stats`.

use std::fmt::Write;

use super::{BUCKETS, Counters, DeviceStats, ErrorKind, Op, upper_bound_ns};

/// The `Content-Type` of what [`render`] writes.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The metrics of `devices` (name and reading, in the order given) as Prometheus text.
pub fn render(devices: &[(String, DeviceStats)]) -> String {
    let mut out = String::new();
    for scope in [Scope::Device, Scope::Queue] {
        for op in Op::ALL {
            let name = format!("vubd_{}_{}_ops_total", scope.name(), op.name());
            let help = format!(
                "{} requests started: completed (failed ones included) or in flight.",
                op_help(op)
            );
            counter_family(&mut out, devices, scope, (&name, "counter", &help), |c| {
                c.ops_of(op)
            });
        }
        let read = format!("vubd_{}_read_bytes_total", scope.name());
        counter_family(
            &mut out,
            devices,
            scope,
            (&read, "counter", "Bytes read by the reads that succeeded."),
            |c| c.read_bytes,
        );
        let written = format!("vubd_{}_written_bytes_total", scope.name());
        counter_family(
            &mut out,
            devices,
            scope,
            (
                &written,
                "counter",
                "Bytes written by the writes that succeeded.",
            ),
            |c| c.written_bytes,
        );
        errors_family(&mut out, devices, scope);
        let in_flight = format!("vubd_{}_in_flight_requests", scope.name());
        counter_family(
            &mut out,
            devices,
            scope,
            (
                &in_flight,
                "gauge",
                "Requests started and not yet completed.",
            ),
            |c| c.in_flight,
        );
        let throttled = format!("vubd_{}_throttled_seconds_total", scope.name());
        counter_family(
            &mut out,
            devices,
            scope,
            (
                &throttled,
                "counter",
                "Time requests waited in the virtqueue because the device was over a rate limit.",
            ),
            |c| seconds(c.throttled_ns),
        );
        if scope == Scope::Device {
            latency_family(&mut out, devices);
        }
    }
    out
}

/// Whether a family has a sample per device or per queue.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Scope {
    Device,
    Queue,
}

impl Scope {
    fn name(self) -> &'static str {
        match self {
            Scope::Device => "device",
            Scope::Queue => "queue",
        }
    }
}

fn op_help(op: Op) -> &'static str {
    match op {
        Op::Read => "Read",
        Op::Write => "Write",
        Op::Flush => "Flush",
        Op::Discard => "Discard",
        Op::WriteZeroes => "Write-zeroes",
        Op::Other => "GET_ID",
    }
}

/// The lines that open a family of samples: its help and its type.
fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// The counters of each device (or each queue of each device) and the labels that name them.
fn each(
    devices: &[(String, DeviceStats)],
    scope: Scope,
) -> impl Iterator<Item = (String, &Counters)> {
    devices.iter().flat_map(move |(name, stats)| {
        let device = format!("device=\"{}\"", escape(name));
        let all: Vec<(String, &Counters)> = match scope {
            Scope::Device => vec![(device, &stats.total)],
            Scope::Queue => stats
                .queues
                .iter()
                .map(|(q, c)| (format!("{device},queue=\"{q}\""), c))
                .collect(),
        };
        all
    })
}

fn counter_family<V: std::fmt::Display>(
    out: &mut String,
    devices: &[(String, DeviceStats)],
    scope: Scope,
    (name, kind, help): (&str, &'static str, &str),
    value: impl Fn(&Counters) -> V,
) {
    header(out, name, kind, help);
    for (labels, c) in each(devices, scope) {
        let _ = writeln!(out, "{name}{{{labels}}} {}", value(c));
    }
}

fn errors_family(out: &mut String, devices: &[(String, DeviceStats)], scope: Scope) {
    let name = format!("vubd_{}_errors_total", scope.name());
    header(
        out,
        &name,
        "counter",
        "Requests that failed: io (the disk failed them), unsupported (refused with UNSUPP), \
         invalid (refused with IOERR before reaching the disk).",
    );
    for (labels, c) in each(devices, scope) {
        for kind in ErrorKind::ALL {
            let _ = writeln!(
                out,
                "{name}{{{labels},kind=\"{}\"}} {}",
                kind.name(),
                c.errors_of(kind)
            );
        }
    }
}

fn latency_family(out: &mut String, devices: &[(String, DeviceStats)]) {
    let name = "vubd_device_latency_seconds";
    header(
        out,
        name,
        "histogram",
        "Time from the poller pass that took a request from the ring to the pass that saw it \
         complete.",
    );
    for (labels, c) in each(devices, Scope::Device) {
        let mut below = 0u64;
        for i in 0..BUCKETS {
            below += c.latency.counts[i];
            let le = match upper_bound_ns(i) {
                Some(ns) => seconds(ns),
                None => "+Inf".to_owned(),
            };
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{le}\"}} {below}");
        }
        let _ = writeln!(out, "{name}_sum{{{labels}}} {}", seconds(c.latency.sum_ns));
        let _ = writeln!(out, "{name}_count{{{labels}}} {below}");
    }
}

/// Nanoseconds as seconds, in the shortest decimal that reads back as the same number.
fn seconds(ns: u64) -> String {
    (ns as f64 / 1e9).to_string()
}

/// A label value as the text format writes it: backslash, double quote and line feed
/// escaped.
fn escape(value: &str) -> String {
    let mut s = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::Clock;
    use crate::metrics::{DeviceMetrics, bucket};

    #[test]
    fn one_device_of_one_queue_reads_as_the_text_format_says() {
        let clock = Clock::monotonic();
        let m = DeviceMetrics::new(1);
        let q = m.queue(0).expect("queue 0");
        q.started(Op::Read);
        q.completed(true, (true, 4096), 1200, &clock);
        q.started(Op::Write);
        q.completed(true, (false, 512), 2_500_000_000, &clock);
        q.refused(ErrorKind::Invalid);
        q.started(Op::Flush);
        q.throttled(250_000_000);
        let text = render(&[("a\"b".to_owned(), m.read(&clock))]);
        let mut want = String::new();
        for scope in ["device", "queue"] {
            let labels = if scope == "device" {
                "device=\"a\\\"b\""
            } else {
                "device=\"a\\\"b\",queue=\"0\""
            };
            for (op, help, n) in [
                ("read", "Read", 1),
                ("write", "Write", 1),
                ("flush", "Flush", 1),
                ("discard", "Discard", 0),
                ("write_zeroes", "Write-zeroes", 0),
                ("other", "GET_ID", 0),
            ] {
                want += &format!(
                    "# HELP vubd_{scope}_{op}_ops_total {help} requests started: completed \
                     (failed ones included) or in flight.\n# TYPE vubd_{scope}_{op}_ops_total counter\n\
                     vubd_{scope}_{op}_ops_total{{{labels}}} {n}\n"
                );
            }
            want += &format!(
                "# HELP vubd_{scope}_read_bytes_total Bytes read by the reads that succeeded.\n\
                 # TYPE vubd_{scope}_read_bytes_total counter\n\
                 vubd_{scope}_read_bytes_total{{{labels}}} 4096\n\
                 # HELP vubd_{scope}_written_bytes_total Bytes written by the writes that \
                 succeeded.\n\
                 # TYPE vubd_{scope}_written_bytes_total counter\n\
                 vubd_{scope}_written_bytes_total{{{labels}}} 512\n\
                 # HELP vubd_{scope}_errors_total Requests that failed: io (the disk failed \
                 them), unsupported (refused with UNSUPP), invalid (refused with IOERR before \
                 reaching the disk).\n\
                 # TYPE vubd_{scope}_errors_total counter\n\
                 vubd_{scope}_errors_total{{{labels},kind=\"io\"}} 0\n\
                 vubd_{scope}_errors_total{{{labels},kind=\"unsupported\"}} 0\n\
                 vubd_{scope}_errors_total{{{labels},kind=\"invalid\"}} 1\n\
                 # HELP vubd_{scope}_in_flight_requests Requests started and not yet \
                 completed.\n\
                 # TYPE vubd_{scope}_in_flight_requests gauge\n\
                 vubd_{scope}_in_flight_requests{{{labels}}} 1\n\
                 # HELP vubd_{scope}_throttled_seconds_total Time requests waited in the \
                 virtqueue because the device was over a rate limit.\n\
                 # TYPE vubd_{scope}_throttled_seconds_total counter\n\
                 vubd_{scope}_throttled_seconds_total{{{labels}}} 0.25\n"
            );
            if scope == "queue" {
                break;
            }
            want += "# HELP vubd_device_latency_seconds Time from the poller pass that took a \
                     request from the ring to the pass that saw it complete.\n\
                     # TYPE vubd_device_latency_seconds histogram\n";
            for i in 0..BUCKETS {
                let le =
                    upper_bound_ns(i).map_or("+Inf".to_owned(), |ns| (ns as f64 / 1e9).to_string());
                // In quarter microseconds.
                let n = u32::from(i >= bucket(4)) + u32::from(i >= bucket(10_000_000));
                want +=
                    &format!("vubd_device_latency_seconds_bucket{{{labels},le=\"{le}\"}} {n}\n");
            }
            want += &format!(
                "vubd_device_latency_seconds_sum{{{labels}}} 2.5000012\n\
                 vubd_device_latency_seconds_count{{{labels}}} 2\n"
            );
        }
        assert_eq!(text, want);
        // A few lines as a scraper reads them.
        for line in [
            "vubd_device_latency_seconds_bucket{device=\"a\\\"b\",le=\"0.000001\"} 0",
            "vubd_device_latency_seconds_bucket{device=\"a\\\"b\",le=\"0.00000125\"} 1",
            "vubd_device_latency_seconds_bucket{device=\"a\\\"b\",le=\"2.097152\"} 1",
            "vubd_device_latency_seconds_bucket{device=\"a\\\"b\",le=\"2.62144\"} 2",
            "vubd_device_latency_seconds_bucket{device=\"a\\\"b\",le=\"+Inf\"} 2",
        ] {
            assert!(text.lines().any(|l| l == line), "no line {line}");
        }
    }

    #[test]
    fn queues_never_started_have_no_series() {
        let clock = Clock::monotonic();
        let m = DeviceMetrics::new(64);
        m.queue(3).expect("queue 3").started(Op::Read);
        let text = render(&[("d".to_owned(), m.read(&clock))]);
        let queue_lines: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("vubd_queue_read_ops_total"))
            .collect();
        assert_eq!(
            queue_lines,
            ["vubd_queue_read_ops_total{device=\"d\",queue=\"3\"} 1"]
        );
    }

    #[test]
    fn no_device_is_no_sample() {
        let text = render(&[]);
        assert!(text.lines().all(|l| l.starts_with('#')), "{text}");
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape("a\\b\"c\nd"), "a\\\\b\\\"c\\nd");
    }
}
