"""The section of benches/compare.sh: vubd against qemu-storage-daemon and fio."""

import json
import os

from .common import (BACKENDS, NAMES, WORKLOADS, kiops, machine_section, med, para, ratio,
                     read_facts, us, write_section)


def compare(facts_path, results_path, work, doc):
    facts = read_facts(facts_path)
    runs = [json.loads(line) for line in open(results_path) if line.strip()]
    groups = {}
    noise = []
    for r in runs:
        disk, backend, mode, qd, _round = r["label"].split("/")
        groups.setdefault((disk, backend, mode, qd), []).append(r)
        client = r["client_cpu_s"]
        be = r["backend"]["cpu_s"] if r.get("backend") else 0.0
        other = max(0.0, r["machine_cpu_s"] - client - be) / r["secs"] if r["secs"] else 0.0
        noise.append((other, r["label"]))

    def get(disk, backend, mode, qd, f):
        return [f(r) for r in groups.get((disk, backend, mode, str(qd)), [])]

    def iops(disk, backend, mode, qd):
        return get(disk, backend, mode, qd, lambda r: r["iops"])

    def lat(disk, backend, mode, qd, key):
        return med(get(disk, backend, mode, qd, lambda r: r["lat_ns"][key]))

    pingpong_runs = [json.load(open(os.path.join(work, name)))
                     for name in sorted(os.listdir(work))
                     if name.startswith("pingpong-r") and name.endswith(".json")]
    pingpong = [r["round_trip_ns"] for r in pingpong_runs]
    fio = {}
    for qd in (1, 32):
        for name in sorted(os.listdir(work)):
            if name.startswith(f"fio-qd{qd}-r") and name.endswith(".json"):
                job = json.load(open(os.path.join(work, name)))["jobs"][0]
                rd = job["read"]
                pct = rd["lat_ns"]["percentile"]
                fio.setdefault(qd, []).append(
                    {
                        "iops": rd["iops"],
                        "p50": pct["50.000000"],
                        "p99": pct["99.000000"],
                        "p99.9": pct["99.900000"],
                        "cpu": job["usr_cpu"] + job["sys_cpu"],
                    }
                )

    out = [machine_section(facts)]
    rounds, secs, warmup = facts["rounds"], facts["secs"], facts["warmup"]
    how = para(
        f"""`benches/compare.sh`: every backend pinned to CPU {facts['backend_cpu']} (vubd with one
poller there), the load generator pinned to CPU {facts['client_cpu']}; 4 KiB random reads, one
queue, {secs} s measured after {warmup} s of warm-up, {rounds} rounds with the backends
interleaved (the order rotating each round); every number is the median of the rounds, `±` half
the spread between the best and the worst round. The null device is 16 GiB; the file is a
{facts['file_size']} file preallocated with `fallocate` on {facts['fstype']}: its extents are
unwritten, so a read goes through io_uring and the file system's O_DIRECT path, which fills
the buffer with zeroes without any block I/O (the fastest file path there is, not a disk
benchmark). A *poll* client uses libblkio poll queues (no interrupts: it spins on the used
ring); an *eventfd* client sleeps on the completion eventfd. Latency is the client's: from
queueing a request in libblkio to reaping it."""
    )
    out.append(
        f"""### How it was run

{how}

```sh
# backends ($B is the bench directory, target/bench)
taskset -c {facts['backend_cpu']} target/release/vubd --socket-path $B/vubd.sock --disk null:16G --cpus {facts['backend_cpu']} --poll always   # or adaptive
taskset -c {facts['backend_cpu']} target/release/vubd --socket-path $B/vubd.sock --disk $B/bench.img --cpus {facts['backend_cpu']} --poll always
taskset -c {facts['backend_cpu']} qemu-storage-daemon \\
    --blockdev driver=null-co,node-name=n0,size=17179869184,read-zeroes=off \\
    --export type=vhost-user-blk,id=e0,node-name=n0,addr.type=unix,addr.path=$B/qsd.sock,writable=on
taskset -c {facts['backend_cpu']} qemu-storage-daemon \\
    --blockdev driver=file,filename=$B/bench.img,node-name=f0,aio=io_uring,cache.direct=on \\
    --export type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,addr.path=$B/qsd.sock,writable=on
# client
target/release/examples/loadgen --socket $B/vubd.sock --rw randread --bs 4k --qd 1 --queues 1 \\
    --secs {secs} --warmup {warmup} --mode poll --backend-pid $PID --cpu {facts['client_cpu']} --json   # QD 1|32, poll|eventfd; file: --size {facts['file_size']}
target/release/examples/loadgen ... --qd 1 --mode eventfd --idle --secs {secs}   # idle: 1000 reads, then nothing
# the kernel's ceiling for the file
taskset -c {facts['backend_cpu']} fio --name=ceiling --filename=$B/bench.img --ioengine=io_uring --direct=1 \\
    --rw=randread --bs=4k --iodepth=1 --numjobs=1 --size={facts['file_size']} --time_based \\
    --runtime={secs} --ramp_time={warmup} --norandommap --randrepeat=0 --lat_percentiles=1   # iodepth 1|32
```
"""
    )

    for disk, title in (("null", "Null device"), ("file", "File (O_DIRECT, io_uring)")):
        extra = " fio |" if disk == "file" else ""
        extra_sep = "---:|" if disk == "file" else ""
        lines = [
            f"### {title}: IOPS",
            "",
            "| client | QD | vubd always | vubd adaptive | qsd | always ÷ qsd | adaptive ÷ qsd "
            f"| adaptive ÷ always |{extra}"
            + (" always ÷ fio | adaptive ÷ fio |" if disk == "file" else ""),
            "|---|---:|---:|---:|---:|---:|---:|---:|"
            + (extra_sep + "---:|---:|" if disk == "file" else ""),
        ]
        for mode, qd in WORKLOADS:
            a, d, q = (iops(disk, b, mode, qd) for b in BACKENDS)
            row = (
                f"| {mode} | {qd} | {kiops(a)} | {kiops(d)} | {kiops(q)} | {ratio(a, q)} "
                f"| {ratio(d, q)} | {ratio(d, a)} |"
            )
            if disk == "file":
                f = [x["iops"] for x in fio.get(qd, [])]
                row += f" {kiops(f)} | {ratio(a, f)} | {ratio(d, f)} |"
            lines.append(row)
        def per_backend(heading, cell, fio_cell):
            """A table of one cell per backend (and, for the file, fio's) per workload."""
            lines.extend([
                "",
                f"### {title}: {heading}",
                "",
                "| client | QD | vubd always | vubd adaptive | qsd |" + extra,
                "|---|---:|---:|---:|---:|" + extra_sep,
            ])
            for mode, qd in WORKLOADS:
                row = f"| {mode} | {qd} | " + " | ".join(cell(b, mode, qd) for b in BACKENDS)
                row += " |" + (f" {fio_cell(fio.get(qd, []))} |" if disk == "file" else "")
                lines.append(row)

        pcts = ("p50", "p99", "p99.9")

        def latency(b, mode, qd):
            return " / ".join(us(lat(disk, b, mode, qd, k)) for k in pcts)

        def fio_latency(fr):
            return " / ".join(us(med([x[k] for x in fr])) for k in pcts)

        def cpu(b, mode, qd):
            per = med(get(disk, b, mode, qd, lambda r: r["backend"]["cpu_s_per_mio"] or 0))
            pct = med(get(disk, b, mode, qd, lambda r: r["backend"]["cpu_pct"]))
            return f"{per:.2f} ({pct:.0f}%)"

        def fio_cpu(fr):
            if not fr:
                return "–"
            pct = med([x["cpu"] for x in fr])
            per = pct / 100 / (med([x["iops"] for x in fr]) / 1e6)
            return f"{per:.2f} ({pct:.0f}%)"

        per_backend("latency, µs (p50 / p99 / p99.9)", latency, fio_latency)
        per_backend("backend CPU, seconds per million I/Os (and % of one CPU)", cpu, fio_cpu)
        out.append("\n".join(lines) + "\n")

    idle = ["### Idle", "", para("A client that issued 1000 reads at QD 1 (so that the queue is "
            f"attached to its poller) and then nothing for {secs} s; the backend's CPU use "
            "meanwhile (median, and the worst round)."), "", "| backend | % of one CPU | worst |",
            "|---|---:|---:|"]
    for b in BACKENDS:
        v = get("null", b, "idle", 1, lambda r: r["backend"]["cpu_pct"])
        if v:
            idle.append(f"| {NAMES[b]} | {med(v):.1f} | {max(v):.1f} |")
    out.append("\n".join(idle) + "\n")

    # The machine's floor: a QD 1 request cannot take less than one cache-line round trip
    # between the client's CPU and the backend's; a file read also pays the kernel's latency.
    rt = min(pingpong) if pingpong else float("nan")
    fio1_p50 = med([x["p50"] for x in fio.get(1, [])])
    qsd1 = med(iops("null", "qsd", "poll", 1))
    fio1 = med([x["iops"] for x in fio.get(1, [])])
    null_ceiling = 1e9 / rt if pingpong else float("nan")
    file_ceiling = 1e9 / (rt + fio1_p50) if pingpong and fio.get(1) else float("nan")
    if pingpong:
        out.append("\n".join([
            "### The machine's floor", "",
            para(f"""A cache line written on CPU {facts['client_cpu']} and answered from CPU
{facts['backend_cpu']} makes the round trip in {rt:.0f} ns at best (`examples/pingpong.rs`, the
fastest of {len(pingpong)} runs of {len(pingpong_runs[0]["trials_ns"])} trials each, one run per round; the runs' best trials
ranged up to {max(pingpong):.0f} ns). A
request at QD 1 needs at least that: the client's avail index has to reach the backend and the
backend's used index has to come back, before either side does any work of its own. So no
backend on this machine can serve more than {null_ceiling / 1e3:,.0f}k QD 1 requests a second
({null_ceiling / qsd1:.1f}× qsd's null-co here); a file read also waits for the kernel (fio's
p50 of {us(fio1_p50)} µs at QD 1), which leaves {file_ceiling / 1e3:,.0f}k
({file_ceiling / fio1:.2f}× fio). These ceilings leave out everything the client and the
backend execute, so the real bound is lower."""),
        ]) + "\n")

    # The targets.
    def r_(a, b):
        return med(a) / med(b) if a and b else float("nan")

    t = []
    for qd, want in ((32, 3), (1, 10)):
        x = r_(iops("null", "vubd-always", "poll", qd), iops("null", "qsd", "poll", qd))
        bound = f"{null_ceiling / qsd1:.1f}×" if qd == 1 and pingpong else "–"
        t.append((f"poll client, QD {qd}: vubd ≥ {want}× qsd null-co", f"{x:.2f}×", bound,
                  x >= want))
    p99 = lat("null", "vubd-always", "poll", 1, "p99")
    t.append(("poll client, QD 1: p99 ≤ 2 µs", f"{us(p99)} µs", "–", p99 <= 2000))
    for qd in (1, 32):
        x = r_(iops("null", "vubd-always", "eventfd", qd), iops("null", "qsd", "eventfd", qd))
        t.append((f"eventfd client, QD {qd}: vubd ≥ 3× qsd", f"{x:.2f}×", "–", x >= 3))
    for mode in ("poll", "eventfd"):
        for qd in (1, 32):
            f = [x["iops"] for x in fio.get(qd, [])]
            x = r_(iops("file", "vubd-always", mode, qd), f)
            bound = f"{file_ceiling / fio1:.2f}×" if qd == 1 and pingpong else "–"
            t.append((f"file, {mode} client, QD {qd}: vubd ≥ 0.9× fio", f"{x:.2f}×", bound,
                      x >= 0.9))
    v = get("null", "vubd-adaptive", "idle", 1, lambda r: r["backend"]["cpu_pct"])
    t.append(("adaptive, idle client: < 1 % CPU", f"{med(v):.1f} %", "–", med(v) < 1))
    worst = min(
        r_(iops("null", "vubd-adaptive", m, q), iops("null", "vubd-always", m, q))
        for m, q in WORKLOADS
    )
    t.append(("adaptive under load: within 10 % of always (worst null workload)",
              f"{worst:.2f}×", "–", worst >= 0.9))
    lines = ["### Against the targets", "",
             para("vubd with `--poll always` unless stated; the instruction target is in the "
                  "callgrind section. *Ceiling* is the most any backend could reach on this "
                  "machine, from the floor above (QD 1 rows only)."), "",
             "| target | measured | ceiling | met |", "|---|---:|---:|---|"]
    for name, got, bound, ok in t:
        lines.append(f"| {name} | {got} | {bound} | {'yes' if ok else '**no**'} |")
    out.append("\n".join(lines) + "\n")

    noise.sort(reverse=True)
    busy = [(o, label) for o, label in noise if o > 0.1]
    lines = ["### Noise", "",
             para("CPU used by other processes during each measurement (the machine's busy time "
             "from `/proc/stat` less the backend's and the load generator's): median "
             f"{med([o for o, _ in noise]):.2f} CPUs, worst {noise[0][0]:.2f} CPUs "
             f"({noise[0][1]}). "
             + (f"{len(busy)} of {len(noise)} runs shared the machine with more than 0.1 CPU of "
                "other work." if busy else "No run shared the machine with more than 0.1 CPU "
                "of other work."))]
    out.append("\n".join(lines) + "\n")

    write_section(doc, "compare.sh", "## Measured: vubd, qemu-storage-daemon, fio\n\n" + "\n".join(out))
