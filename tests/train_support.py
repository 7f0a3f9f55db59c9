"""Shared by the training tests: a synthetic corpus, Hydra overrides and ways to run training.

The task: the target is the source sentence reversed, over a dozen animal names written as words
(so spaCy's blank tokenizers keep each word a token). The `tiny` model learns it in a few hundred
steps on a CPU.
"""

from __future__ import annotations

import logging
import os
import random
import subprocess
import sys
from pathlib import Path

import torch

from transformer_mt.checkpoint import build_checkpoint

REPO = Path(__file__).resolve().parents[1]
TRAIN_SCRIPT = REPO / "scripts" / "train.py"
WORDS = ["ant", "bee", "cat", "dog", "eel", "fox", "gnu", "hen", "ibis", "jay", "koi", "lark"]


# The scalar tags of a run that averages its last epochs (TensorBoard's SCALARS tab).
RUN_SCALAR_TAGS = (
    "train/loss",
    "train/lr",
    "train/grad_norm",
    "train/tokens_per_s",
    "val/loss",
    "val/ppl",
    "val/bleu",
    "averaged/bleu",
)


def write_reversal_corpus(folder: Path, n_train: int = 2000, n_val: int = 100) -> dict[str, Path]:
    """Train and val files (`.src` / `.tgt`) of the reversal task; returns their paths."""
    rng = random.Random(0)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, n in (("train", n_train), ("val", n_val)):
        src_lines, tgt_lines = [], []
        for _ in range(n):
            words = [rng.choice(WORDS) for _ in range(rng.randint(3, 8))]
            src_lines.append(" ".join(words))
            tgt_lines.append(" ".join(reversed(words)))
        for side, lines in (("src", src_lines), ("tgt", tgt_lines)):
            path = folder / f"{split}.{side}"
            path.write_text("\n".join(lines) + "\n")
            paths[f"{split}_{side}"] = path
    return paths


def overrides(
    corpus: dict[str, Path], root: Path, run_name: str, *extra: str, data_root: Path | None = None
) -> list[str]:
    """Hydra overrides for a quick tiny-model run on `corpus`; files under `root`.

    `data_root` (default `root / "data"`) holds the prepared cache: runs that share it prepare once.
    """
    return [
        "data=custom",
        "data.src=en",
        "data.tgt=de",
        f"data.train=[{corpus['train_src']},{corpus['train_tgt']}]",
        f"data.valid=[{corpus['val_src']},{corpus['val_tgt']}]",
        f"data.root={data_root or root / 'data'}",
        "data.min_freq=1",
        "data.max_tokens=400",
        "model=tiny",
        "optim.lr=3e-3",
        "optim.warmup_steps=50",
        "optim.label_smoothing=0.0",
        "trainer.device=cpu",
        "trainer.progress=false",
        "trainer.log_every=10",
        f"saved_dir={root / 'saved'}",
        f"result_dir={root / 'result'}",
        f"run_name={run_name}",
        *extra,
    ]


def assert_imports_leave_out(
    modules: list[str], absent: list[str], *then: tuple[list[str], list[str]]
) -> None:
    """In a fresh interpreter, importing `modules` loads none of `absent`; each further
    (modules, absent) pair of `then` is checked after it, in the same interpreter (one start-up)."""
    code = "import sys\n"
    for imported, left_out in ((modules, absent), *then):
        code += f"import {', '.join(imported)}\n" + "".join(
            f"assert {name!r} not in sys.modules, {name!r}\n" for name in left_out
        )
    subprocess.run([sys.executable, "-c", code], check=True)


def subprocess_env() -> dict[str, str]:
    """One thread per process: on a shared CPU, two threads fighting for a core run far slower."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def run_cli(args: list[str], timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    """`python scripts/train.py ARGS` in a subprocess."""
    return subprocess.run(
        [sys.executable, str(TRAIN_SCRIPT), *args],
        cwd=REPO,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        **kwargs,
    )


def compose_config(args: list[str]):
    """The TrainConfig the entry point would build from `args` (Hydra's compose API)."""
    from hydra import compose, initialize_config_module

    from transformer_mt.cli.common import CONFIG_PACKAGE, register_configs
    from transformer_mt.config import TrainConfig, to_dataclass

    register_configs()
    with initialize_config_module(config_module=CONFIG_PACKAGE, version_base="1.3"):
        node = compose(config_name="train", overrides=args)
    return to_dataclass(TrainConfig, node)


def run_train(args: list[str], monkeypatch, capsys) -> tuple[int, str]:
    """Call the `mt-train` entry point with `args`; return (exit status, stderr).

    Hydra configures the root logger for its job; the previous handlers come back afterwards.
    """
    from transformer_mt.cli import train as train_cli

    monkeypatch.setattr(sys, "argv", ["train.py", *args])
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    with OneThread():
        try:
            train_cli.main()
            code = 0
        except SystemExit as exit_:
            code = exit_.code
        finally:
            for handler in root.handlers:
                if handler not in handlers:
                    handler.close()
            root.handlers[:] = handlers
            root.setLevel(level)
    return code, capsys.readouterr().err


def user_error_line(stderr: str) -> str:
    """The one `error: ...` line of `stderr` (there must be exactly one)."""
    lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, stderr
    return lines[0]


class OneThread:
    """Context: torch on one thread (restored afterwards), as in the subprocess runs."""

    def __enter__(self) -> None:
        self.previous = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc_info: object) -> None:
        torch.set_num_threads(self.previous)


def model_weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def checkpoint_payload(scale: float = 1.0, **extra) -> dict:
    """A small checkpoint dict in the real format (weights scaled by `scale`), `extra` keys
    (`train_state=...`, or anything else) added to what `build_checkpoint` makes."""
    return {
        **build_checkpoint(
            weights={
                "weight": torch.full((2, 3), scale),
                "bias": torch.arange(3, dtype=torch.float32) * scale,
                "steps": torch.tensor(int(scale), dtype=torch.long),
            },
            model_config={"d_model": 3},
            config={"run_name": "r"},
            src_vocab=["<pad>", "<unk>", "<bos>", "<eos>", "a"],
            tgt_vocab=["<pad>", "<unk>", "<bos>", "<eos>", "b"],
            tokenizer={"src_lang": "de", "tgt_lang": "en", "lowercase": False},
            epoch=int(scale),
            step=10 * int(scale),
            metrics={"val_bleu": scale},
        ),
        **extra,
    }
