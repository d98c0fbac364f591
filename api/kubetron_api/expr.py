"""A small expression language that is both a Python check and a Kubernetes CEL rule.

A shape rule is written once, as an expression over named values (`gpusPerNode % tensor == 0`)
and a message template (`... tensor={tensor} ...`). `evaluate` runs it in Python (a whitelisted
walk of Python's own parse tree, no `eval`), `to_cel` turns it into the CRD's CEL by replacing
each name with its path under `self` (the MegatronJob spec).

Grammar, the common part of CEL and Python: integers, 'single-quoted strings', true/false, names,
`size(x)`, `+ - * / %` (integer division on both sides), comparisons, `&&`, `||`, `!`, parentheses.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Mapping
from dataclasses import dataclass

Value = int | bool | str | list[str]

_TOKEN = re.compile(
    r"\s*(?:(?P<num>\d+)|(?P<str>'[^'\\]*')|(?P<name>[A-Za-z_]\w*)"
    r"|(?P<op>&&|\|\||==|!=|<=|>=|[-+*/%()<>!]))"
)
_FUNCTIONS = {"size": "len"}
_LITERALS = {"true": "True", "false": "False"}
_PLACEHOLDER = re.compile(r"\{([^{}]+)\}")
_PLACEHOLDER_WITH_EQ = re.compile(r"=\{[^{}]+\}")
_BARE_PLACEHOLDER = re.compile(r"(?<!=)\{[^{}]+\}")


class ExprError(ValueError):
    """An expression outside the grammar, or a name without a value."""


@dataclass(frozen=True)
class Rule:
    """One rule: `expr` must hold; else `message` (with {expression} placeholders) is the error.

    `field` is the spec field the message is about (the CRD's fieldPath); `crd` False keeps a
    rule out of the CRD when the schema already says it (a `minimum`).
    """

    name: str
    field: str
    expr: str
    message: str
    crd: bool = True

    def placeholders(self) -> list[str]:
        return _PLACEHOLDER.findall(self.message)


def tokens(text: str) -> list[tuple[str, str]]:
    """(kind, token) pairs: kind is num, str, name or op."""
    out: list[tuple[str, str]] = []
    pos = 0
    text = text.rstrip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            raise ExprError(f"cannot read {text[pos:]!r} in {text!r}")
        kind = m.lastgroup
        assert kind is not None
        out.append((kind, m.group(kind)))
        pos = m.end()
    return out


def names(text: str) -> set[str]:
    """The value names an expression reads (not functions or true/false)."""
    return {
        tok
        for kind, tok in tokens(text)
        if kind == "name" and tok not in _FUNCTIONS and tok not in _LITERALS
    }


def to_python(text: str) -> str:
    out = []
    for kind, tok in tokens(text):
        if kind == "op":
            tok = {"&&": "and", "||": "or", "!": "not", "/": "//"}.get(tok, tok)
        elif kind == "name":
            tok = _FUNCTIONS.get(tok, _LITERALS.get(tok, tok))
        out.append(tok)
    return " ".join(out)


def to_cel(text: str, paths: Mapping[str, str]) -> str:
    """The CEL form: each name replaced by its CEL path (a KeyError names one without)."""
    out = ""
    previous = ""
    for kind, tok in tokens(text):
        if kind == "name" and tok not in _FUNCTIONS and tok not in _LITERALS:
            tok = paths[tok]
        glued = previous in ("(", "!", "size") or tok == ")" or (tok == "(" and previous == "size")
        out += tok if glued or not out else " " + tok
        previous = tok
    return out


def evaluate(text: str, values: Mapping[str, Value]) -> Value:
    """The expression's value for `values` (every name it reads must be there)."""
    try:
        tree = ast.parse(to_python(text), mode="eval")
    except SyntaxError as err:
        raise ExprError(f"{text!r} is outside the rule grammar: {err.msg}") from None
    return _eval(tree.body, values, text)


_BINARY = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.FloorDiv: lambda a, b: a // b,
    ast.Mod: lambda a, b: a % b,
}
_COMPARE = {
    ast.Eq: lambda a, b: a == b,
    ast.NotEq: lambda a, b: a != b,
    ast.Lt: lambda a, b: a < b,
    ast.LtE: lambda a, b: a <= b,
    ast.Gt: lambda a, b: a > b,
    ast.GtE: lambda a, b: a >= b,
}


def _eval(node: ast.expr, values: Mapping[str, Value], text: str) -> Value:
    match node:
        case ast.Constant(value=int() | str() as value):
            return value
        case ast.Name(id=name):
            if name not in values:
                raise ExprError(f"{text!r} reads {name}, which has no value here")
            return values[name]
        case ast.BoolOp(op=ast.And(), values=parts):
            return all(_eval(p, values, text) for p in parts)
        case ast.BoolOp(op=ast.Or(), values=parts):
            return any(_eval(p, values, text) for p in parts)
        case ast.UnaryOp(op=ast.Not(), operand=operand):
            return not _eval(operand, values, text)
        case ast.UnaryOp(op=ast.USub(), operand=operand):
            return -_int(_eval(operand, values, text), text)
        case ast.BinOp(left=left, op=op, right=right) if type(op) in _BINARY:
            a, b = _int(_eval(left, values, text), text), _int(_eval(right, values, text), text)
            return _BINARY[type(op)](a, b)
        case ast.Compare(left=left, ops=[op], comparators=[right]) if type(op) in _COMPARE:
            return _COMPARE[type(op)](_eval(left, values, text), _eval(right, values, text))
        case ast.Call(func=ast.Name(id="len"), args=[arg], keywords=[]):
            sized = _eval(arg, values, text)
            if not isinstance(sized, str | list):
                raise ExprError(f"size() of a {type(sized).__name__} in {text!r}")
            return len(sized)
    raise ExprError(f"{ast.unparse(node)!r} is outside the rule grammar (in {text!r})")


def _int(value: Value, text: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ExprError(f"arithmetic on {value!r} in {text!r}")
    return value


def expand(text: str, derived: Mapping[str, str]) -> str:
    """`text` with every derived name replaced by its parenthesized definition."""
    for _ in range(len(derived) + 1):
        parts = []
        for kind, tok in tokens(text):
            parts.append(f"({derived[tok]})" if kind == "name" and tok in derived else tok)
        expanded = " ".join(parts)
        if expanded == text or not names(expanded) & set(derived):
            return expanded
        text = expanded
    raise ExprError(f"derived values refer to each other in a cycle: {text}")


def expand_template(template: str, derived: Mapping[str, str]) -> str:
    return _PLACEHOLDER.sub(lambda m: "{" + expand(m.group(1), derived) + "}", template)


def broken(
    rules: tuple[Rule, ...], values: Mapping[str, Value], derived: Mapping[str, str]
) -> list[str]:
    """The message of every rule in `rules` that `values` break, in table order; one that does
    not start with a spec field is prefixed with the rule's (the API server shows fieldPath)."""
    out = []
    for rule in rules:
        if not evaluate(expand(rule.expr, derived), values):
            message = render(expand_template(rule.message, derived), values)
            out.append(message if message.startswith("spec.") else f"{rule.field}: {message}")
    return out


def render(template: str, values: Mapping[str, Value]) -> str:
    """The message with each {expression} replaced by its value."""
    return _PLACEHOLDER.sub(lambda m: _show(evaluate(m.group(1), values)), template)


def _show(value: Value) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def static_message(template: str) -> str:
    """The message without values, for the CRD: each `=` placeholder is dropped
    (`tensor={tensor} must divide` -> `tensor must divide`)."""
    if bare := [m.group(0) for m in _BARE_PLACEHOLDER.finditer(template)]:
        raise ExprError(f"placeholders {bare} in {template!r} must follow '=' (name={{value}})")
    return _PLACEHOLDER_WITH_EQ.sub("", template)
