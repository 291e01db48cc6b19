#!/usr/bin/env python3
"""Turns the raw results of benches/compare.sh, benches/callgrind.sh, benches/nvme_tcp.sh,
benches/qos.sh and benches/inflight_callgrind.sh (two sections: inflight tracking, the dirty log) into the tables of docs/benchmarks.md. Each script owns one
marked section of that file and rewrites only it; everything outside the markers (the notes)
is kept.

  report.py compare FACTS RESULTS.jsonl WORKDIR DOC
  report.py callgrind FACTS RESULTS.tsv DOC
  report.py inflight FACTS RESULTS.tsv DOC
  report.py nvme_tcp FACTS RESULTS.jsonl WORKDIR DOC
  report.py qos FACTS RESULTS.jsonl DOC
  report.py calls CALLGRIND.OUT LABEL IOS  (benches/nvme_tcp.sh: calls of syscall wrappers, TSV)
"""

import sys

from reporting.callgrind import callgrind
from reporting.compare import compare
from reporting.dirty_log import dirty_log
from reporting.inflight import inflight
from reporting.nvme_tcp import calls, nvme_tcp
from reporting.qos import qos


def main():
    if len(sys.argv) == 6 and sys.argv[1] == "compare":
        compare(*sys.argv[2:])
    elif len(sys.argv) == 5 and sys.argv[1] == "callgrind":
        callgrind(*sys.argv[2:])
    elif len(sys.argv) == 5 and sys.argv[1] == "inflight":
        inflight(*sys.argv[2:])
        dirty_log(*sys.argv[2:])
    elif len(sys.argv) == 6 and sys.argv[1] == "nvme_tcp":
        nvme_tcp(*sys.argv[2:])
    elif len(sys.argv) == 5 and sys.argv[1] == "qos":
        qos(*sys.argv[2:])
    elif len(sys.argv) == 5 and sys.argv[1] == "calls":
        calls(*sys.argv[2:])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
