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
