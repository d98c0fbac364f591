"""Chat conversations as training sequences: the tokenizer's chat template, assistant-only loss.

A conversation is a list of messages (`{"role": ..., "content": ...}`, roles `system`, `user`,
`assistant`, `tool`). It is rendered with the tokenizer's chat template (Jinja, rendered as
`transformers` renders it: a sandboxed environment, `trim_blocks`, `lstrip_blocks`, the
`loopcontrols` extension, `tojson`, `raise_exception`; with `messages`, `add_generation_prompt`
and the special tokens `bos_token`, `eos_token`, `pad_token` as variables).

Which tokens the model learns: those an assistant writes. For the assistant message at index
`i`, its span of the rendered text starts where `render(messages[:i], add_generation_prompt=True)`
ends (the prompt the model would be given at inference) and ends where `render(messages[:i+1])`
ends (so the end-of-turn marker the template writes after the message is learned too: the model
must learn to stop). The text is cut at these boundaries and each piece is tokenized on its own,
without the tokenizer's post-processor (templates write their own BOS), so the prompt tokens are
exactly the ones an inference server feeds the model. A template that renders earlier turns
differently once later turns follow (Qwen3's drops the reasoning of earlier assistant turns) has
no such spans; such a conversation is refused, naming the fix (`--chat-template`).

The chat template comes from `chat_template.jinja` in the tokenizer directory, else from
`chat_template` in `tokenizer_config.json` (a string, or a list of named templates: `default`).
This module imports no torch.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kubetron_trainer.data.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant", "tool")
TEMPLATE_FILE = "chat_template.jinja"
# PREFIX.loss_mask.bin/.idx: a chat dataset's per-token loss mask (written by prepare, read by
# the trainer's packing)
LOSS_MASK = ".loss_mask"
CONFIG_FILE = "tokenizer_config.json"


class ChatError(ValueError):
    """A conversation or chat template that cannot become a training sequence; says why."""


@dataclass(frozen=True)
class Template:
    """A compiled chat template and the special tokens it may read."""

    source: str  # where it came from, for messages
    render_fn: Callable[..., str]
    special: dict[str, str]

    def render(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool) -> str:
        try:
            return self.render_fn(
                messages=list(messages), add_generation_prompt=add_generation_prompt,
                **self.special,
            )  # fmt: skip
        except Exception as err:  # a template's raise_exception or a Jinja error
            raise ChatError(f"the chat template ({self.source}) failed: {err}") from None


def compile_template(text: str, source: str, special: dict[str, str] | None = None) -> Template:
    """Compile `text` (Jinja) the way transformers does."""
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise ChatError(message)

    def tojson(value: Any, indent: int | None = None, **kw: Any) -> str:
        return json.dumps(value, ensure_ascii=False, indent=indent, **kw)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        compiled = env.from_string(text)
    except TemplateError as err:
        raise ChatError(f"the chat template ({source}) is not valid Jinja: {err}") from None
    return Template(source, compiled.render, dict(special or {}))


def load_template(directory: Path, override: Path | None = None) -> Template:
    """The chat template of a tokenizer directory (or the file `override`), with the special
    tokens of its tokenizer_config.json."""
    template = find_template(directory, override)
    if template is None:
        raise ChatError(
            f"{directory} has no chat template ({TEMPLATE_FILE}, or chat_template in "
            f"{CONFIG_FILE}); use the tokenizer of a chat model or pass --chat-template FILE"
        )
    return template


def find_template(directory: Path, override: Path | None = None) -> Template | None:
    """`load_template`, or None when the directory has no chat template and there is no
    `override` (preference data is then plain text)."""
    config: dict[str, Any] = {}
    config_path = directory / CONFIG_FILE
    if config_path.is_file():
        try:
            loaded = json.loads(config_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ChatError(f"{config_path} is not valid JSON: {err}") from None
        config = loaded if isinstance(loaded, dict) else {}
    special = {
        key: text
        for key in ("bos_token", "eos_token", "pad_token", "unk_token")
        if (text := _token(config.get(key))) is not None
    }
    if override is not None:
        if not override.is_file():
            raise ChatError(f"--chat-template {override}: no such file")
        return compile_template(override.read_text(encoding="utf-8"), str(override), special)
    if (directory / TEMPLATE_FILE).is_file():
        path = directory / TEMPLATE_FILE
        return compile_template(path.read_text(encoding="utf-8"), str(path), special)
    text = config.get("chat_template")
    if isinstance(text, list):  # named templates
        named = {t.get("name"): t.get("template") for t in text if isinstance(t, dict)}
        text = named.get("default")
    if not isinstance(text, str) or not text:
        return None
    return compile_template(text, f"{config_path} chat_template", special)


def _token(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return str(value["content"])
    return None


def check_messages(record: Any, key: str) -> list[dict[str, Any]]:
    """The conversation of one JSON record, or ChatError saying what is wrong with it."""
    if not isinstance(record, dict):
        raise ChatError(f"not a JSON object but a {type(record).__name__}")
    if key not in record:
        fields = ", ".join(map(str, record)) or "none"
        raise ChatError(f"no {key!r} field (fields: {fields}); name it with --messages-key")
    messages = message_list(record[key], key)
    if not any(m["role"] == "assistant" for m in messages):
        raise ChatError(f"{key!r} has no assistant message: nothing to learn from")
    return messages


def message_list(messages: Any, key: str) -> list[dict[str, Any]]:
    """`messages` (the value of field `key`) as a non-empty list of `{"role", "content"}`, or
    ChatError naming the message that is not one."""
    if not isinstance(messages, list) or not messages:
        raise ChatError(f"{key!r} must be a non-empty list of messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ChatError(f"{key}[{i}] is not an object with role and content")
        role = message.get("role")
        if role not in ROLES:
            raise ChatError(f"{key}[{i}].role is {role!r}; use one of {', '.join(ROLES)}")
        if not isinstance(message.get("content"), str):
            raise ChatError(f"{key}[{i}].content must be a string")
    return messages


def segments(
    template: Template, messages: Sequence[dict[str, Any]], first: int = 0
) -> list[tuple[str, bool]]:
    """The rendered conversation cut into (text, learned) pieces, in order; joined, they are the
    whole rendering. Learned: the assistant messages from index `first` on (a preference pair's
    response; the assistant turns of its prompt are context)."""
    full = template.render(messages, add_generation_prompt=False)
    cuts: list[tuple[int, int]] = []
    for i, message in enumerate(messages):
        if i < first or message["role"] != "assistant":
            continue
        prompt = template.render(messages[:i], add_generation_prompt=True)
        turn = template.render(messages[: i + 1], add_generation_prompt=False)
        start, end = len(prompt), len(turn)
        if not (full.startswith(prompt) and full.startswith(turn) and start < end):
            raise ChatError(
                f"the chat template ({template.source}) renders the conversation up to message "
                f"{i} differently from the whole conversation, so the assistant's tokens cannot "
                "be told apart; pass --chat-template FILE with a template that renders earlier "
                "turns the same whatever follows"
            )
        if cuts and start < cuts[-1][1]:
            raise ChatError(
                f"the chat template ({template.source}) renders assistant message {i} over the "
                "previous one; pass --chat-template FILE"
            )
        cuts.append((start, end))
    pieces: list[tuple[str, bool]] = []
    position = 0
    for start, end in cuts:
        if start > position:
            pieces.append((full[position:start], False))
        pieces.append((full[start:end], True))
        position = end
    if position < len(full):
        pieces.append((full[position:], False))
    return pieces


def tokenize_segments(
    tokenizer: Tokenizer, pieces: Sequence[tuple[str, bool]]
) -> tuple[list[int], list[int]]:
    """`segments`' pieces tokenized one by one, without the tokenizer's post-processor (the
    template writes its own special tokens): the token ids, and 1 where a token is learned."""
    ids: list[int] = []
    learned: list[int] = []
    for piece, (_, learn) in zip(
        tokenizer.tokenize_plain([text for text, _ in pieces]), pieces, strict=True
    ):
        ids += piece
        learned += [int(learn)] * len(piece)
    return ids, learned
