"""What every report shares: the document skeleton, marked sections, number formats and
the machine table."""

import os
import statistics
import textwrap

SKELETON = """# Benchmarks

vubd measured against qemu-storage-daemon (QEMU's own vhost-user-blk export) and, for a file,
against fio on the same file; and vubd's NVMe/TCP initiator against a null namespace on
loopback. `benches/compare.sh`, `benches/callgrind.sh`, `benches/inflight_callgrind.sh`,
`benches/nvme_tcp.sh` and `benches/qos.sh` regenerate the marked sections below; they keep everything outside the
markers, such as the notes.

<!-- BEGIN compare.sh -->
<!-- END compare.sh -->

<!-- BEGIN callgrind.sh -->
<!-- END callgrind.sh -->

<!-- BEGIN inflight_callgrind.sh -->
<!-- END inflight_callgrind.sh -->

<!-- BEGIN inflight_callgrind.sh dirty log -->
<!-- END inflight_callgrind.sh dirty log -->

<!-- BEGIN nvme_tcp.sh -->
<!-- END nvme_tcp.sh -->

<!-- BEGIN qos.sh -->
<!-- END qos.sh -->

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
