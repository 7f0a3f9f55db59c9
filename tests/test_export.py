"""Export to CTranslate2: the exported model translates as ours does, weight for weight.

Greedy output is compared token for token on the toy model (toy_support.py); the log-
probabilities CTranslate2 assigns to given translations are compared with ours for models with
random weights in each architecture variant (post-norm, pre-norm, shared and untied embeddings),
which checks every mapped weight without depending on one model's argmax.
"""

from __future__ import annotations

import dataclasses
import random
import subprocess
import sys

import pytest
import torch
from toy_support import GERMAN, TOY_MODEL, toy_sentence
from train_support import REPO

from transformer_mt.checkpoint import build_checkpoint, save_checkpoint
from transformer_mt.cli import export as export_cli
from transformer_mt.config import DecodeConfig, ModelConfig
from transformer_mt.data.vocab import BOS, EOS, Vocab
from transformer_mt.inference.translator import Translator
from transformer_mt.model import build_model

ctranslate2 = pytest.importorskip("ctranslate2")  # the [export] extra; make setup installs it

from transformer_mt.inference.export import ExportedTranslator, export_checkpoint  # noqa: E402

# Share of sentences whose beam-5 output may differ: CTranslate2 normalises finished hypotheses by
# length ** alpha, we by GNMT's ((5 + length) / 6) ** alpha, so near-ties can rank differently.
BEAM_MISMATCH_TOLERANCE = 0.1
# Share of sentences whose greedy output may differ between the int8 and float32 weights.
INT8_MISMATCH_TOLERANCE = 0.1


@pytest.fixture(scope="module")
def exported(toy, tmp_path_factory):
    folder = tmp_path_factory.mktemp("export") / "toy-ct2"
    export_checkpoint(toy.checkpoint, folder)
    return folder


def sentences(n: int, seed: int = 11) -> list[str]:
    """Toy sentences, some longer than any training sentence and some with unknown words."""
    rng = random.Random(seed)
    lines = [toy_sentence(rng, max_words=12)[0] for _ in range(n)]
    lines[::7] = [line.replace(GERMAN[3], "Quatsch") for line in lines[::7]]
    return lines


def test_greedy_output_equals_ours_token_for_token(toy, exported):
    ours = Translator.from_checkpoint(toy.checkpoint, device="cpu", decode_cfg=DecodeConfig())
    theirs = ExportedTranslator(exported)
    lines = sentences(40)
    ours_tokens = [ours.tgt_vocab.decode(ids) for ids in _greedy_ids(ours, lines)]
    theirs_tokens = theirs.translate_tokens(theirs.tokenize(lines), DecodeConfig())
    assert theirs_tokens == ours_tokens
    assert theirs.translate(lines, beam_size=1) == ours.translate(lines)


def _greedy_ids(translator: Translator, lines: list[str]) -> list[list[int]]:
    from transformer_mt.inference.translator import decode_ids

    hyps = decode_ids(translator.model, translator.encode(lines), DecodeConfig(), "cpu")
    return [h[0].tokens for h in hyps]


def test_beam_output_agrees_within_the_documented_tolerance(toy, exported):
    ours = Translator.from_checkpoint(toy.checkpoint, device="cpu")
    theirs = ExportedTranslator(exported)
    lines = sentences(40, seed=12)
    a = ours.translate(lines, beam_size=5, length_penalty=1.0)
    b = theirs.translate(lines, beam_size=5, length_penalty=1.0)
    differing = sum(x != y for x, y in zip(a, b, strict=True))
    assert differing <= BEAM_MISMATCH_TOLERANCE * len(lines), list(zip(a, b, strict=True))


def test_int8_model_translates_as_the_float32_one_does(exported):
    full = ExportedTranslator(exported)
    int8 = ExportedTranslator(exported, compute_type="int8")
    assert full.translator.compute_type == "float32"
    assert int8.translator.compute_type.startswith("int8")  # quantized on load
    lines = sentences(40, seed=13)
    a, b = full.translate(lines, beam_size=1), int8.translate(lines, beam_size=1)
    differing = sum(x != y for x, y in zip(a, b, strict=True))
    assert differing <= INT8_MISMATCH_TOLERANCE * len(lines), list(zip(a, b, strict=True))


@pytest.mark.parametrize(
    "variant",
    [
        {},
        {"pre_norm": True},
        {"share_embeddings": True},
        {"tie_output": False},
    ],
    ids=["post-norm-tied", "pre-norm", "shared", "untied"],
)
def test_exported_log_probabilities_match_ours(tmp_path, variant):
    vocab = Vocab.build([[w] for w in GERMAN], min_freq=1)
    cfg = dataclasses.replace(TOY_MODEL, **variant)
    torch.manual_seed(3)
    model = build_model(cfg, len(vocab), len(vocab)).eval()
    with torch.no_grad():  # random LayerNorm and bias values, so that none is left at its default
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                param.add_(0.1 * torch.randn_like(param))
    checkpoint = tmp_path / "random.pt"
    save_checkpoint(_payload(model, cfg, vocab), checkpoint)
    folder = export_checkpoint(checkpoint, tmp_path / "ct2")
    rng = random.Random(4)
    pairs = [
        (
            [rng.choice(GERMAN) for _ in range(rng.randint(1, 9))],
            [rng.choice(GERMAN) for _ in range(rng.randint(1, 9))],
        )
        for _ in range(12)
    ]
    scored = ctranslate2.Translator(str(folder)).score_batch(
        [src for src, _ in pairs], [tgt for _, tgt in pairs]
    )
    for (src, tgt), result in zip(pairs, scored, strict=True):
        src_ids = torch.tensor([[*vocab.encode(src), EOS]])
        tgt_ids = vocab.encode(tgt)
        with torch.no_grad():
            logits = model(src_ids, torch.tensor([[BOS, *tgt_ids]]))[0]
        ours = torch.log_softmax(logits.double(), dim=-1)[range(len(tgt_ids) + 1), [*tgt_ids, EOS]]
        assert result.log_probs == pytest.approx(ours.tolist(), abs=1e-4)


def _payload(model, cfg: ModelConfig, vocab: Vocab) -> dict:
    return build_checkpoint(
        weights=model.state_dict(),
        model_config=dataclasses.asdict(cfg),
        config={"run_name": "random", "decode": dataclasses.asdict(DecodeConfig())},
        src_vocab=vocab.to_list(),
        tgt_vocab=vocab.to_list(),
        tokenizer={"src_lang": "de", "tgt_lang": "de", "lowercase": False},
        epoch=0,
        step=0,
        metrics={},
    )


def test_an_rnn_checkpoint_is_refused_by_name(tmp_path, capsys):
    vocab = Vocab.build([[w] for w in GERMAN], min_freq=1)
    cfg = ModelConfig(arch="rnn", d_model=16, enc_layers=1, dec_layers=1)
    model = build_model(cfg, len(vocab), len(vocab))
    save_checkpoint(_payload(model, cfg, vocab), tmp_path / "rnn.pt")
    with pytest.raises(SystemExit) as exit_:
        export_cli.main([str(tmp_path / "rnn.pt"), str(tmp_path / "out")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"error: {tmp_path / 'rnn.pt'} holds an RNN model: CTranslate2 has no spec for it, "
        "only Transformers can be exported"
    ]
    assert not (tmp_path / "out").exists()


def test_an_existing_folder_is_never_replaced_without_force(toy, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(SystemExit) as exit_:
        export_cli.main([str(toy.checkpoint), str(out)])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.startswith(f"error: {out} already exists")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    export_cli.main([str(toy.checkpoint), str(out), "--force"])
    assert (out / "model.bin").is_file() and not (out / "keep.txt").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]  # no temp left


def test_export_script_runs_from_the_command_line(toy, exported, tmp_path):
    out = tmp_path / "cli"
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "export.py"),
            str(toy.checkpoint),
            str(out),
            "--quantization",
            "int8",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert f"-> {out}" in result.stdout
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["config.json", "model.bin", "source_vocabulary.json", "target_vocabulary.json"]
        + ["transformer_mt.json"]
    )
    # --quantization took effect: the weights are stored as int8, and load as such.
    assert ExportedTranslator(out).translator.compute_type.startswith("int8")
    assert (out / "model.bin").stat().st_size < 0.5 * (exported / "model.bin").stat().st_size


def test_without_ctranslate2_the_error_says_what_to_install(toy, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ctranslate2", None)  # import fails
    with pytest.raises(SystemExit) as exit_:
        export_cli.main([str(toy.checkpoint), str(tmp_path / "out")])
    assert exit_.value.code == 2
    assert "pip install 'transformer-mt[export]'" in capsys.readouterr().err


def test_a_subword_model_exports_its_pieces_and_translates_alike(tmp_path):
    from train_support import WORDS

    from transformer_mt.data.subword import Subword, subword_state

    rng = random.Random(6)
    words = [[rng.choice(WORDS) for _ in range(rng.randint(2, 7))] for _ in range(400)]
    subword = Subword.train(words, "bpe", 40)
    vocab = subword.vocab()
    cfg = dataclasses.replace(TOY_MODEL, share_embeddings=True)
    torch.manual_seed(5)
    model = build_model(cfg, len(vocab), len(vocab)).eval()
    payload = _payload(model, cfg, vocab)
    payload["tokenizer"]["subword"] = subword_state(subword, subword)
    save_checkpoint(payload, tmp_path / "bpe.pt")
    folder = export_checkpoint(tmp_path / "bpe.pt", tmp_path / "ct2")
    assert (folder / "src_subword.model").read_bytes() == subword.to_bytes()
    ours = Translator.from_checkpoint(tmp_path / "bpe.pt", device="cpu", decode_cfg=DecodeConfig())
    theirs = ExportedTranslator(folder)
    lines = ["antbee dog cat", "kolark jay bee ibis", "fox gnu hen eel"]
    assert theirs.tokenize(lines) == [ours.src_vocab.decode(ids) for ids in ours.encode(lines)]
    assert theirs.translate(lines, beam_size=1) == ours.translate(lines)
