#!/usr/bin/env python3
"""Writes the pcie_callgrind.sh section of docs/benchmarks.md from the bench directory.

Usage: pcie_callgrind_report.py BENCH_DIR DOC REPOSITORY
"""

import re
import sys
from pathlib import Path

TARGET = 600
BEGIN = "<!-- BEGIN pcie_callgrind.sh -->"
END = "<!-- END pcie_callgrind.sh -->"


def facts(path):
    out = {}
    for line in path.read_text().splitlines():
        if "=" in line:
            k, v = line.split("=", 1)
            out[k] = v
    return out


def tsv(path):
    lines = path.read_text().splitlines()
    head = lines[0].split("\t")
    return [dict(zip(head, line.split("\t"))) for line in lines[1:] if line]


def own_costs(path, limit):
    """(Ir, function) of the functions in a callgrind_annotate listing, largest first."""
    rows = []
    for line in path.read_text().splitlines():
        m = re.match(r"^\s*([\d,]+) \(\s*[\d.]+%\)\s+(\S+?):(.+?)( \[.*\])?$", line)
        if not m or m.group(3) == "":
            continue
        name = m.group(3)
        if name.startswith("PROGRAM TOTALS"):
            continue
        rows.append((int(m.group(1).replace(",", "")), m.group(2) + ":" + name))
    return rows[:limit]


def short(entry, top):
    """file:function with the file relative to the repository, the standard library or the
    crate, no machine paths."""
    path, _, name = entry.rpartition(":") if ":" in entry else ("", "", entry)
    path, name = entry.split(":", 1) if not entry.startswith("/") else (path, name)
    name = re.sub(r"::h[0-9a-f]{16}$", "", name)
    if path.startswith(top + "/"):
        path = path[len(top) + 1 :]
    elif "/rustc/" in path and "/library/" in path:
        path = "library/" + path.split("/library/", 1)[1]
    elif "/registry/src/" in path:
        path = path.split("/registry/src/", 1)[1].split("/", 1)[1]
    elif path.startswith("/"):
        path = path.rsplit("/", 1)[1]
    return f"{path}:{name}" if path else name


def fmt(x):
    return f"{x:,.0f}"


def main():
    d = Path(sys.argv[1])
    doc = Path(sys.argv[2])
    top = sys.argv[3].rstrip("/")
    f = facts(d / "facts.txt")
    runs = tsv(d / "results.tsv")
    idle_ir = int(f["idle_ir"])
    idle_polls = int(f["idle_polls"])
    per_empty = idle_ir / idle_polls if idle_polls else 0.0

    core = {}
    for line in (d / "core.tsv").read_text().splitlines():
        _, batch, ios, sub, comp = line.split("\t")
        core[int(batch)] = (int(ios), int(sub), int(comp))

    dirty = f.get("dirty", "")
    build = f"commit {f['commit']}" + (f" with uncommitted changes to {dirty}" if dirty else "")
    out = [BEGIN, "## Instructions per I/O of the NVMe PCIe driver (callgrind, emulated controller)", ""]
    out.append(
        f"`benches/pcie_callgrind.sh` ({f['valgrind']}, {build}, {f['date']}). "
        f"Host: {f['cpu']}, {f['cpus']} CPUs, Linux {f['kernel']}, {f['rustc']}. "
        f"Guest: {f['qemu']}, TCG, 2 vCPUs, Linux {f['guest_kernel']}, QEMU's emulated NVMe "
        "controller behind an emulated Intel IOMMU (`-device intel-iommu`), bound to vfio-pci."
    )
    out.append("")
    out.append(
        "In the guest, `examples/pcie_check.rs --bench N --qd Q` drives `nvme::pcie::PcieIoQueue` "
        "directly: N 4 KiB reads (one PRP entry each, page-aligned buffers DMA-mapped through "
        "VFIO), in batches of Q: submit Q commands, ring the SQ doorbell once, poll until all Q "
        "completed. It runs under callgrind, collecting only inside the three never-inlined "
        "wrappers of the driver's calls, so every counted instruction is the driver's:"
    )
    out.append("")
    out.append("```sh")
    out.append("# in the guest (the profiles come back in a tar file on a second NVMe image)")
    out.append("valgrind --tool=callgrind --toggle-collect='*bench_submit*' \\")
    out.append("    --toggle-collect='*bench_doorbell*' --toggle-collect='*bench_poll*' \\")
    out.append("    --toggle-collect='*bench_idle_poll*' pcie_check BDF --bench N --qd Q --idle-polls 0")
    out.append(f"pcie_check BDF --bench 32 --qd 32 --idle-polls {idle_polls}   # same valgrind options")
    out.append("# on the host")
    out.append("callgrind_annotate --inclusive=yes cg.qdQ | grep bench_")
    out.append("valgrind --tool=callgrind target/release/examples/pcie_cost 1000000 Q")
    out.append("```")
    out.append("")
    out.append(
        "*submit* is `bench_submit`: the caller's `DataRef::new` over one iovec and "
        "`PcieIoQueue::submit` (free-list pop, PRP build through "
        "`layout::describe`, SQE write, command table, the clock read for the first "
        "command of a batch); "
        "*doorbell* is `ring_doorbell` (one MMIO write per batch) spread over the batch; "
        "*poll* is `poll` for the polls that found completions (phase check, CID lookup, "
        "the callback, CQ head doorbell). Polls that found nothing "
        "while the emulated controller worked are counted by pcie_check and priced by a run "
        f"that polled the empty queue {idle_polls:,} times ({per_empty:,.1f} Ir each); "
        "they are taken out of *poll* and shown apart. Under TCG the controller is slow "
        "relative to the driver, so the number of empty polls says nothing about hardware."
    )
    out.append("")
    out.append(
        "| QD | I/Os | submit | doorbell | poll | **driver total** | polls per batch | "
        "empty polls (Ir per I/O, not in the total) |"
    )
    out.append("|---:|---:|---:|---:|---:|---:|---:|---:|")
    verdicts = []
    for r in runs:
        ios = int(r["ios"])
        batches = int(r["batches"])
        empty = int(r["empty_polls"])
        sub = int(r["submit_ir"]) / ios
        db = int(r["doorbell_ir"]) / ios
        poll_all = int(r["poll_ir"])
        poll = (poll_all - empty * per_empty) / ios
        total = sub + db + poll
        out.append(
            f"| {r['qd']} | {ios:,} | {sub:,.0f} | {db:,.1f} | {poll:,.0f} | **{total:,.0f}** | "
            f"{int(r['polls']) / batches:,.1f} | {empty * per_empty / ios:,.0f} |"
        )
        met = "met" if total <= TARGET else "not met"
        verdicts.append(f"{total:,.0f} at QD {r['qd']} ({met})")
    out.append("")
    out.append(f"Target ≤ {TARGET} instructions per 4 KiB I/O in the driver: " + "; ".join(verdicts) + ".")
    out.append("")
    out.append(
        "The hardware-independent core, `examples/pcie_cost.rs` on the host (the same "
        "`QueuePair` and PRP builder over plain memory, a model controller, no VFIO, no "
        "MMIO, no command bookkeeping of `PcieIoQueue`):"
    )
    out.append("")
    out.append("| batch | I/Os | submit_batch | complete_batch | **core total** |")
    out.append("|---:|---:|---:|---:|---:|")
    for b in sorted(core, reverse=True):
        ios, sub, comp = core[b]
        out.append(
            f"| {b} | {ios:,} | {sub / ios:,.0f} | {comp / ios:,.0f} | **{(sub + comp) / ios:,.0f}** |"
        )
    out.append("")
    ios_of = {int(r["qd"]): int(r["ios"]) for r in runs}
    own = {qd: own_costs(d / f"annotate.qd{qd}.txt", 10**6) for qd in (32, 1)}
    by_fn = {}
    for qd in (32, 1):
        for ir, entry in own[qd]:
            if entry.startswith("???:"):
                name = entry[4:] + " (libc)"
            else:
                name = short(entry, top).split(":", 1)[-1] if ".rs:" in entry else short(entry, top)
            by_fn.setdefault(name, {32: 0, 1: 0})[qd] += ir
    ranked = sorted(by_fn.items(), key=lambda kv: -kv[1][32])
    out.append(
        "Where the instructions go: each function's own Ir per I/O with what is inlined into "
        "it, empty polls included (callgrind runs the program without the vDSO, so "
        "`clock_gettime`, from the timestamp `submit` takes per batch, is a system call "
        "here and its kernel side is not counted):"
    )
    out.append("")
    out.append("| function | QD 32 | QD 1 |")
    out.append("|---|---:|---:|")
    for name, v in ranked[:10]:
        out.append(f"| `{name}` | {v[32] / ios_of[32]:,.1f} | {v[1] / ios_of[1]:,.1f} |")
    rest = {qd: sum(v[qd] for _, v in ranked[10:]) for qd in (32, 1)}
    out.append(f"| everything else | {rest[32] / ios_of[32]:,.1f} | {rest[1] / ios_of[1]:,.1f} |")
    out.append("")
    prp = sum(by_fn.get(f"vubd::nvme::pcie::layout::{n}", {32: 0})[32] for n in ("describe", "prps"))
    sub32 = next(int(r["submit_ir"]) for r in runs if r["qd"] == "32")
    out.append(
        f"Describing the data (`layout::describe` and `layout::prps`, for one page-aligned "
        f"4 KiB piece) is {prp / ios_of[32]:,.0f} of the {sub32 / ios_of[32]:,.0f} Ir of "
        f"submit; the core's whole submit path, PRP included, is "
        f"{core[32][1] / core[32][0]:,.0f}."
    )
    out.append("")
    out.append(
        "By source line's file, QD 32 (code of the standard library and of other modules "
        "inlined into the function shows under its own file), the largest first:"
    )
    out.append("")
    out.append("| file:function | Ir per I/O |")
    out.append("|---|---:|")
    for ir, entry in own[32][:12]:
        out.append(f"| `{short(entry, top)}` | {ir / ios_of[32]:,.1f} |")
    out.append("")
    out.append(END)
    section = "\n".join(out)

    text = doc.read_text()
    if BEGIN in text:
        text = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: section, text, flags=re.S)
    else:
        marker = "\n## Notes"
        i = text.find(marker)
        text = text[:i] + "\n" + section + "\n" + text[i:] if i >= 0 else text + "\n" + section + "\n"
    doc.write_text(text)


if __name__ == "__main__":
    main()
