"""The README's configuration reference and preset table, generated from the models.

`kubetron docs` prints them; a unit test fails when the README's copy drifts, so the reference
can never disagree with the schema the API server enforces.
"""

from __future__ import annotations

from typing import Any

from kubetron_api.config import PRESETS
from kubetron_operator.cli.crd import spec_schema

BEGIN = "<!-- BEGIN GENERATED: kubetron docs -->"
END = "<!-- END GENERATED: kubetron docs -->"


def _type(node: dict[str, Any]) -> str:
    if node.get("enum"):
        return " \\| ".join(f"`{v}`" for v in node["enum"])
    if node.get("type") == "array":
        return f"list of {_type(node.get('items', {}))}"
    if node.get("x-kubernetes-preserve-unknown-fields"):
        return "object (Kubernetes)"
    if node.get("type") == "object" and "additionalProperties" in node:
        return "map of string"
    return str(node.get("type", "object"))


def _rows(node: dict[str, Any], prefix: str) -> list[str]:
    rows: list[str] = []
    required = set(node.get("required", []))
    for name, sub in node.get("properties", {}).items():
        path = f"{prefix}.{name}"
        default = sub.get("default")
        shown = "" if default in (None, {}) else f"`{default}`"
        req = " (required)" if name in required else ""
        desc = str(sub.get("description", "")).replace("\n", " ").replace("|", "\\|")
        rows.append(f"| `{path}`{req} | {_type(sub)} | {shown} | {desc} |")
        if sub.get("type") == "object" and "properties" in sub:
            rows += _rows(sub, path)
        elif sub.get("type") == "array" and "properties" in sub.get("items", {}):
            rows += _rows(sub["items"], f"{path}[]")
    return rows


def reference() -> str:
    head = ["| field | type | default | description |", "|---|---|---|---|"]
    return "\n".join(head + _rows(spec_schema(), "spec"))


def preset_table() -> str:
    cols = ["layers", "hidden", "ffn", "heads", "kv heads", "vocab", "experts (top-k)"]
    lines = ["| preset | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, a in PRESETS.items():
        experts = f"{a.num_experts} ({a.moe_router_topk})" if a.num_experts else "-"
        values: list[int | str] = [a.num_layers, a.hidden_size, a.ffn_hidden_size]
        values += [a.num_attention_heads]
        values += [a.num_query_groups, a.vocab_size, experts]
        lines.append(f"| `{name}` | " + " | ".join(str(v) for v in values) + " |")
    return "\n".join(lines)


def generated_block() -> str:
    body = "### Presets\n\n" + preset_table() + "\n\n### MegatronJob spec\n\n" + reference()
    return f"{BEGIN}\n{body}\n{END}"
