"""`scripts/evaluate.py` end to end on the toy checkpoint (see toy_support.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import transformer_mt.inference.translator
from transformer_mt.checkpoint import load_checkpoint, save_checkpoint
from transformer_mt.cli import evaluate as evaluate_cli

REPO = Path(__file__).resolve().parents[1]
SACREBLEU = Path(sys.executable).parent / "sacrebleu"


pytestmark = pytest.mark.usefixtures("one_thread_per_module")


def run_evaluate(monkeypatch, *overrides: str) -> None:
    """`mt-evaluate <overrides>` in this process (Hydra reads sys.argv)."""
    monkeypatch.setattr(sys, "argv", ["mt-evaluate", *overrides])
    evaluate_cli.main()


def sacrebleu_cli(refs: Path, hyps: Path, *options: str) -> dict:
    result = subprocess.run(
        [str(SACREBLEU), str(refs), "-i", str(hyps), "-m", "bleu", "-w", "6", *options],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(result.stdout)


def no_spacy(*args, **kwargs):
    raise AssertionError("the source was tokenized although the prepared cache has its ids")


def test_evaluate_a_split_from_the_prepared_cache(toy, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(transformer_mt.inference.translator, "Tokenizer", no_spacy)
    result = tmp_path / "result"
    run_evaluate(monkeypatch, f"checkpoint={toy.checkpoint}", "split=test", f"result_dir={result}")
    out = capsys.readouterr().out

    hyp = result / "toy-run" / "eval" / "test.best.beam5.hyp"
    report = json.loads(hyp.with_suffix(".json").read_text())
    lines = hyp.read_text(encoding="utf-8").splitlines()
    refs = toy.test_ref.read_text(encoding="utf-8").splitlines()
    assert len(lines) == len(refs) == report["sentences"] == 60
    assert sum(h == r for h, r in zip(lines, refs, strict=True)) >= 50  # in source order

    cased = sacrebleu_cli(toy.test_ref, hyp)
    lowercased = sacrebleu_cli(toy.test_ref, hyp, "-lc", "-tok", "13a")
    assert report["bleu"] == pytest.approx(cased["score"], abs=1e-4)
    assert report["bleu_signature"] == cased["signature"]
    assert report["bleu_lc"] == pytest.approx(lowercased["score"], abs=1e-4)
    assert report["bleu_lc_signature"] == lowercased["signature"]
    assert 0 < report["chrf"] <= 100
    assert report["decode"]["beam_size"] == 5 and report["decode"]["length_penalty"] == 1.4
    assert report["sentences_per_s"] > 0
    assert report["checkpoint"] == str(toy.checkpoint)
    assert f"{report['bleu']:6.2f}" in out and cased["signature"] in out
    assert "sacrebleu -lc -tok 13a" in out


def test_raw_text_and_cache_give_the_same_translations(toy, tmp_path, monkeypatch) -> None:
    result = tmp_path / "result"
    common = [f"checkpoint={toy.checkpoint}", "split=test", f"result_dir={result}", "decode=greedy"]
    run_evaluate(monkeypatch, *common)
    cached = (result / "toy-run" / "eval" / "test.best.greedy.hyp").read_text()
    # No prepared cache under this root: the raw test files are tokenized instead.
    run_evaluate(monkeypatch, *common, f"data_root={tmp_path / 'elsewhere'}")
    assert (result / "toy-run" / "eval" / "test.best.greedy.hyp").read_text() == cached


def test_evaluate_a_pair_of_files(toy, tmp_path, monkeypatch) -> None:
    src, ref = tmp_path / "mine.de", tmp_path / "mine.en"
    src.write_text("Zwei drei vier fünf.\nAcht neun acht sieben.\n", encoding="utf-8")
    ref.write_text("Two three four five.\nEight nine eight seven.\n", encoding="utf-8")
    result = tmp_path / "result"
    run_evaluate(
        monkeypatch,
        f"checkpoint={toy.checkpoint}",
        f"src_file={src}",
        f"ref_file={ref}",
        f"result_dir={result}",
        "decode.beam_size=3",
    )
    hyp = result / "toy-run" / "eval" / "mine.de.best.beam3.hyp"
    assert hyp.read_text(encoding="utf-8") == "Two three four five.\nEight nine eight seven.\n"
    assert json.loads(hyp.with_suffix(".json").read_text())["bleu"] == pytest.approx(100.0)


def test_run_name_falls_back_to_the_checkpoint_folder(toy, tmp_path, monkeypatch) -> None:
    payload = load_checkpoint(toy.checkpoint)
    del payload["config"]["run_name"]
    checkpoint = save_checkpoint(payload, tmp_path / "saved" / "my-run" / "best.pt")
    result = tmp_path / "result"
    run_evaluate(monkeypatch, f"checkpoint={checkpoint}", "split=val", f"result_dir={result}")
    assert (result / "my-run" / "eval" / "val.best.beam5.hyp").is_file()


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["checkpoint={missing}"], "checkpoint not found"),
        ([], "no checkpoint given"),
        (["checkpoint={ckpt}", "split=test2016"], "unknown split 'test2016'"),
        (["checkpoint={ckpt}", "src_file={src}"], "src_file and ref_file go together"),
        (["checkpoint={ckpt}", "src_file={src}", "ref_file={short}"], "has 2 lines but"),
    ],
)
def test_user_errors_are_one_line_and_write_nothing(
    toy, tmp_path, monkeypatch, capsys, overrides, message
) -> None:
    src, short = tmp_path / "a.de", tmp_path / "b.en"
    src.write_text("Zwei.\nDrei.\n")
    short.write_text("Two.\n")
    values = {"missing": tmp_path / "nope.pt", "ckpt": toy.checkpoint, "src": src, "short": short}
    result = tmp_path / "result"
    with pytest.raises(SystemExit) as exit_info:
        run_evaluate(monkeypatch, *[o.format(**values) for o in overrides], f"result_dir={result}")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err
    assert err.count("\n") == 1
    assert not result.exists()


def test_the_script_runs_as_a_command(toy, tmp_path) -> None:
    result = tmp_path / "result"
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "evaluate.py"),
            f"checkpoint={toy.checkpoint}",
            "split=val",
            "decode=greedy",
            f"result_dir={result}",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0, done.stderr
    assert "BLEU" in done.stdout
    assert (result / "toy-run" / "eval" / "val.best.greedy.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result"]  # no log files, no outputs/


@pytest.mark.parametrize("name", ["../../escaped", "/tmp/absolute-run", "..", "a/../../b"])
def test_run_name_inside_a_checkpoint_never_leaves_result_dir(toy, tmp_path, monkeypatch, name):
    """Finding 2 of the reliability review: the output folder came from the `run_name` stored in
    the checkpoint, so a checkpoint from elsewhere could write anywhere."""
    payload = load_checkpoint(toy.checkpoint)
    payload["config"]["run_name"] = name
    checkpoint = save_checkpoint(payload, tmp_path / "given" / "best.pt")
    result = tmp_path / "work" / "result"
    run_evaluate(monkeypatch, f"checkpoint={checkpoint}", "split=val", f"result_dir={result}")
    written = [p for p in tmp_path.rglob("*.hyp")]
    assert len(written) == 1
    assert written[0].parent.parent.parent == result  # result/<one component>/eval/<file>
    assert written[0].parent.parent.name not in ("", ".", "..")


def test_each_checkpoint_of_a_run_keeps_its_own_hypotheses(toy, tmp_path, monkeypatch):
    """Finding 10: output files were named by split and beam only, so scoring a second checkpoint
    of the same run overwrote the first one's hypotheses."""
    other = tmp_path / "saved" / "toy-run" / "epoch_2.pt"
    save_checkpoint(load_checkpoint(toy.checkpoint), other)
    result = tmp_path / "result"
    for checkpoint in (toy.checkpoint, other):
        run_evaluate(monkeypatch, f"checkpoint={checkpoint}", "split=val", f"result_dir={result}")
    names = sorted(p.name for p in (result / "toy-run" / "eval").glob("*.hyp"))
    assert names == ["val.best.beam5.hyp", "val.epoch_2.beam5.hyp"]


def test_inputs_of_the_same_name_in_other_folders_keep_their_own_results(
    toy, tmp_path, monkeypatch
):
    """Two test files named alike in two folders, and two checkpoints named alike in two folders,
    each get their own .hyp and .json; scoring the same input again replaces its own."""
    result = tmp_path / "result"
    lines = {"d1": ("Zwei drei.\n", "Two three.\n"), "d2": ("Acht neun.\n", "Eight nine.\n")}
    for folder, (src_text, ref_text) in lines.items():
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "test.de").write_text(src_text, encoding="utf-8")
        (tmp_path / folder / "test.en").write_text(ref_text, encoding="utf-8")
    for folder in (*lines, "d1"):
        run_evaluate(
            monkeypatch,
            f"checkpoint={toy.checkpoint}",
            f"src_file={tmp_path / folder / 'test.de'}",
            f"ref_file={tmp_path / folder / 'test.en'}",
            f"result_dir={result}",
            "decode.beam_size=1",
        )
    hyps = sorted((result / "toy-run" / "eval").glob("test.de.*.hyp"))
    assert sorted(p.read_text(encoding="utf-8") for p in hyps) == ["Eight nine.\n", "Two three.\n"]
    assert len(list((result / "toy-run" / "eval").glob("test.de.*.json"))) == 2

    copies = [tmp_path / "a" / "best.pt", tmp_path / "b" / "best.pt"]
    for copy in copies:
        copy.parent.mkdir()
        save_checkpoint(load_checkpoint(toy.checkpoint), copy)
        run_evaluate(monkeypatch, f"checkpoint={copy}", "split=val", f"result_dir={result}")
    reports = [json.loads(p.read_text()) for p in (result / "toy-run" / "eval").glob("val.*.json")]
    assert sorted(report["checkpoint"] for report in reports) == sorted(map(str, copies))
