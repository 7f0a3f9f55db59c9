"""Throughput and latency of `mt-serve` under concurrent clients, with batching on and off.

Starts the server on a free localhost port for each mode (batching on, then `--no-batching`),
with the same checkpoint and settings, and sends one-sentence requests from 1, 8 and 32 client
threads (each with its own keep-alive connection) until `--requests` have been answered at each
level (after a few requests that are not counted). Reports sentences per second, p50 / p95
latency and the mean number of requests each decode held (from the server's /metrics), and after
each mode the server's peak RSS (VmHWM). `--sentences-per-request N` sends N lines in each
request instead of one: the peak RSS at two numbers of requests, and with the largest requests
the bounds allow, shows whether memory follows the bounds or the traffic.

    python scripts/bench_serve.py saved/<run>/best.pt --input data/multi30k/test_2016_flickr.de.gz
    python scripts/bench_serve.py CKPT --input test.de --clients 1,8 --requests 64 --beam 1
    python scripts/bench_serve.py --url http://127.0.0.1:8000 --input test.de   # a running server

Figures are only meaningful on a quiet machine; put them in docs/benchmarks.md with the command.
"""

from __future__ import annotations

import argparse
import gzip
import http.client
import json
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NoReturn

ROOT = Path(__file__).resolve().parents[1]
START_SECONDS = 180
WARMUP_REQUESTS = 4  # sent to each server before it is measured, and not counted


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", nargs="?", help="checkpoint to serve (or give --url)")
    parser.add_argument("--url", help="benchmark this running server instead (one mode only)")
    parser.add_argument("--input", required=True, help="source sentences, one a line (.gz ok)")
    parser.add_argument("--clients", default="1,8,32", help="concurrency levels (default: 1,8,32)")
    parser.add_argument("--requests", type=int, default=256, help="requests per level")
    parser.add_argument("--beam", type=int, help="beam size of the requests (default: server's)")
    parser.add_argument(
        "--sentences-per-request", type=int, default=1, help="lines sent in each request"
    )
    parser.add_argument(
        "--server-args", default="", help='more mt-serve options, e.g. "--batch-wait-ms 10"'
    )
    args = parser.parse_args(argv)
    if (args.checkpoint is None) == (args.url is None):
        parser.error("give a checkpoint to serve, or --url of a running server")
    if args.sentences_per_request < 1 or args.requests < 1:
        parser.error("--sentences-per-request and --requests must be at least 1")
    return args


def fail(message: str) -> NoReturn:
    """A one-line error on stderr and exit status 2, as the project's commands do."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def read_lines(path: str) -> list[str]:
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as handle:
            lines = [line.strip() for line in handle if line.strip()]
    except (OSError, UnicodeDecodeError) as err:
        fail(f"cannot read {path}: {err}")
    if not lines:
        fail(f"{path} has no sentences")
    return lines


class Client:
    """One keep-alive connection to the server."""

    def __init__(self, url: str) -> None:
        parts = urllib.parse.urlsplit(url)
        self.connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=120)

    def post(self, path: str, body: dict) -> dict:
        data = json.dumps(body).encode()
        self.connection.request("POST", path, data, {"Content-Type": "application/json"})
        response = self.connection.getresponse()
        answer = json.loads(response.read())
        if response.status != 200:
            raise RuntimeError(f"{path}: {response.status} {answer.get('error')}")
        return answer

    def get(self, path: str) -> str:
        self.connection.request("GET", path)
        return self.connection.getresponse().read().decode()

    def close(self) -> None:
        self.connection.close()


def metric(url: str, name: str) -> float:
    client = Client(url)
    try:
        for line in client.get("/metrics").splitlines():
            if line.startswith(name + " "):
                return float(line.split()[-1])
    finally:
        client.close()
    raise RuntimeError(f"/metrics has no {name}")


def run_level(
    url: str, sentences: list[str], clients: int, requests: int, beam: int | None, per: int = 1
):
    """(sentences/s, p50 s, p95 s, requests per decode) of `requests` requests of `per`
    sentences each, sent by `clients` threads at once."""
    counter = iter(range(requests))
    lock = threading.Lock()
    latencies: list[float] = []

    def work() -> None:
        client = Client(url)
        try:
            while True:
                with lock:
                    index = next(counter, None)
                if index is None:
                    return
                first = index * per
                body = {"text": [sentences[(first + k) % len(sentences)] for k in range(per)]}
                if beam is not None:
                    body["beam_size"] = beam
                start = time.perf_counter()
                client.post("/translate", body)
                with lock:
                    latencies.append(time.perf_counter() - start)
        finally:
            client.close()

    decodes = metric(url, "mt_decodes_total")
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        for future in [pool.submit(work) for _ in range(clients)]:
            future.result()
    seconds = time.perf_counter() - start
    decodes = metric(url, "mt_decodes_total") - decodes
    cuts = statistics.quantiles(latencies, n=20) if len(latencies) > 1 else latencies * 19
    rate = requests * per / seconds
    return rate, statistics.median(latencies), cuts[18], requests / max(decodes, 1)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def started_server(checkpoint: str, options: list[str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "scripts" / "serve.py"), checkpoint, "--port", str(port)]
        + ["--log-level", "warning", *options],
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + START_SECONDS
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            fail(f"mt-serve exited with status {proc.returncode}")
        try:
            Client(url).get("/health")
            return proc, url
        except OSError:
            time.sleep(0.2)
    proc.kill()
    fail(f"mt-serve did not answer within {START_SECONDS} s")


def modes(args: argparse.Namespace) -> Iterator[tuple[str, str, int | None]]:
    """(name, url, pid) of each server to measure (pid None: not started here); a started server
    is stopped after its turn."""
    if args.url:
        yield "as running", args.url.rstrip("/"), None
        return
    extra = args.server_args.split()
    for name, options in (("batching on", extra), ("batching off", [*extra, "--no-batching"])):
        proc, url = started_server(args.checkpoint, options)
        try:
            yield name, url, proc.pid
        finally:
            proc.terminate()
            proc.wait(60)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    sentences = read_lines(args.input)
    levels = [int(n) for n in args.clients.split(",")]
    per = args.sentences_per_request
    print(f"{len(sentences)} sentences; {args.requests} requests of {per} per level")
    print(f"{'mode':<14}{'clients':>8}{'sent/s':>10}{'p50 ms':>10}{'p95 ms':>10}{'req/decode':>12}")
    for name, url, pid in modes(args):
        run_level(url, sentences, 1, WARMUP_REQUESTS, args.beam, per)  # first calls are slow
        for clients in levels:
            rate, p50, p95, shared = run_level(
                url, sentences, clients, args.requests, args.beam, per
            )
            print(
                f"{name:<14}{clients:>8}{rate:>10.1f}{p50 * 1000:>10.1f}{p95 * 1000:>10.1f}"
                f"{shared:>12.2f}",
                flush=True,
            )
        if pid is not None:
            print(f"{name}: server peak RSS {peak_rss_mib(pid):,.0f} MiB", flush=True)


def peak_rss_mib(pid: int) -> float:
    """The peak resident memory (VmHWM) of process `pid` so far, in MiB."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


if __name__ == "__main__":
    main()
