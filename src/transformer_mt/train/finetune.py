"""Fine-tuning: a new run whose model starts from the weights of another run's checkpoint.

`trainer.init_from=<checkpoint>` is fairseq's `--restore-file` with `--reset-optimizer`, JoeyNMT's
`load_model`, OpenNMT-py's `-train_from` with `-reset_optim all`. The new run has its own
`run_name`, logs, optimizer, schedule and step count. From the checkpoint it takes:

- the weights. The model settings must be the same, except those that only regularise
  (dropout rates) or pick a kernel (`fast_attention`): a new corpus often wants more dropout.
- the vocabularies and subword models, so that every id means what it meant during the first
  training. The new training split is segmented and numericalized with them (words the
  vocabulary lacks become `<unk>`, pieces never do); `data.vocab` and its sizes are taken from the
  checkpoint's run.
- with `trainer.init_optimizer=true`, Adam's moments (from last.pt or an epoch_<n>.pt, which keep
  the training state; best.pt and averaged.pt do not).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from transformer_mt.checkpoint import load_checkpoint
from transformer_mt.config import DataConfig, ModelConfig, TrainConfig, to_dataclass
from transformer_mt.data.cache import Vocabularies
from transformer_mt.data.subword import subwords_from_state
from transformer_mt.data.vocab import Vocab
from transformer_mt.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)

# Model settings a fine-tuning run may change: they shape no parameter.
FREE_MODEL_KEYS = ("name", "dropout", "attention_dropout", "activation_dropout", "fast_attention")


@dataclass
class InitCheckpoint:
    """The checkpoint a fine-tuning run starts from, checked against the run's settings."""

    path: Path
    payload: dict[str, Any]
    vocabs: Vocabularies

    @classmethod
    def load(cls, cfg: TrainConfig) -> InitCheckpoint:
        """Read `trainer.init_from`; raise a UserError naming what does not fit `cfg`."""
        path = Path(cfg.trainer.init_from)
        payload = load_checkpoint(path)
        if cfg.trainer.init_optimizer and payload.get("train_state") is None:
            raise CheckpointError(
                f"trainer.init_optimizer=true, but {path} holds no optimizer state (best.pt and "
                "averaged.pt keep weights only): start from last.pt or an epoch_<n>.pt"
            )
        _check_model(path, payload["model_config"], cfg.model)
        tokenizer = payload["tokenizer"]
        trained = (tokenizer["src_lang"], tokenizer["tgt_lang"])
        if trained != (cfg.data.src, cfg.data.tgt):
            raise ConfigError(
                f"trainer.init_from={path} translates {trained[0]}→{trained[1]}, this run asks for "
                f"data.src={cfg.data.src} data.tgt={cfg.data.tgt}: fine-tune in the same direction"
            )
        try:
            src_subword, tgt_subword = subwords_from_state(tokenizer.get("subword"))
        except ValueError as err:
            raise CheckpointError(f"{path} cannot be fine-tuned: {err}") from None
        vocabs = Vocabularies(
            Vocab(payload["src_vocab"]), Vocab(payload["tgt_vocab"]), src_subword, tgt_subword
        )
        return cls(path, payload, vocabs)

    def data_config(self, data: DataConfig) -> DataConfig:
        """`data` with the tokenization settings of the checkpoint's run (its vocabularies rule)."""
        subword = self.vocabs.src_subword
        trained = (self.payload.get("config") or {}).get("data") or {}
        settings = {
            "vocab": subword.kind if subword is not None else "word",
            "shared_vocab": self.vocabs.src_vocab == self.vocabs.tgt_vocab,
            "lowercase": bool(self.payload["tokenizer"]["lowercase"]),
        }
        if subword is not None:
            settings["vocab_size"] = len(subword)
        for key in ("min_freq", "max_size"):
            if key in trained and subword is None:
                settings[key] = trained[key]
        for key, value in settings.items():
            if getattr(data, key) != value:
                log.info(
                    "data.%s=%s from %s (its vocabularies are kept; this run asked for %s)",
                    key,
                    value,
                    self.path,
                    getattr(data, key),
                )
        return dataclasses.replace(data, **settings)

    def load_into(
        self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, with_optimizer: bool
    ) -> None:
        """Put the weights (and Adam's moments if `with_optimizer`) into a new run's model."""
        check_weights(self.path, self.payload["model"], model)
        model.load_state_dict(self.payload["model"])
        if not with_optimizer:
            return
        try:
            optimizer.load_state_dict(self.payload["train_state"]["optimizer"])
        except (ValueError, KeyError) as err:
            raise CheckpointError(
                f"the optimizer state of {self.path} does not fit this run's optimizer "
                f"({err}); drop trainer.init_optimizer or keep optim.weight_decay as it was"
            ) from None

    def log_start(self, metrics: dict[str, float], with_optimizer: bool) -> None:
        """The line that gives the fine-tuning run's validation before its first step."""
        log.info(
            "fine-tuning from %s%s: before training val loss %.4f, ppl %.2f, BLEU %.2f",
            self.describe(),
            " with its optimizer state" if with_optimizer else "",
            metrics["val_loss"],
            metrics["val_ppl"],
            metrics["val_bleu"],
        )

    def describe(self) -> str:
        config = self.payload.get("config") or {}
        return (
            f"{self.path} (run {config.get('run_name', '?')}, epoch {self.payload['epoch']}, "
            f"step {self.payload['step']})"
        )


def _check_model(path: Path, stored: dict[str, Any], model: ModelConfig) -> None:
    try:
        trained = asdict(to_dataclass(ModelConfig, stored))
    except (ConfigError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path} holds no usable model settings ({err})") from None
    wanted = asdict(model)
    differ = [k for k in wanted if k not in FREE_MODEL_KEYS and trained.get(k) != wanted[k]]
    if differ:
        listed = ", ".join(f"model.{k}={trained[k]} (this run: {wanted[k]})" for k in differ)
        raise ConfigError(
            f"trainer.init_from={path} was trained with other model settings: {listed}. "
            "Fine-tune with the same model preset and overrides as that run"
        )


def check_weights(path: Path, weights: dict[str, torch.Tensor], model: torch.nn.Module) -> None:
    """Refuse weights that do not fill `model` exactly: a missing, extra or reshaped tensor."""
    expected = model.state_dict()
    problems = {
        "missing": sorted(expected.keys() - weights.keys()),
        "unexpected": sorted(weights.keys() - expected.keys()),
        "of another shape": sorted(
            key
            for key in expected.keys() & weights.keys()
            if tuple(weights[key].shape) != tuple(expected[key].shape)
        ),
    }
    found = [f"{what}: {', '.join(keys[:3])}" for what, keys in problems.items() if keys]
    if found:
        raise CheckpointError(
            f"{path} does not hold the weights of this model ({'; '.join(found)}): "
            "use a checkpoint that training wrote for this model"
        )
