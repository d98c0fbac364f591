"""The rule expression language: Python evaluation and CEL output of the same text."""

from __future__ import annotations

import pytest

from kubetron_api.expr import (
    ExprError,
    Rule,
    broken,
    evaluate,
    expand,
    names,
    render,
    static_message,
    to_cel,
)

PATHS = {"a": "self.x.a", "b": "self.x.b", "s": "self.s", "on": "self.on", "xs": "self.xs"}


@pytest.mark.parametrize(
    ("text", "values", "expected"),
    [
        ("a / b", {"a": 7, "b": 2}, 3),  # integer division, as CEL on ints
        ("a % b == 1", {"a": 7, "b": 2}, True),
        ("!on || a > 1", {"on": False, "a": 0}, True),  # ! binds to its operand
        ("!on || a > 1", {"on": True, "a": 0}, False),
        ("a == 1 && b == 2 || a == 3", {"a": 3, "b": 0}, True),
        ("s != 'cpu' || a == 1", {"s": "cpu", "a": 2}, False),
        ("size(xs) > 0", {"xs": []}, False),
        ("size(s) == 3", {"s": "abc"}, True),
        ("a - -b", {"a": 1, "b": 2}, 3),
        ("true && !false", {}, True),
    ],
)
def test_evaluate(text: str, values: dict[str, object], expected: object) -> None:
    assert evaluate(text, values) == expected  # type: ignore[arg-type]


def test_short_circuit_keeps_a_guarded_division_safe() -> None:
    assert evaluate("b == 0 || a / b > 1", {"a": 1, "b": 0}) is True


@pytest.mark.parametrize(
    "text", ["a ** 2", "a if b else 1", "__import__('os')", "a.b", "[a]", "a; b", "a = 1"]
)
def test_outside_the_grammar_is_refused(text: str) -> None:
    with pytest.raises(ExprError):
        evaluate(text, {"a": 1, "b": 1})


def test_a_name_without_a_value_is_named() -> None:
    with pytest.raises(ExprError, match="reads b"):
        evaluate("a + b", {"a": 1})


def test_arithmetic_on_a_bool_or_string_is_refused() -> None:
    with pytest.raises(ExprError):
        evaluate("on + 1", {"on": True})


def test_cel_form() -> None:
    assert to_cel("!on || (a + b) % 2 == 0", PATHS) == "!self.on || (self.x.a + self.x.b) % 2 == 0"
    assert to_cel("size(xs) > 0 && s != 'cpu'", PATHS) == "size(self.xs) > 0 && self.s != 'cpu'"
    assert names("size(xs) > 0 && !on && true") == {"xs", "on"}
    with pytest.raises(KeyError):
        to_cel("c > 1", PATHS)


def test_derived_values_expand_into_both_forms() -> None:
    derived = {"mp": "a * b", "dp": "64 / mp"}
    text = expand("dp > 1", derived)
    assert evaluate(text, {"a": 2, "b": 4}) is True
    assert to_cel(text, PATHS) == "(64 / (self.x.a * self.x.b)) > 1"
    with pytest.raises(ExprError, match="cycle"):
        expand("p", {"p": "q", "q": "p"})


def test_message_template_with_values_and_without() -> None:
    template = "a={a} must divide b*2={b * 2}; on={on}"
    assert render(template, {"a": 3, "b": 8, "on": True}) == "a=3 must divide b*2=16; on=true"
    assert static_message(template) == "a must divide b*2; on"
    with pytest.raises(ExprError, match="must follow '='"):
        static_message("a is {a}")


def test_broken_lists_messages_in_table_order_prefixed_with_the_field() -> None:
    rules = (
        Rule("one", "spec.x", "a > 1", "a={a} must exceed 1"),
        Rule("two", "spec.x.b", "b > 1", "spec.x.b={b} must exceed 1"),
        Rule("three", "spec.x", "a < 10", "never shown"),
    )
    assert broken(rules, {"a": 1, "b": 0}, {}) == [
        "spec.x: a=1 must exceed 1",
        "spec.x.b=0 must exceed 1",
    ]
