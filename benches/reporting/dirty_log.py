"""The dirty log section of benches/inflight_callgrind.sh: what marking the pages a read
writes in a migration's dirty log adds per I/O."""

import os
import re

from .common import dirty, para, read_facts, write_section
from .inflight import Runs, annotated_lines

# The functions of src/poller/dirty.rs, the poller's calls into the log.
FUNCTIONS = ("vubd::poller::dirty::request", "vubd::poller::dirty::used_ring")
# The source files of the marking code, for the line-by-line table.
SOURCES = ("src/mem/dirty_log.rs", "src/poller/dirty.rs")


def inclusive(path, function):
    """Inclusive Ir of `function` in `callgrind_annotate --inclusive=yes` output."""
    row = re.compile(r"\s*([\d,]+) \([^)]*\)\s+\S*:" + re.escape(function) + r"(\s|$)")
    for text in open(path).read().splitlines():
        m = row.match(text)
        if m:
            return int(m.group(1).replace(",", ""))
    return 0


def dirty_log(facts_path, results_path, doc):
    facts = read_facts(facts_path)
    runs = Runs(results_path)
    n = runs.n

    def pairs(poll, qd):
        return [(poll, "on", "off", qd), (poll, "on", "on", qd)]

    rows, _ = runs.table(pairs, None)
    if not rows:
        return  # SETS without `dirty_log`: the section stays as it was.
    lines = [
        "## Dirty page logging: instructions per I/O (callgrind)",
        "",
        para(
            f"`benches/inflight_callgrind.sh` ({facts['valgrind']}, commit {facts['commit']}"
            f"{dirty(facts)}, {facts['date']}), the runs of the inflight section above with "
            "tracking on, and the same with a live migration's dirty log on: the client "
            "negotiates LOG_SHMFD, hands vubd a log memfd (SET_LOG_BASE, one bit per 4 KiB "
            "page of guest physical address space) and sets VHOST_F_LOG_ALL (SET_FEATURES), "
            "as QEMU does when a migration starts; at the end it checks that the log has the "
            "pages of the used ring and of every read's buffer and status byte marked. The "
            "count and the treatment of empty polls are as in the inflight section."
        ),
        "",
        "```sh",
        "benches/inflight_callgrind.sh      # both sections; SETS=dirty_log for this one only",
        "```",
        "",
        "| vubd (tracking on) | QD | reads | log off: Ir per I/O | log on: Ir per I/O "
        "| **added** | empty polls taken out (off / on) |",
        "|---|---:|---:|---:|---:|---:|---:|",
        *rows,
    ]

    calls = []
    for qd in ("1", "32"):
        on = runs.best.get(("never", "on", "on", qd))
        path = os.path.join(runs.here, f"inclusive_log_{qd}.txt")
        if on and os.path.exists(path):
            calls.append((qd, [inclusive(path, f) / n(on, "ios") for f in FUNCTIONS]))
    if calls:
        lines += [
            "",
            para(
                "The poller's two calls into the log (`--poll never`, `callgrind_annotate "
                "--inclusive=yes`, per read): `dirty::request` once per read (its data "
                "iovecs through `DirtyLog::mark_host`, then its status byte), "
                "`dirty::used_ring` once per batch of completions:"
            ),
            "",
            "| QD | `dirty::request` | `dirty::used_ring` |",
            "|---:|---:|---:|",
        ]
        for qd, (req, used) in calls:
            lines.append(f"| {qd} | {req:,.1f} | {used:,.1f} |")

    shown = runs.by_file(pairs)
    if shown:
        lines += [
            "",
            para(
                "By the source file of the code (`--poll never`, inlined code under its own "
                "file), log on less log off, per I/O:"
            ),
            "",
            "| source file | QD 1 | QD 32 |",
            "|---|---:|---:|",
        ]
        for k, v in shown:
            lines.append(f"| `{k}` | {v.get('1', 0):+.1f} | {v.get('32', 0):+.1f} |")

    annotate = os.path.join(runs.here, "annotate_log.txt")
    on1 = runs.best.get(("never", "on", "on", "1"))
    if os.path.exists(annotate) and on1:
        ios = n(on1, "ios")
        counted = [(src, *c) for src in SOURCES for c in annotated_lines(annotate, src)]
        counted = [c for c in counted if c[2] / ios >= 0.05]
        if counted:
            lines += [
                "",
                para(
                    "Their lines (`--poll never`, QD 1; lines of `mark` count for all three "
                    "of a read's marks: data, status byte, used ring):"
                ),
                "",
                "| file | line | Ir per I/O | source |",
                "|---|---:|---:|---|",
            ]
            for src, line_no, ir, text in counted:
                lines.append(f"| `{src}` | {line_no} | {ir / ios:.2f} | `{text}` |")
    write_section(doc, "inflight_callgrind.sh dirty log", "\n".join(lines))
