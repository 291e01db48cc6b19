#!/usr/bin/env python3
"""Turns the raw results of benches/compare.sh, benches/callgrind.sh and benches/nvme_tcp.sh
into the tables of docs/benchmarks.md. Each script owns one marked section of that file and
rewrites only it; everything outside the markers (the notes) is kept.

  report.py compare FACTS RESULTS.jsonl WORKDIR DOC
  report.py callgrind FACTS RESULTS.tsv DOC
  report.py nvme_tcp FACTS RESULTS.jsonl WORKDIR DOC
  report.py calls CALLGRIND.OUT LABEL IOS  (benches/nvme_tcp.sh: calls of syscall wrappers, TSV)
"""

import json
import os
import statistics
import sys
import textwrap

SKELETON = """# Benchmarks

vubd measured against qemu-storage-daemon (QEMU's own vhost-user-blk export) and, for a file,
against fio on the same file; and vubd's NVMe/TCP initiator against a null namespace on
loopback. `benches/compare.sh`, `benches/callgrind.sh` and `benches/nvme_tcp.sh` regenerate the
marked sections below; they keep everything outside the markers, such as the notes.

<!-- BEGIN compare.sh -->
<!-- END compare.sh -->

<!-- BEGIN callgrind.sh -->
<!-- END callgrind.sh -->

<!-- BEGIN nvme_tcp.sh -->
<!-- END nvme_tcp.sh -->

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
        sub_rows = [
            f"| `{fn}` | {calls / ios:.2f} | {ir / ios:,.0f} |"
            for ir, fn, calls in sorted(sub, reverse=True)
            if ir / ios >= 1
        ]
        # Nothing to show when everything `parse` calls is inlined into it.
        if sub_total and sub_rows:
            lines += [
                "",
                f"Inside `parse` ({sub_total / ios:,.0f} Ir per I/O):",
                "",
                "| function | calls per I/O | Ir per I/O |",
                "|---|---:|---:|",
            ] + sub_rows
    write_section(doc, "callgrind.sh", "\n".join(lines))


# The C library's syscall wrappers counted from a callgrind profile of the poller.
SYSCALL_WRAPPERS = ("readv", "sendmsg", "epoll_wait", "write", "read", "recvmsg", "recvfrom",
                    "sendto", "writev", "clock_gettime", "__vdso_clock_gettime")


def calls(path, label, ios):
    """Calls per callee name in a callgrind output file (every caller summed), for the
    syscall wrappers: TSV lines `calls LABEL IOS NAME COUNT 0`."""
    names, current, total = {}, None, {}

    def name_of(ref):
        # `(id) name` defines a compressed name, `(id)` uses it; uncompressed: `name`.
        ref = ref.strip()
        if ref.startswith("("):
            ident, _, rest = ref.partition(")")
            ident = ident[1:]
            if rest.strip():
                names[ident] = rest.strip()
            return names.get(ident, "")
        return ref

    with open(path, errors="replace") as f:
        for line in f:
            if line.startswith("cfn="):
                current = name_of(line[4:])
            elif line.startswith("fn="):
                name_of(line[3:])
                current = None
            elif line.startswith("calls=") and current is not None:
                n = int(line[6:].split()[0])
                total[current] = total.get(current, 0) + n
                current = None
    for name, n in sorted(total.items()):
        base = name.split("'")[0]
        if base in SYSCALL_WRAPPERS or base.lstrip("_").replace("libc_", "") in SYSCALL_WRAPPERS:
            print(f"calls\t{label}\t{ios}\t{base}\t{n}\t0")


NVME_CONFIGS = [("shared", "poll"), ("shared", "eventfd"), ("split", "eventfd"),
                ("split", "poll")]
NVME_WORKLOADS = [("randread", "1"), ("randread", "32"), ("randwrite", "32")]


def nvme_tcp(facts_path, results_path, work, doc):
    facts = read_facts(facts_path)
    runs = [json.loads(line) for line in open(results_path) if line.strip()]
    groups, noise = {}, []
    for r in runs:
        placement, client, rw, qd, poll, _round = r["label"].split("/")
        groups.setdefault((placement, client, rw, qd, poll), []).append(r)
        be = r["backend"]["cpu_s"] if r.get("backend") else 0.0
        w = sum(x["cpu_s"] for x in r.get("watched", []))
        other = max(0.0, r["machine_cpu_s"] - r["client_cpu_s"] - be - w) / r["secs"]
        noise.append((other, r["label"]))

    def get(key, f):
        return [f(r) for r in groups.get(key, [])]

    def m(key, f):
        return med(get(key, f))

    def poller_us(r):
        return r["backend"]["thread"]["cpu_us_per_io"] or float("nan")

    def process_us(r):
        return (r["backend"]["cpu_s_per_mio"] or float("nan"))

    def target_us(r):
        w = sum(x["cpu_s"] for x in r.get("watched", []))
        return w / r["ios"] * 1e6 if r["ios"] else float("nan")

    def sys_share(r):
        t = r.get("poller_ticks", {})
        n = t.get("user", 0) + t.get("system", 0)
        return t.get("system", 0) / n * 100 if n else float("nan")

    def lat3(key):
        return " / ".join(us(m(key, lambda r, k=k: r["lat_ns"][k])) for k in ("p50", "p99", "p99.9"))

    pc, oc = facts["poller_cpu"], facts["other_cpu"]
    out = [f"""### Machine

| | |
|---|---|
| CPU | {facts['cpu']} ({facts.get('cpuid', '?')}), {facts['cpus']} CPUs{guest(facts)} |
| kernel | {facts['kernel']} |
| toolchain | {facts['rustc']}, release profile, no `target-cpu=native` |
| vubd | commit {facts['commit']}{dirty(facts)} |
| target | `examples/fake_target.rs` (the test suite's fake NVMe/TCP target), null namespace |
| client | `examples/loadgen.rs` on libblkio (the `blkio` crate {facts['blkio']}) |
| profilers | {facts['valgrind']}, {facts.get('perf', 'perf: none')} |
| date | {facts['date']} |
"""]
    rounds, secs, warmup = facts["rounds"], facts["secs"], facts["warmup"]
    how = para(
        f"""`benches/nvme_tcp.sh`: vubd serves the null namespace of the fake NVMe/TCP target
(`examples/fake_target.rs`, {facts['ns_size']}, {facts['block_size']}-byte blocks) through its
own initiator, over TCP on 127.0.0.1, to the load generator; 4 KiB random reads at QD 1 and 32
and random writes at QD 32 (4 KiB fits the target's in-capsule data, so a write is one capsule
and one response), one queue, {secs} s measured after {warmup} s of warm-up, {rounds} rounds
with the poll modes interleaved; every number is the median of the rounds. vubd's one poller
(`--cpus {pc}`) always has CPU {pc}; there are two CPUs for three parties, so two placements:
*shared*, the target's connection threads on CPU {pc} with the poller, the client alone on
CPU {oc}; *split*, the poller alone on CPU {pc}, the target and the client both on CPU {oc}.
A *poll* client spins on the used ring; an *eventfd* client sleeps on the completion
eventfd."""
    )
    cpu = para(
        f"""*Initiator CPU per I/O* is the CPU time (utime + stime, `/proc/PID/task/TID/stat`) of
the thread `vubd-poller-0`, which does all of the initiator's work on the data path (virtio
ring, NVMe/TCP PDUs, `sendmsg` and `readv` on its connection, and the kernel's TCP work done in
those calls, loopback delivery included), over the I/Os the client completed in the measured
interval; *vubd process* adds vubd's other threads (the supervisor's keep-alive and the
vhost-user thread: nothing measurable). A busy-polling thread's CPU time includes its empty
polls: with `--poll adaptive` the poller spins while commands are in flight and sleeps only
after {50} µs without work, so where it waits for the other parties its CPU time is the
waiting, not its work. *of which kernel* is the poller's system time as a share of its
CPU time (over the whole run, warm-up included). *Target* is the fake target's CPU time per
I/O over the same interval."""
    )
    out.append(
        f"""### How it was run

{how}

{cpu}

```sh
# the target ($B is the bench directory, target/bench/nvme_tcp); CPU {pc} for shared, {oc} for split
taskset -c {pc} target/release/examples/fake_target --listen 127.0.0.1:0 --nqn {facts['nqn']} \\
    --ns-size {facts['ns_size']} --block-size {facts['block_size']} --null --cpus {pc}   # prints LISTENING 127.0.0.1:$PORT
# vubd
taskset -c {pc} target/release/vubd --socket-path $B/vubd.sock \\
    --disk nvme-tcp://127.0.0.1:$PORT/{facts['nqn']} --cpus {pc} --poll adaptive   # or always
# client
target/release/examples/loadgen --socket $B/vubd.sock --rw randread --bs 4k --qd 1 --queues 1 \\
    --secs {secs} --warmup {warmup} --mode poll --backend-pid $VUBD_PID --backend-thread vubd-poller-0 \\
    --watch-pid $TARGET_PID --cpu {oc} --json   # randread QD 1|32, randwrite QD 32; poll|eventfd
# the profile: syscalls of the poller thread during a fixed count of I/Os...
perf stat -x, -t $POLLER_TID -e raw_syscalls:sys_enter \\
    -e syscalls:sys_enter_readv -e syscalls:sys_exit_readv --filter 'ret < 0' ...   # also sendmsg, epoll_wait, write, read
target/release/examples/loadgen --socket $B/vubd.sock --rw randread --bs 4k --qd 1 --mode poll \\
    --ios {int(facts['ios'])} --secs 600 --cpu {oc}   # then SIGINT to perf
# ...and its instructions
taskset -c {pc} valgrind --tool=callgrind --separate-threads=yes target/release/vubd \\
    --socket-path $B/cg.sock --disk nvme-tcp://127.0.0.1:$PORT/{facts['nqn']} --cpus {pc} --poll adaptive
target/release/examples/loadgen --socket $B/cg.sock --rw randread --bs 4k --qd 1 --mode poll \\
    --ios {int(facts.get('cg_ios', facts['ios']))} --secs 600 --connect-timeout 60 --cpu {oc}   # QD 1|32
```
"""
    )

    def row_cells(key, full):
        iops = get(key, lambda r: r["iops"])
        cells = [kiops(iops), lat3(key), f"**{m(key, poller_us):.2f}**"]
        if full:
            cells += [f"{m(key, lambda r: r['backend']['thread']['cpu_pct']):.0f}%",
                      f"{m(key, sys_share):.0f}%", f"{m(key, process_us):.2f}",
                      f"{m(key, target_us):.2f}"]
        return cells

    names = {"shared": f"shared (target on {pc})", "split": f"split (target on {oc})"}
    for poll, full in (("adaptive", True), ("always", False)):
        head = ("| placement | client | workload | QD | IOPS | latency µs, p50 / p99 / p99.9 "
                "| initiator CPU µs per I/O |")
        sep = "|---|---|---|---:|---:|---:|---:|"
        if full:
            head += " poller % of a CPU | of which kernel | vubd process µs per I/O | target µs per I/O |"
            sep += "---:|---:|---:|---:|"
        lines = [f"### vubd `--poll {poll}`" + (" (the default)" if poll == "adaptive" else ""),
                 "", head, sep]
        for placement, client in NVME_CONFIGS:
            for rw, qd in NVME_WORKLOADS:
                key = (placement, client, rw, qd, poll)
                if key not in groups:
                    continue
                lines.append(f"| {names[placement]} | {client} | {rw} | {qd} | "
                             + " | ".join(row_cells(key, full)) + " |")
        out.append("\n".join(lines) + "\n")

    idle = get(("shared", "eventfd", "idle", "1", "adaptive"),
               lambda r: r["backend"]["thread"]["cpu_pct"])
    if idle:
        out.append("### Idle\n\n" + para(
            "A client that issued 1000 reads (attaching its queue) and then nothing for "
            f"{secs} s: the poller used {med(idle):.1f} % of a CPU meanwhile (median; worst "
            f"round {max(idle):.1f} %), `--poll adaptive`, shared placement.") + "\n")

    # The targets, for every placement and client, adaptive mode.
    lines = ["### Against the targets", "",
             para("`--poll adaptive`. For scale, measured on this machine against SPDK's target "
                  "on 127.0.0.1: SPDK's user-space initiator, 657k IOPS at QD 32 on one core "
                  "(1.5 µs per I/O) and 66k IOPS at QD 1 (p50 12.7 µs); the Linux kernel "
                  "initiator spends 5 to 10 µs per I/O in published measurements."),
             "", "| target | placement | client | measured | met |", "|---|---|---|---:|---|"]
    for placement, client in NVME_CONFIGS:
        key = (placement, client, "randread", "32", "adaptive")
        if key in groups:
            x = m(key, poller_us)
            lines.append(f"| ≤ 2 µs initiator CPU per 4 KiB read, QD 32 | {names[placement]} "
                         f"| {client} | {x:.2f} µs ({kiops(get(key, lambda r: r['iops']))} "
                         f"IOPS) | {'yes' if x <= 2 else '**no**'} |")
    for placement, client in NVME_CONFIGS:
        key = (placement, client, "randread", "1", "adaptive")
        if key in groups:
            x = m(key, lambda r: r["lat_ns"]["p50"])
            lines.append(f"| QD 1 round trip ≤ 15 µs (client p50) | {names[placement]} "
                         f"| {client} | {us(x)} µs ({kiops(get(key, lambda r: r['iops']))} "
                         f"IOPS) | {'yes' if x <= 15000 else '**no**'} |")
    out.append("\n".join(lines) + "\n")

    prof = os.path.join(work, "profile.tsv")
    if os.path.exists(prof):
        out.append(nvme_profile(facts, prof, work))

    noise.sort(reverse=True)
    busy = [(o, label) for o, label in noise if o > 0.1]
    out.append("### Noise\n\n" + para(
        "CPU used by other processes during each measurement (the machine's busy time from "
        "`/proc/stat` less the load generator's, vubd's and the target's): median "
        f"{med([o for o, _ in noise]):.2f} CPUs, worst {noise[0][0]:.2f} CPUs ({noise[0][1]}). "
        + (f"{len(busy)} of {len(noise)} runs shared the machine with more than 0.1 CPU of "
           "other work." if busy else "No run shared the machine with more than 0.1 CPU of "
           "other work.")) + "\n")
    write_section(doc, "nvme_tcp.sh", "## Measured: the NVMe/TCP initiator on loopback\n\n"
                  + "\n".join(out))


def flat_profile(lines):
    """From `callgrind_annotate` (flat, exclusive) output: (Ir, function) per function, the
    entries of one function from several source files merged."""
    import re

    row = re.compile(r"\s*([\d,]+) \([^)]*\)\s+(.+?)(?: \[[^\]]*\])?$")
    merged = {}
    for line in lines:
        mt = row.match(line)
        if not mt or "PROGRAM TOTALS" in line or ":" not in mt.group(2):
            continue
        fn = mt.group(2).split(":", 1)[-1]
        merged[fn] = merged.get(fn, 0) + int(mt.group(1).replace(",", ""))
    return sorted(((ir, fn) for fn, ir in merged.items()), reverse=True)


def nvme_profile(facts, path, work):
    rows = [line.rstrip("\n").split("\t") for line in open(path) if line.strip()][1:]
    if not rows:
        return ""
    counter = facts.get("counter", "perf")
    how = (
        "counted natively with perf's syscall tracepoints on the poller thread (`perf stat -t "
        "TID -e raw_syscalls:sys_enter -e syscalls:sys_enter_readv ...`; failed calls from "
        "`sys_exit_*` filtered on `ret < 0`: here EAGAIN, an empty socket)"
        if counter == "perf" else
        "counted by `strace -c -f` attached to the whole vubd process (strace makes every "
        "syscall far slower, so empty reads are fewer and batches larger than natively)")
    lines = ["### Where the poller's time goes", "",
             para(f"""`--poll adaptive`. *Syscalls per I/O* of the poller while the client sent
{int(facts['ios']):,} 4 KiB requests (no warm-up), {how}."""), ""]
    sc, labels = {}, []
    for kind, label, n, name, count, errors in rows:
        if kind == "syscall":
            if label not in labels:
                labels.append(label)
            sc.setdefault(name, {})[label] = (int(count) / int(n), int(errors) / int(n))
    if sc:
        def title(label):
            p, client, rw, qd = label.split("/")
            return f"{p}, {client} client, {rw} QD {qd}"

        lines += ["| syscall | " + " | ".join(title(lb) for lb in labels) + " |",
                  "|---|" + "---:|" * len(labels)]
        order = ["all"] + sorted((k for k in sc if k != "all"),
                                 key=lambda k: -max(c for c, _ in sc[k].values()))
        for name in order:
            if name not in sc or max(c for c, _ in sc[name].values()) < 0.001:
                continue
            cells = []
            for lb in labels:
                c, e = sc[name].get(lb, (0.0, 0.0))
                cells.append(f"{c:.2f}" + (f" ({e:.2f} failed)" if e >= 0.005 else ""))
            shown = "**all syscalls**" if name == "all" else f"`{name}`"
            lines.append(f"| {shown} | " + " | ".join(cells) + " |")
        lines.append("")

    ir, cl, cg_labels = {}, {}, []
    for kind, label, n, name, count, _ in rows:
        if kind == "ir":
            ir[(label, name)] = int(count) / int(n)
            if label not in cg_labels:
                cg_labels.append(label)
        elif kind == "calls":
            cl[(label, name)] = cl.get((label, name), 0) + int(count) / int(n)
    if not cg_labels:
        return "\n".join(lines)
    qd_of = {lb: lb.split("/")[-1] for lb in cg_labels}
    cg_ios = int(facts.get("cg_ios", facts["ios"]))
    lines += [para(f"""*Instructions per I/O*: vubd under
`valgrind --tool=callgrind --separate-threads=yes` (the target and the client native, shared
placement, poll client), {cg_ios:,} 4 KiB random reads; user-space instructions (Ir) of the
poller thread, the session's setup included (a few Ir per I/O); the kernel's work in the
syscalls is not counted. Valgrind slows the poller tens of times, so it finds answers waiting
more often than natively (fewer empty passes, bigger batches)."""), "",
              "| poller under callgrind | " + " | ".join(f"QD {qd_of[lb]}" for lb in cg_labels)
              + " |", "|---|" + "---:|" * len(cg_labels),
              "| **Ir per I/O** | " + " | ".join(f"**{ir.get((lb, 'total'), 0):,.0f}**"
                                                 for lb in cg_labels) + " |",
              "| empty passes of the loop per I/O | "
              + " | ".join(f"{ir.get((lb, 'spin'), 0):.2f}" for lb in cg_labels) + " |"]
    for name in sorted({n for _, n in cl}):
        lines.append(f"| `{name}` calls per I/O | "
                     + " | ".join(f"{cl.get((lb, name), 0):.2f}" for lb in cg_labels) + " |")
    lines.append("")
    for lb in cg_labels:
        q = qd_of[lb]
        ann = os.path.join(work, f"annotate-qd{q}.txt")
        flat = os.path.join(work, f"flat-qd{q}.txt")
        if os.path.exists(ann):
            text = open(ann).read().splitlines()
            total, callees = annotate_block(text, "vubd::poller::worker::Worker::run")
            if total:
                lines += [para(f"QD {q}: the poller loop's callees, each with everything it "
                               "calls (inclusive), per I/O:"), "",
                          "| function | calls per I/O | Ir per I/O |", "|---|---:|---:|"]
                rest = total
                for c_ir, fn, c in sorted(callees, reverse=True):
                    if c_ir / cg_ios >= 10:
                        rest -= c_ir
                        lines.append(f"| `{fn}` | {c / cg_ios:.2f} | {c_ir / cg_ios:,.0f} |")
                lines.append("| the rest (`Worker::run` and what is inlined into it, smaller "
                             f"callees) | | {rest / cg_ios:,.0f} |")
                lines.append(f"| **total** | | **{total / cg_ios:,.0f}** |")
                lines.append("")
        if os.path.exists(flat):
            top = flat_profile(open(flat).read().splitlines())[:12]
            if top:
                lines += [para(f"QD {q}: the functions with the most instructions of their "
                               "own (exclusive, inlined code counted where it lands), per "
                               "I/O:"), "", "| function | Ir per I/O |", "|---|---:|"]
                for f_ir, fn in top:
                    lines.append(f"| `{fn}` | {f_ir / cg_ios:,.0f} |")
                lines.append("")
    return "\n".join(lines)


def main():
    if len(sys.argv) == 6 and sys.argv[1] == "compare":
        compare(*sys.argv[2:])
    elif len(sys.argv) == 5 and sys.argv[1] == "callgrind":
        callgrind(*sys.argv[2:])
    elif len(sys.argv) == 6 and sys.argv[1] == "nvme_tcp":
        nvme_tcp(*sys.argv[2:])
    elif len(sys.argv) == 5 and sys.argv[1] == "calls":
        calls(*sys.argv[2:])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
