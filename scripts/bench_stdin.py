"""Peak memory and wall time of `mt-translate` on hostile and long stdin streams.

    python scripts/bench_stdin.py saved/<run>/averaged.pt            # greedy, CPU, 1 thread

Three streams, each written to the child while it runs (a real pipe, not a file):

    1,000 lines        short German sentences: the baseline (torch, spaCy and the model)
    100,000 lines      the same sentences, 100 times as many
    one 64 MiB line    no newline for 64 MiB, then one short line

and for each the child's peak resident memory (VmHWM, read from /proc/self/status as it exits),
its wall time and the number of output lines. Memory must stay that of the baseline plus a
little, and time linear in the input: the reader keeps at most 64 KiB of any line.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRANSLATE = ROOT / "scripts" / "translate.py"
PEAK_RSS = ROOT / "scripts" / "peak_rss.py"  # runs a script, then reports its peak RSS
SENTENCES = [
    "Zwei Hunde spielen im Schnee.",
    "Ein Mann fährt Fahrrad.",
    "Eine Frau liest ein Buch.",
    "Kinder laufen am Strand.",
]


def lines(n: int) -> Iterator[bytes]:
    chunk = 1000
    block = "".join(SENTENCES[i % len(SENTENCES)] + "\n" for i in range(chunk)).encode()
    for _ in range(n // chunk):
        yield block


def endless_line(size: int) -> Iterator[bytes]:
    block = b"vier " * (1 << 18)  # 1.25 MiB
    for _ in range(size // len(block)):
        yield block
    yield b"\n" + SENTENCES[0].encode() + b"\n"


def measure(checkpoint: Path, feed: Callable[[], Iterator[bytes]]) -> tuple[float, float, int]:
    """(peak RSS MiB, seconds, output lines) of one translate run fed by `feed`."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "peak"
        command = [
            sys.executable,
            str(PEAK_RSS),
            str(report),
            str(TRANSLATE),
            str(checkpoint),
            "--beam",
            "1",
            "--batch-size",
            "256",
            "--device",
            "cpu",
        ]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        started = time.perf_counter()
        proc = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
        )

        def write() -> None:
            for block in feed():
                proc.stdin.write(block)
            proc.stdin.close()

        writer = threading.Thread(target=write)
        writer.start()
        count = sum(1 for _ in proc.stdout)
        writer.join()
        if proc.wait() != 0:
            raise SystemExit(f"translate failed ({proc.returncode})")
        seconds = time.perf_counter() - started
        return int(report.read_text()) / 1024, seconds, count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--line-mib", type=int, default=64)
    args = parser.parse_args()
    streams = {
        "1,000 lines": lambda: lines(1000),
        "100,000 lines": lambda: lines(100_000),
        f"one {args.line_mib} MiB line + 1": lambda: endless_line(args.line_mib << 20),
    }
    print(f"{'stdin':<22} {'peak RSS':>10} {'seconds':>8} {'lines out':>10}")
    for name, feed in streams.items():
        peak, seconds, count = measure(args.checkpoint, feed)
        print(f"{name:<22} {peak:>7.0f} MiB {seconds:>8.1f} {count:>10,}")


if __name__ == "__main__":
    main()
