"""The package installs like a library: a wheel, installed into a fresh virtual environment, runs
its commands from a folder outside the checkout (the Hydra configs travel inside the package).

The fresh environment gets the wheel alone (`--no-deps`); its dependencies (torch, spaCy, ...)
come from the test's own environment through a `.pth` path entry, so the test needs no network.
That path entry does not process the `.pth` files it points at, so the checkout's editable
install stays invisible: `transformer_mt` can only come from the wheel.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from train_support import REPO, write_reversal_corpus

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from a copy of the checkout's files (a build leaves build/ where it runs)."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"
    top = {".git", ".venv", "data", "saved", "result", "build", "outputs", "multirun", ".device"}

    def skip(folder: str, names: list[str]) -> set[str]:
        dropped = {
            n
            for n in names
            if n.endswith(".egg-info") or n.endswith("_cache") or n == "__pycache__"
        }
        return dropped | (top & set(names) if Path(folder) == REPO else set())

    shutil.copytree(REPO, source, ignore=skip, symlinks=True)
    dist = root / "dist"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(source),
            "-w",
            str(dist),
            "--no-deps",
            "--no-build-isolation",
            "--quiet",
            "--disable-pip-version-check",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (path,) = dist.glob("transformer_mt-*.whl")
    return path


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("venv") / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True)
    python = root / "bin" / "python"
    install = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "--no-deps",
            "--no-index",
            "--quiet",
            "--disable-pip-version-check",
            str(wheel),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    (Path(site) / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return root


def run_in(folder: Path, venv: Path, *command: str, stdin: str | None = None):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run(
        list(command), cwd=folder, env=env, input=stdin, capture_output=True, text=True, timeout=300
    )


def test_the_wheel_carries_the_configs(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    for config in ("train.yaml", "evaluate.yaml", "experiment/cpu.yaml", "model/small.yaml"):
        assert f"transformer_mt/configs/{config}" in names


def test_installed_commands_work_outside_the_checkout(venv, toy, tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    where = run_in(
        outside, venv, "python", "-c", "import transformer_mt; print(transformer_mt.__file__)"
    )
    assert where.returncode == 0, where.stderr
    assert where.stdout.strip().startswith(str(venv)), where.stdout  # the wheel, not the checkout

    help_ = run_in(outside, venv, "mt-train", "--help")
    assert help_.returncode == 0, help_.stderr
    assert (
        "experiment: cpu, gpu" in help_.stdout
        and "model: base, big, rnn, small, tiny" in help_.stdout
    )

    corpus = write_reversal_corpus(outside / "corpus", n_train=50, n_val=5)
    prepare = run_in(
        outside,
        venv,
        "mt-prepare",
        "data=custom",
        "data.src=en",
        "data.tgt=de",
        f"data.train=[{corpus['train_src']},{corpus['train_tgt']}]",
        f"data.valid=[{corpus['val_src']},{corpus['val_tgt']}]",
        "data.min_freq=1",
    )
    assert prepare.returncode == 0, prepare.stderr[-2000:]
    assert any((outside / "data" / "cache").iterdir())  # written where the user stands

    translate = run_in(outside, venv, "mt-translate", str(toy.checkpoint), stdin="Zwei drei.\n")
    assert translate.returncode == 0, translate.stderr[-2000:]
    assert translate.stdout == "Two three.\n"


# Console scripts of the installed wheel, run one after another in one interpreter (torch is
# imported once): each is found through the wheel's entry-point metadata, as its `bin/` launcher
# finds it, and a non-zero exit stops the rest.
RUN_ENTRY_POINTS = """
import json, sys
from importlib.metadata import entry_points
for name, args in json.loads(sys.argv[1]):
    (script,) = entry_points(group="console_scripts", name=name)
    sys.argv = [name, *args]
    print("==", name, flush=True)
    try:
        script.load()()
    except SystemExit as stop:
        if stop.code:
            raise
"""


def test_installed_evaluate_average_and_export_work_outside_the_checkout(venv, toy, tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    run = outside / "saved" / "run"
    run.mkdir(parents=True)
    for epoch in (1, 2):
        shutil.copy(toy.checkpoint, run / f"epoch_{epoch}.pt")
    commands = [
        (
            "mt-evaluate",
            [
                f"checkpoint={toy.checkpoint}",
                "split=val",
                "decode=greedy",
                f"result_dir={outside / 'result'}",
            ],
        ),
        ("mt-average", [str(run), "--last", "2"]),
    ]
    export = importlib.util.find_spec("ctranslate2") is not None  # the [export] extra
    if export:
        commands.append(("mt-export", [str(toy.checkpoint), "exported"]))
    result = run_in(outside, venv, "python", "-c", RUN_ENTRY_POINTS, json.dumps(commands))
    assert result.returncode == 0, result.stderr[-2000:]
    assert [line for line in result.stdout.splitlines() if line.startswith("== ")] == [
        f"== {name}" for name, _ in commands
    ]
    assert "BLEU" in result.stdout
    assert (outside / "result" / "toy-run" / "eval" / "val.best.greedy.json").is_file()
    assert (run / "averaged.pt").is_file()
    if not export:
        pytest.skip("mt-export needs ctranslate2 (the [export] extra)")
    assert (outside / "exported" / "model.bin").is_file()
