"""Typed configuration: the one home of every default.

Each stage takes the dataclass it needs (the model a `ModelConfig`, the batcher a `DataConfig`, ...),
never a Hydra `DictConfig`. `transformer_mt.cli.hydra_setup.register_configs()` registers the same
dataclasses in Hydra's ConfigStore, so a misspelt or mistyped override fails before any work starts.
The YAML files under configs/ only *select* presets; they never introduce a key that is not here.

Invariants a user can break from the command line are checked in `__post_init__` and raise
`ConfigError` with a message that names the key.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING

from transformer_mt.errors import ConfigError

# Languages of Multi30k Task 1. A custom corpus may use any language spaCy has a blank pipeline for.
MULTI30K_LANGS = ("en", "de", "fr", "cs")
VOCAB_KINDS = ("word", "bpe", "unigram")
LR_DECAYS = ("plateau", "linear")
MIN_SUBWORD_VOCAB = 16  # the 4 specials and room for some characters
# Largest decode.beam_size: the search holds batch_size x beam_size hypotheses, and beyond a few
# dozen a wider beam only lowers BLEU (the "beam search curse"); 256 is far past any useful width.
MAX_BEAM_SIZE = 256
# Upper bounds far past any useful value, below those where a float overflows or an allocation
# explodes: ((5 + length) / 6) ** length_penalty, max_len_b * source length, the positional table
# (max_positions x d_model floats), SentencePiece's piece table.
MAX_LENGTH_PENALTY = 10
MAX_LEN_B = 1000
MAX_POSITIONS = 65536
MAX_VOCAB_SIZE = 1_000_000


def _finite(name: str, value: float | None) -> None:
    """nan and inf pass every comparison test silently (nan <= 0 is False): refuse them first."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number (got {value})")


def _positive(name: str, value: float | None, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    _finite(name, value)
    if value is None or value <= 0:
        raise ConfigError(f"{name} must be > 0 (got {value})")


def _non_negative(name: str, value: float | None) -> None:
    _finite(name, value)
    if value is not None and value < 0:
        raise ConfigError(f"{name} must be >= 0 (got {value})")


def _at_most(name: str, value: float, limit: float) -> None:
    if value > limit:
        raise ConfigError(f"{name} must be <= {limit} (got {value})")


def _probability(name: str, value: float) -> None:
    _finite(name, value)
    if not 0.0 <= value < 1.0:
        raise ConfigError(f"{name} must be in [0, 1) (got {value})")


@dataclass
class DataConfig:
    """Which corpus, how it is tokenized, numericalized and batched."""

    name: str = "multi30k"  # "multi30k" or "custom"
    src: str = "de"
    tgt: str = "en"
    root: str = "data"  # downloads go to <root>/multi30k, prepared caches to <root>/cache
    # A directory or base URL that replaces the download source (or env MT_DATA_MIRROR).
    mirror: str | None = None
    # Custom corpus: [source_file, target_file] per split (name=custom only).
    train: list[str] | None = None
    valid: list[str] | None = None
    test: list[str] | None = None
    lowercase: bool = False
    # word: spaCy tokens are the vocabulary; bpe / unigram: a SentencePiece model trained on the
    # training split's spaCy tokens splits them further into subword pieces (no <unk> for input
    # made of characters seen in training).
    vocab: str = "word"
    vocab_size: int = 8000  # bpe / unigram: pieces per model, specials included
    min_freq: int = 2  # word only
    # word only: largest vocabulary, specials included; None = no limit for Multi30k, 50,000 for a
    # custom corpus (whose rare words grow without bound with its size)
    max_size: int | None = None
    # One vocabulary for both sides (needed for model.share_embeddings); with bpe / unigram, one
    # subword model trained on both sides (joint), else one per side.
    shared_vocab: bool = False
    max_len: int = 100  # training pairs longer than this (tokens, either side) are filtered out
    max_tokens: int = 4096  # padded tokens of one batch (longer side); per process under torchrun
    limit_train: int | None = None  # keep only the first N training pairs (quick runs)
    # Processes that tokenize and encode a corpus being prepared; None = every core (one process
    # for a corpus under 32 MB, where starting workers costs more than it saves).
    workers: int | None = None
    # bpe / unigram: SentencePiece trains on at most this many sentences, a uniform random sample
    # of the training split (all of it when smaller). Both sides count when the model is joint.
    subword_sample: int = 1_000_000
    # Under torchrun, the first process of each machine prepares missing data; the others wait this
    # many minutes for it to appear on disk.
    prepare_wait: float = 60.0

    def __post_init__(self) -> None:
        if self.name not in ("multi30k", "custom"):
            raise ConfigError(f"data.name must be 'multi30k' or 'custom' (got {self.name!r})")
        if self.src == self.tgt:
            raise ConfigError(
                f"data.src and data.tgt are both {self.src!r}: pick two different languages"
            )
        if self.name == "multi30k":
            for key in ("src", "tgt"):
                lang = getattr(self, key)
                if lang not in MULTI30K_LANGS:
                    raise ConfigError(
                        f"data.{key}={lang!r} is not a Multi30k language "
                        f"(choose from {', '.join(MULTI30K_LANGS)}, or use data=custom)"
                    )
        if self.vocab not in VOCAB_KINDS:
            raise ConfigError(
                f"data.vocab must be one of {', '.join(VOCAB_KINDS)} (got {self.vocab!r})"
            )
        if self.vocab_size < MIN_SUBWORD_VOCAB:
            raise ConfigError(
                f"data.vocab_size must be >= {MIN_SUBWORD_VOCAB} (got {self.vocab_size})"
            )
        _at_most("data.vocab_size", self.vocab_size, MAX_VOCAB_SIZE)
        _positive("data.min_freq", self.min_freq)
        _positive("data.max_size", self.max_size, allow_none=True)
        _positive("data.max_len", self.max_len)
        _positive("data.max_tokens", self.max_tokens)
        _positive("data.limit_train", self.limit_train, allow_none=True)
        _positive("data.workers", self.workers, allow_none=True)
        _positive("data.subword_sample", self.subword_sample)
        _positive("data.prepare_wait", self.prepare_wait)


@dataclass
class ModelConfig:
    """Architecture. `arch=transformer` is the main model, `arch=rnn` the Bahdanau baseline."""

    name: str = "base"  # preset name, used in readable run names
    arch: str = "transformer"  # "transformer" or "rnn"
    d_model: int = 512  # model width D (rnn: embedding and hidden size)
    n_heads: int = 8
    enc_layers: int = 6
    dec_layers: int = 6
    d_ff: int = 2048
    dropout: float = 0.1
    attention_dropout: float = 0.0
    # Dropout on the feed-forward network's hidden ReLU activations (d_ff wide); None = `dropout`.
    # fairseq calls it activation_dropout and leaves it at 0: on a CPU it is the costliest dropout.
    activation_dropout: float | None = None
    pre_norm: bool = False  # False = post-norm, as in "Attention Is All You Need"
    tie_output: bool = True  # decoder input embedding = output projection weights
    share_embeddings: bool = False  # one embedding for both sides (needs data.shared_vocab)
    max_positions: int = 1024  # longest sequence the positional table holds
    # True: the SDPA kernel; False: explicit softmax(QK^T)V; None: per device, the faster one
    # as scripts/bench_train.py measures it (SDPA on CUDA, explicit on the CPU).
    fast_attention: bool | None = None
    input_feeding: bool = False  # rnn only: feed the previous attentional output into the next step

    def __post_init__(self) -> None:
        if self.arch not in ("transformer", "rnn"):
            raise ConfigError(f"model.arch must be 'transformer' or 'rnn' (got {self.arch!r})")
        for key in ("d_model", "n_heads", "enc_layers", "dec_layers", "d_ff", "max_positions"):
            _positive(f"model.{key}", getattr(self, key))
        _at_most("model.max_positions", self.max_positions, MAX_POSITIONS)
        if self.d_model % self.n_heads:
            raise ConfigError(
                f"model.d_model={self.d_model} is not divisible by model.n_heads={self.n_heads}: "
                "every head needs d_model / n_heads dimensions"
            )
        if self.arch == "rnn" and self.d_model % 2:
            raise ConfigError(
                f"model.d_model={self.d_model} must be even for arch=rnn: "
                "each direction of the bidirectional encoder gets d_model / 2 units"
            )
        _probability("model.dropout", self.dropout)
        _probability("model.attention_dropout", self.attention_dropout)
        if self.activation_dropout is not None:
            _probability("model.activation_dropout", self.activation_dropout)

    @property
    def ffn_dropout(self) -> float:
        """The dropout inside the feed-forward network."""
        return self.dropout if self.activation_dropout is None else self.activation_dropout


@dataclass
class OptimConfig:
    """Adam with linear warmup, then ReduceLROnPlateau on the monitored metric or a linear decay."""

    lr: float = 5e-4  # peak learning rate, reached at the end of warmup
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-9
    weight_decay: float = 0.0
    warmup_steps: int = 1000
    # After warmup: `plateau` lowers the rate when trainer.monitor stalls; `linear` decays it to
    # min_lr over the run's budget (trainer.max_time, max_steps or max_epochs, the first to end).
    decay: str = "plateau"
    plateau_factor: float = 0.5  # lr *= factor after `plateau_patience` validations without gain
    plateau_patience: int = 2
    min_lr: float = 1e-6
    clip_norm: float = 1.0  # max global gradient norm; 0 disables clipping
    label_smoothing: float = 0.1

    def __post_init__(self) -> None:
        _positive("optim.lr", self.lr)
        _positive("optim.eps", self.eps)
        _non_negative("optim.weight_decay", self.weight_decay)
        _non_negative("optim.warmup_steps", self.warmup_steps)
        if self.decay not in LR_DECAYS:
            raise ConfigError(
                f"optim.decay must be one of {', '.join(LR_DECAYS)} (got {self.decay!r})"
            )
        if not 0.0 < self.plateau_factor < 1.0:
            raise ConfigError(f"optim.plateau_factor must be in (0, 1) (got {self.plateau_factor})")
        _non_negative("optim.plateau_patience", self.plateau_patience)
        _non_negative("optim.min_lr", self.min_lr)
        _non_negative("optim.clip_norm", self.clip_norm)
        _probability("optim.label_smoothing", self.label_smoothing)
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"optim.betas must be two numbers in [0, 1) (got {self.betas})")


@dataclass
class TrainerConfig:
    """The loop: device, length, checkpoints, logging, resume."""

    device: str = "auto"  # auto | cpu | cuda | cuda:N
    seed: int = 1234
    max_epochs: int = 30
    max_steps: int | None = None  # stop after this many optimizer steps
    # Optimizer steps between validations (each one a metrics row, best.pt when it improved and
    # last.pt), anywhere in an epoch; None: once per epoch, at its end.
    validate_every: int | None = None
    # Optimizer steps between saves of last.pt in the middle of an epoch (resumable exactly);
    # None: saved at epoch ends and validations only.
    save_every: int | None = None
    # Minutes of training and validation. With validate_every or save_every set, the run stops at
    # the first step past it, even in the middle of an epoch. Otherwise no epoch is started that
    # would end after it at the last epoch's pace (on a resume, before the first epoch is timed:
    # after the epoch that crosses it).
    max_time: float | None = None
    # Early stopping: validations without improvement of `monitor` (one per epoch unless
    # validate_every); 0 disables.
    patience: int = 6
    monitor: str = "val_bleu"  # val_bleu (higher is better) or val_loss (lower is better)
    keep_last: int = 5  # epoch_<n>.pt files kept
    # At the end, average the last k epoch_<n>.pt into averaged.pt and validate it; best.pt then
    # holds the better of the average and the best validated weights (on `monitor`). 0 = off.
    average_last: int = 0
    resume: bool = False  # continue run `run_name` from saved/<run_name>/last.pt
    # Fine-tuning: start this new run from the weights of a checkpoint (its vocabularies and
    # subword models too), with a fresh optimizer, schedule and step count (resuming such a run
    # keeps the setting: the vocabularies still come from it, the weights from last.pt) ...
    init_from: str | None = None
    init_optimizer: bool = False  # ... or keep its Adam moments (a checkpoint with training state)
    accumulate: int = 1  # gradient accumulation: optimizer step every N batches
    compile: bool = False  # torch.compile the model
    # Target tokens whose output projection and loss are computed at a time in the training step
    # (train/loss.py, backward_in_chunks): same loss and gradients, smaller peak memory; 0 = the
    # whole batch at once. Not under torchrun or trainer.compile, which take the whole batch.
    loss_chunk_tokens: int = 0
    # glibc, one process on a CPU (not under torchrun): serve large tensors from malloc's heap and
    # keep freed memory for the next step instead of mmapping it afresh each step
    # (train/allocator.py); false = the C library's default.
    malloc_tuning: bool = True
    # bf16 autocast. None: on wherever the device computes bf16 natively (CUDA; a CPU with
    # AVX512-BF16 or AMX), off elsewhere. True on a CPU without bf16 support is an error.
    amp: bool | None = None
    log_every: int = 50  # steps between TensorBoard train/* points
    num_samples: int = 3  # sample translations shown per validation
    skip_nonfinite: bool = False  # on a NaN/inf loss: False = stop the run, True = skip the batch
    val_batch_size: int = 128  # sentences per validation decoding batch
    progress: bool = True  # per-step progress bar

    def __post_init__(self) -> None:
        if self.monitor not in ("val_bleu", "val_loss"):
            raise ConfigError(
                f"trainer.monitor must be 'val_bleu' or 'val_loss' (got {self.monitor!r})"
            )
        _positive("trainer.max_epochs", self.max_epochs)
        _positive("trainer.max_steps", self.max_steps, allow_none=True)
        _positive("trainer.max_time", self.max_time, allow_none=True)
        _positive("trainer.validate_every", self.validate_every, allow_none=True)
        _positive("trainer.save_every", self.save_every, allow_none=True)
        _non_negative("trainer.patience", self.patience)
        _non_negative("trainer.keep_last", self.keep_last)
        _non_negative("trainer.average_last", self.average_last)
        if self.average_last > self.keep_last:
            raise ConfigError(
                f"trainer.average_last={self.average_last} needs the last {self.average_last} "
                f"epoch checkpoints, but trainer.keep_last={self.keep_last} keeps fewer: "
                "raise trainer.keep_last"
            )
        _positive("trainer.accumulate", self.accumulate)
        _non_negative("trainer.loss_chunk_tokens", self.loss_chunk_tokens)
        _positive("trainer.log_every", self.log_every)
        _non_negative("trainer.num_samples", self.num_samples)
        _positive("trainer.val_batch_size", self.val_batch_size)
        if self.init_optimizer and self.init_from is None:
            raise ConfigError("trainer.init_optimizer=true needs trainer.init_from=<checkpoint>")

    @property
    def by_steps(self) -> bool:
        """Whether validation or saving runs every N steps: max_time is then checked between
        steps instead of between epochs."""
        return self.validate_every is not None or self.save_every is not None


@dataclass
class DecodeConfig:
    """Search settings shared by validation, evaluate and translate."""

    beam_size: int = 1  # 1 = greedy
    length_penalty: float = 1.4  # GNMT alpha: score / ((5 + len) / 6) ** alpha; 0 = raw log-prob
    max_len_a: int = 10  # hypotheses stop at max_len_a + max_len_b * source_length tokens
    max_len_b: float = 1.5
    nbest: int = 1
    batch_size: int = 128  # sentences per decoding batch, at most ...
    # ... and at most this many padded source tokens x beam_size (one sentence alone always goes):
    # what a search holds (encoder output, caches, attention) grows with it, not with the lines.
    max_tokens: int = 16384

    def __post_init__(self) -> None:
        _positive("decode.beam_size", self.beam_size)
        if self.beam_size > MAX_BEAM_SIZE:
            raise ConfigError(
                f"decode.beam_size={self.beam_size} is above the limit of {MAX_BEAM_SIZE}: "
                "beams wider than about 10 rarely help; pick a smaller one"
            )
        _non_negative("decode.length_penalty", self.length_penalty)
        _at_most("decode.length_penalty", self.length_penalty, MAX_LENGTH_PENALTY)
        _non_negative("decode.max_len_a", self.max_len_a)
        _non_negative("decode.max_len_b", self.max_len_b)
        _at_most("decode.max_len_b", self.max_len_b, MAX_LEN_B)
        _positive("decode.nbest", self.nbest)
        _positive("decode.batch_size", self.batch_size)
        _positive("decode.max_tokens", self.max_tokens)
        if self.nbest > self.beam_size:
            raise ConfigError(
                f"decode.nbest={self.nbest} exceeds decode.beam_size={self.beam_size}: "
                "n-best lists come from the beam"
            )


@dataclass
class PrepareConfig:
    """`scripts/prepare_data.py`: fetch, tokenize and cache a corpus."""

    data: DataConfig = field(default_factory=DataConfig)


@dataclass
class TrainConfig:
    """`scripts/train.py`: the whole training run."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    run_name: str = MISSING  # set by configs/train.yaml to a readable name with a timestamp
    saved_dir: str = "saved"  # checkpoints: <saved_dir>/<run_name>/
    result_dir: str = "result"  # logs: <result_dir>/<run_name>/


@dataclass
class EvaluateConfig:
    """`scripts/evaluate.py`: score a checkpoint on a split or on a pair of files."""

    checkpoint: str = MISSING
    split: str = "test2016"
    src_file: str | None = None  # with ref_file: score these files instead of a corpus split
    ref_file: str | None = None
    device: str = "auto"
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    result_dir: str = "result"  # hypotheses go to <result_dir>/<run_name>/eval/
    data_root: str | None = None  # where the corpus lives, if not where the checkpoint's run had it
    mirror: str | None = None


def to_dataclass(cls: type, node: Any) -> Any:
    """Build dataclass `cls` from a mapping (a plain dict or an OmegaConf node), running its checks."""
    from omegaconf import DictConfig, OmegaConf

    if isinstance(node, DictConfig):
        node = OmegaConf.to_container(node, resolve=True)
    kwargs = {}
    for name in cls.__dataclass_fields__:
        if name not in node:
            continue
        value = node[name]
        sub = _DATACLASS_FIELDS.get((cls, name))
        kwargs[name] = to_dataclass(sub, value) if sub is not None and value is not None else value
    return cls(**kwargs)


_DATACLASS_FIELDS: dict[tuple[type, str], type] = {
    (PrepareConfig, "data"): DataConfig,
    (TrainConfig, "data"): DataConfig,
    (TrainConfig, "model"): ModelConfig,
    (TrainConfig, "optim"): OptimConfig,
    (TrainConfig, "trainer"): TrainerConfig,
    (TrainConfig, "decode"): DecodeConfig,
    (EvaluateConfig, "decode"): DecodeConfig,
}
