"""The tokenizers the trainer and `prepare` share, and the check of one against the model.

Two kinds (`data.tokenizer.type`):

* `byte`: every UTF-8 byte is a token (0..255), then end-of-document (256) and padding (257);
  258 tokens fit gpt-tiny's vocabulary of 512 and need no download.
* `huggingface`: a Hugging Face tokenizer loaded offline from a local directory
  (`data.tokenizer.name`, e.g. on a volume) with the `tokenizers` library: `tokenizer.json`,
  plus the special tokens from `tokenizer_config.json` and `special_tokens_map.json` when
  present (the latter wins, as in `transformers`). `eos_token` is the end-of-document (EOD) token
  and `pad_token` the padding token; a `padding` section in `tokenizer.json` gives the pad token
  when neither file names one. Text is encoded as `Tokenizer.encode` does by default (with the
  tokenizer's post-processor, e.g. a BOS token), like Megatron's own Hugging Face tokenizer.

Before the trainer builds the model or joins the job it checks the tokenizer against the
model: every token id must have an embedding row (the model's vocabSize after Megatron's padding)
and the EOD and pad tokens must exist. This module imports no torch.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from kubetron_api.config import TokenizerSpec
from kubetron_api.exitcodes import ConfigError
from kubetron_api.files import unreadable

BYTE = "byte"
TOKENIZER_FILE = "tokenizer.json"
# Read in this order; a later file's value wins (transformers' order).
SPECIAL_TOKEN_FILES = ("tokenizer_config.json", "special_tokens_map.json")


class TokenizerError(ValueError):
    """A tokenizer that cannot be loaded or used; the message says why and how to fix it."""


class Tokenizer(Protocol):
    """What the trainer, `prepare` and Megatron's GPTDataset read from a tokenizer."""

    @property
    def vocab_size(self) -> int:
        """Largest token id + 1: the embedding rows the model needs."""
        ...

    @property
    def eod(self) -> int | None: ...

    @property
    def pad(self) -> int | None: ...

    @property
    def unique_identifiers(self) -> dict[str, object]:
        """What Megatron hashes into a dataset cache's name."""
        ...

    def describe(self) -> str: ...

    def tokenize(self, text: str) -> list[int]: ...

    def tokenize_batch(self, texts: Sequence[str]) -> list[list[int]]: ...

    def tokenize_plain(self, texts: Sequence[str]) -> list[list[int]]:
        """Without the post-processor's special tokens (pieces of a rendered chat)."""
        ...

    def detokenize(self, ids: Sequence[int]) -> str: ...


@dataclass(frozen=True)
class ByteTokenizer:
    """Bytes as tokens, then EOD and pad."""

    eod: int = 256
    pad: int = 257
    vocab_size: int = 258

    @property
    def unique_identifiers(self) -> dict[str, object]:
        return {"class": "ByteTokenizer", "eod": self.eod, "pad": self.pad}

    def describe(self) -> str:
        return "the byte tokenizer"

    def tokenize(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def tokenize_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [list(t.encode("utf-8")) for t in texts]

    def tokenize_plain(self, texts: Sequence[str]) -> list[list[int]]:
        return self.tokenize_batch(texts)

    def detokenize(self, ids: Sequence[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class HuggingFaceTokenizer:
    """A `tokenizers.Tokenizer` from `directory/tokenizer.json`, offline; EOD and pad from the
    special-token files (module docstring). Raises `TokenizerError` naming the file at fault."""

    def __init__(self, directory: Path) -> None:
        from tokenizers import Tokenizer as HfTokenizer

        self.directory = directory
        if not directory.is_dir():
            raise TokenizerError(
                f"{directory} is not a directory; give a directory holding {TOKENIZER_FILE} "
                "(and tokenizer_config.json), as saved by save_pretrained"
            )
        path = directory / TOKENIZER_FILE
        if not path.is_file():
            raise TokenizerError(
                f"{directory} has no {TOKENIZER_FILE}; save the tokenizer there with "
                "save_pretrained (a fast tokenizer) or Tokenizer.save"
            )
        if problem := unreadable(path):
            raise TokenizerError(problem)
        try:
            self._tok = HfTokenizer.from_file(str(path))
        except Exception as err:  # the Rust side raises a plain Exception
            raise TokenizerError(f"{path} is not a tokenizers JSON file: {err}") from None
        vocab = self._tok.get_vocab(with_added_tokens=True)
        self._vocab_size = max(vocab.values()) + 1 if vocab else 0
        self.special = special_tokens(directory)
        padding = self._tok.padding
        if "pad_token" not in self.special and padding and padding.get("pad_token"):
            self.special["pad_token"] = (str(padding["pad_token"]), f"{path} (padding)")
        self._eod = self._token_id("eos_token")
        self._pad = self._token_id("pad_token")

    def _token_id(self, key: str) -> int | None:
        if key not in self.special:
            return None
        token, source = self.special[key]
        token_id = self._tok.token_to_id(token)
        if token_id is None:
            raise TokenizerError(
                f"{key} {token!r} (from {source}) is not in the vocabulary of "
                f"{self.directory / TOKENIZER_FILE}; name a token it has"
            )
        return int(token_id)

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def eod(self) -> int | None:
        return self._eod

    @property
    def pad(self) -> int | None:
        return self._pad

    @property
    def unique_identifiers(self) -> dict[str, object]:
        return {
            "class": "HuggingFaceTokenizer",
            "directory": str(self.directory),
            "vocab_size": self.vocab_size,
            "eod": self.eod,
            "pad": self.pad,
        }

    def describe(self) -> str:
        return f"tokenizer {self.directory}"

    def tokenize(self, text: str) -> list[int]:
        return list(self._tok.encode(text).ids)

    def tokenize_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [list(e.ids) for e in self._tok.encode_batch_fast(list(texts))]

    def tokenize_plain(self, texts: Sequence[str]) -> list[list[int]]:
        encoded = self._tok.encode_batch_fast(list(texts), add_special_tokens=False)
        return [list(e.ids) for e in encoded]

    def detokenize(self, ids: Sequence[int]) -> str:
        return str(self._tok.decode(list(ids)))


def special_tokens(directory: Path) -> dict[str, tuple[str, str]]:
    """`eos_token` and `pad_token` (token, file it came from) from the special-token files."""
    found: dict[str, tuple[str, str]] = {}
    for name in SPECIAL_TOKEN_FILES:
        path = directory / name
        if not path.is_file():
            continue
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise TokenizerError(f"{path} is not valid JSON: {err}") from None
        if not isinstance(raw, dict):
            raise TokenizerError(f"{path} is not a JSON object")
        for key in ("eos_token", "pad_token"):
            token = _token_text(raw.get(key))
            if token is not None:
                found[key] = (token, str(path))
    return found


def _token_text(value: Any) -> str | None:
    """A special token as the files write it: a string, or an AddedToken object."""
    if isinstance(value, str) and value:
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str) and value["content"]:
        return str(value["content"])
    return None


def load(name: str) -> Tokenizer:
    """`byte`, or a Hugging Face tokenizer directory (`prepare --tokenizer`)."""
    if name == BYTE:
        return ByteTokenizer()
    return HuggingFaceTokenizer(Path(name))


def spec_field(spec: TokenizerSpec) -> str:
    """The config field a problem with this tokenizer is about."""
    return "data.tokenizer.name" if spec.type == "huggingface" else "data.tokenizer.type"


@functools.cache
def from_spec(spec: TokenizerSpec) -> Tokenizer:
    """The configured tokenizer (loaded once per process); a problem is a ConfigError."""
    if spec.type == "byte":
        return ByteTokenizer()
    try:
        return HuggingFaceTokenizer(Path(spec.name or ""))
    except TokenizerError as err:
        raise ConfigError(spec_field(spec), str(err)) from None


def problems_for_model(tokenizer: Tokenizer, vocab_size: int, padded_vocab_size: int) -> list[str]:
    """What stops `tokenizer` from feeding a model with `vocab_size` (padded by Megatron to
    `padded_vocab_size` embedding rows), one message with its fix each."""
    problems = []
    what, n = tokenizer.describe(), tokenizer.vocab_size
    if n > padded_vocab_size:
        problems.append(
            f"{what} has {n} tokens (ids 0..{n - 1}) but the model has {padded_vocab_size} "
            f"embedding rows (vocabSize {vocab_size} after Megatron's padding); set "
            f"spec.model.overrides.vocabSize >= {n}"
        )
    where = (
        f"{tokenizer.directory}/{SPECIAL_TOKEN_FILES[0]}"
        if isinstance(tokenizer, HuggingFaceTokenizer)
        else "the tokenizer"
    )
    if tokenizer.eod is None:
        problems.append(
            f"{what} defines no end-of-document (EOD) token, which separates documents in the "
            f'training data; set "eos_token" in {where} to a token of its vocabulary'
        )
    if tokenizer.pad is None:
        problems.append(
            f"{what} defines no pad token, which Megatron's GPTDataset pads sequences with; set "
            f'"pad_token" in {where} to a token of its vocabulary (the EOD token will do)'
        )
    return problems


def check_for_model(spec: TokenizerSpec, vocab_size: int, padded_vocab_size: int) -> Tokenizer:
    """Load the configured tokenizer and refuse it (ConfigError naming the field, every problem
    listed) when it cannot feed the model."""
    tokenizer = from_spec(spec)
    if problems := problems_for_model(tokenizer, vocab_size, padded_vocab_size):
        raise ConfigError(spec_field(spec), "; ".join(problems))
    return tokenizer
