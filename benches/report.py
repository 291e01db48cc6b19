#!/usr/bin/env python3
"""Turns the raw results of benches/compare.sh and benches/callgrind.sh into the tables of
docs/benchmarks.md. Each script owns one marked section of that file and rewrites only it;
everything outside the markers (the notes) is kept.

  report.py compare FACTS RESULTS.jsonl WORKDIR DOC
  report.py callgrind FACTS RESULTS.tsv DOC
"""

import json
import os
import statistics
import sys
import textwrap

SKELETON = """# Benchmarks

vubd measured against qemu-storage-daemon (QEMU's own vhost-user-blk export) and, for a file,
against fio on the same file. `benches/compare.sh` and `benches/callgrind.sh` regenerate the
marked sections below; they keep everything outside the markers, such as the notes.

<!-- BEGIN compare.sh -->
<!-- END compare.sh -->

<!-- BEGIN callgrind.sh -->
<!-- END callgrind.sh -->

## Notes

"""

BACKENDS = ["vubd-always", "vubd-adaptive", "qsd"]
NAMES = {
    "vubd-always": "vubd always",
    "vubd-adaptive": "vubd adaptive",
    "qsd": "qsd",
}
WORKLOADS = [("poll", 1), ("poll", 32), ("eventfd", 1), ("eventfd", 32)]


def para(text):
    """One Markdown paragraph, wrapped at 96 columns."""
    return textwrap.fill(" ".join(text.split()), 96, break_long_words=False,
                         break_on_hyphens=False)


def read_facts(path):
    facts = {}
    with open(path) as f:
        for line in f:
            key, _, value = line.rstrip("\n").partition("=")
            facts[key] = value
    return facts


def write_section(doc, name, body):
    text = open(doc).read() if os.path.exists(doc) else SKELETON
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
    else:
        head, tail = text.rstrip("\n") + "\n\n", "\n"
    with open(doc, "w") as f:
        f.write(f"{head}{begin}\n{body.strip()}\n{end}{tail}")


def med(values):
    return statistics.median(values) if values else float("nan")


def kiops(values):
    """Median in thousands, with the spread of the rounds."""
    if not values:
        return "–"
    m = med(values)
    spread = (max(values) - min(values)) / 2 / m * 100 if m else 0
    return f"{m / 1e3:,.0f}k ±{spread:.0f}%"


def ratio(a, b):
    if not a or not b:
        return "–"
    return f"{med(a) / med(b):.2f}×"


def us(ns):
    return f"{ns / 1e3:.1f}" if ns >= 10_000 else f"{ns / 1e3:.2f}"


def dirty(facts):
    d = facts.get("dirty", "").strip()
    return f" with uncommitted changes to {d}" if d else ""


def guest(facts):
    h = facts.get("hypervisor", "").strip()
    return f", a virtual machine ({h})" if h else ""


def machine_section(facts):
    return f"""### Machine

| | |
|---|---|
| CPU | {facts['cpu']} ({facts.get('cpuid', '?')}), {facts['cpus']} CPUs{guest(facts)} |
| kernel | {facts['kernel']} |
| toolchain | {facts['rustc']}, release profile, no `target-cpu=native` |
| vubd | commit {facts['commit']}{dirty(facts)} |
| reference | {facts['qsd']} |
| client | `examples/loadgen.rs` on libblkio (the `blkio` crate {facts['blkio']}) |
| fio | {facts['fio']} |
| valgrind | {facts['valgrind']} |
| date | {facts['date']} |
"""


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
        lines += [
            "",
            f"### {title}: latency, µs (p50 / p99 / p99.9)",
            "",
            "| client | QD | vubd always | vubd adaptive | qsd |"
            + (" fio |" if disk == "file" else ""),
            "|---|---:|---:|---:|---:|" + ("---:|" if disk == "file" else ""),
        ]
        for mode, qd in WORKLOADS:
            cells = []
            for b in BACKENDS:
                cells.append(
                    " / ".join(us(lat(disk, b, mode, qd, k)) for k in ("p50", "p99", "p99.9"))
                )
            row = f"| {mode} | {qd} | " + " | ".join(cells) + " |"
            if disk == "file":
                fr = fio.get(qd, [])
                row += " " + " / ".join(us(med([x[k] for x in fr])) for k in ("p50", "p99", "p99.9")) + " |"
            lines.append(row)
        lines += [
            "",
            f"### {title}: backend CPU, seconds per million I/Os (and % of one CPU)",
            "",
            "| client | QD | vubd always | vubd adaptive | qsd |"
            + (" fio |" if disk == "file" else ""),
            "|---|---:|---:|---:|---:|" + ("---:|" if disk == "file" else ""),
        ]
        for mode, qd in WORKLOADS:
            cells = []
            for b in BACKENDS:
                per = med(get(disk, b, mode, qd, lambda r: r["backend"]["cpu_s_per_mio"] or 0))
                pct = med(get(disk, b, mode, qd, lambda r: r["backend"]["cpu_pct"]))
                cells.append(f"{per:.2f} ({pct:.0f}%)")
            row = f"| {mode} | {qd} | " + " | ".join(cells) + " |"
            if disk == "file":
                fr = fio.get(qd, [])
                if fr:
                    cpu = med([x["cpu"] for x in fr])
                    per = cpu / 100 / (med([x["iops"] for x in fr]) / 1e6)
                    row += f" {per:.2f} ({cpu:.0f}%) |"
                else:
                    row += " – |"
            lines.append(row)
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

    # The targets.
    def r_(a, b):
        return med(a) / med(b) if a and b else float("nan")

    t = []
    for qd, want in ((32, 3), (1, 10)):
        x = r_(iops("null", "vubd-always", "poll", qd), iops("null", "qsd", "poll", qd))
        t.append((f"poll client, QD {qd}: vubd ≥ {want}× qsd null-co", f"{x:.2f}×", x >= want))
    p99 = lat("null", "vubd-always", "poll", 1, "p99")
    t.append(("poll client, QD 1: p99 ≤ 2 µs", f"{us(p99)} µs", p99 <= 2000))
    for qd in (1, 32):
        x = r_(iops("null", "vubd-always", "eventfd", qd), iops("null", "qsd", "eventfd", qd))
        t.append((f"eventfd client, QD {qd}: vubd ≥ 3× qsd", f"{x:.2f}×", x >= 3))
    for mode in ("poll", "eventfd"):
        for qd in (1, 32):
            f = [x["iops"] for x in fio.get(qd, [])]
            x = r_(iops("file", "vubd-always", mode, qd), f)
            t.append((f"file, {mode} client, QD {qd}: vubd ≥ 0.9× fio", f"{x:.2f}×", x >= 0.9))
    v = get("null", "vubd-adaptive", "idle", 1, lambda r: r["backend"]["cpu_pct"])
    t.append(("adaptive, idle client: < 1 % CPU", f"{med(v):.1f} %", med(v) < 1))
    worst = min(
        r_(iops("null", "vubd-adaptive", m, q), iops("null", "vubd-always", m, q))
        for m, q in WORKLOADS
    )
    t.append(("adaptive under load: within 10 % of always (worst null workload)",
              f"{worst:.2f}×", worst >= 0.9))
    lines = ["### Against the targets", "",
             "vubd with `--poll always` unless stated; the instruction target is in the "
             "callgrind section.", "", "| target | measured | met |", "|---|---:|---|"]
    for name, got, ok in t:
        lines.append(f"| {name} | {got} | {'yes' if ok else '**no**'} |")
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


def annotate_block(lines, fn):
    """From `callgrind_annotate --tree=calling --inclusive=yes` output: the inclusive Ir of
    the function whose name ends with `fn`, and (Ir, name, calls) of each function it calls.
    callgrind lists a function once per source file that contributed inlined code to it; the
    callees of all those entries are merged."""
    import re

    num = lambda t: int(t.replace(",", ""))  # noqa: E731
    head = re.compile(r"\s*([\d,]+) \([^)]*\)\s+\*\s+(.+?)(?: \[[^\]]*\])?$")
    call = re.compile(r"\s*([\d,]+) \([^)]*\)\s+>\s+(.+?) \(([\d,]+)x\)")
    total, merged = None, {}
    for i, line in enumerate(lines):
        m = head.match(line)
        if not (m and m.group(2).split(":", 1)[-1].endswith(fn)):
            continue
        total = max(total or 0, num(m.group(1)))
        for c in lines[i + 1 :]:
            cm = call.match(c)
            if not cm:
                break
            name = cm.group(2).split(":", 1)[-1]
            ir, calls = merged.get(name, (0, 0))
            merged[name] = (ir + num(cm.group(1)), calls + num(cm.group(3)))
    return total, [(ir, name, calls) for name, (ir, calls) in merged.items()]


def callgrind(facts_path, results_path, doc):
    facts = read_facts(facts_path)
    rows = [line.rstrip("\n").split("\t") for line in open(results_path) if line.strip()]
    header, rows = rows[0], rows[1:]
    idx = {h: i for i, h in enumerate(header)}
    g = lambda r, k: r[idx[k]]  # noqa: E731
    idle = [r for r in rows if g(r, "backend") == "idle"]
    per_spin = None
    if idle and int(g(idle[0], "spin_ir")):
        per_spin = int(g(idle[0], "thread_ir")) / int(g(idle[0], "spin_ir"))
    lines = [
        "## Instructions per I/O (callgrind)",
        "",
        para(
            f"`benches/callgrind.sh` ({facts['valgrind']}, commit {facts['commit']}"
            f"{dirty(facts)}, {facts['date']}): the backend serves a 16 GiB null device under "
            "`valgrind --tool=callgrind --separate-threads=yes`, pinned to CPU "
            f"{facts['backend_cpu']}, and `examples/loadgen.rs --ios N` (native, on the other "
            "CPU) sends it a fixed count of 4 KiB random reads. *I/O thread* is the "
            "instructions (Ir) of the thread that does the I/O divided by N: vubd's poller "
            "(`vubd-poller-0`), qemu-storage-daemon's main thread (null-co completes in its "
            "main loop). *Process* adds every other thread of the backend. User-space "
            "instructions only: the kernel's side of kicks, interrupts and eventfds is not "
            "counted. Each run includes the session's setup (connection, memory table, "
            "in-flight table), a few Ir per I/O."
        ),
        "",
        para(
            "With `--poll always` the count includes the empty polls while the poller waits "
            "for the client. They are counted (the spin-loop hint runs once per empty pass of "
            "the poller's loop; callgrind counts it per source line) and priced with a run "
            "whose client attached its queue with 1000 reads and then went idle for 3 s, so "
            "nothing but empty passes"
            + (f" ({per_spin:,.1f} Ir of loop per Ir of the hint's line)" if per_spin else "")
            + "; the last column takes them out. With `--poll never` there are no empty "
            "polls, but each batch pays for re-enabling notifications, sleeping and waking. "
            "qemu-storage-daemon's count is everything its main thread executed, waiting "
            "included. Under valgrind the backend runs tens of times slower than natively "
            "while the client does not, so a native run has more empty polls per I/O than "
            "these."
        ),
        "",
        "| backend | client | QD | I/Os | Ir per I/O, I/O thread | Ir per I/O, process "
        "| share of empty polls | Ir per I/O without empty polls |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if g(r, "backend") == "idle":
            continue
        ios = int(g(r, "ios"))
        th, proc, spin = int(g(r, "thread_ir")), int(g(r, "process_ir")), int(g(r, "spin_ir"))
        if "always" in g(r, "backend") and per_spin:
            empty = min(spin * per_spin, th)
            share, work = f"{empty / th * 100:.0f}%", f"**{(th - empty) / ios:,.0f}**"
        elif "never" in g(r, "backend"):
            share, work = "0%", f"**{th / ios:,.0f}**"
        else:
            share, work = "–", "–"
        lines.append(
            f"| {g(r, 'backend')} | {g(r, 'mode')} | {g(r, 'qd')} | {ios:,} | {th / ios:,.0f} "
            f"| {proc / ios:,.0f} | {share} | {work} |"
        )

    verdict = []
    for r in rows:
        if g(r, "backend") == "vubd --poll always" and per_spin:
            ios, th, spin = int(g(r, "ios")), int(g(r, "thread_ir")), int(g(r, "spin_ir"))
            work = (th - min(spin * per_spin, th)) / ios
            ok = "met" if work <= 1500 else "**not met**"
            verdict.append(f"{work:,.0f} with the {g(r, 'mode')} client at QD {g(r, 'qd')} ({ok})")
    if verdict:
        lines += [
            "",
            para("Target ≤ 1,500 instructions per 4 KiB null I/O in vubd (`--poll always`, "
                 "poller thread, empty polls excluded): " + "; ".join(verdict) + "."),
        ]

    annotate = os.path.join(os.path.dirname(results_path), "annotate.txt")
    top = [r for r in rows if g(r, "backend") == "vubd --poll always" and g(r, "mode") == "poll"
           and g(r, "qd") == "32"]
    if os.path.exists(annotate) and top:
        text = open(annotate).read().splitlines()
        ios = int(g(top[0], "ios"))
        spin = int(g(top[0], "spin_ir")) * (per_spin or 0)
        total, callees = annotate_block(text, "vubd::poller::worker::Worker::run")
        if total:
            lines += [
                "",
                para("Where the poller's instructions go (`--poll always`, poll client, QD 32), "
                     "per I/O, each function with everything it calls:"),
                "",
                "| function | calls per I/O | Ir per I/O |",
                "|---|---:|---:|",
            ]
            rest = total - spin
            for ir, fn, calls in sorted(callees, reverse=True):
                if ir / ios >= 1:
                    rest -= ir
                    lines.append(f"| `{fn}` | {calls / ios:.2f} | {ir / ios:,.0f} |")
            lines.append(
                f"| the loop itself (`Worker::run` and what is inlined into it), less empty "
                f"polls | | {rest / ios:,.0f} |"
            )
            lines.append(f"| empty polls | | {spin / ios:,.0f} |")
            lines.append(f"| **total** | | **{total / ios:,.0f}** |")
        sub_total, sub = annotate_block(text, "vubd::virtio_blk::request::parse")
        if sub_total:
            lines += [
                "",
                f"Inside `parse` ({sub_total / ios:,.0f} Ir per I/O):",
                "",
                "| function | calls per I/O | Ir per I/O |",
                "|---|---:|---:|",
            ]
            for ir, fn, calls in sorted(sub, reverse=True):
                if ir / ios >= 1:
                    lines.append(f"| `{fn}` | {calls / ios:.2f} | {ir / ios:,.0f} |")
    write_section(doc, "callgrind.sh", "\n".join(lines))


def main():
    if len(sys.argv) == 6 and sys.argv[1] == "compare":
        compare(*sys.argv[2:])
    elif len(sys.argv) == 5 and sys.argv[1] == "callgrind":
        callgrind(*sys.argv[2:])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
