"""The section of benches/nvme_tcp.sh: the NVMe/TCP initiator against a null namespace."""

import json
import os

from .common import (annotate_block, dirty, guest, kiops, med, para, read_facts, us,
                     write_section)


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
