"""Presets a user runs (configs/experiment/), bf16 on the CPU, and the Optuna search preset."""

from __future__ import annotations

import pytest
import torch
import yaml
from train_support import compose_config, overrides, run_train, write_reversal_corpus

from transformer_mt.errors import ConfigError
from transformer_mt.model.attention import scaled_dot_product_attention
from transformer_mt.train import step as step_module
from transformer_mt.train.step import use_amp


@pytest.mark.parametrize("preset", ["cpu", "gpu"])
def test_experiment_presets_set_a_whole_recipe(preset):
    cfg = compose_config([f"experiment={preset}"])
    assert cfg.model.name == preset
    assert (cfg.data.vocab, cfg.data.shared_vocab, cfg.model.share_embeddings) == (
        "bpe",
        True,
        True,
    )
    assert cfg.trainer.max_time is not None and cfg.trainer.average_last > 1
    assert cfg.optim.warmup_steps < 1000  # warmup in steps that fit the run
    # A user's overrides still win over the preset.
    cfg = compose_config([f"experiment={preset}", "data.src=en", "data.tgt=de", "optim.lr=1e-4"])
    assert (cfg.data.src, cfg.data.tgt, cfg.optim.lr) == ("en", "de", 1e-4)


def test_cpu_preset_fits_its_time_budget():
    cfg = compose_config(["experiment=cpu"])
    assert cfg.trainer.max_time <= 43  # averaging and start-up fit in the last 2 of 45 minutes
    assert cfg.trainer.amp is None and cfg.model.fast_attention is None  # chosen per machine
    # No tokens × vocabulary tensor of a whole batch, freed memory kept for the next step.
    chunk_logits_bytes = cfg.trainer.loss_chunk_tokens * cfg.data.vocab_size * 4  # float32
    assert 0 < chunk_logits_bytes < 32 * 2**20  # below glibc's largest mmap threshold
    assert cfg.trainer.malloc_tuning


def test_amp_default_follows_the_device(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert use_amp(None, cuda) and not use_amp(False, cuda)
    monkeypatch.setattr(step_module, "cpu_supports_bf16", lambda: True)
    assert use_amp(None, cpu) and use_amp(True, cpu) and not use_amp(False, cpu)
    monkeypatch.setattr(step_module, "cpu_supports_bf16", lambda: False)
    assert not use_amp(None, cpu) and not use_amp(False, cpu)
    with pytest.raises(ConfigError, match="no native bf16"):
        use_amp(True, cpu)


@pytest.mark.parametrize(
    ("capability", "avx512_bf16", "amx", "expected"),
    [
        ("DEFAULT", False, False, False),
        ("AVX2", True, True, False),  # torch would not use the AVX512 kernels
        ("AVX512", False, False, False),  # AVX512 without bf16 instructions: emulated, slow
        ("AVX512", True, False, True),
        ("AVX512", False, True, True),
        ("AVX512_BF16", True, False, True),
        ("AMX", False, True, True),
    ],
)
def test_bf16_support_needs_avx512_kernels_and_a_bf16_instruction_set(
    monkeypatch, capability, avx512_bf16, amx, expected
):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    assert step_module.cpu_supports_bf16() is expected


def test_automatic_attention_path_is_explicit_on_the_cpu(monkeypatch):
    q, k, v = (torch.randn(2, 4, 5, 8) for _ in range(3))
    pad = torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    explicit = scaled_dot_product_attention(q, k, v, pad, fast=False)

    def no_sdpa(*args, **kwargs):
        raise AssertionError("SDPA called on the CPU")

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", no_sdpa)
    assert torch.equal(scaled_dot_product_attention(q, k, v, pad, fast=None), explicit)


def test_forcing_bf16_on_a_cpu_without_it_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    corpus = write_reversal_corpus(tmp_path / "corpus", n_train=50, n_val=5)
    monkeypatch.setattr(step_module, "cpu_supports_bf16", lambda: False)
    code, err = run_train(
        overrides(corpus, tmp_path, "amp", "trainer.amp=true"), monkeypatch, capsys
    )
    assert code == 2
    assert err.strip().splitlines() == [
        "error: trainer.amp=true, but this CPU has no native bf16 (AVX512-BF16 or AMX): "
        "use trainer.amp=false (or leave it unset to choose automatically)"
    ]
    assert not (tmp_path / "saved" / "amp" / "last.pt").exists()


@pytest.mark.filterwarnings("ignore::DeprecationWarning:optuna")  # its SQLAlchemy 1.x import
def test_optuna_sweep_runs_two_trials_and_writes_the_best_parameters(tmp_path, monkeypatch, capsys):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    corpus = write_reversal_corpus(tmp_path / "corpus", n_train=100, n_val=5)
    args = overrides(
        corpus,
        tmp_path,
        "sweep",
        "hparams_search=optuna",
        "hydra.sweeper.n_trials=2",
        "hydra.sweeper.sampler.n_startup_trials=2",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        "trainer.max_epochs=1",
        "model.d_ff=64",  # with dec_layers, keeps the largest trial model quick to train
        "model.dec_layers=1",
    )
    code, stderr = run_train(args, monkeypatch, capsys)  # the entry point, in-process
    assert code == 0, stderr[-3000:]
    results = yaml.safe_load((tmp_path / "sweep" / "optimization_results.yaml").read_text())
    assert results["name"] == "optuna"
    best = results["best_params"]
    # optim.lr and optim.warmup_steps (train_support.overrides), model.d_ff and model.dec_layers
    # are fixed by the command line, which wins over the search space; the rest is searched.
    assert {"model.dropout", "model.d_model", "model.enc_layers"} <= set(best)
    assert not {"optim.lr", "model.d_ff", "model.dec_layers"} & set(best)
    assert 0.1 <= best["model.dropout"] <= 0.4 and best["model.d_model"] in (128, 256, 384)
    assert 0.0 <= results["best_value"] <= 100.0
    # Each trial is a run of its own, with its own checkpoints.
    assert sorted(p.name for p in (tmp_path / "saved").iterdir()) == ["sweep-0", "sweep-1"]


def test_linear_decay_anneals_a_real_run_to_min_lr_by_its_step_budget(
    tmp_path, monkeypatch, capsys
):
    import csv

    corpus = write_reversal_corpus(tmp_path / "corpus", n_train=200, n_val=10)
    args = overrides(
        corpus,
        tmp_path,
        "linear",
        "optim.decay=linear",
        "optim.warmup_steps=2",
        "optim.min_lr=0.0",
        "trainer.max_steps=12",
        "trainer.patience=0",
    )
    code, err = run_train(args, monkeypatch, capsys)
    assert code == 0, err
    with open(tmp_path / "result" / "linear" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    rates = [float(row["lr"]) for row in rows]
    assert len(rates) >= 2 and rates == sorted(rates, reverse=True)  # falls every epoch
    assert rates[-1] == 0.0  # the lr for the step after the budget: fully annealed


def test_the_cpu_sweep_searches_schedule_and_dropout_around_the_cpu_preset():
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    from hydra import compose, initialize_config_module

    from transformer_mt.cli.common import CONFIG_PACKAGE, register_configs

    register_configs()
    with initialize_config_module(config_module=CONFIG_PACKAGE, version_base="1.3"):
        node = compose(
            config_name="train",
            overrides=["hparams_search=optuna_cpu", "experiment=cpu"],
            return_hydra_config=True,
        )
    sweeper = node.hydra.sweeper
    assert sweeper.direction == "maximize" and node.trainer.monitor == "val_bleu"
    assert set(sweeper.params) == {"optim.lr", "optim.warmup_steps", "model.dropout"}
    assert node.data.vocab == "bpe" and node.trainer.average_last == 0  # the preset, unaveraged
