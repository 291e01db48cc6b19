"""The section of benches/inflight_callgrind.sh: what inflight I/O tracking adds per I/O; and
what the dirty log section (reporting/dirty_log.py) shares with it."""

import os
import re

from .common import dirty, para, read_facts, write_section

# Instructions per I/O that tracking may add (issue 10).
TARGET = 60
# The repository's top directory, as the profiles name its files.
TOP = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))) + "/"


def annotated_lines(path, suffix):
    """(line number, Ir, source text) of each counted line of the source file whose name ends
    with `suffix`, from `callgrind_annotate` output with its auto-annotated sources (each a
    block headed `-- Auto-annotated source: FILE`, in chunks headed `-- line N ---`)."""
    out, inside, line_no = [], False, None
    chunk = re.compile(r"-- line (\d+) -+")
    counted = re.compile(r"\s*([\d,]+|\.)(?: \([^)]*\))?\s{2}(.*)$")
    for text in open(path).read().splitlines():
        if text.startswith("-- Auto-annotated source:"):
            inside = text.rstrip().endswith(suffix)
            line_no = 1
            continue
        if not inside:
            continue
        m = chunk.match(text)
        if m:
            line_no = int(m.group(1))
            continue
        if text.startswith("----") or text.startswith("Ir") or not text.strip():
            continue
        if "<counts for unidentified lines" in text:
            continue
        m = counted.match(text)
        if not m:
            continue
        if m.group(1) != ".":
            out.append((line_no, int(m.group(1).replace(",", "")), m.group(2).strip()))
        line_no += 1
    return out


def ir_by_file(path):
    """Exclusive Ir by source file of the code, from `callgrind_annotate --auto=no` output
    (`Ir (share) file:function`): inlined code counts under its own file."""
    out, listing = {}, False
    row = re.compile(r"\s*([\d,]+) \([^)]*\)\s+(\S.*?):\S")
    for text in open(path).read().splitlines():
        if "file:function" in text:
            listing = True
            continue
        if text.startswith("-- "):
            listing = False
        m = listing and row.match(text)
        if m:
            name = m.group(2)
            if name.startswith(TOP):
                name = name[len(TOP) :]
            name = re.sub(r"^/rustc/[0-9a-f]+/library/", "", name)
            name = re.sub(r"^.*/registry/src/[^/]+/", "", name)
            out[name] = out.get(name, 0) + int(m.group(1).replace(",", ""))
    return out


class Runs:
    """The runs of results.tsv: `best[(poll, inflight, dirty_log, qd)]` is, of several runs of
    one configuration, the one with the fewest empty polls."""

    def __init__(self, results_path):
        rows = [line.rstrip("\n").split("\t") for line in open(results_path) if line.strip()]
        header, rows = rows[0], rows[1:]
        self.idx = {h: i for i, h in enumerate(header)}
        self.here = os.path.dirname(results_path)
        idle = next(r for r in rows if self.get(r, "run") == "idle")
        spin = self.n(idle, "spin_ir")
        self.per_spin = self.n(idle, "thread_ir") / spin if spin else 0.0
        self.best = {}
        for r in rows:
            if self.get(r, "run") == "idle":
                continue
            key = tuple(self.get(r, k) for k in ("poll", "inflight", "dirty_log", "qd"))
            if key not in self.best or self.work(r)[1] < self.work(self.best[key])[1]:
                self.best[key] = r

    def get(self, r, k):
        return r[self.idx[k]]

    def n(self, r, k):
        return int(r[self.idx[k]])

    def work(self, r):
        """Ir per I/O of the poller without its empty polls, and their share."""
        n = self.n
        empty = min(n(r, "spin_ir") * self.per_spin + n(r, "warm_ir"), n(r, "thread_ir"))
        return (n(r, "thread_ir") - empty) / n(r, "ios"), empty / n(r, "thread_ir")

    def table(self, pairs, target):
        """The rows of an off / on table and the verdicts against `target`, for `pairs(poll,
        qd)` giving the (off, on) keys."""
        lines, verdict = [], []
        for poll in ("always", "never"):
            for qd in ("1", "32"):
                off, on = (self.best.get(k) for k in pairs(poll, qd))
                if not (off and on):
                    continue
                (w_off, e_off), (w_on, e_on) = self.work(off), self.work(on)
                added = w_on - w_off
                empty = f"{e_off * 100:.0f}% / {e_on * 100:.0f}%" if poll == "always" else "–"
                lines.append(
                    f"| `--poll {poll}` | {qd} | {self.n(on, 'ios'):,} | {w_off:,.0f} "
                    f"| {w_on:,.0f} | **{added:+,.0f}** | {empty} |"
                )
                if target is not None:
                    ok = "met" if added <= target else "**not met**"
                    verdict.append(f"{added:+,.0f} with `--poll {poll}` at QD {qd} ({ok})")
        return lines, verdict

    def by_file(self, pairs):
        """{source file: {qd: Ir per I/O on less off}} for `--poll never`, from the runs'
        per-function profiles, with the files that moved by half an instruction or more,
        the largest difference at QD 1 first."""
        files = {}
        for qd in ("1", "32"):
            off, on = (self.best.get(k) for k in pairs("never", qd))
            if not (off and on):
                continue
            paths = [os.path.join(self.here, f"{self.get(r, 'run')}.functions.txt") for r in (off, on)]
            if all(os.path.exists(p) for p in paths):
                a, b = ir_by_file(paths[0]), ir_by_file(paths[1])
                for k in set(a) | set(b):
                    files.setdefault(k, {})[qd] = (b.get(k, 0) - a.get(k, 0)) / self.n(on, "ios")
        shown = sorted(
            (k for k, v in files.items() if max(abs(x) for x in v.values()) >= 0.5),
            key=lambda k: -files[k].get("1", 0),
        )
        return [(k, files[k]) for k in shown]


def inflight(facts_path, results_path, doc):
    facts = read_facts(facts_path)
    runs = Runs(results_path)
    n, per_spin = runs.n, runs.per_spin

    def pairs(poll, qd):
        return [(poll, "off", "off", qd), (poll, "on", "off", qd)]

    rows, verdict = runs.table(pairs, TARGET)
    if not rows:
        return  # SETS without `inflight`: the section stays as it was.
    lines = [
        "## Inflight I/O tracking: instructions per I/O (callgrind)",
        "",
        para(
            f"`benches/inflight_callgrind.sh` ({facts['valgrind']}, commit {facts['commit']}"
            f"{dirty(facts)}, {facts['date']}): vubd serves a 16 GiB null device on one "
            f"poller pinned to CPU {facts['backend_cpu']}, under `valgrind --tool=callgrind "
            "--separate-threads=yes`, and `examples/vhost_frontend_load.rs` (the tests' own "
            "frontend, native, on the other CPU) reads 4 KiB blocks at a fixed queue depth for "
            "a fixed count, spinning on the used ring with interrupts off. *Tracking on*: the "
            "client negotiates INFLIGHT_SHMFD and hands vubd the region (GET_INFLIGHT_FD, "
            "SET_INFLIGHT_FD), so the poller records every pop (`begin`) and completion "
            "(`link`, then `published` once per batch); *off*: it does not, and the poller only "
            "tests for the region. The count is the poller thread's instructions divided by "
            "the reads."
        ),
        "",
        para(
            "With `--poll always` it is taken as `benches/callgrind.sh` takes it: less the "
            "empty polls (priced by a run whose client went idle after 1000 reads: "
            f"{per_spin:,.1f} Ir per pass of the spin-loop hint) and the prefetches of the "
            "first empty passes after a request. When the machine is busy the client is often "
            "descheduled, the empty polls become most of the count, and the difference of two "
            "runs is only as good as their pricing: a run with more than 2 % of them is made "
            "again, up to 3 times, and the one with the fewest is shown. With `--poll never` "
            "there are no empty polls: the poller sleeps when it finds no work and the "
            "client's kick wakes it; how often it tries depends on the client's timing too, "
            "but a try costs far less."
        ),
        "",
        "```sh",
        "benches/inflight_callgrind.sh      # IOS=200000 reads per run by default",
        "```",
        "",
        "| vubd | QD | reads | tracking off: Ir per I/O | tracking on: Ir per I/O | **added** "
        "| empty polls taken out (off / on) |",
        "|---|---:|---:|---:|---:|---:|---:|",
        *rows,
    ]
    if verdict:
        lines += [
            "",
            para(f"Target ≤ {TARGET} instructions added per I/O: " + "; ".join(verdict) + "."),
        ]

    shown = runs.by_file(pairs)
    if shown:
        lines += [
            "",
            para(
                "Where the added instructions are (`--poll never`): the poller's instructions "
                "by the source file of the code (inlined code counts under its own file: the region's "
                "volatile loads and stores under `core/src/ptr/mod.rs`, `published`'s loop "
                "under `core/src/iter/range.rs`), tracking on less tracking off, per I/O:"
            ),
            "",
            "| source file | QD 1 | QD 32 |",
            "|---|---:|---:|",
        ]
        for k, v in shown:
            lines.append(f"| `{k}` | {v.get('1', 0):+.1f} | {v.get('32', 0):+.1f} |")

    annotate = os.path.join(runs.here, "annotate.txt")
    on1 = runs.best.get(("never", "on", "off", "1"))
    if os.path.exists(annotate) and on1:
        counted = annotated_lines(annotate, "src/virtio_blk/inflight.rs")
        ios = n(on1, "ios")
        total = sum(ir for _, ir, _ in counted)
        if counted:
            lines += [
                "",
                para(
                    "The lines of `src/virtio_blk/inflight.rs` among them (`--poll never`, "
                    "tracking on, QD 1; "
                    f"{total / ios:,.1f} Ir per I/O in all): `begin`, `link` and `published` "
                    "are `#[inline(always)]`, so these are their offset arithmetic, bounds "
                    "checks and counters; their loads and stores are in the `core/src/ptr/mod.rs` "
                    "line above:"
                ),
                "",
                "| line | Ir per I/O | source |",
                "|---:|---:|---|",
            ]
            for line_no, ir, text in counted:
                if ir / ios >= 0.05:
                    lines.append(f"| {line_no} | {ir / ios:.2f} | `{text}` |")
    write_section(doc, "inflight_callgrind.sh", "\n".join(lines))
