"""The base of every schema model, apart so that sections kept in their own modules
(`kubetron_api.observability`) and `kubetron_api.config` share it without importing each other.

The base also makes the models read a value as the Kubernetes API server reads it against the
CRD generated from them, so that `kubetron validate` accepts exactly what `kubectl apply` does:

- JSON types are strict: an integer field takes a 64-bit integer, never the string "4", a
  boolean or 2.5; a boolean field takes true or false only; a string field only a string; a
  number field any finite number. Plain pydantic would coerce "4", true and "yes" where the API
  server refuses them. A number with no fraction (2.0) is an integer, as `kubectl apply` sends
  it (kubectl writes it as 2; the API server itself would take 2.0 only where no CEL rule reads
  the field).
- null is an absent field: the API server drops a null it finds for a field of the schema (none
  is nullable) and then fills the default, so `trainIters: null` runs 100 steps. The same holds
  for a null value in a map of strings or integers (podLabels). A null in a list, or for a field
  the schema does not have, is refused, as there.
"""

from __future__ import annotations

import functools
import math
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, get_args, get_origin

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator, model_validator
from pydantic.alias_generators import to_camel
from pydantic_core import PydanticCustomError

JsonType = Literal["integer", "number", "boolean", "string", "array", "object"]

# The API server's integers are 64-bit.
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1

_ARTICLE = {"integer": "an integer", "array": "a list", "object": "an object (a mapping)"}


def json_type(annotation: Any) -> JsonType | None:
    """The JSON type the CRD gives a field of this annotation; None where any value goes."""
    origin = get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in get_args(annotation) if a is not type(None)]
        return json_type(options[0]) if len(options) == 1 else None
    if origin is typing.Annotated:
        return json_type(get_args(annotation)[0])
    if origin is Literal:
        return "string" if all(isinstance(v, str) for v in get_args(annotation)) else None
    if origin in (list, tuple):
        return "array"
    if origin is dict:
        return "object"
    if not isinstance(annotation, type):
        return None
    if annotation is bool:
        return "boolean"
    if annotation is int:
        return "integer"
    if annotation is float:
        return "number"
    if issubclass(annotation, str):  # StrEnum too
        return "string"
    if issubclass(annotation, (dict, BaseModel)):
        return "object"
    return "array" if issubclass(annotation, list) else None


@functools.cache
def field_json_type(model: type[BaseModel], name: str) -> JsonType | None:
    """The JSON type of a model's field (read once per field: every object validated asks)."""
    return json_type(model.model_fields[name].annotation)


@functools.cache
def _aliases(model: type[BaseModel]) -> frozenset[str]:
    """The (camelCase) keys of a model's fields."""
    return frozenset(f.alias or name for name, f in model.model_fields.items())


def _shown(value: Any) -> str:
    """A value as a user reads it in the YAML they wrote."""
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, str):
        return f"the string {value!r}"
    if isinstance(value, int | float):
        return f"the number {value}"
    if isinstance(value, list | tuple):
        return "a list"
    if isinstance(value, Mapping | BaseModel):
        return "an object (a mapping)"
    return type(value).__name__


def _unquoted_hint(text: str, expected: JsonType) -> str:
    """`(write 4 without quotes)` when a quoted string reads as the expected scalar."""
    word = text.strip()
    if expected == "boolean" and word in ("true", "false"):
        return f" (write {word} without quotes)"
    try:
        number = int(word) if expected == "integer" else float(word)
    except ValueError:
        return ""
    return f" (write {number} without quotes)" if expected in ("integer", "number") else ""


def type_problem(expected: JsonType, value: Any) -> str | None:
    """Why the API server refuses `value` for a field of JSON type `expected`; None if it takes
    it. The message says what is expected and what was written."""
    if expected == "integer":
        ok = isinstance(value, int) and not isinstance(value, bool)
        if ok and not INT64_MIN <= value <= INT64_MAX:
            return f"expected a 64-bit integer, got {value}, out of its range"
        whole = isinstance(value, float) and value.is_integer()
        ok = ok or (whole and INT64_MIN <= value <= INT64_MAX)
    elif expected == "number":
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        if ok and not math.isfinite(value):
            return f"expected a finite number, got {value}"
    elif expected == "boolean":
        ok = isinstance(value, bool)
    elif expected == "string":
        ok = isinstance(value, str)
    elif expected == "array":
        ok = isinstance(value, list | tuple)
    else:
        ok = isinstance(value, Mapping | BaseModel)
    if ok:
        return None
    hint = _unquoted_hint(value, expected) if isinstance(value, str) else ""
    if expected == "string" and isinstance(value, int | float) and not isinstance(value, bool):
        hint = f" (quote it: '{value}')"
    return f"expected {_ARTICLE.get(expected, 'a ' + expected)}, got {_shown(value)}{hint}"


def _without_null_values(value: Any, annotation: Any) -> Any:
    """A map of strings or integers without its null values (the API server drops them); a
    free-form object (any values) keeps them, as there."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        return _without_null_values(value, options[0]) if len(options) == 1 else value
    if origin is dict and isinstance(value, Mapping) and json_type(args[1]) is not None:
        return {k: v for k, v in value.items() if v is not None}
    return value


class ApiModel(BaseModel):
    """Base of every schema model: camelCase aliases, unknown fields rejected, values read as the
    API server reads them (see the module docstring)."""

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True
    )

    @model_validator(mode="before")
    @classmethod
    def _null_is_absent(cls, data: Any) -> Any:
        # Only a field's own (camelCase) key: a null under an unknown key is still refused.
        if not isinstance(data, Mapping):
            return data
        aliases = _aliases(cls)
        return {k: v for k, v in data.items() if v is not None or k not in aliases}

    @field_validator("*", mode="before")
    @classmethod
    def _json_type(cls, value: Any, info: ValidationInfo) -> Any:
        if value is None or info.field_name is None:
            return value  # None for an optional field, given by name from Python
        expected = field_json_type(cls, info.field_name)
        if expected is not None and (problem := type_problem(expected, value)):
            raise PydanticCustomError("json_type", problem)
        if expected != "object" or not isinstance(value, Mapping):
            return value
        return _without_null_values(value, cls.model_fields[info.field_name].annotation)
