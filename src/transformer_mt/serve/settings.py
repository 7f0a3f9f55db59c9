"""What a server accepts and how it batches: every default of `mt-serve` lives here."""

from __future__ import annotations

from dataclasses import dataclass

from transformer_mt.errors import ConfigError


@dataclass
class ServeSettings:
    """Bounds and batching of one server; `mt-serve --help` shows each as a flag."""

    host: str = "127.0.0.1"  # localhost only: put a proxy in front to serve a network
    port: int = 8000
    batching: bool = True  # False: every request is decoded on its own (for comparison)
    batch_wait_ms: float = 5.0  # how long the first request of a decode waits for company
    batch_tokens: int = 4096  # source tokens (EOS included) gathered into one decode at most
    max_body_bytes: int = 65536  # a larger request body is refused (413)
    max_sentences: int = 64  # sentences in one request (413)
    max_chars: int = 1000  # characters in one sentence (413)
    max_queue: int = 256  # requests waiting for a decode; one more is refused (503)
    timeout_s: float = 30.0  # a request not answered by then gets 503
    attention_max_tokens: int = 48  # source tokens of a sentence whose attention is asked (413)

    def __post_init__(self) -> None:
        for name in (
            "batch_tokens",
            "max_body_bytes",
            "max_sentences",
            "max_chars",
            "max_queue",
            "attention_max_tokens",
        ):
            value = getattr(self, name)
            if value < 1:
                raise ConfigError(f"--{flag(name)} must be at least 1 (got {value})")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"--port must be in [0, 65535] (got {self.port})")
        if not 0 <= self.batch_wait_ms <= 1000:
            raise ConfigError(f"--batch-wait-ms must be in [0, 1000] (got {self.batch_wait_ms})")
        if not self.timeout_s > 0:
            raise ConfigError(f"--timeout must be > 0 seconds (got {self.timeout_s})")


def flag(name: str) -> str:
    """The command-line flag of a setting: `max_body_bytes` -> `max-body-bytes`."""
    return "timeout" if name == "timeout_s" else name.replace("_", "-")


DEFAULTS = ServeSettings()
