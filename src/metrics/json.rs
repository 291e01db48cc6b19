//! A reading of devices' metrics as JSON, the result of the control socket's
//! `device_get_stats` (docs/metrics.md), and back (`vubd ctl stats` computes rates and
//! percentiles from two readings).
//!
//! ```text
//! {"latency_bounds_ns": [1000, 1250, ...],       upper bounds of every bucket but the last
//!  "devices": [{"name": "a", "read_ops": 5, ..., "latency": {"counts": [...], "sum_ns": 7},
//!               "queues": [{"queue": 0, "read_ops": 5, ...}, ...]}, ...]}
//! ```

use serde_json::{Map, Value, json};

use super::{
    BUCKETS, Counters, DeviceStats, ERROR_KINDS, ErrorKind, Histogram, OPS, Op, bounds_ns,
};

/// The result of `device_get_stats` for `devices` (name and reading).
pub fn stats(devices: &[(String, DeviceStats)]) -> Value {
    let devices: Vec<Value> = devices
        .iter()
        .map(|(name, stats)| {
            let mut d = Map::new();
            d.insert("name".into(), json!(name));
            counters(&mut d, &stats.total);
            let queues: Vec<Value> = stats
                .queues
                .iter()
                .map(|(i, c)| {
                    let mut q = Map::new();
                    q.insert("queue".into(), json!(i));
                    counters(&mut q, c);
                    Value::Object(q)
                })
                .collect();
            d.insert("queues".into(), Value::Array(queues));
            Value::Object(d)
        })
        .collect();
    json!({
        "latency_bounds_ns": bounds_ns().collect::<Vec<_>>(),
        "devices": devices,
    })
}

/// `c`'s fields into `m`.
fn counters(m: &mut Map<String, Value>, c: &Counters) {
    for op in Op::ALL {
        m.insert(format!("{}_ops", op.name()), json!(c.ops_of(op)));
    }
    m.insert("read_bytes".into(), json!(c.read_bytes));
    m.insert("written_bytes".into(), json!(c.written_bytes));
    let errors: Map<String, Value> = ErrorKind::ALL
        .iter()
        .map(|&k| (k.name().to_owned(), json!(c.errors_of(k))))
        .collect();
    m.insert("errors".into(), Value::Object(errors));
    m.insert("in_flight".into(), json!(c.in_flight));
    m.insert("throttled_ns".into(), json!(c.throttled_ns));
    m.insert(
        "latency".into(),
        json!({"counts": c.latency.counts.to_vec(), "sum_ns": c.latency.sum_ns}),
    );
}

/// The counters of a device or a queue as [`stats`] writes them; `None` when a field is
/// missing or not a count, or the histogram has another number of buckets.
pub fn parse_counters(v: &Value) -> Option<Counters> {
    let n = |key: &str| v.get(key)?.as_u64();
    let mut ops = [0; OPS];
    for (to, op) in ops.iter_mut().zip(Op::ALL) {
        *to = n(&format!("{}_ops", op.name()))?;
    }
    let mut errors = [0; ERROR_KINDS];
    for (to, kind) in errors.iter_mut().zip(ErrorKind::ALL) {
        *to = v.get("errors")?.get(kind.name())?.as_u64()?;
    }
    let latency = v.get("latency")?;
    let list = latency.get("counts")?.as_array()?;
    if list.len() != BUCKETS {
        return None;
    }
    let mut counts = [0; BUCKETS];
    for (to, from) in counts.iter_mut().zip(list) {
        *to = from.as_u64()?;
    }
    Some(Counters {
        ops,
        read_bytes: n("read_bytes")?,
        written_bytes: n("written_bytes")?,
        errors,
        in_flight: n("in_flight")?,
        throttled_ns: n("throttled_ns")?,
        latency: Histogram {
            counts,
            sum_ns: latency.get("sum_ns")?.as_u64()?,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::Clock;
    use crate::metrics::DeviceMetrics;

    #[test]
    fn a_reading_goes_to_json_and_back() {
        let clock = Clock::monotonic();
        let m = DeviceMetrics::new(2);
        let q1 = m.queue(1).expect("queue 1");
        q1.started(Op::Write);
        q1.completed(true, (false, 4096), 2100, &clock);
        q1.refused(ErrorKind::Unsupported);
        let stats = m.read(&clock);
        let v = super::stats(&[("disk-a".to_owned(), stats.clone())]);
        let bounds = v["latency_bounds_ns"].as_array().expect("bounds");
        assert_eq!(bounds.len(), BUCKETS - 1);
        assert_eq!(bounds[0], 1000);
        let d = &v["devices"][0];
        assert_eq!(d["name"], "disk-a");
        assert_eq!(d["write_ops"], 1);
        assert_eq!(d["written_bytes"], 4096);
        assert_eq!(
            d["errors"],
            json!({"io": 0, "unsupported": 1, "invalid": 0})
        );
        // Queue 0 never started: the list has queue 1 only, under its own index.
        assert_eq!(d["queues"].as_array().map(Vec::len), Some(1));
        assert_eq!(d["queues"][0]["queue"], 1);
        assert_eq!(d["queues"][0]["write_ops"], 1);
        assert_eq!(parse_counters(d), Some(stats.total.clone()));
        assert_eq!(
            parse_counters(&d["queues"][0]),
            Some(stats.queues[0].1.clone())
        );
        let mut broken = d.clone();
        broken["latency"]["counts"] = json!([1, 2]);
        assert_eq!(parse_counters(&broken), None);
    }
}
