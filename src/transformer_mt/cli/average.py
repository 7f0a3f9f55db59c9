"""`mt-average` / `python scripts/average.py saved/<run> [--last K] [--output PATH]`.

Averages the weights of a run's last K epoch checkpoints (`epoch_<n>.pt`, highest n) into one
checkpoint, `saved/<run>/averaged.pt` by default. It is not validated, so it stores no metrics (the
last epoch's belong to other weights); score it like any other:
`python scripts/evaluate.py checkpoint=saved/<run>/averaged.pt`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from transformer_mt.checkpoint import average_checkpoints, save_checkpoint
from transformer_mt.cli.common import report_user_errors
from transformer_mt.errors import UserError
from transformer_mt.train.rundir import epoch_checkpoints


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="mt-average", description="Average the last K epoch checkpoints of a training run."
    )
    parser.add_argument("run_dir", type=Path, help="the run's checkpoint folder, saved/<run_name>")
    parser.add_argument(
        "--last", type=int, default=5, help="how many epoch checkpoints (default 5)"
    )
    parser.add_argument(
        "--output", type=Path, default=None, help="where to write (default <run_dir>/averaged.pt)"
    )
    return parser.parse_args(argv)


def average_run(run_dir: Path, last: int, output: Path | None = None) -> Path:
    """Average the last `last` epoch checkpoints in `run_dir`; return the file written."""
    if last < 1:
        raise UserError(f"--last must be at least 1 (got {last})")
    if not run_dir.is_dir():
        raise UserError(f"{run_dir} is not a folder: give a run's checkpoint folder, saved/<run>")
    files = epoch_checkpoints(run_dir)[-last:]
    if not files:
        raise UserError(
            f"{run_dir} holds no epoch_<n>.pt checkpoints (trainer.keep_last=0 keeps none)"
        )
    output = output or run_dir / "averaged.pt"
    save_checkpoint(average_checkpoints(files), output)
    print(f"averaged {', '.join(path.name for path in files)} -> {output}")
    return output


@report_user_errors
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    average_run(args.run_dir, args.last, args.output)


if __name__ == "__main__":
    main()
