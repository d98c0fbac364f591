"""Supervised fine-tuning data: conversations rendered with the tokenizer's
chat template, the assistant's tokens marked, `prepare --chat` writing tokens and loss mask that
Megatron's IndexedDataset reads back, and the trainer's packing of them into sequences (next-fit,
block-diagonal attention, positions restarting per conversation, loss on the assistant's labels).
"""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from megatron.core.datasets.indexed_dataset import IndexedDataset
from tokenizers import Tokenizer

from devtools.hf_tokenizer import CHATML, IM_END, build_chat_bpe, conversations
from kubetron_api.config import PRESETS, TrainerConfig
from kubetron_api.exitcodes import ConfigError
from kubetron_trainer.__main__ import main as trainer_main
from kubetron_trainer.data.chat import (
    ChatError,
    check_messages,
    compile_template,
    load_template,
    segments,
)
from kubetron_trainer.data.packing import ChatDataset, block_causal_mask, next_fit, train_documents
from kubetron_trainer.data.tokenizer import HuggingFaceTokenizer
from kubetron_trainer.tools import prepare as prep

CONVERSATIONS = conversations(60, seed=5)


@pytest.fixture(scope="module")
def chat_tok(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("chat-tokenizer")
    build_chat_bpe(directory)
    return directory


def write_jsonl(path: Path, records: list[Any], raw: dict[int, str] | None = None) -> Path:
    lines = [json.dumps(r) for r in records]
    for line, text in (raw or {}).items():
        lines[line - 1] = text
    path.write_text("".join(line + "\n" for line in lines))
    return path


def prepared(tmp_path: Path, tok: Path, workers: int = 1) -> Path:
    src = write_jsonl(tmp_path / "chat.jsonl", [{"messages": c} for c in CONVERSATIONS])
    prefix = tmp_path / "out" / "chat"
    args = [str(src), "--output-prefix", str(prefix), "--tokenizer", str(tok), "--chat"]
    assert prep.main([*args, "--workers", str(workers), "--chunk-size", "7"]) == 0
    return prefix


# --------------------------------------------------------------------------- rendering


def test_segments_cut_the_rendering_at_the_assistants_turns(chat_tok: Path) -> None:
    template = load_template(chat_tok)
    messages = CONVERSATIONS[0] + [
        {"role": "user", "content": "And then?"},
        {"role": "assistant", "content": "Then it saves."},
    ]
    pieces = segments(template, messages)
    assert "".join(text for text, _ in pieces) == template.render(messages, False)
    learned = [text for text, assistant in pieces if assistant]
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    assert learned == [a + IM_END + "\n" for a in answers]  # the end of turn is learned too
    assert not any(a in text for text, assistant in pieces if not assistant for a in answers)
    assert pieces[0][0].startswith("<|im_start|>system\n") and not pieces[0][1]


def test_a_template_that_rewrites_earlier_turns_is_refused() -> None:
    # like Qwen3's: the last assistant turn is rendered differently from earlier ones
    text = CHATML.replace("m['content']", "(m['content'] + (' [last]' if loop.last else ''))")
    template = compile_template(text, "test template")
    with pytest.raises(ChatError, match="renders the conversation up to message 2 differently"):
        segments(template, CONVERSATIONS[0] + CONVERSATIONS[1][1:])


def test_a_template_file_overrides_and_a_missing_template_is_named(
    chat_tok: Path, tmp_path: Path
) -> None:
    plain = tmp_path / "plain"
    build_chat_bpe(plain, template=None)
    with pytest.raises(ChatError, match=r"has no chat template .* --chat-template FILE"):
        load_template(plain)
    path = tmp_path / "t.jinja"
    path.write_text("{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}")
    rendered = load_template(plain, path).render(CONVERSATIONS[0][:2], False)
    assert rendered.startswith("[system] You answer")
    path.write_text("{% for m in messages %")
    with pytest.raises(ChatError, match="is not valid Jinja"):
        load_template(chat_tok, path)


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ([1], "not a JSON object but a list"),
        ({"turns": []}, "no 'messages' field (fields: turns); name it with --messages-key"),
        ({"messages": []}, "'messages' must be a non-empty list"),
        ({"messages": ["hi"]}, "messages[0] is not an object"),
        ({"messages": [{"role": "bot", "content": "x"}]}, "messages[0].role is 'bot'; use one"),
        ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content must be a string"),
        ({"messages": [{"role": "user", "content": "x"}]}, "no assistant message"),
    ],
)
def test_bad_conversations_say_what_is_wrong(record: Any, message: str) -> None:
    with pytest.raises(ChatError, match=re.escape(message)):
        check_messages(record, "messages")


# --------------------------------------------------------------------------- prepare --chat


@pytest.mark.parametrize("workers", [1, 2])
def test_prepare_chat_writes_tokens_and_the_assistant_mask(
    chat_tok: Path, tmp_path: Path, workers: int
) -> None:
    prefix = prepared(tmp_path, chat_tok, workers)
    names = sorted(p.name for p in prefix.parent.iterdir())
    assert names == ["chat.bin", "chat.idx", "chat.loss_mask.bin", "chat.loss_mask.idx"]
    tokens, mask = IndexedDataset(str(prefix)), IndexedDataset(f"{prefix}.loss_mask")
    assert len(tokens) == len(mask) == len(CONVERSATIONS)
    tok = Tokenizer.from_file(str(chat_tok / "tokenizer.json"))
    template = load_template(chat_tok)

    def text(ids: np.ndarray) -> str:
        return str(tok.decode(ids.tolist(), skip_special_tokens=False))

    for i, conv in enumerate(CONVERSATIONS):
        ids, learned = tokens[i], mask[i]
        assert ids.shape == learned.shape and set(np.unique(learned)) <= {0, 1}
        pieces = segments(template, conv)
        assert text(ids) == "".join(t for t, _ in pieces)
        cuts = np.flatnonzero(np.diff(learned)) + 1
        runs = zip(np.split(ids, cuts), np.split(learned, cuts), strict=True)
        assert [text(r) for r, m in runs if m[0]] == [t for t, a in pieces if a]


def test_prepare_chat_reads_parquet_conversations(chat_tok: Path, tmp_path: Path) -> None:
    src = tmp_path / "chat.parquet"
    pq.write_table(pa.table({"messages": CONVERSATIONS[:9]}), src, row_group_size=4)
    prefix = tmp_path / "out" / "p"
    args = [str(src), "--output-prefix", str(prefix), "--tokenizer", str(chat_tok), "--chat"]
    assert prep.main([*args, "--workers", "1"]) == 0
    assert len(IndexedDataset(f"{prefix}.loss_mask")) == 9


@pytest.mark.parametrize(
    ("raw", "extra", "message"),
    [
        ({4: "nope"}, [], "{src}:4: not JSON"),
        ({9: '{"messages": [{"role": "user", "content": "q"}]}'}, [], "{src}:9: 'messages' has no"),
        ({}, ["--append-eod"], "--append-eod does not go with --chat"),
        ({}, ["--tokenizer", "byte"], "the byte tokenizer has no chat template"),
    ],
)
def test_prepare_chat_names_bad_input_and_leaves_nothing(
    chat_tok: Path,
    tmp_path: Path,
    raw: dict[int, str],
    extra: list[str],
    message: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    src = write_jsonl(tmp_path / "c.jsonl", [{"messages": c} for c in CONVERSATIONS[:20]], raw)
    out = tmp_path / "out" / "chat"
    args = [str(src), "--output-prefix", str(out), "--tokenizer", str(chat_tok), "--chat"]
    assert prep.main([*args, "--chunk-size", "3", *extra]) == 2
    assert message.format(src=src) in capsys.readouterr().err
    assert not out.parent.exists() or list(out.parent.iterdir()) == []


# --------------------------------------------------------------------------- packing


def test_next_fit_packs_in_order_and_never_overflows() -> None:
    lengths = np.array([5, 3, 4, 9, 1, 1, 8, 2])
    bounds = next_fit(lengths, 9)
    bins = [lengths[a:b].tolist() for a, b in itertools.pairwise(bounds)]
    assert bins == [[5, 3], [4], [9], [1, 1], [8], [2]]
    assert train_documents(200, "99,1,0") == 198 and train_documents(3, "1,1,1") == 1


def test_block_causal_mask_keeps_each_conversation_to_itself() -> None:
    ids = torch.tensor([[0, 0, 0, 1, 1, -1]])
    allowed = ~block_causal_mask(ids)[0, 0]
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0],
            [0, 0, 0, 1, 0, 0],
            [0, 0, 0, 1, 1, 0],
            [0, 0, 0, 0, 0, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(allowed, expected)


def test_packed_samples_hold_each_conversation_once_per_epoch_with_its_mask(
    chat_tok: Path, tmp_path: Path
) -> None:
    prefix = str(prepared(tmp_path, chat_tok))
    tokens, mask = IndexedDataset(prefix), IndexedDataset(prefix + ".loss_mask")
    pad = HuggingFaceTokenizer(chat_tok).pad
    assert pad is not None
    seq = 96
    data = ChatDataset(prefix, seq_length=seq, num_samples=40, seed=3, split="1,0,0", pad=pad)
    again = ChatDataset(prefix, seq_length=seq, num_samples=40, seed=3, split="1,0,0", pad=pad)
    assert len(data) >= 40 and data.per_epoch < len(CONVERSATIONS)  # several per sequence
    seen: list[int] = []
    for i in range(data.per_epoch):
        sample, item = data.sample(i), data[i]
        assert torch.equal(item["tokens"], again[i]["tokens"])  # every rank packs the same
        docs = data.order[data.bounds[i] : data.bounds[i + 1]].tolist()
        seen += docs
        at = 0
        for number, doc in enumerate(docs):
            n = min(len(tokens[doc]), seq + 1)
            assert (sample.tokens[at : at + n] == tokens[doc][:n]).all()
            assert (sample.document_ids[at : at + n] == number).all()
            positions = item["position_ids"][at : at + n - (at + n > seq)]
            assert positions.tolist() == list(range(len(positions)))
            # a label is learned iff the assistant wrote it in the same conversation
            labels = np.asarray(mask[doc][1:n], dtype=np.float32)
            assert item["loss_mask"][at : at + n - 1].tolist() == labels.tolist()
            if at + n - 1 < seq:  # the label after a conversation is the next one's: not learned
                assert item["loss_mask"][at + n - 1] == 0
            at += n
        assert (sample.tokens[at:] == pad).all() and item["loss_mask"][at:].sum() == 0
        assert torch.equal(item["labels"], torch.from_numpy(sample.tokens[1:]))
    assert sorted(seen) == list(range(len(CONVERSATIONS)))  # each once in the first epoch


def test_long_conversations_are_cut_and_missing_masks_named(
    chat_tok: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    prefix = str(prepared(tmp_path, chat_tok))
    data = ChatDataset(prefix, seq_length=15, num_samples=5, seed=0, split="1,0,0", pad=0)
    assert data.per_epoch == len(CONVERSATIONS)  # every conversation fills a sequence alone
    assert all(len(data[i]["tokens"]) == 15 for i in range(5))
    with pytest.raises(ConfigError, match=r"data\.split"):
        ChatDataset(prefix, seq_length=15, num_samples=5, seed=0, split="0,1,0", pad=0)
    Path(prefix + ".loss_mask.idx").unlink()
    cfg = TrainerConfig.model_validate(
        {
            "model": PRESETS["gpt-tiny"].model_dump(by_alias=True),
            "preset": "gpt-tiny",
            "recipe": {"globalBatchSize": 2, "microBatchSize": 1, "seqLength": 64},
            "data": {
                "type": "chat",
                "paths": [{"prefix": prefix}],
                "tokenizer": {"type": "huggingface", "name": str(chat_tok)},
            },
            "metrics": {"enabled": False},
        }
    )
    config = tmp_path / "config.json"
    config.write_text(cfg.model_dump_json(by_alias=True))
    assert trainer_main(["--config", str(config), "--device", "cpu"]) == 2
    assert f"config field data.paths[0].prefix: {prefix}.loss_mask.idx does not exist" in (
        caplog.text
    )
    assert "kubetron-prepare-data --chat" in caplog.text
    assert "kubetron trainer:" not in caplog.text  # it never built a model
