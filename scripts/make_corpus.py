"""A large synthetic parallel corpus from Multi30k's lines, to measure the data path at scale.

    python scripts/make_corpus.py --pairs 1000000 --out corpora/1M --seed 0
    python scripts/make_corpus.py --pairs 5M --out corpora/5M --multi30k data/multi30k
    python scripts/make_corpus.py --verbatim --out corpora/multi30k   # Multi30k's train as it is

Writes, for the two languages of `--langs` (default de,en):

    OUT/train.<lang>   --pairs lines; each line is one or two randomly chosen Multi30k training
                       pairs joined by a space (the same pairs on both sides, so lines stay aligned)
    OUT/val.<lang>     Multi30k's validation set, as distributed
    OUT/test.<lang>    Multi30k's test_2016_flickr, as distributed

The text is synthetic: its sentences repeat, so a model trained on it learns nothing that Multi30k
does not teach. It exists to measure time and memory (preparation, loading, batching, training)
at the sizes of real corpora, not translation quality. A line holds 1.5 Multi30k sentences on
average, so its lengths spread wider than Multi30k's.

The output is streamed in chunks of lines: memory does not depend on --pairs (about 150 MB; 5M
pairs take some ten seconds). The same --pairs, --seed and Multi30k files give the same bytes.
--multi30k is where the gzip files of Multi30k's task 1 are (`mt-prepare` downloads them to
data/multi30k).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

from transformer_mt.data.corpus import multi30k_file, read_lines

CHUNK_LINES = 100_000
COPIED_SPLITS = {"val": "val", "test": "test2016"}  # output name: Multi30k split


def parse_count(text: str) -> int:
    """`20000`, `20k`, `0.1M`, `5M` as a whole number."""
    scale = {"k": 1_000, "m": 1_000_000}.get(text[-1:].lower(), 1)
    number = text[:-1] if scale > 1 else text
    try:
        value = float(number) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a count: {text!r} (e.g. 20000, 20k, 0.1M)") from None
    if value < 1 or value != int(value):
        raise argparse.ArgumentTypeError(f"not a positive whole count: {text!r}")
    return int(value)


def read_multi30k(folder: Path, split: str, langs: tuple[str, str]) -> tuple[list[str], list[str]]:
    """Both sides of one Multi30k split, checked to be aligned."""
    sides = []
    for lang in langs:
        path = folder / multi30k_file(split, lang)
        if not path.is_file():
            sys.exit(
                f"{path} does not exist: pass --multi30k <folder with Multi30k's .gz files> "
                "(`mt-prepare` downloads them to data/multi30k)"
            )
        sides.append(read_lines(path))
    if len(sides[0]) != len(sides[1]):
        sys.exit(
            f"Multi30k {split}: {len(sides[0])} {langs[0]} lines but {len(sides[1])} {langs[1]}"
        )
    return sides[0], sides[1]


def synthetic_chunks(
    src: list[str], tgt: list[str], pairs: int, seed: int
) -> tuple[list[str], list[str]]:
    """Yield (source lines, target lines) chunks of one or two random pairs per line."""
    rng = np.random.default_rng(seed)
    src_arr, tgt_arr = np.array(src, dtype=object), np.array(tgt, dtype=object)
    for start in range(0, pairs, CHUNK_LINES):
        n = min(CHUNK_LINES, pairs - start)
        first = rng.integers(0, len(src), size=n)
        second = rng.integers(0, len(src), size=n)
        joined = rng.integers(0, 2, size=n).astype(bool)  # True: two pairs on this line
        src_lines, tgt_lines = src_arr[first], tgt_arr[first]
        src_lines[joined] = src_lines[joined] + " " + src_arr[second[joined]]
        tgt_lines[joined] = tgt_lines[joined] + " " + tgt_arr[second[joined]]
        yield src_lines.tolist(), tgt_lines.tolist()


def write_split(out: Path, name: str, langs: tuple[str, str], chunks) -> int:
    """Write OUT/<name>.<lang> for both languages from `chunks`; return the number of lines.

    Each file is written under a temporary name and renamed when complete.
    """
    paths = [out / f"{name}.{lang}" for lang in langs]
    partial = [path.with_name(path.name + ".partial") for path in paths]
    count = 0
    with (
        open(partial[0], "w", encoding="utf-8") as src_out,
        open(partial[1], "w", encoding="utf-8") as tgt_out,
    ):
        for src_lines, tgt_lines in chunks:
            src_out.write("\n".join(src_lines) + "\n")
            tgt_out.write("\n".join(tgt_lines) + "\n")
            count += len(src_lines)
    for tmp, path in zip(partial, paths, strict=True):
        os.replace(tmp, path)
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=parse_count, help="training lines to write (e.g. 5M)")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--multi30k", type=Path, default=Path("data/multi30k"))
    parser.add_argument("--langs", default="de,en", help="source,target (Multi30k languages)")
    parser.add_argument(
        "--verbatim", action="store_true", help="train = Multi30k's training set as distributed"
    )
    args = parser.parse_args()
    if (args.pairs is None) == (not args.verbatim):
        parser.error("give exactly one of --pairs N and --verbatim")
    langs = tuple(args.langs.split(","))
    if len(langs) != 2 or langs[0] == langs[1]:
        parser.error(f"--langs needs two different languages (got {args.langs!r})")
    started = time.perf_counter()
    src, tgt = read_multi30k(args.multi30k, "train", langs)
    args.out.mkdir(parents=True, exist_ok=True)
    chunks = [(src, tgt)] if args.verbatim else synthetic_chunks(src, tgt, args.pairs, args.seed)
    count = write_split(args.out, "train", langs, chunks)
    for name, split in COPIED_SPLITS.items():
        write_split(args.out, name, langs, [read_multi30k(args.multi30k, split, langs)])
    size_mb = sum((args.out / f"train.{lang}").stat().st_size for lang in langs) / 1e6
    print(
        f"{args.out}: {count:,} training pairs ({size_mb:.0f} MB), val and test copied, "
        f"in {time.perf_counter() - started:.1f} s"
    )


if __name__ == "__main__":
    main()
