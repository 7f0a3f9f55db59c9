"""Export a Transformer checkpoint to CTranslate2, and translate with the exported model.

CTranslate2 is the inference engine that fairseq, OpenNMT-py and Marian users serve with: fast
CPU and GPU decoding, int8 weights. Our Transformer is its standard encoder-decoder spec: post-norm
(or pre-norm with a final LayerNorm), ReLU, embeddings scaled by √D, sinusoidal positions. The
export fills `ctranslate2.specs.TransformerSpec` weight by weight:

    ours                                   CTranslate2
    encoder.embed.token                    encoder.embeddings[0]   (√D scaling: scale_embeddings)
    sinusoid_table(max_positions, D)       {encoder,decoder}.position_encodings (our interleaved
                                           sin/cos table, written out: CT2's own is concatenated)
    layers[i].self_attn.qkv_proj           layer[i].self_attention.linear[0]  (Q, K, V fused alike)
    layers[i].self_attn.out_proj           layer[i].self_attention.linear[1]
    layers[i].cross_attn.q_proj / kv_proj  layer[i].attention.linear[0] / linear[1]
    layers[i].norm1 / norm2 / norm3        self_attention / attention / ffn .layer_norm
    layers[i].ffn.linear1 / linear2        ffn.linear_0 / linear_1
    output_proj                            decoder.projection (no bias)

The output folder holds CTranslate2's `model.bin`, `config.json` and vocabularies, and beside them
what our tokenization needs: `transformer_mt.json` (languages, lowercase, subword kind) and, for
a subword model, `src_subword.model` / `tgt_subword.model`. `ExportedTranslator` reads that folder
and translates raw sentences with the same spaCy tokenization, subword segmentation and
detokenization as `Translator`. The RNN model has no CTranslate2 spec: exporting it is an error.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from transformer_mt.config import DecodeConfig
from transformer_mt.data.subword import Subword
from transformer_mt.data.tokenize import Detokenizer, Tokenizer
from transformer_mt.data.vocab import BOS, EOS, PAD, SPECIALS, UNK, Vocab
from transformer_mt.errors import UserError
from transformer_mt.files import atomic_directory
from transformer_mt.inference.translator import Translator, with_overrides
from transformer_mt.model.embedding import sinusoid_table

META_FILE = "transformer_mt.json"
LAYER_NORM_EPS = 1e-5  # torch.nn.LayerNorm's default, which the model uses


class ExportError(UserError):
    """The checkpoint cannot be exported, or the export folder cannot be used."""


def _ctranslate2() -> Any:
    try:
        import ctranslate2
    except ImportError:
        raise ExportError(
            "exporting needs the ctranslate2 package: pip install 'transformer-mt[export]' "
            "(or pip install ctranslate2)"
        ) from None
    return ctranslate2


def export_checkpoint(
    checkpoint: str | os.PathLike,
    out_dir: str | os.PathLike,
    force: bool = False,
    quantization: str | None = None,
) -> Path:
    """Write the CTranslate2 model of `checkpoint` to `out_dir`; return the folder.

    `quantization` stores the weights as CTranslate2's "int8", "float16", ... (None: float32;
    CTranslate2 can also quantize at load time, `ExportedTranslator(compute_type="int8")`). The
    folder is built under a temporary name beside `out_dir` and renamed into place (files.py), so
    it is complete or absent. An existing `out_dir` is an error unless `force`.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not force:
        raise ExportError(f"{out_dir} already exists: pick another folder or pass --force")
    ct2 = _ctranslate2()
    translator = Translator.from_checkpoint(checkpoint, device="cpu")
    model = translator.model
    if model.config.arch != "transformer":
        raise ExportError(
            f"{checkpoint} holds an {model.config.arch.upper()} model: CTranslate2 has no spec "
            "for it, only Transformers can be exported"
        )
    spec = _spec(ct2, model)
    spec.register_source_vocabulary(_ct2_tokens(translator.src_vocab))
    spec.register_target_vocabulary(_ct2_tokens(translator.tgt_vocab))
    spec.validate()
    try:
        spec.optimize(quantization=quantization)
    except ValueError as err:
        raise ExportError(f"--quantization={quantization}: {err}") from None
    try:
        with atomic_directory(out_dir, replace=force) as building:
            spec.save(str(building))
            _write_meta(building, translator)
    except OSError as err:
        raise ExportError(f"cannot write {out_dir}: {err.strerror or err}") from None
    return out_dir


def _ct2_tokens(vocab: Vocab) -> list[str]:
    """Our tokens as CTranslate2's vocabulary: it calls padding `<blank>`."""
    tokens = vocab.to_list()
    tokens[PAD] = "<blank>"
    return tokens


def _spec(ct2: Any, model: Any) -> Any:
    cfg = model.config
    specs = ct2.specs
    spec = specs.TransformerSpec.from_config(
        (cfg.enc_layers, cfg.dec_layers),
        cfg.n_heads,
        pre_norm=cfg.pre_norm,
        activation=specs.Activation.RELU,
    )
    config = spec.config
    config.unk_token, config.bos_token, config.eos_token = (
        SPECIALS[UNK],
        SPECIALS[BOS],
        SPECIALS[EOS],
    )
    config.decoder_start_token = SPECIALS[BOS]
    config.add_source_eos = True  # our encoder reads the source followed by EOS
    config.layer_norm_epsilon = LAYER_NORM_EPS

    def arr(tensor: torch.Tensor):
        return tensor.detach().float().cpu().numpy().copy()

    def linear(target: Any, module: torch.nn.Linear) -> None:
        target.weight = arr(module.weight)
        if module.bias is not None:
            target.bias = arr(module.bias)

    def norm(target: Any, module: torch.nn.LayerNorm) -> None:
        target.gamma, target.beta = arr(module.weight), arr(module.bias)

    positions = arr(sinusoid_table(cfg.max_positions, cfg.d_model))
    for side, ours in ((spec.encoder, model.encoder), (spec.decoder, model.decoder)):
        embeddings = side.embeddings[0] if isinstance(side.embeddings, list) else side.embeddings
        embeddings.weight = arr(ours.embed.token.weight)
        side.scale_embeddings = True
        side.position_encodings.encodings = positions
        if cfg.pre_norm:
            norm(side.layer_norm, ours.final_norm)
    for layer_spec, layer in zip(spec.encoder.layer, model.encoder.layers, strict=True):
        linear(layer_spec.self_attention.linear[0], layer.self_attn.qkv_proj)
        linear(layer_spec.self_attention.linear[1], layer.self_attn.out_proj)
        norm(layer_spec.self_attention.layer_norm, layer.norm1)
        _ffn(layer_spec.ffn, layer, layer.norm2, linear, norm)
    for layer_spec, layer in zip(spec.decoder.layer, model.decoder.layers, strict=True):
        linear(layer_spec.self_attention.linear[0], layer.self_attn.qkv_proj)
        linear(layer_spec.self_attention.linear[1], layer.self_attn.out_proj)
        norm(layer_spec.self_attention.layer_norm, layer.norm1)
        linear(layer_spec.attention.linear[0], layer.cross_attn.q_proj)
        linear(layer_spec.attention.linear[1], layer.cross_attn.kv_proj)
        linear(layer_spec.attention.linear[2], layer.cross_attn.out_proj)
        norm(layer_spec.attention.layer_norm, layer.norm2)
        _ffn(layer_spec.ffn, layer, layer.norm3, linear, norm)
    linear(spec.decoder.projection, model.output_proj)
    return spec


def _ffn(target: Any, layer: Any, layer_norm: Any, linear: Any, norm: Any) -> None:
    linear(target.linear_0, layer.ffn.linear1)
    linear(target.linear_1, layer.ffn.linear2)
    norm(target.layer_norm, layer_norm)


def _write_meta(folder: Path, translator: Any) -> None:
    subword = translator.src_subword
    meta = {
        "src_lang": translator.src_lang,
        "tgt_lang": translator.tgt_lang,
        "lowercase": translator.lowercase,
        "subword": subword.kind if subword is not None else None,
        "max_source_tokens": translator.model.config.max_positions,
        "decode": {
            key: getattr(translator.decode_cfg, key)
            for key in ("beam_size", "length_penalty", "max_len_a", "max_len_b")
        },
    }
    if subword is not None:
        (folder / "src_subword.model").write_bytes(subword.to_bytes())
        (folder / "tgt_subword.model").write_bytes(translator.tgt_subword.to_bytes())
    (folder / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


class ExportedTranslator:
    """Raw sentences in, translations out, through a CTranslate2 model `export_checkpoint` wrote.

    Tokenization, subword segmentation and detokenization are ours, so for the same weights and
    greedy search the translations are `Translator`'s. `compute_type` is CTranslate2's: "default"
    (the stored float32), "int8", "int8_float32", ...
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        device: str = "cpu",
        compute_type: str = "default",
        inter_threads: int = 1,
        intra_threads: int = 0,
    ) -> None:
        ct2 = _ctranslate2()
        folder = Path(folder)
        try:
            meta = json.loads((folder / META_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise ExportError(
                f"{folder} is not a folder written by mt-export ({META_FILE}: {err})"
            ) from None
        self.meta = meta
        self.translator = ct2.Translator(
            str(folder),
            device=device,
            compute_type=compute_type,
            inter_threads=inter_threads,
            intra_threads=intra_threads,
        )
        src_subword = tgt_subword = None
        if meta["subword"] is not None:
            src_subword = Subword((folder / "src_subword.model").read_bytes(), meta["subword"])
            tgt_subword = Subword((folder / "tgt_subword.model").read_bytes(), meta["subword"])
        self.ban_unk = tgt_subword is not None
        self.max_source_tokens = int(meta["max_source_tokens"])
        self.tokenizer = Tokenizer(meta["src_lang"], bool(meta["lowercase"]), src_subword)
        self.detokenizer = Detokenizer(meta["tgt_lang"], tgt_subword)
        self.decode_cfg = DecodeConfig(**meta["decode"])
        self._never = [["<blank>"], [SPECIALS[BOS]]]

    def tokenize(self, lines: Sequence[str]) -> list[list[str]]:
        """Source tokens (pieces) of raw sentences, cut so that EOS still fits, as `Translator`."""
        keep = self.max_source_tokens - 1
        return [tokens[:keep] for tokens in self.tokenizer.pipe(lines)]

    def translate_tokens(
        self, sources: Sequence[Sequence[str]], cfg: DecodeConfig | None = None
    ) -> list[list[str]]:
        """Output tokens (no specials) of tokenized sources, with `cfg` (default: the export's).

        The length limit is ours, per sentence: `max_len_a + max_len_b * (source tokens + EOS)`;
        CTranslate2's length penalty is `score / length ** alpha`, not GNMT's, so beam search may
        rank a few hypotheses differently from `Translator` for the same `length_penalty`.
        """
        cfg = cfg or self.decode_cfg
        out: list[list[str]] = [[] for _ in sources]
        todo = [i for i, tokens in enumerate(sources) if tokens]
        limits = {
            i: min(
                int(cfg.max_len_a + cfg.max_len_b * (len(sources[i]) + 1)),
                self.max_source_tokens - 1,
            )
            for i in todo
        }
        # CTranslate2 takes one length limit per call. Greedy output cut at a sentence's limit is
        # the output with that limit, so greedy takes the largest in one call and cuts; beam
        # search (whose ranking depends on the limit) makes one call per limit.
        by_limit: dict[int, list[int]] = {}
        for i in todo:
            key = max(limits.values()) if cfg.beam_size == 1 else limits[i]
            by_limit.setdefault(key, []).append(i)
        for limit, ids in by_limit.items():
            for start in range(0, len(ids), cfg.batch_size):
                chunk = ids[start : start + cfg.batch_size]
                results = self.translator.translate_batch(
                    [list(sources[i]) for i in chunk],
                    beam_size=cfg.beam_size,
                    length_penalty=cfg.length_penalty,
                    max_decoding_length=limit,
                    disable_unk=self.ban_unk,
                    suppress_sequences=self._never,  # as our search: no PAD, no BOS
                    max_input_length=0,  # already cut to what the model reads
                )
                for i, result in zip(chunk, results, strict=True):
                    out[i] = list(result.hypotheses[0])[: limits[i]]
        return out

    def translate(self, lines: str | Sequence[str], **decode: Any) -> str | list[str]:
        """Like `Translator.translate`: one sentence or many, `decode.*` overrides as keywords."""
        single = isinstance(lines, str)
        batch = [lines] if single else list(lines)
        tokens = self.translate_tokens(
            self.tokenize(batch), with_overrides(self.decode_cfg, decode)
        )
        out = [self.detokenizer.detokenize(t) for t in tokens]
        return out[0] if single else out
