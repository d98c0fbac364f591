"""Generated text and a small Hugging Face tokenizer trained on it, for the tokenizer, data
preparation and training tests (nothing downloaded).

`build_bpe` trains a byte-level BPE with the `tokenizers` library and saves it in the layout
`save_pretrained` gives a fast tokenizer: `tokenizer.json`, `tokenizer_config.json` and
`special_tokens_map.json`.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOS, PAD = "<|endoftext|>", "<|pad|>"
NOUNS = ["cluster", "operator", "trainer", "pod", "node", "model", "gradient", "batch"]
VERBS = ["schedules", "restarts", "watches", "shards", "saves", "reads", "scales"]
ADJECTIVES = ["small", "busy", "quiet", "elastic", "patient", "careful", "fast"]


def sentence(rng: random.Random) -> str:
    pick = rng.choice
    return (
        f"The {pick(ADJECTIVES)} {pick(NOUNS)} {pick(VERBS)} the {pick(ADJECTIVES)} {pick(NOUNS)}."
    )


def documents(count: int, seed: int = 0) -> list[str]:
    """`count` documents of 1-8 sentences, some with non-ASCII text."""
    rng = random.Random(seed)
    docs = [" ".join(sentence(rng) for _ in range(rng.randint(1, 8))) for _ in range(count)]
    return [d + " Größe ✓" if i % 7 == 3 else d for i, d in enumerate(docs)]


def paragraphs(count: int, seed: int = 0) -> str:
    """`count` paragraphs of six sentences, separated by blank lines (the byte tokenizer's
    text input)."""
    rng = random.Random(seed)
    return "\n\n".join(" ".join(sentence(rng) for _ in range(6)) for _ in range(count))


def build_bpe(
    directory: Path,
    *,
    vocab_size: int = 400,
    eos: str | None = EOS,
    pad: str | None = PAD,
    texts: list[str] | None = None,
) -> Tokenizer:
    """Train a byte-level BPE on generated text and save it in the Hugging Face layout; `eos`
    and `pad` None leave that special token out of the config files."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts or documents(500, seed=99), trainer)
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    config: dict[str, object] = {"tokenizer_class": "PreTrainedTokenizerFast"}
    specials: dict[str, object] = {}
    if eos is not None:
        config["eos_token"] = eos
        specials["eos_token"] = {"content": eos, "lstrip": False, "rstrip": False}
    if pad is not None:
        config["pad_token"] = pad
        specials["pad_token"] = {"content": pad, "lstrip": False, "rstrip": False}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    (directory / "special_tokens_map.json").write_text(json.dumps(specials))
    return tok


# ChatML, as Qwen's templates write it; every turn ends with <|im_end|> and a newline.
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + "
    "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
QUESTIONS = ["Which {n} {v} the {a} {n2}?", "Does the {n} {v} the {n2}?", "Name the {a} {n}."]


def conversation(rng: random.Random, turns: int) -> list[dict[str, str]]:
    """A system prompt, then `turns` user questions each answered by the assistant; the
    answer repeats the question's nouns (learnable)."""
    pick = rng.choice
    messages = [{"role": "system", "content": "You answer in one sentence."}]
    for _ in range(turns):
        n, n2, v, a = pick(NOUNS), pick(NOUNS), pick(VERBS), pick(ADJECTIVES)
        question = pick(QUESTIONS).format(n=n, n2=n2, v=v, a=a)
        messages.append({"role": "user", "content": question})
        messages.append({"role": "assistant", "content": f"The {a} {n} {v} the {n2}."})
    return messages


def conversations(count: int, seed: int = 0, max_turns: int = 3) -> list[list[dict[str, str]]]:
    rng = random.Random(seed)
    return [conversation(rng, rng.randint(1, max_turns)) for _ in range(count)]


def build_chat_bpe(
    directory: Path, *, vocab_size: int = 400, template: str | None = CHATML
) -> None:
    """`build_bpe` with ChatML's special tokens and (unless None) its chat template in
    tokenizer_config.json, as a chat model's tokenizer is saved."""
    texts = documents(300, seed=98) + [
        " ".join(m["content"] for m in c) for c in conversations(200, seed=97)
    ]
    tok = build_bpe(directory, vocab_size=vocab_size, texts=texts)
    tok.add_special_tokens([IM_START, IM_END])
    tok.save(str(directory / "tokenizer.json"))
    config = json.loads((directory / "tokenizer_config.json").read_text())
    if template is not None:
        config["chat_template"] = template
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
