//! `vubd ctl stats [name=NAME] [interval=SECONDS]`: reads every device's metrics twice
//! (`device_get_stats`), an interval apart (1 s by default), and prints what happened in
//! between: requests and megabytes (10^6 bytes) per second, and the latency under which
//! half, 95 % and 99 % of the interval's requests completed, from the difference of the two
//! latency histograms.

use std::time::{Duration, Instant};

use serde_json::{Map, Value, json};

use super::{ANSWER_WAIT, CtlError, table};
use crate::config::CtlConfig;
use crate::jsonrpc::Client;
use crate::metrics::Counters;
use crate::metrics::json::parse_counters;

/// The longest interval asked for.
const MAX_INTERVAL: Duration = Duration::from_secs(3600);

/// What one device did during the interval.
#[derive(Clone, Debug, PartialEq)]
struct Rates {
    name: String,
    seconds: f64,
    /// Requests completed.
    ops: u64,
    /// Bytes read and written by the requests that completed successfully.
    bytes: u64,
    /// Latency percentiles 50, 95 and 99, nanoseconds; `None` without a request.
    percentiles: [Option<f64>; 3],
}

const PERCENTILES: [(f64, &str); 3] = [(0.50, "p50"), (0.95, "p95"), (0.99, "p99")];

/// Samples twice and returns what to print.
pub(super) fn run(cfg: &CtlConfig) -> Result<String, CtlError> {
    let mut interval = Duration::from_secs(1);
    let mut params = Map::new();
    for (key, value) in &cfg.params {
        match key.as_str() {
            "name" => {
                params.insert("name".into(), json!(value));
            }
            "interval" => interval = parse_interval(value)?,
            _ => return Err(CtlError::UnknownParam(key.clone())),
        }
    }
    let params = Value::Object(params);
    let mut client = Client::connect(&cfg.socket, ANSWER_WAIT)?;
    let first = client.call("device_get_stats", params.clone())?;
    let started = Instant::now();
    std::thread::sleep(interval);
    let second = client.call("device_get_stats", params)?;
    let rates = rates(&first, &second, started.elapsed().as_secs_f64())?;
    if cfg.json {
        let list: Vec<Value> = rates.iter().map(rates_json).collect();
        let mut text = serde_json::to_string_pretty(&list).unwrap_or_default();
        text.push('\n');
        return Ok(text);
    }
    Ok(rates_table(&rates))
}

/// `interval=SECONDS`: a positive number of seconds, at most [`MAX_INTERVAL`].
fn parse_interval(value: &str) -> Result<Duration, CtlError> {
    let bad = || CtlError::Interval(value.to_owned());
    let secs: f64 = value.parse().map_err(|_| bad())?;
    let d = Duration::try_from_secs_f64(secs).map_err(|_| bad())?;
    if d.is_zero() || d > MAX_INTERVAL {
        return Err(bad());
    }
    Ok(d)
}

/// Every device of the `second` reading, with what it did since the `first` one, `seconds`
/// earlier. A device missing from the first reading (added in between), or whose counters
/// went back (removed and added again under its name), counts from zero.
fn rates(first: &Value, second: &Value, seconds: f64) -> Result<Vec<Rates>, CtlError> {
    let devices = |v: &Value| -> Result<Vec<(String, Counters)>, CtlError> {
        let list = v
            .get("devices")
            .and_then(Value::as_array)
            .ok_or(CtlError::BadStats)?;
        list.iter()
            .map(|d| {
                let name = d.get("name").and_then(Value::as_str);
                match (name, parse_counters(d)) {
                    (Some(n), Some(c)) => Ok((n.to_owned(), c)),
                    _ => Err(CtlError::BadStats),
                }
            })
            .collect()
    };
    let before = devices(first)?;
    let after = devices(second)?;
    Ok(after
        .into_iter()
        .map(|(name, now)| {
            let zero = Counters::default();
            let then = before
                .iter()
                .find(|(n, c)| *n == name && c.latency.count() <= now.latency.count())
                .map_or(&zero, |(_, c)| c);
            let latency = now.latency.since(&then.latency);
            // Requests completed: each has its latency.
            let ops = latency.count();
            let bytes = (now.read_bytes + now.written_bytes)
                .saturating_sub(then.read_bytes + then.written_bytes);
            Rates {
                name,
                seconds,
                ops,
                bytes,
                percentiles: PERCENTILES.map(|(q, _)| latency.quantile(q)),
            }
        })
        .collect())
}

fn rates_json(r: &Rates) -> Value {
    let mut latency = Map::new();
    for ((_, name), p) in PERCENTILES.iter().zip(r.percentiles) {
        latency.insert(format!("{name}_ns"), json!(p.map(f64::round)));
    }
    json!({
        "name": r.name,
        "seconds": r.seconds,
        "ops": r.ops,
        "bytes": r.bytes,
        "iops": r.ops as f64 / r.seconds,
        "mb_per_s": r.bytes as f64 / 1e6 / r.seconds,
        "latency": latency,
    })
}

fn rates_table(rates: &[Rates]) -> String {
    let mut rows = vec![
        ["NAME", "IOPS", "MB/S", "P50", "P95", "P99"]
            .map(str::to_owned)
            .to_vec(),
    ];
    for r in rates {
        let mut row = vec![
            r.name.clone(),
            format!("{:.0}", r.ops as f64 / r.seconds),
            format!("{:.1}", r.bytes as f64 / 1e6 / r.seconds),
        ];
        row.extend(
            r.percentiles
                .iter()
                .map(|p| p.map_or("-".to_owned(), latency)),
        );
        rows.push(row);
    }
    table(&rows)
}

/// A latency of `ns` nanoseconds in the unit that keeps it between 1 and 1000, with a decimal
/// below 10.
fn latency(ns: f64) -> String {
    let (v, unit) = match ns {
        n if n < 1e3 => (n, "ns"),
        n if n < 1e6 => (n / 1e3, "us"),
        n if n < 1e9 => (n / 1e6, "ms"),
        n => (n / 1e9, "s"),
    };
    if v < 10.0 {
        format!("{v:.1}{unit}")
    } else {
        format!("{v:.0}{unit}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::Clock;
    use crate::metrics::{DeviceMetrics, Op, json};

    #[test]
    fn an_interval_is_the_difference_of_two_readings() {
        let clock = Clock::monotonic();
        let a = DeviceMetrics::new(1);
        let b = DeviceMetrics::new(2);
        let qa = a.queue(0).expect("a");
        // Before the interval: a slow read on a, which must not count in it.
        qa.started(Op::Read);
        qa.completed(true, (true, 4096), 90_000_000, &clock);
        let first = json::stats(&[("a".into(), a.read(&clock)), ("b".into(), b.read(&clock))]);
        for _ in 0..94 {
            qa.started(Op::Read);
            qa.completed(true, (true, 4096), 1200, &clock);
        }
        for _ in 0..6 {
            qa.started(Op::Write);
            qa.completed(true, (false, 1 << 20), 3900, &clock);
        }
        let c = DeviceMetrics::new(1);
        c.queue(0).expect("c").started(Op::Read);
        let second = json::stats(&[
            ("a".into(), a.read(&clock)),
            ("b".into(), b.read(&clock)),
            ("c".into(), c.read(&clock)),
        ]);
        let r = rates(&first, &second, 2.0).expect("rates");
        assert_eq!(r.len(), 3);
        assert_eq!((r[0].ops, r[0].bytes), (100, 94 * 4096 + 6 * (1 << 20)));
        // 94 requests in (1, 1.25] µs, 6 in (3.5, 4] µs, interpolated inside their bucket.
        let want = [
            1000.0 + 250.0 * 50.0 / 94.0,
            3500.0 + 500.0 / 6.0,
            3500.0 + 500.0 * 5.0 / 6.0,
        ];
        for (got, want) in r[0].percentiles.iter().zip(want) {
            let got = got.expect("requests");
            assert!((got - want).abs() < 1e-6, "{:?}", r[0].percentiles);
        }
        assert_eq!((r[1].ops, r[1].percentiles), (0, [None; 3]), "idle");
        assert_eq!(r[2].ops, 0, "added in between, nothing completed");
        assert_eq!(
            rates_table(&r),
            "NAME  IOPS  MB/S  P50    P95    P99\n\
             a     50    3.3   1.1us  3.6us  3.9us\n\
             b     0     0.0   -      -      -\n\
             c     0     0.0   -      -      -\n"
        );
        let v = rates_json(&r[0]);
        assert_eq!(v["iops"], 50.0);
        assert_eq!(v["ops"], 100);
        assert_eq!(v["latency"]["p99_ns"], 3917.0);
        assert_eq!(rates_json(&r[1])["latency"]["p50_ns"], Value::Null);
    }

    #[test]
    fn latencies_read_in_their_unit() {
        assert_eq!(latency(850.0), "850ns");
        assert_eq!(latency(1_234.0), "1.2us");
        assert_eq!(latency(45_600.0), "46us");
        assert_eq!(latency(2_500_000.0), "2.5ms");
        assert_eq!(latency(12_000_000_000.0), "12s");
    }

    #[test]
    fn the_interval_is_a_positive_number_of_seconds() {
        assert_eq!(
            parse_interval("0.25").ok(),
            Some(Duration::from_millis(250))
        );
        assert_eq!(parse_interval("2").ok(), Some(Duration::from_secs(2)));
        for bad in ["0", "-1", "x", "1e9", "NaN", "inf"] {
            assert!(parse_interval(bad).is_err(), "{bad}");
        }
    }
}
