"""The one data-preparation tool: JSONL, Parquet and plain text into a Megatron indexed dataset
(`PREFIX.bin` + `PREFIX.idx`).

`python -m kubetron_trainer.tools.prepare INPUT... --output-prefix PREFIX [--tokenizer DIR|byte]`
(console script `kubetron-prepare-data`). Inputs are files or glob patterns (expanded here, so
a container's args need no shell) of `.jsonl`, `.jsonl.gz`, `.parquet` and `.txt`; each JSON
line, or Parquet row, is one document, its text in `--text-key` (default `text`); in a UTF-8
`.txt` file each paragraph (text between empty lines, stripped) is one. Files are read in the
order given (a pattern's matches sorted), and the documents are written in that order, whatever
`--workers`; `--append-eod` ends every document with the tokenizer's EOD token (what GPT
pretraining wants: Megatron's GPTDataset concatenates documents into sequences). Blank lines are
skipped; a document with no tokens is skipped and counted. The default byte tokenizer needs no
download (`data.tokenizer`): `kubetron-prepare-data text.txt --append-eod --output-prefix P`
builds real data for gpt-tiny offline (the distributed tests' data).

Worker processes (`--workers`, spawned) parse and tokenize chunks of `--chunk-size` documents;
this process writes them in order with Megatron-Core's `IndexedDatasetBuilder`, to temporary
names next to the output, and renames both files into place only when everything was written
(`tools.indexed`), so an error, SIGTERM or Ctrl-C leaves nothing at the prefix (an existing
dataset there is kept unless `--overwrite`, and replaced only at the very end). Bad input stops
the run, naming the file and line (Parquet: row, counting from 0): a line that is not a JSON
object, a missing or non-string text field, text that is not UTF-8, an empty file. Progress
goes to stderr every `--progress-interval` seconds, the summary (documents, tokens, seconds,
tokens/s, files written) to stdout.
Exit codes: 0 done, 2 bad arguments or input, 143 SIGTERM.

`--chat` prepares supervised fine-tuning data (`data.type: chat`): each record holds a
conversation (`--messages-key`, default `messages`: a list of `{"role", "content"}`), rendered
with the tokenizer's chat template (or `--chat-template FILE`) and tokenized piece by piece
(`kubetron_trainer.data.chat`); besides PREFIX.bin/.idx it writes PREFIX.loss_mask.bin/.idx, an
indexed dataset of the same documents and lengths whose values are 1 for the tokens an
assistant wrote (the ones the loss is taken on) and 0 for the rest. A conversation without an
assistant message, a role not in system/user/assistant/tool, or a template that cannot mark
the assistant's tokens stops the run, naming the file and line.

`--preference` prepares DPO pairs (`data.type: preference`, rows as `kubetron_trainer.data.pairs`
reads them: `prompt`, `chosen`, `rejected`): row i becomes documents 2i (prompt + chosen) and
2i + 1 (prompt + rejected), tokenized as `--chat` does, the loss mask 1 on the response only, and
PREFIX.pairs.json marks the dataset as pairs. A missing field, an empty response, or responses
that render identically stop the run, naming the file and line (Parquet: row).
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import gzip
import itertools
import json
import os
import signal
import sys
import time
from collections import deque
from collections.abc import Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, Literal

import numpy as np

from kubetron_trainer.data.chat import (
    LOSS_MASK,
    ChatError,
    Template,
    check_messages,
    compile_template,
    find_template,
    load_template,
    segments,
    tokenize_segments,
)
from kubetron_trainer.data.pairs import KEYS, PAIRS, ROW, pair_documents, write_marker
from kubetron_trainer.data.tokenizer import BYTE, Tokenizer, TokenizerError, load
from kubetron_trainer.tools.indexed import IndexedWriter, token_dtype

TEXT = ".txt"
SUFFIXES = (".jsonl", ".jsonl.gz", ".parquet", TEXT)
DEFAULT_CHUNK = 1024
EXIT_INPUT = 2
EXIT_SIGTERM = 143


class PrepareError(Exception):
    """Bad arguments or input; the message names the file and line (or row) and the fix."""


class Interrupted(Exception):
    """SIGTERM: stop, removing the partial output."""


# --------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class Chunk:
    """Consecutive documents of one file: raw JSONL lines from line `first` (1-based; blank
    ones included, so a line's number is `first + i`), Parquet texts from row `first`, or the
    paragraphs of a text file from paragraph `first` (1-based)."""

    file: int  # index into the input files
    path: str
    kind: Literal["jsonl", "parquet", "text"]
    first: int
    items: list[Any]


def expand_inputs(patterns: Sequence[str]) -> list[Path]:
    """Files named or matched (a pattern's matches sorted), in order; each must be readable."""
    files: list[Path] = []
    for pattern in patterns:
        if glob.has_magic(pattern):
            matches = sorted(glob.glob(pattern, recursive=True))
            if not matches:
                raise PrepareError(f"{pattern}: matches no file")
        else:
            matches = [pattern]
        for match in matches:
            path = Path(match)
            if not path.is_file():
                raise PrepareError(f"{path}: no such file")
            if not path.name.endswith(SUFFIXES):
                raise PrepareError(
                    f"{path}: not a {', '.join(SUFFIXES)} file (the suffix picks the reader)"
                )
            files.append(path)
    return files


def read_chunks(
    file: int, path: Path, text_key: str | tuple[str, ...], size: int, strings: bool = True
) -> Iterator[Chunk]:
    """The documents of input file number `file` in chunks of `size`; at least one chunk, so
    an empty file reaches the check of its document count. `strings`: the Parquet column must
    hold text (a chat dataset's column holds lists of messages). A tuple of keys (preference
    rows): Parquet rows are read as records of those columns."""
    if path.name.endswith(".parquet"):
        yield from _parquet_chunks(file, path, text_key, size, strings)
    elif path.name.endswith(TEXT):
        yield from _text_chunks(file, path, size)
    else:
        yield from _jsonl_chunks(file, path, size)


def _jsonl_chunks(file: int, path: Path, size: int) -> Iterator[Chunk]:
    opener = gzip.open if path.name.endswith(".gz") else open
    first, lines = 1, []
    try:
        with opener(path, "rb") as stream:
            for line in stream:
                lines.append(line)
                if len(lines) == size:
                    yield Chunk(file, str(path), "jsonl", first, lines)
                    first, lines = first + size, []
    except (OSError, EOFError) as err:  # a broken gzip stream
        raise PrepareError(f"{path}:{first + len(lines)}: cannot read: {err}") from None
    if lines or first == 1:
        yield Chunk(file, str(path), "jsonl", first, lines)


def paragraphs(lines: Iterable[str]) -> Iterator[str]:
    """The paragraphs of text read line by line (each line with its newline): the text between
    empty lines, stripped, the empty ones left out; one paragraph in memory at a time."""
    pending: list[str] = []
    for line in itertools.chain(lines, ["\n"]):  # the end of the text ends the last one
        if line != "\n":
            pending.append(line)
            continue
        text = "".join(pending).strip()
        pending = []
        if text:
            yield text


def _text_chunks(file: int, path: Path, size: int) -> Iterator[Chunk]:
    first, docs = 1, []
    try:
        with open(path, encoding="utf-8") as stream:  # universal newlines: \r\n is \n
            for doc in paragraphs(stream):
                docs.append(doc)
                if len(docs) == size:
                    yield Chunk(file, str(path), "text", first, docs)
                    first, docs = first + size, []
    except UnicodeDecodeError as err:
        raise PrepareError(_not_utf8(path, err)) from None
    if docs or first == 1:
        yield Chunk(file, str(path), "text", first, docs)


def _not_utf8(path: Path, err: UnicodeDecodeError) -> str:
    """Which line of a text file is not UTF-8: read again line by line, only on that error (a
    character never spans a newline, so each line decodes on its own)."""
    with open(path, "rb") as stream:
        for number, raw in enumerate(stream, 1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as bad:
                return f"{path}:{number}: not UTF-8 text ({bad})"
    return f"{path}: not UTF-8 text ({err})"


def _parquet_chunks(
    file: int, path: Path, text_key: str | tuple[str, ...], size: int, strings: bool
) -> Iterator[Chunk]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        reader = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as err:
        raise PrepareError(f"{path}: not a Parquet file: {err}") from None
    schema = reader.schema_arrow
    keys = (text_key,) if isinstance(text_key, str) else text_key
    for key in keys:
        if key not in schema.names:
            how = "name the column with --text-key (--messages-key with --chat)"
            raise PrepareError(
                f"{path}: no column {key!r} (columns: {', '.join(schema.names) or 'none'}); "
                + (how if isinstance(text_key, str) else ROW)
            )
    kind = schema.field(keys[0]).type
    if strings and not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise PrepareError(f"{path}: column {text_key!r} holds {kind}, not strings")
    row = 0
    try:
        for batch in reader.iter_batches(batch_size=size, columns=list(keys)):
            texts = batch.column(0).to_pylist() if isinstance(text_key, str) else batch.to_pylist()
            yield Chunk(file, str(path), "parquet", row, texts)
            row += len(texts)
    except (pa.ArrowException, OSError) as err:
        raise PrepareError(f"{path}: row {row} (counting from 0): cannot read: {err}") from None
    if row == 0:
        yield Chunk(file, str(path), "parquet", 0, [])


# --------------------------------------------------------------------------- tokenizing


@dataclass(frozen=True)
class Encoded:
    """One chunk tokenized: its documents' tokens end to end and each one's length, or the
    first problem in it."""

    file: int
    documents: int  # records read (empty ones included)
    tokens: np.ndarray
    lengths: list[int]
    error: str | None = None
    loss_mask: np.ndarray | None = None  # chat and preference data: 1 on the learned tokens


@dataclass(frozen=True)
class Job:
    tokenizer: str
    text_key: str  # the messages key with `chat`
    append_eod: bool
    dtype: str
    chat: bool = False
    chat_template: str | None = None  # a template file instead of the tokenizer's
    preference: bool = False


def chat_template(job: Job) -> Template | None:
    """The template chat records are rendered with (None without `--chat`), or preference rows
    (None without one: plain text)."""
    if not (job.chat or job.preference):
        return None
    override = Path(job.chat_template) if job.chat_template else None
    if job.tokenizer != BYTE:
        find = load_template if job.chat else find_template
        return find(Path(job.tokenizer), override)
    if job.preference and override is None:
        return None
    if override is None or not override.is_file():
        raise ChatError("the byte tokenizer has no chat template; pass --chat-template FILE")
    return compile_template(override.read_text(encoding="utf-8"), str(override))


_worker: tuple[Tokenizer, Job, Template | None] | None = None


def _init_worker(job: Job) -> None:
    """Worker start (spawned): load the tokenizer once; Ctrl-C is the parent's to handle, and
    the worker processes are the parallelism (none inside `tokenizers`)."""
    global _worker
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker = (load(job.tokenizer), job, chat_template(job))


def _encode_in_worker(chunk: Chunk) -> Encoded:
    assert _worker is not None
    return encode_records(chunk, *_worker)


def encode_records(
    chunk: Chunk, tokenizer: Tokenizer, job: Job, template: Template | None
) -> Encoded:
    """One chunk of text documents, of conversations when there is a chat template, or of
    preference rows."""
    if template is not None or job.preference:
        return encode_chat(chunk, tokenizer, job, template)
    return encode(chunk, tokenizer, job)


def _where(chunk: Chunk, i: int) -> str:
    if chunk.kind == "jsonl":
        return f"{chunk.path}:{chunk.first + i}"
    if chunk.kind == "text":
        return f"{chunk.path}: paragraph {chunk.first + i}"
    return f"{chunk.path}: row {chunk.first + i} (counting from 0)"


def encode_chat(chunk: Chunk, tokenizer: Tokenizer, job: Job, template: Template | None) -> Encoded:
    """Render and tokenize one chunk of conversations (a document each) or of preference rows
    (two each, in order), with the masks of the learned tokens."""
    tokens: list[int] = []
    mask: list[int] = []
    lengths: list[int] = []
    for i, item in enumerate(chunk.items):
        if chunk.kind == "jsonl" and not item.strip():
            continue
        try:
            docs = _documents(chunk, item, tokenizer, job, template)
        except ChatError as err:
            error = f"{_where(chunk, i)}: {err}"
            return Encoded(chunk.file, 0, np.empty(0, job.dtype), [], error)
        for ids, learned in docs:
            tokens += ids
            mask += learned
            lengths.append(len(ids))
    flat = np.asarray(tokens, dtype=job.dtype)
    return Encoded(chunk.file, len(lengths), flat, lengths, loss_mask=np.asarray(mask, np.uint8))


def _documents(
    chunk: Chunk, item: Any, tokenizer: Tokenizer, job: Job, template: Template | None
) -> list[tuple[list[int], list[int]]]:
    """The (token ids, learned) documents of one record: its conversation, or a preference
    row's chosen and rejected ones."""
    if job.preference:
        return pair_documents(item if chunk.kind == "parquet" else _json(item), tokenizer, template)
    assert template is not None
    record = {job.text_key: item} if chunk.kind == "parquet" else _json(item)
    pieces = segments(template, check_messages(record, job.text_key))
    return [tokenize_segments(tokenizer, pieces)]


def _json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ChatError(f"not JSON ({err})") from None


def encode(chunk: Chunk, tokenizer: Tokenizer, job: Job) -> Encoded:
    """Parse and tokenize one chunk; the first bad record becomes `error`."""
    texts: list[str] = []
    for i, item in enumerate(chunk.items):
        if chunk.kind == "jsonl":
            if not item.strip():
                continue
            text, problem = _json_text(item, job.text_key)
        else:
            text, problem = item, None if item is not None else f"{job.text_key!r} is null"
        if problem is not None:
            error = f"{_where(chunk, i)}: {problem}"
            return Encoded(chunk.file, 0, np.empty(0, job.dtype), [], error)
        assert text is not None
        texts.append(text)
    eod = [tokenizer.eod] if job.append_eod and tokenizer.eod is not None else []
    docs = [ids + eod for ids in tokenizer.tokenize_batch(texts)]
    docs = [d for d in docs if d]
    flat = np.fromiter((t for d in docs for t in d), dtype=job.dtype, count=sum(map(len, docs)))
    return Encoded(chunk.file, len(texts), flat, [len(d) for d in docs])


def _json_text(raw: bytes, key: str) -> tuple[str | None, str | None]:
    """(text, None) or (None, what is wrong with the line)."""
    try:
        record = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        return None, f"not JSON ({err})"
    if not isinstance(record, dict):
        return None, f"not a JSON object but a {type(record).__name__}"
    if key not in record:
        fields = ", ".join(map(str, record)) or "none"
        return None, f"no {key!r} field (fields: {fields}); name the text field with --text-key"
    text = record[key]
    if not isinstance(text, str):
        return None, f"{key!r} is {'null' if text is None else type(text).__name__}, not a string"
    return text, None


# --------------------------------------------------------------------------- the run


@dataclass(frozen=True)
class Summary:
    files: int
    documents: int
    empty: int
    tokens: int
    seconds: float
    written: list[Path]
    pairs: int | None = None  # preference data

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def text(self) -> str:
        sizes = ", ".join(f"{p} ({p.stat().st_size:,} bytes)" for p in self.written)
        pairs = "" if self.pairs is None else f"{self.pairs:,} preference pairs, "
        return (
            f"prepare-data: {pairs}{self.documents:,} documents ({self.empty:,} empty, skipped), "
            f"{self.tokens:,} tokens from {self.files} files in {self.seconds:.1f} s "
            f"({self.tokens_per_s:,.0f} tokens/s); wrote {sizes}"
        )


class Progress:
    """A line on stderr every `interval` seconds."""

    def __init__(self, files: int, interval: float) -> None:
        self.files, self.interval = files, interval
        self.start = self.last = time.monotonic()

    def update(self, file_index: int, documents: int, tokens: int) -> None:
        now = time.monotonic()
        if now - self.last < self.interval:
            return
        self.last = now
        elapsed = now - self.start
        print(
            f"prepare-data: file {file_index}/{self.files}, {documents:,} documents, "
            f"{tokens:,} tokens, {tokens / elapsed:,.0f} tokens/s, "
            f"{time.strftime('%H:%M:%S', time.gmtime(elapsed))}",
            file=sys.stderr,
            flush=True,
        )


def encoded_chunks(
    chunks: Iterator[Chunk],
    tokenizer: Tokenizer,
    job: Job,
    workers: int,
    template: Template | None = None,
) -> Generator[Encoded]:
    """The chunks tokenized, in input order: in this process with one worker, else by a pool
    of spawned workers with at most 2 chunks per worker in flight (bounded memory). On an error
    (bad input in a chunk) the chunks not started are cancelled and the pool waits for the few
    in flight: multiprocessing.Pool's terminate() could deadlock there, its task thread blocked
    on the task queue's lock."""
    if workers == 1:
        for chunk in chunks:
            yield encode_records(chunk, tokenizer, job, template)
        return
    import multiprocessing
    from concurrent.futures import Future, ProcessPoolExecutor

    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, spawn, initializer=_init_worker, initargs=(job,)) as pool:
        pending: deque[Future[Encoded]] = deque()
        try:
            for chunk in chunks:
                pending.append(pool.submit(_encode_in_worker, chunk))
                if len(pending) >= 2 * workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


def _check_arguments(
    files: list[Path],
    tok: Tokenizer,
    output_prefix: Path,
    mode: str | None,
    append_eod: bool,
    overwrite: bool,
) -> None:
    """Refuse, before anything is read, what cannot work together (`mode`: --chat,
    --preference or None)."""
    if mode and (texts := [f for f in files if f.name.endswith(TEXT)]):
        raise PrepareError(
            f"{texts[0]}: {mode} reads {'conversations' if mode == '--chat' else 'pairs'} from "
            ".jsonl, .jsonl.gz or .parquet, not text"
        )
    if mode and append_eod:
        plain = ", and plain-text pairs end with it already" if mode == "--preference" else ""
        raise PrepareError(
            f"--append-eod does not go with {mode}: the chat template ends every turn itself{plain}"
        )
    if append_eod and tok.eod is None:
        raise PrepareError(
            f'--append-eod: {tok.describe()} defines no EOD token; set "eos_token" in its '
            "tokenizer_config.json"
        )
    suffixes = [".bin", ".idx"] + ([LOSS_MASK + ".bin", LOSS_MASK + ".idx"] if mode else [])
    if not overwrite:
        for suffix in suffixes + ([PAIRS] if mode == "--preference" else []):
            if Path(f"{output_prefix}{suffix}").exists():
                raise PrepareError(
                    f"{output_prefix}{suffix} exists; pass --overwrite to replace it (only once "
                    "the new dataset is complete) or choose another --output-prefix"
                )


def prepare(
    inputs: Sequence[str],
    output_prefix: Path,
    *,
    tokenizer: str = BYTE,
    text_key: str = "text",
    workers: int = 1,
    append_eod: bool = False,
    overwrite: bool = False,
    chunk_size: int = DEFAULT_CHUNK,
    progress_interval: float = 10.0,
    chat: bool = False,
    messages_key: str = "messages",
    chat_template_file: Path | None = None,
    preference: bool = False,
) -> Summary:
    """Tokenize `inputs` into `output_prefix`.bin/.idx; raises PrepareError on bad input, leaving
    nothing at the prefix (and an existing dataset there untouched)."""
    if chat and preference:
        raise PrepareError("--chat and --preference exclude each other")
    files = expand_inputs(inputs)
    if not files:
        raise PrepareError(f"no input files; name {', '.join(SUFFIXES)} files or patterns")
    try:
        tok = load(tokenizer)
    except TokenizerError as err:
        raise PrepareError(f"--tokenizer {tokenizer}: {err}") from None
    mode = "--chat" if chat else "--preference" if preference else None
    _check_arguments(files, tok, output_prefix, mode, append_eod, overwrite)
    dtype = np.dtype(token_dtype(tok.vocab_size)).name
    key = messages_key if chat else text_key
    template_file = str(chat_template_file) if chat_template_file else None
    job = Job(tokenizer, key, append_eod, dtype, chat, template_file, preference)
    try:
        template = chat_template(job)
    except ChatError as err:
        raise PrepareError(f"--tokenizer {tokenizer}: {err}") from None
    per_file = [0] * len(files)

    def chunks() -> Iterator[Chunk]:
        for i, path in enumerate(files):
            yield from read_chunks(i, path, KEYS if preference else key, chunk_size, not mode)

    documents = 0
    with (
        IndexedWriter(output_prefix, tok.vocab_size, loss_mask=mode is not None) as writer,
        contextlib.closing(encoded_chunks(chunks(), tok, job, workers, template)) as results,
    ):
        progress = Progress(len(files), progress_interval)  # the clock starts with the reading
        for enc in results:
            if enc.error is not None:
                raise PrepareError(enc.error)
            index = enc.file
            per_file[index] += enc.documents
            if index > 0 and per_file[index - 1] == 0:
                raise PrepareError(f"{files[index - 1]}: empty (no documents)")
            documents += enc.documents
            writer.add(enc.tokens, enc.lengths, enc.loss_mask)
            progress.update(index + 1, documents, writer.tokens)
        if per_file[-1] == 0:
            raise PrepareError(f"{files[-1]}: empty (no documents)")
        if writer.tokens == 0:
            raise PrepareError("every document is empty: no tokens to write")
        if not preference:  # an earlier preference dataset's marker would pair these documents
            Path(f"{output_prefix}{PAIRS}").unlink(missing_ok=True)
        written = writer.commit()
        pairs = writer.documents // 2 if preference else None
        if pairs is not None:
            written.append(write_marker(output_prefix, pairs))
        return Summary(
            len(files), documents, documents - writer.documents, writer.tokens,
            time.monotonic() - progress.start, written, pairs,
        )  # fmt: skip


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="kubetron-prepare-data",
        description="Tokenize JSONL, Parquet and plain text into a Megatron indexed dataset "
        "(PREFIX.bin + PREFIX.idx); with --chat, conversations for supervised fine-tuning; with "
        "--preference, prompt/chosen/rejected pairs for DPO.",
    )
    p.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="files or glob patterns (quoted; ** recurses) of .jsonl, .jsonl.gz, .parquet (a "
        "document a line or row) or UTF-8 .txt (a document a paragraph, between empty lines)",
    )
    p.add_argument("--output-prefix", type=Path, required=True, help="writes PREFIX.bin/.idx")
    p.add_argument(
        "--tokenizer",
        default=BYTE,
        help="'byte', or a Hugging Face tokenizer directory (tokenizer.json, "
        "tokenizer_config.json), loaded offline (default: byte)",
    )
    p.add_argument("--text-key", default="text", help="JSON field / Parquet column of the text")
    p.add_argument(
        "--workers",
        type=int,
        default=len(os.sched_getaffinity(0)),
        help="tokenizing processes (default: the CPUs this process may run on)",
    )
    p.add_argument(
        "--append-eod", action="store_true", help="end every document with the EOD token"
    )
    p.add_argument(
        "--overwrite", action="store_true", help="replace an existing dataset at the prefix"
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--chat",
        action="store_true",
        help="records are conversations: render them with the chat template and write "
        f"PREFIX{LOSS_MASK}.bin/.idx (loss on the assistant's tokens) for data.type chat",
    )
    mode.add_argument(
        "--preference",
        action="store_true",
        help="records are DPO pairs with prompt, chosen and rejected: lists of messages "
        "(conversational) or strings (standard: a user and an assistant message). Row i "
        "becomes documents 2i (prompt + chosen) and 2i+1 (prompt + rejected), rendered as "
        f"--chat renders, loss on the response only; writes PREFIX{LOSS_MASK}.bin/.idx and "
        f"PREFIX{PAIRS} for data.type preference. Without a chat template (the byte tokenizer, "
        "no --chat-template) standard pairs are plain text: prompt, then response and EOD",
    )
    p.add_argument(
        "--messages-key", default="messages", help="JSON field / Parquet column of a conversation"
    )
    p.add_argument(
        "--chat-template",
        type=Path,
        help="a Jinja chat template file instead of the tokenizer's own",
    )
    p.add_argument(
        "--chunk-size",
        type=int,
        default=DEFAULT_CHUNK,
        help=f"documents per task handed to a worker (default {DEFAULT_CHUNK})",
    )
    p.add_argument(
        "--progress-interval",
        type=float,
        default=10.0,
        help="seconds between progress lines on stderr (default 10)",
    )
    args = p.parse_args(argv)
    if args.workers < 1 or args.chunk_size < 1:
        p.error("--workers and --chunk-size must be at least 1")
    return args


def _sigterm(signum: int, frame: FrameType | None) -> None:
    raise Interrupted("SIGTERM")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _sigterm)
    try:
        summary = prepare(
            args.inputs,
            args.output_prefix,
            tokenizer=args.tokenizer,
            text_key=args.text_key,
            workers=args.workers,
            append_eod=args.append_eod,
            overwrite=args.overwrite,
            chunk_size=args.chunk_size,
            progress_interval=args.progress_interval,
            chat=args.chat,
            messages_key=args.messages_key,
            chat_template_file=args.chat_template,
            preference=args.preference,
        )
    except PrepareError as err:
        print(f"prepare-data: {err}", file=sys.stderr)
        return EXIT_INPUT
    except Interrupted:
        print("prepare-data: SIGTERM; removed the partial output", file=sys.stderr)
        return EXIT_SIGTERM
    print(summary.text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
