"""`mt-translate` / `python scripts/translate.py`: translate sentences with a trained checkpoint.

Sentences come from the command line, from a file (`--input`) or from stdin, which is read as a
stream: lines are translated in small chunks as they arrive and each chunk's output is flushed at
once, so the command can sit in a shell pipeline and memory stays bounded however long the input.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from typing import IO, BinaryIO, TextIO

from transformer_mt.cli.common import config_file, report_user_errors
from transformer_mt.config import DecodeConfig, to_dataclass
from transformer_mt.errors import ConfigError
from transformer_mt.files import atomic_writer
from transformer_mt.inference.translator import Translator
from transformer_mt.plots import plot_attention

READ_BYTES = 1 << 16  # most bytes taken from the input at once (about a thousand short lines)
# Longest input line kept, in bytes: far more than a model reads (model.max_positions tokens).
MAX_LINE_BYTES = 1 << 16

log = logging.getLogger(__name__)

DESCRIPTION = """\
Translate sentences with a trained checkpoint: one output line per input line, in input order.

Input, in this order of preference: the SENTENCE arguments; the file given by --input; stdin, read
line by line as a stream (each chunk of lines is translated and flushed as soon as it has arrived).
An empty input line gives an empty output line. Input bytes that are not valid UTF-8 are replaced by
U+FFFD (the Unicode replacement character) instead of stopping the stream.

A sentence longer than the model can read is truncated to what it can, with a warning on stderr;
an input line longer than 64 KiB is cut to its first 64 KiB as it is read.
"""

EPILOG = """\
examples:
  %(prog)s saved/RUN/best.pt "Ein Mann fährt Fahrrad." "Zwei Hunde."
  echo "Zwei Hunde spielen im Schnee." | %(prog)s saved/RUN/best.pt
  %(prog)s saved/RUN/best.pt --input test.de --output test.en --batch-size 64
  %(prog)s saved/RUN/best.pt --beam 1 --device cpu "Zwei Hunde."   # greedy, on the CPU
  %(prog)s saved/RUN/best.pt --nbest 3 "Ein Mann fährt Fahrrad."
  %(prog)s saved/RUN/best.pt --attention attention.png "Ein Mann fährt Fahrrad."
  %(prog)s saved/RUN/best.pt -- "-Ein Satz, der mit einem Bindestrich beginnt."

--nbest K prints K lines per input line (one for an empty line), best first, each
  LINE<TAB>SCORE<TAB>TRANSLATION
where LINE is the input line number (from 1) and SCORE the log-probability divided by the GNMT
length penalty ((5 + length) / 6) ** alpha (higher is better).

Exit status: 0 on success; 2 with a one-line "error: ..." on stderr for a missing or unreadable
checkpoint, a bad option or an unwritable output file.
"""


def build_parser() -> argparse.ArgumentParser:
    preset = beam_preset()
    parser = argparse.ArgumentParser(
        prog="mt-translate",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "checkpoint", help="checkpoint file written by training, e.g. saved/RUN/best.pt"
    )
    parser.add_argument(
        "sentences",
        nargs="*",
        metavar="SENTENCE",
        help="sentences to translate (none: read --input, else stdin)",
    )
    parser.add_argument(
        "--input", metavar="FILE", help="translate this UTF-8 text file, one sentence per line"
    )
    parser.add_argument(
        "--output",
        metavar="FILE",
        help="write the translations here instead of stdout (the file appears complete or not at all)",
    )
    parser.add_argument(
        "--beam",
        type=int,
        default=preset.beam_size,
        metavar="N",
        help=f"beam size; 1 = greedy search (default: {preset.beam_size}, as mt-evaluate)",
    )
    parser.add_argument(
        "--nbest",
        type=int,
        default=1,
        metavar="K",
        help="print the K best translations of each line with their scores (K <= N; see below)",
    )
    parser.add_argument(
        "--device",
        default="auto",
        help="auto (GPU if there is one), cpu, cuda or cuda:N (default: auto)",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=preset.batch_size,
        metavar="N",
        help=f"sentences decoded together (default: {preset.batch_size})",
    )
    parser.add_argument(
        "--attention",
        metavar="PNG",
        help="save a heat-map of the cross-attention of the first sentence to this PNG file",
    )
    return parser


def beam_preset() -> DecodeConfig:
    """The `decode=beam` preset of configs/, so that translate and evaluate decode alike."""
    from omegaconf import OmegaConf

    return to_dataclass(
        DecodeConfig, OmegaConf.create(config_file("decode", "beam.yaml").read_text())
    )


def decode_config(args: argparse.Namespace) -> DecodeConfig:
    for flag, value in (
        ("--beam", args.beam),
        ("--nbest", args.nbest),
        ("--batch-size", args.batch_size),
    ):
        if value < 1:
            raise ConfigError(f"{flag} must be at least 1 (got {value})")
    if args.nbest > args.beam:
        raise ConfigError(
            f"--nbest {args.nbest} needs --beam {args.nbest} or more: n-best lists come from the beam"
        )
    preset = beam_preset()
    return DecodeConfig(
        beam_size=args.beam,
        length_penalty=preset.length_penalty,
        max_len_a=preset.max_len_a,
        max_len_b=preset.max_len_b,
        nbest=args.nbest,
        batch_size=args.batch_size,
    )


def line_chunks(
    stream: BinaryIO, max_lines: int, max_line_bytes: int = MAX_LINE_BYTES
) -> Iterator[list[str]]:
    """Lines of a byte stream as they arrive, in lists of at most `max_lines`.

    Each read takes what is available (waiting only while nothing is), so a line that arrives alone
    is handed on alone, and a file is handed on a batch at a time. Bytes that are not UTF-8 become
    U+FFFD; line ends (LF or CRLF) are removed; a last line without a line end counts. A line
    longer than `max_line_bytes` keeps its first `max_line_bytes` bytes (with a warning) and the
    rest is skipped as it arrives: memory and time stay linear in the input whatever its lines.
    """
    line = _BoundedLine(max_line_bytes)
    number = 0
    while data := stream.read1(READ_BYTES):
        *complete, rest = data.split(b"\n")
        lines = []
        for piece in complete:
            line.add(piece)
            number += 1
            lines.append(line.take(number))
        line.add(rest)
        for start in range(0, len(lines), max_lines):
            yield lines[start : start + max_lines]
    if line.size:
        yield [line.take(number + 1)]


class _BoundedLine:
    """The line being read: at most `limit` bytes of it are kept, the rest only counted."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.parts: list[bytes] = []
        self.size = 0  # bytes of the line so far, kept or not

    def add(self, data: bytes) -> None:
        room = self.limit - self.size
        if room > 0:
            self.parts.append(data[:room])
        self.size += len(data)

    def take(self, number: int) -> str:
        """The line as text (the next one starts empty); line `number` is named in the warning."""
        text = _text(b"".join(self.parts))
        if self.size > self.limit:
            log.warning(
                "input line %d has %d bytes, more than the %d a line may have: "
                "translating its first %d bytes only",
                number,
                self.size,
                self.limit,
                self.limit,
            )
            text = text.rstrip("\ufffd")  # a character the cut went through
        self.parts, self.size = [], 0
        return text


def _text(line: bytes) -> str:
    return line.removesuffix(b"\r").decode("utf-8", errors="replace")


def input_chunks(args: argparse.Namespace, batch_size: int) -> Iterator[list[str]]:
    if args.sentences:
        yield from (
            args.sentences[i : i + batch_size] for i in range(0, len(args.sentences), batch_size)
        )
    elif args.input is not None:
        try:
            handle = open(args.input, "rb")  # noqa: SIM115 (closed below, after the last chunk)
        except OSError as err:
            raise ConfigError(f"cannot read --input {args.input}: {err.strerror or err}") from None
        with handle:
            yield from line_chunks(handle, batch_size)
    else:
        yield from line_chunks(sys.stdin.buffer, batch_size)


def format_lines(translator: Translator, lines: Sequence[str], first_number: int) -> list[str]:
    """Output lines for one chunk: the translations, or the n-best lists with their scores."""
    if translator.decode_cfg.nbest == 1:
        return translator.translate(lines)
    return [
        f"{first_number + i}\t{score:.4f}\t{text}"
        for i, hyps in enumerate(translator.translate_nbest(lines))
        for text, score in hyps
    ]


def save_attention(translator: Translator, sentence: str, path: str) -> None:
    attention = translator.attention(sentence)
    plot_attention(attention.weights, attention.source_tokens, attention.output_tokens, path)
    print(f"attention heat-map: {path}", file=sys.stderr)


def translate_stream(translator: Translator, args: argparse.Namespace, out: TextIO) -> int:
    """Translate every input chunk and write it out, flushing after each; return the line count."""
    count = 0
    for lines in input_chunks(args, translator.decode_cfg.batch_size):
        if args.attention and count == 0:
            save_attention(translator, lines[0], args.attention)
        out.writelines(f"{line}\n" for line in format_lines(translator, lines, count + 1))
        out.flush()
        count += len(lines)
    return count


@contextlib.contextmanager
def output_stream(path: str | None) -> Iterator[IO[str]]:
    if path is None:
        if isinstance(sys.stdout, io.TextIOWrapper):
            sys.stdout.reconfigure(encoding="utf-8")  # UTF-8 out as in, whatever the locale says
        yield sys.stdout
    else:
        with atomic_writer(path) as handle:
            yield handle


def check_output(path: str | None) -> None:
    """Refuse an --output that cannot become a file before any work is done."""
    if path is None:
        return
    if os.path.isdir(path):
        raise ConfigError(f"cannot write {path}: it is a folder (--output takes a file name)")
    folder = os.path.dirname(path) or "."
    if os.path.isdir(folder) and not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot write {path}: {folder} is not writable (permission denied)")


@report_user_errors
def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_intermixed_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    decode_cfg = decode_config(args)
    check_output(args.output)
    try:
        translator = Translator.from_checkpoint(args.checkpoint, args.device, decode_cfg)
        with output_stream(args.output) as out:
            translate_stream(translator, args, out)
    except BrokenPipeError:
        # The reader went away (`... | head`): stop quietly, as other Unix filters do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)
    except KeyboardInterrupt:
        # Ctrl-C: the lines already written stay; a partial --output file is never left.
        sys.exit(130)


if __name__ == "__main__":
    main()
