"""The section of benches/callgrind.sh: instructions per I/O under callgrind."""

import os

from .common import annotate_block, dirty, para, read_facts, write_section


def vubd_args(facts):
    """The arguments `VUBD_ARGS` gave every vubd run, as the report names them."""
    args = facts.get("vubd_args", "")
    return f", vubd with `{args}`" if args else ""


def callgrind(facts_path, results_path, doc):
    facts = read_facts(facts_path)
    rows = [line.rstrip("\n").split("\t") for line in open(results_path) if line.strip()]
    header, rows = rows[0], rows[1:]
    idx = {h: i for i, h in enumerate(header)}
    g = lambda r, k: r[idx[k]]  # noqa: E731
    # The prefetches of the poller's first empty passes after a request (`poller::warm`),
    # counted with the empty polls: waiting, not serving.
    warm = lambda r: int(r[idx["warm_ir"]]) if "warm_ir" in idx else 0  # noqa: E731
    idle = [r for r in rows if g(r, "backend") == "idle"]
    per_spin = None
    if idle and int(g(idle[0], "spin_ir")):
        per_spin = int(g(idle[0], "thread_ir")) / int(g(idle[0], "spin_ir"))
    lines = [
        "## Instructions per I/O (callgrind)",
        "",
        para(
            f"`benches/callgrind.sh` ({facts['valgrind']}, commit {facts['commit']}"
            f"{dirty(facts)}, {facts['date']}{vubd_args(facts)}): the backend serves a 16 GiB null device under "
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
            + "; the last column takes them out, together with the prefetches the poller makes "
            "in its first empty passes after a request (`poller::warm`, a function of its own "
            "in the profile). With `--poll never` there are no empty "
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
            empty = min(spin * per_spin + warm(r), th)
            share, work = f"{empty / th * 100:.0f}%", f"**{(th - empty) / ios:,.0f}**"
        elif "never" in g(r, "backend"):
            share, work = "0%", f"**{(th - warm(r)) / ios:,.0f}**"
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
            work = (th - min(spin * per_spin + warm(r), th)) / ios
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
        spin = int(g(top[0], "spin_ir")) * (per_spin or 0) + warm(top[0])
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
                if "Warm::warm_lines" in fn:
                    rest -= ir  # with the empty polls
                elif ir / ios >= 1:
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
