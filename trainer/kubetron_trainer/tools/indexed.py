"""A Megatron indexed dataset (`PREFIX.bin` + `PREFIX.idx`) written so that nothing
half-written ever looks complete: what `kubetron-prepare-data` writes with.

`IndexedWriter` wraps Megatron-Core's `IndexedDatasetBuilder`: documents go to hidden
temporary names next to the prefix, fsynced, and only `commit` renames them into place, the
`.idx` last (a dataset is complete when its `.idx` exists); an error or signal leaves no
partial files and keeps an existing dataset. For chat data it writes, beside the tokens, the
loss mask as a second indexed dataset of the same documents and lengths
(`PREFIX.loss_mask.bin/.idx`, read by `data.packing`). Token ids are stored in Megatron's own
choice of dtype (`token_dtype`).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kubetron_trainer.data.chat import LOSS_MASK


def token_dtype(vocab_size: int) -> type[np.unsignedinteger[Any] | np.signedinteger[Any]]:
    """Megatron's choice (`DType.optimal_dtype`): uint16 below 65500 ids, else int32."""
    return np.uint16 if vocab_size < 65500 else np.int32


class IndexedWriter:
    """Megatron-Core's `IndexedDatasetBuilder` writing to temporary names next to `prefix`;
    `commit` renames both files into place, `discard` (or leaving the `with` block by an
    exception) removes them. PREFIX.idx (what makes a dataset complete) is renamed last, after
    an existing one is removed, so no moment shows a complete-looking mix of old and new."""

    def __init__(self, prefix: Path, vocab_size: int, loss_mask: bool = False) -> None:
        with warnings.catch_warnings():  # Megatron's notes on Transformer Engine, Apex, absl
            warnings.simplefilter("ignore")
            from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

        self.prefix = prefix
        self.dtype = token_dtype(vocab_size)
        prefix.parent.mkdir(parents=True, exist_ok=True)
        tag = f"{os.getpid()}-{secrets.token_hex(4)}"  # created by the builder, with the umask
        # the loss mask's files first: PREFIX.idx, renamed last, makes the dataset complete
        suffixes = [LOSS_MASK + ".bin", LOSS_MASK + ".idx"] if loss_mask else []
        suffixes += [".bin", ".idx"]
        self.partial = {
            suffix: prefix.parent / f".{prefix.name}{suffix}.{tag}.partial" for suffix in suffixes
        }
        self.builder = IndexedDatasetBuilder(str(self.partial[".bin"]), dtype=self.dtype)
        self.mask_builder = (
            IndexedDatasetBuilder(str(self.partial[LOSS_MASK + ".bin"]), dtype=np.uint8)
            if loss_mask
            else None
        )
        self.documents = 0
        self.tokens = 0

    def add(
        self, tokens: np.ndarray, lengths: Sequence[int], loss_mask: np.ndarray | None = None
    ) -> None:
        """Documents of `lengths` tokens each, `tokens` (and their loss mask) end to end."""
        if (loss_mask is None) != (self.mask_builder is None):
            raise ValueError("a loss mask goes with every chunk of a chat dataset, and only there")
        start = 0
        for length in lengths:
            self.builder.add_document(tokens[start : start + length], [length])
            if self.mask_builder is not None and loss_mask is not None:
                self.mask_builder.add_document(loss_mask[start : start + length], [length])
            start += length
        self.documents += len(lengths)
        self.tokens += start

    def commit(self) -> list[Path]:
        if self.mask_builder is not None:
            self.mask_builder.finalize(str(self.partial[LOSS_MASK + ".idx"]))
        self.builder.finalize(str(self.partial[".idx"]))
        for path in self.partial.values():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        final = {s: Path(f"{self.prefix}{s}") for s in self.partial}
        final[".idx"].unlink(missing_ok=True)
        for suffix in self.partial:
            os.replace(self.partial[suffix], final[suffix])
        dir_fd = os.open(self.prefix.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        self.partial = {}
        return list(final.values())

    def discard(self) -> None:
        for builder in (self.builder, self.mask_builder):
            with contextlib.suppress(Exception):
                builder.data_file.close()  # type: ignore[union-attr]
        for path in self.partial.values():
            path.unlink(missing_ok=True)
        self.partial = {}

    def __enter__(self) -> IndexedWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.discard()  # a no-op after commit
