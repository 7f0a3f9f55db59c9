"""What a server has done, in Prometheus' text exposition format (`GET /metrics`).

Plain counters updated on the event loop (one thread), so no locks; no client library needed.
"""

from __future__ import annotations

import bisect
from collections import Counter
from dataclasses import dataclass, field

# Upper bounds of the latency histogram's buckets, in seconds (Prometheus' `le` labels).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@dataclass
class Histogram:
    bounds: tuple[float, ...] = LATENCY_BUCKETS
    counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    total: float = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    def lines(self, name: str) -> list[str]:
        out, running = [], 0
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += count
            le = "+Inf" if bound == float("inf") else repr(bound)
            out.append(f'{name}_bucket{{le="{le}"}} {running}')
        return [*out, f"{name}_sum {self.total:.6f}", f"{name}_count {running}"]


@dataclass
class ServerMetrics:
    """Counts of requests, sentences, errors and decodes, and the translate latency."""

    responses: Counter = field(default_factory=Counter)  # (route, status) -> responses
    sentences: int = 0  # sentences translated
    in_flight: int = 0  # translate requests received and not yet answered
    decodes: int = 0  # batches handed to the model
    decoded_requests: int = 0  # requests in those batches
    shared_requests: int = 0  # requests decoded together with at least one other
    largest_decode: int = 0  # most requests one decode has held
    latency: Histogram = field(default_factory=Histogram)

    def decoded(self, requests: int) -> None:
        """One decode of `requests` requests has finished."""
        self.decodes += 1
        self.decoded_requests += requests
        if requests > 1:
            self.shared_requests += requests
        self.largest_decode = max(self.largest_decode, requests)

    def batching(self) -> dict[str, int]:
        return {
            "decodes": self.decodes,
            "decoded_requests": self.decoded_requests,
            "shared_decode_requests": self.shared_requests,
            "largest_decode_requests": self.largest_decode,
        }

    def render(self, queue_depth: int) -> str:
        """The whole exposition, one metric family after another."""
        lines = [
            "# HELP mt_requests_total HTTP responses by route and status.",
            "# TYPE mt_requests_total counter",
            *(
                f'mt_requests_total{{route="{route}",status="{status}"}} {count}'
                for (route, status), count in sorted(self.responses.items())
            ),
            "# HELP mt_errors_total Responses with a status of 400 or more.",
            "# TYPE mt_errors_total counter",
            f"mt_errors_total {sum(c for (_, s), c in self.responses.items() if s >= 400)}",
            "# HELP mt_sentences_total Sentences translated.",
            "# TYPE mt_sentences_total counter",
            f"mt_sentences_total {self.sentences}",
            "# HELP mt_queue_depth Requests waiting for a decode.",
            "# TYPE mt_queue_depth gauge",
            f"mt_queue_depth {queue_depth}",
            "# HELP mt_in_flight_requests Translate requests received and not yet answered.",
            "# TYPE mt_in_flight_requests gauge",
            f"mt_in_flight_requests {self.in_flight}",
            "# HELP mt_decodes_total Batches decoded by the model.",
            "# TYPE mt_decodes_total counter",
            f"mt_decodes_total {self.decodes}",
            "# HELP mt_decoded_requests_total Requests in those batches.",
            "# TYPE mt_decoded_requests_total counter",
            f"mt_decoded_requests_total {self.decoded_requests}",
            "# HELP mt_shared_decode_requests_total Requests decoded together with another one.",
            "# TYPE mt_shared_decode_requests_total counter",
            f"mt_shared_decode_requests_total {self.shared_requests}",
            "# HELP mt_largest_decode_requests Most requests one decode has held.",
            "# TYPE mt_largest_decode_requests gauge",
            f"mt_largest_decode_requests {self.largest_decode}",
            "# HELP mt_translate_seconds Time from receiving a translate request to answering it.",
            "# TYPE mt_translate_seconds histogram",
            *self.latency.lines("mt_translate_seconds"),
        ]
        return "\n".join(lines) + "\n"
