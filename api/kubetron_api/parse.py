"""Parse MegatronJob objects and turn pydantic errors into messages that name the field.

A user sees `spec.parallelism.tensor: Input should be greater than or equal to 1` or
`spec.recipe.trainIters: expected an integer, got the string '4' (write 4 without quotes)`, the
path in the camelCase form they wrote, never a Python attribute name. An object is read as the
Kubernetes API server reads it (`kubetron_api.base`): by its camelCase field names only, so a
snake_case name is an unknown field there as here.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from kubetron_api.v1alpha1 import API_VERSION, KIND, MegatronJob


class SpecError(ValueError):
    """A MegatronJob that does not match the schema; `problems` names every field."""

    def __init__(self, problems: list[str], source: str = "") -> None:
        self.problems = problems
        self.source = source
        prefix = f"{source}: " if source else ""
        super().__init__(prefix + "; ".join(problems))


def _loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "<root>"


# pydantic's wording completed where the user needs to know more than it says.
_MORE = {
    "extra_forbidden": "the MegatronJob schema has no field of this name (names are camelCase); "
    "kubectl apply refuses it too",
}


def describe_validation_error(err: ValidationError) -> list[str]:
    """One `<field path>: <message>` line per problem: the one place errors are worded."""
    return [
        f"{_loc(e['loc'])}: {e['msg']}" + (f": {_MORE[e['type']]}" if e["type"] in _MORE else "")
        for e in err.errors(include_url=False)
    ]


def parse_job(obj: Any, source: str = "") -> MegatronJob:
    """Validate one object as a MegatronJob; raise `SpecError` naming every bad field."""
    if not isinstance(obj, dict):
        raise SpecError([f"expected a mapping, got {type(obj).__name__}"], source)
    if obj.get("apiVersion") != API_VERSION or obj.get("kind") != KIND:
        found = f"{obj.get('apiVersion')}/{obj.get('kind')}"
        raise SpecError([f"apiVersion/kind must be {API_VERSION}/{KIND}, found {found}"], source)
    try:
        return MegatronJob.model_validate(obj, by_alias=True, by_name=False)
    except ValidationError as err:
        raise SpecError(describe_validation_error(err), source) from err


def load_documents(path: Path) -> Iterator[tuple[str, Any]]:
    """Yield (source, object) for every YAML document in a file."""
    with path.open() as fh:
        for i, doc in enumerate(yaml.safe_load_all(fh)):
            if doc is not None:
                yield f"{path}#{i}" if i else str(path), doc
