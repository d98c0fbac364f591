"""The README's generated reference matches the models (run `kubetron docs` to refresh it)."""

from __future__ import annotations

from pathlib import Path

from kubetron_operator.cli.docs import BEGIN, END, generated_block

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_reference_matches_models() -> None:
    text = README.read_text()
    start, stop = text.index(BEGIN), text.index(END) + len(END)
    assert text[start:stop] == generated_block(), (
        "README's configuration reference is stale: replace the generated block with "
        "`.venv/bin/kubetron docs`"
    )


def test_readme_opens_with_the_two_commands() -> None:
    head = README.read_text().splitlines()[:6]
    assert any(line.startswith("make demo") for line in head)
    assert any(line.startswith("make test") for line in head)
