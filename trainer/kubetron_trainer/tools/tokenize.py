"""Turn a text file into a Megatron indexed dataset (`PREFIX.bin` + `PREFIX.idx`), offline.

The demo and the tests need real indexed data without downloading a tokenizer, so this uses a
byte-level tokenizer: every UTF-8 byte is a token (0..255), then end-of-document (256) and
padding (257); 258 tokens fit gpt-tiny's vocabulary of 512. Each non-empty paragraph (text
between blank lines) becomes one document. Run it as
`python -m kubetron_trainer.tools.tokenize --input text.txt --output-prefix data/text`.
JSONL and Parquet, other tokenizers and several processes: `kubetron_trainer.tools.prepare`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from kubetron_trainer.data.tokenizer import ByteTokenizer
from kubetron_trainer.tools.prepare import IndexedWriter

__all__ = ["ByteTokenizer", "documents", "main", "write_indexed"]


def documents(text: str) -> list[str]:
    """Paragraphs (separated by blank lines) with content."""
    return [p.strip() for p in text.split("\n\n") if p.strip()]


def write_indexed(docs: list[str], prefix: Path, tokenizer: ByteTokenizer) -> int:
    """Write `docs` as one document each, ending in EOD; return the number of tokens."""
    with IndexedWriter(prefix, tokenizer.vocab_size) as writer:
        for doc in docs:
            ids = [*tokenizer.tokenize(doc), tokenizer.eod]
            writer.add(np.asarray(ids), [len(ids)])
        writer.commit()
        return writer.tokens


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
