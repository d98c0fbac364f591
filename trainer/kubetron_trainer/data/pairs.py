"""Preference pairs (`data.type: preference`) as token documents, and the marker that says a
dataset holds them. This module imports no torch: `kubetron-prepare-data --preference`'s worker
processes render rows with it, and the trainer checks the marker with it before building anything.

A row holds `prompt`, `chosen` and `rejected`, in one of TRL's two shapes. Conversational: the
prompt is a list of messages (`{"role", "content"}`), each response a list of assistant messages
(usually one). Standard: all three are strings; with a chat template the prompt becomes a user
message and each response an assistant message, without one the pair is plain text (prompt, then
response, nothing between). Each row becomes two documents, prompt + chosen then prompt +
rejected, rendered and cut as `data.chat` cuts a conversation (`segments`): the response's
tokens are learned, the prompt's are context.

Beside the indexed datasets (`PREFIX.bin/.idx` and `PREFIX.loss_mask.bin/.idx`) the preparation
writes `PREFIX.pairs.json`, `{"format": "kubetron-preference", "version": 1, "pairs": N}`: the
trainer refuses a prefix without it (other data would pair unrelated documents).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from kubetron_api.exitcodes import ConfigError
from kubetron_trainer.data.chat import (
    ChatError,
    Template,
    message_list,
    segments,
    tokenize_segments,
)
from kubetron_trainer.data.tokenizer import Tokenizer

PAIRS = ".pairs.json"  # PREFIX.pairs.json: the marker
FORMAT = "kubetron-preference"
VERSION = 1
KEYS = ("prompt", "chosen", "rejected")
ROW = "a preference row holds prompt, chosen and rejected"
NOT_PREFERENCE = "not preference data: prepare it with kubetron-prepare-data --preference"

Pieces = list[tuple[str, bool]]  # (text, learned), in order


def pair_pieces(record: Any, template: Template | None) -> tuple[Pieces, Pieces]:
    """The chosen and the rejected document of one row as (text, learned) pieces; ChatError
    says what is wrong with the row. `template` None: plain text."""
    if not isinstance(record, dict):
        raise ChatError(f"not a JSON object but a {type(record).__name__}")
    missing = [key for key in KEYS if record.get(key) is None]  # a Parquet null is missing
    if missing:
        fields = ", ".join(str(k) for k, v in record.items() if v is not None) or "none"
        raise ChatError(f"no {missing[0]!r} (fields: {fields}); {ROW}")
    prompt = record["prompt"]
    if isinstance(prompt, str):
        chosen, rejected = (_standard(prompt, record[key], key, template) for key in KEYS[1:])
    elif isinstance(prompt, list):
        if template is None:
            raise ChatError(
                "conversational rows (lists of messages) need a chat template; use the "
                "tokenizer of a chat model or pass --chat-template FILE"
            )
        prompt = message_list(prompt, "prompt")
        chosen, rejected = (
            segments(template, prompt + _response(record[key], key), first=len(prompt))
            for key in KEYS[1:]
        )
    else:
        raise ChatError(
            f"'prompt' is of type {type(prompt).__name__}: give a string (standard rows) or a list "
            "of messages (conversational rows)"
        )
    return chosen, rejected


def pair_documents(
    record: Any, tokenizer: Tokenizer, template: Template | None
) -> list[tuple[list[int], list[int]]]:
    """One row's chosen and rejected documents, each (token ids, 1 where a token is learned)."""
    docs = [tokenize_segments(tokenizer, pieces) for pieces in pair_pieces(record, template)]
    if template is None and tokenizer.eod is not None:  # plain text: EOD ends the response
        docs = [([*ids, tokenizer.eod], [*learned, 1]) for ids, learned in docs]
    if docs[0][0] == docs[1][0]:
        raise ChatError("chosen and rejected render identically: a pair's responses must differ")
    return docs


def _standard(prompt: str, response: Any, key: str, template: Template | None) -> Pieces:
    if not isinstance(response, str):
        kind = type(response).__name__
        raise ChatError(f"{key!r} is of type {kind}, not a string as 'prompt' is")
    if not response.strip():
        raise ChatError(f"{key!r} is empty: a response must say something")
    if template is None:
        return [(prompt, False), (response, True)]
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    return segments(template, messages, first=1)


def _response(value: Any, key: str) -> list[dict[str, Any]]:
    if isinstance(value, str):
        raise ChatError(f"{key!r} is a string, not a list of messages as 'prompt' is")
    messages = message_list(value, key)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            raise ChatError(
                f"{key}[{i}].role is {message['role']!r}; a response is the assistant's"
            )
    if not any(m["content"].strip() for m in messages):
        raise ChatError(f"{key!r} is empty: a response must say something")
    return messages


def write_marker(prefix: Path, pairs: int) -> Path:
    """PREFIX.pairs.json for `pairs` pairs, written whole (a temporary name, then renamed)."""
    path = Path(f"{prefix}{PAIRS}")
    partial = path.parent / f".{path.name}.{os.getpid()}.partial"
    partial.write_text(json.dumps({"format": FORMAT, "version": VERSION, "pairs": pairs}) + "\n")
    os.replace(partial, path)
    return path


def check_marker(prefix: str, field: str) -> int:
    """The pair count PREFIX.pairs.json records, or ConfigError on `field` when the prefix is not
    preference data of this format."""
    path = Path(prefix + PAIRS)
    if not path.is_file():
        raise ConfigError(field, f"{path} does not exist: {NOT_PREFERENCE}")
    try:
        marker = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ConfigError(field, f"{path} cannot be read ({err}): {NOT_PREFERENCE}") from None
    if not isinstance(marker, dict) or marker.get("format") != FORMAT:
        raise ConfigError(field, f"{path} is not a {FORMAT} marker: {NOT_PREFERENCE}")
    pairs = marker.get("pairs")
    if marker.get("version") != VERSION or not isinstance(pairs, int) or pairs < 1:
        raise ConfigError(
            field,
            f"{path} is version {marker.get('version')!r} with {pairs!r} pairs; this trainer "
            f"reads version {VERSION}: prepare the data again with kubetron-prepare-data "
            "--preference",
        )
    return pairs
