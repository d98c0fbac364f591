"""Turn a text file into a Megatron indexed dataset (`PREFIX.bin` + `PREFIX.idx`), offline.

The demo and the tests need real indexed data without downloading a tokenizer, so this uses a
byte-level tokenizer: every UTF-8 byte is a token (0..255), then end-of-document (256) and
padding (257); 258 tokens fit gpt-tiny's vocabulary of 512. Each non-empty paragraph (text
between blank lines) becomes one document. Run it as
`python -m kubetron_trainer.tokenize --input text.txt --output-prefix data/text`.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder


@dataclass(frozen=True)
class ByteTokenizer:
    """Bytes as tokens; carries the attributes Megatron's GPTDataset reads (eod, pad, size)."""

    eod: int = 256
    pad: int = 257
    vocab_size: int = 258

    @property
    def unique_identifiers(self) -> dict[str, object]:
        """What Megatron hashes into the dataset cache's name."""
        return {"class": "ByteTokenizer", "eod": self.eod, "pad": self.pad}

    def tokenize(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def detokenize(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def documents(text: str) -> list[str]:
    """Paragraphs (separated by blank lines) with content."""
    return [p.strip() for p in text.split("\n\n") if p.strip()]


def write_indexed(docs: list[str], prefix: Path, tokenizer: ByteTokenizer) -> int:
    """Write `docs` as one document each, ending in EOD; return the number of tokens."""
    prefix.parent.mkdir(parents=True, exist_ok=True)
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.uint16)
    total = 0
    for doc in docs:
        ids = [*tokenizer.tokenize(doc), tokenizer.eod]
        builder.add_document(torch.tensor(ids, dtype=torch.int64), [len(ids)])
        total += len(ids)
    builder.finalize(f"{prefix}.idx")
    return total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", type=Path, required=True, help="UTF-8 text file")
    parser.add_argument("--output-prefix", type=Path, required=True, help="writes PREFIX.bin/.idx")
    args = parser.parse_args(argv)
    if not args.input.is_file():
        print(f"--input {args.input}: no such file; give a UTF-8 text file", file=sys.stderr)
        return 2
    docs = documents(args.input.read_text(encoding="utf-8"))
    if not docs:
        print(f"--input {args.input}: no non-empty paragraphs to tokenize", file=sys.stderr)
        return 2
    tokens = write_indexed(docs, args.output_prefix, ByteTokenizer())
    print(f"wrote {args.output_prefix}.bin/.idx: {len(docs)} documents, {tokens} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
