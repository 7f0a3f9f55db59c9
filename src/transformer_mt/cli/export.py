"""`mt-export` / `python scripts/export.py CHECKPOINT OUT_DIR [--quantization int8] [--force]`.

Writes a CTranslate2 model folder for a Transformer checkpoint (needs the `ctranslate2` package:
`pip install 'transformer-mt[export]'`). Translate with it from Python:

    from transformer_mt.inference.export import ExportedTranslator
    ExportedTranslator("exported/de-en", compute_type="int8").translate(["Ein Hund läuft."])
"""

from __future__ import annotations

import argparse
from pathlib import Path

from transformer_mt.cli.common import report_user_errors
from transformer_mt.inference.export import export_checkpoint

QUANTIZATIONS = (
    "int8",
    "int8_float32",
    "int8_float16",
    "int8_bfloat16",
    "int16",
    "float16",
    "bfloat16",
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="mt-export",
        description="Export a Transformer checkpoint to a CTranslate2 model folder.",
    )
    parser.add_argument("checkpoint", type=Path, help="a checkpoint, e.g. saved/<run>/averaged.pt")
    parser.add_argument("out_dir", type=Path, help="the folder to write (must not exist)")
    parser.add_argument(
        "--quantization",
        choices=QUANTIZATIONS,
        default=None,
        help="store the weights quantized (default: float32)",
    )
    parser.add_argument("--force", action="store_true", help="replace an existing out_dir")
    return parser.parse_args(argv)


@report_user_errors
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    folder = export_checkpoint(args.checkpoint, args.out_dir, args.force, args.quantization)
    print(f"exported {args.checkpoint} -> {folder} (CTranslate2)")


if __name__ == "__main__":
    main()
