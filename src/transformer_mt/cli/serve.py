"""`mt-serve` / `python scripts/serve.py CHECKPOINT`: translate over HTTP with one model in memory.

Needs the `serve` extra (`pip install 'transformer-mt[serve]'`): Starlette and uvicorn. The routes
and their answers are in `transformer_mt.serve.app`; every flag's default in `ServeSettings`.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence

from transformer_mt.cli.common import report_user_errors
from transformer_mt.cli.translate import beam_preset, decode_config
from transformer_mt.errors import ConfigError
from transformer_mt.inference.translator import Translator
from transformer_mt.serve.settings import DEFAULTS, ServeSettings

try:  # the serve extra; without it `mt-serve` says how to install it
    import uvicorn

    from transformer_mt.serve.app import Server
    from transformer_mt.serve.engine import Engine

    MISSING_EXTRA = None
except ModuleNotFoundError as err:
    if err.name not in ("starlette", "uvicorn"):
        raise
    MISSING_EXTRA = err.name

EPILOG = """\
examples:
  %(prog)s saved/RUN/best.pt                       # http://127.0.0.1:8000/ (the page)
  %(prog)s saved/RUN/best.pt --port 9000 --beam 1  # greedy by default; requests may ask for more
  curl -s localhost:8000/translate -d '{"text": ["Ein Mann fährt Fahrrad."], "nbest": 2}'

Requests are gathered for --batch-wait-ms (or until --batch-tokens source tokens) and decoded as
one batch; --no-batching decodes each request alone. SIGTERM (or Ctrl-C) stops taking requests,
answers those in flight, then exits.
"""


def build_parser() -> argparse.ArgumentParser:
    preset = beam_preset()
    d = DEFAULTS
    parser = argparse.ArgumentParser(
        prog="mt-serve",
        description="Serve a trained checkpoint over HTTP: POST /translate, the page at /.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("checkpoint", help="checkpoint file written by training")
    parser.add_argument("--host", default=d.host, help=f"address to bind (default: {d.host})")
    parser.add_argument("--port", type=int, default=d.port, help=f"(default: {d.port})")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument(
        "--beam",
        type=int,
        default=preset.beam_size,
        metavar="N",
        help=f"default beam size, as mt-translate's (default: {preset.beam_size})",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=preset.batch_size,
        metavar="N",
        help=f"most sentences the model searches at once (default: {preset.batch_size})",
    )
    batching = parser.add_argument_group("batching across requests")
    batching.add_argument(
        "--no-batching",
        dest="batching",
        action="store_false",
        help="decode each request on its own (for comparison)",
    )
    batching.add_argument(
        "--batch-wait-ms",
        type=float,
        default=d.batch_wait_ms,
        metavar="MS",
        help=f"how long a request waits for others to share its decode (default: {d.batch_wait_ms:g})",
    )
    batching.add_argument(
        "--batch-tokens",
        type=int,
        default=d.batch_tokens,
        metavar="N",
        help=f"source tokens gathered into one decode at most (default: {d.batch_tokens})",
    )
    bounds = parser.add_argument_group("bounds (a request past one is refused with its status)")
    for name, unit, status in (
        ("max_body_bytes", "bytes in a request body", 413),
        ("max_sentences", "sentences in a request", 413),
        ("max_chars", "characters in a sentence", 413),
        ("max_queue", "requests waiting for a decode", 503),
        ("attention_max_tokens", "source tokens of a sentence sent to /attention", 413),
    ):
        default = getattr(d, name)
        bounds.add_argument(
            f"--{name.replace('_', '-')}",
            type=int,
            default=default,
            metavar="N",
            help=f"most {unit} (default: {default}; past it: {status})",
        )
    bounds.add_argument(
        "--timeout",
        dest="timeout_s",
        type=float,
        default=d.timeout_s,
        metavar="S",
        help=f"seconds a request may take (default: {d.timeout_s:g}; past it: 503)",
    )
    parser.add_argument(
        "--log-level",
        default="info",
        choices=("critical", "error", "warning", "info", "debug"),
        help="uvicorn's log level (default: info: one line per request)",
    )
    return parser


def serve_settings(args: argparse.Namespace) -> ServeSettings:
    return ServeSettings(
        host=args.host,
        port=args.port,
        batching=args.batching,
        batch_wait_ms=args.batch_wait_ms,
        batch_tokens=args.batch_tokens,
        max_body_bytes=args.max_body_bytes,
        max_sentences=args.max_sentences,
        max_chars=args.max_chars,
        max_queue=args.max_queue,
        timeout_s=args.timeout_s,
        attention_max_tokens=args.attention_max_tokens,
    )


@report_user_errors
def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if MISSING_EXTRA:
        raise ConfigError(
            f"mt-serve needs {MISSING_EXTRA}: pip install 'transformer-mt[serve]' "
            "(or `pip install -e '.[serve]'` in a checkout)"
        )
    settings = serve_settings(args)
    # The option checks and defaults of mt-translate, so both translate a sentence alike.
    decode_cfg = decode_config(
        argparse.Namespace(beam=args.beam, nbest=1, batch_size=args.batch_size)
    )
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    translator = Translator.from_checkpoint(args.checkpoint, args.device, decode_cfg)
    server = Server(Engine(translator, args.checkpoint), settings)
    config = uvicorn.Config(
        server.app(),
        host=settings.host,
        port=settings.port,
        log_level=args.log_level,
        # SIGTERM: stop listening, answer what is in flight (for at most a request's time), exit.
        timeout_graceful_shutdown=int(settings.timeout_s) + 1,
    )
    uvicorn.Server(config).run()


if __name__ == "__main__":
    main()
