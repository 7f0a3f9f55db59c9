"""Run a Python script and report its peak resident memory (used by bench_stdin.py and the tests).

    python scripts/peak_rss.py REPORT SCRIPT [ARGS...]

SCRIPT runs as __main__ with ARGS; on exit its peak resident memory (VmHWM, in KiB) is written to
the file REPORT. VmHWM belongs to this process's address space since exec; getrusage's ru_maxrss
would also count the memory of a forked parent.
"""

import atexit
import runpy
import sys


def write_peak(report: str) -> None:
    with open("/proc/self/status") as status:
        peak = next(line.split()[1] for line in status if line.startswith("VmHWM:"))
    with open(report, "w") as out:
        out.write(peak)


if __name__ == "__main__":
    report, sys.argv = sys.argv[1], sys.argv[2:]
    atexit.register(write_peak, report)
    runpy.run_path(sys.argv[0], run_name="__main__")
