"""Data preparation throughput (`kubetron-prepare-data`): tokens per second on this machine.

    .venv/bin/python -m benchmarks.prepare_data [--documents 40000] [--output FILE]

Generates text documents (6-40 sentences each) and conversations (1-3 turns) with the test
generators, trains the test BPE tokenizer (with ChatML's tokens and template), and runs
`prepare` as its CLI does, for: JSONL and Parquet text with the byte tokenizer and the BPE,
`--chat` conversations with the BPE, each with 1 worker and with one worker per CPU. Records
documents, tokens, seconds and tokens/s per case (the summary prepare prints), with the machine.
Writes benchmarks/results/prepare_data.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from devtools.hf_tokenizer import build_chat_bpe, conversations, sentence
from kubetron_trainer.tools.prepare import prepare

OUTPUT = Path(__file__).parent / "results" / "prepare_data.json"


def machine() -> dict[str, Any]:
    cpu = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
         if line.startswith("model name")), platform.processor(),
    )  # fmt: skip
    memory_kib = int(Path("/proc/meminfo").read_text().split()[1])
    return {
        "cpus": len(os.sched_getaffinity(0)), "cpu": cpu, "kernel": platform.release(),
        "memory_gib": round(memory_kib / 2**20), "load_average_at_start": os.getloadavg(),
    }  # fmt: skip


def write_inputs(directory: Path, count: int) -> dict[str, Path]:
    rng = random.Random(0)
    texts = [" ".join(sentence(rng) for _ in range(rng.randint(6, 40))) for _ in range(count)]
    jsonl = directory / "text.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    parquet = directory / "text.parquet"
    pq.write_table(pa.table({"text": texts}), parquet)
    chat = directory / "chat.jsonl"
    chat.write_text(
        "".join(json.dumps({"messages": c}) + "\n" for c in conversations(count // 2, seed=1))
    )
    return {"jsonl": jsonl, "parquet": parquet, "chat": chat}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--documents", type=int, default=40000)
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args()
    cpus = len(os.sched_getaffinity(0))
    cases: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tok = root / "tokenizer"
        build_chat_bpe(tok)
        inputs = write_inputs(root, args.documents)
        plan = [
            ("jsonl", "byte", False), ("jsonl", "bpe", False), ("parquet", "bpe", False),
            ("chat", "bpe", True),
        ]  # fmt: skip
        for source, tokenizer, chat in plan:
            for workers in sorted({1, cpus}):
                out = root / "out" / f"{source}-{tokenizer}-{workers}"
                began = time.monotonic()
                name = "byte" if tokenizer == "byte" else str(tok)
                summary = prepare(
                    [str(inputs[source])], out, tokenizer=name, workers=workers,
                    append_eod=not chat, chat=chat,
                )  # fmt: skip
                case = {
                    "input": source, "tokenizer": tokenizer, "chat": chat, "workers": workers,
                    "input_mb": round(inputs[source].stat().st_size / 1e6, 1),
                    "documents": summary.documents, "tokens": summary.tokens,
                    "seconds": round(summary.seconds, 2),
                    "tokens_per_s": round(summary.tokens_per_s),
                    "wall_s": round(time.monotonic() - began, 2),
                }  # fmt: skip
                print(json.dumps(case), flush=True)
                cases.append(case)
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    result = {
        "benchmark": "prepare-data throughput (python -m kubetron_trainer.tools.prepare)",
        "issue": "15 (data preparation)",
        "date": datetime.now(UTC).date().isoformat(),
        "machine": machine(),
        "code": commit,
        "command": f".venv/bin/python -m benchmarks.prepare_data --documents {args.documents}",
        "cases": cases,
    }
    args.output.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
