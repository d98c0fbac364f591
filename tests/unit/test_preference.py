"""DPO preference data: `prepare --preference` on TRL's conversational and standard rows (the
chat template or plain text, pairs kept in order, the loss mask on the response only, bad rows
named), the trainer's reader of the pairs as Megatron-style GPT rows (truncation, padding, a
seeded order, refusal of data that is not pairs), the mock pairs, and the micro-batch layout:
the chosen rows first, then the rejected ones, with the pairs' sample indices.
"""

from __future__ import annotations

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

from devtools.hf_tokenizer import IM_END, build_bpe, build_chat_bpe, conversations
from kubetron_api.config import PRESETS, TrainerConfig
from kubetron_api.exitcodes import ConfigError
from kubetron_trainer.data.batches import (
    Batches,
    MockDataset,
    MockPreferenceDataset,
    build_batches,
    check_indexed_data,
)
from kubetron_trainer.data.chat import load_template
from kubetron_trainer.data.preference import PreferenceDataset
from kubetron_trainer.data.tokenizer import ByteTokenizer, HuggingFaceTokenizer
from kubetron_trainer.tools import prepare as prep
from tests.unit.test_chat import write_jsonl

WRONG = "I cannot say."


def conversational(count: int, seed: int = 5) -> list[dict[str, Any]]:
    """Rows whose prompt is a conversation up to its last answer (earlier answers included)."""
    rows = []
    for conv in conversations(count, seed=seed):
        wrong = {"role": "assistant", "content": WRONG}
        rows.append({"prompt": conv[:-1], "chosen": conv[-1:], "rejected": [wrong]})
    return rows


def standard(count: int, seed: int = 6) -> list[dict[str, Any]]:
    return [
        {"prompt": conv[-2]["content"], "chosen": conv[-1]["content"], "rejected": WRONG}
        for conv in conversations(count, seed=seed)
    ]


ROWS = {"conversational": conversational(24), "standard": standard(24)}


@pytest.fixture(scope="module")
def chat_tok(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("chat-tokenizer")
    build_chat_bpe(directory)
    return directory


def prepared(
    tmp_path: Path, tok: str | Path, rows: list[dict[str, Any]], *extra: str, name: str = "p"
) -> Path:
    src = write_jsonl(tmp_path / f"{name}.jsonl", rows)
    prefix = tmp_path / "out" / name
    args = [str(src), "--output-prefix", str(prefix), "--tokenizer", str(tok), "--preference"]
    assert prep.main([*args, "--chunk-size", "5", *extra]) == 0
    return prefix


def runs(ids: np.ndarray, mask: np.ndarray) -> list[tuple[np.ndarray, int]]:
    """The document cut where the mask changes: (tokens, mask value) runs."""
    cuts = np.flatnonzero(np.diff(mask)) + 1
    return [(r, int(m[0])) for r, m in zip(np.split(ids, cuts), np.split(mask, cuts), strict=True)]


# --------------------------------------------------------------------------- prepare --preference


@pytest.mark.parametrize("shape", ["conversational", "standard"])
@pytest.mark.parametrize("workers", [1, 2])
def test_each_pair_becomes_chosen_then_rejected_with_the_response_learned(
    chat_tok: Path, tmp_path: Path, shape: str, workers: int
) -> None:
    rows = ROWS[shape]
    prefix = prepared(tmp_path, chat_tok, rows, "--workers", str(workers))
    assert sorted(p.name for p in prefix.parent.iterdir()) == [
        "p.bin", "p.idx", "p.loss_mask.bin", "p.loss_mask.idx", "p.pairs.json",
    ]  # fmt: skip
    marker = json.loads(Path(f"{prefix}.pairs.json").read_text())
    assert marker == {"format": "kubetron-preference", "version": 1, "pairs": len(rows)}
    tokens, mask = IndexedDataset(str(prefix)), IndexedDataset(f"{prefix}.loss_mask")
    assert len(tokens) == len(mask) == 2 * len(rows)
    tok = Tokenizer.from_file(str(chat_tok / "tokenizer.json"))
    template = load_template(chat_tok)

    def text(ids: np.ndarray) -> str:
        return str(tok.decode(ids.tolist(), skip_special_tokens=False))

    for i, row in enumerate(rows):
        for doc, key in ((2 * i, "chosen"), (2 * i + 1, "rejected")):
            if shape == "conversational":
                messages, answer = row["prompt"] + row[key], row[key][-1]["content"]
            else:
                messages = [
                    {"role": "user", "content": row["prompt"]},
                    {"role": "assistant", "content": row[key]},
                ]
                answer = row[key]
            assert text(tokens[doc]) == template.render(messages, False)
            learned = [text(r) for r, m in runs(tokens[doc], mask[doc]) if m]
            assert learned == [answer + IM_END + "\n"]  # earlier answers in the prompt are not
        # both documents start with the same prompt tokens, which are never learned
        first = int(np.argmax(mask[2 * i]))
        assert first == int(np.argmax(mask[2 * i + 1])) > 0
        assert (tokens[2 * i][:first] == tokens[2 * i + 1][:first]).all()


@pytest.mark.parametrize("tok", ["byte", "plain"])
def test_without_a_chat_template_standard_pairs_are_plain_text_ending_with_eod(
    tmp_path: Path, tok: str
) -> None:
    rows = ROWS["standard"][:7]
    directory: str | Path = "byte"
    if tok == "plain":
        directory = tmp_path / "plain-tokenizer"
        build_bpe(directory)  # no chat template
    tokenizer = ByteTokenizer() if tok == "byte" else HuggingFaceTokenizer(Path(directory))
    prefix = prepared(tmp_path, directory, rows, "--workers", "1")
    tokens, mask = IndexedDataset(str(prefix)), IndexedDataset(f"{prefix}.loss_mask")
    assert tokenizer.eod is not None
    for i, row in enumerate(rows):
        prompt = tokenizer.tokenize_plain([row["prompt"]])[0]
        for doc, key in ((2 * i, "chosen"), (2 * i + 1, "rejected")):
            response = [*tokenizer.tokenize_plain([row[key]])[0], tokenizer.eod]
            assert tokens[doc].tolist() == prompt + response
            assert mask[doc].tolist() == [0] * len(prompt) + [1] * len(response)


def test_parquet_rows_of_both_shapes_give_what_jsonl_gives(chat_tok: Path, tmp_path: Path) -> None:
    for shape, rows in ROWS.items():
        src = tmp_path / f"{shape}.parquet"
        pq.write_table(pa.Table.from_pylist(rows), src, row_group_size=4)
        prefix = tmp_path / "out" / f"{shape}-parquet"
        args = [str(src), "--output-prefix", str(prefix), "--tokenizer", str(chat_tok)]
        assert prep.main([*args, "--preference", "--chunk-size", "3", "--workers", "1"]) == 0
        reference = prepared(tmp_path, chat_tok, rows, "--workers", "1", name=shape)
        for suffix in ("", ".loss_mask"):
            got, want = IndexedDataset(f"{prefix}{suffix}"), IndexedDataset(f"{reference}{suffix}")
            assert len(got) == len(want) == 2 * len(rows)
            assert all((got[d] == want[d]).all() for d in range(len(got)))


def chosen_mixed(row: dict[str, Any]) -> dict[str, Any]:
    return {**row, "chosen": [{"role": "assistant", "content": row["chosen"]}]}


@pytest.mark.parametrize(
    ("line", "row", "extra", "message"),
    [
        (4, {"prompt": "q", "chosen": "a"}, [], "{src}:4: no 'rejected' (fields: prompt, chosen); "
         "a preference row holds prompt, chosen and rejected"),
        (2, {"prompt": "q", "chosen": "  ", "rejected": "b"}, [], "{src}:2: 'chosen' is empty"),
        (6, {"prompt": "q", "chosen": "a", "rejected": "a"}, [],
         "{src}:6: chosen and rejected render identically"),
        (3, chosen_mixed(ROWS["standard"][2]), [],
         "{src}:3: 'chosen' is of type list, not a string as 'prompt' is"),
        (5, {**ROWS["conversational"][4], "rejected": [{"role": "user", "content": "x"}]}, [],
         "{src}:5: rejected[0].role is 'user'; a response is the assistant's"),
        (5, {**ROWS["conversational"][4], "chosen": []}, [],
         "{src}:5: 'chosen' must be a non-empty list of messages"),
        (7, {"prompt": 3, "chosen": "a", "rejected": "b"}, [], "{src}:7: 'prompt' is of type int"),
        (2, ROWS["conversational"][1], ["--tokenizer", "byte"],
         "{src}:2: conversational rows (lists of messages) need a chat template"),
        (1, ROWS["standard"][0], ["--append-eod"], "--append-eod does not go with --preference"),
    ],
)  # fmt: skip
def test_bad_rows_are_named_by_file_and_line_and_leave_nothing(
    chat_tok: Path,
    tmp_path: Path,
    line: int,
    row: dict[str, Any],
    extra: list[str],
    message: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    src = write_jsonl(tmp_path / "pairs.jsonl", ROWS["standard"][:8], {line: json.dumps(row)})
    out = tmp_path / "out" / "p"
    args = [str(src), "--output-prefix", str(out), "--tokenizer", str(chat_tok), "--preference"]
    assert prep.main([*args, "--chunk-size", "3", "--workers", "1", *extra]) == 2
    assert message.format(src=src) in capsys.readouterr().err
    assert not out.parent.exists() or list(out.parent.iterdir()) == []


def test_parquet_without_a_column_and_text_input_are_refused(
    chat_tok: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "pairs.parquet"
    pq.write_table(pa.table({"prompt": ["q"], "chosen": ["a"]}), src)
    text = tmp_path / "pairs.txt"
    text.write_text("some text\n")
    for path, message in (
        (src, f"{src}: no column 'rejected' (columns: prompt, chosen); a preference row holds"),
        (text, f"{text}: --preference reads pairs from .jsonl, .jsonl.gz or .parquet"),
    ):
        args = [str(path), "--output-prefix", str(tmp_path / "out" / "p"), "--preference"]
        assert prep.main([*args, "--tokenizer", str(chat_tok)]) == 2
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        prep.parse_args([str(src), "--output-prefix", "p", "--chat", "--preference"])


def test_a_dataset_written_over_preference_data_drops_its_marker(tmp_path: Path) -> None:
    prefix = prepared(tmp_path, "byte", ROWS["standard"][:4])
    src = tmp_path / "text.txt"
    src.write_text("one paragraph\n\nanother one\n")
    args = [str(src), "--output-prefix", str(prefix), "--overwrite", "--workers", "1"]
    assert prep.main(args) == 0
    assert not Path(f"{prefix}.pairs.json").exists()


# --------------------------------------------------------------------------- the reader


def dataset(prefix: Path, seq: int, **kw: Any) -> PreferenceDataset:
    args: dict[str, Any] = {"num_samples": 30, "seed": 3, "split": "1,0,0", "pad": 7} | kw
    return PreferenceDataset(str(prefix), seq_length=seq, **args)


def test_samples_are_the_pairs_gpt_rows_padded_and_seeded(chat_tok: Path, tmp_path: Path) -> None:
    rows = ROWS["conversational"]
    prefix = prepared(tmp_path, chat_tok, rows)
    tokens, mask = IndexedDataset(str(prefix)), IndexedDataset(f"{prefix}.loss_mask")
    seq = 160
    assert max(len(tokens[d]) for d in range(len(tokens))) <= seq  # nothing cut here
    data = dataset(prefix, seq)
    assert len(data) == 2 * len(rows) >= 30  # whole epochs, each pair once per epoch
    assert sorted(data.order[: len(rows)].tolist()) == list(range(len(rows)))
    assert sorted(data.order[len(rows) :].tolist()) == list(range(len(rows)))
    again, other = dataset(prefix, seq), dataset(prefix, seq, seed=4)
    assert (data.order == again.order).all() and not (data.order == other.order).all()
    for i in range(len(rows)):
        item, pair = data[i], int(data.order[i])
        assert set(item) == {"tokens", "labels", "loss_mask", "position_ids"}
        assert all(v.shape == (2, seq) for v in item.values())
        assert item["tokens"].dtype == torch.int64 and item["loss_mask"].dtype == torch.float32
        assert torch.equal(item["tokens"], again[i]["tokens"])
        for row in (0, 1):  # chosen, rejected
            doc, learned = tokens[2 * pair + row], mask[2 * pair + row]
            n = len(doc)
            assert item["tokens"][row, :n].tolist() == doc.tolist()
            assert item["labels"][row, : n - 1].tolist() == doc[1:].tolist()
            assert item["loss_mask"][row, : n - 1].tolist() == learned[1:].tolist()
            assert (item["tokens"][row, n:] == 7).all() and (
                item["labels"][row, n - 1 :] == 7
            ).all()
            assert item["loss_mask"][row, n - 1 :].sum() == 0
            assert item["position_ids"][row].tolist() == list(range(seq))
    half = dataset(prefix, seq, split="1,1,0")
    assert set(half.order.tolist()) == set(range(len(rows) // 2))  # the first half of the pairs


def test_long_pairs_are_cut_on_the_right(chat_tok: Path, tmp_path: Path) -> None:
    prefix = prepared(tmp_path, chat_tok, ROWS["conversational"])
    tokens, mask = IndexedDataset(str(prefix)), IndexedDataset(f"{prefix}.loss_mask")
    seq = 12  # shorter than every prompt: the responses are cut away
    data = dataset(prefix, seq)
    for i in range(5):
        item, pair = data[i], int(data.order[i])
        for row in (0, 1):
            doc = tokens[2 * pair + row]
            assert item["tokens"][row].tolist() == doc[:seq].tolist()
            assert item["labels"][row].tolist() == doc[1 : seq + 1].tolist()
            assert item["loss_mask"][row].tolist() == mask[2 * pair + row][1 : seq + 1].tolist()
        assert item["loss_mask"].sum() == 0  # kept, and learns nothing


def config(
    prefix: Path | str, tok: Path, data_type: str = "preference", kind: str = "dpo"
) -> TrainerConfig:
    return TrainerConfig.model_validate(
        {
            "model": PRESETS["gpt-tiny"].model_dump(by_alias=True),
            "preset": "gpt-tiny",
            "recipe": {"kind": kind, "globalBatchSize": 4, "microBatchSize": 2, "seqLength": 64},
            "data": {
                "type": data_type,
                "paths": [{"prefix": str(prefix)}] if data_type != "mock" else [],
                "split": "1,0,0",
                "tokenizer": {"type": "huggingface", "name": str(tok)},
            },
            "metrics": {"enabled": False},
        }
    )


def test_data_that_is_not_pairs_is_refused(chat_tok: Path, tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "chat.jsonl", [{"messages": c} for c in conversations(5)])
    chat = tmp_path / "out" / "chat"
    args = [str(src), "--output-prefix", str(chat), "--tokenizer", str(chat_tok), "--chat"]
    assert prep.main([*args, "--workers", "1"]) == 0
    refusal = re.escape("not preference data: prepare it with kubetron-prepare-data --preference")
    for check in (lambda: dataset(chat, 64), lambda: check_indexed_data(config(chat, chat_tok))):
        with pytest.raises(ConfigError, match=refusal) as err:
            check()
        assert err.value.field == "data.paths[0].prefix"
    marker = Path(f"{chat}.pairs.json")
    marker.write_text(json.dumps({"format": "kubetron-preference", "version": 1, "pairs": 2}))
    check_indexed_data(config(chat, chat_tok))  # the files are there ...
    with pytest.raises(ConfigError, match=r"holds 5 documents where .* counts 2 pairs") as err:
        dataset(chat, 64)  # ... but 5 documents are no pairs
    assert err.value.field == "data.paths[0].prefix" and refusal.replace("\\", "") in str(err.value)
    marker.write_text(json.dumps({"format": "kubetron-preference", "version": 2, "pairs": 2}))
    with pytest.raises(
        ConfigError, match="is version 2 with 2 pairs; this trainer reads version 1"
    ):
        check_indexed_data(config(chat, chat_tok))
    with pytest.raises(ConfigError, match=r"data\.split"):
        dataset(prepared(tmp_path, chat_tok, ROWS["standard"][:3]), 64, split="0,1,0")


# --------------------------------------------------------------------------- mock pairs, batches


def test_mock_pairs_share_the_prompt_and_differ_in_the_continuation() -> None:
    seq = 16
    pairs, plain = MockPreferenceDataset(512, seq, 50, seed=7), MockDataset(512, seq, 50, seed=7)
    item = pairs[3]
    assert all(v.shape == (2, seq) for v in item.values())
    assert torch.equal(item["tokens"], MockPreferenceDataset(512, seq, 50, seed=7)[3]["tokens"])
    assert torch.equal(item["tokens"][0], plain[3]["tokens"])  # chosen: the learnable rule
    assert torch.equal(item["labels"][0], plain[3]["labels"])
    prompt = (seq + 1) // 2
    assert torch.equal(item["tokens"][1, :prompt], item["tokens"][0, :prompt])
    assert not torch.equal(item["labels"][1, prompt:], item["labels"][0, prompt:])
    assert torch.equal(item["tokens"][1, 1:], item["labels"][1, :-1])
    assert int(item["tokens"].max()) < 512
    learned = (torch.arange(seq) + 1 >= prompt).float()  # the label is a continuation token
    assert torch.equal(item["loss_mask"], learned.expand(2, seq))


def test_a_micro_batch_of_pairs_is_the_chosen_rows_then_the_rejected() -> None:
    source = MockPreferenceDataset(512, 16, 64, seed=1)
    batches = Batches(
        source, global_batch=8, micro_batch=2, dp_rank=1, dp_size=2, device=torch.device("cpu")
    )
    micro = batches.step(1)
    assert len(micro) == 2
    for m, batch in enumerate(micro):
        assert batch is not None
        indices = batches.indices(1, m)
        assert batch.index is not None and batch.index.tolist() == indices
        assert batch.index.dtype == torch.long
        for key in ("tokens", "labels", "loss_mask", "position_ids"):
            rows = getattr(batch, key)
            assert rows.shape == (4, 16)
            want = [source[i][key][0] for i in indices] + [source[i][key][1] for i in indices]
            assert torch.equal(rows, torch.stack(want))
        assert batch.attention_mask is None
    plain = Batches(
        MockDataset(512, 16, 64, seed=1), global_batch=8, micro_batch=2, dp_rank=0, dp_size=2,
        device=torch.device("cpu"),
    ).step(0)[0]  # fmt: skip
    assert plain is not None and plain.index is None and plain.tokens.shape == (2, 16)


def test_dpo_jobs_read_pairs(chat_tok: Path, tmp_path: Path) -> None:
    prefix = prepared(tmp_path, chat_tok, ROWS["standard"])
    cpu = torch.device("cpu")
    for data_type, kind in (("mock", MockPreferenceDataset), ("preference", PreferenceDataset)):
        cfg = config(prefix, chat_tok, data_type)
        batches = build_batches(cfg, reads_data=True, dp_rank=0, dp_size=1, device=cpu)
        assert isinstance(batches.source, kind)
        batch = batches.step(0)[0]
        assert batch is not None and batch.tokens.shape == (4, 64)  # 2 pairs a micro-batch
        assert batch.index is not None and batch.index.tolist() == [0, 1]
    pretrain = config(prefix, chat_tok, "mock", kind="pretrain")
    plain = build_batches(pretrain, reads_data=True, dp_rank=0, dp_size=1, device=cpu)
    assert type(plain.source) is MockDataset
