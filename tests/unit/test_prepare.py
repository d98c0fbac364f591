"""Hugging Face tokenizers and data preparation, with a BPE tokenizer
trained here: loading it offline, `prepare` on JSONL and Parquet read back with Megatron-Core's
own dataset classes, bad input named by file and line and leaving nothing behind, the trainer's
start-time checks of a tokenizer against the model, and the Job manifest that runs `prepare`.
"""

from __future__ import annotations

import gzip
import io
import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st
from megatron.core.datasets.indexed_dataset import IndexedDataset
from tokenizers import Tokenizer

from devtools.hf_tokenizer import EOS, PAD, build_bpe, documents
from kubetron_api.config import PRESETS, TokenizerSpec, TrainerConfig
from kubetron_api.exitcodes import ConfigError
from kubetron_api.v1alpha1 import TRAINER_UID, ResourcesSpec
from kubetron_trainer.__main__ import main as trainer_main
from kubetron_trainer.data.batches import (
    NO_PAD,
    DatasetTokenizer,
    check_indexed_data,
    indexed_dataset,
)
from kubetron_trainer.data.tokenizer import (
    ByteTokenizer,
    HuggingFaceTokenizer,
    TokenizerError,
    check_for_model,
    from_spec,
)
from kubetron_trainer.tools import prepare as prep

ROOT = Path(__file__).resolve().parents[2]
JOB = ROOT / "manifests" / "jobs" / "prepare-data.yaml"
ENV = {"PATH": "/usr/bin:/bin", "PYTHONPATH": f"{ROOT / 'trainer'}:{ROOT / 'api'}"}


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tokenizer")
    build_bpe(directory)
    return directory


@pytest.fixture(scope="module")
def hf(tok_dir: Path) -> Tokenizer:
    return Tokenizer.from_file(str(tok_dir / "tokenizer.json"))


def write_jsonl(path: Path, records: list[Any], *, raw: list[str] | None = None) -> Path:
    lines = raw if raw is not None else [json.dumps(r) for r in records]
    data = "".join(line + "\n" for line in lines).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)
    return path


def write_parquet(path: Path, columns: dict[str, list[Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path, row_group_size=13)
    return path


def files_in(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


# --------------------------------------------------------------------------- the tokenizer


def test_a_hugging_face_directory_loads_offline_with_its_special_tokens(
    tok_dir: Path, hf: Tokenizer
) -> None:
    tok = HuggingFaceTokenizer(tok_dir)
    assert tok.vocab_size == hf.get_vocab_size() > 258
    assert (tok.eod, tok.pad) == (hf.token_to_id(EOS), hf.token_to_id(PAD))
    text = "The careful pod saves the busy gradient. Größe ✓"
    assert tok.tokenize(text) == hf.encode(text).ids
    assert tok.tokenize_batch([text, "node"]) == [hf.encode(text).ids, hf.encode("node").ids]
    assert tok.detokenize(tok.tokenize(text)) == text
    # no network and no torch: the loader runs with sockets gone and torch unimportable
    code = (
        "import socket, sys; socket.socket = None; sys.modules['torch'] = None\n"
        "from kubetron_trainer.data.tokenizer import load\n"
        f"t = load({str(tok_dir)!r}); print(t.vocab_size, t.eod, t.pad)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=60
    )
    assert out.stdout.split() == [str(tok.vocab_size), str(tok.eod), str(tok.pad)], out.stderr


def test_special_tokens_map_wins_and_tokenizer_json_padding_is_the_last_resort(
    tmp_path: Path, hf: Tokenizer
) -> None:
    build_bpe(tmp_path, pad=None)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": PAD}))
    assert HuggingFaceTokenizer(tmp_path).eod == hf.token_to_id(EOS)  # special_tokens_map.json
    assert HuggingFaceTokenizer(tmp_path).pad is None
    hf.enable_padding(pad_id=hf.token_to_id(PAD), pad_token=PAD)
    hf.save(str(tmp_path / "tokenizer.json"))
    assert HuggingFaceTokenizer(tmp_path).pad == hf.token_to_id(PAD)
    hf.no_padding()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("missing", "{d} is not a directory; give a directory holding tokenizer.json"),
        ("no tokenizer.json", "{d} has no tokenizer.json; save the tokenizer there"),
        ("broken tokenizer.json", "{d}/tokenizer.json is not a tokenizers JSON file: "),
        ("broken config", "{d}/tokenizer_config.json is not valid JSON: "),
        (
            "unknown eos",
            "eos_token '<|eot|>' (from {d}/special_tokens_map.json) is not in the vocabulary of "
            "{d}/tokenizer.json; name a token it has",
        ),
    ],
)
def test_a_broken_tokenizer_directory_is_named(tmp_path: Path, change: str, message: str) -> None:
    d = tmp_path / "tok"
    build_bpe(d)
    if change == "missing":
        d = tmp_path / "nothing"
    elif change == "no tokenizer.json":
        (d / "tokenizer.json").unlink()
    elif change == "broken tokenizer.json":
        (d / "tokenizer.json").write_text('{"model": 1}')
    elif change == "broken config":
        (d / "tokenizer_config.json").write_text("{")
    else:
        (d / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<|eot|>"}))
    with pytest.raises(TokenizerError) as err:
        HuggingFaceTokenizer(d)
    assert str(err.value).startswith(message.format(d=d))


def test_the_check_against_the_model_lists_every_problem_with_its_fix(
    tmp_path: Path, tok_dir: Path
) -> None:
    n = HuggingFaceTokenizer(tok_dir).vocab_size
    spec = TokenizerSpec(type="huggingface", name=str(tok_dir))
    assert check_for_model(spec, 512, 512).vocab_size == n  # fits, has both tokens
    assert check_for_model(spec, n, 384).vocab_size == n  # padding made room
    with pytest.raises(ConfigError) as err:
        check_for_model(spec, 128, 128)
    assert str(err.value) == (
        f"config field data.tokenizer.name: tokenizer {tok_dir} has {n} tokens (ids 0..{n - 1}) "
        "but the model has 128 embedding rows (vocabSize 128 after Megatron's padding); set "
        f"spec.model.overrides.vocabSize >= {n}"
    )
    bare = tmp_path / "bare"
    build_bpe(bare, eos=None, pad=None)
    with pytest.raises(ConfigError) as err:
        check_for_model(TokenizerSpec(type="huggingface", name=str(bare)), 128, 128)
    text = str(err.value)
    assert text.startswith(f"config field data.tokenizer.name: tokenizer {bare} has {n} tokens")
    assert (
        "defines no end-of-document (EOD) token, which separates documents in the training "
        f'data; set "eos_token" in {bare}/tokenizer_config.json to a token of its vocabulary'
    ) in text
    assert (
        "defines no pad token, which Megatron's GPTDataset pads sequences with; set "
        f'"pad_token" in {bare}/tokenizer_config.json to a token of its vocabulary'
    ) in text
    with pytest.raises(ConfigError) as err:
        check_for_model(TokenizerSpec(), 200, 256)
    assert str(err.value).startswith("config field data.tokenizer.type: the byte tokenizer has")
    assert from_spec(spec) is from_spec(TokenizerSpec(type="huggingface", name=str(tok_dir)))


def test_megatron_sees_no_pad_when_pad_is_the_eod_token(tmp_path: Path) -> None:
    build_bpe(tmp_path, pad=EOS)  # as Qwen3's base tokenizer
    tok = HuggingFaceTokenizer(tmp_path)
    assert tok.pad == tok.eod is not None
    view = DatasetTokenizer.of(tok)
    assert (view.eod, view.pad, view.vocab_size) == (tok.eod, NO_PAD, tok.vocab_size)
    assert DatasetTokenizer.of(ByteTokenizer()).pad == ByteTokenizer.pad


# --------------------------------------------------------------------------- prepare


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Documents in a .jsonl, a .jsonl.gz (one blank line, one empty text) and a .parquet."""
    tmp = tmp_path_factory.mktemp("corpus")
    docs = documents(260, seed=5)
    a = write_jsonl(tmp / "in" / "a.jsonl", [{"id": i, "text": t} for i, t in enumerate(docs[:90])])
    raw = [json.dumps({"text": t}) for t in docs[90:170]]
    b = write_jsonl(tmp / "in" / "sub" / "b.jsonl.gz", [], raw=[*raw[:5], "", *raw[5:]])
    write_jsonl(tmp / "in" / "sub" / "empty-text.jsonl", [{"text": ""}])
    c = write_parquet(tmp / "in" / "c.parquet", {"text": docs[170:], "n": list(range(90))})
    return {"tmp": tmp, "docs": docs, "files": [a, b, c]}


def test_prepare_jsonl_and_parquet_with_several_workers(
    corpus: dict[str, Any], tok_dir: Path, hf: Tokenizer
) -> None:
    out = corpus["tmp"] / "out" / "hf"
    inputs = [str(p) for p in corpus["files"]]
    summary = prep.prepare(
        inputs, out, tokenizer=str(tok_dir), workers=3, append_eod=True, chunk_size=7
    )
    docs, eod = corpus["docs"], hf.token_to_id(EOS)
    expected = [[*hf.encode(d).ids, eod] for d in docs]
    ds = IndexedDataset(str(out))
    assert len(ds) == len(docs) and ds.index.dtype == np.uint16
    assert [ds[i].tolist() for i in range(len(ds))] == expected
    assert (summary.files, summary.documents, summary.empty) == (3, 260, 0)
    assert summary.tokens == sum(map(len, expected)) and summary.tokens_per_s > 0
    assert summary.written == [Path(f"{out}.bin"), Path(f"{out}.idx")]
    assert files_in(out.parent) == ["hf.bin", "hf.idx"]  # no partial files left
    text = summary.text()
    assert f"260 documents (0 empty, skipped), {summary.tokens:,} tokens from 3 files" in text
    assert f"wrote {out}.bin ({Path(f'{out}.bin').stat().st_size:,} bytes)" in text
    # one worker, no EOD: the same documents without it
    single = prep.prepare(inputs, out.with_name("one"), tokenizer=str(tok_dir), workers=1)
    ds1 = IndexedDataset(str(out.with_name("one")))
    assert [ds1[i].tolist() for i in range(len(ds1))] == [e[:-1] for e in expected]
    assert single.tokens == summary.tokens - len(docs)


def test_patterns_are_expanded_and_empty_documents_skipped(
    corpus: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    tmp = corpus["tmp"]
    out = tmp / "byte" / "corpus"
    pattern = str(tmp / "in" / "**" / "*.jsonl*")  # a.jsonl, sub/b.jsonl.gz, sub/empty-text
    rc = prep.main([pattern, "--output-prefix", str(out), "--tokenizer", "byte", "--workers", "2"])
    assert rc == 0
    docs = [d.encode() for d in corpus["docs"][:170]]
    ds = IndexedDataset(str(out))
    assert [bytes(ds[i].tolist()) for i in range(len(ds))] == docs
    printed = capsys.readouterr().out
    assert "171 documents (1 empty, skipped)" in printed and "from 3 files" in printed


def test_a_text_file_is_a_document_a_paragraph_with_the_byte_tokenizer(tmp_path: Path) -> None:
    """The distributed tests' data: UTF-8 text, no download, EOD after every document."""
    src = tmp_path / "t.txt"
    src.write_text("héllo world\n\n\n\nsecond doc\n\n  ", encoding="utf-8")
    summary = prep.prepare([str(src)], tmp_path / "d", append_eod=True)
    docs = ["héllo world", "second doc"]
    ds = IndexedDataset(str(tmp_path / "d"))
    assert len(ds) == 2 and summary.tokens == sum(len(d.encode()) + 1 for d in docs)
    first = ds[0]
    assert isinstance(first, np.ndarray)
    assert first[-1] == ByteTokenizer.eod
    assert ByteTokenizer().detokenize(first.tolist()) == "héllo world"
    assert ByteTokenizer().detokenize(ds[1].tolist()) == "second doc"
    src.write_bytes("héllo world\r\n\r\nsecond doc\r\n".encode())  # Windows line ends
    prep.prepare([str(src)], tmp_path / "crlf", append_eod=True)
    assert (tmp_path / "crlf.bin").read_bytes() == (tmp_path / "d.bin").read_bytes()


@given(st.lists(st.sampled_from(["a", "b c", " ", "\t", "é", "\n"]), max_size=30))
def test_text_paragraphs_are_the_text_split_at_empty_lines(pieces: list[str]) -> None:
    text = "".join(pieces)
    expected = [p.strip() for p in text.split("\n\n") if p.strip()]
    assert list(prep.paragraphs(io.StringIO(text))) == expected


def test_the_output_reads_back_through_megatrons_gpt_dataset(
    corpus: dict[str, Any], tok_dir: Path, hf: Tokenizer
) -> None:
    out = corpus["tmp"] / "gpt" / "corpus"
    prep.prepare([str(p) for p in corpus["files"]], out, tokenizer=str(tok_dir), append_eod=True)
    cfg = trainer_config(out, tok_dir, seqLength=32)
    ds = indexed_dataset(cfg, num_samples=40, reads_data=True)
    assert ds is not None and len(ds) >= 40
    eod = hf.token_to_id(EOS)
    expected = [[*hf.encode(d).ids, eod] for d in corpus["docs"]]
    for i in range(0, 40, 3):
        sample = ds[i]  # a BlendedDataset of one GPTDataset: its sample j
        gpt, j = ds.datasets[ds.dataset_index[i]], int(ds.dataset_sample_index[i])
        text, doc_ids, _ = gpt._query_document_sample_shuffle_indices(j)
        window = np.concatenate([expected[d] for d in doc_ids])
        # the sample is a contiguous window of its documents, labels shifted by one
        starts = [
            s for s in range(len(window) - 32) if window[s : s + 33].tolist() == text.tolist()
        ]
        assert starts, (i, doc_ids)
        assert sample["tokens"].tolist() == text[:-1].tolist()
        assert sample["labels"].tolist() == text[1:].tolist()
        assert sample["loss_mask"].tolist() == [1.0] * 32


BAD_INPUT = [
    ("not json", "{a}:3: not JSON (Expecting value: line 1 column 1 (char 0))"),
    ("not an object", "{a}:2: not a JSON object but a list"),
    (
        "missing key",
        "{a}:4: no 'text' field (fields: id, body); name the text field with --text-key",
    ),
    ("not a string", "{a}:2: 'text' is int, not a string"),
    ("null text", "{a}:2: 'text' is null, not a string"),
    ("empty file", "{e}: empty (no documents)"),
    ("blank file", "{e}: empty (no documents)"),
    ("empty parquet", "{p}: empty (no documents)"),
    (
        "parquet column",
        "{p}: no column 'text' (columns: body); name the column with --text-key",
    ),
    ("parquet null", "{p}: row 14 (counting from 0): 'text' is null"),
    ("parquet ints", "{p}: column 'text' holds int64, not strings"),
    ("not parquet", "{p}: not a Parquet file"),
    ("suffix", "{t}: not a .jsonl, .jsonl.gz, .parquet, .txt file"),
    ("not utf-8", "{x}:4: not UTF-8 text ('utf-8' codec can't decode byte 0xff in position 2"),
    ("chat text", "{x}: --chat reads conversations from .jsonl, .jsonl.gz or .parquet, not text"),
    ("no match", "{tmp}/nothing-*.jsonl: matches no file"),
]
# found by the worker processes (the others by this one): also with a pool of two
IN_WORKERS = ("not json", "missing key", "empty file", "parquet null")


@pytest.mark.parametrize(
    ("case", "message", "workers"),
    [(c, m, 1) for c, m in BAD_INPUT] + [(c, m, 2) for c, m in BAD_INPUT if c in IN_WORKERS],
)
def test_bad_input_is_named_and_leaves_nothing(
    tmp_path: Path, case: str, message: str, workers: int, capsys: pytest.CaptureFixture[str]
) -> None:
    good = [{"text": f"document {i}"} for i in range(30)]
    a = write_jsonl(tmp_path / "a.jsonl", good)
    e, p, t = tmp_path / "e.jsonl", tmp_path / "p.parquet", tmp_path / "t.csv"
    x = tmp_path / "x.txt"
    inputs = [a, e, p]
    write_jsonl(e, good[:3])
    write_parquet(p, {"text": [f"row {i}" for i in range(30)]})
    if case in ("not json", "not an object", "missing key", "not a string", "null text"):
        bad = {
            "not json": "oops",
            "not an object": "[1, 2]",
            "missing key": '{"id": 3, "body": "x"}',
            "not a string": '{"text": 7}',
            "null text": '{"text": null}',
        }[case]
        line = int(message.split(":")[1])
        lines = [json.dumps(r) for r in good]
        lines[line - 1] = bad
        write_jsonl(a, [], raw=lines)
    elif case == "empty file":
        e.write_bytes(b"")
    elif case == "blank file":
        e.write_bytes(b"\n  \n")
    elif case == "empty parquet":
        write_parquet(p, {"text": pa.array([], pa.string())})
    elif case == "parquet column":
        write_parquet(p, {"body": ["x"]})
    elif case == "parquet null":
        write_parquet(p, {"text": [f"row {i}" if i != 14 else None for i in range(30)]})
    elif case == "parquet ints":
        write_parquet(p, {"text": [1, 2]})
    elif case == "not parquet":
        p.write_text("PAR? no")
    elif case == "suffix":
        t.write_text("plain text")
        inputs.append(t)
    elif case == "no match":
        inputs.append(tmp_path / "nothing-*.jsonl")
    elif case == "not utf-8":
        x.write_bytes("one\n\ntwo\nab\xff\n".encode("latin-1"))
        inputs.append(x)
    elif case == "chat text":
        x.write_text("a conversation?\n")
        inputs = [x]
    out = tmp_path / "out" / "corpus"
    args = [*map(str, inputs), "--output-prefix", str(out), "--workers", str(workers)]
    if case == "chat text":
        args.append("--chat")
    assert prep.main([*args, "--chunk-size", "4"]) == 2
    err = capsys.readouterr().err
    expected = message.format(a=a, e=e, p=p, t=t, x=x, tmp=tmp_path)
    assert f"prepare-data: {expected}" in err, err
    assert files_in(out.parent) == []  # no dataset, no partial files


def test_an_existing_dataset_is_kept_until_the_new_one_is_complete(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = write_jsonl(tmp_path / "a.jsonl", [{"text": "first version"}])
    out = tmp_path / "out" / "corpus"
    assert prep.main([str(src), "--output-prefix", str(out), "--workers", "1"]) == 0
    before = {p.name: p.read_bytes() for p in out.parent.iterdir()}
    write_jsonl(src, [{"text": "second version"}, {"text": 3}])
    args = [str(src), "--output-prefix", str(out), "--workers", "1"]
    assert prep.main(args) == 2  # refused without --overwrite
    assert "corpus.bin exists; pass --overwrite" in capsys.readouterr().err
    assert prep.main([*args, "--overwrite"]) == 2  # the bad line: the old dataset stays
    assert {p.name: p.read_bytes() for p in out.parent.iterdir()} == before
    write_jsonl(src, [{"text": "second version"}])
    assert prep.main([*args, "--overwrite"]) == 0
    ds = IndexedDataset(str(out))  # kept while its items, views of its mmap, are read
    assert bytes(ds[0].tolist()) == b"second version"
    assert files_in(out.parent) == ["corpus.bin", "corpus.idx"]


@pytest.mark.slow
def test_the_module_runs_with_workers_and_sigterm_removes_the_partial_output(
    tmp_path: Path,
) -> None:
    src = write_jsonl(tmp_path / "a.jsonl", [{"text": f"doc {i} " * 40} for i in range(150_000)])
    out = tmp_path / "out" / "corpus"
    cmd = [sys.executable, "-m", "kubetron_trainer.tools.prepare", str(src), "--output-prefix"]
    cmd += [str(out), "--workers", "2", "--chunk-size", "200", "--progress-interval", "0.2"]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if line.startswith("prepare-data: file 1/1,"):
            break
        assert line or proc.poll() is None, "prepare ended before its first progress line"
    else:
        proc.kill()
        raise AssertionError("no progress line")
    assert any(p.name.endswith(".partial") for p in out.parent.iterdir())  # being written
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "SIGTERM; removed the partial output" in err
    assert files_in(out.parent) == []


# --------------------------------------------------------------------------- the trainer


def trainer_config(prefix: Path, tokenizer: Path | None, **recipe: int) -> TrainerConfig:
    arch = PRESETS["gpt-tiny"]
    return TrainerConfig.model_validate(
        {
            "model": arch.model_dump(by_alias=True),
            "preset": "gpt-tiny",
            "recipe": {"globalBatchSize": 8, "microBatchSize": 2, "seqLength": 64, **recipe},
            "data": {
                "type": "indexed",
                "paths": [{"prefix": str(prefix)}],
                "tokenizer": ({"type": "huggingface", "name": str(tokenizer)} if tokenizer else {}),
            },
            "metrics": {"enabled": False},
        }
    )


@pytest.fixture(scope="module")
def byte_data(corpus: dict[str, Any]) -> Path:
    out = corpus["tmp"] / "bytes" / "corpus"
    prep.prepare([str(corpus["files"][0])], out, append_eod=True)
    return out


@pytest.mark.parametrize(
    ("case", "message"),
    [
        (
            "vocab",
            "config field data.tokenizer.name: tokenizer {d} has {n} tokens (ids 0..{m}) but the "
            "model has 256 embedding rows (vocabSize 200 after Megatron's padding); set "
            "spec.model.overrides.vocabSize >= {n}",
        ),
        (
            "no eod",
            "config field data.tokenizer.name: tokenizer {d} defines no end-of-document (EOD) "
            "token",
        ),
        ("no pad", "config field data.tokenizer.name: tokenizer {d} defines no pad token"),
        ("no directory", "config field data.tokenizer.name: {d} is not a directory"),
        ("byte vocab", "config field data.tokenizer.type: the byte tokenizer has 258 tokens"),
    ],
)
def test_the_trainer_refuses_a_tokenizer_that_does_not_fit_before_joining(
    tmp_path: Path, byte_data: Path, case: str, message: str, caplog: pytest.LogCaptureFixture
) -> None:
    d = tmp_path / "tok"
    build_bpe(d, eos=None if case == "no eod" else EOS, pad=None if case == "no pad" else PAD)
    n = HuggingFaceTokenizer(d).vocab_size
    if case == "no directory":
        d = tmp_path / "missing"
    cfg = trainer_config(byte_data, None if case == "byte vocab" else d)
    if case in ("vocab", "byte vocab"):
        cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"vocab_size": 200})})
    path = tmp_path / "config.json"
    path.write_text(cfg.model_dump_json(by_alias=True))
    assert trainer_main(["--config", str(path), "--device", "cpu"]) == 2
    assert message.format(d=d, n=n, m=n - 1) in caplog.text
    assert "exiting 2 (not retryable)" in caplog.text
    assert "kubetron trainer:" not in caplog.text  # it never built a model


def test_check_indexed_data_returns_the_tokenizer_that_fits(byte_data: Path, tok_dir: Path) -> None:
    tok = check_indexed_data(trainer_config(byte_data, tok_dir))
    assert isinstance(tok, HuggingFaceTokenizer) and tok.directory == tok_dir
    assert isinstance(check_indexed_data(trainer_config(byte_data, None)), ByteTokenizer)


# --------------------------------------------------------------------------- the Job manifest


def test_the_prepare_job_manifest_runs_the_cli_with_its_real_arguments() -> None:
    job = yaml.safe_load(JOB.read_text())
    assert (job["apiVersion"], job["kind"]) == ("batch/v1", "Job")
    pod = job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    (container,) = pod["containers"]
    assert container["image"] == ResourcesSpec().image  # the trainer image
    assert container["command"] == ["python", "-m", "kubetron_trainer.tools.prepare"]
    args = prep.parse_args(container["args"])  # the CLI's own parser accepts them
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]}
    paths = [*args.inputs, str(args.output_prefix), args.tokenizer]
    for path in paths:  # everything it reads and writes is on the mounted claim
        assert any(path.startswith(m + "/") and mounts[m] in claims for m in mounts), path
    assert args.append_eod and args.tokenizer != "byte"
    # restricted pod security, as the trainer image's non-root user
    assert pod["securityContext"] == {
        "runAsNonRoot": True,
        "runAsUser": TRAINER_UID,
        "runAsGroup": TRAINER_UID,
        "fsGroup": TRAINER_UID,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
    }
    requests = container["resources"]["requests"]
    assert args.workers == math.ceil(float(requests["cpu"]))  # one worker per requested CPU
    assert set(requests) == {"cpu", "memory"}
