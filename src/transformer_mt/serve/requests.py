"""Request bodies -> what to translate, checked against the server's bounds.

A bad request is a `RequestError` with the HTTP status it deserves: 400 for a body that is not a
JSON object, 413 for one over a size bound, 422 for a field of the wrong type or value (the
decoding settings are checked by `DecodeConfig` itself, as for `mt-translate`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from transformer_mt.config import DecodeConfig
from transformer_mt.errors import ConfigError
from transformer_mt.inference.translator import with_overrides
from transformer_mt.serve.settings import ServeSettings

# The decoding settings a request may change, with the JSON type each must have.
DECODE_FIELDS = {"beam_size": int, "length_penalty": float, "nbest": int}


class RequestError(Exception):
    """A request the server refuses: `status` is the HTTP status, the message says why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class TranslateRequest:
    """`POST /translate`: the sentences, and the decoding settings for them."""

    lines: list[str]
    decode_cfg: DecodeConfig


def json_object(body: bytes) -> dict[str, Any]:
    """The body as a JSON object, or a 400."""
    try:
        value = json.loads(body)
    except (UnicodeDecodeError, ValueError) as err:
        raise RequestError(400, f"the body is not JSON ({err})") from None
    if not isinstance(value, dict):
        raise RequestError(400, 'the body must be a JSON object, e.g. {"text": "..."}')
    return value


def parse_text(value: Any, settings: ServeSettings, max_sentences: int) -> list[str]:
    """`text`: one sentence or a list of them, within the size bounds."""
    if isinstance(value, str):
        lines = [value]
    elif isinstance(value, list) and all(isinstance(line, str) for line in value):
        lines = value
    else:
        raise RequestError(422, '"text" must be a string or a list of strings')
    if len(lines) > max_sentences:
        raise RequestError(
            413, f"{len(lines)} sentences in one request; at most {max_sentences} are accepted"
        )
    for number, line in enumerate(lines, 1):
        if len(line) > settings.max_chars:
            raise RequestError(
                413,
                f"sentence {number} has {len(line)} characters; at most {settings.max_chars} "
                "are accepted",
            )
    return lines


def parse_decode(body: dict[str, Any]) -> dict[str, Any]:
    """The decoding settings a request sets, type-checked (their values are checked later)."""
    overrides = {}
    for name, kind in DECODE_FIELDS.items():
        if name not in body:
            continue
        value = body[name]
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if kind is int and not (isinstance(value, int) and number):
            raise RequestError(422, f'"{name}" must be an integer (got {json.dumps(value)})')
        if kind is float and not (number and math.isfinite(value)):
            raise RequestError(422, f'"{name}" must be a number (got {json.dumps(value)})')
        overrides[name] = kind(value)
    return overrides


def parse_translate(
    body: bytes, settings: ServeSettings, defaults: DecodeConfig
) -> TranslateRequest:
    """`{"text": ..., "beam_size"?, "length_penalty"?, "nbest"?}` -> a `TranslateRequest`."""
    fields = json_object(body)
    unknown = sorted(set(fields) - {"text", *DECODE_FIELDS})
    if unknown:
        known = ", ".join(["text", *DECODE_FIELDS])
        raise RequestError(422, f'unknown field "{unknown[0]}": use {known}')
    if "text" not in fields:
        raise RequestError(422, 'the field "text" is missing')
    lines = parse_text(fields["text"], settings, settings.max_sentences)
    overrides = parse_decode(fields)
    return TranslateRequest(lines, decode_settings(defaults, overrides))


def decode_settings(defaults: DecodeConfig, overrides: dict[str, Any]) -> DecodeConfig:
    """The server's settings with a request's changes, checked as every DecodeConfig is."""
    try:
        return with_overrides(defaults, overrides)
    except ConfigError as err:
        raise RequestError(422, str(err).replace("decode.", "")) from None


def parse_attention(body: bytes, settings: ServeSettings) -> tuple[str, bool]:
    """`POST /attention`: `{"text": "one sentence", "words"?: bool}` -> (sentence, words)."""
    fields = json_object(body)
    unknown = sorted(set(fields) - {"text", "words"})
    if unknown:
        raise RequestError(
            422, f'unknown field "{unknown[0]}": /attention takes "text" and "words"'
        )
    text = fields.get("text")
    if not isinstance(text, str):
        raise RequestError(422, '"text" must be one sentence (a string)')
    words = fields.get("words", False)
    if not isinstance(words, bool):
        raise RequestError(422, '"words" must be true or false')
    return parse_text(text, settings, 1)[0], words
