"""The config reference in markdown, generated from the run config's JSON schema.

``causalimg schema --markdown --builtin-only > docs/config.md`` writes docs/config.md; a test
regenerates it and fails when the committed file is stale.
"""

from __future__ import annotations

import json
from typing import Any

from causalimg.config.loader import MAX_CONFIG_BYTES, MAX_DEPTH, MAX_VALUES
from causalimg.strict import MAX_SEED

HEADER = f"""# Config reference

Generated from the run config's JSON schema by
`causalimg schema --markdown --builtin-only > docs/config.md`; do not edit by hand.
Configs are YAML or TOML files of at most {MAX_CONFIG_BYTES // 1024} KiB; a key given twice in one mapping is an error
(in YAML as in TOML), and YAML aliases may not expand a file past {MAX_VALUES:,} values or {MAX_DEPTH} levels.
Unknown keys are errors, and so are inf and NaN in any number, seeds above {MAX_SEED:,} (2^32 - 1),
integers outside the 64-bit range, a guidance term or a metric named twice in one list and a
`predictors.regressor.model` that timm does not know: `causalimg validate` finds them all.

Every field can be overridden with `--set dotted.name=value`; the value is read as YAML.
A plugin section selects its component by `name`; `regions: grid` is short for
`regions: {{name: grid}}`. An override that changes a component's `name` starts that section from
the new component's defaults plus the other overrides given for it, in any order: with
`--set data.name=folder --set data.path=scans --set data.spacing_mm=0.5` the phantom's fields of
the file are dropped. The same holds for one term of a strategy
(`finetune.strategies.<label>.<i>.name`) and one metric (`evaluate.metrics.<i>.name`). One override
can also replace a whole section: `--set 'data={{name: folder, path: scans, spacing_mm: 0.5}}'`.
"""


class _Writer:
    """Walks the schema: a section becomes a table of dotted fields, a plugin union one table per choice."""

    def __init__(self, schema: dict[str, Any]):
        self.defs: dict[str, Any] = schema.get("$defs", {})
        self.out: list[str] = []

    def resolve(self, node: dict[str, Any]) -> dict[str, Any]:
        ref = node.get("$ref")
        return self.defs[ref.rsplit("/", 1)[-1]] if ref else node

    def is_section(self, node: dict[str, Any]) -> bool:
        return "properties" in self.resolve(node)

    def members(self, node: dict[str, Any]) -> list[dict[str, Any]]:
        """The models of a plugin union (a discriminated ``oneOf``), else []."""
        return [self.resolve(m) for m in node.get("oneOf", []) if self.is_section(m)]

    def type_text(self, node: dict[str, Any]) -> str:
        node_resolved = self.resolve(node)
        if self.members(node):
            return "one of " + ", ".join(f"`{tag(m)}`" for m in self.members(node))
        if "$ref" in node and self.is_section(node):
            return f"section {node_resolved.get('title', '')}"
        node = node_resolved
        if "const" in node:
            return f"`{json.dumps(node['const'])}`"
        if "enum" in node:
            return " \\| ".join(f"`{json.dumps(v)}`" for v in node["enum"])
        if "anyOf" in node:
            return " \\| ".join(self.type_text(option) for option in node["anyOf"])
        kind = node.get("type")
        if kind == "array" and "prefixItems" in node:
            return "[" + ", ".join(self.type_text(item) for item in node["prefixItems"]) + "]"
        if kind == "array":
            least = f" (at least {node['minItems']})" if node.get("minItems") else ""
            return f"list of {self.type_text(node.get('items', {}))}{least}"
        if kind == "object" and isinstance(node.get("additionalProperties"), dict):
            least = f" (at least {node['minProperties']})" if node.get("minProperties") else ""
            return f"map of {self.type_text(node['additionalProperties'])}{least}"
        if kind is None:
            return "any"
        text = "path" if node.get("format") == "path" else str(kind)
        bounds = [
            f"{symbol} {node[key]}"
            for key, symbol in (
                ("exclusiveMinimum", ">"),
                ("minimum", ">="),
                ("exclusiveMaximum", "<"),
                ("maximum", "<="),
            )
            if key in node
        ]
        return text + (f" ({', '.join(bounds)})" if bounds else "")

    def section(self, title: str, node: dict[str, Any], prefix: str) -> None:
        """A heading, the model's docstring and one table row per field; subsections after it."""
        defaults = node.get("default")
        node = self.resolve(node)
        self.out += [f"## {title}", ""]
        if node.get("description"):
            self.out += [node["description"], ""]
        later: list[tuple[str, dict[str, Any], str]] = []
        rows = ["| field | type | default |", "|---|---|---|"]
        self.rows(node, prefix, rows, later, defaults if isinstance(defaults, dict) else None)
        self.out += [*rows, ""]
        for sub_title, sub_node, sub_prefix in later:
            self.section(sub_title, sub_node, sub_prefix)

    def rows(
        self, node: dict[str, Any], prefix: str, rows: list[str], later: list, defaults: dict | None = None
    ) -> None:
        """Table rows of a model's fields; ``defaults`` are the enclosing field's default values."""
        required = set(node.get("required", []))
        defaults = defaults or {}
        for key, field in node.get("properties", {}).items():
            dotted = f"{prefix}{key}"
            if "$ref" in field and self.is_section(field):
                self.rows(self.resolve(field), f"{dotted}.", rows, later, defaults.get(key, field.get("default")))
                continue
            if key in required:
                default = "required"
            elif key in defaults or "default" in field:
                default = f"`{json.dumps(defaults.get(key, field.get('default')))}`"
            else:
                default = "computed"  # a default factory: the section's description says what
            rows.append(f"| `{dotted}` | {self.type_text(field)} | {default if len(default) <= 60 else 'see below'} |")
            inner, path = field, dotted
            while True:  # into lists (`.<i>`) and maps (`.<label>`) down to the element type
                if "items" in inner:
                    inner, path = inner["items"], f"{path}.<i>"
                elif isinstance(inner.get("additionalProperties"), dict):
                    inner, path = inner["additionalProperties"], f"{path}.<label>"
                else:
                    break
            for member in self.members(inner):
                later.append((f"{path} with name `{tag(member)}`", member, f"{path}."))
            if inner is not field and "$ref" in inner and self.is_section(inner):
                later.append((path, inner, f"{path}."))


def tag(model_schema: dict[str, Any]) -> str:
    name = model_schema.get("properties", {}).get("name", {})
    return str(name.get("const", name.get("default", model_schema.get("title", ""))))


def config_markdown(model: Any) -> str:
    """The markdown reference of a run config model: one table per section and plugin choice."""
    schema = model.model_json_schema()
    writer = _Writer(schema)
    writer.out += [HEADER]
    for key, field in schema["properties"].items():
        if writer.is_section(field) and "$ref" in field:
            writer.section(key, field, f"{key}.")
        else:
            node = {"properties": {key: field}, "required": [k for k in schema.get("required", []) if k == key]}
            writer.out += [f"## {key}", ""]
            later: list = []
            rows = ["| field | type | default |", "|---|---|---|"]
            writer.rows(node, "", rows, later)
            writer.out += [*rows, ""]
            for title, sub_node, prefix in later:
                writer.section(title, sub_node, prefix)
    return "\n".join(writer.out).rstrip() + "\n"
