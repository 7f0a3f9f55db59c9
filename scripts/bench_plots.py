"""Time to draw and write the two pictures a run redraws every epoch, against another commit's code.

    python scripts/bench_plots.py [--against REV] [--rounds N]

The attention heat-map of a 12-token sentence and the curves of 15 epochs, drawn by this checkout's
`plots.py` and by the same functions at REV (read with `git show`; before plots.py drew the
curves, they were `train/logging.py`'s `write_curves`), alternately on the same inputs; medians.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
import time
import types
from pathlib import Path

import numpy as np

from transformer_mt import plots

ROOT = Path(__file__).resolve().parents[1]


def module_at(rev: str, path: str) -> types.ModuleType | None:
    shown = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{rev}:{path}"], capture_output=True, text=True
    )
    if shown.returncode != 0:
        return None
    module = types.ModuleType(f"{path}@{rev}")
    exec(compile(shown.stdout, module.__name__, "exec"), module.__dict__)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", default="ee18b25", help="the commit to compare with")
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()

    peer_plots = module_at(args.against, "src/transformer_mt/plots.py")
    peer_curves = getattr(peer_plots, "plot_curves", None)
    if peer_curves is None:
        peer_curves = module_at(args.against, "src/transformer_mt/train/logging.py").write_curves

    rng = np.random.default_rng(0)
    source = [
        "▁Ein",
        "▁Mann",
        "▁mit",
        "▁einem",
        "▁orange",
        "farbenen",
        "▁Hut",
        "▁starrt",
        "▁auf",
        "▁etwas",
        ".",
        "<eos>",
    ]
    output = [
        "▁A",
        "▁man",
        "▁in",
        "▁an",
        "▁orange",
        "▁hat",
        "▁staring",
        "▁at",
        "▁something",
        ".",
        "<eos>",
    ]
    weights = rng.dirichlet(np.ones(len(source)), size=len(output))
    rows = [
        {"epoch": e, "train_loss": 5 / e, "val_loss": 5.5 / e, "val_bleu": 2.5 * e}
        for e in range(1, 16)
    ]
    title = "validation sentence 0, step 3690"
    folder = Path(tempfile.mkdtemp())
    jobs = {
        ("attention", "this"): lambda: plots.plot_attention(
            weights, source, output, folder / "a.png", title
        ),
        ("attention", args.against): lambda: peer_plots.plot_attention(
            weights, source, output, folder / "b.png", title
        ),
        ("curves", "this"): lambda: plots.plot_curves(rows, folder / "c.png"),
        ("curves", args.against): lambda: peer_curves(rows, folder / "d.png"),
    }
    seconds: dict[tuple[str, str], list[float]] = {key: [] for key in jobs}
    for job in jobs.values():
        job()  # imports, font cache
    for _ in range(args.rounds):
        for key, job in jobs.items():
            started = time.perf_counter()
            job()
            seconds[key].append(time.perf_counter() - started)
    for picture in ("attention", "curves"):
        ours = statistics.median(seconds[(picture, "this")])
        peer = statistics.median(seconds[(picture, args.against)])
        print(
            f"{picture}: this checkout {ours * 1000:.0f} ms, {args.against} {peer * 1000:.0f} ms"
            f" ({peer / ours:.2f}x faster)"
        )


if __name__ == "__main__":
    main()
