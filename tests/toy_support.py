"""The toy run shared by the translator, CLI, export, packaging, reliability and CUDA tests.

A toy "German" of number words translated word by word into "English" (`zwei drei .` → `two
three .`), prepared from text files like any custom corpus, trained for a few seconds with a plain
Adam loop and saved with `save_checkpoint`. `build_toy_run` does all of it and `open_toy_run` reads
it back; the session fixture `toy` (conftest.py) builds it once per test session, shared by all of
the session's worker processes.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from transformer_mt.checkpoint import build_checkpoint, load_checkpoint, save_checkpoint
from transformer_mt.config import DataConfig, DecodeConfig, ModelConfig
from transformer_mt.data.dataset import load_prepared, prepare
from transformer_mt.data.vocab import BOS, EOS, PAD, Vocab
from transformer_mt.model import build_model

GERMAN = ["eins", "zwei", "drei", "vier", "fünf", "sechs", "sieben", "acht", "neun", "zehn"]
ENGLISH = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
TOY_MODEL = ModelConfig(
    name="tiny",
    d_model=32,
    n_heads=4,
    enc_layers=2,
    dec_layers=2,
    d_ff=64,
    dropout=0.0,
    max_positions=24,  # small, so that an over-long sentence is easy to write
)
TRAIN_STEPS = 300
LEARNING_RATE = 5e-3


@dataclass
class ToyRun:
    checkpoint: Path
    data: DataConfig
    model: torch.nn.Module
    src_vocab: Vocab
    tgt_vocab: Vocab
    test_src: Path
    test_ref: Path


def toy_sentence(rng: random.Random, max_words: int = 8) -> tuple[str, str]:
    words = [rng.randrange(len(GERMAN)) for _ in range(rng.randint(1, max_words))]
    german = " ".join(GERMAN[w] for w in words) + "."
    english = " ".join(ENGLISH[w] for w in words) + "."
    return german.capitalize(), english.capitalize()


def toy_sources(toy: ToyRun, n: int, seed: int = 5) -> tuple[list[list[int]], list[str]]:
    """n fresh toy sentences as source ids (no specials) and their English translations."""
    rng = random.Random(seed)
    pairs = [toy_sentence(rng) for _ in range(n)]
    ids = [toy.src_vocab.encode(de.replace(".", " .").split()) for de, _ in pairs]
    return ids, [en for _, en in pairs]


def write_toy_corpus(folder: Path, rng: random.Random) -> None:
    """train / val / test files `<split>.de` and `<split>.en` under `folder`, as `toy_data` reads."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, size in (("train", 3000), ("val", 30), ("test", 60)):
        pairs = [toy_sentence(rng) for _ in range(size)]
        for side, lang in enumerate(("de", "en")):
            path = folder / f"{split}.{lang}"
            path.write_text("".join(pair[side] + "\n" for pair in pairs), encoding="utf-8")


def pad(sequences: list[list[int]]) -> torch.Tensor:
    longest = max(map(len, sequences))
    return torch.tensor([s + [PAD] * (longest - len(s)) for s in sequences])


def train_toy_model(train_src, train_tgt, src_vocab, tgt_vocab, steps: int) -> torch.nn.Module:
    """A few hundred Adam steps of teacher-forced cross-entropy on random batches."""
    torch.manual_seed(0)
    rng = random.Random(0)
    model = build_model(TOY_MODEL, len(src_vocab), len(tgt_vocab))
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE, betas=(0.9, 0.98))
    for step in range(steps):
        for group in optimizer.param_groups:  # linear decay to zero: a calm end, a sharp model
            group["lr"] = LEARNING_RATE * (1 - step / steps)
        rows = rng.sample(range(len(train_src)), 64)
        src = pad([train_src[i] + [EOS] for i in rows])
        tgt_in = pad([[BOS, *train_tgt[i]] for i in rows])
        tgt_out = pad([[*train_tgt[i], EOS] for i in rows])
        logits = model(src, tgt_in)
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.size(-1)), tgt_out.reshape(-1), ignore_index=PAD
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def toy_data(root: Path) -> DataConfig:
    """The toy run's DataConfig: its corpus files in `root / "corpus"`, its cache in `root / "data"`."""
    corpus = root / "corpus"
    return DataConfig(
        name="custom",
        src="de",
        tgt="en",
        root=str(root / "data"),
        train=[str(corpus / f"train.{lang}") for lang in ("de", "en")],
        valid=[str(corpus / f"val.{lang}") for lang in ("de", "en")],
        test=[str(corpus / f"test.{lang}") for lang in ("de", "en")],
        min_freq=1,
    )


def build_toy_run(root: Path) -> ToyRun:
    """Prepare the toy corpus under `root`, train the tiny model and save its checkpoint."""
    write_toy_corpus(root / "corpus", random.Random(1))
    data = toy_data(root)
    prepare(data)
    prepared = load_prepared(data)
    train = prepared.splits["train"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # see the one_thread fixtures: session fixtures are set up before them
    try:
        model = train_toy_model(
            train.src, train.tgt, prepared.src_vocab, prepared.tgt_vocab, TRAIN_STEPS
        )
    finally:
        torch.set_num_threads(threads)
    payload = build_checkpoint(
        weights=model.state_dict(),
        model_config=dataclasses.asdict(TOY_MODEL),
        config={
            "run_name": "toy-run",
            "data": dataclasses.asdict(data),
            "decode": dataclasses.asdict(DecodeConfig()),
        },
        src_vocab=prepared.src_vocab.to_list(),
        tgt_vocab=prepared.tgt_vocab.to_list(),
        tokenizer={"src_lang": "de", "tgt_lang": "en", "lowercase": False},
        epoch=1,
        step=TRAIN_STEPS,
        metrics={},
    )
    save_checkpoint(payload, toy_checkpoint(root))
    return open_toy_run(root)


def open_toy_run(root: Path) -> ToyRun:
    """The toy run that `build_toy_run(root)` left (another test process may have built it)."""
    data = toy_data(root)
    prepared = load_prepared(data)
    checkpoint = toy_checkpoint(root)
    model = build_model(TOY_MODEL, len(prepared.src_vocab), len(prepared.tgt_vocab))
    model.load_state_dict(load_checkpoint(checkpoint)["model"])
    return ToyRun(
        checkpoint,
        data,
        model.eval(),
        prepared.src_vocab,
        prepared.tgt_vocab,
        Path(data.test[0]),
        Path(data.test[1]),
    )


def toy_checkpoint(root: Path) -> Path:
    return root / "saved" / "toy-run" / "best.pt"


def run_translate(capsys, *argv: str) -> tuple[int, str, str]:
    """`mt-translate argv` in this process: (exit status, stdout, stderr)."""
    from transformer_mt.cli import translate as translate_cli

    try:
        translate_cli.main(list(argv))
        code = 0
    except SystemExit as done:
        code = done.code
    out, err = capsys.readouterr()
    return code, out, err
